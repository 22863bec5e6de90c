"""Sharded checkpoints (torch.distributed.checkpoint under FSDP2) and elastic restarts, with the
real CLI under torchrun on CPU with gloo.

Resharded resume: a 2-process FSDP run (global batch 4) writes sharded checkpoints and is
SIGKILLed in the middle of writing checkpoint 3 (rank 0 kills itself after every rank wrote its
shards, before the folder is published); checkpoint 2 must stay loadable. Copies of that run
folder are resumed by one process without any process group (strategy none, batch 4) and by 4
FSDP processes (batch 1). Both must land on the weights of an uninterrupted one-process run.

Tolerance: 5e-5 absolute on weights after 4 AdamW updates at lr 3e-3 (tests/test_parallel.py
explains it: other summation orders move gradients by ~1e-7 relative, Adam turns that into
~1e-6 on weights; a lost shard, a wrong optimizer state or a skipped update moves them by ~lr).

Elastic: ``torchrun --max-restarts 1`` with 2 processes; rank 1 is SIGKILLed from outside once
the log shows 3 updates. torchrun restarts both workers, which resume from the newest checkpoint
by themselves; the final weights equal an uninterrupted 2-process run's bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from family_runs import launcher_env, set_args
from srpo import checkpoint
from srpo.config import load_config
from srpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
QUICK = ["data.eval_prompts=null", "log.sample_every=0", "rollout.steps=2", "log.tensorboard=false",
         "log.progress=false", "log.checkpoint_every=1", "log.keep_checkpoints=2"]
TOL = 5e-5


def _torchrun(launch: list[str], out: Path, sets: list[str], log: Path, resume=False, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launch, "-m", "srpo", "train", str(CONFIG),
           "--output", str(out), *set_args(QUICK + sets)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run / "final").glob("*.safetensors"))))


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------- resharded resume

@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    fsdp = ["parallel.strategy=fsdp", "train.max_steps=4"]
    first = _torchrun(["--nproc_per_node", "2"], tmp / "two", fsdp + ["train.batch_size=2"], tmp / "two.log",
                      SRPO_TEST_KILL_IN_SAVE="3")
    train(load_config(CONFIG, QUICK + ["train.max_steps=4", "train.batch_size=4"]), tmp / "ref")
    code = first.wait(timeout=300)
    two = (tmp / "two.log").read_text()[-3000:]
    layout = {"code": code, "log": two, "folders": sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir())}
    for name in ("one", "four"):
        shutil.copytree(tmp / "two", tmp / name)
    four = _torchrun(["--nproc_per_node", "4"], tmp / "four", fsdp + ["train.batch_size=1"], tmp / "four.log",
                     resume=True)
    train(load_config(CONFIG, QUICK + ["train.max_steps=4", "train.batch_size=4"]), tmp / "one", resume=True)
    codes = {"four": four.wait(timeout=300)}
    return tmp, layout, codes


def test_a_kill_while_writing_a_sharded_checkpoint_leaves_the_previous_one(resharded):
    tmp, layout, _ = resharded
    assert layout["code"] != 0, layout["log"]  # rank 0 died writing checkpoint 3
    assert layout["folders"] == [".tmp-step-000003", "step-000001", "step-000002"], layout["log"]
    last = checkpoint.latest(tmp / "two")
    assert last.name == "step-000002"
    state = json.loads((last / "state.json").read_text())
    assert state["format"] == "sharded" and state["world"] == 2 and state["global_batch"] == 4
    files = sorted(p.name for p in (last / "sharded").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank, written by that rank
    assert not (last / "trainable.safetensors").exists() and not (last / "optimizer.pt").exists()
    sizes = [(last / "sharded" / f).stat().st_size for f in files[1:]]
    assert min(sizes) > 0.3 * sum(sizes)  # each rank wrote about half of the state, not one rank all of it


@pytest.mark.parametrize("name", ["one", "four"])
def test_sharded_checkpoint_resumes_on_another_number_of_processes(resharded, name):
    tmp, _, codes = resharded
    if name in codes:
        assert codes[name] == 0, (tmp / f"{name}.log").read_text()[-3000:]
    ref, got = _final(tmp / "ref"), _final(tmp / name)
    diff = _max_diff(ref, got)
    print(f"resharded resume on {name}: max abs weight difference {diff:.2e} vs the uninterrupted run")
    assert diff < TOL, f"{name}: max abs weight difference {diff:.3g} vs the uninterrupted run"
    from srpo.models.tiny import build_tiny_flux

    init = build_tiny_flux(0).transformer.state_dict()
    assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 50 * TOL  # training moved far more
    rows = _rows(tmp / name)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # updates 1-2 from the 2-process run, 3-4 resumed
    ref_rows = _rows(tmp / "ref")
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 and a["ts"] == b["ts"] for a, b in zip(rows, ref_rows))


def test_sharded_checkpoint_refuses_another_model(resharded, tmp_path):
    tmp, _, _ = resharded
    from srpo.errors import UserError

    cfg = load_config(CONFIG, QUICK + ["lora.enabled=true"])  # adapters instead of the full weights
    from srpo.models import load_model
    from srpo import lora
    from srpo.setup import make_optimizer

    model = load_model(cfg.model, "cpu")
    lora.apply(model, cfg.lora, seed=0)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    with pytest.raises(UserError, match="does not match the model"):
        checkpoint.load(tmp / "two" / "checkpoints" / "step-000002", model.transformer, make_optimizer(params, cfg))


# ---------------------------------------------------------------------- elastic restarts

def _workers(tag: str) -> dict[int, int]:
    """rank -> pid of the torchrun workers started with SRPO_TEST_TAG=tag."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if env.get("SRPO_TEST_TAG") == tag and "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


