"""The capacity planner: hand-computed memory of a small shape, parameter counts against real
folders, the CPU accounting of Ray's bundles, GPU configs that do not fit naming their key,
and `raylight plan` / `raylight train` refusing before anything starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from cluster.capacity import memory as m
from cluster.capacity.planner import Machine, Shapes, cpu_demand, make_plan
from cluster.capacity.shapes import KNOWN_SHAPES, ModelShape, lora_parameter_count, parameter_count, read_shape
from cluster.commands.cli import main
from cluster.config import load_config

# H=4, I=6, 2 layers, 2 heads of dim 2, 1 KV head, vocabulary 10, untied head
SMALL = ModelShape(hidden_size=4, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   vocab_size=10, tie_word_embeddings=False, head_dim=2)  # fmt: skip


def test_small_shape_parameters_by_hand():
    # a layer: q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate, up, down 3 x 4x6 + two norms of 4 = 128
    # two layers 256, embeddings 40, untied head 40, final norm 4
    assert parameter_count(SMALL) == 340
    # LoRA r=2 on q (2 x (4+4)) and v (2 x (4+2)), in both layers
    assert lora_parameter_count(SMALL, 2, ("q_proj", "v_proj", "lm_head")) == 2 * (16 + 12)


def test_small_shape_memory_by_hand():
    # 340 bf16 weights; 56 fp32 trainable values, their gradients and AdamW's two moments
    assert m.state_bytes(340, 56, 2, 4) == {"weights": 680, "gradients": 224, "optimizer": 448}
    assert m.state_bytes(340, 56, 2, 4, shards=2) == {"weights": 340, "gradients": 112, "optimizer": 224}
    # bf16: b(4 q_width + 4 I) = 2 x 40, two norms 2 x 4 x (4 + 2) = 48; eager softmax 2 heads x 3 x (4 + 2) = 36;
    # LoRA on q and v: (4 + 2) x (4 inputs + rank 2) each = 72
    assert m.layer_activation_bytes(SMALL, 2, 3, eager=True, lora_rank=2, lora_targets=("q_proj", "v_proj")) == 80 + 48 + 36 + 72
    # fp32, fused attention, no adapter: 4 x 40 + 2 x 4 x 8
    assert m.layer_activation_bytes(SMALL, 4, 3, eager=False) == 224
    # 5 rows x 3 tokens x 2 layers; with checkpointing each layer keeps its 4 fp32 inputs, one layer recomputed
    assert m.activation_bytes(SMALL, 4, 5, 3, eager=False, checkpointing=False) == 224 * 15 * 2
    assert m.activation_bytes(SMALL, 4, 5, 3, eager=False, checkpointing=True) == 2 * 15 * 4 * 4 + 224 * 15
    # key and value, 2 layers, 1 KV head of 2, bf16 (tensor parallel over 2 GPUs: still one head each)
    assert m.kv_bytes_per_token(SMALL, 2) == 16 == m.kv_bytes_per_token(SMALL, 2, tensor_parallel=2)
    # a trained head: 5 tokens x 10 logits x (2 + 16) bytes; a frozen one: 3 fp32 chunks of the 50 logits
    assert m.head_bytes(SMALL, 5, trained_head=True, b=2) == 900
    assert m.head_bytes(SMALL, 5, trained_head=False, b=2) == 600
    assert m.max_sequences(1000, 16, 10) == 6
    assert m.largest_batch(100, 30, 20) == 3


def test_constants_follow_the_learner():
    from cluster.capacity import planner
    from learners import policy
    from learners.head import CHUNK_VALUES

    # the head's chunk is a copy; the attention kernel's choice is the learner's own function
    assert m.HEAD_CHUNK_VALUES == CHUNK_VALUES and planner.eager_attention_fits is policy.eager_attention_fits


def _stored_parameters(folder) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


def test_parameter_counts_match_real_folders(tiny_model_path):
    from pathlib import Path

    from rollout.models import resolve_model

    for folder in (Path(tiny_model_path), Path(resolve_model("smollm2"))):
        assert parameter_count(read_shape(str(folder))) == _stored_parameters(folder)
    # Qwen2.5-0.5B: transformers' Qwen2ForCausalLM of the published config, counted on the meta device
    assert parameter_count(KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"]) == 494_032_768
    assert round(parameter_count(KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]) / 1e9, 2) == 8.03


def test_an_unknown_hub_name_without_a_folder_says_how_to_give_one():
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_shape("some-org/not-a-known-model")


@pytest.mark.parametrize("placement", ["disaggregated", "colocated"])
def test_cpu_demand_equals_the_placement_bundles_plus_the_verifiers(placement):
    from cluster.loop.placement import bundles

    config = load_config("configs/tiny.yaml", [f"cluster.placement={placement}", "verifier.min_verifiers=2"])
    specs = bundles(config)[0]
    demand = cpu_demand(config)
    assert demand["learner"] + demand["generator"] == pytest.approx(sum(s["CPU"] for s in specs))
    assert demand["verifier"] == pytest.approx(2 * config.verifier.num_cpus)


def test_two_generators_on_two_cpus_leave_the_verifiers_none():
    """What the 2-core machine showed: learner 1 + 2 generators x 0.5 = 2 CPUs, and the verifier
    waits 60 s for a CPU that never comes. The plan says so and names run.num_cpus."""
    config = load_config("configs/tiny.yaml", ["generator.num_generators=2", "run.num_cpus=2"])
    plan = make_plan(config, Shapes(SMALL), Machine(cpus_per_node=2, host_memory_gib=24, local=True), 64)
    assert [p.key for p in plan.problems] == ["run.num_cpus"]
    assert "raise run.num_cpus to 3" in plan.problems[0].message and plan.cpus == (2.1, 2)
    fine = load_config("configs/tiny.yaml", ["generator.num_generators=2", "run.num_cpus=3"])
    assert make_plan(fine, Shapes(SMALL), Machine(cpus_per_node=3, host_memory_gib=24, local=True), 64).fits


H100 = Machine(nodes=1, cpus_per_node=32, gpus_per_node=8, gpu_memory_gib=80, host_memory_gib=None)


def _gpu_plan(shape: str, *overrides: str):
    config = load_config("configs/demo.yaml", ["learner.num_gpus=1", "generator.num_gpus=1", *overrides])
    return make_plan(config, Shapes(KNOWN_SHAPES[shape], checkpoint_bytes=2), H100, 256)


def test_gpu_configs_that_do_not_fit_name_their_key():
    llama = "meta-llama/Llama-3.1-8B-Instruct"
    # full weights in fp32 with AdamW: 16 bytes x 8.0 B parameters = 120 GiB on one 80 GiB GPU
    full = _gpu_plan(llama, "model.train=full")
    assert [p.key for p in full.problems] == ["learner.sharding"]
    # sharded over 4 ranks with no reference copy: the state fits, micro-batches of 64 do not
    big = ("model.train=full", "learner.sharding=fsdp", "learner.num_learners=4", "algorithm.kl_coef=0", "rollout.prompts_per_step=64")
    sharded = _gpu_plan(llama, *big, "algorithm.micro_batch_size=64")
    assert [p.key for p in sharded.problems] == ["algorithm.micro_batch_size"]
    largest = sharded.actors[0].largest_batch
    assert 0 < largest < 64 and f"algorithm.micro_batch_size <= {largest}" in sharded.problems[0].message
    assert _gpu_plan(llama, *big, f"algorithm.micro_batch_size={largest}").fits
    # a 7B engine on a quarter of a GPU: its 14 GiB of bf16 weights leave no KV cache
    engine = _gpu_plan("Qwen/Qwen2.5-7B-Instruct", "generator.gpu_memory_utilization=0.2")
    assert [p.key for p in engine.problems] == ["generator.gpu_memory_utilization"]
    assert _gpu_plan("Qwen/Qwen2.5-7B-Instruct", "generator.gpu_memory_utilization=0.5").actors[1].largest_batch > 0


def test_colocated_sleep_mode_needs_room_for_the_awake_engine_beside_the_learner():
    gpu = Machine(nodes=1, cpus_per_node=32, gpus_per_node=1, gpu_memory_gib=24)
    config = load_config("configs/demo.yaml", ["learner.num_gpus=1", "generator.num_gpus=1", "cluster.placement=colocated", "generator.sleep_mode=true"])
    plan = make_plan(config, Shapes(KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"], checkpoint_bytes=2), gpu, 256)
    assert "generator.gpu_memory_utilization" in [p.key for p in plan.problems]  # 14 GiB of weights + 0.9 x 24 GiB


def test_tensor_parallel_shards_weights_and_kv_heads():
    one = _gpu_plan("Qwen/Qwen3-8B")
    two = _gpu_plan("Qwen/Qwen3-8B", "generator.tensor_parallel_size=2", "generator.num_gpus=2")
    weights = lambda plan: dict(plan.actors[1].device_gib)["weights"]  # noqa: E731
    assert weights(two) == pytest.approx(weights(one) / 2)
    assert two.actors[1].largest_batch > 2 * one.actors[1].largest_batch  # more room and half the KV per GPU


def test_plan_command_prints_a_table_and_json(capsys):
    assert main(["plan", "configs/tiny.yaml"]) == 0
    table = capsys.readouterr().out
    assert all(role in table for role in ("learner", "generator", "verifier")) and table.rstrip().endswith("fits")
    assert main(["plan", "configs/tiny.yaml", "--json", "--cpus-per-node", "4", "--host-memory", "24GiB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["cpus"] == {"asked": 1.6, "available": 4.0}
    assert {a["role"] for a in plan["actors"]} == {"learner", "generator", "verifier"}


def test_plan_command_refuses_with_the_key(capsys):
    assert main(["plan", "configs/tiny.yaml", "generator.num_generators=2", "run.num_cpus=2"]) == 2
    assert "DOES NOT FIT: run.num_cpus" in capsys.readouterr().out
    assert main(["plan", "configs/tiny.yaml", "model.path=Qwen/Qwen2.5-7B-Instruct", "learner.num_gpus=1", "generator.num_gpus=1",
                 "generator.gpu_memory_utilization=0.5", "--gpus-per-node", "2", "--gpu-memory", "24GiB"]) == 2  # fmt: skip
    assert "generator.gpu_memory_utilization" in capsys.readouterr().out


def test_train_refuses_before_ray_starts(tmp_path):
    """`raylight train` stops with exit code 2 naming run.num_cpus, before any Ray cluster or actor."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cluster.commands.cli", "train", "configs/tiny.yaml", "generator.num_generators=2",
                           "run.num_cpus=2", "--run-dir", str(tmp_path / "run"), "--no-dashboard"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run.num_cpus" in done.stderr and "Started a local Ray instance" not in done.stderr
    assert time.monotonic() - start < 60


