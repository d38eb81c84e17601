"""Several processes (``torchrun`` / ``accelerate launch``): every pass over data is shared out.

The library never asks the user to change their script for several processes. When a process
group is initialised (by the user, by ``accelerate``, or here from the launcher's environment by
:func:`join_launch`), every pass over a loader reads only this process's batches
(:class:`RowShard`: rows ``rank``, ``rank + world``, ... of every batch, so any pass is shared
out evenly) and the results are put back together so that every rank holds exactly what one
process would have computed:

- per-example results (losses, mask gradients) are gathered in the loader's order
  (:meth:`RowShard.gather`), so a selection or a stopping decision computed from them is the
  same on every rank and the same as one process's;
- sums (gradients, Hessian-vector products, counts) are summed across ranks (:func:`sum_across`);
- one optimisation step splits the rows of the global batch across ranks
  (:func:`split_rows`) and puts the per-example losses back together with the local rows still
  differentiable (:func:`rejoin_rows`), so each rank's backward gives its part of the
  one-process gradient and :func:`sum_across` gives all of it: the same global batch as one
  process, and the same update on every rank.

Every rank runs the same number of collectives: the loaders are deterministic and identical on
every rank, and a rank without a batch still joins each collective with an empty part. Under
FSDP2 (:func:`is_sharded`) the forward and backward passes are collectives too: a rank without
rows of a batch runs it on a stand-in row whose result is dropped (:func:`stand_in_rows`), and
the update's gradients are reduced by FSDP's own reduce-scatter instead of :func:`sum_across`.
"""

from __future__ import annotations

import atexit
import os
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist


def join_launch() -> None:
    """Initialise the process group when a launcher started several processes (``WORLD_SIZE`` >
    1) and nobody has yet: through ``accelerate``'s ``PartialState``, which picks the backend for
    the device (gloo on CPU, NCCL on CUDA)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()
        # The group this call made is left at exit: a gloo group still alive at interpreter shutdown
        # can abort the process ("terminate called without an active exception") after the work is done.
        atexit.register(_leave)


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


class RowShard:
    """This rank's rows of every batch of ``batches`` (rows ``rank``, ``rank + world``, ... of
    each, as :func:`split_rows`), so every rank gets an equal share of any pass however few its
    batches; with one process, the batches themselves. :meth:`gather` puts per-batch results back
    together."""

    def __init__(self, batches: Iterable, *, lockstep: bool = False):
        self.batches, self.lockstep = batches, lockstep
        self.sizes: list[int] = []  # rows of each global batch, filled while iterating
        self.stand_ins: set[int] = set()  # positions of yielded batches that only keep the ranks in step

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        yielded = 0
        for batch in self.batches:
            local, size = split_rows(batch)
            self.sizes.append(size)
            if local is None and self.lockstep:
                local = stand_in_rows(batch)
                self.stand_ins.add(yielded)
            if local is not None:
                yielded += 1
                yield local

    def gather(self, parts: Sequence) -> list:
        """Every global batch's per-row results, in the batches' order: ``parts`` holds this
        rank's results of each batch it iterated (a tensor, or a tuple of tensors, whose first
        dimension is its rows)."""
        world = world_size()
        if world == 1:
            return list(parts)
        parts = [part for position, part in enumerate(parts) if position not in self.stand_ins]
        every: list = [None] * world
        dist.all_gather_object(every, [_to_cpu(part) for part in parts])
        taken, joined = [0] * world, []
        for size in self.sizes:
            owners = range(min(world, size))
            pieces = [every[r][taken[r]] for r in owners]
            for r in owners:
                taken[r] += 1
            joined.append(_interleave(pieces, size) if not isinstance(pieces[0], tuple)
                          else tuple(_interleave(list(column), size) for column in zip(*pieces)))
        return joined


def _to_cpu(part):
    return tuple(t.detach().cpu() for t in part) if isinstance(part, tuple) else part.detach().cpu()


def _interleave(pieces: list[torch.Tensor], size: int) -> torch.Tensor:
    """Rows ``r``, ``r + world``, ... from piece ``r``: the inverse of :func:`split_rows`."""
    out = pieces[0].new_empty((size, *pieces[0].shape[1:]))
    for r, piece in enumerate(pieces):
        out[r::world_size()] = piece
    return out


def sum_across(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective per dtype)."""
    if world_size() == 1 or not tensors:
        return
    by_dtype: dict = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for tensor in group:
            tensor.copy_(flat[start:start + tensor.numel()].view_as(tensor))
            start += tensor.numel()


