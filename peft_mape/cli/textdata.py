"""Text tables (CSV / JSON / JSON Lines) -> model-ready ``datasets.Dataset``s, for the CLI.

``load_table`` reads a file through ``datasets.load_dataset``; the ``encode_*`` functions
tokenise it for a sequence classifier (text + label columns) or a causal LM (a text column,
every token scored; or question + answer columns, the answer scored and the prompt labelled
-100, via :mod:`peft_mape.common.causal_lm`). Each returns the encoded dataset and the scored texts
(for the zlib membership attack). Problems are ``ValueError``s naming the file and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import datasets

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
TOKENIZE_CHUNK = 1000  # texts per tokenizer call (a progress-bar step)


def load_table(path) -> "datasets.Dataset":
    """A ``datasets.Dataset`` of the rows of a .csv, .json (list of objects or JSON Lines) or .jsonl file."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type '{path.suffix}'; use one of {sorted(BUILDERS)}")
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # pyarrow / json parse errors come in many types
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path}: cannot read it as {builder.upper()}: {message}") from None
    if len(table) == 0:
        raise ValueError(f"{path}: the file has no rows")
    return table


def require_columns(table, path, *columns: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(repr(c) for c in missing)}; "
                         f"the file has {table.column_names} (choose with --text-column / --label-column / "
                         "--question-column / --answer-column)")


def tokenize_texts(tokenizer, texts: list[str], *, max_length: int, desc: str = "tokenize",
                   progress: bool = False) -> dict[str, list]:
    """Truncated token ids (and masks) of ``texts``, in chunks with a progress bar."""
    from tqdm.auto import tqdm

    columns: dict[str, list] = {}
    starts = range(0, len(texts), TOKENIZE_CHUNK)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        encoded = tokenizer(texts[start:start + TOKENIZE_CHUNK], truncation=True, max_length=max_length)
        for key in MODEL_COLUMNS:
            if key in encoded:
                columns.setdefault(key, []).extend(encoded[key])
    return columns


def _labels(values, path, label2id: Optional[dict], num_labels: Optional[int]) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            if not label2id or value not in label2id:
                raise ValueError(f"{path}: label {value!r} is not one of the model's labels "
                                 f"{sorted(label2id or {})}")
            out.append(int(label2id[value]))
            continue
        try:
            label = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: label {value!r} is neither an integer nor a label name") from None
        if num_labels is not None and not 0 <= label < num_labels:
            raise ValueError(f"{path}: label {label} is out of range for a model with {num_labels} labels")
        out.append(label)
    return out


def encode_classification(table, tokenizer, *, path="data", text_column: str = "text", label_column: str = "label",
                          max_length: int = 128, label2id: Optional[dict] = None,
                          num_labels: Optional[int] = None, progress: bool = False):
    """Tokenised (truncated to ``max_length``) examples with integer ``labels``; returns (dataset, texts).

    Labels may be integers or the model's label names (``config.label2id``).
    """
    require_columns(table, path, text_column, label_column)
    texts = [str(t) for t in table[text_column]]
    labels = _labels(table[label_column], path, label2id, num_labels)
    columns = tokenize_texts(tokenizer, texts, max_length=max_length, desc=f"tokenize {path}", progress=progress)
    columns["labels"] = labels
    import datasets

    return datasets.Dataset.from_dict(columns), texts


def encode_causal_lm(table, tokenizer, *, path="data", text_column: Optional[str] = "text",
                     question_column: Optional[str] = None, answer_column: Optional[str] = None,
                     max_length: int = 128, progress: bool = False):
    """Causal-LM examples; returns (dataset, scored texts).

    With ``question_column`` and ``answer_column``: prompt + answer, only the answer scored
    (labels -100 on the prompt), built by :func:`peft_mape.common.causal_lm.build_qa_dataset`.
    Otherwise every token of ``text_column`` is scored (labels = input ids).
    """
    import datasets

    if (question_column is None) != (answer_column is None):
        raise ValueError("give both --question-column and --answer-column, or neither")
    if question_column is not None:
        from ..common.causal_lm import build_qa_dataset

        require_columns(table, path, question_column, answer_column)
        questions = [str(q) for q in table[question_column]]
        answers = [str(a) for a in table[answer_column]]
        return build_qa_dataset(tokenizer, questions, answers, max_length=max_length), answers
    require_columns(table, path, text_column)
    texts = [str(t) for t in table[text_column]]
    encoded = tokenize_texts(tokenizer, texts, max_length=max_length, desc=f"tokenize {path}", progress=progress)
    if any(len(ids) < 2 for ids in encoded["input_ids"]):
        raise ValueError(f"{path}: a text has fewer than 2 tokens; a causal LM needs a token to predict from a prefix")
    columns = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}
    columns["labels"] = [list(ids) for ids in encoded["input_ids"]]
    return datasets.Dataset.from_dict(columns), texts
