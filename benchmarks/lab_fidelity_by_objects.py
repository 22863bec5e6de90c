"""The lab base model's judge fidelity on held-out prompts with one object against two objects
(2 seeds per prompt, as `srpo lab` evaluates).

    OMP_NUM_THREADS=1 python benchmarks/lab_fidelity_by_objects.py
"""

from pathlib import Path

import torch

from srpo.data import load_prompts
from srpo.lab.judge import Judge
from srpo.lab.run import EVAL_REPEATS, Evaluator, lab_config


def main() -> None:
    torch.set_num_threads(1)
    cfg = lab_config()
    heldout = load_prompts(cfg.data.eval_prompts, "lab held-out prompts", cfg.data.prompt_column)
    judge = Judge.load(Path(cfg.model.path).parent / "judge")
    for name, prompts in (("one object", [p for p in heldout if " and " not in p]),
                          ("two objects", [p for p in heldout if " and " in p])):
        metrics, _ = Evaluator(cfg, prompts * EVAL_REPEATS, judge)()
        print(f"{name}: {len(prompts)} prompts, fidelity {metrics['fidelity']:.3f}, realism {metrics['realism']:.3f}")


if __name__ == "__main__":
    main()
