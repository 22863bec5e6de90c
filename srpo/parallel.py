"""The only module that knows about processes, ranks and distributed wrappers.

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`setup` joins the process
group (NCCL on GPUs, gloo on CPUs), :func:`apply` wraps ``model.transformer`` for the configured
strategy and everything else (metric means, gradient clipping, full state dicts for checkpoints)
goes through the small helpers below, so model, algorithm and trainer code never see a rank.

- ``none``: one process.
- ``ddp``: every rank holds the whole model; gradients are averaged over ranks once per update
  (:class:`GradSync`).
- ``fsdp``: FSDP2 (``fully_shard``) on every transformer block, then on the root: parameters,
  gradients and optimizer state are sharded over ranks. A module holding several transformers
  (Wan2.2-A14B's two experts) declares its inner units with ``fsdp_units()`` (:func:`fsdp_units`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    owns_group: bool = False  # this process initialised the process group (and tears it down)
    checkpoint_group: object = None  # the gloo group asynchronous checkpoint writes talk over (made on first use)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none" and dist.is_available() and dist.is_initialized()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _strategy(cfg) -> str:
    par = getattr(cfg, "parallel", None)
    return getattr(par, "strategy", "none") if par is not None else "none"


def setup(cfg) -> Context:
    """Join the process group torchrun describes (or a one-process group for ``ddp`` / ``fsdp``
    without torchrun) and pick this rank's device."""
    strategy = _strategy(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and strategy == "none":
        raise UserError(f"launched as {world} processes but parallel.strategy is 'none': "
                        f"set parallel.strategy to ddp or fsdp (e.g. --set parallel.strategy=fsdp)")
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy == "none":
        return Context(0, 1, device, strategy)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun (or another launcher)
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                    **_attempt_store())
        else:  # one process, no launcher: an in-memory store needs no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return Context(dist.get_rank(), dist.get_world_size(), device, strategy, owns)


def _attempt_store() -> dict:
    """Under torchrun: the agent's store with a prefix per restart. torchrun keeps one store
    server for every attempt, so without a prefix a restarted rank can read the addresses a
    killed rank published and fail to connect (pytorch/pytorch#167288). Other launchers: the
    ``env://`` default."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return {}
    from datetime import timedelta

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0  # else the agent hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=host,
                          timeout=timedelta(minutes=10))
    return {"store": dist.PrefixStore(f"srpo/attempt-{restart_count()}", store), "rank": rank, "world_size": world}


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this worker group (0: the
    first launch, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)


def teardown(ctx: Context) -> None:
    """Leave the process group cleanly: wait for every rank, then destroy the group, so no
    rank exits while a peer still talks to it (the cause of gloo's exit-time aborts)."""
    if ctx.owns_group and dist.is_initialized():
        ctx.checkpoint_group = None
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        ctx.owns_group = False


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_mean(values: dict[str, float], ctx: Context) -> dict[str, float]:
    """Mean of scalar metrics over ranks (a NaN on any rank makes the mean NaN everywhere, so
    every rank takes the same skip decision). Every rank must pass the same keys."""
    if not ctx.distributed or ctx.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t)
    return {k: v / ctx.world for k, v in zip(keys, t.tolist())}


def broadcast_object(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed or ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(ctx))
    return box[0]


def gather_objects(obj, ctx: Context) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.distributed or ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def _comm_device(ctx: Context) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------- wrapping

class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that still answers the wrapped model's attributes (``config``, ``dtype``, ...)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the members of its top-level ModuleLists (e.g. the
    double- and single-stream block lists of a two-stream transformer)."""
    return [b for child in module.children() if isinstance(child, nn.ModuleList) for b in child]


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards as units of their own below ``module``'s root, in sharding order:
    those ``module.fsdp_units()`` names where it declares them (a module of several transformers:
    each one's blocks, then that transformer), else its :func:`blocks`."""
    declared = getattr(module, "fsdp_units", None)
    return list(declared()) if callable(declared) else blocks(module)


