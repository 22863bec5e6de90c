"""FLUX.1's original single-file layout (Black Forest Labs keys), the one ComfyUI-style loaders
and diffusers' ``from_single_file`` read: the diffusers state dict with fused q/k/v (and
q/k/v/mlp in single blocks) projections and ``final_layer`` modulation as (shift, scale)."""

from __future__ import annotations

import torch

from ..errors import UserError


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
