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
NAMED = ["flux", "sd3", "qwen_image", "flux2", "flux2_klein", "z_image", "wan"]


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
    assert sorted(FAMILIES) == sorted(NAMED)
    assert all(n in init_cmd.REWARDS_INFO or hasattr(REWARDS.get(n), "starter") for n in REWARDS.names())
    assert init_cmd.families() == sorted(FAMILIES)  # the tiny twins are not offered
    for name in FAMILIES:  # what srpo init says of a family is the class's
        cls = MODELS.get(name)
        book = init_cmd.load_recipe(init_cmd.family_recipe_path(cls))
        assert book.files[0].name == f"{name}.yaml", name  # its own recipe file
        assert cls.title and cls.pipeline_class and set(book.flagship) == {"folder", "source"}, name
        assert "transformer" in cls.components and "vae" in cls.components, name
    family_help = next(a.help for a in _init_parser()._actions if a.dest == "family")
    assert "dotted path" in family_help and "registered" in family_help


def test_init_module_names_no_family():
    """Adding a family needs no edit to srpo/commands/init.py: nothing in it names one."""
    import inspect
    import re

    source = inspect.getsource(init_cmd)
    words = set()
    for name in FAMILIES:
        cls = MODELS.get(name)
        flagship = init_cmd.load_recipe(init_cmd.family_recipe_path(cls)).flagship["folder"]
        words |= {name, cls.title, flagship, cls.pipeline_class, cls.__name__}
    words |= {"FLUX", "Qwen", "SD3", "Z-Image"}
    for word in sorted(words):
        assert not re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", source, re.IGNORECASE), word


def _init_parser():
    from srpo.cli import build_parser

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if getattr(a, "choices", None) and "init" in a.choices)
    return sub.choices["init"]


# ---- every family x (LoRA, full): srpo plan and load_config take the file as written

REWARD_OF = dict(zip(NAMED, ["hps", "pickscore", "pickscore", "clip", "aesthetic", "tiny_clip", "hps"]))


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
            info = init_cmd.reward_info(reward)
            if reward == "pickscore":
                assert cfg.reward.options["processor_path"].startswith("/path/to/")
            if reward == "aesthetic":
                assert cfg.reward.options["clip_path"].startswith("/path/to/")
                assert cfg.srp.enabled is False  # image-only
            if reward.startswith("tiny_"):  # built in code
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
        if family == "flux":  # its recipe: the reference's embedded guidance, 1 with HPSv2.1, 2 with PickScore
            assert cfg.rollout.guidance == (2.0 if reward == "pickscore" else 1.0)
            assert cfg.train.guidance == 3.5
        elif cls.guidance_mode == "embedded":
            assert cfg.rollout.guidance == 1.0 and cfg.train.guidance == 3.5
        elif cls.guidance_mode == "cfg":
            assert cfg.rollout.guidance == cls.default_guidance and cfg.train.guidance == 1.0
        else:  # distilled (Z-Image-Turbo): guidance is ignored
            assert cfg.rollout.guidance == cfg.train.guidance == cls.default_guidance
        assert cfg.data.eval_guidance == cls.default_guidance
    modes = {f: MODELS.get(f).guidance_mode for f in NAMED if f != "flux"}
    assert modes == {"flux2": "embedded", "sd3": "cfg", "qwen_image": "cfg", "flux2_klein": "cfg", "z_image": "none", "wan": "cfg"}


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

@pytest.mark.parametrize("bad", ["nope", "tiny_flux", "os.path.join", "no_such_module_xyz.Family"])
def test_what_is_no_family_is_refused_with_the_families_listed(tmp_path, capsys, bad):
    """An unknown name, a tiny twin, a dotted path to no FlowModel or to no module."""
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


# ---- the recipe files: one per family, data only

def _recipe_keys(recipe):
    """(section, key) of every line that writes a value, over all cases."""
    for sec in recipe.sections:
        for key, cases in sec.lines:
            if any("value" in c or "from" in c for c in cases):
                yield sec.name, key


def test_every_family_recipe_exists_and_names_real_config_keys():
    from srpo.config import Config

    for name in FAMILIES:
        cls = MODELS.get(name)
        path = init_cmd.family_recipe_path(cls)  # srpo/configs/recipes/<family>.yaml
        assert path == init_cmd.RECIPES / f"{name}.yaml"
        recipe = init_cmd.load_recipe(path)
        assert recipe.files[0] == path.resolve() and recipe.files[-1].name == "default.yaml"
        assert recipe.legend  # the provenance words, explained in the header
        fields = Config.model_fields
        for section, key in _recipe_keys(recipe):
            head = key.split(".")[0]
            if section == init_cmd.TOP:
                assert head in fields, key
            else:
                assert head in fields[section].annotation.model_fields, f"{section}.{key}"
    assert set(init_cmd.recipe_names()) == set(FAMILIES) | {"default"}


def test_a_family_without_a_recipe_gets_the_generic_one():
    class Plain:
        recipe = ""

    assert init_cmd.family_recipe_path(Plain) == init_cmd.RECIPES / "default.yaml"


def test_recipe_values_follow_the_code_defaults(tmp_path):
    """from: config / default_guidance keep the starter in step with srpo.config and the class."""
    from srpo.config import MethodConfig, RolloutConfig, SRPConfig, TrainConfig

    _, out = _init(tmp_path, "flux2", "clip", "--full")
    cfg = load_config(out)
    cls = MODELS.get("flux2")
    assert cfg.rollout.steps == RolloutConfig().steps and cfg.data.eval_steps == cfg.rollout.steps
    assert cfg.method.index_range == MethodConfig().index_range
    assert tuple(cfg.srp.k_pos) == SRPConfig().k_pos and cfg.train.lr == TrainConfig().lr
    assert cfg.data.eval_guidance == cls.default_guidance


