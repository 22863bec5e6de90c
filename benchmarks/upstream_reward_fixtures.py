"""Write tests/fixtures/upstream_rewards.json: what the upstream HPSv3 and ImageReward code scores
on srpo's tiny random-weight twins, for the parity tests (tests/test_rewards_hpsv3.py,
tests/test_rewards_imagereward.py).

Upstream cannot import beside srpo's pins (``hpsv3`` pins transformers 4.45.2, ``image-reward``
timm 0.6.13 and fairscale), so this script runs in two halves:

1. srpo's side (run it with srpo's venv): writes the tiny twins in the upstream file layouts to a
   work folder (``HPSv3.safetensors`` + a Qwen2-VL folder: config, tokenizer, chat template,
   image processor; ``ImageReward.pt`` + ``med_config.json`` + a BERT vocab.txt), 8-bit test images
   as PNG files and the prompts; then runs itself with ``--upstream`` in the upstream venv.
2. upstream's side (``--upstream``, in the venv): imports the upstream packages' own modules
   and scores the PNG files with their own entry points on those weights:
   ``hpsv3.HPSv3RewardInferencer(config_path, checkpoint_path).reward(paths, prompts)`` (its
   config YAML is HPSv3_7B.yaml with the tiny folder and float32), and ``ImageReward.ImageReward``
   (its __init__, load_state_dict and ``score(prompt, PIL image)``). Only what their import
   chains need for training or for other scorers (trl, peft, matplotlib, tensorboard, datasets,
   fire, deepspeed, fairscale, OpenAI clip) is replaced by empty stand-ins, and the sizes are made tiny: ImageReward's
   hard-wired ViT-L / MLP(768) become the tiny widths (``create_vit`` and ``MLP`` wrapped), and
   BLIP's ``BertTokenizer.from_pretrained('bert-base-uncased')`` reads the tiny vocab.txt.

The fixture keeps the images (uint8), prompts, upstream's scores and a checksum of the weights;
the tests rebuild the same weights from the seed (``hpsv3_tiny.tiny_weights``,
``imagereward_tiny.tiny_weights``: seeded CPU ``torch.randn``) and fail loudly if the checksum moved.

How the committed fixture was made (CPU, Python 3.11)::

    python3 -m venv /tmp/upstream-venv
    /tmp/upstream-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.45.2 \\
        timm==0.6.13 accelerate==0.34.2 pillow numpy pandas requests packaging pyyaml omegaconf safetensors
    /tmp/upstream-venv/bin/pip install --no-deps hpsv3==1.0.0 image-reward==1.5
    . .venv/bin/activate && python benchmarks/upstream_reward_fixtures.py --venv /tmp/upstream-venv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "upstream_rewards.json")
SIZES = [(64, 64), (48, 80), (90, 40)]  # (h, w) of the test images
PROMPTS = ["a photo of a red cat", "Real. an oil painting of a harbour at night", "a dog on a beach"]


def test_images():
    """Smooth 8-bit RGB images, [N] of [h, w, 3] uint8 (as lists, for JSON)."""
    import torch
    import torch.nn.functional as F

    out = []
    for i, (h, w) in enumerate(SIZES):
        g = torch.Generator().manual_seed(100 + i)
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]
        out.append((x * 255).round().to(torch.uint8).permute(1, 2, 0))
    return out


def checksum(weights: dict) -> float:
    return float(sum(v.double().abs().sum() for k, v in sorted(weights.items()) if v.is_floating_point()))


# ---------------------------------------------------------------------- srpo's side

def write_inputs(work: str) -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from srpo.rewards import hpsv3_tiny, imagereward_tiny

    os.makedirs(work, exist_ok=True)
    images = test_images()
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(work, f"image{i}.png"))
        Image.fromarray(im.numpy()).save(paths[-1])
    # HPSv3: the Qwen2-VL folder (tokenizer without <|Reward|>, as Qwen's own) + the checkpoint
    qwen = os.path.join(work, "qwen")
    os.makedirs(qwen, exist_ok=True)
    tok = hpsv3_tiny.tiny_tokenizer(reward_token=False)
    tok.save_pretrained(qwen)
    full = hpsv3_tiny.tiny_tokenizer()
    config = hpsv3_tiny.tiny_config(full)
    weights = hpsv3_tiny.tiny_weights(config, seed=0)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(work, "HPSv3.safetensors"))
    base = {k: (v[: len(tok)] if k in ("model.embed_tokens.weight", "lm_head.weight") else v).contiguous()
            for k, v in weights.items() if not k.startswith("rm_head.")}
    save_file(base, os.path.join(qwen, "model.safetensors"), metadata={"format": "pt"})
    ids = {n: getattr(config, n) for n in ("image_token_id", "video_token_id", "vision_start_token_id",
                                           "vision_end_token_id")}
    hps = dict(qwen=qwen, checkpoint=os.path.join(work, "HPSv3.safetensors"), dims=hpsv3_tiny.TINY_DIMS,
               vocab_size=len(tok), token_ids=ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               chat_template=hpsv3_tiny.CHAT_TEMPLATE)
    # ImageReward
    ir_files = imagereward_tiny.save_tiny_imagereward(os.path.join(work, "imagereward"), seed=0)
    ir = dict(ir_files, vision=ir_files.pop("vit"))
    sums = {"hpsv3": checksum(weights), "imagereward": checksum(torch.load(ir_files["path"], weights_only=True))}
    return dict(images=paths, prompts=PROMPTS, hpsv3=hps, imagereward=ir, checksums=sums)


def main_srpo(venv: str, work: str) -> None:
    inputs = write_inputs(work)
    spec = os.path.join(work, "inputs.json")
    with open(spec, "w") as f:
        json.dump(inputs, f)
    out = os.path.join(work, "upstream.json")
    env = dict(os.environ, PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([os.path.join(venv, "bin", "python"), __file__, "--upstream", spec, out], check=True, env=env,
                   cwd=work)
    with open(out) as f:
        scores = json.load(f)
    fixture = dict(
        made_by="benchmarks/upstream_reward_fixtures.py (see its docstring)",
        upstream=scores.pop("versions"), seed=0, prompts=PROMPTS, sizes=SIZES,
        images=[im.tolist() for im in test_images()], checksums=inputs["checksums"], **scores)
    with open(FIXTURE, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {os.path.normpath(FIXTURE)} ({os.path.getsize(FIXTURE) / 1024:.0f} KB): {scores}")


# ---------------------------------------------------------------------- upstream's side

STUBBED = ("trl", "peft", "matplotlib", "matplotlib.pyplot", "matplotlib.patches", "torch.utils.tensorboard",
           "datasets", "fire", "deepspeed", "fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
           "fairscale.nn.checkpoint.checkpoint_activations", "clip")


class _Stub(types.ModuleType):
    """A module whose every attribute is a placeholder class (training-only imports)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def install_stubs() -> None:
    import importlib.machinery

    import torch  # noqa: F401  (imported first: their availability checks see the real environment)
    import transformers  # noqa: F401
    import transformers.trainer  # noqa: F401

    for name in STUBBED:
        sys.modules[name] = _Stub(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules["trl"].get_quantization_config = lambda cfg: None
    sys.modules["trl"].get_kbit_device_map = lambda: None
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = lambda m, **k: m


def upstream_qwen_folder(hps: dict) -> None:
    """Complete the tiny Qwen2-VL folder the way Qwen2-VL-7B-Instruct's looks for transformers
    4.45: a flat config.json, the image processor's and the chat template's files."""
    d = hps["dims"]
    config = dict(
        architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", vocab_size=hps["vocab_size"],
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"], rms_norm_eps=d["rms_norm_eps"], rope_theta=d["rope_theta"],
        max_position_embeddings=d["max_position_embeddings"], hidden_act="silu", attention_dropout=0.0,
        use_sliding_window=False, tie_word_embeddings=False, torch_dtype="float32",
        rope_scaling={"type": "mrope", "mrope_section": d["mrope_section"]},
        bos_token_id=hps["pad_token_id"], eos_token_id=hps["eos_token_id"], **hps["token_ids"],
        vision_config=dict(depth=d["vision_depth"], embed_dim=d["vision_embed_dim"], hidden_size=d["hidden_size"],
                           num_heads=d["vision_num_heads"], mlp_ratio=d["vision_mlp_ratio"], in_chans=3,
                           patch_size=d["patch_size"], spatial_merge_size=d["spatial_merge_size"],
                           temporal_patch_size=d["temporal_patch_size"], hidden_act="quick_gelu"))
    q = hps["qwen"]
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(q, "preprocessor_config.json"), "w") as f:
        json.dump(dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor",
                       min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3,
                       rescale_factor=1 / 255), f)
    with open(os.path.join(q, "chat_template.json"), "w") as f:
        json.dump({"chat_template": hps["chat_template"]}, f)


