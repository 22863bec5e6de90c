"""The per-GPU memory estimate behind ``srpo plan``: sizes of a configured model and reward
(counted on the meta device, no weights read) and the bytes a run holds by component.

The estimate counts bytes, it does not measure them: weights and optimizer state exactly from
parameter counts, activations from per-block formulas (saved tensors per token and channel,
checked against autograd's saved tensors in tests/test_parallel.py), plus a fixed CUDA overhead
and 10 % for allocator fragmentation. ``benchmarks/gpu_update.py`` and ``benchmarks/real_dims.py``
print it next to the measured peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .parallel import grad_sync_mode
from .quantize import BYTES as QUANT_BYTES

GiB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------- sizes for the plan

@dataclass
class Sizes:
    """What the estimate needs to know about a model, reward and image size."""

    name: str
    transformer: int  # parameters
    blocks: int
    largest_block: int  # parameters of the largest block
    root: int  # parameters outside the blocks (embedders, final layer)
    hidden: int  # transformer width
    lora_params: int  # adapter parameters for the configured LoRA
    text_encoders: int
    vae: int
    vae_levels: list[tuple[int, int]] = field(default_factory=list)  # decoder (channels, upsample factor)
    vae_resnets: int = 3
    reward: int = 0
    reward_tower: int = 0  # of ``reward``, the image towers' parameters that FSDP shards (parallel.shard_reward)
    reward_layers: int = 32
    reward_width: int = 1280
    reward_tokens: int = 257
    image_tokens: int = 0
    text_tokens: int = 512
    gradient_passes: int = 1  # transformer passes per gradient forward (2 under true CFG, both with grad)
    vae_checkpointing: bool = True  # the family's decoder recomputes activations under checkpointing
    largest_weight: int = 0  # elements of the largest transformer weight (one-tensor optimizer temporaries)
    largest_lora: int = 0  # elements of the largest LoRA adapter matrix
    neighbour_block: int | None = None  # parameters of the largest block next to a largest one (the
    # block FSDP gathers beside it; 0: the only block; None: as large as it)
    experts: int = 1  # transformers held (Wan2.2-A14B: 2); ``transformer`` counts them all, one runs per forward
    untrained: int = 0  # of ``transformer``'s parameters, those of experts that do not train (frozen)
    frames: int = 1  # video: frames the decoder makes per sample
    reward_images: int = 1  # video: frames the reward scores per sample
    # a family that counts its own decode with gradient (``plan_decode``: Wan's chunked and
    # checkpointed decode, Qwen-Image's causal 3-D decoder): elements per sample held from the decode to its backward, and live
    # besides them at the backward's peak; None: the per-frame decoder formula (_vae_parts)
    decode: tuple[int, int] | None = None
    # streamed text encoders (PlanParts.text_stream): (parameters resident at once, activation
    # elements per prompt); None: each encoder counted whole, its activations not counted
    text_stream: tuple[int, int] | None = None


def _lora_params(transformer: nn.Module, rank: int, target_modules: list[str]) -> tuple[int, int]:
    """(adapter parameters, elements of the largest adapter matrix)."""
    total, largest = 0, 0
    for name, m in transformer.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            total += rank * (m.in_features + m.out_features)
            largest = max(largest, rank * max(m.in_features, m.out_features))
    return total, largest


def _neighbour(counts: list[int]) -> int:
    """Of the blocks (parameter ``counts``, in order), the largest next to one of the largest: the
    block FSDP has gathered beside it at the peak (0 with a single block)."""
    big = max(counts)
    return max((counts[j] for i, c in enumerate(counts) if c == big for j in (i - 1, i + 1)
                if 0 <= j < len(counts)), default=0)


def model_sizes(cfg, parts=None) -> Sizes:
    """Sizes of the configured model and reward, from the family's :meth:`plan_parts` (modules
    on the meta device: no weights are read or allocated), or from ``parts`` given (a
    :class:`~srpo.models.base.PlanParts` of modules built some other way, e.g. a benchmark's)."""
    from .models import family
    from .parallel import blocks

    m = cfg.model
    fam = family(m.name)
    if parts is None:
        path = m.path if m.path and Path(m.path).exists() else None  # no folder yet: the family's flagship
        video = {} if fam.frames is None else {"frames": cfg.rollout.frames or fam.frames}
        if cfg.rollout.frames is not None and not video:
            from .errors import UserError

            raise UserError(f"rollout.frames is {cfg.rollout.frames} but model '{m.name}' makes images: remove "
                            f"rollout.frames (it sets the frame count of video families)")
        parts = fam.plan_parts(path, dict(m.options), cfg.rollout.height, cfg.rollout.width, **video)
        if m.path and path is None:
            parts.name = f"{parts.name} ({m.path} not found: its flagship's dimensions)"
    tr, vae_cfg = parts.transformer, parts.vae_config
    chans = list(reversed(vae_cfg["block_out_channels"]))
    levels = [(c, 2**i) for i, c in enumerate(chans)]
    blocks_ = blocks(tr)
    counts = [sum(p.numel() for p in b.parameters()) for b in blocks_]
    tc = tr.config
    n_tr = sum(p.numel() for p in tr.parameters())  # one expert
    trained = parts.experts if parts.trained_experts is None else parts.trained_experts
    targets = list(cfg.lora.target_modules) if cfg.lora.target_modules else list(fam.lora_targets)
    lora_params, largest_lora = _lora_params(tr, cfg.lora.rank, targets)
    sizes = Sizes(
        name=parts.name, transformer=n_tr * parts.experts, blocks=len(blocks_), experts=parts.experts,
        untrained=n_tr * (parts.experts - trained), frames=parts.frames,
        reward_images=_scored_frames(cfg, parts.frames),
        largest_block=max(counts), neighbour_block=_neighbour(counts),
        root=n_tr - sum(p.numel() for b in blocks_ for p in b.parameters()),
        hidden=parts.hidden or tc.num_attention_heads * tc.attention_head_dim,
        lora_params=lora_params * trained, largest_lora=largest_lora,
        largest_weight=max(p.numel() for p in tr.parameters()),
        text_encoders=parts.text_encoders, vae=sum(p.numel() for p in parts.vae.parameters()), vae_levels=levels,
        vae_resnets=vae_cfg["layers_per_block"] + 1, text_tokens=parts.text_tokens, image_tokens=parts.image_tokens,
        gradient_passes=2 if (parts.guidance_mode or fam.guidance_mode) == "cfg" and cfg.train.guidance > 1
        and cfg.train.cfg_gradient == "both" else 1, vae_checkpointing=parts.vae_checkpointing,
        text_stream=parts.text_stream,
    )
    _reward_sizes(cfg, sizes)
    plan_decode = getattr(fam, "plan_decode", None)
    if plan_decode is not None:
        sizes.decode = plan_decode(parts.vae, dict(m.options), cfg.rollout.height, cfg.rollout.width, parts.frames,
                                   _scored_indices(cfg, parts.frames))
    return sizes


def _scored_indices(cfg, frames: int) -> list[int]:
    """Which frames of each ``frames``-frame video the reward scores (``reward.frames``)."""
    from .rewards.objective import frame_indices, reward_frames

    return frame_indices(reward_frames(cfg.reward), frames)


def _scored_frames(cfg, frames: int) -> int:
    """Frames of each ``frames``-frame video the reward scores (``reward.frames``); 1 for images."""
    return 1 if frames <= 1 else len(_scored_indices(cfg, frames))


def _reward_sizes(cfg, sizes: Sizes) -> None:
    """The configured reward's (or rewards') sizes, as each reward factory reports them
    (``factory.plan_sizes(options)``, :func:`srpo.rewards.base.plan_sizes`); a reward that
    reports none (a user's own) is planned as a ViT-H-14 CLIP. Several rewards: their parameters
    add up, the largest vision tower sets the activations."""
    from .rewards import REWARDS
    from .rewards.base import VIT_H_14

    specs = cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]
    plans = []
    for spec in specs:
        report = getattr(REWARDS.get(spec.name), "plan_sizes", None)
        # a user's own reward: a ViT-H-14's size, its tower whole (it declares no image_tower)
        plans.append(report(dict(spec.options)) if report is not None else dataclasses.replace(VIT_H_14, tower=0))
    largest = max(plans, key=lambda p: p.layers * p.width)
    sizes.reward = sum(p.params for p in plans)
    sizes.reward_tower = sum(p.tower for p in plans)
    sizes.reward_layers, sizes.reward_width, sizes.reward_tokens = largest.layers, largest.width, largest.tokens


