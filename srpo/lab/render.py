"""The lab world's procedural renderer: one or two coloured shapes in one of three styles.

Everything is deterministic: a :class:`Scene` carries its own seed, and ``render([scene])[0]``
equals ``render([..., scene, ...])[i]``. Scenes are drawn with :func:`sample_scenes` from a seed.

Styles (what the judge calls realism is ``style == "photo"``):

- ``photo``: gradient light on the background, shaded objects with a specular spot, a soft
  cast shadow, soft edges and film grain;
- ``cartoon``: flat background and fills, dark outlines;
- ``painting``: oriented brush-stroke texture on background and objects, wobbly edges, light
  oily highlight streaks.

The three styles are tuned to have about the same mean saturation, contrast and sharpness
(see ``docs/lab.md``), so steering between styles is not itself a colour hack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..guard.stats import LAB_STATS, luminance  # one definition of the statistics (guard and lab)
from ..guard.stats import image_stats as _image_stats

SIZE = 32  # image side in pixels
STYLES = ("photo", "cartoon", "painting")
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.66, 0.22),
    "blue": (0.16, 0.32, 0.86),
    "yellow": (0.93, 0.82, 0.14),
    "purple": (0.56, 0.22, 0.74),
    "orange": (0.95, 0.52, 0.10),
}
COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    r: float  # circumradius, pixels
    angle: float  # radians


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    style: str
    background: tuple[float, float, float]
    seed: int  # drives every texture / noise field of this scene

    @property
    def content(self) -> tuple[tuple[str, str], ...]:
        """``((colour, shape), ...)`` of the objects, left to right."""
        return tuple((o.colour, o.shape) for o in self.objects)


# ----------------------------------------------------------------------------- scenes

def _background(g: torch.Generator) -> tuple[float, float, float]:
    """A muted background: grey level 0.3-0.85 with a faint random tint."""
    u = torch.rand(4, generator=g).tolist()
    level = 0.3 + 0.55 * u[0]
    tint = torch.tensor([u[1], u[2], u[3]]) - 0.5
    rgb = (level + 0.12 * tint).clamp(0, 1)
    return tuple(round(v, 4) for v in rgb.tolist())


def sample_scene(seed: int, style: str | None = None, n_objects: int | None = None,
                 content: tuple[tuple[str, str], ...] | None = None) -> Scene:
    """One random scene from ``seed``; ``style``, ``n_objects`` or ``content`` pin parts of it."""
    g = torch.Generator().manual_seed(int(seed))
    rand = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    style = style or pick(STYLES)
    if content is None:
        n = n_objects or (1 if rand() < 0.5 else 2)
        first = (pick(COLOUR_NAMES), pick(SHAPES))
        content = (first,)
        while len(content) < n:
            other = (pick(COLOUR_NAMES), pick(SHAPES))
            if other != first:
                content = content + (other,)
    objects = []
    for i, (colour, shape) in enumerate(content):
        if len(content) == 1:
            r = 8.5 + 3.0 * rand()
            x, y = 16 + 4 * (rand() - 0.5), 15 + 4 * (rand() - 0.5)
        else:
            r = 6.0 + 1.5 * rand()
            x, y = (9.0 if i == 0 else 23.0) + 2 * (rand() - 0.5), 15 + 6 * (rand() - 0.5)
        angle = 0.35 * (rand() - 0.5)
        objects.append(Obj(shape, colour, round(x, 3), round(y, 3), round(r, 3), round(angle, 4)))
    return Scene(tuple(objects), style, _background(g), int(torch.randint(2**31 - 1, (1,), generator=g)))


def sample_scenes(n: int, seed: int, **pins) -> list[Scene]:
    """``n`` scenes; scene ``i`` is ``sample_scene(seed * 1_000_003 + i)``."""
    return [sample_scene(seed * 1_000_003 + i, **pins) for i in range(n)]


# ----------------------------------------------------------------------------- geometry

_Y, _X = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32) + 0.5,
                        torch.arange(SIZE, dtype=torch.float32) + 0.5, indexing="ij")


def _sdf(o: Obj) -> Tensor:
    """Approximate signed distance (pixels, negative inside) of one object, [H, W]."""
    c, s = math.cos(o.angle), math.sin(o.angle)
    dx, dy = _X - o.x, _Y - o.y
    px, py = c * dx + s * dy, -s * dx + c * dy  # rotate into the object's frame
    if o.shape == "circle":
        return torch.sqrt(px**2 + py**2) - o.r
    if o.shape == "square":
        h = 0.78 * o.r
        qx, qy = px.abs() - h, py.abs() - h
        outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
        return outside + torch.maximum(qx, qy).clamp(max=0)
    if o.shape == "triangle":  # equilateral, apex up, circumradius r
        py = py - 0.15 * o.r  # centre the visual mass
        d = None
        for k in range(3):
            t = math.pi / 2 + k * 2 * math.pi / 3 + math.pi  # outward edge normals
            e = math.cos(t) * px - math.sin(t) * py - 0.5 * o.r
            d = e if d is None else torch.maximum(d, e)
        return d
    if o.shape == "star":  # five points, inner radius 0.45 r
        theta = torch.atan2(px, -py)  # 0 at the top
        frac = torch.remainder(theta / (2 * math.pi / 5) + 0.5, 1.0)
        tri = (frac - 0.5).abs() * 2  # 0 at a point, 1 between points
        radius = o.r * (1 - 0.55 * tri)
        return (torch.sqrt(px**2 + py**2) - radius) * 0.75
    raise ValueError(f"unknown shape {o.shape}")


def _cover(sdf: Tensor, soft: float) -> Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance."""
    return torch.clamp(0.5 - sdf / soft, 0.0, 1.0)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur over the last two dimensions of ``x`` (any leading shape), reflect padding."""
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    shape = x.shape
    y = F.pad(x.reshape(-1, 1, *shape[-2:]), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(shape)


def _strokes(g: torch.Generator, angle: float, length: int = 7) -> Tensor:
    """Brush-stroke texture [H, W], zero mean, about unit std: noise smeared along ``angle``."""
    n = torch.randn(1, 1, SIZE + 2 * length, SIZE + 2 * length, generator=g)
    t = torch.arange(-(length // 2), length // 2 + 1, dtype=torch.float32)
    kx, ky = torch.round(t * math.cos(angle)).long(), torch.round(t * math.sin(angle)).long()
    k = torch.zeros(1, 1, length + 1, length + 1)
    k[0, 0, ky + length // 2, kx + length // 2] = 1.0
    y = F.conv2d(n, k, padding=0)[0, 0]
    off = (y.shape[0] - SIZE) // 2
    y = y[off:off + SIZE, off:off + SIZE]
    return (y - y.mean()) / (y.std() + 1e-6)


# ----------------------------------------------------------------------------- styles

def _rgb(name: str) -> Tensor:
    return torch.tensor(COLOURS[name]).view(3, 1, 1)


def _photo(scene: Scene, g: torch.Generator) -> Tensor:
    bg = torch.tensor(scene.background).view(3, 1, 1)
    light = 1.18 - 0.45 * (_Y / SIZE) - 0.1 * (_X / SIZE)  # light from the top left
    img = (bg * light).expand(3, SIZE, SIZE).clone()
    for o in scene.objects:
        sdf = _sdf(o)
        shadow = _blur(_cover(_sdf(Obj(o.shape, o.colour, o.x + 2.0, o.y + 2.5, o.r, o.angle)), 1.0)[None], 1.6)[0]
        img = img * (1 - 0.5 * shadow)
        cover = _cover(sdf, 1.6)
        # shading: a smooth lit dome over the shape, brighter toward the light
        depth = (-sdf / o.r).clamp(0, 1)
        lx, ly = (_X - o.x) / o.r, (_Y - o.y) / o.r
        shade = 0.62 + 0.32 * depth.sqrt() - 0.22 * (lx + ly)
        spec = torch.exp(-((lx + 0.35) ** 2 + (ly + 0.4) ** 2) / 0.05) * 0.35
        body = (_rgb(o.colour) * shade + spec).clamp(0, 1)
        img = img * (1 - cover) + body * cover
    img = img + 0.028 * torch.randn(1, SIZE, SIZE, generator=g) + 0.01 * torch.randn(3, SIZE, SIZE, generator=g)
    return img


def _cartoon(scene: Scene, g: torch.Generator) -> Tensor:
    bg = torch.tensor(scene.background).view(3, 1, 1)
    img = bg.expand(3, SIZE, SIZE).clone()
    ink = torch.tensor([0.17, 0.15, 0.19]).view(3, 1, 1)
    for o in scene.objects:
        sdf = _sdf(o)
        outer = _cover(sdf - 1.1, 0.8)
        inner = _cover(sdf + 0.4, 0.8)
        img = img * (1 - outer) + ink * outer
        img = img * (1 - inner) + _rgb(o.colour) * inner
    return img


def _painting(scene: Scene, g: torch.Generator) -> Tensor:
    bg = torch.tensor(scene.background).view(3, 1, 1)
    angle = float(torch.rand(1, generator=g)) * math.pi
    tex = _strokes(g, angle, length=9)
    img = bg * (1.16 - 0.4 * (_Y / SIZE)) * (1 + 0.06 * tex) + 0.03 * torch.randn(3, 1, 1, generator=g)
    for o in scene.objects:
        wobble = 4.0 * _blur(torch.randn(1, SIZE, SIZE, generator=g), 2.5)[0]
        cover = _cover(_sdf(o) + wobble, 1.0)
        tex_o = _strokes(g, angle + 1.2 + 0.6 * float(torch.rand(1, generator=g)), length=5)
        body = _rgb(o.colour) * (1 + 0.09 * tex_o)
        # oily highlight: a short bright streak inside the shape
        hx, hy = o.x - 0.3 * o.r, o.y - 0.35 * o.r
        streak = torch.exp(-(((_X - hx) * 0.9 + (_Y - hy) * 0.45) ** 2) / 3.0 - (((_Y - hy) * 0.9 - (_X - hx) * 0.45) ** 2) / 0.8)
        body = body + 0.4 * streak * (tex_o > -0.3)
        img = img * (1 - cover) + body * cover
    return img


_STYLE_FNS = {"photo": _photo, "cartoon": _cartoon, "painting": _painting}


def render(scenes: list[Scene]) -> Tensor:
    """Scenes -> images ``[B, 3, SIZE, SIZE]`` in [0, 1] (float32). Runs single-threaded (the
    tensors are tiny) and restores the caller's thread count."""
    out = torch.empty(len(scenes), 3, SIZE, SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, s in enumerate(scenes):
            g = torch.Generator().manual_seed(s.seed)
            out[i] = _STYLE_FNS[s.style](s, g).clamp(0, 1)
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- statistics

def image_stats(images: Tensor) -> dict[str, Tensor]:
    """The lab's three statistics (saturation, contrast, sharpness) of :func:`srpo.guard.stats.image_stats`."""
    return _image_stats(images, LAB_STATS)


def adjust(images: Tensor, saturation: Tensor | float = 1.0, contrast: Tensor | float = 1.0,
           sharpen: Tensor | float = 0.0) -> Tensor:
    """Photometric edits of ``[B, 3, H, W]`` images (per-image factors broadcast): saturation
    (scale the distance from grey), contrast (scale the distance from the mean luminance) and
    unsharp masking (add ``sharpen`` times the detail above a 1-pixel blur); clipped to [0, 1]."""
    def per(v):
        return torch.as_tensor(v, dtype=images.dtype).reshape(-1, 1, 1, 1)

    lum = luminance(images)[:, None]
    x = lum + per(saturation) * (images - lum)
    m = lum.mean((2, 3), keepdim=True)
    x = m + per(contrast) * (x - m)
    blur = _blur(x, 1.0)
    x = x + per(sharpen) * (x - blur)
    return x.clamp(0, 1)
