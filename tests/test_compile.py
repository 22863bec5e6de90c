"""``train.compile`` (srpo/compilation.py) on the tiny FLUX with LoRA, activation checkpointing
and the trainer's own setup and update: the compiled blocks give the eager velocity and the
eager LoRA gradients (1e-4), compile once (torch._dynamo's graph count does not grow after the
first update, across updates with other timesteps and control words) and have no graph break
(``fullgraph=True``). Speed is measured in benchmarks, not here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from srpo import compilation, parallel, setup, step as steps
from srpo.config import load_config
from srpo.data import load_prompts
from srpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SETS = ["rollout.steps=4", "data.eval_prompts=null", "lora.enabled=true", "lora.rank=4", "lora.init=gaussian",
        "train.gradient_checkpointing=true", "train.batch_size=2", "train.grad_accum=2"]


def _run(compile_mode: str, fullgraph: bool = False):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SETS)
    ctx = parallel.setup(cfg)
    model, _, algorithm = setup.build(cfg, ctx.device, ctx)
    prompts = load_prompts(cfg.data.prompts)
    params, optimizer, _ = setup.prepare(model, cfg, ctx, prompts)
    n = compilation.apply(model.transformer, compile_mode, fullgraph=fullgraph)
    for name, p in model.transformer.named_parameters():  # B != 0: every adapter has a gradient
        if ".lora_B." in name:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    return cfg, ctx, model, algorithm, prompts, params, optimizer, n


def _velocity_and_grads(model, params, prompts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(model.latent_shape(2, 32, 32), generator=g)
    cond = model.encode_prompts(prompts[:2])  # encoded at the start (the encoders are released)
    for p in params:
        p.grad = None
    v = model.velocity(x, torch.tensor([0.3, 0.8]), cond, 1.0)
    v.square().mean().backward()
    return v.detach(), [p.grad.clone() for p in params]


@pytest.fixture(scope="module")
def eager():
    r = _run("none")
    return _velocity_and_grads(r[2], r[5], r[4])


def test_compiled_blocks_match_eager_and_compile_once(eager):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg, ctx, model, algorithm, prompts, params, optimizer, n = _run("blocks", fullgraph=True)  # no graph break
    assert n == len(parallel.blocks(model.transformer)) >= 2
    v, grads = _velocity_and_grads(model, params, prompts)
    v0, grads0 = eager
    assert (v - v0).abs().max().item() < 1e-4
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, grads0))
    assert rel < 1e-4, rel
    batches = steps.Batches(cfg, model, algorithm, prompts, ctx)
    graphs = []
    for u in range(3):  # other timesteps, control words and prompts each update; rollout and both branches
        row = steps.update(model, algorithm, optimizer, params, batches, cfg, ctx, u)
        assert row["skipped"] == 0
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 2, graphs  # no recompilation after the first update
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_under_fsdp_is_a_one_line_error():
    with pytest.raises(UserError, match="train.compile blocks does not compose with parallel.strategy fsdp"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.compile=blocks", "parallel.strategy=fsdp"])
