"""The learner: one optimizer step on one batch, on one or several data-parallel ranks.

The learner is blind to the algorithm: ``step(batch, objective)`` runs whatever objective of
``learners.objectives.OBJECTIVES`` is named (the PPO family on rollouts, supervised NLL on
verified solutions). A step reads top to bottom:
1. guard: a non-finite reward, advantage or generator log-prob skips the whole step;
2. the objective prepares what is fixed for the step (no gradients: reference, critic,
   advantages);
3. ``epochs`` passes over shuffled mini-batches, each one optimizer update, each split into
   micro-batches whose gradients accumulate exactly to the mini-batch's.

Data parallelism: every rank holds its shard of the batch; losses are normalised by global
token / sequence counts, gradients are summed with ``torch.distributed`` (NCCL between GPUs,
gloo between CPUs), so after each update all ranks hold identical parameters and equal one
learner that saw the whole batch. How the ranks hold the weights is the layout chosen when
the learner joins its group (``learners.sharding``): whole replicas whose gradients are
all-reduced in flat buckets, or FSDP2 shards (``sharding="fsdp"``), where every rank takes
part in every forward pass (as many as the busiest rank makes) and every read of whole
tensors. A plain object (no Ray): the learner actor wraps it and names its device from what
Ray gave it; tests and the GPU smoke script drive it in-process.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import re
import socket

import torch

from contracts import ATTENTION_OUTPUT_SCALE, DEFAULT_ADAPTER, PolicyRef, TrainBatch, WeightUpdate
from learners.algorithms import cosine_schedule
from learners.objectives import OBJECTIVES, ObjectiveName, Prepared
from learners.policy import Policy, pack
from learners.settings import LearnerSettings
from learners.sharding import Replicas, Shards

logger = logging.getLogger(__name__)

# reported by every step, NaN (JSON null) when not computed
REQUIRED_METRICS = ("train/loss", "train/kl", "train/entropy")


def default_device() -> torch.device:
    """The first GPU torch can see (in a Ray actor: the ones Ray assigned it), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _on_cpu(value):
    """``value`` (tensors in nested dicts and lists) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return copy.deepcopy(value)


def _replicated():
    """Whole tensors may be copied into sharded parameters, each rank keeping its part
    (DTensor's implicit replication); plain parameters are unaffected."""
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def rng_state() -> dict:
    """torch's random state in this process: the CPU generator's, and every visible GPU's
    (dropout and sampling draw from them; a resumed run must draw what it would have)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | torch.Tensor) -> None:
    """Restore ``rng_state()``'s result (a bare tensor: a checkpoint from before the GPUs'
    states were kept). GPU states are restored where this process sees as many GPUs."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda is not None:
        logger.warning("the checkpoint holds the random state of %d GPUs, this process sees %d: theirs not restored", len(cuda), torch.cuda.device_count())


def _check_fits(named: dict[str, torch.Size], saved: dict[str, torch.Size]) -> None:
    """A ValueError unless a checkpoint's tensors (``saved``: name -> shape) are the policy's."""
    missing, unexpected = set(named) - set(saved), set(saved) - set(named)
    reshaped = [n for n in set(named) & set(saved) if tuple(named[n]) != tuple(saved[n])]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"checkpoint does not fit this policy: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, "
            f"other shapes {sorted(reshaped)[:3]} (was it written with another model, lora.rank, lora.target_modules or model.trainable_modules?)"
        )


def _extreme(key: str):
    """How a metric combines across micro-batches, updates and ranks: max, min, or None (sum)."""
    return max if key.endswith("_max") else min if key.endswith("_min") else None


