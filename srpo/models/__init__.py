"""Model adapters: a registry of FlowModel families (a registered name or a dotted path to a
:class:`~srpo.models.base.FlowModel` subclass), and the two ways the rest of srpo builds one."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import MODELS, folder_family


def family(name: str):
    """The FlowModel class registered as (or importable at) ``name``."""
    cls = MODELS.get(name)
    if not hasattr(cls, "load"):
        raise UserError(f"model '{name}' is not a FlowModel family: give a subclass of "
                        f"srpo.models.base.FlowModel with a load() classmethod")
    return cls


def load_model(m, device, transformer_path: str | None = None, skeleton: bool = False, stream_text: bool = False):
    """The model a ``model:`` config section names; ``transformer_path`` overrides its own;
    ``skeleton``: its transformer's parameters on the meta device (the sharded start);
    ``stream_text``: its text encoders streamed from the folder (:mod:`srpo.streaming`)."""
    from .base import resolve_dtype

    options = dict(m.options)
    if m.quantize_timesteps is not None:
        options["quantize_timesteps"] = m.quantize_timesteps
    if skeleton:
        options["skeleton"] = True
    if stream_text:
        options["stream_text_encoders"] = True
    return family(m.name).load(path=m.path, transformer_path=transformer_path or m.transformer_path,
                               device=device, dtype=resolve_dtype(m.dtype), shift=m.shift, **options)


def family_of_folder(path) -> str:
    """The registered family whose diffusers pipeline a local folder holds (model_index.json)."""
    from .folders import read_class_name

    name = read_class_name(Path(path) / "model_index.json", "diffusers pipeline folder")
    key = folder_family(name)
    if key is None:
        raise UserError(f"{path} holds a {name or 'unknown'} pipeline, which no model family reads: "
                        f"use one of {', '.join(n for n in MODELS.names() if not MODELS.get(n).is_twin())}")
    return key


# the built-in families, one file each, and their tiny random-weight twins (a file not present
# in this version is skipped)
BUILTIN = ("flux", "tiny", "sd3", "sd3_tiny", "qwen_image", "qwen_image_tiny", "flux2", "flux2_klein", "flux2_tiny",
           "z_image", "z_image_tiny", "wan", "wan_tiny")


def _register_builtin() -> None:
    import importlib

    for name in BUILTIN:
        if (Path(__file__).parent / f"{name}.py").is_file():
            importlib.import_module(f"{__name__}.{name}")


_register_builtin()