def collective_device() -> torch.device:
    """Where a tensor made only for a collective must live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_count(count: int) -> int:
    """An integer summed over the ranks."""
    if world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total)


def split_rows(batch: dict) -> tuple[Optional[dict], int]:
    """This rank's rows of a global batch (rows ``rank``, ``rank + world``, ...) and the batch's
    size; ``None`` when the batch has fewer rows than there are ranks before this one."""
    size = next(iter(batch.values())).shape[0]
    world = world_size()
    if world == 1:
        return batch, size
    rows = torch.arange(rank(), max(size, rank()), world)  # empty when this rank is past the batch
    if not len(rows):
        return None, size
    return _take_rows(batch, rows), size


def _take_rows(batch: dict, rows) -> dict:
    """``rows`` (an index tensor or a slice) of every per-example field of ``batch``."""
    size = next(iter(batch.values())).shape[0]
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v for k, v in batch.items()}


def stand_in_rows(batch: dict) -> dict:
    """The first row of ``batch``, for a rank that holds none of its rows but must still run the
    forward (and backward) that the others run: FSDP2 gathers each layer's weights in a
    collective inside the forward. Its results are dropped (its loss enters with weight 0)."""
    return _take_rows(batch, slice(0, 1))


def rejoin_rows(local: Optional[torch.Tensor], size: int, *, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The global batch's per-example values [size] from every rank's :func:`split_rows` part:
    the other ranks' values as constants, this rank's still attached to its graph. ``like``
    gives the dtype and device when this rank has no rows."""
    world = world_size()
    if world == 1:
        return local
    reference = local if local is not None else like
    mine = local.detach().cpu() if local is not None else torch.zeros(0)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    parts = [local if r == rank() and local is not None else every[r].to(reference.device, reference.dtype)
             for r in range(world)]
    order = torch.cat([torch.arange(r, max(size, r), world) for r in range(world)])
    joined = torch.cat(parts)
    return joined[torch.argsort(order).to(joined.device)]


def gathered_state_dict(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` with every sharded (FSDP2 ``DTensor``) tensor gathered whole, for
    ``save_pretrained(..., state_dict=...)`` on the main process. A collective: call it on every
    rank."""
    return {key: whole(value) for key, value in model.state_dict().items()}


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded by FSDP2 (``DTensor``): then every rank must run
    every forward and backward, even with no rows of its own (see :func:`split_rows`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return any(is_dtensor(p) for p in model.parameters())


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, gathered whole when it is an FSDP2 shard (a collective then)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def check_same_data(what: str, examples: Sequence[dict]) -> None:
    """Every rank must pass the same data (the library shares it out itself): a clear error on
    every rank, instead of a hang, when a rank holds other examples (e.g. a user DataLoader with
    a ``DistributedSampler``). With one process there is nothing to compare, and nothing is hashed."""
    if world_size() == 1:
        return
    from .data import fingerprint  # data imports this module (through lm_head)
    import hashlib

    digest = hashlib.sha256("".join(fingerprint(e) for e in examples).encode()).hexdigest()
    every: list = [None] * world_size()
    dist.all_gather_object(every, digest)
    if len(set(every)) > 1:
        differing = [r for r, d in enumerate(every) if d != every[0]]
        raise ValueError(f"{what}: ranks {differing} hold other examples than rank 0; with several processes pass "
                         "every rank the same, whole data (no DistributedSampler): the library shares it out")


def refuse_sharded(model: torch.nn.Module, what: str, instead: str = "use DDP or one process") -> None:
    """A clear error, on every rank alike, for a pass that cannot run on an FSDP2-sharded model."""
    if is_sharded(model):
        raise ValueError(f"{what} does not run on an FSDP2-sharded model (its passes are not kept in lockstep, "
                         f"and Hessian-vector products have no FSDP2 support); {instead}")
