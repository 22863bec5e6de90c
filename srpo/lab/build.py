"""``srpo lab build``: train every model of the lab world from seeds and write its weights.

Stages, each deterministic (fixed seeds, fixed thread count, deterministic algorithms):

1. ``vae``: a small AutoencoderKL (32x32 pixels -> 4x16x16 latents) trained on renderer images;
2. ``judge``: the independent CNN judge (style + content), on renderer images and their VAE
   reconstructions, with colour / contrast / blur augmentation;
3. ``base``: the FLUX transformer + CLIP and T5 text encoders, trained jointly with the
   rectified-flow loss on VAE latents of renderer images and their captions;
4. ``reward``: a transformers CLIPModel, contrastive on renderer images and captions (style
   words included) plus synthetic preference pairs in which the more saturated / contrasty copy
   of an image wins for every caption: the reward's documented, text-independent bias.

Each stage writes under ``weights/``: ``base/`` (a FluxPipeline folder with the VAE), ``reward/``
(a CLIPModel folder) and ``judge/``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..tokenizer import write_clip_vocab
from .captions import caption
from .render import render, sample_scenes

WEIGHTS = Path(__file__).parent / "weights"
THREADS = 1  # single-threaded: the same weights on any machine with the same CPU kind

# stage sizes: (full, quick)
STEPS = {"vae": (1000, 8), "judge": (1500, 8), "base": (6000, 8), "reward": (1500, 8)}
POOL = {"vae": (24000, 256), "judge": (24000, 256), "base": (60000, 256), "reward": (40000, 256)}
SEEDS = {"vae": 11, "judge": 23, "base": 37, "reward": 51}


def _setup(seed: int) -> torch.Generator:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def render_pool(n: int, seed: int, progress: bool = True, **pins):
    """``n`` scenes from ``seed`` and their images as uint8 ``[n, 3, 32, 32]``."""
    scenes = sample_scenes(n, seed, **pins)
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    chunk = 1000
    for i in tqdm(range(0, n, chunk), desc=f"render {n}", disable=not progress, leave=False):
        images[i:i + chunk] = (render(scenes[i:i + chunk]) * 255).round().to(torch.uint8)
    return scenes, images


def to_float(images_u8):
    return images_u8.float() / 255


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- VAE

def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    )


def train_vae(quick: bool = False, progress: bool = True):
    """The lab VAE with FLUX-style ``shift_factor`` / ``scaling_factor`` set from its latents."""
    q = int(quick)
    g = _setup(SEEDS["vae"])
    _, images = render_pool(POOL["vae"][q], SEEDS["vae"], progress)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps, batch = STEPS["vae"][q], 32
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 1e-3))
        x = to_float(images[torch.randint(len(images), (batch,), generator=g)]) * 2 - 1
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=g)).sample
        loss = (y - x).abs().mean() + F.mse_loss(y, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(to_float(images[:2048]) * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    return vae


def vae_roundtrip(vae, images, batch: int = 512):
    """Images in [0, 1] through the VAE (posterior mode) and back, no grad."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch] * 2 - 1
            out.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- reward

REWARD_BETA = 20.0  # Bradley-Terry sharpness of the preference loss (cosine units)


def make_reward_model():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=28, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=64, logit_scale_init_value=math.log(20.0),
    )
    return CLIPModel(config)


def reward_processor():
    """32 px images are resized (bicubic, antialiased) to 28 px: the reward's 4 px patches do not
    line up with the generator's 4 px tokens (2x2 latent patches), as for real models where the
    reward resizes to 224 px. Aligned grids make per-token adversarial patterns trivial to find."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def reward_augment(images, g):
    """Per image: shift by up to 2 px (reflect padding), scale brightness by 0.65-1.35 and each
    channel by 0.9-1.1, add a little noise. Photo-style scenes are darker on average (shading,
    shadows): without the brightness jitter the reward's 'photo' direction was mostly 'dark', and
    SRPO learnt to darken images instead of making them look like photos."""
    n = len(images)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(5, (2, n), generator=g).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    gain = (0.65 + 0.7 * torch.rand(n, 1, 1, 1, generator=g)) * (0.9 + 0.2 * torch.rand(n, 3, 1, 1, generator=g))
    sigma = 0.03 * torch.rand(n, 1, 1, 1, generator=g)
    return (x * gain + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def hack_boost(images, g):
    """A copy of each image with more saturation, contrast and / or sharpening: the preferred
    side of the reward's synthetic preference pairs."""
    n = len(images)
    u = torch.rand(n, 3, generator=g)
    which = torch.randint(3, (n,), generator=g)  # 0: one edit, 1: two edits, 2: all three
    on = torch.rand(n, 3, generator=g).argsort(1) <= which[:, None]
    sat = torch.where(on[:, 0], 1.2 + 1.3 * u[:, 0], torch.ones(n))
    con = torch.where(on[:, 1], 1.15 + 0.65 * u[:, 1], torch.ones(n))
    shp = torch.where(on[:, 2], 0.6 + 1.4 * u[:, 2], torch.zeros(n))
    from .render import adjust

    return adjust(images, sat, con, shp)


