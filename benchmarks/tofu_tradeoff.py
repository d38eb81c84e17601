"""TOFU-mini forget05 at matched forgetting: GradDiff on each kind of selection (issue #14, point 5).

The same cached SmolLM2-135M original and retrained models as ``tofu_mini.py`` (fine-tuned on
retain300 + forget05, and on retain300 alone). From the original, GradDiff runs without a
stopping target on MAPE's units (the default search), random units at the same sparsity,
SalUn's salient weights at MAPE's parameter budget, every weight, and a LoRA adapter. At every
check (``on_check``) the model's answer probability P(a|q)^(1/|a|) is measured on forget05
questions and on retain300 questions (which GradDiff's retain term sees), and on real_authors
questions (which no run sees: the closest thing to a test set TOFU has) the probability of the
correct answer normalised over it and its perturbed answers, as TOFU scores that split (the
fine-tuned model's raw probabilities there are ~1e-3: the fine-tune overwrote general knowledge);
forward passes only, no generation. Each selection's retain and real-authors probability where its forget probability
reaches the retrained model's is interpolated between checks
(``peft_mape.evaluation.utility_at_forget_level``): the selections are compared at the same
forgetting, not after the same number of steps.

Writes ``benchmarks/results/tofu_tradeoff.{json,md,png}``.

Usage: python benchmarks/tofu_tradeoff.py [--threads 2] [--steps 60] [--every 6] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tofu_setup as setup  # noqa: E402

import peft_mape  # noqa: E402
from peft_mape.baselines import run_method as run_by_name  # noqa: E402
from peft_mape.common.data import make_eval_loader, make_loader  # noqa: E402
from peft_mape.common.stopping import example_losses  # noqa: E402
from peft_mape.evaluation import utility_at_forget_level  # noqa: E402
from peft_mape.evaluation.tofu import answer_probability, normalised_answer_probability  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (label, run_method name, keyword arguments): one update rule, five selections.
SELECTIONS = [
    ("MAPE-GradDiff (default search)", "mape-graddiff", {}),
    ("random units (GradDiff)", "random-graddiff", {}),
    ("SalUn saliency (GradDiff)", "salun-graddiff", {}),
    ("full GradDiff", "full-graddiff", {}),
    ("LoRA GradDiff", "lora-graddiff", {}),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=60, help="steps of each run (no stopping target)")
    p.add_argument("--every", type=int, default=6, help="steps between checks")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-retain", type=int, default=32, help="MAPEConfig.max_retain_examples / the retain sample")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--full-lr", type=float, default=6e-5,
                   help="lr of the full-parameter run (tofu_mini.py's: the same update norm as MAPE's 2e-4)")
    p.add_argument("--forget-eval", type=int, default=100, help="forget05 questions measured at each check")
    p.add_argument("--retain-eval", type=int, default=48, help="retain300 questions measured at each check")
    p.add_argument("--authors-eval", type=int, default=48, help="real_authors questions measured at each check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, small sets")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.forget_eval, args.retain_eval, args.authors_eval, args.max_retain = \
            4, 2, 8, 8, 8, 8
    return args


def mean_log_probs(model, loader) -> torch.Tensor:
    """Per-question mean answer-token log-probability (minus the training loss), in loader order."""
    return -example_losses(model, loader, device=next(model.parameters()).device)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()
    data = {name: setup.load_split(name) for name in ("retain300", "forget05", "real_authors")}
    train_records = data["retain300"] + data["forget05"]
    tokenizer, recipe = setup.load_tokenizer(), setup.Recipe(seed=args.seed)
    original, _ = setup.fine_tune(train_records, tokenizer, recipe, "original")
    retrained, _ = setup.fine_tune(data["retain300"], tokenizer, recipe, "retrain")
    forget_ds = setup.qa_dataset(tokenizer, data["forget05"], recipe)
    retain_ds = setup.qa_dataset(tokenizer, data["retain300"], recipe)
    rng = random.Random(args.seed)
    forget_eval = setup.as_examples(forget_ds.select(sorted(rng.sample(range(len(forget_ds)), args.forget_eval))))
    retain_eval = setup.as_examples(retain_ds.select(sorted(rng.sample(range(len(retain_ds)), args.retain_eval))))
    authors = data["real_authors"]
    authors = [authors[i] for i in sorted(rng.sample(range(len(authors)), min(args.authors_eval, len(authors))))]
    pad = tokenizer.pad_token_id or 0
    loaders = {"forget_prob": make_eval_loader(forget_eval, 32, pad), "retain_prob": make_eval_loader(retain_eval, 32, pad)}
    # One in-order loader per answer option: option 0 the correct answer, then the perturbed ones.
    options = [[r["answer"] for r in authors]] + [[r["perturbed_answer"][k] for r in authors]
                                                  for k in range(min(len(r["perturbed_answer"]) for r in authors))]
    option_loaders = [make_loader(setup.as_examples(setup.qa_dataset(
        tokenizer, [dict(r, answer=a) for r, a in zip(authors, answers)], recipe)), 32, pad) for answers in options]
    utilities = ("retain_prob", "authors_prob")

    def metrics(model) -> dict:
        values = {name: float(answer_probability(mean_log_probs(model, loader)).mean()) for name, loader in loaders.items()}
        correct, *perturbed = (mean_log_probs(model, loader) for loader in option_loaders)
        values["authors_prob"] = float(normalised_answer_probability(correct, torch.stack(perturbed, 1)).mean())
        return values

    start, gold = {"step": 0, **metrics(original)}, metrics(retrained)
    print(f"original: forget / retain / authors prob {start['forget_prob']:.3f} / {start['retain_prob']:.3f} / "
          f"{start['authors_prob']:.3f}; retrained: {gold['forget_prob']:.3f} / {gold['retain_prob']:.3f} / "
          f"{gold['authors_prob']:.3f}", flush=True)
    del retrained
    rows, budget = [], None
    for label, name, kwargs in SELECTIONS:
        model = copy.deepcopy(original)
        kwargs = dict(kwargs, max_steps=args.steps, eval_every=args.every, batch_size=args.batch_size,
                      seed=args.seed, progress=False, on_check=lambda record, model=model: metrics(model))
        family = name.partition("-")[0]
        if family == "full":
            kwargs["lr"] = args.full_lr
        if family == "salun":
            kwargs["num_weights"] = budget
        if family in ("salun", "lora"):
            retain = setup.as_examples(retain_ds.shuffle(seed=args.seed).select(range(args.max_retain)))
            config = None
        else:
            retain = retain_ds
            config = peft_mape.MAPEConfig(sparsity=args.sparsity, max_retain_examples=args.max_retain)
        began = time.perf_counter()
        run = run_by_name(name, model, forget_ds, retain, config=config, **kwargs)
        seconds = time.perf_counter() - began
        report = run.report
        budget = budget or report["trainable_parameters"]
        stopping = report.get("stopping") or report["diagnostics"]["stopping"]
        checks = stopping["checks"]
        points = [start] + [c for c in checks if not c.get("rolled_back")]
        matched = {u: utility_at_forget_level(points, gold["forget_prob"], forget="forget_prob", utility=u)
                   for u in utilities}
        rows.append({"method": label, "seconds": seconds, "steps": report["steps"],
                     "trainable_parameters": report["trainable_parameters"], "stop_reason": stopping.get("stop_reason"),
                     "points": points, "checks": checks, "matched": matched})
        end, m = points[-1], matched["retain_prob"]
        print(f"  {label:<32} " + (f"retain / authors prob {m['utility']:.3f} / {matched['authors_prob']['utility']:.3f} "
                                   f"at forget prob {gold['forget_prob']:.3f}"
                                   if m["reached"] else f"never reached {gold['forget_prob']:.3f} (closest {m['closest']:.3f})")
              + f"; end: {end['forget_prob']:.3f} / {end['retain_prob']:.3f} / {end['authors_prob']:.3f}, {seconds:.0f}s",
              flush=True)
        del model, run
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "date": datetime.date.today().isoformat(), "original": start, "retrain": gold, "rows": rows,
               "total_seconds": time.perf_counter() - clock}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tofu_tradeoff_quick" if args.quick else "tofu_tradeoff"
    (args.out / f"{stem}.json").write_text(json.dumps(results))
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    if not args.quick:
        from peft_mape.reporting.plots import plot_tradeoff

        plot_tradeoff({r["method"]: r["points"] for r in rows}, args.out / f"{stem}.png", x="forget_prob",
                      y="retain_prob", reference=gold, title="TOFU-mini forget05: GradDiff on each selection")
    print("\n" + table)


def markdown(results) -> str:
    a, gold, start = results["args"], results["retrain"], results["original"]
    lines = [f"Measured {results['date']} ({results['total_seconds'] / 60:.1f} min, {a['threads']} threads). "
             f"SmolLM2-135M original vs retrained on TOFU-mini forget05: GradDiff without a stopping target for "
             f"{a['steps']} steps (batches of {a['batch_size']}, {a['max_retain']} retain examples, checks every "
             f"{a['every']} steps; library lr on units, {a['full_lr']:g} full-parameter). Prob = P(a|q)^(1/|a|) on "
             f"{a['forget_eval']} forget05 / {a['retain_eval']} retain300 questions; on {a['authors_eval']} "
             f"real_authors questions normalised over the correct and perturbed answers. Original: forget {start['forget_prob']:.3f}, retain {start['retain_prob']:.3f}, authors "
             f"{start['authors_prob']:.3f}; retrained: forget {gold['forget_prob']:.3f}, retain "
             f"{gold['retain_prob']:.3f}, authors {gold['authors_prob']:.3f}.", "",
             "| selection | retain Prob at the retrained forget Prob | real-authors Prob there | steps to it "
             "| end: forget / retain / authors Prob | trainable params | time (s) | stop |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        retain, authors, end = r["matched"]["retain_prob"], r["matched"]["authors_prob"], r["points"][-1]
        if retain["reached"]:
            step = "–" if retain["step"] is None else f"{retain['step']:.0f}"
            cells = f"{retain['utility']:.3f} | {authors['utility']:.3f} | {step}"
        else:
            cells = f"not reached (closest {retain['closest']:.3f}) | – | –"
        lines.append(f"| {r['method']} | {cells} | {end['forget_prob']:.3f} / {end['retain_prob']:.3f} / "
                     f"{end['authors_prob']:.3f} | {r['trainable_parameters']:,} | {r['seconds']:.0f} | "
                     f"{r['stop_reason']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
