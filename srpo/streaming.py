"""Streamed text encoders (``memory.stream_text_encoders``): a folder's transformers text encoder
built on the meta device from its ``config.json``, its weights read from the folder's safetensors
files (:func:`srpo.shards.weight_files`) one repeated layer at a time. A forward pre-hook
materialises a layer on the encoder's device just before it runs; the layer is freed back to the
meta device as soon as another one is needed (or the last caller leaves the encoder). Every
other part holding weights (embeddings, final norm, LM head) is read at its first call and kept;
parts never called for text (Mistral 3's and Qwen2.5-VL's vision towers) are never read. The
family's own ``encode_prompts`` runs the encoder unchanged, so its features are the whole
encoder's, bit for bit; the encoder holds about one layer plus its resident parts.

Batches (:func:`encode_each`): prompts are still encoded one per forward (a prompt's features
never depend on its batch), but the forwards of a batch run in threads that the hooks move in
lock step, so each layer is read once per batch rather than once per prompt. One scheduler
serves every streamed encoder of the process: a layer is (re)loaded only when every thread in
an encoder is waiting, and the lowest waiting layer goes first (a thread behind catches up)."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .shards import meta_parameters, weight_files

_SERIAL = itertools.count()


def wanted(setting, cfg_release: bool, path) -> bool:
    """``memory.stream_text_encoders`` resolved: auto is on when the encoders are released after
    the start and the model comes from a folder; true without a folder is a one-line error."""
    if setting == "auto":
        return bool(path) and bool(cfg_release)
    if setting and not path:
        raise UserError("memory.stream_text_encoders is true but model.path is not set: the text encoder is "
                        "streamed from a folder's safetensors files; set model.path or use auto")
    return bool(setting)


def is_streamed(module) -> bool:
    return getattr(module, "_stream", None) is not None


def folder_encoders(root: Path) -> dict[str, type]:
    """The transformers text encoders of a pipeline folder (model_index.json's ``text_encoder*``
    entries of library ``transformers``): component name -> model class."""
    from .models.folders import read_model_index

    import transformers

    out = {}
    for name, entry in read_model_index(root).items():
        if (name.startswith("text_encoder") and isinstance(entry, (list, tuple)) and len(entry) == 2
                and entry[0] == "transformers" and entry[1]):
            cls = getattr(transformers, entry[1], None)
            if cls is not None:
                out[name] = cls
    return out


def streamed_components(root, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Every transformers text encoder of the pipeline folder ``root``, streamed (the one line a
    family's folder load adds: ``components.update(streamed_components(root, dtype))``)."""
    return {name: stream(cls, Path(root) / name, dtype) for name, cls in folder_encoders(Path(root)).items()}


# ---- the scheduler -------------------------------------------------------------------------------
class _Scheduler:
    """Which layer of which streamed encoder is resident; threads wait in the pre-hooks."""

    def __init__(self):
        self.cond = threading.Condition(threading.RLock())
        self.depth: dict[int, int] = {}  # thread id -> nesting of joins (active threads)
        self.waiting: dict[int, tuple] = {}  # thread id -> key it waits to enter
        self.running: dict[tuple, int] = {}  # key -> threads inside it
        self.loaded: tuple | None = None  # (serial, index) of the resident layer
        self.units: dict[tuple, tuple] = {}  # key -> (state, module)

    def join(self):
        with self.cond:
            t = threading.get_ident()
            self.depth[t] = self.depth.get(t, 0) + 1

    def leave(self):
        with self.cond:
            t = threading.get_ident()
            self.depth[t] -= 1
            if not self.depth[t]:
                del self.depth[t]
            if not self.depth and self.loaded is not None:
                self._free()
            self.cond.notify_all()

    def _free(self):
        state, module = self.units[self.loaded]
        state.free(module)
        self.loaded = None

    def enter(self, key):
        with self.cond:
            t = threading.get_ident()
            if t not in self.depth:  # a call from outside any forward (not expected): count it
                self.depth[t] = 1
            self.waiting[t] = key
            try:
                while self.loaded != key:
                    nxt = min(self.waiting.values())
                    if (nxt != self.loaded and not any(self.running.values())
                            and len(self.waiting) >= len(self.depth)):  # all wait; the lowest layer first
                        if self.loaded is not None:
                            self._free()
                        state, module = self.units[nxt]
                        state.load(module)
                        self.loaded = nxt
                        self.cond.notify_all()
                        continue
                    self.cond.wait()
            finally:
                del self.waiting[t]
            self.running[key] = self.running.get(key, 0) + 1

    def exit(self, key):
        with self.cond:
            self.running[key] -= 1
            self.cond.notify_all()


