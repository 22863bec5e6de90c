"""``srpo lab``: SRPO on the lab world, measured by the independent judge.

1. load ``configs/lab.yaml`` (the shipped lab weights, realism control words);
2. sample the held-out prompts with the base model (fixed seeds) and judge them;
3. train with :func:`srpo.trainer.train` (the same code path as real models), then sample and
   judge again on the same seeds, and at every checkpoint for the curves;
4. the control: the same budget maximising the absolute reward (SRP off, late timesteps, no
   inversion branch), which should hack the reward's saturation / contrast / sharpness bias:
   once under the default guard (which should stop it) and once without it (the table's column);
5. write ``summary.json``, grids and curves, and print a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from .judge import Judge
from .render import image_stats

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lab.yaml"  # package data (configs/ in a checkout)
WEIGHTS = Path(__file__).parent / "weights"
METRICS = ("realism", "fidelity", "hack_index", "reward", "srp_reward")
EVAL_REPEATS = 2  # seeds per held-out prompt
UNGUARDED = "control-unguarded"  # the control run without the guard (the table's control column)

# the control: maximise the absolute reward late in the trajectory, no inversion branch, at 20x
# the learning rate (at SRPO's own rate, late-timestep updates barely move the model: docs/lab.md)
CONTROL = ["srp.enabled=false", "method.inversion_branch=false", "method.index_range=[35, 49]",
           "method.loss=linear", "train.lr=1e-4"]
# --quick: a smoke run of the whole pipeline (a few updates, few prompts, few steps)
QUICK = ["train.max_steps=2", "train.batch_size=2", "rollout.steps=4", "data.eval_steps=4",
         "log.checkpoint_every=1"]
QUICK_PROMPTS = 8


def lab_config(config=None, overrides=(), quick: bool = False):
    from ..config import load_config

    path = Path(config) if config else CONFIG
    if not path.is_file():
        raise UserError(f"lab config {path} not found: pass --config with a lab config file")
    cfg = load_config(path, list(overrides) + (QUICK if quick else []))
    for what, p in (("base model", cfg.model.path), ("reward", cfg.reward.path)):
        if p and not Path(p).exists():
            raise UserError(f"lab {what} weights not found at {p}: run `srpo lab build` to regenerate them")
    return cfg


class Evaluator:
    """Samples the held-out prompts with fixed seeds and scores them with judge and reward."""

    def __init__(self, cfg, prompts: list[str], judge: Judge):
        from ..models import load_model
        from ..rewards.factory import build_reward
        from ..rewards.objective import reward_function

        self.cfg, self.prompts, self.judge = cfg, prompts, judge
        device = torch.device("cpu")
        self.model = load_model(cfg.model, device)
        reward = build_reward(cfg.reward, device=device, training=True).frozen()
        self.reward_fn = reward_function(cfg, reward, srp=True, precision="none")  # SRP scores every run, control too
        self.base_state = {k: v.clone() for k, v in self.model.transformer.state_dict().items()}
        self.base_stats = None

    def load(self, weights: dict | None) -> None:
        """Base transformer weights, updated by ``weights`` (a checkpoint's tensors; a LoRA run's
        adapters are merged into the base, as lora/ loads on it)."""
        from .. import lora

        self.model.transformer.load_state_dict(self.base_state)
        if weights and lora.is_lora_state(weights):
            weights = lora.merge_into(self.base_state, weights, lora.scale_of(self.cfg.lora))
        if weights:
            missing = set(weights) - set(self.base_state)
            if missing:
                raise UserError(f"lab checkpoint does not fit the lab model ({len(missing)} unknown tensors)")
            self.model.transformer.load_state_dict(weights, strict=False)

    def __call__(self, weights: dict | None = None) -> tuple[dict, torch.Tensor]:
        from ..evaluate import generate, reward_metrics

        d, r = self.cfg.data, self.cfg.rollout
        self.load(weights)
        images = generate(self.model, self.prompts, d.eval_seed, d.eval_steps, d.eval_guidance,
                          r.height, r.width, batch=32)
        if self.base_stats is None:
            self.base_stats = image_stats(images)
        metrics = self.judge.evaluate(images, self.prompts, self.base_stats)
        metrics.update(reward_metrics(self.reward_fn, images, self.prompts,
                                      self.cfg.srp.pos_words[0], self.cfg.srp.neg_words[0]))
        return metrics, images


def _train(cfg, output: Path, evaluator: Evaluator, progress: bool) -> tuple[dict, torch.Tensor, list[dict], dict]:
    """Train (the guard watching the first guard.prompts held-out prompts), then judge the final
    weights, every checkpoint (the judge curve) and the guard's best/."""
    from .. import checkpoint
    from ..trainer import train

    cfg = cfg.model_copy(deep=True)
    cfg.log.progress = progress
    cfg.log.keep_checkpoints = 10_000
    summary = train(cfg, output)
    curve = []
    for ckpt in checkpoint.checkpoint_dirs(output):
        step = json.loads((ckpt / "state.json").read_text())["step"]
        metrics, images = evaluator(load_file(str(ckpt / "trainable.safetensors")))
        curve.append({"step": step, **metrics})
    guard = {k: summary.get("guard", {}).get(k) for k in ("stopped_at", "rule", "best_step")}
    best = output / "best" / "diffusion_pytorch_model.safetensors"
    if best.is_file():
        judged, _ = evaluator(load_file(str(best)))
        guard["best"] = {k: judged[k] for k in METRICS}
    guard["final"] = {k: curve[-1][k] for k in METRICS}
    return curve[-1], images, curve, guard


