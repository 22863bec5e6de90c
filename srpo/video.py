"""Videos people can watch: an H.264 mp4 per video (PyAV, in process; its wheels bundle FFmpeg
with libx264) and an animated GIF grid of several videos, frame by frame.

The mp4s are ``yuv420p`` (what browsers, QuickTime and phones play) at ``crf`` 17 (visually
lossless for x264): the codec rounds colour to 8 bits and halves chroma resolution, so a decoded
frame differs from the tensor by a few levels of 255 (tests/test_video.py measures it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import UserError

FPS = 16  # Wan 2.1's frame rate (the model cards' export_to_video fps)
CRF = 17


def frames_uint8(video: torch.Tensor):
    """``[F, 3, H, W]`` in [0, 1] -> a ``[F, H, W, 3]`` uint8 numpy array."""
    return (video.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_mp4(video: torch.Tensor, path, fps: int = FPS, crf: int = CRF) -> Path:
    """One video ``[F, 3, H, W]`` in [0, 1] as an H.264 mp4 (height and width must be even, as
    yuv420p needs; srpo's sizes are multiples of 16)."""
    import av

    if video.ndim != 4 or video.shape[1] != 3:
        raise UserError(f"a video to write is [frames, 3, height, width], got {list(video.shape)}")
    _, _, h, w = video.shape
    if h % 2 or w % 2:
        raise UserError(f"video size {h}x{w} is not even: H.264 (yuv420p) needs even heights and widths")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for arr in frames_uint8(video):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder
    return path


def read_mp4(path) -> torch.Tensor:
    """An mp4's frames as ``[F, 3, H, W]`` in [0, 1] (for tests and checks)."""
    import av

    with av.open(str(path)) as f:
        frames = [torch.from_numpy(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)]
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255


def write_grid_gif(videos: torch.Tensor, path, fps: int = FPS, nrow: int | None = None, pad: int = 2) -> Path:
    """Videos ``[N, F, 3, H, W]`` tiled ``nrow`` to a row (about square by default), played
    together as one looping GIF (GIF frame times are in hundredths of a second: 16 fps plays at
    1 / 0.06 s)."""
    from PIL import Image

    videos = videos.detach().float().clamp(0, 1).cpu()
    n, f, _, h, w = videos.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(f, 3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[:, :, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = videos[i]
    images = [Image.fromarray(a) for a in frames_uint8(canvas)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def fit(videos: torch.Tensor, max_side: int) -> torch.Tensor:
    """Videos ``[..., 3, H, W]`` scaled down (area filter, aspect kept) so that neither side
    exceeds ``max_side``; as they are when they fit."""
    import torch.nn.functional as F

    h, w = videos.shape[-2:]
    scale = max_side / max(h, w)
    if scale >= 1:
        return videos
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    lead = videos.shape[:-3]
    out = F.interpolate(videos.float().reshape(-1, 3, h, w), size=size, mode="area")
    return out.reshape(*lead, 3, *size)


def write_preview_gif(videos: torch.Tensor, path, fps: int = FPS, nrow: int | None = None, pad: int = 2,
                      max_side: int = 256) -> Path:
    """:func:`write_grid_gif` of videos ``[N, F, 3, H, W]`` each first scaled to fit ``max_side``
    (a page's animated preview: a full-size Wan grid would be hundreds of megabytes)."""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise UserError(f"videos to preview are [videos, frames, 3, height, width], got {list(videos.shape)}")
    return write_grid_gif(fit(videos.detach().float().clamp(0, 1).cpu(), max_side), path, fps=fps, nrow=nrow, pad=pad)


def read_video_grid(path, height: int, width: int) -> torch.Tensor:
    """The videos ``[N, F, 3, H, W]`` in [0, 1] of a PNG that :func:`srpo.runlog.save_grid` wrote
    of videos (a row of frames per video, 2-pixel gaps): exactly its 8-bit frames. ``height``
    and ``width`` are one frame's size."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    pad, (gh, gw) = 2, arr.shape[:2]
    rows, cols = (gh - pad) // (height + pad), (gw - pad) // (width + pad)
    if rows < 1 or cols < 1 or rows * (height + pad) + pad != gh or cols * (width + pad) + pad != gw:
        raise UserError(f"{path} ({gw}x{gh}) is not a grid of {width}x{height} video frames "
                        f"(srpo.runlog.save_grid of videos)")
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    videos = torch.empty(rows, cols, 3, height, width)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (height + pad), pad + c * (width + pad)
            videos[r, c] = t[:, y:y + height, x:x + width]
    return videos


def gif_frames(path) -> int:
    """How many frames a GIF holds (PIL's count of its decoded frames)."""
    from PIL import Image

    with Image.open(path) as im:
        return int(getattr(im, "n_frames", 1))
