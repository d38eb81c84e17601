"""Statistics passes over a data loader; none of them changes the model.

- :func:`mask_gradients`: per-example dl/dm_u for every head and filter, from one ordinary
  backward pass per batch (gates of ones on the unit outputs, see ``layer.py``).
- :func:`parameter_gradient_sum`: sum over examples of the gradient of the adapter's deltas.
- :func:`parameter_fisher_diagonal`: mean over examples of the squared per-example gradient
  of the adapter's deltas (diagonal empirical Fisher), one backward pass per batch.
- :class:`RetainStatistics`: the retain side of the mask search, cached across requests and
  down-dated by removed examples (SPEC §3 "Statistics cache").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..common.data import per_example_losses, to_device
from ..common.distributed import RowShard, is_sharded, sum_across, sum_count
from ..common.modes import eval_mode
from .hessian import gradient_sum

UNIT_TYPES = ("heads", "filters")


@dataclass
class MaskGradients:
    """Per-example mask gradients: ``per_example[type]`` has shape [examples, layers, units].

    ``losses`` holds each example's loss at the same pass (free: the forward ran anyway).
    """

    per_example: dict[str, torch.Tensor]
    losses: torch.Tensor

    def total(self) -> dict[str, torch.Tensor]:
        """Signed sum over examples (g_f of SPEC §3), [layers, units] per type."""
        return {k: v.sum(0) for k, v in self.per_example.items()}

    def fisher(self) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher (mean of squares), [layers, units] per type."""
        return {k: v.pow(2).mean(0) for k, v in self.per_example.items()}

    @property
    def num_examples(self) -> int:
        return next(iter(self.per_example.values())).shape[0]


def _gated_layers(tuner) -> dict[str, list]:
    arch = tuner.architecture()
    layers = dict(tuner.mape_layers())
    return {
        "heads": [layers[b.o_proj] for b in arch.blocks],
        "filters": [layers[b.down_proj] for b in arch.blocks],
    }


def mask_gradients(tuner, loader, loss_fn=None, *, device, desc="mask gradients", progress=True) -> MaskGradients:
    """Per-example mask gradients of every head and filter over ``loader``."""
    gated = _gated_layers(tuner)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per batch: heads, filters, losses
    shard = RowShard(loader, lockstep=is_sharded(tuner.model))
    try:
        with eval_mode(tuner.model):
            for batch in tqdm(shard, desc=desc, disable=not progress, leave=False):
                batch = to_device(batch, device)
                size = next(iter(batch.values())).shape[0]
                gates = {
                    kind: [
                        layer.open_gate(size, layer.get_base_layer().weight.dtype, device) for layer in layers
                    ]
                    for kind, layers in gated.items()
                }
                losses = per_example_losses(tuner.model, batch, loss_fn)
                flat = gates["heads"] + gates["filters"]
                grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
                grads = [torch.zeros_like(g) if d is None else d for g, d in zip(flat, grads)]
                n_layers = len(gates["heads"])
                parts.append((torch.stack(grads[:n_layers], 1).float(), torch.stack(grads[n_layers:], 1).float(),
                              losses.detach().double()))
    finally:
        for layers in gated.values():
            for layer in layers:
                layer.close_gate()
    heads, filters, losses = zip(*shard.gather(parts))
    return MaskGradients({"heads": torch.cat(heads), "filters": torch.cat(filters)}, torch.cat(losses))


def parameter_gradient_sum(tuner, adapter_name, loader, loss_fn=None, *, device, desc="forget gradient", progress=True):
    """Sum over examples of d loss / d delta for every delta of ``adapter_name``."""
    return gradient_sum(tuner.model, tuner.adapter_parameters(adapter_name), loader, loss_fn, device=device,
                        desc=desc, progress=progress)


def parameter_fisher_diagonal(tuner, adapter_name, loader, loss_fn=None, *, device, desc="retain Fisher", progress=True):
    """Mean over examples of the squared per-example gradient of every delta of ``adapter_name``."""
    layers = [layer for _, layer in tuner.mape_layers() if adapter_name in layer.mape_delta]
    sums = [torch.zeros_like(p) for layer in layers for p in layer.adapter_parameters(adapter_name)]
    count = 0
    try:
        with eval_mode(tuner.model):
            for batch in tqdm(RowShard(loader), desc=desc, disable=not progress, leave=False):
                batch = to_device(batch, device)
                for layer in layers:
                    layer.record_delta_inputs(adapter_name)
                losses = per_example_losses(tuner.model, batch, loss_fn)
                updates = [layer.recorded_updates(adapter_name) for layer in layers]
                grads = iter(torch.autograd.grad(losses.sum(), [u for group in updates for u in group]))
                start = 0
                for layer, group in zip(layers, updates):
                    width = len(layer.adapter_parameters(adapter_name))
                    layer.add_squared_example_gradients(adapter_name, [next(grads) for _ in group],
                                                        sums[start:start + width])
                    start += width
                    layer.stop_recording()  # frees this layer's recorded inputs
                count += losses.shape[0]
    finally:
        for layer in layers:
            layer.stop_recording()
    sum_across(sums)
    return [s / max(sum_count(count), 1) for s in sums]


@dataclass
class RetainStatistics:
    """Retain-side mask-search statistics at the original weights, reusable across requests.

    ``fingerprints[i]`` is the content hash of the example behind row ``i`` (see
    :func:`peft_mape.common.data.fingerprint`), so rows of examples removed by later requests can be
    dropped (down-dated) without recomputing the rest.
    """

    per_example: dict[str, torch.Tensor]
    losses: torch.Tensor
    fingerprints: list[str]

    def without(self, fingerprints) -> "RetainStatistics":
        """A copy without the rows of the given example fingerprints."""
        drop = set(fingerprints)
        keep = [i for i, f in enumerate(self.fingerprints) if f not in drop]
        index = torch.tensor(keep, dtype=torch.long)
        return RetainStatistics(
            {k: v.index_select(0, index) for k, v in self.per_example.items()},
            self.losses.index_select(0, index),
            [self.fingerprints[i] for i in keep],
        )

    def as_mask_gradients(self) -> MaskGradients:
        return MaskGradients(self.per_example, self.losses)

    def __len__(self) -> int:
        return len(self.fingerprints)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as named tensors (fingerprints as their 32 raw bytes per row), to be
        stored in an adapter's weights file."""
        tensors = {f"per_example.{k}": v.detach().cpu().contiguous() for k, v in self.per_example.items()}
        tensors["losses"] = self.losses.detach().cpu().contiguous()
        raw = b"".join(bytes.fromhex(f) for f in self.fingerprints)
        tensors["fingerprints"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(len(self.fingerprints), -1)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RetainStatistics":
        """Inverse of :meth:`to_tensors`; ``ValueError`` when the tensors do not fit together."""
        per_example = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("per_example.")}
        losses, fingerprints = tensors.get("losses"), tensors.get("fingerprints")
        rows = {len(v) for v in per_example.values()}
        if (set(per_example) != set(UNIT_TYPES) or losses is None or fingerprints is None
                or fingerprints.dtype != torch.uint8 or fingerprints.dim() != 2 or rows != {len(losses)}
                or len(fingerprints) != len(losses)):
            raise ValueError(f"cached retain statistics are malformed: tensors {sorted(tensors)} with shapes "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
        return cls(per_example, losses, [bytes(row.tolist()).hex() for row in fingerprints])
