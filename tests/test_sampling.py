"""The rollout sampler, pinned against diffusers' own FluxPipeline and an analytic oracle."""

import pytest
import torch

from srpo import seeding
from srpo.method import add_noise, inference_grid
from srpo.models.flux import pack
from srpo.models.tiny import build_tiny_flux
from srpo.sampling import rollout

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H, W = 32, 48


@pytest.fixture(scope="module")
def model():
    m = build_tiny_flux(seed=0)
    m.quantize_timesteps = False  # FluxPipeline feeds the exact timestep
    return m


@pytest.fixture(scope="module")
def noise(model):
    return seeding.noise(model.latent_shape(1, H, W), 7, 0, [0, 1], "rollout_noise")


def pipeline_run(model, noise, steps, guidance, output_type):
    pipe = model.pipeline()
    out = pipe(PROMPTS, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
               latents=pack(noise), output_type=output_type,
               max_sequence_length=model.max_sequence_length).images
    return out, pipe.scheduler.sigmas


@pytest.mark.parametrize("steps", [4, 25])
def test_rollout_matches_flux_pipeline(model, noise, steps):
    """Our Euler rollout + decode equals FluxPipeline.__call__ on the same weights and noise."""
    cond = model.encode_prompts(PROMPTS)
    x0 = rollout(model, cond, noise, steps=steps, guidance=3.5)
    pixels = model.decode(x0)
    ref_pixels, sigmas = pipeline_run(model, noise, steps, 3.5, "pt")
    assert pixels.shape == ref_pixels.shape == (2, 3, H, W)
    assert (pixels - ref_pixels).abs().max() < 1e-4
    # the pipeline's shifted schedule (use_dynamic_shifting=False) is the model's schedule
    assert torch.allclose(sigmas.double(), model.schedule(steps, H, W), atol=1e-6)
    assert torch.allclose(model.schedule(steps, H, W), inference_grid(steps, 3.0))
    ref_latents, _ = pipeline_run(model, noise, steps, 3.5, "latent")
    assert (pack(x0) - ref_latents).abs().max() < 1e-4
    assert x0.abs().max() > 0.5  # a real, non-degenerate sample
    # pipeline_images (what bench part d times) is the same pipeline call
    assert (model.pipeline_images(cond, noise, steps, 3.5) - ref_pixels).abs().max() < 1e-6


def test_parity_is_sensitive_to_schedule_guidance_prompt_and_quantisation(model, noise):
    """The parity tolerance is far below the effect of any wrong setting."""
    cond = model.encode_prompts(PROMPTS)
    ref, _ = pipeline_run(model, noise, 4, 3.5, "latent")
    shifted = build_tiny_flux(seed=0, shift=1.0, quantize_timesteps=False)
    quantised = build_tiny_flux(seed=0)  # the reference trainer's floor(1000 sigma) / 1000
    assert quantised.quantize_timesteps
    wrong = {
        "shift": rollout(shifted, cond, noise, steps=4, guidance=3.5),
        "guidance": rollout(model, cond, noise, steps=4, guidance=1.0),
        "prompt": rollout(model, model.encode_prompts(PROMPTS[::-1]), noise, steps=4, guidance=3.5),
    }
    for name, x0 in wrong.items():
        assert (pack(x0) - ref).abs().max() > 1e-2, name
    q = (pack(rollout(quantised, cond, noise, steps=4, guidance=3.5)) - ref).abs().max()
    assert 1e-6 < q < 1e-1  # a small, real difference


def test_quantised_timestep_is_the_floor_of_1000_sigma(model):
    fed = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["timestep"].clone()),
                                                       with_kwargs=True)
    try:
        m = build_tiny_flux(seed=0)
        m.transformer = model.transformer
        x = torch.zeros(2, 4, 4, 4)
        cond = model.encode_prompts(PROMPTS)
        m.velocity(x, torch.tensor([0.7519, 0.0999]), cond, 1.0)
        model.velocity(x, torch.tensor([0.7519, 0.0999]), cond, 1.0)
    finally:
        hook.remove()
    assert torch.allclose(fed[0].double(), torch.tensor([0.751, 0.099], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(fed[1].double(), torch.tensor([0.7519, 0.0999], dtype=torch.float64), atol=1e-7)


class StraightFlowOracle:
    """The exact velocity of the straight flow to a fixed target: ``v = (x_s - x0) / s``."""

    def __init__(self, target, shift):
        self.target, self.shift = target, shift
        self.calls = []

    def schedule_for(self, latents, steps):
        return inference_grid(steps, self.shift)

    def velocity(self, latents, sigma, cond, guidance):
        self.calls.append(sigma.clone())
        return (latents - self.target) / sigma.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("steps,shift", [(5, 3.0), (25, 1.0)])
def test_rollout_with_exact_velocity_lands_on_target(steps, shift):
    gen = torch.Generator().manual_seed(0)
    target, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    oracle = StraightFlowOracle(target, shift)
    x0, traj = rollout(oracle, {}, eps, steps=steps, return_trajectory=True)
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


def test_seeded_noise_depends_on_the_sample_key_only(model):
    shape = model.latent_shape(1, H, W)
    a = seeding.noise(shape, 3, 5, [0, 1, 2], "rollout_noise")
    b = seeding.noise(shape, 3, 5, [2, 1], "rollout_noise")
    assert a.shape == (3, 4, H // 2, W // 2)
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    other = seeding.noise(shape, 3, 5, [0], "eval_noise")
    assert not torch.equal(a[0], other[0])  # streams are independent
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(seeding.torch_seed(3, 5, 1, "rollout_noise")))
    assert torch.equal(a[1:2], ref)
    assert abs(float(a.mean())) < 0.2 and abs(float(a.std()) - 1) < 0.2
