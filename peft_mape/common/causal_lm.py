"""Question/answer examples for causal language models: training data, answer scores, generations.

The library's default per-example loss (:func:`peft_mape.common.data.default_per_example_loss`)
averages the cross-entropy over each example's labels that are not -100. Examples built here
label the prompt (and padding) -100, so that loss — and every ``unlearn()`` method — covers
the answer tokens only, as TOFU does.

Prompt templates (``template=``):

- ``"plain"`` (default): ``"Question: {question}\\nAnswer:"``, answer ``" {answer}"``. Short
  (six template tokens for SmolLM2), model-agnostic and what TOFU-style CPU benchmarks can
  afford; the model learns the format during fine-tuning.
- ``"chat"``: the tokenizer's chat template with one user turn and the generation prompt;
  the answer follows as the assistant's message. Longer (SmolLM2's template inserts a
  ~20-token system prompt), but matches an instruction-tuned model's own format.

Tokenisation: the prompt and the answer are tokenised separately and concatenated, so the
answer's tokens do not depend on where the prompt ends, and a generation that starts right after
the prompt ids continues exactly where training put the answer. The prompt gets the tokenizer's
special tokens (e.g. a BOS) unless it already starts with the BOS text (chat-template output).
The EOS token closes an answer that was not truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import to_device
from .lm_head import (
    decoder_and_head, gathered_log_probs, scatter_scored, scored_token_log_probs, shifted_log_probs, unwrap,
)
from .modes import eval_mode

TEMPLATES = ("plain", "chat")
PLAIN_PROMPT = "Question: {question}\nAnswer:"


def format_prompt(question: str, tokenizer=None, template: str = "plain") -> str:
    """The prompt text for ``question`` (``template`` "plain" or "chat", see module docstring)."""
    _check_template(template)
    if template == "plain":
        return PLAIN_PROMPT.format(question=question.strip())
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer that has a chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": question.strip()}], tokenize=False,
                                         add_generation_prompt=True)


def format_answer(answer: str, template: str = "plain") -> str:
    """The answer text as it follows the prompt: a leading space after "Answer:", none in a chat turn."""
    _check_template(template)
    return (" " if template == "plain" else "") + answer.strip()


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt: special tokens added unless it already starts with the BOS text."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])


def answer_token_ids(tokenizer, answer: str, *, max_answer_tokens: Optional[int] = None,
                     add_eos: bool = True) -> tuple[list[int], bool]:
    """Token ids of an answer, cut to ``max_answer_tokens``; returns (ids, truncated).

    EOS is appended only to an answer that was not cut (a cut answer does not end there).
    """
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id if add_eos else None
    if max_answer_tokens is not None:
        if max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
        budget = max_answer_tokens - (1 if eos is not None else 0)
        if len(ids) > max(budget, 0):
            return ids[:max_answer_tokens], True
    if eos is not None:
        ids.append(eos)
    return ids, False


def truncate_answer(tokenizer, answer: str, max_answer_tokens: Optional[int]) -> str:
    """The text of the first ``max_answer_tokens`` answer tokens (the reference a cut answer is scored against)."""
    if max_answer_tokens is None:
        return answer.strip()
    ids, _ = answer_token_ids(tokenizer, answer, max_answer_tokens=max_answer_tokens, add_eos=False)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def encode_qa(tokenizer, prompt: str, answer: str, *, max_length: Optional[int] = None,
              max_answer_tokens: Optional[int] = None, add_eos: bool = True) -> dict[str, list[int]]:
    """One model-ready example: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt).

    ``prompt`` and ``answer`` are formatted texts (see :func:`format_prompt`/:func:`format_answer`).
    The answer is cut to ``max_answer_tokens`` first; if prompt + answer still exceed
    ``max_length``, the prompt loses tokens from its start (its end carries the answer cue).
    """
    answer_ids, _ = answer_token_ids(tokenizer, answer, max_answer_tokens=max_answer_tokens, add_eos=add_eos)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if not answer_ids:
        raise ValueError(f"the answer {answer!r} has no tokens: nothing to score or train on")
    if max_length is not None:
        room = max_length - len(answer_ids)
        if room < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for the prompt after {len(answer_ids)} answer tokens; "
                "raise max_length or set max_answer_tokens below it"
            )
        prompt_ids = prompt_ids[-room:]
    if not prompt_ids:
        raise ValueError("the prompt has no tokens: the first answer token would have nothing to condition on")
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [-100] * len(prompt_ids) + answer_ids,
    }


def build_qa_dataset(tokenizer, questions: Sequence[str], answers: Sequence[str], *, template: str = "plain",
                     max_length: Optional[int] = 64, max_answer_tokens: Optional[int] = None,
                     add_eos: bool = True):
    """A ``datasets.Dataset`` of model-ready (question, answer) examples for training or ``unlearn()``.

    Columns ``input_ids``, ``attention_mask`` and ``labels``; labels are -100 on prompt tokens,
    so the per-example loss is the mean answer-token cross-entropy. Padding is left to the
    collator (``peft_mape.common.data.pad_collate`` pads labels with -100).
    """
    import datasets

    if len(questions) != len(answers):
        raise ValueError(f"got {len(questions)} questions but {len(answers)} answers")
    rows = [encode_qa(tokenizer, format_prompt(q, tokenizer, template), format_answer(a, template),
                      max_length=max_length, max_answer_tokens=max_answer_tokens, add_eos=add_eos)
            for q, a in zip(questions, answers)]
    columns = ("input_ids", "attention_mask", "labels")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


# --------------------------------------------------------------------------- scoring


@dataclass
class AnswerLogProbs:
    """Log-probability of each answer given its prompt: ``total`` (sum over the answer tokens),
    ``mean`` (per token; exp(mean) is the length-normalised probability P(a|q)^(1/|a|)) and
    ``num_tokens`` (scored tokens, EOS included when it was appended)."""

    total: np.ndarray
    mean: np.ndarray
    num_tokens: np.ndarray


def answer_token_log_probs(model, batch: dict) -> torch.Tensor:
    """log p(label_t | tokens < t) for the scored (label != -100) tokens of a right-padded batch.

    Returns a [batch, length - 1] tensor with 0 where nothing is scored. Differentiable: this is
    also the cheap answer-only causal-LM loss used for fine-tuning (the vocabulary projection
    runs on scored positions only when the model family allows it).
    """
    log_p = scored_token_log_probs(model, batch)
    if log_p is not None:
        return log_p
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return shifted_log_probs(logits, batch["labels"])[0]


def _right_pad(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    return {key: torch.tensor([r[key] + [value] * (length - len(r[key])) for r in rows])
            for key, value in fill.items()}


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return pad


def answer_log_probs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16,
                     max_length: Optional[int] = None, max_answer_tokens: Optional[int] = None,
                     add_eos: bool = True, progress: bool = False,
                     desc: str = "answer log-probs") -> AnswerLogProbs:
    """Score each ``answers[i]`` after ``prompts[i]`` (formatted texts), without gradients, dropout off.

    Pairs are encoded as in :func:`encode_qa` and batched by length (less padding). Answers
    that share a prompt (a correct one and perturbed ones) share one pass over it: the prompt's
    key/value cache is computed once and every answer continues from it (:func:`_shared_prompt_sums`),
    which gives the same numbers as scoring each pair on its own.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [encode_qa(tokenizer, p, a, max_length=max_length, max_answer_tokens=max_answer_tokens, add_eos=add_eos)
            for p, a in zip(prompts, answers)]
    device = next(model.parameters()).device
    counts = np.array([sum(1 for t in r["labels"] if t != -100) for r in rows])
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r["input_ids"][: len(r["labels"]) - counts[i]]), []).append(i)
    parts = decoder_and_head(model)
    with torch.no_grad(), eval_mode(model):
        if parts is not None and len(groups) < len(rows):
            total = _shared_prompt_sums(parts, rows, counts, groups, batch_size, _pad_id(tokenizer), device,
                                        progress, desc)
        else:
            total = _pairwise_sums(model, rows, batch_size, _pad_id(tokenizer), device, progress, desc)
    return AnswerLogProbs(total=total, mean=total / counts, num_tokens=counts)