def _grid(images: torch.Tensor, path: Path, n: int = 48) -> None:
    from ..runlog import save_grid

    up = torch.nn.functional.interpolate(images[:n], scale_factor=3, mode="nearest")
    save_grid(up, path, nrow=12)


def _plot(curves: dict[str, list[dict]], metrics_rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "training reward (SRP or absolute)"), ("realism", "judge: realism"),
            ("fidelity", "judge: fidelity"), ("hack_index", "judge: hack index")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys):
        for name in curves:
            if key == "reward":
                rows = metrics_rows[name]
                ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label=name, marker=".")
            else:
                pts = curves[name]
                ax.plot([p["step"] for p in pts], [p[key] for p in pts], label=name, marker="o")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(summary: dict) -> dict[str, bool]:
    """The lab's pass / fail checks (docs/lab.md)."""
    b, a = summary["before"], summary["after"]
    out = {
        "realism_x3": a["realism"] >= 3 * b["realism"],
        "fidelity_kept": a["fidelity"] >= b["fidelity"] - 0.05,
        "no_hack": a["hack_index"] <= 1.0,
    }
    if "control" in summary:
        out["control_hacks"] = summary["control"]["hack_index"] >= 2.0
    return out


def table(summary: dict) -> str:
    cols = [c for c in ("before", "after", "control") if c in summary]
    lines = [f"{'':12}" + "".join(f"{c:>12}" for c in cols)]
    for key in METRICS:
        lines.append(f"{key:12}" + "".join(f"{summary[c][key]:12.3f}" for c in cols))
    lines.append("targets: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in summary["targets"].items()))
    for name, g in summary.get("guard", {}).items():
        ran = f"stopped after update {g['stopped_at']} ({g['rule']})" if g.get("stopped_at") else "ran every update"
        best = f"best/ at update {g['best_step']}" if g.get("best_step") else "no best/"
        line = f"guard {name}: {ran}; {best}"
        if g.get("stopped_at") and g.get("unguarded_final"):
            at, end = g["final"], g["unguarded_final"]
            line += (f"; at the stop realism {at['realism']:.3f} fidelity {at['fidelity']:.3f} vs unguarded "
                     f"{end['realism']:.3f} / {end['fidelity']:.3f}")
        lines.append(line)
    return "\n".join(lines)


def run_lab(output, quick: bool = False, control: bool = True, config=None, overrides=(),
            progress: bool = True) -> dict:
    """The whole lab experiment; returns the summary written to ``output/summary.json``."""
    from ..data import load_prompts

    t0 = time.perf_counter()
    output = Path(output)
    if (output / "srpo" / "checkpoints").is_dir() or (output / UNGUARDED).is_dir():
        raise UserError(f"{output} already holds a lab run: choose another --output or delete it")
    output.mkdir(parents=True, exist_ok=True)
    cfg = lab_config(config, overrides, quick)
    heldout = load_prompts(cfg.data.eval_prompts, "lab held-out prompts", cfg.data.prompt_column)
    if quick:
        heldout = heldout[:QUICK_PROMPTS]
    prompts = [p for _ in range(1 if quick else EVAL_REPEATS) for p in heldout]
    judge = Judge.load(Path(cfg.model.path).parent / "judge")  # the lab weights live together
    torch.manual_seed(0)
    evaluator = Evaluator(cfg, prompts, judge)

    before, before_images = evaluator()
    summary = {"before": {k: before[k] for k in METRICS}}
    curves = {"srpo": [{"step": 0, **before}]}
    # the control twice: under the default guard (it stops on the hack rule) and without it, all
    # updates (the table's control column: what maximising the absolute reward does when unwatched)
    runs = {"srpo": cfg}
    if control:
        runs["control"] = lab_config(config, list(overrides) + CONTROL, quick)
        runs[UNGUARDED] = lab_config(config, list(overrides) + CONTROL + ["guard.enabled=false"], quick)
        curves["control"] = [{"step": 0, **before}]
        curves[UNGUARDED] = [{"step": 0, **before}]
    _grid(before_images, output / "before.png")
    rows = {}
    summary["guard"] = {}
    for name, run_cfg in runs.items():
        final, images, curve, guard = _train(run_cfg, output / name, evaluator, progress)
        curves[name] += curve
        rows[name] = _read_metrics(output / name)
        if name == UNGUARDED:
            summary["control"] = {k: final[k] for k in METRICS}
            summary["guard"]["control"]["unguarded_final"] = guard["final"]
            _grid(images, output / "control.png")
        else:
            summary["guard"][name] = guard
            if name == "srpo":
                summary["after"] = {k: final[k] for k in METRICS}
                _grid(images, output / "after.png")
    summary["detail"] = {name: curve[-1] for name, curve in curves.items()}
    summary["detail"]["before"] = before
    summary["targets"] = targets(summary)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["eval_images"] = len(prompts)
    _plot(curves, rows, output / "curves.png")
    (output / "curves.json").write_text(json.dumps(curves, indent=1))
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
