"""Resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run.

The killed runs are real ``srpo train`` processes: one is SIGKILLed from outside as soon as its
metrics log shows two updates (wherever it then is: inside update 3 or writing checkpoint 2),
the other kills itself in the middle of writing checkpoint 2 (``SRPO_TEST_KILL_IN_SAVE``), which
must leave checkpoint 1 loadable. Both are resumed with ``--resume`` semantics in this process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from srpo import checkpoint, parallel
from srpo.config import load_config
from srpo.errors import UserError
from srpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 3
QUICK = [f"train.max_steps={STEPS}", "data.eval_prompts=null", "log.sample_every=0", "rollout.steps=2",
         "log.tensorboard=false", "log.progress=false", "log.checkpoint_every=1", "log.keep_checkpoints=2"]


def _cfg():
    return load_config(CONFIG, QUICK)


def _launch(out: Path, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "srpo", "train", str(CONFIG), "--output", str(out)]
    cmd += [a for s in QUICK for a in ("--set", s)]
    full_env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run / "final").glob("*.safetensors"))))


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Both killed runs, started together; the uninterrupted reference trains meanwhile."""
    tmp = tmp_path_factory.mktemp("resume")
    outside = _launch(tmp / "outside")
    inside = _launch(tmp / "inside", SRPO_TEST_KILL_IN_SAVE="2")

    def kill_after_two_updates():
        metrics, deadline = tmp / "outside" / "metrics.jsonl", time.time() + 240
        while outside.poll() is None and time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(outside.pid, signal.SIGKILL)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_two_updates)
    killer.start()
    train(_cfg(), tmp / "ref")
    killer.join()
    codes = {"outside": outside.wait(timeout=240), "inside": inside.wait(timeout=240)}
    return tmp, codes


def test_sigkill_from_outside_then_resume_is_bit_identical(killed):
    tmp, codes = killed
    assert codes["outside"] == -signal.SIGKILL
    run = tmp / "outside"
    assert 1 <= json.loads((checkpoint.latest(run) / "state.json").read_text())["step"] < STEPS
    train(_cfg(), run, resume=True)
    assert _same(_final(run), _final(tmp / "ref"))
    rows, ref = _rows(run), _rows(tmp / "ref")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no update logged twice
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]


def test_kill_during_checkpoint_write_keeps_the_previous_one(killed):
    tmp, codes = killed
    assert codes["inside"] == -signal.SIGKILL
    run = tmp / "inside"
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-000002", "step-000001"]
    assert sorted(p.name for p in (root / ".tmp-step-000002").iterdir()) == \
        ["optimizer.pt", "rng.json", "state.json", "trainable.safetensors"]  # written, never published
    assert checkpoint.latest(run).name == "step-000001"
    state = json.loads((root / "step-000001" / "state.json").read_text())
    assert state == {"step": 1, "format": "full", "samples_seen": 2, "global_batch": 2, "world": 1}
    train(_cfg(), run, resume=True)
    assert _same(_final(run), _final(tmp / "ref"))
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]  # keep the last 2
    ref3 = load_file(str(tmp / "ref" / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert _same(load_file(str(root / "step-000003" / "trainable.safetensors")), ref3)


def _toy():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    module[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.1)
    module(torch.randn(5, 3)).sum().backward()
    opt.step()
    return module, opt


def test_checkpoint_restores_weights_optimizer_and_rng_states(tmp_path):
    module, opt = _toy()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint.save(tmp_path, 7, module, opt, extra={"samples_seen": 14})
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    fresh, fresh_opt = _toy()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    state = checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_opt)
    assert state == {"step": 7, "format": "full", "samples_seen": 14}
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
    assert torch.equal(fresh[1].weight, module[1].weight)
    assert not torch.equal(fresh[0].weight, module[0].weight)  # frozen: not in the checkpoint
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_resume_refuses_a_different_global_batch(tmp_path):
    module, opt = _toy()
    cfg, ctx = _cfg(), parallel.Context()
    checkpoint.save(tmp_path, 2, module, opt, extra=checkpoint.data_position(cfg, ctx, 2))
    assert checkpoint.resume(tmp_path, module, opt, cfg, ctx)["step"] == 2
    cfg.train.batch_size = 1
    with pytest.raises(UserError, match="global batch of 2 samples, this launch has 1"):
        checkpoint.resume(tmp_path, module, opt, cfg, ctx)


def test_corrupt_or_mismatched_checkpoint_is_a_one_line_error(tmp_path):
    module, opt = _toy()
    path = checkpoint.save(tmp_path, 1, module, opt)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="does not match the model"):
        checkpoint.load(path, other, torch.optim.AdamW(other.parameters()))
    (path / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot be loaded") as e:
        checkpoint.load(path, module, opt)
    assert "\n" not in str(e.value)
