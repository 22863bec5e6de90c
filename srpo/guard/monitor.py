"""The guard's evaluation: one set of held-out images per guard step (the first ``guard.prompts``
held-out prompts x ``guard.seeds`` fixed seeds), and everything measured on it:

- ``reward`` and ``srp_reward``: the training reward (absolute, and semantic-relative with the
  first control-word pair, k = 0);
- ``drift:<statistic>`` for each of :data:`srpo.guard.stats.STATS` against the base model's
  images of the same prompts and seeds (step 0), and ``hack_index``, their maximum; a video run
  (a video family) measures each video: the image statistics averaged over its frames and the
  temporal ones (:data:`srpo.guard.stats.TEMPORAL_STATS`: frame difference, flicker, motion),
  all in the hack index;
- ``judge:<name>``: the absolute score of each reward in ``guard.judges`` (rewards the run does
  not train on); of a video, the mean over the frames the judge's ``frames`` names (else
  ``reward.frames``, as training scores);
- ``diversity``: mean pairwise distance of image features across the seeds of one prompt (the
  first judge's image encoder, else the training reward's), relative to the base (1 at step 0);
  of a video, the features of its ``reward.frames`` frames averaged.

Then the policies: ``guard.stop_when`` rules stop the run, ``guard.keep_best`` marks the best
step among those where every ``guard.best_when`` rule holds. Its state (base statistics, best so
far) is a small JSON-able dict the checkpoints carry, so ``--resume`` continues it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..rewards.factory import build_reward
from ..rewards.objective import RewardFn
from . import rules as R
from .stats import STATS, VIDEO_STATS, diversity, drift, image_stats, max_drift, video_stats


@dataclass
class Decision:
    stop: R.Rule | None = None  # the rule that fired
    best: bool = False  # this step is the new best


def judge_name(spec) -> str:
    return str(spec.options.get("label") or spec.name.rpartition(".")[2])


def is_video_run(cfg) -> bool:
    """Whether the run's model family makes videos (a class with a frame count)."""
    from ..models import family

    return getattr(family(cfg.model.name), "frames", None) is not None


