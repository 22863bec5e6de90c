"""The Python API, for notebooks and scripts:

    import srpo
    summary = srpo.train("tiny", "runs/nb", train={"max_steps": 4})   # a config path, name, dict or Config
    run = srpo.load_run("runs/nb")                                       # final/ (or which="best")
    images = run.sample(["a red cube on a table"], steps=8)              # PIL images
    images[0].save("cube.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def train(config, output, resume: bool = False, **overrides) -> dict:
    """Train ``config`` (a YAML path, a built-in config's name such as ``"tiny"``, a dict or a
    :class:`srpo.config.Config`) into the run folder ``output``; keyword overrides by section
    (``train={"lr": 1e-5}``) or dotted key (``**{"train.lr": 1e-5}``). Returns the run's summary
    (what ``summary.json`` holds)."""
    from .config import Config, load_config
    from .trainer import train as _train

    if isinstance(config, Config):
        config = config.model_dump(mode="json")
    cfg = load_config(config, values=overrides)
    return _train(cfg, Path(output), resume=resume)


@dataclass
class Run:
    """A trained run, ready to sample: ``model`` is the family's FlowModel with the run's weights."""

    folder: Path
    config: object
    model: object

    def sample(self, prompts, steps: int | None = None, guidance: float | None = None, seed: int = 0,
               height: int | None = None, width: int | None = None) -> list:
        """PIL images of ``prompts`` (a string or a list) from fixed noise (``seed``)."""
        from .evaluate import generate
        from .runlog import to_pil

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        c = self.config
        images = generate(self.model, prompts, seed, steps or c.data.eval_steps,
                          c.data.eval_guidance if guidance is None else guidance,
                          height or c.rollout.height, width or c.rollout.width)
        return [to_pil(img) for img in images]


def load_run(folder, which: str = "final", device: str = "auto") -> Run:
    """The run folder's trained model (``final/``, or the guard's ``best/``) on ``device``."""
    from .export import run_weights
    from .parallel import pick_device

    cfg, model = run_weights(folder, which)
    return Run(Path(folder), cfg, model.to(pick_device(device)))
