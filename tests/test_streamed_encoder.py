"""Streamed text encoders (srpo/streaming.py, memory.stream_text_encoders): a folder's text encoder
built on the meta device and read from its safetensors files one repeated layer at a time. On
tiny folders saved to disk (FLUX.2's Mistral3, FLUX.1's CLIP + T5, Z-Image's Qwen3, each with
several layers) the streamed encoder's features equal the whole encoder's bit for bit (the same
weights, the same ops: torch.equal), alone and in a lock-step batch; the weights it holds at any
layer's forward are its resident parts plus that one layer (counted from the parameters
themselves, not from the streamer's bookkeeping); a batch reads each layer once; a missing or
truncated file is one line naming it; and a tiny FLUX.2 run from a folder trains the same
weights with streaming on as off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo import streaming
from srpo.config import load_config
from srpo.errors import UserError
from srpo.models.flux import FluxModel
from srpo.models.flux2 import Flux2Model
from srpo.models.flux2_tiny import save_tiny_flux2
from srpo.models.tiny import TinyFlux
from srpo.models.z_image import ZImageModel
from srpo.models.z_image_tiny import TinyZImageModel

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue ball on green grass at noon", "two cats", "x", "an old lighthouse in fog"]


def _save(kind: str, path: Path):
    if kind == "flux2":
        return Flux2Model, save_tiny_flux2(path, seed=0)
    if kind == "flux":
        return FluxModel, TinyFlux.save_random(path, seed=0, text_layers=3)
    return ZImageModel, TinyZImageModel.save_random(path, seed=0, text_layers=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    return {k: (root / k, *_save(k, root / k)) for k in ("flux2", "flux", "z_image")}


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _watch(encoder) -> dict:
    """At every layer's forward: bytes of the encoder's parameters off the meta device and how
    many layers hold weights (measured on the module, independently of the streamer)."""
    seen = {"peak": 0, "layers": 0}
    units = streaming._units(encoder)

    def look(mod, args, out):
        held = _bytes(p for p in encoder.parameters() if not p.is_meta)
        seen["peak"] = max(seen["peak"], held)
        seen["layers"] = max(seen["layers"], sum(any(not p.is_meta for p in u.parameters()) for u in units))

    for u in units:
        u.register_forward_hook(look)
    return seen


@pytest.mark.parametrize("kind", ["flux2", "flux", "z_image"])
def test_streamed_features_equal_the_whole_encoders_holding_one_layer(folders, kind):
    path, cls, saved = folders[kind]
    options = {"max_sequence_length": saved.max_sequence_length}
    whole = cls.load(path, **options)
    streamed = cls.load(path, stream_text_encoders=True, **options)
    encoders = streamed.text_encoders()
    assert encoders and all(streaming.is_streamed(e) for e in encoders)
    assert all(p.is_meta for e in encoders for p in e.parameters())  # nothing read before the first prompt
    watches = [_watch(e) for e in encoders]
    alone = [streamed.encode_prompts([p]) for p in PROMPTS]
    reads = [e._stream.reads for e in encoders]
    batched = streaming.encode_each(streamed.encode_prompts, PROMPTS)
    for p, a, b in zip(PROMPTS, alone, batched):
        ref = whole.encode_prompts([p])
        assert set(ref) == set(a) == set(b)
        assert all(torch.equal(ref[k], a[k]) and torch.equal(ref[k], b[k]) for k in ref), p
    for enc, ref_enc, seen, before in zip(encoders, whole.text_encoders(), watches, reads):
        units = {id(u) for u in streaming._units(ref_enc)}
        layers = [u for n, u in ref_enc.named_modules() if id(u) in units and "vision" not in n]  # text's
        assert len(layers) >= 3
        layer = max(_bytes(u.parameters()) for u in layers)
        in_layers = {id(p) for u in layers for p in u.parameters()}
        rest = _bytes(p for n, p in ref_enc.named_parameters() if id(p) not in in_layers and "vision" not in n)
        assert seen["layers"] == 1  # never two layers at once
        assert seen["peak"] <= rest + layer < _bytes(ref_enc.parameters())
        assert enc._stream.peak <= rest + layer
        # srpo plan's count of the same (streaming.plan_counts: every part outside the layers + the largest)
        planned = streaming.plan_counts([ref_enc], 8)[0] * next(ref_enc.parameters()).element_size()
        assert seen["peak"] <= planned < _bytes(ref_enc.parameters())
        assert before == len(layers) * len(PROMPTS)  # alone: every layer once per prompt
        assert enc._stream.reads - before == len(layers)  # a batch: every layer once
        assert all(p.is_meta for u in streaming._units(enc) for p in u.parameters())  # freed after the pass


def test_streaming_decision_and_a_bad_setting():
    assert streaming.wanted("auto", True, "/some/folder") and not streaming.wanted("auto", False, "/some/folder")
    assert not streaming.wanted("auto", True, None) and not streaming.wanted(False, True, "/f")
    with pytest.raises(UserError, match="model.path is not set"):
        streaming.wanted(True, True, None)


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_truncated_or_missing_file_is_one_line_naming_it(folders, tmp_path):
    import shutil

    path, cls, saved = folders["flux2"]
    bad = tmp_path / "truncated"
    shutil.copytree(path, bad)
    f = bad / "text_encoder" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError) as e:
        cls.load(bad, stream_text_encoders=True, max_sequence_length=saved.max_sequence_length)
    assert str(f) in _one_line(e) and "truncated" in str(e.value)

    sharded = tmp_path / "sharded"  # a text encoder in two shards with an index, one shard deleted
    shutil.copytree(path, sharded)
    enc_dir = sharded / "text_encoder"
    saved.text_encoder.save_pretrained(str(enc_dir), max_shard_size="20KB")
    index = json.loads((enc_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    (enc_dir / shards[-1]).unlink()
    with pytest.raises(UserError) as e:
        cls.load(sharded, stream_text_encoders=True, max_sequence_length=saved.max_sequence_length)
    assert str(enc_dir / shards[-1]) in _one_line(e)

    late = tmp_path / "late"  # a file that breaks after the load: one line when a layer is read
    shutil.copytree(path, late)
    model = cls.load(late, stream_text_encoders=True, max_sequence_length=saved.max_sequence_length)
    f = late / "text_encoder" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError) as e:
        model.encode_prompts(["a red cube"])
    assert str(f) in _one_line(e)


def test_a_flux2_run_from_a_folder_trains_the_same_weights_streamed(folders, tmp_path, capsys):
    from srpo.trainer import train

    path, _, saved = folders["flux2"]
    base = ["model.name=flux2", f"model.path={path}",
            f"model.options={{max_sequence_length: {saved.max_sequence_length}}}", "train.max_steps=2",
            "log.progress=false", "log.tensorboard=false", "log.sample_every=0", "log.checkpoint_every=0",
            "rollout.steps=2", "data.eval_steps=2", "guard.enabled=false", "memory.text_encode_batch=3"]
    runs = {}
    for on in ("true", "false"):
        cfg = load_config(ROOT / "configs" / "tiny-flux2.yaml", base + [f"memory.stream_text_encoders={on}"])
        train(cfg, tmp_path / on)
        said = capsys.readouterr().out
        assert ("streamed text encoders: Mistral3ForConditionalGeneration" in said) == (on == "true")
        runs[on] = load_file(str(next((tmp_path / on / "final").rglob("*.safetensors"))))
    a, b = runs["true"], runs["false"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class _Overlap:
    """A tokenizer that counts how many threads are inside it at once (it lingers, giving the
    others their chance); everything else is the tokenizer's own."""

    def __init__(self, tokenizer):
        import threading

        self.tokenizer, self.lock, self.inside, self.most = tokenizer, threading.Lock(), 0, 0

    def __call__(self, *args, **kwargs):
        import time

        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            time.sleep(0.02)
            return self.tokenizer(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_batch_never_tokenizes_in_two_threads_at_once(folders):
    """A fast tokenizer is not thread-safe (its truncation set-up raises "Already borrowed" when
    two threads overlap): the lock-step batch runs one thread at a time, and still reads each
    layer once and gives each prompt its features alone."""
    path, cls, saved = folders["flux"]
    streamed = cls.load(path, stream_text_encoders=True, max_sequence_length=saved.max_sequence_length)
    alone = {p: streamed.encode_prompts([p]) for p in PROMPTS}
    streamed.tokenizer, streamed.tokenizer_2 = _Overlap(streamed.tokenizer), _Overlap(streamed.tokenizer_2)
    reads = [e._stream.reads for e in streamed.text_encoders()]
    batched = streaming.encode_each(streamed.encode_prompts, PROMPTS)
    assert streamed.tokenizer.most == streamed.tokenizer_2.most == 1
    assert [e._stream.reads - r for e, r in zip(streamed.text_encoders(), reads)] == [
        len(streaming._units(e)) for e in streamed.text_encoders()]
    for p, b in zip(PROMPTS, batched):
        assert all(torch.equal(alone[p][k], b[k]) for k in alone[p]), p
