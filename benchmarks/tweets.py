"""Tweets classification benchmark: every method and baseline side by side, a relearning attack,
and 10 successive requests (issue #4; SPEC §8).

Setup (shared with the demo, ``examples/demo_tweets.py``, cached): all-MiniLM-L6-v2 fine-tuned on
2,000 clean + 64 label-flipped tweets. Two erasure requests on the same original:

- **random**: 128 random clean training tweets, with clean held-out tweets as the holdout;
- **mislabelled**: the 64 flipped tweets, with held-out tweets mislabelled the same way as the
  holdout (a holdout must look like the forget set would if the model had never seen it).

Every method stops once the forget set looks unseen by the holdout membership test (closed-form
methods: the line search's target).

Rows: original, retrain (gold), MAPE with GradDiff (default) / GA / NPO / SO / influence, random
units at the same sparsity (GradDiff), SalUn-style weight saliency at MAPE's parameter budget
(GradDiff), LoRA-restricted GA, and full-parameter SO / GA / GradDiff / NPO. Every row of the
random request also gets a relearning attack (5 steps on half of the forget set). Then 10
successive requests of 16 tweets each: MAPE memory-free, MAPE memory-aided, and full-parameter
GradDiff, against a retrain without all 160.

The mask search depends on the data, seed and objective, not on the update rule, so it runs
once per request (in the default row) and the other MAPE rows reuse its selection and its
forget loss; its statistics + search time is added to each of their times.

Trade-off (``--parts tradeoff``, about 35 min; not in the default run): GradDiff from the
original on MAPE's units (and with the search's other objectives), random units, SalUn's
weights, every weight, and a LoRA adapter, without a stopping target for ``--tradeoff-steps``,
with the metrics at every check (``on_check``): each selection's test and retain accuracy where
its forget accuracy first reaches the retrained model's (interpolated), the best test accuracy
at a later check still that forgotten, and the forget-vs-test curves with the retrained model
as a point. Matched forgetting, not matched steps: a method that is slower per step but costs
less utility at the same forgetting wins. ``--tradeoff-methods`` re-runs some selections and
keeps the others' curves.

Writes ``tweets.json``, ``tweets.md`` and PNG plots to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

import peft_mape
from peft_mape.baselines import run_method as run_by_name
from peft_mape.common.data import make_eval_loader
from peft_mape.evaluation import (
    classification_metrics, relearning_attack, successive_request_curve, utility_at_forget_level,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mape_devkit: the repository's helpers
from mape_devkit.profiling import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_tweets", ROOT / "examples" / "demo_tweets.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

# (row label, peft_mape.baselines.run_method name, keyword arguments). SO/influence get
# num_train_examples; loop methods get the scenario's stopping rule.
METHODS = [
    ("MAPE-GradDiff (default)", f"mape-{peft_mape.DEFAULT_METHOD}", {}),
    ("MAPE-GA", "mape-ga", {}),
    ("MAPE-NPO", "mape-npo", {}),
    ("MAPE-SO", "mape-so", {}),
    ("MAPE-influence", "mape-influence", {"damping": 1.0, "solver_steps": 5, "hessian_examples": 64}),
    ("random units (GradDiff)", "random-graddiff", {}),
    ("SalUn saliency (GradDiff)", "salun-graddiff", {}),
    ("LoRA GA", "lora-ga", {}),
    ("full SO", "full-so", {}),
    ("full GA", "full-ga", {}),
    ("full GradDiff", "full-graddiff", {}),
    ("full NPO", "full-npo", {}),
]
FULL = {"selection": "all"}


PARTS = ("scenarios", "successive", "tradeoff")
# The trade-off curves: one update rule (GradDiff, the default) on each kind of unit selection.
TRADEOFF_METHODS = [
    ("MAPE-GradDiff (default)", f"mape-{peft_mape.DEFAULT_METHOD}", {}),
    ("random units (GradDiff)", "random-graddiff", {}),
    ("SalUn saliency (GradDiff)", "salun-graddiff", {}),
    ("full GradDiff", "full-graddiff", {}),
    ("LoRA GradDiff", "lora-graddiff", {}),
    # The mask search's other objectives (SPEC §3): maximise the forget loss; forget-gradient norm.
    ("MAPE-GradDiff (objective mlf)", f"mape-{peft_mape.DEFAULT_METHOD}", {"objective": "mlf"}),
    ("MAPE-GradDiff (objective norm)", f"mape-{peft_mape.DEFAULT_METHOD}", {"objective": "norm"}),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retain-sample", type=int, default=1024,
                   help="MAPEConfig.max_retain_examples (256 cost the default ~6 test points in a pilot run)")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--request-size", type=int, default=16)
    p.add_argument("--relearn-steps", type=int, default=5)
    p.add_argument("--relearn-lr", type=float, default=1e-4)
    p.add_argument("--quick", action="store_true", help="a smoke run: small sets, few rows")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tradeoff-steps", type=int, default=150, help="steps of each trade-off run (no stopping target)")
    p.add_argument("--tradeoff-every", type=int, default=10, help="steps between the trade-off runs' checks")
    p.add_argument("--tradeoff-methods", default="",
                   help="comma-separated labels of the trade-off selections to run (default: all; one left out "
                        "keeps its curve from the existing JSON)")
    p.add_argument("--successive-variants", default="",
                   help="comma-separated labels of the successive-request variants to run (default: all; one left "
                        "out keeps its curve from the existing JSON)")
    p.add_argument("--parts", default="scenarios,successive",
                   help=f"comma-separated subset of {', '.join(PARTS)}; a part left out keeps its results from the "
                        "existing JSON in --out (each part records when it was measured)")
    args, rest = p.parse_known_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts: got {args.parts}; choose from {', '.join(PARTS)}")
    demo_args = demo.parse_args(rest)
    if args.quick:
        demo_args.train_size, demo_args.mislabelled, demo_args.forget_random = 300, 16, 24
        demo_args.test_size, demo_args.holdout_size, demo_args.epochs = 100, 60, 2
        args.requests, args.request_size, args.retain_sample = 3, 8, 64
    return args, demo_args


def folded_for_evaluation(model):
    """No-grad evaluation of a MAPE model with its active adapters folded into one weight per
    projection (same outputs, see ``MAPEModel.folded``). Unfolded, every adapter costs one more
    matmul per projection: a full-parameter delta doubles the forward, and after 10 successive
    requests the full-GradDiff model ran 11 matmuls per projection."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, peft_mape.MAPEModel):
        return tuner.folded(tuner.active_adapters)
    return contextlib.nullcontext()


