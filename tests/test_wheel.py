"""The package works from a plain wheel install, away from any source tree: build the wheel,
install it into a fresh target folder, run the CLI from an unrelated folder (the lab world and a
built-in config by name come from the package's own data)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp / "dist").glob("srpo-*.whl"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    return target, work, env


def srpo(installed, *args):
    target, work, env = installed
    return subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_wheel_is_what_runs(installed):
    target, work, env = installed
    res = subprocess.run([sys.executable, "-c", "import srpo, srpo.config as c; print(srpo.__file__); print(c.BUILTIN)"],
                         cwd=work, env=env, capture_output=True, text=True, check=True)
    here, builtin = res.stdout.split()
    assert Path(here).is_relative_to(target) and Path(builtin).is_relative_to(target)
    assert not Path(here).is_relative_to(ROOT)
    assert (Path(builtin) / "tiny.yaml").is_file() and (Path(builtin) / "prompts" / "tiny-train.txt").is_file()


def test_lab_quick_from_the_wheel(installed):
    res = srpo(installed, "lab", "--quick", "--output", "lab")
    assert res.returncode == 0, res.stderr[-2000:]
    out = installed[1] / "lab"
    assert (out / "summary.json").is_file() and (out / "srpo" / "report.html").is_file()
    assert "targets:" in res.stdout


def test_builtin_config_by_name_from_the_wheel(installed):
    res = srpo(installed, "train", "tiny", "--output", "tiny-run", "--set", "train.max_steps=2",
               "--set", "log.progress=false", "--set", "rollout.steps=2", "--set", "data.eval_steps=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (installed[1] / "tiny-run" / "final" / "config.json").is_file()
    bad = srpo(installed, "train", "no-such-config")
    assert bad.returncode == 2 and "built-in configs by name" in bad.stderr and "Traceback" not in bad.stderr
