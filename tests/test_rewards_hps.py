"""HPSv2.1 (and open_clip-format CLIP score) against open_clip's own model, tokenizer and transform,
on a tiny open_clip config saved the way ``HPS_v2.1_compressed.pt`` stores its weights."""

import json
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from srpo.errors import UserError
from srpo.rewards import REWARDS

PROMPTS = ["a photo of a red cat", "an oil painting of a harbour at night"]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def real_looking(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    ramp = torch.linspace(0, 1, h)[None, None, :, None].expand(n, 3, h, w)
    return ((0.7 * smooth + 0.3 * ramp) * 255).round() / 255


def to_pil(images):
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def write_arch(folder, name, cfg):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def tiny_model(arch_file, seed):
    open_clip.add_model_config(arch_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(arch_file.stem, pretrained=None).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hps")
    arch = write_arch(d, "tiny-hps-vit", TINY)
    model = tiny_model(arch, seed=0)
    ckpt = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)  # the HPS file layout
    return d, arch, model, ckpt


def reference(model, arch, images, prompts, resize_mode):
    """open_clip's own path: its eval transform on PIL images, encode_image / encode_text."""
    pre = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode=resize_mode)
    tok = open_clip.get_tokenizer(arch.stem)
    with torch.no_grad():
        fi = model.encode_image(torch.stack([pre(im) for im in to_pil(images)]), normalize=True)
        ft = model.encode_text(tok(prompts), normalize=True)
    return fi, ft


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (100, 60), (37, 90), (720, 720)])
def test_hps_score_equals_open_clip(setup, hw):
    _, arch, model, ckpt = setup
    reward = REWARDS.get("hps")(path=str(ckpt), arch=str(arch))
    assert reward.scale == 1.0
    images = real_looking(2, *hw, seed=hw[0] + hw[1])
    fi, ft = reference(model, arch, images, PROMPTS, "longest")  # HPSv2 pads to a square
    assert torch.allclose(reward.encode_image(images), fi, atol=1e-4)
    assert torch.allclose(reward.score(images, PROMPTS), (fi * ft).sum(-1), atol=1e-4)
    crop = REWARDS.get("hps")(path=str(ckpt), arch=str(arch), resize_mode="shortest")
    fi_c, _ = reference(model, arch, images, PROMPTS, "shortest")
    assert torch.allclose(crop.score(images, PROMPTS), (fi_c * ft).sum(-1), atol=1e-4)
    if hw[0] != hw[1]:  # padding and cropping really differ, so each check is specific
        assert (fi - fi_c).abs().max() > 1e-3


def test_gradients_and_text_cache(setup):
    _, arch, _, ckpt = setup
    reward = REWARDS.get("hps")(path=str(ckpt), arch=str(arch))
    x = real_looking(2, 48, 40, seed=5).requires_grad_(True)
    reward.score(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in reward.parameters())
    calls = []
    encode = reward._encode_text_uncached
    reward._encode_text_uncached = lambda p: calls.append(list(p)) or encode(p)
    reward.encode_text(PROMPTS + ["a new prompt"])  # the score above cached PROMPTS
    reward.encode_text(["a new prompt"] + PROMPTS[::-1])
    assert calls == [["a new prompt"]]


def test_open_clip_clip_score_file(setup):
    """'clip' with an open_clip checkpoint file: logit_scale.exp() * cos / 20; safetensors too."""
    d, arch, model, ckpt = setup
    from safetensors.torch import save_file

    st = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    images = real_looking(2, 40, 40, seed=7)
    fi, ft = reference(model, arch, images, PROMPTS, "shortest")
    expected = model.logit_scale.detach().exp() * (fi * ft).sum(-1) / 20
    for path in (ckpt, st):
        reward = REWARDS.get("clip")(path=str(path), arch=str(arch))
        assert torch.allclose(reward.score(images, PROMPTS), expected, rtol=1e-3)


def test_wrong_architecture_and_missing_file(setup, tmp_path):
    d, arch, _, ckpt = setup
    wider = dict(TINY, embed_dim=48)
    other_arch = write_arch(tmp_path, "tiny-hps-wide", wider)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": tiny_model(other_arch, seed=0).state_dict()}, other)
    with pytest.raises(UserError, match=r"other\.pt does not fit the open_clip architecture .*tiny-hps-vit"):
        REWARDS.get("hps")(path=str(other), arch=str(arch))
    with pytest.raises(UserError, match="HPS reward checkpoint not found: .*nothing.pt"):
        REWARDS.get("hps")(path=str(tmp_path / "nothing.pt"), arch=str(arch))
    with pytest.raises(UserError, match="unknown open_clip architecture 'ViT-Q-99'"):
        REWARDS.get("hps")(path=str(ckpt), arch="ViT-Q-99")
    with pytest.raises(UserError, match="needs a path"):
        REWARDS.get("hps")()


class NotWeights:
    pass


def test_pickles_beyond_weights_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": NotWeights()}, f, protocol=2)
    with pytest.raises(UserError, match="weights-only"):
        REWARDS.get("hps")(path=str(evil))
