"""``raylight eval``: the held-out metrics of a saved adapter, or of the base model alone.

The same evaluation as during training (greedy decoding, the config's tasks and scorers,
``cluster.driver.evaluate``), on a generator and a verifier pool without a learner, so a trained
adapter can always be compared with the untrained model on the same problems.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from cluster.config import Config
from cluster.driver import build_tasks, engine_settings, eval_sampling, evaluate, init_ray, render, start_generator, start_verifiers
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
    """Held-out metrics of the policy named by ``adapter`` on every task's ``split``."""
    from transformers import AutoTokenizer

    tasks = build_tasks(config)
    tasks.check((split,))
    model_path, adapter_folder = policy_source(config, adapter)
    update = read_adapter(adapter_folder) if adapter_folder else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = {task_id: render(tokenizer, tasks, problems) for task_id, problems in tasks.eval_sets(split).items()}
    init_ray(config)
    generator = start_generator(config, engine_settings(config, model_path))
    verifiers = start_verifiers(config, tasks)
    try:
        ray.get(generator.load_weights.remote(update) if update else generator.serve_base.remote())
        logger.info("evaluating %s on the %s split of %s", adapter_folder or model_path, split, ", ".join(prompts))
        return evaluate([generator], verifiers, prompts, eval_sampling(config))
    finally:
        ray.kill(generator)
        verifiers.kill()


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
