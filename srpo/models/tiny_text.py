"""Tokenizers for the tiny random-weight families, built in code (nothing is downloaded): a
byte-level BPE with Qwen2's normaliser and pre-tokenizer (the pipeline the Qwen, Mistral-Small
and Qwen3 tokenizers share), trained on a small fixed corpus, so every build is the same."""

from __future__ import annotations

import json


def byte_bpe(corpus, vocab_size: int, special=(), min_frequency: int = 0, decoder: bool = False):
    """A ``tokenizers.Tokenizer``: NFC, Qwen2's split regex, byte-level BPE trained on ``corpus``
    (``special`` tokens first in the vocabulary); ``decoder`` adds the byte-level decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if decoder:
        tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def vocab_and_merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a trained BPE, as ``Qwen2Tokenizer(vocab=, merges=)`` takes them."""
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges
