"""peft_mape.common.causal_lm: answer-only examples, answer log-probabilities and greedy generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_mape import MAPEConfig
from peft_mape.common.causal_lm import (
    answer_log_probs, answer_token_log_probs, build_qa_dataset, encode_qa, format_answer, format_prompt,
    greedy_generate, truncate_answer,
)
from peft_mape.common.data import default_per_example_loss, pad_collate

from conftest import tiny_model
from toy_lm import toy_tokenizer

QUESTIONS = ["who wrote the play", "what is capital of france", "what is the sky"]
ANSWERS = ["he wrote a book", "paris", "the sky is blue"]


@pytest.fixture
def tok():
    return toy_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_tokens_are_masked_and_the_answer_ends_with_eos(tok):
    prompt, answer = format_prompt("who wrote the play"), format_answer("he wrote a book")
    assert prompt == "Question: who wrote the play\nAnswer:" and answer == " he wrote a book"
    ex = encode_qa(tok, prompt, answer)
    n_prompt = len(_ids(tok, prompt))  # Question : who wrote the play Answer : -> 8 tokens
    assert n_prompt == 8
    assert ex["input_ids"] == _ids(tok, prompt) + _ids(tok, answer) + [tok.eos_token_id]
    assert ex["labels"] == [-100] * n_prompt + _ids(tok, answer) + [tok.eos_token_id]
    assert ex["attention_mask"] == [1] * (n_prompt + 5)


def test_truncation_cuts_the_answer_end_then_the_prompt_start(tok):
    prompt, answer = format_prompt("who wrote the play"), format_answer("he wrote a book")
    cut = encode_qa(tok, prompt, answer, max_answer_tokens=2)
    assert [t for t in cut["labels"] if t != -100] == _ids(tok, " he wrote")  # no EOS: the answer goes on
    fits = encode_qa(tok, prompt, answer, max_answer_tokens=5)  # 4 words + EOS fit exactly
    assert fits["labels"][-1] == tok.eos_token_id
    short = encode_qa(tok, prompt, answer, max_length=7)  # 5 answer tokens leave 2 for the prompt
    assert short["input_ids"][:2] == _ids(tok, "Answer :") and len(short["input_ids"]) == 7
    assert short["labels"][:2] == [-100, -100]
    assert truncate_answer(tok, "he wrote a book", 2) == "he wrote"
    with pytest.raises(ValueError, match="no room for the prompt"):
        encode_qa(tok, prompt, answer, max_length=5)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        encode_qa(tok, prompt, answer, max_answer_tokens=0)


def test_bad_templates_and_inputs_are_refused(tok):
    with pytest.raises(ValueError, match="template"):
        format_prompt("q", template="alpaca")
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("q", tok, template="chat")  # the toy tokenizer has none
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        build_qa_dataset(tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="no tokens"):
        encode_qa(tok, "Question : who", "", add_eos=False)


def test_the_library_loss_on_built_examples_is_the_hand_computed_answer_loss(tok, one_thread):
    model = tiny_model("llama")
    ds = build_qa_dataset(tok, QUESTIONS, ANSWERS)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    batch = pad_collate([{k: torch.tensor(v) for k, v in row.items()} for row in ds], tok.pad_token_id)
    with torch.no_grad():
        logits = model(**batch).logits
        library = default_per_example_loss(model(**batch), batch)
    for i, row in enumerate(ds):
        ids, labels = row["input_ids"], row["labels"]
        # position t predicts token t+1; only answer tokens (and EOS) are scored
        terms = [-F.log_softmax(logits[i, t], -1)[ids[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != -100]
        assert len(terms) == len(_ids(tok, format_answer(ANSWERS[i]))) + 1
        assert library[i].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_answer_log_probs_match_the_loss_and_do_not_depend_on_batching(tok, one_thread):
    model = tiny_model("llama")
    prompts = [format_prompt(q) for q in QUESTIONS]
    answers = [format_answer(a) for a in ANSWERS]
    one = answer_log_probs(model, tok, prompts, answers, batch_size=1)
    many = answer_log_probs(model, tok, prompts, answers, batch_size=3)  # right padding
    assert torch.allclose(torch.tensor(one.total), torch.tensor(many.total), atol=1e-5)
    assert list(one.num_tokens) == [5, 2, 5]
    ds = build_qa_dataset(tok, QUESTIONS, ANSWERS)
    batch = pad_collate([{k: torch.tensor(v) for k, v in row.items()} for row in ds], tok.pad_token_id)
    with torch.no_grad():
        loss = default_per_example_loss(model(**batch), batch)
    assert torch.allclose(torch.tensor(-one.mean, dtype=torch.float32), loss, atol=1e-5)
    assert torch.allclose(torch.tensor(one.total), torch.tensor(one.mean * one.num_tokens))


def test_answers_sharing_a_prompt_score_as_if_alone(tok, one_thread):
    """Several answers per prompt reuse the prompt's cache (left-padded prompts of different
    lengths, right-padded answers of different lengths): same numbers as one pass per pair."""
    model = tiny_model("llama", seed=1)
    prompts = [format_prompt(q) for q in QUESTIONS]
    pairs = [(prompts[0], a) for a in ANSWERS] + [(prompts[1], ANSWERS[1]), (prompts[1], ANSWERS[0])] + \
        [(prompts[2], ANSWERS[2])]
    shared = answer_log_probs(model, tok, [p for p, _ in pairs], [format_answer(a) for _, a in pairs], batch_size=4)
    alone = [answer_log_probs(model, tok, [p], [format_answer(a)]).total[0] for p, a in pairs]
    assert torch.allclose(torch.tensor(shared.total), torch.tensor(alone, dtype=torch.float64), atol=1e-5)


def test_answer_only_head_equals_the_full_forward(tok, one_thread):
    """The cheap path (vocabulary projection on scored positions only) must not change a value."""
    model = tiny_model("llama")
    ds = build_qa_dataset(tok, QUESTIONS, ANSWERS)
    batch = pad_collate([{k: torch.tensor(v) for k, v in row.items()} for row in ds], tok.pad_token_id)
    with torch.no_grad():
        fast = answer_token_log_probs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    full = F.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    full = full * (targets != -100)
    assert torch.allclose(fast, full, atol=1e-5)


def test_default_loss_projects_only_answer_positions_with_the_same_values_and_gradients(tok, one_thread):
    """per_example_losses takes the decoder + answer-position head path for a Llama batch:
    same losses and gradients as the model's own forward through the default loss."""
    from peft_mape.common.data import forward_with_losses
    from peft_mape.common.lm_head import scored_token_log_probs

    model = tiny_model("llama")
    ds = build_qa_dataset(tok, QUESTIONS, ANSWERS)
    batch = pad_collate([{k: torch.tensor(v) for k, v in row.items()} for row in ds], tok.pad_token_id)
    params = list(model.parameters())
    outputs, fast = forward_with_losses(model, batch, None, need_outputs=False)
    assert outputs is None  # the cheap path ran: no full-vocabulary logits
    full = default_per_example_loss(model(**batch), batch)
    assert torch.allclose(fast, full, atol=1e-6)
    for a, b in zip(torch.autograd.grad(fast.sum(), params), torch.autograd.grad(full.sum(), params)):
        assert torch.allclose(a, b, atol=1e-6)
    # Batches the decoder path does not understand, and non-LM models, take the full forward.
    assert scored_token_log_probs(model, {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}) \
        is None
    assert scored_token_log_probs(tiny_model("bert"), batch) is None
    outputs, _ = forward_with_losses(model, batch, None)
    assert outputs is not None and outputs.logits.shape[-1] == model.config.vocab_size


