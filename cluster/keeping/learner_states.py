"""The learners' part of a checkpoint: gathered by the driver, or written in shards by the learners.

``Gathered`` (every unsharded group; a sharded one whose run directory the learners' nodes
cannot write): the group's state comes to the driver, which writes ``learner.pt`` (rank 0:
trainable tensors, optimizer, scheduler, counters, RNG) and ``learner_rank<N>.pt`` (each
further rank's RNG). A sharded group gathers the whole tensors to rank 0 first.

``Sharded`` (``learner.sharding: fsdp`` with the run directory shared by every learner's node):
each rank writes its shards of the trainable tensors and optimizer state into
``learner-dcp/`` with ``torch.distributed.checkpoint`` (a ``.distcp`` file per rank and a
``.metadata``), and the driver writes the same ``learner.pt`` without those tensors, plus
``"shards": "learner-dcp"``. Deviation from the store's rule that every file is written by
the driver: the shard files are written by the learners into the store's temporary folder,
before the driver fsyncs, checksums and renames it as for any file.

Either loads either: a sharded checkpoint restores a sharded group in place (every rank reads
its part of the files; DCP reshards to another group size of the same FSDP layout), and is
consolidated on the driver (``dcp_to_torch_save`` into a temporary file, so the driver holds
the whole state as a gathered restore does) for an unsharded group, or where the learners
cannot read the run directory.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from actors.learner import LearnerGroup
from cluster.keeping.checkpoint import Checkpoint, Writer
from contracts import PolicyRef

logger = logging.getLogger(__name__)

SHARDS = "learner-dcp"  # the sharded checkpoint's folder, named in learner.pt's "shards"


class LearnerStates(Protocol):
    """How the learners' state goes into a checkpoint and comes back (chosen once per run)."""

    def files(self, learners: LearnerGroup) -> dict[str, bytes | Writer]: ...

    def load(self, learners: LearnerGroup, checkpoint: Checkpoint, policy_version: int | None = None) -> PolicyRef: ...


def read_states(checkpoint: Checkpoint) -> list[dict]:
    """Rank 0's ``learner.pt``, then the further ranks' (our own checksummed files: tensors only)."""
    ranks = sorted(checkpoint.path.glob("learner_rank*.pt"), key=lambda p: int(p.stem.removeprefix("learner_rank")))
    return [torch.load(p, weights_only=True) for p in [checkpoint.file("learner.pt"), *ranks]]


def consolidated(checkpoint: Checkpoint, state: dict) -> dict:
    """Rank 0's ``state`` with the whole tensors of the shards it names (``state`` itself if it
    names none): what a gathered checkpoint's ``learner.pt`` holds."""
    if "shards" not in state:
        return state
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from learners.sharding import gathered_form

    with tempfile.TemporaryDirectory(prefix="raylight-consolidate-") as tmp:
        whole = Path(tmp) / "learner.pt"
        dcp_to_torch_save(checkpoint.file(state["shards"]), whole)
        saved = torch.load(whole, weights_only=True)
    return {k: v for k, v in state.items() if k != "shards"} | gathered_form(saved)


class Gathered:
    """The whole state through the driver (see the module docstring)."""

    def files(self, learners: LearnerGroup) -> dict[str, bytes | Writer]:
        states = learners.state_dicts()
        files: dict[str, bytes | Writer] = {"learner.pt": functools.partial(torch.save, states[0])}
        return files | {f"learner_rank{rank}.pt": functools.partial(torch.save, state) for rank, state in enumerate(states[1:], 1)}

    def load(self, learners: LearnerGroup, checkpoint: Checkpoint, policy_version: int | None = None) -> PolicyRef:
        states = read_states(checkpoint)
        return learners.load_state_dicts([consolidated(checkpoint, states[0]), *states[1:]], policy_version)


class Sharded:
    """Each rank writes and reads its own shards (see the module docstring)."""

    def files(self, learners: LearnerGroup) -> dict[str, bytes | Writer]:
        """The shards' folder first: its writer asks the learners to write into it, and the
        ``learner*.pt`` writers after it (the store calls them in this order) save what they
        returned."""
        returned: list[dict] = []

        def shards(folder: Path) -> None:
            folder.mkdir()
            returned.extend(learners.save_shards(str(folder)))

        def save(rank: int, path: Path) -> None:
            torch.save(returned[rank] | ({"shards": SHARDS} if rank == 0 else {}), path)

        files: dict[str, bytes | Writer] = {SHARDS: shards, "learner.pt": functools.partial(save, 0)}
        return files | {f"learner_rank{rank}.pt": functools.partial(save, rank) for rank in range(1, len(learners.actors))}

    def load(self, learners: LearnerGroup, checkpoint: Checkpoint, policy_version: int | None = None) -> PolicyRef:
        states = read_states(checkpoint)
        if "shards" not in states[0]:  # a gathered checkpoint (an earlier or unsharded run's)
            return learners.load_state_dicts(states, policy_version)
        return learners.load_shards(str(checkpoint.file(states[0]["shards"])), states, policy_version)


def learner_states(sharded: bool, unshared: str | None) -> LearnerStates:
    """``Sharded`` for a sharded group whose learners' nodes share the run directory
    (``unshared``: why they do not, or None), else ``Gathered``, with one warning saying why."""
    if not sharded:
        return Gathered()
    if unshared is not None:
        logger.warning("learner checkpoints are gathered to the driver, not written in shards by each learner: %s "
                       "(sharded checkpoints need a run directory on a file system every learner's node shares)", unshared)  # fmt: skip
        return Gathered()
    return Sharded()