def upstream_hpsv3(spec: dict) -> list[float]:
    import hpsv3
    import yaml

    hps = spec["hpsv3"]
    upstream_qwen_folder(hps)
    with open(os.path.join(os.path.dirname(hpsv3.__file__), "config", "HPSv3_7B.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg.update(model_name_or_path=hps["qwen"], bf16=False, torch_dtype="float32", disable_flash_attn2=True,
               output_dir=os.path.join(os.path.dirname(hps["qwen"]), "out"), report_to="none")
    cfg.pop("deepspeed", None)
    path = os.path.join(os.path.dirname(hps["qwen"]), "hpsv3_tiny.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    inferencer = hpsv3.HPSv3RewardInferencer(config_path=path, checkpoint_path=hps["checkpoint"], device="cpu")
    import torch

    with torch.no_grad():
        logits = inferencer.reward(spec["images"], spec["prompts"])
    return [float(v) for v in logits[:, 0]]  # the mean, as upstream reads it


def upstream_imagereward(spec: dict) -> list[float]:
    import torch
    from PIL import Image

    ir = spec["imagereward"]
    import importlib.util

    package = types.ModuleType("ImageReward")  # its __init__ imports ReFL (diffusers): only the model modules
    package.__path__ = list(importlib.util.find_spec("ImageReward").submodule_search_locations)
    sys.modules["ImageReward"] = package
    import ImageReward.ImageReward as IR
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    width, layers, heads = (ir["vision"][k] for k in ("width", "layers", "heads"))

    def tiny_vit(vit, image_size, *args):  # upstream hard-wires ViT-L: the same class, tiny sizes
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=width, depth=layers,
                                 num_heads=heads, drop_path_rate=0.0), width

    class TinyBert(blip.BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return super().from_pretrained(ir["tokenizer_path"])

    original_mlp = IR.MLP
    blip_pretrain.create_vit = tiny_vit
    blip.BertTokenizer = TinyBert
    IR.MLP = lambda input_size: original_mlp(json.load(open(ir["med_config"]))["hidden_size"])
    model = IR.ImageReward(med_config=ir["med_config"], device="cpu")
    missing, unexpected = model.load_state_dict(torch.load(ir["path"], map_location="cpu"), strict=False)
    assert not unexpected and all(k.split(".")[1] in ("vision_proj", "text_proj") for k in missing), (missing, unexpected)
    model.eval()
    with torch.no_grad():
        return [float(model.score(p, Image.open(f))) for p, f in zip(spec["prompts"], spec["images"])]


def main_upstream(spec_path: str, out: str) -> None:
    install_stubs()
    with open(spec_path) as f:
        spec = json.load(f)
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("hpsv3", "image-reward", "transformers", "torch", "timm", "pillow")}
    result = dict(hpsv3=upstream_hpsv3(spec), imagereward=upstream_imagereward(spec), versions=versions)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", default="/tmp/upstream-venv", help="the upstream venv (see the docstring)")
    ap.add_argument("--work", default="/tmp/upstream-reward-work", help="scratch folder")
    ap.add_argument("--upstream", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.upstream:
        main_upstream(*a.upstream)
    else:
        main_srpo(a.venv, a.work)
