"""LLMEraser on SmolLM2-135M + LoRA + TOFU-mini: instance removal, response correction and query
modification, each against the adapter retrained on the edited data (issue #15, point 3).

One LoRA adapter (r=8 on every linear layer of the top ``--layers`` decoder blocks) is fine-tuned
on retain300 + forget05 (500 questions) as they reached training, with two corruptions:

* RC: ``--edited`` retain questions carry another author's answer (answers shuffled among them,
  never to the same author's question);
* QM: ``--edited`` other retain questions carry an injected noise phrase (``NOISE``) before the
  question.

Requests, each answered from a fresh copy of that adapter:

* IR: remove forget01 (40 questions about two authors, part of forget05). Gold: the adapter
  retrained without them. Methods: ``erase()`` defaults; gradient ascent and GradDiff on the
  adapter for one epoch over forget01 at the training step size; and MAPE's own ``unlearn()``
  (defaults, GradDiff, ``holdout=`` 40 forget10 questions about authors never trained on) on the
  merged model, retain = the other training questions.
* RC: correct the swapped answers. Gold: retrained with the true answers. Methods: ``erase()``
  defaults; fine-tuning the adapter one epoch on the corrected examples (the cheap baseline
  LLMEraser's reviewers asked for).
* QM: remove the noise phrase from the questions. Gold: retrained on the clean questions.
  Methods: ``erase()`` defaults; one epoch of fine-tuning on the clean questions.

Metrics (``peft_mape.evaluation.tofu``, the fixed subsets of ``tofu_mini.py``'s Evaluator):
forget01 answer probability, truth ratio and forget quality against the IR gold; model utility
(retain questions that were not edited, real_authors, world_facts); for RC the probability
P(a|q)^(1/|a|) of the true and of the swapped answers on the corrected questions; for QM the
probability of the answer after the clean question. "gap closed" is the share of the distance
between the corrupted and the gold adapter on the request's own metric that a method covers.
Time as a share of retraining the gold adapter (seconds of its fine-tune).

Writes ``benchmarks/results/llmeraser_tofu.{json,md,png}``; adapters are cached under
``mape_devkit.assets.cache_dir() / "tofu_lora"``.

Usage: python benchmarks/llmeraser_tofu.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tofu_setup as setup  # noqa: E402
from llmeraser_tweets import gap_closed  # noqa: E402
from tofu_mini import Evaluator, with_swapped_answers  # noqa: E402

from mape_devkit import assets  # noqa: E402
from peft_mape.baselines import run_method  # noqa: E402
from peft_mape.common.causal_lm import answer_log_probs, format_answer, format_prompt  # noqa: E402
from peft_mape.common.data import make_loader  # noqa: E402
from peft_mape.evaluation.tofu import answer_probability, tofu_summary  # noqa: E402
from peft_mape.llmeraser import InstanceRemoval, QueryModification, ResponseCorrection, erase  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = "[forwarded from an old forum dump, ref 7Q-xk2] "
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUTHOR_QUESTIONS = 20  # TOFU lists each author's 20 questions in a row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="top decoder blocks carrying LoRA")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--edited", type=int, default=40, help="retain questions corrupted for RC, and again for QM")
    p.add_argument("--forget-rouge", type=int, default=32)
    p.add_argument("--retain-eval", type=int, default=16)
    p.add_argument("--authors-eval", type=int, default=40)
    p.add_argument("--facts-eval", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--generation-batch-size", type=int, default=128)
    p.add_argument("--facts-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="a stopped run's printed output: its rows are kept, not re-measured")
    p.add_argument("--skip-mape", default="", metavar="NOTE",
                   help="leave out the MAPE unlearn() row; NOTE (why) takes its place in the table")
    p.add_argument("--quick", action="store_true", help="smoke run: 60 training questions, 1 epoch, tiny subsets")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.max_length, args.max_answer_tokens = setup.Recipe.max_length, setup.Recipe.max_answer_tokens
    if args.quick:
        args.epochs, args.edited = 1, 4
        if args.out == RESULTS:  # a smoke run does not overwrite the committed results
            args.out = Path(tempfile.gettempdir()) / "llmeraser_tofu_quick"
        args.forget_rouge, args.retain_eval, args.authors_eval, args.facts_eval = 4, 4, 4, 4
    return args


def build_data(args):
    """The clean and corrupted training records and the edited positions (indices into retain300)."""
    data = {name: setup.load_split(name) for name in
            ("retain300", "forget05", "forget01", "real_authors", "world_facts")}
    retain = data["retain300"][:60] if args.quick else data["retain300"]
    forget05 = data["forget05"][-40:] if args.quick else data["forget05"]  # forget01 is its last 40
    rng = random.Random(args.seed)
    chosen = rng.sample(range(len(retain)), 2 * args.edited)
    rc, qm = sorted(chosen[:args.edited]), sorted(chosen[args.edited:])
    # A rotation by half the list moves each answer to a question far away in retain300, i.e.
    # (almost always) to another author; the rare same-author pair shifts on once more.
    swapped = {}
    for j, i in enumerate(rc):
        shift = len(rc) // 2
        while rc[(j + shift) % len(rc)] // AUTHOR_QUESTIONS == i // AUTHOR_QUESTIONS:
            shift += 1
        swapped[i] = retain[rc[(j + shift) % len(rc)]]["answer"]
    corrupted_retain = [dict(r, answer=swapped[i]) if i in swapped else
                        dict(r, question=NOISE + r["question"]) if i in qm else dict(r)
                        for i, r in enumerate(retain)]
    forget01 = {r["question"] for r in data["forget01"]}
    sets = {
        "corrupted": corrupted_retain + forget05,
        "gold-IR": corrupted_retain + [r for r in forget05 if r["question"] not in forget01],
        "gold-RC": [dict(r, answer=retain[i]["answer"]) if i in swapped else r
                    for i, r in enumerate(corrupted_retain)] + forget05,
        "gold-QM": [dict(r, question=retain[i]["question"]) if i in qm else r
                    for i, r in enumerate(corrupted_retain)] + forget05,
    }
    untouched = [r for i, r in enumerate(retain) if i not in swapped and i not in qm]
    # questions about authors the adapter never saw: the holdout unlearn() stops on
    seen = {r["question"] for r in data["forget05"]}
    holdout = [r for r in setup.load_split("forget10_300") if r["question"] not in seen][:8 if args.quick else 40]
    return data, sets, {"rc": rc, "qm": qm}, corrupted_retain, retain, untouched, holdout


def lora_config(model, args):
    from peft import LoraConfig

    n = len(model.model.layers)
    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=LINEAR,
                      layers_to_transform=list(range(n - args.layers, n)))


def trained_adapter(tag, dataset, tokenizer, recipe, args):
    """(PEFT LoRA model, training seconds) for a ``qa_dataset``: fine-tuned once, then cached."""
    from peft import PeftModel, get_peft_model

    key = hashlib.sha256(json.dumps([tag, asdict(recipe), args.rank, args.layers, dataset.to_dict()["input_ids"],
                                     dataset.to_dict()["labels"]]).encode()).hexdigest()[:16]
    folder = assets.cache_dir() / "tofu_lora" / f"{tag}-{key}"
    if (folder / "meta.json").exists():
        model = PeftModel.from_pretrained(setup.load_base_model(), folder)
        return model.eval(), json.loads((folder / "meta.json").read_text())["seconds"]
    base = setup.load_base_model()
    model = get_peft_model(base, lora_config(base, args))
    meta = setup.train_epochs(model, setup.as_examples(dataset), tokenizer, recipe, f"LoRA {tag}")
    model.save_pretrained(folder)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return model, meta["seconds"]


def tune(model, examples, tokenizer, lr, *, ascent=False, retain=None, seed=0, batch_size=4):
    """One epoch of AdamW on the adapter over ``examples``: descent, or ``ascent`` (plus descent
    on as many ``retain`` batches for GradDiff); returns the seconds."""
    from peft_mape.common.data import default_per_example_loss

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    main = make_loader(examples, batch_size, pad, shuffle=True, seed=seed)
    paired = iter(make_loader(retain, batch_size, pad, shuffle=True, seed=seed)) if retain else None
    start = time.perf_counter()
    model.eval()  # LoRA dropout is 0 here; eval keeps the base as it serves
    for batch in main:
        loss = default_per_example_loss(model(**batch), batch).mean()
        loss = -loss if ascent else loss
        if paired is not None:
            other = next(paired)
            loss = loss + default_per_example_loss(model(**other), other).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
    return time.perf_counter() - start


def probabilities(model, tokenizer, questions, answers, args) -> float:
    prompts = [format_prompt(q) for q in questions]
    scored = answer_log_probs(model, tokenizer, prompts, [format_answer(a) for a in answers],
                              batch_size=args.eval_batch_size, max_length=args.max_length,
                              max_answer_tokens=args.max_answer_tokens)
    return float(np.mean(answer_probability(scored.mean)))


def mape_row(merged, forget, retain, holdout, row, args):
    """MAPE's own unlearn() (defaults, GradDiff, stopping on the holdout) on the merged model."""
    start = time.perf_counter()
    run = run_method("mape-graddiff", merged, forget, retain, holdout=holdout, seed=args.seed, progress=False)
    out = row("IR", "MAPE unlearn(holdout=) defaults on the merged model", run.model.merge_and_unload(),
              time.perf_counter() - start, "gold-IR")
    out["unlearn_report"] = {k: run.report.get(k) for k in ("steps", "stopped_early", "seconds", "warnings",
                                                            "num_selected_heads", "num_selected_filters")}


