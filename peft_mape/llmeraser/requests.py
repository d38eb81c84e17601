"""The three LLMEraser requests, and their model-ready (old, new) example lists.

Each request changes the training set the adapter was fitted on:

- :class:`InstanceRemoval` ``(examples)``: the examples z leave it (z -> nothing);
- :class:`QueryModification` ``(old, new)``: example i's input changes, its target stays;
- :class:`ResponseCorrection` ``(old, new)``: example i's target changes, its input stays.

``examples`` / ``old`` / ``new`` take any format ``unlearn()`` accepts (a ``datasets.Dataset``,
a torch ``Dataset`` or list of model-ready dicts, a ``DataLoader`` of dict batches); ``old[i]``
and ``new[i]`` are the same training example before and after the change. For a modification or
correction, the part that must not change is checked (the class label or the answer tokens of a
query modification, the inputs or the prompt tokens of a response correction), so that a request
that swapped its lists, or mislaid an example, is refused before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..common.data import Example, materialise, validate_examples


@dataclass
class InstanceRemoval:
    """Delete ``examples`` from the training set."""

    examples: Any
    kind: ClassVar[str] = "instance_removal"


@dataclass
class QueryModification:
    """The inputs of ``old[i]`` become those of ``new[i]``; the targets stay."""

    old: Any
    new: Any
    kind: ClassVar[str] = "query_modification"


@dataclass
class ResponseCorrection:
    """The targets of ``old[i]`` become those of ``new[i]``; the inputs stay."""

    old: Any
    new: Any
    kind: ClassVar[str] = "response_correction"


REQUEST_TYPES = (InstanceRemoval, QueryModification, ResponseCorrection)


@dataclass
class PreparedRequest:
    """One request as model-ready lists: ``old`` leave the training set, ``new`` join it."""

    kind: str
    old: list[Example]
    new: list[Example]


def _prompt_tokens(example: Example) -> torch.Tensor:
    """The attended input tokens a causal-LM example is not scored on (labels == -100)."""
    unscored = example["labels"] == -100
    if "attention_mask" in example:
        unscored &= example["attention_mask"].bool()
    return example["input_ids"][unscored]


def _answer_tokens(example: Example) -> torch.Tensor:
    """The tokens a causal-LM example is scored on (labels != -100)."""
    labels = example["labels"]
    return labels[labels != -100]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _check_pair(kind: str, position: int, old: Example, new: Example) -> None:
    sequence_labels = old["labels"].dim() >= 1 and "input_ids" in old and old["labels"].shape == old["input_ids"].shape
    if kind == QueryModification.kind:
        kept = _answer_tokens if sequence_labels else (lambda e: e["labels"])
        what = "answer tokens (labels != -100)" if sequence_labels else "labels"
    else:
        if sequence_labels:
            kept, what = _prompt_tokens, "prompt tokens (input_ids where labels == -100)"
        else:
            inputs = sorted(k for k in old if k != "labels")

            def kept(e):
                return torch.cat([e[k].reshape(-1).double() for k in inputs]) if inputs else torch.empty(0)

            what = f"inputs ({', '.join(inputs)})"
    if not _same(kept(old), kept(new)):
        verb = "keeps the targets" if kind == QueryModification.kind else "keeps the inputs"
        raise ValueError(f"{kind} pair {position}: old and new differ in their {what}; a {kind.replace('_', ' ')} "
                         f"{verb} and changes only the other side (check that old[i] and new[i] are the same "
                         "example, in the same order)")


def prepare_request(request, allowed: set[str], model: torch.nn.Module) -> PreparedRequest:
    """Validate ``request`` and turn it into model-ready lists; a clear error names what is wrong."""
    if not isinstance(request, REQUEST_TYPES):
        raise TypeError(f"request: expected one of {[t.__name__ for t in REQUEST_TYPES]} (or a list of them), "
                        f"got {type(request).__name__}")
    if isinstance(request, InstanceRemoval):
        old = materialise(request.examples, allowed, what="InstanceRemoval.examples")
        validate_examples(old, "InstanceRemoval.examples", needs_labels=True, model=model)
        return PreparedRequest(request.kind, old, [])
    name = type(request).__name__
    old = materialise(request.old, allowed, what=f"{name}.old")
    new = materialise(request.new, allowed, what=f"{name}.new")
    validate_examples(old, f"{name}.old", needs_labels=True, model=model)
    validate_examples(new, f"{name}.new", needs_labels=True, model=model)
    if len(old) != len(new):
        raise ValueError(f"{name}: old has {len(old)} examples and new has {len(new)}; they must be aligned "
                         "(new[i] replaces old[i])")
    for position, (a, b) in enumerate(zip(old, new)):
        _check_pair(request.kind, position, a, b)
    return PreparedRequest(request.kind, old, new)
