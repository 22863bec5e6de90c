"""``train.compile`` (srpo/compilation.py) on the tiny FLUX with LoRA, activation checkpointing
and the trainer's own setup and update: the compiled blocks give the eager velocity and the
eager LoRA gradients (1e-4), compile once (torch._dynamo's graph count does not grow after the
first update, across updates with other timesteps and control words) and have no graph break
(``fullgraph=True``). Speed is measured in benchmarks, not here."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_whole_model_compile_under_fsdp_is_a_one_line_error():
    with pytest.raises(UserError, match="train.compile model does not compose with parallel.strategy fsdp"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.compile=model", "parallel.strategy=fsdp"])


def test_compiled_blocks_under_fsdp_train_the_eager_weights(tmp_path):
    """2 gloo processes, FSDP2 + LoRA through the CLI: each block's forward compiled after it was
    sharded (FSDP's gathers stay eager) lands on the eager FSDP run's adapters (measured 1.5e-6)."""
    from safetensors.torch import load_file

    from family_runs import launcher_env, set_args

    sets = ["data.eval_prompts=null", "log.sample_every=0", "rollout.steps=2", "log.tensorboard=false",
            "log.progress=false", "log.checkpoint_every=0", "parallel.strategy=fsdp", "train.max_steps=3",
            "train.batch_size=1", "lora.enabled=true", "lora.init=gaussian", "lora.rank=4"]
    finals = {}
    for mode in ("none", "blocks"):
        out = tmp_path / mode
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "srpo", "train", str(ROOT / "configs" / "tiny.yaml"), "--output", str(out),
                              *set_args(sets + [f"train.compile={mode}"])],
                             cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        finals[mode] = load_file(str(next((out / "lora").glob("*.safetensors"))))
    a, b = finals["none"], finals["blocks"]
    assert set(a) == set(b) and a
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 2e-5, diff
    rows = [json.loads(ln) for ln in (tmp_path / "blocks" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["skipped"] for r in rows)


def test_bench_compile_measurements_on_the_tiny_model():
    """``srpo bench`` (d)'s compiled measurements on the tiny FLUX: compiled gradients and images
    equal eager's (1e-4), the compile is removed and the weights restored after each measurement."""
    from srpo.bench.compiled import update_speedup
    from srpo.bench.parts import Bench, timed_rollout

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["rollout.steps=3", "train.batch_size=2"])
    bench = Bench(cfg, torch.device("cpu"))
    start = {k: v.clone() for k, v in bench.model.transformer.state_dict().items()}
    u = update_speedup(bench, "blocks", repeats=1)
    assert u["grad_relative_difference"] < 1e-4 and u["eager_s"] > 0 and u["compiled_s"] > 0
    assert u["first_update_s"] > u["compiled_s"]  # the compile is timed apart
    assert not compilation.compiled_modules(bench.model.transformer)
    after = bench.model.transformer.state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start)
    d = timed_rollout(bench.model, cfg, bench.prompts, cfg.rollout.guidance, (3,), 1, torch.device("cpu"), "blocks")
    row = d["3"]
    assert row["compiled_vs_eager_max_diff"] < 1e-4 and row["max_pixel_difference"] < 1e-4
    assert row["speed_over_diffusers"] > 0 and d["first_call_s"] > 0
    assert not compilation.compiled_modules(bench.model.transformer)


def test_compiled_run_resumes_bit_exactly(tmp_path):
    """train.compile blocks: a run stopped after 2 updates and resumed (a fresh compile in the
    resumed trainer) ends bit for bit where an uninterrupted compiled run of 4 ends, and both
    differ from the eager run only by float rounding (the compiled kernels are deterministic)."""
    from safetensors.torch import load_file

    from srpo.trainer import train

    sets = ["rollout.steps=2", "data.eval_prompts=null", "log.sample_every=0", "log.progress=false",
            "log.tensorboard=false", "log.checkpoint_every=1", "train.compile=blocks"]

    def run(out, steps, resume=False, extra=()):
        torch._dynamo.reset()
        train(load_config(ROOT / "configs" / "tiny.yaml", [*sets, f"train.max_steps={steps}", *extra]), out,
              resume=resume)
        return load_file(str(next((out / "final").glob("*.safetensors"))))

    ref = run(tmp_path / "ref", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    assert set(ref) == set(resumed) and all(torch.equal(ref[k], resumed[k]) for k in ref)
    eager = run(tmp_path / "eager", 4, extra=["train.compile=none"])
    moved = max((eager[k] - ref[k]).abs().max().item() for k in ref)
    assert moved < 1e-4  # compiled = eager up to rounding
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
