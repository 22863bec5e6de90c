"""srpo init FAMILY --reward NAME --output FILE.yaml [--lora | --full] [--force]: a commented
starter config.

The file is built as text, one template per section, so every line can carry its comment; the
values come from code wherever code has them (the family class's ``default_guidance``,
``pipeline_class`` and component list, the defaults in :mod:`srpo.config`), so a starter
config cannot drift from what srpo does. The reference recipes (the SRPO authors' FLUX.1 and
Qwen-Image trainers) and srpo's documented starting values (docs/models.md, "Starting
hyperparameters") are the two sources of the remaining numbers, and each such line says which
one it is. Before anything is written the text is parsed back and validated with
:func:`srpo.config.load_config`.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

REF = "reference"
OURS = "srpo's starting value"
PLACEHOLDER = "/path/to/"  # every path the user must edit starts with this
COLUMN = 43  # comments start here, as in the example configs


# ------------------------------------------------------------------ what the code cannot say

@dataclass(frozen=True)
class FamilyInfo:
    title: str  # the model, as people call it
    folder: str  # the placeholder folder name
    source: str  # where users usually get the folder
    guidance: str  # embedded | cfg | distilled


FAMILIES = {
    "flux": FamilyInfo("FLUX.1-dev", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev", "embedded"),
    "sd3": FamilyInfo("Stable Diffusion 3.5", "stable-diffusion-3.5-large",
                      "stabilityai/stable-diffusion-3.5-large (or -medium)", "cfg"),
    "qwen_image": FamilyInfo("Qwen-Image", "Qwen-Image", "Qwen/Qwen-Image (or Qwen/Qwen-Image-2512)", "cfg"),
    "flux2": FamilyInfo("FLUX.2 [dev]", "FLUX.2-dev", "black-forest-labs/FLUX.2-dev", "embedded"),
    "flux2_klein": FamilyInfo("FLUX.2 [klein]", "FLUX.2-klein-base-4B",
                              "black-forest-labs/FLUX.2-klein-base-4B (or -9B; a distilled klein ignores guidance)",
                              "cfg"),
    "z_image": FamilyInfo("Z-Image-Turbo", "Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo", "distilled"),
}


@dataclass(frozen=True)
class RewardInfo:
    title: str
    path: str | None  # placeholder (None: the reward takes no path)
    needs: str  # what the path must hold, and where users get it (docs/rewards.md)
    options: dict = field(default_factory=dict)
    options_note: str = ""
    text_conditioned: bool = True  # False: image-only, SRP does not apply


REWARDS_INFO = {
    "hps": RewardInfo("HPSv2.1", PLACEHOLDER + "HPS_v2.1_compressed.pt",
                      "the HPSv2.1 checkpoint file (a dict with a state_dict) over open_clip ViT-H-14: "
                      "HPS_v2.1_compressed.pt of the hub repo xswu/HPSv2"),
    "pickscore": RewardInfo("PickScore", PLACEHOLDER + "PickScore_v1",
                            "the PickScore_v1 model folder (transformers CLIPModel: config.json + weights): "
                            "yuvalkirstain/PickScore_v1",
                            {"processor_path": PLACEHOLDER + "CLIP-ViT-H-14-laion2B-s32B-b79K"},
                            "processor_path: the CLIP-H processor folder, laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip": RewardInfo("CLIP score", PLACEHOLDER + "clip-vit-large-patch14",
                       "a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14), or an open_clip "
                       "checkpoint file (then also set options.arch, e.g. ViT-L-14)"),
    "aesthetic": RewardInfo("LAION aesthetic predictor", PLACEHOLDER + "sac+logos+ava1-l14-linearMSE.pth",
                            "the improved-aesthetic-predictor head sac+logos+ava1-l14-linearMSE.pth "
                            "(christophschuhmann's repository)",
                            {"clip_path": PLACEHOLDER + "clip-vit-large-patch14"},
                            "clip_path: CLIP ViT-L/14, openai/clip-vit-large-patch14 (transformers folder) or an "
                            "open_clip file", text_conditioned=False),
    "tiny_clip": RewardInfo("tiny random CLIP", None,
                            "random weights built in code for smoke tests: no files", {"seed": 0},
                            "seed of the weights"),
}


# ------------------------------------------------------------------ values from code

def _default(section, key: str) -> Any:
    """The default of ``section.key`` in srpo.config (lists for tuples, as YAML writes them)."""
    f = section.model_fields[key]
    value = f.default_factory() if f.default_factory else f.default
    return list(value) if isinstance(value, tuple) else value


def _option_default(cls, name: str) -> Any:
    """The default of a load option, from the family's load() or __init__ signature."""
    for fn in (cls.load, cls.__init__):
        p = inspect.signature(fn).parameters.get(name)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
    return None


