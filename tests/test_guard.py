"""The guard's pieces without training: image statistics, drift and hack index, diversity, the
stop / best rules, the Guard's decisions and its resumable state.

Every expected number here is computed by hand (or in float64 numpy from the definition), not by
calling the function under test a second time.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from srpo.config import load_config
from srpo.errors import UserError
from srpo.guard import rules as R
from srpo.guard.monitor import Guard
from srpo.guard.stats import LAB_STATS, STATS, diversity, drift, hack_index, image_stats
from srpo.lab.render import adjust

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LUMA = np.array([0.299, 0.587, 0.114])
WHITE_LUMA = float(LUMA.sum())  # luma of (1, 1, 1)


def _const(rgb, h=8, w=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, h, w).contiguous()


def _grey(plane: np.ndarray) -> torch.Tensor:
    """A grey image [1, 3, H, W] whose three channels are ``plane``."""
    return torch.tensor(np.repeat(plane[None, None], 3, axis=1), dtype=torch.float32)


def _stats(images):
    return {k: v.double().numpy() for k, v in image_stats(images).items()}


# --------------------------------------------------------------------------- image_stats

@pytest.mark.parametrize("rgb", [(0.8, 0.4, 0.2), (0.1, 0.9, 0.5), (1.0, 0.0, 0.0), (0.3, 0.3, 0.3), (0.0, 0.0, 0.0)])
def test_stats_of_a_constant_colour(rgb):
    r, g, b = rgb
    s = _stats(_const(rgb))
    mx, mn = max(rgb), min(rgb)
    assert s["saturation"][0] == pytest.approx((mx - mn) / mx if mx > 0 else 0.0, abs=1e-6)  # black: 0, not 0/0
    assert s["brightness"][0] == pytest.approx(float(LUMA @ np.array(rgb)), abs=1e-6)
    assert s["contrast"][0] == pytest.approx(0.0, abs=1e-6)
    assert s["sharpness"][0] == pytest.approx(0.0, abs=1e-6)
    assert s["high_frequency"][0] == pytest.approx(0.0, abs=1e-6)  # no energy once the mean is removed
    rg, yb = r - g, (r + g) / 2 - b  # constant: no spread, only the 0.3 * |mean| term
    assert s["colourfulness"][0] == pytest.approx(0.3 * math.hypot(rg, yb), abs=1e-6)


def test_stats_of_a_pixel_checkerboard():
    """0/1 grey checkerboard: every interior Laplacian is +-4 (four opposite neighbours), all the
    spectral energy sits at (0.5, 0.5) cycles/pixel (> the 0.25 threshold), no colour."""
    n = 8
    board = (np.indices((n, n)).sum(0) % 2).astype(np.float64)
    s = _stats(_grey(board))
    assert s["sharpness"][0] == pytest.approx(4 * WHITE_LUMA, abs=1e-5)
    assert s["high_frequency"][0] == pytest.approx(1.0, abs=1e-6)
    assert s["brightness"][0] == pytest.approx(WHITE_LUMA / 2, abs=1e-6)
    # half 0, half WHITE_LUMA: population std L/2; torch.std is the sample std (n - 1)
    assert s["contrast"][0] == pytest.approx(WHITE_LUMA / 2 * math.sqrt(n * n / (n * n - 1)), abs=1e-6)
    assert s["saturation"][0] == pytest.approx(0.0, abs=1e-6)
    assert s["colourfulness"][0] == pytest.approx(0.0, abs=1e-6)


def test_sharpness_is_zero_away_from_an_edge():
    """A vertical 0|1 step at column 4 of 8: the valid 3x3 Laplacian has 6 output columns, only
    the two beside the edge are nonzero (|1| x luma of white): mean 2/6."""
    plane = np.zeros((8, 8))
    plane[:, 4:] = 1.0
    lap = _laplacian_np(plane * WHITE_LUMA)
    assert np.count_nonzero(np.abs(lap) > 1e-9) == 2 * 6  # hand check of the hand computation
    assert _stats(_grey(plane))["sharpness"][0] == pytest.approx(2 / 6 * WHITE_LUMA, abs=1e-6)


def _laplacian_np(x):
    return x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]


def test_high_frequency_is_the_energy_fraction_above_a_quarter_cycle():
    """Two cosines on a periodic 16-pixel row: bin 1 (1/16 cycle/pixel, low) with amplitude a,
    bin 6 (6/16 = 0.375, high) with amplitude b: fraction b^2 / (a^2 + b^2)."""
    x = np.arange(16)
    for a, b in ((0.3, 0.1), (0.1, 0.3), (0.2, 0.0), (0.0, 0.2)):
        row = 0.5 + a * np.cos(2 * np.pi * x / 16) + b * np.cos(2 * np.pi * 6 * x / 16)
        got = _stats(_grey(np.tile(row, (16, 1))))["high_frequency"][0]
        assert got == pytest.approx(b**2 / (a**2 + b**2), abs=1e-5), (a, b)


def test_two_colour_image_saturation_and_colourfulness():
    c1, c2 = np.array([0.9, 0.2, 0.1]), np.array([0.2, 0.3, 0.8])
    img = np.zeros((3, 8, 8))
    img[:, :, :4], img[:, :, 4:] = c1[:, None, None], c2[:, None, None]
    s = _stats(torch.tensor(img[None], dtype=torch.float32))
    sat = lambda c: (c.max() - c.min()) / c.max()  # noqa: E731
    assert s["saturation"][0] == pytest.approx((sat(c1) + sat(c2)) / 2, abs=1e-6)
    n = 64  # 32 pixels of each colour; torch.std is the sample std
    rg1, rg2 = c1[0] - c1[1], c2[0] - c2[1]
    yb1, yb2 = (c1[0] + c1[1]) / 2 - c1[2], (c2[0] + c2[1]) / 2 - c2[2]
    sd = lambda u, v: abs(u - v) / 2 * math.sqrt(n / (n - 1))  # noqa: E731
    want = math.hypot(sd(rg1, rg2), sd(yb1, yb2)) + 0.3 * math.hypot((rg1 + rg2) / 2, (yb1 + yb2) / 2)
    assert s["colourfulness"][0] == pytest.approx(want, abs=1e-6)
    l1, l2 = LUMA @ c1, LUMA @ c2
    assert s["brightness"][0] == pytest.approx((l1 + l2) / 2, abs=1e-6)
    assert s["contrast"][0] == pytest.approx(abs(l1 - l2) / 2 * math.sqrt(n / (n - 1)), abs=1e-6)


def test_stats_are_per_image_and_keys_select():
    batch = torch.cat([_const((0.8, 0.4, 0.2)), _const((1.0, 0.0, 0.0))])
    s = image_stats(batch, keys=("brightness", "saturation"))
    assert list(s) == ["brightness", "saturation"]
    assert s["saturation"].shape == (2,) and s["saturation"].tolist() == pytest.approx([0.75, 1.0])
    assert list(image_stats(batch)) == list(STATS)


# --------------------------------------------------------------------------- drift / hack index

def _gradients(n=8, size=32, seed=0) -> torch.Tensor:
    """Smooth random colour gradients, every channel within [0.21, 0.79]: no clipping when the
    saturation is boosted by 1.3 (|c - luma| <= 0.58, 1.3 x that stays inside [0, 1])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    base = rng.uniform(0.35, 0.65, (n, 3, 1, 1))
    gx, gy = rng.uniform(-0.07, 0.07, (2, n, 3, 1, 1))
    return torch.tensor(base + gx * xx + gy * yy, dtype=torch.float32)


