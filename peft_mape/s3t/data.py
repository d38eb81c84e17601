"""Tokenised examples held in memory, addressable by their stable id, batched with padding."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from .registry import normalize_id

MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
IGNORE_INDEX = -100  # label of a token that is not scored (prompt, padding), as in transformers


class ExampleStore:
    """Model inputs of a ``datasets.Dataset`` keyed by example id.

    Rows may have different lengths; batches are right-padded to their longest row
    (``pad_token_id`` for ``input_ids``, 0 elsewhere, so padding is always masked out).
    ``labels`` is one class per example (a [N] tensor) or, for causal LMs, one label per token
    (a list of [length] tensors, padded with -100 in batches so padding is never scored).
    """

    def __init__(self, ids: list, features: dict, labels, pad_token_id: int):
        self.ids = ids
        self.features = features
        self.labels = labels
        self.token_labels = isinstance(labels, list)
        self.pad_token_id = pad_token_id
        self.row_of = {example_id: row for row, example_id in enumerate(ids)}
        if len(self.row_of) != len(ids):
            duplicates = [i for i, count in Counter(ids).items() if count > 1]
            raise ValueError(f"example ids must be unique; duplicated: {duplicates[:10]}")

    @classmethod
    def from_dataset(cls, dataset, *, id_column: str, label_column: str, pad_token_id: int,
                     require_ids: bool = True, require_labels: bool = True,
                     token_labels: bool = False) -> "ExampleStore":
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            raise ValueError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
        if "input_ids" not in columns:
            raise ValueError(f"the dataset needs tokenised 'input_ids'; its columns are {columns}")
        if require_ids and id_column not in columns:
            raise ValueError(f"the dataset needs a stable id column {id_column!r}; its columns are {columns}")
        if require_labels and label_column not in columns:
            raise ValueError(f"the dataset needs a label column {label_column!r}; its columns are {columns}")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        ids = [normalize_id(i) for i in dataset[id_column]] if id_column in columns else list(range(len(dataset)))
        features = {
            name: [torch.as_tensor(row, dtype=torch.long) for row in dataset[name]]
            for name in MODEL_INPUT_COLUMNS if name in columns
        }
        labels = None
        if label_column in columns and token_labels:
            labels = [torch.as_tensor(row, dtype=torch.long) for row in dataset[label_column]]
            _check_token_labels(ids, features["input_ids"], labels, label_column)
        elif label_column in columns:
            labels = torch.as_tensor(list(dataset[label_column]), dtype=torch.long)
        return cls(ids, features, labels, pad_token_id)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence) -> list:
        missing = [i for i in ids if i not in self.row_of]
        if missing:
            raise KeyError(f"the dataset lacks example id(s) the registry needs: {missing[:10]}")
        return [self.row_of[i] for i in ids]

    def batch(self, rows: Sequence[int]) -> tuple:
        """(model inputs, labels or None) for ``rows``."""
        inputs = {}
        for name, column in self.features.items():
            pad = self.pad_token_id if name == "input_ids" else 0
            inputs[name] = _pad([column[r] for r in rows], pad)
        if self.labels is None:
            labels = None
        elif self.token_labels:
            labels = _pad([self.labels[r] for r in rows], IGNORE_INDEX)
        else:
            labels = self.labels[list(rows)]
        return inputs, labels

    def inference_batches(self, batch_size: int, *, with_labels: bool = False) -> list:
        """[(rows, inputs)] (``with_labels``: [(rows, inputs, labels)]) covering every row once,
        grouped by length so little is padded."""
        lengths = [len(row) for row in self.features["input_ids"]]
        order = sorted(range(len(self)), key=lambda r: lengths[r])
        groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        if with_labels:
            return [(rows, *self.batch(rows)) for rows in groups]
        return [(rows, self.batch(rows)[0]) for rows in groups]


def _check_token_labels(ids: list, input_ids: list, labels: list, label_column: str) -> None:
    """Every example needs one label per token and a scored token after the first position:
    label t is predicted from tokens < t, so the first token's label can never be scored, and an
    example with nothing scored would have no loss (its mean over zero tokens is undefined)."""
    for example_id, tokens, row in zip(ids, input_ids, labels):
        if len(row) != len(tokens):
            raise ValueError(
                f"example {example_id!r}: {label_column!r} holds {len(row)} labels for {len(tokens)} tokens; "
                "causal-LM labels need one per token (-100 where not scored)"
            )
        if not bool((row[1:] != IGNORE_INDEX).any()):
            raise ValueError(
                f"example {example_id!r}: no token to score (every label after the first token is -100); "
                "label the answer tokens with their ids"
            )


def _pad(rows: list, value: int) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
