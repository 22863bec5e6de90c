"""Rewards over an open_clip model loaded from a local checkpoint file (HPSv2.1, CLIP score).

The architecture is an open_clip model name (``ViT-H-14``) or a JSON model config file (the
layout of open_clip's ``model_configs/*.json``), so any size, tiny ones included, can be built
without a download. Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from .base import Reward
from .preprocess import ImageTransform


def resolve_arch(arch: str) -> str:
    """An open_clip model name; a ``.json`` model config file is registered under its stem."""
    import open_clip

    path = Path(str(arch)).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        if path.stem not in open_clip.list_models():
            raise UserError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        return path.stem
    if arch not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture '{arch}': use an open_clip model name "
                        "(e.g. ViT-H-14, ViT-L-14) or a JSON model config file")
    return arch


def load_state_dict(path, what: str) -> dict[str, Tensor]:
    """Weights from a ``.safetensors`` file or a torch file (weights only), unwrapping a
    ``{"state_dict": ...}`` dict and DDP ``module.`` prefixes."""
    if path is None:
        raise UserError(f"the {what} needs a path: set path to its checkpoint file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{what} checkpoint not found: {file} (download it once and point path at it)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(file))
        else:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {file} as a weights-only checkpoint: {msg[:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"{file} holds no state dict of tensors: expected a model checkpoint")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def check_fit(model: torch.nn.Module, sd: dict[str, Tensor], file, expected: str) -> None:
    """One-line UserError when ``sd`` does not fit ``model`` (missing, extra or reshaped keys)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or extra or shapes:
        example = (shapes or missing or extra)[0]
        detail = (f"{example}: {tuple(sd[example].shape)} vs {tuple(own[example].shape)}" if shapes
                  else example)
        raise UserError(
            f"{file} does not fit {expected}: {len(missing)} missing, {len(extra)} unexpected, "
            f"{len(shapes)} reshaped weights (e.g. {detail}); check the file or set the architecture"
        )


class OpenCLIPReward(Reward):
    """A frozen open_clip CLIP as a text-conditioned reward: ``scale * cos`` with
    ``scale = 1`` (HPS: raw cosine) or ``logit_scale.exp() / divide_by`` (CLIP score)."""

    def __init__(self, model, tokenizer, transform: ImageTransform, divide_by: float | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.divide_by = divide_by
        self.scale = 1.0 if divide_by is None else float(model.logit_scale.detach().exp()) / divide_by
        self.frozen()

    @classmethod
    def from_checkpoint(cls, path, arch: str = "ViT-L-14", device=None, dtype=None,
                        divide_by: float | None = 20.0, resize_mode: str | None = None,
                        uint8: str | None = "pil", what: str = "CLIP reward") -> "OpenCLIPReward":
        """Build ``arch`` with random weights, load the checkpoint into it (strictly).

        ``resize_mode``: override the model's preprocessing (``longest`` pads like HPSv2)."""
        sd = load_state_dict(path, what)
        return cls.build(arch, sd, Path(path).expanduser(), device=device, dtype=dtype, divide_by=divide_by,
                         resize_mode=resize_mode, uint8=uint8)

    @classmethod
    def build(cls, arch: str, state_dict: dict | None = None, file=None, device=None, dtype=None,
              divide_by: float | None = 20.0, resize_mode: str | None = None,
              uint8: str | None = "pil") -> "OpenCLIPReward":
        """``arch`` with its preprocessing, with ``state_dict`` loaded (strictly) or, without
        one, random weights (benchmarks at real sizes, no checkpoint needed)."""
        import open_clip

        name = resolve_arch(arch)
        logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded
        try:
            model = open_clip.create_model(name, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        if state_dict is not None:
            check_fit(model, state_dict, file, f"the open_clip architecture {arch}")
            model.load_state_dict(state_dict)
        cfg = dict(model.visual.preprocess_cfg)
        if resize_mode is not None:
            cfg["resize_mode"] = resize_mode
        transform = ImageTransform.from_open_clip(cfg, uint8=uint8)
        reward = cls(model.eval(), open_clip.get_tokenizer(name), transform, divide_by)
        if dtype is not None:
            reward = reward.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return reward.to(device) if device is not None else reward

    def _param(self) -> Tensor:
        return self.model.logit_scale

    def image_tower(self):
        visual = self.model.visual  # encode_image calls it
        return visual, list(visual.transformer.resblocks)

    def encode_image(self, images: Tensor) -> Tensor:
        p = next(self.model.visual.parameters())
        pixels = self.transform(images.to(p.device))
        f = self.model.encode_image(pixels.to(p.dtype), normalize=True)
        return f.to(torch.promote_types(f.dtype, torch.float32))

    @torch.no_grad()
    def _encode_text_uncached(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts)).to(self._param().device)
        return self.model.encode_text(tokens, normalize=True).float()

