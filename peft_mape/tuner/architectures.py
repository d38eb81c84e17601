"""Where the units of a Transformer live, and which parameter slices each unit owns (SPEC §2).

A *unit* is an attention head or an FFN filter (intermediate neuron). Heads are gated at the
input of the attention output projection (split into H contiguous blocks), filters at the
input of the FFN down projection. A selected unit owns:

- head h: rows of Q, K, V producing it (GQA: K/V head h // (H / H_kv), updatable when any query
  head of its group is selected) and the columns of the output projection consuming it;
- filter j: row j of the up (and gate) projection and column j of the down projection.

With ``update_scope="output_side"`` only the output/down projection columns are owned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ROLE_ROWS = "rows"  # the unit owns output rows of this projection
ROLE_COLS = "cols"  # the unit owns input columns of this projection (and is gated there)

ARCH_FIELDS = (
    "layers_path", "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj",
    "up_proj", "gate_proj", "down_proj",
)

_BERT_LIKE = dict(
    layers_path="encoder.layer", q_proj="attention.self.query", k_proj="attention.self.key",
    v_proj="attention.self.value", o_proj="attention.output.dense",
    up_proj="intermediate.dense", down_proj="output.dense",
)
_LLAMA_LIKE = dict(
    layers_path="layers", q_proj="self_attn.q_proj", k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj", o_proj="self_attn.o_proj", up_proj="mlp.up_proj",
    gate_proj="mlp.gate_proj", down_proj="mlp.down_proj",
)
DEFAULT_ARCHITECTURES: dict[str, dict] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "distilbert": dict(
        layers_path="transformer.layer", q_proj="attention.q_lin", k_proj="attention.k_lin",
        v_proj="attention.v_lin", o_proj="attention.out_lin", up_proj="ffn.lin1", down_proj="ffn.lin2",
    ),
    "gpt2": dict(
        layers_path="h", qkv_proj="attn.c_attn", o_proj="attn.c_proj",
        up_proj="mlp.c_fc", down_proj="mlp.c_proj",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "vit": dict(
        layers_path="layers", q_proj="attention.q_proj", k_proj="attention.k_proj",
        v_proj="attention.v_proj", o_proj="attention.o_proj", up_proj="mlp.fc1", down_proj="mlp.fc2",
    ),
}
# Config attribute names that hold the number of (key/value) heads, by family.
_HEAD_ATTRS = ("num_attention_heads", "n_head", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads",)


@dataclass(frozen=True)
class BlockModules:
    """Full module names of the projections of one Transformer block."""

    index: int
    q_proj: Optional[str]
    k_proj: Optional[str]
    v_proj: Optional[str]
    qkv_proj: Optional[str]
    o_proj: str
    up_proj: str
    gate_proj: Optional[str]
    down_proj: str


@dataclass(frozen=True)
class Architecture:
    """The resolved unit structure of a model."""

    model_type: str
    blocks: tuple[BlockModules, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_filters: int

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def roles(self) -> dict[str, tuple[str, Optional[int]]]:
        """Module name -> (role, number of gated units on its input or None)."""
        out = {}
        for b in self.blocks:
            for name in (b.q_proj, b.k_proj, b.v_proj, b.qkv_proj, b.up_proj, b.gate_proj):
                if name:
                    out[name] = (ROLE_ROWS, None)
            out[b.o_proj] = (ROLE_COLS, self.num_heads)
            out[b.down_proj] = (ROLE_COLS, self.num_filters)
        return out

    def target_regex(self) -> str:
        return "^(?:" + "|".join(re.escape(n) for n in sorted(self.roles())) + ")$"


def _model_config(model: nn.Module):
    return getattr(model, "config", None)


def resolve_architecture(model: nn.Module, peft_config) -> Architecture:
    """Find the blocks and unit counts of ``model``, using ``peft_config`` overrides first."""
    hf_config = _model_config(model)
    model_type = getattr(hf_config, "model_type", None) or type(model).__name__
    spec = dict(DEFAULT_ARCHITECTURES.get(model_type, {}))
    for name in ARCH_FIELDS:
        value = getattr(peft_config, name, None)
        if value is not None:
            spec[name] = value
    needed = ("layers_path", "o_proj", "up_proj", "down_proj")
    missing = [n for n in needed if not spec.get(n)]
    if not (spec.get("qkv_proj") or all(spec.get(n) for n in ("q_proj", "k_proj", "v_proj"))):
        missing.append("q_proj/k_proj/v_proj (or qkv_proj)")
    if missing:
        raise ValueError(
            f"MAPE does not know the model type '{model_type}'. Supported: "
            f"{sorted(DEFAULT_ARCHITECTURES)}. For another Transformer set these MAPEConfig fields: "
            f"{', '.join(missing)} (module names relative to a block, e.g. "
            "MAPEConfig(layers_path='model.layers', q_proj='self_attn.q_proj', ..., "
            "o_proj='self_attn.o_proj', up_proj='mlp.up_proj', down_proj='mlp.down_proj', "
            "num_attention_heads=...))"
        )
    layers_name = _find_layers(model, spec["layers_path"], model_type)
    layers = model.get_submodule(layers_name)
    named = dict(model.named_modules())
    blocks = []
    for i in range(len(layers)):
        full = {}
        for role in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "up_proj", "gate_proj", "down_proj"):
            rel = spec.get(role)
            if not rel:
                full[role] = None
                continue
            name = f"{layers_name}.{i}.{rel}"
            if name not in named:
                raise ValueError(
                    f"model type '{model_type}': block {i} has no module '{rel}' (looked for '{name}'); "
                    f"set MAPEConfig.{role} to the right name relative to a block"
                )
            full[role] = name
        blocks.append(BlockModules(index=i, **full))
    num_heads = _config_int(hf_config, peft_config, "num_attention_heads", _HEAD_ATTRS, model_type)
    num_kv = getattr(peft_config, "num_key_value_heads", None) or next(
        (getattr(hf_config, a) for a in _KV_HEAD_ATTRS if getattr(hf_config, a, None)), num_heads
    )
    o_in, _ = projection_features(named[blocks[0].o_proj])
    down_in, _ = projection_features(named[blocks[0].down_proj])
    if o_in % num_heads:
        raise ValueError(f"num_attention_heads={num_heads} does not divide the output projection's input size {o_in}")
    if num_heads % num_kv:
        raise ValueError(f"num_attention_heads={num_heads} query heads cannot be grouped over "
                         f"num_key_value_heads={num_kv}")
    return Architecture(model_type, tuple(blocks), num_heads, int(num_kv), o_in // num_heads, down_in)


def _find_layers(model: nn.Module, path: str, model_type: str) -> str:
    """The full name of the block ModuleList: ``path`` itself or the module ending with it."""
    candidates = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and (n == path or n.endswith("." + path))
    ]
    if not candidates:
        raise ValueError(
            f"model type '{model_type}': no ModuleList named '{path}' was found; set MAPEConfig.layers_path"
        )
    return min(candidates, key=len)


def _config_int(hf_config, peft_config, field_name, attrs, model_type) -> int:
    value = getattr(peft_config, field_name, None)
    if value:
        return int(value)
    for attr in attrs:
        if getattr(hf_config, attr, None):
            return int(getattr(hf_config, attr))
    raise ValueError(f"model type '{model_type}': cannot read the number of heads; set MAPEConfig.{field_name}")


def projection_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (wrapped or not)."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0], weight.shape[1]  # Conv1D stores [in, out]
    raise ValueError(f"MAPE can only wrap nn.Linear or Conv1D projections, got {type(module).__name__}")


def _blocks(indices, size: int) -> torch.Tensor:
    idx = torch.as_tensor(sorted(set(int(i) for i in indices)), dtype=torch.long)
    if idx.numel() == 0:
        return idx
    return (idx[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _as_index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise ValueError(f"selection: {what} must be an integer, got {value!r}")
    return int(value)


def selected_units(selection: dict, kind: str, num_layers: int, num_units: int) -> dict[int, list[int]]:
    """Layer -> sorted unit indices of ``selection[kind]`` ("heads" or "filters"), checked against
    the model: a clear ``ValueError`` naming the layer and the index instead of a silently ignored
    layer or an ``IndexError`` deep in the update."""
    if not isinstance(selection, dict) or set(selection) - {"heads", "filters"}:
        raise ValueError(f"selection must be a dict with keys 'heads' and/or 'filters', got {selection!r}")
    per_layer = selection.get(kind) or {}
    if not isinstance(per_layer, dict):
        raise ValueError(f"selection['{kind}'] must map layer -> list of indices, got {per_layer!r}")
    out = {}
    for layer_key, indices in per_layer.items():
        layer = _as_index(layer_key, f"{kind} layer")
        if not 0 <= layer < num_layers:
            raise ValueError(f"selection['{kind}']: layer {layer} out of range 0..{num_layers - 1}")
        if not isinstance(indices, (list, tuple)):
            raise ValueError(f"selection['{kind}'][{layer}] must be a list of indices, got {indices!r}")
        units = sorted({_as_index(i, f"{kind} index of layer {layer}") for i in indices})
        if units and (units[0] < 0 or units[-1] >= num_units):
            raise ValueError(f"selection['{kind}'][{layer}]: index out of range 0..{num_units - 1}: {units}")
        out[layer] = units
    return out


def owned_indices(arch: Architecture, selection: dict, update_scope: str = "unit") -> dict[str, torch.Tensor]:
    """Module name -> sorted indices (rows or columns, by the module's role) owned by the selection.

    ``selection`` is ``{"heads": {layer: [h, ...]}, "filters": {layer: [j, ...]}}`` with layer
    keys as ints or strings. Modules with nothing selected are absent from the result.
    """
    heads = selected_units(selection, "heads", arch.num_layers, arch.num_heads)
    filters = selected_units(selection, "filters", arch.num_layers, arch.num_filters)
    d, group = arch.head_dim, arch.num_heads // arch.num_kv_heads
    hidden_q, hidden_kv = arch.num_heads * d, arch.num_kv_heads * d
    out: dict[str, torch.Tensor] = {}

    def put(name, idx):
        if name and idx.numel():
            out[name] = idx

    for b in arch.blocks:
        sel_h = heads.get(b.index, [])
        put(b.o_proj, _blocks(sel_h, d))
        if update_scope == "unit" and sel_h:
            q_rows = _blocks(sel_h, d)
            kv_rows = _blocks({h // group for h in sel_h}, d)
            if b.qkv_proj:
                put(b.qkv_proj, torch.cat([q_rows, hidden_q + kv_rows, hidden_q + hidden_kv + kv_rows]))
            else:
                put(b.q_proj, q_rows)
                put(b.k_proj, kv_rows)
                put(b.v_proj, kv_rows)
        sel_f = torch.as_tensor(filters.get(b.index, []), dtype=torch.long)
        put(b.down_proj, sel_f)
        if update_scope == "unit":
            put(b.up_proj, sel_f)
            put(b.gate_proj, sel_f)
    return out


def unit_param_counts(arch: Architecture, named_modules: dict[str, nn.Module], update_scope: str) -> dict[str, int]:
    """Parameters owned by one head and by one filter (for param-weighted sparsity accounting)."""
    b = arch.blocks[0]
    o_in, o_out = projection_features(named_modules[b.o_proj])
    d_in, d_out = projection_features(named_modules[b.down_proj])
    head = arch.head_dim * o_out
    filt = d_out
    if update_scope == "unit":
        group = arch.num_heads // arch.num_kv_heads
        q_in = o_out  # q/k/v read the hidden state, whose width is the o_proj output width
        head += arch.head_dim * (q_in + 1) * (1 + 2.0 / group)
        up_in, _ = projection_features(named_modules[b.up_proj])
        filt += (up_in + 1) * (2 if b.gate_proj else 1)
    return {"heads": int(head), "filters": int(filt)}

