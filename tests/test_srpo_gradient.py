"""The production SRPO update's gradient equals an independent computation written here from
shared SRPO.md's formulas (plain torch: no srpo.method, no srpo.algorithms helpers), and a
``train.autocast: bf16`` update through ``srpo.step.update`` really runs in bf16.

Only the timestep draw of the production algorithm is replaced (fixed ``ts``); levels, weights,
role swap, hinge, branch factor, decode, reward and backward are production's own. The
reference may call ``model.velocity`` / ``model.decode`` and the reward's ``encode_image`` /
``encode_text`` (the model and reward contracts), nothing else of the package.

Tolerance: both sides run the same float32 ops, up to how the two branch gradients are summed
(the reference adds the two losses before one backward, production accumulates two backwards);
on CPU the gradients come out bitwise equal (max relative error 0.0). ``TOL = 1e-5`` of each
tensor's own gradient scale leaves room for kernels that reassociate sums (~100 float32 ulps)
while every wrong variant checked below (a weight read at the wrong index, no role swap, a
missing factor 1/2, a landing level one fine-grid cell off, a discount read at the landing level
instead of the fine-grid index, a step size not carried over) is off by more than ``100 * TOL``; measured: one cell off 1.2e-2, k_inv at ts 9e-2,
factor 1 0.5, no swap 12.
"""

from __future__ import annotations

import math

import pytest
import torch

from srpo.algorithms.base import Batch, RewardFn
from srpo.algorithms.srpo import SRPO
from srpo.config import load_config
from srpo.models.tiny import build_tiny_flux
from srpo.rewards.srp import SRP
from srpo.rewards.tiny import build_tiny_clip

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
POS_WORDS = ["Natural-lighting", "Detail", "Detailed", "Real"]
NEG_WORDS = ["Concept art", "Painting", "Anime", "Flat", "Oil"]
POS, NEG = "Real", "Painting"  # the batch's words (any pair of the lists)
GUIDANCE = 3.5  # train.guidance: the gradient forward's embedded guidance
T, K_MAX, MARGIN = 1000, 100, 5  # method.cells, max_step_cells, ts_margin (SRPO.md defaults)
LOSS_SCALE = 0.5
TOL = 1e-5
# (ts of sample 0, ts of sample 1): both ends of the allowed range [5, T - 5] and the middle
TS_CASES = [(MARGIN, T - MARGIN), (T - MARGIN, MARGIN), (500, 437)]


def config(**sections):
    tree = {"model": {"name": "tiny_flux"}, "reward": {"name": "tiny_clip"},
            "srp": {"pos_words": POS_WORDS, "neg_words": NEG_WORDS},
            "rollout": {"steps": 2, "height": 32, "width": 32, "guidance": 1.0},
            "train": {"guidance": GUIDANCE, "device": "cpu", "seed": 0, "batch_size": 2, "lr": 1e-3,
                      "grad_clip": 1.0, "max_steps": 1},
            "data": {"prompts": PROMPTS}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(tree)


@pytest.fixture(scope="module")
def world():
    model = build_tiny_flux(seed=0)
    reward = build_tiny_clip(seed=0).frozen()
    cond = model.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(model.latent_shape(2, 32, 32), generator=g)
    x0 = torch.randn(eps.shape, generator=g) * 0.8  # a stand-in for a rollout's clean latents
    batch = Batch(PROMPTS, cond, x0, eps, 3, [0, 1], POS, NEG, loss_scale=LOSS_SCALE)
    return model, reward, batch


def grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.transformer.named_parameters()}


def production(cfg, world, ts):
    """The production SRPO backward with its ts draw forced to ``ts`` (the one replacement)."""
    model, reward, batch = world
    alg = SRPO(cfg, RewardFn(reward, SRP(reward, cfg.srp.pos_words, cfg.srp.neg_words, cfg.srp.template)))
    drawn = alg.draw_ts(batch)
    assert all(MARGIN <= t <= T - MARGIN for t in drawn)
    alg.draw_ts = lambda b, member=0: list(ts[member] if isinstance(ts[0], tuple) else ts)
    model.transformer.zero_grad(set_to_none=True)
    out = alg.backward(model, batch)
    return grads(model), out


# ---------------------------------------------------------------- the reference, from SRPO.md

