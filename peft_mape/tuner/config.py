"""``MAPEConfig``: the adapter configuration of a MAPE-Unlearn request."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .registration import ensure_peft_type

UNIT_CHOICES = ("heads", "filters", "both")
ACCOUNTING_CHOICES = ("per_type", "pooled", "param_weighted")
OBJECTIVE_CHOICES = ("mlr", "mlf", "norm")
SCOPE_CHOICES = ("unit", "output_side")
BASE_CHECKS = ("warn", "error", "off")


@dataclass
class MAPEConfig(PeftConfig):
    """Configuration of a MAPE-Unlearn adapter.

    A MAPE adapter holds one unlearning request: the selection of attention heads and FFN
    filters found by the mask search, and a dense fp32 delta over the parameters those units
    own. Before ``unlearn()`` runs, the adapter is empty and the model is unchanged.

    Architecture fields (``layers_path`` ... ``num_key_value_heads``) are filled from
    ``model.config.model_type`` for the supported families (bert, roberta, distilbert, gpt2,
    llama, mistral, qwen2, vit); set them to use any other Transformer.
    """

    sparsity: float = field(
        default=0.9,
        metadata={"help": "Fraction of units left frozen (0 < sparsity < 1); 0.9 updates 10%."},
    )
    units: str = field(
        default="both",
        metadata={"help": "Which units may be selected: 'heads', 'filters' or 'both'."},
    )
    sparsity_accounting: str = field(
        default="per_type",
        metadata={
            "help": "How the budget is counted: 'per_type' (the ratio holds separately for heads "
            "and filters, whose scores live on different scales), 'pooled' (one ranking over all "
            "units, the paper's literal constraint) or 'param_weighted' (budget in parameters)."
        },
    )
    objective: str = field(
        default="mlr",
        metadata={
            "help": "Mask-search objective (SPEC §3): 'mlr' (minimise the retain loss: forget gradient + "
            "retain curvature), 'mlf' (maximise the forget loss: the roles of the two sets swapped; pairs "
            "with GA-family updates) or 'norm' (summed |forget gradient|; cheap, needs no retain statistics)."
        },
    )
    rearrangement_rounds: int = field(
        default=1,
        metadata={"help": "Rounds of greedy block-diagonal rearrangement after the warm start."},
    )
    update_scope: str = field(
        default="unit",
        metadata={
            "help": "'unit': a head owns its Q/K/V rows and output-projection columns, a filter its "
            "up/gate rows and down-projection column. 'output_side': only the output-projection "
            "and down-projection columns are updated."
        },
    )
    max_retain_examples: int = field(
        default=1024,
        metadata={"help": "Size of the retain sample used for statistics, so cost does not grow with |D_r|."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Filled automatically: a regex matching the projections MAPE wraps."},
    )
    layers_path: Optional[str] = field(
        default=None,
        metadata={"help": "Dotted path (or its suffix) of the ModuleList of Transformer blocks, e.g. 'model.layers'."},
    )
    q_proj: Optional[str] = field(default=None, metadata={"help": "Query projection, relative to a block."})
    k_proj: Optional[str] = field(default=None, metadata={"help": "Key projection, relative to a block."})
    v_proj: Optional[str] = field(default=None, metadata={"help": "Value projection, relative to a block."})
    qkv_proj: Optional[str] = field(
        default=None, metadata={"help": "Fused Q|K|V projection (GPT-2 'attn.c_attn'), instead of q/k/v."}
    )
    o_proj: Optional[str] = field(
        default=None, metadata={"help": "Attention output projection; its input is split into head blocks."}
    )
    up_proj: Optional[str] = field(default=None, metadata={"help": "FFN up (input) projection."})
    gate_proj: Optional[str] = field(default=None, metadata={"help": "FFN gate projection (SwiGLU), if any."})
    down_proj: Optional[str] = field(
        default=None, metadata={"help": "FFN down (output) projection; each input feature is a filter."}
    )
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Query heads per block."})
    num_key_value_heads: Optional[int] = field(
        default=None, metadata={"help": "Key/value heads per block (GQA); defaults to num_attention_heads."}
    )
    selection: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Written by unlearn(): {'heads': {layer: [head, ...]}, 'filters': {layer: [filter, ...]}}. "
            "Recorded so that delta shapes can be rebuilt on load."
        },
    )
    base_fingerprint: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Written by unlearn(): a fingerprint of the base weights the deltas were computed on, checked "
            "when the adapter is loaded (see base_model_check)."
        },
    )
    base_model_check: str = field(
        default="warn",
        metadata={
            "help": "What loading does when the base weights differ from the recorded fingerprint: 'warn', "
            "'error' (raise peft_mape.tuner.integrity.BaseModelMismatch) or 'off'."
        },
    )
    weights_digest: Optional[str] = field(
        default=None,
        metadata={
            "help": "Written by save_pretrained(): SHA-256 of the saved weights file, checked once when that file "
            "is loaded, so a corrupt or mismatched file is an error."
        },
    )
    request_record: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Written by unlearn_request(): what the erasure request held by this adapter did (hashes of the "
            "removed examples, never their contents). Saved and loaded with the adapter; see model.request_log."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        # The enum member, not a string: transformers' load_adapter calls `.value` on it.
        self.peft_type = ensure_peft_type()
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not isinstance(self.sparsity, (int, float)) or not 0.0 < float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be strictly between 0 and 1, got {self.sparsity!r}")
        _check_choice("units", self.units, UNIT_CHOICES)
        _check_choice("sparsity_accounting", self.sparsity_accounting, ACCOUNTING_CHOICES)
        _check_choice("objective", self.objective, OBJECTIVE_CHOICES)
        _check_choice("update_scope", self.update_scope, SCOPE_CHOICES)
        _check_int("rearrangement_rounds", self.rearrangement_rounds, minimum=0)
        _check_choice("base_model_check", self.base_model_check, BASE_CHECKS)
        if self.selection is not None and not isinstance(self.selection, dict):
            raise ValueError(f"selection must be a dict of heads/filters per layer or None, got {self.selection!r}")
        if self.base_fingerprint is not None and not isinstance(self.base_fingerprint, dict):
            raise ValueError(f"base_fingerprint must be a dict or None, got {self.base_fingerprint!r}")
        if self.weights_digest is not None and not isinstance(self.weights_digest, str):
            raise ValueError(f"weights_digest must be a string or None, got {self.weights_digest!r}")
        if isinstance(self.target_modules, str):
            try:  # PEFT matches it against module names while loading, before our own targets apply
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"target_modules is not a valid regular expression ({error}): "
                                 f"{self.target_modules[:80]!r}...") from None
        if self.request_record is not None and not isinstance(self.request_record, dict):
            raise ValueError(f"request_record must be a dict or None, got {self.request_record!r}")
        _check_int("max_retain_examples", self.max_retain_examples, minimum=1)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's config save, written through a temporary file and one rename, with the digest of
        the weights file beside it: ``PeftModel.save_pretrained`` writes the weights first and the
        config last, so an interrupted save leaves a mismatched pair that the loader refuses."""
        from .saving import save_config

        save_config(save_directory, super().save_pretrained, **kwargs)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
