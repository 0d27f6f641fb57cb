"""How a data-parallel learner group holds its weights: every rank a whole replica (gradients
all-reduced in flat buckets), or PyTorch FSDP2 shards (docs/cluster.md#sharded-learners).

The learner chooses a layout once, when it joins its group, and asks it for the four things
that differ: sum the gradients, clip them, read whole tensors, and put whole tensors back.

``Replicas`` (``learner.sharding: none``): each rank holds every weight, gradient and Adam
moment; after the backward passes of an update the gradients are summed over the ranks in
flat buckets of ``BUCKET_BYTES`` (one all-reduce per bucket, as DDP does, instead of one per
parameter). A single learner is ``Replicas`` of one rank: no collective at all.

``Shards`` (``learner.sharding: fsdp``): ``fully_shard`` each decoder layer, then the trunk
(embeddings, final norm, LM head) as the root, as torchtitan and verl do. Each rank keeps
1/N of every parameter, gradient and Adam moment (dim-0 chunks); a unit's forward all-gathers
its parameters and frees them after (the root keeps its own until the backward pass), and
its backward reduce-scatters the gradients. Deviations from FSDP2's defaults:

- the gradients are summed, not averaged (``set_gradient_divide_factor(1)`` with sum-only
  collectives, which gloo needs): the learner's losses are already normalised by global
  token counts, as they are for ``Replicas``;
- mixed precision applies to the decoder layers only: their parameters are all-gathered and
  used in the policy's autocast dtype (bf16 where it uses bf16), the gradients reduced in
  fp32. The root is gathered in its stored dtype, so the LM head's log-probs stay in fp32 as
  in the unsharded policy (``learners.head``);
- one unit may hold parameters of two dtypes (a frozen bf16 base and fp32 LoRA matrices):
  FSDP2 in torch 2.13 accepts it, since only the trainable parameters must agree; with bf16
  autocast the layer gathers both in bf16, the LoRA gradients still reduce in fp32;
- ``offload`` is FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and Adam
  moments live in host memory and the optimizer steps there. On CPU learners it changes
  nothing.

Reading whole tensors (a weight update, a checkpoint, a digest) is a collective: every rank
all-gathers each tensor in turn (one parameter at a time, so at most one whole tensor is
materialised beside the shards); rank 0 keeps the result, the others drop it. A checkpoint
can avoid it: ``Learner.save_shards`` has each rank write its own shards
(``torch.distributed.checkpoint``), and ``gathered_form`` turns their consolidation into the
gathered form.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

# gradients summed per all-reduce of an unsharded group: DDP's default bucket
BUCKET_BYTES = 25 * 2**20


def buckets(tensors: Iterable[torch.Tensor], limit_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """``tensors`` in order, cut into runs of one dtype holding at most ``limit_bytes`` each
    (a tensor larger than the limit is a bucket of its own)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if not out or out[-1][0].dtype != tensor.dtype or size + nbytes > limit_bytes:
            out.append([])
            size = 0
        out[-1].append(tensor)
        size += nbytes
    return out


def all_reduce_bucketed(tensors: list[torch.Tensor], limit_bytes: int = BUCKET_BYTES) -> None:
    """Sum each tensor over the ranks in place, one ``all_reduce`` per flat bucket."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for bucket in buckets(tensors, limit_bytes):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        for tensor, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(summed)


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes these tensors hold on this rank (a DTensor: its local shard), each counted once."""
    from torch.distributed.tensor import DTensor

    unique = {id(t): t for t in tensors}  # holds each tensor: no id is reused while counting
    locals_ = [t.to_local() if isinstance(t, DTensor) else t for t in unique.values()]
    return sum(local.numel() * local.element_size() for local in locals_)


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of parameters, gradients and optimizer state (not activations, not
    the transient all-gathered parameters of a sharded forward)."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return local_bytes(params) + local_bytes(grads) + local_bytes(moments)


