"""Wan2.2-A14B's two experts (srpo/models/wan_experts.py) under FSDP2 on 2 gloo processes (torchrun,
CPU), on the tiny twin ``tiny_wan_a14b`` (real diffusers ``WanTransformer3DModel`` experts).

Each rank trains on its own sample of a global batch of 2, at a noise level the test picks, so
the ranks' samples fall on different experts in the same update: update 1 puts rank 0 on
``transformer`` (high noise) and rank 1 on ``transformer_2``, update 2 the other way round,
update 3 both on ``transformer`` (``transformer_2`` gets no gradient anywhere). Without the
ranks agreeing on the experts they call, FSDP's all-gathers would pair across experts and hang
(the launch has a timeout). Full fine-tuning, LoRA of both experts, and ``train_experts:
transformer_2`` (the high-noise expert frozen, sharded with no trainable parameter; a no-grad
forward with the ranks on different experts; a gradient forward at the frozen expert's level on
one rank only stops both ranks with the same one-line error) must land on the weights of one
process on the whole batch, as must a 4-step rollout over both experts.

Tolerance: 5e-5 absolute after 3 AdamW updates at lr 3e-3 (tests/test_parallel.py: other
summation orders move weights by ~1e-6; a rank whose contribution to an expert was dropped or
doubled moves them by ~lr, and the test checks training moved them > 50x the tolerance).

Run as a script (``python tests/test_wan_experts_fsdp.py OUT``, under torchrun or alone) it is
the worker: each mode's final weights, rollout and routing record go to ``OUT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = 0.7  # boundary_timestep 700: sigma 0.9 and 0.8 on transformer, 0.3 and 0.1 on transformer_2
PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H = W = 32
STEPS = 3
TOL = 5e-5
MODES = {  # mode: (config overrides, the sigmas of samples 0 and 1 at each update)
    "full": ([], [[0.9, 0.1], [0.3, 0.8], [0.9, 0.8]]),
    "lora": (["lora.enabled=true", "lora.rank=4", "lora.alpha=4"], [[0.9, 0.1], [0.3, 0.8], [0.9, 0.8]]),
    "frozen": (["model.options.train_experts=transformer_2"], [[0.3, 0.1], [0.5, 0.2], [0.1, 0.6]]),
    # the sharded start: both experts from a saved folder; under FSDP each a skeleton of which each
    # rank reads only its rows (one process loads the folder whole); LoRA, so the adapters' initial
    # values (keyed by the whole module's parameter names) count too
    "start": (["lora.enabled=true", "lora.rank=4", "lora.alpha=4", "lora.init=gaussian"],
              [[0.9, 0.1], [0.3, 0.8], [0.9, 0.8]]),
}
FOLDER = "folder"  # the saved two-expert pipeline, beside the runs


# ---------------------------------------------------------------------- the worker

def _run_mode(mode: str, strategy: str, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from srpo import parallel, setup
    from srpo.config import load_config
    from srpo.errors import UserError
    from srpo.models import load_model
    from srpo.sampling import rollout

    sets, sigmas = MODES[mode]
    model_sets = ["model.name=tiny_wan_a14b", f"model.options.boundary_ratio={BOUNDARY}"] if mode != "start" else \
        ["model.name=wan", f"model.path={out.parent / FOLDER}", "model.options={max_sequence_length: 32}"]
    cfg = load_config("tiny-wan", [*model_sets, f"parallel.strategy={strategy}", "train.lr=3e-3", *sets])
    ctx = parallel.setup(cfg)
    start = mode == "start" and ctx.world > 1  # both experts skeletons, through the family's own load
    model = load_model(cfg.model, ctx.device, skeleton=start)
    model.set_frames(5)
    record = {"updates": [], "rank": ctx.rank}
    if start:
        from srpo.shards import is_skeleton

        record["skeleton"] = is_skeleton(model.transformer) and all(p.is_meta for p in model.transformer.parameters())
    params, optimizer, _ = setup.prepare(model, cfg, ctx, PROMPTS)
    local = [(p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.transformer.parameters()]
    record["held"] = sum(local) / sum(p.numel() for p in model.transformer.parameters())
    rows = slice(ctx.rank, ctx.rank + 1) if ctx.world > 1 else slice(0, 2)  # this rank's samples of the 2
    experts = model.transformer
    calls = []  # (expert, timesteps it was called with) on this rank, in order
    for name in ("transformer", "transformer_2"):
        getattr(experts, name).register_forward_pre_hook(
            lambda m, a, kw, n=name: calls.append((n, [round(float(t)) for t in kw["timestep"].reshape(-1)])),
            with_kwargs=True)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(model.latent_shape(2, H, W), generator=g)
    target = torch.randn(noise.shape, generator=g)
    cond = model.encode_prompts(PROMPTS)
    mine = {k: v[rows] for k, v in cond.items()}
    pos = {k: v for k, v in mine.items() if not k.startswith("negative_")}
    with torch.no_grad():
        x0 = rollout(model, mine, noise[rows], 4, 5.0)  # every rank on the same sigma grid, both experts
    record["rollout_calls"] = [n for n, _ in calls]
    if mode == "frozen":
        calls.clear()
        with torch.no_grad():  # no gradient: the ranks on different experts, the frozen one included
            model.velocity(noise[rows], torch.tensor([0.9, 0.1])[rows], pos, 1.0)
        record["no_grad_calls"] = calls[:]
        try:  # with gradient at the frozen expert's level (rank 0's sample only): an error on every rank
            model.velocity(noise[rows], torch.tensor([0.9, 0.1])[rows], pos, 1.0)
            record["error"] = None
        except UserError as e:
            record["error"] = str(e)
    for s in sigmas:
        calls.clear()
        optimizer.zero_grad(set_to_none=True)
        v = model.velocity(noise[rows], torch.tensor(s)[rows], pos, 1.0)
        (v - target[rows]).square().mean().backward()
        optimizer.step()
        record["updates"].append(calls[:])
    state = parallel.full_state_dict(model.transformer, ctx)
    records = parallel.gather_objects(record, ctx)
    if ctx.is_main:
        save_file(state, str(out / f"{mode}.safetensors"))
        torch.save(torch.stack(parallel.gather_objects(x0, ctx)) if ctx.world > 1 else x0, out / f"{mode}-x0.pt")
        (out / f"{mode}.json").write_text(json.dumps({"records": records, "params": len(params)}))
    elif ctx.world > 1:
        parallel.gather_objects(x0, ctx)
    del optimizer, params, model


def worker(out: Path) -> None:
    from srpo import parallel
    from srpo.config import load_config

    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    strategy = "fsdp" if distributed else "none"
    ctx = parallel.setup(load_config("tiny-wan", [f"parallel.strategy={strategy}"]))
    out.mkdir(parents=True, exist_ok=True)
    try:
        for mode in MODES:
            _run_mode(mode, strategy, out)
    finally:
        parallel.teardown(ctx)


# ---------------------------------------------------------------------- the tests

def _launch(out: Path, procs: int, log: Path) -> subprocess.Popen:
    from family_runs import launcher_env

    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    return subprocess.Popen([sys.executable, *launcher, str(Path(__file__).resolve()), str(out)], cwd=ROOT,
                            env=launcher_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: a hung launch is stopped whole


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from srpo.models.wan_tiny import TinyWanA14BModel

    tmp = tmp_path_factory.mktemp("experts_fsdp")
    TinyWanA14BModel.save_random(tmp / FOLDER, seed=1, boundary_ratio=BOUNDARY)
    two = _launch(tmp / "two", 2, tmp / "two.log")
    one = _launch(tmp / "one", 1, tmp / "one.log")
    codes = {}
    for name, p in (("two", two), ("one", one)):
        try:
            codes[name] = p.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a collective-order hang: torchrun and its workers
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            codes[name] = "timeout"
    return tmp, codes


@pytest.mark.parametrize("mode", list(MODES))
def test_two_experts_under_fsdp_match_one_process(runs, mode):
    import torch
    from safetensors.torch import load_file

    from srpo.models.wan_tiny import TinyWanA14BModel

    tmp, codes = runs
    for name in ("two", "one"):
        assert codes[name] == 0, (name, (tmp / f"{name}.log").read_text()[-3000:])
    records = json.loads((tmp / "two" / f"{mode}.json").read_text())["records"]
    assert [r["rank"] for r in records] == [0, 1]
    _, sigmas = MODES[mode]
    for u, s in enumerate(sigmas):
        own = [s[r] * 1000 >= BOUNDARY * 1000 for r in (0, 1)]  # each rank's sample on the high-noise expert?
        both = len(set(own)) == 2
        for r, rec in enumerate(records):
            called = [n for n, _ in rec["updates"][u]]
            real = "transformer" if own[r] else "transformer_2"
            if both:  # the ranks' samples on different experts: each rank called both, in the same order
                assert called == ["transformer", "transformer_2"], (u, r, rec["updates"][u])
            else:  # one expert for every sample anywhere: only it, on the whole batch
                assert called == [real], (u, r, rec["updates"][u])
            assert [round(s[r] * 1000)] in [t for n, t in rec["updates"][u] if n == real]  # its own sample there
    if mode != "frozen":  # the forced layout happened: different experts on the two ranks in updates 1 and 2
        assert [[n for n, _ in r["updates"][0]] for r in records] == [["transformer", "transformer_2"]] * 2
    else:
        for rec in records:  # no gradient, ranks on different experts: both called both
            assert [n for n, _ in rec["no_grad_calls"]] == ["transformer", "transformer_2"]
        errors = [rec["error"] for rec in records]
        assert errors[0] and errors[0] == errors[1] and "leaves frozen" in errors[0] and "\n" not in errors[0]
    held = [rec["held"] for rec in records]  # each rank about half of every weight (dim 0 split as torch.chunk)
    assert all(abs(h - 0.5) < 0.06 for h in held) and abs(sum(held) - 1) < 1e-9, held
    if mode == "start":  # both experts began as skeletons (parameters on the meta device), filled after sharding
        assert all(rec["skeleton"] for rec in records)
    for rec in records:  # the rollout: 4 steps x 2 CFG passes, two steps on each expert (boundary 0.7, shift 3)
        assert rec["rollout_calls"] == ["transformer"] * 4 + ["transformer_2"] * 4

    ref, got = (load_file(str(tmp / d / f"{mode}.safetensors")) for d in ("one", "two"))
    assert set(ref) == set(got) and len(ref) > 50
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < TOL, f"{mode}: max abs weight difference {diff:.3g} vs one process"
    init = TinyWanA14BModel.load(seed=1 if mode == "start" else 0, boundary_ratio=BOUNDARY).transformer.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in ref.items()}

    def moved(prefix):
        keys = [k for k in ref if k.startswith(prefix + ".")]
        if mode in ("lora", "start"):  # the adapters, from their initial values (B starts at 0)
            return max(ref[k].abs().max().item() for k in keys if ".lora_B." in k)
        return max((base[k] - init[k]).abs().max().item() for k in keys)

    if mode == "frozen":
        assert moved("transformer") == 0 and moved("transformer_2") > 50 * TOL
        assert not any(".lora_" in k for k in ref)
    else:
        assert moved("transformer") > 50 * TOL and moved("transformer_2") > 50 * TOL
        assert any(".lora_" in k for k in ref) == (mode in ("lora", "start"))
    x_ref, x_got = (torch.load(tmp / d / f"{mode}-x0.pt") for d in ("one", "two"))
    assert (x_ref.reshape(x_got.shape) - x_got).abs().max() < 1e-4


def test_fsdp_units_are_each_experts_blocks_then_the_expert():
    from torch import nn

    from srpo.parallel import blocks, fsdp_units
    from srpo.models.wan_tiny import TinyWanA14BModel

    experts = TinyWanA14BModel.load(seed=0).transformer
    units = fsdp_units(experts)
    a, b = experts.transformer, experts.transformer_2
    assert units == [*a.blocks, a, *b.blocks, b] and blocks(experts) == []
    single = TinyWanA14BModel.load(seed=0).transformer.transformer  # one transformer: its blocks, as before
    assert fsdp_units(single) == blocks(single) == list(single.blocks)
    assert isinstance(single.blocks, nn.ModuleList)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[1]))
