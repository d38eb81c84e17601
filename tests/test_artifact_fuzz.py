"""Fuzzing the adapter loader: a corrupted artifact is refused clearly, or it loads as the original.

An unlearned tiny BERT / GPT-2 adapter is saved once; each case applies one kind of seeded random
corruption to a *copy* of the saved folder and loads it with ``PeftModel.from_pretrained``. The
only acceptable outcomes are

- an exception of a clear kind (ValueError, KeyError, RuntimeError, OSError, TypeError,
  safetensors' SafetensorError) with a non-empty message that, for an invalid config field,
  names the field; or
- a model whose logits equal the uncorrupted adapter's exactly and whose recorded selection and
  delta indices are the original ones (the corruption was harmless, e.g. a flipped byte in
  whitespace).

A silently different model, a bare IndexError/AttributeError, or a model that loads and then fails
in its forward pass is a failure. Each case reports every seed that failed, one line each.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from peft_mape import MAPEConfig, MAPELayer
from peft_mape.common.data import pad_collate

from conftest import CAUSAL, tiny_examples, tiny_model

KINDS = ("bert", "gpt2")
SEEDS = 40
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CLEAR_ERRORS = (ValueError, KeyError, RuntimeError, OSError, TypeError, SafetensorError)


# ----------------------------------------------------------------------------- the saved artifact
@dataclass
class Artifact:
    kind: str
    folder: Path
    base: torch.nn.Module  # pristine, never wrapped: deep-copied for every load
    inputs: dict
    expected: torch.Tensor
    config: dict  # adapter_config.json as saved
    tensors: dict  # adapter_model.safetensors as saved
    metadata: Optional[dict]
    header_len: int
    selection: str  # normalised selection
    indices: dict  # layer name -> saved index of "default"
    num_heads: int
    num_filters: int
    num_layers: int


def _load_base(kind, path):
    import transformers as T

    auto = T.AutoModelForCausalLM if kind in CAUSAL else T.AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_pretrained(path).eval()


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(**x).logits


def _normalised(selection) -> str:
    if not isinstance(selection, dict):
        return repr(selection)
    out = {}
    for unit, per_layer in selection.items():
        out[str(unit)] = {str(int(k)): sorted({int(i) for i in v}) for k, v in (per_layer or {}).items() if v}
    return json.dumps(out, sort_keys=True)


def _indices(model) -> dict:
    return {name: m.mape_index["default"].clone() for name, m in model.named_modules()
            if isinstance(m, MAPELayer) and "default" in m.mape_index}


@pytest.fixture(scope="module", params=KINDS)
def artifact(request, tmp_path_factory):
    kind = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"artifact-{kind}")
    tiny_model(kind).save_pretrained(root / "base")
    model = get_peft_model(_load_base(kind, root / "base"), MAPEConfig(sparsity=0.5))
    model.unlearn(tiny_examples(kind, 3), tiny_examples(kind, 8, seed=3), method="ga", max_steps=3, lr=5e-2,
                  progress=False)
    x = {k: v for k, v in pad_collate(tiny_examples(kind, 4, seed=21, vary_length=False)).items() if k != "labels"}
    expected = _logits(model, x)
    folder = root / "adapter"
    model.save_pretrained(folder)
    base = _load_base(kind, root / "base")
    assert not torch.equal(expected, _logits(base, x)), "the request changed nothing"
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert torch.equal(_logits(reloaded, x), expected), "the uncorrupted adapter does not reload exactly"
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        metadata = f.metadata()
    raw = (folder / WEIGHTS).read_bytes()
    cfg = base.config
    yield Artifact(
        kind=kind, folder=folder, base=base, inputs=x, expected=expected,
        config=json.loads((folder / CONFIG).read_text()), tensors=load_file(folder / WEIGHTS), metadata=metadata,
        header_len=struct.unpack("<Q", raw[:8])[0], selection=_normalised(model.peft_config["default"].selection),
        indices=_indices(model),
        num_heads=getattr(cfg, "num_attention_heads", None) or cfg.n_head,
        num_filters=getattr(cfg, "intermediate_size", None) or cfg.n_inner,
        num_layers=getattr(cfg, "num_hidden_layers", None) or cfg.n_layer,
    )
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the judge
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def _judge(art: Artifact, folder: Path, what: str, field: Optional[str], must_load: bool) -> Optional[str]:
    """None when the outcome is acceptable, else one line saying what went wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(copy.deepcopy(art.base), folder)
    except CLEAR_ERRORS as error:
        message = _first_line(error)
        if must_load:
            return f"{what}: a harmless rewrite was refused: {type(error).__name__}: {message}"
        if not message or message in ("''", '""'):
            return f"{what}: {type(error).__name__} with an empty message"
        if field is not None and field.lower() not in str(error).lower():
            return f"{what}: {type(error).__name__} does not name the field {field!r}: {message}"
        return None
    except Exception as error:  # noqa: BLE001 - any other kind is the finding
        return f"{what}: unclear {type(error).__name__}: {_first_line(error)}"
    try:
        logits = _logits(model, art.inputs)
    except Exception as error:  # noqa: BLE001
        return f"{what}: loaded, then forward raised {type(error).__name__}: {_first_line(error)}"
    if logits.shape != art.expected.shape or not torch.equal(logits, art.expected):
        diff = (logits - art.expected).abs().max().item() if logits.shape == art.expected.shape else "shape"
        return f"{what}: loaded silently as a DIFFERENT model (max |logit diff| {diff})"
    selection = _normalised(model.peft_config["default"].selection)
    if selection != art.selection:
        return f"{what}: same logits, but the loaded config's selection {selection} is not the deltas' {art.selection}"
    indices = _indices(model)
    if indices.keys() != art.indices.keys() or any(not torch.equal(indices[k], art.indices[k]) for k in indices):
        return f"{what}: same logits, but the loaded delta indices differ from the saved selection's"
    return None


