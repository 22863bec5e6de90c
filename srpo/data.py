"""Prompt lists from files or inline lists, with one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def load_prompts(spec: str | list[str] | None, what: str = "prompts") -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, list):
        prompts = [str(p).strip() for p in spec if str(p).strip()]
        if not prompts:
            raise UserError(f"{what}: the inline list is empty; give at least one prompt")
        return prompts
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} file {path} is not readable UTF-8 text: {e.__class__.__name__}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{what} file {path} has no prompts: write one prompt per line")
    return prompts
