"""GPU smoke test and throughput measure: a few GRPO steps of the plain
``learners.learner.Learner`` (no Ray, no vLLM), unsharded and sharded with FSDP2 (a group of
one rank), then the HF generation engine (``rollout.engines.HFEngine``) serving the trained
adapter, on a 0.5B-class model built from its config.

Meant for one GPU machine with torch, transformers and peft only: the model (Qwen2.5-0.5B's
shape, random weights, bf16) and a word-level tokenizer are written to a temporary folder,
so nothing is downloaded; throughput does not depend on the weights' values. The batch is
random tokens with the learner's own log-probs as the generator's, as in an on-policy step.

The last line printed is JSON: for each part (``learner``, ``learner_fsdp``, ``hf_engine``)
tokens per second, peak GPU memory and the model FLOPs utilisation (MFU). Model FLOPs count
the work a step needs, not what is recomputed: per token the forward pass (2 FLOPs per
weight of the transformer body, plus the attention scores over the causal prefix), the
backward pass to the inputs (as much again), and for full fine-tuning the weight gradients
(as much again; LoRA's own weight gradients are negligible and left out). The LM head runs on
completion tokens only, as the learner computes it. ``mfu_6n`` is the 6 x parameters x
tokens convention other trainers report, for comparison. The engine's MFU counts 2 FLOPs per
weight per generated token: decoding is bound by memory bandwidth, so expect it low.

    deploy/gpu-smoke.sh                      # Qwen2.5-0.5B shape, LoRA r16, on cuda
    deploy/gpu-smoke.sh --full --steps 3     # full fine-tuning
    python deploy/gpu_smoke.py --model tiny --device cpu --steps 1   # what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from contracts import TrainBatch  # noqa: E402
from learners.learner import Learner  # noqa: E402
from learners.policy import LoraSettings  # noqa: E402
from learners.settings import AlgorithmSettings, LearnerSettings  # noqa: E402

logger = logging.getLogger("gpu_smoke")

# the model shapes this script can build: Qwen2.5-0.5B's, and a tiny one for CPU checks
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}  # fmt: skip

# dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def build_model(shape: str, folder: Path) -> Path:
    """A Qwen2 model of ``shape`` with random weights (bf16) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(253)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    )  # fmt: skip
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_batch(rows: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> TrainBatch:
    rng = random.Random(seed)
    prompts = tuple(tuple(rng.randrange(3, vocab) for _ in range(prompt_len)) for _ in range(rows))
    completions = tuple(tuple(rng.randrange(3, vocab) for _ in range(completion_len)) for _ in range(rows))
    return TrainBatch(
        prompt_token_ids=prompts,
        completion_token_ids=completions,
        old_logprobs=tuple((0.0,) * completion_len for _ in range(rows)),
        advantages=tuple(rng.gauss(0.0, 1.0) for _ in range(rows)),
        policy_versions=(0,) * rows,
        rewards=tuple(float(rng.random() < 0.5) for _ in range(rows)),
    )


def model_flops(learner: Learner, batch: TrainBatch) -> dict[str, float]:
    """Model FLOPs of one learner step on ``batch`` (one forward and backward per token; see
    the module docstring), and the 6 x N x tokens figure."""
    config = learner.policy.causal_lm.config
    head = learner.policy.causal_lm.lm_head.weight.numel()
    lora = sum(p.numel() for p in learner.policy.policy_parameters()) if learner.policy.lora is not None else 0
    embedding = learner.policy.causal_lm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in learner.policy.causal_lm.parameters()) - embedding  # tied head: counted apart
    if not config.tie_word_embeddings:
        body -= head
    heads_dim = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    forward = 0.0
    for prompt, completion in zip(batch.prompt_token_ids, batch.completion_token_ids):
        length = len(prompt) + len(completion)
        # QK^T and AV over the causal prefix: 2 matmuls x 2 FLOPs x (length^2 / 2) x heads_dim, per layer
        attention = 2 * length * length * heads_dim * config.num_hidden_layers
        forward += 2 * body * length + attention + 2 * head * len(completion) + 2 * lora * length
    full = learner.policy.lora is None
    backward = forward * (2 if full else 1)  # to the inputs, and (full) to the weights
    tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_token_ids, batch.completion_token_ids))
    return {"model_flops": forward + backward, "flops_6n": 6.0 * (body + head) * tokens, "parameters": body + embedding}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reset_peak(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def learner_settings(args: argparse.Namespace, path: Path, device: torch.device, sharding: str) -> LearnerSettings:
    algorithm = AlgorithmSettings(lr=1e-5, kl_coef=0.0, loss_agg="token-mean", micro_batch_size=args.micro_batch)
    return LearnerSettings(
        model_path=str(path),
        algorithm=algorithm,
        lora=None if args.full else LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank),
        dtype="bfloat16" if device.type == "cuda" else "float32",
        temperature=1.0,
        total_steps=args.steps + 1,
        seed=0,
        threads=0,
        gradient_checkpointing=args.gradient_checkpointing,
        sharding=sharding,
    )


