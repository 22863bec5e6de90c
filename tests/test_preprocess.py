"""Differentiable preprocessing equals the reward models' own preprocessing.

References: transformers' CLIPImageProcessor (torchvision backend, the default, and the PIL
backend) and open_clip's eval transform, all fed the same 8-bit PIL images users score.
"""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from srpo.rewards.preprocess import ImageTransform, center_crop, resize, resize_weights

SIZES = [(64, 64), (100, 60), (37, 90), (256, 256), (720, 720), (64, 70)]


def real_looking(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random image blended with gradients, 8-bit, [3, H, W] uint8."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    yy = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xx = torch.linspace(0, 1, w)[None].expand(h, w)
    img = 0.6 * smooth + 0.4 * torch.stack([yy, xx, yy * xx])
    return (img * 255).round().to(torch.uint8)


def as_pil(u: torch.Tensor) -> Image.Image:
    return Image.fromarray(u.permute(1, 2, 0).numpy())


def as_unit(u: torch.Tensor) -> torch.Tensor:
    return (u.float() / 255)[None]


def hf_processor(size: int, pil_backend: bool = False):
    cls = CLIPImageProcessorPil if pil_backend else CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("target", [224, 32])
@pytest.mark.parametrize("hw", SIZES)
def test_matches_transformers_processor(hw, target):
    u = real_looking(*hw, seed=hw[0] * 1000 + hw[1])
    proc = hf_processor(target)
    ref = proc(as_pil(u), return_tensors="pt")["pixel_values"]
    ours = ImageTransform.from_clip_processor(proc)(as_unit(u))
    assert ours.shape == ref.shape == (1, 3, target, target)
    assert (ours - ref).abs().max() < 1e-3


@pytest.mark.parametrize("target", [224, 32])
@pytest.mark.parametrize("hw", SIZES)
def test_matches_transformers_pil_backend(hw, target):
    u = real_looking(*hw, seed=hw[0] + hw[1])
    proc = hf_processor(target, pil_backend=True)
    ref = torch.from_numpy(np.stack(proc(as_pil(u))["pixel_values"]))
    tf = ImageTransform.from_clip_processor(proc)
    assert tf.uint8 == "pil"
    assert (tf(as_unit(u)) - ref).abs().max() < 1e-3


@pytest.mark.parametrize("target", [224, 32])
@pytest.mark.parametrize("hw", SIZES)
def test_matches_open_clip_transform(hw, target):
    u = real_looking(*hw, seed=hw[0] * 7 + hw[1])
    ref = open_clip.image_transform(target, is_train=False)(as_pil(u))[None]
    ours = ImageTransform.from_open_clip({"size": target})(as_unit(u))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-3


def test_open_clip_model_config_and_squash():
    """The transform read from a model's preprocess_cfg, and the 'squash' resize mode."""
    model, _, pre = open_clip.create_model_and_transforms("RN50", pretrained=None)
    u = real_looking(100, 60, seed=3)
    ours = ImageTransform.from_open_clip(model.visual.preprocess_cfg)(as_unit(u))
    assert (ours - pre(as_pil(u))[None]).abs().max() < 1e-3
    squash = open_clip.image_transform(48, is_train=False, resize_mode="squash")
    ours = ImageTransform.from_open_clip({"size": 48, "resize_mode": "squash"})(as_unit(u))
    assert (ours - squash(as_pil(u))[None]).abs().max() < 1e-3


def test_float_path_is_the_float_filter_and_8bit_emulation_matters():
    """uint8=None equals the processor on float input (torchvision's float kernel); the 8-bit
    references differ from it by more than the tolerance, so the emulation is doing work."""
    u = real_looking(720, 720, seed=0)
    x = as_unit(u)
    proc = hf_processor(224)
    ref_float = proc(x[0] * 255, return_tensors="pt")["pixel_values"]
    float_tf = ImageTransform.from_clip_processor(proc, uint8=None)
    assert (float_tf(x) - ref_float).abs().max() < 1e-4
    ref_pil = proc(as_pil(u), return_tensors="pt")["pixel_values"]
    assert (float_tf(x) - ref_pil).abs().max() > 5e-3


@pytest.mark.parametrize("hw,out", [((720, 720), (224, 224)), ((37, 90), (224, 544)), ((40, 50), (20, 25))])
def test_resize_weights_equal_torch_antialias(hw, out):
    x = torch.rand(2, 3, *hw, dtype=torch.float64)
    ref = F.interpolate(x, size=out, mode="bicubic", antialias=True, align_corners=False)
    assert (resize(x, out) - ref).abs().max() < 1e-10
    ref = F.interpolate(x, size=out, mode="bilinear", antialias=True, align_corners=False)
    assert (resize(x, out, "bilinear") - ref).abs().max() < 1e-10
    w = resize_weights(hw[1], out[1])
    assert torch.allclose(w.sum(1), torch.ones(out[1], dtype=torch.float64))


def test_crop_offsets():
    x = torch.arange(7.0)[None, None, None].expand(1, 1, 2, 7)
    assert center_crop(x, (2, 4), "floor")[0, 0, 0].tolist() == [1, 2, 3, 4]  # int(1.5) = 1
    assert center_crop(x, (2, 4), "round")[0, 0, 0].tolist() == [2, 3, 4, 5]  # round(1.5) = 2


@pytest.mark.parametrize("uint8", [None, "torch", "pil"])
def test_gradient_is_the_float_filter_gradient(uint8):
    """Directional derivative of the float path against finite differences; the 8-bit paths
    pass the same (straight-through) gradient."""
    torch.manual_seed(0)
    tf = ImageTransform(32, (32, 32), uint8=uint8)
    x = torch.rand(2, 3, 45, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    (tf(x) * w).sum().backward()
    v = torch.randn_like(x)
    float_tf = ImageTransform(32, (32, 32), uint8=None)
    h = 1e-6
    with torch.no_grad():
        fd = ((float_tf(x + h * v) * w).sum() - (float_tf(x - h * v) * w).sum()) / (2 * h)
    assert x.grad.abs().sum() > 0
    assert torch.allclose((x.grad * v).sum(), fd, rtol=1e-6, atol=1e-9)
