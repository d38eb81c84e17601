"""Turn user inputs into model-ready example lists, batches and per-example losses.

``forget``/``retain`` may be a ``datasets.Dataset``, a torch ``Dataset`` of model-ready dicts
or a ``DataLoader`` of dict batches. They are materialised as lists of per-example tensors
(the retain side capped at a seeded sample), so that duplicates can be found and batches
re-made with our own padding collator.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .lm_head import scored_token_log_probs, shifted_log_probs, unwrap

Example = dict[str, torch.Tensor]
# Fill values when padding variable-length sequences; labels use the loss ignore index.
PAD_VALUES = {"labels": -100, "attention_mask": 0}
FORWARD_ALIASES = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "labels"}


def forward_arguments(model: torch.nn.Module) -> set[str]:
    """Names the (base) model's forward accepts, to drop dataset columns such as ``text``."""
    base = unwrap(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return set(FORWARD_ALIASES)
    return set(params) | {"labels"}


def _as_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float, bool)):
        return torch.tensor(value)
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], str):
        return torch.as_tensor(value)
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
    except ImportError:  # numpy is a torch dependency, but stay safe
        pass
    return None


def _clean(example: dict, allowed: set[str]) -> Example:
    out = {}
    for key, value in example.items():
        if key not in allowed:
            continue
        tensor = _as_tensor(value)
        if tensor is not None:
            out[key] = tensor
    return out


def materialise(source, allowed: set[str], *, limit: Optional[int] = None, seed: int = 0, what: str) -> list[Example]:
    """List of per-example tensor dicts from a Dataset/DataLoader; at most ``limit`` (seeded sample)."""
    if source is None:
        return []
    if isinstance(source, DataLoader) or (not hasattr(source, "__getitem__") and hasattr(source, "__iter__")):
        examples = []
        for batch in source:
            if not isinstance(batch, dict):
                raise TypeError(f"{what}: a DataLoader must yield dict batches, got {type(batch).__name__}")
            rows = _split_batch(batch, allowed)
            examples.extend(rows)
            if limit is not None and len(examples) >= 4 * limit:
                break
        if limit is not None and len(examples) > limit:
            examples = random.Random(seed).sample(examples, limit)
        return examples
    if not hasattr(source, "__len__"):
        raise TypeError(f"{what}: expected a datasets.Dataset, a torch Dataset or a DataLoader, got {type(source).__name__}")
    indices = list(range(len(source)))
    if limit is not None and len(indices) > limit:
        indices = sorted(random.Random(seed).sample(indices, limit))
    examples = []
    for i in indices:
        item = source[i]
        if not isinstance(item, dict):
            raise TypeError(f"{what}: examples must be dicts of model inputs, got {type(item).__name__}")
        examples.append(_clean(item, allowed))
    return examples


def _split_batch(batch: dict, allowed: set[str]) -> list[Example]:
    tensors = {k: _as_tensor(v) for k, v in batch.items() if k in allowed}
    tensors = {k: v for k, v in tensors.items() if v is not None and v.dim() >= 1}
    if not tensors:
        return []
    size = next(iter(tensors.values())).shape[0]
    return [{k: v[i] for k, v in tensors.items()} for i in range(size)]