def families() -> list[str]:
    from ..models import MODELS

    return [n for n in MODELS.names() if not n.startswith("tiny")]


def rewards() -> list[str]:
    from ..rewards import REWARDS

    return list(REWARDS.names())


def family_info(name: str, cls) -> FamilyInfo:
    """The table's entry, or one derived from the class for a family the table does not know."""
    if name in FAMILIES:
        return FAMILIES[name]
    kind = {"cfg": "cfg", "embedded": "embedded"}.get(cls.guidance_mode, "distilled")
    return FamilyInfo(name, f"{cls.pipeline_class or name}-folder", "docs/models.md", kind)


def reward_info(name: str) -> RewardInfo:
    return REWARDS_INFO.get(name) or RewardInfo(name, PLACEHOLDER + f"{name}-checkpoint",
                                                "the reward's checkpoint file or folder (docs/rewards.md)")


# ------------------------------------------------------------------ the recipe

@dataclass
class Section:
    """One section's lines: (key, value, comment); key None: a comment line of its own."""

    name: str
    comment: str
    lines: list = field(default_factory=list)

    def add(self, key: str, value: Any, comment: str = "", above: str = "") -> None:
        if above:
            self.note(above)
        self.lines.append((key, value, comment))

    def note(self, text: str) -> None:
        self.lines.append((None, None, text))


def _ref(what: str = "") -> str:
    return f"{REF} ({what})" if what else REF


def _ours(why: str = "") -> str:
    return f"{OURS} ({why})" if why else OURS


