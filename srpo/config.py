"""Typed training configuration: one YAML file, every field documented here and only here.

``load_config(path, overrides)`` reads YAML, applies ``--set dotted.key=value`` overrides, resolves
relative paths against the config file's folder and validates. Every problem becomes a
one-line :class:`~srpo.errors.UserError`. ``docs/config.md`` is generated from this module
(``python -m srpo.config > docs/config.md``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .models.base import DEFAULT_FAMILY

REALISM_POS = ["Natural-lighting", "Detail", "Detailed", "Real"]
REALISM_NEG = ["Concept art", "Painting", "Anime", "Flat", "Oil"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(DEFAULT_FAMILY, description="Model family: a registered name (`srpo init --help` and docs/models.md list them; tiny_<family>: its random-weight twin built in code) or a dotted path to a FlowModel subclass.")
    path: str | None = Field(None, description="Local diffusers folder of the base model, in the layout of the family's diffusers pipeline (docs/models.md).")
    transformer_path: str | None = Field(None, description="Optional folder with transformer weights that replace the base model's.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Storage dtype of the frozen parts (text encoders, VAE); trainable weights stay float32.")
    shift: float | None = Field(None, gt=0, description="Time shift m of the sampling schedule, m t / (1 + (m - 1) t); null: the family's rule (docs/models.md: the reference trainer's fixed 3 for its family, the pipeline's own scheduler config, dynamic where it asks for it, for the others).")
    quantize_timesteps: bool | None = Field(None, description="Floor the transformer's timestep input to multiples of 1/1000 as the reference FLUX trainer feeds it (noise levels themselves stay exact); null: the family's default (docs/models.md: on for the reference trainer's family, off where the pipeline feeds it unquantised).")
    quantize: Literal["none", "int8", "fp8", "nf4"] = Field("none", description="Store the frozen transformer base quantized (torchao, weight-only; LoRA on one smaller GPU): every frozen Linear weight in int8, fp8 or NF4 (NF4: weights that hold whole 64 x 256 blocks), read and quantized one layer at a time. Adapters, gradients and the optimizer stay float32; lora/ loads on the unquantized base, final/ merges into the dequantized one. Needs lora.enabled and parallel.strategy none.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of the family's load() (max_sequence_length, negative_prompt, a variant, ...; tiny_*: seed and sizes): each family's options are in docs/models.md, and an unknown one is a one-line error that lists the valid ones.")


class RewardConfig(Section):
    name: str = Field("hps", description="Reward: a registered name (hps, pickscore, clip, aesthetic, tiny_clip) or a dotted path to a factory.")
    path: str | None = Field(None, description="Local checkpoint file or folder of the reward model.")
    weight: float = Field(1.0, description="Weight of this term when several rewards are mixed.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the reward factory.")
    frames: int | list[int] = Field(4, description="Videos (video families, docs/models.md): the image reward scores this many evenly spaced frames of each video, the first and the last always among them (1: the first), or the frames at these indices (negative: from the end), and averages them per video. Images are scored as they are. A list of mixed rewards shares one setting.")

    @field_validator("frames")
    @classmethod
    def _frames(cls, v):
        if isinstance(v, int) and v < 1 or isinstance(v, list) and not v:
            raise ValueError("give a positive frame count or a non-empty list of frame indices")
        return v


class SRPConfig(Section):
    enabled: bool = Field(True, description="Semantic-relative reward. Off: plain Direct-Align on the absolute reward (the only choice for image-only rewards).")
    pos_words: list[str] = Field(default_factory=lambda: list(REALISM_POS), min_length=1, description="Positive control words, prepended as '<word>. <prompt>'.")
    neg_words: list[str] = Field(default_factory=lambda: list(REALISM_NEG), min_length=1, description="Negative control words.")
    word_order: Literal["cycle", "random"] = Field("cycle", description="Pick the update's words by cycling through the lists or at random (seeded).")
    template: str = Field("{word}. {prompt}", description="How a control word is joined to a prompt; must contain {word} and {prompt}.")
    k_pos: tuple[float, float] = Field((0.10, 0.25), description="Denoise-branch k, linear over the fine grid from low to high noise.")
    k_inv: tuple[float, float] = Field((0.30, 0.01), description="Inversion-branch k, linear over the fine grid (larger at low noise).")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and ("weighting" in data or "discount_shift" in data):
            raise ValueError("srp.weighting / srp.discount_shift moved: set method.variant: discounted "
                             "(and method.discount_shift) for the multiplicative noise discount")
        return data

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{word}" not in v or "{prompt}" not in v:
            raise ValueError("must contain {word} and {prompt}")
        return v


class MethodConfig(Section):
    variant: Literal["two_branch", "discounted"] = Field("two_branch", description="two_branch: the reference FLUX trainer's SRPO (denoise + inversion branch, hinge loss, reward (1 + k) pos - neg with k_pos / k_inv); discounted: the reference Qwen-Image trainer's (method.passes denoise-only passes per rollout sample, each with its own ts, reward pos - neg (k = 0) times the noise discount shift(linspace(0, 1, T + 1))[ts], loss -r; the branch, loss and k settings are not used).")
    passes: int = Field(2, ge=1, description="variant discounted: denoise passes per rollout sample and update, each with its own ts; the step size k of a pass is capped by the previous pass's, as in the reference Qwen-Image trainer.")
    discount_shift: float = Field(3.0, gt=0, description="variant discounted: shift m of the discount table shift(linspace(0, 1, cells + 1)) (the reference: 3).")
    index_range: tuple[int, int] = Field((5, 25), description="Training range in indices of the inference schedule (reference: 5-25; late indices bring reward hacking back).")
    schedule_steps: int = Field(50, ge=2, description="Step count of the inference schedule the index range refers to.")
    cells: int = Field(1000, ge=20, description="Cells T of the fine training grid between the range's two levels.")
    max_step_cells: int = Field(100, ge=1, description="Largest step K in fine-grid cells (about one coarse step).")
    ts_margin: int = Field(5, ge=1, description="The step index ts is drawn uniformly in [margin, T - margin].")
    denoise_branch: bool = Field(True, description="Run the denoise branch (noisier -> cleaner step).")
    inversion_branch: bool = Field(True, description="Run the inversion branch (cleaner -> noisier step, reward roles swapped).")
    loss: Literal["hinge", "linear"] = Field("hinge", description="hinge: relu(threshold - r); linear: -r.")
    hinge_threshold: float = Field(0.7, description="Threshold of the hinge loss.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "shift" in data:
            raise ValueError("method.shift moved to model.shift: the schedule belongs to the model family")
        return data

    @model_validator(mode="after")
    def _check(self):
        i0, i1 = self.index_range
        if not 0 <= i0 < i1 <= self.schedule_steps:
            raise ValueError(f"index_range {list(self.index_range)} must satisfy 0 <= start < end <= schedule_steps ({self.schedule_steps})")
        if not (self.denoise_branch or self.inversion_branch):
            raise ValueError("at least one of denoise_branch / inversion_branch must be on")
        if 2 * self.ts_margin >= self.cells:
            raise ValueError("ts_margin must be below cells / 2")
        return self


class RolloutConfig(Section):
    steps: int = Field(25, ge=1, description="Euler steps of the online rollout that produces x0.")
    guidance: float = Field(1.0, ge=0, description="Guidance of the rollout, as the family applies it: FLUX's embedded guidance (reference: 1 with HPS, 2 with PickScore), the CFG scale of true-CFG families (<= 1: one conditional pass), ignored by distilled models.")
    height: int = Field(720, ge=8, description="Image height in pixels.")
    width: int = Field(720, ge=8, description="Image width in pixels.")
    frames: int | None = Field(None, ge=1, description="Video families: frames per video (a count the family's VAE cannot take, e.g. not 4k + 1, is an error naming the nearest valid ones); null: the family's default, its pipeline's (docs/models.md). Image families take none.")


class TrainConfig(Section):
    max_steps: int = Field(20, ge=1, description="Number of optimizer updates.")
    batch_size: int = Field(1, ge=1, description="Prompts per process per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps accumulated per update.")
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate (constant).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    adamw: Literal["auto", "torch", "fused"] = Field("auto", description="AdamW's kernel. fused: one kernel updates every parameter in place (no step temporaries; srpo plan drops its optimizer-step temporaries row); torch: torch's own default (its multi-tensor foreach path on CUDA, whose step allocates about one float32 copy of the trainable weights or this rank's shard of them; a loop over tensors on the CPU); auto: fused on CUDA, torch's default elsewhere (the CPU figures in BENCHMARKS.md and docs/lab.md are that). They agree to float rounding.")
    grad_clip: float = Field(0.1, gt=0, description="Gradient clipping max norm.")
    seed: int = Field(0, ge=0, description="Seed: prompts, noise and timesteps derive from (seed, update, sample index).")
    guidance: float = Field(3.5, ge=0, description="Guidance of the gradient-carrying forward, as the family applies it (FLUX embedded: 3.5, the reference; true CFG: 1 runs the conditional pass alone, as the reference Qwen-Image trainer).")
    cfg_gradient: Literal["both", "cond"] = Field("both", description="True-CFG families, gradient forward at a CFG scale > 1: both passes carry gradient (the exact gradient of the guided velocity, twice the activations) or only the conditional pass (the unconditional one runs without gradient).")
    shared_noise: bool = Field(True, description="One rollout noise per update shared by all samples and ranks (reference); off: noise per sample.")
    autocast: Literal["none", "bf16", "fp16"] = Field("none", description="Autocast dtype of every transformer call, rollouts and gradient forwards (bf16 on GPUs; fp32 master weights either way).")
    reward_autocast: Literal["auto", "none", "bf16", "fp16"] = Field("auto", description="Autocast of the reward model's forward; auto: fp16 when train.autocast is on (the reference scores under fp16 autocast), none otherwise.")
    gradient_checkpointing: bool = Field(False, description="Activation checkpointing in the transformer blocks.")
    compile: Literal["none", "blocks", "model"] = Field("none", description="torch.compile the transformer for the rollout, the gradient forward, evaluation and the guard: blocks, each repeated block compiled on its own (one compile serves every block of a list; under FSDP each block's forward after sharding); model, the whole transformer (none or ddp; fastest: 2.0x rollout, 1.4x update on the lab). The first update pays the compile (15-55 s on a CPU); later updates reuse it. Default none: a short CPU run (the lab's 30 updates, the tiny configs) saves less than the compile costs; srpo init writes blocks for real weights (BENCHMARKS.md).")
    device: str = Field("auto", description="auto (cuda if available), cpu or cuda[:N].")
    max_bad_updates: int = Field(3, ge=1, description="Stop after this many consecutive updates skipped for a NaN/Inf loss, reward or gradient.")


class OfflineConfig(Section):
    images: str = Field(..., description="Folder of real images (png/jpg/webp) whose VAE latents replace the rollout's x0 (offline Direct-Align).")
    captions: str | None = Field(None, description="Text file with one caption per image, in sorted file-name order; none: a same-name .txt next to each image, or metadata.jsonl (file_name, text) in the folder.")
    switch_to_online_after: int | None = Field(None, ge=0, description="From this update on, x0 comes from online rollouts of data.prompts (or the captions); none: offline throughout.")


class DataConfig(Section):
    prompts: str | list[str] | None = Field(None, description="Training prompts: a text file (one per line), a .jsonl, .csv or .parquet file (column data.prompt_column), a local Hugging Face datasets folder written by save_to_disk (a DatasetDict folder gives its train split; point at FOLDER/<split> for another), or an inline list (required unless data.offline gives captioned images).")
    prompt_column: str = Field("prompt", description="The column holding the prompt in .jsonl / .csv / .parquet files and datasets folders (data.prompts and data.eval_prompts).")
    offline: OfflineConfig | None = Field(None, description="Offline mode: x0 from VAE-encoded real images with captions, fresh noise per sample.")
    eval_prompts: str | list[str] | None = Field(None, description="Held-out prompts for evaluation and the guard (any form data.prompts takes); none: skip evaluation.")
    eval_seed: int = Field(1234, description="Seed of the evaluation noise (the same before and after training).")
    eval_steps: int = Field(25, ge=1, description="Sampling steps of evaluation and sample grids.")
    eval_guidance: float = Field(3.5, ge=0, description="Guidance of evaluation and sample grids, as the family applies it (FLUX embedded guidance, CFG scale).")

    @model_validator(mode="after")
    def _need_prompts(self):
        if self.prompts is None and self.offline is None:
            raise ValueError("data.prompts is required (a prompts file or list), unless data.offline gives captioned images")
        return self


class ParallelConfig(Section):
    strategy: Literal["none", "ddp", "fsdp"] = Field("none", description="none: one process; ddp: whole model per rank, gradients averaged; fsdp: FSDP2 (fully_shard per transformer block, then the root) shards weights, gradients and optimizer state. Launch several ranks with torchrun.")
    reshard_after_forward: bool = Field(True, description="FSDP: free each block's gathered weights after its forward (less memory, one more all-gather in backward).")
    grad_sync: Literal["auto", "update", "backward"] = Field("auto", description="When gradients are reduced over ranks. update: once per update, in the last backward (SRPO's branches and the micro-batches accumulate locally first; under FSDP the trainable parameters' gradients stay unsharded until then); backward: in every backward (one reduction per branch and micro-batch). auto: update, except FSDP full fine-tuning, where holding the whole unsharded gradient on every rank would cost more memory than the extra reductions cost time.")
    find_unused_parameters: bool = Field(False, description="DDP: allow trainable parameters that get no gradient in an update (slower).")
    sharded_checkpoints: bool = Field(True, description="FSDP: every rank writes its own shards of the weights and optimizer state with torch.distributed.checkpoint (no rank gathers the full state; resumable on any number of processes; the run folder must be one every node sees). false: rank 0 gathers and writes the full state.")
    shard_reward: bool = Field(True, description="FSDP: shard the frozen reward model's image tower over the ranks as well (fully_shard per block; gathered for its forward and again for the backward to the pixels), so no rank holds it whole. Only the parts every rank calls alike are sharded (a reward's text features are cached per prompt, so its text tower stays whole on each rank).")
    async_checkpoints: bool = Field(True, description="Checkpoints are written in the background while training goes on: the state is snapshot to CPU memory at the save (sharded: each rank's shards with torch.distributed.checkpoint's async_save over a gloo group of its own; full: rank 0's, by a writer thread) and published (renamed into place) once every rank's write finished, checked after each update, so a kill mid-write leaves the previous one; one write in flight at most; the run's last checkpoint is written synchronously. false: every save blocks until written.")


class LoRAConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) on the transformer instead of all its weights; the base stays frozen in model.dtype.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] | None = Field(None, min_length=1, description="Names (or name suffixes) of the transformer's Linear layers that get adapters; null: the family's defaults (docs/models.md).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    init: Literal["zeros", "gaussian"] = Field("zeros", description="zeros: B = 0 and A Kaiming-uniform (peft's default), training starts exactly at the base model; gaussian: B = 0 and A normal with std 1 / rank. The values depend on train.seed and each adapter's name only (the same on every rank and layout).")
    save_merged: bool = Field(True, description="Also write final/ as full transformer weights with the adapters merged (srpo sample reads it); the adapters alone go to lora/.")


class MemoryConfig(Section):
    cache_text: bool = Field(True, description="Cache text-encoder outputs per prompt (on CPU) so each prompt is encoded once.")
    offload_frozen: bool = Field(False, description="Keep the text encoders on the CPU and move them to the device only to encode prompts not yet cached.")
    text_cache_dir: bool = Field(True, description="Keep each prompt's text features on disk in RUN/text_cache (one file per prompt, keyed by the model and the text; read back when needed, not held in memory), so a resumed run encodes nothing; false: features are cached in CPU memory only.")
    release_text_encoders: bool = Field(True, description="Encode every training, held-out and offline prompt once at the start, then free the text encoders for the rest of the run (srpo plan counts them for the start only); a prompt not seen at the start is then an error. false: the encoders stay loaded (for prompts that only appear later).")
    stream_text_encoders: Literal["auto"] | bool = Field("auto", description="Stream the text encoders of a model folder (srpo/streaming.py): each encoder is built on the meta device from its config.json and its repeated layers are read from its safetensors files one at a time as they run (freed when the next one is needed); embeddings, final norm and LM head are read at their first call and kept; parts text never reaches (vision towers) are never read. Features equal the whole encoder's; the encoder holds about one layer plus those parts instead of all of it. Prompts are encoded text_encode_batch at a time (each its own forward, in lock step), so each layer is read once per batch. auto: on when release_text_encoders and model.path are set; true needs model.path.")
    text_encode_batch: int = Field(8, ge=1, description="Prompts a streamed text encoder encodes per pass over its layers (each prompt its own forward, so its features do not depend on the batch): a run reads the encoder ceil(prompts / text_encode_batch) times per rank; activations grow with it.")


class GuardConfig(Section):
    enabled: bool = Field(True, description="Watch the run for reward hacking and over-optimisation: evaluate the held-out prompts (data.eval_prompts; no eval prompts: no guard) with fixed seeds before training, every guard.every updates and at the end; drift of image statistics against the base model, held-out judges, diversity; stop rules; best/ (docs/guard.md).")
    every: int = Field(10, ge=0, description="Guard evaluation every N updates (0: only before and after training).")
    prompts: int | None = Field(4, ge=1, description="The first N held-out prompts the guard renders (null: all of data.eval_prompts); at the defaults (4 x 2 seeds every 10 updates) the guard costs under 10 % of training time on the lab (BENCHMARKS.md).")
    seeds: int = Field(2, ge=1, description="Fixed seeds per held-out prompt (diversity needs 2 or more).")
    batch: int = Field(8, ge=1, description="Images per rollout batch of a guard evaluation.")
    judges: list[RewardConfig] = Field(default_factory=list, description="Held-out judges: rewards the run does not train on, scored absolutely (e.g. train on hps, watch pickscore and aesthetic); metric judge:<name> (options.label overrides the name).")
    stop_when: list[str] = Field(default_factory=lambda: ["hack_index > 1.5"], description="Rules '<metric> <op> <bound>' that stop the run cleanly (checkpoint, final/, summary naming the rule); bound: a number, best, base, best - x, x * base (e.g. 'judge:pickscore < best - 0.02', 'diversity < 0.7 * base').")
    keep_best: str | None = Field("auto", description="Keep best/ (loadable like final/) at the guard step with the highest value of this metric among those where every best_when rule holds; auto: srp_reward (reward without SRP); null: no best/.")
    best_when: list[str] = Field(default_factory=lambda: ["hack_index <= 1.0"], description="Rules a guard step must satisfy to count as best (the image statistics within one base spread by default).")

    @field_validator("stop_when", "best_when")
    @classmethod
    def _rules(cls, v: list[str]) -> list[str]:
        from .guard.rules import parse

        for text in v:
            try:
                parse(text)
            except UserError as e:
                raise ValueError(str(e)) from None
        return v


class WandbConfig(Section):
    project: str = Field(..., description="Weights & Biases project.")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="online: sync as it runs; offline: write the run under dir (wandb sync uploads it later; needs no network); disabled: no-op.")
    entity: str | None = Field(None, description="W&B entity (team or user); none: the default of the logged-in user.")
    name: str | None = Field(None, description="Run name; none: the run folder's name.")
    dir: str | None = Field(None, description="Where W&B writes its files; none: the run folder.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class LogConfig(Section):
    sample_every: int = Field(0, ge=0, description="Without the guard: a sample grid of the eval prompts every N updates (0: only before and after). With the guard, the grids are its images at each guard evaluation.")
    checkpoint_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N updates (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    tensorboard: bool = Field(True, description="Write TensorBoard events next to metrics.jsonl.")
    progress: bool = Field(True, description="Show a progress bar.")
    wandb: WandbConfig | None = Field(None, description="Also log to Weights & Biases (pip install 'srpo[wandb]'): metrics, sample grids and the resolved config, from rank 0 only.")


class BaselineSection(Section):
    reward: Literal["absolute", "relative"] = Field("absolute", description="Reward the baseline maximises: absolute (the form ReFL, DRaFT and DanceGRPO were published with) or relative (SRP paper form, f_img . (f_pos - f_neg), with the update's control words).")


class ReFLConfig(BaselineSection):
    step_fraction: tuple[float, float] = Field((0.75, 1.0), description="The gradient step is drawn uniformly among rollout steps floor(f0 T) .. ceil(f1 T) - 1 of the T-step schedule (ImageReward's ReFL: T = 40, steps 30-39, i.e. (0.75, 1.0)).")
    loss: Literal["relu", "linear"] = Field("relu", description="relu: relu(threshold - r) (ImageReward's ReFL, threshold 2 on ImageReward's scale; below the threshold it is -r + const); linear: -r.")
    threshold: float = Field(2.0, description="Threshold of the relu loss (ImageReward's ReFL: 2.0).")

    @model_validator(mode="after")
    def _check(self):
        f0, f1 = self.step_fraction
        if not 0 <= f0 < f1 <= 1:
            raise ValueError(f"step_fraction {list(self.step_fraction)} must satisfy 0 <= f0 < f1 <= 1")
        return self


class DRaFTConfig(BaselineSection):
    k: int = Field(1, ge=1, description="Back-propagate through the last K rollout steps (DRaFT, Clark et al. 2023: K = 1, 'DRaFT-1', trained best; K = all steps is full DRaFT). Capped at rollout.steps.")
    checkpoint: bool = Field(True, description="Recompute each of the K steps in the backward pass (torch.utils.checkpoint) so activation memory does not grow with K (DRaFT: on).")


class GRPOConfig(BaselineSection):
    group_size: int = Field(12, ge=2, description="Rollouts per prompt, whose rewards are normalised together (DanceGRPO FLUX: 12; Flow-GRPO: 24).")
    steps: int | None = Field(None, ge=2, description="SDE sampling steps of the rollouts; null: rollout.steps (DanceGRPO FLUX: 16; Flow-GRPO: 10 for training).")
    eta: float = Field(0.3, gt=0, description="SDE noise level eta, sigma_t = eta sqrt(t / (1 - t)) (DanceGRPO FLUX: 0.3; Flow-GRPO: 0.7).")
    timestep_fraction: float = Field(0.6, gt=0, le=1, description="Fraction of the sampling steps trained on, a random subset per prompt (DanceGRPO FLUX: 0.6; Flow-GRPO: 0.99).")
    ignore_last: bool = Field(True, description="Never train on the last sampling step (DanceGRPO: --ignore_last).")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip epsilon (DanceGRPO and Flow-GRPO: 1e-4).")
    adv_clip: float = Field(5.0, gt=0, description="Advantages are clipped to [-adv_clip, adv_clip] (DanceGRPO and Flow-GRPO: 5).")
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the base model (DanceGRPO: 0, none; Flow-GRPO: 0.04). > 0 keeps a frozen copy of the base transformer.")
    same_group_noise: bool = Field(True, description="All rollouts of a group start from the same noise and differ by the SDE noise only (DanceGRPO: --init_same_noise); off: one noise per rollout (Flow-GRPO).")
    log_prob: Literal["mean", "sum"] = Field("mean", description="Per-step log-probability in the ratio: mean over latent elements (DanceGRPO and Flow-GRPO) or the exact sum.")
    chunk: int | None = Field(None, ge=1, description="Rollouts per gradient forward when recomputing log-probabilities; null: the whole group (DanceGRPO: 1).")


class Config(Section):
    algorithm: str = Field("srpo", description="Training algorithm: srpo (Direct-Align + SRP; with srp.enabled false, plain Direct-Align), direct_align (SRPO with the absolute reward, for ablations), the baselines refl, draft, grpo (see docs/algorithms.md), or a dotted path to an Algorithm factory.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The flow model to fine-tune.")
    reward: RewardConfig | list[RewardConfig] = Field(default_factory=RewardConfig, description="One reward, or a list mixed by weight.")
    srp: SRPConfig = Field(default_factory=SRPConfig, description="Semantic-relative preference: control words and weights.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Direct-Align timesteps, branches and loss.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Online rollout producing x0.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    data: DataConfig = Field(..., description="Prompts, or captioned images for offline mode.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Multi-GPU / multi-node strategy (see docs/scale.md).")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA fine-tuning instead of full fine-tuning.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Text-feature cache and offloading of frozen parts.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Reward-hacking and over-optimisation guard (docs/guard.md).")
    log: LogConfig = Field(default_factory=LogConfig, description="Run-folder outputs.")
    refl: ReFLConfig = Field(default_factory=ReFLConfig, description="ReFL baseline (algorithm: refl).")
    draft: DRaFTConfig = Field(default_factory=DRaFTConfig, description="DRaFT-K baseline (algorithm: draft).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO baseline, DanceGRPO / Flow-GRPO style (algorithm: grpo).")

    @model_validator(mode="after")
    def _compiled(self):
        if self.train.compile == "model" and self.parallel.strategy == "fsdp":
            raise ValueError("train.compile model does not compose with parallel.strategy fsdp (FSDP2 shards block "
                             "by block): use train.compile blocks under FSDP")
        return self

    @model_validator(mode="after")
    def _quantized_base(self):
        if self.model.quantize != "none" and not self.lora.enabled:
            raise ValueError(f"model.quantize {self.model.quantize} needs lora.enabled: true (a quantized base is frozen; "
                             f"full fine-tuning trains every weight)")
        if self.model.quantize != "none" and self.parallel.strategy != "none":
            raise ValueError(f"model.quantize {self.model.quantize} is for one GPU (parallel.strategy none); on several, "
                             f"FSDP shards the bf16 base instead")
        return self


# ------------------------------------------------------------------ loading

def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise UserError(f"--set {key}: '{p}' is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{item}': expected dotted.key=value, e.g. --set train.lr=1e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (see docs/config.md for the valid keys)"
    elif err["type"] == "missing":
        msg = "missing required key"
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"config error at {where or '<root>'}: {msg}{shown}{more}"


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() or not Path(value).exists() else value


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Make relative file paths relative to the config file's folder."""
    cfg.model.path = _resolve(cfg.model.path, base)
    cfg.model.transformer_path = _resolve(cfg.model.transformer_path, base)
    for r in cfg.reward if isinstance(cfg.reward, list) else [cfg.reward]:
        r.path = _resolve(r.path, base)
    if isinstance(cfg.data.prompts, str):
        cfg.data.prompts = _resolve(cfg.data.prompts, base)
    if isinstance(cfg.data.eval_prompts, str):
        cfg.data.eval_prompts = _resolve(cfg.data.eval_prompts, base)
    if cfg.data.offline is not None:
        cfg.data.offline.images = _resolve(cfg.data.offline.images, base)
        cfg.data.offline.captions = _resolve(cfg.data.offline.captions, base)
    return cfg


