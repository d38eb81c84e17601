"""S3T on TOFU-mini: exact, training-free erasure of whole authors from SmolLM2-135M LoRA shards.

Training set: retain300 + forget05 (500 questions, 25 fictitious authors of 20 consecutive
questions each). The request: erase forget01 (the last 2 authors of forget05, 40 questions).
Every row runs through ``peft_mape.s3t.S3TModel(task="causal_lm")``, so data handling, seeds,
the LoRA recipe and the training loop are shared:

(a) one LoRA on all 500 questions (``num_shards=1, num_slices=1``);
(b) gold: the same LoRA retrained without forget01 (exact by construction; costs a retrain);
(c) S3T, m shards × L slices × B orders, before the request;
(d) S3T after ``delete(forget01 ids)``: the stage adapters trained on those slices are dropped
    and each affected shard serves its longest surviving prefix; no training.

User-level sharding: examples are assigned to (shard, slice) BY AUTHOR (``fit(assignment=)``,
a seeded balanced split of the 25 authors over the m·L slices), so all 20 questions of an author
share one slice — the sharding a GDPR deployment would use, keyed by data subject: a subject's
erasure request then lands in one slice of one shard, however many of their records it covers,
instead of truncating a slice of every shard. With B = 1 a request whose slice comes first in
its shard's order fails that shard (depth 0): it drops out of the mixture until
``retrain_failed()``; the table says what happened.

LoRA (r, alpha = 2r, q_proj/v_proj) sits on the top ``--lora-layers`` decoder layers only, split
into L blocks top first: on 2 CPU cores the backward pass then stops at those layers (the setup
``_tofu_setup.py`` uses for its full fine-tunes). The loss is each example's mean answer-token
cross-entropy, averaged over the batch; AdamW at a constant lr (S3T stages have no schedule, unlike
``_tofu_setup.Recipe``'s warm-up). lr 5e-3: in a pilot (80 forget05 questions, 2 epochs) lr
1e-3 / 4e-3 / 1e-2 / 2e-2 gave train-set answer probabilities 0.30 / 0.42 / 0.50 / 0.45 against
0.25 / 0.25 / 0.23 / 0.17 on unseen authors; 5e-3 trades some memorisation for utility.

Metrics: ``tofu_mini.py``'s Evaluator (``peft_mape.evaluation.tofu.evaluate_splits``: answer
probability, truth ratio, ROUGE-L recall; forget quality = KS p-value of the forget truth ratios
against (b)'s; model utility) on the same seeded subsets, with ROUGE-L on every forget question.
Every row is scored through ``S3TModel.as_causal_lm()``: the log of the mean of the live shards'
token probabilities, and greedy decoding of that mixture. A consistency check compares
``S3TModel.answer_log_probs`` (which scores answer tokens only) with the library's scorer on the
wrapper. Also reported: deletion latency (``delete()`` ms vs (b)'s retraining seconds),
storage (bytes written by ``S3TModel.save``), and an exactness check (after the deletion every
live shard's logits equal, bit for bit, that shard's prefix recorded before it).

Usage: python benchmarks/s3t_tofu.py [--threads 2] [--quick] [--shards 2 --slices 2 --budget 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tofu_setup as setup  # noqa: E402
from tofu_mini import Evaluator, with_swapped_answers  # noqa: E402  (the same evaluation subsets)

from peft_mape.common.causal_lm import (  # noqa: E402
    answer_log_probs, build_qa_dataset, format_answer, format_prompt,
)
from peft_mape.evaluation.tofu import (  # noqa: E402
    tofu_summary,
)
from peft_mape.s3t import S3TConfig, S3TModel  # noqa: E402
from peft_mape.s3t.blocks import split_layers  # noqa: E402
from peft_mape.s3t.registry import assign_balanced  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS_PER_AUTHOR = 20
TEMPLATE = setup.Recipe.template


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 authors x 3 questions, 1 epoch, 4 questions per evaluation split")
    p.add_argument("--shards", type=int, default=2, help="m")
    p.add_argument("--slices", type=int, default=2, help="L (also the number of layer blocks)")
    p.add_argument("--budget", type=int, default=1, help="B, slice orders per shard")
    p.add_argument("--rank", type=int, default=8, help="LoRA r (alpha = 2r)")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules")
    p.add_argument("--lora-layers", type=int, default=8, help="top decoder layers carrying LoRA")
    p.add_argument("--epochs", type=int, default=2, help="epochs per stage")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=setup.Recipe.max_length)
    p.add_argument("--max-answer-tokens", type=int, default=setup.Recipe.max_answer_tokens)
    p.add_argument("--retain-eval", type=int, default=16, help="retain300 questions evaluated")
    p.add_argument("--authors-eval", type=int, default=40, help="real_authors questions evaluated")
    p.add_argument("--facts-eval", type=int, default=16, help="world_facts questions evaluated")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="greedy answer length for ROUGE-L on real_authors / world_facts (forget and retain: "
                   "--max-answer-tokens, as in tofu_mini.py)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--generation-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="S3T seed and the author -> slice assignment")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.quick_questions = None
    if args.quick:
        args.quick_questions, args.epochs, args.new_tokens = 3, 1, 8
        args.retain_eval = args.authors_eval = args.facts_eval = 4
    return args


def training_records(data, args):
    """(records, author of each, ids of the forget01 questions); ids are positions in the list."""
    records = data["retain300"] + data["forget05"]
    if len(records) % QUESTIONS_PER_AUTHOR:
        raise SystemExit(f"expected whole authors of {QUESTIONS_PER_AUTHOR} questions, got {len(records)} questions")
    authors = [i // QUESTIONS_PER_AUTHOR for i in range(len(records))]
    forget = {r["question"] for r in data["forget01"]}
    if args.quick:  # two retain authors and the two forget01 authors, a few questions each
        last = authors[-1]
        keep = [i for i in range(len(records)) if authors[i] in (0, 1, last - 1, last)
                and i % QUESTIONS_PER_AUTHOR < args.quick_questions]
        records, authors = [records[i] for i in keep], [authors[i] for i in keep]
    deleted = [i for i, r in enumerate(records) if r["question"] in forget]
    erased = {authors[i] for i in deleted}
    if sorted(deleted) != [i for i, a in enumerate(authors) if a in erased]:
        raise SystemExit("forget01 does not cover whole authors of the training set")
    return records, authors, deleted


def s3t_config(args, shards, slices, budget, num_layers):
    top = list(range(num_layers - args.lora_layers, num_layers))
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=[t.strip() for t in args.targets.split(",")])
    return S3TConfig(lora=lora, task="causal_lm", num_shards=shards, num_slices=slices, budget=budget,
                     layer_blocks=split_layers(top, slices), epochs_per_stage=args.epochs, learning_rate=args.lr,
                     batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, seed=args.seed)


def train(label, config, dataset, assignment):
    """A fitted S3TModel on a fresh SmolLM2 and its training seconds; prints every stage."""
    s3t = S3TModel(setup.load_base_model(), config)
    start = time.perf_counter()

    def report(info, _):
        print(f"  {label}: stage {info.adapter} ({len(info.example_ids)} questions, layers "
              f"{min(info.layers)}-{max(info.layers)}) loss {info.mean_loss:.3f} at "
              f"{time.perf_counter() - start:.0f}s", flush=True)

    s3t.fit(dataset, assignment=assignment, on_stage_end=report, progress=False)
    return s3t, time.perf_counter() - start


def storage_bytes(s3t) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = s3t.save(Path(tmp) / "s3t")
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evaluator(tokenizer, data, num_forget, args) -> Evaluator:
    """tofu_mini.py's TOFU metrics on the same seeded subsets, ROUGE-L on every forget question;
    S3T rows are scored through ``S3TModel.as_causal_lm()``, the live shards' mixture."""
    settings = argparse.Namespace(**vars(args), forget_rouge=num_forget, facts_new_tokens=args.new_tokens)
    return Evaluator(tokenizer, settings, data)


