"""LoRA on the transformer through peft, saved in the format diffusers' ``load_lora_weights`` reads.

Injection uses diffusers' own ``add_adapter`` (peft's ``inject_adapter_in_model``): the base
weights stay frozen in their storage dtype, the adapters are trainable float32 master weights.
Saving and merging work on plain state dicts (``X.lora_A.default.weight`` ...), so they need no
live peft layers and work the same on an unsharded, DDP or gathered-FSDP state.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

ADAPTER = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_LORA_KEY = re.compile(rf"^(.*)\.lora_([AB])\.{ADAPTER}\.weight$")


def targets(cfg, model) -> list[str]:
    """``lora.target_modules``, or the model family's defaults when unset."""
    return list(cfg.target_modules) if cfg.target_modules else list(model.lora_targets)


def peft_config(cfg, target_modules: list[str]):
    """A ``peft.LoraConfig`` from the ``lora:`` config section."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(target_modules),
                      lora_dropout=cfg.dropout, init_lora_weights=True if cfg.init == "zeros" else "gaussian")


def initial_values(cfg, seed: int):
    """``initial(name, shape)``: an adapter parameter's initial value, a function of (seed, its
    name) alone, so every rank, layout and sharded start makes the same one. ``lora_B``: zeros;
    ``lora_A``: peft's initialisations (``zeros``: Kaiming-uniform with a = sqrt(5); ``gaussian``:
    normal with std 1 / rank), drawn from the parameter's own generator."""
    import math
    import zlib

    from . import seeding

    def initial(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if ".lora_A." not in name:
            return torch.zeros(shape)
        gen = seeding.generator(seed, 0, zlib.crc32(name.encode()), "lora_init")
        if cfg.init == "gaussian":
            return torch.randn(shape, generator=gen) / cfg.rank
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] weight
        return torch.rand(shape, generator=gen) * (2 * bound) - bound

    return initial


def apply(model, cfg, seed: int = 0) -> int:
    """Inject adapters into ``model.transformer`` when ``cfg.enabled``; returns the number of
    trainable parameters. The adapters' initial values are :func:`initial_values` (on a
    skeleton's meta parameters, the sharded start fills them)."""
    transformer = model.transformer
    if not cfg.enabled:
        return sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    names = targets(cfg, model)
    linear_names = {n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    if not any(n == t or n.endswith("." + t) for n in linear_names for t in names):
        example = ", ".join(list(model.lora_targets)[:4]) or "to_q, to_k, to_v, to_out.0"
        raise UserError(f"lora.target_modules {names} match no Linear layer of "
                        f"{type(transformer).__name__}: use names such as {example}")
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(peft_config(cfg, names), adapter_name=ADAPTER)
    initial, n = initial_values(cfg, seed), 0
    for name, p in transformer.named_parameters():
        if p.requires_grad:
            p.data = p.data.float() if p.is_meta else initial(name, tuple(p.shape)).to(p.device)  # fp32 masters
            n += p.numel()
    return n


def is_lora_state(state: dict) -> bool:
    return any(_LORA_KEY.match(k) for k in state)


def adapter_state(state: dict) -> dict[str, torch.Tensor]:
    """``X.lora_A.default.weight`` -> ``X.lora_A.weight`` (the peft / diffusers file naming)."""
    out = {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m:
            out[f"{m.group(1)}.lora_{m.group(2)}.weight"] = v
    return out


def metadata(cfg, target_modules: list[str]) -> dict:
    """LoraConfig fields diffusers stores in the file so ``load_lora_weights`` restores alpha."""
    return {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(target_modules),
            "lora_dropout": cfg.dropout}


def save(path: str | Path, state: dict, cfg, model, dtype: torch.dtype | None = None) -> Path:
    """Write the adapters of a (full, unsharded) transformer state dict as
    ``path/pytorch_lora_weights.safetensors`` in the format the model family's pipeline
    ``load_lora_weights`` reads."""
    layers = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in adapter_state(state).items()}
    if not layers:
        raise UserError("no LoRA adapters in the state to save: was lora.enabled set for this run?")
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_lora(path, layers, metadata(cfg, targets(cfg, model)))
    return Path(path) / WEIGHT_NAME


def split(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A peft-injected state -> (plain transformer weights without ``base_layer``, adapters)."""
    plain, adapters = {}, {}
    for k, v in state.items():
        if _LORA_KEY.match(k):
            adapters[k] = v
        elif ".lora_" not in k:
            plain[k.replace(".base_layer.", ".")] = v
    return plain, adapters


def merge_into(plain: dict, adapters: dict, scale: float) -> dict[str, torch.Tensor]:
    """``W + scale * B @ A`` for every adapted layer (in W's dtype); other weights unchanged."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in adapters.items():
        m = _LORA_KEY.match(k)
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    out = dict(plain)
    for layer, ab in pairs.items():
        if f"{layer}.weight" not in out:
            raise UserError(f"LoRA adapter for '{layer}' has no matching layer in the base transformer: "
                            f"the adapters were trained on another model")
        w = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = (w.float() + (ab["B"].float() @ ab["A"].float()) * scale).to(w.dtype)
    return out


def merge(state: dict, scale: float) -> dict[str, torch.Tensor]:
    """Plain transformer weights (what ``from_pretrained`` expects) from a peft-injected state."""
    return merge_into(*split(state), scale)


def scale_of(cfg) -> float:
    return cfg.alpha / cfg.rank


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], float]:
    """Adapters of a ``pytorch_lora_weights.safetensors`` as a peft-named state
    (``X.lora_A.default.weight``) and their scale alpha / r from the file's metadata."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise UserError(f"LoRA file {path} not found: give a folder written by srpo train (lora/)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {}
        for k in f.keys():
            name = k.removeprefix("transformer.")
            m = re.match(r"^(.*)\.lora_([AB])\.weight$", name)
            if m:
                state[f"{m.group(1)}.lora_{m.group(2)}.{ADAPTER}.weight"] = f.get_tensor(k)
    info = json.loads(meta.get("lora_adapter_metadata", "{}"))
    if "transformer.r" not in info or not state:
        raise UserError(f"LoRA file {path} has no transformer adapters with metadata (rank, alpha): "
                        f"give a file written by srpo train or diffusers' save_lora_weights")
    return state, float(info["transformer.lora_alpha"]) / float(info["transformer.r"])
