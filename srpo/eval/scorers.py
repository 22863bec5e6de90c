"""The rewards ``srpo eval`` scores with, given as ``--reward SPEC`` (repeatable):

- ``NAME`` or ``NAME=PATH``: a registered reward (hps, pickscore, imagereward, hpsv3, aesthetic,
  clip, tiny_*, a dotted path) and its checkpoint file or folder; several may share one value,
  comma-separated (``--reward hps=/m/hps.pt,pickscore=/m/pickscore``);
- a YAML file: one reward spec (``name, path, options, frames``), a list of them, or a training
  config (its ``reward:`` section), as ``srpo score`` reads it; paths relative to the file; what
  needs options (hpsv3's ``qwen_path``, aesthetic's ``clip_path``) or a column label
  (``options.label``, as ``guard.judges`` names judges) is given this way;
- the lab's judge, not a reward (it has no gradient): ``lab_realism`` (1 when its style head calls
  the image a photo) and ``lab_fidelity`` (1 when it finds every object the prompt names), from
  ``srpo/lab/weights/judge`` unless a path is given.

Without ``--reward``, the first run's own reward(s) and its ``guard.judges``. Every name and every
file a spec names (its path, and options ending in ``path`` or named ``med_config``) is checked
before anything is rendered.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

LAB_JUDGE = Path(__file__).resolve().parents[1] / "lab" / "weights" / "judge"
JUDGE_METRICS = ("lab_realism", "lab_fidelity")
FILE_OPTIONS = ("med_config",)  # options holding a file besides *path


def _label(spec: dict) -> str:
    return str((spec.get("options") or {}).get("label") or spec["name"].rpartition(".")[2])


def parse(values: list[str]) -> list[dict]:
    """``--reward`` values -> reward specs ``{name, path, options, frames}``."""
    from ..commands.score import reward_spec

    specs = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if Path(item).suffix.lower() in (".yaml", ".yml", ".json"):
                got = reward_spec(item, None)
                specs += [dict(s) if isinstance(s, dict) else {"name": s} for s in (got if isinstance(got, list) else [got])]
            else:
                name, _, path = item.partition("=")
                if not name.strip():
                    raise UserError(f"--reward '{item}' has no name: write NAME or NAME=PATH")
                specs.append({"name": name.strip(), "path": path.strip() or None})
    return specs


def from_config(cfg) -> list[dict]:
    """A run's training reward(s) and guard judges as specs (a judge without its own ``frames``
    scores the training reward's, as the guard scores it)."""
    rewards = cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]
    judges = [j.model_dump(exclude={"frames"} if "frames" not in j.model_fields_set else None) for j in cfg.guard.judges]
    return [r.model_dump() for r in rewards] + judges


def default_frames(specs: list[dict], cfg) -> list[dict]:
    """Specs without ``frames`` score the frames the first run's reward scores (``reward.frames``,
    as training does: :func:`srpo.rewards.objective.frame_indices`), else the default 4."""
    from ..rewards.objective import reward_frames

    frames = reward_frames(cfg.reward) if cfg is not None else 4
    for s in specs:
        if s.get("frames") is None:
            s["frames"] = frames
    return specs


def check(specs: list[dict]) -> list[dict]:
    """One-line errors for unknown names, missing files and repeated labels; the specs labelled
    (``label`` key; two of one name differ by their path's file name)."""
    from ..rewards.base import REWARDS
    from ..rewards.factory import _as_dict

    if not specs:
        raise UserError("no rewards to score with: give --reward NAME=PATH (repeatable) or a run folder")
    out = []
    for raw in specs:
        spec = dict(raw) if raw.get("name") in JUDGE_METRICS else _as_dict({k: v for k, v in raw.items()
                                                                             if k != "weight"})
        name = spec["name"]
        if name in JUDGE_METRICS:
            spec["path"] = spec.get("path") or str(LAB_JUDGE)
        else:
            REWARDS.get(name)  # unknown: one line naming the registered ones
            if not spec.get("path") and name in REWARDS.names() and not name.startswith("tiny_"):
                raise UserError(f"reward {name} needs its checkpoint: give --reward {name}=PATH "
                                f"(docs/rewards.md says which file)")
        files = {"path": spec.get("path")}
        files.update({k: v for k, v in (spec.get("options") or {}).items()
                      if isinstance(v, str) and (k.endswith("path") or k in FILE_OPTIONS)})
        for key, value in files.items():
            if value and not Path(value).expanduser().exists():
                where = "" if key == "path" else f" options.{key}"
                raise UserError(f"reward {name}{where}: {value} not found (docs/rewards.md says which files)")
        spec["label"] = _label(spec)
        out.append(spec)
    labels = [s["label"] for s in out]
    for s in out:
        if labels.count(s["label"]) > 1 and s.get("path"):
            s["label"] = f"{s['label']}:{Path(s['path']).name}"
    labels = [s["label"] for s in out]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        raise UserError(f"two rewards are both labelled '{dup}': give each a different path, or options.label "
                        f"in a YAML spec")
    return out


class Scorer:
    """One spec's per-image scores ``[B]`` of images (or videos: the spec's frames, averaged)."""

    def __init__(self, spec: dict, device):
        from ..rewards.objective import RewardFn

        self.spec, self.device = spec, device
        self.frames = spec.get("frames", 4)
        if spec["name"] in JUDGE_METRICS:
            from ..lab.judge import Judge

            self.judge = Judge.load(spec["path"])
            self.judge.net.to(device)
            self.fn = RewardFn(None, frames=self.frames)
        else:
            from ..rewards.factory import build_one

            build = {k: v for k, v in spec.items() if k in ("name", "path", "options")}
            build["options"] = {k: v for k, v in (build.get("options") or {}).items() if k != "label"}
            self.judge = None
            self.fn = RewardFn(build_one(build, device=device).frozen(), frames=self.frames)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = images.to(self.device)
        if self.judge is None:
            return self.fn.absolute(images, prompts).float().cpu()
        frames, per, _, n = self.fn.as_images(images, prompts)
        photo, ok = self.judge.matches(frames.float(), per)
        value = photo if self.spec["name"] == "lab_realism" else ok
        return self.fn.per_video(value.float().cpu(), n)

    def close(self) -> None:
        self.fn = self.judge = None