def test_scores_through_an_empty_mape_adapter_equal_the_base_model(tok, one_thread):
    model = tiny_model("llama")
    prompts, answers = [format_prompt(q) for q in QUESTIONS], [format_answer(a) for a in ANSWERS]
    base = answer_log_probs(model, tok, prompts, answers)
    wrapped = answer_log_probs(get_peft_model(model, MAPEConfig()), tok, prompts, answers)
    assert torch.allclose(torch.tensor(base.total), torch.tensor(wrapped.total), atol=1e-6)


def _manual_greedy(model, ids, steps, eos):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_greedy_generation_is_left_padded_and_matches_a_manual_loop(tok, one_thread):
    model = tiny_model("llama", seed=3)
    prompts = [format_prompt(q) for q in QUESTIONS]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=4, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single
    for prompt, text in zip(prompts, single):
        expected = _manual_greedy(model, tok(prompt)["input_ids"], 4, tok.eos_token_id)
        assert text == tok.decode(expected, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, prompts, max_new_tokens=0)


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu_mini"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason=f"TOFU-mini data not found at {DATA} (../shared/data/tofu_mini)")
def test_smollm_learns_tofu_answers_with_the_answer_only_loss(one_thread):
    """A few answer-only AdamW steps on four TOFU pairs raise their answer probability on the real
    SmolLM2, and leave the prompts' own likelihood alone (they carry no loss)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mape_devkit import assets
    from peft_mape.common.data import make_loader

    path = assets.smollm_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    rows = [json.loads(line) for line in (DATA / "forget01.jsonl").read_text().splitlines()[:4]]
    prompts = [format_prompt(r["question"]) for r in rows]
    answers = [format_answer(r["answer"]) for r in rows]
    before = answer_log_probs(model, tok, prompts, answers, max_answer_tokens=16)
    ds = build_qa_dataset(tok, [r["question"] for r in rows], [r["answer"] for r in rows], max_answer_tokens=16)
    params = list(model.model.layers[-2].parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-4)
    loader = make_loader([{k: torch.tensor(v) for k, v in row.items()} for row in ds], 4, tok.pad_token_id)
    for _ in range(5):
        for batch in loader:
            loss = default_per_example_loss(model(**batch), batch).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = answer_log_probs(model, tok, prompts, answers, max_answer_tokens=16)
    # Measured on CI: +0.13..+0.27 nats per answer token after these 5 epochs on one layer.
    assert (after.mean > before.mean).all() and (after.mean - before.mean).mean() > 0.1, (before.mean, after.mean)
    generated = greedy_generate(model, tok, prompts[:1], max_new_tokens=8)[0]
    assert generated.split()[:2] == rows[0]["answer"].split()[:2]