def test_torchrun_restarts_resume_by_themselves_bit_exactly(tmp_path):
    sets = ["parallel.strategy=fsdp", "train.batch_size=1", "train.max_steps=6", "log.checkpoint_every=2"]
    elastic = _torchrun(["--nproc_per_node", "2", "--max-restarts", "1"], tmp_path / "elastic", sets,
                        tmp_path / "elastic.log", SRPO_TEST_TAG=str(tmp_path))
    ref = _torchrun(["--nproc_per_node", "2"], tmp_path / "ref", sets, tmp_path / "ref.log")
    killed = {}

    def kill_rank_1_after_three_updates():
        # checkpoints are written in the background and published later: wait for one to be on disk too,
        # so the restart has something to resume from (a kill before any publish restarts from 0, rightly)
        metrics, deadline = tmp_path / "elastic" / "metrics.jsonl", time.time() + 240
        published = tmp_path / "elastic" / "checkpoints" / "step-000002"
        while elastic.poll() is None and time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3 and published.is_dir():
                pid = _workers(str(tmp_path)).get(1)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_rank_1_after_three_updates)
    killer.start()
    codes = {"ref": ref.wait(timeout=300), "elastic": elastic.wait(timeout=400)}
    killer.join()
    log = (tmp_path / "elastic.log").read_text()
    assert killed, log[-3000:]
    assert codes == {"ref": 0, "elastic": 0}, log[-3000:]
    assert "torchrun restart 1: resuming from the newest checkpoint" in log, log[-3000:]
    assert "--resume: continuing after update" in log, log[-3000:]  # not from update 0: a checkpoint was used
    assert [r["step"] for r in _rows(tmp_path / "elastic")] == [1, 2, 3, 4, 5, 6]
    a, b = _final(tmp_path / "ref"), _final(tmp_path / "elastic")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_checkpoint_benchmark_reads_back_both_formats_exactly():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import checkpoints as bench

    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    report = bench.main(["--procs", "2", "--hidden", "128", "--double", "1", "--single", "1"])
    assert len(report["ranks"]) == 2 and all(r[f]["exact"] for r in report["ranks"] for f in ("sharded", "full"))
    files = sorted(f.removeprefix("checkpoints/step-000001/") for f in report["ranks"][0]["sharded"]["files"])
    assert files == ["rng.json", "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "state.json"]
    assert "checkpoints/step-000001/optimizer.pt" in report["ranks"][0]["full"]["files"]
