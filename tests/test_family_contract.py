"""The FlowModel contract, checked the same way for every family the registry holds (each family of
real folders with a tiny twin, its variants included) on that twin, through the contract alone:
the rollout against the family's own diffusers pipeline, the schedule the pipeline sets, guidance
by mode, save / load round trips (transformer, pipeline folder, LoRA through the pipeline's own
load_lora_weights), plan sizes, folder errors, the twin's determinism; and a throw-away family
reached only by its dotted path, through the same checks and the CLI. What is particular to one
family (its prompt encoding, its latent normalisation, its flagship's sizes) is in its own file."""

import inspect
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import diffusers
import peft
import pytest
import torch
from safetensors import safe_open

from family_runs import check_cfg_gradient, check_one_line_errors, families, lora_modules, matched_linears, srpo
from srpo.commands.init import family_recipe_path
from srpo.config import load_config
from srpo.errors import UserError
from srpo.models import MODELS, family, family_of_folder
from srpo.models.base import FlowModel, select_cond, split_cond
from srpo.sampling import rollout

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube on a table", "a small blue ball in the grass near a lake at dusk"]
H, W, STEPS = 32, 48, 4  # a non-square size, batch 2
FAMILIES = families()


@dataclass
class Tiny:
    """A family's twin at seed 0, written as a pipeline folder, with one batch of inputs and the
    family pipeline's own images of them at the family's guidance."""

    name: str
    cls: type  # the family
    twin: type  # its tiny twin
    model: FlowModel
    folder: Path
    options: dict  # load options: the same model from cls.load(folder), twin.load(seed) and the pipeline
    noise: torch.Tensor
    cond: dict
    guidance: float
    images: torch.Tensor


def build(name: str, root: Path) -> Tiny:
    cls = family(name)
    twin = family(cls.tiny_twin)
    # the pipeline's unquantised timestep (FLUX's default follows the reference trainer instead)
    options = {"quantize_timesteps": False} if "quantize_timesteps" in cls.options else {}
    model = twin.load(seed=0, **options)
    folder = root / "folder"
    model.save_pipeline(folder)
    if "max_sequence_length" in cls.options:
        options["max_sequence_length"] = model.max_sequence_length
    noise = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(1))
    cond = model.encode_prompts(PROMPTS)
    guidance = float(model.default_guidance)
    return Tiny(name, cls, twin, model, folder, options, noise, cond, guidance,
                model.pipeline_images(cond, noise, STEPS, guidance))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_registry_holds_every_family_and_variant():
    assert {"flux", "sd3", "qwen_image", "flux2", "flux2_klein", "z_image", "wan"} <= set(FAMILIES)
    for name in FAMILIES:
        twin = family(family(name).tiny_twin)
        assert twin.is_twin() and issubclass(twin, family(name)), name  # the twin runs the family's own code


# ---- the sampler against the family's pipeline --------------------------------------------------
def check_rollout_parity(t: Tiny) -> None:
    with torch.no_grad():
        images = t.model.decode(rollout(t.model, t.cond, t.noise, STEPS, t.guidance))
    # images [2, 3, H, W]; a video family's videos [2, F, 3, H, W], as its pipeline's output_type="pt"
    assert images.shape == t.images.shape and images.shape[0] == 2 and images.shape[-3:] == (3, H, W)
    assert t.images.dtype == torch.float32
    assert (images - t.images).abs().max() < 1e-4
    assert (images[0] - images[1]).abs().max() > 0.05  # two prompts (and noises), two images
    other = t.twin.load(seed=1, **t.options)  # another model: the comparison can fail
    assert (other.pipeline_images(t.cond, t.noise, STEPS, t.guidance) - t.images).abs().max() > 1e-3


def test_rollout_and_decode_equal_the_family_pipeline(tiny):
    check_rollout_parity(tiny)


