"""``srpo bench``: SRPO against its baselines on the lab world, and the cost of its parts.

(a) time / FLOPs to a judge target and best score within a budget (:mod:`.runs`);
(b) time per update and peak memory against rollout steps and DRaFT's K (:mod:`.parts`);
(c) SRPO's update against the sum of its parts timed alone;
(d) rollout speed against each family's diffusers pipeline on the same weights (the bench's model and
    the tiny twins of the registered families that guide another way, :func:`.parts.compared_twins`);
(e) hack_index at equal reward gain, with SRPO's ablations.

Every ratio is measured within one run of this command, on one machine.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..errors import UserError

PARTS = ("a", "b", "c", "d", "e")
ALGORITHMS = ("srpo", "direct_align", "refl", "draft", "grpo")

# Budgets: updates per run and checkpoint spacing for (a) / (e) (None: the config's train.max_steps
# and log.checkpoint_every); repeats and sizes for (b)-(d); overrides applied to every measurement.
FULL = {"updates": None, "grpo_updates": None, "eval_every": 5, "eval_prompts": None, "repeats": 3,
        "draft_ks": (1, 2, 4, 8), "steps": (25, 50), "overrides": []}
QUICK = {"updates": 3, "grpo_updates": 3, "eval_every": 1, "eval_prompts": 8, "repeats": 1,
         "draft_ks": (1, 4), "steps": (25, 50),
         "overrides": ["rollout.steps=8", "data.eval_steps=8", "grpo.group_size=4", "train.batch_size=2"]}


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _ratio(num, den):
    return None if num is None or den in (None, 0) else num / den


def headline(result: dict) -> dict:
    """The ratios the issue names, each from measurements of this run (None where not measured)."""
    out: dict = {}
    a, b, c, d, e = (result.get(k) for k in PARTS)
    if a:
        runs = a["runs"]
        out["grpo_over_srpo_time_to_target"] = _ratio(runs["grpo"]["seconds_to_target"],
                                                      runs["srpo"]["seconds_to_target"])
        out["grpo_over_srpo_flops_to_target"] = _ratio(runs["grpo"]["flops_to_target"],
                                                       runs["srpo"]["flops_to_target"])
    if c:
        out["srpo_update_over_parts"] = c["update_over_parts"]
        if c.get("loop"):
            out["update_over_model_work"] = c["loop"]["update_over_model_work"]
    if b:
        srpo = b["by_steps"]["srpo"]
        steps = sorted(srpo, key=int)
        out["srpo_memory_50_over_25"] = _ratio(srpo[steps[-1]]["peak_mib"], srpo[steps[0]]["peak_mib"])
        k_max = max(int(k) for k in b["draft_k"] if k.isdigit())
        out["draft_memory_over_srpo"] = _ratio(b["draft_k"][str(k_max)]["peak_mib"], srpo[steps[0]]["peak_mib"])
        out["draft_plain_memory_over_srpo"] = _ratio(b["draft_k"][f"{k_max}-plain"]["peak_mib"],
                                                     srpo[steps[0]]["peak_mib"])
    if d:
        rows = {name: [row for k, row in fam.items() if k.isdigit()] for name, fam in d["rollout"].items()}
        out["rollout_speed_over_diffusers"] = {n: min(r["speed_over_diffusers"] for r in rs) for n, rs in rows.items()}
        lab = rows[next(iter(rows))]  # the bench's own model first
        if "compile_speedup" in lab[0]:
            out["compile_speedup_rollout"] = lab[0]["compile_speedup"]  # at the first step count (25)
            out["compiled_max_pixel_difference"] = max(r["compiled_vs_eager_max_diff"] for rs in rows.values()
                                                       for r in rs)
        if d.get("update"):
            out["compile_speedup_update"] = d["update"]["speedup"]
            out["compiled_grad_relative_difference"] = d["update"]["grad_relative_difference"]
    if e:
        out["hack_index"] = {name: row["hack_index"] for name, row in e["runs"].items()}
        out["hack_index_at_equal_gain"] = {name: row["reached"] for name, row in e["runs"].items()}
        if e.get("over_seeds"):
            s = e["over_seeds"]
            out["hack_index_mean_over_seeds"] = {n: r["mean"] for n, r in s["runs"].items()}
            out["hack_index_std_over_seeds"] = {n: r["std"] for n, r in s["runs"].items()}
            out["seeds"] = s["seeds"]
            out["srpo_below_baseline_every_seed"] = {n: r["below_on_every_seed"]
                                                     for n, r in s["reference_below_baselines"].items()}
            out["ablation_beyond_spread"] = {n: r["beyond_spread"] for n, r in s["ablations"].items()}
    return out


def targets(h: dict) -> dict:
    """The issue's targets, pass / fail (absent where not measured)."""
    checks = {
        "grpo_over_srpo_time_to_target >= 75": ("grpo_over_srpo_time_to_target", lambda v: v >= 75),
        "srpo_update_over_parts <= 1.10": ("srpo_update_over_parts", lambda v: v <= 1.10),
        "update_over_model_work <= 1.05": ("update_over_model_work", lambda v: v <= 1.05),
        "srpo_memory_50_over_25 <= 1.05": ("srpo_memory_50_over_25", lambda v: v <= 1.05),
        "rollout_speed_over_diffusers >= 1.0": ("rollout_speed_over_diffusers", lambda v: min(v.values()) >= 1.0),
        "lab rollout_speed_over_diffusers >= 1.4 (compiled)": (
            "compile_speedup_rollout", lambda v: next(iter(h["rollout_speed_over_diffusers"].values())) >= 1.4),
        "compile_speedup_update >= 1.3": ("compile_speedup_update", lambda v: v >= 1.3),
        "compiled images within 1e-4 of eager": ("compiled_max_pixel_difference", lambda v: v <= 1e-4),
        "compiled gradients within 1e-4 relative": ("compiled_grad_relative_difference", lambda v: v <= 1e-4),
    }
    out = {name: bool(fn(h[key])) for name, (key, fn) in checks.items() if h.get(key) is not None}
    hi, reached = h.get("hack_index") or {}, h.get("hack_index_at_equal_gain") or {}
    if hi.get("srpo") is not None:  # against the runs that reached the common gain
        others = [v for n, v in hi.items() if n != "srpo" and v is not None and reached.get(n, True)]
        out["srpo hack_index lowest at equal gain"] = all(hi["srpo"] <= v for v in others)
        for n in ("no_inversion", "late_timesteps", "absolute_reward"):
            if hi.get(n) is not None:
                out[f"ablation {n} raises hack_index"] = hi[n] > hi["srpo"]
    if h.get("seeds"):
        out[f"srpo below every baseline on all {h['seeds']} seeds"] = all(h["srpo_below_baseline_every_seed"].values())
        for n, v in h["ablation_beyond_spread"].items():
            out[f"ablation {n} raises hack_index beyond the seed spread"] = v
    return out


