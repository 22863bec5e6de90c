"""Wan2.2-T2V-A14B's two experts (srpo/models/wan_experts.py) on the tiny twin ``tiny_wan_a14b``:
rollout + decode against WanPipeline with both experts, a boundary that switches mid-trajectory and
guidance_scale_2; the expert each level's gradient reaches; train_experts; LoRA of both experts
read by WanPipeline.load_lora_weights; final/ with both experts through the CLI; plan counts."""

import json

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from family_runs import FAST, LORA, check_one_line_errors, srpo
from srpo import lora
from srpo.config import load_config
from srpo.export import run_weights
from srpo.models import family_of_folder
from srpo.models.wan import WanModel
from srpo.models.wan_experts import WanExperts
from srpo.models.wan_tiny import TinyWanA14BModel
from srpo.plan import model_sizes
from srpo.sampling import rollout

PROMPTS = ["a red cube on a table", "a small blue ball in the grass near a lake at dusk"]
H, W, FRAMES, STEPS, CFG, CFG_2 = 32, 48, 9, 4, 5.0, 3.0
BOUNDARY = 0.7  # at 4 steps, shift 3: levels 1 and 0.858 on transformer, 0.602 and 0.009 on transformer_2
NEGATIVE = "blurry, static"


def build(**options):
    model = TinyWanA14BModel.load(seed=0, boundary_ratio=BOUNDARY, negative_prompt=NEGATIVE, **options)
    model.set_frames(FRAMES)
    return model


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    model = build(guidance_scale_2=CFG_2)
    noise = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("a14b") / "folder"
    model.save_pipeline(folder)
    return model, noise, model.encode_prompts(PROMPTS), folder


def calls(model):
    """Forward calls of each expert during the block (forward hooks on the real modules)."""
    seen = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(model.transformer, n).register_forward_hook(lambda *a, n=n: seen.__setitem__(n, seen[n] + 1))
             for n in seen]
    return seen, hooks


def test_rollout_equals_wan_pipeline_with_both_experts_and_the_switch(a14b):
    """WanPipeline from the saved folder (both experts, boundary_ratio in model_index.json) encodes
    its own prompts; CFG 5 on the high-noise expert, guidance_scale_2 = 3 on the low-noise one."""
    model, noise, cond, folder = a14b
    assert model.schedule(STEPS, H, W)[:STEPS].tolist() == pytest.approx([1.0, 0.8577, 0.6022, 0.0089], abs=1e-4)
    seen, hooks = calls(model)
    with torch.no_grad():
        x0 = rollout(model, cond, noise, STEPS, CFG)
        ours = model.decode(x0)
    [h.remove() for h in hooks]
    assert seen == {"transformer": 4, "transformer_2": 4}  # two steps each, two CFG passes a step
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.scheduler = model.pipeline_scheduler()  # the Euler scheduler srpo's rollout integrates
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.boundary_ratio == BOUNDARY and isinstance(pipe.transformer_2, WanTransformer3DModel)
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                  num_inference_steps=STEPS, guidance_scale=CFG, guidance_scale_2=CFG_2,
                  max_sequence_length=model.max_sequence_length)
    latents = pipe(latents=noise.clone(), output_type="latent", **kwargs).frames
    videos = pipe(latents=noise.clone(), output_type="pt", **kwargs).frames
    assert ours.shape == videos.shape == (2, FRAMES, 3, H, W)
    assert (x0 - latents).abs().max() < 1e-4 and (ours - videos).abs().max() < 1e-4
    assert (model.pipeline_images(cond, noise, STEPS, CFG) - videos).abs().max() < 1e-4
    # the switch and the second scale act: one expert alone, or one scale, gives other videos
    one = WanPipeline.from_pretrained(str(folder), boundary_ratio=None)
    one.scheduler, _ = model.pipeline_scheduler(), one.set_progress_bar_config(disable=True)
    assert (one(latents=noise.clone(), output_type="pt", **{**kwargs, "guidance_scale_2": None}).frames
            - videos).abs().max() > 1e-3
    assert (pipe(latents=noise.clone(), output_type="pt", **{**kwargs, "guidance_scale_2": CFG}).frames
            - videos).abs().max() > 1e-3


