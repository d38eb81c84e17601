"""S3T on a causal LM: a tiny random LlamaForCausalLM trained on question/answer rows built by hand."""

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import LoraConfig

from conftest import s3t_bert
from peft_mape.common.causal_lm import answer_token_log_probs
from peft_mape.s3t import S3TCausalLM, S3TConfig, S3TModel
from peft_mape.s3t.aggregation import log_mean_exp
from peft_mape.s3t.causal_lm import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS = 0, 1, 2
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.1)


def _llama(seed=0):
    # initializer_range 0.3: with the default 0.02 the tied head's logits stay within ~0.5 of
    # uniform whatever the LoRA blocks do, and the answer loss could hardly fall.
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                           initializer_range=0.3)
    return T.LlamaForCausalLM(config).eval()


def _qa(n=24):
    """Prompt [BOS, 3, question (, 4)], answer of 1-2 tokens (+ EOS); labels -100 on the prompt."""
    rows = {"id": [], "input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        prompt = [BOS, 3, 10 + i] + ([4] if i % 3 == 0 else [])  # ragged rows exercise padding
        answer = [50 + i % 25, 60 + (i * 7) % 30, EOS][: 2 + i % 2]
        rows["id"].append(100 + i)
        rows["input_ids"].append(prompt + answer)
        rows["attention_mask"].append([1] * (len(prompt) + len(answer)))
        rows["labels"].append([-100] * len(prompt) + answer)
    return datasets.Dataset.from_dict(rows)


def _batch(dataset):
    """Right-padded tensors: pad ids, mask 0 and label -100 on padding."""
    width = max(len(r) for r in dataset["input_ids"])
    fill = {"input_ids": PAD, "attention_mask": 0, "labels": -100}
    return {k: torch.tensor([r + [v] * (width - len(r)) for r in dataset[k]]) for k, v in fill.items()}


PROBE = _batch(_qa(30).select(range(24, 30)))  # questions the model never trained on
PROBE_INPUTS = {k: v for k, v in PROBE.items() if k != "labels"}


def _config(**kwargs):
    base = dict(lora=LORA, task="causal_lm", num_shards=2, num_slices=2, budget=1, batch_size=4,
                epochs_per_stage=6, learning_rate=3e-2)
    return S3TConfig(**{**base, **kwargs})


def _fit(config=None, dataset=None, **fit_kwargs):
    logits = {}

    def record(info, s3t):  # the state served for this prefix, see StageInfo
        with torch.no_grad():
            logits[info.adapter] = s3t.model(**PROBE_INPUTS).logits.clone()

    s3t = S3TModel(_llama(), config or _config())
    s3t.fit(dataset or _qa(), on_stage_end=record, progress=False, **fit_kwargs)
    return s3t, logits


@pytest.fixture(scope="module")
def trained():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests that compare against it, so float reductions match
    try:
        return _fit()
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def fresh(trained):
    s3t, logits = trained
    return copy.deepcopy(s3t), logits


def test_causal_lm_defaults_and_config_errors():
    config = S3TConfig(lora=LORA, task="causal_lm")
    assert (config.head, config.head_modules, config.aggregation, config.label_column) == \
        ("frozen", (), "mean_probs", "labels")
    assert S3TConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"task must be one of \('sequence_classification', 'causal_lm'\), got 'lm'"):
        S3TConfig(lora=LORA, task="lm")
    with pytest.raises(ValueError, match=r"head must be one of \('frozen',\) for task='causal_lm', got 'per_stage'"):
        S3TConfig(lora=LORA, task="causal_lm", head="per_stage", head_modules=("lm_head",))
    with pytest.raises(ValueError, match=r"head_modules must be empty for task='causal_lm', got \('lm_head',\)"):
        S3TConfig(lora=LORA, task="causal_lm", head_modules=("lm_head",))
    with pytest.raises(ValueError, match=r"aggregation must be one of \('mean_probs',\) for task='causal_lm'"):
        S3TConfig(lora=LORA, task="causal_lm", aggregation="vote")
    with pytest.raises(ValueError, match="head_modules must name at least one module when head='per_stage'"):
        S3TConfig(lora=LORA, head_modules=())
    # Configs saved before `task` existed are classifiers, with their explicit head settings.
    old = S3TConfig(lora=LoraConfig(target_modules=["query"])).to_dict()
    del old["task"]
    restored = S3TConfig.from_dict(old)
    assert (restored.task, restored.head, restored.head_modules, restored.aggregation, restored.label_column) == \
        ("sequence_classification", "per_stage", ("classifier",), "mean_logits", "label")


