"""Qwen-Image (and Qwen-Image-2512) as a FlowModel: diffusers' QwenImageTransformer2DModel (a 60-layer
MMDiT) + AutoencoderKLQwenImage (the Wan-style causal 3-D VAE, one frame) + the Qwen2.5-VL-7B text
encoder, sampled with QwenImagePipeline's true classifier-free guidance (``true_cfg_scale`` against
a negative prompt, with its norm rescale).

What the contract's pieces are here, each as ``QwenImagePipeline`` (diffusers 0.42) does it:

- **latents** are 4-D ``[B, C, h, w]`` in the VAE's normalised space ``(z - latents_mean) / latents_std``
  (per channel); the VAE's frame axis (``[B, C, 1, h, w]``) is added inside :meth:`decode` /
  :meth:`encode`, the 2x2 packing into ``[B, (h/2)(w/2), 4C]`` tokens inside :meth:`predict`;
- **prompts** go through the pipeline's chat template; the hidden states of the Qwen2.5-VL's last
  layer are kept for the valid tokens only, the template's first 34 tokens
  (``prompt_template_encode_start_idx``) are dropped and a 0/1 attention mask marks the rest. The
  conditioning is zero-padded to a fixed ``max_sequence_length`` (so prompts encoded one at a time
  concatenate); :meth:`predict` cuts it back to the batch's longest prompt and drops an all-ones
  mask, which is exactly what ``encode_prompt`` hands the transformer;
- **timestep**: the transformer takes ``t / 1000`` of the scheduler's ``t = 1000 sigma``;
- **CFG**: ``v_u + s (v_c - v_u)``, rescaled per token to the norm of ``v_c`` (norms over the packed
  channel axis); the two passes run apart (``cfg_batched = False``: text lengths and masks differ);
- **schedule**: ``sigmas = linspace(1, 1/N, N)`` handed to the scheduler with
  ``mu = calculate_shift(image tokens)``; Qwen-Image's scheduler config shifts them exponentially
  (``use_dynamic_shifting``, base/max shift 0.5/0.9 over 256..8192 tokens) and stretches them to
  end at ``shift_terminal`` 0.02.

Qwen-Image-2512 loads the same way: a QwenImagePipeline folder of the same component classes (its
configs are read from the folder, so any difference in them is honoured). Its model card recommends
a long Chinese negative prompt where Qwen-Image's uses " ": pass it as ``negative_prompt``.

Its twin ``tiny_qwen_image`` (``qwen_image_tiny.py``): random-weight models of the real classes built in code,
with a small byte-level BPE ``Qwen2Tokenizer`` trained here (no Qwen tokenizer files exist
offline); it splits the template's prefix into the same 34 tokens as Qwen's own vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from . import text_encoders as flagship
from .base import (MODELS, Cond, FlowModel, PlanParts, channel_stats, check_fit, check_image_size, encoder_params, folder_configs,
                   meta_module, pack, saved_by, text_stream_plan, unpack)

# QwenImagePipeline.__init__ (diffusers 0.42): the template, the tokens it drops, the tokenizer limit
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_START_IDX = 34
TOKENIZER_MAX_LENGTH = 1024
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default (it accepts at most 1024)
NEGATIVE_PROMPT = " "  # the Qwen-Image model card's "no concept to remove" negative prompt

# Qwen/Qwen-Image transformer/config.json (the class defaults of diffusers' QwenImageTransformer2DModel,
# 20.43e9 parameters); Qwen-Image-2512's is the same
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
# its vae/config.json (AutoencoderKLQwenImage's defaults: 16 latent channels, 8x, Wan 2.1's latent statistics)
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
# Qwen2_5_VLForConditionalGeneration of Qwen/Qwen2.5-VL-7B-Instruct (the text_encoder/ of Qwen-Image),
# counted on the meta device from its config.json: 7.62e9 language model + lm_head, 0.68e9 vision tower
TEXT_ENCODER_PARAMS = 8_292_166_656
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                            max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                            time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False)


def trim_text(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Padded conditioning cut to the batch's longest prompt (its last valid token), as
    ``encode_prompt`` pads a batch; contiguous, like the pipeline's."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    n = max(int((mask.bool() * positions).max()), 1)
    return embeds[:, :n].contiguous(), mask[:, :n].contiguous()


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """diffusers' ``pipeline_qwenimage.calculate_shift``: ``mu`` linear in the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@MODELS.register("qwen_image")
class QwenImageModel(FlowModel):
    """A QwenImagePipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    pipeline_class = "QwenImagePipeline"
    title = "Qwen-Image"
    options = ("max_sequence_length", "negative_prompt", "quantize_timesteps", "decode_checkpointing")
    # diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py default (--lora_layers unset):
    # the image stream's attention projections of every block
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    guidance_mode = "cfg"
    default_guidance = 4.0  # true_cfg_scale of QwenImagePipeline and of the Qwen-Image / -2512 model cards
    cfg_batched = False  # the pipeline runs the passes apart (the prompts' and the negative's lengths differ)

    @staticmethod
    def vae_scale(vae) -> int:
        return 2 ** len(vae.temperal_downsample)  # the causal 3-D VAE: one halving per level

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, negative_prompt: str = NEGATIVE_PROMPT,
                 shift: float | None = None, quantize_timesteps: bool | None = None,
                 decode_checkpointing: bool = True):
        self.hold(transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        if not 1 <= int(max_sequence_length) <= 1024:
            raise UserError(f"max_sequence_length {max_sequence_length} is out of range: QwenImagePipeline "
                            f"accepts 1 to 1024 text tokens")
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = NEGATIVE_PROMPT if negative_prompt is None else str(negative_prompt)
        self.shift = None if shift is None else float(shift)
        # off by default: QwenImagePipeline feeds the unquantised t / 1000
        self.quantize_timesteps = bool(quantize_timesteps)
        # decode with gradient block by block under activation checkpointing (decode_checkpointed);
        # off: AutoencoderKLQwenImage.decode with every activation kept for the backward
        self.decode_checkpointing = decode_option(decode_checkpointing)
        self._check_compatible()

    def _check_compatible(self) -> None:
        tc, z = self.transformer.config, self.vae.config.z_dim
        width = self.text_encoder.config.get_text_config().hidden_size
        check_fit("Qwen-Image", [("transformer in_channels", tc.in_channels, "4 x vae z_dim", 4 * z),
                                 ("transformer out_channels", tc.out_channels, "vae z_dim", z),
                                 ("transformer patch_size", tc.patch_size, "the pipeline's 2x2 packing", 2),
                                 ("transformer joint_attention_dim", tc.joint_attention_dim,
                                  "text_encoder hidden_size", width)])
        for flag in ("guidance_embeds", "use_additional_t_cond"):
            if getattr(tc, flag, False):
                raise UserError(f"transformer has {flag} set, which QwenImagePipeline's text-to-image call does "
                                f"not feed: give a Qwen-Image text-to-image transformer")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Meta-device transformer and VAE from the folder's configs (Qwen-Image without a path);
        the text encoder counted from ``text_encoder/config.json`` (Qwen2.5-VL-7B without one)."""
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        max_len, _ = cls.plan_options(options, MAX_SEQUENCE_LENGTH)
        root = Path(path) if path else None
        t_cfg, v_cfg, e_cfg = folder_configs(root, "transformer", "vae", "text_encoder")
        parts = cls.plan_of(f"Qwen-Image ({root.name})" if t_cfg else "Qwen-Image",
                            meta_module(QwenImageTransformer2DModel, t_cfg, QWEN_IMAGE_TRANSFORMER),
                            meta_module(AutoencoderKLQwenImage, v_cfg, QWEN_IMAGE_VAE),
                            encoder_params(e_cfg, "Qwen2_5_VLForConditionalGeneration", TEXT_ENCODER_PARAMS),
                            max_len, height, width)
        parts.text_stream = text_stream_plan([(e_cfg or flagship.QWEN25_VL_7B, "Qwen2_5_VLForConditionalGeneration")],
                                             max_len)
        return parts

    @classmethod
    def plan_of(cls, name, transformer, vae, text_params: int, max_len: int, height: int, width: int) -> PlanParts:
        vc = vae.config
        n = 2 ** len(vc.temperal_downsample) * 2
        return PlanParts(
            name=name, transformer=transformer, vae=vae,
            vae_config={"block_out_channels": tuple(vc.base_dim * m for m in vc.dim_mult),
                        "layers_per_block": vc.num_res_blocks, "latent_channels": vc.z_dim},
            text_encoders=int(text_params), text_tokens=int(max_len),  # at most: the batch's longest prompt
            image_tokens=(height // n) * (width // n),
            vae_checkpointing=False,  # the per-level formula does not apply: plan_decode counts its decode
        )

    @classmethod
    def plan_decode(cls, vae, options: dict, height: int, width: int, frames: int,
                    scored: list[int]) -> tuple[int, int]:
        """Elements per sample of :meth:`decode` with gradient at ``height x width``: (held from
        the decode to its backward, live besides them at the backward's peak), as it runs with
        ``options.decode_checkpointing`` (default on): see :func:`decode_plan`."""
        return decode_plan(vae, height, width, decode_option(options.get("decode_checkpointing", True)))

    # ---- FlowModel hooks ------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``QwenImagePipeline.encode_prompt``'s embeddings and masks of ``prompts`` and of
        ``self.negative_prompt`` (encoded alone, as the pipeline encodes a string negative prompt,
        and repeated per row), zero-padded to ``max_sequence_length`` tokens."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, mask = self._encode(prompts)
        neg, neg_mask = self.negative_cond()  # encoded alone, as the pipeline encodes a string
        b = len(prompts)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask,
                "negative_prompt_embeds": neg.expand(b, *neg.shape[1:]),
                "negative_prompt_embeds_mask": neg_mask.expand(b, *neg_mask.shape[1:])}

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``_get_qwen_prompt_embeds`` + ``encode_prompt``'s truncation, padded to ``max_sequence_length``."""
        device, drop = self.text_encoder.device, PROMPT_TEMPLATE_START_IDX
        tokens = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + drop,
                                padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        valid = tokens.attention_mask.bool()
        rows = [h[m][drop:][: self.max_sequence_length] for h, m in zip(hidden, valid)]
        embeds = hidden.new_zeros(len(rows), self.max_sequence_length, hidden.shape[-1])
        mask = torch.zeros(len(rows), self.max_sequence_length, dtype=torch.long, device=hidden.device)
        for i, r in enumerate(rows):
            embeds[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return embeds.to(dtype=self.text_encoder.dtype, device=self.device), mask.to(self.device)

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One QwenImageTransformer2DModel call on the packed latents; the timestep is the
        pipeline's ``(1000 sigma) / 1000`` in the model's dtype (``floor(1000 sigma) / 1000`` when
        ``quantize_timesteps``), the text cut to the batch's longest prompt with its mask (none
        when every token is valid), ``img_shapes`` one frame of ``(h/2) x (w/2)`` patches."""
        dtype, device = self.dtype, self.device
        b, _, h, w = latents.shape
        t = self.scheduler_timestep(sigma)
        embeds, mask = trim_text(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        out = self.transformer(
            hidden_states=pack(latents.to(device, dtype)),
            timestep=t.to(dtype) / 1000,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.to(device),
            encoder_hidden_states=embeds.to(device, dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def combine_cfg(self, v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
        """QwenImagePipeline's guidance: ``v_u + s (v_c - v_u)`` rescaled so that every packed token
        keeps the norm of the conditional prediction."""
        h, w = v_cond.shape[-2:]
        cond, neg = pack(v_cond), pack(v_uncond)
        comb = neg + guidance * (cond - neg)
        comb = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return unpack(comb, h, w)

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        """The pipeline's sigmas: ``linspace(1, 1/N, N)`` through the scheduler's ``set_timesteps``
        with ``mu`` from the packed image token count (the fixed ``shift`` instead when given)."""
        import numpy as np

        m = self.vae_scale_factor * 2
        config = self.scheduler_config()
        sched = type(self.scheduler).from_config(config)
        mu = calculate_shift((height // m) * (width // m), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu", mu=mu)
        return sched.sigmas.to(torch.float64)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised ``[B, C, h, w]`` latents -> pixels in [0, 1] (one VAE frame); differentiable.
        With gradient (and ``decode_checkpointing``) the decoder's mid block, residual blocks,
        upsamplers and head run each under activation checkpointing (:func:`decode_checkpointed`:
        the same image and gradient); without, ``AutoencoderKLQwenImage.decode`` itself, as the
        pipeline decodes."""
        z = latents.unsqueeze(2).to(self.vae.device, self.vae.dtype)
        mean, inv_std = channel_stats(self.vae.config, z)
        z = z / inv_std + mean
        if self.decode_checkpointing and torch.is_grad_enabled() and z.requires_grad and checkpointable(self.vae, z):
            x = decode_checkpointed(self.vae, z)
        else:
            x = self.vae.decode(z, return_dict=False)[0]
        return (x[:, :, 0] * 0.5 + 0.5).clamp(0, 1).to(latents.dtype)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> normalised latents (the posterior mode), as the img2img pipeline's
        ``(z - latents_mean) / latents_std``."""
        x = (2.0 * pixels - 1.0).unsqueeze(2).to(self.vae.device, self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mode()
        mean, inv_std = channel_stats(self.vae.config, z)
        return ((z - mean) * inv_std)[:, :, 0].to(pixels.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        check_image_size(height, width, self.vae_scale_factor * 2)
        return (batch, self.vae.config.z_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing on every transformer block (diffusers' AutoencoderKLQwenImage
        supports none of its own: :meth:`decode` checkpoints its decoder's blocks,
        ``options.decode_checkpointing``)."""
        t = self.transformer
        t.enable_gradient_checkpointing() if enabled else t.disable_gradient_checkpointing()

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        pos, neg = self.guided_cond(cond, noise.shape[0], guidance)
        cfg = self.uses_cfg(guidance)
        embeds, mask = trim_text(pos["prompt_embeds"], pos["prompt_embeds_mask"])
        kwargs = {}
        if cfg:
            n_embeds, n_mask = trim_text(neg["prompt_embeds"], neg["prompt_embeds_mask"])
            kwargs = dict(negative_prompt_embeds=n_embeds, negative_prompt_embeds_mask=n_mask)
        height, width = self.pixel_size(noise)
        images = self.pipeline()(
            prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=float(guidance),
            latents=pack(noise.to(self.device, embeds.dtype)), height=height, width=width, num_inference_steps=steps,
            max_sequence_length=self.max_sequence_length, output_type="pt", **kwargs,
        ).images
        return images.float()


