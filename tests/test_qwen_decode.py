"""Qwen-Image's decode with gradient under activation checkpointing (srpo/models/qwen_image.py,
``decode_checkpointed``: the decoder's mid block, residual blocks, upsamplers and head each
checkpointed) against the reference, diffusers' own ``AutoencoderKLQwenImage.decode`` with every
activation kept: the same image and the same latent gradient (on the tiny twin and on a narrow VAE
of the real layout), sensitive to a skipped block and to a non-empty causal cache; the decode
without gradient left as diffusers runs it; ``srpo plan``'s count of it
(``QwenImageModel.plan_decode``) on meta tensors against real ones, and the memory it saves."""

import pytest
import torch
from own_process import measured
from diffusers import AutoencoderKLQwenImage

import srpo.models.qwen_image as qi
from srpo.config import load_config
from srpo.errors import UserError
from srpo.models import MODELS
from srpo.models.base import channel_stats, saved_by
from srpo.models.qwen_image import (QWEN_IMAGE_VAE, QwenImageModel, _decoder_pieces, decode_checkpointed,
                                    decode_plan)
from srpo.plan import model_sizes

# the Qwen-Image VAE's layout (dim_mult 1, 2, 4, 4; two resnets a level; two temporal upsamplings;
# the mid block's attention) at a narrow width
NARROW = dict(QWEN_IMAGE_VAE, base_dim=8)
H, W = 64, 48


def tiny(seed: int = 0) -> QwenImageModel:
    return MODELS.get("tiny_qwen_image").load(seed=seed)


def narrow_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**NARROW).eval().requires_grad_(False)


def meta_vae(**config) -> AutoencoderKLQwenImage:
    with torch.device("meta"):
        return AutoencoderKLQwenImage(**(config or QWEN_IMAGE_VAE))


def with_grad(fn, z: torch.Tensor, seed: int = 2):
    """(output, gradient w.r.t. ``z`` of a random weighting of the output) of ``fn(z)``."""
    z = z.clone().requires_grad_(True)
    out = fn(z)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weight).sum().backward()
    return out.detach(), z.grad


def diffusers_decode(model: QwenImageModel):
    """Normalised latents -> pixels through diffusers' ``vae.decode`` itself (what ``decode`` did
    before it checkpointed): the reference."""
    def fn(latents):
        z = latents.unsqueeze(2)
        mean, inv_std = channel_stats(model.vae.config, z)
        return (model.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0] * 0.5 + 0.5).clamp(0, 1)
    return fn


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def test_the_checkpointed_decode_equals_diffusers_decode_in_image_and_latent_gradient():
    model = tiny()
    assert model.decode_checkpointing  # the default
    z = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(3))
    ref, ref_grad = with_grad(diffusers_decode(model), z)
    image, grad = with_grad(model.decode, z)
    assert image.shape == (2, 3, H, W) and ref_grad.abs().max() > 0
    assert torch.allclose(image, ref, atol=1e-6) and close(grad, ref_grad)
    print(f"tiny twin: image max |diff| {(image - ref).abs().max():.2e}, latent gradient max |diff| / max "
          f"{((grad - ref_grad).abs().max() / ref_grad.abs().max()):.2e}")
    # it took the checkpointed path: autograd keeps a fraction of what diffusers' decode keeps
    x = z.clone().requires_grad_(True)
    (ckpt, _), _ = saved_by(model.vae, model.decode, x)
    (full, _), _ = saved_by(model.vae, diffusers_decode(model), x)
    assert 5 * ckpt < full