class Scenario:
    """One erasure request on the shared original: its sets, metrics and stopping rule."""

    def __init__(self, name, original, train, holdout, test, forget_idx, args, demo_args):
        self.name, self.original, self.args, self.demo_args = name, original, args, demo_args
        removed = set(forget_idx)
        self.forget = demo.as_examples(train.select(forget_idx))
        self.retain_ds = train.select([i for i in range(len(train)) if i not in removed])
        self.retain = demo.as_examples(self.retain_ds)
        eval_size = min(demo_args.retain_eval_size, len(self.retain_ds))
        self.retain_eval = demo.as_examples(self.retain_ds.shuffle(seed=demo_args.seed).select(range(eval_size)))
        self.test, self.holdout = demo.as_examples(test), demo.as_examples(holdout)
        self.num_train = len(train)

    def stopping(self, method: str) -> dict:
        if method in ("so", "influence"):
            return {"num_train_examples": self.num_train, "holdout": self.holdout}
        return {"holdout": self.holdout}

    def metrics(self, model) -> dict:
        with folded_for_evaluation(model):
            m = classification_metrics(model, make_eval_loader(self.forget, 64), make_eval_loader(self.test, 64),
                                       make_eval_loader(self.retain_eval, 64))
        return {k: 100 * v if k.endswith("_acc") else v for k, v in m.items()}


