"""Memory: precision, fp32 master weights, activation checkpointing, frozen parts, the
text-feature cache with optional offloading, and the per-GPU memory estimate behind ``srpo plan``.

The estimate counts bytes, it does not measure them: weights and optimizer state exactly from
parameter counts, activations from per-block formulas (saved tensors per token and channel,
checked against autograd's saved tensors in tests/test_parallel.py), plus a fixed CUDA overhead
and 10 % for allocator fragmentation. ``benchmarks/gpu_update.py`` prints it next to the
measured peak.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

GiB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------- training-time setup

def prepare(model, cfg) -> None:
    """Before wrapping: the model's precision (autocast of every transformer call, true-CFG
    gradient passes), trainable weights in float32 (master weights), frozen parts without
    parameter gradients, activation checkpointing, text cache."""
    model.set_precision(cfg.train.autocast, cfg.train.cfg_gradient)
    for p in model.transformer.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    for m in model.frozen_modules().values():
        m.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing(True)  # every transformer block and the VAE decoder
    if cfg.memory.cache_text or cfg.memory.release_text_encoders:
        model.encode_prompts = TextCache(model, offload=cfg.memory.offload_frozen)


def text_cache_key(cfg) -> str:
    """What a cached text feature depends on: the model's family, folder and options."""
    m = cfg.model
    return json.dumps([m.name, m.path, m.dtype, m.options], sort_keys=True, default=str)


def pre_encode(model, prompts: list[str], folder=None, key: str = "", release: bool = False,
               progress: bool = False) -> int:
    """Encode ``prompts`` once into the model's text cache (kept in ``folder`` on disk when
    given), then, with ``release``, free the text encoders. Returns how many prompts the
    encoders actually encoded (0 when every prompt was already on disk, e.g. on resume)."""
    cache = model.encode_prompts
    if not isinstance(cache, TextCache):
        return 0
    if folder is not None:
        cache.disk, cache.key = Path(folder), key
    before = cache.encoded
    cache.ensure(prompts, progress=progress)
    if release:
        cache.release()
    return cache.encoded - before


