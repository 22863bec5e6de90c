"""FLUX.1 as a FlowModel: diffusers' FluxTransformer2DModel + AutoencoderKL + CLIP/T5 encoders.

Latents in the contract are *unpacked* ``[B, C, h, w]`` (as FluxPipeline has them before
``_pack_latents``) and live in the VAE's normalised space ``(z - shift_factor) * scaling_factor``.
Packing into 2x2 patches, the position ids and the pooled CLIP projection are details of this
file. Guidance is embedded (FLUX.1-dev's guidance embedding; none for schnell); the schedule is
the reference trainer's fixed shift 3 unless ``shift`` says otherwise; the model timestep is
sigma, quantised to 1/1000 as the reference trainer feeds it (``quantize_timesteps``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from ..method import time_shift
from . import MODELS
from .base import Cond, FlowModel, PlanParts, check_pipeline_folder, frozen, resolve_dtype

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
REFERENCE_SHIFT = 3.0  # the reference FLUX trainer's fixed time shift
# LoRA targets: attention and MLP projections of the double and single blocks
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16)
T5_XXL, CLIP_L = 4_762_310_656, 123_060_480  # encoder parameters (FLUX.1's text_encoder_2 / text_encoder)


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


class FluxModel(FlowModel):
    """A FLUX pipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    lora_targets = LORA_TARGETS
    export_formats = ("diffusers", "single-file")
    default_guidance = 3.5

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler=None, max_sequence_length: int = 512, shift: float | None = None,
                 quantize_timesteps: bool | None = None):
        self.transformer = transformer
        self.vae = frozen(vae)
        self.text_encoder = frozen(text_encoder)
        self.text_encoder_2 = frozen(text_encoder_2)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.max_sequence_length = max_sequence_length
        self.shift = REFERENCE_SHIFT if shift is None else float(shift)
        self.quantize_timesteps = True if quantize_timesteps is None else bool(quantize_timesteps)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.guidance_mode = "embedded" if transformer.config.guidance_embeds else "none"
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
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, shift=None,
             max_sequence_length: int = 512, quantize_timesteps: bool | None = None, **unknown) -> "FluxModel":
        """A local diffusers FLUX folder (FluxPipeline layout), offline and from safetensors.

        ``transformer_path`` optionally replaces ``transformer/`` with a folder written by
        :meth:`save_transformer` (or any ``FluxTransformer2DModel`` folder).
        """
        if unknown:
            raise UserError(f"unknown option(s) for model 'flux': {', '.join(sorted(unknown))}; "
                            f"valid: max_sequence_length, quantize_timesteps")
        if not path:
            raise UserError("model 'flux' needs a path: set model.path to a local diffusers FLUX folder")
        root = check_pipeline_folder(path, "flux", "Flux", COMPONENTS, need_transformer=not transformer_path)
        dtype = resolve_dtype(dtype)
        pipe = cls.pipeline_from_folder(root, transformer_path, dtype)
        model = cls.from_pipeline(pipe, max_sequence_length=max_sequence_length, shift=shift,
                                  quantize_timesteps=quantize_timesteps)
        return model.to(device)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "FluxModel":
        """Wrap the components of an existing diffusers ``FluxPipeline``."""
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                   pipe.tokenizer_2, scheduler=pipe.scheduler, **kwargs)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """From the folder's config files, or FLUX.1-dev's dimensions without a folder."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        folder = Path(path) if path else None
        if folder is not None and (folder / "transformer" / "config.json").is_file():
            tcfg = json.loads((folder / "transformer" / "config.json").read_text())
            tcfg = {k: v for k, v in tcfg.items() if not k.startswith("_")}
            vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
            name = str(folder)
        else:
            tcfg, vae_cfg, name = FLUX_DEV, FLUX_VAE, "FLUX.1-dev dimensions"
        with torch.device("meta"):
            tr = FluxTransformer2DModel(**tcfg)
            n = len(vae_cfg["block_out_channels"])
            vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                block_out_channels=tuple(vae_cfg["block_out_channels"]),
                                layers_per_block=vae_cfg["layers_per_block"],
                                latent_channels=vae_cfg["latent_channels"])
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2
        return PlanParts(name, tr, vae, vae_cfg, T5_XXL + CLIP_L, int(options.get("max_sequence_length", 512)),
                         (height // factor) * (width // factor))

    def pipeline(self):
        """A diffusers ``FluxPipeline`` sharing this model's modules (no copies)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        scheduler = self.scheduler or FlowMatchEulerDiscreteScheduler(shift=self.shift, use_dynamic_shifting=False)
        pipe = FluxPipeline(scheduler=scheduler, vae=self.vae, text_encoder=self.text_encoder,
                            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                            tokenizer_2=self.tokenizer_2, transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """``FluxPipeline.__call__`` on this model's modules, prompt embeddings and noise, with the
        scheduler at this model's fixed shift (the pipeline's own sigmas, ``linspace(1, 1/N, N)``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = self.pipeline()
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=self.shift, use_dynamic_shifting=False)
        h, w = self.pixel_size(noise)
        return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                    latents=pack(noise), height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                    output_type="pt", max_sequence_length=self.max_sequence_length).images.float()

    # ---- FlowModel hooks ----------------------------------------------------------------
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

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One FluxTransformer2DModel call on packed tokens; the timestep is sigma (the transformer
        scales it by 1000 itself), floored to 1/1000 when ``quantize_timesteps``."""
        b, _, h, w = latents.shape
        dtype, device = self.dtype, self.device
        if self.quantize_timesteps:
            sigma = torch.floor(sigma.double() * 1000 + 1e-6) / 1000
        text = cond["prompt_embeds"].to(device, dtype)
        g = None
        if guidance is not None:
            g = torch.full((b,), guidance, dtype=torch.float32, device=device)
        out = self.transformer(
            hidden_states=pack(latents.to(device, dtype)),
            timestep=sigma.to(device, dtype),
            guidance=g,
            pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
            encoder_hidden_states=text,
            txt_ids=_text_ids(text.shape[1], device, dtype),
            img_ids=image_ids(h, w, device, dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        """``shift(linspace(1, 0, steps + 1))`` at the fixed shift: FluxPipeline's sigmas
        ``linspace(1, 1/N, N)`` under a fixed-shift scheduler, then 0."""
        return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift)

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

    def single_file_state(self, state: dict) -> dict:
        """The original FLUX.1 (Black Forest Labs) key layout ComfyUI-style loaders read."""
        from .flux_single_file import bfl_state

        return bfl_state(state)


MODELS.register("flux")(FluxModel)