SCHEDULER = _Scheduler()


class _State:
    """What a streamed encoder reads from where, and what it holds."""

    def __init__(self, folder: Path, where: dict, keys: dict, dtypes: dict):
        self.folder, self.where, self.keys, self.dtypes = folder, where, keys, dtypes
        self.serial = next(_SERIAL)
        self.device = torch.device("cpu")
        self.resident: dict[str, nn.Parameter] = {}  # file key -> a resident part's weight (tied ones shared)
        self.held = 0  # bytes of weights on a real device now
        self.peak = 0  # the most bytes held at once
        self.reads = 0  # layers read from the files
        self.read_bytes = 0

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        out = {}
        for f in sorted({self.where[k] for k in keys}):
            try:
                with safe_open(str(f), "pt", device="cpu") as h:
                    for k in keys:
                        if self.where[k] == f:
                            out[k] = h.get_tensor(k)
            except (OSError, SafetensorError) as e:
                raise UserError(f"{f}: cannot read text-encoder weights ({' '.join(str(e).split())}): the file is "
                                f"missing, truncated or not safetensors; copy it again") from None
        return out

    def _count(self, n: int):
        self.held += n
        self.peak = max(self.peak, self.held)

    def load(self, module: nn.Module):
        """A layer's weights onto the device, from the files."""
        params = [(m, n, p) for m in module.modules() for n, p in m._parameters.items() if p is not None]
        tensors = self._read([self.keys[id(p)] for _, _, p in params])
        for m, n, p in params:
            k, dt = self.keys.pop(id(p)), self.dtypes.pop(id(p))
            t = tensors[k].to(self.device, dt)
            new = nn.Parameter(t, requires_grad=False)
            self.keys[id(new)], self.dtypes[id(new)] = k, dt
            m._parameters[n] = new
            self._count(t.numel() * t.element_size())
            self.read_bytes += t.numel() * t.element_size()
        self.reads += 1

    def free(self, module: nn.Module):
        for m in module.modules():
            for n, p in list(m._parameters.items()):
                if p is not None and not p.is_meta:
                    ghost = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
                    self.keys[id(ghost)], self.dtypes[id(ghost)] = self.keys.pop(id(p)), self.dtypes.pop(id(p))
                    m._parameters[n] = ghost
                    self._count(-p.numel() * p.element_size())

    def resident_part(self, module: nn.Module):
        """A part outside the layers, read at its first call and kept (tied weights read once)."""
        with SCHEDULER.cond:
            todo = [(n, p) for n, p in module._parameters.items() if p is not None and p.is_meta]
            if not todo:
                return
            keys = [self.keys[id(p)] for _, p in todo]
            tensors = self._read([k for k in keys if k not in self.resident])
            for (n, p), k in zip(todo, keys):
                if k not in self.resident:
                    t = tensors[k].to(self.device, self.dtypes[id(p)])
                    self.resident[k] = nn.Parameter(t, requires_grad=False)
                    self._count(t.numel() * t.element_size())
                    self.read_bytes += t.numel() * t.element_size()
                module._parameters[n] = self.resident[k]

    def move(self, module: nn.Module, device):
        """The encoder's device: resident parts and buffers move there; layers are read there."""
        with SCHEDULER.cond:
            self.device = torch.device(device)
            moved = {}
            for k, p in list(self.resident.items()):
                moved[id(p)] = self.resident[k] = nn.Parameter(p.data.to(self.device), requires_grad=False)
            for m in module.modules():
                for n, p in list(m._parameters.items()):
                    if p is not None and id(p) in moved:
                        m._parameters[n] = moved[id(p)]
                for n, b in list(m._buffers.items()):
                    if b is not None and not b.is_meta:
                        m._buffers[n] = b.to(self.device)


