"""The sharded start (FSDP2 over several processes): the transformer is built as a skeleton
(its parameters on the meta device; buffers, which are small, as usual), sharded with
``fully_shard`` like any model, and then each rank fills only its own shards, read as slices
straight from the folder's safetensors files. No rank, rank 0 included, ever holds the whole
transformer: the largest tensor a rank reads is its shard of the largest weight.

Every rank checks the files against the skeleton before anything is sharded (each weight
present, of the skeleton's shape; every file readable), so a missing, truncated or mismatched
file stops every rank with the same one-line error and no rank waits on another.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

INDEX = "diffusion_pytorch_model.safetensors.index.json"


@contextlib.contextmanager
def meta_parameters():
    """Parameters registered inside are moved to the meta device as they are registered (one
    at a time, so at most one weight is ever allocated); buffers are made as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def is_skeleton(module: nn.Module) -> bool:
    """A skeleton, or a module holding skeletons (Wan2.2-A14B's two experts, each from its folder)."""
    return bool(skeleton_parts(module))


def skeleton_parts(module: nn.Module) -> list[nn.Module]:
    """``module`` where it is a skeleton itself, else the skeletons inside it (outermost first)."""
    if getattr(module, "weights_folder", None) is not None:
        return [module]
    return [m for m in module.modules() if getattr(m, "weights_folder", None) is not None]


def skeleton_folders(module: nn.Module) -> str:
    """The folders a skeleton (or a module of skeletons) is read from, for messages."""
    return ", ".join(str(m.weights_folder) for m in skeleton_parts(module))


def weight_files(folder: Path, shapes: dict | None = None, index_name: str = INDEX,
                 what: str = "transformer") -> dict[str, Path]:
    """Weight name -> the safetensors file of ``folder`` that holds it (every file opened, so an
    unreadable or truncated one is a one-line error here); ``shapes`` gets each weight's shape.
    ``index_name``: the folder's sharded-weights index (diffusers' by default); ``what``: the
    component, for messages."""
    from safetensors import SafetensorError, safe_open

    index = folder / index_name
    if index.is_file():
        try:
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a readable safetensors index ({e}): copy the {what} folder again") from None
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights: srpo reads the {what} from them")
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    where[k] = f
                    if shapes is not None:
                        shapes[k] = tuple(h.get_slice(k).get_shape())
        except (OSError, SafetensorError) as e:
            raise UserError(f"{f}: cannot read its weights ({' '.join(str(e).split())}): the file is missing, "
                            f"truncated or not safetensors; copy it again") from None
    return where


def skeleton(transformer_class: type, folder, dtype: torch.dtype) -> nn.Module:
    """The transformer of ``folder`` (a diffusers model folder: config.json + safetensors) with
    its parameters on the meta device, checked against the files' weights."""
    folder = Path(folder)
    with meta_parameters():
        module = transformer_class.from_config(transformer_class.load_config(str(folder), local_files_only=True))
    module = module.to(dtype).eval()
    shapes: dict[str, tuple] = {}
    where = weight_files(folder, shapes)
    for name, p in module.named_parameters():
        if name not in where:
            raise UserError(f"{folder}: no weight '{name}' in its safetensors files: they do not match its "
                            f"config.json ({transformer_class.__name__})")
        shape = shapes[name]
        if shape != tuple(p.shape):
            raise UserError(f"{where[name]}: weight '{name}' is {list(shape)}, but config.json makes it "
                            f"{list(p.shape)}: the file and the config are of different models")
    module.weights_folder = folder
    return module


def _rows(p) -> tuple[torch.Tensor, int]:
    """A parameter's local tensor and the first row of the full weight it holds (FSDP2 shards
    dim 0 as ``torch.chunk`` does)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p.data, 0
    local = p.to_local()
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    start = min(rank * math.ceil(n / world), n)
    return local, start


@torch.no_grad()
def fill(module: nn.Module, device, initial=None, each=None) -> tuple[int, int]:
    """Materialise a skeleton on ``device``: each rank's own rows of every weight from the
    folder's files (an unsharded skeleton: every row, one module at a time, so ``each(module)``,
    e.g. quantizing a Linear, runs before the next module is read); parameters the files lack
    (LoRA adapters) from ``initial(name, shape)``, the same full value on every rank, of which
    each keeps its rows. Returns (bytes of weights this rank holds, bytes of the whole transformer)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    parts = skeleton_parts(module)
    if parts != [module]:  # a module of skeletons (each expert from its own folder): each one in turn
        sizes = [fill(m, device, _under(initial, _prefix(module, m)), each) for m in parts]
        return sum(h for h, _ in sizes), sum(w for _, w in sizes)
    folder = module.weights_folder
    where = weight_files(folder)
    buffers = {n: b for n, b in module.named_buffers()}
    sharded = any(isinstance(p, DTensor) for p in module.parameters())
    if sharded:  # FSDP2 allocates each rank's shards at once
        module.to_empty(device=device)
    held = whole = 0
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in set(where.values())}
        for prefix, mod in module.named_modules():
            if not sharded:
                mod.to_empty(device=device, recurse=False)
            dot = f"{prefix}." if prefix else ""
            for name, b in mod.named_buffers(recurse=False):
                b.copy_(buffers[dot + name])
            for short, p in mod.named_parameters(recurse=False):
                name = dot + short
                local, start = _rows(p)
                rows = slice(start, start + local.shape[0])
                key = name.replace(".base_layer.", ".")  # peft's wrapped Linear keeps the file's name
                if key in where:
                    local.copy_(handles[where[key]].get_slice(key)[rows])
                elif initial is not None:
                    local.copy_(initial(name, tuple(p.shape))[rows])
                else:
                    raise UserError(f"{folder}: no weight '{key}' in its safetensors files")
                held += local.numel() * local.element_size()
                whole += p.numel() * local.element_size()
            if each is not None and not sharded:
                each(mod)
    module.weights_folder = None
    return held, whole


def _prefix(root: nn.Module, part: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is part)


def _under(initial, prefix: str):
    """``initial`` of a part: called with the parameter's name in the whole module (LoRA's
    initial values are keyed by it, as they are for a one-process load of the whole module)."""
    if initial is None:
        return None
    return lambda name, shape: initial(f"{prefix}.{name}", shape)
