"""Every family end to end through the real CLI on its tiny config (`srpo train <tiny_config>`, full
and LoRA): final/ loads with the family's diffusers transformer and moved, the LoRA file holds
every targeted layer and loads with the family pipeline's own load_lora_weights to reproduce the
merged final/, `srpo sample` renders the run, `srpo plan` sizes the config. A variant without a
tiny config of its own (FLUX.2 [klein]) trains its twin through the tiny config of the family
whose transformer class it shares."""

from dataclasses import dataclass
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors import safe_open

from family_runs import FAST, LORA, check_full_run, check_sample, families, lora_modules, matched_linears, srpo
from srpo.config import load_config
from srpo.models import family, load_model
from srpo.sampling import rollout


def tiny_config(name: str) -> str:
    cls = family(name)
    return cls.tiny_config or next((family(o).tiny_config for o in families()
                                    if family(o).tiny_config and family(o).transformer_class == cls.transformer_class), "")


CASES = [n for n in families() if tiny_config(n)]


@dataclass
class Runs:
    name: str
    config: str  # the built-in config
    sets: list[str]  # --set arguments of both runs
    root: Path  # full/ and lora/


@pytest.fixture(scope="module", params=CASES)
def runs(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    sets = FAST + ["--set", f"model.name={family(name).tiny_twin}"]
    srpo("train", tiny_config(name), "--output", root / "full", *sets)
    srpo("train", tiny_config(name), "--output", root / "lora", *sets, *LORA)
    return Runs(name, tiny_config(name), sets, root)


def test_every_family_runs():
    assert set(CASES) == set(families())  # none left without a tiny config to train on


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    cfg = load_config(runs.config, runs.sets[1::2])
    base = load_model(cfg.model, "cpu")
    check_full_run(runs.root / "full", getattr(diffusers, family(runs.name).transformer_class),
                   base.transformer.state_dict())


def test_lora_file_loads_in_the_pipeline_and_reproduces_the_merged_model(runs):
    run = runs.root / "lora"
    cfg = load_config(runs.config, runs.sets[1::2])
    file = run / "lora" / "pytorch_lora_weights.safetensors"
    base = load_model(cfg.model, "cpu")
    with safe_open(str(file), framework="pt") as f:  # every layer the family targets, and only those
        assert lora_modules(k.removeprefix("transformer.") for k in f.keys()) == \
            matched_linears(base.transformer, base.lora_targets)
    h, w, g = cfg.rollout.height, cfg.rollout.width, cfg.rollout.guidance
    noise = torch.randn(base.latent_shape(2, h, w), generator=torch.Generator().manual_seed(4))
    cond = base.encode_prompts(["a red cube on a table", "a blue ball"])
    before = base.pipeline_images(cond, noise, 4, g)
    base.pipeline().load_lora_weights(str(run / "lora"))  # diffusers' own loader, into the modules it shares
    with_lora = base.pipeline_images(cond, noise, 4, g)
    merged = load_model(cfg.model, "cpu", transformer_path=str(run / "final"))
    merged.quantize_timesteps = False  # the pipeline's unquantised timestep (FLUX trains on the reference's)
    with torch.no_grad():
        ours = merged.decode(rollout(merged, cond, noise, steps=4, guidance=g))
    assert (with_lora - ours).abs().max() < 1e-4
    assert (with_lora - before).abs().max() > 1e-3  # the adapters really change the images


def test_sample_renders_the_run(runs, tmp_path):
    check_sample(runs.root / "full", tmp_path / "s")


def test_plan_sizes_the_config(runs, capsys):
    from srpo.cli import main

    assert main(["plan", runs.config, *runs.sets]) == 0  # the CLI's own entry point, in this process
    out = capsys.readouterr().out
    assert f"model: tiny {family(runs.name).title}: transformer" in out and "fits in" in out
