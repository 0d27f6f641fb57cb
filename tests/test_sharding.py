"""Sharded learners (FSDP2) and the bucketed gradient all-reduce, on the tiny model.

Each multi-rank case spawns plain ``Learner`` objects in processes joined by gloo (no Ray),
trains them on the shards of one batch and compares them with one unsharded learner that saw
the whole batch. The batch of 5 rows is cut 2 + 3: with micro-batches of 2 one rank makes one
pass per update, the other two, so the sharded ranks must even out their collectives.
What cannot run here: NCCL, bf16 mixed precision on a GPU, CPU offload that moves anything.
Each spawned case takes 15-20 s on an idle 2-core machine (two processes load torch and the
model); the checkpoint cross-load and the Ray group are marked slow.
"""

import dataclasses
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, learner_settings
from learners.learner import Learner
from learners.policy import LoraSettings
from learners.sharding import buckets, local_bytes, training_state_bytes

sys.path.insert(0, str(Path(__file__).parent))
from test_learner import nonzero_adapter, random_batch  # noqa: E402

logger = logging.getLogger(__name__)

LORA = LoraSettings(rank=4, alpha=8)
ROWS, STEPS = 5, 3


# what is trained, and how: LoRA or every weight, in exact fp32 or with a bf16 base under bf16
# autocast (the sharded layers gathered in bf16) and the optimizer offload (on a CPU a no-op)
CASES = {
    "full": {"lora": None},
    "lora": {"lora": LORA},
    "lora-bf16-offload": {"lora": LORA, "dtype": "bfloat16", "autocast_dtype": "bfloat16", "offload_optimizer": True},
}


def settings(model_path: str, case: str, sharding: str = "none"):
    """lr 1e-2 (LoRA) / 1e-3 (every weight), a KL term (the reference passes are sharded
    too), clipping that bites (the clip reads the global norm of the shards)."""
    knobs = dict(CASES[case])
    lora, offload = knobs.pop("lora"), knobs.pop("offload_optimizer", False)
    s = learner_settings(model_path, lora, lr=1e-2 if lora else 1e-3, micro_batch_size=2, threads=1, max_grad_norm=0.5, kl_coef=0.05, **knobs)
    return dataclasses.replace(s, sharding=sharding, offload_optimizer=offload and sharding == "fsdp")


def make(model_path: str, case: str, sharding: str = "none") -> Learner:
    """A CPU learner; with LoRA, its adapter's B moved off zero (before any sharding)."""
    learner = Learner(settings(model_path, case, sharding), device="cpu")
    if learner.policy.lora is not None:
        nonzero_adapter(learner)
    return learner


def batches() -> list:
    return [random_batch(ROWS, seed=s) for s in range(STEPS)]


def train(learner: Learner, rank: int, world: int) -> dict:
    """Steps 1..STEPS-1, a checkpoint, the last step; then what the test compares (rank 0's),
    and the last step again from the checkpoint."""
    *first, last = batches()
    for batch in first:
        learner.step(batch.shards(world)[rank])
    saved = learner.state_dict(weights=rank == 0)
    metrics = learner.step(last.shards(world)[rank])
    out = {
        "state": saved,
        "metrics": metrics,
        "bytes": training_state_bytes(learner.policy.model, learner.optimizer),
        "weights": learner.weight_update(complete=True).tensors,
        "streamed": learner.weight_update(dtype="bfloat16", bucket_bytes=2**17).buckets,  # full weights: in buckets
        "logprobs": learner.logprobs(last),
        "digest": learner.parameter_digest(),
    }
    learner.load_state_dict(rank0s(learner, saved), rng=saved["rng"])
    learner.step(last.shards(world)[rank])
    out["replayed"] = learner.weight_update(complete=True).tensors
    return out


