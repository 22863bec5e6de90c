"""The lab's prompt sets: content-only prompts (no style word), split into the prompts SRPO
trains on and held-out prompts it is evaluated on. Regenerated deterministically by
:func:`write_prompt_sets` and shipped as text files in ``srpo/lab/prompts/``."""

from __future__ import annotations

from pathlib import Path

import torch

from .captions import content_text
from .render import COLOUR_NAMES, SHAPES

PROMPTS = Path(__file__).parent / "prompts"
TRAIN_FILE = PROMPTS / "train.txt"
HELDOUT_FILE = PROMPTS / "heldout.txt"


def prompt_sets(seed: int = 7, n_pairs_train: int = 100, n_pairs_heldout: int = 84) -> tuple[list[str], list[str]]:
    """(train, held-out): the 24 one-object prompts split 12 / 12, plus disjoint two-object sets."""
    g = torch.Generator().manual_seed(seed)
    singles = [((c, s),) for c in COLOUR_NAMES for s in SHAPES]
    pairs = [(a, b) for a in singles for b in singles if a[0] != b[0]]
    singles = [singles[i] for i in torch.randperm(len(singles), generator=g).tolist()]
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist()]
    seen, unique = set(), []
    for a, b in pairs:  # one order per unordered pair, so no prompt is in both sets reversed
        if frozenset((a[0], b[0])) not in seen:
            seen.add(frozenset((a[0], b[0])))
            unique.append(a + b)
    half = len(singles) // 2
    train = singles[:half] + unique[:n_pairs_train]
    heldout = singles[half:] + unique[n_pairs_train:n_pairs_train + n_pairs_heldout]
    return [content_text(c) for c in train], [content_text(c) for c in heldout]


def write_prompt_sets(folder: Path = PROMPTS) -> None:
    train, heldout = prompt_sets()
    folder.mkdir(parents=True, exist_ok=True)
    head = "# lab prompts (content only, no style word); regenerate with `srpo lab build`\n"
    (folder / "train.txt").write_text(head + "\n".join(train) + "\n")
    (folder / "heldout.txt").write_text(head + "\n".join(heldout) + "\n")