Corruption = Callable[[Artifact, Path, random.Random], str]


@dataclass
class Case:
    id: str
    corrupt: Corruption  # modifies the copy in place, returns a description (or (description, field))
    seeds: int = 1
    field: Optional[str] = None  # a config field the error message must name
    must_load: bool = False  # a harmless rewrite: loading must succeed with the same logits


def _run(art: Artifact, case: Case, tmp_path: Path):
    failures = []
    for seed in range(case.seeds):
        folder = tmp_path / f"{case.id}-{seed}"
        shutil.copytree(art.folder, folder)
        rng = random.Random(f"{case.id}/{art.kind}/{seed}")
        what, field = case.corrupt(art, folder, rng), case.field
        if isinstance(what, tuple):
            what, field = what
        failure = _judge(art, folder, f"[seed {seed}] {what}", field, case.must_load)
        if failure:
            failures.append(failure)
        shutil.rmtree(folder, ignore_errors=True)
    assert not failures, (f"{art.kind} / {case.id}: {len(failures)} of {case.seeds} corruptions handled wrongly:\n  "
                          + "\n  ".join(failures[:12]) + ("\n  ..." if len(failures) > 12 else ""))


# ----------------------------------------------------------------------------- config corruptions
def _edit_config(edit: Callable[[dict, Artifact, random.Random], str]) -> Corruption:
    def corrupt(art, folder, rng):
        cfg = json.loads((folder / CONFIG).read_text())
        what = edit(cfg, art, rng)
        (folder / CONFIG).write_text(json.dumps(cfg, indent=2))
        return what
    return corrupt


def _set(field, value) -> Callable:
    def edit(cfg, art, rng):
        cfg[field] = value
        return f"config {field} = {value!r}"
    return edit


def _set_selection(make: Callable[[dict, Artifact, random.Random], object], what: str) -> Callable:
    def edit(cfg, art, rng):
        cfg["selection"] = make(copy.deepcopy(cfg["selection"]), art, rng)
        return f"config selection {what}: {json.dumps(cfg['selection'])[:160]}"
    return edit