class Learner:
    """Owns the policy, its optimizer and the objectives; ``step`` consumes a TrainBatch and
    bumps the policy version."""

    def __init__(self, settings: LearnerSettings, adapter: str = DEFAULT_ADAPTER, device: torch.device | str | None = None):
        """``device``: where the policy trains; None picks the GPU if torch sees one."""
        self.settings = settings
        self.device = torch.device(device) if device is not None else default_device()
        a = self.algorithm = settings.algorithm
        self._check()
        torch.manual_seed(settings.seed)
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
        self.policy = Policy(
            settings.model_path,
            settings.lora,
            dtype=settings.dtype,
            autocast_dtype=a.autocast_dtype,
            critic=a.uses_critic,
            reference=a.uses_reference,
            device=self.device,
            gradient_checkpointing=settings.gradient_checkpointing,
            trainable_modules=settings.trainable_modules,
            attention_controls=settings.attention_controls,
        )
        self._build_optimizer()
        self.objectives = {name: make(a, settings.temperature) for name, make in OBJECTIVES.items()}
        self.policy_ref = PolicyRef(adapter, 0)
        self.steps_done = 0
        self.skipped_steps = 0
        self.skipped_updates = 0
        self.rank, self.world_size = 0, 1
        self.layout: Replicas | Shards = Replicas()

    def _build_optimizer(self) -> None:
        """AdamW over the policy's (and the critic's) trainable parameters, and its schedule."""
        a = self.algorithm
        groups = [{"params": self.policy.policy_parameters(), "lr": a.lr}]
        if a.uses_critic:
            groups.append({"params": self.policy.critic_parameters(), "lr": a.critic_lr or a.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _check(self) -> None:
        a, s = self.algorithm, self.settings
        if a.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {a.lr_schedule!r}")
        if a.lr_schedule == "cosine" and s.total_steps <= a.warmup_steps:
            raise ValueError(f"cosine schedule needs total_steps ({s.total_steps}) > warmup_steps ({a.warmup_steps})")
        if a.kl_mode not in ("loss", "reward"):
            raise ValueError(f"unknown kl_mode {a.kl_mode!r}")

    def _lr_factor(self, step: int) -> float:
        a = self.algorithm
        if a.lr_schedule == "cosine":
            return cosine_schedule(step, self.settings.total_steps, a.warmup_steps, a.min_lr_ratio)
        return min(1.0, (step + 1) / max(1, a.warmup_steps))

    @property
    def kl_coef(self) -> float:
        return self.objectives["ppo"].kl_coef

    # -- data parallelism ----------------------------------------------------------------------

    def init_distributed(self, address: str, port: int, rank: int, world_size: int, timeout_s: float = 1800.0) -> None:
        """Join the learners' process group (NCCL on GPUs, gloo on CPUs) and start from rank
        0's parameters, then shard them if the settings say so (before any step: the
        optimizer is rebuilt over the shards). A collective waiting longer than ``timeout_s``
        on a peer fails instead of waiting forever."""
        import datetime

        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl" and self.settings.offload_optimizer:
            backend = "cuda:nccl,cpu:gloo"  # offloaded shards are host tensors: their collectives run on gloo
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size, timeout=timeout)
        self.rank, self.world_size = rank, world_size
        if not self.settings.threads:  # this node's cores, shared with the learners beside this one
            hosts: list[str] = [""] * world_size
            dist.all_gather_object(hosts, socket.gethostname())
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // hosts.count(socket.gethostname())))
        with torch.no_grad():
            for p in self.policy.trainable_parameters():
                dist.broadcast(p.data, src=0)
        if self.settings.sharding == "fsdp":
            self.policy.shard(self.settings.offload_optimizer)
            self._build_optimizer()
            self.layout = Shards(rank, world_size)
        else:
            self.layout = Replicas(world_size)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Combine ``tensor`` over the ranks, in place; a CPU tensor travels through the
        learner's device (NCCL reduces GPU tensors only)."""
        if self.world_size > 1:
            import torch.distributed as dist

            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=reduce_op)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def _global(self, *values: float) -> list[float]:
        return self.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank's metrics combined: sums for shares and losses, max / min for extremes."""
        if self.world_size == 1:
            return metrics
        out = {}
        for op, extreme in (("max", max), ("min", min), ("sum", None)):
            chosen = [k for k in sorted(metrics) if _extreme(k) is extreme]
            if chosen:
                values = self.all_reduce(torch.tensor([metrics[k] for k in chosen], dtype=torch.float64), op).tolist()
                out |= dict(zip(chosen, values))
        for key in ("train/grad_norm", "train/critic_grad_norm"):  # identical on every rank
            if key in out:
                out[key] = metrics[key]
        return out

    # -- the step ------------------------------------------------------------------------------

    def _micro_batches(self, batch: TrainBatch, indices: list[int]) -> list[list[int]]:
        """``indices`` in micro-batches of rows of similar length, longest first: a micro-batch
        is padded to its longest row, so grouping by length leaves little padding (a quarter
        of the tokens in random order on the TRL benchmark's work), and the first one shows
        the peak memory. The losses are normalised by global counts: the order changes no
        gradient beyond float rounding."""
        size = self.algorithm.micro_batch_size
        length = lambda i: len(batch.prompt_token_ids[i]) + len(batch.completion_token_ids[i])  # noqa: E731
        ordered = sorted(indices, key=length, reverse=True)
        micro = [ordered[start : start + size] for start in range(0, len(ordered), size)]
        # sharded: as many as the rank with the most, padded with empty fillers
        return micro + [[]] * (self.layout.most(len(micro)) - len(micro))

    def packed_micro_batches(self, batch: TrainBatch):
        """(rows, their completion lengths, packed tensors) for each micro-batch of the whole batch."""
        for micro in self._micro_batches(batch, list(range(len(batch)))):
            if not micro:  # a sharded rank's filler, scored for nothing
                yield micro, [], self.policy.filler_batch()
                continue
            part = batch.select(micro)
            packed = pack(part.prompt_token_ids, part.completion_token_ids, self.policy.pad_id, part.loss_masks)
            yield micro, [len(c) for c in part.completion_token_ids], packed

    def _update(self, objective, batch: TrainBatch, rows: list[int], prepared: Prepared) -> tuple[bool, dict[str, float]]:
        """One optimizer update over ``rows`` of this rank (all ranks call it in lockstep)."""
        a = self.algorithm
        local_tokens = sum(batch.trained_tokens(i) for i in rows)
        local_sequences = sum(1 for i in rows if batch.trained_tokens(i))  # an empty completion is not counted
        num_tokens, num_sequences = self._global(local_tokens, local_sequences)
        num_tokens, num_sequences = max(1.0, num_tokens), max(1.0, num_sequences)
        self.optimizer.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        finite = True
        for micro in self._micro_batches(batch, rows):
            if not micro:  # a sharded rank's filler: its peers' passes are collectives
                self.policy.filler_pass()
                continue
            loss, metrics = objective.loss(self, batch, micro, prepared, num_tokens, num_sequences)
            finite = finite and bool(torch.isfinite(loss))
            if finite or self.layout.sharded:  # a sharded backward is a collective: every rank runs it
                loss.backward()
            share = sum(batch.trained_tokens(i) for i in micro) / num_tokens
            for key, value in metrics.items():
                if _extreme(key):
                    sums[key] = _extreme(key)(sums.get(key, value), value)
                else:  # losses are already normalised globally: they add up
                    sums[key] = sums.get(key, 0.0) + (value if key.endswith("loss") else share * value)
            sums["train/loss"] = sums.get("train/loss", 0.0) + loss.item()
        finite = self._global(float(not finite))[0] == 0
        self.layout.reduce_gradients(self.policy.trainable_parameters())
        grad_norm = self.layout.clip(self.policy.policy_parameters(), a.max_grad_norm)
        if a.uses_critic:
            sums["train/critic_grad_norm"] = self.layout.clip(self.policy.critic_parameters(), a.max_grad_norm)
        sums["train/grad_norm"] = grad_norm
        applied = finite and math.isfinite(grad_norm) and math.isfinite(sums.get("train/critic_grad_norm", 0.0))
        if applied:
            self.optimizer.step()
        return applied, self.reduce_metrics(sums)

    def _skip(self, reason: str) -> dict[str, float]:
        self.skipped_steps += 1
        logger.warning("%s at policy %s: update skipped", reason, self.policy_ref)
        return {
            **dict.fromkeys(REQUIRED_METRICS, float("nan")),
            "train/grad_norm": float("nan"),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/skipped_steps": float(self.skipped_steps),
            "train/skipped_updates": float(self.skipped_updates),
        }

    def step(self, batch: TrainBatch, objective: ObjectiveName = "ppo") -> dict[str, float]:
        """One learner step of ``objective`` on a batch (this rank's shard of it).

        A non-finite input skips the step; a non-finite loss or gradient skips that update.
        Either way the weights stay as they were and the counters rise.
        """
        if objective not in self.objectives:
            raise ValueError(f"unknown objective {objective!r}; known: {sorted(self.objectives)}")
        chosen = self.objectives[objective]
        numbers = [*batch.advantages, *batch.rewards, *(x for row in batch.old_logprobs for x in row)]
        bad_input = not all(math.isfinite(x) for x in numbers)
        if self._global(float(bad_input))[0] > 0:
            return self._skip("non-finite reward, advantage or log-prob in the batch")
        prepared = chosen.prepare(self, batch)
        global_rows = int(self._global(len(batch))[0])
        mini = self.algorithm.mini_batch_size
        updates = -(-global_rows // mini) if mini else 1
        shuffle = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.steps_done)
        self.policy.model.train()
        sums: dict[str, float] = {}
        applied = 0
        mismatch = None
        for _ in range(chosen.epochs):
            order = torch.randperm(len(batch), generator=shuffle) if updates > 1 else torch.arange(len(batch))
            for rows in torch.tensor_split(order, updates):
                ok, metrics = self._update(chosen, batch, rows.tolist(), prepared)
                if mismatch is None:  # measured before any update of this step moved the weights
                    mismatch = metrics.get("train/logprob_mismatch")
                applied += ok
                if not ok:
                    self.skipped_updates += 1
                    logger.warning("non-finite loss or gradient at policy %s: update skipped", self.policy_ref)
                for key, value in metrics.items():
                    sums[key] = _extreme(key)(sums.get(key, value), value) if _extreme(key) else sums.get(key, 0.0) + value
        total = chosen.epochs * updates
        out = {k: v if _extreme(k) else v / total for k, v in sums.items()} | prepared.metrics
        if mismatch is not None:
            out["train/logprob_mismatch"] = mismatch
        self.steps_done += 1
        if applied:
            self.policy_ref = self.policy_ref.next()
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        out |= chosen.finish(out, global_rows)
        for key in REQUIRED_METRICS:
            out.setdefault(key, float("nan"))
        return out | {
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/updates": float(applied),
            "train/skipped_steps": float(self.skipped_steps),
            "train/skipped_updates": float(self.skipped_updates),
        }

    # -- queries ---------------------------------------------------------------------------

    def policy_version(self) -> PolicyRef:
        """The policy these weights are: the adapter and how many updates it has had."""
        return self.policy_ref

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The current policy's log-probs of each completion token, at the sampling temperature
        (what the generators report: rollout/trainer checks)."""
        self.policy.model.eval()
        out: list[list[float]] = [[] for _ in range(len(batch))]
        for rows, lengths, packed in self.packed_micro_batches(batch):
            logprobs, _ = self.policy.forward(packed, self.settings.temperature)
            for i, (row, n) in enumerate(zip(rows, lengths)):
                out[row] = logprobs[i, :n].tolist()
        return out

    @torch.no_grad()
    def sequence_logprob(self, contexts: list[list[int]], targets: list[list[int]], reference: bool = False) -> list[float]:
        """log p(target | context) = sum_t log pi(target_t | context, target_<t), one per pair,
        at temperature 1, under the policy or (``reference``) the frozen base model. For
        rewards that need the model (the Markovian answer log-prob given a chain of thought)."""
        if len(contexts) != len(targets):
            raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
        if any(not c for c in contexts) or any(not t for t in targets):
            raise ValueError("every context and every target needs at least one token")
        batch = TrainBatch(
            prompt_token_ids=tuple(map(tuple, contexts)),
            completion_token_ids=tuple(map(tuple, targets)),
            old_logprobs=tuple((0.0,) * len(t) for t in targets),
            advantages=(0.0,) * len(targets),
            policy_versions=(self.policy_ref.version,) * len(targets),
        )
        self.policy.model.eval()
        out = [0.0] * len(batch)
        for rows, lengths, packed in self.packed_micro_batches(batch):
            logprobs = self.policy.reference_forward(packed, 1.0) if reference else self.policy.forward(packed, 1.0)[0]
            for i, (row, n) in enumerate(zip(rows, lengths)):
                out[row] = logprobs[i, :n].sum().item()
        return out

    def attention_scales(self) -> torch.Tensor | None:
        """The surgeon's [layers, heads] attention-output scales (None without controls)."""
        return None if self.policy.controls is None else self.policy.controls.scales.clone()

    def set_attention_scales(self, scales: torch.Tensor) -> PolicyRef:
        """New attention-output scales: a new policy version, which the next weight update
        carries to the generators beside the adapter."""
        if self.policy.controls is None:
            raise ValueError("this learner has no attention controls: they come with a surgeon (a phases schedule with surgery or joint)")
        self.policy.controls.set(scales)
        self.policy_ref = self.policy_ref.next()
        return self.policy_ref

    def load_adapter(self, update: WeightUpdate) -> PolicyRef:
        """Serve a saved adapter (``raylight eval`` of a trained policy): its tensors become
        the policy's, its version the policy's; the optimizer is untouched."""
        with _replicated():
            self.policy.load_adapter(update.tensors)
        self.policy_ref = PolicyRef(self.policy_ref.adapter, update.policy.version)
        return self.policy_ref

    def parameter_digest(self) -> dict[str, str]:
        """SHA-256 of the trainable and of the frozen parameters (cheap equality checks)."""
        digests = {"trainable": hashlib.sha256(), "frozen": hashlib.sha256()}
        trainable = {id(p) for p in self.policy.trainable_parameters()}
        named = sorted(self.policy.model.named_parameters()) + [(n, p) for n, p in self.policy.named_trainable() if n.startswith("value_head")]
        kinds = {name: "trainable" if id(p) in trainable else "frozen" for name, p in named}
        for name, p in self.layout.whole(named):
            digests[kinds[name]].update(p.detach().float().cpu().numpy().tobytes())
        return {k: v.hexdigest() for k, v in digests.items()}

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self, weights: bool = True) -> dict:
        """What this rank needs to continue exactly where it is: the trainable tensors (the
        adapter, or every weight, and the critic), optimizer, scheduler, the objectives' state
        (the adaptive KL coefficient), counters and torch RNG state. ``weights=False``: only
        the RNG (the other ranks, whose weights and optimizer equal rank 0's).

        Sharded, every rank must call it: the whole tensors are gathered to rank 0, the one
        asked for ``weights``; the saved state has the same form as an unsharded learner's,
        so a checkpoint resumes with or without sharding. ``save_shards`` writes the shards
        where they are instead."""
        state: dict = {"rank": self.rank, "rng": rng_state()}
        if not (weights or self.layout.sharded):
            return state
        # CPU copies: the optimizer keeps updating its moment tensors in place, and the state
        # travels to a driver that may have no GPU
        trainable = {name: p.detach().to("cpu", copy=True) for name, p in self.layout.whole(self.policy.named_trainable())}
        optimizer = _on_cpu(self.layout.whole_state(self.optimizer.state_dict()))
        if weights:
            state |= {"trainable": trainable, "optimizer": optimizer, **self._progress()}
        return state

    def _progress(self) -> dict:
        """The state beside the tensors: scheduler, the objectives' state, policy version,
        attention scales, counters (small: it travels through the driver)."""
        return {
            # the schedule's function is code, rebuilt from the settings: not saved
            "scheduler": {k: copy.deepcopy(v) for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            **self.objectives["ppo"].state_dict(),
            "policy_version": self.policy_ref.version,
            **({"attention_scales": self.attention_scales()} if self.policy.controls is not None else {}),
            "steps_done": self.steps_done,
            "skipped_steps": self.skipped_steps,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: dict, rng: dict | torch.Tensor | None = None, policy_version: int | None = None) -> PolicyRef:
        """Continue from ``state`` (rank 0's), with this rank's ``rng`` state if given; a
        ``policy_version`` replaces the saved one (a rollback serves old weights as a new
        version). Returns the policy now held."""
        named = dict(self.policy.named_trainable())
        saved = state["trainable"]
        _check_fits({n: p.shape for n, p in named.items()}, {n: t.shape for n, t in saved.items()})
        with torch.no_grad(), _replicated():
            for name, param in named.items():
                param.copy_(saved[name])  # sharded: this rank's part of it
        self.optimizer.load_state_dict(state["optimizer"])
        self.layout.shard_optimizer_state(self.optimizer)
        return self._load_progress(state, rng, policy_version)

    def _load_progress(self, state: dict, rng, policy_version: int | None) -> PolicyRef:
        """The rest of ``load_state_dict``: what ``_progress`` saved, and the RNG state."""
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        self.objectives["ppo"].load_state_dict(state)
        if self.policy.controls is not None and "attention_scales" in state:
            self.policy.controls.set(state["attention_scales"])
        version = state["policy_version"] if policy_version is None else policy_version
        self.policy_ref = PolicyRef(self.policy_ref.adapter, version)
        self.steps_done, self.skipped_steps, self.skipped_updates = state["steps_done"], state["skipped_steps"], state["skipped_updates"]
        set_rng_state(rng if rng is not None else state["rng"])
        return self.policy_ref

    # -- sharded checkpoints (torch.distributed.checkpoint) ----------------------------------

    def _shards(self) -> dict:
        """This rank's trainable tensors and optimizer state, as ``get_state_dict`` gives them
        (DTensor shards keyed by parameter name): ``{"model": ..., "optim": ...}``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.policy.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        names = {name for name, _ in self.policy.named_trainable()}
        # a frozen LM head tied to the embeddings comes back despite ignore_frozen_params
        return {"model": {k: v for k, v in model.items() if k in names}, "optim": optim}

    def save_shards(self, folder: str) -> dict:
        """Write this rank's shards of the trainable tensors and optimizer state into
        ``folder`` (``torch.distributed.checkpoint``: one ``.distcp`` file per rank and a
        ``.metadata``, written by rank 0); returns what ``state_dict`` returns without those
        tensors (rank 0: scheduler, counters, RNG; the others: their RNG). Every rank must
        call it, with the same ``folder``, which every rank must be able to write."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._shards(), storage_writer=dcp.FileSystemWriter(folder))
        state: dict = {"rank": self.rank, "rng": rng_state()}
        return state | (self._progress() if self.rank == 0 else {})

    def load_shards(self, folder: str, state: dict, rng: dict | torch.Tensor | None = None, policy_version: int | None = None) -> PolicyRef:
        """``load_state_dict`` from the shards ``save_shards`` wrote into ``folder`` and rank
        0's ``state`` (without tensors). Every rank must call it; each reads the parts of the
        files its shards need, so a group of another size of the same FSDP layout reshards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        wanted = self._shards()
        reader = dcp.FileSystemReader(folder)
        saved = {k.removeprefix("model."): m.size for k, m in reader.read_metadata().state_dict_metadata.items() if k.startswith("model.")}
        _check_fits({n: t.shape for n, t in wanted["model"].items()}, saved)
        dcp.load(wanted, storage_reader=reader)
        set_state_dict(self.policy.model, self.optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optim"], options=StateDictOptions(strict=False))
        return self._load_progress(state, rng, policy_version)

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning rate (and its schedule) by ``factor``; returns the new rate."""
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return self.scheduler.get_last_lr()[0]

    def weight_update(self, complete: bool = False, dtype: str | None = None, bucket_bytes: int = 0, keep=None) -> WeightUpdate:
        """The policy's weights for the generators: the adapter, or the trained parameters
        (all of them with ``complete``: a whole model, as the final folder needs). ``dtype``:
        the generators' weights dtype, which model weights are sent in (fp32 master weights
        sent as bf16 halve what every generator receives); an adapter stays in its own dtype
        (a merge folds it in fp32). Sharded, every rank must call it; rank 0's holds the whole
        tensors, the others' none.

        ``bucket_bytes`` (model weights; 0: one dict): the weights streamed in buckets of that
        many bytes or a little more (whole decoder layers), each handed to ``keep`` (the
        actor's object store) once it is full; the update's ``buckets`` are what ``keep``
        returned, and one bucket is held here at a time."""
        kind = "full" if self.policy.lora is None else "lora"
        controls = {} if self.policy.controls is None else {ATTENTION_OUTPUT_SCALE: self.attention_scales()}
        cast = getattr(torch, dtype) if kind == "full" and dtype is not None else None
        items = self.policy.weight_items(complete, self.layout.whole, cast)
        if kind == "lora" or bucket_bytes <= 0:
            return WeightUpdate(self.policy_ref, dict(items), self.policy.adapter_config(), kind, controls)
        kept = []
        try:
            for bucket in in_buckets(items, bucket_bytes):
                kept.append((keep or dict)(bucket))
                del bucket  # before the next one fills
        except BaseException:
            for _ in items:  # the other ranks wait in this gather's collectives: finish them
                pass
            raise
        return WeightUpdate(self.policy_ref, {}, self.policy.adapter_config(), kind, controls, tuple(kept))


def in_buckets(items, bucket_bytes: int):
    """(name, tensor) pairs gathered into dicts, each yielded once it holds ``bucket_bytes``
    or more and the next weight starts another decoder layer; the rest last. A layer is never
    split: vLLM fuses sibling projections (q/k/v, gate/up) into one matrix, and an in-place
    reload that gets part of a fused matrix fills the rest with garbage."""
    bucket, size, unit = {}, 0, None
    for name, tensor in items:
        layer = layer_of(name)
        if size >= bucket_bytes and layer != unit:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += tensor.numel() * tensor.element_size()
        unit = layer
    if bucket:
        yield bucket


def layer_of(name: str) -> str:
    """The numbered block a weight belongs to (a decoder layer: ``model.layers.3``,
    ``transformer.h.3``), else its module."""
    match = re.match(r"(.*?\.\d+)\.", name)  # the first number: a layer's experts stay with it
    return match.group(1) if match else name.rpartition(".")[0]