def test_the_folder_loads_as_wan_with_both_experts(a14b):
    model, noise, cond, folder = a14b
    assert family_of_folder(folder) == "wan"
    loaded = WanModel.load(folder, max_sequence_length=model.max_sequence_length, guidance_scale_2=CFG_2)
    assert isinstance(loaded.transformer, WanExperts) and loaded.boundary_ratio == BOUNDARY
    assert torch.equal(loaded.pipeline_images(cond, noise, STEPS, CFG), model.pipeline_images(cond, noise, STEPS, CFG))
    check_one_line_errors([
        (lambda: WanModel.load(folder, train_experts="middle"), "train_experts 'middle' is not one of"),
        (lambda: TinyWanA14BModel.load(seed=0).__class__.load(None, transformer_path=folder / "transformer"),
         "not a folder of both Wan experts"),
    ])
    index = json.loads((folder / "model_index.json").read_text())
    del index["boundary_ratio"]
    nob = folder.parent / "noboundary"
    nob.mkdir()
    for c in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"):
        (nob / c).symlink_to(folder / c)
    (nob / "model_index.json").write_text(json.dumps(index))
    check_one_line_errors([(lambda: WanModel.load(nob), "sets no boundary_ratio")])


def test_each_level_trains_the_expert_the_pipeline_uses_there(a14b):
    model, noise, cond, _ = a14b
    m = build()
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}

    def grads(sigma):
        m.transformer.zero_grad()
        m.velocity(noise, torch.tensor(sigma), pos, 1.0).square().mean().backward()
        return {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m.transformer, n).parameters())
                for n in ("transformer", "transformer_2")}

    assert grads([0.9, 0.8]) == {"transformer": True, "transformer_2": False}  # 900, 800 >= 700
    assert grads([0.6, 0.1]) == {"transformer": False, "transformer_2": True}
    assert grads([0.9, 0.1]) == {"transformer": True, "transformer_2": True}  # a mixed batch, per sample
    with torch.no_grad():  # the mixed batch equals each sample on its own
        mixed = m.velocity(noise, torch.tensor([0.9, 0.1]), pos, 1.0)
        assert torch.allclose(mixed[0], m.velocity(noise[:1], torch.tensor([0.9]), select(pos, 0), 1.0)[0], atol=1e-6)
        assert torch.allclose(mixed[1], m.velocity(noise[1:], torch.tensor([0.1]), select(pos, 1), 1.0)[0], atol=1e-6)
    low = build(train_experts="transformer_2")
    assert not any(p.requires_grad for p in low.transformer.transformer.parameters())
    low.velocity(noise, torch.tensor([0.5, 0.5]), pos, 1.0).sum().backward()
    check_one_line_errors([(lambda: low.velocity(noise, torch.tensor([0.9, 0.9]), pos, 1.0),
                            "uses transformer, which options.train_experts (transformer_2) leaves frozen")])


def select(cond, i):
    return {k: v[i:i + 1] for k, v in cond.items()}


