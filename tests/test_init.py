"""srpo init: a commented starter config for every family and reward that srpo plan and
load_config accept as written, with the reference recipes where they exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import srpo
from srpo.cli import main
from srpo.commands import init as init_cmd
from srpo.config import load_config
from srpo.models import MODELS
from srpo.rewards import REWARDS

FAMILIES = [n for n in MODELS.names() if not n.startswith("tiny")]
NAMED = ["flux", "sd3", "qwen_image", "flux2", "flux2_klein", "z_image"]


def _configs_dir() -> Path:
    for d in (Path(__file__).resolve().parents[1] / "configs", Path(srpo.__file__).parent / "configs"):
        if (d / "flux-hps.yaml").is_file():
            return d
    pytest.skip("the example configs are not in this checkout")


def _init(tmp_path, family, reward="hps", mode="--lora", name=None, extra=()):
    out = tmp_path / (name or f"{family}-{reward}{mode}.yaml")
    rc = main(["init", family, "--reward", reward, "--output", str(out), mode, *extra])
    return rc, out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srpo: error: "), err
    return lines[0]


def test_every_family_and_reward_is_covered():
    assert sorted(FAMILIES) == sorted(NAMED)  # a new family: add it to srpo/commands/init.py's table
    assert set(FAMILIES) <= set(init_cmd.FAMILIES)
    assert set(REWARDS.names()) <= set(init_cmd.REWARDS_INFO)
    help_text = init_cmd.__doc__ + " ".join(a.help or "" for a in _init_parser()._actions)
    for name in FAMILIES + REWARDS.names():
        assert name in help_text


def _init_parser():
    from srpo.cli import build_parser

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if getattr(a, "choices", None) and "init" in a.choices)
    return sub.choices["init"]


# ---- every family x (LoRA, full): srpo plan and load_config take the file as written

REWARD_OF = dict(zip(NAMED, ["hps", "pickscore", "pickscore", "clip", "aesthetic", "tiny_clip"]))


@pytest.mark.parametrize("mode", ["--lora", "--full"])
@pytest.mark.parametrize("family", NAMED)
def test_init_writes_a_config_plan_and_load_config_accept(tmp_path, capsys, family, mode):
    reward = REWARD_OF[family]
    rc, out = _init(tmp_path, family, reward, mode)
    assert rc == 0 and out.is_file()
    assert str(out) in capsys.readouterr().out
    text = out.read_text()
    cfg = load_config(out)  # validates as written
    assert cfg.model.name == family and cfg.reward.name == reward
    assert cfg.lora.enabled is (mode == "--lora")
    assert cfg.parallel.strategy == ("none" if mode == "--lora" else "fsdp")
    assert cfg.model.dtype == "bfloat16" and cfg.train.autocast == "bf16"
    assert cfg.model.path.startswith("/path/to/")
    assert str(cfg.data.prompts).startswith("/path/to/") and str(cfg.data.eval_prompts).startswith("/path/to/")
    # commented: a header, one comment per section, and a comment on (nearly) every value line
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 15
    tree = yaml.safe_load(text)
    for section in tree:
        if isinstance(tree[section], dict):
            assert f"# {section}: " in text
    values = [line for line in text.splitlines() if line.startswith("  ") and not line.lstrip().startswith("#")]
    assert all(" # " in line for line in values), [line for line in values if " # " not in line]
    assert "srpo's starting value" in text or "reference" in text
    assert "# EDIT" in text  # the placeholders are marked

    # srpo plan: the model folder itself is not needed (meta-device modules at the family's dims)
    assert main(["plan", str(out), "--set", "model.path=null"]) == 0
    assert "GiB" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["--lora", "--full"])
@pytest.mark.parametrize("family", NAMED)  # the placeholder path is not a folder yet: the flagship is planned
def test_plan_reads_the_starter_as_written(tmp_path, capsys, family, mode):
    rc, out = _init(tmp_path, family, REWARD_OF[family], mode)
    assert rc == 0
    rc = main(["plan", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "GiB" in captured.out


@pytest.mark.parametrize("family", NAMED)
def test_every_reward_on_every_family_validates(tmp_path, capsys, family):
    for reward in REWARDS.names():
        for mode in ("--lora", "--full"):
            rc, out = _init(tmp_path, family, reward, mode)
            assert rc == 0, capsys.readouterr().err
            cfg = load_config(out)
            assert cfg.reward.name == reward
            info = init_cmd.REWARDS_INFO[reward]
            if reward == "pickscore":
                assert cfg.reward.options["processor_path"].startswith("/path/to/")
            if reward == "aesthetic":
                assert cfg.reward.options["clip_path"].startswith("/path/to/")
                assert cfg.srp.enabled is False  # image-only
            if reward == "tiny_clip":
                assert cfg.reward.path is None
            else:
                assert cfg.reward.path == info.path and info.path.startswith("/path/to/")


def test_image_only_table_agrees_with_the_reward_classes():
    from srpo.rewards.aesthetic import AestheticReward

    assert init_cmd.REWARDS_INFO["aesthetic"].text_conditioned is AestheticReward.text_conditioned is False


# ---- guidance, from the family classes

@pytest.mark.parametrize("family", NAMED)
def test_guidance_follows_the_family(tmp_path, family):
    cls = MODELS.get(family)
    for reward in ("hps", "pickscore"):
        _, out = _init(tmp_path, family, reward)
        cfg = load_config(out)
        kind = init_cmd.FAMILIES[family].guidance
        if kind == "embedded":
            assert cfg.rollout.guidance == (2.0 if family == "flux" and reward == "pickscore" else 1.0)
            assert cfg.train.guidance == 3.5
        elif kind == "cfg":
            assert cls.guidance_mode == "cfg"
            assert cfg.rollout.guidance == cls.default_guidance and cfg.train.guidance == 1.0
        else:  # distilled (Z-Image-Turbo): guidance is ignored
            assert cfg.rollout.guidance == cfg.train.guidance == cls.default_guidance
        assert cfg.data.eval_guidance == cls.default_guidance
    kinds = {f: init_cmd.FAMILIES[f].guidance for f in NAMED}
    assert kinds == {"flux": "embedded", "flux2": "embedded", "sd3": "cfg", "qwen_image": "cfg",
                     "flux2_klein": "cfg", "z_image": "distilled"}


# ---- the reference recipes: the starter equals the example config where one exists

SAME = ("srp", "method", "rollout", "train", "lora", "parallel", "memory", "guard", "log", "algorithm")


@pytest.mark.parametrize("family,reward,mode,example", [
    ("flux", "hps", "--full", "flux-hps.yaml"),
    ("flux", "hps", "--lora", "flux-hps-lora.yaml"),
    ("flux", "pickscore", "--full", "flux-pickscore.yaml"),
    ("qwen_image", "pickscore", "--full", "qwen-image-pickscore.yaml"),
    ("sd3", "hps", "--lora", "sd35-hps-lora.yaml"),
])
def test_reference_recipes_match_the_example_configs(tmp_path, family, reward, mode, example):
    _, out = _init(tmp_path, family, reward, mode)
    ours = load_config(out).model_dump(mode="json")
    ref = load_config(_configs_dir() / example).model_dump(mode="json")
    for key in SAME:
        assert ours[key] == ref[key], key
    for key in ("name", "dtype", "shift", "quantize_timesteps"):
        assert ours["model"][key] == ref["model"][key], key
    cls = MODELS.get(family)
    for key, value in ours["model"]["options"].items():  # written out: the family's load() defaults
        assert ref["model"]["options"].get(key, init_cmd._option_default(cls, key)) == value, key
    assert ours["reward"]["name"] == ref["reward"]["name"]
    assert set(ours["reward"]["options"]) == set(ref["reward"]["options"])  # the paths are placeholders
    for key in ("eval_steps", "eval_guidance"):
        assert ours["data"][key] == ref["data"][key], key
    text = out.read_text()
    assert "# reference" in text or "reference (" in text


# ---- errors: one line, exit 2, nothing written

def test_unknown_family_lists_the_families(tmp_path, capsys):
    for bad in ("nope", "tiny_flux"):
        rc, out = _init(tmp_path, bad)
        assert rc == 2 and not out.exists()
        line = _one_line_error(capsys)
        assert f"'{bad}'" in line and all(f in line for f in NAMED)


def test_unknown_reward_lists_the_rewards(tmp_path, capsys):
    rc, out = _init(tmp_path, "flux", "nope")
    assert rc == 2 and not out.exists()
    line = _one_line_error(capsys)
    assert "'nope'" in line and all(r in line for r in REWARDS.names())


def test_existing_output_is_kept_unless_force(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    out.write_text("my: config\n")
    rc, _ = _init(tmp_path, "flux", name="mine.yaml")
    assert rc == 2 and out.read_text() == "my: config\n"
    assert "--force" in _one_line_error(capsys)
    rc, _ = _init(tmp_path, "flux", name="mine.yaml", extra=["--force"])
    assert rc == 0 and load_config(out).model.name == "flux"


def test_output_folder_is_refused(tmp_path, capsys):
    rc = main(["init", "flux", "--reward", "hps", "--output", str(tmp_path), "--force"])
    assert rc == 2
    assert "folder" in _one_line_error(capsys)


def test_lora_and_full_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["init", "flux", "--reward", "hps", "--output", str(tmp_path / "x.yaml"), "--lora", "--full"])
    assert e.value.code == 2 and not (tmp_path / "x.yaml").exists()


def test_train_names_the_model_path_placeholder(tmp_path, capsys):
    """The starter trains once the paths exist: with prompts given, srpo train stops at the
    model folder placeholder, in one line."""
    _, out = _init(tmp_path, "flux", "hps", "--lora")
    rc = main(["train", str(out), "--output", str(tmp_path / "run"),
               "--set", "data.prompts=[a photo of a cat]", "--set", "data.eval_prompts=null"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "/path/to/FLUX.1-dev" in line
    assert not (tmp_path / "run" / "config.yaml").exists()