def run_bench(output, quick: bool = False, parts=PARTS, config=None, overrides=(), progress: bool = True,
              compile: str = "model", seeds: int = 1) -> dict:
    """Run the chosen parts, print tables, write ``output/bench.json``; returns the result.
    ``compile``: the ``train.compile`` mode (d) measures against eager and the pipelines (none: eager only).
    ``seeds``: (e) trains every run with ``train.seed`` 0 .. seeds - 1 and reports mean and spread."""
    from .parts import Bench, srpo_parts, update_costs

    output = Path(output)
    if (output / "runs").exists():
        raise UserError(f"{output} already holds a bench run: choose another --output or delete it")
    output.mkdir(parents=True, exist_ok=True)
    budget = QUICK if quick else FULL
    say = print if progress else (lambda *a, **k: None)
    cfg, judge = _config(config, list(budget["overrides"]) + list(overrides))
    if judge is None and ({"a", "e"} & set(parts)):
        say("(a) and (e) need the lab world's judge: skipped for this config")
        parts = [p for p in parts if p not in ("a", "e")]
    t0 = time.perf_counter()
    result: dict = {"machine": machine(), "quick": quick, "config": str(config or "configs/lab.yaml"),
                    "overrides": list(budget["overrides"]) + list(overrides)}
    build_info = Path(cfg.model.path).parent / "build.json" if cfg.model.path else None
    if build_info is not None and build_info.is_file():
        result["weights"] = json.loads(build_info.read_text())  # which lab build was measured
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    bench = Bench(cfg, device)
    if "b" in parts:
        say("(b) time and memory per update")
        result["b"] = update_costs(bench, ALGORITHMS, budget["steps"], budget["draft_ks"], budget["repeats"], say)
    if "c" in parts:
        say("(c) SRPO update against its parts")
        result["c"] = srpo_parts(bench, repeats=max(3, budget["repeats"]))
        result["c"]["loop"] = _loop(config, budget, output, overrides)
        say(f"  (c) trainer loop: {result['c']['loop']['update_over_model_work']:.3f} x its model work")
    if "d" in parts:
        say("(d) rollout against the diffusers pipelines")
        result["d"] = compiled_speeds(bench, budget, compile, quick, say)
    if "a" in parts or "e" in parts:
        _training_parts(result, bench, cfg, judge, config, parts, budget, output, overrides, say, seeds)
    result["headline"] = headline(result)
    result["targets"] = targets(result["headline"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (output / "bench.json").write_text(json.dumps(result, indent=1))
    say(report(result))
    return result


def compiled_speeds(bench, budget, compile: str, quick: bool, say) -> dict:
    """(d): the update eager against compiled on the bench's model, then the rollout + decode of the
    bench's model and of every family's tiny twin (quick: one twin per other guidance path) against
    its diffusers pipeline, ours compiled."""
    from .compiled import update_speedup
    from .parts import every_twin, rollout_speeds

    repeats = max(3, budget["repeats"])
    out: dict = {"compile": compile, "update": None}
    if compile != "none":
        # the update's ratio is the one nearest its target: five interleaved rounds (three when quick)
        out["update"] = update_speedup(bench, compile, 3 if quick else 5)
        u = out["update"]
        say(f"  (d) update: eager {u['eager_s']:.3f}s, compiled {u['compiled_s']:.3f}s ({u['speedup']:.2f}x); "
            f"first compiled update {u['first_update_s']:.1f}s")
    out["rollout"] = rollout_speeds(bench, budget["steps"], repeats, None if quick else every_twin(bench.model), compile)
    return out


def _loop(config, budget, output, overrides) -> dict:
    from .runs import loop_overhead

    updates = budget["updates"] or 10
    sets = list(budget["overrides"]) + list(overrides) + [f"train.max_steps={updates}", "log.progress=false"]
    if budget is QUICK:
        sets.append("log.checkpoint_every=1")  # the worst case: a checkpoint after every update
    cfg, _ = _config(config, sets)
    return loop_overhead(cfg, output / "runs" / "c_loop")


def _config(config, overrides):
    """The config (default: the lab's) and its judge folder, ``weights/judge`` next to the base
    model's folder; ``None`` when there is none (then only parts b-d can run)."""
    from ..config import load_config
    from ..lab.run import lab_config

    if config is None:
        cfg = lab_config(None, overrides)  # says how to build the lab weights when they are missing
    else:
        if not Path(config).is_file():
            raise UserError(f"bench config {config} not found")
        cfg = load_config(config, overrides)
    judge = Path(cfg.model.path).parent / "judge" if cfg.model.path else None
    return cfg, judge if judge is not None and judge.is_dir() else None


def _training_parts(result, bench, cfg, judge, config, parts, budget, output, overrides, say, seeds=1) -> None:
    from ..data import load_prompts
    from ..lab.judge import Judge
    from ..lab.run import Evaluator
    from .measure import flops
    from .runs import (ABLATIONS, E_OVERRIDES, PUBLISHED, SAME_REWARD, equal_gain_table, seed_summary,
                       time_to_target_table, train_and_judge)

    heldout = load_prompts(cfg.data.eval_prompts, "lab held-out prompts", cfg.data.prompt_column)
    if budget["eval_prompts"]:
        heldout = heldout[: budget["eval_prompts"]]
    evaluator = Evaluator(cfg, heldout, Judge.load(judge))
    before, _ = evaluator()
    # (part, run name, folder, overrides); (e) runs at E_OVERRIDES' optimisation pressure, once per seed
    plan = []
    if "a" in parts:
        plan += [("a", name, f"a/{name}", (extra, [])) for name, extra in SAME_REWARD.items()]
    if "e" in parts:
        runs_e = {"srpo": [], **PUBLISHED, **{k: v for k, v in ABLATIONS.items() if k != "absolute_reward"}}
        for seed in range(seeds):
            part, where = ("e", "e") if seed == 0 else (f"e-seed-{seed}", f"e/seed-{seed}")
            reseed = [f"train.seed={cfg.train.seed + seed}"] if seed else []  # after the user's --set, below
            plan += [(part, name, f"{where}/{name}", (E_OVERRIDES + extra, reseed)) for name, extra in runs_e.items()]
    curves: dict = {"a": {}, "e": {}}
    for part, name, folder, (extra, reseed) in plan:
        updates = (budget["grpo_updates"] if name.startswith("grpo") else budget["updates"]) or cfg.train.max_steps
        every = budget["eval_every"] or cfg.log.checkpoint_every or max(1, updates // 4)
        run_overrides = list(budget["overrides"]) + extra + list(overrides) + [
            f"train.max_steps={updates}", f"log.checkpoint_every={every}", "log.keep_checkpoints=10000",
            "log.sample_every=0", "data.eval_prompts=null", "log.progress=false", *reseed]
        run_cfg, _ = _config(config, run_overrides)
        f = flops(bench.update_fn(run_cfg))
        bench.restore()
        say(f"({part}) training {name}: {updates} updates at lr {run_cfg.train.lr:g}, {f / 1e9:.2f} GFLOP per update")
        curves.setdefault(part, {})[name] = train_and_judge(run_cfg, output / "runs" / folder, evaluator, before, f)
        end = curves[part][name][-1]
        say(f"      {end['seconds']:.1f}s of training; realism {before['realism']:.3f} -> {end['realism']:.3f}, "
            f"reward {before['reward']:.3f} -> {end['reward']:.3f}, hack_index {end['hack_index']:.2f}")
    result["curves"] = curves
    if "a" in parts:
        result["a"] = time_to_target_table(curves["a"])
    if "e" in parts:
        tables = []
        for part in ["e"] + [f"e-seed-{s}" for s in range(1, seeds)]:
            table = equal_gain_table(curves[part])
            table["runs"]["absolute_reward"] = table["runs"]["direct_align"]
            tables.append(table)
        result["e"] = dict(tables[0], overrides=E_OVERRIDES)  # seed 0 (the config's own train.seed)
        if seeds > 1:
            result["e"]["over_seeds"] = seed_summary(tables)


def report(result: dict) -> str:
    """Plain-text tables of a bench result."""
    from .tables import render

    return render(result)