def apply(model, cfg, ctx: Context) -> None:
    """Wrap ``model.transformer`` for the configured strategy, in place; a skeleton is
    materialised here (whole, or under FSDP each rank's shards once it is sharded)."""
    from .lora import initial_values
    from .quantize import linear
    from .shards import fill, is_skeleton, skeleton_folders

    tr = model.transformer
    if is_skeleton(tr) and ctx.strategy != "fsdp":  # whole, one module at a time (each quantized as read)
        fill(tr, ctx.device, initial_values(cfg.lora, cfg.train.seed), each=lambda m: linear(m, cfg.model.quantize))
    if ctx.strategy == "none":
        return
    if hasattr(tr, "agree_across_ranks"):  # a module that routes samples: every rank calls what any rank needs
        tr.agree_across_ranks = ctx.distributed and ctx.world > 1
    if ctx.strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model.transformer = _DDP(tr, device_ids=ids, forward_sync_buffers=False,
                                 find_unused_parameters=cfg.parallel.find_unused_parameters)
    elif ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from .memory import master_weights

        parts = fsdp_units(tr)
        if not parts:
            raise UserError(f"parallel.strategy fsdp: {type(tr).__name__} has no block lists to shard; use ddp")
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.autocast)
        # under autocast FSDP gathers the weights in the compute dtype (half the traffic) and
        # nothing keeps a low-precision copy of every weight until the forward returns, as
        # autocast's cache of float32 weights would; gradients are reduced in float32
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False) \
            if low else MixedPrecisionPolicy()
        ids = {id(b) for b in parts}  # a unit holding other units (a transformer inside tr): kept gathered as a root
        inner = {id(b) for b in parts if any(id(m) in ids for m in b.modules() if m is not b)}
        for b in parts:
            master_weights(b)  # this block in float32, then sharded: one whole block at a time
            fully_shard(b, reshard_after_forward=False if id(b) in inner else cfg.parallel.reshard_after_forward,
                        mp_policy=mp)
        master_weights(tr)  # the root's own weights (embedders, final layer)
        fully_shard(tr, reshard_after_forward=False, mp_policy=mp)  # the root's gather is reused by backward
        if is_skeleton(tr):  # the sharded start: this rank's rows of every weight, from the files
            folder = skeleton_folders(tr)
            held, whole = fill(tr, ctx.device, initial_values(cfg.lora, cfg.train.seed))
            if ctx.is_main:
                print(f"sharded start: each of {ctx.world} ranks read its shards of {folder} "
                      f"(rank 0 holds {held / 2**20:.1f} of {whole / 2**20:.1f} MiB of transformer weights)", flush=True)
    else:
        raise UserError(f"unknown parallel.strategy '{ctx.strategy}': use one of {', '.join(STRATEGIES)}")


def skeleton_start(cfg, ctx: Context) -> bool:
    """A run from a model folder starts its transformer as a skeleton (:mod:`srpo.shards`) when
    it shards it over several processes (each rank then reads only its own shards) or when the
    text encoders are released after the start (the prompts are encoded before the transformer
    is read, so the two are never resident together)."""
    sharded = ctx.strategy == "fsdp" and ctx.distributed and ctx.world > 1
    return bool(cfg.model.path) and (sharded or cfg.memory.release_text_encoders)


def grad_sync_mode(mode: str, strategy: str, lora: bool) -> str:
    """``parallel.grad_sync`` resolved: ``update`` (one reduction per update) or ``backward``."""
    if mode == "auto":
        return "backward" if strategy == "fsdp" and not lora else "update"
    return mode


class GradSync:
    """One gradient reduction per update (``parallel.grad_sync: update``): the update's passes
    with gradient (SRPO's branches, every micro-batch) accumulate locally and the last one's
    backward reduces the sum. ``sync(on)`` comes before each pass's forward (DDP reads
    ``require_backward_grad_sync`` at forward, FSDP2 its ``set_requires_gradient_sync`` in
    backward); ``on`` is the state the last pass ran with. One process, or ``backward``: every
    backward reduces, as the wrappers do by default."""

    def __init__(self, module: nn.Module, ctx: Context, cfg):
        mode = grad_sync_mode(cfg.parallel.grad_sync, ctx.strategy, cfg.lora.enabled)
        once = ctx.distributed and ctx.world > 1 and mode == "update"
        self.module = module if once else None
        self.on = True

    def __call__(self, on: bool) -> None:
        if self.module is None or on == self.on:
            return
        self.on = on
        if isinstance(self.module, nn.parallel.DistributedDataParallel):
            self.module.require_backward_grad_sync = on
        else:  # an FSDP2 root
            self.module.set_requires_gradient_sync(on)


