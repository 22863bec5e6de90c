"""Text encoders out of the way: every prompt encoded once into RUN/text_cache (keyed by the model
and the text), reused on resume without encoding, and the encoders released for the run."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo import memory
from srpo.config import load_config
from srpo.data import load_prompts
from srpo.errors import UserError
from srpo.models.flux import FluxModel
from srpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log.progress=false", "log.tensorboard=false", "rollout.steps=2", "data.eval_steps=2", "guard.every=2",
        "log.checkpoint_every=2", "memory.text_cache_dir=true", "memory.release_text_encoders=true"]


def test_features_on_disk_equal_the_encoders_and_the_run_equals_one_without_the_cache(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", FAST + ["train.max_steps=2"])
    train(cfg, tmp_path / "cached")
    prompts = list(dict.fromkeys(load_prompts(cfg.data.prompts) + load_prompts(cfg.data.eval_prompts)))
    files = sorted((tmp_path / "cached" / "text_cache").glob("*.safetensors"))
    assert len(files) == len(prompts)  # each prompt once
    from srpo.models import load_model

    model = load_model(cfg.model, "cpu")
    model.encode_prompts = cache = memory.TextCache(model)
    assert memory.pre_encode(model, prompts, tmp_path / "cached" / "text_cache", memory.text_cache_key(cfg)) == 0
    assert not cache.store and cache(prompts[:2])["prompt_embeds"].shape[0] == 2  # read from disk, not held
    for p in prompts[:3]:  # the file of a prompt holds the adapter's own encoding of it
        stored = load_file(str(cache._file(p)))
        own = FluxModel.encode_prompts(model, [p])
        assert set(stored) == set(own) and all(torch.equal(stored[k], own[k]) for k in own)
    plain = load_config(ROOT / "configs" / "tiny.yaml", FAST[:-2] + ["train.max_steps=2", "memory.text_cache_dir=false",
                                                                       "memory.release_text_encoders=false"])
    train(plain, tmp_path / "plain")
    a = load_file(str(tmp_path / "cached" / "final" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "final" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # caching and releasing change nothing


def test_resume_encodes_nothing(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", FAST + ["train.max_steps=2"])
    train(cfg, tmp_path / "run")
    more = load_config(ROOT / "configs" / "tiny.yaml", FAST + ["train.max_steps=4"])

    def no_encoding(self, prompts):
        raise AssertionError("a resumed run encoded a prompt")

    monkeypatch.setattr(FluxModel, "encode_prompts", no_encoding)
    summary = train(more, tmp_path / "run", resume=True)
    assert summary["steps"] == 4


def test_released_encoders_refuse_a_new_prompt():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["memory.release_text_encoders=true"])
    from srpo.models import load_model

    model = load_model(cfg.model, "cpu")
    memory.prepare(model, cfg)
    assert memory.pre_encode(model, ["a red cube", "a blue ball"], release=True) == 2
    assert model.text_encoders() == [] and model.text_encoder is None
    assert len(model.encode_prompts.store) == 2  # no disk folder: the features stay in memory
    assert model.encode_prompts(["a blue ball"])["prompt_embeds"].shape[0] == 1
    with pytest.raises(UserError, match="not encoded before the text encoders were released"):
        model.encode_prompts(["a green star"])