def test_saturation_boost_moves_saturation_drift_by_the_hand_computed_amount():
    images = _gradients()
    boosted = adjust(images, saturation=1.3)
    assert boosted.min() > 0 and boosted.max() < 1  # nothing clipped: adjust's luma preservation is exact
    x = images.double().numpy()
    lum = np.einsum("c,nchw->nhw", LUMA, x)
    mx, mn = x.max(1), x.min(1)
    sat0 = ((mx - mn) / mx).mean((1, 2))
    # x' = L + 1.3 (x - L) channel-wise: max' - min' = 1.3 (max - min), max' = L + 1.3 (max - L)
    sat1 = (1.3 * (mx - mn) / (lum + 1.3 * (mx - lum))).mean((1, 2))
    want = abs(sat1.mean() - sat0.mean()) / sat0.std(ddof=1)

    base, now = image_stats(images), image_stats(boosted)
    d = drift(now, base)
    assert set(d) == set(STATS)
    assert d["saturation"] == pytest.approx(want, rel=1e-4)
    assert want > 0.5  # a real move, in base spreads (0.75 here)
    # luma is preserved by construction, so brightness moves only by float32 rounding of the
    # per-pixel luma (~1e-7) over a base spread of brightness of ~0.05: drift ~1e-5 at most
    assert d["brightness"] < 1e-4
    assert hack_index(now, base) == max(d.values())
    assert hack_index(now, base, LAB_STATS) == max(d[k] for k in LAB_STATS)
    assert drift(base, base) == {k: 0.0 for k in STATS}


