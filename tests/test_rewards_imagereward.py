"""ImageReward on its tiny twin against the upstream ``image-reward`` package's own scoring of the
same weights (tests/fixtures/upstream_rewards.json, made by benchmarks/upstream_reward_fixtures.py),
the weight-name mapping, the file loader, SRP, finite-difference pixel gradients and errors."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from srpo.errors import UserError
from upstream_fixture import FIXTURE, fixture_images
from srpo.rewards import REWARDS
from srpo.rewards import imagereward as IR
from srpo.rewards import imagereward_tiny as T
from srpo.rewards.srp import SRP



@pytest.fixture(scope="module")
def tiny():
    return REWARDS.get("tiny_imagereward")(seed=FIXTURE["seed"])


def test_weights_are_the_fixtures():
    from benchmarks.upstream_reward_fixtures import checksum

    assert checksum(T.tiny_weights(FIXTURE["seed"])) == pytest.approx(FIXTURE["checksums"]["imagereward"], rel=1e-9)


def test_score_equals_upstream(tiny):
    """ImageReward.score(prompt, PIL image) of the upstream code on the same weights, per image."""
    for x, prompt, expected in zip(fixture_images(), FIXTURE["prompts"], FIXTURE["imagereward"]):
        assert float(tiny.score(x, [prompt])[0]) == pytest.approx(expected, abs=1e-4)
    assert len(set(round(v, 4) for v in FIXTURE["imagereward"])) == 3


def test_weight_names_map_both_ways():
    """Every srpo weight has an ImageReward.pt name and back; BLIP's ViT names go to
    BlipVisionModel's, med's BERT names are BlipTextModel's; unused projections are dropped."""
    vc, tc = T.tiny_configs(T.tiny_tokenizer())
    names = IR.ImageRewardModel(vc, tc).state_dict()
    for k in names:
        assert IR.map_checkpoint_key(IR.to_checkpoint_key(k)) == k
    m = IR.map_checkpoint_key
    assert m("blip.visual_encoder.blocks.3.attn.qkv.weight") == "vision.encoder.layers.3.self_attn.qkv.weight"
    assert m("blip.visual_encoder.blocks.0.attn.proj.bias") == "vision.encoder.layers.0.self_attn.projection.bias"
    assert m("blip.visual_encoder.cls_token") == "vision.embeddings.class_embedding"
    assert m("blip.visual_encoder.norm.weight") == "vision.post_layernorm.weight"
    assert m("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight") == \
        "text.encoder.layer.1.crossattention.self.key.weight"
    assert m("mlp.layers.7.bias") == "mlp.7.bias"
    assert m("blip.vision_proj.weight") is None and m("blip.text_encoder.embeddings.position_ids") is None


def test_files_load_like_the_twin(tmp_path, tiny):
    files = T.save_tiny_imagereward(tmp_path / "ir", seed=FIXTURE["seed"])
    reward = REWARDS.get("imagereward")(**files)
    x = fixture_images()[2]
    assert torch.allclose(reward.score(x, FIXTURE["prompts"][2:]), tiny.score(x, FIXTURE["prompts"][2:]), atol=1e-6)


def test_srp_and_batch(tiny):
    x = torch.cat([fixture_images()[0], fixture_images()[0].flip(-1)])
    prompts = ["a cat", "a dog on a beach"]
    k = torch.tensor([0.1, 0.3])
    out = SRP(tiny).relative(x, prompts, "Real", "Anime", k)
    pos = tiny.score(x, [f"Real. {p}" for p in prompts])
    neg = tiny.score(x, [f"Anime. {p}" for p in prompts])
    assert torch.allclose(out.relative, (1 + k) * pos - neg, atol=1e-6)
    assert torch.allclose(pos[1], tiny.score(x[1:], [f"Real. {prompts[1]}"])[0], atol=1e-6)


def test_pixel_gradient_matches_finite_differences():
    reward = REWARDS.get("tiny_imagereward")(seed=0, uint8=None).double()
    g = torch.Generator().manual_seed(0)
    x = (0.2 + 0.6 * torch.rand(1, 3, 40, 56, generator=g, dtype=torch.float64)).requires_grad_(True)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    reward.score(x, ["a cat"]).sum().backward()
    h = 1e-4
    with torch.no_grad():
        fd = (reward.score(x + h * v, ["a cat"]) - reward.score(x - h * v, ["a cat"])) / (2 * h)
    assert x.grad.abs().sum() > 0
    assert float((x.grad * v).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


class NotWeights:
    pass


def test_errors(tmp_path):
    files = T.save_tiny_imagereward(tmp_path / "ir")
    with pytest.raises(UserError, match="ImageReward a path: ImageReward.pt not found: .*nothing.pt"):
        REWARDS.get("imagereward")(**dict(files, path=str(tmp_path / "nothing.pt")))
    with pytest.raises(UserError, match="needs options.tokenizer_path"):
        REWARDS.get("imagereward")(**dict(files, tokenizer_path=None))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": NotWeights()}, f, protocol=2)
    with pytest.raises(UserError, match="weights-only"):
        REWARDS.get("imagereward")(**dict(files, path=str(evil)))
    state = torch.load(files["path"], weights_only=True)
    state["blip.visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="does not fit ImageReward's BLIP .*shape of vision.encoder.layers.0"):
        REWARDS.get("imagereward")(**dict(files, path=str(tmp_path / "wrong.pt")))
    med = json.loads(Path(files["med_config"]).read_text())
    Path(files["med_config"]).write_text(json.dumps(dict(med, vocab_size=99)))
    with pytest.raises(UserError, match="vocab_size is 99"):
        REWARDS.get("imagereward")(**files)


def test_plan_sizes_at_real_size():
    p = REWARDS.get("imagereward").plan_sizes({})
    assert 4.3e8 < p.params < 4.6e8  # BLIP ViT-L/16 + BERT-base with cross-attention + MLP
    assert (p.layers, p.width) == (24, 1024) and p.tokens > 197
    from srpo.config import load_config
    from srpo.plan import model_sizes

    sizes = model_sizes(load_config("configs/tiny.yaml", ["reward.name=imagereward"]))
    assert sizes.reward == p.params and sizes.reward_layers == 24
