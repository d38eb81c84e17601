"""Integration on the real offline MiniLM-L6 weights and real tweets (marked slow)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_and_tweets():
    assets = pytest.importorskip("mape_devkit.assets")
    try:
        model_dir = assets.minilm_dir()
        tweets = assets.load_tweets()
    except assets.MissingAssetError as err:
        pytest.skip(str(err))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tweets.shuffle(seed=0).select(range(160))
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=40), batched=True)
    data = data.rename_column("label", "labels").remove_columns(["text", "id"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()
    # A short fit so that the forget examples are "seen" (low loss) before unlearning.
    from peft_mape.common.data import make_loader, materialise

    examples = materialise(data, {"input_ids", "attention_mask", "token_type_ids", "labels"}, what="train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    model.train()
    for _ in range(3):
        for batch in make_loader(examples, 32, shuffle=True):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), data


def test_default_unlearn_on_minilm_saves_and_reloads(minilm_and_tweets, tmp_path):
    from peft import PeftModel, get_peft_model

    import peft_mape
    from peft_mape.common.data import make_loader, materialise

    model, data = minilm_and_tweets
    forget, retain = data.select(range(32)), data.select(range(32, 160))
    inputs = {"input_ids", "attention_mask", "token_type_ids"}
    x = next(iter(make_loader(materialise(forget.select(range(8)), inputs, what="x"), 8)))
    with torch.no_grad():
        original_logits = model(**x).logits
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, peft_mape.MAPEConfig(sparsity=0.9))
    report = peft_model.unlearn(forget, retain, forget_loss_target=1.5, max_steps=60, progress=False)

    assert report.method == peft_mape.DEFAULT_METHOD
    assert report.num_selected_heads == 7  # floor(10% of 6 x 12 heads)
    assert report.num_selected_filters == 921  # floor(10% of 6 x 1536 filters)
    assert report.forget_loss_after > report.forget_loss_before + 0.3
    assert report.retain_loss_after < report.retain_loss_before + 0.5

    expected = peft_model(**x).logits
    assert not torch.allclose(expected, original_logits)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(**x).logits, original_logits)  # base weights untouched
    peft_model.save_pretrained(tmp_path / "erase")
    size = sum(p.stat().st_size for p in (tmp_path / "erase").iterdir())
    assert size < 0.2 * sum(v.numel() * 4 for v in base_state.values())
    from transformers import AutoModelForSequenceClassification

    from mape_devkit import assets

    fresh = AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=3)
    fresh.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(fresh.eval(), tmp_path / "erase")
    assert torch.equal(reloaded(**x).logits, expected)