# ---- the decode with gradient, unit by unit -------------------------------------------------

def decode_option(value) -> bool:
    """``options.decode_checkpointing``: true or false (a one-line error otherwise)."""
    if not isinstance(value, bool):
        raise UserError(f"options.decode_checkpointing must be true or false, got {value!r}")
    return value


def checkpointable(vae, z: Tensor) -> bool:
    """Whether :func:`decode_checkpointed` reproduces ``vae.decode(z)``: one latent frame, not
    where it would tile, nor for a VAE under accelerate's offload hooks (decode then runs as
    diffusers runs it)."""
    if getattr(vae, "_hf_hook", None) is not None or z.shape[2] != 1:
        return False
    ratio = vae.spatial_compression_ratio
    return not (vae.use_tiling and (z.shape[-1] > vae.tile_sample_min_width // ratio
                                    or z.shape[-2] > vae.tile_sample_min_height // ratio))


def _decoder_pieces(vae) -> tuple:
    """``vae``'s one-frame decode as (its opening: post_quant_conv and the decoder's conv_in; the
    units :func:`decode_checkpointed` checkpoints: the mid block, each residual block and
    upsampler of each up block in turn (what ``QwenImageUpBlock.forward`` runs), the head: norm,
    activation, conv_out). Run without a feature cache, every causal convolution pads with zeros
    and the upsamplers skip their time_conv, which is what ``_decode``'s first (here only) chunk
    does with its empty cache: the same frame, from units without side effects, which a
    checkpoint may recompute."""
    d = vae.decoder

    def opening(z):
        return d.conv_in(vae.post_quant_conv(z))

    def head(x):
        return d.conv_out(d.nonlinearity(d.norm_out(x)))

    units = [d.mid_block]
    for up in d.up_blocks:
        units += [*up.resnets, *(up.upsamplers or ())]
    return opening, [*units, head]


def decode_checkpointed(vae, z: Tensor) -> Tensor:
    """``AutoencoderKLQwenImage.decode(z)`` (un-normalised one-frame latents ``[B, C, 1, h, w]`` ->
    ``[B, 3, 1, H, W]`` in [-1, 1]) for a decode with gradient: the decoder's units
    (:func:`_decoder_pieces`) each under activation checkpointing (``use_reentrant=False``), so
    that the backward holds their inputs and one unit's activations at a time instead of every
    unit's. Per sample where the VAE slices its batch (``use_slicing``), as ``decode`` does. Same
    values and gradient; the decoder runs twice forward."""
    if vae.use_slicing and z.shape[0] > 1:
        return torch.cat([decode_checkpointed(vae, s) for s in z.split(1)])
    opening, units = _decoder_pieces(vae)
    x = opening(z)
    for unit in units:
        x = checkpoint(unit, x, use_reentrant=False)
    return x.clamp(-1.0, 1.0)


def _saved_anew(vae, fn, x: Tensor) -> tuple[tuple[int, int], Tensor]:
    """:func:`~srpo.models.base.saved_by` of ``fn(x)`` less ``x`` itself where ``fn`` saves it
    (a checkpoint's input, held already): ``x`` counted as one of the frozen parameters."""
    owner = torch.nn.Module()
    owner.vae = vae
    owner.held = torch.nn.Parameter(x.detach(), requires_grad=False)  # x's storage
    return saved_by(owner, fn, x)


def decode_plan(vae, height: int, width: int, checkpointing: bool = True) -> tuple[int, int]:
    """Elements per sample of a one-frame decode with gradient at ``height x width``: (held from
    the decode to its backward, live besides them at the backward's peak), counted by running
    ``vae`` (a meta-device AutoencoderKLQwenImage: shapes only; or any) on one latent and counting
    what autograd saves (:func:`~srpo.models.base.saved_by`). Both hold the video twice (the
    inputs of ``_decode``'s clamp and of :meth:`QwenImageModel.decode`'s). Checkpointed
    (:func:`decode_checkpointed`): held are what the opening saves and each checkpointed unit's
    input; at the peak, the largest unit's activations recomputed (less its input, held already)
    and its two largest gradient maps. Without: everything the decoder saves (its causal
    convolutions keep time-padded copies of their inputs, three frames for one, which
    AutoencoderKL's per-level formula undercounts by about 1.75 x), and at the peak the two
    largest gradient maps."""
    weight = next(vae.parameters())
    f = vae.spatial_compression_ratio
    z = torch.zeros(1, vae.config.z_dim, 1, height // f, width // f, device=weight.device, dtype=weight.dtype,
                    requires_grad=True)
    if not checkpointing:
        (saved, largest), video = saved_by(vae, lambda x: vae.decode(x, return_dict=False)[0], z)
        return saved + video.numel(), 2 * largest
    opening, units = _decoder_pieces(vae)
    (held, _), x = saved_by(vae, opening, z)
    peak = 0
    for unit in units:
        held += x.numel()  # its checkpoint keeps its input
        (saved, largest), x = _saved_anew(vae, unit, x)
        peak = max(peak, saved + 2 * largest)
    return held + 2 * x.numel(), peak
