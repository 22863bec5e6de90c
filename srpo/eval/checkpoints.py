"""What ``srpo eval`` renders: each MODEL_OR_RUN argument with ``--which`` resolved to checkpoints.

A diffusers pipeline folder is one checkpoint (its folder name). A run folder written by ``srpo
train`` gives the ``--which`` entries it names: ``base`` (the run's model: section as the trainer
loads it, before any update), ``best`` (``best/`` or ``best-lora/``), ``final`` (``final/`` or
``lora/``) and ``step-N`` (``checkpoints/step-N/``, a full checkpoint's trained tensors on the
base). A name the run does not have is a one-line error listing what it has. Runs sharing one base
model render it once, as ``base``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

WHICH = ("base", "best", "final")
_STEP = re.compile(r"^step-0*(\d+)$")


@dataclass
class Checkpoint:
    label: str
    source: str  # the folder named on the command line
    which: str  # base | best | final | step-N | model (a pipeline folder)
    cfg: object | None = None  # the run's Config (None for a pipeline folder)
    model_cfg: object | None = None  # the ModelConfig the base / folder loads with

    @property
    def is_base(self) -> bool:
        return self.which == "base"

    def load(self, device):
        """The model on ``device`` (its schedule not yet chosen: :meth:`FlowModel.use_schedule`)."""
        from ..models import load_model

        if self.which in ("final", "best"):
            from ..export import run_weights

            _, model = run_weights(self.source, self.which)
            return model.to(device)
        model = load_model(self.model_cfg, "cpu")
        frames = getattr(getattr(self.cfg, "rollout", None), "frames", None)
        if frames is not None:
            model.set_frames(frames)
        if self.which.startswith("step-"):
            _load_step(model, step_dir(Path(self.source), self.which), self.cfg)
        return model.to(device)


def step_dir(run: Path, which: str) -> Path:
    n = int(_STEP.match(which).group(1))
    return run / "checkpoints" / f"step-{n:06d}"


def _load_step(model, folder: Path, cfg) -> None:
    """A full checkpoint's trained tensors into the base transformer (LoRA adapters merged)."""
    from safetensors.torch import load_file

    from .. import lora

    file = folder / "trainable.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint {folder} has no trainable.safetensors (a sharded checkpoint): "
                        f"evaluate final/ or best/, or export the step first")
    weights = load_file(str(file))
    state = model.transformer.state_dict()
    if lora.is_lora_state(weights):
        weights = lora.merge_into(state, weights, lora.scale_of(cfg.lora))
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise UserError(f"checkpoint {folder} does not fit the run's model ({len(unknown)} unknown tensors, "
                        f"e.g. {unknown[0]})")
    model.transformer.load_state_dict(weights, strict=False)


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and not (folder / "model_index.json").is_file()


def available(run: Path) -> list[str]:
    """What a run folder holds: base, best, final and its full step-N checkpoints."""
    from ..checkpoint import checkpoint_dirs

    have = ["base"]
    if (run / "best").is_dir() or (run / "best-lora").is_dir():
        have.append("best")
    if (run / "final").is_dir() or (run / "lora").is_dir():
        have.append("final")
    steps = [d for d in checkpoint_dirs(run) if (d / "trainable.safetensors").is_file()]
    return have + [f"step-{int(_STEP.match(d.name).group(1))}" for d in steps]


def parse_which(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [w.strip() for w in value.split(",") if w.strip()]
    if not names:
        raise UserError("--which is empty: name base, best, final or step-N (comma-separated)")
    out = []
    for w in names:
        m = _STEP.match(w)
        if w not in WHICH and not m:
            raise UserError(f"--which entry '{w}' is not base, best, final or step-N (e.g. step-200)")
        w = f"step-{int(m.group(1))}" if m else w
        if w not in out:
            out.append(w)
    return out


def _unique(label: str, taken: set[str]) -> str:
    out, i = label, 2
    while out in taken:
        out, i = f"{label}-{i}", i + 1
    taken.add(out)
    return out


def parse_options(pairs: list[str]) -> dict:
    """``--model-option KEY=VALUE`` pairs -> model.options (values read as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--model-option {pair!r}: write KEY=VALUE, e.g. max_sequence_length=512")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--model-option {pair!r}: {value!r} is not a value (a number, true/false or a string)") from None
    return out


def resolve(sources: list[str], which: list[str] | None, options: dict | None = None) -> list[Checkpoint]:
    """The checkpoints of ``sources`` in command-line order (the base of runs first); ``options``:
    the pipeline folders' model.options (``--model-option``)."""
    from ..config import ModelConfig, load_config
    from ..models import family_of_folder

    plain, runs, taken = [], [], set()
    for src in sources:
        folder = Path(src)
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder: give a diffusers pipeline folder or a run folder "
                            f"written by srpo train")
        name = _unique(folder.resolve().name or str(folder), taken)
        if is_run(folder):
            cfg = load_config(folder / "config.yaml")
            have = available(folder)
            wanted = which or [w for w in ("base", "best", "final") if w in have]
            missing = [w for w in wanted if w not in have]
            if missing:
                raise UserError(f"run {folder} has no {missing[0]} (it has: {', '.join(have)}): "
                                f"choose --which from those")
            runs.append((name, folder, cfg, wanted))
        else:
            if which is not None:
                raise UserError(f"--which names checkpoints of run folders, but {folder} is a pipeline folder: "
                                f"drop --which or give run folders")
            m = ModelConfig(name=family_of_folder(folder), path=str(folder), options=dict(options or {}))
            plain.append(Checkpoint(name, str(folder), "model", None, m))
    bases: dict[str, Checkpoint] = {}
    out: list[Checkpoint] = []
    shared = len({json.dumps(c.model.model_dump(), sort_keys=True, default=str) for _, _, c, w in runs
                  if "base" in w}) == 1
    for name, folder, cfg, wanted in runs:
        for w in wanted:
            if w == "base":
                key = json.dumps(cfg.model.model_dump(), sort_keys=True, default=str)
                if key in bases:
                    continue
                label = "base" if shared and "base" not in taken else _unique(f"{name}:base", taken)
                taken.add(label)
                bases[key] = Checkpoint(label, str(folder), "base", cfg, cfg.model)
                out.append(bases[key])
            else:
                out.append(Checkpoint(_unique(f"{name}:{w}", taken), str(folder), w, cfg, cfg.model))
    return [c for c in out if c.is_base] + plain + [c for c in out if not c.is_base]  # bases first
