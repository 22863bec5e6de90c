"""The baselines (refl, draft, grpo, direct_align): each trains through the real CLI, and ReFL's and
Direct-Align's gradients equal a direct computation."""

import json
import math
from pathlib import Path

import pytest
import torch

from srpo.algorithms import ALGORITHMS, RewardFn
from srpo.cli import main as srpo_main
from srpo.algorithms.base import Batch
from srpo.algorithms.refl import step_range
from srpo.config import load_config
from srpo.method import inference_grid
from srpo.models.tiny import build_tiny_flux
from srpo.rewards.srp import SRP
from srpo.rewards.tiny import build_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]


def srpo_cli(*args):
    """The CLI entry point `python -m srpo` calls, in this process (saves the imports per run)."""
    return srpo_main([str(a) for a in args])


FAST = ["--set", "train.max_steps=2", "--set", "rollout.steps=4", "--set", "data.eval_prompts=null",
        "--set", "log.sample_every=0", "--set", "log.checkpoint_every=0", "--set", "log.tensorboard=false",
        "--set", "log.progress=false"]


@pytest.mark.parametrize("algorithm,extra", [
    ("refl", []),
    ("draft", ["--set", "draft.k=2"]),
    ("grpo", ["--set", "grpo.group_size=3", "--set", "grpo.kl_beta=0.04"]),
    ("direct_align", []),
])
def test_trains_through_the_cli(tmp_path, algorithm, extra):
    out = tmp_path / "run"
    code = srpo_cli("train", ROOT / "configs/tiny.yaml", "--output", out, "--set", f"algorithm={algorithm}",
                    *FAST, *extra)
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["skipped"] == 0 and r["grad_norm"] > 0 and abs(r["reward"]) < 10
    if algorithm == "grpo":
        assert abs(rows[0]["ratio"] - 1) < 1e-4
        assert rows[0]["kl"] < 1e-10 < rows[1]["kl"]  # the policy left the base after one update
    from diffusers import FluxTransformer2DModel

    trained = FluxTransformer2DModel.from_pretrained(out / "final")
    base = build_tiny_flux(seed=0).transformer
    assert max((a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters())) > 1e-4


def test_relative_reward_without_srp_is_a_user_error(tmp_path, capsys):
    code = srpo_cli("train", ROOT / "configs/tiny.yaml", "--output", tmp_path / "run", "--set", "algorithm=refl",
                    "--set", "refl.reward=relative", "--set", "srp.enabled=false", *FAST)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "refl.reward" in err and "srp.enabled" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_refl_step_range_matches_imagereward():
    assert step_range(40, (0.75, 1.0)) == (30, 39)  # ImageReward: 40 steps, t in [30, 39]
    assert step_range(25, (0.75, 1.0)) == (18, 24)
    assert step_range(8, (0.75, 1.0)) == (6, 7)
    assert step_range(8, (0.0, 0.1)) == (0, 0)