def test_a_joined_cluster_is_planned_node_by_node():
    """Two 8-GPU workers and a GPU-less head: 16 GPUs in all, every CPU counted."""
    from cluster.capacity.check import machine_of_nodes

    machine = machine_of_nodes([{"CPU": 8}, {"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 8}], 136)
    assert (machine.nodes, machine.gpus_per_node, machine.nodes * machine.cpus_per_node) == (2, 8, 136)
    config = load_config("configs/gpu/two-nodes-llama3.1-8b-fsdp.yaml", [])
    from cluster.commands.plan import plan_config

    assert plan_config(config, machine).gpus == (16, 16)
    assert machine_of_nodes([{"CPU": 2}], 2).nodes == 1  # a CPU cluster: its nodes


def test_train_plans_with_the_runs_own_longest_prompt(tiny_model_path):
    """`raylight train` measures its prompts (held-out problems, rendered as the run renders
    them) instead of assuming 256 tokens: the demo's are under 60."""
    from transformers import AutoTokenizer

    from cluster.loop.driver import PROMPT_MARGIN, longest_prompt
    from cluster.loop.wiring import build_tasks
    from cluster.stages import TaskPrompts
    from cluster.loop.wiring import training_sampling

    config = load_config("configs/demo.yaml", [f"model.path={tiny_model_path}", "eval.n=20"])
    tokenizer, tasks = AutoTokenizer.from_pretrained(tiny_model_path), build_tasks(config)
    rendered = TaskPrompts(tokenizer, tasks, training_sampling(config)).render(tasks.eval_sets("validation")[next(iter(tasks.tasks))])
    longest = max(len(p.token_ids) for p in rendered)
    assert longest_prompt(tokenizer, tasks, config) == math.ceil(PROMPT_MARGIN * longest) < 100
