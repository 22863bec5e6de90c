"""srpo: Semantic-Relative Preference Optimization for diffusers flow-matching models.

``srpo.train(config, output, **overrides)`` and ``srpo.load_run(folder)`` are the Python API
(:mod:`srpo.api`); the ``srpo`` command is :mod:`srpo.cli`."""

import logging

__version__ = "0.1.0"

# torchao (model.quantize), which diffusers imports whenever it is installed, registers enums with
# torch's pytree at import and torch logs a deprecation line for each on every command: not ours to act on
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# diffusers 0.42's torchao quantizer looks for torchao tensor classes an older torchao had, to load
# checkpoints serialized with torchao (srpo reads none): a warning line each time, nothing to act on
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


def train(config, output, resume: bool = False, **overrides) -> dict:
    from .api import train as _train

    return _train(config, output, resume=resume, **overrides)


def load_run(folder, which: str = "final", device: str = "auto"):
    from .api import load_run as _load_run

    return _load_run(folder, which=which, device=device)


train.__doc__ = "Train a config into a run folder; see :func:`srpo.api.train`."
load_run.__doc__ = "A trained run ready to sample; see :func:`srpo.api.load_run`."
