"""Plain-text (Markdown) tables of a ``srpo bench`` result, printed and pasted into BENCHMARKS.md."""

from __future__ import annotations


def _f(v, fmt=".3f"):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and fmt == ".3f" and 0 < abs(v) < 1e-3:
        return format(v, ".1e")
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render(result: dict) -> str:
    out: list[str] = []
    m = result.get("machine", {})
    out.append(f"machine: {m.get('platform')}, {m.get('cpus')} CPUs, torch {m.get('torch')}, "
               f"GPU {m.get('gpu')}, {m.get('date')}; quick={result.get('quick')}")
    if "a" in result:
        a = result["a"]
        out += ["", f"(a) time to {a['key']} >= {a['target']:.3f} ({a['reference']}'s final); "
                    f"budget {a['budget_seconds']:.1f}s of training", ""]
        out += _table(["algorithm", "updates", "train s", "final", "best", "s to target", "GFLOP to target",
                       "best within budget"],
                      [[n, r["updates"], _f(r["train_seconds"], ".1f"), _f(r["final"]), _f(r["best"]),
                        _f(r["seconds_to_target"], ".2f"),
                        _f(None if r["flops_to_target"] is None else r["flops_to_target"] / 1e9, ".1f"),
                        _f(r["best_within_budget"])] for n, r in a["runs"].items()])
    if "b" in result:
        b = result["b"]
        out += ["", "(b) one update: seconds, peak MiB (process), peak activations held for backward MiB, GFLOP", ""]
        rows = [[n, s, _f(r["seconds"]), _f(r["peak_mib"], ".1f"), _f(r["saved_mib"], ".1f"),
                 _f(r["flops"] / 1e9, ".2f")]
                for n, by in b["by_steps"].items() for s, r in by.items()]
        rows += [[f"draft K={k.split('-')[0]}", "25" if "plain" not in k else "25, no checkpointing", _f(r["seconds"]),
                  _f(r["peak_mib"], ".1f"), _f(r["saved_mib"], ".1f"), _f(r["flops"] / 1e9, ".2f")]
                 for k, r in b["draft_k"].items()]
        out += _table(["algorithm", "rollout steps", "s / update", "peak MiB", "activations MiB", "GFLOP"], rows)
    if "c" in result:
        c = result["c"]
        out += ["", f"(c) SRPO update {c['update']:.3f}s vs parts {c['sum_of_parts']:.3f}s: "
                    f"ratio {c['update_over_parts']:.3f}", ""]
        out += _table(["part", "seconds"], [[k, _f(v, ".4f")] for k, v in c["parts"].items()])
        if c.get("loop"):
            lp = c["loop"]
            out += ["", f"(c) the trainer's loop over {lp['updates']} updates (checkpoint every {lp['checkpoint_every']}): "
                        f"{lp['loop_seconds']:.2f}s wall, {lp['model_seconds']:.2f}s model work, "
                        f"update_over_model_work {lp['update_over_model_work']:.3f}"]
    if "d" in result:
        d = result["d"]
        u = d.get("update")
        if u:
            out += ["", f"(d) SRPO update, train.compile {u['mode']}: eager {u['eager_s']:.3f}s, compiled "
                        f"{u['compiled_s']:.3f}s, {u['speedup']:.2f}x; first compiled update {u['first_update_s']:.1f}s "
                        f"(the compile); gradients differ by {u['grad_relative_difference']:.1e} relative"]
        out += ["", f"(d) rollout + decode vs the family's diffusers pipeline (same weights, noise, prompt embeddings; "
                    f"ours with train.compile {d.get('compile', 'none')}, the pipeline eager)", ""]
        out += _table(["model", "pipeline", "steps", "ours s", "ours eager s", "diffusers s", "speed over diffusers",
                       "eager speed over diffusers", "max pixel diff", "compiled vs eager", "first call s"],
                      [[name, fam["pipeline"], s, _f(r["ours"]), _f(r.get("ours_eager")), _f(r["diffusers"]),
                        _f(r["speed_over_diffusers"], ".2f"), _f(r.get("eager_speed_over_diffusers"), ".2f"),
                        _f(r["max_pixel_difference"], ".1e"), _f(r.get("compiled_vs_eager_max_diff"), ".1e"),
                        _f(fam.get("first_call_s"), ".1f")]
                       for name, fam in d["rollout"].items() for s, r in fam.items() if s.isdigit()])
    if "e" in result:
        e = result["e"]
        out += ["", f"(e) hack_index at an equal gain {_f(e['gain'])} of the held-out reward each run maximises "
                    "(srp_reward: relative; reward: absolute)", ""]
        out += ["(a run that never reaches the gain is read at its end: 'at end')", ""]
        out += _table(["run", "maximises", "max gain", "hack_index at gain", "final hack_index", "final realism",
                       "final fidelity"],
                      [[n, r.get("gain_key", e["gain_key"]), _f(r["max_gain"]),
                        _f(r["hack_index_at_gain"]) if r["reached"] else
                        f"{_f(r['hack_index'])} at end", _f(r["final_hack_index"]),
                        _f(r["final_realism"]), _f(r["final_fidelity"])] for n, r in e["runs"].items()])
    if "e" in result and result["e"].get("over_seeds"):
        out += _seed_tables(result["e"]["over_seeds"])
    h = result.get("headline", {})
    if h:
        out += ["", "headline ratios:"]
        out += [f"  {k}: {_f(v, '.3f') if not isinstance(v, dict) else ', '.join(f'{n} {_f(x)}' for n, x in v.items())}"
                for k, v in h.items()]
    t = result.get("targets", {})
    if t:
        out += ["targets: " + "; ".join(f"{k} {'PASS' if v else 'MISS'}" for k, v in t.items())]
    return "\n".join(out)


def _seed_tables(s: dict) -> list[str]:
    """(e) over seeds: each run's hack_index at its seed's equal gain, mean +- sample std and range;
    then the comparisons with SRPO that the spread supports or not."""
    out = ["", f"(e) over {s['seeds']} seeds (train.seed; equal gains {', '.join(_f(g) for g in s['gains'])}): "
               "hack_index at equal gain", ""]
    out += _table(["run", "per seed", "mean", "std", "range", "reached on every seed"],
                  [[n, " / ".join(_f(v) for v in r["values"]), _f(r["mean"]), _f(r["std"]),
                    f"{_f(r['min'])} - {_f(r['max'])}", "yes" if r["reached_every_seed"] else "no"]
                   for n, r in s["runs"].items()])
    rows = [[f"srpo below {n}", "-", "yes" if r["below_on_every_seed"] else "no", "-"]
            for n, r in s["reference_below_baselines"].items()]
    rows += [[f"ablation {n} above srpo", " / ".join(_f(d) for d in r["differences"]),
              "yes" if r["raised_on_every_seed"] else "no", "yes" if r["beyond_spread"] else "no"]
             for n, r in s["ablations"].items()]
    return out + [""] + _table(["comparison", "paired differences", "on every seed", "beyond the seed spread"], rows)