# ---- a family given as a dotted path: the class's attributes and its (inherited) recipe

def _family_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return name


SUBCLASS = """
from srpo.models import MODELS

class MyFamily(MODELS.get("sd3")):
    title = "My SD3 fine-tune"
{extra}
"""


def test_dotted_path_family_uses_the_class_and_its_inherited_recipe(tmp_path, monkeypatch, capsys):
    mod = _family_module(tmp_path, monkeypatch, "srpo_init_fam_a", SUBCLASS.format(extra=""))
    dotted = f"{mod}.MyFamily"
    rc, out = _init(tmp_path, dotted, "tiny_clip", "--lora", name="x.yaml")
    assert rc == 0, capsys.readouterr().err
    cfg = load_config(out)
    assert cfg.model.name == dotted and cfg.model.path == "/path/to/stable-diffusion-3.5-large"  # sd3.yaml's
    text = out.read_text()
    assert f"srpo init {dotted} --reward tiny_clip" in text and "My SD3 fine-tune" in text
    # the rest is the sd3 recipe: the same tree as srpo init sd3
    _, ref = _init(tmp_path, "sd3", "tiny_clip", "--lora")
    ours, theirs = yaml.safe_load(text), yaml.safe_load(ref.read_text())
    ours["model"].pop("name"), theirs["model"].pop("name")
    ours["model"].pop("path"), theirs["model"].pop("path")
    assert ours == theirs
    assert cfg.data.eval_steps == 28 and cfg.method.index_range == (10, 25)  # sd3.yaml's
    assert main(["plan", str(out), "--set", "model.path=null"]) == 0  # srpo plan reads the dotted family
    assert "GiB" in capsys.readouterr().out


def test_dotted_path_family_with_its_own_recipe_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_recipe.yaml").write_text(
        "extends: sd3\n"
        "flagship: {folder: my-sd3-folder}\n"
        "sections:\n"
        "  rollout:\n"
        "    lines:\n"
        "      steps: {value: 30, ref: \"the trainer's --sampling_steps 30\"}\n"
        "  train:\n"
        "    lines:\n"
        "      lr:\n"
        "        cases:\n"
        "          - {when: {lora: false, reward: pickscore}, value: 2.0e-6, ours: a guess}\n")
    mod = _family_module(tmp_path, monkeypatch, "srpo_init_fam_b",
                         SUBCLASS.format(extra='    recipe = "my_recipe.yaml"  # next to this module\n'))
    from srpo.config import TrainConfig

    for mode, reward, lr in (("--full", "pickscore", 2.0e-6), ("--full", "hps", TrainConfig().lr),
                             ("--lora", "pickscore", 1.0e-4)):
        rc, out = _init(tmp_path, f"{mod}.MyFamily", reward, mode)
        assert rc == 0, capsys.readouterr().err
        cfg = load_config(out)
        assert cfg.rollout.steps == 30 and cfg.data.eval_steps == 28  # sd3.yaml's eval_steps stays
        assert cfg.train.lr == lr  # our case first, then sd3.yaml's and default.yaml's
        assert cfg.model.path == "/path/to/my-sd3-folder"  # our flagship folder, sd3.yaml's source
    text = out.read_text()
    assert "steps: 30" in text and "# reference (the trainer's --sampling_steps 30)" in text
    assert "e.g. stabilityai/stable-diffusion-3.5-large" in text


@pytest.mark.parametrize("recipe,words", [
    ("sections:\n  train:\n    lines:\n      learning_rate: {value: 1.0}\n", ["learning_rate", "not a config key"]),
    ("sections:\n  training:\n    lines: {}\n", ["training", "not a config section"]),
    ("sections:\n  train:\n    lines:\n      lr: {vlaue: 1.0}\n", ["vlaue", "unknown field"]),
    ("sections:\n  train:\n    lines:\n      lr: {value: 1.0, when: {gpus: 8}}\n", ["gpus", "unknown condition"]),
    ("sections:\n  train:\n    lines:\n      lr: {from: option}\n", ["option"]),
    ("sections:\n  train:\n    lines:\n      lr: {value: 1.0, ref: a, ours: b}\n", ["ref and ours"]),
    ("extends: default\nsections:\n  train:\n    lines:\n      nothing_here: null\n", ["nothing_here"]),
    ("extends: no_such_recipe\n", ["no_such_recipe", "default"]),
    ("sections:\n  train:\n    lines:\n      lr: {value: 1.0, why: '${nope}'}\n", ["${nope}"]),
    ("sections: [\n", ["cannot read recipe"]),
    ("flagship: {name: my-folder}\n", ["flagship", "unknown field 'name'", "folder, source"]),
])
def test_a_bad_recipe_file_is_a_one_line_error(tmp_path, monkeypatch, capsys, recipe, words):
    (tmp_path / "bad.yaml").write_text(recipe)
    mod = _family_module(tmp_path, monkeypatch, "srpo_init_fam_c",
                         SUBCLASS.format(extra='    recipe = "bad.yaml"\n'))
    rc, out = _init(tmp_path, f"{mod}.MyFamily", "hps")
    assert rc == 2 and not out.exists()
    line = _one_line_error(capsys)
    assert "bad.yaml" in line or "no_such_recipe" in line
    for word in words:
        assert word in line, line

