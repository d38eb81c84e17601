"""S3TModel: train every shard × order × stage, serve surviving prefixes, delete exactly.

All stage adapters live in one transformers model, injected with PEFT's functional API
(``inject_adapter_in_model`` / ``set_adapter`` / ``delete_adapter``). ``PeftModel`` is not used
because it assumes a single active adapter, while serving a shard activates a whole prefix of
stage adapters, one per layer block.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from peft.functional import delete_adapter, inject_adapter_in_model, set_adapter
from torch import nn
from tqdm.auto import tqdm

from . import persistence
from .aggregation import aggregate, predictions
from .blocks import block_lora_config, resolve_blocks
from .causal_lm import S3TCausalLM, log_prob_sums, mixture_token_log_probs, store_answer_log_probs
from .config import S3TConfig
from .data import MODEL_INPUT_COLUMNS, ExampleStore
from .heads import INITIAL, HeadSnapshots
from .registry import ProvenanceRegistry, assign_balanced, normalize_id
from .report import DeletionReport, OrderTruncation, StageInfo
from .sequences import select_orders
from .training import stage_seed, train_stage

StageCallback = Callable[[StageInfo, "S3TModel"], None]


class S3TModel:
    """Exact unlearning by sharded, sliced LoRA training (SPEC §6).

    ``model`` (e.g. a ``BertForSequenceClassification``, or a ``LlamaForCausalLM`` with
    ``S3TConfig(task="causal_lm")``) is adapted in place: its base weights stay frozen and every
    stage adds its own LoRA adapter on one layer block.
    """

    def __init__(self, model: nn.Module, config: S3TConfig):
        if not isinstance(config, S3TConfig):
            raise ValueError(f"config must be an S3TConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.heads = HeadSnapshots(model, config.head_modules)
        self.blocks, self.block_modules = resolve_blocks(
            model, config.lora, config.num_slices, config.layer_blocks, config.layers_pattern, config.head_modules
        )
        self.base_fingerprint = persistence.fingerprint(model, exclude=self.heads.parameters)
        self.heads.capture(INITIAL)
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        self.registry: Optional[ProvenanceRegistry] = None
        self._store: Optional[ExampleStore] = None

    # ------------------------------------------------------------------ training
    def fit(self, dataset, *, assignment: Optional[Mapping] = None, on_stage_end: Optional[StageCallback] = None,
            progress: bool = True) -> "S3TModel":
        """Train all stages on ``dataset`` (a ``datasets.Dataset`` with ids, labels, ``input_ids``).

        ``assignment`` (id -> (shard, slice)) reuses a previous partition; by default ids are split
        into m·L balanced slices with ``config.seed``. Prefixes shared by several orders train once.
        """
        if self.registry is not None:
            raise ValueError("this S3TModel is already fitted; use retrain_failed() or a new S3TModel")
        config = self.config
        store = self._store_from(dataset, for_training=True)
        if assignment is None:
            if len(store) < config.num_shards * config.num_slices:
                raise ValueError(
                    f"{len(store)} examples cannot fill {config.num_shards} shards × {config.num_slices} slices"
                )
            assignment = assign_balanced(store.ids, config.num_shards, config.num_slices, config.seed)
        else:
            assignment = {normalize_id(i): tuple(loc) for i, loc in assignment.items()}
            store.rows(list(assignment))
            unassigned = [i for i in store.ids if i not in assignment]
            if unassigned:
                raise ValueError(f"assignment lacks dataset id(s) {unassigned[:10]}")
        self.registry = ProvenanceRegistry(config.num_shards, config.num_slices, select_orders(config), assignment)
        self._store = store
        self._build(range(config.num_shards), on_stage_end, progress)
        return self

    def retrain_failed(self, dataset=None, *, shards: Optional[Iterable[int]] = None,
                       on_stage_end: Optional[StageCallback] = None, progress: bool = True) -> list:
        """Rebuild the truncated suffix of every order (of ``shards``; default: all truncated ones)
        on the surviving data; intact prefixes are kept. Returns the new adapter names.

        ``dataset`` is needed after ``load``; deleted ids in it are ignored.
        """
        registry = self._require_fitted()
        if dataset is not None:
            self._store = self._store_from(dataset, for_training=True)
        if self._store is None:
            raise ValueError("pass the training dataset: this S3TModel was loaded and holds no examples")
        full = self.config.num_slices
        if shards is None:
            shards = [s for s in range(registry.num_shards)
                      if any(registry.served_depth(s, b) < full for b in range(len(registry.orders[s])))]
        shards = list(shards)
        bad = [s for s in shards if not isinstance(s, int) or not 0 <= s < registry.num_shards]
        if bad:
            raise ValueError(f"unknown shard(s) {bad}; shards are 0..{registry.num_shards - 1}")
        return self._build(shards, on_stage_end, progress)

    def _build(self, shards: Iterable[int], on_stage_end: Optional[StageCallback], progress: bool) -> list:
        registry = self.registry
        plan: list = []
        for shard in shards:
            for order_index in range(len(registry.orders[shard])):
                for depth in range(1, self.config.num_slices + 1):
                    prefix = registry.current_prefix(shard, order_index, depth)
                    if not registry.is_live(registry.adapter_name(shard, prefix)) and (shard, prefix) not in plan:
                        plan.append((shard, prefix))
        trained = []
        for shard, prefix in tqdm(plan, desc="S3T stages", disable=not progress or not plan):
            trained.append(self._train_stage(shard, prefix, on_stage_end))
        return trained

    def _train_stage(self, shard: int, prefix: tuple, on_stage_end: Optional[StageCallback]) -> str:
        registry, config = self.registry, self.config
        depth = len(prefix)
        name = registry.adapter_name(shard, prefix)
        parents = [registry.adapter_name(shard, prefix[:d]) for d in range(1, depth)]
        ids = registry.stage_ids(shard, prefix)
        rows = self._store.rows(ids)
        head_trains = config.head == "per_stage" or (config.head == "first_stage" and depth == 1)
        seed = stage_seed(config.seed, shard, [k for k, _ in prefix])
        # The stage depends on (seed, shard, slice order, data) only: LoRA init and dropout draw
        # from a fresh seeded stream, leaving the caller's RNG state untouched.
        if name in getattr(self.model, "peft_config", {}):
            self._drop_adapter(name)  # left over from an interrupted run; retrain it from scratch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._inject(name, self.block_modules[depth - 1])
            self._activate(parents + [name])
            self.heads.restore(self._head_key(shard, prefix[:-1]) if depth > 1 else INITIAL)
            trainable = self._set_trainable(name, head_trains)
            loss = train_stage(self.model, trainable, self._store, rows, config, seed)
        for param in trainable:
            param.requires_grad_(False)
        if head_trains:
            self.heads.capture(name)
        block = depth - 1
        registry.record_adapter(name, shard, prefix, block, self.blocks[block], ids)
        if on_stage_end is not None:
            on_stage_end(StageInfo(name, shard, prefix, block, self.blocks[block], tuple(ids), loss), self)
        return name

    def _inject(self, name: str, module_names: Sequence[str]) -> None:
        with warnings.catch_warnings():
            # Several adapters in one model is the point here, not a mistake.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(block_lora_config(self.config.lora, module_names), self.model, adapter_name=name)

    def _activate(self, names: list) -> None:
        set_adapter(self.model, names, inference_mode=True)

    def _set_trainable(self, adapter: str, head_trains: bool) -> list:
        trainable = [p for n, p in self.model.named_parameters() if adapter in n.split(".")]
        if not trainable:
            raise RuntimeError(f"adapter {adapter!r} has no parameters")
        for param in trainable:
            param.requires_grad_(True)
        return trainable + self.heads.set_trainable(head_trains)

    def _head_key(self, shard: int, prefix: tuple) -> str:
        if self.config.head == "per_stage":
            return self.registry.adapter_name(shard, prefix)
        if self.config.head == "first_stage":
            return self.registry.adapter_name(shard, prefix[:1])
        return INITIAL

    # ------------------------------------------------------------------ deletion
    def delete(self, ids) -> DeletionReport:
        """Forget ``ids`` (one id or an iterable): revoke and drop every stage adapter trained on
        them. No training happens; affected shards fall back to their longest surviving prefix.

        Unknown ids raise ``KeyError`` (nothing changes); ids deleted before are a no-op listed in
        ``already_deleted``.
        """
        registry = self._require_fitted()
        start = time.perf_counter()
        before = self._depths()
        outcome = registry.delete(ids)
        for name in outcome.revoked:
            self._drop_adapter(name)
        after = self._depths()
        truncated = tuple(
            OrderTruncation(s, b, registry.orders[s][b], before[(s, b)], after[(s, b)])
            for (s, b) in sorted(before) if after[(s, b)] < before[(s, b)]
        )
        served = self.served_prefixes()
        return DeletionReport(
            deleted=tuple(outcome.deleted), already_deleted=tuple(outcome.already_deleted),
            revoked_adapters=tuple(outcome.revoked), truncated=truncated, served=served,
            failed_shards=tuple(s for s, (_, depth) in served.items() if depth == 0),
            latency_s=time.perf_counter() - start,
        )

    def _drop_adapter(self, name: str) -> None:
        # Deactivate first: PEFT re-activates some other adapter when an active one is deleted.
        self._activate([])
        delete_adapter(self.model, name, prefix="lora_")
        self.model.peft_config.pop(name, None)
        self.heads.drop(name)

    def _depths(self) -> dict:
        registry = self.registry
        return {(s, b): registry.served_depth(s, b)
                for s in range(registry.num_shards) for b in range(len(registry.orders[s]))}

    # ------------------------------------------------------------------ serving
    def served_prefixes(self) -> dict:
        """shard -> (order index, depth) of the prefix each shard serves (depth 0: failed)."""
        registry = self._require_fitted()
        return {s: registry.served_prefix(s) for s in range(registry.num_shards)}

    def stage_logits(self, shard: int, order_index: int, depth: int, inputs: Mapping) -> torch.Tensor:
        """Logits of ``shard``'s order ``order_index`` truncated to ``depth`` live stages."""
        registry = self._require_fitted()
        if not 0 <= shard < registry.num_shards or not 0 <= order_index < len(registry.orders[shard]):
            raise ValueError(f"no order {order_index} in shard {shard}")
        if not 1 <= depth <= registry.served_depth(shard, order_index):
            raise ValueError(
                f"shard {shard} order {order_index} serves depth {registry.served_depth(shard, order_index)}, "
                f"not {depth}"
            )
        self._serve(shard, order_index, depth)
        return self._forward(self._model_inputs(inputs))

    def shard_logits(self, shard: int, inputs: Mapping) -> torch.Tensor:
        """Logits of the longest surviving prefix of ``shard``."""
        order_index, depth = self._live_prefix(shard)
        self._serve(shard, order_index, depth)
        return self._forward(self._model_inputs(inputs))

    def predict_scores(self, data) -> torch.Tensor:
        """Aggregated (N, C) scores over live shards for a batch (mapping of tensors) or a Dataset."""
        self._require_task("sequence_classification", "predict_scores")
        return aggregate(self._per_shard_logits(data), self.config.aggregation)

    def predict(self, data) -> torch.Tensor:
        self._require_task("sequence_classification", "predict")
        return predictions(self._per_shard_logits(data), self.config.aggregation)

    def evaluate(self, dataset) -> float:
        """Accuracy on a labelled ``datasets.Dataset``."""
        self._require_task("sequence_classification", "evaluate")
        labels = self._store_from(dataset, for_training=False).labels
        if labels is None:
            raise ValueError(f"the dataset needs a label column {self.config.label_column!r}")
        return float((self.predict(dataset) == labels).float().mean())

    def _per_shard_logits(self, data) -> list:
        self._require_fitted()
        if isinstance(data, Mapping):
            inputs = self._model_inputs(data)
            batches = [(list(range(len(inputs["input_ids"]))), inputs)]
        else:
            batches = self._store_from(data, for_training=False).inference_batches(self.config.eval_batch_size)
        outputs = []
        for shard, order_index, depth in self._live_shards():
            self._serve(shard, order_index, depth)
            logits = [self._forward(inputs) for _, inputs in batches]
            ordered = torch.empty(sum(len(rows) for rows, _ in batches), logits[0].shape[-1], dtype=logits[0].dtype)
            for (rows, _), chunk in zip(batches, logits):
                ordered[rows] = chunk
            outputs.append(ordered)
        return outputs

    # ------------------------------------------------------------------ causal LMs
    def as_causal_lm(self) -> S3TCausalLM:
        """The live shards as one causal LM (``nn.Module``): ``model(**batch).logits`` are the
        log of the mean of the shards' next-token probabilities, and ``generate`` decodes greedily
        from that mixture. It always serves the current prefixes, deletions included."""
        self._require_task("causal_lm", "as_causal_lm")
        self._require_fitted()
        return S3TCausalLM(self)

    def token_log_probs(self, batch: Mapping) -> torch.Tensor:
        """[batch, length - 1]: log p(label_t | tokens < t) under the mixture of the live shards
        for the scored labels (``config.label_column``, -100: not scored; right-padded batch), 0
        elsewhere. Equals gathering ``as_causal_lm()(**batch).logits`` at the labels, without
        forming any [batch, length, vocabulary] tensor."""
        self._require_task("causal_lm", "token_log_probs")
        self._require_fitted()
        column = self.config.label_column
        if column not in batch:
            raise ValueError(f"the batch needs per-token labels {column!r}; got keys {sorted(batch)}")
        return mixture_token_log_probs(self, [(self._model_inputs(batch), batch[column])])[0]

    def answer_log_probs(self, data, *, reduction: str = "mean") -> torch.Tensor:
        """Per example (float64, in order): the mean (or ``reduction="sum"``) over its scored
        tokens of the mixture's log-probability — for question/answer rows labelled -100 on the
        prompt, log P(answer | question) per answer token (or in total). ``data``: a right-padded
        batch (mapping of tensors) or a ``datasets.Dataset`` (batched by length internally)."""
        self._require_task("causal_lm", "answer_log_probs")
        self._require_fitted()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
        if isinstance(data, Mapping):
            return log_prob_sums(self.token_log_probs(data), data[self.config.label_column], reduction)
        store = self._store_from(data, for_training=False)
        if store.labels is None:
            raise ValueError(f"the dataset needs per-token labels {self.config.label_column!r}")
        return store_answer_log_probs(self, store, reduction)

    def _require_task(self, task: str, method: str) -> None:
        if self.config.task != task:
            other = ("as_causal_lm(), token_log_probs() or answer_log_probs()" if task == "sequence_classification"
                     else "predict(), predict_scores() or evaluate()")
            raise ValueError(f"{method}() serves task={task!r}, but this S3TModel has task={self.config.task!r}; "
                             f"use {other}")

    def _live_shards(self) -> list:
        """[(shard, order index, depth)] of every shard that still serves a prefix."""
        registry = self._require_fitted()
        live = [(s, *registry.served_prefix(s)) for s in range(registry.num_shards)]
        live = [entry for entry in live if entry[2] > 0]
        if not live:
            raise RuntimeError("every shard has failed (no surviving prefix); call retrain_failed()")
        return live

    def _live_prefix(self, shard: int) -> tuple:
        registry = self._require_fitted()
        if not 0 <= shard < registry.num_shards:
            raise ValueError(f"unknown shard {shard}; shards are 0..{registry.num_shards - 1}")
        order_index, depth = registry.served_prefix(shard)
        if depth == 0:
            raise RuntimeError(f"shard {shard} has no surviving prefix; call retrain_failed()")
        return order_index, depth

    def _serve(self, shard: int, order_index: int, depth: int) -> None:
        registry = self.registry
        prefix = registry.current_prefix(shard, order_index, depth)
        self._activate([registry.adapter_name(shard, prefix[:d]) for d in range(1, depth + 1)])
        self.heads.restore(self._head_key(shard, prefix))

    def _forward(self, inputs: Mapping) -> torch.Tensor:
        self.model.eval()
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model(**{k: v.to(device) for k, v in inputs.items()}).logits.cpu()

    def _model_inputs(self, inputs: Mapping) -> dict:
        if "input_ids" not in inputs:
            raise ValueError(f"inputs need 'input_ids'; got keys {sorted(inputs)}")
        return {k: v for k, v in inputs.items() if k in MODEL_INPUT_COLUMNS}

    def _store_from(self, dataset, *, for_training: bool) -> ExampleStore:
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return ExampleStore.from_dataset(
            dataset, id_column=self.config.id_column, label_column=self.config.label_column,
            pad_token_id=0 if pad is None else int(pad), require_ids=for_training, require_labels=for_training,
            token_labels=self.config.task == "causal_lm",
        )

    def _require_fitted(self) -> ProvenanceRegistry:
        if self.registry is None:
            raise ValueError("this S3TModel is not fitted; call fit() or S3TModel.load()")
        return self.registry

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Atomically write live adapters (PEFT layout, safetensors), head snapshots and the registry."""
        self._require_fitted()
        return persistence.save(self, Path(path))

    @classmethod
    def load(cls, path, model: nn.Module, *, check_base: bool = True) -> "S3TModel":
        """Rebuild a saved S3TModel on a fresh copy of the base ``model`` it was trained from."""
        return persistence.load(cls, Path(path), model, check_base=check_base)