def test_brightness_scaling_moves_brightness_not_saturation():
    images = _gradients(seed=1)
    darker = images * 0.9  # luma is linear: every image's brightness x 0.9; saturation is a ratio
    b0 = np.einsum("c,nchw->nhw", LUMA, images.double().numpy()).mean((1, 2))
    want = abs(0.9 * b0.mean() - b0.mean()) / b0.std(ddof=1)  # = 0.1 mean / std
    d = drift(image_stats(darker), image_stats(images))
    assert d["brightness"] == pytest.approx(want, rel=1e-4)
    assert d["brightness"] > 1.0
    assert d["saturation"] < 1e-4
    assert hack_index(image_stats(darker), image_stats(images)) == max(d.values())


def test_hack_index_does_not_depend_on_the_order_of_the_statistics():
    """One NaN statistic must give the same hack index wherever it sits in the dict (Python's max
    keeps a leading NaN but skips a later one)."""
    base = {"saturation": torch.tensor([0.1, 0.2]), "contrast": torch.tensor([0.1, 0.2])}
    now = {"saturation": torch.tensor([math.nan, 0.2]), "contrast": torch.tensor([0.9, 0.9])}
    flipped = {"contrast": now["contrast"], "saturation": now["saturation"]}
    a, b = hack_index(now, base), hack_index(flipped, base)
    assert (math.isnan(a) and math.isnan(b)) or a == b, (a, b)


def test_drift_with_a_constant_base_statistic_is_finite():
    """A base statistic with no spread (std 0) is divided by 1e-8, not by 0."""
    base = {"brightness": torch.tensor([0.5, 0.5])}
    assert drift({"brightness": torch.tensor([0.5, 0.5])}, base) == {"brightness": 0.0}
    assert drift({"brightness": torch.tensor([0.6, 0.6])}, base)["brightness"] == pytest.approx(0.1 / 1e-8, rel=1e-4)


# --------------------------------------------------------------------------- diversity

def test_diversity_is_zero_for_identical_seeds_and_positive_otherwise():
    f = torch.randn(3, 1, 16).expand(3, 4, 16).reshape(12, 16)  # 3 prompts x 4 identical seeds
    assert diversity(f, 3) == pytest.approx(0.0, abs=1e-5)
    assert diversity(f * torch.rand(12, 1) + 0.0, 3) == pytest.approx(0.0, abs=1e-5)  # scale is normalised away
    assert diversity(torch.randn(12, 16), 3) > 0.1