def test_guidance_acts_as_the_family_mode_says(tiny):
    """none: ignored; embedded: one call, the embedding acts; cfg: one pass at scale 1, both passes
    at 4 (one batched call or two, as the pipeline runs them) combined by the family's rule."""
    m, noise, cond = tiny.model, tiny.noise, tiny.cond
    sigma = torch.tensor([0.3, 0.8])
    calls = []
    hook = m.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            v1 = m.velocity(noise, sigma, cond, 1.0)
            n1 = len(calls)
            v4 = m.velocity(noise, sigma, cond, 4.0)
            n4 = len(calls) - n1
            if m.guidance_mode == "cfg":
                pos, neg = split_cond(cond)
                v_c, v_u = m.predict(noise, sigma, pos, None), m.predict(noise, sigma, neg, None)
    finally:
        hook.remove()
    assert n1 == 1 and v1.dtype == v4.dtype == torch.float32 and v4.shape == noise.shape
    if m.guidance_mode == "none":
        assert n4 == 1 and torch.equal(v4, v1)
    elif m.guidance_mode == "embedded":
        assert n4 == 1 and (v4 - v1).abs().max() > 1e-4
    else:
        assert m.guidance_mode == "cfg" and n4 == (1 if m.cfg_batched else 2)
        assert torch.allclose(v1, v_c.float(), atol=1e-6)
        assert torch.allclose(v4, m.combine_cfg(v_c.float(), v_u.float(), 4.0), atol=1e-5)  # [neg, pos] in order
        assert (v_c - v_u).abs().max() > 1e-3  # the negative branch really differs
    if m.guidance_mode != "none":  # and the pipeline's images depend on it too
        assert (m.pipeline_images(cond, noise, STEPS, 1.0 if tiny.guidance > 1 else 4.0) - tiny.images).abs().max() > 1e-3


def test_velocity_rows_are_per_sample(tiny):
    """Per-sample levels: row i of a batch equals a batch-1 call at sigma[i] with its own prompt."""
    m, noise, cond, g = tiny.model, tiny.noise, tiny.cond, tiny.guidance
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = m.velocity(noise, sigma, cond, g)
        v1 = m.velocity(noise[1:], sigma[1:], select_cond(cond, slice(1, 2)), g)
        v0 = m.velocity(noise[1:], sigma[:1], select_cond(cond, slice(1, 2)), g)
    assert (v[1:] - v1).abs().max() < 1e-5
    assert (v0 - v1).abs().max() > 1e-3  # the level matters


@pytest.mark.parametrize("mode", ["both", "cond"])
def test_cfg_gradient_flows_through_the_passes_the_setting_names(tiny, mode):
    if tiny.model.guidance_mode != "cfg":
        pytest.skip(f"{tiny.name}'s twin does not use true CFG")
    check_cfg_gradient(tiny.model, tiny.noise, tiny.cond, mode)


def test_gradients_reach_the_transformer_only(tiny):
    m = tiny.model
    m.transformer.zero_grad(set_to_none=True)
    z = tiny.noise.clone().requires_grad_(True)
    try:
        m.decode(z + m.velocity(z, torch.tensor([0.3, 0.8]), tiny.cond, tiny.guidance)).square().mean().backward()
        assert z.grad is not None and z.grad.abs().sum() > 0  # decode and velocity are differentiable
        assert sum(float(p.grad.abs().sum()) for p in m.transformer.parameters() if p.grad is not None) > 0
        for name, part in m.frozen_modules().items():
            assert not any(p.requires_grad or p.grad is not None for p in part.parameters()), name
            assert not part.training, name
    finally:
        m.transformer.zero_grad(set_to_none=True)


def test_prompts_encoded_one_at_a_time_sample_the_same_images(tiny):
    """The trainer's text cache encodes prompts alone and concatenates them."""
    single = [tiny.model.encode_prompts([p]) for p in PROMPTS]
    joined = {k: torch.cat([c[k] for c in single]) for k in single[0]}
    assert set(joined) == set(tiny.cond)
    with torch.no_grad():
        again = tiny.model.decode(rollout(tiny.model, joined, tiny.noise, STEPS, tiny.guidance))
    assert (again - tiny.images).abs().max() < 1e-4


