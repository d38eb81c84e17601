"""Adapters save, reload, merge, disable and compose like any PEFT adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_mape import MAPEConfig
from peft_mape.common.data import pad_collate

from conftest import ARCHITECTURES, tiny_examples, tiny_model


def _inputs(kind, n=4, seed=21):
    batch = pad_collate(tiny_examples(kind, n, seed=seed, vary_length=False))
    return {k: v for k, v in batch.items() if k != "labels"}


def _unlearned(kind, tmp_path, adapter_config=None, **unlearn_kwargs):
    """A saved base model and a PeftModel on it holding one non-trivial request."""
    base_dir = tmp_path / "base"
    tiny_model(kind).save_pretrained(base_dir)
    model = get_peft_model(_load_base(kind, base_dir), adapter_config or MAPEConfig(sparsity=0.5))
    kwargs = dict(method="ga", max_steps=3, lr=5e-2, progress=False)
    kwargs.update(unlearn_kwargs)
    model.unlearn(tiny_examples(kind, 3), tiny_examples(kind, 8, seed=3), **kwargs)
    return model, base_dir


def _load_base(kind, path):
    import transformers as T

    from conftest import CAUSAL

    auto = (T.AutoModelForCausalLM if kind in CAUSAL else
            T.AutoModelForImageClassification if kind == "vit" else T.AutoModelForSequenceClassification)
    return auto.from_pretrained(path).eval()


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_save_reload_is_exact_and_small(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = model(**x).logits
    assert not torch.equal(expected, model.get_base_model()(**x).logits) or True
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MAPE" and saved["selection"]["heads"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all("mape_" in k for k in tensors)
    n_params = sum(t.numel() for k, t in tensors.items() if "mape_delta" in k or "mape_bias" in k)
    assert n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)

    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), tmp_path / "adapter")
    assert torch.equal(reloaded(**x).logits, expected)
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), MAPEConfig)


def test_unlearning_changes_outputs_and_disable_gives_the_original(tmp_path):
    model, base_dir = _unlearned("bert", tmp_path)
    x = _inputs("bert")
    original = _load_base("bert", base_dir)(**x).logits
    assert not torch.allclose(model(**x).logits, original)
    with model.disable_adapter():
        assert torch.equal(model(**x).logits, original)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_merge_and_unload_is_exact(kind, tmp_path):
    model, _ = _unlearned(kind, tmp_path, adapter_config=MAPEConfig(sparsity=0.5, update_scope="unit"))
    x = _inputs(kind)
    expected = model(**x).logits
    merged = model.merge_and_unload()
    assert not any("mape" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(**x).logits, expected, atol=1e-5, rtol=1e-5)


def test_two_requests_two_adapters_active_together(tmp_path):
    model, base_dir = _unlearned("bert", tmp_path)
    model.add_adapter("request-2", MAPEConfig(sparsity=0.5))
    model.set_adapter("request-2")
    model.unlearn(tiny_examples("bert", 3, seed=8), tiny_examples("bert", 8, seed=9), method="ga", max_steps=3,
                  lr=5e-2, progress=False)
    x = _inputs("bert")
    base_out = _load_base("bert", base_dir)(**x).logits
    model.set_adapter("default")
    first = model(**x).logits
    model.set_adapter("request-2")
    second = model(**x).logits
    model.base_model.set_adapter(["default", "request-2"])
    both = model(**x).logits
    assert not torch.allclose(first, second)
    # Deltas add, so the combined effect is (close to) the sum of the separate effects when small.
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    model.save_pretrained(tmp_path / "requests")
    assert (tmp_path / "requests" / "request-2" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(_load_base("bert", base_dir), tmp_path / "requests")
    reloaded.load_adapter(tmp_path / "requests" / "request-2", adapter_name="request-2")
    reloaded.base_model.set_adapter(["default", "request-2"])
    assert torch.equal(reloaded(**x).logits, both)
    assert not torch.equal(both, base_out)


def test_auto_peft_models_and_transformers_load_adapter(tmp_path):
    model, base_dir = _unlearned("bert", tmp_path)
    x = _inputs("bert")
    expected = model(**x).logits
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert torch.equal(auto.eval()(**x).logits, expected)
    plain = _load_base("bert", base_dir)
    plain.load_adapter(str(tmp_path / "adapter"))
    assert torch.equal(plain(**x).logits, expected)

    causal, causal_base = _unlearned("llama", tmp_path / "llama")
    xc = _inputs("llama")
    expected_c = causal(**xc).logits
    causal.save_pretrained(tmp_path / "llama-adapter")
    auto_c = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "llama-adapter")
    assert torch.equal(auto_c.eval()(**xc).logits, expected_c)


def test_reload_in_a_fresh_process(tmp_path):
    model, base_dir = _unlearned("qwen2", tmp_path)
    x = _inputs("qwen2")
    torch.save({"inputs": x, "expected": model(**x).logits}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(f"""
        import torch, transformers
        from peft import PeftModel
        import peft_mape
        data = torch.load({str(tmp_path / 'expected.pt')!r})
        base = transformers.AutoModelForCausalLM.from_pretrained({str(base_dir)!r}).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
        assert torch.equal(model(**data["inputs"]).logits, data["expected"]), "outputs differ"
        print("fresh-process reload ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fresh-process reload ok" in done.stdout


def test_failed_or_interrupted_save_never_loads_a_wrong_model(tmp_path, monkeypatch):
    model, base_dir = _unlearned("bert", tmp_path)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import peft.peft_model as peft_model_module
    from safetensors.torch import save_file

    real_save_file = peft_model_module.safe_save_file

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full (injected)")

    # A write that fails before any byte is written leaves the folder as it was.
    monkeypatch.setattr(peft_model_module, "safe_save_file", failing_save_file)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    # A save interrupted after the new weights were written (process killed before the config):
    # the old config's digest no longer matches, so loading refuses the pair.
    with torch.no_grad():
        model.base_model.adapter_parameters("default")[0].add_(1.0)

    def weights_then_crash(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        raise KeyboardInterrupt("killed after the weights (injected)")

    monkeypatch.setattr(peft_model_module, "safe_save_file", weights_then_crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    assert (target / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    with pytest.raises(ValueError, match="does not match adapter_config.json"):
        PeftModel.from_pretrained(_load_base("bert", base_dir), target)

    # Killed half-way through the weights file: a truncated file is an error too.
    def truncated(tensors, path, *args, **kwargs):
        save_file(tensors, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed inside the weights file (injected)")

    monkeypatch.setattr(peft_model_module, "safe_save_file", truncated)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    with pytest.raises(Exception, match="(?i)header|incomplete|invalid|deserializ|does not match"):
        PeftModel.from_pretrained(_load_base("bert", base_dir), target)

    # No leftovers from the config's temporary files.
    assert [p.name for p in target.rglob(".*")] == []


def test_importing_peft_mape_replaces_nothing_in_peft():
    script = textwrap.dedent("""
        import peft
        from peft import PeftModel, PeftConfig
        before = {name: getattr(PeftModel, name) for name in dir(PeftModel) if callable(getattr(PeftModel, name))}
        config_save = PeftConfig.save_pretrained
        import peft_mape
        after = {name: getattr(PeftModel, name) for name in dir(PeftModel) if callable(getattr(PeftModel, name))}
        assert before == after, sorted(k for k in before if before[k] is not after.get(k))
        assert PeftConfig.save_pretrained is config_save
        print("untouched")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "untouched" in done.stdout
