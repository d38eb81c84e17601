"""S3T vs SISA-style shards vs one retrained LoRA on MiniLM + tweets: accuracy under deletions.

All three methods run through ``S3TModel`` so they share data handling, seeds and training code:

* S3T (B = 1..L): m shards × L slices, L layer blocks; deletions only deactivate blocks.
* SISA-style: m shards, one slice, one LoRA over all layers per shard; a deletion retrains the
  affected shard (``retrain_failed``).
* Full retrain: one shard, one slice; a deletion retrains the single LoRA from scratch.

The same seeded random sequence of training ids is deleted from every method. Latency is the
wall time per deletion request until an unlearned model serves again: ``delete`` alone for S3T
(every request timed), ``delete`` + retraining for the baselines (timed on the schedule's first,
single-request batch; later requests are retrained once per evaluation point, which yields the
same models as retraining after each request because stage seeds depend only on the shard and
slice order). Storage is the size of ``S3TModel.save`` output (adapters, heads, registry).

Usage: python benchmarks/s3t_tweets.py [--train 600 --test 300 --deletions 0,1,2,4,8 ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mape_devkit: the repository's helpers
from mape_devkit import assets  # noqa: E402
from peft_mape.s3t import S3TConfig, S3TModel, deletion_capacity

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600, help="training tweets")
    parser.add_argument("--test", type=int, default=300, help="held-out tweets for accuracy")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2, help="m")
    parser.add_argument("--slices", type=int, default=3, help="L (MiniLM has 6 layers)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--deletions", default="0,1,2,4,8", help="cumulative deletion counts to evaluate at")
    parser.add_argument("--budgets", default="", help="S3T budgets B to run, e.g. '1,2' (default: 1..L)")
    parser.add_argument("--capacity-trials", type=int, default=500, help="random schedules replayed per method")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU seconds, robust to other jobs on a shared machine (use with --threads 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def load_data(args):
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tweets = assets.load_tweets().shuffle(seed=args.seed).select(range(args.train + args.test))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    encoded = tweets.map(tokenize, batched=True, remove_columns=["text"])
    return encoded.select(range(args.train)), encoded.select(range(args.train, args.train + args.test))


def make_config(args, shards, slices, budget):
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=["query", "value"])
    return S3TConfig(lora=lora, num_shards=shards, num_slices=slices, budget=budget, epochs_per_stage=args.epochs,
                     learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)


def storage_mb(s3t):
    with tempfile.TemporaryDirectory() as tmp:
        path = s3t.save(Path(tmp) / "s3t")
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def empirical_capacity(registry, trials, seed):
    """Mean number of random single-id deletions until no shard serves, on the trained registry.

    Only provenance bookkeeping runs here (no model), so many schedules are cheap to replay.
    """
    # A seed of its own: default_rng(seed) would replay the very permutation that assigned the
    # ids to slices, deleting one whole slice after another in the first trial.
    rng = np.random.default_rng([seed, 1])
    counts = []
    for _ in range(trials):
        replay = copy.deepcopy(registry)
        for count, example_id in enumerate(rng.permutation(replay.active_ids()), start=1):
            replay.delete(int(example_id))
            if all(replay.served_prefix(s)[1] == 0 for s in range(replay.num_shards)):
                counts.append(count)
                break
    return float(np.mean(counts))


def run_method(name, config, retrains, train, test, schedule, points, capacity_trials, clock):
    torch.manual_seed(config.seed)  # the same random classifier init for every method
    model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=3)
    s3t = S3TModel(model, config)
    start = clock()
    s3t.fit(train, progress=False)
    result = {"method": name, "fit_s": clock() - start, "storage_mb": storage_mb(s3t),
              "capacity_closed_form": deletion_capacity(config.num_shards, config.num_slices, config.budget),
              "capacity_empirical": empirical_capacity(s3t.registry, capacity_trials, config.seed),
              "points": []}
    latencies, done = [], 0
    for target in points:
        batch = schedule[done:target]
        if retrains and batch:
            # Only the schedule's first request is timed alone; later ones are retrained per batch.
            start = clock()
            s3t.delete(batch)
            s3t.retrain_failed(progress=False)
            if not latencies and len(batch) == 1:
                latencies.append(clock() - start)
        for example_id in batch if not retrains else []:
            start = clock()
            s3t.delete(example_id)
            latencies.append(clock() - start)
        done = target
        served = s3t.served_prefixes()
        live = [depth for _, depth in served.values() if depth > 0]
        accuracy = s3t.evaluate(test) if live else None
        result["points"].append({
            "deletions": target, "accuracy": accuracy, "live_shards": len(live),
            "mean_served_depth": float(np.mean([d for _, d in served.values()])),
            "latency_s": float(np.mean(latencies)) if latencies else None,
        })
        print(f"{name:>14} | {target:>3} deletions | acc {accuracy if accuracy is None else round(accuracy, 4)}"
              f" | live shards {len(live)}", flush=True)
    return result


def markdown(args, results, threads, total_s):
    lines = [
        f"MiniLM-L6 + tweets: {args.train} train / {args.test} test tweets, max_length {args.max_length}, "
        f"LoRA r={args.rank} on query/value, m={args.shards}, L={args.slices}, {args.epochs} epoch(s) per stage, "
        f"lr {args.lr}, seed {args.seed}; CPU, {threads} torch thread(s), {total_s / 60:.1f} min in all "
        f"({'process CPU time' if args.clock == 'cpu' else 'wall-clock time'}, which all timings use). "
        "Accuracy on held-out tweets after deleting the same random training tweets from every method; "
        "'failed' = every shard lost its whole prefix (S3T needs `retrain_failed()`). "
        "Latency = seconds per deletion request until an unlearned model serves.",
        "",
        "| method | #deletions | accuracy | deletion latency (s) | storage MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for result in results:
        for point in result["points"]:
            accuracy = "failed" if point["accuracy"] is None else f"{point['accuracy']:.3f}"
            latency = "–" if point["latency_s"] is None else f"{point['latency_s']:.4f}"
            lines.append(f"| {result['method']} | {point['deletions']} | {accuracy} | {latency} | "
                         f"{result['storage_mb']:.2f} |")
    lines += [
        "",
        f"Deletion capacity = requests until no shard serves without retraining (closed form mL·H_{{mB'}}; "
        f"empirical: mean over {args.capacity_trials} random deletion orders replayed on the trained registry). "
        "The baselines retrain instead of failing.",
        "",
        "| method | capacity (closed form) | capacity (empirical) | training time (s) |",
        "|---|---:|---:|---:|",
    ]
    for result in results:
        lines.append(f"| {result['method']} | {result['capacity_closed_form']:.1f} | "
                     f"{result['capacity_empirical']:.1f} | {result['fit_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    points = sorted({int(p) for p in args.deletions.split(",")})
    if points[-1] > args.train:
        raise ValueError(f"cannot delete {points[-1]} of {args.train} training tweets")
    train, test = load_data(args)
    schedule = [int(i) for i in np.random.default_rng(args.seed + 1).permutation(train["id"])[: points[-1]]]
    budgets = sorted({int(b) for b in args.budgets.split(",")}) if args.budgets else range(1, args.slices + 1)
    runs = [(f"S3T B={b}", make_config(args, args.shards, args.slices, b), False) for b in budgets]
    runs += [("SISA shards", make_config(args, args.shards, 1, 1), True),
             ("full retrain", make_config(args, 1, 1, 1), True)]
    started = clock()
    results = [run_method(name, config, retrains, train, test, schedule, points, args.capacity_trials, clock)
               for name, config, retrains in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"clock": args.clock, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "threads": torch.get_num_threads(), "total_s": clock() - started,
               "results": results}
    (args.out / "s3t_tweets.json").write_text(json.dumps(payload, indent=1))
    table = markdown(args, results, payload["threads"], payload["total_s"])
    (args.out / "s3t_tweets.md").write_text(table)
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
