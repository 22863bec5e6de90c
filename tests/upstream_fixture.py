"""The upstream scorers' fixture (written by benchmarks/upstream_reward_fixtures.py): its record and
its images as ``[1, 3, H, W]`` floats in [0, 1]."""

import json
from pathlib import Path

import torch

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "upstream_rewards.json").read_text())


def fixture_images():
    return [torch.tensor(im, dtype=torch.uint8).permute(2, 0, 1)[None].float() / 255 for im in FIXTURE["images"]]
