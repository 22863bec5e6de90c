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
from pathlib import Path

import torch
from torch import Tensor

from ..method import time_shift
from . import text_encoders as flagship
from .base import (MODELS, Cond, FlowModel, PlanParts, check_fit, check_image_size, encoder_params, folder_configs,
                   meta_module, pack, text_stream_plan, unpack, vae_sizes)

REFERENCE_SHIFT = 3.0  # the reference FLUX trainer's fixed time shift
# LoRA targets: attention and MLP projections of the double and single blocks
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)  # FLUX.1-dev's vae/config.json
T5_XXL, CLIP_L = 4_762_310_656, 123_060_480  # encoder parameters (FLUX.1's text_encoder_2 / text_encoder)
CLIP_VOCAB = 49408  # the offline CLIP BPE's (srpo.tokenizer.clip_tokenizer)

# FluxModel.real_dims: FLUX.1-dev's widths with T5-XXL's encoder (gated GELU) and CLIP-L's text model;
# no tokenizer can be downloaded, so both encoders read the offline CLIP BPE and T5's vocabulary is
# its 49408 tokens (T5-XXL has 32128: 71 M more embedding parameters, which srpo plan counts as any)
REAL_WIDTHS = dict(heads=24, head_dim=128, rope=(16, 56, 56), vae=FLUX_VAE,
                   t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu"),
                   clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768, hidden_act="quick_gelu"))
REAL_BLOCKS = dict(double=19, single=38, t5_layers=24, text_tokens=512)
# the same classes at test size (seconds on a CPU)
TEST_WIDTHS = dict(heads=2, head_dim=16, rope=(4, 6, 6),
                   vae=dict(FLUX_VAE, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                            norm_num_groups=8, sample_size=32),
                   t5=dict(d_model=32, d_kv=16, d_ff=64, num_heads=2, feed_forward_proj="gated-gelu"),
                   clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             projection_dim=32, hidden_act="quick_gelu"))
TEST_BLOCKS = dict(double=1, single=1, t5_layers=1, text_tokens=16)


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