def run_method(scenario: Scenario, label, name, kwargs, default_report, shared_search=None, *, model=None,
               stopping=None):
    """One row: a fresh copy of the original (or ``model``), the method (by its ``run_method``
    name), its metrics and wall time.

    ``shared_search`` (selection, seconds) from an earlier MAPE row of this request
    replaces the mask search of a later "mape-" row; its seconds join the row's time.
    ``stopping`` replaces the scenario's stopping rule (the holdout).
    """
    kwargs = dict(kwargs)
    family, _, rule = name.partition("-")
    seed = scenario.demo_args.seed
    stopping = scenario.stopping(rule) if stopping is None else stopping
    retain, config, reused = scenario.retain, None, 0.0
    if family == "mape" and shared_search is not None:
        kwargs.update(selection=shared_search["selection"])
        reused = shared_search["seconds"]
    if family in ("salun", "lora"):
        retain = scenario.retain[: scenario.args.retain_sample]
        stopping = {k: v for k, v in stopping.items() if k != "num_train_examples"}
    else:
        config = peft_mape.MAPEConfig(max_retain_examples=scenario.args.retain_sample)
    if family == "salun":
        # MAPE's exact parameter budget; if the default made no update, the same fraction of the
        # projection weights that the sparsity leaves updatable.
        budget = default_report["trainable_parameters"]
        kwargs.update({"num_weights": budget} if budget else {"density": 1.0 - peft_mape.MAPEConfig().sparsity})
    model = copy.deepcopy(scenario.original) if model is None else model
    with measure("cpu") as clock:
        run = run_by_name(name, model, scenario.forget, retain, config=config, seed=seed, progress=False,
                          **stopping, **kwargs)
    model, report = run.model, run.report
    if family in ("salun", "lora"):
        info = {"trainable_parameters": report["trainable_parameters"], "steps": report["steps"]}
    else:
        info = {"heads": report["num_selected_heads"], "filters": report["num_selected_filters"],
                "trainable_parameters": report["trainable_parameters"], "steps": report["steps"],
                "update_norm": report["update_norm"], "selection": {"heads": report["selected_heads"],
                                                                     "filters": report["selected_filters"]},
                "diagnostics": {k: v for k, v in report["diagnostics"].items() if k != "forget_loss_trace"},
                "forget_loss_before": report["forget_loss_before"],
                "search_seconds": report["seconds"].get("statistics", 0.0) + report["seconds"].get("search", 0.0),
                "searched": family == "mape" and shared_search is None
                and report["num_selected_heads"] + report["num_selected_filters"] > 0}
    stopping = report.get("stopping") or report.get("diagnostics", {}).get("stopping") or {}
    row = {"method": label, **scenario.metrics(model), "seconds": clock.seconds + reused,
           "reused_search_seconds": reused, **info, "checks": stopping.get("checks", [])}
    return model, row


def run_scenario(scenario: Scenario, methods, relearn: bool):
    print(f"\n== {scenario.name}: erase {len(scenario.forget)} of {scenario.num_train} training tweets ==", flush=True)
    rows = [{"method": "original", **scenario.metrics(scenario.original)}]
    models = {"original": scenario.original}
    retrained, meta = demo.fine_tune(scenario.retain_ds, scenario.demo_args, f"retrain-{scenario.name}")
    rows.append({"method": "retrain (gold)", **scenario.metrics(retrained), "seconds": meta["seconds"]})
    models["retrain (gold)"] = retrained
    default_report = shared_search = None
    for label, name, kwargs in methods:
        model, row = run_method(scenario, label, name, kwargs, default_report, shared_search)
        if default_report is None:
            default_report = row
        if shared_search is None and row.get("searched"):
            shared_search = {"selection": row["selection"], "seconds": row["search_seconds"]}
        rows.append(row)
        models[label] = model
        print(f"  {label:<28} forget {row['forget_acc']:5.1f}  retain {row['retain_acc']:5.1f}  "
              f"test {row['test_acc']:5.1f}  MIA {row['mia_loss']:.3f}  {row['seconds']:6.1f}s", flush=True)
    if relearn:
        for row in rows:
            attack = relearning_attack(models[row["method"]], scenario.forget, steps=scenario.args.relearn_steps,
                                       lr=scenario.args.relearn_lr, seed=scenario.demo_args.seed)
            row["relearn"] = {"heldout_acc_before": 100 * attack.before["heldout"]["acc"],
                              "heldout_acc_after": 100 * attack.after["heldout"]["acc"],
                              "all_acc_after": 100 * attack.after["all"]["acc"]}
    return {"scenario": scenario.name, "num_forget": len(scenario.forget), "num_train": scenario.num_train,
            "retrain_seconds": meta["seconds"], "rows": rows}


