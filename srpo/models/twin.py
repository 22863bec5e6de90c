"""The tiny random-weight twin of a family: the same class, built in code at test size (every
component, tokenizers included; nothing is downloaded), for the tests, the tiny configs and the
benchmarks. A twin file defines the modules and a builder; :class:`TinyTwin` does the rest."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError
from .base import MODELS, FlowModel, derived, resolve_dtype
from .folders import check_transformer_folder


def seeded(seed: int, make, *args, **kwargs):
    """``make(*args, **kwargs)`` under torch's RNG seeded with ``seed`` (deterministic; the global
    RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(*args, **kwargs)


def tiny_vae(channels: tuple[int, ...], latent_channels: int, groups: int, vae_class=None, **config):
    """A small ``AutoencoderKL`` (or ``vae_class``, of the same constructor): downsampling by
    ``2 ** (len(channels) - 1)``, one resnet per level, no quant convs (random init under the
    caller's RNG / device context)."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return (vae_class or AutoencoderKL)(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=groups, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, **config)


@contextlib.contextmanager
def made_in(device, dtype: torch.dtype):
    """Modules made inside are made on ``device`` with their weights in ``dtype`` (no float32
    copy of a bf16 model is ever allocated)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


class TinyTwin:
    """Mixed in before its family's class: ``load`` builds the model in code (no path) with
    ``build(cls, seed, shift=..., **sizes)``; ``transformer_path`` replaces its transformer; a saved
    folder of it loads with the family named ``folder_family`` (the family it is mixed into). ``plan_parts`` counts the twin's
    modules on the meta device (``tiny_modules(**sizes)``, or ``plan_modules``) with the family's
    ``plan_of``."""

    build = None  # staticmethod(the twin's builder)
    tiny_modules = None  # staticmethod(the twin's modules from its size keywords)
    folder_family = derived(lambda cls: next(k.family for k in cls.__mro__ if issubclass(k, FlowModel)
                                             and not issubclass(k, TinyTwin)))
    plan_length = 64  # the twin's default max_sequence_length
    plan_ignore: tuple[str, ...] = ()  # load options of the twin that do not change sizes

    @classmethod
    def is_twin(cls) -> bool:
        return True

    @classmethod
    def random(cls, seed: int = 0, **sizes):
        """The random model as an instance of its folder family's class (deterministic in ``seed``;
        the global RNG is left untouched)."""
        return cls.build(MODELS.get(cls.folder_family), seed, **sizes)

    @classmethod
    def save_random(cls, path, seed: int = 0, **sizes):
        """Write :meth:`random` as a full pipeline folder of the family (safetensors) and return it:
        ``<family>.load(path, max_sequence_length=model.max_sequence_length)`` and the pipeline's
        ``from_pretrained(path)`` both load it offline."""
        return cls.random(seed, **sizes).save_pipeline(path)

    @classmethod
    def load(cls, path=None, seed: int = 0, transformer_path=None, device="cpu", dtype=torch.float32,
             shift=None, **sizes):
        import diffusers

        if path:
            raise UserError(f"model '{cls.family}' is built in code and takes no path (got {path}); "
                            f"use model '{cls.folder_family}' to load a folder")
        try:
            model = cls.build(cls, seed, shift=shift, **sizes)
        except TypeError as e:
            raise UserError(f"bad option for model '{cls.family}': {e}") from None
        if transformer_path:
            check_transformer_folder(transformer_path, cls.transformer_class)
            model.transformer = getattr(diffusers, cls.transformer_class).from_pretrained(
                str(transformer_path), local_files_only=True, use_safetensors=True)
            model._check_compatible()
        dtype = resolve_dtype(dtype)
        for m in (model.transformer, *model.frozen_modules().values()):
            m.to(device=device) if getattr(m, "dtype", None) == dtype else m.to(device=device, dtype=dtype)
        return model

    @classmethod
    def plan_modules(cls, max_len: int, sizes: dict) -> dict:
        """The twin's modules (random init under the caller's device context) from its size options."""
        return cls.tiny_modules(**sizes)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int, **extra):
        """The twin's modules on the meta device, from the options left after the sequence length
        and the options that do not change sizes (``plan_ignore``, seed, shift, negative prompt,
        timestep quantisation), counted by the family's ``plan_of``."""
        options = dict(options or {})
        if path:
            raise UserError(f"model '{cls.family}' is built in code and takes no path (got {path})")
        max_len = int(options.pop("max_sequence_length", cls.plan_length))
        for k in ("seed", "shift", "quantize_timesteps", "negative_prompt", *cls.plan_ignore):
            options.pop(k, None)
        try:
            with torch.device("meta"):
                modules = cls.plan_modules(max_len, options)
        except TypeError as e:
            raise UserError(f"bad option for model '{cls.family}': {e}") from None
        text = sum(p.numel() for k, m in modules.items() if k.startswith("text_encoder") and isinstance(m, nn.Module)
                   for p in m.parameters())
        return cls.plan_of(f"tiny {cls.title}", modules["transformer"], modules["vae"], text, max_len, height,
                           width, **extra)
