"""Videos people can watch (srpo/video.py): `srpo sample` on a Wan folder writes an H.264 mp4 per
video and grid.gif; the mp4 decoded back (PyAV) has the video's frame count and size and its frames
match the decoded tensor within the codec's tolerance.

Tolerance (yuv420p at crf 17, measured on the 32 x 48 random twin, whose frames are noisy and whose
chroma the 4:2:0 subsampling halves): mean absolute error at most 10 / 255 over the video and PSNR
at least 24 dB in every frame (measured: ~7.2 / 255, ~28 dB). Another video fails both."""

import pytest
import torch
from PIL import Image

from family_runs import check_one_line_errors, srpo
from srpo.evaluate import generate
from srpo.models.wan import WanModel
from srpo.models.wan_tiny import TinyWanModel
from srpo.video import read_mp4, write_grid_gif, write_mp4

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H, W, FRAMES, STEPS, CFG, SEED = 32, 48, 9, 3, 5.0, 4
MEAN_TOL, PSNR_TOL = 10 / 255, 24.0


def psnr(a, b):
    return 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))  # per frame, peak 1


def within_codec_tolerance(decoded, video) -> bool:
    return bool((decoded - video).abs().mean() <= MEAN_TOL and psnr(decoded, video).min() >= PSNR_TOL)


@pytest.fixture(scope="module")
def videos():
    model = TinyWanModel.load(seed=0)
    model.set_frames(FRAMES)
    with torch.no_grad():
        return generate(model, PROMPTS, SEED, STEPS, CFG, H, W)


def test_an_mp4_decodes_back_to_its_frames_within_codec_tolerance(videos, tmp_path):
    path = write_mp4(videos[0], tmp_path / "v.mp4", fps=16)
    decoded = read_mp4(path)
    assert decoded.shape == (FRAMES, 3, H, W)
    assert within_codec_tolerance(decoded, videos[0])
    assert not within_codec_tolerance(decoded, videos[1])  # the check tells videos apart
    import av

    with av.open(str(path)) as f:
        s = f.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p" and s.average_rate == 16
    check_one_line_errors([(lambda: write_mp4(videos[0][:, :, :31], tmp_path / "odd.mp4"), "is not even"),
                           (lambda: write_mp4(videos[0][0], tmp_path / "bad.mp4"), "is [frames, 3, height, width]")])


def test_the_grid_gif_plays_every_frame_of_every_video(videos, tmp_path):
    gif = Image.open(write_grid_gif(videos, tmp_path / "grid.gif", fps=10))
    assert gif.n_frames == FRAMES and gif.size == (2 * (W + 2) + 2, H + 4) and gif.info["duration"] == 100


def test_srpo_sample_on_a_wan_folder_writes_mp4s_and_grid_gif(tmp_path):
    TinyWanModel.save_random(tmp_path / "folder")
    model = WanModel.load(tmp_path / "folder")  # as the CLI loads it (WanPipeline's 512 text tokens)
    model.set_frames(FRAMES)
    with torch.no_grad():
        videos = generate(model, PROMPTS, SEED, STEPS, CFG, H, W)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    srpo("sample", "--model", tmp_path / "folder", "--prompts", tmp_path / "prompts.txt", "--steps", STEPS,
         "--guidance", CFG, "--height", H, "--width", W, "--frames", FRAMES, "--seed", SEED, "--output", out)
    mp4s = sorted(out.glob("*.mp4"))
    assert [p.stem for p in mp4s] == ["0000-a-red-cube-on-a-table", "0001-a-small-blue-ball-in-the-grass"]
    for path, video in zip(mp4s, videos):  # the CLI's videos are generate()'s, through the codec
        decoded = read_mp4(path)
        assert decoded.shape == (FRAMES, 3, H, W) and within_codec_tolerance(decoded, video)
        assert Image.open(path.with_suffix(".png")).size == (W, H)
    assert Image.open(out / "grid.gif").n_frames == FRAMES and (out / "grid.png").is_file()