def test_diversity_by_hand():
    # 2 prompts x 2 seeds: orthogonal unit pair (distance sqrt 2) and a same-direction pair (0)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [6.0, 8.0]])
    assert diversity(f, 2) == pytest.approx((math.sqrt(2) + 0.0) / 2, abs=1e-6)
    # 1 prompt x 3 seeds: (1,0), (0,1), (-1,0): pairwise sqrt2, 2, sqrt2; mean over ordered pairs
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]])
    assert diversity(g, 1) == pytest.approx((2 * math.sqrt(2) + 2) / 3, abs=1e-6)
    # groups are consecutive rows (the seeds of a prompt are neighbours), not strided
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert diversity(h, 2) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(diversity(torch.randn(3, 4), 3))  # one seed per prompt: undefined


# --------------------------------------------------------------------------- rules

BEST, BASE = {"m": 2.0}, {"m": 1.0}
FORMS = [  # bound text, ref, expected bound for best = 2, base = 1
    ("1.5", None, 1.5), ("-2", None, -2.0), ("1e-3", None, 1e-3), (".5", None, 0.5), ("+3", None, 3.0),
    ("best", "best", 2.0), ("base", "base", 1.0),
    ("best - 0.02", "best", 1.98), ("best-0.5", "best", 1.5), ("base - 1e-1", "base", 0.9),
    ("best + 0.5", "best", 2.5), ("base+2", "base", 3.0),
    ("0.7 * base", "base", 0.7), ("3*best", "best", 6.0),
    ("base * 0.7", "base", 0.7), ("best*1.5", "best", 3.0),
]


@pytest.mark.parametrize(("bound", "ref", "want"), FORMS)
@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
def test_every_bound_form_and_op_fires_exactly_when_it_should(bound, ref, want, op):
    rule = R.parse(f"m {op} {bound}")
    assert (rule.metric, rule.op, rule.ref) == ("m", op, ref)
    assert rule.bound(BEST, BASE) == pytest.approx(want, abs=1e-12)
    eps = 1e-9
    for value in (want - 1.0, want - eps, want, want + eps, want + 1.0):
        truth = {"<": value < want, "<=": value <= want, ">": value > want, ">=": value >= want}[op]
        if value == want:  # exactly at the bound: only the non-strict ops
            truth = op in ("<=", ">=")
        assert rule.holds({"m": value}, BEST, BASE) is truth, (rule.text, value)


@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
def test_a_non_finite_value_or_bound_never_fires(op):
    for bound in ("0", "best", "base - 1", "2 * base"):
        rule = R.parse(f"m {op} {bound}")
        for value in (math.nan, math.inf, -math.inf):
            assert not rule.holds({"m": value}, BEST, BASE)
        assert not rule.holds({}, BEST, BASE)  # not measured at all
    for bound in ("best", "base + 1", "0.5 * base"):  # the reference has no value yet (or a NaN one)
        rule = R.parse(f"m {op} {bound}")
        for v in (-1e9, 0.0, 1e9):
            assert not rule.holds({"m": v}, {}, {})
            assert not rule.holds({"m": v}, {"m": math.nan}, {"m": math.nan})


def test_rule_text_and_metric_names():
    r = R.parse("  judge:pickscore  <   best - 0.02 ")
    assert (r.metric, r.op, r.ref, r.x) == ("judge:pickscore", "<", "best", 0.02)
    assert R.parse("drift:saturation>=1").metric == "drift:saturation"
    assert R.parse("reward<-1").bound({}, {}) == -1.0


@pytest.mark.parametrize("text", ["hack_index >> 2", "hack_index", "> 2", "hack_index > ", "hack_index => 2",
                                  "hack_index > best - x", "hack_index > 2 * best * 3", "hack_index > worst",
                                  "hack_index > 2 3", "hack_index = 2", "1 < hack_index", ""])