def test_lora_on_both_experts_loads_in_wan_pipeline(a14b, tmp_path):
    model, noise, cond, folder = a14b
    cfg = load_config("tiny-wan", ["lora.enabled=true", "lora.rank=4", "lora.alpha=4", "lora.init=gaussian"]).lora
    adapted = WanModel.load(folder, max_sequence_length=model.max_sequence_length, guidance_scale_2=CFG_2)
    assert lora.apply(adapted, cfg) > 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for name, p in adapted.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    lora.save(tmp_path / "lora", adapted.transformer.state_dict(), cfg, adapted)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert files == ["lora/transformer/pytorch_lora_weights.safetensors",
                     "lora/transformer_2/pytorch_lora_weights.safetensors"]
    with torch.no_grad():
        ours = adapted.decode(rollout(adapted, cond, noise, STEPS, CFG))
    assert (ours - model.pipeline_images(cond, noise, STEPS, CFG)).abs().max() > 1e-3
    reference = WanModel.load(folder, max_sequence_length=model.max_sequence_length, guidance_scale_2=CFG_2)
    pipe = reference.pipeline()
    pipe.load_lora_weights(tmp_path / "lora" / "transformer")
    pipe.load_lora_weights(tmp_path / "lora" / "transformer_2", load_into_transformer_2=True)
    assert (reference.pipeline_images(cond, noise, STEPS, CFG) - ours).abs().max() < 1e-4
    merged = WanModel.load(folder, max_sequence_length=model.max_sequence_length, guidance_scale_2=CFG_2)
    merged.merge_lora(tmp_path / "lora")  # srpo export / sample of a run without final/
    assert (merged.pipeline_images(cond, noise, STEPS, CFG) - ours).abs().max() < 1e-4

    one = WanModel.load(folder, train_experts="transformer_2")
    lora.apply(one, cfg)
    assert not any("lora" in n for n, _ in one.transformer.transformer.named_parameters())
    assert any("lora" in n for n, _ in one.transformer.transformer_2.named_parameters())


def test_a_two_expert_run_writes_both_experts_to_final(tmp_path):
    run = tmp_path / "run"
    sets = ["--set", "model.name=tiny_wan_a14b", "--set", "rollout.steps=6", "--set", "data.eval_steps=4"]
    srpo("train", "tiny-wan", "--output", run, *FAST, *sets, *LORA)
    base = TinyWanA14BModel.load(seed=0)
    experts = {n: WanTransformer3DModel.from_pretrained(str(run / "final"), subfolder=n, local_files_only=True)
               for n in ("transformer", "transformer_2")}
    moved = {n: max((e.state_dict()[k] - v).abs().max().item()
                    for k, v in getattr(base.transformer, n).state_dict().items()) for n, e in experts.items()}
    assert max(moved.values()) > 1e-4, moved  # the run trained (the levels it drew reached either expert)
    assert {p.parent.name for p in (run / "lora").rglob("*.safetensors")} == {"transformer", "transformer_2"}
    folder = tmp_path / "folder"
    TinyWanA14BModel.save_random(folder)
    pipe = WanPipeline.from_pretrained(str(folder), **experts)  # final/ in diffusers' own pipeline
    pipe.set_progress_bar_config(disable=True)
    video = pipe(prompt="a red cube", height=32, width=32, num_frames=5, num_inference_steps=2,
                 max_sequence_length=32, output_type="pt").frames
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()
    _, model = run_weights(run)  # srpo sample / export read final/ with both experts
    assert all(torch.equal(getattr(model.transformer, n).state_dict()[k], v)
               for n, e in experts.items() for k, v in e.state_dict().items())


def test_plan_counts_both_experts_and_the_trained_ones():
    model = build()
    one = sum(p.numel() for p in model.transformer.transformer.parameters())
    parts = TinyWanA14BModel.plan_parts(None, {}, H, W, frames=FRAMES)
    assert parts.experts == 2 and 2 * sum(p.numel() for p in parts.transformer.parameters()) == 2 * one
    assert sum(p.numel() for p in model.transformer.parameters()) == 2 * one
    cfg = load_config("tiny-wan", ["model.name=tiny_wan_a14b"])
    both, low = model_sizes(cfg), model_sizes(load_config("tiny-wan", [
        "model.name=tiny_wan_a14b", "model.options.train_experts=transformer_2"]))
    assert both.transformer == low.transformer == 2 * one and both.untrained == 0 and low.untrained == one
    flagship = WanModel.plan_parts(None, {"train_experts": "both"}, 720, 1280, frames=81)
    assert flagship.experts == 2 and sum(p.numel() for p in flagship.transformer.parameters()) > 14e9
    assert flagship.image_tokens == 21 * 45 * 80  # (81 - 1) / 4 + 1 latent frames of 720 / 16 x 1280 / 16 patches
