"""One user script, run alone or under ``torchrun --nproc_per_node 2``: the same calls either way.

It unlearns with several methods on a tiny memorised BERT (and edits a tiny LoRA) and writes,
per process, what each run produced (adapter tensors, selection, steps) and how many example
rows each process pushed through the model. ``tests/test_multiprocess.py`` compares the files.
Nothing here knows about processes except the file name it writes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mape_devkit.tiny import model_from_config, tiny_config  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_mape  # noqa: E402
from peft_mape.baselines import lora_unlearn, salun_unlearn  # noqa: E402
from peft_mape.common.data import make_loader  # noqa: E402
from peft_mape.llmeraser import ResponseCorrection, erase  # noqa: E402

VOCAB = 40


def examples(n: int, seed: int, *, causal: bool = False) -> list[dict]:
    """Token sequences of 4-6 tokens with class labels, or (``causal``) themselves as labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = 6 - i % 3
        ids = torch.randint(2, VOCAB, (size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(size, dtype=torch.long),
                    "labels": ids.clone() if causal else torch.randint(0, 3, (), generator=g)})
    return out


def memorised(kind: str, forget: list[dict], retain: list[dict], *, epochs: int, lr: float):
    """A tiny ``kind`` model (seed 0) trained on forget + retain until it fits them."""
    torch.manual_seed(0)
    model = model_from_config(tiny_config(kind, vocab_size=VOCAB), causal=kind == "llama")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in make_loader(forget + retain, 10, shuffle=True):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), forget, retain


def memorised_bert():
    return memorised("bert", examples(10, seed=1), examples(40, seed=2), epochs=40, lr=3e-3)


class RowCounter:
    """Example rows through the base model's forward, over every call."""

    def __init__(self, module):
        self.rows = 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += int(ids.shape[0])


def mape_run(base, forget, retain, **options):
    model = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.9))
    counter = RowCounter(model.get_base_model())
    report = model.unlearn(forget, retain, progress=False, **options)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "mape" in n}
    out = {"state": state, "rows": counter.rows, "steps": report.steps, "heads": report.selected_heads,
           "filters": report.selected_filters, "forget_loss_after": report.forget_loss_after}
    model.save_pretrained(SAVE / options.get("method", "default"), is_main_process=peft_mape.is_main_process())
    return out


def main() -> None:
    global SAVE
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    SAVE = Path(args.out) / f"adapters-{os.environ.get('WORLD_SIZE', '1')}"
    base, forget, retain = memorised_bert()
    holdout = examples(30, seed=3)
    results = {
        "graddiff": mape_run(base, forget, retain, holdout=holdout),
        "npo": mape_run(base, forget, retain, method="npo", max_steps=20),
        "influence": mape_run(base, forget, retain, method="influence", num_train_examples=50),
    }
    successive = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.9))
    successive.precompute_retain_statistics(retain, progress=False)
    for part in (forget[:5], forget[5:]):
        successive.unlearn_request(part, retain, mode="memory_aided", max_steps=20, progress=False)
    results["successive"] = {"state": {n: p.detach().clone() for n, p in successive.named_parameters() if "mape" in n},
                             "log": [(r["num_selected_heads"], r["num_selected_filters"], r["forget_loss_after"]) for r in successive.request_log.to_dict()["requests"]]}
    lora, lora_report = lora_unlearn(copy.deepcopy(base), forget, retain, method="graddiff", max_steps=10,
                                     progress=False)
    results["lora"] = {"state": {n: p.detach().clone() for n, p in lora.named_parameters() if "lora" in n},
                       "steps": lora_report["steps"]}
    salun = salun_unlearn(base, forget, retain, density=0.05, max_steps=10, progress=False)  # in place
    results["salun"] = {"state": {n: p.detach().clone() for n, p in base.named_parameters()},
                        "steps": salun["steps"]}

    from transformers import TrainingArguments

    trained = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.9))
    trainer = peft_mape.UnlearningTrainer(
        trained, TrainingArguments(output_dir=str(Path(args.out) / "trainer"), max_steps=4, per_device_train_batch_size=2,
                                   learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                   disable_tqdm=True, logging_steps=100),
        forget=forget, retain=retain, progress=False)
    trainer.train()
    results["trainer"] = {"state": {n: p.detach().clone() for n, p in trained.named_parameters() if "mape" in n},
                          "heads": trainer.report().selected_heads, "filters": trainer.report().selected_filters,
                          "steps": trainer.state.global_step, "processes": trainer.args.world_size}

    torch.manual_seed(0)
    lora = get_peft_model(model_from_config(tiny_config("bert", vocab_size=VOCAB), causal=False),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    train = examples(40, seed=4)
    old = train[:4]
    report = erase(lora, ResponseCorrection(old, [dict(e, labels=(e["labels"] + 1) % 3) for e in old]), train,
                   progress=False)
    results["erase"] = {"state": {n: p.detach().clone() for n, p in lora.named_parameters() if "lora" in n},
                        "scale": report.scale}
    mismatch = ""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank passing its own part of the data
        mine = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.9))
        try:
            mine.unlearn(forget[rank::2], retain, progress=False)
        except ValueError as error:
            mismatch = str(error)
    results["mismatch"] = mismatch
    torch.save(results, Path(args.out) / f"rank{rank}-of-{os.environ.get('WORLD_SIZE', '1')}.pt")
    finish()


def finish() -> None:
    """Leave together, then exit at once: the results are written, and a gloo group's threads
    can still abort a process during interpreter shutdown ("terminate called without an active
    exception"; seen in 2 of about 15 runs here), which would fail the test after the work is done."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


SAVE = Path(".")
if __name__ == "__main__":
    main()
