"""Distributed training on CPU with gloo, memory preparation and the memory plan.

Two launches run the real CLI under torchrun while the one-process reference trains in this
process: DDP with 2 processes on one node, and FSDP2 on 2 simulated nodes of 1 process each
joined by torchrun's c10d rendezvous on localhost. All use the same global batch (2 samples)
as the reference, so they must land on the same weights.

Tolerance: 5e-5 absolute on weights after 3 AdamW updates at lr 3e-3. The ranks compute the
same sums in another order (batch 1 vs batch 2 matmuls, a gloo all-reduce / reduce-scatter),
which moves gradients by ~1e-7 relative; Adam divides by sqrt(v) so each update is ~lr in
size and such differences reach the weights at ~1e-6 (measured: DDP 1.7e-6, FSDP 8.8e-6).
A wrong rank layout, a missing gradient average or a dropped shard changes weights by ~lr.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from family_runs import launcher_env, set_args
from srpo import memory, parallel, plan
from srpo.cli import main
from srpo.config import load_config
from srpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 3
QUICK = [f"train.max_steps={STEPS}", "data.eval_prompts=null", "log.sample_every=0", "rollout.steps=4",
         "log.tensorboard=false", "log.progress=false", "log.checkpoint_every=0"]
TOL = 5e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, out: Path, extra_sets, log: Path):
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "srpo", "train", str(CONFIG),
           "--output", str(out), *set_args(QUICK + extra_sets)]
    return subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run / "final").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the distributed launches, train the reference meanwhile, wait for all."""
    from srpo.trainer import train

    tmp = tmp_path_factory.mktemp("parallel")
    ddp = _torchrun(["--standalone", "--nproc_per_node", "2"], tmp / "ddp",
                    ["train.batch_size=1", "parallel.strategy=ddp"], tmp / "ddp.log")
    port = _free_port()
    nodes = [_torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r), "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "srpo-test"],
                       tmp / "fsdp", ["train.batch_size=1", "parallel.strategy=fsdp"], tmp / f"node{r}.log")
             for r in (0, 1)]
    train(load_config(CONFIG, QUICK + ["train.batch_size=2"]), tmp / "ref")
    codes = {"ddp": ddp.wait(timeout=240), "node0": nodes[0].wait(timeout=240), "node1": nodes[1].wait(timeout=240)}
    logs = {k: (tmp / f"{k}.log").read_text()[-3000:] for k in ("ddp", "node0", "node1")}
    return tmp, codes, logs


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_distributed_run_matches_one_process(runs, name):
    tmp, codes, logs = runs
    procs = ["ddp"] if name == "ddp" else ["node0", "node1"]
    for p in procs:  # a finished run exits 0 on every rank: no gloo abort at exit
        assert codes[p] == 0, logs[p]
    ref, got = _weights(tmp / "ref"), _weights(tmp / name)
    assert set(ref) == set(got)
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < TOL, f"{name}: max abs weight difference {diff:.3g} vs one process"
    from srpo.models.tiny import build_tiny_flux

    init = build_tiny_flux(0).transformer.state_dict()
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 50 * TOL  # training moved the weights far more than the tolerance
    rows = [json.loads(ln) for ln in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(ln) for ln in (tmp / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone wrote the log
    for a, b in zip(rows, ref_rows):
        assert a["skipped"] == 0 and abs(a["loss"] - b["loss"]) < 1e-4 and a["ts"] == b["ts"]
    last = tmp / name / "checkpoints" / f"step-{STEPS:06d}"
    if name == "ddp":  # rank 0 gathered and wrote the full state
        ckpt = load_file(str(last / "trainable.safetensors"))
    else:  # FSDP: each rank wrote its shards; one process without a group reads them back whole
        from srpo import checkpoint

        module = build_tiny_flux(0).transformer
        checkpoint.load(last, module, torch.optim.AdamW(module.parameters()))
        ckpt = module.state_dict()
    assert all(torch.equal(ckpt[k], got[k]) for k in got)  # the checkpoint = final weights


def test_setup_refuses_several_processes_without_a_strategy(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="parallel.strategy"):
        parallel.setup(load_config(CONFIG))


def test_one_gradient_reduction_per_update_and_the_same_weights(tmp_path):
    """benchmarks/grad_sync.py under torchrun, 2 gloo ranks: each update is 2 micro-batches x
    SRPO's 2 branches = 4 backward passes. ``parallel.grad_sync: update`` reduces once (DDP: the
    tiny model's gradients fill one bucket; FSDP2: one reduce-scatter per fully_shard unit),
    ``backward`` 4 times, and both land on the same weights after 2 AdamW updates (measured
    1.2e-7 apart: only the order of the sums differs; a pass that never reduced would leave rank
    0 with its own gradient and move its weights by ~lr)."""
    out, weights = tmp_path / "sync.json", tmp_path / "weights"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "benchmarks" / "grad_sync.py"), "--out", str(out), "--weights", str(weights)]
    r = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs = {x["run"]: x for x in json.loads(out.read_text())["runs"]}
    for strategy in ("ddp", "fsdp"):
        for mode in ("lora", "full"):
            every, once = runs[f"{strategy}-{mode}-backward"], runs[f"{strategy}-{mode}-update"]
            groups = once["fsdp_units"] if strategy == "fsdp" else 1
            assert strategy == "ddp" or groups >= 3  # the blocks and the root
            assert every["backward_passes"] == once["backward_passes"] == 4
            assert (every["gradient_reductions"], once["gradient_reductions"]) == (4 * groups, groups), once
            a, b = (load_file(str(weights / f"{strategy}-{mode}-{s}.safetensors")) for s in ("backward", "update"))
            assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 2e-6
    assert runs["fsdp-full-update"]["resolved"] == "update" and parallel.grad_sync_mode("auto", "fsdp", False) == "backward"


