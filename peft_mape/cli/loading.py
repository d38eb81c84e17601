"""Load a saved transformers model (directory) for the CLI: its task, the model, its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..common.files import read_json

TASKS = ("classification", "causal-lm")
# transformers architecture class-name endings, by task
_TASK_SUFFIXES = {"classification": ("ForSequenceClassification",),
                  "causal-lm": ("ForCausalLM", "LMHeadModel")}


def model_config(model_dir) -> dict:
    """The model directory's ``config.json``; a clear error when it is not a saved model."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return read_json(path / "config.json", f"{path} has no config.json: not a saved transformers model "
                                           "(save_pretrained)")


def detect_task(config: dict, task: Optional[str] = None) -> str:
    """``task`` if given, else the task of the config's ``architectures`` (classification / causal-lm)."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
        return task
    architectures = config.get("architectures") or []
    for name, suffixes in _TASK_SUFFIXES.items():
        if any(a.endswith(suffixes) for a in architectures):
            return name
    raise ValueError(f"cannot tell the task from the model's architectures {architectures}; "
                     f"pass --task ({' or '.join(TASKS)})")


def load_model(model_dir, task: str, device: str = "cpu"):
    """The model with its task head, in evaluation mode, on ``device``."""
    import transformers as T

    auto = T.AutoModelForSequenceClassification if task == "classification" else T.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load {model_dir} as a {task} model: {_first_line(error)}") from None
    return model.to(device).eval()


def load_tokenizer(model_dir):
    import transformers as T

    try:
        return T.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot load a tokenizer from {model_dir} (pass --tokenizer DIR): {_first_line(error)}") \
            from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
