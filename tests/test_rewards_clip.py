"""CLIPReward against transformers' own CLIPModel forward + CLIPProcessor on a tiny real CLIP."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from srpo.errors import UserError
from srpo.rewards import REWARDS
from srpo.rewards.clip import CLIPReward
from srpo.rewards.tiny import build_tiny_clip, save_tiny_clip, tiny_clip_model

PROMPTS = ["a photo of a red cat", "an oil painting of a harbour at night"]


def real_looking(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """n smooth random 8-bit images with gradients, as [n, 3, H, W] floats in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    ramp = torch.linspace(0, 1, w)[None, None, None].expand(n, 3, h, w)
    return ((0.7 * smooth + 0.3 * ramp) * 255).round() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def reference(folder):
    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def reference_scores(reference, images, prompts):
    model, processor = reference
    inputs = processor(text=prompts, images=to_pil(images), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    return torch.diag(logits)


@pytest.mark.parametrize("hw", [(48, 40), (100, 60), (32, 32), (90, 37)])
def test_score_equals_transformers_forward(folder, reference, hw):
    reward = CLIPReward.from_pretrained(folder)
    images = real_looking(2, *hw, seed=hw[0])
    ref = reference_scores(reference, images, PROMPTS)
    ours = reward.score(images, PROMPTS)
    assert reward.scale == pytest.approx(float(reference[0].logit_scale.detach().exp()) / 20, rel=1e-6)
    assert torch.allclose(ours, ref / 20, rtol=1e-3, atol=1e-6)
    # the scores differ per image and prompt, so the comparison is not vacuous
    swapped = reward.score(images, PROMPTS[::-1])
    assert (swapped - ours).abs().min() > 1e-4


def test_gradients_reach_the_image_not_the_model(folder):
    reward = CLIPReward.from_pretrained(folder, uint8=None).double()
    images = real_looking(2, 40, 52, seed=1).double().requires_grad_(True)
    reward.score(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())
    # directional derivative against central finite differences (float filter path)
    v = torch.randn_like(images)
    h = 1e-6
    with torch.no_grad():
        fd = (reward.score(images + h * v, PROMPTS).sum() - reward.score(images - h * v, PROMPTS).sum()) / (2 * h)
    assert torch.allclose((images.grad * v).sum(), fd, rtol=1e-5, atol=1e-8)


def test_round_trip_and_registry(folder):
    images = real_looking(2, 32, 32, seed=2)
    built = build_tiny_clip(seed=0).score(images, PROMPTS)
    loaded = CLIPReward.from_pretrained(folder).score(images, PROMPTS)
    via_registry = REWARDS.get("clip")(path=folder).score(images, PROMPTS)
    tiny_via_registry = REWARDS.get("tiny_clip")(seed=0).score(images, PROMPTS)
    assert torch.equal(built, loaded) and torch.equal(built, via_registry)
    assert torch.equal(built, tiny_via_registry)
    other = build_tiny_clip(seed=1).score(images, PROMPTS)
    assert (other - built).abs().max() > 1e-3


def test_tokenizer_fallback_without_tokenizer_files(tmp_path):
    """A model folder with no tokenizer files uses srpo's offline CLIP tokenizer."""
    tiny_clip_model(seed=0).save_pretrained(tmp_path)
    images = real_looking(2, 32, 32, seed=3)
    bare = CLIPReward.from_pretrained(tmp_path).score(images, PROMPTS)
    assert torch.allclose(bare, build_tiny_clip(seed=0).score(images, PROMPTS), atol=1e-6)


def test_text_features_are_cached(folder):
    reward = CLIPReward.from_pretrained(folder)
    calls = []
    encode = reward._encode_text_uncached
    reward._encode_text_uncached = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    first = reward.encode_text(PROMPTS + PROMPTS[:1])
    second = reward.encode_text(PROMPTS[::-1])
    assert calls == [PROMPTS]
    assert torch.equal(first[0], second[1]) and torch.equal(first[2], first[0])
    assert torch.allclose(first.norm(dim=-1), torch.ones(3))


def test_bad_folders_are_user_errors(tmp_path, folder):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError, match="no_such_model"):
        CLIPReward.from_pretrained(missing)
    with pytest.raises(UserError, match="config.json"):
        CLIPReward.from_pretrained(tmp_path)
    tiny_clip_model(seed=0).vision_model.save_pretrained(tmp_path / "vision")
    with pytest.raises(UserError, match="model_type"):
        CLIPReward.from_pretrained(tmp_path / "vision")
    with pytest.raises(UserError, match="needs a path"):
        REWARDS.get("clip")()
