"""Stable Diffusion 3 / 3.5 as a FlowModel: diffusers' SD3Transformer2DModel (MMDiT) + AutoencoderKL
+ CLIP-L, CLIP-G and T5-XXL text encoders, sampled with true classifier-free guidance.

SD3 needs no latent packing: the transformer patchifies ``[B, C, h, w]`` itself, so the contract's
latents go in as they are. Conditioning follows ``StableDiffusion3Pipeline.encode_prompt`` exactly
(penultimate CLIP hidden states concatenated on the feature axis, zero-padded to the T5 width and
stacked before the T5 sequence; pooled = both CLIP projections), plus the negative prompt's
conditioning under ``negative_*`` keys for CFG (``srpo.models.base.velocity`` applies it).

Its twin ``tiny_sd3`` (``sd3_tiny.py``) is random-weight SD3 models built in code from the real
classes, for tests and the lab. As for tiny FLUX, no T5 sentencepiece model exists offline, so all three
tokenizers are the CLIP BPE of :func:`srpo.tokenizer.clip_tokenizer` and the T5 vocabulary is sized
to it; ``StableDiffusion3Pipeline`` runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from . import text_encoders as flagship
from .base import (MODELS, Cond, FlowModel, PlanParts, check_fit, check_image_size, encoder_params, folder_configs,
                   meta_module, scheduler_sigmas, text_stream_plan, vae_sizes)
from .folders import read_model_index

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPTIONAL = ("text_encoder_3", "tokenizer_3")  # may be null in model_index.json (SD3 without T5)
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
ENCODER_CLASSES = {"text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                   "text_encoder_3": "T5EncoderModel"}
FLAGSHIP_ENCODERS = {"text_encoder": flagship.CLIP_L, "text_encoder_2": flagship.CLIP_G, "text_encoder_3": flagship.T5_XXL}
CLIP_TOKENS = 77


@MODELS.register("sd3")
class SD3Model(FlowModel):
    """A StableDiffusion3Pipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    pipeline_class = "StableDiffusion3Pipeline"
    title = "Stable Diffusion 3.5"
    components = COMPONENTS
    options = ("max_sequence_length", "negative_prompt", "quantize_timesteps")
    # diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py default targets
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                    "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    guidance_mode = "cfg"
    default_guidance = 3.5  # the stable-diffusion-3.5-large model card (28 steps); the pipeline's default is 7.0

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, scheduler, max_sequence_length: int = 256,
                 negative_prompt: str = "", shift: float | None = None, quantize_timesteps: bool | None = None):
        self.hold(transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                  text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
                  scheduler=scheduler)
        if not 1 <= int(max_sequence_length) <= 512:
            raise UserError(f"max_sequence_length {max_sequence_length} is out of range: "
                            f"StableDiffusion3Pipeline accepts 1 to 512 T5 tokens")
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt or ""
        self.shift = None if shift is None else float(shift)
        # off by default: StableDiffusion3Pipeline feeds the unquantised scheduler timestep 1000 sigma
        self.quantize_timesteps = bool(quantize_timesteps)
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
        check_fit("SD3", pairs)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def check_folder(cls, path, need_transformer: bool = True) -> Path:
        """A local StableDiffusion3Pipeline folder with every component folder present
        (``text_encoder_3`` / ``tokenizer_3`` only where model_index.json does not list them as null)."""
        root = super().check_folder(path, need_transformer)
        index = read_model_index(root)
        missing = [c + "/" for c in OPTIONAL if not _is_null(index.get(c, "")) and not (root / c).is_dir()]
        if missing:
            raise UserError(f"{root} lacks {', '.join(missing)}: an sd3 folder needs "
                            f"{', '.join(COMPONENTS + OPTIONAL)} ({', '.join(OPTIONAL)} may be listed as null "
                            f"in model_index.json)")
        return root

    @classmethod
    def pipeline_from_folder(cls, root, transformer_path, dtype: torch.dtype, **components):
        """The base class's, told again which of ``text_encoder_3`` / ``tokenizer_3`` are null
        (diffusers saves a missing T5 as null but will not load the folder unless told so)."""
        index = read_model_index(root)
        components.update({c: None for c in OPTIONAL if _is_null(index.get(c, ""))})
        return super().pipeline_from_folder(root, transformer_path, dtype, **components)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Meta-device transformer and VAE from the folder's configs (SD3.5 Large without a path)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        max_len, _ = cls.plan_options(options, 256)
        root = Path(path) if path else None
        t_cfg, v_cfg = folder_configs(root, "transformer", "vae")
        transformer = meta_module(SD3Transformer2DModel, t_cfg, SD35_LARGE_TRANSFORMER)
        configs = {c: e or FLAGSHIP_ENCODERS[c] for c, e in zip(ENCODER_CLASSES, folder_configs(root, *ENCODER_CLASSES))}
        if root and _is_null(read_model_index(root).get("text_encoder_3", "")):
            configs.pop("text_encoder_3")
        encoders = {c: encoder_params(e, ENCODER_CLASSES[c], TEXT_ENCODER_PARAMS[c]) for c, e in configs.items()}
        name = f"SD3 ({root.name})" if t_cfg else "SD3.5 Large"
        parts = cls.plan_of(name, transformer, meta_module(AutoencoderKL, v_cfg, SD3_VAE), sum(encoders.values()),
                            max_len, height, width)
        parts.text_stream = text_stream_plan([(e, ENCODER_CLASSES[c]) for c, e in configs.items()], max_len)
        return parts

    @classmethod
    def plan_of(cls, name, transformer, vae, text_params: int, max_len: int, height: int, width: int) -> PlanParts:
        n = cls.vae_scale(vae) * transformer.config.patch_size
        return PlanParts(name=name, transformer=transformer, vae=vae, vae_config=vae_sizes(vae),
                         text_encoders=int(text_params), text_tokens=CLIP_TOKENS + int(max_len),
                         image_tokens=(height // n) * (width // n))

    # ---- FlowModel hooks ------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``StableDiffusion3Pipeline.encode_prompt``'s embeddings of ``prompts`` and of
        ``self.negative_prompt`` (cached per batch size) for CFG."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled = self._encode(prompts)
        neg, neg_pooled = self.negative_cond(len(prompts))
        return {"prompt_embeds": embeds.to(self.device), "pooled_prompt_embeds": pooled.to(self.device),
                "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}

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
        t = self.scheduler_timestep(sigma)
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

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        tc = self.transformer.config
        m = self.vae_scale_factor * tc.patch_size
        check_image_size(height, width, m)
        limit = (tc.pos_embed_max_size or 10**9) * m
        if height > limit or width > limit:
            raise UserError(f"image size {height}x{width} is too large for this transformer: at most "
                            f"{limit} pixels a side (pos_embed_max_size {tc.pos_embed_max_size})")
        return (batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        pos, neg = self.guided_cond(cond, noise.shape[0], guidance)
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
