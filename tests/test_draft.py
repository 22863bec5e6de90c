"""DRaFT-K: the checkpointed update's gradient equals plain autograd through the unrolled sampling
chain, and checkpointing keeps the saved activations flat in K."""

import pytest
import torch

from srpo.algorithms import ALGORITHMS, RewardFn
from srpo.algorithms.base import Batch
from srpo.config import load_config
from srpo.method import inference_grid
from srpo.models.tiny import build_tiny_flux
from srpo.rewards.tiny import build_tiny_clip

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
STEPS = 5


@pytest.fixture(scope="module")
def parts():
    model = build_tiny_flux(seed=0)
    reward = build_tiny_clip(seed=0).frozen()
    eps = torch.randn(model.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    batch = Batch(PROMPTS, model.encode_prompts(PROMPTS), None, eps, 0, [0, 1], loss_scale=0.5)
    return model, reward, batch


def config(k, checkpoint=True):
    return load_config({
        "algorithm": "draft", "model": {"name": "tiny_flux"}, "reward": {"name": "tiny_clip"},
        "rollout": {"steps": STEPS, "height": 32, "width": 32, "guidance": 1.0},
        "train": {"guidance": 3.5, "device": "cpu"}, "draft": {"k": k, "checkpoint": checkpoint},
        "data": {"prompts": PROMPTS},
    })


def grads(model):
    return [p.grad.clone() for p in model.transformer.parameters() if p.requires_grad]


def algorithm_grads(model, reward, batch, k, checkpoint=True):
    model.transformer.zero_grad()
    out = ALGORITHMS.get("draft")(config(k, checkpoint), RewardFn(reward)).backward(model, batch)
    return grads(model), out


def unrolled_grads(model, reward, batch, k):
    """The chain written out: Euler steps x + (b - a) v, the last k with autograd, reward, -r."""
    model.transformer.zero_grad()
    grid = inference_grid(STEPS, 3.0).tolist()
    x = batch.eps
    for j in range(STEPS):
        a, b = grid[j], grid[j + 1]
        if j < STEPS - k:
            with torch.no_grad():
                x = x + (b - a) * model.velocity(x, torch.full((2,), a), batch.cond, 1.0)
        else:
            x = x + (b - a) * model.velocity(x, torch.full((2,), a), batch.cond, 3.5)
    r = reward.score(model.decode(x), PROMPTS)
    (-r.sum() * batch.loss_scale).backward()
    return grads(model), r


def close(got, want):
    norm = torch.sqrt(sum((w**2).sum() for w in want))
    return norm > 0 and all(torch.allclose(g, w, atol=1e-5 * float(norm), rtol=1e-4) for g, w in zip(got, want))


@pytest.mark.parametrize("k", [2, STEPS])
def test_checkpointed_gradient_equals_unrolled_autograd(parts, k):
    model, reward, batch = parts
    got, out = algorithm_grads(model, reward, batch, k)
    want, r = unrolled_grads(model, reward, batch, k)
    assert abs(out["reward"] - r.mean().item()) < 1e-5 and out["k"] == k
    assert close(got, want)
    # and the comparison can tell truncation lengths apart
    other, _ = unrolled_grads(model, reward, batch, k - 1)
    assert not close(got, other)


def test_checkpointing_changes_memory_not_gradients(parts):
    """Without checkpointing the saved activations grow with K; with it they stay flat."""
    model, reward, batch = parts

    def saved_bytes(k, checkpoint):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            g, _ = algorithm_grads(model, reward, batch, k, checkpoint)
        return total[0], g

    plain1, _ = saved_bytes(1, False)
    plain3, g_plain = saved_bytes(3, False)
    ckpt1, _ = saved_bytes(1, True)
    ckpt3, g_ckpt = saved_bytes(3, True)
    per_step = (plain3 - plain1) / 2  # every extra step keeps one forward's activations
    assert per_step > 0.2 * plain1
    assert ckpt1 < plain1 - 0.5 * per_step  # the checkpointed step keeps only its input
    assert ckpt3 - ckpt1 < per_step / 10
    assert close(g_ckpt, g_plain)
