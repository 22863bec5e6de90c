"""build_reward specs, custom rewards by dotted path, and the weighted mix with per-term values."""

import pytest
import torch

from srpo.config import RewardConfig
from srpo.errors import UserError
from srpo.rewards.aesthetic import AestheticHead
from srpo.rewards.factory import build_reward
from srpo.rewards.srp import SRP
from srpo.rewards.tiny import build_tiny_clip, save_tiny_clip

PROMPTS = ["a red cat on a sofa", "a harbour at night"]


def images(seed=0):
    return torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def aesthetic_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    clip_dir = save_tiny_clip(root / "clip", seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(AestheticHead(32).state_dict(), root / "head.pth")
    return {"name": "aesthetic", "path": str(root / "head.pth"), "weight": 0.5, "options": {"clip_path": clip_dir}}


def test_single_specs_and_dotted_path():
    x = images()
    ref = build_tiny_clip(seed=0).score(x, PROMPTS)
    for spec in ("tiny_clip", {"name": "tiny_clip", "options": {"seed": 0}},
                 RewardConfig(name="tiny_clip", options={"seed": 0}),
                 {"name": "srpo.rewards.tiny.build_tiny_clip"}):  # a user's own factory, by dotted path
        reward = build_reward(spec)
        assert torch.equal(reward.score(x, PROMPTS), ref)
    weighted = build_reward({"name": "tiny_clip", "weight": 2.0})
    assert torch.allclose(weighted.score(x, PROMPTS), 2 * ref)


def test_mix_score_terms_and_srp(aesthetic_spec):
    x = images(1)
    mix = build_reward([{"name": "tiny_clip", "weight": 1.0}, aesthetic_spec])
    clip = build_tiny_clip(seed=0)
    aes = build_reward(dict(aesthetic_spec, weight=1.0))
    c, a = clip.score(x, PROMPTS), aes.score(x, PROMPTS)
    terms = mix.terms(x, PROMPTS)
    assert list(terms) == ["tiny_clip", "aesthetic"]
    assert torch.allclose(terms["tiny_clip"], c) and torch.allclose(terms["aesthetic"], a)
    assert torch.allclose(mix.score(x, PROMPTS), c + 0.5 * a)
    # SRP: text terms contribute their relative score, image-only terms their absolute score
    out = SRP(mix, ["Real"], ["Anime"]).relative(x, PROMPTS, "Real", "Anime", 0.2)
    rel = SRP(clip, ["Real"], ["Anime"]).relative(x, PROMPTS, "Real", "Anime", 0.2)
    assert torch.allclose(out.relative, rel.relative + 0.5 * a, atol=1e-6)
    assert torch.allclose(out.terms["tiny_clip"], rel.relative, atol=1e-6)
    assert torch.allclose(out.terms["aesthetic"], a) and torch.allclose(out.pos, rel.pos, atol=1e-6)
    assert a.abs().min() > 1e-4  # the image-only term is not a silent zero


def test_duplicate_names_and_image_only_mix(aesthetic_spec):
    mix = build_reward([{"name": "tiny_clip"}, {"name": "tiny_clip", "options": {"seed": 1}}])
    assert mix.names == ["tiny_clip", "tiny_clip_1"]
    only_images = build_reward([aesthetic_spec])
    assert not only_images.text_conditioned
    with pytest.raises(UserError, match="text-conditioned"):
        SRP(only_images)


def test_bad_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown reward 'hpsv9'"):
        build_reward({"name": "hpsv9"})
    with pytest.raises(UserError, match="cannot import reward 'no_such_pkg.Reward'"):
        build_reward("no_such_pkg.Reward")
    with pytest.raises(UserError, match=r"cannot be called as factory\(path=\.\.\., device=\.\.\., \*\*options\)"):
        build_reward({"name": "tiny_clip", "options": {"colour": "red"}})
    with pytest.raises(UserError, match="colour"):
        build_reward({"name": "clip", "path": str(tmp_path), "options": {"colour": "red"}})
    with pytest.raises(UserError, match="unknown key"):
        build_reward({"name": "tiny_clip", "wieght": 2})
    with pytest.raises(UserError, match="empty"):
        build_reward([])
    with pytest.raises(UserError, match="not found"):
        build_reward({"name": "hps", "path": str(tmp_path / "HPS_v2.1_compressed.pt")})
    with pytest.raises(UserError, match="not an srpo.rewards.base.Reward"):
        build_reward("builtins.dict")
