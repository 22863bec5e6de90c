"""GRPO baseline: the SDE's transition density, its marginals, the surrogate loss and the gradient
of a whole update, each against a direct computation."""

import math

import pytest
import torch
from torch.distributions import Normal

from srpo import sde
from srpo.algorithms import ALGORITHMS, RewardFn
from srpo.algorithms.base import Batch
from srpo.algorithms.grpo import group_advantages, ppo_loss
from srpo.config import load_config
from srpo.method import euler_step, inference_grid
from srpo.models.tiny import build_tiny_flux
from srpo.rewards.tiny import build_tiny_clip

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]


def test_step_log_prob_is_the_gaussian_density():
    """Mean and std follow Flow-GRPO's formula; the log-prob is Normal(mean, std).log_prob summed."""
    gen = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    a = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    b = torch.tensor([0.8, 0.3, 0.0], dtype=torch.float64)
    eta, cap = 0.7, 0.95
    x_next, lp = sde.sde_step(x, v, a, b, eta, cap, z)
    for i in range(3):
        ai, bi = float(a[i]), float(b[i])
        sigma = eta * math.sqrt(ai / (1 - ai))
        mean = x[i] + (v[i] + sigma**2 / (2 * ai) * (x[i] + (1 - ai) * v[i])) * (bi - ai)
        std = sigma * math.sqrt(ai - bi)
        assert torch.allclose(x_next[i], mean + std * z[i], atol=1e-12)
        ref = Normal(mean, std).log_prob(x_next[i]).sum()
        assert abs(lp[i].item() - ref.item()) < 1e-8 * abs(ref.item())
        # a transition the sampler did not produce is less likely than its own mean
        assert Normal(mean, std).log_prob(mean).sum() > ref


def test_noise_scale_is_capped_at_pure_noise():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    mean, std = sde.sde_mean_std(x, torch.zeros_like(x), 1.0, 0.9, eta=0.5, cap=0.96)
    assert math.isclose(float(std), 0.5 * math.sqrt(1 / (1 - 0.96)) * math.sqrt(0.1), rel_tol=1e-12)
    assert math.isclose(sde.noise_scale(1.0, 0.5, 0.96), 0.5 * math.sqrt(1 / 0.04))
    # small eta: the mean is the Euler ODE step
    v = torch.randn_like(x)
    mean, _ = sde.sde_mean_std(x, v, 0.6, 0.5, eta=1e-6, cap=0.96)
    assert torch.allclose(mean, euler_step(x, v, 0.6, 0.5), atol=1e-10)


class GaussianFlow:
    """Exact velocity of the flow from N(0, s0^2) data to N(0, 1) noise: v = E[eps - x0 | x_t]."""

    def __init__(self, s0):
        self.s0 = s0

    def velocity(self, x, sigma, cond, guidance):
        t = sigma.reshape(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s0**2 + t**2
        return (t - (1 - t) * self.s0**2) / var * x


def test_sde_preserves_the_flow_marginals():
    """With the exact velocity, SDE samples follow the flow's marginals x_t ~ N(0, (1-t)^2 s0^2 + t^2)
    at every level (the drift correction cancels the injected noise); without it they do not."""
    s0, steps = 0.5, 200  # Euler-Maruyama is first order: the error at level 0.96 is 0.05 at 50 steps
    noise = torch.randn(8000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0, traj, lp = sde.sde_rollout(GaussianFlow(s0), {}, noise, inference_grid(steps, 3.0).tolist(), eta=0.7,
                                   generator=torch.Generator().manual_seed(1))
    grid = inference_grid(steps, 3.0)
    for i in (60, 100, 150, steps):  # levels 0.875, 0.75, 0.5, 0
        t = float(grid[i])
        want = math.sqrt((1 - t) ** 2 * s0**2 + t**2)
        assert abs(traj[:, i].std().item() - want) < 0.02, (i, traj[:, i].std().item(), want)
        assert abs(traj[:, i].mean().item()) < 0.03
    assert traj[:, steps].equal(x0) and lp.shape == (8000, steps) and torch.isfinite(lp).all()

    class NoCorrection(GaussianFlow):  # noise added without the score term: marginals blow up
        pass

    x, g = noise.clone(), torch.Generator().manual_seed(1)
    flow = NoCorrection(s0)
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = flow.velocity(x, torch.full((x.shape[0],), a, dtype=x.dtype), None, None)
        _, std = sde.sde_mean_std(x, v, a, b, 0.7, float(grid[1]))
        x = euler_step(x, v, a, b) + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert x.std().item() > s0 + 0.3


def test_group_advantages_and_clipped_surrogate():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    adv = group_advantages(r, clip=5.0)
    assert torch.allclose(adv, (r - r.mean()) / r.std(unbiased=False), atol=1e-6)
    assert torch.allclose(group_advantages(torch.tensor([0.0] * 7 + [1.0]), clip=1.5).max(), torch.tensor(1.5))
    # max(-A r, -A clip(r)): clipped where it would make the objective more optimistic
    log_ratio = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = ppo_loss(log_ratio, a, clip=0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]), atol=1e-6)
    loss.sum().backward()
    # gradient flows only where the unclipped term is active
    assert torch.allclose(log_ratio.grad, torch.tensor([0.0, 1.5, -0.5, 0.0]), atol=1e-6)


