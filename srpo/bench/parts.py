"""Benchmarks (b), (c), (d): cost of one update per algorithm against rollout steps and DRaFT's K,
SRPO's update against its parts timed alone, and rollout speed against each family's diffusers pipeline.

One update here is the trainer's own :func:`srpo.step.update` (prompts -> noise -> rollout ->
algorithm.backward -> clip -> AdamW step).
"""

from __future__ import annotations

import time

import torch

from .. import parallel, setup, step as steps
from ..algorithms import ALGORITHMS
from ..data import load_prompts
from ..sampling import rollout
from .measure import flops, peak_memory, saved_activations, timed, timed_together


class Bench:
    """A built model + reward shared by every measurement; ``restore()`` resets the weights."""

    def __init__(self, cfg, device):
        from .. import memory

        self.cfg, self.device = cfg, device
        self.model, self.reward_fn, _ = setup.build(cfg, device)
        memory.prepare(self.model, cfg)  # the trainer's precision and memory settings
        self.prompts = load_prompts(cfg.data.prompts, column=cfg.data.prompt_column)[: cfg.train.batch_size]
        self.state = {k: v.clone() for k, v in self.model.transformer.state_dict().items()}
        self.ctx = parallel.Context(device=device)

    def restore(self) -> None:
        self.model.transformer.load_state_dict(self.state)

    def config(self, algorithm: str, overrides: dict) -> object:
        cfg = self.cfg.model_copy(deep=True)
        cfg.algorithm = algorithm
        cfg.train.grad_accum = 1
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            setattr(getattr(cfg, section) if section else cfg, name, value)
        return cfg

    def update_fn(self, cfg):
        """A closure running one full update of ``cfg.algorithm``: the trainer's own
        :func:`srpo.step.update` on the bench's prompts."""
        model = self.model
        algorithm = ALGORITHMS.get(cfg.algorithm)(cfg, self.reward_fn)
        params = [p for p in model.transformer.parameters() if p.requires_grad]
        opt = setup.make_optimizer(params, cfg)
        batches = steps.Batches(cfg, model, algorithm, self.prompts, self.ctx)
        step = [0]

        def update():
            steps.update(model, algorithm, opt, params, batches, cfg, self.ctx, step[0])
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
    eps = steps.rollout_noise(model, cfg, 0, list(range(n)))
    pos, neg = steps.control_words(cfg, 0)

    def encode():
        with torch.no_grad():
            return model.encode_prompts(bench.prompts)

    cond = encode()

    def sample():
        return rollout(model, cond, eps, steps=cfg.rollout.steps, guidance=cfg.rollout.guidance)

    batch = steps.Batch(bench.prompts, cond, sample(), eps, 0, list(range(n)), pos, neg, loss_scale=1.0 / n)
    branch = {name: ALGORITHMS.get("srpo")(bench.config("srpo", {key: False}), bench.reward_fn)
              for name, key in (("denoise", "method.inversion_branch"), ("inversion", "method.denoise_branch"))}
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    t = cfg.train
    opt = setup.make_optimizer(params, cfg)

    def step():
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)

    times = timed_together({
        "update": update,
        "encode_prompts": encode,
        "noise": lambda: steps.rollout_noise(model, cfg, 0, list(range(n))),
        "rollout": sample,
        "denoise_branch": lambda: branch["denoise"].backward(model, batch),
        "inversion_branch": lambda: branch["inversion"].backward(model, batch),
        "optimizer": step,
    }, bench.device, repeats=repeats)
    bench.restore()
    full = times.pop("update")
    return {"update": full, "parts": times, "sum_of_parts": sum(times.values()),
            "update_over_parts": full / sum(times.values())}