def library_agreement(s3t, tokenizer, records, args) -> float:
    """Max |difference| of per-token answer log-probs: S3T's scorer vs the library's
    ``answer_log_probs`` on the wrapper's full ``.logits`` (a consistency check, 4 questions)."""
    records = records[:4]
    prompts = [format_prompt(r["question"], tokenizer, TEMPLATE) for r in records]
    answers = [format_answer(r["answer"], TEMPLATE) for r in records]
    ours = s3t.answer_log_probs(build_qa_dataset(tokenizer, [r["question"] for r in records],
                                                 [r["answer"] for r in records], template=TEMPLATE,
                                                 max_length=args.max_length, max_answer_tokens=args.max_answer_tokens))
    theirs = answer_log_probs(s3t.as_causal_lm(), tokenizer, prompts, answers, max_length=args.max_length,
                              max_answer_tokens=args.max_answer_tokens)
    return float((ours - torch.as_tensor(theirs.mean)).abs().max())


def padded(dataset, pad_token_id) -> dict:
    """A right-padded batch of a few rows' model inputs."""
    width = max(len(r) for r in dataset["input_ids"])
    return {k: torch.tensor([r + [v] * (width - len(r)) for r in dataset[k]])
            for k, v in (("input_ids", pad_token_id), ("attention_mask", 0))}


