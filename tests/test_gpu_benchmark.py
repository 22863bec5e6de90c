"""The GPU benchmark (benchmarks/gpu_update.py): its FLOP count against torch's FlopCounterMode
and a CPU dry run of the whole script at tiny size (the real-dims builder at test size)."""

from __future__ import annotations

import math

import pytest

import gpu_update  # benchmarks/gpu_update.py (tests/conftest.py puts benchmarks/ on the path)
import torch


def test_benchmark_flop_formula_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from srpo import lora
    from srpo.bench import real_dims as rd
    from srpo.config import LoRAConfig

    bench = gpu_update
    for use_lora in (False, True):
        model = rd.build_model(rd.TINY, base_dtype=torch.float32, frozen_dtype=torch.float32)
        if use_lora:
            lora.apply(model, LoRAConfig(enabled=True, rank=4, init="gaussian"))
        f = bench.transformer_flops(model.transformer, 16, model.max_sequence_length)
        lat = torch.randn(1, 4, 8, 8)
        cond = model.encode_prompts(["a cat"])
        with FlopCounterMode(display=False) as fwd:  # CPU attention is not counted: linears only
            v = model.velocity(lat, torch.tensor([0.5]), cond, 3.5)
        with FlopCounterMode(display=False) as bwd:
            v.square().sum().backward()
        assert f["linear_forward"] == fwd.get_total_flops()
        if not use_lora:
            assert f["linear_backward"] == bwd.get_total_flops()
        else:  # LoRA: the frozen conditioning path gets no input gradients; the formula counts them
            assert 0 <= f["linear_backward"] / bwd.get_total_flops() - 1 < 0.1


def measured_grad_step_flops(mode: str) -> int:
    """FLOPs of the dry run's gradient step counted by torch's FlopCounterMode: one velocity
    forward and backward at the dry run's size (32 px: 8x8 image tokens, 16 text tokens), with
    the math attention kernel so attention's matmuls are counted too, times the two branches."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from srpo import lora
    from srpo.bench import real_dims as rd

    bench = gpu_update
    model = rd.build_model(rd.TINY, base_dtype=torch.float32, frozen_dtype=torch.float32)
    lora.apply(model, bench.make_config(True, mode, 32, 1, "cpu", rank=4).lora, seed=0)
    lat = torch.randn(model.latent_shape(1, 32, 32))
    cond = model.encode_prompts(["a photo of a red fox in the snow"])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.velocity(lat, torch.tensor([0.5]), cond, 3.5).square().sum().backward()
    return 2 * counter.get_total_flops()


def test_benchmark_tiny_dry_run(capsys):
    results = gpu_update.main(["--tiny", "--modes", "lora,full", "--steps", "1", "--warmup", "0",
                             "--rollout-steps", "1", "--rank", "4"])
    assert [r["mode"] for r in results] == ["lora", "full"]
    lora_run, full = results
    assert lora_run["optimizer"] == "AdamW" and full["optimizer"] == "SGD"
    assert 0 < lora_run["trainable_params"] < full["trainable_params"] == full["transformer_params"]
    measured = {mode: measured_grad_step_flops(mode) for mode in ("lora", "full")}
    for r in results:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["plan_gib"] > 0
        assert r["text_encoders_released"] and r["prompts_encoded"] == 1  # as the trainer does
        timings = ("build_s", "rollout_s", "grad_step_s", "optimizer_s", "update_s")
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in timings)
        # rollout, gradient step and optimizer step are disjoint intervals inside the update
        assert r["update_s"] >= r["rollout_s"] + r["grad_step_s"] + r["optimizer_s"] - 1e-9
        assert r["grad_step_tflops_per_s"] == pytest.approx(r["grad_step_tflop"] / r["grad_step_s"], rel=1e-9)
        ratio = r["grad_step_tflop"] * 1e12 / measured[r["mode"]]
        if r["mode"] == "full":
            assert ratio == pytest.approx(1, abs=1e-12)
        else:  # LoRA: the formula also counts input gradients of the frozen conditioning path
            assert 1 <= ratio < 1.05
    assert "| lora | none | AdamW |" in capsys.readouterr().out


def test_benchmark_tiny_dry_run_eager_and_compiled():
    """--compile none,blocks: the same update eager and with the transformer's blocks compiled, the
    compiled one's speed over eager reported; the first compiled update pays the compile."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager, compiled = gpu_update.main(["--tiny", "--modes", "lora", "--compile", "none,blocks", "--steps", "1",
                                       "--warmup", "1", "--rollout-steps", "1", "--rank", "4"])
    assert (eager["compile"], compiled["compile"]) == ("none", "blocks") and "speedup_over_eager" not in eager
    assert compiled["speedup_over_eager"] == pytest.approx(eager["update_s"] / compiled["update_s"], rel=1e-9)
    assert counters["stats"]["unique_graphs"] > 0  # the compiled run did compile (the eager one cannot)
    assert compiled["first_update_s"] > compiled["update_s"]  # the compile is in the first update
    assert compiled["mfu"] is None  # no GPU peak on the CPU
    # the same weights, prompts and noise: the compiled update computes the eager one's loss and gradient
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    # (bf16 base: compiled kernels round differently; measured 0.2 %)
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-2) and compiled["grad_norm"] > 0
    with pytest.raises(SystemExit):
        gpu_update.parse(["--tiny", "--compile", "fast"])


