"""What the ``peft-mape`` commands share: one-line errors, the data and model options, loading
and encoding the data files, metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

PROG = "peft-mape"


class CLIError(Exception):
    """A problem with the user's input, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return text or type(error).__name__


def data_options() -> argparse.ArgumentParser:
    """Options shared by the commands that read data files and a model."""
    parent = Parser(add_help=False)
    group = parent.add_argument_group("data and model options")
    group.add_argument("--task", choices=("classification", "causal-lm"),
                       help="model task (default: from the architectures in the model's config.json)")
    group.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    group.add_argument("--text-column", default="text", metavar="NAME", help="text column (default: %(default)s)")
    group.add_argument("--label-column", default="label", metavar="NAME",
                       help="label column of classification data, integers or the model's label names "
                            "(default: %(default)s)")
    group.add_argument("--question-column", metavar="NAME",
                       help="causal LMs: question column; with --answer-column only the answer is scored")
    group.add_argument("--answer-column", metavar="NAME", help="causal LMs: answer column")
    group.add_argument("--max-length", type=int, default=128, metavar="N",
                       help="truncate examples to N tokens (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=16, metavar="N", help="batch size (default: %(default)s)")
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    return parent



def setup_torch(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_files(**paths) -> None:
    """Fail on a missing input before anything slow happens."""
    for what, path in paths.items():
        if path is not None and not Path(path).is_file():
            raise CLIError(f"--{what} file not found: {path}")


def text_columns(args, task) -> tuple[str, ...]:
    if task == "classification":
        return args.text_column, args.label_column
    if (args.question_column is None) != (args.answer_column is None):
        raise CLIError("give both --question-column and --answer-column, or neither")
    return (args.question_column, args.answer_column) if args.question_column else (args.text_column,)


def encode_table(args, task, tokenizer, model, table, path):
    """(dataset, scored texts) of one data table."""
    from .textdata import encode_causal_lm, encode_classification

    if task == "classification":
        config = model.config
        return encode_classification(table, tokenizer, path=path, text_column=args.text_column,
                                     label_column=args.label_column, max_length=args.max_length,
                                     label2id=getattr(config, "label2id", None),
                                     num_labels=getattr(config, "num_labels", None), progress=not args.quiet)
    return encode_causal_lm(table, tokenizer, path=path, text_column=args.text_column,
                            question_column=args.question_column, answer_column=args.answer_column,
                            max_length=args.max_length, progress=not args.quiet)


def load_inputs(args, files: dict):
    """Task, model, tokenizer and the encoded data files (name -> (dataset, texts)).

    Files and columns are checked before the model is loaded, so input mistakes fail fast.
    """
    from .loading import detect_task, load_model, load_tokenizer, model_config
    from .textdata import load_table, require_columns

    check_files(**files)
    task = detect_task(model_config(args.model), args.task)
    tables = {name: load_table(path) for name, path in files.items() if path is not None}
    for name, table in tables.items():
        require_columns(table, files[name], *text_columns(args, task))
    device = setup_torch(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, task, device)
    data = {name: encode_table(args, task, tokenizer, model, table, files[name]) for name, table in tables.items()}
    return task, model, tokenizer, data


def pad_id(model, tokenizer) -> int:
    return getattr(model.config, "pad_token_id", None) or getattr(tokenizer, "pad_token_id", None) or 0


def compute_metrics(task, model, data, *, batch_size, pad, progress, min_k=0.2) -> dict:
    from ..common.data import forward_arguments, make_loader, materialise
    from ..evaluation import classification_metrics, language_model_metrics

    allowed = forward_arguments(model)
    loaders = {name: make_loader(materialise(ds, allowed, what=name), batch_size, pad)
               for name, (ds, _) in data.items() if name in ("forget", "test", "retain")}
    if task == "classification":
        return classification_metrics(model, loaders["forget"], loaders["test"], loaders.get("retain"),
                                      progress=progress)
    return language_model_metrics(model, loaders["forget"], loaders["test"], data["forget"][1], data["test"][1],
                                  loaders.get("retain"), k=min_k, progress=progress)


def print_metrics(metrics: dict, before: dict | None = None) -> None:
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        if before is not None and key in before:
            print(f"  {key:<{width}}  {before[key]:.4f} -> {value:.4f}")
        else:
            print(f"  {key:<{width}}  {value:.4f}")
