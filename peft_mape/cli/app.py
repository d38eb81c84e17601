"""The ``peft-mape`` command (also ``python -m peft_mape``): unlearn, evaluate, inspect, edit.

    peft-mape unlearn  --model DIR --forget FILE [--retain FILE] [--holdout FILE] [--test FILE] --out DIR
    peft-mape evaluate --model DIR [--adapter DIR] --forget FILE --test FILE [--out FILE]
    peft-mape inspect  ADAPTER [--plot selection.png]
    peft-mape edit     --model DIR --adapter LORA_DIR --train FILE (--remove FILE | --correct OLD NEW |
                       --modify OLD NEW) --out DIR

Data files are CSV, JSON or JSON Lines, read with ``datasets``. Sequence classifiers read a text
and a label column; causal LMs a text column (every token scored) or question + answer columns
(the answer scored). Errors are one line on stderr, ``peft-mape: error: ...``, with exit status 1
(2 for bad command-line usage); set ``PEFT_MAPE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from ..common.distributed import is_main_process
from .edit import add_edit_command
from .shared import (
    PROG, CLIError, Parser, compute_metrics, data_options, load_inputs, one_line, pad_id, print_metrics,
)

SELECTION_CHOICES = ("search", "all", "random")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..tuner.config import OBJECTIVE_CHOICES
    from ..unlearning import DEFAULT_METHOD, METHODS

    parser = Parser(prog=PROG, description="Machine unlearning for HuggingFace models with MAPE-Unlearn "
                                            "(module-aware parameter-efficient unlearning).",
                     epilog="Run 'peft-mape COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = data_options()

    p = commands.add_parser(
        "unlearn", parents=[data], help="erase a forget set into a MAPE adapter (+ audit report)",
        description="Erase the influence of the forget set from a fine-tuned model: search the heads and "
                    "filters that carry it, update only their parameters, and save the result as a PEFT "
                    "adapter in --out together with audit_report.json (a fingerprint of the forget set, "
                    "never its contents).")
    p.add_argument("--model", required=True, metavar="DIR", help="the fine-tuned model (save_pretrained directory)")
    p.add_argument("--forget", required=True, metavar="FILE", help="examples to erase (.csv, .json, .jsonl)")
    p.add_argument("--retain", metavar="FILE", help="a sample of the remaining training data (needed by graddiff, so)")
    p.add_argument("--holdout", metavar="FILE",
                   help="data the model never saw: loop methods stop once the forget loss reaches its loss")
    p.add_argument("--test", metavar="FILE",
                   help="held-out test data: metrics before/after (accuracy, MIA AUCs) go into the audit report")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="update rule (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.9, metavar="S",
                   help="fraction of heads/filters left frozen, 0 < s < 1 (default: %(default)s)")
    p.add_argument("--units", choices=("heads", "filters", "both"), default="both",
                   help="unit types that may be selected (default: %(default)s)")
    p.add_argument("--selection", choices=SELECTION_CHOICES, default="search",
                   help="'search' (MAPE), 'all' (full-parameter baseline) or 'random' units at the same "
                        "sparsity (default: %(default)s)")
    p.add_argument("--objective", choices=OBJECTIVE_CHOICES,
                   help="mask-search objective (default: the config's, mlr)")
    p.add_argument("--lr", type=float, help="learning rate of loop methods (default: the method's)")
    p.add_argument("--max-steps", type=int, metavar="N", help="step budget of loop methods (default: 300 with a stopping target, 100 without)")
    p.add_argument("--forget-loss-target", type=float, metavar="LOSS", help="stop target instead of --holdout")
    p.add_argument("--retain-weight", type=float, metavar="W",
                   help="weight of the retain loss of graddiff / npo (default: the method's, 1.0)")
    p.add_argument("--npo-beta", type=float, metavar="BETA", help="NPO's beta (default: the library's, 0.1)")
    p.add_argument("--kl-weight", type=float, metavar="W",
                   help="weight of a KL-to-original retain term (default: none)")
    p.add_argument("--num-train-examples", type=int, metavar="N",
                   help="size of the original training set (so/influence step scale 1/N)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: %(default)s)")
    p.add_argument("--request-id", metavar="ID", help="an identifier recorded in the audit report")
    p.set_defaults(handler=cmd_unlearn)

    p = commands.add_parser(
        "evaluate", parents=[data], help="forget/test metrics and membership-inference AUCs",
        description="Measure a model (optionally with an adapter) on the forget and test sets: accuracy and "
                    "loss (classification) or loss and perplexity (causal LM), and membership-inference "
                    "ROC-AUCs of forget vs test examples (LOSS, confidence, entropy; LOSS, zlib, Min-K%%). "
                    "Prints the metrics and writes them as JSON.")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model (save_pretrained directory)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT adapter to apply (MAPE, LoRA, ...)")
    p.add_argument("--forget", required=True, metavar="FILE", help="the forget set")
    p.add_argument("--test", required=True, metavar="FILE", help="held-out data (the non-members of the attacks)")
    p.add_argument("--retain", metavar="FILE", help="optional retain data, also measured")
    p.add_argument("--min-k", type=float, default=0.2, metavar="K", help="Min-K%% fraction (default: %(default)s)")
    p.add_argument("--out", metavar="FILE",
                   help="metrics JSON (default: ADAPTER/eval_metrics.json, or ./eval_metrics.json without --adapter)")
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser(
        "inspect", help="show which heads and filters an adapter selected, per layer",
        description="Print the selection of a saved MAPE adapter per layer (from adapter_config.json; totals "
                    "from audit_report.json or the base model's config.json) and optionally plot it.")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    p.add_argument("--plot", metavar="PNG", help="write a heads x layers heatmap and filters-per-layer bars here")
    p.add_argument("--base-model", metavar="DIR", help="base model directory, for the per-layer totals")
    p.set_defaults(handler=cmd_inspect)
    add_edit_command(commands, data)
    return parser


# --------------------------------------------------------------------------- commands


def cmd_unlearn(args) -> int:
    from peft import get_peft_model

    from ..reporting.audit import build_audit_report, save_audit_report
    from ..tuner.config import MAPEConfig
    from ..reporting.inspection import architecture_sizes

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    config = MAPEConfig(sparsity=args.sparsity, units=args.units)  # invalid values fail before any loading
    files = {"forget": args.forget, "retain": args.retain, "holdout": args.holdout, "test": args.test}
    task, model, tokenizer, data = load_inputs(args, files)
    progress = not args.quiet
    pad = pad_id(model, tokenizer)
    if model.config.pad_token_id is None:  # unlearn() pads input ids with the config's pad id
        model.config.pad_token_id = pad
    peft_model = get_peft_model(model, config)
    before = compute_metrics(task, peft_model, data, batch_size=args.batch_size, pad=pad, progress=progress) \
        if args.test else None
    # Options the user gave; one the chosen method does not have is an error naming its options.
    optional = {"lr": args.lr, "max_steps": args.max_steps, "forget_loss_target": args.forget_loss_target,
                "num_train_examples": args.num_train_examples, "beta": args.npo_beta,
                "retain_weight": args.retain_weight, "kl_weight": args.kl_weight, "objective": args.objective}
    with warnings.catch_warnings():
        # unlearn() records its warnings in the report; they are printed below as notes, once
        warnings.simplefilter("ignore", UserWarning)
        report = peft_model.unlearn(
            data["forget"][0], data["retain"][0] if args.retain else None, method=args.method,
            holdout=data["holdout"][0] if args.holdout else None,
            selection=None if args.selection == "search" else args.selection, batch_size=args.batch_size,
            seed=args.seed, progress=progress,
            **{k: v for k, v in optional.items() if v is not None},
        )
    after = compute_metrics(task, peft_model, data, batch_size=args.batch_size, pad=pad, progress=progress) \
        if args.test else None
    if not is_main_process():  # under torchrun every rank holds the same adapter: one writes it
        return 0
    peft_model.save_pretrained(str(out))
    audit = build_audit_report(report, data["forget"][0], model=peft_model, model_id=str(args.model),
                               architecture=architecture_sizes(peft_model), metrics_before=before,
                               metrics_after=after, request_id=args.request_id)
    audit_path = save_audit_report(audit, out)
    print(report.summary())
    for note in report.warnings:
        print(f"  note: {note}")
    if after is not None:
        print("metrics (before -> after):")
        print_metrics(after, before)
    print(f"adapter: {out}")
    print(f"audit report: {audit_path}")
    return 0


def cmd_evaluate(args) -> int:
    from ..reporting.inspection import read_adapter_config

    if args.adapter is not None:
        read_adapter_config(args.adapter)  # a clear error before the model is loaded
    if not 0.0 < args.min_k <= 1.0:
        raise CLIError(f"--min-k must be in (0, 1], got {args.min_k}")
    files = {"forget": args.forget, "test": args.test, "retain": args.retain}
    task, model, tokenizer, data = load_inputs(args, files)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    metrics = compute_metrics(task, model, data, batch_size=args.batch_size, pad=pad_id(model, tokenizer),
                       progress=not args.quiet, min_k=args.min_k)
    out = Path(args.out) if args.out else (Path(args.adapter) if args.adapter else Path.cwd()) / "eval_metrics.json"
    result = {"model": str(args.model), "adapter": args.adapter, "task": task,
              "num_examples": {name: len(ds) for name, (ds, _) in data.items()}, "metrics": metrics}
    if task == "causal-lm":
        result["min_k"] = args.min_k
    if not is_main_process():
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{task} metrics of {args.model}" + (f" + {args.adapter}" if args.adapter else "") + ":")
    print_metrics(metrics)
    print(f"written to {out}")
    return 0


def _sizes_for(adapter: Path, adapter_config: dict, base_model) -> dict:
    """Per-layer totals: from the audit report, else the base model's config.json, else unknown."""
    from ..reporting.audit import AUDIT_FILE, load_audit_report
    from ..reporting.inspection import sizes_from_config
    from .loading import model_config

    if (adapter / AUDIT_FILE).is_file():
        selection = load_audit_report(adapter).get("selection") or {}
        if selection.get("heads_per_layer"):
            return {"num_layers": selection.get("num_layers"), "num_heads": selection.get("heads_per_layer"),
                    "num_filters": selection.get("filters_per_layer")}
    base = base_model or adapter_config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        return sizes_from_config(model_config(base))
    if base_model:
        raise CLIError(f"--base-model {base_model} has no config.json")
    return {}


