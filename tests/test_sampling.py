"""The rollout sampler, pinned against diffusers' own FluxPipeline and an analytic oracle."""

import pytest
import torch

from srpo.method import add_noise, inference_grid
from srpo.models.flux import pack
from srpo.models.tiny import build_tiny_flux
from srpo.sampling import initial_noise, rollout, sample_images

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H, W = 32, 48


@pytest.fixture(scope="module")
def model():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def noise(model):
    return initial_noise(model, len(PROMPTS), H, W, generator=torch.Generator().manual_seed(7))


def pipeline_run(model, noise, steps, guidance, output_type):
    pipe = model.pipeline()
    out = pipe(PROMPTS, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
               latents=pack(noise), output_type=output_type,
               max_sequence_length=model.max_sequence_length).images
    return out, pipe.scheduler.sigmas


@pytest.mark.parametrize("steps", [4, 25])
def test_rollout_matches_flux_pipeline(model, noise, steps):
    """Our Euler rollout + decode equals FluxPipeline.__call__ on the same weights and noise."""
    pixels = sample_images(model, PROMPTS, noise, steps=steps, guidance=3.5, shift=3.0)
    ref_pixels, sigmas = pipeline_run(model, noise, steps, 3.5, "pt")
    assert pixels.shape == ref_pixels.shape == (2, 3, H, W)
    assert (pixels - ref_pixels).abs().max() < 1e-4
    # the pipeline's shifted schedule (use_dynamic_shifting=False) is our inference grid
    assert torch.allclose(sigmas.double(), inference_grid(steps, 3.0), atol=1e-6)

    x0 = rollout(model, model.encode_prompts(PROMPTS), noise, steps=steps, shift=3.0, guidance=3.5)
    ref_latents, _ = pipeline_run(model, noise, steps, 3.5, "latent")
    assert (pack(x0) - ref_latents).abs().max() < 1e-4
    assert x0.abs().max() > 0.5  # a real, non-degenerate sample


def test_parity_is_sensitive_to_schedule_guidance_and_prompt(model, noise):
    """The parity tolerance is far below the effect of any wrong setting."""
    cond = model.encode_prompts(PROMPTS)
    ref, _ = pipeline_run(model, noise, 4, 3.5, "latent")
    wrong = {
        "shift": rollout(model, cond, noise, steps=4, shift=1.0, guidance=3.5),
        "guidance": rollout(model, cond, noise, steps=4, shift=3.0, guidance=1.0),
        "prompt": rollout(model, model.encode_prompts(PROMPTS[::-1]), noise, steps=4, guidance=3.5),
    }
    for name, x0 in wrong.items():
        assert (pack(x0) - ref).abs().max() > 1e-2, name


class StraightFlowOracle:
    """The exact velocity of the straight flow to a fixed target: ``v = (x_s - x0) / s``."""

    def __init__(self, target):
        self.target = target
        self.calls = []

    def velocity(self, latents, sigma, cond, guidance):
        self.calls.append(sigma.clone())
        return (latents - self.target) / sigma.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("steps,shift", [(5, 3.0), (25, 1.0)])
def test_rollout_with_exact_velocity_lands_on_target(steps, shift):
    gen = torch.Generator().manual_seed(0)
    target, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    oracle = StraightFlowOracle(target)
    x0, traj = rollout(oracle, {}, eps, steps=steps, shift=shift, return_trajectory=True)
    grid = inference_grid(steps, shift)
    assert traj.shape == (3, steps + 1, 4, 8, 8)
    assert torch.equal(traj[:, -1], x0) and torch.equal(traj[:, 0], eps)
    for i, s in enumerate(grid.tolist()):  # every state lies on the line (1 - s) x0 + s eps
        assert torch.allclose(traj[:, i], add_noise(target, eps, s), atol=1e-5)
    assert torch.allclose(x0, target, atol=1e-5)
    # the model sees each level of the grid except the final 0, once per step
    seen = torch.stack([c[0] for c in oracle.calls]).double()
    assert torch.allclose(seen, grid[:-1], atol=1e-6)


def test_rollout_broadcasts_single_prompt_and_has_no_grad(model, noise):
    one = model.encode_prompts(PROMPTS[:1])
    both = model.encode_prompts(PROMPTS[:1] * 2)
    a = rollout(model, one, noise, steps=3, guidance=2.0)
    b = rollout(model, both, noise, steps=3, guidance=2.0)
    assert torch.allclose(a, b, atol=1e-6)
    assert not a.requires_grad


def test_initial_noise_is_seeded_standard_normal(model):
    a = initial_noise(model, 2, H, W, generator=torch.Generator().manual_seed(3))
    ref = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 4, H // 2, W // 2)
    assert torch.equal(a, ref)
