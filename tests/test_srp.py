"""SRP: the relative reward equals its definition through independent absolute scores."""

import pytest
import torch

from srpo.errors import UserError
from srpo.rewards.base import Reward
from srpo.rewards.srp import DEFAULT_NEG_WORDS, DEFAULT_POS_WORDS, SRP
from srpo.rewards.tiny import build_tiny_clip

PROMPTS = ["a red cat on a sofa", "a harbour at night"]


@pytest.fixture(scope="module")
def reward():
    return build_tiny_clip(seed=0)


def images(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 36, generator=g)


@pytest.mark.parametrize("k", [0.0, 0.25, torch.tensor([0.1, 0.3])])
def test_relative_is_the_combination_of_two_scores(reward, k):
    srp = SRP(reward, ["Real"], ["Anime"])
    x = images()
    fresh = build_tiny_clip(seed=0)  # an independent reward: no shared caches
    pos = fresh.score(x, [f"Real. {p}" for p in PROMPTS])
    neg = fresh.score(x, [f"Anime. {p}" for p in PROMPTS])
    out = srp.relative(x, PROMPTS, "Real", "Anime", k)
    assert torch.allclose(out.pos, pos, atol=1e-6) and torch.allclose(out.neg, neg, atol=1e-6)
    assert torch.allclose(out.relative, (1 + torch.as_tensor(k)) * pos - neg, atol=1e-6)
    assert (pos - neg).abs().min() > 1e-4  # the two words really score differently


def test_swapped_roles_negate_the_difference(reward):
    srp = SRP(reward)
    x = images(1)
    a = srp.relative(x, PROMPTS, "Detail", "Painting")
    b = srp.relative(x, PROMPTS, "Painting", "Detail")
    assert torch.allclose(a.relative, -b.relative, atol=1e-6)


def test_gradient_flows_to_images(reward):
    srp = SRP(reward)
    x = images(2).requires_grad_(True)
    srp.relative(x, PROMPTS, "Detail", "Painting", k=0.2).relative.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cache_hit_does_not_re_encode():
    reward = build_tiny_clip(seed=0)
    calls = []
    encode = reward.encode_text
    reward.encode_text = lambda texts: calls.append(list(texts)) or encode(texts)
    srp = SRP(reward, ["Real"], ["Anime"])
    first = srp.relative(images(), PROMPTS, "Real", "Anime", 0.1)
    assert len(calls) == 2 and sorted(map(len, calls)) == [2, 2]
    second = srp.relative(images(), PROMPTS, "Real", "Anime", 0.1)
    assert len(calls) == 2 and torch.equal(first.relative, second.relative)
    srp.relative(images(), PROMPTS[::-1], "Real", "Anime", 0.1)  # same texts, other order
    assert len(calls) == 2
    srp.relative(images(), PROMPTS, "Detail", "Anime", 0.1)  # a new word: only its texts
    assert calls[2:] == [[f"Detail. {p}" for p in PROMPTS]]


def test_texts_words_and_template(reward):
    srp = SRP(reward, template="{prompt}, {word}")
    assert srp.texts("Real", ["a cat"]) == ["a cat, Real"]
    assert srp.pos_words == DEFAULT_POS_WORDS and srp.neg_words == DEFAULT_NEG_WORDS
    assert srp.texts("Real", ["a cat", "a dog"]) == ["a cat, Real", "a dog, Real"]
    with pytest.raises(UserError, match="template"):
        SRP(reward, template="{word} only")
    with pytest.raises(UserError, match="lists of words"):
        SRP(reward, "Real", ["Anime"])


class Brightness(Reward):
    """An image-only reward: mean brightness."""

    text_conditioned = False

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_image_only_reward_is_refused():
    with pytest.raises(UserError, match=r"text-conditioned.*srp.enabled: false"):
        SRP(Brightness())