def test_quantize_timesteps_floors_the_level_to_a_thousandth(tiny):
    m, noise, cond, g = tiny.model, tiny.noise, tiny.cond, tiny.guidance
    if "quantize_timesteps" not in tiny.cls.options:
        pytest.skip(f"{tiny.name} has no quantize_timesteps option")

    def v(level):
        return m.velocity(noise, torch.full([2], level), cond, g)

    before = m.quantize_timesteps
    try:
        with torch.no_grad():
            m.quantize_timesteps = True
            q = [v(0.3001), v(0.3006), v(0.3015)]
            m.quantize_timesteps = False
            exact = [v(0.3001), v(0.3006)]
    finally:
        m.quantize_timesteps = before
    assert torch.equal(q[0], q[1])  # 300.1 and 300.6 both floor to 300 (not rounded)
    assert (q[2] - q[1]).abs().max() > 1e-6  # 301
    assert (exact[1] - exact[0]).abs().max() > 1e-6  # unquantised: the level itself


def pipeline_sigmas(model, steps: int, height: int, width: int, cond) -> torch.Tensor:
    """The sigmas the family pipeline's own __call__ sets (read off the pipeline pipeline_images ran)."""
    made = []
    build_pipeline = model.pipeline
    model.pipeline = lambda: made.append(build_pipeline()) or made[-1]
    try:
        noise = torch.randn(model.latent_shape(1, height, width), generator=torch.Generator().manual_seed(2))
        model.pipeline_images(select_cond(cond, slice(0, 1)), noise, steps, model.default_guidance)
    finally:
        del model.pipeline
    return made[-1].scheduler.sigmas.double()


def test_schedule_equals_the_sigmas_the_pipeline_sets(tiny):
    m, cond = tiny.model, tiny.cond
    for steps, h, w in ((STEPS, H, W), (9, 64, 32)):
        grid = m.schedule(steps, h, w)
        assert grid.dtype == torch.float64 and len(grid) == steps + 1 and grid[0] == 1 and grid[-1] == 0
        # (float32 rounding: the pipelines' sigmas are float32)
        assert torch.allclose(grid, pipeline_sigmas(m, steps, h, w, cond), rtol=0, atol=1e-6), (steps, h, w)
    shifted = tiny.twin.load(seed=0, shift=1.5, **tiny.options)  # a shift override reaches the pipeline too
    assert torch.allclose(shifted.schedule(STEPS, H, W), pipeline_sigmas(shifted, STEPS, H, W, cond), rtol=0, atol=1e-6)
    assert (shifted.schedule(STEPS, H, W) - m.schedule(STEPS, H, W)).abs().max() > 1e-2


def test_latent_shape_round_trips_the_pixel_size_and_rejects_odd_sizes(tiny):
    m = tiny.model
    shape = m.latent_shape(2, H, W)
    assert shape[0] == 2 and m.pixel_size(torch.zeros(shape)) == (H, W)
    assert m.latent_shape(1, 2 * H, W)[2:] != shape[2:]
    with pytest.raises(UserError, match="multiples of") as e:
        m.latent_shape(1, H - 2, W)
    assert "\n" not in str(e.value)


def test_the_default_encode_is_the_vae_mode_normalised(tiny):
    """Families on FlowModel's decode / encode: encode is the VAE posterior's mode of 2x - 1, shifted
    and scaled as the folder's VAE config says (a family with its own, e.g. per-channel, checks it
    in its file)."""
    m = tiny.model
    if type(m).encode is not FlowModel.encode:
        pytest.skip(f"{tiny.name} normalises its latents its own way")
    with torch.no_grad():
        pixels = m.decode(tiny.noise)
    z = m.encode(pixels)
    assert z.shape == tiny.noise.shape and not z.requires_grad
    cfg = m.vae.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1  # not the identity
    raw = m.vae.encode(pixels * 2 - 1).latent_dist.mode()
    assert torch.allclose(z, (raw - cfg.shift_factor) * cfg.scaling_factor, atol=1e-6)