def test_auto_grad_sync_reduces_once_except_fsdp_full_and_the_plan_counts_it():
    assert [parallel.grad_sync_mode("auto", s, lora) for s, lora in
            (("ddp", False), ("ddp", True), ("fsdp", True), ("fsdp", False))] == ["update", "update", "update", "backward"]
    cfg = load_config(FLUX_DEV_CFG)
    sizes = plan.model_sizes(cfg)
    row = "unsharded gradients until the update's reduction"
    lora = plan.estimate_for(cfg, sizes, 8, "fsdp", True)
    assert lora[row] == 4 * sizes.lora_params * (1 - 1 / 8)  # LoRA's gradients, whole on every rank until then
    assert row not in plan.estimate_for(cfg, sizes, 8, "fsdp", False)  # auto: full FSDP reduces every backward
    once = load_config(FLUX_DEV_CFG | {"parallel": {"strategy": "fsdp", "grad_sync": "update"}})
    assert plan.estimate_for(once, sizes, 8, "fsdp", False)[row] == 4 * sizes.transformer * (1 - 1 / 8)
    assert row not in plan.estimate_for(cfg, sizes, 1, "none", True)


# ---------------------------------------------------------------------- the plan

FLUX_DEV_CFG = {"model": {"name": "flux", "dtype": "bfloat16"}, "reward": {"name": "hps"},
                "rollout": {"height": 720, "width": 720},
                "train": {"batch_size": 1, "autocast": "bf16", "gradient_checkpointing": True},
                "data": {"prompts": ["a cat"]}, "parallel": {"strategy": "fsdp"}}


