"""FLUX.2 as a FlowModel: diffusers' Flux2Transformer2DModel + AutoencoderKLFlux2 with the text
encoder of one of its two text-to-image pipelines, one registered family each (:class:`Flux2Base`,
what both share, and ``flux2`` here; ``flux2_klein`` in ``flux2_klein.py``):

- ``flux2``: ``Flux2Pipeline`` (FLUX.2 [dev]): Mistral-Small-3.x (``Mistral3ForConditionalGeneration``
  behind a ``PixtralProcessor``), its chat template with the pipeline's system message, hidden
  states of layers (10, 20, 30) stacked on the feature axis; guidance is *embedded* (the
  transformer's guidance embedding; ``none`` for a transformer without one).
- ``flux2_klein``: ``Flux2KleinPipeline`` (FLUX.2 [klein]): ``Qwen3ForCausalLM`` + Qwen2 tokenizer,
  the Qwen3 chat template with thinking disabled, layers (9, 18, 27); *true CFG* against the
  empty prompt, run as two transformer calls like the pipeline (``cfg_batched = False``), or
  ``none`` for the step-distilled checkpoints (model_index.json ``is_distilled``).

Two families rather than one with a switch because the pipelines differ in everything a family
declares as a class fact: pipeline class (what ``srpo`` maps a folder to), text encoder, guidance
mode (which ``srpo plan`` reads from the class), default guidance and CFG batching.

Latents in the contract are the pipeline's ``latents`` argument: the VAE's 32-channel latents
patchified 2x2 into ``[B, 128, H/16, W/16]`` and normalised by the VAE's batch-norm running
statistics, ``(z - running_mean) / sqrt(running_var + batch_norm_eps)``, as the pipeline samples
and denoises them; decoding un-normalises, un-patchifies and runs the VAE decoder. Packing into
tokens (a plain flatten: the transformer's ``patch_size`` is 1) and the 4-D position ids
``(t, h, w, l)`` are private to this file. The schedule is the pipeline's: sigmas
``linspace(1, 1/N, N)`` through the scheduler with ``mu = compute_empirical_mu(tokens, N)``
(BFL's empirical fit, :func:`empirical_mu`); the transformer gets ``timestep / 1000`` of the
scheduler's ``1000 sigma`` timestep and scales it back itself.

Their twins ``tiny_flux2`` / ``tiny_flux2_klein`` (``flux2_tiny.py``): random-weight models built in
code from the real classes, with small deterministic byte-level BPE tokenizers (no tokenizer file
of these models exists offline) carrying the special tokens the chat templates use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import UserError
from .base import MODELS, Cond, FlowModel, PlanParts, check_fit, check_image_size, vae_sizes
from ..streaming import plan_counts
from .folders import read_config, read_model_index

MAX_SEQUENCE_LENGTH = 512  # both pipelines' default

# ---- real dimensions (for srpo plan without a folder) ------------------------------------------
# diffusers' scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config("flux2-dev"): the
# transformer/config.json of black-forest-labs/FLUX.2-dev (also Flux2Transformer2DModel's defaults)
FLUX2_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
# the script converts the VAE into AutoencoderKLFlux2() with its defaults: 32 latent channels, 8x
FLUX2_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32)
# text encoder: mistralai/Mistral-Small-3.2-24B-Instruct-2506 config.json (FLUX.2 [dev]'s, per the
# conversion script; lm_head untied)
MISTRAL_SMALL_3 = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, image_size=1540, patch_size=14, num_channels=3),
    image_token_index=10, spatial_merge_size=2, multimodal_projector_bias=False, projector_hidden_act="gelu",
    vision_feature_layer=-1, tie_word_embeddings=False,
)
MISTRAL_SMALL_3_PARAMS = 24_011_361_280  # counted from it on the meta device (count_text_encoder_params)

# LoRA targets: attention and MLP projections of the double-stream blocks, the fused QKV+MLP input
# of the single-stream blocks and, by full name, their fused output ``attn.to_out`` (a bare
# ``attn.to_out`` would also name the double blocks' ModuleList, which peft cannot adapt)
LORA_DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
LORA_SINGLE = ("to_qkv_mlp_proj",)


def lora_targets_for(num_single_layers: int) -> tuple[str, ...]:
    return LORA_DOUBLE + LORA_SINGLE + tuple(f"single_transformer_blocks.{i}.attn.to_out"
                                             for i in range(num_single_layers))


# ---- the pipelines' pieces, reproduced ---------------------------------------------------------
def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """``compute_empirical_mu`` of both FLUX.2 pipelines (BFL flux2 ``sampling.py``): the shift
    exponent, linear in the token count, interpolated in the step count between fits at 10 and
    200 steps (the 200-step fit alone above 4300 tokens)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def patchify(z: Tensor) -> Tensor:
    """VAE latents ``[B, C, h, w]`` -> ``[B, 4C, h/2, w/2]`` (the pipelines' ``_patchify_latents``)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of :func:`patchify` (the pipelines' ``_unpatchify_latents``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


@functools.lru_cache(maxsize=16)
def image_ids(h: int, w: int, device) -> Tensor:
    """Position ids ``[h w, 4]`` of the latent tokens, ``(t=0, row, column, l=0)`` (int64, as the
    pipelines' ``_prepare_latent_ids``); cached per shape and device."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


@functools.lru_cache(maxsize=16)
def text_ids(n: int, device) -> Tensor:
    """Position ids ``[n, 4]`` of the text tokens, ``(0, 0, 0, index)`` (``_prepare_text_ids``)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n)).to(device)


def bn_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std ``[1, 4C, 1, 1]`` of the VAE's batch-norm running statistics, in ``like``'s
    device and dtype, as the pipelines compute them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


class Flux2Base(FlowModel):
    """What both FLUX.2 pipelines share: transformer call, latents, schedule, VAE; only
    ``transformer`` trains. Subclasses add the text encoder and guidance."""

    family = "flux2_base"
    options = ("max_sequence_length", "text_encoder_out_layers", "quantize_timesteps")
    default_layers: tuple[int, ...] = ()  # the pipeline's text_encoder_out_layers
    text_encoder_classes = ("", "")  # the transformers config and model classes of text_encoder/
    # the flagship checkpoint, for srpo plan without a folder: its transformer config, its text
    # encoder's config (named) and parameters, and what the plan calls it
    flagship_transformer: dict = {}
    flagship_text_encoder: tuple[str, dict] = ("", {})
    flagship_text_params = 0
    flagship_title = ""

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, text_encoder_out_layers=None,
                 shift: float | None = None, quantize_timesteps: bool | None = None):
        self.hold(transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        try:
            self.max_sequence_length = int(max_sequence_length)
        except (TypeError, ValueError):
            self.max_sequence_length = 0
        if self.max_sequence_length < 1:
            raise UserError(f"max_sequence_length {max_sequence_length} is not a positive number of text tokens")
        layers = self.default_layers if text_encoder_out_layers is None else text_encoder_out_layers
        if isinstance(layers, (int, str)) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                     for k in (layers or ())) or not layers:
            raise UserError(f"text_encoder_out_layers {text_encoder_out_layers!r} must be a list of hidden-state "
                            f"indices of the text encoder, e.g. {list(self.default_layers)}")
        self.text_encoder_out_layers = tuple(layers)
        self.shift = None if shift is None else float(shift)
        # off by default: both pipelines feed the unquantised scheduler timestep
        self.quantize_timesteps = bool(quantize_timesteps)
        self._check_compatible()

    def _check_compatible(self) -> None:
        tc, vc = self.transformer.config, self.vae.config
        text = self.text_encoder.config.get_text_config()
        depth = text.num_hidden_layers
        bad = [k for k in self.text_encoder_out_layers if not -depth - 1 <= k <= depth]
        if bad:
            raise UserError(f"text_encoder_out_layers {list(self.text_encoder_out_layers)} do not fit this text "
                            f"encoder: it has {depth} layers (hidden states 0 to {depth}); set "
                            f"model.options.text_encoder_out_layers")
        check_fit(self.family, [
            ("transformer patch_size", tc.patch_size, "the pipeline's token packing", 1),
            ("transformer in_channels", tc.in_channels, "4 x vae latent_channels", 4 * vc.latent_channels),
            ("transformer in_channels", tc.in_channels, "vae batch-norm features", self.vae.bn.num_features),
            ("transformer joint_attention_dim", tc.joint_attention_dim,
             f"{len(self.text_encoder_out_layers)} stacked layers x text_encoder hidden_size",
             len(self.text_encoder_out_layers) * text.hidden_size)])
        self.lora_targets = lora_targets_for(tc.num_single_layers)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def plan_of(cls, name, transformer, vae, text_params: int, max_len: int, height: int, width: int,
                distilled: bool = False) -> PlanParts:
        n = cls.vae_scale(vae) * 2  # VAE factor x the 2x2 patchify
        return PlanParts(name=name, transformer=transformer, vae=vae, vae_config=vae_sizes(vae),
                         text_encoders=int(text_params), text_tokens=int(max_len),
                         image_tokens=(height // n) * (width // n), guidance_mode="none" if distilled else None)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Meta-device transformer, VAE and text encoder from the folder's configs (the flagship
        checkpoint's dimensions without a path)."""
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        max_len, _ = cls.plan_options(options, MAX_SEQUENCE_LENGTH)
        if not path:
            with torch.device("meta"):
                transformer = Flux2Transformer2DModel(**cls.flagship_transformer)
                vae = AutoencoderKLFlux2(**FLUX2_VAE)
                encoder = cls.text_encoder_from_config(cls.flagship_text_encoder[1])
            parts = cls.plan_of(cls.flagship_title, transformer, vae, cls.flagship_text_params, max_len, height, width)
        else:
            root = cls.check_folder(path)
            with torch.device("meta"):
                transformer = Flux2Transformer2DModel.from_config(read_config(root / "transformer", required="FLUX.2"))
                vae = AutoencoderKLFlux2.from_config(read_config(root / "vae", required="FLUX.2"))
                encoder = cls.text_encoder_from_config(read_config(root / "text_encoder", required="FLUX.2"))
            parts = cls.plan_of(f"{cls.pipeline_class} ({root.name})", transformer, vae, _param_count(encoder), max_len,
                                height, width, distilled=bool(read_model_index(root).get("is_distilled", False)))
        parts.text_stream = plan_counts([encoder], max_len)
        return parts

    @classmethod
    def text_encoder_from_config(cls, config: dict):
        """The family's text encoder (random init under the caller's device context) from a config."""
        import transformers

        config_cls, model_cls = (getattr(transformers, name) for name in cls.text_encoder_classes)
        skip = ("architectures", "transformers_version")
        return model_cls(config_cls(**{k: v for k, v in config.items() if not k.startswith("_") and k not in skip}))

    # ---- FlowModel hooks --------------------------------------------------------------------
    def _embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The stacked hidden states ``[B, L, layers x D]`` of the text encoder, as both pipelines
        make them (no mask reaches the transformer: padding tokens are attended to)."""
        enc = self.text_encoder
        device = enc.device
        out = enc(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                  output_hidden_states=True, use_cache=False)
        x = torch.stack([out.hidden_states[k] for k in self.text_encoder_out_layers], dim=1).to(enc.dtype)
        b, n, seq, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, seq, n * d).to(self.device)

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One Flux2Transformer2DModel call on the flattened latent tokens. The timestep is the
        pipeline's: the scheduler's ``1000 sigma`` (float32) in the latents' dtype, divided by
        1000 (the transformer multiplies by 1000 again), floored to an integer first when
        ``quantize_timesteps``; ``guidance`` feeds the guidance embedding."""
        b, c, h, w = latents.shape
        dtype, device = self.dtype, self.device
        x = latents.to(device, dtype).reshape(b, c, h * w).permute(0, 2, 1)
        text = cond["prompt_embeds"].to(device, dtype)
        t = self.scheduler_timestep(sigma)
        t = t.to(dtype)
        g = None
        if guidance is not None:
            g = torch.full((b,), float(guidance), dtype=torch.float32, device=device)
        out = self.transformer(
            hidden_states=x, timestep=t / 1000, guidance=g, encoder_hidden_states=text,
            txt_ids=text_ids(text.shape[1], device), img_ids=image_ids(h, w, device), return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        """The pipeline's sigmas: ``linspace(1, 1/N, N)`` set on the scheduler with
        ``mu = compute_empirical_mu(tokens, N)`` (used where the scheduler shifts dynamically, as
        FLUX.2's does: ``exp(mu) / (exp(mu) + 1/s - 1)``), then the terminal 0."""
        import numpy as np

        n = self.vae_scale_factor * 2
        seq_len = (height // n) * (width // n)
        sched = self.pipeline_scheduler()
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(sched.config, "use_flow_sigmas", False):  # as the pipeline: the scheduler's own
            sigmas = None
        sched.set_timesteps(steps, device="cpu", sigmas=sigmas, mu=empirical_mu(seq_len, steps))
        return sched.sigmas.to(torch.float64)

    def pixel_size(self, latents: Tensor) -> tuple[int, int]:
        n = self.vae_scale_factor * 2
        return latents.shape[-2] * n, latents.shape[-1] * n

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised patchified latents -> pixels in [0, 1]; differentiable in ``latents``."""
        mean, std = bn_stats(self.vae, latents)
        z = unpatchify(latents * std + mean)
        x = self.vae.decode(z.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
        return ((x + 1) / 2).clamp(0, 1).to(latents.dtype)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> normalised patchified latents (the posterior mode, as the pipelines
        encode reference images)."""
        z = self.vae.encode((pixels * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        z = patchify(z)
        mean, std = bn_stats(self.vae, z)
        return ((z - mean) / std).to(pixels.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        n = self.vae_scale_factor * 2
        check_image_size(height, width, n)
        return (batch, self.transformer.config.in_channels, height // n, width // n)


@MODELS.register("flux2")
class Flux2Model(Flux2Base):
    """A Flux2Pipeline's parts (FLUX.2 [dev]) behind the FlowModel contract."""

    pipeline_class = "Flux2Pipeline"
    title = "FLUX.2 [dev]"
    lora_targets = lora_targets_for(FLUX2_DEV_TRANSFORMER["num_single_layers"])
    guidance_mode = "embedded"
    default_guidance = 4.0  # Flux2Pipeline's default guidance_scale
    default_layers = (10, 20, 30)
    text_encoder_classes = ("Mistral3Config", "Mistral3ForConditionalGeneration")
    flagship_transformer = FLUX2_DEV_TRANSFORMER
    flagship_text_encoder = ("mistral_small_3", MISTRAL_SMALL_3)
    flagship_text_params = MISTRAL_SMALL_3_PARAMS
    flagship_title = "FLUX.2 [dev]"

    def _check_compatible(self) -> None:
        super()._check_compatible()
        self.guidance_mode = "embedded" if self.transformer.config.guidance_embeds else "none"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``Flux2Pipeline.encode_prompt``: each prompt (``[IMG]`` removed) as a user turn after the
        pipeline's system message, through the processor's chat template, padded and truncated to
        ``max_sequence_length``; hidden states of ``text_encoder_out_layers`` stacked."""
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
        from transformers import ProcessorMixin

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        messages = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                     {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}]
                    for p in prompts]
        kwargs = dict(padding="max_length", truncation=True, max_length=self.max_sequence_length)
        if isinstance(self.tokenizer, ProcessorMixin):  # the same call, minus transformers' kwargs warning
            kwargs = {"processor_kwargs": kwargs}
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)
        return {"prompt_embeds": self._embeds(inputs["input_ids"], inputs["attention_mask"])}

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """``Flux2Pipeline.__call__`` on this model's modules, prompt embeddings and noise."""
        pos, _ = self.guided_cond(cond, noise.shape[0], guidance)
        height, width = self.pixel_size(noise)
        return self.pipeline()(
            prompt_embeds=pos["prompt_embeds"], latents=noise.to(self.device), height=height, width=width,
            num_inference_steps=steps, guidance_scale=float(guidance), output_type="pt",
            max_sequence_length=self.max_sequence_length, text_encoder_out_layers=self.text_encoder_out_layers,
        ).images.float()


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_text_encoder_params() -> dict[str, int]:
    """Each FLUX.2 family's flagship text encoder counted from its config on the meta device (what
    its ``flagship_text_params`` holds), by the config's name."""
    with torch.device("meta"):
        return {c.flagship_text_encoder[0]: _param_count(c.text_encoder_from_config(c.flagship_text_encoder[1]))
                for c in Flux2Base.__subclasses__()}
