"""TOFU-mini: erase fictitious authors from a fine-tuned SmolLM2-135M (issue #3, LLM path).

1. Fine-tune SmolLM2-135M on retain300 + forget05 questions and answers (the "original") and on
   retain300 alone (the "retrained" gold standard); both cached (see ``_tofu_setup.py``).
2. For forget01 (40 questions about one author, a subset of forget05) and forget05 (200
   questions, ten authors): erase them from the original with MAPE-GA / GradDiff / NPO /
   influence and with the same methods over every head and filter (``selection="all"``, the
   full-parameter counterparts), all through ``peft_mape.baselines.run_method`` (that is,
   ``get_peft_model(...).unlearn(...)``).
3. Evaluate every model with the TOFU metrics (``peft_mape.evaluation.tofu``): answer
   probability, ROUGE-L recall and truth ratio on forget / retain / real_authors / world_facts,
   forget quality (KS-test p-value of the forget truth ratios against the retrained model) and
   model utility; write ``benchmarks/results/tofu_mini.{json,md}``.

Budget (2 CPU cores, <= 30 min once the fine-tuned models are cached): prompt + answer <= 56
tokens (answers cut to 16 tokens), the original/retrained models fine-tune only their top blocks,
unlearning uses a 32-example retain sample and a fixed budget of 8 Adam steps on batches of 4
(no early stopping by default: every check is a forward pass over the forget set), influence a
4-example Hessian and 2 CG iterations, and metrics are measured on fixed subsets (sizes in the
table note).
For forget01 the gold standard is the same retain300-only model: it never saw forget01 either
(strictly, retraining without forget01 would keep the other 160 forget05 questions).

Each method starts from a fresh copy of the cached original. The mask search is
method-independent (same data, seed and objective), so it runs once per request and its
selection is handed to the other MAPE methods; its time is added to every MAPE row. The
original's forget loss (the report's "before") is likewise measured once per request.

Usage: python benchmarks/tofu_mini.py [--threads 2] [--quick] [--methods MAPE-GA,full\\ GA]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tofu_setup as setup  # noqa: E402

import peft_mape  # noqa: E402
from peft_mape.baselines import run_method as run_by_name  # noqa: E402
from peft_mape.evaluation.tofu import evaluate_splits, swapped_answers, tofu_summary  # noqa: E402
from peft_mape import METHODS as SUPPORTED_METHODS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (row label, unlearn() method, keyword arguments). Loop methods use the library's learning
# rates: 2e-4 on the selected units, 1e-5 with selection="all" (the paper's full-parameter lr).
METHOD_TABLE = [
    ("MAPE-GA", "ga", {}),
    ("MAPE-GradDiff", "graddiff", {}),
    ("MAPE-NPO", "npo", {}),
    ("MAPE-influence", "influence", {"solver": "cg"}),
    ("full GA", "ga", {"selection": "all"}),
    ("full GradDiff", "graddiff", {"selection": "all"}),
    ("full NPO", "npo", {"selection": "all"}),
    ("full influence", "influence", {"selection": "all", "solver": "cg"}),
]
SCENARIOS = ("forget01", "forget05")
# NPO's beta = 0.1 (Zhang et al.) scales the log-likelihood ratio of a whole answer; unlearn()'s
# per-example loss is the *mean* over answer tokens, so the same strength needs beta = 0.1 x the
# mean answer length. With beta = 0.1 per token the NPO weights 2*sigmoid(-beta*gap) stay ~1 for
# the whole budget and NPO reproduces GradDiff to three decimals (pilot runs).
NPO_SEQUENCE_BETA = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke run: forget01 only, tiny evaluation subsets")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated forget splits")
    p.add_argument("--methods", default="", help="comma-separated row labels to run (default: all)")
    # fine-tuning recipe (cache key)
    p.add_argument("--epochs", type=int, default=setup.Recipe.epochs)
    p.add_argument("--train-layers", type=int, default=setup.Recipe.train_layers, help="top decoder blocks trained")
    p.add_argument("--lr", type=float, default=setup.Recipe.lr)
    p.add_argument("--train-batch-size", type=int, default=setup.Recipe.batch_size)
    p.add_argument("--max-length", type=int, default=setup.Recipe.max_length)
    p.add_argument("--max-answer-tokens", type=int, default=setup.Recipe.max_answer_tokens)
    p.add_argument("--no-cache", action="store_true", help="re-train the original and retrained models")
    # unlearning
    p.add_argument("--sparsity", type=float, default=0.9, help="MAPE: fraction of heads/filters left frozen")
    p.add_argument("--max-retain", type=int, default=32, help="MAPEConfig.max_retain_examples")
    p.add_argument("--early-stop", action="store_true",
                   help="stop GA/GradDiff/NPO once the forget loss reaches the loss of unseen-author questions "
                   "(each check is a forward pass over the forget set: off by default to fit the budget)")
    p.add_argument("--holdout-size", type=int, default=32, help="unseen-author questions (early-stop target)")
    p.add_argument("--batch-size", type=int, default=4, help="unlearn() batch size")
    p.add_argument("--max-steps", type=int, default=8, help="step budget of GA/GradDiff/NPO")
    p.add_argument("--full-lr", type=float, default=6e-5,
                   help="lr of the full-parameter GA/GradDiff/NPO rows. Adam moves every trained weight by ~lr "
                   "per step, so 2e-4 on MAPE's 10%% of the unit parameters and 2e-4*sqrt(0.1) ~ 6e-5 on all of "
                   "them give updates of the same norm; the library's full-parameter default 1e-5 left the "
                   "forget answers nearly untouched in this step budget (pilot: forget05 answer prob 0.88 -> 0.80)")
    p.add_argument("--hessian-examples", type=int, default=4, help="influence: retain examples in the Hessian")
    p.add_argument("--solver-steps", type=int, default=2, help="influence: CG iterations")
    p.add_argument("--hessian-damping", type=float, default=1.0,
                   help="influence lambda (the library default; 1e-2 left CG at residual 2-10 here)")
    # evaluation
    p.add_argument("--forget-rouge", type=int, default=32,
                   help="forget questions whose greedy answers get ROUGE-L (probabilities and truth ratios: all)")
    p.add_argument("--forget-eval", type=int, default=100,
                   help="forget questions scored (probability, truth ratio, FQ) when the split is larger: a "
                   "forward pass over 200 questions and their 600 perturbed answers costs ~1 min per model on 2 cores")
    p.add_argument("--retain-eval", type=int, default=16, help="retain300 questions evaluated")
    p.add_argument("--authors-eval", type=int, default=40,
                   help="real_authors questions evaluated (their ROUGE-L is the smallest utility number: more "
                   "questions, less noise in the harmonic mean)")
    p.add_argument("--facts-eval", type=int, default=16, help="world_facts questions evaluated")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--generation-batch-size", type=int, default=128,
                   help="greedy generation for ROUGE: every split's questions of a model in one batch")
    p.add_argument("--facts-new-tokens", type=int, default=16, help="generation length on real_authors/world_facts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.scenarios = "forget01"
        args.forget_rouge, args.retain_eval, args.authors_eval, args.facts_eval = 8, 8, 8, 8
        args.max_steps, args.max_retain, args.holdout_size, args.solver_steps = 5, 16, 8, 2
    return args


def subset(records, size, seed):
    """A fixed, seeded subset (all records when ``size`` covers them), in the original order."""
    if size >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), size))
    return [records[i] for i in keep]


def with_swapped_answers(records):
    """Records with ``perturbed_answer`` = the answers of their neighbours in the *full* split
    (TOFU lists an author's questions in a row), built before any subset is drawn."""
    swapped = swapped_answers([r["answer"] for r in records])
    return [dict(r, perturbed_answer=p) for r, p in zip(records, swapped)]


class Evaluator:
    """TOFU metrics of a model: forget split per request, utility splits (retain, real_authors,
    world_facts) on fixed subsets."""

    def __init__(self, tokenizer, args, data):
        self.tokenizer, self.args = tokenizer, args
        self.utility_sets = {
            "retain": (subset(with_swapped_answers(data["retain300"]), args.retain_eval, args.seed), "retain"),
            "real_authors": (subset(data["real_authors"], args.authors_eval, args.seed), "facts"),
            "world_facts": (subset(data["world_facts"], args.facts_eval, args.seed), "facts"),
        }

    def _spec(self, records, kind, rouge_indices=None):
        a = self.args
        return {"questions": [r["question"] for r in records], "answers": [r["answer"] for r in records],
                "perturbed": [r["perturbed_answer"] for r in records], "kind": kind, "rouge_indices": rouge_indices,
                "max_new_tokens": a.facts_new_tokens if kind == "facts" else a.max_answer_tokens}

    def evaluate(self, model, forget_records=None, *, utility=True) -> dict:
        """Splits by name: "forget" (when records are given; ROUGE-L on a seeded subset) and the
        three utility splits; their greedy answers are generated together."""
        specs = {}
        if forget_records is not None:
            rouge = subset(list(range(len(forget_records))), self.args.forget_rouge, self.args.seed)
            specs["forget"] = self._spec(forget_records, "forget", rouge)
        if utility:
            specs.update({name: self._spec(records, kind) for name, (records, kind) in self.utility_sets.items()})
        a = self.args
        return evaluate_splits(model, self.tokenizer, specs, max_length=a.max_length,
                               max_answer_tokens=a.max_answer_tokens, batch_size=a.eval_batch_size,
                               generation_batch_size=a.generation_batch_size)

    def utility(self, model):
        return self.evaluate(model)

    def forget(self, model, records):
        """The forget questions given (a seeded subset of forget05); ROUGE-L on a seeded subset of them."""
        return self.evaluate(model, records, utility=False)["forget"]


def summarise(forget_split, utility, retrained_ratios):
    metrics = tofu_summary(forget_split, utility["retain"], utility["real_authors"], utility["world_facts"],
                           retrained_forget_ratios=retrained_ratios)
    splits = {"forget": forget_split.to_dict(), **{k: v.to_dict() for k, v in utility.items()}}
    return metrics, splits


def selected_methods(args):
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(wanted) - {label for label, _, _ in METHOD_TABLE}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {[m[0] for m in METHOD_TABLE]}")
    return [row for row in METHOD_TABLE if not wanted or row[0] in wanted]


def mean_answer_tokens(dataset) -> float:
    """Mean number of loss-bearing (answer) tokens per example: labels that are not -100."""
    return sum(sum(1 for t in row if t != -100) for row in dataset["labels"]) / len(dataset)


def run_method(label, method, kwargs, *, shared_selection, forget_ds, retain_ds, holdout_ds, num_train,
               args, load):
    """One unlearning run from a fresh original; returns (merged model, report, seconds, search seconds)."""
    config = peft_mape.MAPEConfig(sparsity=args.sparsity, max_retain_examples=args.max_retain)
    kwargs = dict(kwargs)
    reused = 0.0
    if kwargs.get("selection") is None and shared_selection is not None:
        kwargs["selection"], reused = shared_selection
    if method == "npo":
        kwargs.setdefault("beta", NPO_SEQUENCE_BETA * mean_answer_tokens(forget_ds))
    if method == "influence":
        kwargs.update(hessian_examples=args.hessian_examples, solver_steps=args.solver_steps,
                      damping=args.hessian_damping, num_train_examples=num_train)
    else:
        kwargs.update(max_steps=args.max_steps)
        if kwargs.get("selection") == "all":
            kwargs.setdefault("lr", args.full_lr)
        if args.early_stop:
            kwargs["holdout"] = holdout_ds
    family = "full" if kwargs.get("selection") == "all" else "mape"
    if family == "full":
        del kwargs["selection"]
    model = load()
    start = time.perf_counter()
    run = run_by_name(f"{family}-{method}", model, forget_ds, retain_ds, config=config, batch_size=args.batch_size,
                      seed=args.seed, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    report = peft_mape.UnlearnReport(**{k: v for k, v in run.report.items() if k != "method_name"})
    # Evaluate the merged weights: identical outputs, without the deltas' extra matmuls.
    return run.model.merge_and_unload(), report, seconds, reused


def run_scenario(name, data, train_records, tokenizer, evaluator, baselines, args, load_original):
    forget_records = data[name]
    forget_questions = {r["question"] for r in forget_records}
    retain_records = [r for r in train_records if r["question"] not in forget_questions]
    recipe = setup.Recipe(**baselines["recipe"])
    forget_ds = setup.qa_dataset(tokenizer, forget_records, recipe)
    retain_ds = setup.qa_dataset(tokenizer, retain_records, recipe)
    holdout_ds = setup.qa_dataset(tokenizer, data["holdout"][: args.holdout_size], recipe)
    # Perturbed answers come from the full split (neighbouring questions), then a seeded subset.
    eval_records = subset(with_swapped_answers(forget_records), args.forget_eval, args.seed)
    print(f"\n== {name}: erase {len(forget_records)} of {len(train_records)} training questions ==", flush=True)

    rows = []
    gold_forget = evaluator.forget(baselines["retrain"]["model"], eval_records)
    for label in ("original", "retrain"):
        base = baselines[label]
        forget_split = gold_forget if label == "retrain" else evaluator.forget(base["model"], eval_records)
        metrics, splits = summarise(forget_split, base["utility"], gold_forget.ratios)
        rows.append({"method": label, "metrics": metrics, "splits": splits,
                     "seconds": base["train_seconds"] if label == "retrain" else None})
        _print_row(label, metrics, rows[-1]["seconds"])

    shared_selection = None  # (selection dict, seconds of the statistics + search that produced it)
    for label, method, kwargs in selected_methods(args):
        if method not in SUPPORTED_METHODS:
            print(f"  {label:<16} skipped: unlearn() has no method {method!r} yet (supported: {SUPPORTED_METHODS})")
            rows.append({"method": label, "skipped": f"method {method!r} not supported by this peft_mape"})
            continue
        try:
            model, report, seconds, reused = run_method(
                label, method, kwargs, shared_selection=shared_selection,
                forget_ds=forget_ds, retain_ds=retain_ds,
                holdout_ds=holdout_ds, num_train=len(train_records), args=args, load=load_original)
        except Exception as exc:  # one failing method must not sink the benchmark
            traceback.print_exc()
            rows.append({"method": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        searched = kwargs.get("selection") is None and shared_selection is None and report.num_selected_heads + \
            report.num_selected_filters > 0
        if searched:
            search_seconds = report.seconds.get("statistics", 0.0) + report.seconds.get("search", 0.0)
            shared_selection = ({"heads": report.selected_heads, "filters": report.selected_filters}, search_seconds)
        eval_start = time.perf_counter()
        utility = evaluator.evaluate(model, eval_records)
        forget_split = utility.pop("forget")
        metrics, splits = summarise(forget_split, utility, gold_forget.ratios)
        report_dict = report.to_dict()
        report_dict.pop("scores", None)  # per-unit scores: large and not needed here
        rows.append({"method": label, "metrics": metrics, "splits": splits, "seconds": seconds + reused,
                     "unlearn_seconds": seconds, "reused_search_seconds": reused,
                     "eval_seconds": time.perf_counter() - eval_start, "report": report_dict})
        _print_row(label, metrics, seconds + reused, report, rows[-1]["eval_seconds"])
        del model
    return {"scenario": name, "num_forget": len(forget_records), "num_train": len(train_records),
            "num_forget_eval": len(eval_records), "num_forget_rouge": min(args.forget_rouge, len(eval_records)),
            "rows": rows}


def _print_row(label, metrics, seconds, report=None, eval_seconds=None):
    extra = "" if eval_seconds is None else f" | eval {eval_seconds:.0f}s"
    if report is not None:
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items() if v >= 0.5)
        extra += (f" | {report.num_selected_heads}h+{report.num_selected_filters}f, {report.steps} steps, "
                 f"forget loss {report.forget_loss_before:.2f}->{report.forget_loss_after:.2f} ({phases})")
        if "relative_residual" in report.diagnostics:
            extra += f" | CG residual {report.diagnostics['relative_residual']:.2g}"
    secs = "" if seconds is None else f" {seconds:6.1f}s"
    print(f"  {label:<16} forget prob {metrics['forget probability']:.3f} ROUGE {metrics['forget rouge_l']:.3f} "
          f"FQ {metrics['forget quality']:.2e} | utility {metrics['model utility']:.3f}{secs}{extra}", flush=True)


def verdict(scenario) -> list[str]:
    """Plain-language checks computed from the rows: did the original memorise the forget set, and
    does a MAPE variant beat full-parameter GA and NPO in forget quality at >= model utility?"""
    rows = {r["method"]: r for r in scenario["rows"] if "metrics" in r}
    lines = []
    if "original" in rows and "retrain" in rows:
        o, g = rows["original"]["metrics"], rows["retrain"]["metrics"]
        lines.append(f"Memorisation: forget answer probability {o['forget probability']:.3f} (original) vs "
                     f"{g['forget probability']:.3f} (retrained); the original's forget quality is "
                     f"{o['forget quality']:.2e}.")
    rivals = [rows[k] for k in ("full GA", "full NPO") if k in rows]
    if len(rivals) < 2:
        return lines + ["Criterion not checked: full GA or full NPO did not run."]
    bar_fq = max(r["metrics"]["forget quality"] for r in rivals)
    bar_mu = max(r["metrics"]["model utility"] for r in rivals)
    winners = [k for k, r in rows.items() if k.startswith("MAPE")
               and r["metrics"]["forget quality"] > bar_fq and r["metrics"]["model utility"] >= bar_mu]
    lines.append(f"Criterion (a MAPE variant beats full GA and full NPO in forget quality at equal or better model "
                 f"utility; bar: FQ > {bar_fq:.2e} and MU >= {bar_mu:.3f}): "
                 + (f"met by {', '.join(winners)}." if winners else "not met."))
    for k, r in rows.items():
        diag = (r.get("report") or {}).get("diagnostics") or {}
        if "relative_residual" in diag:
            lines.append(f"{k}: CG relative residual {diag['relative_residual']:.2g} after "
                         f"{r['report']['steps']} iterations"
                         + (", stopped at negative curvature." if diag.get("negative_curvature") else "."))
    if bar_mu == 0:
        lines.append("Model utility is 0 for a full-parameter baseline: one of its nine numbers was 0 on these "
                     "subsets, so the utility side of the criterion is vacuous here.")
    return lines


def markdown(results) -> str:
    a = results["args"]
    lines = [
        f"SmolLM2-135M fine-tuned on retain300 + forget05 (top {a['train_layers']} blocks, {a['epochs']} epochs, "
        f"lr {a['lr']}; answers cut to {a['max_answer_tokens']} tokens). Gold = the same recipe on retain300 only. "
        f"Unlearning: {a['max_steps']} Adam steps on batches of {a['batch_size']} (lr 2e-4 on "
        f"MAPE's units, the library default; {a['full_lr']:g} full-parameter, the same update norm — see --full-lr), {a['max_retain']} retain examples, MAPE sparsity {a['sparsity']}, "
        f"NPO beta 0.1 per answer (0.1 x mean answer tokens per token), influence: {a['hessian_examples']} "
        f"Hessian examples, {a['solver_steps']} CG steps, damping {a['hessian_damping']:g}. "
        f"Forget probabilities, truth ratios and FQ on {a['forget_eval']} forget questions (all of forget01), "
        f"ROUGE on {a['forget_rouge']} of them; "
        f"utility on {a['retain_eval']} retain300 / {a['authors_eval']} real_authors / {a['facts_eval']} world_facts "
        f"questions. {results['threads']} CPU thread(s); total {results['total_seconds'] / 60:.1f} min "
        f"(fine-tuning {results['train_seconds_this_run']:.0f}s of it).",
        "",
        "Prob = answer probability (forget/retain: P(a|q)^(1/|a|); authors/facts: normalised over the four "
        "options), ROUGE = ROUGE-L recall of the greedy answer, TR = truth-ratio score (forget: min(R, 1/R); "
        "others: max(0, 1 - R); perturbed answers: forget/retain the answers of the next three questions, "
        "mostly about the same author; authors/facts TOFU's three wrong answers), FQ = forget quality (KS "
        "p-value vs the retrained model), MU = model utility (harmonic mean of the nine retain / authors / "
        "facts numbers). Time = unlearning wall time (retrain: fine-tuning time); MAPE rows include the "
        "shared mask search.",
    ]
    for sc in results["scenarios"]:
        lines += ["", f"### Erasing {sc['scenario']} ({sc['num_forget']} of {sc['num_train']} training questions; "
                  f"metrics on {sc.get('num_forget_eval', sc['num_forget'])} of them)",
                  "", "| method | forget Prob | forget ROUGE | forget TR | FQ | retain Prob | retain ROUGE | "
                  "retain TR | authors Prob | authors ROUGE | facts Prob | facts ROUGE | MU | time (s) | steps | "
                  "units |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            if "metrics" not in r:
                lines.append(f"| {r['method']} | {r.get('skipped') or r.get('error')} |" + " |" * 14)
                continue
            m, rep = r["metrics"], r.get("report") or {}
            units = f"{rep['num_selected_heads']}h+{rep['num_selected_filters']}f" if rep else "–"
            secs = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "–"
            numbers = " | ".join(f"{m[k]:.3f}" for k in (
                "forget probability", "forget rouge_l", "forget truth_ratio"))
            rest = " | ".join(f"{m[k]:.3f}" for k in (
                "retain probability", "retain rouge_l", "retain truth_ratio", "real_authors probability",
                "real_authors rouge_l", "world_facts probability", "world_facts rouge_l", "model utility"))
            lines.append(f"| {r['method']} | {numbers} | {m['forget quality']:.2e} | {rest} | {secs} | "
                         f"{rep.get('steps', '–') if rep else '–'} | {units} |")
        lines += [""] + [f"- {line}" for line in verdict(sc)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = {name: setup.load_split(name) for name in ("retain300", "forget01", "forget05", "forget10_300",
                                                       "real_authors", "world_facts")}
    forget05_questions = {r["question"] for r in data["forget05"]}
    # Unseen authors: forget10_300 questions outside forget05 (neither model trained on them).
    data["holdout"] = [r for r in data["forget10_300"] if r["question"] not in forget05_questions]
    train_records = data["retain300"] + data["forget05"]
    tokenizer = setup.load_tokenizer()
    recipe = setup.Recipe(train_layers=args.train_layers, epochs=args.epochs, lr=args.lr,
                          batch_size=args.train_batch_size, max_length=args.max_length,
                          max_answer_tokens=args.max_answer_tokens, seed=args.seed)
    evaluator = Evaluator(tokenizer, args, data)

    baselines, train_seconds = {"recipe": recipe.__dict__}, 0.0
    for label, records in (("original", train_records), ("retrain", data["retain300"])):
        model, meta = setup.fine_tune(records, tokenizer, recipe, label, use_cache=not args.no_cache)
        train_seconds += 0.0 if meta["cached"] else meta["seconds"]
        print(f"{label}: fine-tuned on {len(records)} questions in {meta['seconds']:.0f}s"
              f"{' (cached)' if meta['cached'] else ''}", flush=True)
        baselines[label] = {"model": model, "train_seconds": meta["seconds"], "utility": evaluator.utility(model),
                            "meta": meta}

    def load_original():
        return setup.load_trained(train_records, tokenizer, recipe, "original")

    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "threads": args.threads, "recipe": recipe.__dict__, "supported_methods": list(SUPPORTED_METHODS),
               "baselines": {k: baselines[k]["meta"] for k in ("original", "retrain")}, "scenarios": []}
    for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from {list(SCENARIOS)}")
        results["scenarios"].append(run_scenario(name, data, train_records, tokenizer, evaluator, baselines, args,
                                                 load_original))
    results["train_seconds_this_run"] = train_seconds
    results["total_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tofu_mini_quick" if args.quick else "tofu_mini"
    (args.out / f"{stem}.json").write_text(json.dumps(results))
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    print("\n" + table)
    print(f"total {results['total_seconds'] / 60:.1f} min; results in {args.out}/{stem}.{{json,md}}")


if __name__ == "__main__":
    sys.exit(main())
