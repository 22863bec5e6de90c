"""Where a lab rollout step's time goes: one FluxModel.velocity call for 8 prompts against the
FLUX rotary embedding inside it (the per-step work diffusers and srpo could cache differently).

    OMP_NUM_THREADS=1 python benchmarks/velocity_profile.py
"""

import time

import torch

from srpo.lab.build import WEIGHTS
from srpo.models.flux import FluxModel, image_ids


def per_call_ms(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    torch.set_num_threads(1)
    model = FluxModel.load(WEIGHTS / "base", max_sequence_length=16)
    ids = torch.cat([torch.zeros(16, 3), image_ids(16, 16, torch.device("cpu"), torch.float32)])
    with torch.no_grad():
        cond = model.encode_prompts(["a red circle"] * 8)
        x = torch.randn(8, 4, 16, 16)
        rope = per_call_ms(lambda: model.transformer.pos_embed(ids), 200)
        velocity = per_call_ms(lambda: model.velocity(x, 0.5, cond, 3.5), 50)
    print(f"velocity (8 prompts): {velocity:.2f} ms; rotary embedding: {rope:.2f} ms ({rope / velocity:.1%})")


if __name__ == "__main__":
    main()
