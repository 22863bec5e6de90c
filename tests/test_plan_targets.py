"""Issue 19's plan targets (benchmarks/plan_targets.py): every image family's starter config,
as `srpo init` writes it, estimated per GPU by `srpo plan` at its flagship's dimensions."""

from __future__ import annotations

import plan_targets  # benchmarks/plan_targets.py (tests/conftest.py puts benchmarks/ on the path)


def test_the_plan_targets_hold(capsys):
    assert plan_targets.main([]) == 0
    out = capsys.readouterr().out
    assert out.count(": met") == len(plan_targets.TARGETS) and "MISSED" not in out


def test_more_gpus_lower_a_sharded_plan_and_nf4_lowers_one_gpu():
    table = plan_targets.plans()
    for family, row in table.items():
        assert row["full, FSDP x32"] < row["full, FSDP x8"], family
        assert row["LoRA, FSDP x8"] < row["LoRA, 1 GPU"], family
        assert row["LoRA, 1 GPU, NF4 base"] < row["LoRA, 1 GPU"], family
