"""Each family's model at its flagship's widths with few blocks and random weights, for the
real-dimension rehearsal (``benchmarks/real_dims.py``, :mod:`srpo.bench.real_dims`): FLUX.1-dev
through its own builder (``FluxModel.real_dims``), the others through their tiny twin's builder
fed the flagship's constants of their own files. ``dims`` is :class:`srpo.bench.real_dims.Dims`."""

from __future__ import annotations

import torch

# Families built through their tiny twin's builder at the flagship's widths (the family's own
# constants: srpo/models/<family>.py), the transformer depth from ``Dims.double`` (and
# ``Dims.single`` where the family has single-stream blocks), the text encoder of the real class at
# its real hidden width with ``Dims.t5_layers`` layers (its MLP at twice the width, the twin's), and
# the flagship's VAE (``vae``: the family's constant config) in place of the twin's. ``tiny``: the
# twin's own test sizes at the same depths. FLUX.1-dev has its own builder (FluxModel.real_dims).
FAMILIES = ("flux", "flux2", "qwen_image", "sd3", "z_image")
TITLES = {"flux": "FLUX.1-dev", "flux2": "FLUX.2 [dev]", "qwen_image": "Qwen-Image", "sd3": "SD3.5 Large",
          "z_image": "Z-Image-Turbo"}
DOUBLE_SINGLE = ("flux", "flux2")  # families with double- and single-stream blocks


def _twin_spec(name: str, tiny: bool):
    """(twin family, real-width size keywords, the depth keywords' names, the flagship VAE or
    None) of ``name``."""
    if name == "flux2":
        from . import flux2 as f

        real = dict(latent_channels=f.FLUX2_VAE["latent_channels"], attention_head_dim=128,
                    num_attention_heads=f.FLUX2_DEV_TRANSFORMER["num_attention_heads"],
                    axes_dims_rope=f.FLUX2_DEV_TRANSFORMER["axes_dims_rope"],
                    timestep_guidance_channels=f.FLUX2_DEV_TRANSFORMER["timestep_guidance_channels"],
                    text_dim=f.MISTRAL_SMALL_3["text_config"]["hidden_size"],
                    text_heads=f.MISTRAL_SMALL_3["text_config"]["num_attention_heads"])
        return "tiny_flux2", real, ("num_layers", "num_single_layers", "text_layers"), \
            ("AutoencoderKLFlux2", f.FLUX2_VAE)
    if name == "qwen_image":
        from . import qwen_image as f

        t = f.QWEN_IMAGE_TRANSFORMER
        real = dict(latent_channels=f.QWEN_IMAGE_VAE["z_dim"], vae_base_dim=f.QWEN_IMAGE_VAE["base_dim"],
                    vae_dim_mult=tuple(f.QWEN_IMAGE_VAE["dim_mult"]),
                    vae_temporal_downsample=tuple(f.QWEN_IMAGE_VAE["temperal_downsample"]),
                    attention_head_dim=t["attention_head_dim"], num_attention_heads=t["num_attention_heads"],
                    axes_dims_rope=t["axes_dims_rope"], text_dim=t["joint_attention_dim"], text_heads=28,
                    text_kv_heads=4, mrope_section=(16, 24, 24))  # Qwen2.5-VL-7B: 28 heads of 128, 4 KV heads
        return "tiny_qwen_image", real, ("num_layers", None, "text_layers"), \
            ("AutoencoderKLQwenImage", f.QWEN_IMAGE_VAE)
    if name == "sd3":
        from . import sd3 as f

        t = f.SD35_LARGE_TRANSFORMER
        # one CLIP width for both CLIPs (the twin's): 1024, between CLIP-L's 768 and bigG's 1280,
        # their projections 2 x 1024 = the transformer's pooled 2048; T5-XXL's 4096, 64 heads of 64
        real = dict(latent_channels=f.SD3_VAE["latent_channels"], attention_head_dim=t["attention_head_dim"],
                    num_attention_heads=t["num_attention_heads"], sample_size=t["sample_size"],
                    pos_embed_max_size=t["pos_embed_max_size"], qk_norm=t["qk_norm"],
                    clip_dim=t["pooled_projection_dim"] // 2, clip_projection_dim=t["pooled_projection_dim"] // 2,
                    text_dim=t["joint_attention_dim"], text_heads=64, scaling_factor=f.SD3_VAE["scaling_factor"],
                    shift_factor=f.SD3_VAE["shift_factor"])
        return "tiny_sd3", real, ("num_layers", None, "text_layers"), ("AutoencoderKL", f.SD3_VAE)
    if name == "z_image":
        from . import z_image as f

        t = f.Z_IMAGE_TRANSFORMER
        real = dict(latent_channels=t["in_channels"], dim=t["dim"], n_heads=t["n_heads"],
                    n_refiner_layers=t["n_refiner_layers"], axes_dims=tuple(t["axes_dims"]),
                    axes_lens=tuple(t["axes_lens"]), text_dim=t["cap_feat_dim"],
                    text_heads=t["cap_feat_dim"] // f.QWEN3_4B["head_dim"], text_kv_heads=4,
                    scaling_factor=f.Z_IMAGE_VAE["scaling_factor"], shift_factor=f.Z_IMAGE_VAE["shift_factor"])
        return "tiny_z_image", real, ("n_layers", None, "text_layers"), ("AutoencoderKL", f.Z_IMAGE_VAE)
    raise ValueError(f"no real-dimension build of family {name!r}: use {', '.join(FAMILIES)}")


