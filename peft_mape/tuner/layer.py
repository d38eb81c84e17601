"""The layer MAPE injects around each Q/K/V/O and FFN projection.

Per adapter it stores the indices the selected units own (output rows or input columns,
depending on the projection's role) and a dense fp32 delta over exactly those slices:

- role "rows": delta [k, in] (+ bias delta [k]); y[..., idx] += x @ delta.T
- role "cols": delta [out, k];                 y += x[..., idx] @ delta.T

so trainable parameters, optimizer state and the saved artifact scale with the selection.

Successive requests stack adapters, and each active adapter costs its own matmul in every
forward. While ``unlearn()`` trains one adapter, the others are constants: *folding* them
(:meth:`MAPELayer.fold`) precomputes W + their scattered deltas once, so the forward costs one
matmul however many requests came before (fp32/fp64 weights only: in bf16, W + delta would round
the small deltas away).

Two temporary modes serve the statistics passes, and neither changes the forward values:
- *gates*: on the input of a "cols" projection (attention output / FFN down), the input is
  multiplied by a per-example gate of ones, shape [batch, units]. Its gradient is the
  per-example mask gradient dl/dm_u = sum_tokens <a_u, dl/da_u> (SPEC §2). Multiplying by 1.0
  is exact in IEEE arithmetic, so outputs are bit-identical.
- *recording*: the adapter's delta input and update are kept, so one backward pass of the
  summed per-example losses yields every example's own delta gradient (g_b^T x_b).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .architectures import ROLE_ROWS, projection_features


class MAPELayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("mape_delta", "mape_bias")
    other_param_names = ("mape_index",)

    def __init__(self, base_layer: nn.Module, role: str, gated_units: Optional[int] = None, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.gated_units = gated_units
        self.in_features, self.out_features = projection_features(base_layer)
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        self.mape_delta = nn.ParameterDict()
        self.mape_bias = nn.ParameterDict()
        self.mape_index = BufferDict(persistent=True)
        self.merged_adapters: list[str] = []
        self._merge_backups: list = []  # per merged adapter, the base slices it overwrote (see merge)
        self._disable_adapters = False
        self._gate: Optional[torch.Tensor] = None
        # adapter -> [(input the delta multiplies, update)] while per-example gradients are formed.
        self._recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Adapters skipped in the forward while a reference (original) output is computed.
        self.muted_adapters: frozenset[str] = frozenset()
        # (names, weight [out, in], bias) while adapters are folded into one weight, see fold().
        self._folded: Optional[tuple[frozenset, torch.Tensor, Optional[torch.Tensor]]] = None

    # ----------------------------------------------------------------- adapter storage
    def update_layer(self, adapter_name: str, index: Optional[torch.Tensor]) -> None:
        """Allocate a zero delta for ``adapter_name`` over ``index`` (or drop it when empty)."""
        self.remove_adapter_storage(adapter_name)
        if index is None or index.numel() == 0:
            return
        weight = self.get_base_layer().weight
        # Deltas are fp32 even for half-precision models (fp64 models keep fp64).
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        index = index.to(device=weight.device, dtype=torch.long)
        k = index.numel()
        if self.role == ROLE_ROWS:
            shape = (k, self.in_features)
            if self.get_base_layer().bias is not None:
                self.mape_bias[adapter_name] = nn.Parameter(torch.zeros(k, device=weight.device, dtype=dtype))
        else:
            shape = (self.out_features, k)
        self.mape_delta[adapter_name] = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=dtype))
        self.mape_index[adapter_name] = index

    def remove_adapter_storage(self, adapter_name: str) -> None:
        for store in (self.mape_delta, self.mape_bias, self.mape_index):
            if adapter_name in store:
                del store[adapter_name]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [store[adapter_name] for store in (self.mape_delta, self.mape_bias) if adapter_name in store]

    # ----------------------------------------------------------------- statistics modes
    def open_gate(self, batch_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Start gating the input with ones [batch, units]; returns the gate (requires grad)."""
        self._gate = torch.ones(batch_size, self.gated_units, dtype=dtype, device=device, requires_grad=True)
        return self._gate

    def close_gate(self) -> None:
        self._gate = None

    def record_delta_inputs(self, adapter_name: str) -> None:
        """Start recording, at every forward, the input this adapter's delta multiplies and the
        update it adds (see :meth:`add_squared_example_gradients`)."""
        self._recorded[adapter_name] = []

    def recorded_updates(self, adapter_name: str) -> list[torch.Tensor]:
        """The updates recorded since :meth:`record_delta_inputs`: differentiate the loss w.r.t. these."""
        return [update for _, update in self._recorded[adapter_name]]

    def add_squared_example_gradients(self, adapter_name: str, update_grads, totals) -> None:
        """Add sum over examples of the squared per-example gradient of the delta (and bias
        delta) of ``adapter_name`` into ``totals``, from d loss / d update for each recorded
        update (in :meth:`recorded_updates` order).

        The update is x D^T (rows and columns alike), so example b's gradient is g_b^T x_b over
        its tokens: one small matmul per example, squared into the total at once. The forward and
        backward keep their ordinary cost, and no [batch, *D.shape] tensor is formed (that
        tensor and its squared sum over the batch cost several times more).
        """
        records = [(x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1]))
                   for (x, _), g in zip(self._recorded[adapter_name], update_grads)]
        if not records:  # the forward never reached this layer: its gradients are zero
            return
        with_bias = adapter_name in self.mape_bias
        for b in range(records[0][0].shape[0]):
            grad = sum(g[b].T @ x[b] for x, g in records)
            totals[0].addcmul_(grad, grad)
            if with_bias:
                bias_grad = sum(g[b].sum(0) for _, g in records)
                totals[1].addcmul_(bias_grad, bias_grad)

    def stop_recording(self) -> None:
        self._recorded = {}

    # ----------------------------------------------------------------- folded adapters
    def fold(self, adapter_names) -> frozenset:
        """Precompute the base weight plus the deltas of ``adapter_names`` (held constant until
        :meth:`unfold`); the forward then applies them in one matmul. Returns the names folded:
        none for half-precision weights or when this layer holds no delta of them."""
        self.unfold()
        base = self.get_base_layer()
        names = frozenset(n for n in adapter_names if n in self.mape_delta)
        if not names or not self._is_plain() or base.weight.dtype not in (torch.float32, torch.float64):
            return frozenset()
        with torch.no_grad():  # fp32/fp64 weights hold deltas of their own dtype (update_layer)
            weight, bias = self._dense_weight(sorted(names), None, None)
        self._folded = (names, weight, bias)
        return names

    def unfold(self) -> None:
        self._folded = None

    def _folded_adapters(self) -> frozenset:
        """Names whose deltas the folded weight applies now (none if any of them is muted or inactive)."""
        if self._folded is None:
            return frozenset()
        names = self._folded[0]
        if names & self.muted_adapters or not names <= set(self.active_adapters):
            return frozenset()
        return names

    # ----------------------------------------------------------------- forward
    def _apply_gate(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._gate
        if gate.shape[0] != x.shape[0]:
            raise RuntimeError(f"gate batch {gate.shape[0]} does not match input batch {x.shape[0]}")
        units = self.gated_units
        view = gate.view(gate.shape[0], *([1] * (x.dim() - 2)), units, 1)
        return (x.unflatten(-1, (units, x.shape[-1] // units)) * view).flatten(-2)

    def _delta_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        index = self.mape_index[adapter_name]
        delta = self.mape_delta[adapter_name]
        bias = self.mape_bias[adapter_name] if adapter_name in self.mape_bias else None
        xd = x.to(delta.dtype)
        if self.role != ROLE_ROWS:
            xd = xd.index_select(-1, index)
        update = xd @ delta.T
        if bias is not None:
            update = update + bias
        if adapter_name in self._recorded:
            self._recorded[adapter_name].append((xd.detach(), update))
        if self.role == ROLE_ROWS:
            return result.index_add(-1, index, update.to(result.dtype))
        return result + update.to(result.dtype)

    def _is_plain(self) -> bool:
        """The base layer computes exactly x W^T + b (nn.Linear or transformers' Conv1D)."""
        base = self.get_base_layer()
        return type(base) is nn.Linear or type(base).__name__ == "Conv1D"

    def _covers_whole_weight(self, adapter_name: str) -> bool:
        """The adapter's delta spans every row (or column) of this projection, in the weight's
        dtype, and is not being recorded for per-example gradients: see :meth:`forward`."""
        axis_size = self.out_features if self.role == ROLE_ROWS else self.in_features
        return (self.mape_index[adapter_name].numel() == axis_size and adapter_name not in self._recorded
                and self.mape_delta[adapter_name].dtype == self.get_base_layer().weight.dtype and self._is_plain())

    def _dense_weight(self, names, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
        """(W + deltas of ``names``, b + their bias deltas); differentiable in the deltas."""
        base = self.get_base_layer()
        if weight is None:
            weight = base.weight.T if self.is_conv1d else base.weight
            bias = base.bias
        axis = 0 if self.role == ROLE_ROWS else 1
        for name in names:
            weight = weight.index_add(axis, self.mape_index[name], self.mape_delta[name])
            if name in self.mape_bias:
                bias = bias.index_add(0, self.mape_index[name], self.mape_bias[name])
        return weight, bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._gate is not None:
            x = self._apply_gate(x)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        folded = self._folded_adapters()
        pending = [name for name in self.active_adapters
                   if name in self.mape_delta and name not in self.muted_adapters and name not in folded]
        # A delta over the whole weight (selection="all": the full-parameter baselines) is added
        # to W before one matmul: x (W + D)^T costs one matmul forward and two backward, against
        # two and three for x W^T + x D^T. Smaller deltas keep their own matmul over the selected
        # slices, which is cheaper than materialising W + D and its full gradient.
        dense = [name for name in pending if self._covers_whole_weight(name)]
        weight, bias = self._folded[1:] if folded else (None, None)
        if dense:
            weight, bias = self._dense_weight(dense, weight, bias)
        if weight is not None:
            result = nn.functional.linear(x, weight, bias)
        else:
            result = self.base_layer(x, *args, **kwargs)
        for name in pending:
            if name not in dense:
                result = self._delta_output(x, result, name)
        return result

    # ----------------------------------------------------------------- merging
    def _weight_delta(self, adapter_name: str, sign: float) -> None:
        base = self.get_base_layer()
        index = self.mape_index[adapter_name]
        delta = self.mape_delta[adapter_name].detach() * sign
        weight = base.weight.data
        # nn.Linear stores [out, in]: rows are axis 0. Conv1D stores [in, out]: everything transposed.
        axis = 0 if self.role == ROLE_ROWS else 1
        if self.is_conv1d:
            axis, delta = 1 - axis, delta.T
        weight.index_add_(axis, index, delta.to(weight.dtype))
        if adapter_name in self.mape_bias:
            bias = self.mape_bias[adapter_name].detach() * sign
            base.bias.data.index_add_(0, index, bias.to(base.bias.dtype))

    def owned_base_slices(self, adapter_name: str, count: Optional[int] = None):
        """[(tensor, axis, copy of its slices)] of the base weight and bias at the indices
        ``adapter_name`` owns (the first ``count`` of them; default all), in storage layout."""
        base = self.get_base_layer()
        index = self.mape_index[adapter_name][:count]
        axis = 0 if self.role == ROLE_ROWS else 1
        if self.is_conv1d:
            axis = 1 - axis
        # index_select allocates: the slices are copies
        saved = [(base.weight.data, axis, base.weight.data.index_select(axis, index))]
        if adapter_name in self.mape_bias:
            saved.append((base.bias.data, 0, base.bias.data.index_select(0, index)))
        return saved

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.mape_delta:
                continue
            # The owned slices before the merge: unmerging restores them exactly (subtracting the
            # delta again would leave float rounding in the base weights), and safe_merge puts
            # them back when the merged weight or bias is not finite.
            saved = self.owned_base_slices(name)
            self._weight_delta(name, 1.0)
            if safe_merge and not all(torch.isfinite(t.index_select(axis, self.mape_index[name])).all()
                                      for t, axis, _ in saved):
                self._restore_slices(name, saved)
                raise ValueError(f"NaNs detected in the merged weights or bias; adapter {name} seems broken "
                                 "(the base layer was left unchanged)")
            self._merge_backups.append(saved)
            self.merged_adapters.append(name)

    def _restore_slices(self, adapter_name: str, saved) -> None:
        index = self.mape_index[adapter_name]
        for tensor, axis, values in saved:
            tensor.index_copy_(axis, index, values)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            saved = self._merge_backups.pop()
            if name in self.mape_delta:
                self._restore_slices(name, saved)

    def __repr__(self) -> str:
        return "mape." + super().__repr__()
