"""``raylight`` command line: train, resume, eval, report, score, data check, config, export,
bench, plan, prepare-model, pool, sweep. Its exit codes are ``ExitCode`` (docs/exit-codes.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cluster.exits import ExitCode, exit_code_of

logger = logging.getLogger("raylight")


def _train(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.loop.driver import Trainer
    from cluster.keeping.rundir import RunDir

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    if args.run_dir is not None:
        overrides.append(f"run.run_dir={args.run_dir}")
    if args.no_dashboard:
        overrides.append("cluster.dashboard=false")
    config = load_config(args.config, overrides)
    if args.resume_if_exists:
        return _run(Trainer.resume_or_start(config, override=args.override))
    return _run(Trainer(config, RunDir(config.run.run_dir)))


def _resume(args: argparse.Namespace) -> int:
    from cluster.loop.driver import Trainer

    return _run(Trainer.resume(args.run_dir, args.steps, overrides=tuple(args.overrides), override=args.override))


def _run(trainer) -> int:
    """Train to the configured number of steps, then print where the run is and how it went."""
    try:
        summary = trainer.train(trainer.config.run.steps)
    finally:
        trainer.shutdown()
    start, end = summary["eval_accuracy_start"], summary["eval_accuracy_end"]
    print(f"run directory: {summary['run_dir']}")
    if summary.get("stopped_by"):
        stop = summary["stopped_by"]
        print(f"stopped at step {stop['step']} by the health monitor ({stop['rule']}): {stop['message']}")
    if start is not None and end is not None:
        print(f"held-out accuracy (greedy, n={summary['eval_n']}): {start:.3f} at step 0 -> {end:.3f} at the end ({100 * (end - start):+.1f} points)")
    print(json.dumps(summary))
    return ExitCode.MONITOR_STOP if summary.get("stopped_by") else ExitCode.OK


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.config import load_config
    from cluster.loop.evaluate import evaluate_policy, summary_lines

    config = load_config(args.config, args.overrides)
    metrics = evaluate_policy(config, args.adapter, args.split)
    for line in summary_lines(metrics):
        print(line)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.commands.report import write_comparison, write_report

    if len(args.run_dir) == 1 and args.out is None:
        print(write_report(args.run_dir[0]))
    else:
        print(write_comparison(args.run_dir, args.out or Path(args.run_dir[0]).resolve().parent))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.commands.sweep import parse_grid, sweep

    try:
        grid = parse_grid(args.grid)
    except ValueError as exc:
        print(f"raylight: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    out = Path(args.out or f"runs/sweep-{Path(args.config).stem}")
    codes = sweep(args.config, grid, out, args.pool, args.ray_jobs, list(args.overrides))
    for name, code in codes.items():
        print(f"{name}: exit code {code}")
    failed = [code for code in codes.values() if code != 0]
    return ExitCode.OK if not failed else (failed[0] if failed[0] > 0 else ExitCode.FAULTS)  # a run killed by a signal: a negative code


def _score(args: argparse.Namespace) -> int:
    import functools
    from pathlib import Path

    from cluster.config import ConfigError, load_config
    from cluster.loop.wiring import init_ray, start_verifiers
    from cluster.commands.score import SCORE_TASKS, score_file
    from rewards.scoring import ScorerSpec, build_scorer

    if args.task not in SCORE_TASKS:
        raise ConfigError(f"unknown task {args.task!r} for raylight score; known: {sorted(SCORE_TASKS)}")
    if not Path(args.samples).is_file():
        raise FileNotFoundError(f"samples file {args.samples} does not exist")
    config = load_config(args.config, args.overrides)
    spec = ScorerSpec(SCORE_TASKS[args.task].scorer, config.reward, config.verifier.sandbox)
    init_ray(config)
    pool = start_verifiers(config, factory=functools.partial(build_scorer, spec))
    try:
        score_file(args.task, Path(args.samples), pool)
    finally:
        pool.kill()
    return 0


def _data(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.commands.datacheck import data_check

    return data_check(load_config(args.config, args.overrides))


def _config(args: argparse.Namespace) -> int:
    from cluster.commands.configure import main as describe

    from pathlib import Path

    mode = "reference" if args.reference else "keys" if args.keys else "diff" if args.diff else "yaml"
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # no CONFIG: the first word is an override
        config, overrides = None, [config, *overrides]
    print(describe(config, overrides, mode))
    return 0


def _export(args: argparse.Namespace) -> int:
    from cluster.commands.export import export_run

    try:
        out = export_run(args.run_dir, args.out, merge=args.merge, checkpoint=args.checkpoint, push_to_hub=args.push_to_hub,
                         dry_run=args.dry_run, private=args.private)  # fmt: skip
    except ValueError as exc:  # what was asked cannot be exported as asked (the message says how)
        print(f"raylight: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"exported to {out}")
    return ExitCode.OK


def _bench(args: argparse.Namespace) -> int:
    from cluster.commands.bench import bench_async, bench_faults, bench_generation, bench_learner, bench_reward, bench_reward_model, bench_step, bench_sync, bench_verifier

    if args.bench == "step":
        result = bench_step(args.config, args.steps, args.overrides, not args.no_engine_baseline)
    elif args.bench == "async":
        result = bench_async(args.config, args.steps, args.overrides, args.threads, args.modes)
    elif args.bench == "faults":
        result = bench_faults(args.config, args.steps, args.overrides, args.faults, args.seed)
    elif args.bench == "learner":
        result = bench_learner(args.model, args.rows, args.prompt_tokens, args.completion_tokens, args.steps, args.variants)
    elif args.bench == "verifier":
        result = bench_verifier(args.programs, args.slots, args.rounds)
    elif args.bench == "reward":
        result = bench_reward(args.config, args.rounds, args.overrides)
    elif args.bench == "sync":
        result = bench_sync(args.models, args.ranks, args.prompts, args.n, args.max_tokens)
    elif args.bench == "stream":
        from cluster.commands.bench import bench_stream

        result = bench_stream(args.model, args.bucket_mb, args.dtype)
    elif args.bench == "multiturn":
        from cluster.commands.bench import bench_multiturn

        result = bench_multiturn(args.model, args.prompts, args.n, args.turn_tokens, args.turns, args.tool_seconds, args.tool_hosts, args.tool_slots, args.serving, args.block_size)
    elif args.bench == "plan":
        from cluster.commands.bench import bench_plan

        result = bench_plan(args.models, args.rows, args.prompt_tokens, args.completion_tokens, args.kv_cache_gib)
    elif args.bench == "pool":
        from cluster.commands.bench import bench_pool

        result = bench_pool(args.config, args.runs, args.steps, args.overrides)
    elif args.bench == "reward-model":
        result = bench_reward_model(args.model, args.samples, args.batch_size, args.actors, args.verifiers, args.rounds, args.samples_per_call)
    else:
        result = bench_generation(args.model, args.prompts, args.n, args.max_tokens, args.dtype)
    print(json.dumps(result))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from cluster.commands.plan import main as plan, parse_gib

    machine = {"nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "gpus_per_node": args.gpus_per_node,
               "gpu_memory_gib": parse_gib(args.gpu_memory), "host_memory_gib": parse_gib(args.host_memory)}  # fmt: skip
    return plan(args.config, list(args.overrides), machine, args.prompt_tokens, args.json)


def _pool(args: argparse.Namespace) -> int:
    from cluster.commands import pool

    if args.action == "start":
        from cluster.config import load_config

        state = pool.start(load_config(args.config, list(args.overrides)), args.name, args.detach_after_s)
        print(f"generator pool {args.name!r} runs: attach runs with generator.pool={args.name}")
    elif args.action == "status":
        state = pool.status(args.name)
    else:
        pool.stop(args.name)
        print(f"generator pool {args.name!r} stopped")
        return 0
    pool.print_status(state)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from rollout.models import resolve_model

    print(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylight", description="Actor-learner RL post-training for LLMs on Ray.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a configured experiment", description="Run a training config.")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("--run-dir", help="where the run is written (overrides run.run_dir)")
    train.add_argument("--steps", type=int, help="number of training steps (overrides run.steps)")
    train.add_argument("--seed", type=int, help="random seed (overrides run.seed)")
    train.add_argument("--resume-if-exists", action="store_true",
                       help="if the run directory holds a checkpoint, continue that run instead of starting over (a retried job resumes)")
    train.add_argument("--no-dashboard", action="store_true", help="start a local Ray cluster without its dashboard (cluster.dashboard=false)")
    train.add_argument("--override", action="store_true",
                       help="with --resume-if-exists: continue the saved run with this config where it differs (else an error names the keys)")
    train.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. rollout.group_size=4")
    train.set_defaults(func=_train)

    resume = commands.add_parser(
        "resume",
        help="continue a stopped or killed run from its last complete checkpoint",
        description="Continue the run in RUN_DIR from its newest checkpoint that verifies (a corrupt or "
        "half-written one is skipped with a warning), to its configured number of steps or to --steps.",
    )
    resume.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
    resume.add_argument("--steps", type=int, help="train to this step instead of run.steps")
    resume.add_argument("--override", action="store_true", help="continue with OVERRIDES that change the saved config (else they are an error)")
    resume.add_argument("overrides", nargs="*", help="dotted.key=value changes to the saved config; they need --override")
    resume.set_defaults(func=_resume)

    evaluate = commands.add_parser(
        "eval",
        help="held-out metrics of a saved adapter, or of the base model (--adapter none)",
        description="Greedy decoding on every task's held-out split of CONFIG, scored as in training: accuracy, "
        "reward and its components (extraction methods, code metrics), completion length; per task.",
    )
    evaluate.add_argument("config", help="YAML config (the run's RUN_DIR/config.yaml works)")
    evaluate.add_argument("--adapter", required=True, help="a PEFT adapter folder (e.g. RUN_DIR/final_adapter or a "
                          "checkpoint's adapter/), a full model folder, or 'none' for the base model")  # fmt: skip
    evaluate.add_argument("--split", default="validation", choices=["validation", "test"])
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")
    evaluate.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. eval.n=200")
    evaluate.set_defaults(func=_eval)

    report = commands.add_parser(
        "report",
        help="write RUN_DIR/report.md and plots: curves, periods, events, forecast, suggestions",
        description="Write a report of the run in RUN_DIR (report.md and plots/*.png); works on a finished, "
        "stopped or running run.",
    )
    report.add_argument("run_dir", nargs="+", help="the run directory; several: compare them side by side (comparison.md and overlaid curves)")
    report.add_argument("--out", help="where the comparison of several runs is written (default: the first run's parent folder)")
    report.set_defaults(func=_report)

    swp = commands.add_parser(
        "sweep",
        help="every combination of a grid of config values as one run, all at once (on one shared pool with --pool), then a comparison",
        description="Run a grid of configs at once (docs/shared-pool.md#sweeps).",
    )
    swp.add_argument("config", help="YAML config file every run starts from")
    swp.add_argument("--grid", action="append", required=True, help="key=value1,value2 (repeat for more keys: every combination runs)")
    swp.add_argument("--pool", help="attach every run to this shared generator pool (started from CONFIG if none of that name runs, and stopped at the end)")
    swp.add_argument("--out", help="the folder of the runs and the comparison (default runs/sweep-<config name>)")
    swp.add_argument("--ray-jobs", action="store_true", help="submit each run as a Ray job (RAY_ADDRESS: the dashboard's address) instead of a local driver process")
    swp.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    swp.set_defaults(func=_sweep)

    score = commands.add_parser(
        "score",
        help="score a JSONL file of completions offline",
        description="Score completions (one JSON object per line: task_id, completion) through the verifier pool; "
        "prints one JSON line per sample and a summary line with the count of each verdict.",
    )
    score.add_argument("task", help="task the completions answer, e.g. humaneval")
    score.add_argument("samples", help="JSONL file of {task_id, completion}")
    score.add_argument("--config", help="YAML config whose verifier section to use (default: built-in defaults)")
    score.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. verifier.max_verifiers=4")
    score.set_defaults(func=_score)

    data = commands.add_parser("data", help="data tools", description="Data tools.")
    data_which = data.add_subparsers(dest="data", required=True)
    check = data_which.add_parser(
        "check",
        help="load every task of a config: usable/skipped rows, example prompts, prompt lengths",
        description="Load every task of a config (no model, only its tokenizer); exit 1 if a task has no usable "
        "train or validation rows.",
    )
    check.add_argument("config", help="YAML config file")
    check.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    check.set_defaults(func=_data)

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks printing a JSON line.")
    which = bench.add_subparsers(dest="bench", required=True)
    gen = which.add_parser("generation", help="generator actor (vLLM) vs plain HF generate, same prompts")
    gen.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model folder")
    gen.add_argument("--prompts", type=int, default=8)
    gen.add_argument("--n", type=int, default=8, help="samples per prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--dtype", default="float32")
    gen.set_defaults(func=_bench)
    learn = which.add_parser("learner", help="one learner step per algorithm variant vs plain GRPO, same batch")
    learn.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model folder")
    learn.add_argument("--rows", type=int, default=32, help="sequences in the batch")
    learn.add_argument("--prompt-tokens", type=int, default=64)
    learn.add_argument("--completion-tokens", type=int, default=48)
    learn.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    learn.add_argument("--variants", nargs="+", help="variants to time (default: all; see cluster/commands/bench.py)")
    learn.set_defaults(func=_bench)

    ver = which.add_parser("verifier", help="sandboxed program runs vs plain subprocess runs of the same programs")
    ver.add_argument("--programs", type=int, default=164, help="HumanEval test programs to run each way")
    ver.add_argument("--slots", type=int, default=2, help="programs run at once")
    ver.add_argument("--rounds", type=int, default=3, help="rounds each way, alternating")
    ver.set_defaults(func=_bench)

    rwd = which.add_parser("reward", help="a step of samples scored with the built-in scorer vs with a Python reward function added")
    rwd.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: the demo)")
    rwd.add_argument("--rounds", type=int, default=10, help="timed steps each way, alternating")
    rwd.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    rwd.set_defaults(func=_bench)

    rwm = which.add_parser("reward-model", help="a reward model's samples/s through the verifier pool vs its plain forward pass")
    rwm.add_argument("--model", default="tiny-classifier", help="'tiny-classifier' or a sequence-classification model folder")
    rwm.add_argument("--samples", type=int, default=256)
    rwm.add_argument("--batch-size", type=int, default=16)
    rwm.add_argument("--actors", type=int, default=1, help="reward-model replicas")
    rwm.add_argument("--verifiers", type=int, default=2, help="verifier actors asking them")
    rwm.add_argument("--rounds", type=int, default=3)
    rwm.add_argument("--samples-per-call", type=int, default=4, help="samples a verifier sends per request (verifier.samples_per_call)")
    rwm.set_defaults(func=_bench)

    syn = which.add_parser("sync", help="merged vs in-memory LoRA weight sync: seconds per adapter load and per step's generation")
    syn.add_argument("--models", nargs="+", default=["smollm2", "random-qwen2.5-0.5b"], help="model names or folders")
    syn.add_argument("--ranks", nargs="+", type=int, default=[8, 64], help="LoRA ranks")
    syn.add_argument("--prompts", type=int, default=8)
    syn.add_argument("--n", type=int, default=4, help="samples per prompt")
    syn.add_argument("--max-tokens", type=int, default=32, help="tokens of every completion (fixed work)")
    syn.set_defaults(func=_bench)

    stm = which.add_parser("stream", help="a full-weight update loaded into vLLM in one piece vs in buckets: seconds and memory added")
    stm.add_argument("--model", default="random-qwen2.5-0.5b", help="model name or folder")
    stm.add_argument("--bucket-mb", nargs="+", type=float, default=[0, 64], help="bucket sizes (MB; 0: one piece)")
    stm.add_argument("--dtype", default="bfloat16", help="the weights' and the engine's dtype")
    stm.set_defaults(func=_bench)

    pol = which.add_parser("pool", help="N runs at once on one shared generator pool vs each with its own generator: samples/s, generators' memory, reward, pool busy fraction")
    pol.add_argument("--config", default="configs/tiny.yaml", help="YAML config every run starts from (run i is seeded i)")
    pol.add_argument("--runs", type=int, default=4)
    pol.add_argument("--steps", type=int, default=6, help="steps per run (steps 2.. are timed)")
    pol.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    pol.set_defaults(func=_bench)

    mtn = which.add_parser("multiturn", help="episodes of k turns with a tool call between turns vs single completions of the same tokens: tokens/s, busy fraction")
    mtn.add_argument("--model", default="smollm2", help="model name or folder")
    mtn.add_argument("--prompts", type=int, default=8)
    mtn.add_argument("--n", type=int, default=4, help="episodes per prompt")
    mtn.add_argument("--turn-tokens", type=int, default=32, help="tokens of every turn (fixed work)")
    mtn.add_argument("--turns", nargs="+", type=int, default=[2, 4], help="turns per episode")
    mtn.add_argument("--tool-seconds", type=float, default=0.5, help="how long each tool call takes (a sleep in the sandbox)")
    mtn.add_argument("--tool-hosts", type=int, default=2, help="sandbox actors running tool calls")
    mtn.add_argument("--tool-slots", type=int, default=16, help="tool calls each host runs at once (verifier.sandbox.slots)")
    mtn.add_argument("--block-size", type=int, default=32, help="tokens per KV-cache block (generator.block_size; 0: vLLM's default, 128 on CPUs)")
    mtn.add_argument("--serving", choices=["stream", "batch"], default="stream", help="the generator's serving (generator.serving): continuous batching, or one engine call per generate call")
    mtn.set_defaults(func=_bench)

    pln = which.add_parser("plan", help="the capacity planner's predicted peak memory of a learner and a generator vs measured, per model")
    pln.add_argument("--models", nargs="+", default=["tiny", "smollm2", "random-qwen2.5-0.5b"], help="model names or folders")
    pln.add_argument("--rows", type=int, default=8, help="sequences in the learner's micro-batch and prompts generated")
    pln.add_argument("--prompt-tokens", type=int, default=64)
    pln.add_argument("--completion-tokens", type=int, default=64)
    pln.add_argument("--kv-cache-gib", type=int, default=1, help="the generator's KV cache (generator.kv_cache_gib)")
    pln.set_defaults(func=_bench)

    stp = which.add_parser("step", help="a few steps of a config: seconds per span of a step, tokens/s, peak memory per process role")
    stp.add_argument("config", help="YAML config")
    stp.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    stp.add_argument("--steps", type=int, default=5, help="steps to run; the first (warm-up) is not timed")
    stp.add_argument("--no-engine-baseline", action="store_true", help="skip timing the same vLLM engine in-process afterwards")
    stp.set_defaults(func=_bench)

    asy = which.add_parser("async", help="the same config in sync mode, async mode (k=1, k=2) and with partial rollouts (k=1): steps per second")
    asy.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: the demo)")
    asy.add_argument("--steps", type=int, default=8, help="learner steps per mode")
    asy.add_argument("--threads", type=int, default=1, help="cores for the generators and for the learner, in every mode")
    asy.add_argument("--modes", type=lambda text: text.split(","), default=None, help="which modes to run, by comma (default all): sync,async_k1,async_k2,partial_k1")
    asy.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    asy.set_defaults(func=_bench)

    flt = which.add_parser("faults", help="the same config without and with actor processes killed or frozen at random moments")
    flt.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: the demo)")
    flt.add_argument("--steps", type=int, default=8, help="learner steps per run")
    flt.add_argument("--faults", type=int, default=4, help="actor processes broken in the second run")
    flt.add_argument("--seed", type=int, default=0, help="seed of the faults' kinds and moments")
    flt.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    flt.set_defaults(func=_bench)

    config = commands.add_parser(
        "config",
        help="print the resolved config with every key's default and meaning",
        description="Print CONFIG (default: the built-in defaults) with OVERRIDES applied, as commented YAML; "
        "--keys: one `key = value  # meaning` line per key; --diff: only the keys that differ from the defaults; "
        "--reference: the Markdown reference of every key (docs/config-reference.md).",
    )
    config.add_argument("config", nargs="?", help="YAML config file (default: none, the defaults)")
    shown = config.add_mutually_exclusive_group()
    shown.add_argument("--keys", action="store_true", help="the flat list of keys with values and meanings")
    shown.add_argument("--diff", action="store_true", help="the keys that differ from the defaults")
    shown.add_argument("--reference", action="store_true", help="the Markdown reference page of every key")
    config.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rollout.group_size=4")
    config.set_defaults(func=_config)

    export = commands.add_parser(
        "export",
        help="write a trained policy as a folder transformers, PEFT and vLLM load, with a model card",
        description="Export RUN_DIR's final adapter (or --checkpoint's) with the tokenizer and a model card: "
        "the PEFT adapter, or with --merge the base model with the adapter folded in (safetensors shards).",
    )
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    export.add_argument("--merge", action="store_true", help="fold the adapter into the base weights: a plain model folder")
    export.add_argument("--checkpoint", help="export this checkpoint (a step number, 'best' or 'latest') instead of the final adapter")
    export.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face Hub repo")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    export.add_argument("--dry-run", action="store_true", help="with --push-to-hub: print what would be uploaded, upload nothing")
    export.set_defaults(func=_export)

    plan = commands.add_parser(
        "plan",
        help="whether a config fits the machines, before anything starts: memory and largest batch per actor, Ray CPUs and GPUs",
        description="Plan CONFIG's actors (learners, generators, verifiers, reward services): each one's memory by part "
        "(weights, gradients, optimizer state, activations, KV cache), the largest batch that fits, and the Ray CPUs and GPUs "
        "they ask for. Without machine options: this machine as `raylight train` would use it. Exit code 2 when it does not "
        "fit, each problem naming the key to change (docs/capacity.md).",
    )
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    plan.add_argument("--nodes", type=int, help="nodes of the cluster")
    plan.add_argument("--cpus-per-node", type=float, help="Ray's logical CPUs per node")
    plan.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    plan.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB")
    plan.add_argument("--host-memory", help="host memory of one node, e.g. 24GiB")
    plan.add_argument("--prompt-tokens", type=int, default=256, help="the longest prompt, in tokens (default 256)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(func=_plan)

    pool = commands.add_parser("pool", help="a shared generator pool that several runs attach to", description="A generator pool that outlives runs (docs/shared-pool.md).")
    actions = pool.add_subparsers(dest="action", required=True)
    pstart = actions.add_parser("start", help="start a named pool from a config's model and generator section (and a local Ray cluster if none runs)")
    pstart.add_argument("config", help="YAML config: its model, lora.rank and generator section")
    pstart.add_argument("--name", required=True, help="the pool's name (runs set generator.pool to it)")
    pstart.add_argument("--detach-after-s", type=float, default=60.0, help="a run not heard from for this long is detached, its adapter dropped (default 60)")
    pstart.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    pstart.set_defaults(func=_pool)
    for action, text in (("status", "a pool's generators, adapters, runs, queues, shares and busy fractions"), ("stop", "stop a pool (its runs stop too)")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name")
        sub.set_defaults(func=_pool)

    prep = commands.add_parser("prepare-model", help="convert/cache a model folder and print its path")
    prep.add_argument("model", nargs="?", default="smollm2", help="'smollm2' or 'tiny'")
    prep.set_defaults(func=_prepare)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, letting ``dotted.key=value`` overrides of ``train`` sit before or after its options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("train", "resume", "eval", "score", "data", "config", "plan", "pool", "sweep") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from actors.generator import GeneratorsLost
    from actors.learner import LearnerFailure
    from actors.verifier import VerifierStartError
    from cluster.keeping.checkpoint import CheckpointError
    from rollout.tasks import NoUsableRows
    from cluster.config import ConfigError
    from actors.pool import PoolRefused

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"raylight: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"raylight: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (VerifierStartError, NoUsableRows, CheckpointError, PoolRefused, ConnectionError) as exc:  # no sandbox here; a task without data; nothing to resume
        print(f"raylight: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (GeneratorsLost, LearnerFailure) as exc:  # faults past what the run absorbs; it stopped with a checkpoint
        print(f"raylight: run stopped: {exc}", file=sys.stderr)
        return exit_code_of(exc)
    except KeyboardInterrupt as exc:
        print("raylight: interrupted", file=sys.stderr)
        return exit_code_of(exc)


if __name__ == "__main__":
    sys.exit(main())