def _cfg_truncate(art, folder, rng):
    data = (folder / CONFIG).read_bytes()
    n = rng.randrange(0, len(data) - 1)
    (folder / CONFIG).write_bytes(data[:n])
    return f"config truncated to {n} of {len(data)} bytes"


def _cfg_flip(art, folder, rng):
    data = bytearray((folder / CONFIG).read_bytes())
    spots = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data))
        old = data[i]
        data[i] ^= rng.randint(1, 255)
        spots.append(f"@{i} {bytes([old])!r}->{bytes([data[i]])!r}")
    (folder / CONFIG).write_bytes(bytes(data))
    return "config bytes flipped " + ", ".join(spots)


def _cfg_delete_key(art, folder, rng):
    cfg = json.loads((folder / CONFIG).read_text())
    key = rng.choice(sorted(cfg))
    del cfg[key]
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2))
    return f"config key {key!r} deleted", key  # an error must name the missing key


def _cfg_reformat(art, folder, rng):
    cfg = json.loads((folder / CONFIG).read_text())
    keys = sorted(cfg)
    rng.shuffle(keys)
    (folder / CONFIG).write_text(json.dumps({k: cfg[k] for k in keys}, indent=rng.choice([None, 1, 4])))
    return "config re-written with other key order and indentation (same content)"


def _first_layer(sel, unit):
    return sorted(sel[unit], key=int)[0]