# ---------------------------------------------------------------------- the estimate

BLOCK_UNITS = 26  # tensors of size tokens x width a transformer block keeps for backward
RESNET_UNITS = 6  # tensors of size pixels x channels a VAE resnet keeps for backward (3 at its input width, 3 at its output width)
VIT_UNITS = 26  # per reward ViT layer, in tokens x width
OVERHEAD = 1.5 * GiB  # CUDA context, cuBLAS / NCCL workspaces
# the caching allocator's blocks (CUDA); glibc hands large blocks back to the OS at free (CPU)
FRAGMENTATION = {"cuda": 1.10, "cpu": 1.0}


def _transformer_parts(s: Sizes, batch: int, act_bytes: int, checkpointing: bool) -> tuple[int, int]:
    """(held from the gradient forward to its backward, one block recomputed in backward): with
    checkpointing each block's input, then one block's tensors and gradients at a time; without,
    every block's tensors."""
    unit = (s.image_tokens + s.text_tokens) * s.hidden * act_bytes * batch
    if checkpointing:
        return unit * s.blocks, unit * (BLOCK_UNITS + 8)
    return unit * s.blocks * BLOCK_UNITS, 0


def transformer_activations(s: Sizes, batch: int, act_bytes: int, checkpointing: bool) -> int:
    """Saved activations of one gradient forward (held + one block recomputed)."""
    return int(sum(_transformer_parts(s, batch, act_bytes, checkpointing)))