class Guard:
    def __init__(self, cfg, reward_fn, eval_prompts: list[str], device):
        g = cfg.guard
        self.cfg, self.g, self.reward_fn = cfg, g, reward_fn
        self.prompts = eval_prompts[: g.prompts] if g.prompts else list(eval_prompts)
        self.video = is_video_run(cfg)
        self.stat_keys = VIDEO_STATS if self.video else STATS
        self.judges, self.judge_frames = {}, {}
        for spec in g.judges:
            name = judge_name(spec)
            self.judge_frames[name] = spec.frames if "frames" in spec.model_fields_set else reward_fn.frames
            spec = spec.model_copy(update={"options": {k: v for k, v in spec.options.items() if k != "label"}})
            self.judges[name] = build_reward(spec, device=device).frozen()
        self.feature_model = next(iter(self.judges.values()), None) or reward_fn.reward
        if not hasattr(self.feature_model, "encode_image") or g.seeds < 2:
            self.feature_model = None
        self.metric = g.keep_best if g.keep_best != "auto" else ("srp_reward" if reward_fn.srp is not None else "reward")
        self.stop_rules = [R.parse(t, "guard.stop_when rule") for t in g.stop_when]
        self.best_rules = [R.parse(t, "guard.best_when rule") for t in g.best_when]
        known = set(self.metric_names())
        R.check_metrics(self.stop_rules, known, "guard.stop_when rule")
        R.check_metrics(self.best_rules, known, "guard.best_when rule")
        if self.metric is not None and self.metric not in known:
            R.check_metrics([R.parse(f"{self.metric} > 0")], known, "guard.keep_best")
        self.base_stats: dict[str, torch.Tensor] | None = None
        self.base: dict[str, float] = {}  # metrics at step 0
        self.best: dict[str, float] = {}  # highest value of each metric so far
        self.base_diversity = math.nan
        self.best_step: int | None = None
        self.best_value = -math.inf

    def metric_names(self) -> list[str]:
        names = ["reward", "hack_index", *(f"drift:{k}" for k in self.stat_keys), *(f"judge:{n}" for n in self.judges)]
        if self.reward_fn.srp is not None:
            names.append("srp_reward")
        if self.feature_model is not None:
            names += ["diversity", "diversity_abs"]
        return names

    # ---- images -------------------------------------------------------------------------
    def prompt_list(self) -> list[str]:
        """Image i is prompt i // seeds at seed i % seeds (the seeds of a prompt are neighbours)."""
        return [p for p in self.prompts for _ in range(self.g.seeds)]

    def images(self, model) -> torch.Tensor:
        from ..evaluate import generate

        d, r = self.cfg.data, self.cfg.rollout
        n = len(self.prompts)
        keys = [s * n + p for p in range(n) for s in range(self.g.seeds)]  # seed 0: the eval noise of prompt p
        return generate(model, self.prompt_list(), d.eval_seed, d.eval_steps, d.eval_guidance, r.height, r.width,
                        batch=self.g.batch, keys=keys)

    # ---- metrics ------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, images: torch.Tensor) -> dict[str, float]:
        from ..evaluate import reward_metrics

        prompts = self.prompt_list()
        pos, neg = self.cfg.srp.pos_words[0], self.cfg.srp.neg_words[0]
        out = reward_metrics(self.reward_fn, images, prompts, pos, neg)
        if (images.ndim == 5) != self.video:
            raise ValueError(f"the guard of a {'video' if self.video else 'image'} run got {list(images.shape)}")
        stats = video_stats(images) if self.video else image_stats(images)
        if self.base_stats is None:
            self.base_stats = stats
        d = drift(stats, self.base_stats)
        out.update({f"drift:{k}": v for k, v in d.items()})
        out["hack_index"] = max_drift(d)
        for name, judge in self.judges.items():
            device = next(iter(judge.parameters()), torch.empty(0)).device
            if self.video:  # the judge's frames of each video, averaged (RewardFn: no autocast, the judge's frames)
                fn = RewardFn(judge, frames=self.judge_frames[name])
                scores = [fn.absolute(images[i:i + 16].to(device), prompts[i:i + 16]).float().cpu()
                          for i in range(0, len(prompts), 16)]
            else:
                scores = [judge.score(images[i:i + 16].to(device), prompts[i:i + 16]).float().cpu()
                          for i in range(0, len(prompts), 16)]
            out[f"judge:{name}"] = torch.cat(scores).mean().item()
        if self.feature_model is not None:
            device = next(iter(self.feature_model.parameters()), torch.empty(0)).device
            feats = torch.cat([self.features(images[i:i + 16].to(device)) for i in range(0, len(images), 16)])
            div = diversity(feats, len(self.prompts))
            if not math.isfinite(self.base_diversity):
                self.base_diversity = div
            out["diversity_abs"] = div
            out["diversity"] = div / self.base_diversity if self.base_diversity > 0 else math.nan
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features ``[B, D]``; of videos, the mean over their ``reward.frames`` frames."""
        frames, _, _, n = RewardFn(None, frames=self.reward_fn.frames).as_images(images, [""] * len(images))
        feats = self.feature_model.encode_image(frames).float().cpu()
        return feats if n == 1 else feats.reshape(-1, n, feats.shape[-1]).mean(1)

    def evaluate(self, model) -> tuple[dict[str, float], torch.Tensor]:
        images = self.images(model)
        return self.measure(images), images

    # ---- policies -----------------------------------------------------------------------
    def decide(self, step: int, metrics: dict[str, float]) -> Decision:
        """Update base / best-so-far and apply the rules (step 0 is the base: nothing fires)."""
        if step == 0 or not self.base:
            self.base = dict(metrics)
        decision = Decision()
        if step > 0:
            decision.stop = next((r for r in self.stop_rules if r.holds(metrics, self.best, self.base)), None)
            value = metrics.get(self.metric, math.nan) if self.metric else math.nan
            eligible = all(r.holds(metrics, self.best, self.base) for r in self.best_rules)
            if self.metric and eligible and math.isfinite(value) and value > self.best_value:
                self.best_value, self.best_step, decision.best = value, step, True
        for k, v in metrics.items():  # best so far includes this step (rules above saw the previous best)
            if math.isfinite(v):
                self.best[k] = max(self.best.get(k, -math.inf), v)
        return decision

    # ---- resume -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"base": self.base, "best": self.best, "best_step": self.best_step, "best_value": self.best_value,
                "base_diversity": self.base_diversity,
                "base_stats": {k: v.tolist() for k, v in (self.base_stats or {}).items()}}

    def load(self, state: dict) -> None:
        self.base, self.best = dict(state["base"]), dict(state["best"])
        self.best_step, self.best_value = state["best_step"], float(state["best_value"])
        self.base_diversity = float(state["base_diversity"])
        self.base_stats = {k: torch.tensor(v) for k, v in state["base_stats"].items()} or None
