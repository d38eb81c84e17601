"""TOFU-mini benchmark setup: the data, SmolLM2-135M, and the cached "original" and "retrained" models.

Fine-tuning trains only the top ``train_layers`` decoder blocks (embeddings, the tied LM head,
the lower blocks and the final norm stay frozen): on 2 CPU cores a full-model backward pass
costs ~3x more, and the memorised facts then live in those blocks. The loss is the mean
answer-token cross-entropy of each example (prompt masked), averaged over the batch — the
same per-example loss ``unlearn()`` uses. Trained blocks are cached under
``mape_devkit.assets.cache_dir() / "tofu_mini"`` keyed by a hash of the recipe and the token ids,
so reruns load them in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mape_devkit: the repository's helpers
from mape_devkit import assets  # noqa: E402
from peft_mape.common.causal_lm import answer_token_log_probs, build_qa_dataset
from peft_mape.common.data import make_loader

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu_mini"


def load_split(name: str, data_dir: Path = DATA_DIR) -> list[dict]:
    """One TOFU-mini split (JSON lines) as a list of dicts with question/answer(/perturbed_answer)."""
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"TOFU-mini split {name!r} not found at {path} (see ../shared/README.md)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tokenizer():
    return AutoTokenizer.from_pretrained(assets.smollm_checkpoint())


def load_base_model():
    """SmolLM2-135M in fp32 with SDPA attention, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(assets.smollm_checkpoint(), attn_implementation="sdpa",
                                                 dtype=torch.float32)
    return model.eval()


@dataclass(frozen=True)
class Recipe:
    """How the original and retrained models are fine-tuned (all of it goes into the cache key)."""

    train_layers: int = 8
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 4
    warmup_ratio: float = 0.1
    template: str = "plain"
    max_length: int = 56
    max_answer_tokens: int = 16
    seed: int = 0


def qa_dataset(tokenizer, records: list[dict], recipe: Recipe):
    """Model-ready examples (labels -100 on the prompt) for TOFU records, as the recipe encodes them."""
    return build_qa_dataset(tokenizer, [r["question"] for r in records], [r["answer"] for r in records],
                            template=recipe.template, max_length=recipe.max_length,
                            max_answer_tokens=recipe.max_answer_tokens)


def as_examples(dataset) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.tensor(v) for k, v in row.items()} for row in dataset]


def top_layer_names(model, count: int) -> list[str]:
    layers = model.model.layers
    if not 1 <= count <= len(layers):
        raise ValueError(f"train_layers must be in 1..{len(layers)}, got {count}")
    return [f"model.layers.{i}." for i in range(len(layers) - count, len(layers))]


def _cache_key(tag: str, recipe: Recipe, dataset) -> str:
    columns = dataset.to_dict()
    digest = hashlib.sha256(json.dumps([tag, asdict(recipe), str(assets.smollm_checkpoint().name),
                                        columns["input_ids"], columns["labels"]]).encode())
    return digest.hexdigest()[:16]


def train_epochs(model, examples, tokenizer, recipe: Recipe, desc: str, *, progress: bool = True) -> dict:
    """AdamW with linear warmup over whole epochs on the parameters of ``model`` that require grad.

    The loss is the mean answer-token cross-entropy of each example, averaged over the batch
    (``unlearn()``'s per-example loss). Leaves the model in eval mode with nothing trainable;
    returns the training seconds, steps and the last epoch's mean loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(recipe.seed)
    loader = make_loader(examples, recipe.batch_size, tokenizer.pad_token_id, shuffle=True, seed=recipe.seed)
    total_steps = recipe.epochs * len(loader)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * total_steps), total_steps)
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False, mininterval=10)
    start = time.perf_counter()
    model.train()  # SmolLM2 has no dropout; train() so adapters' dropout (if any) acts as in training
    losses = []
    for _ in range(recipe.epochs):
        for batch in loader:
            token_lp = answer_token_log_probs(model, batch)
            counts = (batch["labels"][:, 1:] != -100).sum(1)
            loss = -(token_lp.sum(1) / counts).mean()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return {"seconds": time.perf_counter() - start, "examples": len(examples), "steps": total_steps,
            "final_loss": sum(losses[-len(loader):]) / len(loader), "recipe": asdict(recipe),
            "threads": torch.get_num_threads()}


def fine_tune(records: list[dict], tokenizer, recipe: Recipe, tag: str, *, use_cache: bool = True,
              progress: bool = True):
    """Fine-tune SmolLM2 on ``records`` (cached); returns (model, metadata with the training seconds).

    Plain fine-tuning (AdamW over whole epochs), not the library's unlearning loop (Adam on cycled
    batches towards a stopping target): the cached originals fix this recipe.
    """
    dataset = qa_dataset(tokenizer, records, recipe)
    cache = assets.cache_dir() / "tofu_mini" / f"{tag}-{_cache_key(tag, recipe, dataset)}"
    model = load_base_model()
    if use_cache and (cache / "trained.safetensors").exists():
        model.load_state_dict(load_file(cache / "trained.safetensors"), strict=False)
        meta = json.loads((cache / "meta.json").read_text())
        meta["cached"] = True
        return model, meta
    prefixes = top_layer_names(model, recipe.train_layers)
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(p) for p in prefixes))
    meta = dict(tag=tag, **train_epochs(model, as_examples(dataset), tokenizer, recipe, f"fine-tune {tag}",
                                        progress=progress))
    meta.update(cached=False)
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters()
               if any(n.startswith(pre) for pre in prefixes)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent))
    save_file(trained, tmp / "trained.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return model, meta


def load_trained(records: list[dict], tokenizer, recipe: Recipe, tag: str):
    """A fresh copy of a cached fine-tuned model (``fine_tune`` must have run for these inputs)."""
    model, meta = fine_tune(records, tokenizer, recipe, tag, use_cache=True, progress=False)
    if not meta.get("cached"):
        raise RuntimeError(f"{tag}: expected a cached model, but it had to be trained")
    return model