def shift3(t: torch.Tensor) -> torch.Tensor:
    """FLUX / SD3 time shift m t / (1 + (m - 1) t), m = 3."""
    return 3 * t / (1 + 2 * t)


G = shift3(torch.linspace(1, 0, 51, dtype=torch.float64))  # the 50-step inference grid
L = torch.linspace(float(G[5]), float(G[25]), T, dtype=torch.float64)  # the fine training grid
K_POS = torch.linspace(0.10, 0.25, T, dtype=torch.float64)
K_INV = torch.linspace(0.30, 0.01, T, dtype=torch.float64)



def branch_plan(ts: int, *, inv_k_at: str = "ts2", den_b_off: int = 0):
    """Per SRPO.md: k = min(T - ts, K, ts); denoise a = L[T-ts-k] -> b = L[T-ts]; inversion
    ts2 = max(ts - k, 1), a = L[T-ts2] -> b = L[T - min(ts2 + k, T)]."""
    k = min(T - ts, K_MAX, ts)
    ts2 = max(ts - k, 1)
    denoise = (float(L[T - ts - k]), float(L[T - ts + den_b_off]), float(K_POS[ts]))
    inversion = (float(L[T - ts2]), float(L[T - min(ts2 + k, T)]), float(K_INV[ts2 if inv_k_at == "ts2" else ts]))
    return denoise, inversion


