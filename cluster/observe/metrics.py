"""Every metric of ``metrics.jsonl`` as a Ray metric (and, if asked, in TensorBoard).

Ray's metrics API (``ray.util.metrics.Gauge``) sends each value to the node's metrics agent,
which serves it in Prometheus format on the Ray metrics export port; the Ray dashboard's
metrics view (Grafana) and any Prometheus that scrapes the cluster see it. A metric key
becomes a gauge name: ``train/reward_mean`` -> ``raylight_train_reward_mean`` (Prometheus shows
``ray_raylight_train_reward_mean``), tagged with the run's name, so runs on one cluster stay
apart. Point a Prometheus at the port with deploy/prometheus.yml.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "raylight_"


def gauge_name(key: str) -> str:
    """``train/gsm8k/reward/correct`` -> ``raylight_train_gsm8k_reward_correct``."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class MetricsExporter:
    """Sets one Ray gauge per metric key (created on first sight) and writes TensorBoard scalars."""

    def __init__(self, run_dir, ray_metrics: bool = True, tensorboard: bool = False):
        self.run = Path(run_dir.path).name
        self.ray_metrics = ray_metrics
        self.gauges: dict[str, object] = {}
        self.writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("run.tensorboard needs the tensorboardX package (pip install tensorboardX)") from exc
            self.writer = SummaryWriter(str(Path(run_dir.path) / "tensorboard"))

    def export(self, metrics: dict) -> None:
        step = int(metrics.get("step", 0))
        for key, value in metrics.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if self.ray_metrics:
                self._gauge(key).set(float(value), tags={"run": self.run})
            if self.writer is not None:
                self.writer.add_scalar(key, value, step)

    def _gauge(self, key: str):
        if key not in self.gauges:
            from ray.util.metrics import Gauge

            self.gauges[key] = Gauge(gauge_name(key), description=f"raylight metric {key} (metrics.jsonl)", tag_keys=("run",))
        return self.gauges[key]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
