"""benchmarks/real_dims.py at test size: the real-dims measurement's code path (each mode in its
own process, the trainer's order and update, the plan for the same modules) and its JSON."""

from __future__ import annotations

import json
import math

import pytest

import real_dims  # benchmarks/real_dims.py (tests/conftest.py puts benchmarks/ on the path)


def test_real_dims_tiny_writes_measured_and_planned(tmp_path):
    out = tmp_path / "real_dims.json"
    real_dims.main(["--tiny", "--updates", "1", "--rank", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"lora", "full"}
    for mode, r in result["modes"].items():
        assert r["mode"] == mode and r["prompts_encoded"] == 1
        assert r["config"]["memory"] == "anonymous, mmap threshold 64 KiB"  # freed tensors leave the resident set
        assert r["static_gib"]["text encoders (released)"] == 0  # released before the update, as the trainer does
        assert r["measured_gib"] > 0 and r["planned_gib"] > 0
        assert r["plan_over_measured"] == pytest.approx(r["planned_gib"] / r["measured_gib"])
        assert r["plan_parts_gib"]["total"] == pytest.approx(r["planned_gib"])
        assert "CUDA context + workspaces" not in r["plan_parts_gib"]  # planned for the CPU
        (u,) = r["updates"]
        assert math.isfinite(u["loss"]) and u["grad_norm"] > 0 and u["peak_gib"] > 0
        assert {"transformer forward", "VAE decode backward"} <= set(u["phase_peaks_gib"])
        assert set(u["held_for_backward_gib"]) == {"transformer", "VAE decode", "reward"}
    lora, full = result["modes"]["lora"], result["modes"]["full"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["transformer_params"]
    assert full["static_gib"]["optimizer state"] == pytest.approx(
        2 * full["static_gib"]["trainable parameters (fp32)"], rel=1e-2)  # exp_avg, exp_avg_sq (+ step counters)
    plans = result["real_plan_720"]
    assert len(plans) == 8  # LoRA / full x 1 / 8 GPUs x text encoders resident / released
    for mode in ("lora none x1", "full fsdp x8"):  # releasing the encoders saves memory
        assert plans[f"{mode}, text encoders released"]["total_gib"] < plans[f"{mode}, text encoders resident"]["total_gib"]


def test_real_dims_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        real_dims.main(["--modes", "lora,half"])
    assert e.value.code == 2 and "unknown mode half" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_real_dims_family_on_two_gloo_processes(tmp_path, family):
    """``--family`` at test size on 1 and 2 processes (a real gloo FSDP2 group): each cell's keys,
    a positive finite plan and measurement, and the 2-process ranks holding their shards of the
    transformer (at most 0.6 x the 1-process bytes: sharded before the first update)."""
    out = tmp_path / "real_dims.json"
    real_dims.main(["--tiny", "--family", family, "--procs", "1,2", "--modes", "lora", "--updates", "1",
                    "--rank", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["family"] == family and set(result["cells"]) == {"lora x1", "lora x2"}
    for cell in result["cells"].values():
        assert {"measured_gib", "planned_gib", "plan_over_measured", "transformer_bytes", "plan_parts_gib",
                "family", "procs"} <= set(cell)
        assert cell["family"] == family
        for key in ("measured_gib", "planned_gib", "plan_over_measured"):
            assert math.isfinite(cell[key]) and cell[key] > 0
        assert math.isfinite(cell["updates"][0]["loss"])
    one, two = result["cells"]["lora x1"], result["cells"]["lora x2"]
    assert one["procs"] == 1 and two["procs"] == 2 and [r["rank"] for r in two["ranks"]] == [0, 1]
    assert two["measured_gib"] == max(r["measured_gib"] for r in two["ranks"])
    assert 0 < two["transformer_bytes"] <= 0.6 * one["transformer_bytes"]
    # the trainer's start from a folder: the transformer read as a skeleton after the prompts
    assert one["config"]["start"] == two["config"]["start"] == "skeleton"
    assert "real_plan_720" not in result  # FLUX.1-dev's whole-model plan belongs to --family flux


def test_real_dims_unknown_family_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        real_dims.main(["--family", "sdxl"])
    assert e.value.code == 2 and "unknown family sdxl" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["flux", "flux2", "qwen_image", "sd3", "z_image"])
def test_real_width_build_decodes_at_the_flagships_scale(family):
    """The real-width build swaps the twin's VAE for the flagship's: the model's pixels per latent
    follow it (8, every flagship pipeline's ``vae_scale_factor``), so a 256-pixel sample's latents
    decode to 256 pixels, not to the twin's scale."""
    from dataclasses import replace

    import torch

    from srpo.bench import real_dims as rd
    from srpo.models.real_dims import build_model

    model = build_model(replace(rd.REAL, model=family).blocks(1, 1 if family in ("flux", "flux2") else 0), "meta",
                        torch.float32, torch.float32)
    assert model.vae_scale_factor == 8
    assert model.pixel_size(torch.empty(model.latent_shape(1, 256, 256), device="meta")) == (256, 256)


def test_measuring_processes_fix_glibcs_mmap_threshold(monkeypatch):
    """Children measure with MALLOC_MMAP_THRESHOLD_ fixed (glibc then maps every block of 64 KiB
    or more and gives it back at free); ``--glibc-heap`` leaves glibc's default."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = real_dims._child_env(real_dims.parse(["--tiny"]), RANK="1")
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536" and env["RANK"] == "1"
    heap = real_dims.parse(["--tiny", "--glibc-heap"])
    assert "MALLOC_MMAP_THRESHOLD_" not in real_dims._child_env(heap)
    assert "--glibc-heap" in real_dims._child_argv(heap, "lora", "/tmp/x.json")
