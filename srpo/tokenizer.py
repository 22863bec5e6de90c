"""An offline CLIP BPE tokenizer: transformers' CLIPTokenizer built from the BPE vocabulary that
open_clip's wheel ships, so tiny models and the lab world need no hub download."""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocab(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE (49408 tokens) into ``folder``."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def _cache_dir() -> Path:
    root = os.environ.get("SRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srpo")
    return Path(root) / "clip-bpe"


@lru_cache(maxsize=None)
def clip_tokenizer(max_length: int = 77):
    """A transformers ``CLIPTokenizer`` equal to OpenAI CLIP's, built offline."""
    from transformers import CLIPTokenizer

    folder = _cache_dir()
    if not (folder / "merges.txt").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        write_clip_vocab(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            pass
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
