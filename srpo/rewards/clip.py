"""CLIP-score rewards over a transformers ``CLIPModel`` (CLIP, PickScore).

``score = scale * cos(f_img, f_txt)`` with ``scale = logit_scale.exp() / divide_by``: the model's
own logit is ``logit_scale.exp() * cos``; SRPO divides it by 20 to bring it near HPS's raw
cosine (SRPO.md). Text features are cached per prompt string: the reward is frozen, so they are
constants.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import UserError
from .base import REWARDS, VIT_L_14, Reward, plan_sizes
from .preprocess import ImageTransform


def _features(out) -> Tensor:
    """Unit features, at least float32, from a tensor or (transformers 5) a ModelOutput whose
    pooler_output is the projected feature."""
    f = out if isinstance(out, Tensor) else out.pooler_output
    return F.normalize(f.to(torch.promote_types(f.dtype, torch.float32)), dim=-1)


def _check_folder(path, what: str) -> Path:
    if path is None:
        raise UserError(f"the {what} needs a path: set path to a local model folder")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{what} folder not found: {folder} (download it once and point path at it)")
    if not folder.is_dir():
        raise UserError(f"{what} path {folder} is a file: expected a transformers model folder")
    return folder


def load_clip_tokenizer(folder: Path | None):
    """The tokenizer saved in ``folder``, or srpo's offline OpenAI CLIP tokenizer if none is."""
    from ..tokenizer import clip_tokenizer

    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if folder is not None and any((folder / n).exists() for n in names):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return clip_tokenizer()


def load_image_transform(folder: Path, config, uint8: str | None = "auto") -> ImageTransform:
    """The folder's image processor (``preprocessor_config.json`` or, as transformers 5 saves a
    processor, ``processor_config.json``), else OpenAI CLIP's defaults at the model's input
    size. ``uint8``: see :meth:`ImageTransform.from_clip_processor`."""
    from transformers import CLIPImageProcessor

    if any((folder / f).exists() for f in ("preprocessor_config.json", "processor_config.json")):
        processor = CLIPImageProcessor.from_pretrained(str(folder))
    else:
        size = int(config.vision_config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size})
    return ImageTransform.from_clip_processor(processor, uint8=uint8)


class CLIPReward(Reward):
    """A frozen transformers ``CLIPModel`` as a text-conditioned reward."""

    def __init__(self, model, transform: ImageTransform, tokenizer, divide_by: float = 20.0):
        super().__init__()
        self.model = model
        self.transform = transform
        self.tokenizer = tokenizer
        self.divide_by = float(divide_by)
        self.scale = float(model.logit_scale.detach().exp()) / self.divide_by
        self.frozen()

    @classmethod
    def from_pretrained(cls, path, processor_path=None, device=None, dtype=None,
                        divide_by: float = 20.0, uint8: str | None = "auto",
                        what: str = "CLIP reward") -> "CLIPReward":
        """Load a CLIPModel folder (``config.json`` + weights) and its processor / tokenizer.

        ``processor_path``: a separate folder with ``preprocessor_config.json`` and tokenizer
        files (PickScore ships its processor with the base CLIP-H); default: ``path`` itself.
        """
        from transformers import CLIPConfig, CLIPModel

        folder = _check_folder(path, what)
        pfolder = _check_folder(processor_path, f"{what} processor") if processor_path else folder
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise UserError(f"{folder} has no config.json: expected a transformers CLIPModel folder")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type != "clip":
            raise UserError(
                f"{cfg_file} has model_type {model_type!r}: expected a transformers CLIPModel ('clip')"
            )
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot load the CLIP model in {folder}: {msg}") from None
        config = CLIPConfig.from_pretrained(str(folder))
        reward = cls(model, load_image_transform(pfolder, config, uint8), load_clip_tokenizer(pfolder),
                     divide_by=divide_by)
        return reward.to(device) if device is not None else reward

    def image_tower(self):
        tower = self.model.vision_model  # CLIPModel.get_image_features calls it, then the projection
        return tower, list(tower.encoder.layers)

    def _device_dtype(self):
        p = self.model.logit_scale
        return p.device, self.model.visual_projection.weight.dtype

    def encode_image(self, images: Tensor) -> Tensor:
        device, dtype = self._device_dtype()
        pixels = self.transform(images.to(device))
        return _features(self.model.get_image_features(pixel_values=pixels.to(dtype)))

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        max_len = int(self.model.config.text_config.max_position_embeddings)
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=max_len, return_tensors="pt")

    @torch.no_grad()
    def _encode_text_uncached(self, prompts: list[str]) -> Tensor:
        device, _ = self._device_dtype()
        tok = self.tokenize(prompts)
        return _features(self.model.get_text_features(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)))



@REWARDS.register("clip")
@plan_sizes(VIT_L_14)
def clip(path=None, device=None, processor_path=None, arch: str = "ViT-L-14", dtype=None,
         divide_by: float = 20.0, uint8: str | None = "auto", resize_mode: str | None = None) -> Reward:
    """CLIP score (``logit_scale.exp() * cos / divide_by``) from a local checkpoint: a
    transformers CLIPModel folder (``processor_path`` optional), or an open_clip checkpoint file
    of architecture ``arch`` (``resize_mode`` optional)."""
    if path is not None and Path(path).expanduser().is_file():
        from .openclip import OpenCLIPReward

        return OpenCLIPReward.from_checkpoint(path, arch=arch, device=device, dtype=dtype, divide_by=divide_by,
                                              resize_mode=resize_mode, uint8="pil" if uint8 == "auto" else uint8)
    return CLIPReward.from_pretrained(path, processor_path=processor_path, device=device, dtype=dtype,
                                      divide_by=divide_by, uint8=uint8)
