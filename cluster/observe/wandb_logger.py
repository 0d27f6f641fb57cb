"""Weights & Biases logging (the config's ``run.wandb``): the resolved config once, then every
step's metrics with ``step`` as their x-axis.

The ``wandb`` package is optional (``pip install "raylight[wandb]"``); nothing imports it unless
``run.wandb`` is set. The W&B run's files go under RUN_DIR/wandb, and its id is kept in
RUN_DIR/wandb/run_id, so ``raylight resume`` continues the same W&B run. Metrics are logged
against the ``step`` metric (``define_metric("*", step_metric="step")``), not W&B's own step
counter, so the steps a rollback or a resume runs again are logged, not dropped as out of
order. ``mode: offline`` writes the run there for ``wandb sync`` later; ``disabled`` logs
nothing. Online runs need ``WANDB_API_KEY`` (or ``wandb login``) where the driver runs.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cluster.observe.metrics import finite_number

logger = logging.getLogger(__name__)


@dataclass
class WandbSettings:
    """Where the run is logged in Weights & Biases."""

    project: str = "raylight"  # the W&B project
    entity: str | None = None  # the W&B team or user; None: the API key's default entity
    name: str | None = None  # the W&B run's display name; None: the run directory's name
    tags: list[str] = field(default_factory=list)  # tags on the W&B run
    group: str | None = None  # groups runs in the W&B UI (e.g. the seeds of one experiment)
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: written under RUN_DIR/wandb for `wandb sync`


def loggable(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (W&B would chart a None or a NaN as a gap or a string)."""
    return {k: v for k, v in metrics.items() if finite_number(v)}


class WandbLogger:
    """One W&B run for one run directory: ``export`` a step's metrics, ``close`` at the end."""

    def __init__(self, settings: WandbSettings, run_path: str | Path, config: dict):
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("run.wandb needs the wandb package: pip install 'raylight[wandb]'") from exc
        run_path = Path(run_path)
        folder = run_path / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, name=settings.name or run_path.name, tags=list(settings.tags),
                group=settings.group, mode=settings.mode, dir=str(run_path), id=_run_id(folder), resume="allow", config=config,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - wandb raises its own errors for logins, networks and settings
            raise RuntimeError(f"run.wandb: W&B could not start the run ({exc}); set WANDB_API_KEY, or run.wandb.mode=offline") from exc
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        logger.info("logging to Weights & Biases (%s): project %s, run %s", settings.mode, settings.project, self.run.id)

    def export(self, metrics: dict) -> None:
        self.run.log(loggable(metrics))

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def _run_id(folder: Path) -> str:
    """The W&B run id of this run directory: made on its first start, read on a resume."""
    path = folder / "run_id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