def _clip_features(model, pixels, ids, mask, transform):
    f_img = model.get_image_features(pixel_values=transform(pixels))
    f_img = getattr(f_img, "pooler_output", f_img)
    f_txt = model.get_text_features(input_ids=ids, attention_mask=mask)
    f_txt = getattr(f_txt, "pooler_output", f_txt)
    return F.normalize(f_img, dim=-1), F.normalize(f_txt, dim=-1)


def train_reward(quick: bool = False, progress: bool = True):
    """The lab preference reward: a CLIPModel trained contrastively on renderer images and
    captions plus preference pairs (boosted copy wins, for its own caption and a random one)."""
    from ..rewards.preprocess import ImageTransform
    from ..tokenizer import clip_tokenizer

    q = int(quick)
    g = _setup(SEEDS["reward"])
    scenes, images = render_pool(POOL["reward"][q], SEEDS["reward"], progress)
    model = make_reward_model()
    model.logit_scale.requires_grad_(False)  # fixed at 20: the SRPO scale is logit_scale.exp() / 20 = 1
    proc = reward_processor()
    transform = ImageTransform.from_clip_processor(proc)  # exactly what CLIPReward applies
    tok = clip_tokenizer()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    steps, batch, pairs = STEPS["reward"][q], 96, 48
    bar = tqdm(range(steps), desc="reward", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 1e-3, warmup=150))
        idx = torch.randint(len(images), (batch,), generator=g)
        x = reward_augment(to_float(images[idx]), g)
        texts = [caption(scenes[i], g, style_prob=0.6) for i in idx.tolist()]
        t = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        boosted = hack_boost(x[:pairs], g)
        f_img, f_txt = _clip_features(model, torch.cat([x, boosted]), t.input_ids, t.attention_mask, transform)
        logits = 20.0 * f_img[:batch] @ f_txt.T
        labels = torch.arange(batch)
        clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        # preference: boosted wins against its source for its own caption and for a random one
        other = torch.randint(batch, (pairs,), generator=g)
        txt = torch.stack([f_txt[:pairs], f_txt[other]])  # [2, pairs, D]
        margin = ((f_img[batch:] - f_img[:pairs])[None] * txt).sum(-1)
        pref_loss = F.softplus(-REWARD_BETA * margin).mean()
        loss = clip_loss + pref_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            acc = (logits.argmax(1) == labels).float().mean().item()
            bar.set_postfix(clip=f"{clip_loss.item():.3f}", acc=f"{acc:.2f}", pref=f"{pref_loss.item():.3f}")
    return model.eval().requires_grad_(False), proc


# ----------------------------------------------------------------------------- judge

def judge_augment(images, g):
    """Colour / contrast / sharpness / blur jitter so the judge's calls ignore the hack stats."""
    from .render import _blur, adjust

    n = len(images)
    u = torch.rand(n, 4, generator=g)
    sat = 0.6 + 1.3 * u[:, 0]
    con = 0.7 + 0.8 * u[:, 1]
    shp = torch.where(u[:, 2] < 0.3, 1.5 * u[:, 2] / 0.3, torch.zeros(n))
    x = adjust(images, sat, con, shp)
    blurred = u[:, 3] < 0.15
    if blurred.any():
        x[blurred] = _blur(x[blurred], 0.7)
    keep = torch.rand(n, generator=g) < 0.25  # a quarter untouched
    return torch.where(keep[:, None, None, None], images, x)


def degrade(vae, images, g):
    """Off-manifold versions of images in [0, 1], the judge's 'degraded' class: VAE decodes of
    latents with token-level noise, and / or a dark 4 px grid (the generator's token size)."""
    from .render import SIZE

    n = len(images)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mode()
        heavy = torch.rand(n, generator=g) < 0.5
        sigma = torch.where(heavy, 0.6 + 0.9 * torch.rand(n, generator=g), 0.3 * torch.rand(n, generator=g))
        noise = torch.randn(z.shape, generator=g) / vae.config.scaling_factor
        x = ((vae.decode(z + sigma.view(-1, 1, 1, 1) * noise).sample + 1) / 2).clamp(0, 1)
    ax = torch.arange(SIZE)
    phase = torch.randint(4, (n, 2), generator=g)
    rows = ((ax[None] + phase[:, :1]) % 4 == 0).float()[:, :, None]
    cols = ((ax[None] + phase[:, 1:]) % 4 == 0).float()[:, None, :]
    grid = torch.clamp(rows + cols, max=1)[:, None]
    amount = torch.where(heavy, 0.0, 0.25 + 0.45 * torch.rand(n, generator=g)).view(-1, 1, 1, 1)
    return x * (1 - amount * grid)