@pytest.fixture(scope="module")
def parts():
    model = build_tiny_flux(seed=0)
    reward = build_tiny_clip(seed=0).frozen()
    eps = torch.randn(model.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    return model, reward, eps


def config(**sections):
    tree = {"model": {"name": "tiny_flux"}, "reward": {"name": "tiny_clip"},
            "rollout": {"steps": 8, "height": 32, "width": 32, "guidance": 1.0},
            "train": {"guidance": 3.5, "device": "cpu", "seed": 4}, "data": {"prompts": PROMPTS}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(tree)


def grads(model):
    return [p.grad.clone() for p in model.transformer.parameters() if p.requires_grad]


def close(got, want):
    norm = torch.sqrt(sum((w**2).sum() for w in want))
    return norm > 0 and all(torch.allclose(g, w, atol=1e-5 * float(norm), rtol=1e-4) for g, w in zip(got, want))


def test_refl_gradient_is_the_one_step_prediction_gradient(parts):
    """No-grad Euler to a late step j, one step with grad, x0 = x_t - t v, loss relu(2 - r)."""
    model, reward, eps = parts
    cfg = config(algorithm="refl")
    alg = ALGORITHMS.get("refl")(cfg, RewardFn(reward))
    batch = Batch(PROMPTS, model.encode_prompts(PROMPTS), None, eps, 3, [0, 1], loss_scale=0.5)
    js = alg.draw_steps(batch)
    assert all(6 <= j <= 7 for j in js) and js == alg.draw_steps(batch)
    assert len({tuple(alg.draw_steps(Batch(PROMPTS, batch.cond, None, eps, s, [0, 1]))) for s in range(8)}) > 1
    model.transformer.zero_grad()
    out = alg.backward(model, batch)
    got = grads(model)

    model.transformer.zero_grad()
    grid = inference_grid(8, 3.0).tolist()
    for i, j in enumerate(js):
        cond = {k: v[i:i + 1] for k, v in batch.cond.items()}
        x = eps[i:i + 1]
        with torch.no_grad():
            for n in range(j):
                x = x + (grid[n + 1] - grid[n]) * model.velocity(x, torch.tensor([grid[n]]), cond, 1.0)
        x0 = x - grid[j] * model.velocity(x, torch.tensor([grid[j]]), cond, 3.5)
        r = reward.score(model.decode(x0), PROMPTS[i:i + 1])
        (torch.relu(2.0 - r).sum() * 0.5).backward()
    assert close(got, grads(model))
    assert abs(out["t"] - sum(grid[j] for j in js) / 2) < 1e-6


def test_direct_align_is_srpo_with_the_absolute_reward(parts):
    """At fixed ts, direct_align's gradient is SRPO.md's two-branch computation written out here
    with the absolute reward RM(x, prompt) = logit_scale.exp() / 20 * f_img . f_txt(prompt): the
    denoise branch ascends RM, the inversion branch -RM (same levels, hinge 0.7, factor 1/2).
    A wrong sign in either branch, or SRP left on, gives another gradient."""
    model, reward, eps = parts
    srp = SRP(reward, ["Real"], ["Painting"])
    cond = model.encode_prompts(PROMPTS)
    x0 = torch.randn(eps.shape, generator=torch.Generator().manual_seed(2))
    batch = Batch(PROMPTS, cond, x0, eps, 1, [0, 1], "Real", "Painting", loss_scale=0.5)
    ts = [500, 437]  # forced: the only production piece replaced

    def run(name, cfg, reward_fn):
        alg = ALGORITHMS.get(name)(cfg, reward_fn)
        alg.draw_ts = lambda b: list(ts)
        model.transformer.zero_grad()
        out = alg.backward(model, batch)
        return grads(model), out

    da, out = run("direct_align", config(algorithm="direct_align"), RewardFn(reward, srp))
    with_srp, _ = run("srpo", config(), RewardFn(reward, srp))

    # SRPO.md: g = shift3(linspace(1, 0, 51)), L = linspace(g[5], g[25], T), k = min(T - ts, 100, ts)
    g = torch.linspace(1, 0, 51, dtype=torch.float64)
    g = 3 * g / (1 + 2 * g)
    T = 1000
    L = torch.linspace(float(g[5]), float(g[25]), T, dtype=torch.float64)
    ks = [min(T - t, 100, t) for t in ts]
    denoise = [(float(L[T - t - k]), float(L[T - t])) for t, k in zip(ts, ks)]
    ts2 = [max(t - k, 1) for t, k in zip(ts, ks)]
    inversion = [(float(L[T - t2]), float(L[T - min(t2 + k, T)])) for t2, k in zip(ts2, ks)]
    scale = float(reward.model.logit_scale.exp()) / 20

    def reference(signs):
        model.transformer.zero_grad()
        for sign, lv in zip(signs, (denoise, inversion)):
            a = torch.tensor([v[0] for v in lv]).reshape(-1, 1, 1, 1)
            b = torch.tensor([v[1] for v in lv]).reshape(-1, 1, 1, 1)
            x_a = ((1 - a) * x0 + a * eps).detach()
            x_b = x_a + (b - a) * model.velocity(x_a, a.flatten(), cond, 3.5)
            images = model.decode((x_b - b * eps) / (1 - b))
            r = sign * scale * (reward.encode_image(images) * reward.encode_text(PROMPTS)).sum(-1)
            assert (r < 0.7).all()  # the hinge is active: the gradient is not zero
            (torch.relu(0.7 - r).sum() * 0.5 / 2).backward()
        return grads(model)

    want = reference((1, -1))
    assert max(w.abs().max().item() for w in want) > 0
    assert close(da, want)
    assert not close(da, reference((1, 1))) and not close(da, reference((-1, -1)))  # the branch signs matter
    assert not close(with_srp, want)  # SRP changes the gradient
    assert "denoise/pos" not in out  # no control words were scored


# ---- srpo bench: its instruments and curve readings ---------------------------------------------

def test_bench_instruments_measure_known_quantities():
    from srpo.bench.measure import flops, peak_memory, saved_activations

    a, b = torch.randn(64, 128), torch.randn(128, 32)
    assert flops(lambda: a @ b) == 2 * 64 * 128 * 32
    x = torch.randn(1_000_000, requires_grad=True)
    assert saved_activations(lambda: torch.exp(x).sum()) == pytest.approx(4e6 / 2**20)  # exp saves its output
    assert saved_activations(lambda: (x * 2).sum()) == 0  # a constant factor saves nothing

    def two_passes():  # activations are freed by each backward: the peak is one pass's
        for _ in range(2):
            torch.exp(x).sum().backward()

    assert saved_activations(two_passes) == pytest.approx(4e6 / 2**20)
    assert peak_memory(lambda: torch.ones(50_000_000).sum()) > 150  # a 191 MiB temporary


def test_bench_curve_readings():
    from srpo.bench.measure import best_within, time_to_target, value_at_gain
    from srpo.bench.runs import equal_gain_table, objective, time_to_target_table

    fast = [{"step": 0, "seconds": 0, "flops": 0, "realism": 0.1, "reward": 1.0, "hack_index": 0.0, "fidelity": 1},
            {"step": 5, "seconds": 2, "flops": 10, "realism": 0.4, "reward": 1.2, "hack_index": 0.2, "fidelity": 1},
            {"step": 10, "seconds": 4, "flops": 20, "realism": 0.6, "reward": 1.4, "hack_index": 0.4, "fidelity": 1}]
    slow = [{"step": 0, "seconds": 0, "flops": 0, "realism": 0.1, "reward": 1.0, "hack_index": 0.0, "fidelity": 1},
            {"step": 5, "seconds": 100, "flops": 900, "realism": 0.2, "reward": 1.1, "hack_index": 2.0, "fidelity": 1},
            {"step": 10, "seconds": 200, "flops": 1800, "realism": 0.3, "reward": 1.3, "hack_index": 3.0,
             "fidelity": 1}]
    assert time_to_target(fast, "realism", 0.3) == 2 and time_to_target(fast, "realism", 0.7) is None
    assert time_to_target(slow, "realism", 0.3, cost="flops") == 1800
    assert best_within(slow, "realism", 150) == 0.2
    assert value_at_gain(fast, "reward", 0.3, "hack_index") == pytest.approx(0.3)  # halfway 1.2 -> 1.4
    assert value_at_gain(slow, "reward", 0.3, "hack_index") == pytest.approx(3.0)
    assert value_at_gain(slow, "reward", 0.5, "hack_index") is None

    a = time_to_target_table({"srpo": fast, "grpo": slow})
    assert a["target"] == 0.3 and a["budget_seconds"] == 4
    assert a["runs"]["grpo"]["seconds_to_target"] / a["runs"]["srpo"]["seconds_to_target"] == 100
    assert a["runs"]["grpo"]["best_within_budget"] == 0.1
    flat = [dict(p, reward=1.0 - 0.01 * p["step"]) for p in slow]  # never gains: read at its end
    barely = [dict(p, reward=1.0 + 0.001 * p["step"]) for p in slow]  # under a tenth of the median gain
    e = equal_gain_table({"srpo": fast, "grpo": slow, "flat": flat, "barely": barely}, gain_key="reward")
    assert e["gain"] == pytest.approx(0.3)
    assert e["runs"]["srpo"]["hack_index_at_gain"] == pytest.approx(0.3)
    assert e["runs"]["grpo"]["hack_index_at_gain"] == pytest.approx(3.0)
    assert not e["runs"]["flat"]["reached"] and e["runs"]["flat"]["hack_index"] == 3.0
    assert not e["runs"]["barely"]["reached"] and e["runs"]["barely"]["max_gain"] == pytest.approx(0.01)
    # over seeds: mean, sample std, range; comparisons paired seed by seed
    from srpo.bench.runs import seed_summary

    def table(**hi):
        return {"gain": 0.2, "runs": {n: {"hack_index": v, "reached": n != "grpo_absolute"} for n, v in hi.items()}}

    s = seed_summary([table(srpo=1.0, refl_absolute=4.0, grpo_absolute=3.0, no_inversion=1.5, late_timesteps=0.9),
                      table(srpo=1.2, refl_absolute=5.0, grpo_absolute=1.1, no_inversion=1.3, late_timesteps=1.4),
                      table(srpo=0.8, refl_absolute=6.0, grpo_absolute=2.0, no_inversion=1.4, late_timesteps=1.5)])
    assert s["seeds"] == 3 and s["runs"]["srpo"]["mean"] == pytest.approx(1.0)
    assert s["runs"]["srpo"]["std"] == pytest.approx(0.2) and s["runs"]["refl_absolute"]["std"] == pytest.approx(1.0)
    assert not s["runs"]["grpo_absolute"]["reached_every_seed"] and s["runs"]["srpo"]["reached_every_seed"]
    assert s["reference_below_baselines"] == {"refl_absolute": {"below_on_every_seed": True},
                                              "grpo_absolute": {"below_on_every_seed": False}}  # 1.2 > 1.1 on seed 2
    ni, lt = s["ablations"]["no_inversion"], s["ablations"]["late_timesteps"]
    assert ni["differences"] == pytest.approx([0.5, 0.1, 0.6]) and ni["raised_on_every_seed"]
    assert ni["beyond_spread"]  # lowest 1.3 above srpo's highest 1.2
    assert not lt["raised_on_every_seed"] and not lt["beyond_spread"] and lt["mean_difference"] == pytest.approx(0.2667, abs=1e-4)
    # by default each run is read on the reward it maximises
    assert [objective(n) for n in ("srpo", "no_inversion", "grpo", "direct_align", "refl_absolute")] == \
        ["srp_reward", "srp_reward", "srp_reward", "reward", "reward"]


def test_bench_rollout_part_picks_twins_from_the_registry():
    """(d) measures, besides the bench's model, one tiny twin per guidance path the model does not
    take (never its own family's): for an embedded-guidance FLUX, the batched true-CFG SD3 twin."""
    from srpo.bench.parts import compared_twins
    from srpo.models import MODELS

    model = build_tiny_flux()
    twins = compared_twins(model)
    paths = [(MODELS.get(t).guidance_mode, MODELS.get(t).cfg_batched) for t in twins]
    assert all(MODELS.get(t).is_twin() for t in twins) and "tiny_flux" not in twins
    assert "tiny_sd3" in twins and ("embedded", True) not in paths and len(set(paths)) == len(paths)


def test_bench_cli_on_a_user_config(tmp_path, capsys):
    """Part (c) on the tiny config: SRPO's parts are timed and add up; bad --parts is a user error."""
    out = tmp_path / "bench"
    assert srpo_cli("bench", "--quick", "--config", ROOT / "configs/tiny.yaml", "--parts", "c", "--output", out,
                    "--set", "rollout.steps=3", "--set", "train.batch_size=1") == 0
    result = json.loads((out / "bench.json").read_text())
    c = result["c"]
    assert set(c["parts"]) == {"encode_prompts", "noise", "rollout", "denoise_branch", "inversion_branch", "optimizer"}
    assert set(c) == {"update", "parts", "sum_of_parts", "update_over_parts", "loop"}
    loop = c["loop"]  # the real trainer: its loop's wall time holds its model work and what runs between
    assert loop["updates"] == 3 and loop["loop_seconds"] >= loop["model_seconds"] > 0
    assert loop["update_over_model_work"] == pytest.approx(loop["loop_seconds"] / loop["model_seconds"])
    assert (out / "runs" / "c_loop" / "checkpoints").is_dir() and result["headline"]["update_over_model_work"] >= 1
    values = [c["update"], c["sum_of_parts"], c["update_over_parts"], *c["parts"].values()]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)  # each a measured median, none missing
    assert c["sum_of_parts"] == pytest.approx(sum(c["parts"].values()), rel=1e-12)
    assert c["update_over_parts"] == pytest.approx(c["update"] / c["sum_of_parts"], rel=1e-12)
    assert result["headline"]["srpo_update_over_parts"] == c["update_over_parts"]
    assert "srpo_update_over_parts" in capsys.readouterr().out
    assert srpo_cli("bench", "--parts", "x", "--output", out) == 2


def test_bench_hacking_part_on_the_lab(tmp_path, capsys):
    """Part (e) through the CLI on the lab world (quick budget): every published form and ablation
    trains at the (e) learning rate, is judged at each update, and bench.json names a hack_index
    for each; a user's --set still wins over the part's own overrides."""
    import yaml

    from srpo.bench.runs import E_OVERRIDES

    out = tmp_path / "bench"
    assert srpo_cli("bench", "--quick", "--parts", "e", "--seeds", "2", "--output", out, "--set", "train.batch_size=1",
                    "--set", "rollout.steps=4", "--set", "data.eval_steps=4", "--set", "train.seed=3") == 0
    result = json.loads((out / "bench.json").read_text())
    names = {"srpo", "direct_align", "refl_absolute", "draft_absolute", "grpo_absolute", "no_inversion",
             "late_timesteps", "absolute_reward"}
    assert set(result["headline"]["hack_index"]) == names
    assert result["e"]["overrides"] == E_OVERRIDES
    for name in names - {"absolute_reward"}:
        cfg = yaml.safe_load((out / "runs" / "e" / name / "config.yaml").read_text())
        assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["batch_size"] == 1
        curve = result["curves"]["e"][name]
        assert [p["step"] for p in curve] == [0, 1, 2, 3] and curve[0]["hack_index"] == 0.0
    assert yaml.safe_load((out / "runs" / "e" / "late_timesteps" / "config.yaml").read_text())["method"]["index_range"] == [35, 49]
    # --seeds 2: every run again at the next train.seed, the user's seed first; the table over seeds
    for name in names - {"absolute_reward"}:
        first = yaml.safe_load((out / "runs" / "e" / name / "config.yaml").read_text())
        second = yaml.safe_load((out / "runs" / "e" / "seed-1" / name / "config.yaml").read_text())
        assert (first["train"]["seed"], second["train"]["seed"]) == (3, 4) and second["train"]["lr"] == 1e-4
    seeds = result["e"]["over_seeds"]
    assert seeds["seeds"] == 2 and set(seeds["runs"]) == names
    srpo = seeds["runs"]["srpo"]
    assert srpo["values"][0] == result["e"]["runs"]["srpo"]["hack_index"] and len(srpo["values"]) == 2
    assert result["curves"]["e"]["srpo"] != result["curves"]["e-seed-1"]["srpo"]  # another seed, another run
    assert result["headline"]["seeds"] == 2 and "ablation late_timesteps raises hack_index beyond the seed spread" \
        in result["targets"]
    printed = capsys.readouterr().out
    assert "(e) hack_index at an equal gain" in printed and "(e) over 2 seeds" in printed
    assert srpo_cli("bench", "--parts", "e", "--seeds", "0", "--output", tmp_path / "x") == 2
