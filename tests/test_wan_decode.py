"""Wan's decode with gradient chunk by chunk under activation checkpointing (srpo/models/wan.py,
``decode_chunks``) against the reference, ``AutoencoderKLWan.decode`` with every activation kept:
the same video and the same latent gradient (on the tiny twin and on a narrow VAE of the real
layout), sensitive to a wrong causal cache and to a needed chunk decoded without gradient; the
memory it saves, measured; ``srpo plan``'s count of it (``WanModel.plan_decode``) against the
decoder's saved tensors."""

from pathlib import Path

import pytest
import torch
from own_process import measured
from diffusers import AutoencoderKLWan

from srpo.bench.measure import peak_memory
from srpo.config import load_config
from srpo.models.wan import (WAN_VAE, WanModel, _chunk_counts, _decode_chunk, chunk_of, decode_chunks, decode_plan,
                             segment_length)
from srpo.models.wan_tiny import TinyWanModel
from srpo.plan import estimate_for, model_sizes
from srpo.rewards.objective import frame_indices

# the Wan 2.1 VAE's layout (dim_mult 1, 2, 4, 4; two resnets a level; two temporal upsamplings;
# the mid block's attention) at a narrow width
NARROW = dict(WAN_VAE, base_dim=8)
H, W = 32, 48


def narrow_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**NARROW).eval().requires_grad_(False)