def test_bad_rule_text_is_a_one_line_user_error(text):
    with pytest.raises(UserError) as e:
        R.parse(text, "guard.stop_when rule")
    assert "\n" not in str(e.value) and "guard.stop_when rule" in str(e.value)


def test_unknown_metric_is_a_user_error_naming_the_known_ones():
    rules = [R.parse("hack_index > 1.5"), R.parse("judge:pickscore < best - 0.02")]
    R.check_metrics(rules[:1], {"hack_index", "reward"}, "guard.stop_when rule")
    with pytest.raises(UserError) as e:
        R.check_metrics(rules, {"hack_index", "reward"}, "guard.stop_when rule")
    msg = str(e.value)
    assert "judge:pickscore" in msg and "hack_index, reward" in msg and "\n" not in msg


@pytest.mark.parametrize("key", ["stop_when", "best_when"])
def test_config_rejects_a_bad_rule_naming_the_key(key):
    with pytest.raises(UserError) as e:
        load_config(TINY, [f'guard.{key}=["hack_index >> 2"]'])
    msg = str(e.value)
    assert f"guard.{key}" in msg and "hack_index >> 2" in msg and "\n" not in msg
    assert load_config(TINY, [f'guard.{key}=["hack_index > 2", "diversity < 0.7 * base"]'])


# --------------------------------------------------------------------------- Guard.decide

