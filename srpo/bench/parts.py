"""Benchmarks (b), (c), (d): cost of one update per algorithm against rollout steps and DRaFT's K,
SRPO's update against its parts timed alone, and rollout speed against diffusers' FluxPipeline.

One update here is the trainer's loop body (prompts -> noise -> rollout -> algorithm.backward ->
clip -> AdamW step), built from the same functions the trainer uses.
"""

from __future__ import annotations

import torch

from ..algorithms import ALGORITHMS, RewardFn
from ..algorithms.base import Batch
from ..data import load_prompts
from ..sampling import rollout
from ..trainer import control_words, rollout_noise
from .measure import flops, peak_memory, saved_activations, timed, timed_together


class Bench:
    """A built model + reward shared by every measurement; ``restore()`` resets the weights."""

    def __init__(self, cfg, device):
        from ..trainer import build

        self.cfg, self.device = cfg, device
        self.model, self.reward, self.srp, _ = build(cfg, device)
        self.reward_fn = RewardFn(self.reward, self.srp)
        self.prompts = load_prompts(cfg.data.prompts)[: cfg.train.batch_size]
        self.state = {k: v.clone() for k, v in self.model.transformer.state_dict().items()}

    def restore(self) -> None:
        self.model.transformer.load_state_dict(self.state)

    def config(self, algorithm: str, overrides: dict) -> object:
        cfg = self.cfg.model_copy(deep=True)
        cfg.algorithm = algorithm
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            setattr(getattr(cfg, section) if section else cfg, name, value)
        return cfg

    def update_fn(self, cfg):
        """A closure running one full update of ``cfg.algorithm`` (the trainer's loop body)."""
        model, t = self.model, cfg.train
        algorithm = ALGORITHMS.get(cfg.algorithm)(cfg, self.reward_fn)
        params = [p for p in model.transformer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
        step = [0]
        n = len(self.prompts)

        def update():
            opt.zero_grad(set_to_none=True)
            pos, neg = control_words(cfg, step[0])
            eps = rollout_noise(model, cfg, step[0], list(range(n)))
            with torch.no_grad():
                cond = model.encode_prompts(self.prompts)
                x0 = rollout(model, cond, eps, steps=cfg.rollout.steps, shift=cfg.method.shift,
                             guidance=cfg.rollout.guidance) if algorithm.needs_rollout else None
            batch = Batch(self.prompts, cond, x0, eps, step[0], list(range(n)), pos, neg, loss_scale=1.0 / n)
            algorithm.backward(model, batch)
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            step[0] += 1

        return update

    def cost(self, algorithm: str, repeats: int, **overrides) -> dict:
        """Seconds per update, peak MiB, saved-activation MiB and FLOPs of one update."""
        update = self.update_fn(self.config(algorithm, overrides))
        row = {"flops": flops(update)}  # also the warm-up: AdamW allocates its state here
        row["peak_mib"] = peak_memory(update, self.device)
        row["saved_mib"] = saved_activations(update)
        row["seconds"] = timed(update, self.device, repeats=repeats, warmup=0)
        self.restore()
        return row


def update_costs(bench: Bench, algorithms, steps=(25, 50), draft_ks=(1, 2, 4, 8), repeats: int = 3,
                 progress=print) -> dict:
    """(b): per algorithm and rollout step count, and DRaFT against K (checkpointed and plain)."""
    out: dict = {"by_steps": {}, "draft_k": {}}
    for name in algorithms:
        for s in steps:
            out["by_steps"].setdefault(name, {})[str(s)] = bench.cost(name, repeats, **{"rollout.steps": s})
            progress(f"  (b) {name} steps={s}: {out['by_steps'][name][str(s)]['seconds']:.3f}s")
    for k in draft_ks:
        for ck in (True, False):
            row = bench.cost("draft", repeats, **{"rollout.steps": steps[0], "draft.k": k, "draft.checkpoint": ck})
            out["draft_k"][f"{k}{'' if ck else '-plain'}"] = row
            progress(f"  (b) draft K={k} checkpoint={ck}: {row['seconds']:.3f}s {row['peak_mib']:.1f} MiB")
    return out


def srpo_parts(bench: Bench, repeats: int = 5) -> dict:
    """(c): SRPO's whole update against the sum of its parts timed alone (interleaved rounds)."""
    model, cfg = bench.model, bench.config("srpo", {})
    update = bench.update_fn(cfg)
    n = len(bench.prompts)
    eps = rollout_noise(model, cfg, 0, list(range(n)))
    pos, neg = control_words(cfg, 0)

    def encode():
        with torch.no_grad():
            return model.encode_prompts(bench.prompts)

    cond = encode()

    def sample():
        return rollout(model, cond, eps, steps=cfg.rollout.steps, shift=cfg.method.shift, guidance=cfg.rollout.guidance)

    batch = Batch(bench.prompts, cond, sample(), eps, 0, list(range(n)), pos, neg, loss_scale=1.0 / n)
    branch = {name: ALGORITHMS.get("srpo")(bench.config("srpo", {key: False}), bench.reward_fn)
              for name, key in (("denoise", "method.inversion_branch"), ("inversion", "method.denoise_branch"))}
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

    def step():
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)

    times = timed_together({
        "update": update,
        "encode_prompts": encode,
        "noise": lambda: rollout_noise(model, cfg, 0, list(range(n))),
        "rollout": sample,
        "denoise_branch": lambda: branch["denoise"].backward(model, batch),
        "inversion_branch": lambda: branch["inversion"].backward(model, batch),
        "optimizer": step,
    }, bench.device, repeats=repeats)
    bench.restore()
    full = times.pop("update")
    return {"update": full, "parts": times, "sum_of_parts": sum(times.values()),
            "update_over_parts": full / sum(times.values())}


def rollout_speed(bench: Bench, steps=(25, 50), repeats: int = 3) -> dict:
    """(d): our rollout + decode against ``FluxPipeline.__call__`` on the same weights, noise and
    prompt embeddings (so both do the same work: ``steps`` transformer calls and one decode)."""
    from ..models.flux import pack

    model, cfg = bench.model, bench.cfg
    if not hasattr(model, "pipeline"):
        return {"skipped": f"model {cfg.model.name} has no diffusers pipeline"}
    pipe = model.pipeline()
    h, w = cfg.rollout.height, cfg.rollout.width
    n = len(bench.prompts)
    with torch.no_grad():
        cond = model.encode_prompts(bench.prompts)
    noise = rollout_noise(model, cfg, 0, list(range(n)))
    guidance = cfg.rollout.guidance
    out = {}
    for s in steps:
        def ours():
            with torch.no_grad():
                return model.decode(rollout(model, cond, noise, steps=s, shift=cfg.method.shift, guidance=guidance))

        def theirs():
            return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                        latents=pack(noise), height=h, width=w, num_inference_steps=s, guidance_scale=guidance,
                        output_type="pt", max_sequence_length=model.max_sequence_length).images

        diff = (ours().float() - theirs().float()).abs().max().item()
        times = timed_together({"ours": ours, "theirs": theirs}, bench.device, repeats=repeats)
        t_ours, t_theirs = times["ours"], times["theirs"]
        out[str(s)] = {"ours": t_ours, "diffusers": t_theirs, "speed_over_diffusers": t_theirs / t_ours,
                       "max_pixel_difference": diff}
    return out