# ---- round trips -----------------------------------------------------------------------------
def test_transformer_round_trip(tiny, tmp_path):
    t = tiny
    tuned = t.twin.load(seed=0, **t.options)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for p in tuned.transformer.parameters():  # a "fine-tuned" transformer
            p.add_(0.05 * torch.randn_like(p))
    tuned.save_transformer(tmp_path / "t")
    reloaded = getattr(diffusers, t.cls.transformer_class).from_pretrained(tmp_path / "t", local_files_only=True)
    mine, theirs = tuned.transformer.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    sigma = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        want = tuned.velocity(t.noise, sigma, t.cond, t.guidance)
        assert (want - t.model.velocity(t.noise, sigma, t.cond, t.guidance)).abs().max() > 1e-3
        for other in (t.cls.load(t.folder, transformer_path=tmp_path / "t", **t.options),
                      t.twin.load(seed=5, transformer_path=tmp_path / "t", **t.options)):  # the family's and the twin's loaders
            assert torch.equal(other.velocity(t.noise, sigma, t.cond, t.guidance), want)


def test_pipeline_folder_round_trip(tiny):
    t = tiny
    loaded = t.cls.load(t.folder, **t.options)
    assert type(loaded) is t.cls
    assert all(torch.equal(t.cond[k], v) for k, v in loaded.encode_prompts(PROMPTS).items())
    assert torch.equal(loaded.pipeline_images(t.cond, t.noise, STEPS, t.guidance), t.images)
    assert not any(t.folder.rglob("*.bin")) and any(t.folder.rglob("*.safetensors"))
    assert family_of_folder(t.folder) == t.name  # srpo sample --model FOLDER finds the family


def test_family_facts_agree_with_diffusers_and_the_saved_folder(tiny):
    t = tiny
    pipe_cls = getattr(diffusers, t.cls.pipeline_class)
    annotation = inspect.signature(pipe_cls.__init__).parameters["transformer"].annotation
    # the pipeline's own transformer class (WanPipeline: Optional, as its experts are)
    assert getattr(diffusers, t.cls.transformer_class) in (annotation, *getattr(annotation, "__args__", ()))
    index = json.loads((t.folder / "model_index.json").read_text())
    assert index["_class_name"] == t.cls.pipeline_class
    assert json.loads((t.folder / "transformer" / "config.json").read_text())["_class_name"] == t.cls.transformer_class
    present = {k for k, v in index.items() if not k.startswith("_") and v and v[0] is not None}
    assert set(t.cls.components) <= present and all((t.folder / c).is_dir() for c in present)
    # the LoRA targets name layers that exist: each matches the twin, and they reach every block of
    # the flagship's transformer (its real config, on the meta device)
    assert all(matched_linears(t.model.transformer, [x]) for x in t.model.lora_targets), t.model.lora_targets
    flagship = t.cls.plan_parts(None, {}, 1024, 1024).transformer
    adapted = matched_linears(flagship, t.cls.lora_targets)
    for name, blocks in flagship.named_children():
        if isinstance(blocks, torch.nn.ModuleList):
            assert all(any(n.startswith(f"{name}.{i}.") for n in adapted) for i in range(len(blocks))), name
    assert family_recipe_path(t.cls).is_file()  # srpo init's starting recipe
    if t.cls.tiny_config:
        assert load_config(t.cls.tiny_config).model.name == t.cls.tiny_twin  # the config trains this twin


