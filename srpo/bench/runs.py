"""Benchmarks (a) and (e): training runs on the lab world, judged at every checkpoint.

(a) every algorithm maximises the *same* reward, the semantic-relative one with the realism
    words (the baselines with ``<algo>.reward: relative``), so the comparison is of optimisers:
    wall time and FLOPs to reach a judge realism target, and the best realism within a budget.
(e) the algorithms in their published form (baselines on the absolute reward) and SRPO's
    ablations, each switched on alone, at the higher learning rate ``E_OVERRIDES``: hack_index at
    an equal gain of the held-out reward each run maximises.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from safetensors.torch import load_file

from .measure import best_within, time_to_target, value_at_gain

# name -> config overrides (on top of configs/lab.yaml)
SAME_REWARD = {
    "srpo": [],
    "refl": ["algorithm=refl", "refl.reward=relative"],
    "draft": ["algorithm=draft", "draft.reward=relative"],
    "grpo": ["algorithm=grpo", "grpo.reward=relative"],
}
PUBLISHED = {
    "direct_align": ["algorithm=direct_align"],
    "refl_absolute": ["algorithm=refl"],
    "draft_absolute": ["algorithm=draft"],
    "grpo_absolute": ["algorithm=grpo"],
}
ABLATIONS = {
    "no_inversion": ["method.inversion_branch=false"],
    "late_timesteps": ["method.index_range=[35, 49]"],
    "absolute_reward": ["algorithm=direct_align"],  # the same run as direct_align
}
# (e) is about what optimisation pressure does to each objective, so its runs use the lab control's
# learning rate (1e-4, 20x the lab's SRPO rate): at 5e-6 the absolute-reward runs gain < 0.02 of
# reward in 30 updates and an "equal gain" is read at noise level (BENCHMARKS.md).
E_OVERRIDES = ["train.lr=1e-4"]
METRICS = ("realism", "fidelity", "hack_index", "reward", "srp_reward")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loop_overhead(cfg, output: Path) -> dict:
    """(c)'s loop: the real trainer on ``cfg``; its update loop's wall time over the model work in
    it (updates, guard evaluations, sample renders). The rest (metrics, logs, checkpoint writes,
    best/ exports) is what runs between updates that is not model work."""
    from ..trainer import train

    summary = train(cfg, output)
    loop, model = summary["loop_seconds"], summary["model_seconds"]
    return {"updates": summary["steps"], "loop_seconds": loop, "model_seconds": model,
            "update_over_model_work": loop / model, "checkpoint_every": cfg.log.checkpoint_every}


def train_and_judge(cfg, output: Path, evaluator, before: dict, flops_per_update: float) -> list[dict]:
    """Train with the real trainer, then judge every checkpoint. Returns the curve: points with
    the update, cumulative training seconds (the trainer's own per-update times) and FLOPs."""
    from .. import checkpoint
    from ..trainer import train

    train(cfg, output)
    seconds, total = {}, 0.0
    for row in _rows(output):
        total += row["seconds"]
        seconds[row["step"]] = total
    curve = [{"step": 0, "seconds": 0.0, "flops": 0.0, **{k: before[k] for k in METRICS}}]
    for ckpt in checkpoint.checkpoint_dirs(output):
        step = json.loads((ckpt / "state.json").read_text())["step"]
        metrics, _ = evaluator(load_file(str(ckpt / "trainable.safetensors")))
        curve.append({"step": step, "seconds": seconds[step], "flops": flops_per_update * step,
                      **{k: metrics[k] for k in METRICS}})
    evaluator.load(None)
    return curve


def time_to_target_table(curves: dict[str, list[dict]], key: str = "realism", reference: str = "grpo") -> dict:
    """(a): target = the reference's final score; each algorithm's seconds / FLOPs to reach it and
    its best score within SRPO's whole training time (the shortest run's without an SRPO run)."""
    target = curves[reference][-1][key]
    budget = curves["srpo"][-1]["seconds"] if "srpo" in curves else min(c[-1]["seconds"] for c in curves.values())
    table = {}
    for name, curve in curves.items():
        table[name] = {
            "final": curve[-1][key], "best": max(p[key] for p in curve),
            "seconds_to_target": time_to_target(curve, key, target),
            "flops_to_target": time_to_target(curve, key, target, cost="flops"),
            "best_within_budget": best_within(curve, key, budget),
            "train_seconds": curve[-1]["seconds"], "updates": curve[-1]["step"],
        }
    return {"key": key, "target": target, "reference": reference, "budget_seconds": budget, "runs": table}


def objective(name: str) -> str:
    """The held-out metric a run maximises: ``srp_reward`` (relative reward, paper form, first
    control-word pair) for SRP runs, ``reward`` (absolute) for the absolute-reward runs."""
    absolute = name in PUBLISHED or name == "absolute_reward"
    return "reward" if absolute else "srp_reward"


def equal_gain_table(curves: dict[str, list[dict]], gain_key=objective) -> dict:
    """(e): hack_index of each run where the held-out reward it maximises has risen by the same
    amount (both rewards are the reward model's scaled cosines, so the units agree): the largest
    gain that every run which trained reaches. A run "trained" when its best gain is at least a
    tenth of the median best gain; one that did not is read at its end (``reached`` false).
    ``gain_key`` is a metric name or a function of the run's name."""
    key = gain_key if callable(gain_key) else (lambda name: gain_key)
    gains = {n: max(p[key(n)] for p in c) - c[0][key(n)] for n, c in curves.items()}
    floor = 0.1 * statistics.median(gains.values())
    trained = [g for g in gains.values() if g > 0 and g >= floor]
    level = min(trained) if trained else None
    table = {}
    for name, curve in curves.items():
        at = value_at_gain(curve, key(name), level, "hack_index") if level is not None else None
        table[name] = {"gain_key": key(name), "max_gain": gains[name], "hack_index_at_gain": at,
                       "reached": at is not None, "hack_index": at if at is not None else curve[-1]["hack_index"],
                       "final_hack_index": curve[-1]["hack_index"], "final_realism": curve[-1]["realism"],
                       "final_fidelity": curve[-1]["fidelity"]}
    return {"gain_key": gain_key if isinstance(gain_key, str) else "objective", "gain": level, "runs": table}


BASELINES = ("direct_align", "refl_absolute", "draft_absolute", "grpo_absolute")


def seed_summary(tables: list[dict], reference: str = "srpo") -> dict:
    """(e) over seeds: ``tables`` are :func:`equal_gain_table` results, one per ``train.seed`` (run
    noise, timesteps and prompt order; the judge's held-out noise stays fixed). Per run: the hack_index
    at each seed's equal gain, its mean, sample standard deviation and range. Per baseline: whether the
    reference's hack_index is below it on every seed. Per ablation: the paired differences against the
    reference, raised on every seed, and ``beyond_spread``: the ablation's lowest value above the
    reference's highest (the two ranges over seeds do not overlap)."""
    names = list(tables[0]["runs"])
    runs = {}
    for name in names:
        values = [t["runs"][name]["hack_index"] for t in tables]
        runs[name] = {"values": values, "mean": statistics.fmean(values),
                      "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "min": min(values), "max": max(values),
                      "reached_every_seed": all(t["runs"][name]["reached"] for t in tables)}
    ref = runs[reference]
    baselines = {b: {"below_on_every_seed": all(r < v for r, v in zip(ref["values"], runs[b]["values"]))}
                 for b in BASELINES if b in runs}
    ablations = {}
    for a in ABLATIONS:
        if a in runs:
            diffs = [v - r for v, r in zip(runs[a]["values"], ref["values"])]
            ablations[a] = {"differences": diffs, "mean_difference": statistics.fmean(diffs),
                            "raised_on_every_seed": all(d > 0 for d in diffs),
                            "beyond_spread": runs[a]["min"] > ref["max"]}
    return {"seeds": len(tables), "gains": [t["gain"] for t in tables], "runs": runs,
            "reference_below_baselines": baselines, "ablations": ablations}
