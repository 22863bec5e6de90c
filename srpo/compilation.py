"""``train.compile``: the transformer under torch.compile, compiled lazily at its first call and
reused by every later one (the rollout, both gradient branches, evaluation, the guard).
``blocks`` compiles each repeated block on its own (regional compilation: the blocks of a list
share one compiled graph, so compile time does not grow with depth); ``model`` the whole
transformer. ``Module.compile`` keeps the module and its parameter names, so state dicts,
checkpoints and LoRA files are what they are without it."""

from __future__ import annotations

from torch import nn

MODES = ("none", "blocks", "model")


def apply(transformer: nn.Module, mode: str, fullgraph: bool = False) -> int:
    """Compile ``transformer`` (or the module under its DDP wrapper) in place; returns how many
    modules were wrapped. ``fullgraph``: fail on a graph break instead of splitting the graph."""
    from .parallel import blocks, unwrap

    if mode == "none":
        return 0
    module = unwrap(transformer)
    parts = blocks(module) if mode == "blocks" else [module]
    for part in parts:
        part.compile(fullgraph=fullgraph)
    return len(parts)