def prefix_logits(s3t, probe) -> dict:
    """(shard, order, depth) -> logits of every live prefix of every order."""
    registry = s3t.registry
    return {(s, b, d): s3t.stage_logits(s, b, d, probe) for s in range(registry.num_shards)
            for b in range(len(registry.orders[s])) for d in range(1, registry.served_depth(s, b) + 1)}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = {name: setup.load_split(name) for name in ("retain300", "forget05", "forget01", "real_authors",
                                                      "world_facts")}
    records, authors, deleted = training_records(data, args)
    tokenizer = setup.load_tokenizer()
    recipe = setup.Recipe(max_length=args.max_length, max_answer_tokens=args.max_answer_tokens)
    dataset = setup.qa_dataset(tokenizer, records, recipe).add_column("id", list(range(len(records))))
    kept = sorted(set(range(len(records))) - set(deleted))
    num_layers = AutoConfig.from_pretrained(setup.assets.smollm_checkpoint()).num_hidden_layers
    slots = assign_balanced(sorted(set(authors)), args.shards, args.slices, args.seed)  # author -> (shard, slice)
    assignment = {i: slots[a] for i, a in enumerate(authors)}
    forget_records = with_swapped_answers([records[i] for i in deleted])
    metrics = evaluator(tokenizer, data, len(forget_records), args)
    erased_authors = sorted({authors[i] for i in deleted})
    print(f"{len(records)} training questions of {len(set(authors))} authors; erasing {len(deleted)} questions of "
          f"authors {erased_authors} at (shard, slice) {[slots[a] for a in erased_authors]}", flush=True)
    rows, evaluations = [], {}

    def add(label, s3t, seconds, **extra):
        t = time.perf_counter()
        evaluations[label] = metrics.evaluate(s3t.as_causal_lm(), forget_records)
        rows.append({"method": label, "train_seconds": seconds, "storage_bytes": storage_bytes(s3t),
                     "served": {str(k): v for k, v in s3t.served_prefixes().items()},
                     "eval_seconds": time.perf_counter() - t, **extra})
        print(f"  {label}: evaluated in {rows[-1]['eval_seconds']:.0f}s", flush=True)

    single = s3t_config(args, 1, 1, 1, num_layers)
    full, seconds = train("full", single, dataset, {i: (0, 0) for i in range(len(records))})
    agreement = library_agreement(full, tokenizer, forget_records, args)
    add("(a) one LoRA, all data", full, seconds)
    del full
    gold, gold_seconds = train("gold", single, dataset.select(kept), {i: (0, 0) for i in kept})
    add("(b) gold: retrained without forget01", gold, gold_seconds)
    del gold
    s3t, seconds = train("s3t", s3t_config(args, args.shards, args.slices, args.budget, num_layers), dataset,
                         assignment)
    tag = f"S3T {args.shards}x{args.slices} B={args.budget}"
    add(f"(c) {tag}, before", s3t, seconds)
    probe = padded(dataset.select(deleted[:4]), tokenizer.pad_token_id)  # questions of the erased authors
    before = prefix_logits(s3t, probe)
    report = s3t.delete(deleted)
    retrain_seconds = None
    if len(report.failed_shards) == args.shards:  # nothing left to serve: only a rebuild helps
        t = time.perf_counter()
        s3t.retrain_failed(progress=False)
        retrain_seconds = time.perf_counter() - t
    # After a rebuild the check does not apply (the rebuilt stages are new); otherwise every live
    # shard must serve exactly a prefix it served before, now that the deleted slices are gone.
    exact = None if retrain_seconds is not None else all(
        torch.equal(s3t.shard_logits(s, probe), before[(s, *s3t.served_prefixes()[s])])
        for s in range(args.shards) if s not in report.failed_shards)
    for i in deleted:
        s3t.registry.prove_deleted(i)
    deletion = {"ids": len(deleted), "authors": erased_authors, "slots": [list(slots[a]) for a in erased_authors],
                "latency_ms": report.latency_s * 1e3, "gold_retrain_seconds": gold_seconds,
                "revoked_adapters": list(report.revoked_adapters), "failed_shards": list(report.failed_shards),
                "truncated": [[t.shard, t.order_index, t.depth_before, t.depth_after] for t in report.truncated],
                "retrain_failed_seconds": retrain_seconds, "exact_prefix_check": exact, "proofs": len(deleted)}
    add(f"(d) {tag}, after delete(forget01)", s3t, None, deletion_latency_ms=report.latency_s * 1e3)
    print(f"  delete(): {report.latency_s * 1e3:.1f} ms, revoked {list(report.revoked_adapters)}, failed shards "
          f"{list(report.failed_shards)}, exact prefix check {exact}; gold retrain {gold_seconds:.0f}s", flush=True)
    gold_ratios = evaluations["(b) gold: retrained without forget01"]["forget"].ratios
    for row in rows:
        splits = evaluations[row["method"]]
        row["metrics"] = tofu_summary(splits["forget"], splits["retain"], splits["real_authors"], splits["world_facts"],
                                      retrained_forget_ratios=gold_ratios)
        row["splits"] = {k: v.to_dict() for k, v in splits.items()}
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "threads": args.threads, "num_train": len(records), "num_authors": len(set(authors)),
            "num_eval": {k: len(v) for k, v in [("forget", forget_records)] + [
                (name, records) for name, (records, _) in metrics.utility_sets.items()]}, "library_scoring_max_abs_diff": agreement,
            "deletion": deletion, "rows": rows, "total_seconds": time.perf_counter() - start}


