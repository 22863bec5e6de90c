"""srpo plan CONFIG [--gpus N] [--gpu-memory GIB] [--set k=v ...]: expected per-GPU memory."""

from __future__ import annotations

from ..errors import UserError

COUNTS = (1, 2, 4, 8, 16, 32)
LAYOUTS = (("full", "fsdp"), ("full", "ddp"), ("lora", "ddp"), ("lora", "fsdp"))


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate per-GPU memory of a config before launching it")
    p.add_argument("config", help="YAML config (see docs/config.md)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (all nodes together)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set lora.enabled=true (repeatable)")


def _n(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return str(int(x))


def render(cfg, sizes, gpus: int, gpu_memory: float) -> str:
    from ..plan import GiB, estimate_for

    mode = f"LoRA r={cfg.lora.rank}" if cfg.lora.enabled else "full fine-tune"
    strategy = cfg.parallel.strategy if gpus > 1 or cfg.parallel.strategy == "fsdp" else "none"
    lines = [
        f"model: {sizes.name}: transformer {_n(sizes.transformer)} parameters in {sizes.blocks} blocks"
        f"{f' (LoRA {_n(sizes.lora_params)})' if cfg.lora.enabled else ''}, text encoders "
        f"{_n(sizes.text_encoders)}, VAE {_n(sizes.vae)}, reward {_n(sizes.reward)}",
        f"run: {mode}, {cfg.rollout.height}x{cfg.rollout.width}, batch {cfg.train.batch_size} per GPU, "
        f"strategy {strategy}, {gpus} GPU(s), autocast {cfg.train.autocast}, "
        f"checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}, "
        f"text encoders {'released after the start' if cfg.memory.release_text_encoders else 'offloaded' if cfg.memory.offload_frozen else 'resident'}",
        "",
    ]
    parts = estimate_for(cfg, sizes, gpus, strategy)
    width = max(len(k) for k in parts)
    for k, v in parts.items():
        if k == "total":
            lines.append("-" * (width + 12))
        if v or k == "total":
            lines.append(f"{k:<{width}}  {v / GiB:8.2f} GiB")
    fits = parts["total"] <= gpu_memory * GiB
    lines += [f"{'fits' if fits else 'does NOT fit'} in {gpu_memory:g} GiB per GPU", "",
              f"per-GPU GiB by layout (* fits in {gpu_memory:g} GiB):",
              f"{'':<10}" + "".join(f"{n:>9}" for n in COUNTS)]
    for kind, strat in LAYOUTS:
        row = f"{kind + ' ' + strat:<10}"
        for n in COUNTS:
            total = estimate_for(cfg, sizes, n, strat, kind == "lora")["total"] / GiB
            row += f"{total:8.1f}{'*' if total <= gpu_memory else ' '}"
        lines.append(row)
    return "\n".join(lines)


def run(args) -> int:
    from ..config import load_config
    from ..plan import model_sizes

    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {args.gpus})")
    if args.gpu_memory <= 0:
        raise UserError(f"--gpu-memory must be positive (got {args.gpu_memory})")
    cfg = load_config(args.config, args.overrides)
    print(render(cfg, model_sizes(cfg), args.gpus, args.gpu_memory))
    return 0