def recipe(family: str, reward: str, lora: bool) -> list[Section]:
    """The sections of the starter config: values and their comments."""
    from .. import config as C
    from ..models import MODELS

    cls = MODELS.get(family)
    fam = family_info(family, cls)
    rew = reward_info(reward)
    flux = family == "flux"  # the reference FLUX.1 trainer's recipe (HPSv2.1, PickScore)
    qwen = family == "qwen_image"  # the reference Qwen-Image trainer's recipe (PickScore)
    pick = reward == "pickscore"
    flux_ref = flux and reward in ("hps", "pickscore")  # a reference run of exactly this pair
    recipe_src = "FLUX.1" if flux else "Qwen-Image" if qwen else ""
    ref_or_ours = (lambda what="": _ref(recipe_src)) if recipe_src else (lambda what="": _ours(what))
    components = getattr(sys.modules[cls.__module__], "COMPONENTS", ())
    layout = f"the {cls.pipeline_class} layout" + (f" (model_index.json, {'/, '.join(components)}/)"
                                                   if components else "")
    out = []

    top = Section("", "")
    top.add("algorithm", _default(C.Config, "algorithm"), "Direct-Align + SRP (docs/algorithms.md)")
    out.append(top)

    # ---- model
    m = Section("model", "the flow model to fine-tune (docs/models.md)")
    m.add("name", family, f"{fam.title}; the families: {', '.join(families())}")
    m.add("path", PLACEHOLDER + fam.folder, "EDIT",
          above=f"a local diffusers folder in {layout}, e.g. {fam.source}")
    m.add("dtype", "bfloat16", "frozen text encoders and VAE; trainable weights stay float32")
    if qwen:
        m.add("shift", 1.0, _ref("--shift 1: a fixed shift, not the pipeline's dynamic one"))
        m.add("quantize_timesteps", True, _ref("the trainer feeds int(1000 sigma) / 1000"))
    options, notes = {}, []
    if family == "z_image":
        options["variant"] = _option_default(cls, "variant")
        notes.append("turbo: the distilled Z-Image-Turbo (guidance ignored); base: Z-Image, true CFG")
    if fam.guidance == "cfg" and _option_default(cls, "negative_prompt") is not None:
        options["negative_prompt"] = _option_default(cls, "negative_prompt")
        notes.append("the negative prompt of true CFG (the pipeline's default)")
    if options:
        m.add("options", options, "; ".join(notes))
    out.append(m)

    # ---- reward
    r = Section("reward", "the reward model, from local files (docs/rewards.md); check it with srpo score")
    r.add("name", reward, f"{rew.title}; the rewards: {', '.join(rewards())}")
    if rew.path is not None:
        r.add("path", rew.path, "EDIT", above=rew.needs)
    else:
        r.note(f"no path: {rew.needs}")
    if rew.options:
        edit = any(str(v).startswith(PLACEHOLDER) for v in rew.options.values())
        r.add("options", dict(rew.options), "EDIT" if edit else rew.options_note,
              above=rew.options_note if edit else "")
    out.append(r)

    # ---- srp
    p = Section("srp", "semantic-relative reward: control words joined to the prompt, reward pos - neg")
    if not rew.text_conditioned:
        p.add("enabled", False, f"{rew.title} is image-only: plain Direct-Align on its absolute score")
    else:
        p.add("pos_words", _default(C.SRPConfig, "pos_words"), _ref("the paper's realism words"))
        neg = _default(C.SRPConfig, "neg_words")
        p.add("neg_words", neg[:3] if qwen else neg,
              _ref("the Qwen-Image trainer's three") if qwen else _ref("the paper's"))
        if qwen:
            p.note("k_pos / k_inv: not used by method.variant discounted (k = 0)")
        elif pick:
            src = _ref("FLUX.1 + PickScore") if flux else _ours("the FLUX.1 + PickScore reference's")
            p.add("k_pos", [0.10, 0.50], src)
            p.add("k_inv", [0.60, 0.01], src)
        else:
            src = _ref("FLUX.1 + HPSv2.1") if flux_ref else _ours("the FLUX.1 + HPSv2.1 reference's")
            p.add("k_pos", _default(C.SRPConfig, "k_pos"), src)
            p.add("k_inv", _default(C.SRPConfig, "k_inv"), src)
    out.append(p)

    # ---- method
    d = Section("method", "Direct-Align: which noise levels train and how (docs/algorithms.md)")
    if qwen:
        d.add("variant", "discounted", _ref("the Qwen-Image trainer: one branch, noise discount, loss -r, k = 0"))
        d.add("passes", 2, _ref("--gradient_accumulation_steps 2: two passes per rollout, each its own ts"))
        d.add("index_range", [5, 40], _ref("--train_timestep 5 40 of the 50-step schedule"))
        d.add("schedule_steps", _default(C.MethodConfig, "schedule_steps"), _ref())
        d.add("cells", 100, _ref("--timestep_length 100"))
        d.add("max_step_cells", 41, _ref("int((1 - groundtruth_ratio 0.6) * 100) + 1"))
        d.add("ts_margin", 2, _ref("ts drawn in [2, 98]"))
        d.add("discount_shift", _default(C.MethodConfig, "discount_shift"),
              _ref("discount = shift3(linspace(0, 1, 101))[ts]"))
    else:
        d.add("variant", _default(C.MethodConfig, "variant"),
              "the FLUX.1 trainer's SRPO: denoise + inversion branch, hinge loss")
        start, end = _default(C.MethodConfig, "index_range")
        if flux and pick:
            end = 30
        narrow = lora and family in ("flux", "sd3")  # docs/models.md: the one-GPU LoRA rows
        if narrow:
            start = 10
        if flux_ref and not lora:
            why = _ref("FLUX.1 + PickScore" if pick else "FLUX.1 + HPSv2.1")
        elif narrow:
            why = _ours("one GPU: the narrower range the authors suggest")
        else:
            why = _ours("the reference's range")
        d.add("index_range", [start, end], why, above=f"indices of the {_default(C.MethodConfig, 'schedule_steps')}"
              "-step inference schedule; late indices bring reward hacking back")
        d.add("hinge_threshold", _default(C.MethodConfig, "hinge_threshold"),
              "loss relu(threshold - r); " + (_ref("FLUX.1") if flux else _ours("the FLUX.1 reference's")))
    out.append(d)

    # ---- guidance, as the family applies it
    if fam.guidance == "embedded":
        roll = 2.0 if flux and pick else 1.0
        roll_why = ("embedded guidance; " + (_ref("FLUX.1: 1 with HPSv2.1, 2 with PickScore") if flux_ref
                                             else _ours("the FLUX.1 reference's 1 with HPSv2.1")))
        tr = _default(C.TrainConfig, "guidance")
        tr_why = "embedded guidance; " + (_ref("FLUX.1") if flux else _ours("the FLUX.1 reference's"))
    elif fam.guidance == "cfg":
        roll = float(cls.default_guidance)
        roll_why = f"true CFG scale, {cls.__name__}.default_guidance; " + (_ref("Qwen-Image") if qwen else OURS)
        tr = 1.0
        tr_why = ("the conditional pass alone (> 1: CFG, train.cfg_gradient); "
                  + (_ref("Qwen-Image: --train_cfg 1") if qwen else _ours("as the Qwen-Image reference")))
    else:
        roll = tr = float(cls.default_guidance)
        roll_why = tr_why = f"{cls.__name__}.default_guidance; distilled: guidance is ignored"

    # ---- rollout
    o = Section("rollout", "the online rollout that produces the clean image x0")
    steps = 26 if qwen else _default(C.RolloutConfig, "steps")
    o.add("steps", steps, _ref("Qwen-Image: --sampling_steps 26") if qwen else ref_or_ours())
    o.add("guidance", roll, roll_why)
    if family == "z_image":
        o.note("Z-Image base (model.options.variant: base): guidance 5 here and in data.eval_guidance "
               "(the pipeline's guidance_scale 4, plus one)")
    o.add("height", _default(C.RolloutConfig, "height"), ref_or_ours("the references' 720"))
    o.add("width", _default(C.RolloutConfig, "width"), ref_or_ours("the references' 720"))
    out.append(o)

    # ---- train
    t = Section("train", "optimisation: AdamW at a constant learning rate")
    t.add("max_steps", 50 if qwen else _default(C.TrainConfig, "max_steps"),
          "optimizer updates; " + (_ref("Qwen-Image saves at step 50") if qwen else ref_or_ours("FLUX.1's")))
    t.add("batch_size", 1, "prompts per GPU and micro-step; " + ref_or_ours("the references'"))
    if lora:
        t.add("lr", 1.0e-4, _ours("the FLUX.1 LoRA r64 start; no LoRA reference exists"))
    else:
        t.add("lr", 3.0e-6 if qwen else _default(C.TrainConfig, "lr"), ref_or_ours("FLUX.1's"))
    t.add("grad_clip", 50.0 if qwen else _default(C.TrainConfig, "grad_clip"),
          _ref("Qwen-Image: --max_grad_norm 50") if qwen else ref_or_ours("FLUX.1's"))
    t.add("guidance", tr, tr_why)
    t.add("autocast", "bf16", "transformer calls under bf16 autocast, fp32 master weights")
    t.add("gradient_checkpointing", True, "activation checkpointing in the transformer blocks")
    out.append(t)

    # ---- data
    a = Section("data", "prompts: a text file (one per line), .jsonl / .csv / .parquet or an inline list")
    a.add("prompts", PLACEHOLDER + "prompts.txt", "EDIT: training prompts")
    a.add("eval_prompts", PLACEHOLDER + "eval-prompts.txt", "EDIT: held-out prompts (evaluation and the guard)")
    if flux or qwen:
        a.add("eval_steps", 50, _ref(recipe_src))
    elif family == "sd3":
        a.add("eval_steps", 28, _ours("the SD3.5 Large model card's"))
    else:
        a.add("eval_steps", steps, _ours("the rollout's"))
    a.add("eval_guidance", float(cls.default_guidance), f"{cls.__name__}.default_guidance, as the family samples")
    out.append(a)

    if qwen:
        y = Section("memory", "the frozen parts")
        y.add("offload_frozen", True, _ours("the 8B text encoder visits the GPU only for new prompts"))
        out.append(y)

    # ---- guard
    g = Section("guard", "watches the eval prompts for reward hacking and stops the run (docs/guard.md)")
    for key in ("enabled", "every", "prompts", "seeds", "stop_when", "keep_best", "best_when"):
        g.add(key, _default(C.GuardConfig, key), "srpo's default")
    other = "pickscore" if reward != "pickscore" else "hps"
    g.note(f"judges: [{{name: {other}, path: {reward_info(other).path}}}]   # a held-out reward to watch")
    out.append(g)

    # ---- lora
    lo = Section("lora", "LoRA adapters on the transformer; the base stays frozen in model.dtype")
    if lora:
        lo.add("enabled", True, "LoRA fine-tune (srpo init --full: every weight)")
        lo.add("rank", 64, _ours("the FLUX.1 LoRA start"))
        lo.add("alpha", 64, "the update is scaled by alpha / rank")
        lo.note("target_modules: the family's defaults (docs/models.md)")
    else:
        lo.add("enabled", False, "full fine-tune of every transformer weight (srpo init --lora: adapters)")
    out.append(lo)

    # ---- parallel
    pa = Section("parallel", "the multi-GPU strategy (docs/scale.md)")
    if lora:
        pa.add("strategy", "none", "one GPU; several: ddp, launched with torchrun")
    else:
        pa.add("strategy", "fsdp", "FSDP2 shards weights, gradients and AdamW state; launch with torchrun")
    out.append(pa)

    # ---- log
    lg = Section("log", "run-folder outputs")
    every = 10 if qwen else 5
    lg.add("sample_every", every, "sample grid every N updates; " + ref_or_ours("FLUX.1's"))
    lg.add("checkpoint_every", every, "resumable checkpoint every N updates; " + ref_or_ours("FLUX.1's"))
    out.append(lg)
    return out