def test_plan_flux_dev_full_needs_fsdp_on_8_gpus_lora_fits_one():
    from srpo.models.flux import T5_XXL

    cfg = load_config(FLUX_DEV_CFG)
    sizes = plan.model_sizes(cfg)
    assert sizes.transformer == 11_901_408_320  # FLUX.1-dev's transformer (diffusers, meta device)
    assert (sizes.blocks, sizes.hidden, sizes.image_tokens, sizes.text_tokens) == (57, 3072, 2025, 512)
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):  # the text-encoder constant is T5-XXL's encoder (+ CLIP-L)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
    assert sum(p.numel() for p in t5.parameters()) == T5_XXL

    def total(gpus, strategy, lora):
        return plan.estimate_for(cfg, sizes, gpus, strategy, lora)["total"] / plan.GiB

    parts = plan.estimate_for(cfg, sizes, 8, "fsdp", False)
    assert parts["trainable weights + grads + AdamW (fp32)"] == 16 * sizes.transformer / 8
    assert total(8, "fsdp", False) < 80 and total(16, "fsdp", False) < total(8, "fsdp", False)
    assert total(1, "fsdp", False) > 80 and total(8, "ddp", False) > 80  # full FT never fits unsharded
    assert total(1, "none", True) < 80  # LoRA on one GPU


def test_plan_counts_gathered_blocks_only_while_their_module_runs():
    """FSDP frees a block's gathered weights after its forward and after its backward
    (parallel.reshard_after_forward, the default), so they count in the transformer's phases, the
    reward tower's in the reward's, not beside the VAE decoder's backward. At 1536 x 1536 FLUX.1's
    decode backward is the peak: kept gathered (reshard false) adds exactly the gathered row there;
    at 256 x 256 the transformer's phases are the peak and the two layouts plan the same."""
    row = "FSDP gathered blocks (2) with their all-gather buffers + block grads"
    for side, peak in ((1536, "VAE decode backward"), (256, "transformer forward")):
        totals = {}
        for reshard in (True, False):
            cfg = load_config(FLUX_DEV_CFG | {"rollout": {"height": side, "width": side},
                                              "parallel": {"strategy": "fsdp", "reshard_after_forward": reshard}})
            totals[reshard] = plan.estimate_for(cfg, plan.model_sizes(cfg), 8, "fsdp", True, device="cpu")
        parts = totals[True]
        assert f"not live at once (peak: {peak})" in parts
        totals = {k: v["total"] for k, v in totals.items()}
        if peak == "VAE decode backward":
            assert totals[False] - totals[True] == pytest.approx(parts[row])
        else:
            assert totals[False] == pytest.approx(totals[True])


def test_plan_gathers_the_largest_block_beside_its_larger_neighbour():
    """FSDP holds a block gathered beside the next one (its buffer and weights each): the plan's
    second block is the largest block's larger neighbour, none for a lone block. FLUX.1-dev's
    double blocks neighbour double blocks; a 1 + 1 build's double block a single one."""
    from dataclasses import replace

    assert plan._neighbour([5, 5, 5, 2, 2]) == 5 and plan._neighbour([5, 2]) == 2 and plan._neighbour([5]) == 0
    cfg = load_config(FLUX_DEV_CFG)
    s = plan.model_sizes(cfg)
    assert s.neighbour_block == s.largest_block  # 19 double blocks in a row
    row = "FSDP gathered blocks (2) with their all-gather buffers + block grads"
    for near, lora, expected in ((None, True, 2 * 2 * 2), (0, True, 2 * 2), (0, False, 2 * 2 + 4)):
        parts = plan.estimate_for(cfg, replace(s, neighbour_block=near), 8, "fsdp", lora)
        assert parts[row] == expected * s.largest_block, (near, lora)  # bf16 gathers; full: + its fp32 gradient


