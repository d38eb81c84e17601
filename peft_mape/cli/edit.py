"""``peft-mape edit``: an LLMEraser influence edit of a saved LoRA adapter, written to a new directory
with its audit report (guarantee "approximate")."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..common.distributed import is_main_process
from .shared import CLIError, check_files, load_inputs

CURVATURE_CHOICES = ("gauss-newton", "hessian", "kfac")
SOLVER_CHOICES = ("cg", "adam")


def add_edit_command(commands, data) -> None:
    p = commands.add_parser(
        "edit", parents=[data], help="influence edit of a LoRA adapter: remove, correct or modify training examples",
        description="Change a LoRA adapter as if it had been trained without some training examples "
                    "(--remove), with corrected targets (--correct OLD NEW) or with modified inputs "
                    "(--modify OLD NEW), by one influence step (LLMEraser), without retraining. Writes the "
                    "edited adapter and audit_report.json (fingerprints of the examples, never their "
                    "contents) to --out; the input adapter is not changed.")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the LoRA adapter (PEFT save_pretrained directory)")
    p.add_argument("--train", required=True, metavar="FILE",
                   help="the adapter's training data, or a sample of it (then give --num-train-examples)")
    request = p.add_mutually_exclusive_group(required=True)
    request.add_argument("--remove", metavar="FILE", help="training examples to remove")
    request.add_argument("--correct", nargs=2, metavar=("OLD", "NEW"),
                         help="training examples as trained (OLD) and with corrected targets (NEW), row by row")
    request.add_argument("--modify", nargs=2, metavar=("OLD", "NEW"),
                         help="training examples as trained (OLD) and with modified inputs (NEW), row by row")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of the edited adapter")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    p.add_argument("--num-train-examples", type=int, metavar="N",
                   help="size of the adapter's training set (default: the rows of --train)")
    p.add_argument("--damping", default="auto", metavar="LAMBDA",
                   help="damping of the curvature, a number or 'auto' (default: %(default)s)")
    p.add_argument("--curvature", choices=CURVATURE_CHOICES, default="gauss-newton",
                   help="curvature matrix (default: %(default)s)")
    p.add_argument("--solver", choices=SOLVER_CHOICES, default="cg", help="linear solver (default: %(default)s)")
    p.add_argument("--solver-steps", type=int, metavar="N", help="solver iterations (default: 10 CG, 100 Adam)")
    p.add_argument("--hessian-examples", type=int, metavar="N",
                   help="training examples behind the curvature (default: 64, 512 for kfac)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the training sample (default: %(default)s)")
    p.add_argument("--request-id", metavar="ID", help="an identifier recorded in the audit report")
    p.set_defaults(handler=cmd_edit)


def _damping(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise CLIError(f"--damping must be a number or 'auto', got {value!r}") from None


def cmd_edit(args) -> int:
    from peft import PeftModel

    from ..llmeraser import InstanceRemoval, QueryModification, ResponseCorrection, erase
    from ..reporting.audit import build_edit_audit_report, save_audit_report
    from ..reporting.inspection import read_adapter_config

    out = Path(args.out)
    if Path(args.adapter).resolve() == out.resolve():
        raise CLIError("--out must differ from --adapter: the input adapter is never changed")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    damping = _damping(args.damping)
    adapter_type = read_adapter_config(args.adapter).get("peft_type")
    if adapter_type != "LORA":
        raise CLIError(f"--adapter {args.adapter} is a {adapter_type} adapter; edit needs a LoRA adapter")
    if args.remove:
        kind, (old_file, new_file) = "remove", (args.remove, None)
    else:
        kind = "correct" if args.correct else "modify"
        old_file, new_file = args.correct or args.modify
    check_files(train=args.train, **{kind: old_file})
    if new_file is not None:
        check_files(**{kind: new_file})
    _, model, _, data = load_inputs(args, {"train": args.train, "old": old_file, "new": new_file})
    peft_model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    old = data["old"][0]
    if kind == "remove":
        request = InstanceRemoval(old)
    elif kind == "correct":
        request = ResponseCorrection(old, data["new"][0])
    else:
        request = QueryModification(old, data["new"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = erase(peft_model, request, data["train"][0], damping=damping, curvature=args.curvature,
                       solver=args.solver, solver_steps=args.solver_steps, hessian_examples=args.hessian_examples,
                       num_train_examples=args.num_train_examples, batch_size=args.batch_size, seed=args.seed,
                       progress=not args.quiet)
    if not is_main_process():  # under torchrun every rank holds the same adapter: one writes it
        return 0
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    audit = build_edit_audit_report(report, model_id=str(args.model), adapter_id=str(args.adapter),
                                    request_id=args.request_id)
    audit_path = save_audit_report(audit, out)
    before, after = report.losses_before, report.losses_after
    print(f"edit ({report.requests[0]['kind'].replace('_', ' ')}, {report.requests[0]['num_examples']} examples, "
          f"n={report.num_train_examples}): step scale {report.scale:g}, update norm {report.update_norm:.4g}, "
          f"solver residual {report.relative_residual:.3g}, {sum(report.seconds.values()):.1f} s")
    for key in before:
        print(f"  mean loss of the {key} examples  {before[key]:.4f} -> {after[key]:.4f}")
    for note in report.warnings:
        print(f"  note: {note}")
    print(f"adapter: {out}")
    print(f"audit report: {audit_path}")
    return 0
