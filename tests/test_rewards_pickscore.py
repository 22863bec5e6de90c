"""PickScore: a CLIPModel folder + a separate processor folder, against transformers' own
processor and model forward (tiny random-weight CLIP of the same architecture)."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

from srpo.errors import UserError
from srpo.rewards import REWARDS
from srpo.rewards.srp import SRP
from srpo.rewards.tiny import tiny_clip_model
from srpo.tokenizer import clip_tokenizer

PROMPTS = ["a photo of a red cat", "an oil painting of a harbour at night"]


def real_looking(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    ramp = torch.linspace(0, 1, w)[None, None, None].expand(n, 3, h, w)
    return ((0.6 * smooth + 0.4 * ramp) * 255).round() / 255


def to_pil(images):
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """PickScore's layout: weights in one folder, the CLIP-H processor in another (here with a
    non-default resize, so using the wrong processor would show)."""
    root = tmp_path_factory.mktemp("pickscore")
    tiny_clip_model(seed=3).save_pretrained(root / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(root / "processor")
    return root / "model", root / "processor"


@pytest.mark.parametrize("hw", [(64, 64), (100, 60), (37, 90)])
def test_pickscore_equals_transformers(folders, hw):
    model_dir, proc_dir = folders
    reward = REWARDS.get("pickscore")(path=str(model_dir), processor_path=str(proc_dir))
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(proc_dir)
    images = real_looking(2, *hw, seed=hw[1])
    inputs = processor(text=PROMPTS, images=to_pil(images), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        pickscore = torch.diag(model(**inputs).logits_per_image)  # logit_scale.exp() * cos
    assert reward.scale == pytest.approx(float(model.logit_scale.detach().exp()) / 20, rel=1e-6)
    assert torch.allclose(reward.score(images, PROMPTS) * 20, pickscore, rtol=1e-3)
    # SRP divides by 20 through the scale: the relative score is a difference of PickScores / 20
    srp = SRP(reward, ["Real"], ["Anime"])
    texts = [f"Real. {p}" for p in PROMPTS] + [f"Anime. {p}" for p in PROMPTS]
    inputs = processor(text=texts, images=to_pil(images), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    expected = (torch.diag(logits[:, :2]) - torch.diag(logits[:, 2:])) / 20
    assert torch.allclose(srp.relative(images, PROMPTS, "Real", "Anime").relative, expected, rtol=1e-3, atol=1e-5)


def test_processor_folder_matters(folders):
    """Without processor_path the model folder's defaults (resize 32) apply: other scores."""
    model_dir, proc_dir = folders
    images = real_looking(2, 100, 60, seed=1)
    with_proc = REWARDS.get("pickscore")(path=str(model_dir), processor_path=str(proc_dir))
    default = REWARDS.get("pickscore")(path=str(model_dir))
    assert (with_proc.score(images, PROMPTS) - default.score(images, PROMPTS)).abs().max() > 1e-4


def test_pickscore_bad_paths(folders, tmp_path):
    model_dir, _ = folders
    with pytest.raises(UserError, match="PickScore reward processor folder not found: .*nope"):
        REWARDS.get("pickscore")(path=str(model_dir), processor_path=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="PickScore reward folder not found"):
        REWARDS.get("pickscore")(path=str(tmp_path / "missing"))
