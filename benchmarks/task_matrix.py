"""The default ``unlearn()`` on a matrix of small tasks, each against its retrained model.

Every task is generated here (no download), trained from scratch, and has a gold standard: the
same initialisation trained with the same recipe on the data without the forget set.

- ``<kind>-mislabelled`` (bert, roberta, distilbert, gpt2, llama, qwen2 sequence classifiers;
  vit on 8x8 images): a learnable 3-class task; the forget set is 32 training examples whose
  labels were flipped and that the original memorised. Forget metric: the share of forget
  examples predicted with their (wrong) training label — lower is more forgotten.
- ``lm-random``: a tiny Llama LM trained on a Markov "language" plus 32 random sequences it
  memorised. Forget metric: the mean loss on those sequences — higher is more forgotten.

For each task and seed, the default call in three variants: with a holdout of the forget set's
kind (``matched holdout``: unseen examples mislabelled the same way; unseen random sequences),
with a clean holdout (classifiers: unseen correctly labelled examples — what a user may pass
first), and without a holdout; each against the original and the retrained model:
share of the way from the original to the retrained model on the forget metric, retain and test
change, loss-based MIA AUC (forget vs holdout), seconds. Writes JSON + Markdown + one plot.

    python benchmarks/task_matrix.py --out benchmarks/results/task_matrix
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peft_mape  # noqa: E402
from peft import get_peft_model  # noqa: E402
from peft_mape.common.data import make_eval_loader, make_loader, per_example_losses  # noqa: E402
from peft_mape.common.modes import eval_mode  # noqa: E402
from peft_mape.evaluation.classification import loss_mia_auc  # noqa: E402
from mape_devkit.tiny import model_from_config, tiny_config  # noqa: E402

CLASSIFIERS = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "vit")
VOCAB, LENGTH, CLASSES = 64, 12, 3
SIZES = dict(train=288, forget=32, holdout=128, test=256)


# ----------------------------------------------------------------------------- models
def new_model(kind: str, seed: int, causal: bool = False):
    """Hidden 64, 2 layers, 4 heads (GQA with 2 key/value heads for llama/qwen2)."""
    config = tiny_config(kind, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_labels=CLASSES)
    return model_from_config(config, causal=causal, seed=seed)


# ----------------------------------------------------------------------------- data
def classification_data(kind: str, seed: int) -> dict:
    """A learnable 3-class task: each class prefers its own 10 tokens (text) or has its own image
    template (vit); the forget examples' labels are flipped to another class."""
    g = torch.Generator().manual_seed(1000 + seed)
    templates = torch.randn(CLASSES, 3, 8, 8, generator=g)

    def example(label: int):
        if kind == "vit":
            return {"pixel_values": 0.7 * templates[label] + torch.randn(3, 8, 8, generator=g),
                    "labels": torch.tensor(label)}
        preferred = 2 + 10 * label + torch.randint(0, 10, (LENGTH,), generator=g)
        filler = 32 + torch.randint(0, VOCAB - 32, (LENGTH,), generator=g)
        ids = torch.where(torch.rand(LENGTH, generator=g) < 0.3, preferred, filler)
        return {"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": torch.tensor(label)}

    def sample(n):
        return [example(int(torch.randint(0, CLASSES, (), generator=g))) for _ in range(n)]

    data = {split: sample(n) for split, n in SIZES.items()}
    for e in data["forget"]:
        e["labels"] = (e["labels"] + 1 + torch.randint(0, CLASSES - 1, (), generator=g)) % CLASSES
    # The holdout of the forget set's kind: other unseen examples, mislabelled the same way.
    data["matched_holdout"] = [dict(e, labels=(e["labels"] + 1 + torch.randint(0, CLASSES - 1, (), generator=g))
                                    % CLASSES) for e in sample(SIZES["holdout"])]
    return data