def _pairwise_sums(model, rows, batch_size, pad, device, progress, desc) -> np.ndarray:
    """Answer log-prob sums, one right-padded sequence per (prompt, answer) pair."""
    total = np.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
        batch = to_device(_right_pad([rows[i] for i in chunk], pad), device)
        total[chunk] = answer_token_log_probs(model, batch).sum(1).double().cpu().numpy()
    return total


def _shared_prompt_sums(parts, rows, counts, groups, batch_size, pad, device, progress, desc) -> np.ndarray:
    """Answer log-prob sums with one prompt pass per distinct prompt.

    Prompts are left-padded (each ends at the last column) with explicit position ids, their
    key/value cache is repeated for each of their answers, and the right-padded answers run on
    top of it. The first answer token is predicted from the prompt's last hidden state.
    ``counts[i]`` is the number of scored (answer) tokens of ``rows[i]``, the tail of its ids.
    """
    from transformers import DynamicCache

    decoder, head = parts
    total = np.zeros(len(rows))
    keys = sorted(groups, key=len)
    chunks, current, size = [], [], 0
    for key in keys:  # chunks of whole prompts holding about batch_size answers
        if current and size + len(groups[key]) > batch_size:
            chunks.append(current)
            current, size = [], 0
        current.append(key)
        size += len(groups[key])
    chunks.append(current)
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        length = max(len(k) for k in chunk)
        prompt_ids = torch.tensor([[pad] * (length - len(k)) + list(k) for k in chunk], device=device)
        prompt_mask = torch.tensor([[0] * (length - len(k)) + [1] * len(k) for k in chunk], device=device)
        cache = DynamicCache(config=decoder.config)
        hidden = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=(prompt_mask.cumsum(-1) - 1).clamp_min(0), past_key_values=cache,
                         use_cache=True).last_hidden_state[:, -1]
        members = [i for key in chunk for i in groups[key]]
        owner = torch.tensor([j for j, key in enumerate(chunk) for _ in groups[key]], device=device)
        cache.batch_select_indices(owner)
        answer_rows = [rows[i]["input_ids"][len(rows[i]["input_ids"]) - counts[i]:] for i in members]
        width = max(len(a) for a in answer_rows)
        answer_ids = torch.tensor([a + [pad] * (width - len(a)) for a in answer_rows], device=device)
        answer_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answer_rows], device=device)
        positions = prompt_mask.sum(-1)[owner].unsqueeze(-1) + torch.arange(width, device=device)
        answer_hidden = decoder(input_ids=answer_ids, attention_mask=torch.cat([prompt_mask[owner], answer_mask], -1),
                                position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        predictors = torch.cat([hidden[owner].unsqueeze(1), answer_hidden[:, :-1]], dim=1)
        scored = answer_mask.bool()
        sums = scatter_scored(gathered_log_probs(head(predictors[scored]), answer_ids[scored]), scored)
        total[members] = sums.sum(1).double().cpu().numpy()
    return total


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
                    device=None, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (formatted texts), decoded without special tokens.

    Batches are left-padded (so every prompt ends where generation starts) and grouped by
    length; prompts are tokenised as in training (:func:`prompt_token_ids`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    base = unwrap(model)
    device = device or next(base.parameters()).device
    pad = _pad_id(tokenizer)
    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with torch.no_grad(), eval_mode(base):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = order[start:start + batch_size]
            length = max(len(encoded[i]) for i in chunk)
            ids = torch.tensor([[pad] * (length - len(encoded[i])) + encoded[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (length - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk],
                                device=device)
            generated = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(chunk, generated[:, length:]):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return outputs
