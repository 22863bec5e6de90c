"""The guard through the real trainer (tiny FLUX + tiny CLIP, a few updates): stop rules stop the
run cleanly, best/ is the best guard step's weights, `srpo sample --which best`, and --resume
carries the guard's state so a killed and resumed run decides exactly like an uninterrupted one.

Runs (trained once per module):
- ``ref``: 6 updates, guard every 2, checkpoints every 2 (all kept), a stop rule that can never
  fire, best_when hack_index <= 2 (update 2 always qualifies with this model, so a best exists;
  update 6 does not, so best/ is an earlier step than final/ and resuming from checkpoint 4
  must carry the best found before it);
- ``killed``: the same config as a real ``srpo train`` process that SIGKILLs itself while writing
  checkpoint 6 (the test hook ``SRPO_TEST_KILL_IN_SAVE``), i.e. after the guard evaluated update
  6 but before anything of the end was written; the newest checkpoint is step 4. It trains while
  ``ref`` trains in this process;
- ``stopped``: a stop rule that must fire (hack_index > 0) and best_when that excludes everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from srpo import checkpoint
from srpo.cli import main as cli
from srpo.config import load_config
from srpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 6
QUICK = [f"train.max_steps={STEPS}", "rollout.steps=2", "data.eval_steps=2", "guard.prompts=2", "log.tensorboard=false",
         "log.progress=false", "guard.every=2", "log.checkpoint_every=2", "log.keep_checkpoints=10"]
BEST_WHEN = 2.0  # hack_index <= 2: with the tiny model, updates 2 and 4 qualify, 6 (about 2.2) does not
REF = QUICK + ['guard.stop_when=["hack_index > 1e9"]', f'guard.best_when=["hack_index <= {BEST_WHEN}"]']
NEVER = "hack_index > 1e9"
STOP = "hack_index > 0"


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
                **extra)


def _srpo(*args, **env):
    cmd = [sys.executable, "-m", "srpo", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def _ckpt(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _guard_part(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("guard/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All runs of the module, overlapped: the subprocesses start (and import) while this
    process trains."""
    tmp = tmp_path_factory.mktemp("guard_run")
    killed = _srpo("train", CONFIG, "--output", tmp / "killed", *[a for s in REF for a in ("--set", s)],
                   SRPO_TEST_KILL_IN_SAVE=str(STEPS))
    procs = [killed]
    try:
        train(load_config(CONFIG, QUICK + [f'guard.stop_when=["{NEVER}", "{STOP}"]',
                                           'guard.best_when=["hack_index < 0"]']), tmp / "stopped")
        no_best = _srpo("sample", "--model", tmp / "stopped", "--which", "best", "--prompt", "a red square",
                        "--steps", "1", "-o", tmp / "never")
        procs.append(no_best)
        train(load_config(CONFIG, REF), tmp / "ref")
        _, err = killed.communicate(timeout=300)
        assert killed.returncode == -signal.SIGKILL, err[-2000:]
        _, err = no_best.communicate(timeout=300)
    finally:
        for p in procs:  # only on a failure above: do not leave them running
            if p.poll() is None:
                p.kill()
                p.wait()
    return SimpleNamespace(tmp=tmp, ref=tmp / "ref", killed=tmp / "killed", stopped=tmp / "stopped",
                           no_best=(no_best.returncode, err))


@pytest.fixture(scope="module")
def stopped(runs):
    return runs.stopped


# --------------------------------------------------------------------------- stop rules