def test_plan_counts_adamws_step_temporaries_in_the_step_alone():
    """AdamW's step temporaries (foreach: one per trainable element) exist only in the step, after
    the backward has freed the activations and the gathered blocks: the plan's peak is the larger
    of the two, not their sum (fused AdamW has none)."""
    cfg = load_config(FLUX_DEV_CFG)
    s = plan.model_sizes(cfg)
    kw = dict(gpus=8, strategy="fsdp", lora=False, batch=1, height=720, width=720, model_bytes=2, reward_bytes=2,
              act_bytes=2, release_text=True, device="cuda")
    fused = plan.estimate(s, fused_adamw=True, **kw)
    foreach = plan.estimate(s, fused_adamw=False, **kw)
    temp = foreach["optimizer-step temporaries"]
    assert fused["optimizer-step temporaries"] == 0 and temp == 4 * s.transformer / 8
    frag = plan.FRAGMENTATION["cuda"]
    before = next(v for k, v in fused.items() if k.startswith("not live at once"))
    acts = sum(v for k, v in fused.items() if k.startswith(("activations", "FSDP gathered", "reward: gathered",
                                                            "autocast copies"))) + before  # the peak phase's
    assert foreach["total"] == pytest.approx(fused["total"] + frag * max(0.0, temp - acts))
    assert foreach["total"] < fused["total"] + frag * temp


def test_plan_start_is_the_encoders_beside_the_vae_and_reward_alone():
    """With the text encoders released, the prompts are encoded while the transformer is still a
    skeleton (srpo/shards.py; tests/test_sharded_start.py checks the order): the start holds the
    encoders (and one prompt's activations), the VAE, the reward and the CUDA context only,
    whatever the layout."""
    cfg = load_config(FLUX_DEV_CFG)  # no model.path: nothing to stream from
    s = plan.model_sizes(cfg)
    t5_prompt = 512 * (25 * 4096 + 3 * 10240)  # T5-XXL, 512 tokens: 25 hidden states, the gated MLP's 3 maps
    assert s.text_stream[1] == t5_prompt
    start = (2 * (s.text_encoders + t5_prompt) + 2 * s.vae + 4 * s.reward + plan.OVERHEAD) * plan.FRAGMENTATION["cuda"]
    for gpus, strategy, lora in ((1, "none", True), (8, "fsdp", True), (8, "fsdp", False), (2, "ddp", True)):
        parts = plan.estimate_for(cfg, s, gpus, strategy, lora)
        assert parts["  peak while they are resident"] == pytest.approx(start), (gpus, strategy, lora)
        assert parts["total"] >= start


def test_plan_start_with_streamed_encoders_holds_one_layer_and_the_parts_outside_them():
    """memory.stream_text_encoders (srpo/streaming.py): the start holds CLIP-L's and T5-XXL's
    embeddings and final norms, one T5 layer (the largest) and text_encode_batch prompts'
    activations, counted here by hand from the two architectures."""
    cfg = load_config({**FLUX_DEV_CFG, "model": {**FLUX_DEV_CFG["model"], "path": "/nowhere/FLUX.1-dev"},
                       "memory": {"text_encode_batch": 4}})
    s = plan.model_sizes(cfg)
    clip_outside = 49408 * 768 + 77 * 768 + 2 * 768  # token + position embeddings, final layer norm
    t5_outside = 32128 * 4096 + 4096  # shared embedding, final layer norm
    t5_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64  # attention, gated MLP, 2 norms, block 0's bias
    t5_prompt = 512 * (25 * 4096 + 3 * 10240)
    assert s.text_stream == (clip_outside + t5_outside + t5_layer, t5_prompt)
    start = (2 * (s.text_stream[0] + 4 * t5_prompt) + 2 * s.vae + 4 * s.reward + plan.OVERHEAD) * 1.1
    for gpus, strategy, lora in ((1, "none", True), (8, "fsdp", True), (8, "fsdp", False)):
        parts = plan.estimate_for(cfg, s, gpus, strategy, lora)
        assert parts["  peak while they are resident"] == pytest.approx(start), (gpus, strategy, lora)
        assert parts["  of which text encoders, streamed at the start (4 prompts a pass)"] == pytest.approx(
            2 * (s.text_stream[0] + 4 * t5_prompt))
    off = load_config({**FLUX_DEV_CFG, "model": {**FLUX_DEV_CFG["model"], "path": "/nowhere/FLUX.1-dev"},
                       "memory": {"stream_text_encoders": False}})
    assert plan.estimate_for(off, s, 1, "none", True)["  peak while they are resident"] > 2 * s.text_encoders