def per_sample(values, like):
    return torch.tensor(values, dtype=torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def direct_align_images(model, batch, a_list, b_list):
    x0, eps = batch.x0, batch.eps
    a, b = per_sample(a_list, x0), per_sample(b_list, x0)
    x_a = ((1 - a) * x0 + a * eps).detach()
    v = model.velocity(x_a, a.flatten(), batch.cond, GUIDANCE)
    x_b = x_a + (b - a) * v
    x0_hat = (x_b - b * eps) / (1 - b)
    return model.decode(x0_hat)


def srp_reward(reward, images, prompts, pos, neg, k_list):
    """scale * f_img . ((1 + k) f_txt("pos. prompt") - f_txt("neg. prompt")); CLIP's scale is
    logit_scale.exp() / 20 (SRPO.md)."""
    scale = float(reward.model.logit_scale.exp()) / 20
    f_img = reward.encode_image(images)
    f_pos = reward.encode_text([f"{pos}. {p}" for p in prompts])
    f_neg = reward.encode_text([f"{neg}. {p}" for p in prompts])
    k = torch.tensor(k_list, dtype=torch.float32)[:, None]
    return scale * (f_img * ((1 + k) * f_pos - f_neg)).sum(-1)


def reference(world, ts, *, swap=True, factor=0.5, inv_k_at="ts2", den_b_off=0):
    """Gradient of relu(0.7 - r_denoise).sum() * s * factor + relu(0.7 - r_inversion).sum() * s * factor."""
    model, reward, batch = world
    plans = [branch_plan(t, inv_k_at=inv_k_at, den_b_off=den_b_off) for t in ts]
    model.transformer.zero_grad(set_to_none=True)
    total, rewards = 0.0, {}
    for name, index in (("denoise", 0), ("inversion", 1)):
        a, b, k = zip(*(p[index] for p in plans))
        images = direct_align_images(model, batch, a, b)
        swapped = name == "inversion" and swap  # the inversion branch scores with the roles swapped
        pos, neg = (batch.neg_word, batch.pos_word) if swapped else (batch.pos_word, batch.neg_word)
        r = srp_reward(reward, images, batch.prompts, pos, neg, k)
        rewards[name] = r.detach()
        total = total + torch.relu(0.7 - r).sum() * batch.loss_scale * factor
    total.backward()
    return grads(model), rewards, float(total.detach())


def max_rel_err(got: dict, want: dict) -> float:
    """max over tensors of max|got - want| / max|want| (tensors with a zero gradient: abs error
    relative to the largest gradient element anywhere)."""
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0
    return max(float((got[n] - w).abs().max()) / (float(w.abs().max()) or scale) for n, w in want.items())


# ---------------------------------------------------------------- tests

def test_reference_grid_and_the_production_ts_draw():
    """The reference grid spans ~0.964 down to 0.75 (SRPO.md), and production draws ts uniformly
    over exactly [ts_margin, T - ts_margin]: the forced ts below are its two ends and its middle."""
    assert float(L[0]) == pytest.approx(0.96429, abs=1e-5) and float(L[-1]) == pytest.approx(0.75, abs=1e-12)
    cfg = config()
    alg = SRPO(cfg, RewardFn(None))
    drawn = [t for step in range(2500) for t in alg.draw_ts(Batch([], {}, None, None, step, [0, 1]))]
    assert min(drawn) == MARGIN and max(drawn) == T - MARGIN


@pytest.mark.parametrize("ts", TS_CASES)
def test_srpo_gradient_equals_the_spec_computation(world, ts):
    cfg = config()
    got, out = production(cfg, world, ts)
    want, rewards, loss = reference(world, ts)
    for name, r in rewards.items():  # the hinge is active for every sample (else a zero gradient would pass)
        assert (r < 0.7).all(), (name, r)
    assert sum(float(g.abs().sum()) for g in want.values()) > 0
    assert sum(int((g != 0).any()) for g in want.values()) > 0.9 * len(want)  # nearly every tensor gets a gradient
    err = max_rel_err(got, want)
    assert err < TOL, err
    # the logged metrics are the same quantities
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ts"] == sum(ts) / 2
    assert out["denoise/reward"] == pytest.approx(float(rewards["denoise"].mean()), rel=1e-5, abs=1e-6)
    assert out["inversion/reward"] == pytest.approx(float(rewards["inversion"].mean()), rel=1e-5, abs=1e-6)


def test_the_comparison_is_discriminating(world):
    """Plausible wrong implementations give gradients far outside the tolerance."""
    ts = TS_CASES[2]
    got, _ = production(config(), world, ts)
    wrong = {
        "k_inv read at ts, not ts2": dict(inv_k_at="ts"),
        "inversion without the role swap": dict(swap=False),
        "branch factor 1 instead of 1/2": dict(factor=1.0),
        "denoise landing one cell off": dict(den_b_off=1),
    }
    for what, kw in wrong.items():
        err = max_rel_err(got, reference(world, ts, **kw)[0])
        assert err > 100 * TOL, (what, err)


def discounted_reference(world, passes_ts, *, cells=100, k_max=41, carry=True, discount_at="ts"):
    """The reference Qwen-Image trainer's update, written from its loop: for each of the passes,
    k = min(T - ts, k_prev, ts) (k_prev starts at K and carries over), a = L[T - min(ts + k, T)]
    -> b = L[T - ts] on L = linspace(g[5], g[40], T) of the shift-1 50-step schedule, reward
    pos - neg (k = 0) times d = shift3(linspace(0, 1, T + 1))[ts], loss -r / passes."""
    model, reward, batch = world
    g = torch.linspace(1, 0, 51, dtype=torch.float64)  # shift 1
    grid = torch.linspace(float(g[5]), float(g[40]), cells, dtype=torch.float64)
    d_table = shift3(torch.linspace(0, 1, cells + 1, dtype=torch.float64))
    model.transformer.zero_grad(set_to_none=True)
    caps = [k_max] * len(passes_ts[0])
    total, rewards = 0.0, []
    for ts in passes_ts:
        ks = [min(cells - t, c if carry else k_max, t) for t, c in zip(ts, caps)]
        caps = ks
        a = [float(grid[cells - min(t + k, cells)]) for t, k in zip(ts, ks)]
        b = [float(grid[cells - t]) for t in ts]
        r = srp_reward(reward, direct_align_images(model, batch, a, b), batch.prompts, POS, NEG, [0.0] * len(ts))
        where = ts if discount_at == "ts" else [round(bi * cells) for bi in b]
        d = torch.tensor([float(d_table[i]) for i in where], dtype=torch.float32)
        rewards.append((r * d).detach())
        total = total + (-(r * d)).sum() * batch.loss_scale / len(passes_ts)
    total.backward()
    return grads(model), rewards


QWEN = dict(model={"name": "tiny_flux", "shift": 1.0},
            method={"variant": "discounted", "passes": 2, "index_range": [5, 40], "cells": 100,
                    "max_step_cells": 41, "ts_margin": 2})


def test_discounted_variant_is_the_reference_qwen_image_update(world):
    """method.variant discounted: two denoise passes with their own ts, k capped by the previous
    pass's, reward pos - neg times the discount read at the pass's fine-grid index ts."""
    cfg = config(**QWEN)
    model = world[0]
    model.shift = 1.0  # the recipe's model.shift (the fixture's model was built at 3)
    try:
        _discounted_cases(cfg, world)
    finally:
        model.shift = 3.0


def _discounted_cases(cfg, world):
    cases = [((2, 98), (98, 2)), ((60, 70), (30, 90)), ((10, 5), (60, 70))]
    for passes_ts in cases:
        got, out = production(cfg, world, passes_ts)
        want, rewards = discounted_reference(world, passes_ts)
        assert max_rel_err(got, want) < TOL
        assert out["pass1/reward"] == pytest.approx(float(rewards[1].mean()), rel=1e-5, abs=1e-6)
        assert "inversion/reward" not in out and "pass2/reward" not in out
    # discriminating: the discount read at the landing level (srpo before this variant), or k not carried
    got, _ = production(cfg, world, cases[1])
    assert max_rel_err(got, discounted_reference(world, cases[1], discount_at="level")[0]) > 100 * TOL
    got, _ = production(cfg, world, cases[2])
    assert max_rel_err(got, discounted_reference(world, cases[2], carry=False)[0]) > 100 * TOL


def test_bf16_autocast_update_through_the_production_step():
    """train.autocast bf16 through srpo.step.update after memory.prepare: finite loss, weights
    move, and differently (slightly) from the same update in fp32; the reward runs under fp16
    autocast (train.reward_autocast auto) and that changes the update too."""
    from srpo import memory, parallel, setup, step as steps
    from srpo.setup import build

    def one_update(autocast, reward_autocast="auto"):
        cfg = config(train={"autocast": autocast, "reward_autocast": reward_autocast})
        model, reward_fn, algorithm = build(cfg, torch.device("cpu"))
        memory.prepare(model, cfg)
        assert model.autocast_dtype == {"bf16": torch.bfloat16, "none": None}[autocast]
        fp16_reward = autocast == "bf16" and reward_autocast == "auto"
        assert reward_fn.autocast_dtype == (torch.float16 if fp16_reward else None)
        params = [p for p in model.transformer.parameters() if p.requires_grad]
        assert params and all(p.dtype == torch.float32 for p in params)  # fp32 master weights
        before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
        ctx = parallel.Context(device=torch.device("cpu"))
        batches = steps.Batches(cfg, model, algorithm, PROMPTS, ctx)
        row = steps.update(model, algorithm, setup.make_optimizer(params, cfg), params, batches, cfg, ctx, 0)
        after = model.transformer.state_dict()
        return row, {k: (after[k] - before[k]).double() for k in before}

    row16, d16 = one_update("bf16")
    row32, d32 = one_update("none")
    row_b, _ = one_update("bf16", reward_autocast="none")  # bf16 model, fp32 reward
    for row in (row16, row32, row_b):
        assert row["skipped"] == 0 and math.isfinite(row["loss"]) and row["loss"] > 0
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        assert (row["pos_word"], row["neg_word"]) == (POS_WORDS[1], NEG_WORDS[1])  # the cycle starts at pair 2
    norm = lambda d: math.sqrt(sum(float((v**2).sum()) for v in d.values()))  # noqa: E731
    assert norm(d16) > 0 and norm(d32) > 0  # the weights moved
    # AdamW's first step is ~lr * sign(g): the elements with tiny gradients may flip under bf16,
    # so compare directions; the bulk of the update agrees, and it is not the fp32 update
    cos = sum(float((d16[k] * d32[k]).sum()) for k in d16) / (norm(d16) * norm(d32))
    assert 0.6 < cos < 1 - 1e-6, cos
    rel = lambda x, y: abs(x - y) / abs(y)  # noqa: E731
    assert 1e-7 < rel(row16["loss"], row32["loss"]) < 1e-2  # measured ~3e-5
    assert 1e-5 < rel(row16["grad_norm"], row32["grad_norm"]) < 0.05  # measured ~3e-3
    assert row_b["loss"] != row16["loss"] and row_b["loss"] != row32["loss"]  # the fp16 reward changed it