def rank0s(learner: Learner, state: dict) -> dict:
    """Rank 0's state on every rank (what ``LearnerGroup.load_state_dicts`` sends)."""
    import torch.distributed as dist

    if learner.world_size == 1:
        return state
    box = [state if learner.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank(rank: int, world: int, port: int, model_path: str, case: str, sharding: str, out: str, bucket_bytes: int) -> None:
    import torch.distributed as dist

    learner = make(model_path, case, sharding)
    learner.init_distributed("127.0.0.1", port, rank, world, timeout_s=120)
    if bucket_bytes:
        learner.layout.bucket_bytes = bucket_bytes
    result = train(learner, rank, world)
    if rank == 0:
        torch.save(result, out)
    else:
        torch.save({"bytes": result["bytes"], "weights": result["weights"], "streamed": result["streamed"]}, f"{out}.rank{rank}")
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, model_path: str, case: str, sharding: str, bucket_bytes: int = 0) -> tuple[dict, dict]:
    """Two ranks in spawned processes: (rank 0's results, rank 1's bytes and weights)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / f"{sharding}.pt")
    mp.spawn(_rank, args=(2, free_port(), model_path, case, sharding, out, bucket_bytes), nprocs=2, join=True)
    return torch.load(out, weights_only=False), torch.load(f"{out}.rank1", weights_only=False)


def assert_same_training(sharded: dict, single: dict, atol: float = 1e-3, most: float = 1e-5, logprob_atol: float = 1e-4) -> None:
    """Float sums in another order (each rank's shard of the loss, reduce-scatter vs one
    backward); Adam (~lr * g / (|g| + eps)) amplifies that noise where a gradient is near zero,
    so every weight within ``atol`` (fp32: a tenth of one LoRA step), 99 % of them within
    ``most``, the log-probs of the trained policy within ``logprob_atol`` nats."""
    rel = 1e-4 if atol <= 1e-3 else 1e-2
    assert sharded["metrics"]["train/loss"] == pytest.approx(single["metrics"]["train/loss"], rel=rel, abs=1e-6)
    assert sharded["metrics"]["train/grad_norm"] == pytest.approx(single["metrics"]["train/grad_norm"], rel=rel)
    assert set(sharded["weights"]) == set(single["weights"])
    for key, tensor in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][key].float(), tensor.float(), rtol=0, atol=atol)
    close = sum(torch.isclose(sharded["weights"][k].float(), t.float(), rtol=0, atol=most).float().mean() for k, t in single["weights"].items())
    assert close / len(single["weights"]) > 0.99
    for ours, theirs in zip(sharded["logprobs"], single["logprobs"]):
        assert ours == pytest.approx(theirs, abs=logprob_atol)


def single_learner(model_path: str, case: str) -> dict:
    return train(make(model_path, case), 0, 1)


def test_buckets_cut_by_size_and_dtype():
    f32 = [torch.zeros(n) for n in (3, 3, 5)]  # 12, 12, 20 bytes
    half = torch.zeros(2, dtype=torch.bfloat16)  # 4 bytes
    cut = buckets([*f32, half, torch.zeros(1)], limit_bytes=24)
    assert [[t.numel() for t in b] for b in cut] == [[3, 3], [5], [2], [1]]  # 12+12; 20 alone; a dtype change starts one
    assert [[t.numel() for t in b] for b in buckets([torch.zeros(100)], limit_bytes=8)] == [[100]]  # too big: alone
    assert buckets([]) == []


def test_local_bytes_counts_a_tied_tensor_once():
    shared = torch.zeros(10)
    assert local_bytes([shared, shared, torch.zeros(2, dtype=torch.float64)]) == 40 + 16


@pytest.mark.parametrize("case", list(CASES))
def test_two_fsdp_ranks_train_as_one_unsharded_learner(tiny_model_path, tmp_path, case):
    """Same weights, loss, norm and log-probs as one learner on the whole batch; a sharded
    checkpoint resumes bit-exactly, and is the same checkpoint an unsharded learner writes.
    Every weight: each rank holds about half of the parameters, gradients and Adam moments.
    bf16: the sharded layers gather LoRA in bf16 where autocast would cast it, so the two
    differ by bf16 rounding in another order: every weight within one LoRA step (1e-2), 99 %
    within a tenth of one (measured: 93 % agree within 1e-4), log-probs within 0.02 nats
    (measured 0.003)."""
    sharded, other = run_ranks(tmp_path, tiny_model_path, case, "fsdp")
    single = single_learner(tiny_model_path, case)
    assert_same_training(sharded, single, *((1e-2, 1e-3, 2e-2) if "bf16" in case else (1e-3, 1e-5, 1e-4)))
    assert other["weights"] == {} and other["streamed"] == ()  # the whole tensors went to rank 0 only
    if case == "full":  # streamed in buckets as gathered: the same weights, in the generators' dtype
        streamed = {name: t for bucket in sharded["streamed"] for name, t in bucket.items()}
        assert len(sharded["streamed"]) > 2 and streamed.keys() == sharded["weights"].keys()
        assert all(torch.equal(t, sharded["weights"][name].to(torch.bfloat16)) for name, t in streamed.items())
    # resume: the checkpoint before the last step, loaded into the same ranks, repeats it exactly
    for key, tensor in sharded["weights"].items():
        assert torch.equal(sharded["replayed"][key], tensor), key
    # the sharded checkpoint has the unsharded one's form: trainable names, optimizer layout
    ours, theirs = sharded["state"], single["state"]
    assert set(ours["trainable"]) == set(theirs["trainable"])
    assert ours["optimizer"]["param_groups"][0]["params"] == theirs["optimizer"]["param_groups"][0]["params"]
    for index, moments in theirs["optimizer"]["state"].items():
        for key, value in moments.items():
            assert ours["optimizer"]["state"][index][key].shape == value.shape, (index, key)
    if case == "full":
        # parameters + gradients + Adam moments per rank: half, up to the uneven dim-0 chunks
        logger.info("training state bytes: unsharded %d, fsdp rank 0 %d, rank 1 %d", single["bytes"], sharded["bytes"], other["bytes"])
        assert 0.45 < sharded["bytes"] / single["bytes"] < 0.55, (sharded["bytes"], single["bytes"])
        assert 0.45 < other["bytes"] / single["bytes"] < 0.55


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_an_unsharded_learner(tiny_model_path, tmp_path):
    """Rank 0's gathered state loads into one unsharded learner, whose last step then equals
    the sharded ranks' (the same tolerance as their training)."""
    sharded, _ = run_ranks(tmp_path, tiny_model_path, "lora", "fsdp")
    learner = Learner(settings(tiny_model_path, "lora"), device="cpu")
    learner.load_state_dict(sharded["state"])
    learner.step(batches()[-1])
    resumed = learner.weight_update(complete=True).tensors
    for key, tensor in sharded["weights"].items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-3)