def markdown(results) -> str:
    a, d = results["args"], results["deletion"]
    n = results["num_eval"]
    lines = [
        f"SmolLM2-135M + LoRA (r={a['rank']}, {a['targets']}, top {a['lora_layers']} layers), {a['epochs']} epoch(s) "
        f"per stage, AdamW lr {a['lr']}, batch {a['batch_size']}; {results['num_train']} training questions of "
        f"{results['num_authors']} authors, assigned to (shard, slice) by author. S3T: {a['shards']} shards x "
        f"{a['slices']} slices, budget {a['budget']}. Request: forget01 ({d['ids']} questions of authors "
        f"{d['authors']}, in slots {d['slots']}). Metrics on {n['forget']} forget / {n['retain']} retain300 / "
        f"{n['real_authors']} real_authors / {n['world_facts']} world_facts questions; ensemble log-probs = log of "
        f"the mean of the live shards' probabilities; ROUGE-L on greedy answers of the mixture "
        f"({a['new_tokens']} tokens). {results['threads']} CPU thread(s); total "
        f"{results['total_seconds'] / 60:.1f} min.",
        "",
        "Prob = answer probability (forget/retain: P(a|q)^(1/|a|); authors/facts: normalised over the four options), "
        "TR = truth-ratio score, FQ = forget quality (KS p-value vs (b)), MU = model utility (harmonic mean of the "
        "nine retain / authors / facts numbers), as in tofu_mini.md.",
        "",
        "| model | forget Prob | forget ROUGE | forget TR | FQ | retain Prob | retain ROUGE | retain TR | authors Prob "
        "| authors ROUGE | facts Prob | facts ROUGE | MU | train (s) | storage (MB) | served (shard: order, depth) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        m = r["metrics"]
        numbers = " | ".join(f"{m[k]:.3f}" for k in ("forget probability", "forget rouge_l", "forget truth_ratio"))
        rest = " | ".join(f"{m[k]:.3f}" for k in ("retain probability", "retain rouge_l", "retain truth_ratio",
                                                 "real_authors probability", "real_authors rouge_l",
                                                 "world_facts probability", "world_facts rouge_l", "model utility"))
        secs = "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        served = ", ".join(f"{k}: {tuple(v)}" for k, v in r["served"].items())
        lines.append(f"| {r['method']} | {numbers} | {m['forget quality']:.2e} | {rest} | {secs} | "
                     f"{r['storage_bytes'] / 1e6:.2f} | {served} |")
    retrain = d["retrain_failed_seconds"]
    lines += [
        "",
        f"- Deletion latency: S3T delete() {d['latency_ms']:.1f} ms (no training) vs {d['gold_retrain_seconds']:.0f} s "
        "to retrain the gold LoRA." + (f" Every shard failed, retrain_failed() took {retrain:.0f} s." if retrain else ""),
        f"- Revoked adapters {d['revoked_adapters']}; failed shards {d['failed_shards']} (they leave the mixture); "
        f"truncations [shard, order, depth before, after]: {d['truncated']}.",
        f"- Exactness: every live shard's logits after the deletion equal its prefix's logits recorded before it, "
        f"bit for bit: {d['exact_prefix_check']}; registry proofs for all {d['proofs']} deleted ids passed.",
        f"- Scoring check: S3T's answer log-probs vs the library's answer_log_probs on the wrapper's logits, max "
        f"|diff| {results['library_scoring_max_abs_diff']:.1e} (per token).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "s3t_tofu_quick" if args.quick else "s3t_tofu"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    print("\n" + table)
    print(f"total {results['total_seconds'] / 60:.1f} min; results in {args.out}/{stem}.{{json,md}}")


if __name__ == "__main__":
    sys.exit(main())
