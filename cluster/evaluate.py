"""Evaluation: held-out metrics during training, and ``raylight eval`` of a saved policy.

``evaluate`` is the one held-out evaluation (greedy decoding, the config's tasks and scorers)
the training loop runs at its start, on its cadence and at its end. ``evaluate_policy`` runs
the same on a generator and a verifier pool without training, so a trained adapter can always
be compared with the untrained model on the same problems (a Markovian config's evaluation
also starts a learner actor, for the answers' log-probs). ``sample_metrics`` and
``task_metrics`` summarise any list of scored samples (training steps use them too).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from actors.generator import GeneratorPool
from actors.verifier import VerifierPool
from cluster.config import Config
from cluster.wiring import build_tasks, init_ray, render, start_generator, start_learners, start_verifiers
from contracts import Prompt, Sample, SamplingSettings, Verdict
from rollout.engines import read_adapter
from rollout.models import resolve_model
from rollout.tasks import Split

logger = logging.getLogger(__name__)


def policy_source(config: Config, adapter: str) -> tuple[str, Path | None]:
    """(model folder, adapter folder or None) for ``--adapter``: ``none`` (the base model), a
    PEFT adapter folder, or a full model folder (a full-weight run's ``final_adapter``)."""
    if adapter == "none":
        return str(resolve_model(config.model.path)), None
    folder = Path(adapter)
    if (folder / "adapter_config.json").is_file():
        return str(resolve_model(config.model.path)), folder
    if (folder / "config.json").is_file():
        return str(folder), None
    raise FileNotFoundError(f"--adapter {adapter}: not a PEFT adapter folder (adapter_config.json) nor a model folder (config.json); use 'none' for the base model")


def evaluate_policy(config: Config, adapter: str, split: Split = "validation") -> dict:
    """Held-out metrics of the policy named by ``adapter`` on every task's ``split``; a
    Markovian config's own evaluation (intact and perturbed chains of thought), with a learner
    actor holding the adapter for the answers' log-probs."""
    from transformers import AutoTokenizer

    tasks = build_tasks(config)
    tasks.check((split,))
    model_path, adapter_folder = policy_source(config, adapter)
    update = read_adapter(adapter_folder) if adapter_folder else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    markovian = None
    if config.markovian.enabled:
        from cluster.markovian import MarkovianReward

        markovian = MarkovianReward(config, tokenizer, tasks)
    problems_by_task = tasks.eval_sets(split)
    prompts = {task_id: markovian.render(problems) if markovian else render(tokenizer, tasks, problems) for task_id, problems in problems_by_task.items()}
    init_ray(config)
    generator = start_generator(config, model_path)
    verifiers = start_verifiers(config, tasks)
    learners = start_learners(config, model_path) if markovian else None
    try:
        ray.get(generator.load_weights.remote(update) if update else generator.serve_base.remote())
        logger.info("evaluating %s on the %s split of %s", adapter_folder or model_path, split, ", ".join(prompts))
        if markovian is None:
            return evaluate(GeneratorPool([generator]), verifiers, prompts, eval_sampling(config))
        if update is not None:
            learners.load_adapter(update)
        return markovian.evaluate(prompts, learners, GeneratorPool([generator]), verifiers)
    finally:
        ray.kill(generator)
        verifiers.kill()
        if learners is not None:
            learners.kill()


def summary_lines(metrics: dict) -> list[str]:
    """One line per task (or one for the run): n, accuracy, reward, completion length."""
    tasks = sorted({k.split("/")[1] for k in metrics if k.count("/") >= 2 and k.endswith("/n")})
    lines = []
    for name, prefix in [(t, f"eval/{t}") for t in tasks] or [("all", "eval")]:
        n = metrics.get(f"{prefix}/n", metrics["eval/n"])
        lines.append(
            f"{name}: n={int(n)} accuracy={metrics[f'{prefix}/accuracy']:.3f} reward={metrics[f'{prefix}/reward_mean']:.3f} "
            f"completion_length={metrics[f'{prefix}/completion_length']:.1f}"
        )
    return lines


def eval_sampling(config: Config) -> SamplingSettings:
    """Greedy decoding with the run's stop strings and the evaluation's token budget."""
    r = config.rollout
    return SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=config.eval.max_tokens, stop=tuple(r.stop))


def evaluate(generators: GeneratorPool, verifiers: VerifierPool, prompts_by_task: dict[str, list[Prompt]], sampling: SamplingSettings) -> dict:
    """Held-out metrics: accuracy, reward and each reward component (the numeric extraction
    methods, the code metrics), completion length; over all tasks and per task when several."""
    prompts = [prompt for task_prompts in prompts_by_task.values() for prompt in task_prompts]
    samples = generators.generate(prompts, sampling)
    verdicts = verifiers.score(samples)
    metrics = sample_metrics(samples, verdicts, prefix="eval")
    per_task = task_metrics(samples, verdicts, "eval") if len(prompts_by_task) > 1 else {}
    return {"eval/n": len(samples), **metrics, **per_task}


def task_metrics(samples: list[Sample], verdicts: list[Verdict], prefix: str) -> dict[str, float]:
    """``sample_metrics`` of each task's samples, as ``<prefix>/<task>/...``, plus ``n``."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.prompt.problem.task or "task", []).append(i)
    metrics = {}
    for task, indices in groups.items():
        metrics |= sample_metrics([samples[i] for i in indices], [verdicts[i] for i in indices], f"{prefix}/{task}")
        metrics[f"{prefix}/{task}/n"] = float(len(indices))
    return metrics


def sample_metrics(samples: list[Sample], verdicts: list[Verdict], prefix: str) -> dict[str, float]:
    """Reward, accuracy, each reward component and completion length over valid verdicts, and
    the share of samples masked (their verdict an infrastructure error)."""
    valid = [(s, v) for s, v in zip(samples, verdicts) if v.status == "ok"]
    n = max(1, len(valid))
    metrics = {
        f"{prefix}/masked_share": (len(samples) - len(valid)) / max(1, len(samples)),
        f"{prefix}/reward_mean": sum(v.reward for _, v in valid) / n,
        f"{prefix}/accuracy": sum(v.correct for _, v in valid) / n,
        f"{prefix}/completion_length": sum(len(s.completion.token_ids) for s, _ in valid) / n,
        f"{prefix}/truncated_fraction": sum(s.completion.finish_reason == "length" for s, _ in valid) / n,
        # mean log-prob of the sampled tokens (the monitor watches it crash)
        f"{prefix}/logprob_mean": sum(sum(s.completion.logprobs) / max(1, len(s.completion.logprobs)) for s, _ in valid) / n,
        # answers the scorer could not find (code verdicts name the program's fate instead)
        f"{prefix}/extraction_failed": sum(v.extracted is None and v.outcome in ("correct", "wrong") for _, v in valid) / n,
    }
    for name in sorted({k for _, v in valid for k in v.components}):
        metrics[f"{prefix}/reward/{name}"] = sum(v.components.get(name, 0.0) for _, v in valid) / n
    return metrics
