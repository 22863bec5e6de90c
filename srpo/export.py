"""Final weights and exports: a diffusers transformer folder, a whole diffusers pipeline folder of
the model's family, or one single-file transformer safetensors in the family's original layout
(FLUX: the Black Forest Labs keys ComfyUI-style loaders and diffusers' ``from_single_file`` read).

Everything works on full (unsharded) state dicts, gathered by :mod:`srpo.parallel` where needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import lora, parallel, quantize
from .errors import UserError

WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"


# ------------------------------------------------------------------ transformer folders

def config_json(module: torch.nn.Module) -> str:
    """The model's diffusers config.json, naming its own class (not an FSDP or peft wrapper)."""
    module = parallel.unwrap(module)
    data = json.loads(module.to_json_string())
    data["_class_name"] = parallel.model_class(module).__name__
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_transformer(path: str | Path, state: dict, config: str, max_shard_size: str = "10GB") -> Path:
    """``config.json`` + safetensors shards that ``<Model>.from_pretrained(path)`` loads.
    Written to a temporary folder and renamed into place."""
    from huggingface_hub import save_torch_state_dict

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(config)
    save_torch_state_dict(state, tmp, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size,
                          metadata={"format": "pt"})
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def save_final(model, run_dir: str | Path, cfg, ctx, name: str = "final") -> None:
    """Collective: ``name/`` holds the transformer (LoRA merged) and, for LoRA runs,
    ``lora/`` (``best-lora/`` for ``name="best"``) the adapters alone, in the family's format."""
    run_dir = Path(run_dir)
    adapters = "lora" if name == "final" else f"{name}-lora"
    if ctx.strategy != "fsdp" and not cfg.lora.enabled:  # plain weights: the adapter's own format
        if ctx.is_main:
            tmp = run_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_transformer(str(tmp))
            shutil.rmtree(run_dir / name, ignore_errors=True)
            tmp.rename(run_dir / name)
        return parallel.barrier(ctx)
    state = parallel.full_state_dict(model.transformer, ctx)
    if not ctx.is_main:
        return parallel.barrier(ctx)
    if cfg.lora.enabled:
        state = {k: quantize.plain(v) for k, v in state.items()}  # a quantized base: dequantized
        lora.save(run_dir / adapters, state, cfg.lora, model)
        state = lora.merge(state, lora.scale_of(cfg.lora)) if cfg.lora.save_merged else None
    if state is not None:
        for sub, (part, module) in model.transformer_folders(state).items():  # final/, or one folder per expert
            write_transformer(run_dir / name / sub if sub else run_dir / name, part, config_json(module))
    parallel.barrier(ctx)


# ------------------------------------------------------------------ single file

def save_single_file(path: str | Path, state: dict, dtype: torch.dtype | None = None) -> Path:
    """A transformer state already in the family's original layout (``model.single_file_state``;
    FLUX: the BFL keys ComfyUI ``models/diffusion_models`` and ``from_single_file`` read) as one
    ``.safetensors`` file, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"single-file output {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ srpo export

def run_weights(run_dir: str | Path, which: str = "final"):
    """(config, model with the run's trained transformer) of a run folder: ``final/`` (or
    ``best/``) when present, else the base model with ``lora/`` (``best-lora/``) merged in."""
    from .config import load_config
    from .models import load_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml): give a folder written by srpo train")
    cfg = load_config(run_dir / "config.yaml")
    final, adapters = run_dir / which, run_dir / ("lora" if which == "final" else f"{which}-lora")
    if not final.is_dir() and not adapters.is_dir():
        if which == "best":
            raise UserError(f"{run_dir} has no best/: the run kept none (guard.keep_best null, or no guard "
                            f"step met guard.best_when)")
        raise UserError(f"{run_dir} has neither final/ nor lora/: the run did not finish; "
                        f"resume it with srpo train --resume first")
    model = load_model(cfg.model, "cpu", transformer_path=str(final) if final.is_dir() else None)
    if not final.is_dir():
        model.merge_lora(adapters)
    if cfg.rollout.frames is not None:  # videos of the run's length
        model.set_frames(cfg.rollout.frames)
    return cfg, model


def export_run(run_dir: str | Path, output: str | Path, fmt: str = "diffusers", dtype: torch.dtype | None = None) -> Path:
    """``diffusers``: a whole pipeline folder of the model family (base parts + trained
    transformer); ``single-file``: the trained transformer as one file in the family's original
    layout (FLUX: BFL keys)."""
    _, model = run_weights(run_dir)
    if fmt not in model.export_formats:
        raise UserError(f"export format '{fmt}' is not available for model family '{model.family}': "
                        f"use one of {', '.join(model.export_formats)}")
    if dtype is not None:
        model.transformer.to(dtype)
    if fmt == "single-file":
        return save_single_file(output, model.single_file_state(model.transformer.state_dict()), dtype)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"export folder {output} is not empty: choose a new --output")
    model.pipeline().save_pretrained(str(output), safe_serialization=True)
    return output