def test_benchmark_tiny_dry_run_on_an_int8_base():
    (r,) = gpu_update.main(["--tiny", "--modes", "lora", "--steps", "1", "--warmup", "0", "--rollout-steps", "1",
                            "--rank", "4", "--quantize", "int8"])
    assert r["quantize"] == "int8" and math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert "frozen transformer base (int8)" in r["plan_parts_gib"]  # the plan counts the int8 base


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_counted_flops_of_any_family_agree_with_the_flux_formula(mode):
    """The other families' count (FlopCounterMode on one forward, the backward from it) on FLUX.1
    at test size: the forward equals the exact formula's, the gradient step is within 10 %."""
    from srpo import lora
    from srpo.bench import real_dims as rd

    model = rd.build_model(rd.TINY, base_dtype=torch.float32, frozen_dtype=torch.float32)
    cfg = gpu_update.make_config(True, mode, 32, 1, "cpu", rank=4)
    if mode == "lora":
        lora.apply(model, cfg.lora, seed=0)
    counted = gpu_update.counted_flops(model, cfg, mode)
    exact = gpu_update.transformer_flops(model.transformer, *gpu_update._tokens(model, cfg))
    assert counted["forward"] == exact["forward"]
    ratio = (counted["forward"] + counted["backward"]) / (exact["forward"] + exact["backward"])
    assert 0.9 < ratio < 1.1, ratio


def test_benchmark_tiny_dry_run_of_another_family_under_torchrun(tmp_path):
    """--family z_image under torchrun with two gloo ranks: FSDP2 over them, the plan for 2 GPUs,
    rank 0 writes the results."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "gu.json"
    script = Path(gpu_update.__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), "--tiny",
                    "--family", "z_image", "--modes", "lora", "--steps", "1", "--warmup", "0", "--rollout-steps", "1",
                    "--rank", "4", "--out", str(out)], env=env, check=True, capture_output=True, text=True,
                   cwd=tmp_path, timeout=600)
    (r,) = json.loads(out.read_text())
    assert (r["family"], r["procs"], r["blocks"]) == ("z_image", 2, [1, 0])
    assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["grad_step_tflop"] > 0
    assert "FSDP unsharded root" in r["plan_parts_gib"]  # planned for FSDP over the 2 ranks
    with pytest.raises(SystemExit):
        gpu_update.parse(["--tiny", "--family", "nope"])
