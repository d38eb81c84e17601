"""The language-model head applied to scored positions only.

A causal LM's logits are ``head(decoder(...).last_hidden_state)``; a loss over answer tokens
needs the vocabulary projection only where a label is not -100. Passing ``labels`` to a
transformers model also makes it compute a second, full-vocabulary loss that nobody reads.
:func:`scored_token_log_probs` runs the decoder, then the head on the scored positions alone, so
the [batch, tokens, vocabulary] logits tensor is never formed (it dominates time and memory of a
small LM with a large vocabulary; measurements in the README).

Only model families whose logits are exactly the output embedding of the decoder's last hidden
state qualify (no logit soft-capping or scaling); any other model returns ``None`` and callers
fall back to the full forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .distributed import is_sharded

PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2")
# Batch keys the decoder-only path understands; anything else (position ids, images, ...) means
# the batch needs the model's own forward.
DECODER_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


def unwrap(model):
    """The underlying transformers model (PEFT wrappers keep their layers injected in it)."""
    while hasattr(model, "get_base_model"):
        base = model.get_base_model()
        if base is model:
            break
        model = base
    return model


def decoder_and_head(model):
    """(decoder, output embedding) when logits are head(decoder hidden states), else None."""
    base = unwrap(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    if is_sharded(base):  # FSDP2 gathers the root's weights in the model's own forward: keep it
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # models without a separate decoder or head
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def gathered_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row: ``logits`` [N, vocab], ``targets`` [N]; in at least fp32."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def scatter_scored(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``values`` of the scored positions back in the mask's shape, 0 elsewhere."""
    return torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)


def shifted_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_t | tokens < t) [batch, length - 1] with 0 where not scored, the scored mask)
    from token logits [batch, length, vocab] and labels [batch, length] (-100: not scored)."""
    targets = labels[:, 1:]
    scored = targets != -100
    return scatter_scored(gathered_log_probs(logits[:, :-1][scored], targets[scored]), scored), scored


def scored_token_log_probs(model, batch: dict) -> Optional[torch.Tensor]:
    """log p(label_t | tokens < t) on the scored tokens (shifted labels != -100), else 0.

    A [batch, length - 1] tensor, differentiable (twice, for Hessian-vector products), or
    ``None`` when the model family or the batch's keys do not allow the decoder-only path.
    """
    parts = decoder_and_head(model)
    labels = batch.get("labels")
    if parts is None or labels is None or labels.dim() != 2 or not set(batch) <= DECODER_KEYS:
        return None
    decoder, head = parts
    targets = labels[:, 1:]
    scored = targets != -100
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
    return scatter_scored(gathered_log_probs(head(hidden[:, :-1][scored]), targets[scored]), scored)
