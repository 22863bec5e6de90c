"""A quantized frozen base for LoRA on one smaller GPU (``model.quantize``): every frozen
``nn.Linear`` weight of the transformer is stored in int8, fp8 or NF4 with torchao (weight-only:
activations, LoRA adapters, gradients and the optimizer stay in full precision).

torchao rather than bitsandbytes: its int8 and NF4 tensors run on the CPU (the tests train
through them here) as well as on CUDA, they are torch tensor subclasses that peft's LoRA layers
wrap as they are, and they need no compiled CUDA library at import. fp8 needs a GPU to be fast;
on the CPU it runs through the same dequantising path.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

MODES = ("none", "int8", "fp8", "nf4")
BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}  # per weight, scales included
NF4_BLOCK = 64 * 256  # NF4's blocks and its double-quantised scalers: a weight must hold whole ones


def _torchao():
    try:
        import torchao.quantization as q
    except ImportError as e:  # pragma: no cover - a dependency; a broken install
        raise UserError(f"model.quantize needs torchao ({e}): pip install torchao") from None
    return q


def linear(module: nn.Module, mode: str) -> bool:
    """Quantize ``module``'s weight in place when it is a frozen ``nn.Linear`` (True when done).
    NF4 skips a weight that does not hold whole NF4 blocks (a small layer: it stays as it is)."""
    if mode == "none" or not isinstance(module, nn.Linear) or module.weight.requires_grad:
        return False
    if module.weight.is_meta or type(module.weight.data) is not torch.Tensor:  # a skeleton, or done already
        return False
    if mode == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        if module.weight.numel() % NF4_BLOCK:
            return False
        module.weight = nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)
        return True
    q = _torchao()
    config = q.Int8WeightOnlyConfig() if mode == "int8" else q.Float8WeightOnlyConfig()
    holder = nn.Sequential(module)  # quantize_ replaces the children its filter matches
    q.quantize_(holder, config, filter_fn=lambda m, _: m is module)
    return True


def apply(transformer: nn.Module, mode: str) -> int:
    """Quantize every frozen Linear weight of an already materialised transformer; returns how
    many were."""
    return sum(linear(m, mode) for m in list(transformer.modules()))


def plain(t: torch.Tensor) -> torch.Tensor:
    """A quantized weight as a plain tensor of its original dtype (for saving); others as they are."""
    if type(t) is torch.Tensor or isinstance(t, nn.Parameter) and type(t.data) is torch.Tensor:
        return t
    original = getattr(t, "get_original_weight", None)  # NF4's own name for it
    return original() if original is not None else t.dequantize()