def latents(frames: int, h: int = H, w: int = W, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, NARROW["z_dim"], frames, h // 8, w // 8, generator=torch.Generator().manual_seed(seed))


def decode_with_grad(fn, z: torch.Tensor, frames: list[int], seed: int = 2):
    """(video, gradient w.r.t. ``z`` of a random weighting of the video's ``frames``) of ``fn(z)``
    (``[B, 3, F, H, W]``)."""
    z = z.clone().requires_grad_(True)
    video = fn(z)
    picked = video[:, :, frames]
    weight = torch.randn(picked.shape, generator=torch.Generator().manual_seed(seed))
    (picked * weight).sum().backward()
    return video.detach(), z.grad


def reference(vae):
    return lambda z: vae.decode(z, return_dict=False)[0]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def test_chunks_make_the_frames_diffusers_decode_makes():
    vae = narrow_vae()
    z = latents(4)
    with torch.no_grad():
        for i in range(4):  # latent frames 0..i decode to 1 + 4 i frames: chunk i makes 4 (i - 1) + 1 .. 4 i
            assert vae.decode(z[:, :, :i + 1], return_dict=False)[0].shape[2] == 1 + 4 * i
    assert [chunk_of(f, 4) for f in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_tiny_twin_decode_equals_the_full_decode_in_frames_and_latent_gradient():
    model = TinyWanModel.load(seed=0)
    model.set_frames(17)  # 5 latent frames: segments of 3 and 2 chunks
    z = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(3))
    scored = frame_indices(4, 17)
    assert model.decode_checkpointing
    video, grad = decode_with_grad(lambda x: model.decode(x).transpose(1, 2), z, scored)
    model.decode_checkpointing = False
    ref, ref_grad = decode_with_grad(lambda x: model.decode(x).transpose(1, 2), z, scored)
    assert video.shape == ref.shape == (2, 3, 17, H, W)
    assert torch.allclose(video, ref, atol=1e-6) and close(grad, ref_grad)
    with torch.no_grad():  # without gradient: diffusers' decode itself
        assert torch.equal(model.decode(z), ref.transpose(1, 2))
    assert not TinyWanModel.load(seed=0, decode_checkpointing=False).decode_checkpointing  # the option


def test_decode_chunks_equals_the_full_decode_and_a_wrong_cache_or_skipped_chunk_would_not():
    vae, z = narrow_vae(), latents(6)  # 21 frames; segments of 3 chunks
    scored = frame_indices(4, 21)  # 0, 7, 13, 20: chunks 0, 2, 4, 5
    assert segment_length(6) == 3
    ref, ref_grad = decode_with_grad(reference(vae), z, scored)
    video, grad = decode_with_grad(lambda x: decode_chunks(vae, x), z, scored)
    assert torch.allclose(video, ref, atol=1e-6) and close(grad, ref_grad)
    assert ref_grad[:, :, -1].abs().max() > 0  # the last latent frame reaches the last frame

    # the comparison is sensitive to the causal cache: every later chunk from the first chunk's
    # cache (a stale one) makes other frames from chunk 2 on
    with torch.no_grad():
        x = vae.post_quant_conv(z)
        first, stale = _decode_chunk(vae.decoder, x[:, :, :1], (None,) * vae._cached_conv_counts["decoder"], True)
        wrong = torch.cat([first] + [_decode_chunk(vae.decoder, x[:, :, i:i + 1], stale, False)[0]
                                     for i in range(1, 6)], 2).clamp(-1, 1)
    assert torch.allclose(wrong[:, :, :5], ref[:, :, :5], atol=1e-6)  # chunks 0 and 1 had that cache
    assert (wrong - ref)[:, :, 5:].abs().max() > 1e-2
    # ... and to the chunks that take gradient: stopping one short of the last scored one drops
    # the last frame's gradient (the frames themselves are the same)
    short, short_grad = decode_with_grad(lambda x: decode_chunks(vae, x, grad_chunks=5), z, scored)
    assert torch.allclose(short, ref, atol=1e-6)
    assert not close(short_grad, ref_grad, rel=1e-2)


def test_frames_before_the_last_needed_chunk_take_gradient_the_rest_none():
    model = TinyWanModel.load(seed=0)
    model.set_frames(21)  # 6 latent frames
    z = torch.randn(model.latent_shape(1, H, W), generator=torch.Generator().manual_seed(4))
    frames = [0, 5]  # chunks 0 and 2: chunks 3-5 decode without gradient
    video, grad = decode_with_grad(lambda x: model.decode(x, frames=frames).transpose(1, 2), z, frames)
    model.decode_checkpointing = False
    ref, ref_grad = decode_with_grad(lambda x: model.decode(x).transpose(1, 2), z, frames)
    assert torch.allclose(video, ref, atol=1e-6) and close(grad, ref_grad)
    assert torch.equal(grad[:, :, 3:], torch.zeros_like(grad[:, :, 3:]))  # causal: nothing after chunk 2
    model.decode_checkpointing, model.decode_frames = True, frames  # the model's default for decode()
    x = z.clone().requires_grad_(True)
    out = model.decode(x)
    assert torch.allclose(out.detach(), ref.transpose(1, 2), atol=1e-6)
    out[:, frames].sum().backward()  # reaches the latents of chunks 0-2 only


def decode_memory(frames: int, h: int, w: int) -> dict:
    """Peak resident MiB a decode with gradient and its backward add on this CPU, full and
    chunked (each path run once first on 3 latent frames, so that neither pays for kernels' first
    use), and the
    plan's count of each (float32)."""
    vae, z = narrow_vae(), latents(frames, h, w)

    def run(fn, x=z):
        x = x.clone().requires_grad_(True)
        fn(x).sum().backward()

    run(reference(vae), z[:, :, :3]), run(lambda x: decode_chunks(vae, x), z[:, :, :3])
    out = {"chunked": peak_memory(lambda: run(lambda x: decode_chunks(vae, x))),
           "full": peak_memory(lambda: run(reference(vae)))}
    with torch.device("meta"):
        meta = AutoencoderKLWan(**NARROW)
    out.update(plan_chunked=sum(decode_plan(meta, h, w, frames)) * 4 / 2**20,
               plan_full=sum(decode_plan(meta, h, w, frames, None, False)) * 4 / 2**20)
    return out


def test_the_checkpointed_decode_takes_a_fraction_of_the_full_decodes_memory():
    """21 latent frames (81 frames, Wan's default count) at 64 x 64 on the narrow VAE, measured in
    a process of its own whose allocator hands every block over 64 KiB back at its free
    (``MALLOC_MMAP_THRESHOLD_``), so that its resident peak follows the live tensors."""
    m = measured("test_wan_decode", "decode_memory(21, 64, 64)")
    print("peak MiB: full decode {full:.0f} (plan {plan_full:.0f}), chunked {chunked:.0f} (plan {plan_chunked:.0f})"
          .format(**m))
    assert m["full"] > 3 * m["chunked"]
    assert 0.8 < m["plan_full"] / m["full"] < 1.2  # the held activations: the plan's count within 20 %
    assert m["plan_chunked"] < m["chunked"]  # the rest: one op's workspace and transients at a time


def test_the_plan_counts_the_tensors_the_decoder_saves():
    vae = narrow_vae()
    with torch.device("meta"):
        meta = AutoencoderKLWan(**NARROW)
    real, counted = _chunk_counts(vae, H, W, 6), _chunk_counts(meta, H, W, 6)
    assert len(real) == 2 and all(abs(a - b) <= 0.01 * a for r, c in zip(real, counted) for a, b in zip(r, c))
    assert all(p.requires_grad for p in meta.parameters())  # counted frozen, left as given

    # every chunk's saved tensors: what the full decode with gradient holds, distinct storages
    params = {p.untyped_storage()._cdata for p in vae.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes() // t.element_size()
        return t

    z = latents(6).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        video = vae.decode(z, return_dict=False)[0]
    held, _ = decode_plan(meta, H, W, 6, checkpointing=False)
    assert abs((held - 2 * video.numel()) - sum(seen.values())) <= 0.01 * held

    # checkpointed: the caches at segment starts and the video held; one segment's caches and one
    # chunk's activations at the peak; fewer chunks with gradient hold less
    (a0, big0, c0, f0), (a, big, c, f) = counted
    held, peak = decode_plan(meta, H, W, 6)
    assert held == c + 2 * (f0 + 5 * f) and peak == 2 * c + a + 2 * big + c + (f0 + 5 * f)
    assert sum(decode_plan(meta, H, W, 6, grad_chunks=3)) < held + peak < sum(decode_plan(meta, H, W, 6, None, False))


def test_srpo_plan_counts_the_wan_decode_as_it_runs():
    cfg = load_config("tiny-wan", ["rollout.frames=21"])
    on, off = model_sizes(cfg), model_sizes(load_config("tiny-wan", [
        "rollout.frames=21", "model.options.decode_checkpointing=false"]))
    vae = TinyWanModel.plan_parts(None, {}, 32, 32, frames=21).vae
    assert on.decode == decode_plan(vae, 32, 32, 6) and off.decode == decode_plan(vae, 32, 32, 6, None, False)
    plan = estimate_for(cfg, on, gpus=1, device="cpu")
    assert plan["activations: VAE decode"] == sum(on.decode) * 4 * cfg.train.batch_size  # float32 model
    assert estimate_for(cfg, off, gpus=1, device="cpu")["activations: VAE decode"] > 2 * plan["activations: VAE decode"]
    # frames listed before the end: gradient through their chunks only
    listed = model_sizes(load_config("tiny-wan", ["rollout.frames=21", "reward.frames=[0,5]"]))
    assert listed.decode == decode_plan(vae, 32, 32, 6, grad_chunks=3) and sum(listed.decode) < sum(on.decode)


@pytest.mark.parametrize("size", [(480, 832), (720, 1280)])
def test_the_flagship_decode_plan_is_a_fraction_of_every_frame_with_gradient(size):
    vae = WanModel.plan_parts(None, {}, *size, frames=81).vae
    chunked = sum(WanModel.plan_decode(vae, {}, *size, 81, frame_indices(4, 81)))
    full = sum(WanModel.plan_decode(vae, {"decode_checkpointing": False}, *size, 81, frame_indices(4, 81)))
    assert full > 8 * chunked


def test_the_wan22_5b_layout_residual_and_patchified_decodes_the_same():
    """Wan2.2-TI2V-5B's VAE layout (residual up blocks with DupUp3D, 2 x 2 patches, 16x) narrow."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=16, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_spatial=16).eval().requires_grad_(False)
    z = torch.randn(1, 8, 4, H // 16, W // 16, generator=torch.Generator().manual_seed(5))
    scored = frame_indices(4, 13)
    ref, ref_grad = decode_with_grad(reference(vae), z, scored)
    video, grad = decode_with_grad(lambda x: decode_chunks(vae, x), z, scored)
    assert video.shape == (1, 3, 13, H, W) and torch.allclose(video, ref, atol=1e-6) and close(grad, ref_grad)


def test_the_trainer_decodes_with_gradient_up_to_the_scored_frames():
    """srpo.setup.build hands reward.frames to the video family, so the trainer's decodes stop
    their gradient after the last scored frame's chunk (the plan counts the same)."""
    from srpo import setup

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny-wan.yaml", ["reward.frames=[0, 2]"])
    model, _, _ = setup.build(cfg, torch.device("cpu"))
    assert model.decode_frames == [0, 2]
