"""Config: typed, validated, overridable, documented in one place."""

from pathlib import Path

import pytest
import yaml

from srpo.config import Config, config_docs, load_config
from srpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_reference_hyperparameters():
    cfg = load_config({"data": {"prompts": ["a cat"]}})
    t, m, s, r = cfg.train, cfg.method, cfg.srp, cfg.rollout
    assert (t.lr, t.betas, t.eps, t.weight_decay, t.grad_clip, t.guidance) == (5e-6, (0.9, 0.999), 1e-8, 1e-4, 0.1, 3.5)
    assert (m.index_range, m.cells, m.max_step_cells, m.hinge_threshold) == ((5, 25), 1000, 100, 0.7)
    assert cfg.model.shift is None and cfg.model.quantize_timesteps is None  # the family's rule
    assert (cfg.train.cfg_gradient, cfg.train.reward_autocast) == ("both", "auto")
    assert (s.k_pos, s.k_inv) == ((0.10, 0.25), (0.30, 0.01))
    assert s.pos_words == ["Natural-lighting", "Detail", "Detailed", "Real"]
    assert s.neg_words == ["Concept art", "Painting", "Anime", "Flat", "Oil"]
    assert (r.steps, r.guidance, r.height) == (25, 1.0, 720)
    assert m.denoise_branch and m.inversion_branch and t.max_steps == 20


def test_overrides_are_typed_and_paths_resolve_against_the_config(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["train.max_steps=3", "srp.pos_words=[Real, photo]", "method.inversion_branch=false"])
    assert cfg.train.max_steps == 3 and cfg.srp.pos_words == ["Real", "photo"]
    assert cfg.method.inversion_branch is False
    assert Path(cfg.data.prompts).is_file() and Path(cfg.data.prompts).is_absolute()


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.lr=0", "train.lr"),
    ("method.loss=cube", "method.loss"),
    ("srp.template=no-placeholders", "srp.template"),
    ("method.index_range=[10,60]", "index_range"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def _all_fields(section, prefix=""):
    """(dotted key, field) of every field, nested sections included."""
    from srpo.config import _section_type

    for key, f in section.model_fields.items():
        yield f"{prefix}{key}", f
        sub = _section_type(f.annotation)
        if sub is not None:
            yield from _all_fields(sub, f"{prefix}{key}.")


def test_every_field_is_documented_and_docs_are_current():
    docs = (ROOT / "docs" / "config.md").read_text()
    keys = list(_all_fields(Config))
    assert len(keys) > 100 and "data.offline.images" in dict(keys) and "reward.options" in dict(keys)
    for key, f in keys:
        assert f.description, key
        assert f"| `{key}` |" in docs or f"## `{key}`" in docs, f"{key} missing from docs/config.md"
    assert docs.strip() == config_docs().strip(), "regenerate with: python -m srpo.config > docs/config.md"


def test_moved_and_unknown_keys_get_one_line_errors():
    with pytest.raises(UserError, match="method.shift moved to model.shift"):
        load_config(ROOT / "configs" / "tiny.yaml", ["method.shift=3"])
    with pytest.raises(UserError, match=r"data.offline.imagez: unknown key"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.offline={images: x, imagez: y}"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate_round_trip_and_plan(name):
    from srpo.config import dump_config
    from srpo.plan import estimate_for, model_sizes

    cfg = load_config(ROOT / "configs" / name)
    again = load_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    sizes = model_sizes(cfg)  # srpo plan accepts it: the family counts its parts at the config's size
    assert sizes.transformer > 0 and sizes.image_tokens > 0 and estimate_for(cfg, sizes, 1)["total"] > 0
    if cfg.model.name.startswith("tiny"):  # the meta-device count equals the model the trainer builds
        from srpo.models import load_model

        model = load_model(cfg.model, "cpu")
        assert sizes.transformer == sum(p.numel() for p in model.transformer.parameters())
        assert sizes.text_encoders == sum(p.numel() for e in model.text_encoders() for p in e.parameters())
        assert sizes.vae == sum(p.numel() for p in model.vae.parameters())
