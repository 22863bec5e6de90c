"""The GPU benchmark (benchmarks/gpu_update.py): its FLOP count against torch's FlopCounterMode
and a CPU dry run of the whole script at tiny size."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_update", ROOT / "benchmarks" / "gpu_update.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_flop_formula_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from srpo import lora
    from srpo.config import LoRAConfig
    from srpo.models.tiny import build_tiny_flux

    bench = _bench()
    for use_lora in (False, True):
        model = build_tiny_flux(0, **bench.TINY_FLUX)
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


def test_benchmark_tiny_dry_run(capsys):
    results = _bench().main(["--tiny", "--steps", "1", "--warmup", "0", "--rollout-steps", "1"])
    assert [r["mode"] for r in results] == ["lora", "full"]
    lora_run, full = results
    assert lora_run["optimizer"] == "AdamW" and full["optimizer"] == "SGD"
    assert 0 < lora_run["trainable_params"] < full["trainable_params"] == full["transformer_params"]
    for r in results:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["update_s"] > 0
        assert r["grad_step_tflop"] > 0 and r["plan_gib"] > 0
    assert "| lora | AdamW |" in capsys.readouterr().out
