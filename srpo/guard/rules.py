"""Guard rules: ``<metric> <op> <bound>``, parsed once, evaluated on each guard evaluation.

- ``metric``: a key of the guard's metrics: ``hack_index``, ``reward``, ``srp_reward``,
  ``diversity`` (relative to the base: 1 at the start), ``drift:<statistic>`` (video runs also
  ``drift:frame_difference``, ``drift:flicker``, ``drift:motion``),
  ``judge:<name>``;
- ``op``: ``<``, ``<=``, ``>``, ``>=``;
- ``bound``: a number, ``best``, ``base`` or either of them with ``+ x``, ``- x`` or ``x *`` /
  ``* x`` (``best``: the highest value of the metric so far; ``base``: its value before
  training), e.g. ``hack_index > 1.5``, ``judge:pickscore < best - 0.02``, ``diversity < 0.7 * base``.

A rule whose metric is not measured in a run (a judge that is not configured) is a config error;
a rule whose metric is not finite at an evaluation does not fire.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from ..errors import UserError

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RULE = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w:.\-]*)\s*(?P<op><=|>=|<|>)\s*(?P<bound>.+?)\s*$")
_BOUND = [
    (re.compile(rf"^(?P<x>{_NUM})$"), lambda x, ref: x),
    (re.compile(r"^(?P<ref>best|base)$"), lambda x, ref: ref),
    (re.compile(rf"^(?P<ref>best|base)\s*\+\s*(?P<x>{_NUM})$"), lambda x, ref: ref + x),
    (re.compile(rf"^(?P<ref>best|base)\s*-\s*(?P<x>{_NUM})$"), lambda x, ref: ref - x),
    (re.compile(rf"^(?P<x>{_NUM})\s*\*\s*(?P<ref>best|base)$"), lambda x, ref: x * ref),
    (re.compile(rf"^(?P<ref>best|base)\s*\*\s*(?P<x>{_NUM})$"), lambda x, ref: x * ref),
]


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str
    op: str
    ref: str | None  # "best", "base" or None
    x: float
    form: int  # index into _BOUND

    def bound(self, best: dict[str, float], base: dict[str, float]) -> float:
        ref = {"best": best, "base": base}.get(self.ref or "", {}).get(self.metric, math.nan)
        return _BOUND[self.form][1](self.x, ref)

    def holds(self, metrics: dict[str, float], best: dict[str, float], base: dict[str, float]) -> bool:
        value, bound = metrics.get(self.metric, math.nan), self.bound(best, base)
        return math.isfinite(value) and math.isfinite(bound) and OPS[self.op](value, bound)


def parse(text: str, where: str = "guard rule") -> Rule:
    m = _RULE.match(str(text))
    if not m:
        raise UserError(f"{where} '{text}' is not '<metric> <op> <bound>': write e.g. 'hack_index > 1.5' "
                        f"or 'judge:pickscore < best - 0.02'")
    bound = m.group("bound")
    for i, (pattern, _) in enumerate(_BOUND):
        b = pattern.match(bound)
        if b:
            x = float(b.groupdict().get("x") or 0.0)
            return Rule(str(text), m.group("metric"), m.group("op"), b.groupdict().get("ref"), x, i)
    raise UserError(f"{where} '{text}': bound '{bound}' is not a number, best, base, best - x, x * base ...")


def check_metrics(rules: list[Rule], known: set[str], where: str) -> None:
    for r in rules:
        if r.metric not in known:
            raise UserError(f"{where} '{r.text}' watches '{r.metric}', which this run does not measure: use one of "
                            f"{', '.join(sorted(known))}")