# ------------------------------------------------------------------ text

def _y(value: Any) -> str:
    """One YAML value on one line (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    if "\n" in text or yaml.safe_load(text) != value:
        raise RuntimeError(f"srpo init cannot write {value!r} on one line")  # a bug, not user input
    return text


def _pad(text: str, comment: str) -> str:
    if not comment:
        return text
    return f"{text:<{COLUMN - 1}} # {comment}" if len(text) < COLUMN - 1 else f"{text}  # {comment}"


def render(sections: list[Section], header: list[str]) -> tuple[str, dict, list[str]]:
    """The file's text, the tree it must parse to and the dotted keys the user must edit."""
    lines = [f"# {h}" if h else "#" for h in header]
    tree: dict = {}
    edits: list[str] = []
    for s in sections:
        lines.append("")
        if not s.name:  # top-level keys, not a section
            for key, value, comment in s.lines:
                lines.append(_pad(f"{key}: {_y(value)}", comment))
                tree[key] = value
            continue
        lines.append(f"# {s.name}: {s.comment}")
        lines.append(f"{s.name}:")
        node = tree.setdefault(s.name, {})
        for key, value, comment in s.lines:
            if key is None:
                lines.append(f"  # {comment}")
                continue
            lines.append(_pad(f"  {key}: {_y(value)}", comment))
            node[key] = value
            if comment.startswith("EDIT"):
                edits.append(f"{s.name}.{key}")
    return "\n".join(lines) + "\n", tree, edits