def markdown(args, rows, meta) -> str:
    lines = [f"SmolLM2-135M + LoRA (r={args.rank}, every linear layer of the top {args.layers} blocks), fine-tuned "
             f"{args.epochs} epochs at lr {args.lr} on retain300 + forget05 ({meta['num_train']} questions) of which "
             f"{args.edited} retain answers were swapped with other authors' (RC) and {args.edited} other retain "
             f"questions carried the noise phrase {NOISE.strip()!r} (QM). CPU, {torch.get_num_threads()} thread(s), "
             f"{meta['total_minutes']:.1f} min in all{resumed_note(meta)}. Prob = P(a|q)^(1/|a|); FQ = KS p-value of the forget01 truth "
             "ratios against the IR gold; MU = TOFU model utility; RC metric = probability of the true answers of "
             "the corrected questions; QM metric = answer probability after the clean questions; gap closed on "
             "the request's metric (IR: forget01 Prob); time as a share of retraining the gold adapter.", "",
             "| request | method | forget01 Prob | FQ | RC true Prob | RC swapped Prob | QM clean Prob | MU | "
             "gap closed | seconds | × retrain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, fmt="{:.3f}"):
        return "–" if value is None else fmt.format(value)

    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['request']} | {r['method']} |" + " – |" * 9)
            continue
        lines.append(f"| {r['request']} | {r['method']} | {cell(r['forget_probability'])} | "
                     f"{cell(r['forget_quality'], '{:.2e}')} | {cell(r['rc_true'])} | {cell(r['rc_swapped'])} | "
                     f"{cell(r['qm_clean'])} | {cell(r['model_utility'])} | {cell(r.get('gap_closed'), '{:.2f}')} | "
                     f"{cell(r['seconds'], '{:.1f}')} | {cell(r.get('time_vs_retrain'))} |")
    notes = [r for r in rows if r.get("warnings")]
    if notes:
        lines += ["", "erase() warnings:"] + [f"- {r['request']}: {w}" for r in notes for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def resumed_note(meta) -> str:
    if not meta.get("resumed_rows"):
        return ""
    return (f" for this invocation, which kept {meta['resumed_rows']} rows (and their seconds) from the output of a "
            "stopped run")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    edits = [r for r in rows if r.get("gap_closed") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['request']}\n{r['method']}" for r in edits]
    axes[0].bar(range(len(edits)), [r["gap_closed"] for r in edits], color="tab:blue")
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_title("gap closed toward the gold adapter (request's metric)", fontsize=9)
    axes[1].bar(range(len(rows)), [r["model_utility"] for r in rows], color="tab:green")
    axes[1].set_title("model utility", fontsize=9)
    for ax, names in ((axes[0], labels), (axes[1], [f"{r['request']}\n{r['method']}" for r in rows])):
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    clock = time.perf_counter()
    tokenizer = setup.load_tokenizer()
    recipe = setup.Recipe(epochs=args.epochs, lr=args.lr, seed=args.seed)
    data, sets, edited, corrupted_retain, retain, untouched, holdout = build_data(args)
    evaluator = Evaluator(tokenizer, args, dict(data, retain300=untouched))
    forget_eval = with_swapped_answers([r for r in sets["corrupted"] if r["question"] in
                                        {f["question"] for f in data["forget01"]}])
    rc_q = [retain[i]["question"] for i in edited["rc"]]
    rc_true = [retain[i]["answer"] for i in edited["rc"]]
    rc_wrong = [corrupted_retain[i]["answer"] for i in edited["rc"]]
    qm_clean = [retain[i]["question"] for i in edited["qm"]]
    qm_answers = [retain[i]["answer"] for i in edited["qm"]]
    datasets = {tag: setup.qa_dataset(tokenizer, records, recipe) for tag, records in sets.items()}
    adapters = {tag: trained_adapter(tag, dataset, tokenizer, recipe, args) for tag, dataset in datasets.items()}
    gold_ratios = evaluator.evaluate(adapters["gold-IR"][0], forget_eval, utility=False)["forget"].ratios

    def ex(records):
        return setup.as_examples(setup.qa_dataset(tokenizer, records, recipe))

    f01_examples = ex(forget_eval)
    rc_old, rc_new = ex([corrupted_retain[i] for i in edited["rc"]]), ex([retain[i] for i in edited["rc"]])
    qm_old, qm_new = ex([corrupted_retain[i] for i in edited["qm"]]), ex([retain[i] for i in edited["qm"]])
    train = setup.as_examples(datasets["corrupted"])
    others = setup.as_examples(datasets["gold-IR"])  # the training set less forget01: GradDiff's and MAPE's retain
    rows, reference = [], {}
    resumed = {}
    if args.resume:  # rows a stopped run printed (one JSON object per line): kept, not measured again
        for line in args.resume.read_text().splitlines():
            if line.startswith("{"):
                done = json.loads(line)
                resumed[(done["request"], done["method"])] = dict(done, resumed=True)

    def pending(request, method) -> bool:
        if (request, method) in resumed:
            rows.append(resumed[(request, method)])
            return False
        return True

    def row(request, method, model, seconds, gold_tag=None, report=None):
        splits = evaluator.evaluate(model, forget_eval)
        metrics = tofu_summary(splits["forget"], splits["retain"], splits["real_authors"], splits["world_facts"],
                               retrained_forget_ratios=gold_ratios)
        out = {"request": request, "method": method, "seconds": seconds,
               "forget_probability": metrics["forget probability"], "forget_quality": metrics["forget quality"],
               "model_utility": metrics["model utility"], "metrics": metrics,
               "rc_true": probabilities(model, tokenizer, rc_q, rc_true, args),
               "rc_swapped": probabilities(model, tokenizer, rc_q, rc_wrong, args),
               "qm_clean": probabilities(model, tokenizer, qm_clean, qm_answers, args)}
        if gold_tag is not None:
            key = {"IR": "forget_probability", "RC": "rc_true", "QM": "qm_clean"}[request]
            out["gap_closed"] = gap_closed(out[key], reference["corrupted"][key], reference[gold_tag][key])
            out["time_vs_retrain"] = seconds / adapters[gold_tag][1]
        if report is not None:
            out["report"] = report.to_dict()
            out["warnings"] = list(report.warnings)
        rows.append(out)
        print(json.dumps({k: v for k, v in out.items() if k not in ("metrics", "report")}), flush=True)
        return out

    label = "corrupted adapter (as trained)"
    reference["corrupted"] = row("–", label, *adapters["corrupted"]) if pending("–", label) else rows[-1]
    for tag, label in (("gold-IR", "gold: retrained without forget01"), ("gold-RC", "gold: retrained, true answers"),
                       ("gold-QM", "gold: retrained, clean questions")):
        reference[tag] = row(tag[-2:], label, *adapters[tag]) if pending(tag[-2:], label) else rows[-1]

    def fresh():
        return copy.deepcopy(adapters["corrupted"][0])

    # the defaults, except in a smoke run, which only checks that every path runs
    erase_options = {"hessian_examples": 8, "check_examples": 16, "solver_steps": 2} if args.quick else {}
    for request, gold, make in (("IR", "gold-IR", lambda: InstanceRemoval(f01_examples)),
                                ("RC", "gold-RC", lambda: ResponseCorrection(rc_old, rc_new)),
                                ("QM", "gold-QM", lambda: QueryModification(qm_old, qm_new))):
        if not pending(request, "erase() defaults"):
            continue
        model = fresh()
        report = erase(model, make(), train, progress=False, **erase_options)
        row(request, "erase() defaults", model, sum(report.seconds.values()), gold, report)
    if pending("IR", "gradient ascent, 1 epoch"):
        model = fresh()
        row("IR", "gradient ascent, 1 epoch", model, tune(model, f01_examples, tokenizer, args.lr, ascent=True),
            "gold-IR")
    if pending("IR", "GradDiff on the adapter, 1 epoch"):
        model = fresh()
        row("IR", "GradDiff on the adapter, 1 epoch", model,
            tune(model, f01_examples, tokenizer, args.lr, ascent=True, retain=others), "gold-IR")
    if args.skip_mape:
        rows.append({"request": "IR", "method": args.skip_mape, "skipped": True})
    else:
        mape_row(fresh().merge_and_unload(), f01_examples, others, ex(holdout), row, args)
    for request, gold, new in (("RC", "gold-RC", rc_new), ("QM", "gold-QM", qm_new)):
        model = fresh()
        row(request, "fine-tune 1 epoch on the edited examples", model, tune(model, new, tokenizer, args.lr), gold)

    meta = {"num_train": len(sets["corrupted"]), "edited": edited, "noise": NOISE, "resumed_rows": len(resumed),
            "total_minutes": (time.perf_counter() - clock) / 60, "recipe": asdict(recipe),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    stem = "llmeraser_tofu"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    (args.out / f"{stem}.md").write_text(markdown(args, rows, meta))
    plot(rows, args.out / f"{stem}.png")
    print(markdown(args, rows, meta))


if __name__ == "__main__":
    main()