def test_lora_loads_in_the_pipeline_and_gives_the_same_images(tiny, tmp_path):
    t = tiny
    adapted = t.cls.load(t.folder, **t.options)
    targets = sorted(adapted.lora_targets)
    adapted.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                                    init_lora_weights="gaussian"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, p in adapted.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    layers = peft.get_peft_model_state_dict(adapted.transformer)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in layers)
    assert lora_modules(layers) == matched_linears(t.model.transformer, targets)  # every targeted layer
    adapted.save_lora(tmp_path / "lora", layers, {"r": 4, "lora_alpha": 4, "target_modules": targets,
                                                  "lora_dropout": 0.0})
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert lora_modules(k.removeprefix("transformer.") for k in f.keys()) == lora_modules(layers)
    with torch.no_grad():
        ours = adapted.decode(rollout(adapted, t.cond, t.noise, STEPS, t.guidance))
    assert (ours - t.images).abs().max() > 1e-3  # the adapters change the images

    reference = t.cls.load(t.folder, **t.options)
    reference.pipeline().load_lora_weights(tmp_path / "lora")  # diffusers' loader, into the modules it shares
    assert lora_modules(n for n, _ in reference.transformer.named_parameters()) == lora_modules(layers)
    theirs = reference.pipeline_images(t.cond, t.noise, STEPS, t.guidance)
    assert (ours - theirs).abs().max() < 1e-4


# ---- plan sizes ------------------------------------------------------------------------------
def check_plan_counts(t: Tiny) -> None:
    """``plan_parts`` of the twin and of its saved folder count exactly the built model."""
    n, text = count(t.model.transformer), sum(count(e) for e in t.model.text_encoders())
    twin, folder = t.twin.plan_parts(None, {}, H, W), t.cls.plan_parts(t.folder, dict(t.options), H, W)
    for parts in (twin, folder):
        assert next(parts.transformer.parameters()).device.type == "meta"
        assert count(parts.transformer) == n and count(parts.vae) == count(t.model.vae)
        assert t.twin.plan_parts(None, {}, 2 * H, 2 * W).image_tokens == 4 * parts.image_tokens > 0
    assert twin.text_encoders == text > 0
    with pytest.raises(UserError, match="unknown option"):
        t.cls.plan_parts(None, {"no_such_option": 1}, 1024, 1024)
    assert folder.text_encoders == text  # counted from the folder's own text encoder configs


def test_plan_parts_count_the_built_model(tiny):
    check_plan_counts(tiny)


# ---- folder errors ---------------------------------------------------------------------------
def test_folder_errors_are_one_line_and_name_the_problem(tiny, tmp_path):
    t = tiny
    cls, folder = t.cls, t.folder
    index = json.loads((folder / "model_index.json").read_text())
    present = [k for k, v in index.items() if not k.startswith("_") and v and v[0] is not None]

    def fake(name, drop=(), class_name=None):
        """A folder in the family's layout with empty component folders."""
        root = tmp_path / name
        root.mkdir()
        (root / "model_index.json").write_text(json.dumps({**index, **({"_class_name": class_name} if class_name else {})}))
        for c in present:
            if c not in drop:
                (root / c).mkdir()
        return root

    (tmp_path / "no_index").mkdir()
    wrong_class = next(family(n).transformer_class for n in FAMILIES if family(n).transformer_class != cls.transformer_class)
    (tmp_path / "wrong_transformer").mkdir()
    (tmp_path / "wrong_transformer" / "config.json").write_text(json.dumps({"_class_name": wrong_class}))
    cases = [
        (lambda: cls.load(tmp_path / "nowhere"), "does not exist"),
        (lambda: cls.load(None), "needs a path"),
        (lambda: cls.load(tmp_path / "no_index"), "no model_index.json"),
        (lambda: cls.load(folder, resolution=512), f"unknown option(s) for model '{cls.family}': resolution"),
        (lambda: cls.load(fake("no_weights")), "cannot load weights from"),
        (lambda: cls.load(folder, transformer_path=tmp_path / "wrong_transformer"),
         f"holds a {wrong_class}, not a {cls.transformer_class}"),
        (lambda: t.twin.load(folder), "takes no path"),
        (lambda: t.twin.load(no_such_size=3), f"bad option for model '{t.twin.family}'"),
        (lambda: t.twin.load(dtype="float8"), "unknown dtype 'float8'"),
    ]
    cases += [(lambda c=c: cls.load(fake("without_" + c, drop=(c,))), f"lacks {c}/") for c in cls.components]
    for other in FAMILIES:  # another family's pipeline: the error names the family that reads it
        pipe = family(other).pipeline_class
        if pipe != cls.pipeline_class:
            cases.append((lambda o=other, p=pipe: cls.load(fake("of_" + o, class_name=p)),
                          f"holds a {pipe} pipeline, not {cls.pipeline_class}: use model '{other}'"))
    check_one_line_errors(cases)


