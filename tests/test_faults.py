"""Faults: updates with a NaN reward or a NaN gradient are skipped and logged, never applied;
repeated failures stop the run (exit code 2, one line) with a loadable last checkpoint.

The faults come from a user reward named by dotted path (``test_faults.flaky_reward``), a real
tiny CLIP reward whose image features turn NaN, or whose backward turns NaN, on chosen calls.
SRPO calls ``encode_image`` once per branch, so update ``u`` (1-based) makes calls 2u-2, 2u-1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from srpo import checkpoint
from srpo.cli import main
from srpo.rewards.clip import CLIPReward

ROOT = Path(__file__).resolve().parents[1]
NAN_REWARD = [2, 8, 10, 12]  # update 2 (denoise branch) and updates 5, 6, 7
NAN_GRAD = [5]  # update 3 (inversion branch): finite loss and reward, NaN gradient


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class FlakyReward(CLIPReward):
    def __init__(self, *args, nan_reward=(), nan_grad=(), **kw):
        super().__init__(*args, **kw)
        self.nan_reward, self.nan_grad, self.calls = set(nan_reward), set(nan_grad), 0

    def encode_image(self, images):
        call, self.calls = self.calls, self.calls + 1
        f = super().encode_image(images)
        if call in self.nan_reward:
            f = f * float("nan")
        if call in self.nan_grad:
            f = _NaNGrad.apply(f)
        return f


def flaky_reward(path=None, device=None, nan_reward=(), nan_grad=()):
    """Reward factory (registry dotted path): the tiny CLIP with injected faults."""
    from srpo.rewards.preprocess import ImageTransform
    from srpo.rewards.tiny import tiny_clip_model, tiny_clip_processor
    from srpo.tokenizer import clip_tokenizer

    transform = ImageTransform.from_clip_processor(tiny_clip_processor(32))
    reward = FlakyReward(tiny_clip_model(0), transform, clip_tokenizer(), nan_reward=nan_reward, nan_grad=nan_grad)
    return reward.to(device) if device is not None else reward


def _ckpt(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_updates_are_skipped_and_repeated_failures_stop_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["train.max_steps=20", "train.max_bad_updates=3", "data.eval_prompts=null", "log.sample_every=0",
            "rollout.steps=2", "log.tensorboard=false", "log.progress=false", "log.checkpoint_every=1",
            "log.keep_checkpoints=100", "reward.name=test_faults.flaky_reward",
            f"reward.options={{nan_reward: {NAN_REWARD}, nan_grad: {NAN_GRAD}}}"]
    code = main(["train", str(ROOT / "configs" / "tiny.yaml"), "--output", str(run),
                 *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("srpo: error: 3 consecutive updates had a NaN/Inf")
    assert "update 7" in err[0]

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 1, 0, 1, 1, 1]
    assert math.isnan(rows[1]["reward"]) and math.isnan(rows[1]["loss"])
    assert math.isfinite(rows[2]["loss"]) and math.isfinite(rows[2]["reward"]) and math.isnan(rows[2]["grad_norm"])

    # skipped updates change nothing, applied ones do
    w = {s: _ckpt(run, s) for s in range(1, 8)}
    assert _same(w[1], w[2]) and _same(w[1], w[3]) and not _same(w[3], w[4])
    assert _same(w[4], w[5]) and _same(w[4], w[7])
    opt1 = torch.load(run / "checkpoints" / "step-000001" / "optimizer.pt", weights_only=True)
    opt3 = torch.load(run / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(opt1["state"][n][k], opt3["state"][n][k]) for n in opt1["state"] for k in opt1["state"][n])
    assert int(next(iter(opt3["state"].values()))["step"]) == 1  # AdamW stepped once in 3 updates

    # the last checkpoint loads into a fresh model and optimizer
    from srpo.models.tiny import build_tiny_flux

    transformer = build_tiny_flux(0).transformer
    optimizer = torch.optim.AdamW(transformer.parameters())
    last = checkpoint.latest(run)
    assert last.name == "step-000007"
    assert checkpoint.load(last, transformer, optimizer)["step"] == 7
    assert _same(w[4], {n: p.detach() for n, p in transformer.named_parameters()})
    assert not (run / "final").exists()
