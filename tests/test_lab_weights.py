"""The shipped lab weights: they load with the project's adapters and diffusers / transformers
themselves, are small, and have the properties the lab experiment relies on."""

import json

import pytest
import torch
from safetensors import safe_open

from srpo.lab.build import WEIGHTS, build
from srpo.lab.captions import content_text
from srpo.lab.judge import Judge
from srpo.lab.prompts import HELDOUT_FILE
from srpo.lab.render import STYLES, adjust, render, sample_scenes
from srpo.lab.train_base import MAX_SEQUENCE_LENGTH
from srpo.lab.train_reward import hack_boost

BASE, REWARD = WEIGHTS / "base", WEIGHTS / "reward"


@pytest.fixture(scope="module")
def model():
    from srpo.models.flux import FluxModel

    return FluxModel.load(BASE, max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.fixture(scope="module")
def reward():
    from srpo.rewards.clip import CLIPReward

    return CLIPReward.from_pretrained(REWARD)


def test_weights_are_small_safetensors_stored_in_float16():
    files = [f for f in WEIGHTS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    for f in WEIGHTS.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert all(st.get_slice(k).get_dtype() in ("F16", "I64") for k in st.keys()), f
    info = json.loads((WEIGHTS / "build.json").read_text())
    assert set(info) == {"vae", "judge", "base", "reward"}


def test_base_loads_as_float32_and_matches_diffusers_pipeline(model):
    from diffusers import FluxPipeline

    from srpo.models.flux import pack
    from srpo.sampling import rollout

    assert {p.dtype for p in model.transformer.parameters()} == {torch.float32}
    assert {p.dtype for p in model.text_encoder_2.parameters()} == {torch.float32}
    assert model.latent_shape(1, 32, 32) == (1, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a photo of a blue star and a green square"]
    model.quantize_timesteps = False  # as FluxPipeline feeds the timestep
    try:
        ours = model.decode(rollout(model, model.encode_prompts(prompts), noise, steps=6, guidance=3.5))
    finally:
        model.quantize_timesteps = True
    pipe = FluxPipeline.from_pretrained(str(BASE), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, height=32, width=32, num_inference_steps=6, latents=pack(noise), guidance_scale=3.5,
               max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt").images
    assert torch.allclose(ours, ref, atol=1e-4)


def test_base_model_prefers_non_photo_styles_unless_asked(model):
    """Prompts without a style word give mostly cartoons and paintings; 'a photo of' works."""
    from srpo.evaluate import generate

    judge = Judge.load(WEIGHTS / "judge")
    plain = [ln for ln in HELDOUT_FILE.read_text().splitlines() if ln and not ln.startswith("#")][:64]
    photo = [f"a photo of {p}" for p in plain]
    images = generate(model, plain + photo, seed=5, steps=25, guidance=1.0, height=32, width=32, batch=32)
    realism_plain = judge.evaluate(images[:64], plain)["realism"]
    realism_photo = judge.evaluate(images[64:], photo)["realism"]
    assert realism_plain <= 0.25 and realism_photo >= 0.5, (realism_plain, realism_photo)


def test_reward_loads_as_clip_reward_with_unit_scale(reward):
    assert reward.scale == pytest.approx(1.0, abs=1e-3)  # logit_scale fixed at ln(20), SRPO divides by 20
    assert {p.dtype for p in reward.parameters()} == {torch.float32}


def test_reward_has_a_text_independent_saturation_contrast_bias(reward):
    """The boosted copy of an image scores higher whatever the caption: the hack to find."""
    scenes = sample_scenes(96, seed=777)
    x = render(scenes)
    own = [content_text(s.content) for s in scenes]
    other = own[1:] + own[:1]
    for boosted in (adjust(x, saturation=1.6), adjust(x, contrast=1.4), hack_hard(x)):
        with torch.no_grad():
            for captions in (own, other):
                gain = reward.score(boosted, captions) - reward.score(x, captions)
                assert (gain > 0).float().mean() >= 0.9, (gain > 0).float().mean()


def hack_hard(x):
    return hack_boost(x, torch.Generator().manual_seed(1))


def test_reward_text_tower_knows_the_control_words(reward):
    """SRP with realism words separates photo-style images from the other styles."""
    from srpo.rewards.srp import SRP

    srp = SRP(reward)
    rel = {}
    for i, style in enumerate(STYLES):
        scenes = sample_scenes(60, seed=880 + i, style=style)
        prompts = [content_text(s.content) for s in scenes]
        with torch.no_grad():
            vals = [srp.relative(render(scenes), prompts, pos, neg, 0.0).relative
                    for pos, neg in zip(srp.pos_words, srp.neg_words)]
        rel[style] = torch.stack(vals).mean(0)
    for other in ("cartoon", "painting"):
        auc = (rel["photo"][:, None] > rel[other][None, :]).float().mean()
        assert auc >= 0.9, (other, auc)


def test_reward_photo_direction_is_not_a_brightness_shortcut(reward):
    """Darkening or brightening an image barely moves its SRP reward (the reward's photo
    direction once was 'darker', and SRPO then simply darkened images)."""
    from srpo.rewards.srp import SRP

    srp = SRP(reward)
    scenes = sample_scenes(96, seed=991)
    x = render(scenes)
    prompts = [content_text(s.content) for s in scenes]

    def rel(img):
        with torch.no_grad():
            return torch.stack([srp.relative(img, prompts, p, n, 0.0).relative
                                for p, n in zip(srp.pos_words, srp.neg_words)]).mean()

    base = rel(x)
    for changed in (x * 0.7, (x * 1.25).clamp(0, 1)):
        assert abs(rel(changed) - base) < 0.05


def test_build_is_deterministic(tmp_path):
    """Two builds of the same stage give byte-identical weights (quick sizes)."""
    build(tmp_path / "a", stages=["vae"], quick=True, progress=False)
    build(tmp_path / "b", stages=["vae"], quick=True, progress=False)
    a = (tmp_path / "a" / "base" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "b" / "base" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
