"""(d)'s update under ``train.compile``: the SRPO update of the bench's model eager against
compiled, in interleaved rounds of one run, with the one-time compile apart (time to the first
compiled update from a cold compile cache) and the compiled gradients against the eager ones on
one batch (both from the same weights and the same eager rollout)."""

from __future__ import annotations

import time

import torch

from .. import compilation, step as steps
from ..algorithms import ALGORITHMS
from ..sampling import rollout
from .measure import timed_together


def _grads(model, algorithm, batch, params) -> torch.Tensor:
    for p in params:
        p.grad = None
    algorithm.backward(model, batch)
    return torch.cat([p.grad.flatten() for p in params])


def update_speedup(bench, mode: str = "model", repeats: int = 3) -> dict:
    """Seconds per SRPO update eager and compiled (``mode``), the first compiled update's seconds
    (the compile), and the relative gradient difference ``|g_c - g_e| / |g_e|`` on one batch.
    The bench's weights are restored and the compile removed afterwards."""
    model, cfg = bench.model, bench.config("srpo", {})
    tr = model.transformer
    params = [p for p in tr.parameters() if p.requires_grad]
    algorithm = ALGORITHMS.get("srpo")(cfg, bench.reward_fn)
    n = len(bench.prompts)
    eps = steps.rollout_noise(model, cfg, 0, list(range(n)))
    with torch.no_grad():
        cond = model.encode_prompts(bench.prompts)
        x0 = rollout(model, cond, eps, steps=cfg.rollout.steps, guidance=cfg.rollout.guidance)
    batch = steps.Batch(bench.prompts, cond, x0, eps, 0, list(range(n)), *steps.control_words(cfg, 0),
                        loss_scale=1.0 / n)
    update = bench.update_fn(cfg)
    update()  # eager warm-up (AdamW allocates its state)
    torch._dynamo.reset()  # a cold cache: the first compiled update pays every compile of the run
    compilation.apply(tr, mode)
    t0 = time.perf_counter()
    update()
    first = time.perf_counter() - t0
    bench.restore()  # both gradients from the bench's weights
    with compilation.eager(tr):
        eager_grads = _grads(model, algorithm, batch, params)
    compiled_grads = _grads(model, algorithm, batch, params)

    def eager_update():
        with compilation.eager(tr):
            update()

    times = timed_together({"eager": eager_update, "compiled": update}, bench.device, repeats=repeats, warmup=0)
    compilation.remove(tr)
    bench.restore()
    for p in params:
        p.grad = None
    return {"mode": mode, "eager_s": times["eager"], "compiled_s": times["compiled"],
            "speedup": times["eager"] / times["compiled"], "first_update_s": first,
            "grad_relative_difference": ((compiled_grads - eager_grads).norm() / eager_grads.norm()).item()}
