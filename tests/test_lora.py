"""LoRA through peft (trained under FSDP2 on one rank), the diffusers LoRA file, and exports.

References: diffusers' own ``FluxPipeline.load_lora_weights`` must reproduce the merged weights
the run wrote, ``FluxPipeline.from_pretrained`` must load the exported folder, and diffusers'
``from_single_file`` converter must read the single-file layout back to the same tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo.cli import main
from srpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2: a file that lost alpha would load at half strength


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from srpo.models.tiny import save_tiny_flux
    from srpo.trainer import train

    tmp = tmp_path_factory.mktemp("lora")
    save_tiny_flux(tmp / "base", seed=0)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "model.name=flux", f"model.path={tmp / 'base'}", "model.options={max_sequence_length: 64}",
        "lora.enabled=true", f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "parallel.strategy=fsdp",
        "train.max_steps=2", "data.eval_prompts=null", "log.sample_every=0", "rollout.steps=2",
        "log.tensorboard=false", "log.progress=false"])
    train(cfg, tmp / "run")
    return tmp


def _velocity(transformer, pipe):
    from srpo.models.flux import FluxModel

    model = FluxModel(transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                      pipe.tokenizer_2, max_sequence_length=64)
    lat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.velocity(lat, torch.tensor([0.9, 0.4]), model.encode_prompts(["a cat", "a red car"]), 3.5)


def test_lora_run_trains_adapters_only_and_diffusers_loads_them(run):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    last = run / "run" / "checkpoints" / "step-000002"
    assert not (last / "trainable.safetensors").exists()  # FSDP: sharded (torch.distributed.checkpoint)
    dcp_to_torch_save(last / "sharded", run / "ckpt.pt")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)["model"]
    assert ckpt and all(".lora_A.default." in k or ".lora_B.default." in k for k in ckpt)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in ckpt} >= {"to_q", "to_k", "to_v", "proj_mlp"}
    assert any(v.abs().max() > 0 for k, v in ckpt.items() if ".lora_B." in k)  # B left its zero init
    saved = load_file(str(run / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert set(saved) == {"transformer." + k.replace(".default.", ".") for k in ckpt}
    assert all(torch.equal(saved["transformer." + k.replace(".default.", ".")], v) for k, v in ckpt.items())

    pipe = FluxPipeline.from_pretrained(run / "base", local_files_only=True)
    base_v = _velocity(pipe.transformer, pipe)
    merged = FluxTransformer2DModel.from_pretrained(run / "run" / "final", local_files_only=True)
    merged_v = _velocity(merged, pipe)
    pipe.load_lora_weights(run / "run" / "lora")
    lora_v = _velocity(pipe.transformer, pipe)
    assert (lora_v - base_v).abs().max() > 1e-4  # the adapters change the model ...
    torch.testing.assert_close(lora_v, merged_v, atol=2e-6, rtol=1e-5)  # ... as the merged weights do


def test_export_diffusers_folder_and_single_file(run, tmp_path):
    from diffusers import FluxPipeline

    from srpo.export import WEIGHTS_PATTERN

    final = load_file(str(run / "run" / "final" / WEIGHTS_PATTERN.format(suffix="")))
    out = tmp_path / "pipe"
    assert main(["export", str(run / "run"), "--output", str(out)]) == 0
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    got = pipe.transformer.state_dict()
    assert set(got) == set(final) and all(torch.equal(got[k], final[k]) for k in final)
    base_vae = FluxPipeline.from_pretrained(run / "base", local_files_only=True).vae.state_dict()
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in base_vae.items())

    single = tmp_path / "flux-srpo.safetensors"
    assert main(["export", str(run / "run"), "--output", str(single), "--format", "single-file",
                 "--dtype", "bfloat16"]) == 0
    sf = load_file(str(single))
    qkv = torch.cat([final[f"transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv"]).to(torch.bfloat16)
    assert torch.equal(sf["double_blocks.0.img_attn.qkv.weight"], qkv)
    assert all(v.dtype == torch.bfloat16 for v in sf.values()) and not any(k.startswith("transformer") for k in sf)

    # a run kept only its adapters (lora.save_merged false): export merges them into the base
    lora_only = tmp_path / "lora-only"
    shutil.copytree(run / "run", lora_only, ignore=shutil.ignore_patterns("final", "checkpoints"))
    single2 = tmp_path / "from-adapters.safetensors"
    assert main(["export", str(lora_only), "--output", str(single2), "--format", "single-file",
                 "--dtype", "bfloat16"]) == 0
    sf2 = load_file(str(single2))
    assert all(torch.equal(sf[k], sf2[k]) for k in sf)
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "x")]) == 2  # not a run folder


def test_single_file_layout_is_what_diffusers_from_single_file_reads(tmp_path):
    """At FLUX's real width (diffusers' converter assumes 3072) with one block of each kind."""
    from diffusers import FluxTransformer2DModel

    from srpo.export import save_single_file
    from srpo.models.flux_single_file import bfl_state

    with torch.device("meta"):
        model = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
                                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1, generator=gen)
    model.save_config(tmp_path / "config")
    state = model.state_dict()
    save_single_file(tmp_path / "flux.safetensors", bfl_state(state))
    loaded = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux.safetensors"), config=str(tmp_path / "config"),
                                                     local_files_only=True, torch_dtype=torch.bfloat16)
    got = loaded.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
