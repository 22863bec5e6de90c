"""Final weights and exports: a diffusers transformer folder, a whole diffusers pipeline folder,
or one single-file transformer safetensors in the original Black Forest Labs layout (the one
ComfyUI-style loaders and diffusers' ``from_single_file`` read).

Everything works on full (unsharded) state dicts, gathered by :mod:`srpo.parallel` where needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import lora, parallel
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


def save_final(model, run_dir: str | Path, cfg, ctx) -> None:
    """End of training (collective): ``final/`` holds the transformer (LoRA merged) and, for
    LoRA runs, ``lora/pytorch_lora_weights.safetensors`` the adapters alone."""
    run_dir = Path(run_dir)
    if ctx.strategy != "fsdp" and not cfg.lora.enabled:  # plain weights: the adapter's own format
        if ctx.is_main:
            model.save_transformer(str(run_dir / "final"))
        return parallel.barrier(ctx)
    state = parallel.full_state_dict(model.transformer, ctx)
    if not ctx.is_main:
        return parallel.barrier(ctx)
    if cfg.lora.enabled:
        lora.save(run_dir / "lora", state, cfg.lora)
        state = lora.merge(state, lora.scale_of(cfg.lora)) if cfg.lora.save_merged else None
    if state is not None:
        write_transformer(run_dir / "final", state, config_json(model.transformer))
    parallel.barrier(ctx)


# ------------------------------------------------------------------ BFL single file

def _double(i: int):
    d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [
        (d + "img_mod.lin", [b + "norm1.linear"]),
        (d + "txt_mod.lin", [b + "norm1_context.linear"]),
        (d + "img_attn.qkv", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"]),
        (d + "txt_attn.qkv", [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"]),
        (d + "img_attn.proj", [b + "attn.to_out.0"]),
        (d + "txt_attn.proj", [b + "attn.to_add_out"]),
        (d + "img_mlp.0", [b + "ff.net.0.proj"]),
        (d + "img_mlp.2", [b + "ff.net.2"]),
        (d + "txt_mlp.0", [b + "ff_context.net.0.proj"]),
        (d + "txt_mlp.2", [b + "ff_context.net.2"]),
    ], [
        (d + "img_attn.norm.query_norm.scale", b + "attn.norm_q.weight"),
        (d + "img_attn.norm.key_norm.scale", b + "attn.norm_k.weight"),
        (d + "txt_attn.norm.query_norm.scale", b + "attn.norm_added_q.weight"),
        (d + "txt_attn.norm.key_norm.scale", b + "attn.norm_added_k.weight"),
    ]


def _single(i: int):
    s, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [
        (s + "modulation.lin", [b + "norm.linear"]),
        (s + "linear1", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]),
        (s + "linear2", [b + "proj_out"]),
    ], [
        (s + "norm.query_norm.scale", b + "attn.norm_q.weight"),
        (s + "norm.key_norm.scale", b + "attn.norm_k.weight"),
    ]


_TOP = [
    ("img_in", ["x_embedder"]),
    ("txt_in", ["context_embedder"]),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
    ("final_layer.linear", ["proj_out"]),
]


def _count(state: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix)})


def bfl_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in the original FLUX.1 layout: fused
    q/k/v (and q/k/v/mlp in single blocks) projections, ``final_layer`` modulation as
    (shift, scale) where diffusers stores (scale, shift)."""
    src = dict(state)
    linears, norms = list(_TOP), []
    for i in range(_count(src, "transformer_blocks.")):
        lin, nrm = _double(i)
        linears += lin
        norms += nrm
    for i in range(_count(src, "single_transformer_blocks.")):
        lin, nrm = _single(i)
        linears += lin
        norms += nrm
    out: dict[str, torch.Tensor] = {}
    for dst, parts in linears:
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in parts]
            if all(n not in src for n in names) and dst.startswith("guidance_in"):
                continue  # FLUX.1-schnell has no guidance embedding
            missing = [n for n in names if n not in src]
            if missing:
                raise UserError(f"not a FLUX transformer state: {missing[0]} is missing")
            out[f"{dst}.{kind}"] = torch.cat([src.pop(n) for n in names]) if len(names) > 1 else src.pop(names[0])
    for dst, name in norms:
        out[dst] = src.pop(name)
    for kind in ("weight", "bias"):
        scale, shift = src.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    if src:
        raise UserError(f"not a FLUX.1 transformer state: {len(src)} tensors have no single-file name "
                        f"(e.g. {next(iter(src))})")
    return out


def save_single_file(path: str | Path, state: dict, dtype: torch.dtype | None = None) -> Path:
    """One ``.safetensors`` file in the BFL layout (e.g. ComfyUI ``models/diffusion_models``)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"single-file output {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in bfl_state(state).items()}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ srpo export

def run_weights(run_dir: str | Path):
    """(config, model with the run's trained transformer) of a run folder: ``final/`` when
    present, else the base model with ``lora/`` merged in."""
    from .config import load_config
    from .models import MODELS
    from .trainer import DTYPES

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml): give a folder written by srpo train")
    cfg = load_config(run_dir / "config.yaml")
    final, adapters = run_dir / "final", run_dir / "lora"
    if not final.is_dir() and not adapters.is_dir():
        raise UserError(f"{run_dir} has neither final/ nor lora/: the run did not finish; "
                        f"resume it with srpo train --resume first")
    m = cfg.model
    model = MODELS.get(m.name)(path=m.path, transformer_path=str(final) if final.is_dir() else None,
                               device="cpu", dtype=DTYPES[m.dtype], **m.options)
    if not final.is_dir():
        state, scale = lora.read_file(adapters)
        merged = lora.merge_into(model.transformer.state_dict(), state, scale)
        model.transformer.load_state_dict(merged)
    return cfg, model


def export_run(run_dir: str | Path, output: str | Path, fmt: str = "diffusers", dtype: torch.dtype | None = None) -> Path:
    """``diffusers``: a whole FluxPipeline folder (base parts + trained transformer);
    ``single-file``: the trained transformer as one BFL-layout safetensors file."""
    _, model = run_weights(run_dir)
    if dtype is not None:
        model.transformer.to(dtype)
    if fmt == "single-file":
        return save_single_file(output, model.transformer.state_dict(), dtype)
    if fmt != "diffusers":
        raise UserError(f"unknown export format '{fmt}': use diffusers or single-file")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"export folder {output} is not empty: choose a new --output")
    model.pipeline().save_pretrained(str(output), safe_serialization=True)
    return output
