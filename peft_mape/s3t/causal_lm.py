"""Causal language models under S3T: the answer-token loss, and serving the shards' mixture.

Labels follow transformers: ``labels[t]`` is the token at position t, predicted from the tokens
before it, and -100 marks tokens that are not scored (prompt, padding). Each stage minimises
every example's mean answer-token cross-entropy, averaged over the batch (the per-example loss
the rest of peft_mape uses for language models).

Serving averages the live shards' next-token *probabilities*: p(y | x) = (1/m) Σ_s p_s(y | x).
:class:`S3TCausalLM` exposes that mixture as an ``nn.Module`` whose ``.logits`` are its
log-probabilities, so code written for a transformers causal LM (``model(**batch).logits``, then
a log-softmax, which leaves normalised log-probabilities unchanged) scores the ensemble as is.

s3t stands alone (no other peft_mape subpackage is imported), so the few helpers it needs
(answer-only projection, shifted labels) live here.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutput

from .aggregation import log_mean_exp
from .data import IGNORE_INDEX

# Families whose logits are exactly the output embedding of the decoder's last hidden state (no
# logit soft-capping or scaling), so the head may run on the scored positions alone.
PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2")


def decoder_and_head(model: nn.Module):
    """(decoder, output embedding) when logits are head(decoder hidden states), else ``None``."""
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def scored_log_probs(model: nn.Module, inputs: dict, labels: torch.Tensor) -> tuple:
    """(log p(label_t | tokens < t) of the scored tokens [N], scored mask [batch, length - 1]).

    The vocabulary projection runs on the scored positions only when the family allows it: a
    small LM's [batch, length, vocabulary] logits dominate its time and memory, and answers are a
    fraction of each sequence. Differentiable (it is also the training loss).
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1][scored]
    else:
        decoder, head = parts
        logits = head(decoder(**inputs).last_hidden_state[:, :-1][scored])
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1), scored


def per_example_mean(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean of each row's scored ``values`` (given flat, in ``scored``'s row-major order)."""
    full = torch.zeros(scored.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)
    return full.sum(1) / scored.sum(1)


def causal_lm_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's mean answer-token cross-entropy."""
    log_p, scored = scored_log_probs(model, inputs, labels)
    return -per_example_mean(log_p, scored).mean()


def mixture_token_log_probs(s3t, batches: list) -> list:
    """For [(inputs, labels)] batches: [batch, length - 1] tensors (CPU) of the log-probability
    of each scored label under the mean of the live shards' distributions, 0 where not scored.

    log mean_s p_s(y) needs only each shard's probability of the label itself, so shards are
    combined on the scored tokens and no shard's full distribution is kept. Each shard is
    activated once and scores every batch.
    """
    model = s3t.model
    device = next(model.parameters()).device
    batches = [({k: v.to(device) for k, v in inputs.items()}, labels.to(device)) for inputs, labels in batches]
    per_shard = []
    model.eval()
    with torch.no_grad():
        for shard, order_index, depth in s3t._live_shards():
            s3t._serve(shard, order_index, depth)
            per_shard.append([scored_log_probs(model, inputs, labels) for inputs, labels in batches])
    out = []
    for b in range(len(batches)):
        scored = per_shard[0][b][1]
        mixed = log_mean_exp(shard[b][0] for shard in per_shard)
        out.append(torch.zeros(scored.shape, dtype=mixed.dtype, device=device).masked_scatter(scored, mixed).cpu())
    return out


