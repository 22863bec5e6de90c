"""Captions of lab scenes and parsing of lab prompts back into content.

A caption names the content ("a red circle and a blue square") and sometimes the style, in one
of several phrasings, including the control-word form SRP uses ("Real. a red circle"). Which
captions say their style is what makes the base model drift away from photos: photo-style
training images are almost always captioned as photos, cartoon and painting images often not,
so a prompt without a style word mostly yields cartoons and paintings (see ``docs/lab.md``).
"""

from __future__ import annotations

import re

import torch

from .render import COLOUR_NAMES, SHAPES, Scene

STYLE_TEMPLATES = {
    "photo": [
        "a photo of {c}", "a realistic photo of {c}", "a detailed photo of {c}", "{c}, photo",
        "{c}, natural lighting", "{c}, realistic, detailed", "Real. {c}", "Natural-lighting. {c}",
        "Detailed. {c}", "Detail. {c}", "Photo. {c}", "Realistic. {c}",
    ],
    "cartoon": [
        "a cartoon of {c}", "a flat illustration of {c}", "an anime drawing of {c}", "{c}, cartoon",
        "{c}, flat colors", "Flat. {c}", "Anime. {c}", "Cartoon. {c}", "Illustration. {c}",
    ],
    "painting": [
        "a painting of {c}", "an oil painting of {c}", "concept art of {c}", "{c}, oil on canvas",
        "Painting. {c}", "Oil. {c}", "Concept art. {c}", "Oil painting. {c}",
    ],
}

# probability that a base-model training caption of a scene of this style names the style. With
# guidance g the base model samples photos for a plain prompt in proportion to q_photo^g against
# 2 q_other^g (q = 1 - this): about 25% at g = 1 and 10% at g = 3.5.
STYLE_WORD_PROB = {"photo": 0.64, "cartoon": 0.45, "painting": 0.45}


def content_text(content) -> str:
    """``(("red", "circle"), ("blue", "square"))`` -> ``"a red circle and a blue square"``."""
    return " and ".join(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}" for colour, shape in content)


def caption(scene: Scene, g: torch.Generator, style_prob: float | None = None, ordered: bool = False) -> str:
    """A random caption of ``scene``; ``style_prob`` overrides :data:`STYLE_WORD_PROB`.
    ``ordered``: objects are named left to right (the base model's captions: a tiny model cannot
    bind colours to shapes otherwise); else in random order."""
    content = scene.content
    # the coin is drawn even when ``ordered`` so both kinds of caption consume the generator alike
    # (the shipped base weights were built with this stream)
    if len(content) == 2 and float(torch.rand(1, generator=g)) < 0.5 and not ordered:
        content = content[::-1]
    text = content_text(content)
    p = STYLE_WORD_PROB[scene.style] if style_prob is None else style_prob
    if float(torch.rand(1, generator=g)) < p:
        options = STYLE_TEMPLATES[scene.style]
        text = options[int(torch.randint(len(options), (1,), generator=g))].format(c=text)
    return text


_OBJECT = re.compile(r"\b(" + "|".join(COLOUR_NAMES) + r")\s+(" + "|".join(SHAPES) + r")\b")


def parse_content(prompt: str) -> tuple[tuple[str, str], ...]:
    """The ``(colour, shape)`` pairs a prompt names, in order (empty if none)."""
    return tuple(_OBJECT.findall(prompt.lower()))