def rollout_speed(model, prompts: list[str], noise: torch.Tensor, guidance: float, steps_list=(25, 50),
                  repeats: int = 3, device=None, compile: str = "none") -> dict:
    """(d): our rollout + decode against the family's diffusers pipeline ``__call__``
    (``model.pipeline_images``) on the same weights, noise and prompt embeddings, so both do the
    same work: ``steps`` guided transformer calls and one decode. With ``compile`` (a
    ``train.compile`` mode) ours runs compiled, the pipeline eagerly as users run it, and our eager
    rollout is timed beside both; the one-time compile is timed apart (``first_call_s``)."""
    from .. import compilation

    with torch.no_grad():
        cond = model.encode_prompts(prompts)
    out = {"pipeline": model.pipeline_class}
    tr = model.transformer

    def ours(s):
        with torch.no_grad():
            return model.decode(rollout(model, cond, noise, steps=s, guidance=guidance))

    def ours_eager(s):
        with compilation.eager(tr):
            return ours(s)

    def theirs(s):
        with torch.no_grad(), compilation.eager(tr):
            return model.pipeline_images(cond, noise, s, guidance)

    if compile != "none":
        torch._dynamo.reset()  # a cold cache: first_call_s is this model's whole compile
        compilation.apply(tr, compile)
        t0 = time.perf_counter()
        ours(steps_list[0])
        out["first_call_s"] = time.perf_counter() - t0  # compile + one rollout
    for s in steps_list:
        image, eager_image = ours(s).float(), ours_eager(s).float()
        fns = {"ours": lambda: ours(s), "theirs": lambda: theirs(s)}
        if compile != "none":
            fns["ours_eager"] = lambda: ours_eager(s)
        times = timed_together(fns, device or model.device, repeats=repeats)
        row = {"ours": times["ours"], "diffusers": times["theirs"], "speed_over_diffusers": times["theirs"] / times["ours"],
               "max_pixel_difference": (image - theirs(s).float()).abs().max().item()}
        if compile != "none":
            row.update(ours_eager=times["ours_eager"], eager_speed_over_diffusers=times["theirs"] / times["ours_eager"],
                       compile_speedup=times["ours_eager"] / times["ours"],
                       compiled_vs_eager_max_diff=(image - eager_image).abs().max().item())
        out[str(s)] = row
    if compile != "none":
        compilation.remove(tr)
    return out


def timed_rollout(model, cfg, prompts: list[str], guidance: float, steps_list=(25, 50), repeats: int = 3,
                  device=None, compile: str = "none") -> dict:
    """:func:`rollout_speed` of ``model`` on ``cfg``'s rollout noise, the timestep fed unquantised
    as the pipelines feed it (``quantize_timesteps`` is restored after)."""
    quantize = getattr(model, "quantize_timesteps", None)
    if quantize is not None:
        model.quantize_timesteps = False
    try:
        noise = steps.rollout_noise(model, cfg, 0, list(range(len(prompts))))
        return rollout_speed(model, prompts, noise, guidance, steps_list, repeats, device, compile)
    finally:
        if quantize is not None:
            model.quantize_timesteps = quantize


def compared_twins(model) -> list[str]:
    """(d)'s other models: for each guidance path ``model`` does not take (guidance mode, and for
    true CFG whether both passes run as one batch), the tiny twin of the first registered family
    that takes it; the model's own family is left out."""
    from ..models import MODELS

    seen, twins = {(model.guidance_mode, model.cfg_batched)}, []
    for name in MODELS.names():
        cls = MODELS.get(name)
        if cls.is_twin() or not cls.tiny_twin or isinstance(model, cls):
            continue
        twin = MODELS.get(cls.tiny_twin)
        path = (twin.guidance_mode, twin.cfg_batched if twin.guidance_mode == "cfg" else True)
        if path not in seen:
            seen.add(path)
            twins.append(cls.tiny_twin)
    return twins


def every_twin(model) -> list[str]:
    """The tiny twin of every registered family but ``model``'s own, each once."""
    from ..models import MODELS

    names = [MODELS.get(n).tiny_twin for n in MODELS.names()
             if not MODELS.get(n).is_twin() and MODELS.get(n).tiny_twin and not isinstance(model, MODELS.get(n))]
    return list(dict.fromkeys(names))


def rollout_speeds(bench: Bench, steps_list=(25, 50), repeats: int = 3, twins=None, compile: str = "none") -> dict:
    """(d) for the bench's model and tiny random twins (``twins``: registry names; default the
    :func:`compared_twins`), each at its family's default guidance, at the bench's image size and
    batch, ours compiled with ``compile`` when not none. Keys: the bench model's config name, then
    the twins' registry names."""
    from ..models import family

    cfg, model = bench.cfg, bench.model
    out = {cfg.model.name: timed_rollout(model, cfg, bench.prompts, cfg.rollout.guidance, steps_list, repeats,
                                         bench.device, compile)}
    for name in compared_twins(model) if twins is None else twins:
        twin = family(name).load(device=bench.device)
        out[name] = timed_rollout(twin, cfg, bench.prompts, twin.default_guidance, steps_list, repeats, bench.device,
                                  compile)
    return out
