"""The FSDP2 path, under ``torchrun --nproc_per_node 2`` (gloo, CPU), or alone for the reference.

Stage 1 finds the units on a sharded model (``select_units``); stage 2 builds a fresh model
whose adapter is allocated from that selection, shards it (``fully_shard``: static delta shapes)
and runs ``unlearn(selection="allocated")``; the gathered adapter is saved by the main process.
Alone (one process, no sharding) it runs the same two stages for the reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import get_peft_model  # noqa: E402

import peft_mape  # noqa: E402
from multiprocess_worker import examples, finish, memorised  # noqa: E402


def memorised_llama():
    # odd sizes: some batches leave a rank without rows
    return memorised("llama", examples(9, seed=1, causal=True), examples(31, seed=2, causal=True), epochs=10, lr=1e-2)


def shard(model) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    inner = model.get_base_model()  # the library runs the transformers model's forward: shard it as the root
    for layer in inner.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(inner, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    base, forget, retain = memorised_llama()
    options = dict(batch_size=4, progress=False)

    searched = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.8))
    if world > 1:
        shard(searched)
    selection = searched.select_units(forget, retain, **options)

    model = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.8, selection=selection))
    if world > 1:
        shard(model)
    report = model.unlearn(forget, retain, selection="allocated", max_steps=12, **options)
    refused = ""
    if world > 1:  # closed-form steps need Hessian-vector products, which FSDP2 does not run
        other = get_peft_model(copy.deepcopy(base), peft_mape.MAPEConfig(sparsity=0.8, selection=selection))
        shard(other)
        try:
            other.unlearn(forget, retain, method="influence", selection="allocated", **options)
        except ValueError as error:
            refused = str(error)
    state = peft_mape.gathered_state_dict(model)
    if peft_mape.is_main_process():
        model.save_pretrained(Path(args.out) / f"fsdp-adapter-{world}", state_dict=state)
        torch.save({"selection": selection, "state": state, "steps": report.steps,
                    "forget_loss_after": report.forget_loss_after, "update_norm": report.update_norm,
                    "refused": refused, "dtensor": any(type(p).__name__ == "DTensor" for p in model.parameters())},
                   Path(args.out) / f"fsdp-{world}.pt")
    finish()


if __name__ == "__main__":
    main()
