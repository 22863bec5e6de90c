"""Aesthetic predictor: the LAION MLP head over CLIP image features, against a direct
computation (transformers CLIP features from OpenAI CLIP's PIL transform, then the MLP by hand)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPModel

from srpo.errors import UserError
from srpo.rewards import REWARDS
from srpo.rewards.aesthetic import AestheticHead
from srpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from srpo.rewards.srp import SRP
from srpo.rewards.tiny import save_tiny_clip


def real_looking(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (smooth * 255).round() / 255


def to_pil(images):
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    clip_dir = save_tiny_clip(root / "clip", seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = AestheticHead(32)  # tiny CLIP's projection dim
    for p in head.parameters():  # spread the outputs so image differences are visible
        p.data.mul_(3.0)
    sd = head.state_dict()
    torch.save(sd, root / "head.pth")
    save_file(sd, str(root / "head.safetensors"))
    return clip_dir, root, sd


def direct(clip_dir, sd, images):
    """OpenAI CLIP's preprocessing on PIL, CLIP image features, L2-normalised, then the MLP."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pre = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                     T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    with torch.no_grad():
        f = model.get_image_features(pixel_values=torch.stack([pre(im) for im in to_pil(images)]))
        x = F.normalize(f.pooler_output if hasattr(f, "pooler_output") else f, dim=-1)
        for i in (0, 2, 4, 6, 7):
            x = F.linear(x, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"])
    return x.squeeze(-1)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
@pytest.mark.parametrize("hw", [(64, 64), (100, 60), (37, 90)])
def test_aesthetic_equals_direct_computation(files, suffix, hw):
    clip_dir, root, sd = files
    reward = REWARDS.get("aesthetic")(path=str(root / f"head.{suffix}"), clip_path=clip_dir)
    assert reward.text_conditioned is False
    images = real_looking(3, *hw, seed=hw[0])
    ref = direct(clip_dir, sd, images)
    assert torch.allclose(reward.score(images, ["unused"] * 3), ref, rtol=1e-3, atol=1e-5)
    assert ref.std() > 1e-3  # distinct images get distinct scores


def test_aesthetic_gradients_and_no_srp(files):
    clip_dir, root, _ = files
    reward = REWARDS.get("aesthetic")(path=str(root / "head.pth"), clip_path=clip_dir)
    x = real_looking(2, 40, 40, seed=4).requires_grad_(True)
    reward.score(x, ["a", "b"]).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in reward.parameters())
    with pytest.raises(UserError, match=r"SRP needs a text-conditioned reward.*srp.enabled: false"):
        SRP(reward)


def test_aesthetic_errors(files, tmp_path):
    clip_dir, root, _ = files
    torch.save(AestheticHead(768).state_dict(), tmp_path / "l14.pth")  # ViT-L/14 head, 32-d CLIP
    with pytest.raises(UserError, match=r"l14\.pth does not fit the improved-aesthetic-predictor MLP over 32-d"):
        REWARDS.get("aesthetic")(path=str(tmp_path / "l14.pth"), clip_path=clip_dir)
    with pytest.raises(UserError, match="aesthetic reward checkpoint not found"):
        REWARDS.get("aesthetic")(path=str(tmp_path / "none.pth"), clip_path=clip_dir)
    with pytest.raises(UserError, match="clip_path"):
        REWARDS.get("aesthetic")(path=str(root / "head.pth"))