def unwrap(module: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: the module is itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def model_class(module: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named ``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(unwrap(module)).__mro__ if not issubclass(c, FSDPModule))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, ctx: Context) -> float:
    """Clip the global gradient norm (over all shards) and return it as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------- state dicts

def _options(ctx: Context, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full = ctx.distributed
    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, **kw)


def trainable_state(module: nn.Module, optimizer, ctx: Context) -> tuple[dict, dict]:
    """Full (unsharded) trainable parameters and optimizer state keyed by parameter name, on CPU.

    Collective under FSDP / DDP: every rank calls it; rank 0 gets the dicts, the others may get
    empty ones."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module = unwrap(module)
    if not ctx.distributed:  # one process: the same dicts read directly (DCP's generic path costs ~25 ms)
        return _local_trainable_state(module, optimizer)
    opts = _options(ctx)
    params = get_model_state_dict(module, options=opts)
    optim = get_optimizer_state_dict(module, optimizer, options=opts) if optimizer is not None else {}
    return ({k: v.detach().cpu().contiguous() for k, v in params.items()}, optim)


def _local_trainable_state(module: nn.Module, optimizer) -> tuple[dict, dict]:
    """:func:`trainable_state` of one process without a group: what ``get_model_state_dict`` /
    ``get_optimizer_state_dict`` give with ``ignore_frozen_params`` (trainable parameters and
    buffers; AdamW state and param groups keyed by parameter name), as views of the live tensors."""
    names = {id(p): n for n, p in module.named_parameters()}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    params = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k not in frozen}
    if optimizer is None:
        return params, {}
    state = {names[id(p)]: dict(st) for p, st in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return params, {"state": state, "param_groups": groups}


def load_trainable_state(module: nn.Module, optimizer, params: dict, optim: dict, ctx: Context) -> None:
    """Inverse of :func:`trainable_state`; collective. Under a process group only rank 0's dicts
    are read and broadcast, so the other nodes need no copy of the checkpoint."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    module = unwrap(module)
    opts = _options(ctx, strict=False, broadcast_from_rank0=ctx.distributed)
    set_model_state_dict(module, params, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, optim, options=opts)


def sharded_state(module: nn.Module, optimizer) -> dict:
    """This rank's shards of the trainable parameters and the optimizer state (keyed by
    parameter name, as torch.distributed.checkpoint saves and reshards them). Nothing is
    gathered: under FSDP2 the values are DTensors holding the local shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(unwrap(module), optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model, "optimizer": optim}


def save_sharded(module: nn.Module, optimizer, path, ctx: Context, asynchronous: bool = False):
    """Collective under a process group: every rank writes its own shards into ``path``
    (``__<rank>_0.distcp``; rank 0 adds ``.metadata``), fsynced. ``asynchronous``: the shards are
    copied to CPU memory now (a snapshot: later updates do not change what is written) and written
    by a background thread over a gloo group of its own; returns the write's future (``None``
    when synchronous)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(str(path), sync_files=True)
    if not asynchronous:
        dcp.save(sharded_state(module, optimizer), storage_writer=writer)
        return None
    if ctx.checkpoint_group is None:  # collective: every rank makes it at the same save
        ctx.checkpoint_group = dist.new_group(backend="gloo")
    return dcp.async_save(sharded_state(module, optimizer), storage_writer=writer, process_group=ctx.checkpoint_group)


def sharded_keys(path) -> set[str]:
    """The parameter names a sharded checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}


def load_sharded(module: nn.Module, optimizer, path, ctx: Context) -> None:
    """Inverse of :func:`save_sharded` on any number of processes and any strategy: each rank
    reads the pieces of its own shards (resharded by torch.distributed.checkpoint); one process
    without a process group reads everything."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    import warnings

    state = sharded_state(module, optimizer)
    with warnings.catch_warnings():  # one process without a group: "assuming ... a single process" is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))  # in place, into the optimizer's own tensors
    set_state_dict(unwrap(module), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_state_dict(module: nn.Module, ctx: Context) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, unsharded, on CPU (rank 0; collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=ctx.distributed, cpu_offload=ctx.distributed)
    sd = get_model_state_dict(unwrap(module), options=opts)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}
