"""The FSDP2 path on 2 CPU processes (gloo): search on a sharded model, then the update of an
adapter allocated from the selection before sharding; the same adapter as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP")
from torch.distributed.fsdp import fully_shard  # noqa: E402,F401  (FSDP2 is what the path needs)

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed")
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in ([sys.executable, str(WORKER)], [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER)]):
        done = subprocess.run(command + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, torch.load(out / "fsdp-1.pt", weights_only=False), torch.load(out / "fsdp-2.pt", weights_only=False)


def test_sharded_search_and_update_equal_one_process(runs):
    _, one, sharded = runs
    assert sharded["dtensor"] and not one["dtensor"]
    assert sharded["selection"] == one["selection"] and sharded["steps"] == one["steps"]
    assert sharded["forget_loss_after"] == pytest.approx(one["forget_loss_after"], rel=1e-5)
    deltas = [k for k in one["state"] if "mape_delta" in k]
    assert deltas and all(torch.allclose(sharded["state"][k], one["state"][k], atol=1e-6) for k in deltas)
    assert sharded["update_norm"] > 0


def test_the_gathered_adapter_saves_and_reloads_whole(runs):
    import fsdp_worker

    out, _, sharded = runs
    base, forget, _ = fsdp_worker.memorised_llama()
    reloaded = PeftModel.from_pretrained(base, str(out / "fsdp-adapter-2"))
    for name, value in reloaded.named_parameters():
        if "mape_delta" in name:
            assert torch.equal(value, sharded["state"][name]), name


def test_closed_form_methods_are_refused_on_a_sharded_model(runs):
    assert "FSDP2" in runs[2]["refused"] and "loop method" in runs[2]["refused"]
