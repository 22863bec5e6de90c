"""The independent judge of the lab world; never used as a reward.

- ``realism``: fraction of images a small CNN style classifier calls ``photo`` (it may also call
  an image ``degraded``: off-manifold artifacts are no photo);
- ``fidelity``: fraction of images in which the content head finds every (colour, shape) the
  prompt names;
- ``hack_index``: the largest, over saturation, contrast and sharpness, of
  ``|mean(stat over images) - mean(stat over base images)| / std(stat over base images)``.

The CNN shares nothing with the reward (a ViT CLIP): other architecture, other seeds, and it is
trained with colour/contrast/blur augmentation so its calls do not move with the hack statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import UserError
from .captions import parse_content
from ..guard.stats import LAB_STATS as STATS
from ..guard.stats import hack_index as _hack_index
from .render import COLOUR_NAMES, SHAPES, STYLES, image_stats

N_CONTENT = len(COLOUR_NAMES) * len(SHAPES)
CLASSES = STYLES + ("degraded",)  # degraded: off-manifold decodes (latent noise, grid artifacts)


def content_index(colour: str, shape: str) -> int:
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def content_target(contents) -> Tensor:
    """Multi-hot ``[B, N_CONTENT]`` of lists of (colour, shape) pairs."""
    y = torch.zeros(len(contents), N_CONTENT)
    for i, c in enumerate(contents):
        for colour, shape in c:
            y[i, content_index(colour, shape)] = 1.0
    return y


class JudgeNet(nn.Module):
    """A small CNN with a style head (photo, cartoon, painting, degraded) and a multi-label content
    head."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
            block(2 * w, 4 * w), block(4 * w, 4 * w),
        )
        self.style = nn.Linear(8 * w, len(CLASSES))
        self.content = nn.Linear(8 * w, N_CONTENT)
        self.width = width

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] -> (style logits [B, 4], content logits [B, N_CONTENT])."""
        h = self.features(images * 2 - 1)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return self.style(h), self.content(h)


class Judge:
    """Loads a trained :class:`JudgeNet` and turns its calls into the lab's metrics."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def load(cls, folder) -> "Judge":
        folder = Path(folder)
        cfg, weights = folder / "config.json", folder / "model.safetensors"
        if not cfg.is_file() or not weights.is_file():
            raise UserError(f"judge folder {folder} lacks config.json or model.safetensors: "
                            f"run `srpo lab build` to regenerate the lab weights")
        net = JudgeNet(**json.loads(cfg.read_text()))
        net.load_state_dict(load_file(str(weights)))
        return cls(net)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"width": self.net.width}))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "model.safetensors"))

    @torch.no_grad()
    def predict(self, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
        """(style index [B], content probabilities [B, N_CONTENT])."""
        styles, contents = [], []
        for i in range(0, len(images), batch):
            s, c = self.net(images[i:i + batch].float())
            styles.append(s.argmax(1))
            contents.append(torch.sigmoid(c))
        return torch.cat(styles), torch.cat(contents)

    def matches(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Per image: (judged photo-style, every named object found) as bool tensors."""
        style, probs = self.predict(images)
        found = probs > 0.5
        ok = torch.tensor([all(found[i, content_index(*o)] for o in parse_content(p)) and bool(parse_content(p))
                           for i, p in enumerate(prompts)])
        return style == CLASSES.index("photo"), ok

    def evaluate(self, images: Tensor, prompts: list[str], base_stats: dict[str, Tensor] | None = None) -> dict:
        """``realism``, ``fidelity`` and ``hack_index`` (0 without ``base_stats``) of images."""
        style, probs = self.predict(images)
        photo, ok = self.matches(images, prompts)
        stats = image_stats(images.float())
        return {
            "realism": photo.float().mean().item(),
            "degraded": (style == CLASSES.index("degraded")).float().mean().item(),
            "fidelity": ok.float().mean().item(),
            "hack_index": hack_index(stats, base_stats) if base_stats is not None else 0.0,
            **{k: v.mean().item() for k, v in stats.items()},
        }


def hack_index(stats: dict[str, Tensor], base: dict[str, Tensor]) -> float:
    """max over the lab's statistics of ``|mean(stats) - mean(base)| / std(base)``."""
    return _hack_index(stats, base, STATS)