def _twin_model(dims, device, base_dtype, frozen_dtype, seed: int):
    """A family of :data:`FAMILIES` other than FLUX.1-dev (see :func:`_twin_spec`)."""
    import diffusers

    from . import MODELS
    from .base import frozen
    from .twin import made_in, seeded

    twin, real, (double, single, text), vae = _twin_spec(dims.model, dims.tiny)
    sizes = {} if dims.tiny else dict(real)
    sizes[double] = dims.double + (0 if single else dims.single)
    if single:
        sizes[single] = dims.single
    sizes[text] = dims.t5_layers
    if dims.model == "flux2":  # the pipeline reads three hidden states: those of the few layers
        n = dims.t5_layers
        sizes["text_encoder_out_layers"] = (max(n - 2, 0), max(n - 1, 0), n)
    if dims.model == "z_image" and not dims.tiny:
        sizes["text_positions"] = max(128, dims.text_tokens)
    cls = MODELS.get(twin)
    with made_in(device, frozen_dtype):
        model = cls.build(MODELS.get(cls.folder_family), seed, max_sequence_length=dims.text_tokens, **sizes)
        if not dims.tiny:  # the flagship's VAE, not the twin's one-resnet one
            vae_cls, vae_cfg = vae
            model.vae = frozen(seeded(seed + 1, getattr(diffusers, vae_cls), **vae_cfg))
    if base_dtype != frozen_dtype:
        torch.nn.Module.to(model.transformer, base_dtype)  # (diffusers' own .to warns about fp32 modules)
    return model


def build_model(dims, device="cpu", base_dtype=torch.bfloat16, frozen_dtype=torch.bfloat16, seed: int = 0):
    """The family's real-dimension model of random weights (FLUX.1-dev:
    ``family("flux").real_dims``; the others: :func:`_twin_model`): the transformer in
    ``base_dtype`` (``memory.prepare`` makes trainable weights float32), the VAE and text
    encoders in ``frozen_dtype`` (``model.dtype``); ``device="meta"``: shapes only."""
    from . import family

    if dims.model != "flux":
        return _twin_model(dims, device, base_dtype, frozen_dtype, seed)
    return family(dims.model).real_dims(dims.depths(), tiny=dims.tiny, device=device, dtype=base_dtype,
                                        frozen_dtype=frozen_dtype, seed=seed)


def plan_parts(dims, height: int, width: int):
    """:class:`~srpo.models.base.PlanParts` of exactly this build (on the meta device): the
    family's own counting (``plan_of``) of its modules."""
    model = build_model(dims, "meta", torch.float32, torch.float32)
    if dims.model == "flux":
        return model.built_parts(height, width)
    text = sum(p.numel() for e in model.text_encoders() for p in e.parameters())
    return type(model).plan_of(f"{TITLES[dims.model]} widths, {dims.double} + {dims.single} blocks", model.transformer,
                               model.vae, text, model.max_sequence_length, height, width)


