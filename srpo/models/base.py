"""The FlowModel contract: everything the trainer, the algorithms, the sampler, export and the
memory plan need from a text-to-image flow-matching family, and nothing about how it is built.

A family is one file: a subclass of :class:`FlowModel` registered in :data:`MODELS` under a name
(``@MODELS.register("sd3")`` on the class) or reached by a dotted path
(``my_pkg.models.MyFamily``). It implements the hooks marked *family* below; the base class owns
what every family shares and must do the same way:

- **precision** in one place: :meth:`velocity` runs the transformer under the configured
  autocast (:meth:`set_precision`) and returns float32, whatever the caller;
- **guidance**: ``embedded`` (a guidance embedding, FLUX.1-dev), ``cfg`` (true classifier-free
  guidance against a negative prompt, SD3 / SD3.5) or ``none`` (distilled models), applied in
  :meth:`velocity` from the one ``guidance`` number the caller passes;
- **schedule**: :meth:`schedule` gives the family's sigma grid (1 -> 0) for N steps at an image
  size; the algorithms read every noise level from it, so ``method.index_range`` means the same
  for every family;
- **folders**: :meth:`load` reads a local diffusers folder of the family's pipeline (checked by
  :meth:`check_folder`) through :meth:`pipeline_from_folder` and :meth:`from_pipeline`, and
  :meth:`pipeline` hands the same modules back to that pipeline; a family overrides these only
  where its pipeline differs.

Latents in the contract are ``[B, C, h, w]`` in the VAE's normalised space; packing into patch
tokens, position ids and pooled projections are details of a family's file. The default
:meth:`decode` / :meth:`encode` are those of an ``AutoencoderKL`` (scaling and shift factor).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..precision import AUTOCAST, autocast
from ..registry import Registry
from ..shards import is_skeleton
from .folders import check_options, check_transformer_folder, load_error, read_class_name, read_config

MODELS = Registry("model", name_attr="family")  # family name -> FlowModel subclass (sets its .family)
Cond = dict[str, Tensor]  # prompt conditioning, batched on dim 0; opaque outside the family
NEGATIVE = "negative_"  # cond keys of the unconditional (negative-prompt) branch under true CFG
GUIDANCE_MODES = ("embedded", "cfg", "none")
DEFAULT_FAMILY = "flux"  # model.name when a config names none: the reference trainer's family
SCHEDULES = ("pipeline", "training")  # FlowModel.use_schedule: as the family's pipeline renders, or the trainer


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a name such as ``"bfloat16"`` / ``"bf16"`` -> a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    return value


def select_cond(cond: Cond, index: Any) -> Cond:
    """Slice a batched conditioning dict."""
    return {k: v[index] for k, v in cond.items()}


def split_cond(cond: Cond) -> tuple[Cond, Cond]:
    """(conditional, unconditional) parts of a CFG conditioning dict."""
    pos = {k: v for k, v in cond.items() if not k.startswith(NEGATIVE)}
    neg = {k[len(NEGATIVE):]: v for k, v in cond.items() if k.startswith(NEGATIVE)}
    return pos, neg


def broadcast_cond(cond: Cond, batch: int) -> Cond:
    """A batch-1 conditioning expanded (a view) to ``batch``; others unchanged."""
    return {k: (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch > 1 else v) for k, v in cond.items()}


def frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def pack(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: the 2x2 patch tokens of FluxPipeline's and
    QwenImagePipeline's ``_pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack` for latents of spatial size ``h x w`` (``_unpack_latents``)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def check_fit(model: str, pairs) -> None:
    """One-line error at the first ``(name, value, other, wanted)`` where the transformer does not
    fit the other parts of a ``model`` (a family's ``_check_compatible``)."""
    for name, got, other, want in pairs:
        if got != want:
            raise UserError(f"transformer does not fit this {model} model: {name} = {got} but {other} = "
                            f"{want}; use a transformer trained for this base model")



def channel_stats(vae_config, z: Tensor) -> tuple[Tensor, Tensor]:
    """(latents_mean, 1 / latents_std) of a VAE config's per-channel lists, shaped
    ``[1, C, 1, 1, 1]`` for ``[B, C, F, h, w]`` latents ``z`` (the Wan VAE's layout, which the
    Wan and Qwen-Image pipelines build this way)."""
    c = vae_config.z_dim
    mean = torch.tensor(vae_config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    return mean, inv_std

def check_image_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise UserError(f"image size {height}x{width} is not supported: height and width must be "
                        f"positive multiples of {multiple} for this model")


def meta_module(module_cls, config: dict | None, default: dict) -> nn.Module:
    """``module_cls`` on the meta device from a folder's ``config`` (or the flagship's ``default``)."""
    with torch.device("meta"):
        return module_cls.from_config(config) if config else module_cls(**default)


def folder_configs(root: Path | None, *components: str) -> list[dict | None]:
    """The components' ``config.json`` of a pipeline folder (None each without a folder or file)."""
    return [read_config(Path(root) / c) if root else None for c in components]


def meta_encoder(config: dict, model_class: str) -> nn.Module:
    """The transformers model ``model_class`` built from ``config`` on the meta device."""
    import transformers

    cls = getattr(transformers, model_class)
    with torch.device("meta"):
        return cls(cls.config_class.from_dict({k: v for k, v in config.items() if not k.startswith("_")}))


def encoder_params(config: dict | None, model_class: str, default: int) -> int:
    """Parameters of the transformers model ``model_class`` built from a folder's ``config`` on the
    meta device (``default``, the flagship's count, without a config)."""
    if config is None:
        return int(default)
    return sum(p.numel() for p in meta_encoder(config, model_class).parameters())


def text_stream_plan(encoders: list[tuple[dict | None, str]], tokens: int) -> tuple[int, int] | None:
    """:attr:`PlanParts.text_stream` of a family's text encoders, each given as (its config,
    the transformers class): :func:`srpo.streaming.plan_counts` of them built on the meta
    device; None when a config is unknown (the plan then counts each encoder whole)."""
    if any(config is None for config, _ in encoders):
        return None
    from ..streaming import plan_counts

    return plan_counts([meta_encoder(config, cls) for config, cls in encoders], tokens)


def saved_by(module: nn.Module, fn, *args) -> tuple[tuple[int, int], Any]:
    """((elements autograd saves for backward running ``fn(*args)`` with gradient, its largest
    saved tensor), ``fn``'s result): distinct storages that are not ``module``'s parameters
    (frozen meanwhile, as training holds a VAE), counted as they are packed. On the meta device
    this counts shapes only: ``srpo plan``'s decoder counts (``plan_decode``)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    params = {p.untyped_storage()._cdata for p in module.parameters()}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes() // t.element_size()
        return t

    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return (sum(seen.values()), max(seen.values(), default=0)), out


def vae_sizes(vae) -> dict:
    """What ``srpo plan`` reads of an ``AutoencoderKL``-style VAE (:attr:`PlanParts.vae_config`)."""
    vc = vae.config
    return {"block_out_channels": tuple(vc.block_out_channels), "layers_per_block": vc.layers_per_block,
            "latent_channels": vc.latent_channels}


def folder_family(pipeline_class: str) -> str | None:
    """The registered family (not a tiny twin) that reads folders of ``pipeline_class``."""
    for name in MODELS.names():
        cls = MODELS.get(name)
        if not cls.is_twin() and pipeline_class in (cls.pipeline_class, *cls.pipeline_aliases):
            return name
    return None


@dataclass
class PlanParts:
    """What ``srpo plan`` needs of a family at an image size, counted without loading weights."""

    name: str  # what the plan calls the model
    transformer: nn.Module  # built on the meta device
    vae: nn.Module  # built on the meta device
    vae_config: dict  # block_out_channels, layers_per_block, latent_channels
    text_encoders: int  # parameters of all text encoders
    text_tokens: int  # text tokens the transformer attends to
    image_tokens: int  # image tokens per sample at the planned size
    hidden: int | None = None  # transformer width (default: heads x head dim from its config)
    guidance_mode: str | None = None  # when an instance's mode differs from the class's (a variant)
    vae_checkpointing: bool = True  # the decoder supports activation checkpointing
    frames: int = 1  # video families: frames the decoder makes per sample (image_tokens counts their latents)
    experts: int = 1  # transformers of ``transformer``'s size the model holds (Wan2.2-A14B: 2), one per forward
    trained_experts: int | None = None  # of them, how many train (None: all)
    # streamed text encoders (memory.stream_text_encoders): (parameters resident at once,
    # activation elements per prompt), base.text_stream_plan; None: unknown, counted whole
    text_stream: tuple[int, int] | None = None


class derived:
    """A class attribute computed from the class (a family that assigns the name overrides it)."""

    def __init__(self, fn):
        self.fn, self.__doc__ = fn, fn.__doc__

    def __get__(self, obj, owner):
        return self.fn(owner)


def _pipeline(cls):
    import diffusers

    return getattr(diffusers, cls.pipeline_class) if cls.pipeline_class else None


def _components(cls) -> tuple[str, ...]:
    """The component folders ``pipeline_class`` requires (its ``__init__`` arguments less
    diffusers' optional components), in the order messages list them."""
    pipe = _pipeline(cls)
    if pipe is None:
        return ()
    expected, _ = pipe._get_signature_keys(pipe)
    kinds = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    rank = lambda c: next((i for i, k in enumerate(kinds) if c.startswith(k)), len(kinds))  # noqa: E731
    return tuple(sorted((c for c in expected if c not in pipe._optional_components), key=lambda c: (rank(c), c)))


def _transformer_class(cls) -> str:
    """The transformer class ``pipeline_class`` takes (its ``transformer`` argument's annotation)."""
    pipe = _pipeline(cls)
    arg = inspect.signature(pipe.__init__).parameters.get("transformer") if pipe is not None else None
    if arg is None:
        return ""
    kinds = [a for a in getattr(arg.annotation, "__args__", (arg.annotation,)) if a is not type(None)]  # X | None
    return getattr(kinds[0], "__name__", "") if kinds else ""


def _tiny_twin(cls) -> str:
    """The registered twin whose folder family is the nearest class of ``cls``'s lineage."""
    twins: dict = {}
    for n in MODELS.names():  # the first registered twin of a folder family (a later one is a variant's)
        if MODELS.get(n).is_twin():
            twins.setdefault(MODELS.get(n).folder_family, n)
    return next((twins[f] for k in cls.__mro__ if (f := vars(k).get("family")) in twins), "")


def _tiny_config(cls) -> str:
    """The built-in config (``srpo/configs/<name>.yaml``) whose ``model.name`` is the family's twin."""
    return _configs_training().get(cls.tiny_twin, "") if cls.tiny_twin else ""


@functools.lru_cache(maxsize=1)
def _configs_training() -> dict[str, str]:
    import yaml

    out = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        name = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("name")
        out.setdefault(name, path.stem)
    return out


class FlowModel:
    """Base class of the model adapters; only ``transformer`` trains."""

    # ---- family facts (class attributes) ----------------------------------------------------
    family = "base"  # registry name, for messages (set by MODELS.register)
    pipeline_class = ""  # the diffusers pipeline this family corresponds to
    pipeline_aliases: tuple[str, ...] = ()  # other pipeline classes whose folders this family loads
    transformer_class = derived(_transformer_class)  # the diffusers transformer class final/ loads with
    options: tuple[str, ...] = ()  # the load options (model.options) the family's constructor takes
    lora_targets: tuple[str, ...] = ()  # default LoRA target modules (Linear names or suffixes)
    export_formats: tuple[str, ...] = ("diffusers",)
    guidance_mode = "none"  # embedded | cfg | none (an instance may refine it from its config)
    default_guidance = 1.0  # the family's usual sampling guidance (srpo sample's default)
    cfg_batched = True  # CFG: one call on [negative, positive] (False: two calls, e.g. ragged text lengths)
    # what `srpo init`, `srpo bench` and the benchmarks know of a family, read from here only
    title = ""  # the flagship model as people call it ("FLUX.1-dev"); its folder name and where to get it
    # are data, in the family's recipe file (flagship:)
    components = derived(_components)  # the pipeline folder's component folders (default: the pipeline's own)
    recipe = ""  # srpo init's starting recipe (a name or .yaml path; "": recipes/<family>.yaml of the
    # nearest class in the family's lineage that has one, else the generic one)
    tiny_twin = derived(_tiny_twin)  # registry name of the family's tiny random-weight twin
    tiny_config = derived(_tiny_config)  # the built-in config that trains the twin (srpo train <tiny_config>)

    transformer: nn.Module
    vae: nn.Module
    frames: int | None = None  # video families: frames per sample (rollout.frames); None: images
    autocast_dtype: torch.dtype | None = None  # set by set_precision
    cfg_gradient = "both"  # true CFG in a gradient forward: both passes with gradient, or "cond" only

    @staticmethod
    def vae_scale(vae) -> int:
        """Pixels per latent of ``vae`` along a side (an ``AutoencoderKL``'s: 2 per level after the first)."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent of the model's VAE along a side (follows a replaced ``self.vae``)."""
        return self.vae_scale(self.vae)

    @classmethod
    def is_twin(cls) -> bool:
        """A tiny random-weight twin built in code (:class:`~srpo.models.twin.TinyTwin`), not a
        family of real folders."""
        return False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, shift=None,
             skeleton: bool = False, stream_text_encoders: bool = False, components: dict | None = None,
             **options) -> FlowModel:
        """The model from a local diffusers folder of the family's pipeline, offline and from
        safetensors; ``options`` (the family's :attr:`options`) go to its constructor and
        ``transformer_path`` replaces ``transformer/`` with a folder written by :meth:`save_transformer`.
        ``skeleton``: the transformer's parameters stay on the meta device, for the sharded start
        (:mod:`srpo.shards`: each rank reads its own shards once the model is sharded).
        ``stream_text_encoders``: the folder's transformers text encoders are streamed, read one
        layer at a time as they run (:mod:`srpo.streaming`). ``components``: pipeline components a
        family's own ``load`` built already (Wan's two skeleton experts)."""
        check_options(cls.family, set(options) - set(cls.options), cls.options)
        if not path:
            raise UserError(f"model '{cls.family}' needs a path: set model.path to a local diffusers "
                            f"{cls.pipeline_class} folder")
        root = cls.check_folder(path, need_transformer=not transformer_path)
        components = dict(components or {})
        if skeleton:
            import diffusers

            from ..shards import skeleton as build_skeleton

            folder = Path(transformer_path) if transformer_path else root / "transformer"
            check_transformer_folder(folder, cls.transformer_class)
            components["transformer"] = build_skeleton(getattr(diffusers, cls.transformer_class), folder,
                                                       resolve_dtype(dtype))
            transformer_path = None
        if stream_text_encoders:
            from ..streaming import streamed_components

            components.update(streamed_components(root, resolve_dtype(dtype)))
        pipe = cls.pipeline_from_folder(root, transformer_path, resolve_dtype(dtype), **components)
        return cls.from_pipeline(pipe, shift=shift, **options).to(device)

    @classmethod
    def check_folder(cls, path, need_transformer: bool = True) -> Path:
        """A local diffusers folder of exactly this family's pipeline (or one of its aliases), with
        every component folder present; a one-line error naming what is wrong, or the family that
        reads the folder instead."""
        root = Path(path)
        want = cls.pipeline_class
        if not root.is_dir():
            raise UserError(f"model folder {root} does not exist: give a local diffusers {want} folder "
                            f"(model_index.json, {', '.join(c + '/' for c in cls.components)})")
        if not (root / "model_index.json").is_file():
            raise UserError(f"{root} is not a diffusers pipeline folder (no model_index.json): "
                            f"give a local folder in the {want} layout")
        name = read_class_name(root / "model_index.json", "pipeline folder")
        if name not in (want, *cls.pipeline_aliases):
            other = folder_family(name)
            hint = f"use model '{other}'" if other else f"the '{cls.family}' model reads {want} folders ({cls.title})"
            raise UserError(f"{root} holds a {name or 'unknown'} pipeline, not {want}: {hint}")
        missing = [c + "/" for c in cls.components
                   if (need_transformer or c != "transformer") and not (root / c).is_dir()]
        if missing:
            raise UserError(f"{root} lacks {', '.join(missing)}: a {cls.family} folder needs "
                            f"{', '.join(cls.components)}")
        return root

    @classmethod
    def pipeline_from_folder(cls, root, transformer_path, dtype: torch.dtype, **components):
        """The family's diffusers pipeline from a checked local folder, offline and from
        safetensors; ``transformer_path`` replaces its transformer (a ``save_transformer``
        folder). A load failure is one line naming the folder."""
        import diffusers

        try:
            if transformer_path:
                check_transformer_folder(transformer_path, cls.transformer_class)
                components["transformer"] = getattr(diffusers, cls.transformer_class).from_pretrained(
                    str(transformer_path), dtype=dtype, local_files_only=True, use_safetensors=True)
            return getattr(diffusers, cls.pipeline_class).from_pretrained(
                str(root), dtype=dtype, local_files_only=True, use_safetensors=True, **components)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise load_error(transformer_path or root, e, f"a complete {cls.pipeline_class} folder with "
                                                          f"safetensors weights is needed") from None

    @classmethod
    def from_pipeline(cls, pipe, **options) -> FlowModel:
        """Wrap the modules of an existing pipeline of the family (its components, by the names
        the family's constructor takes them under)."""
        names = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in pipe.components.items() if k in names}, **options)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Sizes for ``srpo plan`` (meta-device modules; no weights read)."""
        raise UserError(f"model family '{cls.family}' does not provide sizes for srpo plan")

    @classmethod
    def plan_options(cls, options: dict | None, default_len: int) -> tuple[int, dict]:
        """The opening of :meth:`plan_parts`: a one-line error for options the family does not
        take; the text length (``max_sequence_length``, else ``default_len``) and the others."""
        options = dict(options or {})
        check_options(cls.family, set(options) - set(cls.options), cls.options)
        return int(options.pop("max_sequence_length", default_len)), options

    @classmethod
    def real_dims(cls, blocks: dict | None = None, *, tiny: bool = False, device="cpu", dtype=torch.bfloat16,
                  frozen_dtype=torch.bfloat16, seed: int = 0) -> FlowModel:
        """The flagship at its real widths with random weights of the real classes, to measure
        memory and speed without its weights (*family*, optional). ``blocks`` chooses the depths
        the family names (the flagship's where not given; FLUX: ``double`` and ``single``
        transformer blocks, ``t5_layers``, ``text_tokens``); ``tiny``: the same classes at test
        widths. The transformer in ``dtype``, the other parts in ``frozen_dtype``, on ``device``
        (``meta``: shapes only, for :meth:`built_parts`); deterministic in ``seed``."""
        have = [n for n in MODELS.names() if MODELS.get(n).real_dims.__func__ is not FlowModel.real_dims.__func__]
        raise UserError(f"model family '{cls.family}' has no real-dimension builder: use {' or '.join(have)}")

    def built_parts(self, height: int, width: int) -> PlanParts:
        """Sizes for ``srpo plan`` of this model as built (:meth:`real_dims` on the meta device)."""
        raise UserError(f"model family '{self.family}' does not provide sizes of a built model for srpo plan")

    def save_pipeline(self, path) -> FlowModel:
        """Write the model as a full pipeline folder of its family (safetensors); returns self."""
        self.pipeline().save_pretrained(str(path), safe_serialization=True)
        return self

    def hold(self, transformer, **parts) -> None:
        """Keep a pipeline's parts as attributes under their component names: the transformer (it
        trains), the VAE and the text encoders frozen, tokenizers, the scheduler and absent parts
        (None) as they are."""
        self.transformer = transformer
        for name, part in parts.items():
            setattr(self, name, frozen(part) if isinstance(part, nn.Module) else part)

    def _check_compatible(self) -> None:
        """One-line errors when the transformer does not fit the other parts (families override)."""

    # ---- family hooks -------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text conditioning for a batch of prompts (no grad); under true CFG it also holds the
        negative prompt's conditioning under ``negative_*`` keys."""
        raise NotImplementedError

    def predict(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float | None) -> Tensor:
        """One transformer call: velocity ``eps - x0`` at levels ``sigma`` ([B]) for the
        conditioning ``cond`` (no ``negative_`` keys); ``guidance`` is the embedded guidance
        (None unless ``guidance_mode == "embedded"``). Precision is the caller's."""
        raise NotImplementedError

    def schedule(self, steps: int, height: int, width: int) -> Tensor:
        """Sigma grid ``[steps + 1]`` (float64) from 1 (noise) to 0 (clean) of the family's
        ``steps``-step sampler at ``height x width`` pixels."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels in [0, 1], ``[B, 3, H, W]``, differentiable with respect to ``latents``.
        Default: an ``AutoencoderKL``'s, from its normalised space ``(z - shift_factor) *
        scaling_factor``, run in the VAE's device and dtype."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        x = self.vae.decode(z.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
        return ((x + 1) / 2).clamp(0, 1).to(latents.dtype)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> latents (offline mode; no grad). Default: an ``AutoencoderKL``'s
        posterior mode in its normalised space (the inverse of :meth:`decode`)."""
        cfg = self.vae.config
        z = self.vae.encode((pixels * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(pixels.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def set_frames(self, frames: int) -> None:
        """Frames per sample of a video family (``rollout.frames``; its :meth:`decode` then gives
        ``[B, F, 3, H, W]``); image families refuse it with one line."""
        raise UserError(f"rollout.frames is {frames} but model '{self.family}' makes images: remove rollout.frames "
                        f"(it sets the frame count of video families)")

    def pipeline(self):
        """The family's diffusers pipeline sharing this model's modules (no copies: every
        attribute named as one of the pipeline's components) with :meth:`pipeline_scheduler`."""
        import diffusers

        pipe_cls = getattr(diffusers, self.pipeline_class)
        names = inspect.signature(pipe_cls.__init__).parameters
        parts = {k: v for k, v in vars(self).items() if k in names and k != "scheduler"}
        pipe = pipe_cls(scheduler=self.pipeline_scheduler(), **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_scheduler(self):
        """The scheduler :meth:`pipeline` hands the pipeline: a fresh one from the model's config
        (:meth:`scheduler_config`)."""
        return type(self.scheduler).from_config(self.scheduler_config())

    def scheduler_config(self) -> dict:
        """The model's scheduler config, with ``shift`` (where the model overrides it) as a fixed shift."""
        config = dict(self.scheduler.config)
        if getattr(self, "shift", None) is not None:
            config.update(shift=self.shift, use_dynamic_shifting=False)
        return config

    def scheduler_timestep(self, sigma: Tensor) -> Tensor:
        """The scheduler's timestep ``1000 sigma`` (float32, on the model's device) as a pipeline
        feeds it, floored to an integer first when ``quantize_timesteps``."""
        if getattr(self, "quantize_timesteps", False):
            return torch.floor(sigma.to(device=self.device, dtype=torch.float64) * 1000 + 1e-6).float()
        return sigma.to(device=self.device, dtype=torch.float32) * 1000

    def use_schedule(self, kind: str, shift: float | None = None) -> FlowModel:
        """Render as ``kind`` says (``srpo sample`` / ``srpo eval --schedule``): ``training`` keeps the
        schedule and timestep input the model was loaded with (the trainer's); ``pipeline`` takes the
        family's diffusers pipeline's on the folder's own scheduler: no shift override (the scheduler
        config's shift, dynamic where it asks for it) and the unquantised timestep. ``shift``, when
        given, then fixes the time shift in either."""
        if kind not in SCHEDULES:
            raise UserError(f"unknown schedule '{kind}': use {' or '.join(SCHEDULES)}")
        if kind == "pipeline":
            if hasattr(self, "shift"):
                self.shift = None
            if hasattr(self, "quantize_timesteps"):
                self.quantize_timesteps = False
        if shift is not None:
            self.shift = float(shift)
        return self

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] from the diffusers pipeline's own ``__call__`` with
        this conditioning and noise: the reference the rollout is tested and benchmarked against."""
        raise NotImplementedError

    def combine_cfg(self, v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
        """The guided velocity from the two passes; families whose pipeline rescales override it."""
        return v_uncond + guidance * (v_cond - v_uncond)

    def single_file_state(self, state: dict) -> dict:
        """The transformer state in the family's original single-file layout."""
        raise UserError(f"model family '{self.family}' has no single-file export: use --format diffusers")

    # ---- shared ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.transformer.parameters())
        return next(self.vae.parameters()).device if p.is_meta else p.device  # a skeleton: where the rest is

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules other than the transformer (VAE, text encoders)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, nn.Module) and k != "transformer"}

    def text_encoders(self) -> list[nn.Module]:
        return [m for k, m in self.frozen_modules().items() if k.startswith("text_encoder")]

    def to(self, device) -> FlowModel:
        for m in (self.transformer, *self.frozen_modules().values()):
            if not is_skeleton(m):  # a skeleton is materialised where it is sharded
                m.to(device)
        return self

    def set_precision(self, autocast: str = "none", cfg_gradient: str = "both") -> None:
        """Autocast of every transformer call (``none`` | ``bf16`` | ``fp16``; master weights stay
        float32) and, under true CFG, which passes of a gradient forward carry gradient."""
        self.autocast_dtype = AUTOCAST[autocast]
        self.cfg_gradient = cfg_gradient

    def precision(self):
        return autocast(self.device.type, self.autocast_dtype)

    def uses_cfg(self, guidance: float) -> bool:
        return self.guidance_mode == "cfg" and guidance > 1.0

    def guided_cond(self, cond: Cond, batch: int, guidance: float) -> tuple[Cond, Cond]:
        """(conditional, unconditional) parts of ``cond`` broadcast to ``batch``; a one-line error
        where true CFG at ``guidance`` needs the unconditional part and ``cond`` has none."""
        pos, neg = (broadcast_cond(c, batch) for c in split_cond(cond))
        if self.uses_cfg(guidance) and not neg:
            raise UserError(f"CFG scale {guidance} needs the negative prompt's conditioning: "
                            f"encode prompts with {type(self).__name__}.encode_prompts")
        return pos, neg

    def negative_cond(self, batch: int = 1):
        """The negative prompt's encoding for ``batch`` rows (the family's ``_encode`` of
        ``[negative_prompt] * batch``) on the model's device, cached per prompt, text length and
        batch (the last four). Encoded as a batch of copies, like the pipelines, rather than once
        and expanded: the text encoders' matmuls round differently at other batch sizes (~4e-7 in
        SD3's pooled CLIP projection), and ``encode_prompt`` parity is meant to be exact."""
        cache = self.__dict__.setdefault("_negative", {})
        key = (self.negative_prompt, self.max_sequence_length, batch)
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = self._encode([self.negative_prompt] * batch)
        out = cache[key]
        return tuple(t.to(self.device) for t in out) if isinstance(out, tuple) else out.to(self.device)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Cond, guidance: float) -> Tensor:
        """Guided velocity (float32) at levels ``sigma`` ([B] or scalar). ``guidance`` is the
        embedded guidance, the CFG scale (``v_u + g (v_c - v_u)``; one pass when ``g <= 1``, as
        diffusers' pipelines do) or ignored, by the family's ``guidance_mode``. A batch-1 ``cond``
        is broadcast over the latents' batch."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
        pos, neg = self.guided_cond(cond, b, guidance)
        with self.precision():
            if self.guidance_mode == "embedded":
                return self.predict(latents, sigma, pos, float(guidance)).float()
            if not self.uses_cfg(guidance):
                return self.predict(latents, sigma, pos, None).float()
            grad_cond_only = torch.is_grad_enabled() and self.cfg_gradient == "cond"
            if grad_cond_only or not self.cfg_batched:  # two calls; the unconditional one maybe without grad
                v = self.predict(latents, sigma, pos, None).float()
                with torch.set_grad_enabled(torch.is_grad_enabled() and not grad_cond_only):
                    v_u = self.predict(latents, sigma, neg, None).float()
            else:  # one batched call, [negative, positive], as diffusers' pipelines make it
                v_u, v = self.predict(torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                                      self._cfg_batch(pos, neg), None).float().chunk(2)
            return self.combine_cfg(v, v_u, guidance)

    def _cfg_batch(self, pos: Cond, neg: Cond) -> Cond:
        """``[negative, positive]`` conditioning, concatenated once per conditioning (a rollout
        reuses it at every step, as the pipelines concatenate once before their loop)."""
        sources = [t for k in pos for t in (pos[k], neg[k])]
        cached = getattr(self, "_cfg_cached", None)  # (the source tensors, held so no id is reused; the batch)
        if cached is None or len(cached[0]) != len(sources) or any(a is not b for a, b in zip(cached[0], sources)):
            cached = (sources, {k: torch.cat([neg[k], pos[k]]) for k in pos})
            self._cfg_cached = cached
        return cached[1]

    def gradient_forwards(self, guidance: float) -> int:
        """Transformer passes per gradient forward that keep activations (for the memory plan)."""
        return 2 if self.uses_cfg(guidance) and self.cfg_gradient == "both" else 1

    def pixel_size(self, latents: Tensor) -> tuple[int, int]:
        return latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor

    def schedule_for(self, latents: Tensor, steps: int) -> Tensor:
        return self.schedule(steps, *self.pixel_size(latents))

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing on every transformer block and in the VAE decoder."""
        for m in (self.transformer, self.vae):
            m.enable_gradient_checkpointing() if enabled else m.disable_gradient_checkpointing()

    def save_transformer(self, path) -> None:
        """Write the transformer so ``<transformer_class>.from_pretrained(path)`` loads it."""
        self.transformer.save_pretrained(str(path), safe_serialization=True)

    def transformer_folders(self, state: dict) -> dict[str, tuple[dict, nn.Module]]:
        """What ``final/`` holds of a full transformer ``state``: ``{sub-folder ("": final/ itself):
        (its state, the module whose config.json it gets)}``; a family of several transformers splits."""
        return {"": (state, self.transformer)}

    def merge_lora(self, folder) -> None:
        """Merge the adapters :meth:`save_lora` wrote in ``folder`` into the transformer."""
        from .. import lora

        state, scale = lora.read_file(folder)
        self.transformer.load_state_dict(lora.merge_into(self.transformer.state_dict(), state, scale))

    def save_lora(self, path, layers: dict[str, Tensor], metadata: dict) -> None:
        """Adapters in the format the family pipeline's ``load_lora_weights`` reads."""
        pipe = getattr(__import__("diffusers", fromlist=[self.pipeline_class]), self.pipeline_class)
        pipe.save_lora_weights(str(path), transformer_lora_layers=layers,
                               transformer_lora_adapter_metadata=metadata)


def scheduler_sigmas(scheduler, steps: int, image_seq_len: int, shift: float | None = None) -> Tensor:
    """The sigmas ``[steps + 1]`` (float64, ending in 0) a diffusers flow-match scheduler sets for
    ``steps`` steps, as the family's pipeline calls it: dynamic shifting from the image sequence
    length where the scheduler config asks for it (``mu`` by diffusers' ``calculate_shift``),
    otherwise its fixed shift, or ``shift`` when given (which overrides both)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler.config)
    mu = None
    if shift is not None:
        config.update(shift=float(shift), use_dynamic_shifting=False)
    elif config.get("use_dynamic_shifting"):
        from ..method import dynamic_shift_mu

        mu = dynamic_shift_mu(image_seq_len, config.get("base_image_seq_len", 256),
                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                              config.get("max_shift", 1.15))
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps, device="cpu", mu=mu)
    return sched.sigmas.to(torch.float64)