# ---- the twin --------------------------------------------------------------------------------
def test_twin_is_deterministic_in_seed_and_leaves_the_global_rng_alone(tiny):
    def weights(m):
        return {f"{k}.{n}": v for k, part in (("transformer", m.transformer), *m.frozen_modules().items())
                for n, v in part.state_dict().items()}

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = tiny.twin.load(seed=0), tiny.twin.load(seed=0), tiny.twin.load(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert wa.keys() == wb.keys() == wc.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa if k.startswith("transformer."))
    half = tiny.twin.load(dtype="bfloat16")
    parts = (half.transformer, *half.frozen_modules().values())
    assert {p.dtype for m in parts for p in m.parameters()} == {torch.bfloat16}


# ---- a family by dotted path -----------------------------------------------------------------
THROWAWAY = "srpo_throwaway_family"
MODULE = textwrap.dedent(f'''
    """A family no srpo file names: an SD3 subclass with its own tiny twin, reached by dotted path."""
    from srpo.models import MODELS


    class MySD3(MODELS.get("sd3")):
        family = "my_sd3"
        title = "My SD3"
        tiny_twin = "{THROWAWAY}.MyTinySD3"
        tiny_config = ""


    class MyTinySD3(MODELS.get("tiny_sd3"), MySD3):
        family = "my_tiny_sd3"
        folder_family = "{THROWAWAY}.MySD3"
''')


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory):
    """The throw-away family's module on sys.path (and on the CLI's PYTHONPATH), built as ``build``
    builds the registered ones."""
    root = tmp_path_factory.mktemp("throwaway")
    (root / f"{THROWAWAY}.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    try:
        yield root, build(f"{THROWAWAY}.MySD3", root)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(THROWAWAY, None)


def test_a_family_by_dotted_path_passes_the_contract(throwaway):
    _, t = throwaway
    assert t.name not in MODELS.names() and type(t.model).__name__ == "MyTinySD3"
    assert type(t.cls.load(t.folder, **t.options)) is t.cls
    check_rollout_parity(t)
    check_plan_counts(t)


def test_a_family_by_dotted_path_runs_through_the_cli(throwaway, tmp_path):
    """srpo init writes its config; srpo plan and srpo train run it on the twin's folder."""
    root, t = throwaway
    env = {"PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    config = tmp_path / "my.yaml"
    srpo("init", t.name, "--reward", "tiny_clip", "--output", config, **env)
    assert f"name: {t.name}" in config.read_text()
    prompts = ROOT / "configs" / "prompts"
    sets = [f"model.path={t.folder}", "model.dtype=float32", f"model.options.max_sequence_length={t.model.max_sequence_length}",
            f"data.prompts={prompts / 'tiny-train.txt'}", f"data.eval_prompts={prompts / 'tiny-eval.txt'}",
            "rollout.height=32", "rollout.width=32", "rollout.steps=4", "data.eval_steps=4", "train.device=cpu",
            "train.autocast=none", "train.gradient_checkpointing=false", "lora.rank=4", "lora.alpha=4",
            "guard.enabled=false", "log.progress=false", "log.sample_every=0", "log.checkpoint_every=0"]
    sets = [x for s in sets for x in ("--set", s)]
    out = srpo("plan", config, *sets, **env).stdout
    assert f"model: {t.cls.plan_parts(t.folder, dict(t.options), 32, 32).name}: transformer" in out and "fits in" in out
    run = tmp_path / "run"
    srpo("train", config, *sets, "--set", "train.max_steps=2", "--output", run, **env)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] == 0 for r in rows)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    final = getattr(diffusers, t.cls.transformer_class).from_pretrained(str(run / "final"), local_files_only=True)
    assert final.state_dict().keys() == t.model.transformer.state_dict().keys()