def build(family: str, reward: str, lora: bool, output: str = "config.yaml") -> tuple[str, list[str]]:
    """The starter config's text (checked: it parses to the intended values and validates) and
    the dotted keys whose placeholders the user must edit."""
    from ..config import load_config

    valid = families()
    if family not in valid:
        raise UserError(f"unknown model family '{family}': use one of {', '.join(valid)}")
    if reward not in rewards():
        raise UserError(f"unknown reward '{reward}': use one of {', '.join(rewards())}")
    sections = recipe(family, reward, lora)
    mode = "LoRA (rank 64, one GPU)" if lora else "full fine-tune (FSDP2, several GPUs)"
    launch = (f"srpo train {output} --output runs/{Path(output).stem}" if lora else
              f"torchrun --nproc_per_node N -m srpo train {output} --output runs/{Path(output).stem}")
    header = [
        f"srpo starter config: {family_info(family, _cls(family)).title} "
        f"({family}) + {reward_info(reward).title} ({reward}), {mode}.",
        f"Written by: srpo init {family} --reward {reward} {'--lora' if lora else '--full'} --output {output}",
        "",
        f"1. Replace every {PLACEHOLDER}... (the lines marked EDIT) with your local files.",
        f"2. srpo plan {output} --gpus N      per-GPU memory before launching",
        f"3. {launch}",
        "",
        f'Numbers marked "{REF}" are the SRPO authors\' recipe (their FLUX.1 / Qwen-Image trainers);',
        f'"{OURS}": no reference exists, srpo\'s documented start (docs/models.md). Every key: docs/config.md.',
    ]
    text, tree, edits = render(sections, header)
    if yaml.safe_load(text) != tree:
        raise RuntimeError("srpo init wrote text that does not parse to its values")  # a bug
    load_config(tree)  # raises the same one-line error srpo train would
    return text, edits


