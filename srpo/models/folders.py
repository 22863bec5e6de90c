"""Reading local diffusers folders without loading weights: config files, class names and the
one-line errors every family gives for a missing, foreign or broken folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def read_class_name(config_file: Path, what: str) -> str:
    """``_class_name`` of a diffusers JSON config; one-line errors for a missing or bad file."""
    if not config_file.is_file():
        raise UserError(f"{config_file.parent} has no {config_file.name}: give a {what}")
    try:
        return str(json.loads(config_file.read_text()).get("_class_name", "") or "")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{config_file} is not valid JSON: re-download or re-save the folder") from None


def read_model_index(root: Path) -> dict:
    """``model_index.json`` of a pipeline folder ({} when missing or unreadable)."""
    try:
        index = json.loads((Path(root) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return index if isinstance(index, dict) else {}


def read_config(folder: Path, required: str | None = None) -> dict | None:
    """A component's ``config.json``: None when missing (or, with ``required``, a one-line error
    asking for it), a one-line error when it is not JSON."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        if required:
            raise UserError(f"{folder} has no config.json: give a complete diffusers {required} folder")
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{file} is not valid JSON") from None


def check_options(family: str, unknown, valid) -> None:
    """One-line error for options a family does not know."""
    if unknown:
        raise UserError(f"unknown option(s) for model '{family}': {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(valid)}")


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