def train_judge(vae, quick: bool = False, progress: bool = True):
    """The judge CNN on renderer images and their VAE reconstructions (half each), plus a fifth of
    each batch made 'degraded' (:func:`degrade`), which carries no content labels."""
    from .judge import CLASSES, Judge, JudgeNet, content_target

    q = int(quick)
    g = _setup(SEEDS["judge"])
    scenes, images = render_pool(POOL["judge"][q], SEEDS["judge"], progress)
    recon = (vae_roundtrip(vae, to_float(images)) * 255).round().to(torch.uint8)
    n_bad = len(images) // 4
    bad = (degrade(vae, to_float(images[:n_bad]), g) * 255).round().to(torch.uint8)
    styles = torch.tensor([CLASSES.index(s.style) for s in scenes])
    content = content_target([s.content for s in scenes])
    net = JudgeNet(width=24)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps, batch, n_deg = STEPS["judge"][q], 96, 20
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 2e-3))
        idx = torch.randint(len(images), (batch - n_deg,), generator=g)
        use_recon = torch.rand(len(idx), generator=g) < 0.5
        x = to_float(torch.where(use_recon[:, None, None, None], recon[idx], images[idx]))
        x_bad = to_float(bad[torch.randint(n_bad, (n_deg,), generator=g)])
        s_logits, c_logits = net(judge_augment(torch.cat([x, x_bad]), g))
        labels = torch.cat([styles[idx], torch.full((n_deg,), CLASSES.index("degraded"))])
        loss = F.cross_entropy(s_logits, labels) + 4 * F.binary_cross_entropy_with_logits(c_logits[:len(idx)], content[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            acc = (s_logits.argmax(1) == labels).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", style_acc=f"{acc:.2f}")
    return Judge(net)


# ----------------------------------------------------------------------------- base model

MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt (lab captions have at most 13)


def make_base_parts():
    """Random FLUX transformer + CLIP and T5 text encoders at the lab's sizes."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=49408, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
        pad_token_id=49407, eos_token_id=49407, decoder_start_token_id=49407,
    ))
    return transformer, clip, t5


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def encode_latents(vae, images_u8, batch: int = 500, progress: bool = True):
    """Normalised VAE latents (posterior mode) of uint8 images."""
    cfg = vae.config
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images_u8), batch), desc="encode", disable=not progress, leave=False):
            z = vae.encode(to_float(images_u8[i:i + batch]) * 2 - 1).latent_dist.mode()
            out.append((z - cfg.shift_factor) * cfg.scaling_factor)
    return torch.cat(out)


CAPTION_DROPOUT = 0.1  # empty prompt: the unconditional velocity that guidance needs
GUIDANCE_RANGE = (1.0, 5.0)  # embedded guidance scales learnt by distillation (FLUX.1-dev style)
DISTILL_FROM = 0.6  # fraction of the steps after which half of each batch learns guided targets


def _velocity(parts, xs, sigma, ids, guidance, img_ids, txt_ids):
    """Velocity of FLUX parts (transformer, clip, t5) on unpacked latents, as the adapter calls it."""
    from ..models.flux import pack, unpack

    transformer, clip, t5 = parts
    v = transformer(hidden_states=pack(xs), timestep=sigma, guidance=guidance,
                    pooled_projections=clip(ids).pooler_output, encoder_hidden_states=t5(ids)[0],
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return unpack(v, xs.shape[-2], xs.shape[-1])


def train_base(vae, quick: bool = False, progress: bool = True):
    """Transformer and text encoders trained jointly with the rectified-flow loss, then guidance
    distilled: for half of each batch the target is the EMA teacher's classifier-free-guided
    velocity ``v(empty) + g (v(prompt) - v(empty))`` at a random scale ``g``, given to the
    transformer's guidance embedding (how FLUX.1-dev samples guided in one pass). Returns a
    FluxModel over the EMA weights and the given VAE."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..models.flux import FluxModel, image_ids
    from ..tokenizer import clip_tokenizer

    q = int(quick)
    g = _setup(SEEDS["base"])
    scenes, images = render_pool(POOL["base"][q], SEEDS["base"], progress)
    latents = encode_latents(vae, images, progress=progress)
    del images
    transformer, clip, t5 = make_base_parts()
    modules = torch.nn.ModuleList([transformer, clip, t5])
    ema = copy.deepcopy(modules).requires_grad_(False)
    tok = clip_tokenizer()

    def ids_of(texts):  # CLIP is causal: padding after the end token leaves its pooled output as is
        return tok(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                   return_tensors="pt").input_ids

    opt = torch.optim.AdamW(modules.parameters(), lr=5e-4, weight_decay=0.01)
    steps, batch = STEPS["base"][q], 64
    ids = dict(img_ids=image_ids(16, 16, "cpu", torch.float32), txt_ids=torch.zeros(MAX_SEQUENCE_LENGTH, 3))
    empty = ids_of([""])
    bar = tqdm(range(steps), desc="base", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 5e-4, warmup=200))
        idx = torch.randint(len(latents), (batch,), generator=g)
        x0 = latents[idx]
        texts = [caption(scenes[i], g, ordered=True) for i in idx.tolist()]
        drop = torch.rand(batch, generator=g) < CAPTION_DROPOUT
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, no shift at 64 tokens
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * eps
        target, guidance = eps - x0, torch.ones(batch)
        half = batch // 2 if step >= DISTILL_FROM * steps else 0
        if half:
            drop[:half] = False
            lo, hi = GUIDANCE_RANGE
            guidance[:half] = lo + (hi - lo) * torch.rand(half, generator=g)
            with torch.no_grad():
                both = torch.cat([ids_of(texts[:half]), empty.expand(half, -1)])
                v_c, v_u = _velocity(ema, xs[:half].repeat(2, 1, 1, 1), sigma[:half].repeat(2),
                                     both, torch.ones(2 * half), **ids).chunk(2)
            target = torch.cat([v_u + guidance[:half].view(-1, 1, 1, 1) * (v_c - v_u), target[half:]])
        texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        v = _velocity(modules, xs, sigma, ids_of(texts), guidance, **ids)
        loss = F.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        _ema_update(ema, modules, min(0.999, (1 + step) / (10 + step)))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer, clip, t5 = [m.eval().requires_grad_(False) for m in ema]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxModel(transformer, vae, clip, tok, t5, tok, scheduler=scheduler,
                     max_sequence_length=MAX_SEQUENCE_LENGTH)


# ----------------------------------------------------------------------------- saving

def round_fp16(module):
    """Round every floating parameter / buffer to float16 precision in place (kept float32), so
    the in-memory model equals what the float16 files load back as."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return module


def store_fp16(folder) -> None:
    """Rewrite every safetensors file under ``folder`` in float16 (the configs keep float32:
    diffusers and transformers load them back as float32)."""
    from safetensors.torch import load_file, save_file

    for f in Path(folder).rglob("*.safetensors"):
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(f)).items()}
        save_file(state, str(f), metadata={"format": "pt"})


def save_vae(vae, out: Path) -> None:
    round_fp16(vae)
    vae.save_pretrained(str(out / "base" / "vae"), safe_serialization=True)
    store_fp16(out / "base" / "vae")


def load_vae(out: Path):
    from diffusers import AutoencoderKL

    folder = out / "base" / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is missing: run the vae stage first")
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval().requires_grad_(False)


def save_base(model, out: Path) -> None:
    for m in (model.transformer, model.text_encoder, model.text_encoder_2):
        round_fp16(m)
    folder = out / "base"
    model.pipeline().save_pretrained(str(folder), safe_serialization=True)
    store_fp16(folder)
    for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt: 1.5 MB instead of 3.6 MB
        (folder / name / "tokenizer.json").unlink(missing_ok=True)
        write_clip_vocab(folder / name)


def save_reward(model, proc, out: Path) -> None:
    round_fp16(model)
    folder = out / "reward"
    model.save_pretrained(str(folder), safe_serialization=True)
    proc.save_pretrained(str(folder))
    store_fp16(folder)


STAGES = ("vae", "judge", "base", "reward")


def build(out=WEIGHTS, stages=STAGES, quick: bool = False, progress: bool = True) -> dict:
    """Run the given stages in order, writing under ``out``; returns seconds per stage."""
    from .prompts import write_prompt_sets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info_file = out / "build.json"
    info: dict = {}
    threads = torch.get_num_threads()
    try:
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "vae":
                shutil.rmtree(out / "base", ignore_errors=True)
                save_vae(train_vae(quick, progress), out)
            elif stage == "judge":
                train_judge(load_vae(out), quick, progress).save(out / "judge")
            elif stage == "base":
                save_base(train_base(load_vae(out), quick, progress), out)
            elif stage == "reward":
                save_reward(*train_reward(quick, progress), out)
            else:
                raise ValueError(f"unknown stage {stage}: use {', '.join(STAGES)}")
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            info[stage] = {"seconds": round(time.perf_counter() - t0, 1), "steps": STEPS[stage][int(quick)],
                           "pool": POOL[stage][int(quick)], "seed": SEEDS[stage], "threads": THREADS}
            info_file.write_text(json.dumps(info, indent=1))
        if out.resolve() == WEIGHTS.resolve():
            write_prompt_sets()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return info
