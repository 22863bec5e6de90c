"""What a run does to memory: precision, fp32 master weights, activation checkpointing, frozen
parts, the text-feature cache (in memory or on disk) with optional offloading and releasing of
the text encoders. What memory a run will need is :mod:`srpo.plan`'s business."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

def master_weights(module: nn.Module) -> None:
    """Trainable weights in float32 (the master weights), one tensor at a time."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def prepare(model, cfg, sharded: bool = False) -> None:
    """Before wrapping: the model's precision (autocast of every transformer call, true-CFG
    gradient passes), trainable weights in float32 (master weights; with ``sharded`` FSDP
    casts each block as it shards it, so no rank holds the whole model in float32), frozen
    parts without parameter gradients, activation checkpointing, text cache."""
    model.set_precision(cfg.train.autocast, cfg.train.cfg_gradient)
    if not sharded:
        master_weights(model.transformer)
    for m in model.frozen_modules().values():
        m.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing(True)  # every transformer block and the VAE decoder
    if cfg.memory.cache_text or cfg.memory.release_text_encoders:
        model.encode_prompts = TextCache(model, offload=cfg.memory.offload_frozen, batch=cfg.memory.text_encode_batch)


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

    def __init__(self, model, offload: bool = False, batch: int = 8):
        self.model, self.offload, self.batch = model, offload, int(batch)
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
            from .streaming import encode_each, is_streamed

            # streamed encoders: a batch of prompts per pass over the layers (each its own forward)
            batch = self.batch if any(is_streamed(m) for m in self.model.text_encoders()) else 1
            try:
                bar = tqdm(total=len(missing), desc="encode prompts", disable=not progress or len(missing) < 2,
                           dynamic_ncols=True)
                for i in range(0, len(missing), batch):
                    group = missing[i:i + batch]
                    for p, feats in zip(group, encode_each(self.encode, group)):
                        fresh[p] = {k: v.detach().cpu() for k, v in feats.items()}
                        self.encoded += 1
                        self._put(p, fresh[p])
                    bar.update(len(group))
                bar.close()
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
