"""FLUX.1 as a FlowModel: diffusers' FluxTransformer2DModel + AutoencoderKL + CLIP/T5 encoders.

Latents in the contract are *unpacked* ``[B, C, h, w]`` (as FluxPipeline has them before
``_pack_latents``) and live in the VAE's normalised space ``(z - shift_factor) * scaling_factor``.
Packing into 2x2 patches and the position ids are details of this file.
"""

from __future__ import annotations

import functools

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from . import MODELS
from .base import Cond

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a name such as ``"bfloat16"`` / ``"bf16"`` -> a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    return value


def pack(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]`` (2x2 patches, FluxPipeline's layout)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack` for latents of spatial size ``h x w``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


@functools.lru_cache(maxsize=16)
def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Position ids ``[(h/2)(w/2), 3]`` of the packed latent tokens: (0, row, column); cached per
    shape, device and dtype (a rollout asks for the same ids at every step)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _text_ids(n: int, device, dtype) -> Tensor:
    """FLUX's all-zero text position ids ``[n, 3]``."""
    return torch.zeros(n, 3, device=device, dtype=dtype)


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class FluxModel:
    """A FLUX pipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler=None, max_sequence_length: int = 512):
        self.transformer = transformer
        self.vae = _frozen(vae)
        self.text_encoder = _frozen(text_encoder)
        self.text_encoder_2 = _frozen(text_encoder_2)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._check_compatible()

    def _check_compatible(self) -> None:
        tc = self.transformer.config
        pairs = [
            ("transformer in_channels", tc.in_channels, "4 x vae latent_channels",
             4 * self.vae.config.latent_channels),
            ("transformer joint_attention_dim", tc.joint_attention_dim, "text_encoder_2 d_model",
             self.text_encoder_2.config.d_model),
            ("transformer pooled_projection_dim", tc.pooled_projection_dim, "text_encoder hidden_size",
             self.text_encoder.config.hidden_size),
        ]
        for name, got, other, want in pairs:
            if got != want:
                raise UserError(f"transformer does not fit this FLUX model: {name} = {got} but "
                                f"{other} = {want}; use a transformer trained for this base model")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, transformer_path=None, device="cpu", dtype=torch.float32,
                        max_sequence_length: int = 512) -> "FluxModel":
        """Load a local diffusers FLUX folder (FluxPipeline layout), offline and from safetensors.

        ``transformer_path`` optionally replaces ``transformer/`` with a folder written by
        :meth:`save_transformer` (or any ``FluxTransformer2DModel`` folder).
        """
        from diffusers import FluxPipeline, FluxTransformer2DModel

        root = _check_pipeline_folder(path, need_transformer=not transformer_path)
        dtype = resolve_dtype(dtype)
        extra = {}
        try:
            if transformer_path:
                check_transformer_folder(transformer_path)
                extra["transformer"] = FluxTransformer2DModel.from_pretrained(
                    transformer_path, dtype=dtype, local_files_only=True, use_safetensors=True)
            pipe = FluxPipeline.from_pretrained(
                root, dtype=dtype, local_files_only=True, use_safetensors=True, **extra)
        except (OSError, ValueError, KeyError) as e:
            where = transformer_path or root
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load FLUX weights from {where}: {first} (a complete FLUX.1 folder "
                            f"with safetensors weights is needed)") from None
        model = cls.from_pipeline(pipe, max_sequence_length=max_sequence_length)
        return model.to(device)

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 512) -> "FluxModel":
        """Wrap the components of an existing diffusers ``FluxPipeline``."""
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                   pipe.tokenizer_2, scheduler=pipe.scheduler, max_sequence_length=max_sequence_length)

    def to(self, device) -> "FluxModel":
        for m in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            m.to(device)
        return self

    def pipeline(self):
        """A diffusers ``FluxPipeline`` sharing this model's modules (no copies)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        scheduler = self.scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
        pipe = FluxPipeline(scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder,
                            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                            tokenizer_2=self.tokenizer_2, transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- FlowModel contract -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """CLIP pooled output + T5 sequence output, as ``FluxPipeline.encode_prompt`` makes them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        seq = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return {"prompt_embeds": seq.to(self.device), "pooled_prompt_embeds": pooled.to(self.device)}

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Cond, guidance: float) -> Tensor:
        """Transformer velocity at noise levels ``sigma`` ([B] or scalar). A batch-1 ``cond``
        is broadcast over the latents' batch."""
        b, _, h, w = latents.shape
        dtype, device = self.dtype, self.device
        sigma = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1).expand(b)
        text, pooled = cond["prompt_embeds"].to(device, dtype), cond["pooled_prompt_embeds"].to(device, dtype)
        if text.shape[0] == 1 and b > 1:
            text, pooled = text.expand(b, -1, -1), pooled.expand(b, -1)
        g = None
        if self.transformer.config.guidance_embeds:
            g = torch.full((b,), float(guidance), dtype=torch.float32, device=device)
        out = self.transformer(
            hidden_states=pack(latents.to(device, dtype)),
            timestep=sigma,
            guidance=g,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=_text_ids(text.shape[1], device, dtype),
            img_ids=image_ids(h, w, device, dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(latents.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> pixels in [0, 1]; differentiable with respect to ``latents``."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return ((x + 1) / 2).clamp(0, 1).to(latents.dtype)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> normalised latents (the posterior mode)."""
        cfg = self.vae.config
        x = (pixels * 2 - 1).to(self.vae.device, self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mode()
        return ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(pixels.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        m = self.vae_scale_factor * 2
        if height % m or width % m:
            raise UserError(f"image size {height}x{width} is not supported: height and width must be "
                            f"multiples of {m} for this model")
        return (batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def save_transformer(self, path) -> None:
        """Write the transformer as safetensors; ``FluxTransformer2DModel.from_pretrained(path)``
        (or ``from_pretrained(..., transformer_path=path)``) loads it."""
        self.transformer.save_pretrained(str(path), safe_serialization=True)

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing on every transformer block and in the VAE decoder."""
        for m in (self.transformer, self.vae):
            m.enable_gradient_checkpointing() if enabled else m.disable_gradient_checkpointing()


def _check_pipeline_folder(path, need_transformer: bool) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"FLUX model folder {root} does not exist: give a local diffusers FLUX folder "
                        f"(model_index.json, transformer/, vae/, text_encoder/, ...)")
    index = root / "model_index.json"
    if not index.is_file():
        raise UserError(f"{root} is not a diffusers pipeline folder (no model_index.json): "
                        f"give a local FLUX.1 folder in the FluxPipeline layout")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{index} is not valid JSON: re-download or re-save the model folder") from None
    if not str(name).startswith("Flux"):
        raise UserError(f"{root} holds a {name or 'unknown'} pipeline, not FLUX: the 'flux' model "
                        f"needs a FluxPipeline folder")
    wanted = [c for c in COMPONENTS if need_transformer or c != "transformer"]
    missing = [c + "/" for c in wanted if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{root} lacks {', '.join(missing)}: a FLUX folder needs {', '.join(COMPONENTS)}")
    return root


def check_transformer_folder(path) -> None:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"transformer folder {path} has no config.json: give a folder written by "
                        f"save_transformer / FluxTransformer2DModel.save_pretrained")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{config} is not valid JSON") from None
    if name != "FluxTransformer2DModel":
        raise UserError(f"{path} holds a {name}, not a FluxTransformer2DModel: give a FLUX transformer folder")


@MODELS.register("flux")
def build_flux(path, transformer_path=None, device="cpu", dtype=torch.float32,
               max_sequence_length: int = 512, **unknown) -> FluxModel:
    """Registry factory: a FLUX.1 model from a local diffusers folder."""
    if unknown:
        raise UserError(f"unknown option(s) for model 'flux': {', '.join(sorted(unknown))}; "
                        f"valid: max_sequence_length")
    if not path:
        raise UserError("model 'flux' needs a path: set model.path to a local diffusers FLUX folder")
    return FluxModel.from_pretrained(path, transformer_path=transformer_path, device=device, dtype=dtype,
                                     max_sequence_length=max_sequence_length)
