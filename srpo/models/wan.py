"""Wan 2.1 / 2.2 text-to-video as a FlowModel: diffusers' WanTransformer3DModel + AutoencoderKLWan
(the causal 3-D VAE) + the UMT5-XXL encoder, as ``WanPipeline`` (diffusers 0.42) runs them.

What the pipeline does, and this file reproduces:

- **prompts** are cleaned by the pipeline's own ``prompt_clean`` (ftfy where installed, HTML
  unescaping, whitespace), tokenized with padding to ``max_sequence_length`` (512, ``__call__``'s
  default) and encoded by the UMT5 encoder with its attention mask; the last hidden states past
  each prompt's length are zeroed. The transformer takes the padded ``[B, L, D]`` tensor with no
  mask (the zeros are what it attends to), so conditionings of separate encodes concatenate.
- **guidance**: true CFG, ``v_u + g (v_c - v_u)`` against ``negative_prompt`` ("" as the pipeline's
  default; the Wan model cards recommend a long Chinese one: pass it as an option); the two passes
  are two transformer calls, as the pipeline makes them (``cfg_batched = False``).
- **timestep**: the scheduler's ``t = 1000 sigma`` (float32), one per sample; for a folder whose
  pipeline config sets ``expand_timesteps`` (Wan2.2-TI2V-5B) one per latent patch token.
- **schedule**: Euler on a FlowMatchEulerDiscreteScheduler at the folder scheduler's flow shift.
  The Wan folders ship ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...)``; srpo's
  rollout is the Euler ODE of every family, so :meth:`pipeline_scheduler` hands the pipeline that
  Euler scheduler with the folder's ``flow_shift`` (what its ``FlowMatchEulerDiscreteScheduler``
  annotation takes): rollout and reference sample the same grid. The folder's scheduler itself
  is kept and saved as it was.
- **latents** are 5-D ``[B, C, F', h, w]``: ``F' = (frames - 1) / 4 + 1`` latent frames of the
  VAE's ``scale_factor_temporal`` and ``h, w`` its ``scale_factor_spatial`` downsampling, in the
  VAE's per-channel normalised space ``(z - latents_mean) / latents_std``. The frame count is the
  model's :attr:`frames` (``rollout.frames``; 81, WanPipeline's default, unless set).
- **decode** gives videos ``[B, F, 3, H, W]`` in [0, 1], as ``WanPipeline(output_type="pt")``
  (each video a batch of frames); a reward scores ``reward.frames`` of them
  (:mod:`srpo.rewards.objective`). With gradient, the decode runs AutoencoderKLWan's decoder one
  latent frame (temporal chunk) at a time, as ``AutoencoderKLWan._decode`` does, but
  activation-checkpointed (``options.decode_checkpointing``, default on; :func:`decode_chunks`):
  the same video and the same gradient, holding only a few chunks' causal caches and one chunk's
  activations instead of every frame's, and no gradient past the last frame the reward scores.

Wan2.2-T2V-A14B's two experts (``transformer_2`` and the pipeline's ``boundary_ratio``) train as
one module, :class:`~srpo.models.wan_experts.WanExperts`: each level uses the expert the pipeline
uses there, ``options.guidance_scale_2`` is the pipeline's CFG scale of the low-noise expert (the
same as the caller's unless set), ``options.train_experts`` names the expert(s) that train.

Its twin ``tiny_wan`` (``wan_tiny.py``): random-weight modules of the real classes built in code,
with a small sentencepiece-style Unigram ``T5Tokenizer`` trained here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..rewards.objective import frame_indices
from . import text_encoders as flagship
from .base import (MODELS, Cond, FlowModel, PlanParts, channel_stats, check_fit, check_image_size, encoder_params, folder_configs,
                   meta_module, saved_by, scheduler_sigmas, text_stream_plan)
from .folders import check_transformer_folder, load_error
from .wan_experts import EXPERTS, WanExperts, experts_folder, split_state

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default
DEFAULT_FRAMES = 81  # WanPipeline.__call__'s num_frames

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (1.419e9 parameters; the 14B has 40
# heads, ffn_dim 13824 and 40 layers: the class defaults)
WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json, also each expert of Wan2.2-T2V-A14B-Diffusers
# (14.29e9 parameters each; model_index.json boundary_ratio 0.875)
WAN_14B_TRANSFORMER = dict(WAN_TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40)
A14B_BOUNDARY_RATIO = 0.875
UMT5_XXL_PARAMS = 5_680_910_336  # UMT5EncoderModel of google/umt5-xxl (the Wan text_encoder/), on the meta device


@MODELS.register("wan")
class WanModel(FlowModel):
    """A WanPipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    pipeline_class = "WanPipeline"
    title = "Wan2.1-T2V-1.3B"
    options = ("max_sequence_length", "negative_prompt", "quantize_timesteps", "train_experts", "guidance_scale_2",
               "decode_checkpointing")
    frames = DEFAULT_FRAMES  # frames per video unless rollout.frames sets them
    # diffusers marks both experts optional (two-expert and image-to-video layouts); a
    # text-to-video folder needs its transformer
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    # the attention projections of every block (self- and cross-attention), finetrainers' Wan LoRA default
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    guidance_mode = "cfg"
    default_guidance = 5.0  # WanPipeline's guidance_scale
    cfg_batched = False  # the pipeline calls the transformer once per branch

    @staticmethod
    def vae_scale(vae) -> int:
        return int(vae.config.scale_factor_spatial)

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, negative_prompt: str = "",
                 expand_timesteps: bool = False, shift: float | None = None,
                 quantize_timesteps: bool | None = None, transformer_2=None, boundary_ratio: float | None = None,
                 train_experts: str | None = None, guidance_scale_2: float | None = None,
                 decode_checkpointing: bool = True):
        if transformer_2 is not None:
            if boundary_ratio is None:
                raise UserError("this Wan folder has transformer_2 but model_index.json sets no boundary_ratio, so "
                                "WanPipeline would never use it: add the model's boundary_ratio (Wan2.2-A14B: 0.875)")
            transformer = WanExperts(transformer, transformer_2,
                                     float(boundary_ratio) * scheduler.config.num_train_timesteps, train_experts)
        elif train_experts is not None or guidance_scale_2 is not None:
            name = "train_experts" if train_experts is not None else "guidance_scale_2"
            raise UserError(f"options.{name} is for two-expert Wan folders (Wan2.2-T2V-A14B: transformer/ and "
                            f"transformer_2/), but this model has one transformer: remove it")
        self.boundary_ratio = None if transformer_2 is None else float(boundary_ratio)
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.hold(transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        if int(max_sequence_length) < 1:
            raise UserError(f"max_sequence_length {max_sequence_length} is out of range: give at least 1 text "
                            f"token (WanPipeline's default is {MAX_SEQUENCE_LENGTH})")
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt or ""
        self.expand_timesteps = bool(expand_timesteps)  # a pipeline config entry: handed back to WanPipeline
        self.shift = None if shift is None else float(shift)
        self.quantize_timesteps = bool(quantize_timesteps)  # off: WanPipeline feeds the unquantised 1000 sigma
        self.vae_scale_factor_temporal = int(vae.config.scale_factor_temporal)
        self.frames = DEFAULT_FRAMES
        # decode with gradient chunk by chunk under activation checkpointing (decode_chunks); off:
        # AutoencoderKLWan.decode with every chunk's activations kept for the backward
        self.decode_checkpointing = bool(decode_checkpointing)
        # the frames a decode with gradient must reach (a reward.frames setting: a count or
        # indices, resolved against each video's frame count); None: every frame. Chunks past the
        # last of them decode without gradient.
        self.decode_frames: int | list[int] | None = None
        self._check_compatible()

    @classmethod
    def from_pipeline(cls, pipe, **options) -> WanModel:
        """The pipeline's modules, its ``expand_timesteps`` and ``boundary_ratio`` (Wan2.2 pipeline
        config entries)."""
        return super().from_pipeline(pipe, expand_timesteps=bool(pipe.config.get("expand_timesteps")),
                                     boundary_ratio=pipe.config.get("boundary_ratio"), **options)

    @classmethod
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, *args,
             skeleton: bool = False, **kwargs):
        """As the base class; with two experts and ``skeleton`` (the sharded start) both experts are
        skeletons (:mod:`srpo.shards`) of ``transformer/`` and ``transformer_2/`` (of the folder, or of
        ``transformer_path``: a two-expert run's ``final/``), each rank reading its shards of both."""
        if skeleton and path and (Path(path) / "transformer_2").is_dir():
            import diffusers

            from ..shards import skeleton as build_skeleton
            from .base import resolve_dtype

            source = Path(transformer_path) if transformer_path else Path(path)
            parts = {}
            for name in EXPERTS:
                check_transformer_folder(source / name, cls.transformer_class)
                parts[name] = build_skeleton(getattr(diffusers, cls.transformer_class), source / name,
                                             resolve_dtype(dtype))
            return super().load(path, None, device, dtype, *args, components=parts, **kwargs)
        return super().load(path, transformer_path, device, dtype, *args, skeleton=skeleton, **kwargs)

    @classmethod
    def pipeline_from_folder(cls, root, transformer_path, dtype, **components):
        """As the base class; a two-expert ``transformer_path`` (a run's ``final/``: ``transformer/``
        and ``transformer_2/``) replaces both experts of a two-expert folder."""
        two = (Path(root) / "transformer_2").is_dir()
        if transformer_path and experts_folder(transformer_path) != two:
            raise UserError(f"{transformer_path} holds {'two experts' if not two else 'one transformer'} but "
                            f"{root} has {'one transformer' if not two else 'two experts'}: give the transformer "
                            f"folder(s) of this base model")
        if transformer_path and two:
            components.update(cls.read_experts(transformer_path, dtype))
            transformer_path = None
        return super().pipeline_from_folder(root, transformer_path, dtype, **components)

    @classmethod
    def read_experts(cls, path, dtype=None) -> dict:
        """``{transformer, transformer_2}`` from a folder of both experts (:meth:`save_transformer`'s)."""
        import diffusers

        out = {}
        for name in EXPERTS:
            check_transformer_folder(Path(path) / name, cls.transformer_class)
            try:
                out[name] = getattr(diffusers, cls.transformer_class).from_pretrained(
                    str(Path(path) / name), dtype=dtype, local_files_only=True, use_safetensors=True)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise load_error(Path(path) / name, e, "a WanTransformer3DModel folder") from None
        return out

    def experts(self) -> dict:
        """The pipeline's transformer components: ``{transformer}``, or both experts."""
        t = getattr(self.transformer, "module", self.transformer)  # a DDP wrapper's module
        return {n: getattr(t, n) for n in EXPERTS} if isinstance(t, WanExperts) else {"transformer": self.transformer}

    def _check_compatible(self) -> None:
        tc = self.transformer.config
        check_fit("Wan", [("transformer in_channels", tc.in_channels, "vae z_dim", self.vae.config.z_dim),
                          ("transformer out_channels", tc.out_channels, "vae z_dim", self.vae.config.z_dim),
                          ("transformer text_dim", tc.text_dim, "text_encoder d_model", self.text_encoder.config.d_model),
                          ("transformer temporal patch", tuple(tc.patch_size)[0], "WanPipeline's", 1)])
        if tc.image_dim is not None or tc.added_kv_proj_dim is not None:
            raise UserError("transformer is an image-to-video Wan transformer (it takes image features), which "
                            "WanPipeline does not feed: give a text-to-video Wan transformer")

    # ---- frames ----------------------------------------------------------------------------
    def set_frames(self, frames: int) -> None:
        """Frames per video (``rollout.frames``): ``k * scale_factor_temporal + 1``; otherwise a
        one-line error naming the nearest counts the VAE takes."""
        t, frames = self.vae_scale_factor_temporal, int(frames)
        if frames < 1 or (frames - 1) % t:
            lo = max(1, (frames - 1) // t * t + 1)
            near = " or ".join(str(n) for n in dict.fromkeys((lo, lo + t)) if n != frames)
            raise UserError(f"rollout.frames {frames} is not a frame count the Wan VAE takes: use {near} "
                            f"(frames - 1 must be a multiple of {t})")
        self.frames = frames

    def latent_frames(self, frames: int | None = None) -> int:
        return ((self.frames if frames is None else frames) - 1) // self.vae_scale_factor_temporal + 1

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int, frames: int = DEFAULT_FRAMES) -> PlanParts:
        """Meta-device transformer (one expert of a two-expert folder) and VAE from the folder's
        configs and the UMT5 encoder counted from ``text_encoder/config.json`` (UMT5-XXL without one),
        at ``frames`` frames. Without a folder: Wan2.1-T2V-1.3B's dimensions, or Wan2.2-T2V-A14B's
        (two Wan2.1-14B-sized experts) where the options are two-expert ones."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        max_len, rest = cls.plan_options(options, MAX_SEQUENCE_LENGTH)
        root = Path(path) if path else None
        if root:
            cls.check_folder(root)
        two = (root / "transformer_2").is_dir() if root else bool({"train_experts", "guidance_scale_2"} & set(rest))
        t_cfg, v_cfg, e_cfg = folder_configs(root, "transformer", "vae", "text_encoder")
        name = f"Wan ({root.name})" if t_cfg else "Wan2.2-T2V-A14B" if two else cls.title
        parts = cls.plan_of(name, meta_module(WanTransformer3DModel, t_cfg, WAN_14B_TRANSFORMER if two else WAN_TRANSFORMER),
                            meta_module(AutoencoderKLWan, v_cfg, WAN_VAE),
                            encoder_params(e_cfg, "UMT5EncoderModel", UMT5_XXL_PARAMS), max_len, height, width,
                            frames=frames, experts=2 if two else 1, train_experts=rest.get("train_experts"))
        parts.text_stream = text_stream_plan([(e_cfg or flagship.UMT5_XXL, "UMT5EncoderModel")], max_len)
        return parts

    @classmethod
    def plan_of(cls, name, transformer, vae, text_params: int, max_len: int, height: int, width: int,
                frames: int = DEFAULT_FRAMES, experts: int = 1, train_experts: str | None = None) -> PlanParts:
        """Sizes at ``frames`` frames: the latent tokens of every latent frame, ``experts``
        transformers of ``transformer``'s size held, those ``train_experts`` names trained. The
        decode with gradient is counted apart, as :meth:`decode` runs it (:meth:`plan_decode`)."""
        vc, tc = vae.config, transformer.config
        n = vc.scale_factor_spatial * tc.patch_size[1]
        latent_frames = (frames - 1) // vc.scale_factor_temporal + 1
        return PlanParts(
            name=name, transformer=transformer, vae=vae,
            vae_config={"block_out_channels": tuple(vc.base_dim * m for m in vc.dim_mult),
                        "layers_per_block": vc.num_res_blocks, "latent_channels": vc.z_dim},
            text_encoders=int(text_params), text_tokens=int(max_len),
            image_tokens=latent_frames * (height // n) * (width // n),
            vae_checkpointing=False,  # no per-block decoder checkpointing: plan_decode counts the chunked decode
            frames=int(frames), experts=experts,
            trained_experts=experts if experts == 1 or train_experts in (None, "both") else 1,
        )

    # ---- FlowModel hooks ------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``WanPipeline.encode_prompt``'s embeddings of ``prompts`` and of ``self.negative_prompt``
        (a batch of copies, as the pipeline encodes a string negative prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {"prompt_embeds": self._encode(prompts).to(self.device),
                "negative_prompt_embeds": self.negative_cond(len(prompts))}

    def _encode(self, prompts: list[str]) -> Tensor:
        """``WanPipeline._get_t5_prompt_embeds``: cleaned prompts, padded to ``max_sequence_length``,
        the UMT5 last hidden states, zero past each prompt's token count."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        inputs = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = inputs.attention_mask.to(device)
        hidden = self.text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
        keep = torch.arange(hidden.shape[1], device=device) < mask.gt(0).sum(dim=1, keepdim=True)
        return hidden.masked_fill(~keep[..., None], 0.0).to(self.text_encoder.dtype)

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One WanTransformer3DModel call at the timestep ``1000 sigma`` (floored when
        ``quantize_timesteps``); with ``expand_timesteps`` one per latent patch token."""
        dtype, device = self.dtype, self.device
        t = self.scheduler_timestep(sigma)
        if self.expand_timesteps:
            _, _, f, h, w = latents.shape
            p = self.transformer.config.patch_size
            t = t[:, None].expand(-1, (f // p[0]) * (h // p[1]) * (w // p[2]))
        return self.transformer(hidden_states=latents.to(device, dtype), timestep=t,
                                encoder_hidden_states=cond["prompt_embeds"].to(device, dtype), return_dict=False)[0]

    def scheduler_config(self) -> dict:
        """A FlowMatchEulerDiscreteScheduler config at the folder scheduler's shift (a UniPC /
        DPM++ scheduler's ``flow_shift``), or the model's ``shift`` override."""
        config = dict(self.scheduler.config)
        if type(self.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            config = {"num_train_timesteps": config.get("num_train_timesteps", 1000),
                      "shift": float(config.get("flow_shift") or 1.0)}
        if self.shift is not None:
            config.update(shift=self.shift, use_dynamic_shifting=False)
        return config

    def pipeline(self):
        """WanPipeline on this model's modules (both experts and ``boundary_ratio`` for Wan2.2-A14B)."""
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=self.pipeline_scheduler(), boundary_ratio=self.boundary_ratio,
                           expand_timesteps=self.expand_timesteps, **self.experts())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def velocity(self, latents: Tensor, sigma, cond: Cond, guidance: float) -> Tensor:
        """The base class's; under true CFG the low-noise expert's samples take ``guidance_scale_2``
        where it is set, as the pipeline does (its CFG runs when ``guidance_scale > 1``)."""
        if self.guidance_scale_2 is None or not self.uses_cfg(guidance):
            return super().velocity(latents, sigma, cond, guidance)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(latents.shape[0])
        low = self.scheduler_timestep(sigma) < self.transformer.boundary_timestep
        scale = torch.where(low, self.guidance_scale_2, float(guidance)).to(torch.float32)
        self._stage_scale = scale.view(-1, *([1] * (latents.ndim - 1))).to(latents.device)
        try:
            return super().velocity(latents, sigma, cond, guidance)
        finally:
            self._stage_scale = None

    def combine_cfg(self, v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
        scale = getattr(self, "_stage_scale", None)
        return v_uncond + (guidance if scale is None else scale.to(v_cond.device)) * (v_cond - v_uncond)

    def transformer_folders(self, state: dict) -> dict:
        """``final/transformer`` and ``final/transformer_2`` for two experts, else ``final/`` itself."""
        experts = self.experts()
        if len(experts) == 1:
            return super().transformer_folders(state)
        return {name: (split_state(state, name), module) for name, module in experts.items()}

    def save_lora(self, path, layers: dict[str, Tensor], metadata: dict) -> None:
        """Two experts: ``path/transformer`` and ``path/transformer_2`` (the trained ones), each read by
        ``WanPipeline.load_lora_weights`` (``load_into_transformer_2=True`` for the second)."""
        if len(self.experts()) == 1:
            return super().save_lora(path, layers, metadata)
        for name in EXPERTS:
            if part := split_state(layers, name):
                super().save_lora(Path(path) / name, part, metadata)

    def merge_lora(self, folder) -> None:
        if len(self.experts()) == 1:
            return super().merge_lora(folder)
        from .. import lora

        state, scale = {}, 1.0
        for name in EXPERTS:
            if (Path(folder) / name).is_dir():
                part, scale = lora.read_file(Path(folder) / name)
                state.update({f"{name}.{k}": v for k, v in part.items()})
        self.transformer.load_state_dict(lora.merge_into(self.transformer.state_dict(), state, scale))

    def pipeline_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config())

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        """The sigmas WanPipeline's ``set_timesteps(steps)`` sets on :meth:`pipeline_scheduler`."""
        n = self.vae_scale_factor * self.transformer.config.patch_size[1]
        return scheduler_sigmas(self.pipeline_scheduler(), steps, self.latent_frames() * (height // n) * (width // n))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        check_image_size(height, width, self.vae_scale_factor * self.transformer.config.patch_size[1])
        return (batch, self.vae.config.z_dim, self.latent_frames(), height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def decode(self, latents: Tensor, frames: int | list[int] | None = None) -> Tensor:
        """Normalised latents ``[B, C, F', h, w]`` -> videos ``[B, F, 3, H, W]`` in [0, 1], as the
        pipeline's ``output_type="pt"``; differentiable. With gradient (and
        ``decode_checkpointing``) the decoder runs chunk by chunk under checkpointing
        (:func:`decode_chunks`): the same video, and gradient only through the chunks up to the
        last of ``frames`` (a ``reward.frames`` setting; default :attr:`decode_frames`, else all)."""
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, inv_std = channel_stats(self.vae.config, z)
        z = z / inv_std + mean
        if self.decode_checkpointing and torch.is_grad_enabled() and z.requires_grad and chunkable(self.vae, z):
            spec = self.decode_frames if frames is None else frames
            count = (z.shape[2] - 1) * self.vae_scale_factor_temporal + 1
            needed = None if spec is None else max(frame_indices(spec, count))
            video = decode_chunks(self.vae, z, None if needed is None else
                                  chunk_of(needed, self.vae_scale_factor_temporal) + 1)
        else:
            video = self.vae.decode(z, return_dict=False)[0]
        return (video * 0.5 + 0.5).clamp(0, 1).transpose(1, 2).to(latents.dtype)

    @classmethod
    def plan_decode(cls, vae, options: dict, height: int, width: int, frames: int,
                    scored: list[int]) -> tuple[int, int]:
        """Elements per sample of a decode with gradient at ``height x width``, ``frames`` frames,
        the reward scoring frames ``scored``, as :meth:`decode` runs it: (held from the decode to
        its backward, live during the backward's largest recomputation). Counted by running
        ``vae``'s decoder (a meta-device module) on meta tensors: see :func:`decode_plan`."""
        on = bool(options.get("decode_checkpointing", True))
        t = vae.config.scale_factor_temporal
        return decode_plan(vae, height, width, (frames - 1) // t + 1,
                           chunk_of(max(scored), t) + 1 if scored else None, on)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` (or images ``[B, 3, H, W]``, one frame) in [0, 1] -> normalised
        latents, the posterior mode (the inverse of :meth:`decode`)."""
        x = pixels if pixels.ndim == 5 else pixels.unsqueeze(1)
        z = self.vae.encode((2.0 * x - 1.0).transpose(1, 2).to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        mean, inv_std = channel_stats(self.vae.config, z)
        return ((z - mean) * inv_std).to(pixels.dtype)

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing on every transformer block (AutoencoderKLWan supports none of
        its own: :meth:`decode` checkpoints its temporal chunks, ``options.decode_checkpointing``)."""
        t = self.transformer
        t.enable_gradient_checkpointing() if enabled else t.disable_gradient_checkpointing()

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` from ``WanPipeline.__call__`` (``output_type="pt"``) with this
        conditioning and noise (its frame count from the noise's latent frames)."""
        pos, neg = self.guided_cond(cond, noise.shape[0], guidance)
        cfg = self.uses_cfg(guidance)
        height, width = self.pixel_size(noise)
        frames = (noise.shape[2] - 1) * self.vae_scale_factor_temporal + 1
        video = self.pipeline()(
            prompt_embeds=pos["prompt_embeds"], negative_prompt_embeds=neg["prompt_embeds"] if cfg else None,
            latents=noise.to(self.device, torch.float32), height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=float(guidance), guidance_scale_2=self.guidance_scale_2,
            max_sequence_length=self.max_sequence_length, output_type="pt",
        ).frames
        return video.float()


# ---- the decode with gradient, chunk by chunk ------------------------------------------------

def chunk_of(frame: int, temporal: int) -> int:
    """The latent frame (decoder chunk) that makes output ``frame``: the first makes frame 0, each
    later one the next ``temporal`` frames."""
    return 0 if frame == 0 else (frame - 1) // temporal + 1


def chunkable(vae, z: Tensor) -> bool:
    """Whether :func:`decode_chunks` reproduces ``vae.decode(z)``: not where it would tile, nor for
    a VAE under accelerate's offload hooks (decode then runs as diffusers runs it)."""
    if getattr(vae, "_hf_hook", None) is not None or not hasattr(vae, "_cached_conv_counts"):
        return False
    ratio = vae.spatial_compression_ratio
    return not (vae.use_tiling and (z.shape[-1] > vae.tile_sample_min_width // ratio
                                    or z.shape[-2] > vae.tile_sample_min_height // ratio))


def _decode_chunk(decoder, x: Tensor, cache: tuple, first: bool):
    """One temporal chunk through ``decoder`` from the causal cache the chunks before it left:
    (its frames, the cache it leaves). A function of its arguments (the cache is copied, never
    changed in place), so a checkpoint recomputes it exactly in the backward."""
    cache = list(cache)
    out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
    return out, tuple(cache)


def _decode_segment(decoder, x: Tensor, cache: tuple, start: int):
    """Consecutive chunks ``x`` (the first is chunk ``start``), each checkpointed: (their frames,
    the cache the last leaves)."""
    outs = []
    for i in range(x.shape[2]):
        out, cache = checkpoint(_decode_chunk, decoder, x[:, :, i:i + 1], cache, start + i == 0, use_reentrant=False)
        outs.append(out)
    return torch.cat(outs, 2), cache


def segment_length(chunks: int) -> int:
    """Chunks per checkpointed segment: ``ceil(sqrt(chunks))``, so the backward holds about
    ``2 sqrt(chunks)`` causal caches (segment starts, then one segment's chunks) instead of one
    per chunk."""
    return max(1, math.isqrt(max(chunks, 1) - 1) + 1)


def decode_chunks(vae, z: Tensor, grad_chunks: int | None = None) -> Tensor:
    """``AutoencoderKLWan.decode(z)`` (un-normalised latents ``[B, C, F', h, w]`` -> ``[B, 3, F, H,
    W]`` in [-1, 1]) for a decode with gradient: the decoder runs one latent frame at a time with
    its causal feature cache, as ``_decode`` does, the first ``grad_chunks`` (default all) under
    two-level activation checkpointing (segments of :func:`segment_length` chunks, each chunk
    again inside its segment), the rest without gradient. The backward recomputes a segment from
    the cache it started with, then each of its chunks from theirs: every chunk's activations are
    live only during its own backward. Same values and gradient as the full decode; the decoder
    runs three times forward instead of once."""
    x = vae.post_quant_conv(z)
    n = x.shape[2]
    grad_chunks = n if grad_chunks is None else min(int(grad_chunks), n)
    k = segment_length(grad_chunks)
    cache, outs = (None,) * vae._cached_conv_counts["decoder"], []
    for s in range(0, grad_chunks, k):
        out, cache = checkpoint(_decode_segment, vae.decoder, x[:, :, s:min(s + k, grad_chunks)], cache, s,
                                use_reentrant=False)
        outs.append(out)
    with torch.no_grad():  # past the last frame a reward scores: values only
        for i in range(grad_chunks, n):
            out, cache = _decode_chunk(vae.decoder, x[:, :, i:i + 1], cache, i == 0)
            outs.append(out)
    out = torch.cat(outs, 2)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0)


def _chunk_counts(vae, height: int, width: int, chunks: int) -> list[tuple[int, int, int, int]]:
    """Per chunk (the first, then one every later chunk matches: the caches are two frames deep
    from the second on): (elements autograd saves decoding it with gradient, its largest saved
    tensor, elements of the cache it leaves, elements of its frames), by running ``vae``'s
    decoder (its weights frozen, as training holds them) on one sample on its device (the meta
    device: shapes only) and counting the distinct non-parameter storages autograd saves
    (:func:`~srpo.models.base.saved_by`)."""
    weight = next(vae.parameters())
    x = torch.zeros(1, vae.config.z_dim, min(chunks, 2), height // vae.spatial_compression_ratio,
                    width // vae.spatial_compression_ratio, device=weight.device, dtype=weight.dtype, requires_grad=True)
    cache, out = (None,) * vae._cached_conv_counts["decoder"], []
    for i in range(x.shape[2]):
        (saved, largest), (frames, cache) = saved_by(vae, _decode_chunk, vae.decoder, x[:, :, i:i + 1], cache, i == 0)
        out.append((saved, largest, sum(c.numel() for c in cache if torch.is_tensor(c)), frames.numel()))
    return out


def decode_plan(vae, height: int, width: int, chunks: int, grad_chunks: int | None = None,
                checkpointing: bool = True) -> tuple[int, int]:
    """Elements per sample of a ``chunks``-latent-frame decode with gradient through the first
    ``grad_chunks`` (default all): (held from the decode to its backward, live at the backward's
    peak besides them). Checkpointed (:func:`decode_chunks`): held are the caches at segment
    starts and the video (the two clamps' inputs); at the peak one segment's chunk caches, one
    chunk's activations with its output and cache gradients and the video's gradient. Without:
    every chunk's activations and the video. ``vae``: a meta-device (or any) AutoencoderKLWan."""
    grad_chunks = chunks if grad_chunks is None else min(grad_chunks, chunks)
    counts = _chunk_counts(vae, height, width, chunks)
    per = [counts[min(i, len(counts) - 1)] for i in range(chunks)]
    video = sum(c[3] for c in per)
    if not checkpointing:
        return sum(c[0] for c in per) + 2 * video, video
    k = segment_length(grad_chunks)
    held = sum(per[s - 1][2] for s in range(k, grad_chunks, k)) + 2 * video
    peak = max(sum(per[j][2] for j in range(s, min(s + k, grad_chunks) - 1))  # the segment's chunk caches
               + max(a + 2 * big + cache for a, big, cache, _ in per[s:min(s + k, grad_chunks)])
               for s in range(0, grad_chunks, k))
    return held, peak + video