def run_tradeoff(scenario: Scenario, steps: int, every: int, methods=TRADEOFF_METHODS) -> dict:
    """Each selection's GradDiff from the original for ``steps`` steps without a stopping target
    (the trust region on), its metrics at every check through ``on_check``; then the test and
    retain accuracy where its forget accuracy reaches the retrained model's (interpolated)."""
    print(f"\n== trade-off: {scenario.name} ({steps} steps, checks every {every}) ==", flush=True)
    start = {"step": 0, **scenario.metrics(scenario.original)}
    retrained, _ = demo.fine_tune(scenario.retain_ds, scenario.demo_args, f"retrain-{scenario.name}")
    gold = scenario.metrics(retrained)
    rows, default_report = [], None
    for label, name, kwargs in methods:
        model = copy.deepcopy(scenario.original)
        on_check = lambda record, model=model: scenario.metrics(model)  # noqa: E731 (the weights just checked)
        kwargs = dict(kwargs, max_steps=steps, eval_every=every, on_check=on_check)
        _, row = run_method(scenario, label, name, kwargs, default_report, model=model, stopping={})
        default_report = default_report or row
        checks = row["checks"]
        points = [start] + [c for c in checks if not c.get("rolled_back")]
        matched = {metric: utility_at_forget_level(points, gold["forget_acc"], utility=metric)
                   for metric in ("test_acc", "retain_acc")}
        rows.append({"method": label, "seconds": row["seconds"], "steps": row["steps"],
                        "trainable_parameters": row["trainable_parameters"], "points": points, "checks": checks,
                        "matched": matched, "final": {k: row[k] for k in ("forget_acc", "retain_acc", "test_acc")}})
        at = matched["test_acc"]
        print(f"  {label:<28} " + (f"test {at['utility']:5.1f} at forget {gold['forget_acc']:.1f} (check {at['at']:.1f})"
                                   if at["reached"] else f"never reached forget {gold['forget_acc']:.1f} "
                                                         f"(closest {at['closest']:.1f})") +
              f"; end: forget {row['forget_acc']:5.1f} test {row['test_acc']:5.1f}  {row['seconds']:.0f}s", flush=True)
    return {"scenario": scenario.name, "steps": steps, "eval_every": every, "original": start, "retrain": gold,
            "methods": rows}


SUCCESSIVE_VARIANTS = [("MAPE memory-free", "memory_free", {}), ("MAPE memory-aided", "memory_aided", {}),
                       ("full GradDiff", "memory_free", FULL)]


