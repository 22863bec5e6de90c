"""Wan2.2-T2V-A14B's two experts as the one module srpo trains: ``transformer`` (high noise) and
``transformer_2`` (low noise), switched where ``WanPipeline.__call__`` switches them.

The pipeline (diffusers 0.42) computes ``boundary_timestep = boundary_ratio * num_train_timesteps``
and, at each step's scheduler timestep ``t``, calls ``transformer`` when ``t >= boundary_timestep``
and ``transformer_2`` below it, with ``guidance_scale`` and ``guidance_scale_2`` (the same unless
given) as the CFG scales. :class:`WanExperts` makes that choice per sample from the timestep the
family feeds (the same float32 ``1000 sigma``), so the rollout and every gradient forward use the
expert the pipeline would use at that level. Holding both experts in one ``nn.Module`` keeps the
rest of srpo (optimizer, checkpoints, LoRA injection, gradient sync) on one ``model.transformer``;
its state dict is ``transformer.*`` and ``transformer_2.*``, and ``final/`` and ``lora/`` hold one
sub-folder per expert under those names (each a ``WanTransformer3DModel`` folder, or adapters
``WanPipeline.load_lora_weights`` reads, ``load_into_transformer_2=True`` for the second).

``train_experts`` (``model.options``): ``both`` (default), ``transformer`` or ``transformer_2``;
the other expert is frozen (no adapters, no gradient), and a gradient forward at a level of the
frozen expert is a one-line error naming the boundary.

Under several processes (``parallel.strategy`` fsdp or ddp) each rank routes its own samples, so
in one gradient forward rank 0 may need only ``transformer`` and rank 1 only ``transformer_2``;
FSDP's all-gathers (and reduce-scatters in backward) would then pair up across different
experts and hang. :func:`srpo.parallel.apply` sets :attr:`WanExperts.agree_across_ranks`: each
forward all-reduces (MAX) two flags, "some sample here needs expert i", and every rank calls, in
the same order, each expert that any rank needs. A rank with no sample of that expert runs it on
one of its own rows and joins the result to its output with value and gradient exactly zero
(:class:`_Null`; Wan's transformer cannot take a batch of 0), so its backward runs the expert's
FSDP hooks with zero gradients: the reductions pair up and the gradients equal one process on the
global batch. :meth:`WanExperts.fsdp_units` shards each expert block by block, then each
expert's root, then (by :func:`srpo.parallel.apply`) this module. A :class:`WanExperts` of two
skeletons (:func:`srpo.shards.skeleton` of ``transformer/`` and ``transformer_2/``) is a skeleton
too: under FSDP each rank reads only its rows of both experts (:func:`srpo.shards.fill`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError

EXPERTS = ("transformer", "transformer_2")  # high noise, low noise: WanPipeline's component names
TRAIN_CHOICES = ("both", *EXPERTS)


def experts_folder(path) -> bool:
    """A folder of both experts (a two-expert run's ``final/``): ``transformer/`` and ``transformer_2/``."""
    return all((Path(path) / name / "config.json").is_file() for name in EXPERTS)


class _Null(torch.autograd.Function):
    """A scalar 0 whose gradient to ``x`` is zeros: ties a forward into the graph without
    changing the value (not even where ``x`` is not finite) or the gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape, dtype=ctx.dtype)


class WanExperts(nn.Module):
    """Both experts; ``forward`` takes ``WanTransformer3DModel``'s arguments and routes each sample
    to the expert of its timestep. ``config`` and ``dtype`` are the high-noise expert's (the
    experts share their architecture; :meth:`check` makes sure)."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float,
                 train: str | None = None):
        super().__init__()
        train = train or "both"
        if train not in TRAIN_CHOICES:
            raise UserError(f"options.train_experts '{train}' is not one of {', '.join(TRAIN_CHOICES)} "
                            f"(transformer: the high-noise expert, transformer_2: the low-noise one)")
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_timestep = float(boundary_timestep)
        self.trained = EXPERTS if train == "both" else (train,)
        self.agree_across_ranks = False  # set under several processes (srpo.parallel.apply)
        for name in EXPERTS:
            if name not in self.trained:
                getattr(self, name).requires_grad_(False)
        self.check()

    def check(self) -> None:
        a, b = (dict(getattr(self, n).config) for n in EXPERTS)
        keys = ("in_channels", "out_channels", "text_dim", "patch_size", "num_attention_heads", "attention_head_dim")
        same = lambda x: tuple(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
        bad = [k for k in keys if same(a[k]) != same(b[k])]
        if bad:
            raise UserError(f"the Wan experts do not fit each other: transformer {bad[0]} = {a[bad[0]]} but "
                            f"transformer_2 {bad[0]} = {b[bad[0]]}; give the two experts of one model")

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def high_noise(self, timestep: Tensor) -> Tensor:
        """Per sample: True where the pipeline uses ``transformer`` (``t >= boundary_timestep``)."""
        t = timestep if timestep.ndim == 1 else timestep[:, 0]  # expand_timesteps: one per token, all equal
        return t >= self.boundary_timestep

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 units inside this module, in sharding order (:func:`srpo.parallel.fsdp_units`):
        each expert's blocks, then that expert's root (its embedders and output layer)."""
        from ..parallel import fsdp_units

        return [u for name in EXPERTS for u in (*fsdp_units(getattr(self, name)), getattr(self, name))]

    def needed(self, high: Tensor) -> tuple[bool, bool]:
        """Which experts this forward calls: those its own samples use, or under
        :attr:`agree_across_ranks` those any rank's samples use (a collective: every rank's
        forwards come in the same order)."""
        flags = torch.stack([high.any(), (~high).any()]).to(torch.int32)
        if self.agree_across_ranks:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        a, b = flags.tolist()
        return bool(a), bool(b)

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                return_dict: bool = False, **kwargs):
        high = self.high_noise(timestep)
        need = self.needed(high)
        for name, on in zip(EXPERTS, need):
            if on:
                self._check_trainable(name)
        local = (bool(high.any()), bool((~high).any()))
        if local == need and need.count(True) == 1:  # one expert, for every sample: the whole batch
            name = EXPERTS[need.index(True)]
            return getattr(self, name)(hidden_states=hidden_states, timestep=timestep,
                                       encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
        out, nulls = None, []
        for name, rows, on, mine in zip(EXPERTS, (high.nonzero()[:, 0], (~high).nonzero()[:, 0]), need, local):
            if not on:
                continue
            if not mine:  # another rank's samples need it: run it on one row here, joined as an exact 0
                rows = torch.zeros(1, dtype=torch.long, device=hidden_states.device)
            v = getattr(self, name)(hidden_states=hidden_states[rows], timestep=timestep[rows],
                                    encoder_hidden_states=encoder_hidden_states[rows], return_dict=False, **kwargs)[0]
            if not mine:
                nulls.append(_Null.apply(v))
                continue
            out = v.new_zeros((hidden_states.shape[0], *v.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, v)
        for z in nulls:
            out = out + z.to(out.dtype)
        return (out,)

    def _check_trainable(self, name: str) -> None:
        if torch.is_grad_enabled() and name not in self.trained and any(
                p.requires_grad for n in self.trained for p in getattr(self, n).parameters()):
            side = ">=" if name == EXPERTS[0] else "<"
            raise UserError(f"a gradient forward at a timestep {side} the boundary {self.boundary_timestep:g} "
                            f"uses {name}, which options.train_experts ({self.trained[0]}) leaves frozen: "
                            f"train both experts or move method.index_range to the trained expert's levels")

    # ---- what srpo calls on a transformer ------------------------------------------------------
    def add_adapter(self, config, adapter_name: str = "default") -> None:
        """LoRA (diffusers' ``add_adapter``) on the trained experts, each with its own config copy."""
        for name in self.trained:
            getattr(self, name).add_adapter(copy.deepcopy(config), adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for name in EXPERTS:
            getattr(self, name).enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for name in EXPERTS:
            getattr(self, name).disable_gradient_checkpointing()

    def save_pretrained(self, path, **kwargs) -> None:
        """``path/transformer`` and ``path/transformer_2``, each a ``WanTransformer3DModel`` folder."""
        for name in EXPERTS:
            getattr(self, name).save_pretrained(str(Path(path) / name), **kwargs)


def split_state(state: dict, prefix: str) -> dict:
    """The entries of a :class:`WanExperts` state dict under ``prefix.`` with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