def _layer_out_of_range(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    sel[unit][str(art.num_layers + rng.randint(0, 5))] = [0]
    return sel


def _head_out_of_range(sel, art, rng):
    layer = _first_layer(sel, "heads")
    sel["heads"][layer] = sel["heads"][layer][:-1] + [art.num_heads + rng.randint(0, 3)]
    return sel


def _filter_out_of_range(sel, art, rng):
    layer = _first_layer(sel, "filters")
    sel["filters"][layer] = sel["filters"][layer][:-1] + [art.num_filters + rng.randint(0, 100)]
    return sel


def _negative_head(sel, art, rng):
    layer = _first_layer(sel, "heads")
    sel["heads"][layer] = [-1] + sel["heads"][layer][1:]
    return sel


def _negative_filter(sel, art, rng):
    layer = _first_layer(sel, "filters")
    sel["filters"][layer] = [-rng.randint(1, art.num_filters)] + sel["filters"][layer][1:]
    return sel


def _negative_layer(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    layer = _first_layer(sel, unit)
    sel[unit]["-1"] = sel[unit].pop(layer)
    return sel


def _string_index(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    layer = _first_layer(sel, unit)
    sel[unit][layer] = [rng.choice(["a", "one", "", "0x1"])] + sel[unit][layer][1:]
    return sel


def _string_layer(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    sel[unit]["layer-zero"] = sel[unit].pop(_first_layer(sel, unit))
    return sel


def _duplicate_index(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    layer = _first_layer(sel, unit)
    sel[unit][layer] = sel[unit][layer] + sel[unit][layer][:1]
    return sel


def _swap_ids(unit: str):
    """Same number of units per layer, but some other ones: the tensors no longer match the config."""
    def make(sel, art, rng):
        total = art.num_heads if unit == "heads" else art.num_filters
        layers = [k for k, v in sel[unit].items() if v and len(v) < total]
        layer = rng.choice(sorted(layers))
        chosen = set(sel[unit][layer])
        out_ = rng.choice(sorted(chosen))
        in_ = rng.choice(sorted(set(range(total)) - chosen))
        sel[unit][layer] = sorted((chosen - {out_}) | {in_})
        return sel
    return make


def _swap_layers(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    keys = sorted(sel[unit], key=int)
    if len(keys) >= 2 and sel[unit][keys[0]] != sel[unit][keys[1]]:
        sel[unit][keys[0]], sel[unit][keys[1]] = sel[unit][keys[1]], sel[unit][keys[0]]
    else:  # move one layer's units to another layer
        sel[unit][str((int(keys[0]) + 1) % art.num_layers)] = sel[unit].pop(keys[0])
    return sel


def _drop_unit_type(sel, art, rng):
    del sel[rng.choice(["heads", "filters"])]
    return sel


def _drop_layer(sel, art, rng):
    unit = rng.choice(["heads", "filters"])
    del sel[unit][_first_layer(sel, unit)]
    return sel


CONFIG_CASES = [
    Case("config-truncated", _cfg_truncate, SEEDS),
    Case("config-byte-flips", _cfg_flip, SEEDS),
    Case("config-key-deleted", _cfg_delete_key, SEEDS),
    Case("config-reformatted", _cfg_reformat, 3, must_load=True),
    Case("config-empty-file", lambda a, f, r: ((f / CONFIG).write_bytes(b""), "config emptied")[1]),
    Case("config-missing", lambda a, f, r: ((f / CONFIG).unlink(), "config deleted")[1]),
    Case("config-not-an-object", lambda a, f, r: ((f / CONFIG).write_text("[1, 2, 3]"), "config is a list")[1]),
    Case("config-sparsity-abc", _edit_config(_set("sparsity", "abc")), field="sparsity"),
    Case("config-sparsity-2.0", _edit_config(_set("sparsity", 2.0)), field="sparsity"),
    Case("config-sparsity-neg", _edit_config(_set("sparsity", -1)), field="sparsity"),
    Case("config-sparsity-null", _edit_config(_set("sparsity", None)), field="sparsity"),
    Case("config-units-nope", _edit_config(_set("units", "nope")), field="units"),
    Case("config-units-int", _edit_config(_set("units", 3)), field="units"),
    Case("config-update_scope-3", _edit_config(_set("update_scope", 3)), field="update_scope"),
    Case("config-update_scope-nope", _edit_config(_set("update_scope", "nope")), field="update_scope"),
    Case("config-update_scope-other-valid", _edit_config(_set("update_scope", "output_side"))),
    Case("config-objective-nope", _edit_config(_set("objective", "nope")), field="objective"),
    Case("config-accounting-nope", _edit_config(_set("sparsity_accounting", 7)), field="sparsity_accounting"),
    Case("config-rearrangement-neg", _edit_config(_set("rearrangement_rounds", -2)), field="rearrangement_rounds"),
    Case("config-rearrangement-str", _edit_config(_set("rearrangement_rounds", "x")), field="rearrangement_rounds"),
    Case("config-max_retain-zero", _edit_config(_set("max_retain_examples", 0)), field="max_retain_examples"),
    Case("config-num_heads-wrong", _edit_config(_set("num_attention_heads", 3)), field="num_attention_heads"),
    Case("config-peft_type-unknown", _edit_config(_set("peft_type", "NOPE"))),  # PEFT's own lookup
    Case("config-selection-null", _edit_config(_set("selection", None)), field="selection"),
    Case("config-selection-empty", _edit_config(_set("selection", {})), field="selection"),
    Case("config-selection-list", _edit_config(_set("selection", [1, 2])), field="selection"),
    Case("config-selection-string", _edit_config(_set("selection", "heads")), field="selection"),
    Case("config-selection-layer-out-of-range", _edit_config(_set_selection(_layer_out_of_range, "layer out of range")),
         5, field="selection"),
    Case("config-selection-head-out-of-range", _edit_config(_set_selection(_head_out_of_range, "head out of range")),
         4, field="selection"),
    Case("config-selection-filter-out-of-range",
         _edit_config(_set_selection(_filter_out_of_range, "filter out of range")), 4, field="selection"),
    Case("config-selection-negative-head", _edit_config(_set_selection(_negative_head, "negative head")),
         field="selection"),
    Case("config-selection-negative-filter", _edit_config(_set_selection(_negative_filter, "negative filter")), 4,
         field="selection"),
    Case("config-selection-negative-layer", _edit_config(_set_selection(_negative_layer, "negative layer")), 4,
         field="selection"),
    Case("config-selection-string-index", _edit_config(_set_selection(_string_index, "string index")), 6,
         field="selection"),
    Case("config-selection-string-layer", _edit_config(_set_selection(_string_layer, "string layer")), 4,
         field="selection"),
    Case("config-selection-duplicate-index", _edit_config(_set_selection(_duplicate_index, "duplicate")), 4),
    Case("config-selection-swapped-heads", _edit_config(_set_selection(_swap_ids("heads"), "other heads")), 10),
    Case("config-selection-swapped-filters", _edit_config(_set_selection(_swap_ids("filters"), "other filters")), 10),
    Case("config-selection-swapped-layers", _edit_config(_set_selection(_swap_layers, "units on other layers")), 4),
    Case("config-selection-unit-type-dropped", _edit_config(_set_selection(_drop_unit_type, "unit type dropped")), 4),
    Case("config-selection-layer-dropped", _edit_config(_set_selection(_drop_layer, "layer dropped")), 4),
]


# ----------------------------------------------------------------------------- weights corruptions
def _resave(art: Artifact, folder: Path, tensors: dict) -> None:
    save_file(tensors, str(folder / WEIGHTS), metadata=art.metadata)


def _w_truncate(art, folder, rng):
    data = (folder / WEIGHTS).read_bytes()
    n = rng.randrange(0, len(data) - 1)
    (folder / WEIGHTS).write_bytes(data[:n])
    return f"weights truncated to {n} of {len(data)} bytes"


def _flip_in(start_of: Callable[[Artifact, int], tuple[int, int]], label: str) -> Corruption:
    def corrupt(art, folder, rng):
        data = bytearray((folder / WEIGHTS).read_bytes())
        lo, hi = start_of(art, len(data))
        spots = []
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(lo, hi)
            old = data[i]
            data[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randint(1, 255)
            spots.append(f"@{i} {old:#04x}->{data[i]:#04x}")
        (folder / WEIGHTS).write_bytes(bytes(data))
        return f"weights {label} bytes flipped " + ", ".join(spots)
    return corrupt


def _tensor_name(art, rng, pattern=""):
    return rng.choice(sorted(k for k in art.tensors if pattern in k))


def _w_delete(art, folder, rng):
    tensors = dict(art.tensors)
    name = _tensor_name(art, rng)
    del tensors[name]
    _resave(art, folder, tensors)
    return f"weights tensor {name} deleted"


def _w_extra(art, folder, rng):
    tensors = dict(art.tensors)
    donor = _tensor_name(art, rng, "mape_delta")
    module = donor.rsplit(".", 1)[0]
    name = rng.choice([
        module + ".mape_extra",
        module.replace(".0.", f".{art.num_layers + 1}.") + ".mape_delta",
        "base_model.model.lm_head.mape_delta" if art.kind in CAUSAL else "base_model.model.classifier.mape_delta",
        module.rsplit(".", 1)[0] + ".mape_delta",
    ])
    if name in tensors:
        name = module + ".mape_extra"
    tensors[name] = tensors[donor].clone()
    _resave(art, folder, tensors)
    return f"weights: extra tensor {name} (copy of {donor})"


def _w_dtype(art, folder, rng):
    tensors = dict(art.tensors)
    name = _tensor_name(art, rng)
    old = tensors[name].dtype
    new = rng.choice([d for d in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                                  torch.float32) if d != old])
    tensors[name] = tensors[name].to(new)
    _resave(art, folder, tensors)
    return f"weights tensor {name} {old} -> {new}"


def _w_shape(art, folder, rng):
    tensors = dict(art.tensors)
    name = _tensor_name(art, rng)
    t = tensors[name]
    how = rng.choice(["transpose", "drop-last", "add-row", "flatten", "scalar"])
    if how == "transpose" and t.dim() == 2 and t.shape[0] != t.shape[1]:
        t = t.T.contiguous()
    elif how == "drop-last" and t.shape[0] > 1:
        t = t[:-1].clone()
    elif how == "add-row":
        t = torch.cat([t, t[:1]])
    elif how == "scalar":
        t = t.reshape(-1)[:1].reshape(()).clone()
    else:
        how = "flatten" if t.dim() == 2 else "unsqueeze"
        t = t.reshape(-1).clone() if t.dim() == 2 else t.unsqueeze(0).clone()
    tensors[name] = t
    _resave(art, folder, tensors)
    return f"weights tensor {name} {tuple(art.tensors[name].shape)} -> {tuple(t.shape)} ({how})"


def _w_nonfinite(value):
    def corrupt(art, folder, rng):
        tensors = dict(art.tensors)
        name = _tensor_name(art, rng, rng.choice(["mape_delta", "mape_bias"]))
        t = tensors[name].clone()
        i = rng.randrange(t.numel())
        t.view(-1)[i] = value
        tensors[name] = t
        _resave(art, folder, tensors)
        return f"weights tensor {name}[{i}] = {value}"
    return corrupt


def _w_scaled(art, folder, rng):
    """A well-formed file with other delta values (e.g. another request's) under this config."""
    tensors = dict(art.tensors)
    name = _tensor_name(art, rng, "mape_delta")
    tensors[name] = tensors[name] * rng.choice([-1.0, 0.5, 2.0])
    _resave(art, folder, tensors)
    return f"weights tensor {name} rescaled"


def _w_index_changed(art, folder, rng):
    """The saved index disagrees with the config's selection (still in range, no duplicates)."""
    tensors = dict(art.tensors)
    name = _tensor_name(art, rng, "mape_index")
    index = tensors[name].clone()
    free = sorted(set(range(int(index.max()) + 1)) - set(index.tolist()))
    i = rng.randrange(index.numel())
    index[i] = rng.choice(free) if free else int(index.max()) + 1
    tensors[name] = index.sort().values
    _resave(art, folder, tensors)
    return f"weights tensor {name}: one index changed, its delta unchanged"


def _w_resave(art, folder, rng):
    _resave(art, folder, dict(art.tensors))
    return "weights re-saved unchanged"


def _header(art, size):
    return 8, 8 + art.header_len


def _data(art, size):
    return 8 + art.header_len, size


WEIGHTS_CASES = [
    Case("weights-truncated", _w_truncate, SEEDS),
    Case("weights-length-prefix-flips", _flip_in(lambda a, s: (0, 8), "length-prefix"), SEEDS),
    Case("weights-header-flips", _flip_in(_header, "header"), SEEDS),
    Case("weights-data-flips", _flip_in(_data, "data"), SEEDS),
    Case("weights-tensor-deleted", _w_delete, 10),
    Case("weights-extra-tensor", _w_extra, 10),
    Case("weights-dtype-changed", _w_dtype, 10),
    Case("weights-shape-changed", _w_shape, 10),
    Case("weights-nan", _w_nonfinite(float("nan")), 5),
    Case("weights-inf", _w_nonfinite(float("inf")), 5),
    Case("weights-values-changed", _w_scaled, 5),
    Case("weights-index-changed", _w_index_changed, 10),
    Case("weights-empty-file", lambda a, f, r: ((f / WEIGHTS).write_bytes(b""), "weights emptied")[1]),
    Case("weights-missing", lambda a, f, r: ((f / WEIGHTS).unlink(), "weights deleted")[1]),
    Case("weights-no-tensors", lambda a, f, r: (_resave(a, f, {}), "weights file without tensors")[1]),
    Case("weights-resaved-unchanged", _w_resave, 1, must_load=True),
    Case("copy-unchanged", lambda a, f, r: "plain copy", 1, must_load=True),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.id for c in CONFIG_CASES])
def test_corrupted_config(artifact, case, tmp_path, one_thread):
    _run(artifact, case, tmp_path)


@pytest.mark.parametrize("case", WEIGHTS_CASES, ids=[c.id for c in WEIGHTS_CASES])
def test_corrupted_weights(artifact, case, tmp_path, one_thread):
    _run(artifact, case, tmp_path)
