"""``train.compile``: the transformer under torch.compile, compiled lazily at its first call and
reused by every later one (the rollout, both gradient branches, evaluation, the guard).
``blocks`` compiles each repeated block on its own (regional compilation: the blocks of a list
share one compiled graph, so compile time does not grow with depth); ``model`` the whole
transformer. ``Module.compile`` keeps the module and its parameter names, so state dicts,
checkpoints and LoRA files are what they are without it.

Under FSDP2 (``blocks`` only) each block is compiled after it is sharded, as torchtitan does:
the block's ``forward`` is compiled, so FSDP's gather / reshard hooks around it stay eager and
the compiled graph sees the gathered weights."""

from __future__ import annotations

import contextlib

from torch import nn

MODES = ("none", "blocks", "model")
_ATTR = "_srpo_compiled"  # the compiled callable kept on each compiled module, for :func:`eager`


def parts(transformer: nn.Module, mode: str) -> list[nn.Module]:
    """The modules ``mode`` compiles: the repeated blocks, or the transformer itself."""
    from .parallel import blocks, unwrap

    module = unwrap(transformer)
    return blocks(module) if mode == "blocks" else [module]


def apply(transformer: nn.Module, mode: str, fullgraph: bool = False, sharded: bool = False) -> int:
    """Compile ``transformer`` (or the module under its DDP wrapper) in place; returns how many
    modules were wrapped. ``fullgraph``: fail on a graph break instead of splitting the graph.
    ``sharded``: the blocks are FSDP2 modules; their forwards are compiled, their hooks stay eager."""
    import torch

    if mode == "none":
        return 0
    # every Module.compile shares one code object (Module._call_impl): the blocks' classes x grad
    # mode x the run's batch sizes must not reach dynamo's default limit of 8, past which it
    # would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = parts(transformer, mode)
    for part in compiled:
        if sharded:
            part.forward = torch.compile(part.forward, fullgraph=fullgraph)
            setattr(part, _ATTR, ("forward", part.forward))
        else:
            part.compile(fullgraph=fullgraph)
            setattr(part, _ATTR, ("call", part._compiled_call_impl))
    return len(compiled)


def compiled_modules(transformer: nn.Module) -> list[nn.Module]:
    from .parallel import unwrap

    return [m for m in unwrap(transformer).modules() if hasattr(m, _ATTR)]


@contextlib.contextmanager
def eager(transformer: nn.Module):
    """Run ``transformer`` uncompiled inside the block (its compiled code is kept and back after):
    the eager side of a comparison on the same module, e.g. a diffusers pipeline as users run it."""
    mods = compiled_modules(transformer)
    for m in mods:
        kind, fn = getattr(m, _ATTR)
        if kind == "call":
            m._compiled_call_impl = None
        else:
            del m.forward  # the class's forward
    try:
        yield
    finally:
        for m in mods:
            kind, fn = getattr(m, _ATTR)
            if kind == "call":
                m._compiled_call_impl = fn
            else:
                m.forward = fn


def remove(transformer: nn.Module) -> None:
    """Undo :func:`apply`: the modules run eagerly again and forget their compiled code."""
    for m in compiled_modules(transformer):
        kind, _ = getattr(m, _ATTR)
        if kind == "call":
            m._compiled_call_impl = None
        else:
            del m.forward
        delattr(m, _ATTR)