def run_successive(original, train, holdout, test, forget_sets, args, demo_args, variants=SUCCESSIVE_VARIANTS):
    """10 requests of 16 clean training tweets: MAPE memory-free / memory-aided, full GradDiff."""
    taken = set(forget_sets["random"]) | set(forget_sets["mislabelled"])
    pool = [i for i in range(len(train)) if i not in taken]
    chosen = random.Random(demo_args.seed + 1).sample(pool, args.requests * args.request_size)
    request_idx = [chosen[r * args.request_size:(r + 1) * args.request_size] for r in range(args.requests)]
    all_removed = set(chosen)
    retain_ds = train.select([i for i in range(len(train)) if i not in all_removed])
    retain = demo.as_examples(train.select([i for i in range(len(train)) if i not in taken]))
    test_ex, holdout_ex = demo.as_examples(test), demo.as_examples(holdout)
    requests = [demo.as_examples(train.select(idx)) for idx in request_idx]

    def metrics_after(model, upto):
        removed = [e for r in requests[:upto] for e in r] or requests[0]
        with folded_for_evaluation(model):
            m = classification_metrics(model, make_eval_loader(removed, 64), make_eval_loader(test_ex, 64))
        return {"forget_acc": 100 * m["forget_acc"], "test_acc": 100 * m["test_acc"], "mia_loss": m["mia_loss"]}

    curves = []
    for label, mode, extra in variants:
        model = get_peft_model(copy.deepcopy(original), peft_mape.MAPEConfig(max_retain_examples=args.retain_sample))
        if mode == "memory_aided":
            model.precompute_retain_statistics(retain, seed=demo_args.seed, progress=False)

        def apply(i, request, model=model, mode=mode, extra=extra):
            report = model.unlearn_request(request, retain, mode=mode, holdout=holdout_ex, seed=demo_args.seed,
                                           progress=False, **extra)
            return {"steps": report.steps, "heads": report.num_selected_heads, "filters": report.num_selected_filters}

        curve = successive_request_curve(requests, apply, lambda i, model=model: metrics_after(model, i), label=label)
        curves.append(curve.to_dict())
        last = curve.points[-1]
        print(f"  successive {label:<20} after {args.requests}: forget {last['forget_acc']:5.1f} "
              f"test {last['test_acc']:5.1f}  total {sum(p['seconds'] for p in curve.points):.0f}s", flush=True)
    retrained, meta = demo.fine_tune(retain_ds, demo_args, "retrain-successive")
    gold = {"seconds": meta["seconds"], **metrics_after(retrained, args.requests)}
    return {"requests": args.requests, "request_size": args.request_size, "curves": curves, "retrain": gold}