def _cls(family: str):
    from ..models import MODELS

    return MODELS.get(family)


# ------------------------------------------------------------------ command

def add_parser(sub) -> None:
    p = sub.add_parser("init", help="write a commented starter config for a model family and a reward")
    p.add_argument("family", help="model family: flux, sd3, qwen_image, flux2, flux2_klein, z_image")
    p.add_argument("--reward", required=True, help="reward: hps, pickscore, clip, aesthetic, tiny_clip")
    p.add_argument("--output", "-o", required=True, help="the YAML file to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True,
                      help="LoRA fine-tune on one GPU (the default)")
    mode.add_argument("--full", dest="lora", action="store_false",
                      help="full fine-tune under FSDP2 on several GPUs")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args) -> int:
    output = Path(args.output)
    text, edits = build(args.family, args.reward, args.lora, str(output))
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name such as {output / 'config.yaml'}")
    if output.exists() and not args.force:
        raise UserError(f"{output} exists: pass --force to overwrite it or choose another --output")
    above = next((d for d in output.parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"cannot write {output}: {above} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    train = f"srpo train {output}" if args.lora else f"torchrun --nproc_per_node N -m srpo train {output}"
    print(f"wrote {output}: edit {', '.join(edits)} (every {PLACEHOLDER}...); srpo plan {output} --gpus N shows "
          f"the memory; once the paths exist: {train}")
    return 0