def language_model_data(seed: int) -> dict:
    """A Markov "language" (each token has 3 likely successors) and random sequences to memorise."""
    g = torch.Generator().manual_seed(2000 + seed)
    successors = torch.randint(2, VOCAB, (VOCAB, 3), generator=g)
    length = 16

    def markov():
        ids = [int(torch.randint(2, VOCAB, (), generator=g))]
        for _ in range(length - 1):
            ids.append(int(successors[ids[-1], torch.randint(0, 3, (), generator=g)]))
        return torch.tensor(ids)

    def random_sequence():
        return torch.randint(2, VOCAB, (length,), generator=g)

    def lm(ids):
        return {"input_ids": ids, "attention_mask": torch.ones(len(ids), dtype=torch.long), "labels": ids.clone()}

    holdout = [lm(random_sequence()) for _ in range(64)]  # unseen sequences like the forget set
    return {"train": [lm(markov()) for _ in range(SIZES["train"])],
            "forget": [lm(random_sequence()) for _ in range(SIZES["forget"])],
            "holdout": holdout, "matched_holdout": holdout,
            "test": [lm(markov()) for _ in range(SIZES["test"])]}


# ----------------------------------------------------------------------------- training
def train(model, examples, *, epochs: int, lr: float, seed: int):
    """The task's recipe: Adam, batch 32, dropout off (the library's loop is for unlearning)."""
    loader = make_loader(examples, 32, 0, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    with eval_mode(model):
        for _ in range(epochs):
            for batch in loader:
                loss = per_example_losses(model, batch, None).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model


def evaluate(model, data: dict, causal: bool) -> dict:
    """Per-split loss and (classifiers) accuracy; loss-based MIA AUC of forget vs holdout."""
    out, losses = {}, {}
    with torch.no_grad(), eval_mode(model):
        for split in ("forget", "train", "holdout", "test"):
            values, correct = [], []
            for batch in make_eval_loader(data[split], 64, 0):
                values.append(per_example_losses(model, batch, None))
                if not causal:
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    correct.append(logits.argmax(-1) == batch["labels"])
            losses[split] = torch.cat(values)
            out[f"{split}_loss"] = float(losses[split].mean())
            if not causal:
                out[f"{split}_acc"] = 100.0 * float(torch.cat(correct).float().mean())
    out["mia_auc"] = loss_mia_auc(losses["forget"].numpy(), losses["holdout"].numpy())
    return out


def forget_metric(metrics: dict, causal: bool) -> float:
    return metrics["forget_loss"] if causal else metrics["forget_acc"]


def share_to_retrain(original: float, unlearned: float, retrained: float) -> float:
    gap = retrained - original
    return (unlearned - original) / gap if abs(gap) > 1e-9 else float("nan")


# ----------------------------------------------------------------------------- one task
def run_task(task: str, seed: int, args) -> list[dict]:
    causal = task == "lm-random"
    kind = "llama" if causal else task.split("-")[0]
    data = language_model_data(seed) if causal else classification_data(kind, seed)
    epochs = args.epochs
    t0 = time.perf_counter()
    original = train(new_model(kind, seed, causal), data["train"] + data["forget"], epochs=epochs, lr=args.lr,
                     seed=seed)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrained = train(new_model(kind, seed, causal), data["train"], epochs=epochs, lr=args.lr, seed=seed)
    retrain_seconds = time.perf_counter() - t0
    reference = {"original": evaluate(original, data, causal), "retrained": evaluate(retrained, data, causal)}
    rows = []
    variants = {"matched holdout": {"holdout": data["matched_holdout"]}, "no holdout": {}}
    if not causal:
        variants["clean holdout"] = {"holdout": data["holdout"]}
    chosen = [v.strip() for v in args.variants.split(",")] if args.variants else list(variants)
    for variant, kwargs in variants.items():
        if variant not in chosen:
            continue
        kwargs = dict(kwargs, **json.loads(args.options))
        model = get_peft_model(copy.deepcopy(original), peft_mape.MAPEConfig())
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = model.unlearn(data["forget"], data["train"], progress=False, seed=seed, **kwargs)
        seconds = time.perf_counter() - t0
        metrics = evaluate(model, data, causal)
        o, r = reference["original"], reference["retrained"]
        utility = "test_loss" if causal else "test_acc"
        row = {
            "task": task, "seed": seed, "variant": variant,
            "forget_metric": "forget loss" if causal else "forget labels fit %",
            "original": forget_metric(o, causal), "retrained": forget_metric(r, causal),
            "unlearned": forget_metric(metrics, causal),
            "share_to_retrain": share_to_retrain(forget_metric(o, causal), forget_metric(metrics, causal),
                                                 forget_metric(r, causal)),
            "test_change": metrics[utility] - o[utility],
            "retain_change": metrics["train_loss" if causal else "train_acc"] - o["train_loss" if causal else "train_acc"],
            "mia_auc": {"original": o["mia_auc"], "unlearned": metrics["mia_auc"], "retrained": r["mia_auc"]},
            "seconds": seconds, "retrain_seconds": retrain_seconds, "train_seconds": train_seconds,
            "steps": report.steps, "stopped": report.diagnostics.get("stopping", {}).get("stop_reason", ""),
            "checks": report.diagnostics.get("stopping", {}).get("checks", []),
            "warnings": report.warnings, "metrics": {"original": o, "unlearned": metrics, "retrained": r},
        }
        rows.append(row)
        print(f"{task:<22} seed {seed} {variant:<10} forget {row['original']:6.2f} -> {row['unlearned']:6.2f} "
              f"(retrain {row['retrained']:6.2f}, share {row['share_to_retrain']:+.2f})  test "
              f"{row['test_change']:+6.2f}  retain {row['retain_change']:+6.2f}  AUC {o['mia_auc']:.2f}->"
              f"{metrics['mia_auc']:.2f} (retrain {r['mia_auc']:.2f})  steps {report.steps:3d}  "
              f"{seconds:5.1f}s  {row['stopped'][:40]}", flush=True)
    return rows


# ----------------------------------------------------------------------------- output
def summarise(rows: list[dict]) -> str:
    lines = ["| task | variant | seeds | forget: original → unlearned (retrained) | share of the way | "
             "test change | retain change | MIA AUC unlearned (retrained) | seconds (retrain) |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["task"], row["variant"]), []).append(row)

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    for (task, variant), group in groups.items():
        m = {k: mean([r[k] for r in group]) for k in ("original", "unlearned", "retrained", "share_to_retrain",
                                                      "test_change", "retain_change", "seconds", "retrain_seconds")}
        auc = mean([r["mia_auc"]["unlearned"] for r in group])
        auc_r = mean([r["mia_auc"]["retrained"] for r in group])
        lines.append(f"| {task} | {variant} | {len(group)} | {m['original']:.2f} → {m['unlearned']:.2f} "
                     f"({m['retrained']:.2f}) | {m['share_to_retrain']:.2f} (min "
                     f"{min(r['share_to_retrain'] for r in group):.2f}) | {m['test_change']:+.2f} | "
                     f"{m['retain_change']:+.2f} | {auc:.2f} ({auc_r:.2f}) | {m['seconds']:.1f} "
                     f"({m['retrain_seconds']:.1f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, marker in (("matched holdout", "o"), ("clean holdout", "s"), ("no holdout", "x")):
        chosen = [r for r in rows if r["variant"] == variant]
        ax.scatter([r["share_to_retrain"] for r in chosen], [r["test_change"] for r in chosen], marker=marker,
                   label=variant)
        for r in chosen:
            ax.annotate(r["task"].split("-")[0], (r["share_to_retrain"], r["test_change"]), fontsize=7)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.75, color="green", lw=0.8, ls=":")
    ax.axhline(-3.0, color="red", lw=0.8, ls=":")
    ax.set_xlabel("share of the way to the retrained model (forget metric)")
    ax.set_ylabel("test change (accuracy points; loss for lm)")
    ax.set_title("default unlearn() on the task matrix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join([f"{k}-mislabelled" for k in CLASSIFIERS] + ["lm-random"]))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of the original and the retrain")
    parser.add_argument("--lr", type=float, default=3e-3, help="training step size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", default="{}",
                        help='JSON of unlearn() options instead of the defaults, e.g. \'{"per_example_cap": false}\'')
    parser.add_argument("--variants", default="", help="comma-separated subset of: matched holdout, no holdout, "
                        "clean holdout")
    parser.add_argument("--out", default="benchmarks/results/task_matrix")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        for seed in range(args.seeds):
            rows.extend(run_task(task, seed, args))
    table = summarise(rows)
    print(table)
    (out / "task_matrix.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    (out / "task_matrix.md").write_text("# Default unlearn() on the task matrix\n\n" + table + "\n")
    plot(rows, out / "task_matrix.png")


if __name__ == "__main__":
    main()
