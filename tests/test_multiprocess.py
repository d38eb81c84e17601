"""Unchanged user code under ``torchrun --nproc_per_node 2`` (gloo, CPU): the library shares every
pass out between the processes and gives every rank the one-process result.

``multiprocess_worker.py`` runs MAPE's loop methods (GradDiff with a holdout, NPO), its
closed-form influence step, memory-aided successive requests, the LoRA and SalUn baselines, an
LLMEraser edit and a few steps of ``UnlearningTrainer`` (DDP through the Trainer's accelerate),
once alone and once in two processes, and writes what each produced.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_mape.common import distributed

WORKER = Path(__file__).with_name("multiprocess_worker.py")
LOOP_RUNS = ("graddiff", "npo")
MAPE_RUNS = LOOP_RUNS + ("influence",)


def _run(command: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun is not installed")
    out = tmp_path_factory.mktemp("multiprocess")
    _run([sys.executable, str(WORKER)], out)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER)], out)

    def load(name):
        return torch.load(out / name, weights_only=False)

    return {"one": load("rank0-of-1.pt"), "ranks": [load("rank0-of-2.pt"), load("rank1-of-2.pt")], "out": out}


def test_every_rank_ends_with_the_same_weights(runs):
    first, second = runs["ranks"]
    for name, result in first.items():
        if not isinstance(result, dict):
            continue
        other = second[name]["state"]
        assert result["state"].keys() == other.keys()
        assert all(torch.equal(value, other[key]) for key, value in result["state"].items()), name


def test_the_selection_and_the_stopping_equal_one_process(runs):
    one, (first, _) = runs["one"], runs["ranks"]
    for name in MAPE_RUNS:
        assert (first[name]["heads"], first[name]["filters"]) == (one[name]["heads"], one[name]["filters"]), name
        assert first[name]["steps"] == one[name]["steps"], name
        assert first[name]["forget_loss_after"] == pytest.approx(one[name]["forget_loss_after"], rel=1e-4), name
    for (heads, filters, loss), (heads_one, filters_one, loss_one) in zip(first["successive"]["log"],
                                                                          one["successive"]["log"]):
        assert (heads, filters) == (heads_one, filters_one) and loss == pytest.approx(loss_one, rel=1e-4)
    for name in ("lora", "salun", "trainer"):
        assert first[name]["steps"] == one[name]["steps"], name
    assert (first["trainer"]["processes"], one["trainer"]["processes"]) == (2, 1)
    # the Trainer (DDP through accelerate) runs after the library's statistics and search
    assert (first["trainer"]["heads"], first["trainer"]["filters"]) == (one["graddiff"]["heads"],
                                                                        one["graddiff"]["filters"])


def test_closed_form_steps_equal_one_process(runs):
    """Sums of gradients and Hessian-vector products over the shards are the one-process sums."""
    one, (first, _) = runs["one"], runs["ranks"]
    for name in ("influence", "erase"):
        for key, value in first[name]["state"].items():
            assert torch.allclose(value, one[name]["state"][key], rtol=1e-4, atol=1e-7), (name, key)


def test_each_rank_processes_half_of_the_examples(runs):
    one, ranks = runs["one"], runs["ranks"]
    for name in MAPE_RUNS:
        shares = [r[name]["rows"] / one[name]["rows"] for r in ranks]
        assert all(0.45 <= share <= 0.55 for share in shares), (name, shares)


def test_the_main_process_saves_the_adapter_every_rank_holds(runs):
    saved = load_file(runs["out"] / "adapters-2" / "npo" / "adapter_model.safetensors")
    state = runs["ranks"][1]["npo"]["state"]
    deltas = {key.replace(".default", ""): value for key, value in state.items()}
    assert deltas and all(torch.equal(saved[key], value) for key, value in deltas.items())


def test_rows_split_across_ranks_join_back_in_order(monkeypatch):
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5), "note": "kept"}
    pieces = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        local, size = distributed.split_rows(batch)
        assert size == 5 and local["note"] == "kept"
        pieces.append(local["labels"])
    assert [p.tolist() for p in pieces] == [[0, 3], [1, 4], [2]]
    assert distributed._interleave(pieces, 5).tolist() == list(range(5))
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    assert distributed.split_rows({"labels": torch.arange(2)}) == (None, 2)
    assert distributed.split_rows({"labels": torch.arange(1)}) == (None, 1)  # a rank past a 1-row batch


def test_ranks_holding_other_data_get_a_clear_error_on_every_rank(runs):
    for result in runs["ranks"]:
        assert "hold other examples than rank 0" in result["mismatch"]
