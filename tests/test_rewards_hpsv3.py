"""HPSv3 on its tiny twin against the upstream ``hpsv3`` package's own scoring of the same weights
(tests/fixtures/upstream_rewards.json, made by benchmarks/upstream_reward_fixtures.py), the file
loader, SRP, finite-difference pixel gradients, errors and plan sizes."""


import pytest
import torch

from srpo.errors import UserError
from upstream_fixture import FIXTURE, fixture_images
from srpo.rewards import REWARDS
from srpo.rewards import hpsv3_tiny as T
from srpo.rewards.hpsv3_preprocess import chat_text, smart_resize
from srpo.rewards.srp import SRP



@pytest.fixture(scope="module")
def tiny():
    return REWARDS.get("tiny_hpsv3")(seed=FIXTURE["seed"])


def test_weights_are_the_fixtures(tiny):
    from benchmarks.upstream_reward_fixtures import checksum

    weights = T.tiny_weights(T.tiny_config(T.tiny_tokenizer()), FIXTURE["seed"])
    assert checksum(weights) == pytest.approx(FIXTURE["checksums"]["hpsv3"], rel=1e-9)


def test_score_equals_upstream(tiny):
    """Each image/prompt (three sizes, one with a control word) scores what HPSv3RewardInferencer
    computed on the same weights: the head's mean output at <|Reward|>."""
    for x, prompt, expected in zip(fixture_images(), FIXTURE["prompts"], FIXTURE["hpsv3"]):
        assert float(tiny.score(x, [prompt])[0]) == pytest.approx(expected, abs=1e-4)
    assert len(set(round(v, 4) for v in FIXTURE["hpsv3"])) == 3  # the scores differ: each check is specific


def test_files_load_like_the_twin(tmp_path, tiny):
    """hpsv3(path=HPSv3.safetensors, qwen_path=folder): upstream's key layout and a Qwen tokenizer
    without <|Reward|> load into the same model."""
    ckpt, folder = T.save_tiny_hpsv3(tmp_path / "qwen", seed=FIXTURE["seed"])
    reward = REWARDS.get("hpsv3")(path=ckpt, qwen_path=folder)
    x = fixture_images()[1]
    assert torch.allclose(reward.score(x, FIXTURE["prompts"][:1]), tiny.score(x, FIXTURE["prompts"][:1]), atol=1e-6)


def test_prompt_is_the_chat_template(tiny):
    """srpo's sequence is what Qwen2-VL's chat template makes of HPSv3's message."""
    from srpo.rewards.hpsv3_preprocess import INSTRUCTION, RATING

    content = [{"type": "image", "image": "x"}, {"type": "text", "text": INSTRUCTION.format(text_prompt="a cat") + RATING}]
    text = T.tiny_tokenizer().apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
    assert text == chat_text("a cat")
    ids = tiny.token_ids("a cat")
    assert ids.count(tiny.reward_id) == 1 and ids.count(tiny.image_id) == 1


def test_pixel_budget():
    assert smart_resize(64, 64) == (448, 448)
    for h, w in [(48, 80), (90, 40), (720, 1280)]:
        th, tw = smart_resize(h, w)
        assert th % 28 == 0 and tw % 28 == 0 and abs(th * tw - 256 * 28 * 28) < 28 * 28 * 24


def test_srp_and_batch(tiny):
    x = fixture_images()[0].repeat(2, 1, 1, 1)
    x[1] = x[1].flip(-1)
    prompts = ["a cat", "a dog on a beach"]
    k = torch.tensor([0.1, 0.3])
    out = SRP(tiny).relative(x, prompts, "Real", "Anime", k)
    pos = tiny.score(x, [f"Real. {p}" for p in prompts])
    neg = tiny.score(x, [f"Anime. {p}" for p in prompts])
    assert torch.allclose(out.relative, (1 + k) * pos - neg, atol=1e-5)
    for i in range(2):  # batched (padded) rows score as alone
        assert torch.allclose(pos[i], tiny.score(x[i:i + 1], [f"Real. {prompts[i]}"])[0], atol=1e-5)


def test_pixel_gradient_matches_finite_differences():
    reward = REWARDS.get("tiny_hpsv3")(seed=0, uint8=None).double()
    g = torch.Generator().manual_seed(0)
    x = (0.2 + 0.6 * torch.rand(1, 3, 28, 28, generator=g, dtype=torch.float64)).requires_grad_(True)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    reward.score(x, ["a cat"]).sum().backward()
    h = 1e-3  # Qwen2-VL computes rotary and RMS norms in float32 even in a float64 model: float32 noise
    with torch.no_grad():
        fd = (reward.score(x + h * v, ["a cat"]) - reward.score(x - h * v, ["a cat"])) / (2 * h)
    assert x.grad.abs().sum() > 0
    assert float((x.grad * v).sum()) == pytest.approx(float(fd), rel=1e-3)


def test_errors(tmp_path):
    ckpt, folder = T.save_tiny_hpsv3(tmp_path / "qwen")
    with pytest.raises(UserError, match="HPSv3 checkpoint not found: .*nothing"):
        REWARDS.get("hpsv3")(path=str(tmp_path / "nothing.safetensors"), qwen_path=folder)
    with pytest.raises(UserError, match="needs options.qwen_path"):
        REWARDS.get("hpsv3")(path=ckpt)
    with pytest.raises(UserError, match="has no config.json"):
        REWARDS.get("hpsv3")(path=ckpt, qwen_path=str(tmp_path))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors"):
        REWARDS.get("hpsv3")(path=str(junk), qwen_path=folder)
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt)
    wrong = dict(state, **{"rm_head.0.weight": torch.zeros(1024, 48)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match=r"does not fit the Qwen2-VL config \+ HPSv3 head: shape of head.0.weight"):
        REWARDS.get("hpsv3")(path=str(tmp_path / "wrong.safetensors"), qwen_path=folder)
    short = dict(state, **{"model.embed_tokens.weight": state["model.embed_tokens.weight"][:-1]})
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(UserError, match="do not belong together"):
        REWARDS.get("hpsv3")(path=str(tmp_path / "short.safetensors"), qwen_path=folder)


def test_plan_sizes_at_real_size():
    p = REWARDS.get("hpsv3").plan_sizes({})
    assert 7.6e9 < p.params < 7.9e9  # Qwen2-VL-7B without its LM head, plus the head
    assert (p.layers, p.width) == (28, 3584)
    assert p.tokens > 2 * (256 + 400)  # both SRP texts with their image tokens, and the vision tower
    from srpo.config import load_config
    from srpo.plan import model_sizes

    sizes = model_sizes(load_config("configs/tiny.yaml", ["reward.name=hpsv3"]))
    assert sizes.reward == p.params and sizes.reward_tokens == p.tokens