def _vae_blocks(s: Sizes, height: int, width: int) -> tuple[list[tuple[int, int, int]], int]:
    """The decoder's checkpointed blocks (mid block, then each up block) as (input elements,
    elements kept for backward, largest tensor), and the elements the output layers keep. An up
    block's first resnet reads the previous level's width; its upsampler's conv reads the
    doubled map (at the next level's resolution)."""
    base = (height // s.vae_levels[-1][1]) * (width // s.vae_levels[-1][1])  # latent pixels
    c0 = s.vae_levels[0][0]
    blocks = [(c0 * base, c0 * base * (2 * RESNET_UNITS + 4), c0 * base)]  # two resnets and attention
    prev = c0
    for i, (ch, up) in enumerate(s.vae_levels):
        px = base * up * up
        upsampled = 4 * px * ch if i < len(s.vae_levels) - 1 else 0
        kept = px * (prev + ch) * RESNET_UNITS // 2 + (s.vae_resnets - 1) * px * ch * RESNET_UNITS + upsampled
        blocks.append((px * prev, kept, max(px * prev, upsampled)))
        prev = ch
    return blocks, base * s.vae_levels[-1][1] ** 2 * prev * 3  # norm_out, silu, conv_out


def _vae_parts(s: Sizes, batch: int, height: int, width: int, act_bytes: int, checkpointing: bool) -> tuple[int, int]:
    """(held from the decode to its backward, the largest block recomputed with its backward's
    two gradient maps): with checkpointing each block's input and the output layers; without,
    every tensor."""
    blocks, top = _vae_blocks(s, height, width)
    if checkpointing:
        held = sum(b[0] for b in blocks) + top
        block = max(b[1] + 2 * b[2] for b in blocks)
        return held * act_bytes * batch, block * act_bytes * batch
    return (sum(b[1] for b in blocks) + top) * act_bytes * batch, 0


def vae_activations(s: Sizes, batch: int, height: int, width: int, act_bytes: int, checkpointing: bool) -> int:
    """Decoder tensors kept for backward (decoding with gradient), at the decoder's peak."""
    return int(sum(_vae_parts(s, batch, height, width, act_bytes, checkpointing)))


def estimate(s: Sizes, *, gpus: int, strategy: str, lora: bool, batch: int, height: int, width: int,
             model_bytes: int, reward_bytes: int = 4, act_bytes: int = 2, checkpointing: bool = True,
             offload_text: bool = False, release_text: bool = False, device: str = "cuda",
             optimizer: str = "adamw", sync_once: bool = False, quantize: str = "none",
             fused_adamw: bool = False, shard_reward: bool = False, stream_text: bool = False,
             text_batch: int = 1, reshard: bool = True) -> dict[str, float]:
    """Expected peak bytes per device by component (and ``total``); ``device``: ``cuda`` (a
    CUDA context, foreach AdamW, the caching allocator) or ``cpu`` (process memory).

    Activations of a gradient step are not all live at once: the peak is the largest of the
    transformer's forward (its held inputs, one block, autocast's copies of the weights), the
    reward (transformer and VAE held, the ViT's tensors), the VAE decoder's backward (both held,
    one decoder block recomputed), the transformer's backward and the optimizer's step (its
    temporaries, when nothing else is). The text encoders, when
    released (or offloaded), count where they are resident: at the start, beside the VAE and the
    reward alone (the transformer is a skeleton until the prompts are encoded and the encoders
    freed; then each rank reads its shards, or one process the whole), or between updates. ``sync_once``: gradients are reduced once
    per update (``parallel.grad_sync``), so under FSDP they stay unsharded until then.
    ``quantize``: the frozen LoRA base's storage (``model.quantize``; its bytes per weight).
    ``fused_adamw``: AdamW's fused kernel (``train.adamw``), which allocates no step temporaries.
    ``shard_reward``: under FSDP the reward's image tower is sharded too (``parallel.shard_reward``):
    each rank holds its share and gathers two of its blocks at a time (one prefetched).
    ``reshard``: FSDP frees a block's gathered weights after its forward
    (``parallel.reshard_after_forward``), so they count only while the transformer runs; the
    reward tower's gathered blocks only while the reward runs.
    ``stream_text``: released encoders are streamed at the start (``memory.stream_text_encoders``):
    they hold their parts outside the layers and one layer, and ``text_batch`` prompts'
    activations (``memory.text_encode_batch``), not the whole encoders."""
    shard = gpus if strategy == "fsdp" else 1
    trainable = s.lora_params if lora else s.transformer - s.untrained
    adamw = optimizer == "adamw"
    out: dict[str, float] = {}
    if adamw:
        out["trainable weights + grads + AdamW (fp32)"] = 16 * trainable / shard
    else:  # plain SGD: no optimizer state
        out["trainable weights + grads (fp32), SGD"] = 8 * trainable / shard
    if fused_adamw:  # one kernel, in place
        temporaries = 0
    elif device == "cuda":  # foreach AdamW: a temporary per trainable element (the denominators)
        temporaries = 4 * trainable / shard if adamw else 0
    else:  # one tensor at a time on the CPU
        temporaries = 4 * (s.largest_lora if lora else s.largest_weight) if adamw else 0
    out["optimizer-step temporaries"] = temporaries
    if strategy == "fsdp" and sync_once:  # accumulated unsharded until the update's one reduce-scatter
        out["unsharded gradients until the update's reduction"] = 4 * trainable * (1 - 1 / shard)
    if lora and quantize != "none":  # read and quantized one layer at a time (srpo.shards.fill)
        out[f"frozen transformer base ({quantize})"] = QUANT_BYTES[quantize] * s.transformer / shard
    elif lora:
        out["frozen transformer base"] = model_bytes * s.transformer / shard
    elif s.untrained:
        out["frozen experts (not trained)"] = model_bytes * s.untrained / shard
    if strategy == "fsdp":  # under autocast FSDP gathers in the compute dtype (parallel.apply's MixedPrecisionPolicy)
        # FSDP2 all-gathers a block into one flat buffer and copies it out into the block's
        # unsharded weights; in forward it keeps that buffer until the next block's copy-out
        # (FSDPParamGroup.wait_for_unshard), so with one block prefetched four blocks' bytes are
        # live: two buffers, two unsharded. In backward the buffer is freed at once: three, and
        # the block's gradients.
        block_bytes = min(act_bytes, model_bytes if lora else 4)
        # The other block is the largest block's larger neighbour (gathered beside it; none alone).
        big, near = s.largest_block, s.largest_block if s.neighbour_block is None else s.neighbour_block
        gathered = max(2 * block_bytes * (big + near), (2 * block_bytes + (0 if lora else 4)) * big + block_bytes * near)
        out["FSDP gathered blocks (2) with their all-gather buffers + block grads"] = gathered
        out["FSDP unsharded root"] = s.root * (model_bytes if lora else 4)
    text = model_bytes * s.text_encoders
    out["text encoders"] = 0 if offload_text or release_text else text
    out["VAE"] = model_bytes * s.vae
    tower = s.reward_tower if strategy == "fsdp" and shard_reward and shard > 1 else 0
    if tower:
        out["reward model (image tower sharded)"] = reward_bytes * (s.reward - tower + tower / shard)
        out["reward: gathered tower blocks (2)"] = reward_bytes * 2 * tower / max(s.reward_layers, 1)
    else:
        out["reward model"] = reward_bytes * s.reward
    # gathered blocks live while their module runs (resharded after its forward and its backward);
    # kept gathered after the forward (``reshard``: false), the transformer's stay all along
    t_gathered = out.get("FSDP gathered blocks (2) with their all-gather buffers + block grads", 0) if reshard else 0
    r_gathered = out.get("reward: gathered tower blocks (2)", 0)
    static = sum(out.values()) - t_gathered - r_gathered - temporaries  # the step's temporaries: in its own phase

    t_held, t_block = _transformer_parts(s, batch * s.gradient_passes, act_bytes, checkpointing)
    if s.decode is not None:  # the family's own count of its decode (Wan: chunked and checkpointed)
        v_held, v_block = (n * model_bytes * batch for n in s.decode)
    else:  # a video as its frames' images side by side; its reward scores reward.frames of them
        v_held, v_block = _vae_parts(s, batch * s.frames, height, width, model_bytes,
                                     checkpointing and s.vae_checkpointing)
    reward_acts = VIT_UNITS * s.reward_layers * s.reward_tokens * s.reward_width * reward_bytes * batch * s.reward_images
    # autocast caches its low-precision copy of every float32 weight it casts until the forward
    # returns: the whole transformer in a full fine-tune. Under FSDP the weights arrive already in
    # the compute dtype (MixedPrecisionPolicy), so nothing is cached.
    # (of experts, the one a forward runs)
    fp32_weights = ((trainable + (s.transformer if model_bytes == 4 else 0)) if lora else s.transformer) // s.experts
    copies = act_bytes * fp32_weights if act_bytes < 4 and strategy != "fsdp" else 0
    phases = {"transformer forward": t_held + t_block + copies + t_gathered,
              "reward": t_held + v_held + reward_acts + r_gathered,
              "VAE decode backward": t_held + v_held + v_block, "transformer backward": t_held + t_block + t_gathered,
              "optimizer step": temporaries}  # after the backward: no activations, nothing gathered
    out["activations: transformer"] = t_held + t_block
    out["activations: VAE decode"] = v_held + v_block
    out["activations: reward"] = reward_acts
    out["autocast copies of fp32 weights"] = copies
    peak = max(phases, key=phases.get)
    out[f"not live at once (peak: {peak})"] = phases[peak] - (t_held + t_block + v_held + v_block + reward_acts + copies
                                                              + t_gathered + r_gathered + temporaries)
    if device == "cuda":
        out["CUDA context + workspaces"] = OVERHEAD
        static += OVERHEAD
    subtotal = sum(out.values())
    start = None
    streamed = release_text and stream_text and s.text_stream is not None
    if streamed:  # one layer and the parts outside the layers, text_batch prompts at a time (srpo.streaming)
        text = model_bytes * (s.text_stream[0] + text_batch * s.text_stream[1])
    elif release_text and s.text_stream is not None:  # the whole encoders, one prompt a forward
        text += model_bytes * s.text_stream[1]
    if release_text:  # encoded at the start while the transformer is a skeleton (srpo.shards: read after)
        start = model_bytes * s.vae + reward_bytes * s.reward + text + (OVERHEAD if device == "cuda" else 0)
    elif offload_text:  # a new prompt brings the encoders over between updates: gradients freed
        start = static - 4 * trainable / shard + text
    if start is not None:
        subtotal = max(subtotal, start)
    frag = FRAGMENTATION[device]
    if frag > 1:
        out[f"fragmentation ({round(100 * (frag - 1))} %)"] = subtotal * (frag - 1)
    out["total"] = subtotal * frag
    if start is not None:
        out[f"  of which text encoders, streamed at the start ({text_batch} prompts a pass)" if streamed else
            "  of which text encoders, at the start only" if release_text else
            "  of which text encoders, while encoding new prompts"] = text
        out["  peak while they are resident"] = start * frag
    return out


def estimate_for(cfg, s: Sizes, gpus: int, strategy: str | None = None, lora: bool | None = None,
                 device: str = "cuda", optimizer: str = "adamw") -> dict[str, float]:
    """:func:`estimate` with the config's settings (strategy and LoRA overridable)."""
    from .setup import adamw_kernel
    from .streaming import wanted

    strategy = strategy or cfg.parallel.strategy
    lora = cfg.lora.enabled if lora is None else lora
    specs = cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]
    reward_bytes = max(BYTES.get(str(sp.options.get("dtype", "float32")), 4) for sp in specs)
    return estimate(s, gpus=gpus, strategy="none" if gpus == 1 and strategy == "ddp" else strategy, lora=lora,
                    batch=cfg.train.batch_size, height=cfg.rollout.height, width=cfg.rollout.width,
                    model_bytes=BYTES[cfg.model.dtype], reward_bytes=reward_bytes,
                    act_bytes=2 if cfg.train.autocast != "none" else 4,
                    checkpointing=cfg.train.gradient_checkpointing,
                    offload_text=cfg.memory.offload_frozen, release_text=cfg.memory.release_text_encoders,
                    device=device, optimizer=optimizer,
                    sync_once=grad_sync_mode(cfg.parallel.grad_sync, strategy, lora) == "update",
                    quantize=cfg.model.quantize if lora else "none",
                    fused_adamw=optimizer == "adamw" and adamw_kernel(cfg, device) == "fused",
                    shard_reward=cfg.parallel.shard_reward,
                    stream_text=wanted(cfg.memory.stream_text_encoders, cfg.memory.release_text_encoders,
                                       cfg.model.path),
                    text_batch=cfg.memory.text_encode_batch, reshard=cfg.parallel.reshard_after_forward)
