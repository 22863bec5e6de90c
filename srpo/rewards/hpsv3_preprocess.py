"""HPSv3's input, as tensor ops: Qwen2-VL's pixel budget, patching and normalisation, and the
chat prompt with HPSv3's instruction and its ``<|Reward|>`` token.

HPSv3 resizes every image (bicubic, on an 8-bit PIL image) to exactly its pixel budget,
``min_pixels = max_pixels = 256 * 28 * 28``, keeping the aspect ratio with both sides multiples
of 28 (Qwen2-VL's ``smart_resize``); Qwen2-VL's processor then rescales, normalises with OpenAI
CLIP's mean/std, repeats the image over its 2 temporal frames and cuts 14 x 14 patches in 2 x 2
merge groups. Here the resize is :func:`srpo.rewards.preprocess.resize` (its ``uint8`` modes
reproduce PIL's 8-bit result, straight-through), the rest a reshape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize

PIXEL_BUDGET = 256 * 28 * 28  # HPSv3's min_pixels = max_pixels
MAX_RATIO = 200

REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

# HPSv3's instruction text (its data collator's), the prompt substituted for {text_prompt}.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
RATING = "\nPlease provide the overall ratings of this image: " + REWARD_TOKEN + "\n\nEND\n"


def chat_text(prompt: str) -> str:
    """The whole sequence HPSv3 scores, with one image placeholder: Qwen2-VL's chat format for a
    user turn of an image and the instruction, then the assistant's opening."""
    user = "<|vision_start|>" + IMAGE_TOKEN + "<|vision_end|>" + INSTRUCTION.format(text_prompt=prompt) + RATING
    return SYSTEM + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = PIXEL_BUDGET,
                 max_pixels: int = PIXEL_BUDGET) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of ``factor``, area within [min, max] pixels,
    the aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise UserError(f"HPSv3 scores images with an aspect ratio up to {MAX_RATIO}, got {height} x {width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class QwenVisionTransform:
    """Images in [0, 1] -> (Qwen2-VL pixel patches [B * n, 3 * 2 * 14 * 14], grid [B, 3])."""

    min_pixels: int = PIXEL_BUDGET
    max_pixels: int = PIXEL_BUDGET
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    uint8: str | None = "pil"  # HPSv3 resizes 8-bit PIL images; None: the float filter

    def __post_init__(self):
        if self.uint8 not in (None, "pil", "torch"):
            raise UserError(f"HPSv3 uint8={self.uint8!r}: use pil, torch or null")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise UserError(f"HPSv3 needs 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def tokens(self, height: int, width: int) -> int:
        """Image tokens the language model reads (after the 2 x 2 merge)."""
        h, w = self.output_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        h, w = self.output_size(*images.shape[-2:])
        x = resize(images, (h, w), "bicubic", self.uint8)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
        b, c = x.shape[:2]
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x[:, None].expand(b, t, c, h, w)  # the still image over the temporal frames
        x = x.reshape(b, t, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # merge groups, then channel, time, patch pixels
        patches = x.reshape(b * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * b, device=images.device)
        return patches, grid
