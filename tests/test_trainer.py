"""The training loop in-process on the tiny config: invariances that must hold exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo.config import load_config
from srpo.step import control_words
from srpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=2", "data.eval_prompts=null", "log.tensorboard=false", "log.progress=false",
        "log.sample_every=0", "log.checkpoint_every=0", "rollout.steps=4"]


def run(tmp_path: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", FAST + list(overrides))
    train(cfg, tmp_path / name)
    return load_file(str(tmp_path / name / "final" / "diffusion_pytorch_model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_layout_of_samples_over_micro_steps_does_not_change_the_update(tmp_path):
    """Prompt, timestep and noise depend on (seed, update, global index) only, so 2 samples in one
    micro-batch or in 2 accumulated micro-steps give the same weights (float summation order)."""
    one = run(tmp_path, "one", "train.batch_size=2", "train.grad_accum=1")
    two = run(tmp_path, "two", "train.batch_size=1", "train.grad_accum=2")
    assert max_diff(one, two) < 1e-5
    other_seed = run(tmp_path, "seed", "train.batch_size=2", "train.seed=1")
    assert max_diff(one, other_seed) > 1e-4


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain = run(tmp_path, "plain")
    ckpt = run(tmp_path, "ckpt", "train.gradient_checkpointing=true")
    assert max_diff(plain, ckpt) < 1e-6


def test_branches_change_the_update(tmp_path):
    both = run(tmp_path, "both")
    denoise = run(tmp_path, "den", "method.inversion_branch=false")
    assert max_diff(both, denoise) > 1e-5


@pytest.mark.parametrize("order", ["cycle", "random"])
def test_control_words_cycle_or_sample(order):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"srp.word_order={order}"])
    words = [control_words(cfg, s) for s in range(20)]
    assert {w[0] for w in words} <= set(cfg.srp.pos_words) and {w[1] for w in words} <= set(cfg.srp.neg_words)
    if order == "cycle":  # the reference's update counter starts at 1: its first pair is the second
        assert words[:5] == [("Detail", "Painting"), ("Detailed", "Anime"), ("Real", "Flat"),
                             ("Natural-lighting", "Oil"), ("Detail", "Concept art")]
    else:
        assert words == [control_words(cfg, s) for s in range(20)]  # seeded
        assert len(set(words)) > 4