class S3TCausalLM(nn.Module):
    """The live shards of a causal-LM ``S3TModel`` served as one language model.

    ``forward`` returns ``.logits`` = log((1/m) Σ_s softmax(logits_s)) per position over the m
    live shards (each at its longest surviving prefix), and with ``labels`` a ``.loss``: each
    example's mean answer-token negative log-likelihood under the mixture, averaged over the
    batch. ``generate`` decodes greedily from the mixture. The wrapper holds no state of its own:
    after ``S3TModel.delete`` it serves the shorter prefixes at once. Evaluation only: dropout is
    always off and nothing is trainable.
    """

    def __init__(self, s3t):
        super().__init__()
        self.s3t = s3t  # not an nn.Module: a plain attribute
        self.model = s3t.model  # registered, so .parameters() and .to() reach the base model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutput:
        if kwargs.pop("past_key_values", None) is not None or kwargs.pop("cache", None) is not None:
            raise ValueError("S3TCausalLM takes no key/value cache: every shard needs its own (see generate)")
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        self.model.eval()
        mixed = log_mean_exp(self._shard_log_probs(self.s3t._live_shards(), input_ids=input_ids,
                                                   attention_mask=attention_mask, use_cache=False, **kwargs))
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX
            log_p = mixed[:, :-1][scored].gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
            loss = -per_example_mean(log_p, scored).mean()
        return CausalLMOutput(loss=loss, logits=mixed)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, pad_token_id: Optional[int] = None,
                 eos_token_id=None) -> torch.Tensor:
        """Greedy decoding from the mixture: at each step the token of highest mean probability.

        Prompts may be left-padded (``attention_mask`` 0 on padding); positions count real tokens
        only, as transformers' ``generate`` does. Each shard keeps its own key/value cache, so a
        step costs one single-token forward pass per live shard. Rows that produced an EOS get
        ``pad_token_id`` afterwards; decoding stops when every row has. Returns the prompts
        followed by the new tokens, like ``generate``.
        """
        if do_sample:
            raise NotImplementedError("S3TCausalLM.generate decodes greedily only (do_sample=False)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model.eval()
        device = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=device)
        shards = self.s3t._live_shards()
        caches = [DynamicCache(config=self.model.config) for _ in shards]
        step_kwargs = _step_kwargs(self.model)
        step_ids, positions = input_ids, (mask.cumsum(-1) - 1).clamp_min(0)
        finished = torch.zeros(len(input_ids), dtype=torch.bool, device=device)
        new_tokens = []
        for _ in range(max_new_tokens):
            log_probs = self._shard_log_probs(shards, caches, input_ids=step_ids, attention_mask=mask,
                                              position_ids=positions, use_cache=True, **step_kwargs["extra"],
                                              cache_kwarg=step_kwargs["cache"])
            tokens = log_mean_exp(log_probs)[:, -1].argmax(-1)
            if pad_token_id is not None:
                tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            new_tokens.append(tokens)
            finished |= torch.isin(tokens, eos)
            if bool(finished.all()):
                break
            step_ids, positions = tokens[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

    def _shard_log_probs(self, shards: list, caches: Optional[list] = None, cache_kwarg: str = "cache", **inputs):
        """Each live shard's next-token log-probabilities, one shard at a time: a generator, so
        :func:`log_mean_exp` holds a running sum and one shard's output, never m of them."""
        for i, (shard, order_index, depth) in enumerate(shards):
            self.s3t._serve(shard, order_index, depth)
            extra = {} if caches is None else {cache_kwarg: caches[i]}
            yield F.log_softmax(self.model(**inputs, **extra).logits.float(), dim=-1)


def _step_kwargs(model: nn.Module) -> dict:
    """How this transformers version's forward takes a cache (``cache``, formerly
    ``past_key_values``), and ``logits_to_keep=1`` where supported: a decoding step needs the
    last position's distribution only, so the prompt pass skips the vocabulary projection."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache": "cache" if "cache" in parameters else "past_key_values",
            "extra": {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}}


def log_prob_sums(token_log_probs: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per example: the sum (``"sum"``) or mean (``"mean"``) of its scored token log-probs."""
    scored = labels[:, 1:] != IGNORE_INDEX
    counts = scored.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no scored token (every label after the first is -100)")
    totals = token_log_probs.double().sum(1)
    return totals if reduction == "sum" else totals / counts


def store_answer_log_probs(s3t, store, reduction: str) -> torch.Tensor:
    """:func:`log_prob_sums` of every row of an ``ExampleStore``, in row order (float64); rows are
    scored in batches of similar length, so little is padded."""
    batches = store.inference_batches(s3t.config.eval_batch_size, with_labels=True)
    scores = mixture_token_log_probs(s3t, [(inputs, labels) for _, inputs, labels in batches])
    out = torch.empty(len(store), dtype=torch.float64)
    for (rows, _, labels), token_lp in zip(batches, scores):
        out[rows] = log_prob_sums(token_lp, labels, reduction)
    return out