def test_a_firing_stop_rule_stops_cleanly_at_the_first_guard_step(stopped):
    s = _summary(stopped)
    assert s["guard"]["stopped_at"] == 2 and s["guard"]["rule"] == STOP  # the rule that fired, not the first listed
    assert s["steps"] == 2
    rows = _rows(stopped)
    assert [r["step"] for r in rows] == [1, 2]  # nothing trained after the stop
    assert rows[-1]["guard/stop"] == STOP and rows[-1]["guard/hack_index"] > 0
    assert "guard/stop" not in rows[0] and not _guard_part(rows[0])  # update 1 is not a guard step
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-000002"]
    state = json.loads((stopped / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["guard"]["base"]["hack_index"] == 0.0
    assert _same(_weights(stopped / "final"), _ckpt(stopped, 2))  # final/ = the weights it stopped with
    samples = stopped / "samples"
    assert (samples / "after.png").read_bytes() == (samples / "step-000002.png").read_bytes()
    assert (samples / "before.png").is_file() and (stopped / "report.html").is_file()
    assert "stopped after update 2" in (stopped / "report.html").read_text()


def test_best_when_excluding_everything_keeps_no_best_and_sample_best_fails(runs):
    stopped = runs.stopped
    s = _summary(stopped)["guard"]
    assert s["best_step"] is None and s["best_value"] is None and s["best_metric"] == "srp_reward"
    assert not (stopped / "best").exists() and not (stopped / "best-lora").exists()
    code, err = runs.no_best  # srpo sample --model RUN --which best, as a process
    assert code == 2, err[-2000:]
    assert err.startswith("srpo: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "no best/" in err
    assert not (runs.tmp / "never").exists()


def test_a_stop_rule_firing_at_the_last_update_finishes_the_run(tmp_path):
    """Stop at update == train.max_steps: that guard grid is written as after.png directly, so the
    run must still end with summary.json and report.html (no copy of a step-N grid that does not
    exist)."""
    out = tmp_path / "run"
    cfg = load_config(CONFIG, QUICK + ["train.max_steps=2", f'guard.stop_when=["{STOP}"]', "log.checkpoint_every=0"])
    train(cfg, out)
    s = _summary(out)
    assert s["guard"]["stopped_at"] == 2 and s["guard"]["rule"] == STOP and s["steps"] == 2
    assert (out / "samples" / "after.png").is_file() and (out / "report.html").is_file()
    assert _rows(out)[-1]["guard/stop"] == STOP


def test_a_rule_that_never_fires_never_stops(runs):
    ref = runs.ref
    s = _summary(ref)
    assert s["guard"]["stopped_at"] is None and s["guard"]["rule"] is None and s["steps"] == STEPS
    rows = _rows(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # step 0 is not a metrics.jsonl row
    assert not any("guard/stop" in r for r in rows)
    assert [r["step"] for r in rows if _guard_part(r)] == [2, 4, 6]
    assert all(r["guard/hack_index"] < 1e9 for r in rows if _guard_part(r))
    before = json.loads((ref / "eval_before.json").read_text())  # the base evaluation lives here
    assert before == s["eval_before"] and before["hack_index"] == 0.0 and before["diversity"] == 1.0
    assert set(before) == {k[6:] for k in _guard_part(rows[-1])}
    assert s["eval_after"] == {k[6:]: v for k, v in _guard_part(rows[-1]).items()}
    assert (ref / "samples" / "after.png").is_file() and (ref / "report.html").is_file()


# --------------------------------------------------------------------------- best/

def test_best_is_the_checkpoint_of_the_best_step_bit_for_bit(runs):
    ref = runs.ref
    g = _summary(ref)["guard"]
    assert g["best_metric"] == "srp_reward"
    eligible = [r for r in _rows(ref) if _guard_part(r) and r["guard/hack_index"] <= BEST_WHEN]
    assert eligible, "no guard step met best_when: choose a larger BEST_WHEN"
    values = [r["guard/srp_reward"] for r in eligible]
    # the first eligible guard step with the highest srp_reward (ties keep the earlier)
    want = eligible[values.index(max(values))]["step"]
    assert g["best_step"] == want and g["best_value"] == max(values)
    best = _weights(ref / "best")
    assert _same(best, _ckpt(ref, want))
    assert (ref / "best" / "config.json").read_text() == (ref / "final" / "config.json").read_text()
    assert _same(_weights(ref / "final"), _ckpt(ref, STEPS))
    if want != STEPS:
        assert not _same(best, _weights(ref / "final"))


def _render(run: Path, which: str, out: Path) -> np.ndarray:
    assert cli(["sample", "--model", str(run), "--which", which, "--prompt", "a dog on a green lawn",
                "--steps", "2", "--seed", "3", "-o", str(out)]) == 0
    (png,) = [p for p in out.glob("0000-*.png")]
    return np.asarray(Image.open(png))


def test_sample_which_best_renders_the_best_weights(runs, tmp_path):
    ref = runs.ref
    best_step = _summary(ref)["guard"]["best_step"]
    best, final = _render(ref, "best", tmp_path / "best"), _render(ref, "final", tmp_path / "final")
    assert best.shape == final.shape == (32, 32, 3)  # the run's rollout size
    if best_step == STEPS:
        assert np.array_equal(best, final)
    else:
        assert not np.array_equal(best, final)


# --------------------------------------------------------------------------- resume

def test_resume_carries_the_guard(runs):
    ref, run = runs.ref, runs.killed
    assert checkpoint.latest(run).name == "step-000004"
    state = json.loads((checkpoint.latest(run) / "state.json").read_text())
    assert set(state["guard"]) >= {"base", "best", "best_step", "best_value", "base_stats"}
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert [r["step"] for r in _rows(run)] == list(range(1, STEPS + 1))  # 6 rows, 5 and 6 to be redone

    train(load_config(CONFIG, REF), run, resume=True)
    assert _same(_weights(run / "final"), _weights(ref / "final"))
    a, b = _summary(ref)["guard"], _summary(run)["guard"]
    assert (b["best_step"], b["best_value"]) == (a["best_step"], a["best_value"])
    assert b == a
    rows, want = _rows(run), _rows(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no update logged twice
    assert [_guard_part(r) for r in rows[4:]] == [_guard_part(r) for r in want[4:]]
    assert _guard_part(rows[-1])  # update 6 is a guard step: the comparison above is not of empties
    assert [_guard_part(r) for r in rows] == [_guard_part(r) for r in want]
    assert _same(_weights(run / "best"), _weights(ref / "best"))