def validate(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e)) from None


BUILTIN = Path(__file__).resolve().parent / "configs"  # package data: tiny*, lab and the real-model templates


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def find_config(source: str | Path) -> Path:
    """A config file: a path, or the name of a built-in config (``tiny``, ``tiny-sd3``, ``lab``,
    ``flux-hps``, ...) that ships with the package."""
    path = Path(source)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        candidate = BUILTIN / f"{path.stem}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"config file not found: {path} (built-in configs by name: {', '.join(builtin_configs())})")


def apply_values(tree: dict, values: dict, prefix: str = "") -> dict:
    """Python overrides: ``{"train.lr": 1e-5}`` or nested ``{"train": {"lr": 1e-5}}``."""
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted.split(".")[0] in Config.model_fields and dotted.count(".") < 1:
            apply_values(tree, value, dotted + ".")
        else:
            _set_dotted(tree, dotted, value)
    return tree


def load_config(source: str | Path | dict, overrides: list[str] | None = None, values: dict | None = None) -> Config:
    """Load, override, validate. ``source`` is a YAML path, a built-in config's name or an
    already-parsed dict; ``overrides`` are ``--set`` strings, ``values`` Python values by
    dotted key or section dict (applied after ``overrides``)."""
    base = Path.cwd()
    if isinstance(source, dict):
        tree = source
    else:
        path = find_config(source)
        try:
            tree = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" near line {line + 1}" if line is not None else ""
            raise UserError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
        if tree is None:
            raise UserError(f"config file {path} is empty")
        if not isinstance(tree, dict):
            raise UserError(f"config file {path} must be a mapping of sections (model:, reward:, ...)")
        base = path.resolve().parent
    tree = apply_overrides(copy.deepcopy(tree), overrides or [])
    tree = apply_values(tree, values or {})
    return resolve_paths(validate(tree), base)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _section_type(annotation):
    """The Section class inside an annotation (``X``, ``X | None``, ``X | list[X]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _default(f) -> Any:
    if f.is_required():
        return "required"
    return f.default_factory() if f.default_factory else f.default


def _section_rows(prefix: str, section: type[Section], nested: list) -> list[str]:
    rows = []
    for key, f in section.model_fields.items():
        sub = _section_type(f.annotation)
        if sub is not None:  # a nested section: its own table after this one
            nested.append((f"{prefix}.{key}", f, sub))
            rows.append(f"| `{prefix}.{key}` | `{_default(f)}` | {f.description} Keys: `{prefix}.{key}.*` below. |")
            continue
        rows.append(f"| `{prefix}.{key}` | `{_default(f)}` | {f.description} |")
    return rows


def config_docs() -> str:
    """Markdown reference of every field, nested sections included (the one place fields are
    documented)."""
    lines = ["# Configuration reference", "", "Generated from `srpo/config.py` by `python -m srpo.config`.", ""]
    queue = []
    for name, field in Config.model_fields.items():
        section = _section_type(field.annotation)
        if section is None:
            lines += [f"## `{name}`", "", f"{field.description} Default: `{field.default}`.", ""]
            continue
        queue.append((name, field, section))
    while queue:
        name, field, section = queue.pop(0)
        nested: list = []
        lines += [f"## `{name}`", "", field.description or "", "", "| key | default | meaning |", "| --- | --- | --- |"]
        lines += _section_rows(name, section, nested)
        lines.append("")
        queue = nested + queue
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_docs())
