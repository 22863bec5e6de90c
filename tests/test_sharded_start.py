"""The sharded start (srpo/shards.py) through the real CLI under torchrun: FSDP2 on 2 gloo
processes from a saved pipeline folder (the tiny FLUX twin written as a FLUX.1 folder, loaded by
the ``flux`` family), the transformer built as a skeleton and each rank reading only its rows
of each weight. Full fine-tuning and LoRA must land on the weights of the one-process run, which
loads the folder whole (tolerance as tests/test_parallel.py: 5e-5 after 3 AdamW updates at lr
3e-3, measured ~1e-6; a shard read from the wrong rows, or a LoRA adapter initialised
differently on one rank, moves weights by ~lr). Bad folders stop every rank with one line, exit
2, and no rank waits on another."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from family_runs import launcher_env, set_args
from srpo.models.tiny import TinyFlux

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 3
QUICK = [f"train.max_steps={STEPS}", "data.eval_prompts=null", "log.sample_every=0", "rollout.steps=4",
         "log.tensorboard=false", "log.progress=false", "log.checkpoint_every=0", "model.name=flux"]
LORA = ["lora.enabled=true", "lora.rank=4", "train.lr=3e-3"]
TOL = 5e-5


def _train(out: Path, sets: list[str], procs: int):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    cmd = [sys.executable, *launcher, "-m", "srpo", "train", str(CONFIG), "--output", str(out), *set_args(QUICK + sets)]
    return subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=600)


def _weights(run: Path, lora: bool) -> dict[str, torch.Tensor]:
    folder = run / ("lora" if lora else "final")
    return load_file(str(next(folder.rglob("*.safetensors"))))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_folder") / "pipe"
    TinyFlux.save_random(path, seed=0)
    return path


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharded_start_trains_the_weights_of_the_whole_load(folder, tmp_path, lora):
    sets = [f"model.path={folder}", "model.options={max_sequence_length: 64}", *(LORA if lora else [])]
    one = _train(tmp_path / "one", sets + ["train.batch_size=2"], 1)
    two = _train(tmp_path / "two", sets + ["train.batch_size=1", "parallel.strategy=fsdp"], 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "sharded start" in two.stdout + two.stderr  # the skeleton path ran, not the whole load
    ref, got = _weights(tmp_path / "one", lora), _weights(tmp_path / "two", lora)
    assert set(ref) == set(got) and len(ref) > 10
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < TOL, f"max abs weight difference {diff:.3g} vs one process"
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all(r["skipped"] == 0 for r in rows)


def _break(folder: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    weights = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        weights.unlink()
    else:  # a config that makes other shapes than the file holds
        cfg = json.loads((bad / "transformer" / "config.json").read_text())
        cfg["joint_attention_dim"] = cfg["joint_attention_dim"] * 2
        (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("how,words", [
    ("truncated", ["diffusion_pytorch_model.safetensors", "truncated"]),
    ("missing", ["holds no .safetensors"]),
    ("mismatched", ["diffusion_pytorch_model.safetensors", "context_embedder.weight", "different models"]),
])
def test_a_bad_transformer_folder_stops_every_rank_with_one_line(folder, tmp_path, how, words):
    bad = _break(folder, tmp_path, how)
    r = _train(tmp_path / "run", [f"model.path={bad}", "model.options={max_sequence_length: 64}",
                                  "train.batch_size=1", "parallel.strategy=fsdp"], 2)
    out = r.stdout + r.stderr
    # one line from each rank (two ranks writing at once may land on one terminal line)
    errors = re.findall(r"srpo: error: (.*?)(?=srpo: error: |\n|$)", out)
    assert r.returncode != 0 and len(errors) == 2, out[-3000:]
    assert errors[0] == errors[1]
    for word in words:
        assert word in errors[0], errors[0]
    # torchrun's summary: the first rank to fail exited 2 (the agent may stop the other before
    # its own exit 2 is recorded; each printed its error line above)
    assert "exitcode  : 2" in out, out[-2000:]
    # the only traceback is torchrun's own report of its failed children: no frame of srpo's
    assert not [ln for ln in out.splitlines() if ln.strip().startswith("File ") and str(ROOT / "srpo") in ln], out[-3000:]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_process_encodes_first_then_reads_the_transformer_whole(folder, tmp_path, lora):
    """One process from a folder (memory.release_text_encoders, the default): the prompts are
    encoded while the transformer is still a skeleton, the encoders are freed, then the
    transformer is read whole: bit for bit the weights FluxModel.load (diffusers' from_pretrained)
    gives, and LoRA adapters start at B = 0 with A from (seed, name)."""
    from srpo import parallel, setup
    from srpo.config import load_config
    from srpo.data import load_prompts
    from srpo.lora import initial_values
    from srpo.models import MODELS
    from srpo.shards import is_skeleton

    cfg = load_config(CONFIG, QUICK + [f"model.path={folder}", "model.options={max_sequence_length: 64}",
                                       *(LORA if lora else [])])
    ctx = parallel.setup(cfg)
    model, _, _ = setup.build(cfg, ctx.device, ctx)
    assert is_skeleton(model.transformer) and next(model.transformer.parameters()).is_meta
    seen = []
    encode = model.encode_prompts

    def watched(prompts):
        seen.append(next(model.transformer.parameters()).is_meta)
        return encode(prompts)

    model.encode_prompts = watched
    prompts = load_prompts(cfg.data.prompts)
    setup.prepare(model, cfg, ctx, prompts, tmp_path / "text_cache")
    assert seen and all(seen)  # every prompt was encoded before any transformer weight was read
    assert model.text_encoder is None and model.text_encoder_2 is None  # released
    assert len(list((tmp_path / "text_cache").glob("*.safetensors"))) == len(set(prompts))
    ref = MODELS.get("flux").load(folder, max_sequence_length=64).transformer.state_dict()
    got = model.transformer.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in got.items() if ".lora_" not in k}
    assert set(base) == set(ref) and all(torch.equal(base[k].to(ref[k].dtype), ref[k]) for k in ref)
    adapters = {k: v for k, v in got.items() if ".lora_" in k}
    assert bool(adapters) == lora
    init = initial_values(cfg.lora, cfg.train.seed)
    for k, v in adapters.items():
        assert torch.equal(v, init(k, tuple(v.shape))) and (".lora_A." in k or not v.any())


def test_resume_from_a_folder_through_the_skeleton_start_is_bit_exact(folder, tmp_path):
    """One process from a folder (the skeleton start, LoRA): 2 updates, then --resume to 3, ends
    bit-identical to 3 updates straight (the resumed run re-reads the base from the files and
    the adapters and AdamW state from the checkpoint)."""
    from srpo.config import load_config
    from srpo.trainer import train

    sets = QUICK + [f"model.path={folder}", "model.options={max_sequence_length: 64}", *LORA]
    train(load_config(CONFIG, sets), tmp_path / "straight")
    cut = [s for s in sets if not s.startswith("train.max_steps")]
    train(load_config(CONFIG, cut + ["train.max_steps=2", "log.checkpoint_every=1"]), tmp_path / "cut")
    train(load_config(CONFIG, cut + ["train.max_steps=3", "log.checkpoint_every=1"]), tmp_path / "cut", resume=True)
    a, b = _weights(tmp_path / "straight", True), _weights(tmp_path / "cut", True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_from_a_folder_reads_the_whole_transformer_after_encoding(folder, tmp_path):
    sets = [f"model.path={folder}", "model.options={max_sequence_length: 64}"]
    one = _train(tmp_path / "one", sets + ["train.batch_size=2"], 1)
    two = _train(tmp_path / "two", sets + ["train.batch_size=1", "parallel.strategy=ddp"], 2)
    assert one.returncode == 0 and two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    ref, got = _weights(tmp_path / "one", False), _weights(tmp_path / "two", False)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < TOL