def markdown(results) -> str:
    measured = results.get("measured", {})
    when = [f"{part} {m['date']} ({m['seconds'] / 60:.1f} min)" for part, m in measured.items()]
    lines = [f"Measured: {', '.join(when)}.", ""] if when else []
    for sc in results["scenarios"]:
        lines += [f"### Erasing {sc['num_forget']} {sc['scenario']} training tweets (of {sc['num_train']})", "",
                  "| method | forget acc | retain acc | test acc | MIA loss | MIA conf. | MIA entropy | time (s) "
                  "| % of retrain | trainable params | relearned held-out acc |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            secs = r.get("seconds")
            pct = f"{100 * secs / sc['retrain_seconds']:.1f}" if secs else "–"
            relearn = r.get("relearn")
            relearned = f"{relearn['heldout_acc_before']:.1f} → {relearn['heldout_acc_after']:.1f}" if relearn else "–"
            params = f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "–"
            lines.append(
                f"| {r['method']} | {r['forget_acc']:.1f} | {r['retain_acc']:.1f} | {r['test_acc']:.1f} | "
                f"{r['mia_loss']:.3f} | {r['mia_confidence']:.3f} | {r['mia_entropy']:.3f} | "
                f"{'–' if secs is None else f'{secs:.1f}'} | {pct} | {params} | {relearned} |"
            )
        lines.append("")
    succ = results.get("successive")
    if succ:
        lines += [f"### {succ['requests']} successive requests of {succ['request_size']} tweets", "",
                  "| method | forget acc after all | test acc after all | MIA loss after all | total time (s) |",
                  "|---|---|---|---|---|"]
        for curve in succ["curves"]:
            last = curve["points"][-1]
            total = sum(p["seconds"] for p in curve["points"])
            lines.append(f"| {curve['label']} | {last['forget_acc']:.1f} | {last['test_acc']:.1f} | "
                         f"{last['mia_loss']:.3f} | {total:.0f} |")
        gold = succ["retrain"]
        lines.append(f"| retrain without all (gold) | {gold['forget_acc']:.1f} | {gold['test_acc']:.1f} | "
                     f"{gold['mia_loss']:.3f} | {gold['seconds']:.0f} |")
        lines.append("")
    if results.get("tradeoff"):
        lines += tradeoff_markdown(results["tradeoff"])
    return "\n".join(lines)


def tradeoff_markdown(tradeoff) -> list[str]:
    lines = []
    for sc in tradeoff:
        gold = sc["retrain"]
        lines += [f"### {sc['scenario']} request at matched forgetting (GradDiff, {sc['steps']} steps, no target)", "",
                  f"Test and retain accuracy where the forget accuracy first reaches the retrained model's "
                  f"{gold['forget_acc']:.1f} (linear between checks every {sc['eval_every']} steps), and the best test "
                  f"accuracy at any later check still at or below that forget accuracy; original: forget "
                  f"{sc['original']['forget_acc']:.1f}, test {sc['original']['test_acc']:.1f}; retrained: test "
                  f"{gold['test_acc']:.1f}, retain {gold['retain_acc']:.1f}.", "",
                  "| selection | test acc at matched forgetting | retain acc there | steps to it "
                  "| best test acc at or past it | end: forget / test acc | trainable params | time (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in sc["methods"]:
            # Recomputed from the stored trajectory, so the table always follows the helper.
            test, retain = (utility_at_forget_level(m["points"], gold["forget_acc"], utility=metric)
                            for metric in ("test_acc", "retain_acc"))
            if test["reached"]:
                cells = f"{test['utility']:.1f} | {retain['utility']:.1f} | {test['step']:.0f} | {test['best']:.1f}"
            else:
                cells = f"not reached (closest forget acc {test['closest']:.1f}) | – | – | –"
            lines.append(f"| {m['method']} | {cells} | {m['final']['forget_acc']:.1f} / {m['final']['test_acc']:.1f} | "
                         f"{m['trainable_parameters']:,} | {m['seconds']:.0f} |")
        lines.append("")
    return lines


def make_plots(results, out: Path) -> list[str]:
    from peft_mape.reporting import plots

    written = []
    for sc in results["scenarios"]:
        path = out / f"tweets_{sc['scenario']}_metrics.png"
        plots.plot_metric_bars(sc["rows"], ["forget_acc", "retain_acc", "test_acc"], path,
                               title=f"Tweets, {sc['scenario']} forget set")
        written.append(path.name)
        default = next(r for r in sc["rows"] if r["method"].endswith("(default)"))
        if default.get("selection", {}).get("heads") or default.get("selection", {}).get("filters"):
            path = out / f"tweets_{sc['scenario']}_selection.png"
            plots.plot_selection(default["selection"], path, num_layers=6, num_heads=12, num_filters=1536,
                                 title=f"MAPE selection, {sc['scenario']} forget set")
            written.append(path.name)
    if results.get("successive"):
        path = out / "tweets_successive.png"
        plots.plot_request_curves(results["successive"]["curves"], ["forget_acc", "test_acc"], path,
                             reference=results["successive"]["retrain"])
        written.append(path.name)
    for sc in results.get("tradeoff", []):
        path = out / f"tweets_{sc['scenario']}_tradeoff.png"
        plots.plot_tradeoff({m["method"]: m["points"] for m in sc["methods"]}, path, reference=sc["retrain"],
                            title=f"Tweets, {sc['scenario']} request: GradDiff on each selection")
        written.append(path.name)
    return written


def chosen_by_label(spec: str, table, flag: str):
    """The rows of ``table`` (label first) named in the comma-separated ``spec``; all when empty."""
    wanted = [label.strip() for label in spec.split(",") if label.strip()]
    rows = [row for row in table if not wanted or row[0] in wanted]
    if len(rows) != len(wanted or rows):
        raise SystemExit(f"{flag}: choose from {[row[0] for row in table]}")
    return rows


def main(argv=None):
    args, demo_args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, holdouts, test, forget_sets = demo.prepare_data(demo_args)
    original, meta = demo.fine_tune(train, demo_args, "original")
    print(f"original: {len(train)} tweets, fine-tuned in {meta['seconds']:.0f}s (cached after the first run)", flush=True)
    methods = METHODS[:3] + METHODS[5:8] + METHODS[9:10] if args.quick else METHODS
    parts = args.parts
    stem = "tweets_quick" if args.quick else "tweets"
    previous = args.out / f"{stem}.json"
    results = json.loads(previous.read_text()) if set(parts) != set(PARTS) and previous.is_file() else {}
    results.update({"args": {k: str(v) for k, v in {**vars(demo_args), **vars(args)}.items()},
                    "original_train_seconds": meta["seconds"]})
    measured = results.setdefault("measured", {})
    if "scenarios" in parts:
        clock = time.perf_counter()
        results["scenarios"] = []
        for name, idx in forget_sets.items():
            scenario = Scenario(name, original, train, holdouts[name], test, idx, args, demo_args)
            results["scenarios"].append(run_scenario(scenario, methods, relearn=name == "random"))
        measured["scenarios"] = {"date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - clock}
    if "successive" in parts:
        print("\n== successive requests ==", flush=True)
        clock = time.perf_counter()
        variants = chosen_by_label(args.successive_variants, SUCCESSIVE_VARIANTS, "--successive-variants")
        fresh = run_successive(original, train, holdouts["random"], test, forget_sets, args, demo_args, variants)
        kept = {c["label"]: c for c in results.get("successive", {}).get("curves", [])}
        kept.update({c["label"]: dict(c, measured=datetime.date.today().isoformat()) for c in fresh["curves"]})
        fresh["curves"] = [kept[label] for label, _, _ in SUCCESSIVE_VARIANTS if label in kept]
        results["successive"] = fresh
        measured["successive"] = {"date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - clock}
    if "tradeoff" in parts:
        clock = time.perf_counter()
        methods = chosen_by_label(args.tradeoff_methods, TRADEOFF_METHODS, "--tradeoff-methods")
        if methods[0] is not TRADEOFF_METHODS[0] and any(m[1].startswith("salun-") for m in methods):
            raise SystemExit(f"--tradeoff-methods: SalUn takes its parameter budget from '{TRADEOFF_METHODS[0][0]}'; "
                             "run them together")
        previous_tradeoff = {sc["scenario"]: sc for sc in results.get("tradeoff", [])}
        results["tradeoff"] = []
        for name, idx in forget_sets.items():
            fresh = run_tradeoff(Scenario(name, original, train, holdouts[name], test, idx, args, demo_args),
                                 args.tradeoff_steps, args.tradeoff_every, methods)
            kept = {m["method"]: m for m in previous_tradeoff.get(name, {}).get("methods", [])
                    if (previous_tradeoff[name]["steps"], previous_tradeoff[name]["eval_every"]) ==
                    (fresh["steps"], fresh["eval_every"])}
            kept.update({m["method"]: dict(m, measured=datetime.date.today().isoformat()) for m in fresh["methods"]})
            fresh["methods"] = [kept[label] for label, _, _ in TRADEOFF_METHODS if label in kept]
            results["tradeoff"].append(fresh)
        measured["tradeoff"] = {"date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - clock}
    results.setdefault("scenarios", [])
    results["total_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results))
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    if not args.quick:
        results["plots"] = make_plots(results, args.out)
    print("\n" + table)
    print(f"total {results['total_seconds']:.0f}s; results in {args.out}/{stem}.{{json,md}}")


if __name__ == "__main__":
    sys.exit(main())