def _guard(stop_when=(), best_when=(), keep_best="auto", srp=False, **extra) -> Guard:
    """A Guard on a stand-in reward without image features: metrics reward, hack_index, drift:*
    (and srp_reward with srp=True); decide() needs nothing else."""
    sets = [f"guard.stop_when={json.dumps(list(stop_when))}", f"guard.best_when={json.dumps(list(best_when))}",
            f"guard.keep_best={'null' if keep_best is None else keep_best}"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    cfg = load_config(TINY, sets)
    reward_fn = SimpleNamespace(srp=object() if srp else None, reward=object())
    return Guard(cfg, reward_fn, ["a", "b", "c"], "cpu")


def _m(reward, hack=0.0, **kw):
    return {"reward": reward, "hack_index": hack, **kw}


def test_guard_metric_names_and_unknown_rule_metrics():
    g = _guard()
    assert g.metric == "reward" and "srp_reward" not in g.metric_names() and "diversity" not in g.metric_names()
    assert _guard(srp=True).metric == "srp_reward"
    for bad in (dict(stop_when=["judge:pickscore < best - 0.02"]), dict(best_when=["diversity > 0.7 * base"]),
                dict(keep_best="judge:aesthetic"), dict(stop_when=["srp_reward < best"])):
        with pytest.raises(UserError) as e:
            _guard(**bad)
        assert "\n" not in str(e.value) and "which this run does not measure" in str(e.value)


def test_step_zero_is_the_base_and_fires_nothing():
    g = _guard(stop_when=["hack_index >= 0", "reward > -100"], best_when=[])
    d = g.decide(0, _m(0.1, 0.0, **{"drift:saturation": math.nan}))
    assert d.stop is None and d.best is False and g.best_step is None and g.best_value == -math.inf
    assert g.base == _m(0.1, 0.0, **{"drift:saturation": math.nan})
    assert g.best == {"reward": 0.1, "hack_index": 0.0}  # non-finite values are not a best
    d = g.decide(2, _m(0.1, 0.0))
    assert d.stop is not None and d.stop.text == "hack_index >= 0"  # first rule in order wins
    assert g.base["reward"] == 0.1  # base stays the step-0 metrics


def test_best_only_where_best_when_holds_and_strictly_increasing():
    g = _guard(best_when=["hack_index <= 1.0"])
    g.decide(0, _m(0.0))
    seq = [  # step, reward, hack, is best
        (2, 0.5, 2.0, False),  # highest reward so far, but hacked: not eligible
        (4, 0.3, 0.5, True),
        (6, 0.2, 0.1, False),  # lower
        (8, 0.3, 0.9, False),  # equal is not better
        (10, math.nan, 0.0, False),  # not finite
        (12, 0.31, 1.0, True),  # <= 1.0 holds at the bound
        (14, 0.9, 1.0001, False),
    ]
    values = []
    for step, reward, hack, best in seq:
        assert g.decide(step, _m(reward, hack)).best is best, step
        if best:
            values.append(g.best_value)
            assert (g.best_step, g.best_value) == (step, reward)
    assert values == sorted(values) and len(set(values)) == len(values)
    assert (g.best_step, g.best_value) == (12, 0.31)
    assert g.best["reward"] == 0.9  # the best-so-far of each metric ignores eligibility


def test_best_when_rules_with_refs_and_no_keep_best():
    g = _guard(best_when=["reward >= base + 0.1"])
    g.decide(0, _m(0.0))
    assert not g.decide(2, _m(0.05)).best and g.decide(4, _m(0.1)).best
    g = _guard(keep_best=None, best_when=[])
    g.decide(0, _m(0.0))
    assert not g.decide(2, _m(1.0)).best and g.best_step is None
    g = _guard(best_when=[])  # no rules: every improvement is a best; the first step after 0 always is
    g.decide(0, _m(5.0))
    assert g.decide(2, _m(-1.0)).best and g.best_step == 2


def test_best_refs_in_stop_rules_see_the_previous_steps_only():
    """``best`` in a rule is the highest value over the steps BEFORE this one, the base (step 0)
    included: ``x > best`` fires exactly when x beats everything before it, which it could never
    do if this step's value were already in ``best``."""
    g = _guard(stop_when=["hack_index > best"], best_when=[])
    g.decide(0, _m(0.0, 0.0))
    assert g.decide(2, _m(0.0, 0.0)).stop is None  # equal to the base's 0
    assert g.decide(4, _m(0.0, 0.7)).stop is not None  # beats 0
    assert g.decide(6, _m(0.0, 0.7)).stop is None  # ties the previous best 0.7 (now in best)
    assert g.decide(8, _m(0.0, 0.5)).stop is None
    assert g.best["hack_index"] == 0.7

    g = _guard(stop_when=["reward < best - 0.1"], best_when=[])
    g.decide(0, _m(0.0))
    assert g.decide(2, _m(-0.05)).stop is None  # bound: base 0.0 - 0.1
    assert g.decide(4, _m(0.5)).stop is None  # bound max(0, -0.05) - 0.1 = -0.1
    assert g.decide(6, _m(0.45)).stop is None  # bound 0.5 - 0.1 = 0.4
    d = g.decide(8, _m(0.39))
    assert d.stop is not None and d.stop.text == "reward < best - 0.1"
    g = _guard(stop_when=["reward < best - 0.1"], best_when=[])
    g.decide(0, _m(0.0))
    assert g.decide(2, _m(-0.15)).stop is not None  # the base counts as a previous best

    g = _guard(stop_when=["hack_index > 1.5"], best_when=[])
    g.decide(0, _m(0.0))
    d = g.decide(2, _m(1.0, 1.6))
    assert d.stop is not None and d.best  # a stopping step can also be the best


# --------------------------------------------------------------------------- state round trip

@pytest.fixture(scope="module")
def clip_guard():
    """Guards on the real tiny CLIP reward with SRP (reward, srp_reward, drift, diversity): 2
    prompts x 2 seeds, built by ``make(**overrides)``."""
    from srpo.algorithms import RewardFn
    from srpo.rewards.factory import build_reward
    from srpo.rewards.srp import SRP

    cfg0 = load_config(TINY)
    reward = build_reward(cfg0.reward, device="cpu", training=True).frozen()
    reward_fn = RewardFn(reward, SRP(reward, cfg0.srp.pos_words, cfg0.srp.neg_words, template=cfg0.srp.template))
    prompts = ["a red square in the snow", "a blue circle at sunset"]

    def make(*sets):
        return Guard(load_config(TINY, ["guard.prompts=2", "guard.seeds=2", *sets]), reward_fn, prompts, "cpu")

    return make


def test_diversity_through_the_guard_images_and_features(clip_guard):
    """Image i is prompt i // seeds at seed i % seeds: the same image for both seeds of each
    prompt has diversity 0 (and the relative diversity is then undefined, not 1)."""
    g = clip_guard()
    a, b = _gradients(n=2, size=32, seed=5), _gradients(n=2, size=32, seed=6)
    same = torch.stack([a[0], a[0], a[1], a[1]])
    m = g.measure(same)
    assert m["diversity_abs"] == pytest.approx(0.0, abs=1e-5) and math.isnan(m["diversity"])
    g = clip_guard()
    distinct = torch.stack([a[0], b[0], a[1], b[1]])
    m = g.measure(distinct)
    assert m["diversity_abs"] > 0 and m["diversity"] == 1.0  # relative to itself at the base
    m = g.measure(same)
    assert m["diversity_abs"] == pytest.approx(0.0, abs=1e-5) and m["diversity"] == pytest.approx(0.0, abs=1e-4)


def test_state_round_trip_through_json_decides_like_the_original(clip_guard):
    """A fresh Guard loaded from the JSON'd state measures and decides exactly like the original."""
    sets = ["guard.best_when=[\"hack_index <= 50\"]",
            "guard.stop_when=[\"srp_reward < best - 0.5\", \"diversity < 0.01 * base\"]"]
    images = _gradients(n=4, size=32, seed=3)
    steps = [images, adjust(images, saturation=1.2), adjust(images, saturation=1.5, contrast=1.3, sharpen=1.0),
             adjust(images, saturation=0.8, contrast=0.7)]
    g = clip_guard(*sets)
    assert g.feature_model is not None and "diversity" in g.metric_names() and g.metric == "srp_reward"
    for step, img in zip((0, 2), steps[:2]):
        g.decide(step, g.measure(img))
    state = json.loads(json.dumps(g.state()))  # as state.json stores it (NaN / -inf survive Python's json)
    h = clip_guard(*sets)
    h.load(state)
    for step, img in zip((4, 6), steps[2:]):
        a, b = g.measure(img), h.measure(img)
        assert a == b and a["hack_index"] > 0 and a["diversity"] != 1.0
        da, db = g.decide(step, a), h.decide(step, b)
        assert (da.best, da.stop) == (db.best, db.stop)
        assert json.dumps(g.state()) == json.dumps(h.state())
    assert (g.best_step, g.best_value) == (h.best_step, h.best_value)
    # the test can tell: without the state, a fresh Guard takes the next images as its base
    assert clip_guard(*sets).measure(steps[2])["hack_index"] == 0.0


def test_state_without_a_best_or_diversity_survives_json():
    g = _guard(best_when=["hack_index < 0"])
    g.decide(0, _m(0.0))
    g.decide(2, _m(1.0))
    state = json.loads(json.dumps(g.state()))
    assert state["best_step"] is None and state["best_value"] == -math.inf and math.isnan(state["base_diversity"])
    h = _guard(best_when=["hack_index < 0"])
    h.load(state)
    assert h.base_stats is None and h.best == g.best and h.base == g.base
    for step, m in ((4, _m(2.0, -1.0)), (6, _m(3.0, 0.5))):
        da, db = g.decide(step, m), h.decide(step, m)
        assert (da.best, da.stop) == (db.best, db.stop)
    assert (h.best_step, h.best_value) == (g.best_step, g.best_value) == (4, 2.0)


def test_forms_cover_every_bound_pattern():
    assert {R.parse(f"m > {b}").form for b, _, _ in FORMS} == set(range(len(R._BOUND)))
    assert list(itertools.chain(R.OPS)) == ["<", "<=", ">", ">="]