def test_two_unsharded_ranks_reduce_gradients_in_buckets_as_one_learner(tiny_model_path, tmp_path):
    """sharding: none with 2 ranks: the gradients summed in flat buckets (here 16 KiB, so the
    adapter's 28 gradients travel in several) give the weights of one learner."""
    pair, other = run_ranks(tmp_path, tiny_model_path, "lora", "none", bucket_bytes=16 * 1024)
    single = single_learner(tiny_model_path, "lora")
    assert_same_training(pair, single)
    assert other["weights"].keys() == pair["weights"].keys()  # every rank a whole replica
    for key, tensor in pair["weights"].items():
        assert torch.equal(other["weights"][key], tensor), key
    for key, tensor in pair["weights"].items():
        assert torch.equal(pair["replayed"][key], tensor), key


@pytest.mark.slow
def test_a_sharded_learner_group_sends_every_weight_query_to_every_rank(ray_cluster, tiny_model_path):
    """Through Ray actors: a query that reads sharded weights reaches every rank (one that
    reached rank 0 alone would wait in an all-gather until learner.call_timeout_s), and
    rank 0's answers equal one unsharded learner's; a checkpoint's states round-trip."""
    from actors.learner import LearnerGroup, LearnerGroupSettings

    group = LearnerGroup(settings(tiny_model_path, "lora", "fsdp"), LearnerGroupSettings(num_learners=2, num_cpus=0.5, sharding="fsdp", call_timeout_s=120))
    single = Learner(settings(tiny_model_path, "lora"), device="cpu")
    try:
        batch = batches()[0]
        assert group.step(batch)["train/loss"] == pytest.approx(single.step(batch)["train/loss"], rel=1e-4)
        for ours, theirs in zip(group.logprobs(batch), single.logprobs(batch)):
            assert ours == pytest.approx(theirs, abs=1e-4)
        contexts, targets = [list(p) for p in batch.prompt_token_ids], [list(c) for c in batch.completion_token_ids]
        assert group.sequence_logprob(contexts, targets, reference=True) == pytest.approx(single.sequence_logprob(contexts, targets, reference=True), abs=1e-4)
        update, expected = group.weight_update(), single.weight_update()
        assert update.policy.version == 1 and set(update.tensors) == set(expected.tensors)
        for key, tensor in expected.tensors.items():
            torch.testing.assert_close(update.tensors[key], tensor, rtol=0, atol=1e-3)
        digest = group.parameter_digest()
        states = group.state_dicts()
        assert set(states[0]["trainable"]) == set(single.state_dict()["trainable"]) and "trainable" not in states[1]
        group.step(batches()[1])
        assert group.load_state_dicts(states).version == 1
        assert group.parameter_digest() == digest
    finally:
        group.kill()