def test_plan_cli_prints_a_breakdown(tmp_path, capsys):
    path = tmp_path / "flux.yaml"
    path.write_text(json.dumps(FLUX_DEV_CFG))  # JSON is YAML
    assert main(["plan", str(path), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GiB per GPU" in out and "does NOT fit" not in out.split("per-GPU GiB by layout")[0]
    assert "full fsdp" in out and "lora ddp" in out
    assert main(["plan", str(path), "--gpus", "0"]) == 2


def test_memory_prepare_master_weights_frozen_parts_and_text_cache():
    from srpo import lora
    from srpo.models.flux import FluxModel
    from srpo.models.tiny import TinyFlux
    from srpo.rewards.tiny import build_tiny_clip

    cfg = load_config(CONFIG, ["model.dtype=bfloat16", "train.gradient_checkpointing=true",
                               "memory.offload_frozen=true"])
    model = TinyFlux.load(seed=0, dtype="bfloat16")
    model.text_encoder.requires_grad_(True)  # prepare freezes every part but the transformer
    memory.prepare(model, cfg)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.transformer.parameters())
    frozen = [model.vae, model.text_encoder, model.text_encoder_2]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for m in frozen for p in m.parameters())
    assert model.transformer.is_gradient_checkpointing

    prompts = ["a red fox", "a blue boat", "a red fox"]
    cond = model.encode_prompts(prompts)
    assert sorted(model.encode_prompts.store) == ["a blue boat", "a red fox"]  # each prompt once
    for i, p in enumerate(prompts):  # equal to the adapter's own encoding of that prompt alone
        own = FluxModel.encode_prompts(model, [p])
        assert all(torch.equal(cond[k][i], own[k][0]) for k in own)

    reward = build_tiny_clip(seed=0).frozen()
    x = torch.randn(1, 4, 4, 4)
    v = model.velocity(x, torch.tensor([0.5]), model.encode_prompts(["a red fox"]), 3.5)
    reward.score(model.decode(x - 0.5 * v), ["a red fox"]).sum().backward()
    assert all(p.grad is not None for p in model.transformer.parameters() if p.requires_grad)
    assert all(p.grad is None for m in [*frozen, reward] for p in m.parameters())  # frozen: no grads

    model = TinyFlux.load(seed=0, dtype="bfloat16")  # LoRA: bf16 base stays frozen, fp32 adapters
    lora.apply(model, load_config(CONFIG, ["lora.enabled=true"]).lora)
    memory.prepare(model, cfg)
    for n, p in model.transformer.named_parameters():
        assert (p.dtype, p.requires_grad) == ((torch.float32, True) if ".lora_" in n else (torch.bfloat16, False))


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct activation tensors autograd keeps for backward during ``fn()``."""
    ptrs = {p.data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in ptrs and t.numel() > 1:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_activation_estimates_track_autograd_saved_tensors():
    from srpo.models.tiny import build_tiny_flux

    opts = dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                axes_dims_rope=(8, 12, 12), text_dim=32, max_sequence_length=16, vae_channels=(16, 32, 32))
    cfg = load_config(CONFIG, ["rollout.height=64", "rollout.width=64"])
    cfg.model.options = opts
    sizes = plan.model_sizes(cfg)
    model = build_tiny_flux(0, **opts)
    lat = torch.randn(1, *model.latent_shape(1, 64, 64)[1:], requires_grad=True)
    cond = model.encode_prompts(["a red fox"])
    got = _saved_bytes(lambda: model.velocity(lat, torch.tensor([0.5]), cond, 3.5), model.transformer.parameters())
    want = plan.transformer_activations(sizes, 1, 4, checkpointing=False)
    assert 0.75 < got / want < 1.33, (got, want)  # measured 0.91 (transformer), 1.17 (VAE)
    got = _saved_bytes(lambda: model.decode(lat), model.vae.parameters())
    want = plan.vae_activations(sizes, 1, 64, 64, 4, checkpointing=False)
    assert 0.75 < got / want < 1.33, (got, want)  # measured 0.91 (transformer), 1.17 (VAE)


def test_fsdp_casts_and_shards_block_by_block_and_gathers_in_the_compute_dtype():
    """Under FSDP ``srpo.setup.prepare`` makes the float32 master weights one block at a time as it
    shards (``memory.prepare`` leaves the whole model in model.dtype), encodes the prompts after
    sharding, and under bf16 autocast FSDP gathers each block's weights in bf16 (no autocast copy
    of a float32 weight is kept): the weight a Linear sees in its forward is bf16, its shard fp32."""
    from srpo import setup, step as steps
    from srpo.models import load_model

    cfg = load_config(CONFIG, ["model.dtype=bfloat16", "train.autocast=bf16", "parallel.strategy=fsdp",
                               "rollout.steps=2", "train.max_steps=1", "data.eval_prompts=null"])
    ctx = parallel.setup(cfg)  # one process: an in-memory store
    try:
        model = load_model(cfg.model, "cpu")
        seen = []
        linear = model.transformer.transformer_blocks[0].attn.to_q
        linear.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
        params, optimizer, encoded = setup.prepare(model, cfg, ctx, ["a red fox", "a blue boat", "a red fox"])
        assert encoded == 2 and model.text_encoders() == []  # encoded once each, then released
        assert all(p.dtype == torch.float32 and type(p).__name__ == "DTensor" for p in params)  # sharded masters
        from srpo.setup import build

        _, _, algorithm = build(cfg, ctx.device)
        batches = steps.Batches(cfg, model, algorithm, ["a red fox", "a blue boat"], ctx)
        before = [p.detach().full_tensor().clone() for p in params]
        row = steps.update(model, algorithm, optimizer, params, batches, cfg, ctx, 0)
        assert row["skipped"] == 0 and seen and set(seen) == {torch.bfloat16}
        moved = max((p.detach().full_tensor() - b).abs().max().item() for p, b in zip(params, before))
        assert moved > 0
    finally:
        parallel.teardown(ctx)


def test_flagship_text_encoder_configs_count_the_families_constants():
    """srpo/models/text_encoders.py: each flagship encoder's architecture, built on the meta
    device, has exactly the parameters its family's constant holds (counted from the published
    checkpoints' configs), so the plan's streamed count is of the same encoder."""
    from srpo.models import text_encoders as flagship
    from srpo.models.base import encoder_params
    from srpo.models.flux import CLIP_L, T5_XXL
    from srpo.models.qwen_image import TEXT_ENCODER_PARAMS as QWEN_VL
    from srpo.models.sd3 import TEXT_ENCODER_PARAMS as SD3
    from srpo.models.wan import UMT5_XXL_PARAMS

    for config, cls, params in [(flagship.CLIP_L, "CLIPTextModel", CLIP_L), (flagship.T5_XXL, "T5EncoderModel", T5_XXL),
                                (flagship.CLIP_L, "CLIPTextModelWithProjection", SD3["text_encoder"]),
                                (flagship.CLIP_G, "CLIPTextModelWithProjection", SD3["text_encoder_2"]),
                                (flagship.UMT5_XXL, "UMT5EncoderModel", UMT5_XXL_PARAMS),
                                (flagship.QWEN25_VL_7B, "Qwen2_5_VLForConditionalGeneration", QWEN_VL)]:
        assert encoder_params(config, cls, 0) == params, cls
    for name in ("flux", "flux2", "flux2_klein", "qwen_image", "sd3", "z_image", "wan"):
        cfg = load_config({**FLUX_DEV_CFG, "model": {"name": name, "dtype": "bfloat16"},
                           "parallel": {"strategy": "fsdp"}})
        s = plan.model_sizes(cfg)
        assert s.text_stream is not None and s.text_stream[0] < s.text_encoders / 4, name
