"""FLUX.2 [klein] as a FlowModel: ``Flux2KleinPipeline``'s parts on the shared FLUX.2 base
(:class:`~srpo.models.flux2.Flux2Base`: transformer, latents, schedule, VAE).

Its own: ``Qwen3ForCausalLM`` + a Qwen2 tokenizer, each prompt through the Qwen3 chat template
with thinking disabled (one at a time, as the pipeline tokenizes), hidden states of layers
(9, 18, 27) stacked; *true CFG* against the empty prompt (or ``negative_prompt``), run as two
transformer calls like the pipeline (``cfg_batched = False``), or no guidance for the
step-distilled checkpoints (model_index.json ``is_distilled``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MODELS, Cond
from .flux2 import FLUX2_DEV_TRANSFORMER, Flux2Base, lora_targets_for

# diffusers' scripts/convert_flux2_to_diffusers.py, "klein-4b" (black-forest-labs/FLUX.2-klein-4B and
# -base-4B; no guidance embedding)
FLUX2_KLEIN_4B_TRANSFORMER = dict(FLUX2_DEV_TRANSFORMER, num_layers=5, num_single_layers=20,
                                  num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)
# its text encoder: Qwen/Qwen3-4B config.json (embeddings tied)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                tie_word_embeddings=True)
QWEN3_4B_PARAMS = 4_022_468_096  # counted from it on the meta device (flux2.count_text_encoder_params)


@MODELS.register("flux2_klein")
class Flux2KleinModel(Flux2Base):
    """A Flux2KleinPipeline's parts (FLUX.2 [klein]) behind the FlowModel contract."""

    pipeline_class = "Flux2KleinPipeline"
    title = "FLUX.2 [klein]"
    lora_targets = lora_targets_for(24)  # klein 9B's single blocks (4B has 20)
    guidance_mode = "cfg"
    default_guidance = 4.0  # Flux2KleinPipeline's default (base models); 1.0 for the distilled ones
    cfg_batched = False  # the pipeline runs the conditional and the unconditional pass apart
    options = ("max_sequence_length", "text_encoder_out_layers", "quantize_timesteps", "negative_prompt")
    default_layers = (9, 18, 27)
    text_encoder_classes = ("Qwen3Config", "Qwen3ForCausalLM")
    flagship_transformer = FLUX2_KLEIN_4B_TRANSFORMER
    flagship_text_encoder = ("qwen3_4b", QWEN3_4B)
    flagship_text_params = QWEN3_4B_PARAMS
    flagship_title = "FLUX.2 [klein] 4B"

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, is_distilled: bool = False,
                 negative_prompt: str = "", **kwargs):
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **kwargs)
        self.is_distilled = bool(is_distilled)  # (a Flux2KleinPipeline component: pipeline() passes it on)
        self.negative_prompt = negative_prompt or ""
        if self.is_distilled:  # step-distilled: the pipeline ignores the guidance scale
            self.guidance_mode = "none"
            self.default_guidance = 1.0

    @classmethod
    def from_pipeline(cls, pipe, **options) -> Flux2KleinModel:
        return super().from_pipeline(pipe, is_distilled=pipe.config.is_distilled, **options)

    def _encode(self, prompts: list[str]) -> Tensor:
        ids, masks = [], []
        for p in prompts:  # one at a time, as the pipeline tokenizes them
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            inputs = self.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                    max_length=self.max_sequence_length)
            ids.append(inputs["input_ids"])
            masks.append(inputs["attention_mask"])
        return self._embeds(torch.cat(ids), torch.cat(masks))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """``Flux2KleinPipeline.encode_prompt`` (the Qwen3 chat template, thinking disabled, with
        the generation prompt) and, under CFG, the negative prompt's embeddings (the pipeline's
        ``""`` unless ``negative_prompt`` says otherwise), encoded once per batch size."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = {"prompt_embeds": self._encode(prompts)}
        if self.guidance_mode == "cfg":
            cond["negative_prompt_embeds"] = self.negative_cond(len(prompts))
        return cond

    def pipeline_images(self, cond: Cond, noise: Tensor, steps: int, guidance: float) -> Tensor:
        """``Flux2KleinPipeline.__call__`` on this model's modules, embeddings and noise."""
        pos, neg = self.guided_cond(cond, noise.shape[0], guidance)
        height, width = self.pixel_size(noise)
        return self.pipeline()(
            prompt_embeds=pos["prompt_embeds"], negative_prompt_embeds=neg.get("prompt_embeds"),
            latents=noise.to(self.device), height=height, width=width, num_inference_steps=steps,
            guidance_scale=float(guidance), output_type="pt", max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        ).images.float()
