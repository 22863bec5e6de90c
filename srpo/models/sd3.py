"""Stable Diffusion 3 / 3.5 as a FlowModel: diffusers' SD3Transformer2DModel (MMDiT) + AutoencoderKL
+ CLIP-L, CLIP-G and T5-XXL text encoders, sampled with true classifier-free guidance.

SD3 needs no latent packing: the transformer patchifies ``[B, C, h, w]`` itself, so the contract's
latents go in as they are. Conditioning follows ``StableDiffusion3Pipeline.encode_prompt`` exactly
(penultimate CLIP hidden states concatenated on the feature axis, zero-padded to the T5 width and
stacked before the T5 sequence; pooled = both CLIP projections), plus the negative prompt's
conditioning under ``negative_*`` keys for CFG (``srpo.models.base.velocity`` applies it).

The file also holds ``tiny_sd3``: random-weight SD3 models built in code from the real classes, for
tests and the lab. As for tiny FLUX, no T5 sentencepiece model exists offline, so all three
tokenizers are the CLIP BPE of :func:`srpo.tokenizer.clip_tokenizer` and the T5 vocabulary is sized
to it; ``StableDiffusion3Pipeline`` runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from . import MODELS
from .base import (Cond, FlowModel, PlanParts, broadcast_cond, frozen, resolve_dtype, scheduler_sigmas,
                   split_cond)
from .base import check_options, read_config, read_model_index
from .base import check_pipeline_folder as _check_folder

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPTIONAL = ("text_encoder_3", "tokenizer_3")  # may be null in model_index.json (SD3 without T5)
OPTIONS = ("max_sequence_length", "negative_prompt", "quantize_timesteps")
CLIP_VOCAB = 49408

# stabilityai/stable-diffusion-3.5-large transformer/config.json (8.06e9 parameters)
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
)
# its vae/config.json (the SD3 VAE: 16 latent channels, 8x downsampling)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
# Parameters of the three text encoders, counted from their configs on the meta device:
# CLIPTextModelWithProjection of openai/clip-vit-large-patch14 (text_encoder), of OpenCLIP
# ViT-bigG/14 (text_encoder_2), and T5EncoderModel of google/t5-v1_1-xxl (text_encoder_3).
TEXT_ENCODER_PARAMS = {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                       "text_encoder_3": 4_762_310_656}
CLIP_TOKENS = 77


@MODELS.register("sd3")
class SD3Model(FlowModel):
    """A StableDiffusion3Pipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    # diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py default targets
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                    "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    export_formats = ("diffusers",)
    guidance_mode = "cfg"
    default_guidance = 3.5  # the stable-diffusion-3.5-large model card (28 steps); the pipeline's default is 7.0

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, scheduler, max_sequence_length: int = 256,
                 negative_prompt: str = "", shift: float | None = None, quantize_timesteps: bool | None = None):
        self.transformer = transformer
        self.vae = frozen(vae)
        self.text_encoder = frozen(text_encoder)
        self.text_encoder_2 = frozen(text_encoder_2)
        self.text_encoder_3 = frozen(text_encoder_3) if text_encoder_3 is not None else None
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.scheduler = scheduler
        if not 1 <= int(max_sequence_length) <= 512:
            raise UserError(f"max_sequence_length {max_sequence_length} is out of range: "
                            f"StableDiffusion3Pipeline accepts 1 to 512 T5 tokens")
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt or ""
        self.shift = None if shift is None else float(shift)
        # off by default: StableDiffusion3Pipeline feeds the unquantised scheduler timestep 1000 sigma
        self.quantize_timesteps = bool(quantize_timesteps)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._negative: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._check_compatible()

    def _check_compatible(self) -> None:
        tc = self.transformer.config
        pairs = [("transformer in_channels", tc.in_channels, "vae latent_channels", self.vae.config.latent_channels),
                 ("transformer pooled_projection_dim", tc.pooled_projection_dim,
                  "text_encoder + text_encoder_2 projection_dim",
                  self.text_encoder.config.projection_dim + self.text_encoder_2.config.projection_dim)]
        if self.text_encoder_3 is not None:
            pairs.append(("transformer joint_attention_dim", tc.joint_attention_dim, "text_encoder_3 d_model",
                          self.text_encoder_3.config.d_model))
        for name, got, other, want in pairs:
            if got != want:
                raise UserError(f"transformer does not fit this SD3 model: {name} = {got} but {other} = "
                                f"{want}; use a transformer trained for this base model")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, shift=None,
             max_sequence_length: int = 256, negative_prompt: str = "", quantize_timesteps: bool | None = None,
             **unknown) -> "SD3Model":
        """A local StableDiffusion3Pipeline folder (SD3 / SD3.5), offline and from safetensors;
        ``transformer_path`` replaces ``transformer/`` with a folder written by :meth:`save_transformer`."""
        check_options(cls.family, unknown, OPTIONS)
        if not path:
            raise UserError(f"model '{cls.family}' needs a path: set model.path to a local diffusers "
                            f"StableDiffusion3Pipeline folder")
        root = check_pipeline_folder(path, need_transformer=not transformer_path)
        dtype = resolve_dtype(dtype)
        index = read_model_index(root)
        # diffusers saves a missing T5 as null but will not load the folder unless told so again
        extra = {c: None for c in OPTIONAL if _is_null(index.get(c, ""))}
        pipe = cls.pipeline_from_folder(root, transformer_path, dtype, **extra)
        model = cls.from_pipeline(pipe, max_sequence_length=max_sequence_length, negative_prompt=negative_prompt,
                                  shift=shift, quantize_timesteps=quantize_timesteps)
        return model.to(device)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "SD3Model":
        """Wrap the components of an existing ``StableDiffusion3Pipeline``."""
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                   pipe.tokenizer_2, pipe.text_encoder_3, pipe.tokenizer_3, pipe.scheduler, **kwargs)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Meta-device transformer and VAE from the folder's configs (SD3.5 Large without a path)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        options = dict(options or {})
        max_len = int(options.pop("max_sequence_length", 256))
        options.pop("negative_prompt", None)
        options.pop("quantize_timesteps", None)
        check_options(cls.family, options, OPTIONS)
        root = Path(path) if path else None
        t_cfg = read_config(root / "transformer") if root else None
        v_cfg = read_config(root / "vae") if root else None
        with torch.device("meta"):
            transformer = (SD3Transformer2DModel.from_config(t_cfg) if t_cfg
                           else SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER))
            vae = AutoencoderKL.from_config(v_cfg) if v_cfg else AutoencoderKL(**SD3_VAE)
        encoders = dict(TEXT_ENCODER_PARAMS)
        if root and _is_null(read_model_index(root).get("text_encoder_3", "")):
            encoders.pop("text_encoder_3")
        name = f"SD3 ({root.name})" if t_cfg else "SD3.5 Large"
        return _plan(name, transformer, vae, sum(encoders.values()), max_len, height, width)

    # ---- FlowModel hooks ------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``StableDiffusion3Pipeline.encode_prompt``'s embeddings of ``prompts`` and of
        ``self.negative_prompt`` (cached per batch size) for CFG."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled = self._encode(prompts)
        neg, neg_pooled = self._negative_cond(len(prompts))
        return {"prompt_embeds": embeds.to(self.device), "pooled_prompt_embeds": pooled.to(self.device),
                "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}

    def _negative_cond(self, batch: int) -> tuple[Tensor, Tensor]:
        """The negative prompt's embeddings for ``batch`` rows, encoded once per batch size and
        cached. (Encoded as a batch of ``batch`` copies, like the pipeline, rather than once and
        expanded: the text encoders' matmuls round differently at other batch sizes, ~4e-7 in
        the pooled CLIP projection, and ``encode_prompt`` parity is meant to be exact.)"""
        key = (self.negative_prompt, self.max_sequence_length, batch)
        if key not in self._negative:
            if len(self._negative) >= 4:
                self._negative.pop(next(iter(self._negative)))
            self._negative[key] = self._encode([self.negative_prompt] * batch)
        return tuple(t.to(self.device) for t in self._negative[key])

    def _clip(self, tokenizer, encoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoder.dtype), out[0]  # clip_skip None; text_embeds

    def _t5(self, prompts: list[str]) -> Tensor:
        if self.text_encoder_3 is None:  # SD3 without T5: the pipeline feeds zeros
            return torch.zeros(len(prompts), self.max_sequence_length, self.transformer.config.joint_attention_dim,
                               device=self.text_encoder.device, dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].to(self.text_encoder_3.dtype)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        l_seq, l_pooled = self._clip(self.tokenizer, self.text_encoder, prompts)
        g_seq, g_pooled = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        t5 = self._t5(prompts)
        device = t5.device
        clip = torch.cat([l_seq.to(device), g_seq.to(device)], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([l_pooled.to(device), g_pooled.to(device)], dim=-1)

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One SD3Transformer2DModel call; the timestep is ``1000 sigma`` (float32), as the
        pipeline feeds its scheduler's timesteps (floored to an integer when ``quantize_timesteps``)."""
        dtype, device = self.dtype, self.device
        t = sigma.to(device=device, dtype=torch.float32) * 1000
        if self.quantize_timesteps:
            t = torch.floor(sigma.to(device=device, dtype=torch.float64) * 1000 + 1e-6).float()
        return self.transformer(
            hidden_states=latents.to(device, dtype),
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
            return_dict=False,
        )[0]

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        p = self.transformer.config.patch_size
        seq_len = (height // self.vae_scale_factor // p) * (width // self.vae_scale_factor // p)
        return scheduler_sigmas(self.scheduler, steps, seq_len, self.shift)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> pixels in [0, 1]; differentiable with respect to ``latents``."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        x = self.vae.decode(z.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
        return ((x + 1) / 2).clamp(0, 1).to(latents.dtype)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> normalised latents (the posterior mode)."""
        cfg = self.vae.config
        z = self.vae.encode((pixels * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(pixels.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        tc = self.transformer.config
        m = self.vae_scale_factor * tc.patch_size
        if height % m or width % m or height <= 0 or width <= 0:
            raise UserError(f"image size {height}x{width} is not supported: height and width must be "
                            f"positive multiples of {m} for this model")
        limit = (tc.pos_embed_max_size or 10**9) * m
        if height > limit or width > limit:
            raise UserError(f"image size {height}x{width} is too large for this transformer: at most "
                            f"{limit} pixels a side (pos_embed_max_size {tc.pos_embed_max_size})")
        return (batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def pipeline(self):
        """A ``StableDiffusion3Pipeline`` sharing this model's modules (a fresh scheduler from the
        model's config, with ``shift`` applied when it was overridden)."""
        from diffusers import StableDiffusion3Pipeline

        config = dict(self.scheduler.config)
        if self.shift is not None:
            config.update(shift=self.shift, use_dynamic_shifting=False)
        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=type(self.scheduler).from_config(config), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        b = noise.shape[0]
        pos, neg = (broadcast_cond(c, b) for c in split_cond(cond))
        if self.uses_cfg(guidance) and not neg:
            raise UserError(f"CFG scale {guidance} needs the negative prompt's conditioning: "
                            f"encode prompts with {type(self).__name__}.encode_prompts")
        height, width = self.pixel_size(noise)
        images = self.pipeline()(
            prompt_embeds=pos["prompt_embeds"], pooled_prompt_embeds=pos["pooled_prompt_embeds"],
            negative_prompt_embeds=neg.get("prompt_embeds"),
            negative_pooled_prompt_embeds=neg.get("pooled_prompt_embeds"),
            latents=noise.to(self.device), height=height, width=width, num_inference_steps=steps,
            guidance_scale=float(guidance), max_sequence_length=self.max_sequence_length, output_type="pt",
        ).images
        return images.float()


# ---- folder checks -------------------------------------------------------------------------
def _is_null(entry) -> bool:
    return entry is None or (isinstance(entry, (list, tuple)) and all(e is None for e in entry))


def check_pipeline_folder(path, need_transformer: bool = True) -> Path:
    """A local StableDiffusion3Pipeline folder with every component folder present
    (``text_encoder_3`` / ``tokenizer_3`` only where model_index.json does not list them as null)."""
    root = _check_folder(path, "sd3", "StableDiffusion3", COMPONENTS, need_transformer=need_transformer)
    index = read_model_index(root)
    missing = [c + "/" for c in OPTIONAL if not _is_null(index.get(c, "")) and not (root / c).is_dir()]
    if missing:
        raise UserError(f"{root} lacks {', '.join(missing)}: an sd3 folder needs {', '.join(COMPONENTS + OPTIONAL)} "
                        f"({', '.join(OPTIONAL)} may be listed as null in model_index.json)")
    return root


def _plan(name, transformer, vae, text_params: int, max_len: int, height: int, width: int) -> PlanParts:
    vc = vae.config
    n = 2 ** (len(vc.block_out_channels) - 1) * transformer.config.patch_size
    return PlanParts(
        name=name, transformer=transformer, vae=vae,
        vae_config={"block_out_channels": tuple(vc.block_out_channels), "layers_per_block": vc.layers_per_block,
                    "latent_channels": vc.latent_channels},
        text_encoders=int(text_params), text_tokens=CLIP_TOKENS + int(max_len),
        image_tokens=(height // n) * (width // n),
    )


