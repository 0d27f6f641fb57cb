"""Evaluation: held-out metrics during training, and ``raylight eval`` of a saved policy.

The held-out evaluation is the run's ``Evaluator`` stage (``cluster.stages.GreedyEvaluator``;
a Markovian run's ``cluster.features.markovian.MarkovianEvaluator``), which the training loop
runs at its start, on its cadence and at its end. ``evaluate_policy`` runs the same on a
generator and a verifier pool without training, so a trained adapter can always be compared
with the untrained model on the same problems (an evaluator that needs the learner gets a
learner actor, for the answers' log-probs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from actors.generator import GeneratorPool
from cluster.config import Config
from cluster.loop.wiring import build_stages, build_tasks, engine_settings, init_ray, start_generator, start_learners, start_reward_services, start_tools, start_verifiers
from cluster.stages import Crew
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
    """Held-out metrics of the policy named by ``adapter`` on every task's ``split``, by the
    run's own ``Evaluator`` (a Markovian config's: intact and perturbed chains of thought, with
    a learner actor holding the adapter for the answers' log-probs)."""
    from transformers import AutoTokenizer

    tasks = build_tasks(config)
    tasks.check((split,))
    model_path, adapter_folder = policy_source(config, adapter)
    update = read_adapter(adapter_folder) if adapter_folder else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    init_ray(config)
    generator = start_generator(config, model_path)
    services = start_reward_services(config, model_path, teacher=False)  # the teacher rewards training only
    streaming = engine_settings(config).serving == "stream"
    crew = Crew(GeneratorPool([generator], streaming=streaming), start_verifiers(config, tasks, services=services), rewards=services)
    try:
        crew.tools = start_tools(config)
        evaluator = build_stages(config, tokenizer, tasks, crew, split=split).evaluator
        if evaluator.needs_learners:
            crew.learners = start_learners(config, model_path)
            if update is not None:
                crew.learners.load_adapter(update)
        ray.get(generator.load_weights.remote(update) if update else generator.serve_base.remote())
        logger.info("evaluating %s on the %s split of %s", adapter_folder or model_path, split, ", ".join(tasks.tasks))
        return evaluator.evaluate()
    finally:
        crew.kill()


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