@MODELS.register("flux")
class FluxModel(FlowModel):
    """A FLUX pipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    pipeline_class = "FluxPipeline"
    title = "FLUX.1-dev"
    options = ("max_sequence_length", "quantize_timesteps")
    lora_targets = LORA_TARGETS
    export_formats = ("diffusers", "single-file")
    default_guidance = 3.5

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler=None, max_sequence_length: int = 512, shift: float | None = None,
                 quantize_timesteps: bool | None = None):
        self.hold(transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                  tokenizer_2=tokenizer_2, scheduler=scheduler)
        self.max_sequence_length = max_sequence_length
        self.shift = REFERENCE_SHIFT if shift is None else float(shift)
        self.quantize_timesteps = True if quantize_timesteps is None else bool(quantize_timesteps)
        self.guidance_mode = "embedded" if transformer.config.guidance_embeds else "none"
        self._check_compatible()

    def _check_compatible(self) -> None:
        tc = self.transformer.config
        check_fit("FLUX", [
            ("transformer in_channels", tc.in_channels, "4 x vae latent_channels",
             4 * self.vae.config.latent_channels),
            ("transformer joint_attention_dim", tc.joint_attention_dim, "text_encoder_2 d_model",
             self.text_encoder_2.config.d_model),
            ("transformer pooled_projection_dim", tc.pooled_projection_dim, "text_encoder hidden_size",
             self.text_encoder.config.hidden_size)])

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """From the folder's config files, or FLUX.1-dev's dimensions without a folder."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        max_len, _ = cls.plan_options(options, 512)
        t_cfg, v_cfg, clip, t5 = folder_configs(Path(path) if path else None, "transformer", "vae", "text_encoder",
                                                "text_encoder_2")
        transformer = meta_module(FluxTransformer2DModel, t_cfg, FLUX_DEV)
        text = encoder_params(clip, "CLIPTextModel", CLIP_L) + encoder_params(t5, "T5EncoderModel", T5_XXL)
        parts = cls.plan_of(str(path) if t_cfg else "FLUX.1-dev dimensions", transformer,
                            meta_module(AutoencoderKL, v_cfg, FLUX_VAE), text, max_len, height, width)
        parts.text_stream = text_stream_plan([(clip or flagship.CLIP_L, "CLIPTextModel"),
                                              (t5 or flagship.T5_XXL, "T5EncoderModel")], max_len)
        return parts

    @classmethod
    def plan_of(cls, name, transformer, vae, text_params: int, max_len: int, height: int, width: int) -> PlanParts:
        factor = cls.vae_scale(vae) * 2  # the VAE's factor x the 2x2 packing
        return PlanParts(name, transformer, vae, vae_sizes(vae), int(text_params), int(max_len),
                         (height // factor) * (width // factor))

    @classmethod
    def real_dims(cls, blocks: dict | None = None, *, tiny: bool = False, device="cpu", dtype=torch.bfloat16,
                  frozen_dtype=torch.bfloat16, seed: int = 0) -> FluxModel:
        """FLUX.1-dev's widths (``tiny``: test widths) with random weights: ``blocks`` takes
        ``double`` (19) and ``single`` (38) transformer blocks, ``t5_layers`` (24) and
        ``text_tokens`` (T5 tokens, 512); see :meth:`FlowModel.real_dims`."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from ..tokenizer import clip_tokenizer
        from .folders import check_options
        from .twin import made_in, seeded

        w, depth = (TEST_WIDTHS, dict(TEST_BLOCKS)) if tiny else (REAL_WIDTHS, dict(REAL_BLOCKS))
        check_options(cls.family, set(blocks or {}) - set(depth), depth)
        depth.update(blocks or {})

        def make():
            with made_in(device, dtype):
                transformer = FluxTransformer2DModel(
                    patch_size=1, in_channels=4 * w["vae"]["latent_channels"], num_layers=depth["double"],
                    num_single_layers=depth["single"], attention_head_dim=w["head_dim"],
                    num_attention_heads=w["heads"], joint_attention_dim=w["t5"]["d_model"],
                    pooled_projection_dim=w["clip"]["hidden_size"], guidance_embeds=True, axes_dims_rope=w["rope"])
            with made_in(device, frozen_dtype):
                return (transformer, AutoencoderKL(**w["vae"]),
                        CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77, **w["clip"])),
                        T5EncoderModel(T5Config(vocab_size=CLIP_VOCAB, dropout_rate=0.0, num_layers=depth["t5_layers"],
                                                **w["t5"])))

        transformer, vae, clip, t5 = seeded(seed, make)
        tok = clip_tokenizer()
        return cls(transformer, vae, clip, tok, t5, tok, max_sequence_length=depth["text_tokens"])

    def built_parts(self, height: int, width: int) -> PlanParts:
        tc = self.transformer.config
        return self.plan_of(f"{self.title} widths, {tc.num_layers} + {tc.num_single_layers} blocks", self.transformer,
                            self.vae, sum(p.numel() for e in self.text_encoders() for p in e.parameters()),
                            self.max_sequence_length, height, width)

    def pipeline_scheduler(self):
        """The model's own scheduler (what ``save_pipeline`` writes), else one at the fixed shift."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.scheduler or FlowMatchEulerDiscreteScheduler(shift=self.shift or REFERENCE_SHIFT,
                                                                 use_dynamic_shifting=False)

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """``FluxPipeline.__call__`` on this model's modules, prompt embeddings and noise, with the
        scheduler at this model's fixed shift (the pipeline's own sigmas, ``linspace(1, 1/N, N)``); with
        no shift (``use_schedule("pipeline")``) the folder's own scheduler, dynamic where it says so."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = self.pipeline()
        if self.shift is not None:
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
        ``linspace(1, 1/N, N)`` under a fixed-shift scheduler, then 0. No shift
        (``use_schedule("pipeline")``): FluxPipeline's own, those sigmas through the folder's scheduler
        with ``mu`` from the packed image token count (FLUX.1-dev's dynamic shift)."""
        if self.shift is not None:
            return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift)
        import numpy as np

        from ..method import dynamic_shift_mu

        folder = self.pipeline_scheduler()
        config = dict(folder.config)
        sched = type(folder).from_config(config)
        m = self.vae_scale_factor * 2
        mu = dynamic_shift_mu((height // m) * (width // m), config.get("base_image_seq_len", 256),
                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                              config.get("max_shift", 1.15))
        if config.get("use_flow_sigmas"):  # as FluxPipeline: the scheduler's own sigmas
            sched.set_timesteps(steps, device="cpu", mu=mu)
        else:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu", mu=mu)
        return sched.sigmas.to(torch.float64)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        check_image_size(height, width, self.vae_scale_factor * 2)
        return (batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def single_file_state(self, state: dict) -> dict:
        """The original FLUX.1 (Black Forest Labs) key layout ComfyUI-style loaders read."""
        from .flux_single_file import bfl_state

        return bfl_state(state)