def test_bad_causal_lm_data_and_calls_give_clear_errors(trained):
    s3t = S3TModel(_llama(), _config())
    with pytest.raises(ValueError, match="not fitted"):
        s3t.as_causal_lm()
    short = _qa(8).map(lambda row: {"labels": row["labels"][:-1]})
    with pytest.raises(ValueError, match="labels for"):
        s3t.fit(short, progress=False)
    unscored = _qa(8).map(lambda row: {"labels": [-100] * len(row["labels"])})
    with pytest.raises(ValueError, match="no token to score"):
        s3t.fit(unscored, progress=False)
    fitted, _ = trained
    with pytest.raises(ValueError, match=r"predict\(\) serves task='sequence_classification'.*as_causal_lm"):
        fitted.predict(PROBE)
    with pytest.raises(ValueError, match="per-token labels 'labels'"):
        fitted.token_log_probs(PROBE_INPUTS)
    classifier = S3TModel(s3t_bert(2), S3TConfig(lora=LoraConfig(r=2, target_modules=["query"])))
    with pytest.raises(ValueError, match=r"as_causal_lm\(\) serves task='causal_lm'"):
        classifier.as_causal_lm()


def test_loss_averages_each_examples_answer_tokens(monkeypatch):
    model, batch = _llama(), _batch(_qa(6))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    token_nll = F.cross_entropy(model(**inputs).logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                reduction="none", ignore_index=-100)
    scored = batch["labels"][:, 1:] != -100
    expected = (token_nll.sum(1) / scored.sum(1)).mean()  # not the token mean over the whole batch
    assert torch.allclose(causal_lm_loss(model, inputs, batch["labels"]), expected, atol=1e-6)
    # Families outside the plain-head list take the model's own full forward: same number.
    monkeypatch.setattr("peft_mape.s3t.causal_lm.PLAIN_HEAD_FAMILIES", ())
    assert torch.allclose(causal_lm_loss(model, inputs, batch["labels"]), expected, atol=1e-6)