def _dcp_rank(rank: int, world: int, ports: tuple[int, int], model_path: str, folder: str, out: str) -> None:
    """Step 1, shards written, step 2 (the group that never stopped); then a new group (new
    learners, a new process group) loads the shards and takes step 2 again."""
    import torch.distributed as dist

    first, second = batches()[:2]
    learner = make(model_path, "full", "fsdp")
    learner.init_distributed("127.0.0.1", ports[0], rank, world, timeout_s=120)
    learner.step(first.shards(world)[rank])
    small = learner.save_shards(folder)
    learner.step(second.shards(world)[rank])
    uninterrupted = learner.weight_update(complete=True).tensors
    dist.destroy_process_group()
    fresh = make(model_path, "full", "fsdp")
    fresh.init_distributed("127.0.0.1", ports[1], rank, world, timeout_s=120)
    version = fresh.load_shards(folder, rank0s(fresh, small), rng=small["rng"])
    fresh.step(second.shards(world)[rank])
    resumed = fresh.weight_update(complete=True).tensors
    if rank == 0:
        torch.save({"small": small, "version": version.version, "uninterrupted": uninterrupted, "resumed": resumed}, out)
    dist.destroy_process_group()


def test_two_fsdp_ranks_resume_from_their_own_shards(tiny_model_path, tmp_path):
    """Every weight trained: each rank writes its own shards (``torch.distributed.checkpoint``),
    a new group of two loads them and repeats the next step exactly; the shards consolidated
    on the driver resume one unsharded learner to the same weights (the tolerance of
    sharded training)."""
    import torch.multiprocessing as mp

    from cluster.keeping.checkpoint import Checkpoint
    from cluster.keeping.learner_states import consolidated

    folder, out = tmp_path / "learner-dcp", str(tmp_path / "dcp.pt")
    mp.spawn(_dcp_rank, args=(2, (free_port(), free_port()), tiny_model_path, str(folder), out), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    assert result["version"] == 1 and "trainable" not in result["small"] and "optimizer" not in result["small"]
    for key, tensor in result["uninterrupted"].items():
        assert torch.equal(result["resumed"][key], tensor), key
    # per-rank shards: each file about half of the tensors and moments, none the whole
    shards = sorted(folder.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"] and (folder / ".metadata").is_file()
    state = consolidated(Checkpoint(tmp_path, 1, None), result["small"] | {"shards": folder.name})
    whole = sum(t.numel() * t.element_size() for t in state["trainable"].values())
    whole += sum(v.numel() * v.element_size() for m in state["optimizer"]["state"].values() for k, v in m.items() if k != "step")
    assert all(0.4 * whole < p.stat().st_size < 0.6 * whole for p in shards), ([p.stat().st_size for p in shards], whole)
    learner = Learner(settings(tiny_model_path, "full"), device="cpu")
    assert learner.load_state_dict(state).version == 1
    learner.step(batches()[1])
    unsharded = learner.weight_update(complete=True).tensors
    for key, tensor in result["uninterrupted"].items():
        torch.testing.assert_close(unsharded[key], tensor, rtol=0, atol=1e-3)


def test_sharded_checkpoints_fall_back_to_the_driver_where_a_node_cannot_share_the_folder(tmp_path, caplog):
    """The run directory must be one folder that the driver and every learner's node write;
    where it is not, the learners' state is gathered to the driver, with one warning."""
    from cluster.keeping.learner_states import Gathered, Sharded, learner_states
    from cluster.loop.placement import check_shared_folder, shared_probe

    (tmp_path / "file").write_text("")
    assert "the driver cannot write" in check_shared_folder(str(tmp_path / "file" / "run"), ["node-a"])  # before asking any node
    assert shared_probe(str(tmp_path), ".shared-probe-x", "node-a") == f"{tmp_path} does not hold the file the driver wrote there"
    (tmp_path / ".shared-probe-x").write_text("driver")
    (tmp_path / ".shared-probe-x.node-b").mkdir()  # where node b's file goes cannot be written
    assert shared_probe(str(tmp_path), ".shared-probe-x", "node-a") is None and (tmp_path / ".shared-probe-x.node-a").is_file()
    assert shared_probe(str(tmp_path), ".shared-probe-x", "node-b").startswith(f"{tmp_path} is not writable")
    assert isinstance(learner_states(True, None), Sharded) and isinstance(learner_states(False, None), Gathered)
    with caplog.at_level(logging.WARNING):
        assert isinstance(learner_states(True, "on node 10.0.0.2: /runs does not hold the file the driver wrote there"), Gathered)
    assert "gathered to the driver" in caplog.text and "on node 10.0.0.2" in caplog.text and "file system every learner's node shares" in caplog.text


@pytest.mark.slow
def test_a_sharded_learner_group_checkpoints_in_shards_through_the_keepers_store(ray_cluster, tiny_model_path, tmp_path):
    """Through Ray actors and the checkpoint store: the shards are written by the ranks into
    the checkpoint, checksummed with it; a restore in place repeats the next step exactly."""
    import ray

    from actors.learner import LearnerGroup, LearnerGroupSettings
    from cluster.keeping.checkpoint import CheckpointStore
    from cluster.keeping.learner_states import Sharded, read_states
    from cluster.loop.placement import check_shared_folder

    assert check_shared_folder(str(tmp_path), [ray.get_runtime_context().get_node_id()]) is None  # one node: always
    assert not list(tmp_path.iterdir())  # the probe files are gone
    group = LearnerGroup(settings(tiny_model_path, "lora", "fsdp"), LearnerGroupSettings(num_learners=2, num_cpus=0.5, sharding="fsdp", call_timeout_s=120))
    try:
        first, second = batches()[:2]
        group.step(first)
        store, states = CheckpointStore(tmp_path / "checkpoints"), Sharded()
        checkpoint = store.save(1, states.files(group))
        assert store.problem(checkpoint.path) is None
        marker = json.loads((checkpoint.path / "COMPLETE.json").read_text())
        assert {"learner-dcp/__0_0.distcp", "learner-dcp/__1_0.distcp", "learner-dcp/.metadata", "learner.pt", "learner_rank1.pt"} <= set(marker["files"])
        saved = read_states(checkpoint)
        assert saved[0]["shards"] == "learner-dcp" and "trainable" not in saved[0] and set(saved[1]) == {"rank", "rng"}
        group.step(second)
        digest = group.parameter_digest()
        assert states.load(group, checkpoint, policy_version=5).version == 5
        group.step(second)
        assert group.parameter_digest() == digest
    finally:
        group.kill()
