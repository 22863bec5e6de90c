"""A quantized frozen base (model.quantize, srpo/quantize.py) under LoRA: the gradient through
an int8 base is the gradient through its dequantized weights, a tiny run trains through the real
CLI and its LoRA file loads in FluxPipeline on the unquantized base, the skeleton start quantizes
layer by layer exactly as a whole load does, and bad settings are one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from srpo import lora, quantize
from srpo.config import load_config
from srpo.errors import UserError
from srpo.models.tiny import TinyFlux

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
LORA = ["lora.enabled=true", "lora.rank=4", "train.lr=3e-3"]


def _lora_model(mode: str):
    cfg = load_config(CONFIG, LORA)
    model = TinyFlux.load(seed=0)
    lora.apply(model, cfg.lora, seed=0)
    for name, p in model.transformer.named_parameters():  # B != 0, so every adapter gets a gradient
        if ".lora_B." in name:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    return model, quantize.apply(model.transformer, mode)


def _lora_grads(model, x, t, cond):
    model.transformer.zero_grad(set_to_none=True)
    model.velocity(x, t, cond, 1.0).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.requires_grad}


def test_int8_base_gradient_equals_the_dequantized_model():
    """Tolerance 1e-5 relative: the int8 linear dequantizes its weight and runs the same float32
    matmul as the dequantized model; the int8 error itself (vs the original weights) is ~1e-2."""
    q, n = _lora_model("int8")
    assert n > 10 and all(type(m.weight).__name__ == "Int8Tensor" for m in q.transformer.modules()
                          if isinstance(m, nn.Linear) and not m.weight.requires_grad)
    plain, _ = _lora_model("none")
    deq = copy.deepcopy(plain)
    qmods = dict(q.transformer.named_modules())
    for name, m in deq.transformer.named_modules():  # the same model with the int8 weights dequantized
        if isinstance(m, nn.Linear) and not m.weight.requires_grad:
            m.weight.data = quantize.plain(qmods[name].weight).to(m.weight.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(q.latent_shape(2, 32, 32), generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = q.encode_prompts(["a red cube", "a blue sphere"])
    gq, gd, gp = _lora_grads(q, x, t, cond), _lora_grads(deq, x, t, cond), _lora_grads(plain, x, t, cond)
    assert set(gq) == set(gd) and len(gq) > 10
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert max(rel(gq[k], gd[k]) for k in gq) < 1e-5
    assert max(rel(gq[k], gp[k]) for k in gq) > 1e-4  # the base really is int8, not the original weights


def test_nf4_and_fp8_quantize_what_holds_their_blocks():
    model, n = _lora_model("fp8")
    assert n > 10 and {type(m.weight).__name__ for m in model.transformer.modules()
                       if isinstance(m, nn.Linear) and not m.weight.requires_grad} == {"Float8Tensor"}
    big = nn.Linear(256, 256).requires_grad_(False)
    small = nn.Linear(32, 32).requires_grad_(False)
    assert quantize.linear(big, "nf4") and not quantize.linear(small, "nf4")  # 32 x 32 holds no 64 x 256 block
    w = quantize.plain(big.weight)
    assert type(big.weight).__name__ == "NF4Tensor" and w.shape == (256, 256)
    x = torch.randn(3, 256)
    assert torch.allclose(big(x), nn.functional.linear(x, w, big.bias), atol=1e-5)


def _srpo(*args):
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "srpo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_tiny_int8_run_trains_and_its_lora_loads_on_the_unquantized_base(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    sets = LORA + ["model.quantize=int8", "train.max_steps=2", "data.eval_prompts=null", "log.sample_every=0",
                   "rollout.steps=4", "log.tensorboard=false", "log.progress=false", "log.checkpoint_every=0"]
    r = _srpo("train", str(CONFIG), "--output", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    adapters = load_file(str(tmp_path / "run" / "lora" / lora.WEIGHT_NAME))
    assert adapters and any(".lora_B." in k and v.abs().max() > 0 for k, v in adapters.items())  # trained
    TinyFlux.save_random(tmp_path / "base", seed=0)  # the run's base, unquantized, as a FLUX.1 folder
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    args = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=64, output_type="pt")
    before = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    after = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-4  # the adapters took effect on the unquantized base
    final = load_file(str(next((tmp_path / "run" / "final").glob("*.safetensors"))))
    assert all(type(v) is torch.Tensor for v in final.values())  # merged into the dequantized base


def test_the_skeleton_start_quantizes_layer_by_layer_as_a_whole_load_does(tmp_path):
    from srpo import parallel, setup
    from srpo.models import MODELS

    TinyFlux.save_random(tmp_path / "pipe", seed=0)
    cfg = load_config(CONFIG, LORA + ["model.name=flux", f"model.path={tmp_path / 'pipe'}", "model.quantize=int8",
                                      "model.options={max_sequence_length: 64}", "data.eval_prompts=null"])
    ctx = parallel.setup(cfg)
    model, _, _ = setup.build(cfg, ctx.device, ctx)
    setup.prepare(model, cfg, ctx, ["a red cube"])
    ref = MODELS.get("flux").load(tmp_path / "pipe", max_sequence_length=64)
    lora.apply(ref, cfg.lora, seed=cfg.train.seed)
    quantize.apply(ref.transformer, "int8")
    mods = dict(ref.transformer.named_modules())
    n = 0
    for name, m in model.transformer.named_modules():
        if isinstance(m, nn.Linear) and not m.weight.requires_grad:
            assert type(m.weight).__name__ == "Int8Tensor", name
            assert torch.equal(quantize.plain(m.weight), quantize.plain(mods[name].weight)), name
            n += 1
    assert n > 10


@pytest.mark.parametrize("sets,words", [
    (["model.quantize=int8"], ["model.quantize", "lora.enabled"]),
    (LORA + ["model.quantize=nf4", "parallel.strategy=fsdp"], ["model.quantize", "one GPU"]),
    (LORA + ["model.quantize=int4"], ["model.quantize"]),
])
def test_bad_quantize_settings_are_one_line_errors(sets, words):
    with pytest.raises(UserError) as e:
        load_config(CONFIG, sets)
    line = str(e.value)
    assert "\n" not in line and all(w in line for w in words), line


def test_the_plan_counts_the_quantized_base():
    from srpo import plan

    cfg = load_config(ROOT / "configs" / "flux-hps-lora.yaml", ["model.path=null"])
    s = plan.model_sizes(cfg)
    for mode, per in (("int8", 1.0), ("nf4", 0.5 + 1 / 64 + 4 / (64 * 256))):
        q = load_config(ROOT / "configs" / "flux-hps-lora.yaml", ["model.path=null", f"model.quantize={mode}"])
        parts = plan.estimate_for(q, s, 1)
        assert parts[f"frozen transformer base ({mode})"] == pytest.approx(per * s.transformer)
        assert "frozen transformer base" not in parts
    assert plan.estimate_for(cfg, s, 1)["frozen transformer base"] == 2 * s.transformer  # bf16