def value_ranges(model: torch.nn.Module) -> dict[str, tuple[int, int, str]]:
    """Field -> (lowest, highest, what the range is) of the integer inputs ``model`` can take:
    token ids within its vocabulary, class labels within its classifier's labels."""
    base = unwrap(model)
    ranges = {}
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(base, "config", None), "vocab_size", None)
    if vocab:
        ranges["input_ids"] = (0, int(vocab) - 1, f"the vocabulary (vocab size {vocab})")
        ranges["token labels"] = (0, int(vocab) - 1, f"the vocabulary (vocab size {vocab}) or -100 (ignored)")
    config = getattr(base, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels and num_labels > 1 and getattr(config, "problem_type", None) != "multi_label_classification":
        ranges["class labels"] = (0, int(num_labels) - 1, f"the classifier's labels (num_labels={num_labels})")
    return ranges


def check_value_ranges(examples: Sequence[Example], what: str, model: torch.nn.Module) -> None:
    """A clear error naming the example, the field, the value and the allowed range, instead of an
    ``IndexError`` from inside the forward pass."""
    ranges = value_ranges(model)
    for position, example in enumerate(examples):
        for key, value in example.items():
            if key == "input_ids":
                kind = "input_ids"
            elif key == "labels" and value.dim() == 0:
                kind = "class labels"
            elif key == "labels":
                kind = "token labels"
            else:
                continue
            if kind not in ranges or value.dtype.is_floating_point or value.numel() == 0:
                continue
            low, high, meaning = ranges[kind]
            values = value[value != -100] if kind == "token labels" else value
            bad = values[(values < low) | (values > high)]
            if bad.numel():
                raise ValueError(f"{what} example {position}: {key} value {int(bad.reshape(-1)[0])} is outside "
                                 f"{meaning}: allowed {low}..{high}")


def validate_examples(examples: Sequence[Example], what: str, needs_labels: bool,
                      model: Optional[torch.nn.Module] = None) -> None:
    if len(examples) == 0:
        raise ValueError(f"the {what} set is empty: unlearning needs at least one {what} example")
    keys = set(examples[0])
    if not ({"input_ids", "pixel_values", "inputs_embeds"} & keys):
        raise ValueError(
            f"{what} examples are not model-ready: found fields {sorted(keys)}; expected input_ids "
            "(+attention_mask, labels) or pixel_values (+labels). Tokenize the dataset first."
        )
    if needs_labels and "labels" not in keys:
        raise ValueError(
            f"{what} examples yield no loss: they have no 'labels' field (found {sorted(keys)}); "
            "add labels or pass loss_fn=..."
        )
    if model is not None:
        check_value_ranges(examples, what, model)


def fingerprint(example: Example) -> str:
    """Content hash of an example (keys, shapes and values), padding excluded."""
    digest = hashlib.sha256()
    mask = example.get("attention_mask")
    for key in sorted(example):
        value = example[key]
        if mask is not None and value.dim() >= 1 and value.shape[0] == mask.shape[0] and key != "attention_mask":
            value = value[mask.bool()]
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def set_fingerprint(example_fingerprints) -> str:
    """SHA-256 of the sorted per-example fingerprints: identifies a set of examples, reveals nothing."""
    return hashlib.sha256("".join(sorted(example_fingerprints)).encode()).hexdigest()


def drop_overlap(retain: list[Example], forget: list[Example]) -> list[Example]:
    """Remove from ``retain`` the examples identical to a forget example, with a warning."""
    forget_prints = {fingerprint(e) for e in forget}
    kept = [e for e in retain if fingerprint(e) not in forget_prints]
    if len(kept) != len(retain):
        warnings.warn(
            f"{len(retain) - len(kept)} retain example(s) are identical to forget examples; "
            "they were dropped from the retain set",
            UserWarning,
            stacklevel=3,
        )
    return kept


def pad_collate(examples: Sequence[Example], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack examples, right-padding 1-D sequences of unequal length."""
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
            continue
        if any(v.dim() != 1 for v in values):
            raise ValueError(f"cannot pad field '{key}': only 1-D sequences can be padded")
        fill = PAD_VALUES.get(key, pad_token_id if key == "input_ids" else 0)
        length = max(v.shape[0] for v in values)
        batch[key] = torch.stack([F.pad(v, (0, length - v.shape[0]), value=fill) for v in values])
    return batch


def make_loader(examples: list[Example], batch_size: int, pad_token_id: int = 0, shuffle: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda rows: pad_collate(rows, pad_token_id),
    )


# No-grad loss passes (report losses, early-stopping checks, the holdout target) need no
# activations for a backward pass, so they run in larger, length-sorted batches than the update.
MIN_EVAL_BATCH_SIZE = 32


def make_eval_loader(examples: list[Example], batch_size: int, pad_token_id: int = 0):
    """Batches for no-grad passes whose result is a mean (losses, accuracies): examples ordered
    by length, so each batch pads little. The order of results is not the input order."""
    def length(example: Example) -> int:
        ids = example.get("input_ids")
        return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() > 0 else 0

    return make_loader(sorted(examples, key=length), batch_size, pad_token_id)


def pad_token_id(model: torch.nn.Module) -> int:
    """The id that pads ``input_ids`` for ``model`` (its config's pad token, else 0)."""
    return getattr(getattr(model, "config", None), "pad_token_id", None) or 0


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


LossFn = Callable[[object, dict], torch.Tensor]


def scored_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Tokens each causal-LM example is scored on (shifted labels != -100); an error if any has none."""
    counts = (labels[:, 1:] != -100).sum(1)
    if (counts == 0).any():
        raise ValueError("some examples yield no loss: every label token is -100 (masked)")
    return counts


def default_per_example_loss(outputs, batch: dict) -> torch.Tensor:
    """Per-example loss consistent with the model's own ``outputs.loss``.

    Sequence-level logits [B, C]: cross-entropy (MSE when C == 1). Token-level logits [B, T, V]
    with token labels: causal-LM cross-entropy (labels shifted by one, -100 ignored) averaged
    over each example's own answer tokens. The sum over a batch is what one backward pass
    differentiates, so every example's gradient is its own (examples never interact).
    """
    logits = outputs.logits
    if logits.dtype in (torch.float16, torch.bfloat16):  # losses in at least fp32
        logits = logits.float()
    labels = batch["labels"]
    if logits.dim() == 2:
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="none")
        return F.cross_entropy(logits, labels.long(), reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        log_p, _ = shifted_log_probs(logits, labels)
        return -log_p.sum(1) / scored_token_counts(labels).to(log_p.dtype)
    raise ValueError(
        f"cannot derive per-example losses from logits of shape {tuple(logits.shape)} and labels of "
        f"shape {tuple(labels.shape)}; pass loss_fn(outputs, batch) -> tensor[batch]"
    )


def forward_with_losses(model, batch: dict, loss_fn: Optional[LossFn], *, need_outputs: bool = True):
    """Run the model on ``batch``; return its outputs and finite per-example losses [B].

    With the default loss and ``need_outputs=False``, a causal LM whose head allows it
    (:mod:`peft_mape.common.lm_head`) projects only the answer positions onto the vocabulary and
    returns ``None`` for the outputs; the losses are the same numbers.
    """
    outputs = None
    token_log_probs = scored_token_log_probs(model, batch) if loss_fn is None and not need_outputs else None
    if token_log_probs is not None:
        losses = -token_log_probs.sum(1) / scored_token_counts(batch["labels"])
    else:
        outputs = model(**batch)
        losses = (loss_fn or default_per_example_loss)(outputs, batch)
    batch_size = next(iter(batch.values())).shape[0]
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch_size,):
        raise ValueError(
            f"the loss function must return one loss per example (shape [{batch_size}]), got "
            f"{getattr(losses, 'shape', type(losses).__name__)}"
        )
    if not torch.isfinite(losses).all():
        raise FloatingPointError(f"non-finite loss (NaN or inf) on {int((~torch.isfinite(losses)).sum())} example(s)")
    return outputs, losses


def per_example_losses(model, batch: dict, loss_fn: Optional[LossFn]) -> torch.Tensor:
    """Run the model on ``batch`` and return finite per-example losses [B]."""
    return forward_with_losses(model, batch, loss_fn, need_outputs=False)[1]


def per_example_kl(reference_logits: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """KL(reference || current) of the output distributions, one value per example.

    Sequence-level logits [B, C]: the KL of the class distributions. Token-level logits
    [B, T, V]: the mean KL over the positions that carry a loss (shifted labels != -100), or
    over the attended positions when the batch has no token labels.
    """
    reference = F.log_softmax(reference_logits.float(), -1)
    current = F.log_softmax(logits.float(), -1)
    kl = (reference.exp() * (reference - current)).sum(-1)
    if kl.dim() == 1:
        return kl
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        kl, weight = kl[:, :-1], (labels[:, 1:] != -100)
    else:
        weight = batch.get("attention_mask", torch.ones(kl.shape, dtype=torch.bool, device=kl.device)).bool()
    weight = weight.to(kl.dtype)
    return (kl * weight).sum(1) / weight.sum(1).clamp_min(1.0)