@pytest.fixture(scope="module")
def setup():
    cfg = load_config({
        "algorithm": "grpo", "model": {"name": "tiny_flux"}, "reward": {"name": "tiny_clip"},
        "rollout": {"steps": 4, "height": 32, "width": 32, "guidance": 1.0},
        "grpo": {"group_size": 4, "timestep_fraction": 0.5, "chunk": 3, "same_group_noise": False},
        "train": {"seed": 3, "device": "cpu"}, "data": {"prompts": PROMPTS},
    })
    model = build_tiny_flux(seed=0)
    reward = build_tiny_clip(seed=0).frozen()
    return cfg, model, reward


def make_batch(model, cfg, step=0):
    eps = torch.randn(model.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(5))
    return Batch(PROMPTS, model.encode_prompts(PROMPTS), None, eps, step, [0, 1], loss_scale=0.5)


def test_rollout_log_probs_are_reproduced_by_the_policy(setup):
    """Recomputing a stored transition's log-prob with the model gives the sampler's value (ratio 1)."""
    cfg, model, reward = setup
    alg = ALGORITHMS.get("grpo")(cfg, RewardFn(reward))
    batch = make_batch(model, cfg)
    grid = inference_grid(4, 3.0).tolist()
    cond, traj, old_lp, r = alg.sample_group(model, batch, 0, grid)
    assert traj.shape[:2] == (4, 5) and old_lp.shape == (4, 4) and r.shape == (4,)
    assert (traj[0, -1] - traj[1, -1]).abs().max() > 0.05  # the group's rollouts differ

    def step_log_prob(j):  # the transition density of SRPO.md / Flow-GRPO, with the model's velocity
        v = model.velocity(traj[:, j], torch.full((4,), grid[j]), cond, 1.0)
        a, b = grid[j], grid[j + 1]
        sigma = 0.3 * math.sqrt(a / (1 - min(a, grid[1])))
        mean = traj[:, j] + (v + sigma**2 / (2 * a) * (traj[:, j] + (1 - a) * v)) * (b - a)
        std = sigma * math.sqrt(a - b)
        return (-((traj[:, j + 1] - mean) ** 2) / (2 * std**2) - math.log(std)
                - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    worst = 0.0
    for j in range(4):
        with torch.no_grad():
            lp = step_log_prob(j)
        worst = max(worst, (lp - old_lp[:, j]).abs().max().item())
    assert worst < 1e-3, worst
    # the tolerance is far below the effect of a slightly different policy (output layer +1%)
    proj = model.transformer.proj_out.weight
    with torch.no_grad():
        proj.mul_(1.01)
        lp_other = step_log_prob(2)
        proj.div_(1.01)
    assert (old_lp[:, 2] - lp_other).abs().max() > 0.05


def test_update_gradient_is_the_group_policy_gradient(setup):
    """At ratio 1 the update's gradient is -sum_g A_g grad mean log N(x_{j+1}; mu_theta(x_j), std^2),
    averaged over the group and the trained steps, computed here with torch.distributions."""
    cfg, model, reward = setup
    alg = ALGORITHMS.get("grpo")(cfg, RewardFn(reward))
    batch = make_batch(model, cfg, step=2)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    model.transformer.zero_grad()
    out = alg.backward(model, batch)
    got = [p.grad.clone() for p in params]
    assert abs(out["ratio"] - 1) < 1e-4 and out["clip_frac"] == 0 and out["kl"] == 0

    model.transformer.zero_grad()
    grid = inference_grid(4, 3.0).tolist()
    for i, index in enumerate(batch.indices):
        cond, traj, _, r = alg.sample_group(model, batch, i, grid)
        adv = (r - r.mean()) / r.std(unbiased=False)
        steps = alg.train_steps(batch, index)
        assert len(steps) == 2 and max(steps) < 3  # int(4 * 0.5) steps, never the last
        for j in steps:
            a, b = grid[j], grid[j + 1]
            v = model.velocity(traj[:, j], torch.full((4,), a), cond, 1.0)
            sigma = 0.3 * math.sqrt(a / (1 - min(a, grid[1])))
            mean = traj[:, j] + (v + sigma**2 / (2 * a) * (traj[:, j] + (1 - a) * v)) * (b - a)
            lp = Normal(mean, sigma * math.sqrt(a - b)).log_prob(traj[:, j + 1]).flatten(1).mean(1)
            (-(adv * lp).sum() / (4 * len(steps)) * batch.loss_scale).backward()
    want = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((w**2).sum() for w in want))
    assert norm > 0
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_, w_, atol=1e-5 * float(norm) + 1e-9)