def cmd_inspect(args) -> int:
    from ..reporting.audit import AUDIT_FILE, load_audit_report
    from ..reporting.inspection import format_selection, read_adapter_config, selection_summary

    adapter = Path(args.adapter)
    config = read_adapter_config(adapter)
    peft_type = config.get("peft_type")
    if peft_type != "MAPE":
        raise CLIError(f"{adapter} holds a {peft_type} adapter; inspect shows the selections of MAPE adapters")
    summary = selection_summary(config.get("selection"), **_sizes_for(adapter, config, args.base_model))
    print(f"MAPE adapter {adapter}: sparsity {config.get('sparsity')}, units {config.get('units')}, "
          f"update scope {config.get('update_scope')}")
    if (adapter / AUDIT_FILE).is_file():
        audit = load_audit_report(adapter)
        forget = audit.get("forget_set") or {}
        print(f"request: method {audit.get('method')}, {forget.get('num_examples')} forget examples "
              f"(fingerprint {str(forget.get('fingerprint'))[:16]}...), guarantee {audit.get('guarantee')}")
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        print(f"adapter weights: {weights.stat().st_size / 2**20:.2f} MB")
    if not config.get("selection"):
        print("no units selected (the request made no update)")
    print(format_selection(summary))
    if args.plot:
        from ..reporting.plots import plot_selection

        path = plot_selection(summary, args.plot, title=f"{adapter.name}: selected units")
        print(f"plot: {path}")
    return 0


# --------------------------------------------------------------------------- entry point

# Errors that mean "bad input or environment", reported as one line.
EXPECTED_ERRORS = (CLIError, ValueError, TypeError, KeyError, OSError, ImportError, FloatingPointError)


@contextlib.contextmanager
def _library_output(quiet: bool, debug: bool):
    """Quiet the libraries' deprecation chatter (and progress bars with --quiet); restore afterwards."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            transformers.logging.set_verbosity_error()
        if quiet:
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)
            datasets.enable_progress_bars() if bars[0] else datasets.disable_progress_bars()
            if bars[1]:
                transformers.utils.logging.enable_progress_bar()
            else:
                transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(os.environ.get("PEFT_MAPE_DEBUG"))
    try:
        with _library_output(getattr(args, "quiet", False), debug):
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # an unexpected failure: still one line, the type says where to look
        if debug:
            raise
        print(f"{PROG}: error: unexpected {type(error).__name__}: {one_line(error)} "
              "(set PEFT_MAPE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