class TextCache:
    """``model.encode_prompts`` with per-prompt caching. Every prompt is encoded alone, so its
    features never depend on which prompts shared a batch (runs stay bit-reproducible however
    ranks or resumes group them). Features live in CPU memory, or with ``disk`` set in one
    safetensors file per prompt, read back when asked for (a large prompt set costs disk, not
    memory). With ``offload`` the text encoders live on the CPU and visit the model's device
    only to encode prompts not seen before."""

    def __init__(self, model, offload: bool = False):
        self.model, self.offload = model, offload
        self.encode = model.encode_prompts  # the adapter's own method
        self.store: dict[str, dict[str, torch.Tensor]] = {}  # without disk
        self.disk: Path | None = None  # RUN/text_cache when the features are kept on disk
        self.key = ""
        self.encoded = 0  # prompts the text encoders encoded (not read from memory or disk)
        self.released = False
        if offload:
            for m in model.text_encoders():
                m.to("cpu")

    def _file(self, prompt: str) -> Path:
        return self.disk / (hashlib.sha256(f"{self.key}\0{prompt}".encode()).hexdigest()[:40] + ".safetensors")

    def _has(self, prompt: str) -> bool:
        return prompt in self.store or (self.disk is not None and self._file(prompt).is_file())

    def _get(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt in self.store:
            return self.store[prompt]
        from safetensors.torch import load_file

        return load_file(str(self._file(prompt)))

    def _put(self, prompt: str, feats: dict[str, torch.Tensor]) -> None:
        if self.disk is None:
            self.store[prompt] = feats
            return
        from safetensors.torch import save_file

        self.disk.mkdir(parents=True, exist_ok=True)
        path = self._file(prompt)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
        os.replace(tmp, path)  # atomic: ranks writing the same prompt write the same bytes

    def release(self) -> None:
        """Free the text encoders: every later prompt must already be in the cache."""
        for name, m in list(self.model.frozen_modules().items()):
            if name.startswith("text_encoder"):
                setattr(self.model, name, None)
                del m
        self.released = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def ensure(self, prompts: list[str], progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Encode the prompts not cached yet; returns their features (CPU)."""
        missing = [p for p in dict.fromkeys(prompts) if not self._has(p)]
        if missing and self.released:
            raise UserError(f"prompt {missing[0]!r} was not encoded before the text encoders were released "
                            f"(memory.release_text_encoders): list it in data.prompts or data.eval_prompts")
        fresh = {}
        if missing:
            from tqdm.auto import tqdm

            encoders = self.model.text_encoders() if self.offload else []
            for m in encoders:
                m.to(self.model.device)
            try:
                for p in tqdm(missing, desc="encode prompts", disable=not progress or len(missing) < 2,
                              dynamic_ncols=True):
                    fresh[p] = {k: v.detach().cpu() for k, v in self.encode([p]).items()}
                    self.encoded += 1
                    self._put(p, fresh[p])
            finally:
                for m in encoders:
                    m.to("cpu")
        return fresh

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        feats = self.ensure(prompts)
        for p in dict.fromkeys(prompts):
            if p not in feats:
                feats[p] = self._get(p)
        device = self.model.device
        keys = feats[prompts[0]].keys()
        return {k: torch.cat([feats[p][k] for p in prompts]).to(device) for k in keys}


# ---------------------------------------------------------------------- sizes for the plan

@dataclass
class Sizes:
    """What the estimate needs to know about a model, reward and image size."""

    name: str
    transformer: int  # parameters
    blocks: int
    largest_block: int  # parameters of the largest block
    root: int  # parameters outside the blocks (embedders, final layer)
    hidden: int  # transformer width
    lora_params: int  # adapter parameters for the configured LoRA
    text_encoders: int
    vae: int
    vae_levels: list[tuple[int, int]] = field(default_factory=list)  # decoder (channels, upsample factor)
    vae_resnets: int = 3
    reward: int = 0
    reward_layers: int = 32
    reward_width: int = 1280
    reward_tokens: int = 257
    image_tokens: int = 0
    text_tokens: int = 512
    gradient_passes: int = 1  # transformer passes per gradient forward (2 under true CFG, both with grad)
    vae_checkpointing: bool = True  # the family's decoder recomputes activations under checkpointing


# (parameters, vision layers, vision width, vision tokens) of the reward models by registry name
REWARD_ARCH = {"hps": (986_109_441, 32, 1280, 257), "pickscore": (986_109_441, 32, 1280, 257),
               "clip": (427_616_513, 24, 1024, 257), "aesthetic": (427_616_513 + 1_000_000, 24, 1024, 257)}


def _lora_params(transformer: nn.Module, rank: int, target_modules: list[str]) -> int:
    total = 0
    for name, m in transformer.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            total += rank * (m.in_features + m.out_features)
    return total


def model_sizes(cfg, parts=None) -> Sizes:
    """Sizes of the configured model and reward, from the family's :meth:`plan_parts` (modules
    on the meta device: no weights are read or allocated), or from ``parts`` given (a
    :class:`~srpo.models.base.PlanParts` of modules built some other way, e.g. a benchmark's)."""
    from .models import family
    from .parallel import blocks

    m = cfg.model
    fam = family(m.name)
    if parts is None:
        path = m.path if m.path and Path(m.path).exists() else None  # no folder yet: the family's flagship
        parts = fam.plan_parts(path, dict(m.options), cfg.rollout.height, cfg.rollout.width)
        if m.path and path is None:
            parts.name = f"{parts.name} ({m.path} not found: its flagship's dimensions)"
    tr, vae_cfg = parts.transformer, parts.vae_config
    chans = list(reversed(vae_cfg["block_out_channels"]))
    levels = [(c, 2**i) for i, c in enumerate(chans)]
    blocks_ = blocks(tr)
    tc = tr.config
    n_tr = sum(p.numel() for p in tr.parameters())
    targets = list(cfg.lora.target_modules) if cfg.lora.target_modules else list(fam.lora_targets)
    sizes = Sizes(
        name=parts.name, transformer=n_tr, blocks=len(blocks_),
        largest_block=max(sum(p.numel() for p in b.parameters()) for b in blocks_),
        root=n_tr - sum(p.numel() for b in blocks_ for p in b.parameters()),
        hidden=parts.hidden or tc.num_attention_heads * tc.attention_head_dim,
        lora_params=_lora_params(tr, cfg.lora.rank, targets),
        text_encoders=parts.text_encoders, vae=sum(p.numel() for p in parts.vae.parameters()), vae_levels=levels,
        vae_resnets=vae_cfg["layers_per_block"] + 1, text_tokens=parts.text_tokens, image_tokens=parts.image_tokens,
        gradient_passes=2 if (parts.guidance_mode or fam.guidance_mode) == "cfg" and cfg.train.guidance > 1
        and cfg.train.cfg_gradient == "both" else 1, vae_checkpointing=parts.vae_checkpointing,
    )
    _reward_sizes(cfg, sizes)
    return sizes


def _reward_sizes(cfg, sizes: Sizes) -> None:
    specs = cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]
    total, arch = 0, None
    for spec in specs:
        if spec.name == "tiny_clip":
            from .rewards.tiny import tiny_clip_config

            vc = tiny_clip_config(int(spec.options.get("image_size", 32))).vision_config
            with torch.device("meta"):
                from transformers import CLIPModel

                n = sum(p.numel() for p in CLIPModel(tiny_clip_config(vc.image_size)).parameters())
            a = (n, vc.num_hidden_layers, vc.hidden_size, (vc.image_size // vc.patch_size) ** 2 + 1)
        else:
            a = REWARD_ARCH.get(spec.name, REWARD_ARCH["hps"])  # unknown: assume a ViT-H CLIP
        total += a[0]
        arch = a if arch is None or a[1] * a[2] > arch[1] * arch[2] else arch
    sizes.reward = total
    _, sizes.reward_layers, sizes.reward_width, sizes.reward_tokens = arch


# ---------------------------------------------------------------------- the estimate

BLOCK_UNITS = 26  # tensors of size tokens x width a transformer block keeps for backward
RESNET_UNITS = 6  # tensors of size pixels x channels a VAE resnet keeps for backward
VIT_UNITS = 26  # per reward ViT layer, in tokens x width
OVERHEAD = 1.5 * GiB  # CUDA context, cuBLAS / NCCL workspaces
FRAGMENTATION = 1.10


def transformer_activations(s: Sizes, batch: int, act_bytes: int, checkpointing: bool) -> int:
    """Saved activations of one gradient forward: every block's tensors, or with checkpointing
    each block's input plus one block recomputed (and its gradients) at a time."""
    unit = (s.image_tokens + s.text_tokens) * s.hidden * act_bytes * batch
    return int(unit * ((s.blocks + BLOCK_UNITS + 8) if checkpointing else s.blocks * BLOCK_UNITS))


def vae_activations(s: Sizes, batch: int, height: int, width: int, act_bytes: int, checkpointing: bool) -> int:
    """Decoder tensors kept for backward (decoding with gradient)."""
    base = (height // s.vae_levels[-1][1]) * (width // s.vae_levels[-1][1])  # latent pixels
    per_level = []
    for i, (ch, up) in enumerate(s.vae_levels):
        pixels = base * up * up
        units = s.vae_resnets * RESNET_UNITS + (1 if i else 2 * RESNET_UNITS + 4)  # level 0 adds the mid block
        per_level.append(pixels * ch * units)
    top = base * s.vae_levels[-1][1] ** 2 * s.vae_levels[-1][0] * 3  # norm_out, silu, conv_out
    total = max(per_level) + top if checkpointing else sum(per_level) + top
    return int(total * act_bytes * batch)


def estimate(s: Sizes, *, gpus: int, strategy: str, lora: bool, batch: int, height: int, width: int,
             model_bytes: int, reward_bytes: int = 4, act_bytes: int = 2, checkpointing: bool = True,
             offload_text: bool = False, device: str = "cuda", optimizer: str = "adamw") -> dict[str, float]:
    """Expected peak bytes per GPU by component (and ``total``)."""
    shard = gpus if strategy == "fsdp" else 1
    trainable = s.lora_params if lora else s.transformer
    out: dict[str, float] = {}
    if optimizer == "adamw":
        out["trainable weights + grads + AdamW (fp32)"] = 16 * trainable / shard
    else:  # plain SGD: no optimizer state
        out["trainable weights + grads (fp32), SGD"] = 8 * trainable / shard
    out["optimizer-step temporaries"] = 4 * trainable / shard
    if lora:
        out["frozen transformer base"] = model_bytes * s.transformer / shard
    if strategy == "fsdp":
        block_bytes = model_bytes if lora else 4
        out["FSDP gathered blocks (2) + block grads"] = s.largest_block * (2 * block_bytes + (0 if lora else 4))
        out["FSDP unsharded root"] = s.root * (model_bytes if lora else 4)
    out["text encoders"] = 0 if offload_text else model_bytes * s.text_encoders
    out["VAE"] = model_bytes * s.vae
    out["reward model"] = reward_bytes * s.reward
    out["activations: transformer"] = transformer_activations(s, batch * s.gradient_passes, act_bytes, checkpointing)
    out["activations: VAE decode"] = vae_activations(s, batch, height, width, model_bytes,
                                                     checkpointing and s.vae_checkpointing)
    out["activations: reward"] = VIT_UNITS * s.reward_layers * s.reward_tokens * s.reward_width * reward_bytes * batch
    if device == "cuda":
        out["CUDA context + workspaces"] = OVERHEAD
    subtotal = sum(out.values())
    if offload_text:  # encoding a new prompt brings the encoders over, between gradient steps
        idle = subtotal - sum(v for k, v in out.items() if k.startswith("activations"))
        subtotal = max(subtotal, idle + model_bytes * s.text_encoders)
    out["fragmentation (10 %)"] = subtotal * (FRAGMENTATION - 1)
    out["total"] = subtotal * FRAGMENTATION
    return out


def estimate_for(cfg, s: Sizes, gpus: int, strategy: str | None = None, lora: bool | None = None,
                 device: str = "cuda", optimizer: str = "adamw") -> dict[str, float]:
    """:func:`estimate` with the config's settings (strategy and LoRA overridable)."""
    strategy = strategy or cfg.parallel.strategy
    lora = cfg.lora.enabled if lora is None else lora
    specs = cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]
    reward_bytes = max(BYTES.get(str(sp.options.get("dtype", "float32")), 4) for sp in specs)
    return estimate(s, gpus=gpus, strategy="none" if gpus == 1 and strategy == "ddp" else strategy, lora=lora,
                    batch=cfg.train.batch_size, height=cfg.rollout.height, width=cfg.rollout.width,
                    model_bytes=BYTES[cfg.model.dtype], reward_bytes=reward_bytes,
                    act_bytes=2 if cfg.train.autocast != "none" else 4,
                    checkpointing=cfg.train.gradient_checkpointing,
                    offload_text=cfg.memory.offload_frozen or cfg.memory.release_text_encoders, device=device,
                    optimizer=optimizer)
