"""A word-level toy tokenizer matching conftest's tiny Llama (vocab 40, id 0 = EOS/pad), for the
causal-LM and TOFU tests: every word is one token, so prompt/answer lengths are hand-countable."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import VOCAB

WORDS = ("Question : Answer who wrote the play a book cat sat on mat what is capital of france paris "
         "berlin madrid rome sky blue red green he she they author born in city").split()


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace/punctuation-split words -> ids 2.., <eos> = 0 (also pad), <unk> = 1."""
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= VOCAB, "the toy vocabulary must fit the tiny model's embedding table"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>")
