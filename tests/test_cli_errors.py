"""Bad input through the real CLI: one line on stderr, exit code 2, no traceback, nothing lost."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def srpo(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


CASES = {
    "missing config": lambda t: ["train", t / "nope.yaml"],
    "malformed yaml": lambda t: ["train", write(t / "bad.yaml", "model: [unclosed\n  x: 1")],
    "empty config": lambda t: ["train", write(t / "empty.yaml", "")],
    "config not a mapping": lambda t: ["train", write(t / "list.yaml", "- a\n- b\n")],
    "unknown key": lambda t: ["train", TINY, "--set", "train.lrr=1"],
    "wrong type": lambda t: ["train", TINY, "--set", "train.max_steps=abc"],
    "out of range": lambda t: ["train", TINY, "--set", "train.lr=-1"],
    "bad index range": lambda t: ["train", TINY, "--set", "method.index_range=[30,10]"],
    "bad override syntax": lambda t: ["train", TINY, "--set", "train.lr"],
    "missing data section": lambda t: ["train", write(t / "nodata.yaml", "train: {max_steps: 1}\n")],
    "missing model folder": lambda t: ["train", TINY, "--set", "model.name=flux", "--set", "model.options={}", "--set", f"model.path={t}/no-model",
                                       "--output", t / "run"],
    "unknown reward": lambda t: ["train", TINY, "--set", "reward.name=nonexistent_reward", "--output", t / "run"],
    "empty prompts file": lambda t: ["train", TINY, "--set", f"data.prompts={write(t / 'p.txt', '  ')}",
                                     "--output", t / "run"],
    "missing prompts file": lambda t: ["train", TINY, "--set", f"data.prompts={t}/none.txt", "--output", t / "run"],
    "output is a file": lambda t: ["train", TINY, "--output", write(t / "f", "x")],
    "sample: missing model": lambda t: ["sample", "--model", t / "none", "--prompt", "a cat", "--output", t / "o"],
    "sample: empty prompts": lambda t: ["sample", "--model", t, "--prompts", write(t / "e.txt", "\n"), "--output", t / "o"],
    "sample: bad steps": lambda t: ["sample", "--model", t, "--prompt", "a", "--steps", "0", "--output", t / "o"],
    "unknown option": lambda t: ["train", TINY, "--bogus"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    res = srpo(*CASES[case](tmp_path), cwd=tmp_path)
    assert res.returncode == 2, (case, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, (case, res.stderr)
    assert "Traceback" not in res.stderr and lines[0].startswith("srpo: error:")
    assert not (tmp_path / "run").exists(), "nothing may be written for bad input"


def test_existing_run_is_not_touched_without_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    write(run / "metrics.jsonl", '{"step": 1}\n')
    write(run / "checkpoints" / "step-000001" / "state.json", '{"step": 1}')
    before = tree_digest(run)
    res = srpo("train", TINY, "--output", run, cwd=tmp_path)
    assert res.returncode == 2 and "--resume" in res.stderr
    assert tree_digest(run) == before