class Replicas:
    """Every rank holds every weight: one learner, or unsharded data parallelism."""

    sharded = False

    def __init__(self, world_size: int = 1, bucket_bytes: int = BUCKET_BYTES):
        self.world_size, self.bucket_bytes = world_size, bucket_bytes

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over the ranks (a rank whose share of the mini-batch was empty
        contributes zeros)."""
        if self.world_size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_bucketed([p.grad for p in params], self.bucket_bytes)

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` in global L2 norm; returns the norm before."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def whole(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the whole tensor): the tensors themselves."""
        return iter(named)

    def whole_state(self, value):
        """A nested optimizer state with whole tensors: it is already."""
        return value

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After loading whole tensors into the optimizer: nothing to split."""

    def most(self, count: int) -> int:
        """Replicas compute apart: each rank makes its own ``count`` passes."""
        return count


class Shards:
    """FSDP2 shards over the group's ranks (see the module docstring)."""

    sharded = True

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Nothing left to do: each unit's backward reduce-scattered its gradients."""

    def most(self, count: int) -> int:
        """The most micro-batches any rank has: every rank makes that many passes through the
        model, since each pass is a collective (all-gathers; with gradients, reduce-scatters),
        while a rank's shard of the batch may hold fewer rows than another's. A rank short of
        it makes filler passes over one padding token (``Policy.filler_pass``)."""
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        most = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """``clip_grad_norm_`` over sharded gradients: the norm of the local shards summed
        over the ranks, then the same scale applied to every shard."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total.item()

    def whole(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the whole tensor) on rank 0, nothing on the others; every rank must run it
        to the end (each DTensor is all-gathered in turn)."""
        from torch.distributed.tensor import DTensor

        for name, tensor in named:
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if self.rank == 0:
                yield name, whole

    def whole_state(self, value):
        """``value`` (nested dicts and lists) with every DTensor all-gathered, as a CPU tensor
        on rank 0 and None on the others; every rank must run it."""
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            whole = value.full_tensor()
            return whole.cpu() if self.rank == 0 else None
        if isinstance(value, dict):
            return {k: self.whole_state(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.whole_state(v) for v in value)
        return value

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.load_state_dict`` of whole tensors (a checkpoint): keep this rank's
        shard of each moment, laid out as its parameter."""
        from torch.distributed.tensor import DTensor

        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                for key, value in state.items():
                    if isinstance(p, DTensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                        state[key] = self.local_shard(value, p)

    def local_shard(self, whole: torch.Tensor, like) -> "torch.Tensor":
        """This rank's dim-0 chunk of ``whole`` as a DTensor laid out as the sharded parameter
        ``like`` (FSDP2's ``Shard(0)`` chunks as ``torch.chunk`` does), on the device that
        parameter's shard lives on (the host under CPU offload); no collective."""
        from torch.distributed.tensor import DTensor

        local = like.to_local()
        chunks = whole.chunk(self.world_size, dim=0)
        mine = chunks[self.rank] if self.rank < len(chunks) else whole.new_empty((0, *whole.shape[1:]))
        mine = mine.to(device=local.device, dtype=local.dtype).clone()
        return DTensor.from_local(mine, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def shard_trunk(trunk: torch.nn.Module, layers: Iterable[torch.nn.Module], compute_dtype: torch.dtype | None, offload: bool) -> None:
    """FSDP2 over the default process group: each of ``layers``, then ``trunk`` as the root.

    ``compute_dtype``: the layers' parameters are gathered in it (None: in their own dtype);
    gradients are reduced in fp32 either way. ``offload``: shards, gradients and optimizer
    state in host memory."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = next(trunk.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    units = []
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32), offload_policy=policy)
        units.append(layer)
    fully_shard(trunk, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32), offload_policy=policy)
    for unit in [*units, trunk]:
        unit.set_gradient_divide_factor(1.0)  # summed: the losses are normalised by global counts
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def gathered_form(saved: dict) -> dict:
    """A consolidated ``torch.distributed.checkpoint`` state of ``Learner.save_shards``
    (``{"model": name -> tensor, "optim": {"state": name -> moments, "param_groups": [...
    "params": [names]]}}``, as ``get_state_dict`` keys it) in ``Learner.state_dict``'s form:
    ``{"trainable": name -> tensor, "optimizer": torch.optim's state_dict}``, whose state and
    groups name each parameter by its position over the groups in order."""
    optim = saved["optim"]
    position = {name: i for i, name in enumerate(n for group in optim["param_groups"] for n in group["params"])}
    optimizer = {
        "state": {position[name]: moments for name, moments in optim["state"].items()},
        "param_groups": [{**group, "params": [position[n] for n in group["params"]]} for group in optim["param_groups"]],
    }
    return {"trainable": dict(saved["model"]), "optimizer": optimizer}
