"""Stage ``judge`` of ``srpo lab build``: the independent CNN judge (style + content), on renderer
images, their VAE reconstructions and degraded copies, with colour / contrast / blur augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .train_vae import vae_roundtrip
from .training import POOL, SEEDS, STEPS, _cosine_lr, _set_lr, _setup, render_pool, to_float


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