def _units(model: nn.Module) -> list[nn.Module]:
    """The repeated layers: children of each outermost ModuleList of modules of one
    class holding weights."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for _, m in model.named_modules():
        if id(m) in inside or not isinstance(m, nn.ModuleList) or not len(m):
            continue
        kinds = {type(c) for c in m}
        if len(kinds) == 1 and any(True for _ in m[0].parameters()):
            for c in m:
                found.append(c)
                inside.update(id(x) for x in c.modules())
    return found


def plan_counts(encoders: list[nn.Module], tokens: int) -> tuple[int, int]:
    """For ``srpo plan``, of text encoders built on the meta device (shapes only): (parameters
    their streamed copies hold at once: every part outside the repeated layers, read at its
    first call and kept, plus the largest layer, the one resident; elements one prompt of
    ``tokens`` tokens holds in a forward: every hidden state (the families read several), one
    layer's MLP temporaries and, where the model has an LM head, its logits). Counting every
    non-layer part (a vision tower's embeddings too, never read) errs on the safe side."""
    resident, layer, acts = 0, 0, 0
    for enc in encoders:
        units = _units(enc)
        in_units = {id(p) for u in units for p in u.parameters()}
        resident += sum(p.numel() for p in enc.parameters() if id(p) not in in_units)
        layer = max([layer] + [sum(p.numel() for p in u.parameters()) for u in units])
        c = enc.config.get_text_config() if hasattr(enc.config, "get_text_config") else enc.config
        hidden = getattr(c, "hidden_size", None) or c.d_model
        depth = getattr(c, "num_hidden_layers", None) or c.num_layers
        inner = getattr(c, "intermediate_size", None) or getattr(c, "d_ff", None) or 4 * hidden
        head = enc.get_output_embeddings() if hasattr(enc, "get_output_embeddings") else None
        logits = tokens * c.vocab_size if head is not None else 0
        acts = max(acts, tokens * ((depth + 1) * hidden + 3 * inner) + logits)
    return resident + layer, acts


def _streamed_class(cls: type) -> type:
    def device(self):
        return self._stream.device

    def to(self, *args, **kwargs):
        dev, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dev is not None:
            self._stream.move(self, dev)
        return self

    # the class's own name: transformers finds its checkpoint renamings by the class name
    return type(cls.__name__, (cls,), {"device": property(device), "to": to, "__module__": cls.__module__,
                                                     "cuda": lambda self, d=None: to(self, d or "cuda"),
                                                     "cpu": lambda self: to(self, "cpu")})


def _file_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the model's parameter name, by transformers' own renaming (legacy
    layouts such as Mistral 3's ``language_model.model.*``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: the files are in the model's layout
        return {k: k for k in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    meta = dict(model.state_dict())
    out = {}
    for k in keys:
        name, _ = rename_source_key(k, renamings, [], getattr(model, "base_model_prefix", None), meta)
        out[k] = name
    return out


def stream(model_cls: type, folder, dtype: torch.dtype) -> nn.Module:
    """``model_cls`` (a transformers text encoder) of ``folder`` (config.json + safetensors),
    streamed: parameters on the meta device, each read from the files where it is needed."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: a streamed text encoder is built from it")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise UserError(f"{folder} holds no .safetensors weights: the streamed text encoder reads them")
    config = model_cls.config_class.from_pretrained(str(folder), local_files_only=True)
    index = next(iter(folder.glob("*.safetensors.index.json")), None)
    shapes: dict[str, tuple] = {}
    where = _weight_files(folder, index, shapes)
    with meta_parameters():
        model = _streamed_class(model_cls)(config)
    model.eval().requires_grad_(False)
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    names = _file_names(model, list(where))
    by_name: dict[str, str] = {v: k for k, v in names.items()}
    keys = {}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for mod_name, m in model.named_modules():
        for n, p in list(m._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{n}" if mod_name else n
            key = next((by_name[a] for a in [full, *groups[id(p)]] if a in by_name), None)
            if key is None:
                raise UserError(f"{folder}: no weight '{full}' in its safetensors files: they do not match its "
                                f"config.json ({model_cls.__name__})")
            if tuple(shapes[key]) != tuple(p.shape):
                raise UserError(f"{where[key]}: weight '{key}' is {list(shapes[key])}, but config.json makes it "
                                f"{list(p.shape)}: the file and the config are of different models")
            fp32 = any(k in full.split(".") for k in keep)
            dt = torch.float32 if fp32 else dtype
            ghost = nn.Parameter(torch.empty(p.shape, dtype=dt, device="meta"), requires_grad=False)
            if id(p) in keys:  # a tied weight already replaced: the same ghost
                m._parameters[n] = keys[id(p)][1]
                continue
            keys[id(p)] = (key, ghost)
            m._parameters[n] = ghost
    flat_keys = {id(g): k for k, g in keys.values()}
    flat_dtypes = {id(g): g.dtype for _, g in keys.values()}
    state = _State(folder, where, flat_keys, flat_dtypes)
    model._stream = state
    model.weights_dtype = dtype
    units = _units(model)
    in_units = {id(x) for u in units for x in u.modules()}
    for i, u in enumerate(units):
        key = (state.serial, i)
        SCHEDULER.units[key] = (state, u)
        u.register_forward_pre_hook(lambda mod, args, key=key: SCHEDULER.enter(key))
        u.register_forward_hook(lambda mod, args, out, key=key: SCHEDULER.exit(key), always_call=True)
    for m in model.modules():
        if id(m) not in in_units and any(p is not None for p in m._parameters.values()):
            m.register_forward_pre_hook(lambda mod, args: state.resident_part(mod))
    model.register_forward_pre_hook(lambda mod, args: SCHEDULER.join())
    model.register_forward_hook(lambda mod, args, out: SCHEDULER.leave(), always_call=True)
    return model


def _weight_files(folder: Path, index, shapes: dict) -> dict[str, Path]:
    """:func:`srpo.shards.weight_files` of a transformers folder (``model.safetensors.index.json``)."""
    if index is None:
        return weight_files(folder, shapes)
    return weight_files(folder, shapes, index_name=Path(index).name, what="text encoder")


def encode_each(encode, prompts: list[str]) -> list:
    """``encode([p])`` for every prompt, each its own forward (features as if alone), run in
    threads that the streamed encoders' hooks keep in lock step: each layer is read once for
    the whole list. One thread runs at a time (it holds the scheduler's lock, which it gives up
    only while it waits for a layer), so what is not thread-safe is never run by two at once: a
    fast tokenizer's truncation and padding set-up ("Already borrowed"). Exceptions are raised in
    the caller (the first one)."""
    if len(prompts) < 2:
        return [encode([p]) for p in prompts]
    out: list = [None] * len(prompts)
    errors: list[BaseException] = []
    grad = torch.is_grad_enabled()

    start = threading.Barrier(len(prompts))

    def run(i, p):
        SCHEDULER.join()
        try:
            start.wait()  # every thread counted before any layer is read
            with SCHEDULER.cond, torch.set_grad_enabled(grad):
                out[i] = encode([p])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
        finally:
            SCHEDULER.leave()

    threads = [threading.Thread(target=run, args=(i, p), daemon=True) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out

