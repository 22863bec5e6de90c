"""The FlowModel contract: everything the trainer, the algorithms, the sampler, export and the
memory plan need from a text-to-image flow-matching family, and nothing about how it is built.

A family is one file: a subclass of :class:`FlowModel` registered under a name (``flux``,
``sd3``, ...) or reached by a dotted path (``my_pkg.models.MyFamily``). It implements the hooks
marked *family* below; the base class owns what every family shares and must do the same way:

- **precision** in one place: :meth:`velocity` runs the transformer under the configured
  autocast (:meth:`set_precision`) and returns float32, whatever the caller;
- **guidance**: ``embedded`` (a guidance embedding, FLUX.1-dev), ``cfg`` (true classifier-free
  guidance against a negative prompt, SD3 / SD3.5) or ``none`` (distilled models), applied in
  :meth:`velocity` from the one ``guidance`` number the caller passes;
- **schedule**: :meth:`schedule` gives the family's sigma grid (1 -> 0) for N steps at an image
  size; the algorithms read every noise level from it, so ``method.index_range`` means the same
  for every family.

Latents in the contract are ``[B, C, h, w]`` in the VAE's normalised space; packing into patch
tokens, position ids and pooled projections are details of a family's file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError

Cond = dict[str, Tensor]  # prompt conditioning, batched on dim 0; opaque outside the family
NEGATIVE = "negative_"  # cond keys of the unconditional (negative-prompt) branch under true CFG
GUIDANCE_MODES = ("embedded", "cfg", "none")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


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


class FlowModel:
    """Base class of the model adapters; only ``transformer`` trains."""

    # ---- family facts (class attributes) ----------------------------------------------------
    family = "base"  # registry name, for messages
    pipeline_class = ""  # the diffusers pipeline this family corresponds to
    pipeline_aliases: tuple[str, ...] = ()  # other pipeline classes whose folders this family loads
    transformer_class = ""  # the diffusers transformer class final/ loads with
    lora_targets: tuple[str, ...] = ()  # default LoRA target modules (Linear names or suffixes)
    export_formats: tuple[str, ...] = ("diffusers",)
    guidance_mode = "none"  # embedded | cfg | none (an instance may refine it from its config)
    default_guidance = 1.0  # the family's usual sampling guidance (srpo sample's default)
    cfg_batched = True  # CFG: one call on [negative, positive] (False: two calls, e.g. ragged text lengths)

    transformer: nn.Module
    vae: nn.Module
    vae_scale_factor: int = 8
    autocast_dtype: torch.dtype | None = None  # set by set_precision
    cfg_gradient = "both"  # true CFG in a gradient forward: both passes with gradient, or "cond" only

    # ---- construction (family) ---------------------------------------------------------------
    @classmethod
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, shift=None,
             **options) -> "FlowModel":
        """The model from a local diffusers folder (or built in code); ``transformer_path``
        replaces the transformer with a folder written by :meth:`save_transformer`."""
        raise NotImplementedError

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        """Sizes for ``srpo plan`` (meta-device modules; no weights read)."""
        raise UserError(f"model family '{cls.family}' does not provide sizes for srpo plan")

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
    def load_tiny(cls, build, path, transformer_path, device, dtype, folder_family: str) -> "FlowModel":
        """A ``tiny_*`` family's ``load``: ``build()`` makes the random model in code (``path``
        must be empty); ``transformer_path`` replaces its transformer; then device and dtype."""
        import diffusers

        if path:
            raise UserError(f"model '{cls.family}' is built in code and takes no path (got {path}); "
                            f"use model '{folder_family}' to load a folder")
        try:
            model = build()
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
    def tiny_plan_modules(cls, path, options: dict, make, default_len: int,
                          ignore: tuple[str, ...] = ()) -> tuple[dict, int, int]:
        """A ``tiny_*`` family's modules on the meta device for ``plan_parts``: ``make(max_len,
        options)`` builds them from the options left after the sequence length and the options
        that do not change sizes (``ignore``, plus seed, shift, negative prompt, timestep
        quantisation). Returns (modules, max_len, text-encoder parameters)."""
        options = dict(options or {})
        if path:
            raise UserError(f"model '{cls.family}' is built in code and takes no path (got {path})")
        max_len = int(options.pop("max_sequence_length", default_len))
        for k in ("seed", "shift", "quantize_timesteps", "negative_prompt", *ignore):
            options.pop(k, None)
        try:
            with torch.device("meta"):
                modules = make(max_len, options)
        except TypeError as e:
            raise UserError(f"bad option for model '{cls.family}': {e}") from None
        text = sum(p.numel() for k, m in modules.items() if k.startswith("text_encoder") and isinstance(m, nn.Module)
                   for p in m.parameters())
        return modules, max_len, text

    def save_pipeline(self, path) -> "FlowModel":
        """Write the model as a full pipeline folder of its family (safetensors); returns self."""
        self.pipeline().save_pretrained(str(path), safe_serialization=True)
        return self

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
        """Latents -> pixels in [0, 1], ``[B, 3, H, W]``, differentiable."""
        raise NotImplementedError

    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> latents (offline mode; no grad)."""
        raise NotImplementedError

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def pipeline(self):
        """The family's diffusers pipeline sharing this model's modules (no copies)."""
        raise NotImplementedError

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
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules other than the transformer (VAE, text encoders)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, nn.Module) and k != "transformer"}

    def text_encoders(self) -> list[nn.Module]:
        return [m for k, m in self.frozen_modules().items() if k.startswith("text_encoder")]

    def to(self, device) -> "FlowModel":
        for m in (self.transformer, *self.frozen_modules().values()):
            m.to(device)
        return self

    def set_precision(self, autocast: str = "none", cfg_gradient: str = "both") -> None:
        """Autocast of every transformer call (``none`` | ``bf16`` | ``fp16``; master weights stay
        float32) and, under true CFG, which passes of a gradient forward carry gradient."""
        self.autocast_dtype = AUTOCAST[autocast]
        self.cfg_gradient = cfg_gradient

    def precision(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def uses_cfg(self, guidance: float) -> bool:
        return self.guidance_mode == "cfg" and guidance > 1.0

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Cond, guidance: float) -> Tensor:
        """Guided velocity (float32) at levels ``sigma`` ([B] or scalar). ``guidance`` is the
        embedded guidance, the CFG scale (``v_u + g (v_c - v_u)``; one pass when ``g <= 1``, as
        diffusers' pipelines do) or ignored, by the family's ``guidance_mode``. A batch-1 ``cond``
        is broadcast over the latents' batch."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).reshape(-1).expand(b)
        pos, neg = split_cond(cond)
        pos = broadcast_cond(pos, b)
        with self.precision():
            if self.guidance_mode == "embedded":
                return self.predict(latents, sigma, pos, float(guidance)).float()
            if not self.uses_cfg(guidance):
                return self.predict(latents, sigma, pos, None).float()
            if not neg:
                raise UserError(f"CFG scale {guidance} needs the negative prompt's conditioning: "
                                f"encode prompts with {type(self).__name__}.encode_prompts")
            neg = broadcast_cond(neg, b)
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

    def save_lora(self, path, layers: dict[str, Tensor], metadata: dict) -> None:
        """Adapters in the format the family pipeline's ``load_lora_weights`` reads."""
        pipe = getattr(__import__("diffusers", fromlist=[self.pipeline_class]), self.pipeline_class)
        pipe.save_lora_weights(str(path), transformer_lora_layers=layers,
                               transformer_lora_adapter_metadata=metadata)


