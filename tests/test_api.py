"""The Python API: srpo.train(config, output, **overrides) and srpo.load_run(run).sample(...)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import srpo
from srpo.errors import UserError

FAST = {"train": {"max_steps": 2}, "log": {"progress": False, "tensorboard": False, "checkpoint_every": 1},
        "rollout.steps": 2, "data.eval_steps": 2, "guard": {"every": 1, "best_when": []}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "nb"
    summary = srpo.train("tiny", out, **FAST)
    return out, summary


def test_train_applies_both_override_forms_and_returns_the_summary(run):
    out, summary = run
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["guard"]["best_step"] in (1, 2)
    cfg = (out / "config.yaml").read_text()
    assert "max_steps: 2" in cfg and "eval_steps: 2" in cfg  # section dict and dotted key


def test_load_run_samples_the_trained_weights(run):
    out, _ = run
    loaded = srpo.load_run(out)
    trained = load_file(str(out / "final" / "diffusion_pytorch_model.safetensors"))
    state = loaded.model.transformer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    a = loaded.sample(["a red cube on a table", "a blue ball"], steps=3, seed=1)
    b = loaded.sample(["a red cube on a table", "a blue ball"], steps=3, seed=1)
    c = loaded.sample("a red cube on a table", steps=3, seed=2)
    assert len(a) == 2 and a[0].size == (32, 32) and len(c) == 1
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    best = srpo.load_run(out, which="best")
    step = json.loads((out / "summary.json").read_text())["guard"]["best_step"]
    want = load_file(str(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))
    assert all(torch.equal(best.model.transformer.state_dict()[k], v) for k, v in want.items())


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="built-in configs by name"):
        srpo.train("no-such-config", tmp_path / "x")
    with pytest.raises(UserError, match="config error at train.lr"):
        srpo.train("tiny", tmp_path / "y", train={"lr": -1})
    with pytest.raises(UserError, match="not a run folder"):
        srpo.load_run(tmp_path)