def test_fit_trains_every_stage_and_the_answer_loss_falls(trained):
    s3t, logits = trained
    assert sorted(logits) == sorted(s3t.registry.live_adapters()) == ["s0_0v0", "s0_0v0-1v0", "s1_0v0", "s1_0v0-1v0"]
    assert s3t.blocks == [(3, 2), (1, 0)]
    dataset = _qa()
    batch = _batch(dataset)
    base = _llama()
    with torch.no_grad():
        before = float(causal_lm_loss(base, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]))
    after = -float(s3t.answer_log_probs(dataset).mean())
    assert after < 0.75 * before, (before, after)
    # The tied embedding / LM head never moves (head="frozen"), nor does any other base weight.
    state = {k.replace(".base_layer.", "."): v for k, v in s3t.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_served_log_probs_are_the_log_mean_of_the_shard_softmaxes(trained):
    s3t, _ = trained
    lm = s3t.as_causal_lm()
    assert isinstance(lm, S3TCausalLM) and isinstance(lm, torch.nn.Module)
    out = lm(**PROBE)
    shard_probs = torch.stack([s3t.shard_logits(s, PROBE).double().softmax(-1) for s in range(2)])
    assert torch.allclose(out.logits.double(), shard_probs.mean(0).log(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(shard_probs[0], shard_probs[1], atol=1e-3)  # the shards do differ
    token_lp = s3t.token_log_probs(PROBE)
    labels = PROBE["labels"][:, 1:]
    scored = labels != -100
    gathered = out.logits[:, :-1].gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * scored
    assert torch.allclose(token_lp, gathered, atol=1e-6, rtol=1e-6)
    # Library code that log-softmaxes `model(**batch).logits` scores the mixture unchanged.
    assert torch.allclose(answer_token_log_probs(lm, PROBE), token_lp, atol=1e-6, rtol=1e-6)
    per_example = token_lp.sum(1) / scored.sum(1)
    assert torch.allclose(s3t.answer_log_probs(PROBE), per_example.double(), atol=1e-6)
    assert torch.allclose(out.loss, -per_example.mean(), atol=1e-6)
    # A dataset is batched by length internally and returned in its own order.
    dataset = _qa(30).select(range(24, 30))
    assert torch.allclose(s3t.answer_log_probs(dataset), per_example.double(), atol=1e-5)
    assert torch.allclose(s3t.answer_log_probs(dataset, reduction="sum"), token_lp.sum(1).double(), atol=1e-5)


def test_deleting_serves_the_shorter_prefix_exactly(fresh):
    s3t, logits = fresh
    order = s3t.registry.orders[0][0]
    victim = s3t.registry.active_ids(shard=0, slice_=order[1])[0]  # second slice: depth 2 -> 1
    other = s3t.shard_logits(1, PROBE)
    report = s3t.delete([victim])
    assert report.deleted == (victim,) and report.guarantee == "exact" and report.failed_shards == ()
    assert [(t.shard, t.depth_before, t.depth_after) for t in report.truncated] == [(0, 2, 1)]
    assert report.revoked_adapters == ("s0_0v0-1v0",) and report.served == {0: (0, 1), 1: (0, 2)}
    assert torch.equal(s3t.shard_logits(0, PROBE), logits["s0_0v0"])  # the stage-1 snapshot, bit for bit
    expected = log_mean_exp([F.log_softmax(logits["s0_0v0"], -1), F.log_softmax(other, -1)])
    assert torch.allclose(s3t.as_causal_lm()(**PROBE_INPUTS).logits, expected, atol=1e-6, rtol=1e-6)
    s3t.registry.prove_deleted(victim)
    # The same as training from scratch without the victim on the same partition.
    assignment = {i: loc for i, loc in s3t.registry.assignment.items() if i != victim}
    scratch, _ = _fit(dataset=_qa().filter(lambda row: row["id"] != victim), assignment=assignment)
    assert torch.equal(s3t.stage_logits(0, 0, 1, PROBE), scratch.stage_logits(0, 0, 1, PROBE))
    # A deletion in a shard's first slice fails it (B = 1): the mixture is the other shard alone.
    first = s3t.registry.active_ids(shard=1, slice_=s3t.registry.orders[1][0][0])[0]
    assert s3t.delete(first).failed_shards == (1,)
    alone = F.log_softmax(s3t.shard_logits(0, PROBE), -1)
    assert torch.allclose(s3t.as_causal_lm()(**PROBE_INPUTS).logits, alone, atol=1e-6, rtol=1e-6)


def test_generate_decodes_greedily_from_the_mixture(trained):
    s3t, _ = trained
    lm = s3t.as_causal_lm()
    ids = torch.tensor([[BOS, 3, 10], [BOS, 3, 17], [BOS, 3, 40]])
    naive = ids
    for _ in range(4):  # no cache: the full forward of the mixture, one token at a time
        naive = torch.cat([naive, lm(naive).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(lm.generate(ids, max_new_tokens=4), naive)


def test_one_shard_generates_as_transformers_does_with_left_padding():
    s3t, _ = _fit(_config(num_shards=1, num_slices=1, epochs_per_stage=3))
    ids = torch.tensor([[PAD, BOS, 3, 10], [BOS, 3, 11, 4], [PAD, PAD, BOS, 3]])
    mask = (ids != PAD).long()
    ours = s3t.as_causal_lm().generate(ids, mask, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    theirs = s3t.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ours, theirs)


def test_save_and_load_round_trip(fresh, tmp_path):
    s3t, _ = fresh
    victim = s3t.registry.active_ids(shard=1, slice_=s3t.registry.orders[1][0][1])[0]
    s3t.delete(victim)
    restored = S3TModel.load(s3t.save(tmp_path / "s3t"), _llama())
    assert restored.config == s3t.config and restored.config.task == "causal_lm"
    assert restored.registry.to_dict() == s3t.registry.to_dict()
    assert torch.equal(restored.as_causal_lm()(**PROBE_INPUTS).logits, s3t.as_causal_lm()(**PROBE_INPUTS).logits)
    assert torch.equal(restored.answer_log_probs(PROBE), s3t.answer_log_probs(PROBE))
    with pytest.raises(ValueError, match="fingerprint"):
        S3TModel.load(tmp_path / "s3t", _llama(seed=1))
