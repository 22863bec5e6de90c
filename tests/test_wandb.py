"""log.wandb: a real ``srpo train`` writes an offline Weights & Biases run beside metrics.jsonl.

The run's history is read back from its transaction log (``run-<id>.wandb``: the LevelDB-style
record log wandb writes, each record a ``wandb_internal_pb2.Record``) and checked against
metrics.jsonl; ``--resume`` continues the same W&B run; without wandb installed the run stops
with one line before the run folder gets any file. Nothing here reaches a network: offline mode.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from srpo.config import WandbConfig  # noqa: E402
from srpo.runlog import RunLog  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.max_steps=3", "log.progress=false", "rollout.steps=2", "data.eval_steps=2", "guard.every=2",
        "log.wandb.project=p", "log.wandb.mode=offline"]

# Hides wandb as an environment without it would: find_spec -> None, import -> ModuleNotFoundError.
NO_WANDB = '''
import sys
from importlib.machinery import PathFinder


class _NoWandb(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_NoWandb if f is PathFinder else f for f in sys.meta_path]
'''


def _env(tmp: Path, **extra) -> dict:
    home = tmp / "wandb-home"  # wandb's own settings, cache and staging stay out of the user's home
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
            "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data"), **extra}


def srpo(out: Path, *sets: str, resume: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "srpo", "train", str(TINY), "--output", str(out)]
    cmd += [a for s in [*FAST, *sets] for a in ("--set", s)] + (["--resume"] if resume else [])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env or _env(out.parent))


def records(path: Path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks
    of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def read_run(folder: Path) -> dict:
    """One offline run folder -> its id, config and history (rows keyed by W&B step)."""
    (log,) = folder.glob("run-*.wandb")
    run, history = None, {}
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = row
    assert run is not None, f"{log} has no run record"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    return {"id": run.run_id, "project": run.project, "name": run.display_name, "config": config, "history": history}


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def assert_rows_logged(rows: list[dict], history: dict) -> None:
    """Every finite number of every metrics row is in the W&B history at step = the row's step."""
    assert rows
    for row in rows:
        logged = history[row["step"]]
        numbers = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        assert numbers and {k: logged.get(k) for k in numbers} == numbers, f"update {row['step']}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb") / "run"
    p = srpo(out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_offline_run_holds_the_metrics_config_and_samples(run):
    (folder,) = offline_runs(run)
    wb = read_run(folder)
    assert (run / "wandb_run_id").read_text().strip() == wb["id"] and folder.name.endswith(wb["id"])
    assert wb["project"] == "p" and wb["name"] == "run"
    assert wb["config"]["train"]["lr"] == pytest.approx(3.0e-3) and wb["config"]["log"]["wandb"]["project"] == "p"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_rows_logged(rows, wb["history"])
    assert wb["history"][0]["guard/reward"] == json.loads((run / "eval_before.json").read_text())["reward"]
    # the grids: before at 0, the guard's at 2, after (and the run's curves and report) at the end
    for step, key in [(0, "samples/before"), (2, "samples/step-000002"), (3, "samples/after"), (3, "curves")]:
        assert wb["history"][step][f"{key}/_type"] == "image-file", key
        assert (folder / "files" / wb["history"][step][f"{key}/path"]).is_file(), key
    assert list((folder / "files" / "media" / "images" / "samples").glob("before_*.png"))
    page = folder / "files" / wb["history"][3]["report/path"]
    assert wb["history"][3]["report/_type"] == "html-file" and "data:image/png;base64," in page.read_text()


def test_resume_continues_the_same_run(run):
    (first,) = offline_runs(run)
    run_id = (run / "wandb_run_id").read_text().strip()
    p = srpo(run, "train.max_steps=5", resume=True)
    assert p.returncode == 0, p.stderr[-3000:]
    folders = offline_runs(run)
    assert len(folders) == 2 and first in folders
    (second,) = [f for f in folders if f != first]
    wb = read_run(second)
    assert wb["id"] == run_id and (run / "wandb_run_id").read_text().strip() == run_id
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert_rows_logged(rows[3:], wb["history"])
    assert min(wb["history"]) == 4  # the resumed run starts where the checkpoint left off
    assert wb["history"][4]["samples/step-000004/_type"] == "image-file"


def test_missing_wandb_is_one_line_before_anything_is_written(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_WANDB)
    path = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = tmp_path / "run"
    p = srpo(out, env=_env(tmp_path, PYTHONPATH=path))
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "wandb is not installed" in lines[0] and "srpo[wandb]" in lines[0]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def test_other_ranks_log_nothing(tmp_path):
    """RunLog on a rank other than 0 (enabled=False) starts no W&B run and writes no file."""
    log = RunLog(tmp_path / "run", enabled=False, wandb=WandbConfig(project="p", mode="offline"), config={})
    import torch

    log.log({"step": 1, "loss": 0.5})
    log.scalars(0, {"guard/reward": 1.0})
    log.grid(torch.zeros(1, 3, 4, 4), "before.png")
    log.close()
    assert wandb.run is None and not (tmp_path / "run").exists()
