"""Offline mode: x0 from VAE-encoded real images with captions, fresh noise per sample, and the
switch to online rollouts after N updates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srpo.config import load_config
from srpo.errors import UserError
from srpo.offline import OfflineData, load_pixels, scan

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red fox in the snow", "a blue boat on a lake", "a yellow house at night"]


def _images(folder: Path, captions=True, sizes=((48, 40), (40, 56), (64, 64))) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        arr[: h // 2, :, i] = 255  # some structure on top of the noise
        Image.fromarray(arr).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(CAPTIONS[i] + "\n")
    return folder


def test_captions_from_txt_metadata_or_a_file(tmp_path):
    folder = _images(tmp_path / "a")
    assert [(it.path.name, it.caption) for it in scan(folder)] == [(f"img{i}.png", c) for i, c in enumerate(CAPTIONS)]
    folder = _images(tmp_path / "b", captions=False)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": c}) + "\n"
                                                   for i, c in reversed(list(enumerate(CAPTIONS)))))
    assert [it.caption for it in scan(folder)] == CAPTIONS
    lines = tmp_path / "captions.txt"
    lines.write_text("\n".join(CAPTIONS) + "\n")
    assert [it.caption for it in scan(_images(tmp_path / "c", captions=False), lines)] == CAPTIONS


def test_bad_offline_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        scan(tmp_path / "empty")
    folder = _images(tmp_path / "nocap", captions=False)
    with pytest.raises(UserError, match=r"img0.png has no caption file img0.txt \(3 without\)"):
        scan(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="no caption for img1.png"):
        scan(folder)
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="2 captions for 3 images"):
        scan(folder, tmp_path / "two.txt")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        load_pixels(tmp_path / "broken.png", 32, 32)


def test_x0_is_the_vae_latent_of_the_processed_image_and_noise_is_per_sample(tmp_path):
    from diffusers import FluxImg2ImgPipeline

    from srpo.models.tiny import build_tiny_flux

    model = build_tiny_flux(0)
    folder = _images(tmp_path / "imgs")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.offline={{images: {folder}}}"])
    data = OfflineData.from_config(cfg)
    prompts, x0, eps = data.batch(model, step=3, indices=[0, 1], global_batch=2)
    items = data.items_for(3, [0, 1], 2)
    assert prompts == [it.caption for it in items]

    # reference: the img2img pipeline's own image processor and the VAE posterior mode
    pipe = FluxImg2ImgPipeline(scheduler=model.scheduler, vae=model.vae, text_encoder=model.text_encoder,
                               tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
                               tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    vae = model.vae
    for i, it in enumerate(items):
        img = pipe.image_processor.preprocess(Image.open(it.path).convert("RGB"), height=32, width=32, resize_mode="crop")
        torch.testing.assert_close(load_pixels(it.path, 32, 32)[None], (img + 1) / 2, atol=1e-6, rtol=0)
        with torch.no_grad():
            z = vae.encode(img).latent_dist.mode()
        ref = (z - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(x0[i : i + 1], ref, atol=1e-5, rtol=1e-5)

    assert eps.shape == x0.shape and not torch.equal(eps[0], eps[1])  # fresh noise per sample ...
    assert torch.equal(data.noise(model, 3, [1])[0], eps[1])  # ... a function of (seed, update, index)
    assert not torch.equal(data.noise(model, 4, [1])[0], eps[1])


def test_offline_training_then_switch_to_online(tmp_path):
    from srpo.trainer import train

    folder = _images(tmp_path / "imgs")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "data.prompts=null", f"data.offline={{images: {folder}, switch_to_online_after: 2}}", "train.max_steps=3",
        "data.eval_prompts=null", "log.sample_every=0", "rollout.steps=2", "log.tensorboard=false",
        "log.progress=false"])
    train(cfg, tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["offline"] for r in rows] == [1, 1, 0]  # online from update 3, prompts = the captions
    assert all(r["skipped"] == 0 and np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(UserError, match="data.prompts is required"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.prompts=null"])