def broadcast_cond(cond: Cond, batch: int) -> Cond:
    """A batch-1 conditioning expanded (a view) to ``batch``; others unchanged."""
    return {k: (v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch > 1 else v) for k, v in cond.items()}


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


# ---- local folders ---------------------------------------------------------------------------

def read_class_name(config_file: Path, what: str) -> str:
    """``_class_name`` of a diffusers JSON config; one-line errors for a missing or bad file."""
    import json

    if not config_file.is_file():
        raise UserError(f"{config_file.parent} has no {config_file.name}: give a {what}")
    try:
        return str(json.loads(config_file.read_text()).get("_class_name", "") or "")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{config_file} is not valid JSON: re-download or re-save the folder") from None


def check_options(family: str, unknown, valid) -> None:
    """One-line error for options a family does not know."""
    if unknown:
        raise UserError(f"unknown option(s) for model '{family}': {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(valid)}")


def read_model_index(root: Path) -> dict:
    """``model_index.json`` of a pipeline folder ({} when missing or unreadable)."""
    import json

    try:
        index = json.loads((Path(root) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return index if isinstance(index, dict) else {}


def read_config(folder: Path, required: str | None = None) -> dict | None:
    """A component's ``config.json``: None when missing (or, with ``required``, a one-line error
    asking for it), a one-line error when it is not JSON."""
    import json

    file = Path(folder) / "config.json"
    if not file.is_file():
        if required:
            raise UserError(f"{folder} has no config.json: give a complete diffusers {required} folder")
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{file} is not valid JSON") from None


def check_pipeline_folder(path, family: str, pipeline_prefix: str, components: tuple[str, ...],
                          need_transformer: bool = True) -> Path:
    """A local diffusers pipeline folder of the family, with every component folder present."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist: give a local diffusers {pipeline_prefix} folder "
                        f"(model_index.json, transformer/, vae/, text_encoder/, ...)")
    if not (root / "model_index.json").is_file():
        raise UserError(f"{root} is not a diffusers pipeline folder (no model_index.json): "
                        f"give a local folder in the {pipeline_prefix}Pipeline layout")
    name = read_class_name(root / "model_index.json", "pipeline folder")
    if not name.startswith(pipeline_prefix):
        raise UserError(f"{root} holds a {name or 'unknown'} pipeline, not {pipeline_prefix}: the "
                        f"'{family}' model needs a {pipeline_prefix}Pipeline folder")
    wanted = [c for c in components if need_transformer or c != "transformer"]
    missing = [c + "/" for c in wanted if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{root} lacks {', '.join(missing)}: a {family} folder needs {', '.join(components)}")
    return root


def check_transformer_folder(path, class_name: str) -> None:
    """A transformer folder (``save_transformer`` / ``from_pretrained`` layout) of ``class_name``."""
    name = read_class_name(Path(path) / "config.json", f"folder written by save_transformer / "
                                                       f"{class_name}.save_pretrained")
    if name != class_name:
        raise UserError(f"{path} holds a {name or 'unknown model'}, not a {class_name}: give a transformer "
                        f"folder of this model family")


def load_error(where, e: Exception, what: str) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load weights from {where}: {first} ({what})")


class TinyTwin:
    """The ``load`` of a tiny random-weight twin, mixed in before its family's class: ``build(cls,
    seed, shift=..., **sizes)`` makes the model in code (no path); ``transformer_path`` replaces
    its transformer; a saved folder of it loads with the family named ``folder_family``."""

    build = None  # staticmethod(the family's tiny builder)
    folder_family = ""

    @classmethod
    def load(cls, path=None, seed: int = 0, transformer_path=None, device="cpu", dtype=torch.float32,
             shift=None, **sizes):
        return cls.load_tiny(lambda: cls.build(cls, seed, shift=shift, **sizes), path, transformer_path, device,
                             dtype, cls.folder_family)
