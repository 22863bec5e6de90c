"""Z-Image / Z-Image-Turbo as a FlowModel: diffusers' ZImageTransformer2DModel (the single-stream
S3-DiT) + the FLUX AutoencoderKL + a Qwen3 text encoder, as ``ZImagePipeline`` (diffusers 0.42)
runs them.

What the pipeline does, and this file reproduces:

- **prompts**: each prompt goes through the tokenizer's chat template as one user message
  (``add_generation_prompt=True, enable_thinking=True``, so ``<|im_start|>user\\n{prompt}<|im_end|>
  \\n<|im_start|>assistant\\n``), is padded to ``max_sequence_length`` (512) and encoded by the
  Qwen3 model with its attention mask; the features are the *second-to-last* hidden states, and
  only the unmasked tokens are kept: every prompt has its own length. The transformer takes them
  as a list. In the contract's conditioning they are stored padded to ``max_sequence_length``
  (zeros past the prompt) with a boolean ``prompt_mask``, so conditionings of separately encoded
  prompts concatenate; :meth:`predict` unpads them into the transformer's list again.
- **timestep**: the scheduler's ``t = 1000 sigma`` goes in as ``(1000 - t) / 1000`` (``1 - sigma``:
  the transformer's time runs from 0 at noise to 1 at the image, and it scales it by 1000
  itself), and the transformer's output is the *negative* velocity (the pipeline negates it).
- **schedule**: the pipeline passes its own sigmas ``linspace(1, 1/N, N)`` and ``mu`` from the
  image sequence length to the FlowMatchEulerDiscreteScheduler, which applies its fixed ``shift``
  (3.0 in Z-Image-Turbo's scheduler config) or, where its config asks for dynamic shifting, ``mu``.
- **latents**: ``[B, 16, H/8, W/8]`` in the VAE's normalised space, decoded as
  ``z / scaling_factor + shift_factor`` (0.3611 / 0.1159, the FLUX VAE's).
- **guidance**: two variants, chosen by the load option ``variant``:

  * ``turbo`` (the default): Z-Image-Turbo is distilled, sampled with ``guidance_scale=0`` (no CFG,
    one pass); ``guidance_mode = "none"``, guidance is ignored.
  * ``base``: Z-Image, sampled with true CFG against a negative prompt (``""`` by default).
    ``ZImagePipeline`` writes it ``pos + g (pos - neg)``, which is the contract's CFG scale
    ``s = g + 1`` (``neg + s (pos - neg)``): **srpo's guidance is the pipeline's
    ``guidance_scale`` plus one** (the model card's ``guidance_scale=4`` is guidance 5 here), so
    that "1 = one conditional pass" means the same for every family. Both passes run as one
    batched transformer call, as the pipeline does. Its ``cfg_normalization`` (off) and
    ``cfg_truncation`` (1.0: never) defaults change nothing; both are load options and are
    reproduced when set (the norm cap in :meth:`combine_cfg`, the truncation in :meth:`velocity`).

  The variant is an explicit option because a Turbo folder and a base folder have the same
  pipeline class and the same transformer config: nothing in the folder says reliably which one
  it is (the scheduler's shift differs, but that is a sampling setting, not an identity).

LoRA: ``ZImagePipeline`` has ``ZImageLoraLoaderMixin`` in 0.42, so :meth:`FlowModel.save_lora`
(``ZImagePipeline.save_lora_weights``) writes the file ``load_lora_weights`` reads.

Its twin ``tiny_z_image`` (``z_image_tiny.py``): random-weight models built in code from the real classes,
with a small byte-level BPE tokenizer in ``Qwen2Tokenizer`` (Qwen's class and pre-tokenizer, the
chat-template tokens) trained on synthetic sentences, since no Qwen tokenizer exists offline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from .base import (MODELS, Cond, FlowModel, PlanParts, check_fit, check_image_size, encoder_params, folder_configs,
                   meta_module, text_stream_plan, vae_sizes)

VARIANTS = ("turbo", "base")
SEQ_MULTI_OF = 32  # the transformer pads captions and image tokens to multiples of 32

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (6.155e9 parameters); Z-Image (base) has the
# same architecture
Z_IMAGE_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
# its vae/config.json: the FLUX VAE (16 latent channels, 8x downsampling)
Z_IMAGE_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True,
)
# its text_encoder/config.json: Qwen3-4B, loaded as Qwen3Model (no LM head; the embeddings are tied)
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, attention_bias=False,
)
QWEN3_4B_PARAMS = 4_022_468_096  # Qwen3Model(Qwen3Config(**QWEN3_4B)), counted on the meta device

# Qwen3's chat template, as far as ZImagePipeline uses it (user / assistant / system messages,
# the generation prompt, and the empty think block Qwen3 adds when thinking is switched off)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


@MODELS.register("z_image")
class ZImageModel(FlowModel):
    """A ZImagePipeline's parts behind the FlowModel contract; only ``transformer`` trains."""

    pipeline_class = "ZImagePipeline"
    title = "Z-Image-Turbo"
    options = ("variant", "max_sequence_length", "negative_prompt", "cfg_normalization", "cfg_truncation",
               "quantize_timesteps")
    # diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py default targets
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    guidance_mode = "none"  # the default variant, turbo; an instance of the base variant says "cfg"
    default_guidance = 1.0
    cfg_batched = True  # the pipeline runs [positive, negative] as one transformer call

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, variant: str = "turbo",
                 max_sequence_length: int = 512, negative_prompt: str = "", cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0, shift: float | None = None, quantize_timesteps: bool | None = None):
        self.hold(transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.variant = _check_variant(variant, self.family)
        # per instance: the turbo variant is distilled (no CFG), the base one uses true CFG
        self.guidance_mode = "none" if self.variant == "turbo" else "cfg"
        # the Z-Image model card's guidance_scale 4.0 is CFG scale 5 in srpo's form (see the module doc)
        self.default_guidance = 1.0 if self.variant == "turbo" else 5.0
        if int(max_sequence_length) < 1:
            raise UserError(f"max_sequence_length {max_sequence_length} is out of range: give at least 1 text "
                            f"token (ZImagePipeline's default is 512)")
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt or ""
        try:
            self.cfg_normalization = float(cfg_normalization or 0.0)
            self.cfg_truncation = 1.0 if cfg_truncation is None else float(cfg_truncation)  # None: never
        except (TypeError, ValueError):
            raise UserError(f"cfg_normalization and cfg_truncation must be numbers (got {cfg_normalization!r}, "
                            f"{cfg_truncation!r})") from None
        self.shift = None if shift is None else float(shift)
        # off by default: ZImagePipeline feeds the unquantised (1000 - t) / 1000
        self.quantize_timesteps = bool(quantize_timesteps)
        self._check_compatible()

    def _check_compatible(self) -> None:
        tc = self.transformer.config
        check_fit("Z-Image", [("transformer in_channels", tc.in_channels, "vae latent_channels",
                               self.vae.config.latent_channels),
                              ("transformer cap_feat_dim", tc.cap_feat_dim, "text_encoder hidden_size",
                               self.text_encoder.config.hidden_size)])
        text = -(-self.max_sequence_length // SEQ_MULTI_OF) * SEQ_MULTI_OF
        if text + 2 > tc.axes_lens[0]:
            most = (tc.axes_lens[0] - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF
            raise UserError(f"max_sequence_length {self.max_sequence_length} is too long for this transformer "
                            f"(its first rotary axis has {tc.axes_lens[0]} positions): set "
                            f"model.options.max_sequence_length to at most {most}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template: ZImagePipeline formats prompts with it; "
                            "use the tokenizer/ folder of a Z-Image model")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, shift=None,
             skeleton: bool = False, stream_text_encoders: bool = False, **options) -> ZImageModel:
        """A local ZImagePipeline folder: Z-Image-Turbo with ``variant: turbo`` (the default),
        Z-Image with ``variant: base`` (checked before any weight is read)."""
        _check_variant(options.get("variant", "turbo"), cls.family)
        return super().load(path, transformer_path, device, dtype, shift, skeleton, stream_text_encoders, **options)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Meta-device transformer and VAE from the folder's configs (Z-Image-Turbo's without a
        path: the 6.15e9-parameter S3-DiT, the FLUX VAE and Qwen3-4B, from the configs of
        Tongyi-MAI/Z-Image-Turbo's transformer/, vae/ and text_encoder/ folders)."""
        from diffusers import AutoencoderKL, ZImageTransformer2DModel

        max_len, rest = cls.plan_options(options, 512)
        variant = _check_variant(rest.get("variant", "turbo"), cls.family)
        root = cls.check_folder(path) if path else None
        t_cfg, v_cfg, e_cfg = folder_configs(root, "transformer", "vae", "text_encoder")
        # Z-Image (base) and Z-Image-Turbo share the architecture
        name = f"Z-Image ({root.name})" if t_cfg else ("Z-Image-Turbo" if variant == "turbo" else "Z-Image")
        text = encoder_params(e_cfg, "Qwen3Model", QWEN3_4B_PARAMS)
        parts = cls.plan_of(name, meta_module(ZImageTransformer2DModel, t_cfg, Z_IMAGE_TRANSFORMER),
                            meta_module(AutoencoderKL, v_cfg, Z_IMAGE_VAE), text, max_len, height, width,
                            guidance_mode="cfg" if variant == "base" else "none")
        parts.text_stream = text_stream_plan([(e_cfg or QWEN3_4B, "Qwen3Model")], parts.text_tokens)
        return parts

    @classmethod
    def plan_of(cls, name, transformer, vae, text_params: int, max_len: int, height: int, width: int,
                guidance_mode: str | None = None) -> PlanParts:
        tc = transformer.config
        n = cls.vae_scale(vae) * tc.all_patch_size[0]
        return PlanParts(
            name=name, transformer=transformer, vae=vae, vae_config=vae_sizes(vae), text_encoders=int(text_params),
            text_tokens=-(-int(max_len) // SEQ_MULTI_OF) * SEQ_MULTI_OF, image_tokens=(height // n) * (width // n),
            hidden=int(tc.dim), guidance_mode=guidance_mode)

    # ---- FlowModel hooks ------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``ZImagePipeline.encode_prompt``'s embeddings of ``prompts`` (padded to
        ``max_sequence_length`` with zeros, and their masks); for the base variant also those of
        ``self.negative_prompt`` (cached per batch size) for CFG."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, mask = self._encode(prompts)
        cond = {"prompt_embeds": embeds.to(self.device), "prompt_mask": mask.to(self.device)}
        if self.guidance_mode == "cfg":
            neg, neg_mask = self.negative_cond(len(prompts))
            cond.update(negative_prompt_embeds=neg, negative_prompt_mask=neg_mask)
        return cond

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``ZImagePipeline._encode_prompt``: chat template, padding to ``max_sequence_length``,
        the Qwen3 model's second-to-last hidden states; masked positions zeroed."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        inputs = self.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt")
        device = self.text_encoder.device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return hidden.masked_fill(~mask[..., None], 0.0), mask

    @staticmethod
    def _unpad(cond: Cond) -> list[Tensor]:
        """The per-prompt embeddings the pipeline and the transformer take: unmasked tokens only."""
        return [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"].bool())]

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One ZImageTransformer2DModel call. The timestep is ``(1000 - 1000 sigma) / 1000`` in
        float32, as the pipeline computes it from its scheduler's timesteps (with ``1000 sigma``
        floored to an integer when ``quantize_timesteps``); the output is negated, as the
        pipeline does, into the velocity ``eps - x0``."""
        dtype, device = self.dtype, self.device
        t = self.scheduler_timestep(sigma)
        t = (1000 - t) / 1000
        x = list(latents.to(device, dtype).unsqueeze(2).unbind(0))  # [C, F=1, h, w] per sample
        caps = self._unpad({"prompt_embeds": cond["prompt_embeds"].to(device, dtype),
                            "prompt_mask": cond["prompt_mask"].to(device)})
        out = self.transformer(x, t, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def combine_cfg(self, v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
        """ZImagePipeline's CFG: ``pos + g (pos - neg)`` with ``g = guidance - 1``, then, with
        ``cfg_normalization`` c > 0, each sample scaled down to at most c times the norm of its
        conditional prediction."""
        g = float(guidance) - 1.0
        pred = v_cond + g * (v_cond - v_uncond)
        if self.cfg_normalization > 0.0:
            rows = []
            for pos, p in zip(v_cond, pred):
                ori, new = torch.linalg.vector_norm(pos), torch.linalg.vector_norm(p)
                limit = ori * self.cfg_normalization
                rows.append(torch.where(new > limit, p * (limit / new), p))
            pred = torch.stack(rows)
        return pred

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Cond, guidance: float) -> Tensor:
        """The base class's guided velocity, with ZImagePipeline's ``cfg_truncation``: where
        ``1 - sigma`` exceeds it, CFG is off (one conditional pass). The default 1.0 never does."""
        if not (self.uses_cfg(guidance) and self.cfg_truncation < 1.0):
            return super().velocity(latents, sigma, cond, guidance)
        b = latents.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
        late = ((1000 - s * 1000) / 1000).double() > self.cfg_truncation  # the pipeline's t_norm
        if bool(late.all()):
            return super().velocity(latents, sigma, cond, 1.0)
        v = super().velocity(latents, sigma, cond, guidance)
        if bool(late.any()):
            v_1 = super().velocity(latents, sigma, cond, 1.0)
            v = torch.where(late.reshape(-1, *([1] * (v.ndim - 1))), v_1, v)
        return v

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        """The pipeline's sigmas: ``linspace(1, 1/N, N)`` through the scheduler's shift (or its
        dynamic shift at the pipeline's ``mu``), then 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
        )

        config = self.scheduler_config()
        m = self.vae_scale_factor * 2
        seq_len = (2 * (height // m) // 2) * (2 * (width // m) // 2)  # as __call__ computes image_seq_len
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(steps, device="cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
        return sched.sigmas.to(torch.float64)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        tc = self.transformer.config
        m = self.vae_scale_factor * 2  # VAE downsampling x the transformer's 2x2 patches
        check_image_size(height, width, m)
        if height // m > tc.axes_lens[1] or width // m > tc.axes_lens[2]:
            raise UserError(f"image size {height}x{width} is too large for this transformer: at most "
                            f"{tc.axes_lens[1] * m}x{tc.axes_lens[2] * m} pixels (axes_lens {list(tc.axes_lens)})")
        return (batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """``ZImagePipeline.__call__`` with this conditioning (as its per-prompt lists) and noise;
        guidance goes in as its ``guidance_scale = guidance - 1`` (0, no CFG, for turbo or
        guidance <= 1), with this model's ``cfg_normalization`` and ``cfg_truncation``."""
        pos, neg = self.guided_cond(cond, noise.shape[0], guidance)
        cfg = self.uses_cfg(guidance)
        height, width = self.pixel_size(noise)
        images = self.pipeline()(
            prompt_embeds=self._unpad(pos), negative_prompt_embeds=self._unpad(neg) if cfg else None,
            latents=noise.to(self.device, torch.float32), height=height, width=width, num_inference_steps=steps,
            guidance_scale=float(guidance) - 1.0 if cfg else 0.0, cfg_normalization=self.cfg_normalization,
            cfg_truncation=self.cfg_truncation, max_sequence_length=self.max_sequence_length, output_type="pt",
        ).images
        return images.float()


# ---- options -------------------------------------------------------------------------
def _check_variant(variant, family: str) -> str:
    if variant not in VARIANTS:
        raise UserError(f"unknown variant '{variant}' for model '{family}': use turbo (Z-Image-Turbo, "
                        f"distilled, no CFG) or base (Z-Image, true CFG)")
    return variant