@pytest.mark.parametrize("slicing", [False, True])
def test_the_real_layout_decodes_the_same_checkpointed(slicing):
    vae = narrow_vae()
    vae.use_slicing = slicing  # per sample, as decode slices the batch
    z = torch.randn(2, NARROW["z_dim"], 1, H // 8, W // 8, generator=torch.Generator().manual_seed(5))
    ref, ref_grad = with_grad(lambda x: vae.decode(x, return_dict=False)[0], z)
    out, grad = with_grad(lambda x: decode_checkpointed(vae, x), z)
    assert out.shape == (2, 3, 1, H, W) and torch.allclose(out, ref, atol=1e-6) and close(grad, ref_grad)
    # the decoder's two temporal upsamplers and the mid block's attention are among the units
    opening, units = _decoder_pieces(vae)
    assert vae.decoder.mid_block in units and sum(getattr(u, "mode", None) == "upsample3d" for u in units) == 2


def test_a_skipped_block_or_a_filled_causal_cache_would_not_decode_the_same():
    """The comparison is sensitive to what the units run: without the mid block, or with the
    causal cache a frame before leaves (the upsamplers then run their time_conv, the convolutions
    pad with that frame), the image differs."""
    vae = narrow_vae()
    z = torch.randn(1, NARROW["z_dim"], 1, H // 8, W // 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        opening, units = _decoder_pieces(vae)
        x = opening(z)
        for unit in units[1:]:  # the mid block skipped
            x = unit(x)
        assert (x.clamp(-1, 1) - ref).abs().max() > 1e-2
        post = vae.post_quant_conv(z)
        cache = [None] * vae._cached_conv_counts["decoder"]
        vae.decoder(post, feat_cache=cache, feat_idx=[0])  # a first chunk fills the cache
        second = vae.decoder(post, feat_cache=cache, feat_idx=[0]).clamp(-1, 1)
        assert second.shape[2] == 4 and (second[:, :, :1] - ref).abs().max() > 1e-2


def test_without_gradient_the_decode_is_diffusers_decode(monkeypatch):
    model = tiny()
    z = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = diffusers_decode(model)(z)
    called, real = [], qi.decode_checkpointed
    monkeypatch.setattr(qi, "decode_checkpointed", lambda *a: called.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(model.decode(z), ref)  # rollouts and evaluation: bit for bit
    assert torch.equal(model.decode(z), ref)  # latents without gradient
    assert not called
    with_grad(model.decode, z)
    assert called  # ... and with gradient it checkpoints
    called.clear()
    model.decode_checkpointing = False
    image, _ = with_grad(model.decode, z)
    assert not called and torch.allclose(image, ref, atol=1e-6)


def test_the_option():
    model = tiny()
    assert "decode_checkpointing" in QwenImageModel.options
    parts = (model.transformer, model.vae, model.text_encoder, model.tokenizer, model.scheduler)
    assert not QwenImageModel(*parts, decode_checkpointing=False).decode_checkpointing
    with pytest.raises(UserError, match="decode_checkpointing must be true or false"):
        QwenImageModel(*parts, decode_checkpointing="no")
    with pytest.raises(UserError, match="decode_checkpointing must be true or false"):
        QwenImageModel.plan_decode(meta_vae(), {"decode_checkpointing": "off"}, 64, 64, 1, [0])


@pytest.mark.parametrize("on", [True, False])
def test_the_plan_on_meta_tensors_counts_what_real_ones_save(on):
    real, meta = narrow_vae(), meta_vae(**NARROW)
    counted = QwenImageModel.plan_decode(meta, {"decode_checkpointing": on}, H, W, 1, [0])
    measured = QwenImageModel.plan_decode(real, {"decode_checkpointing": on}, H, W, 1, [0])
    # within 1 %: the mid block's attention may save otherwise on a CPU than on the meta device
    assert all(abs(a - b) <= 0.01 * b for a, b in zip(counted, measured)), (counted, measured)
    assert all(p.requires_grad for p in meta.parameters())  # counted frozen, left as given


def test_the_plan_counts_the_units_inputs_held_and_one_unit_at_the_peak():
    vae = narrow_vae()
    z = torch.zeros(1, NARROW["z_dim"], 1, H // 8, W // 8, requires_grad=True)
    opening, units = _decoder_pieces(vae)
    (held, _), x = saved_by(vae, opening, z)
    peaks = []
    for unit in units:
        (saved, largest), out = saved_by(vae, unit, x)
        peaks.append(saved - x.numel() + 2 * largest)  # each unit's first norm saves its input
        held, x = held + x.numel(), out
    assert decode_plan(vae, H, W) == (held + 2 * x.numel(), max(peaks))
    # off: everything diffusers' decode saves, and the video (the last clamp's input)
    (saved, largest), video = saved_by(vae, lambda t: vae.decode(t, return_dict=False)[0], z)
    assert decode_plan(vae, H, W, False) == (saved + video.numel(), 2 * largest)


@pytest.mark.parametrize("size", [(64, 64), (720, 720), (1328, 1328)])
def test_the_flagship_checkpointed_decode_plans_a_fraction_of_the_full_one(size):
    vae = meta_vae()
    on = sum(QwenImageModel.plan_decode(vae, {}, *size, 1, [0]))
    off = sum(QwenImageModel.plan_decode(vae, {"decode_checkpointing": False}, *size, 1, [0]))
    print(f"{size}: bf16 per sample on {on * 2 / 2**30:.2f} GiB, off {off * 2 / 2**30:.2f} GiB ({off / on:.2f} x)")
    assert off > 3 * on


def test_srpo_plan_counts_the_qwen_decode_as_it_runs():
    cfg = load_config("tiny-qwen-image")
    sizes = model_sizes(cfg)
    vae = MODELS.get("tiny_qwen_image").plan_parts(None, {}, cfg.rollout.height, cfg.rollout.width).vae
    assert sizes.decode == decode_plan(vae, cfg.rollout.height, cfg.rollout.width)
    assert sum(sizes.decode) < sum(decode_plan(vae, cfg.rollout.height, cfg.rollout.width, False))


def decode_memory(size: int) -> dict:
    """Peak resident MiB a decode with gradient and its backward add on this CPU on the narrow VAE,
    diffusers' and checkpointed (each run once first at a quarter of the size, so that neither pays
    for kernels' first use), and the plan's count of each (float32)."""
    vae = narrow_vae()
    z = torch.randn(1, NARROW["z_dim"], 1, size // 8, size // 8, generator=torch.Generator().manual_seed(8))

    def run(fn, x=z):
        x = x.clone().requires_grad_(True)
        fn(x).sum().backward()

    full, ckpt = (lambda x: vae.decode(x, return_dict=False)[0]), (lambda x: decode_checkpointed(vae, x))
    run(full, z[..., : size // 32, : size // 32]), run(ckpt, z[..., : size // 32, : size // 32])
    out = {"checkpointed": qi_peak(lambda: run(ckpt)), "full": qi_peak(lambda: run(full))}
    meta = meta_vae(**NARROW)
    out.update(plan_checkpointed=sum(decode_plan(meta, size, size)) * 4 / 2**20,
               plan_full=sum(decode_plan(meta, size, size, False)) * 4 / 2**20)
    return out


def qi_peak(fn) -> float:
    from srpo.bench.measure import peak_memory

    return peak_memory(fn)


def test_the_checkpointed_decode_takes_a_fraction_of_the_full_decodes_memory():
    """256 x 256 on the narrow VAE, measured in a process of its own whose allocator hands every
    block over 64 KiB back at its free (``MALLOC_MMAP_THRESHOLD_``), so that its resident peak
    follows the live tensors; the saving as planned."""
    m = measured("test_qwen_decode", "decode_memory(256)")
    print("peak MiB: full decode {full:.0f} (plan {plan_full:.0f}), checkpointed {checkpointed:.0f} "
          "(plan {plan_checkpointed:.0f})".format(**m))
    assert m["full"] > 2 * m["checkpointed"]
    # what checkpointing saves, planned against measured; each peak also holds a transient the plan
    # leaves out, the same in both: CPU's conv3d unfolds its largest input 27 x (57 MiB here)
    assert 0.8 < (m["plan_full"] - m["plan_checkpointed"]) / (m["full"] - m["checkpointed"]) < 1.2
    assert 0 < m["full"] - m["plan_full"] < 100 and 0 < m["checkpointed"] - m["plan_checkpointed"] < 100
