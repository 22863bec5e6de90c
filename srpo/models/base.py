"""The FlowModel contract: everything the trainer and sampler need from a text-to-image
flow-matching model, and nothing about how it is built."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Cond = dict[str, Tensor]  # prompt conditioning, batched on dim 0; opaque to the trainer


@runtime_checkable
class FlowModel(Protocol):
    transformer: nn.Module  # the trainable denoiser; everything else is frozen
    device: torch.device

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text conditioning for a batch of prompts (no grad)."""

    def velocity(self, latents: Tensor, sigma: Tensor, cond: Cond, guidance: float) -> Tensor:
        """Predicted velocity ``eps - x0`` at noise levels ``sigma`` ([B], in [0, 1]) with
        embedded guidance ``guidance`` (ignored by models without a guidance embedding).
        ``latents`` has the shape given by :meth:`latent_shape`."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels in [0, 1], shape [B, 3, H, W], differentiable."""

    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> latents (offline mode; no grad)."""

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the latents for images of ``height x width`` pixels."""

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass (transformer blocks, and the decoder where
        gradients flow through it)."""

    def save_transformer(self, path: str) -> None:
        """Save the transformer so the model's own library loads it from ``path``."""


def select_cond(cond: Cond, index: Any) -> Cond:
    """Slice a batched conditioning dict."""
    return {k: v[index] for k, v in cond.items()}
