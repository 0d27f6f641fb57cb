"""Checkpoints that make a run impossible to lose: written atomically, verified when read.

runs/NAME/checkpoints/
  step_000010/
    adapter/            the policy adapter, PEFT format (LoRA runs)
    learner.pt          rank 0: trainable tensors, optimizer, scheduler, KL controller, counters, RNG
    learner_rank1.pt    further ranks: their RNG state (their weights equal rank 0's)
    learner-dcp/        sharded learners on a shared file system: each rank's shards of the
                        tensors and optimizer state, which learner.pt then lacks
                        (cluster.keeping.learner_states)
    trainer.json        the run's counters (step, policy version, learning-rate scale, rollbacks,
                        evaluations) and the data position, curricula included
    monitor.json        the health monitor's rows, evaluations and events
    faults.json         running totals of absorbed faults, the verifier pool's counters
    bank.json           the solution bank (bank.enabled)
    surgery.json        the surgeon's environment; surgeon.pkl: the agent and its replay buffer
    COMPLETE.json       written last: the step, the eval metric, and a SHA-256 of every file
  best -> step_000010   the complete checkpoint with the best held-out metric

A checkpoint is written into a hidden temporary folder, every file fsynced, the marker last,
then renamed into place, so a process killed at any moment leaves either the whole checkpoint
or an ignored ``.tmp-*`` folder. Reading walks from the newest checkpoint back and takes the
first whose marker is present and whose checksums match; a corrupt one is named in a warning.
The last ``keep`` complete checkpoints are kept, plus the best.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
PREFIX = "step_"

# a checkpoint's content: relative file path -> bytes, or a function that writes that file
Writer = Callable[[Path], None]


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was needed; the message names the folder."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    metric: float | None  # the held-out metric at this step, if it was evaluated

    def file(self, name: str) -> Path:
        return self.path / name

    def read(self, name: str) -> bytes | None:
        """The bytes of file ``name``, or None where this checkpoint has no such file."""
        path = self.file(name)
        return path.read_bytes() if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, root: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    # -- writing --------------------------------------------------------------------------

    def save(self, step: int, files: dict[str, bytes | Writer], metric: float | None = None) -> Checkpoint:
        """Write ``files`` as the checkpoint of ``step`` (replacing an older one of that step)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_partial()
        tmp = self.root / f".tmp-{PREFIX}{step:06d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for name, content in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                content(target)
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in written:
            _fsync(path)
        marker = {
            "step": step,
            "metric": metric,
            "written_at": time.time(),
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in written},
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _fsync(tmp / MARKER)
        final = self.root / f"{PREFIX}{step:06d}"
        if final.exists():  # the same step again (a resumed run): the new one wins
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.root)
        checkpoint = Checkpoint(final, step, metric)
        self._prune()
        logger.info("checkpoint step %d written to %s", step, final)
        return checkpoint

    def _remove_partial(self) -> None:
        """Folders of writes that never finished (a killed process)."""
        for partial in self.root.glob(f".tmp-{PREFIX}*"):
            logger.warning("removing a checkpoint that was never finished: %s", partial)
            shutil.rmtree(partial, ignore_errors=True)

    def _prune(self) -> None:
        complete = self.complete()
        best = self.best()
        keep = {c.path for c in complete[-self.keep :]} | ({best.path} if best else set())
        for checkpoint in complete:
            if checkpoint.path not in keep:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
        self._point_best(best)

    def _point_best(self, best: Checkpoint | None) -> None:
        link = self.root / "best"
        if best is None:
            return
        tmp = self.root / f".best-{uuid.uuid4().hex[:8]}"
        os.symlink(best.path.name, tmp)
        os.replace(tmp, link)

    # -- reading --------------------------------------------------------------------------

    def complete(self) -> list[Checkpoint]:
        """Checkpoints with a marker, oldest first (not yet verified against their checksums)."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.glob(f"{PREFIX}*")):
            marker = self._marker(folder)
            if marker is not None:
                found.append(Checkpoint(folder, int(marker["step"]), marker.get("metric")))
        return sorted(found, key=lambda c: c.step)

    @staticmethod
    def _marker(folder: Path) -> dict | None:
        try:
            return json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            return None

    def best(self) -> Checkpoint | None:
        scored = [c for c in self.complete() if c.metric is not None]
        return max(scored, key=lambda c: (c.metric, c.step)) if scored else None

    def problem(self, folder: Path) -> str | None:
        """Why the checkpoint in ``folder`` cannot be used (no marker, a missing file, a
        checksum mismatch), or None."""
        marker = self._marker(folder)
        if marker is None:
            return "no completeness marker (the write did not finish)"
        for name, digest in marker["files"].items():
            path = folder / name
            if not path.is_file():
                return f"file {name} is missing"
            if _sha256(path) != digest:
                return f"file {name} does not match its checksum"
        return None

    def latest(self, before_step: int | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies (older than ``before_step`` if given); each
        newer one that does not verify is named in a warning and skipped."""
        folders = sorted(self.root.glob(f"{PREFIX}[0-9]*")) if self.root.is_dir() else []
        for folder in reversed(folders):
            step = int(folder.name[len(PREFIX) :])
            if before_step is not None and step >= before_step:
                continue
            problem = self.problem(folder)
            if problem is None:
                return Checkpoint(folder, step, self._marker(folder).get("metric"))  # type: ignore[union-attr]
            logger.warning("checkpoint %s is unusable (%s); trying the one before it", folder, problem)
        return None