def measure_learner(args: argparse.Namespace, path: Path, device: torch.device, sharding: str) -> tuple[dict, Learner]:
    """A few steps of the learner (``sharding``: none, or FSDP2 over a group of one rank):
    the median step's tokens/s, its MFU, and the peak memory of the whole run."""
    reset_peak(device)
    learner = Learner(learner_settings(args, path, device, sharding), device=device)
    if sharding == "fsdp":
        learner.init_distributed("127.0.0.1", free_port(), 0, 1)
    vocab = learner.policy.causal_lm.config.vocab_size
    batches = [random_batch(args.batch, args.prompt_len, args.completion_len, vocab, seed) for seed in range(args.steps + 1)]
    # on-policy: the generator's log-probs are the learner's own (one no-grad pass, untimed)
    batches = [dataclasses.replace(b, old_logprobs=tuple(map(tuple, learner.logprobs(b)))) for b in batches]
    seconds, losses = [], []
    for i, batch in enumerate(batches):  # the first is the warm-up
        started = time.perf_counter()
        metrics = learner.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        losses.append(metrics["train/loss"])
        logger.info("%s step %d: %.2f s, loss %.4f, grad_norm %.3f", sharding, i, elapsed, metrics["train/loss"], metrics["train/grad_norm"])
        if i:
            seconds.append(elapsed)
    flops = model_flops(learner, batches[1])
    tokens = args.batch * (args.prompt_len + args.completion_len)
    step_seconds = statistics.median(seconds)
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops["model_flops"] / step_seconds / 1e12
    return {
        "parameters": flops["parameters"],
        "training": "full" if args.full else f"lora-r{args.lora_rank}",
        "sharding": sharding,
        "gradient_checkpointing": args.gradient_checkpointing,
        "sequences_per_step": args.batch,
        "tokens_per_step": tokens,
        "step_seconds": round(step_seconds, 4),
        "tokens_per_second": round(tokens / step_seconds, 1),
        "peak_memory_gib": peak_gib(device),
        "model_flops_per_step": flops["model_flops"],
        "achieved_tflops": round(achieved, 2),
        "peak_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "mfu_6n": round(flops["flops_6n"] / step_seconds / 1e12 / peak, 4) if peak else None,
        "losses_finite": all(math.isfinite(x) for x in losses),
    }, learner


def measure_engine(args: argparse.Namespace, path: Path, device: torch.device, update) -> dict:
    """The HF engine on ``device`` (where Ray's GPU would put it) serving the learner's
    adapter: sampled completions of exactly ``--generate-tokens`` tokens, timed after a
    warm-up; generated tokens per second, peak memory and MFU (2 FLOPs per weight per token)."""
    from contracts import SamplingSettings
    from rollout.engines import EngineSettings, HFEngine

    reset_peak(device)
    engine = HFEngine(str(path), EngineSettings(engine="hf", dtype="bfloat16" if device.type == "cuda" else "float32"), seed=0)
    if engine.device.type != device.type:
        raise RuntimeError(f"the HF engine runs on {engine.device}, not on {device}")
    engine.load_weights(update)
    vocab = engine.base.config.vocab_size
    prompts = [list(p) for p in random_batch(args.generate_prompts, args.prompt_len, 1, vocab, seed=99).prompt_token_ids]
    sampling = SamplingSettings(n=args.generate_n, temperature=1.0, top_p=1.0, max_tokens=args.generate_tokens, min_tokens=args.generate_tokens)
    engine.generate(prompts[:1], dataclasses.replace(sampling, n=1, max_tokens=2, min_tokens=2))  # warm-up
    started = time.perf_counter()
    groups = engine.generate(prompts, sampling)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for group in groups for c in group)
    weights = sum(p.numel() for p in engine.base.parameters())
    peak = peak_tflops(device, args.peak_tflops)
    achieved = 2.0 * weights * tokens / elapsed / 1e12
    return {
        "sequences": len(prompts) * args.generate_n,
        "generated_tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(tokens / elapsed, 1),
        "peak_memory_gib": peak_gib(device),
        "mfu": round(achieved / peak, 4) if peak else None,
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="raylight-smoke-") as tmp:
        started = time.perf_counter()
        path = build_model(args.model, Path(tmp) / "model")
        logger.info("built %s in %.1f s", args.model, time.perf_counter() - started)
        report = {"benchmark": "gpu_smoke", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": args.model}
        report["learner"], learner = measure_learner(args, path, device, "none")
        update = learner.weight_update()
        del learner
        if not args.no_fsdp:
            report["learner_fsdp"], learner = measure_learner(args, path, device, "fsdp")
            del learner
            import torch.distributed as dist

            dist.destroy_process_group()
        if not args.no_engine:
            report["hf_engine"] = measure_engine(args, path, device, update)
        return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 learner (a group of one rank)")
    parser.add_argument("--no-engine", action="store_true", help="skip the HF generation engine")
    parser.add_argument("--generate-prompts", type=int, default=32, help="prompts the HF engine completes")
    parser.add_argument("--generate-n", type=int, default=4, help="completions per prompt")
    parser.add_argument("--generate-tokens", type=int, default=128, help="tokens of every completion")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
