"""What the families' tests share: the families the registry holds, the real CLI in a subprocess
and its short run settings, the checks every family's run and `srpo sample` must pass, and the
checks of the FlowModel contract that a family file reuses on one of its variants."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from srpo.errors import UserError
from srpo.models import MODELS, family
from srpo.models.base import split_cond

# the reward-hacking guard is tested on its own (tests/test_guard.py); a random tiny model's image
# statistics have almost no spread across prompts, so its drift rule would stop a 3-update run
FAST = ["--set", "train.max_steps=3", "--set", "log.progress=false", "--set", "log.sample_every=0",
        "--set", "log.checkpoint_every=0", "--set", "rollout.steps=4", "--set", "data.eval_steps=4",
        "--set", "guard.enabled=false"]
LORA = ["--set", "lora.enabled=true", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "lora.init=gaussian",
        "--set", "train.lr=0.05"]


def set_args(items) -> list[str]:
    """``--set`` before each ``KEY=VALUE``."""
    return [a for item in items for a in ("--set", item)]


def launcher_env(**extra) -> dict:
    """The environment of a torchrun launch from a test: one thread a process, offline, this
    checkout first on the path, and none of a parent launcher's rank variables."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), HF_HUB_OFFLINE="1", **extra)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return env


def families() -> list[str]:
    """Every registered family of real folders that has a tiny twin (its variants included)."""
    return sorted(n for n in MODELS.names() if not family(n).is_twin() and family(n).tiny_twin)


def srpo(*args, **env):
    """``python -m srpo ARGS`` offline, one thread; asserts exit code 0 (stderr's tail otherwise)."""
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", **env}
    res = subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def matched_linears(transformer: nn.Module, targets) -> set[str]:
    """The Linear layers of ``transformer`` that LoRA ``targets`` name (a name or a dotted suffix,
    as peft matches them)."""
    return {n for n, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}


def lora_modules(keys) -> set[str]:
    """The adapted modules named by LoRA state keys (``X.lora_A.weight``, ``X.lora_B.default_0.weight``)."""
    return {k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}


def check_full_run(run, transformer_class, base_state: dict, steps: int = 3) -> None:
    """final/ loads with the family's diffusers transformer, moved from the base, ``steps`` logged
    updates without a skip, before / after evaluations in summary.json."""
    final = transformer_class.from_pretrained(str(run / "final"), local_files_only=True)
    trained = final.state_dict()
    assert set(trained) == set(base_state)
    assert max((trained[k] - base_state[k]).abs().max().item() for k in base_state) > 1e-4  # it trained
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and all(r["skipped"] == 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert "eval_before" in summary and "eval_after" in summary


def check_sample(run, out, size=(32, 32), **env) -> None:
    """`srpo sample` renders the run's final weights at the run's size."""
    from PIL import Image

    srpo("sample", "--model", run, "--prompt", "a lighthouse at dusk", "--steps", "3", "--output", out, **env)
    images = sorted(out.glob("0000-*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == size


def check_cfg_gradient(model, noise, cond, mode: str, guidance: float = 4.0) -> None:
    """train.cfg_gradient under true CFG: the gradient of the guided velocity flows through both
    passes (that of ``g v_c - (g - 1) v_u``, exactly), or through the conditional pass alone (the
    unconditional pass a constant); ``both`` is not the conditional pass's gradient."""
    sigma = torch.tensor([0.3, 0.8])
    pos, neg = split_cond(cond)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    w = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))
    g = guidance

    def grads(fn):
        model.transformer.zero_grad(set_to_none=True)
        (fn() * w).sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    model.set_precision("none", mode)
    try:
        got = grads(lambda: model.velocity(noise, sigma, cond, g))
    finally:
        model.set_precision("none", "both")
    if mode == "both":
        want = grads(lambda: model.combine_cfg(model.predict(noise, sigma, pos, None),
                                               model.predict(noise, sigma, neg, None), g))
    else:
        with torch.no_grad():
            v_u = model.predict(noise, sigma, neg, None)
        want = grads(lambda: model.combine_cfg(model.predict(noise, sigma, pos, None), v_u, g))
    other = grads(lambda: g * model.predict(noise, sigma, pos, None))  # what neither mode is
    model.transformer.zero_grad(set_to_none=True)
    scale = max(x.abs().max().item() for x in want)
    assert scale > 0 and max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-5 * scale
    if mode == "both":
        assert max((a - b).abs().max().item() for a, b in zip(got, other)) > 1e-2 * scale


def saved_twin(root, save, **options):
    """``save(root / "folder", seed=0, **options)``: a twin written as a pipeline folder, (folder, model)."""
    path = root / "folder"
    return path, save(path, seed=0, **options)


def noise_and_cond(model, prompts, height: int, width: int):
    """Seeded noise for a batch of ``prompts`` and the model's encoding of them."""
    noise = torch.randn(model.latent_shape(len(prompts), height, width), generator=torch.Generator().manual_seed(1))
    return noise, model.encode_prompts(prompts)


def check_one_line_errors(cases) -> None:
    """Each ``(call, message)``: ``call()`` raises a one-line UserError containing ``message``."""
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def twin_fixture(save, **options):
    """The module fixture ``saved``: ``(folder, model)`` of ``save``'s twin at seed 0 written as a pipeline folder."""
    return pytest.fixture(scope="module", name="saved")(
        lambda tmp_path_factory: saved_twin(tmp_path_factory.mktemp("twin"), save, **options))


def inputs_fixture(prompts, height: int, width: int):
    """The module fixture ``inputs``: :func:`noise_and_cond` of the ``saved`` fixture's model."""
    return pytest.fixture(scope="module", name="inputs")(lambda saved: noise_and_cond(saved[1], prompts, height, width))
