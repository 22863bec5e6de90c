"""What the families' end-to-end tests share: the real CLI in a subprocess, the short run
settings, and the checks every family's full run and `srpo sample` must pass."""

import json
import os
import subprocess
import sys

FAST = ["--set", "train.max_steps=3", "--set", "log.progress=false", "--set", "log.sample_every=0",
        "--set", "log.checkpoint_every=0", "--set", "rollout.steps=4", "--set", "data.eval_steps=4"]
LORA = ["--set", "lora.enabled=true", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "lora.init=gaussian",
        "--set", "train.lr=0.05"]


def srpo(*args, **env):
    """``python -m srpo ARGS`` offline; asserts exit code 0 (stderr's tail otherwise)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    res = subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def check_full_run(run, transformer_class, base_state: dict) -> None:
    """final/ loads with the family's diffusers transformer, moved from the base, 3 logged updates
    without a skip, before / after evaluations in summary.json."""
    final = transformer_class.from_pretrained(str(run / "final"), local_files_only=True)
    trained = final.state_dict()
    assert set(trained) == set(base_state)
    assert max((trained[k] - base_state[k]).abs().max().item() for k in base_state) > 1e-4  # it trained
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped"] == 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert "eval_before" in summary and "eval_after" in summary


def check_sample(run, out, **env) -> None:
    """`srpo sample` renders the run's final weights at the run's size."""
    from PIL import Image

    srpo("sample", "--model", run, "--prompt", "a lighthouse at dusk", "--steps", "3", "--output", out, **env)
    images = sorted(out.glob("0000-*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (32, 32)
