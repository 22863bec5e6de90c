"""Build a Reward from a config: one ``{name, path, weight, options}`` spec or a list of them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from ..errors import UserError
from .base import REWARDS, Reward

SPEC_KEYS = ("name", "path", "weight", "options", "frames")  # frames: read by objective.py (videos)


def _as_dict(spec) -> dict:
    if hasattr(spec, "model_dump"):  # a pydantic RewardConfig
        spec = spec.model_dump()
    if isinstance(spec, str):
        return {"name": spec}
    if not isinstance(spec, Mapping):
        raise UserError(f"a reward must be a name or a mapping with keys {', '.join(SPEC_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"reward spec has unknown key(s) {', '.join(unknown)}: use {', '.join(SPEC_KEYS)}")
    if not spec.get("name"):
        raise UserError("reward spec needs a name (hps, pickscore, clip, aesthetic, tiny_clip or a dotted path)")
    return dict(spec)


def _accepts(factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_one(spec, device=None, training: bool = False) -> Reward:
    """One reward from its spec: ``REWARDS.get(name)(path=..., device=..., **options)``.

    ``training``: the reward scores decoded images during training, where the reference trainer
    preprocesses with the float tensor transform (antialiased bicubic resize, crop, normalise);
    unless the spec sets ``uint8``, a reward that offers the 8-bit reference emulation gets the
    float filter (``uint8: null``). Scoring outside training (``srpo score``) keeps the exact
    8-bit path of the reward's own evaluation."""
    spec = _as_dict(spec)
    name, options = spec["name"], dict(spec.get("options") or {})
    factory = REWARDS.get(name)
    if training and "uint8" not in options and _accepts(factory, "uint8"):
        options["uint8"] = None
    try:
        inspect.signature(factory).bind(path=spec.get("path"), device=device, **options)
    except TypeError as e:
        raise UserError(f"reward '{name}' cannot be called as factory(path=..., device=..., **options) "
                        f"with options {sorted(options)}: {e}") from None
    except ValueError:  # no signature available: let the call decide
        pass
    reward = factory(path=spec.get("path"), device=device, **options)
    if not isinstance(reward, Reward):
        raise UserError(f"reward '{name}' returned {type(reward).__name__}, not an srpo.rewards.base.Reward")
    if getattr(reward, "name", None) is None:
        reward.name = name
    return reward


def build_reward(spec, device=None, training: bool = False) -> Reward:
    """A single reward, or a :class:`~srpo.rewards.mix.MixedReward` for a list of specs (or a
    single spec with a weight other than 1)."""
    from .mix import MixedReward

    if isinstance(spec, (list, tuple)):
        if not spec:
            raise UserError("the reward list is empty: give at least one reward")
        specs = [_as_dict(s) for s in spec]
        terms = [(build_one(s, device, training), float(s.get("weight", 1.0))) for s in specs]
        return MixedReward(terms, names=[s["name"].rpartition(".")[2] for s in specs])
    one = _as_dict(spec)
    reward = build_one(one, device, training)
    weight = float(one.get("weight", 1.0))
    return reward if weight == 1.0 else MixedReward([(reward, weight)], names=[one["name"].rpartition(".")[2]])
