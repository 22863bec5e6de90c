"""The method's math, pinned against formulas (shared SRPO.md)."""

import pytest
import torch

from srpo import method as M


def test_time_shift_formula_and_identity():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(M.time_shift(t, 1.0), t)
    assert torch.allclose(M.time_shift(t, 3.0), 3 * t / (1 + 2 * t))
    assert float(M.time_shift(0.5, 3.0)) == pytest.approx(0.75)


def test_inference_grid_shift3_values():
    g = M.inference_grid(50, 3.0)
    assert len(g) == 51 and float(g[0]) == 1.0 and float(g[50]) == 0.0
    assert float(g[5]) == pytest.approx(0.9643, abs=1e-4)
    assert float(g[25]) == pytest.approx(0.75, abs=1e-12)
    assert bool((g[1:] < g[:-1]).all())


def test_training_grid_spans_index_range():
    g = M.inference_grid(50, 3.0)
    L = M.training_grid(g, (5, 25), 1000)
    assert len(L) == 1000
    assert float(L[0]) == pytest.approx(float(g[5])) and float(L[-1]) == pytest.approx(float(g[25]))
    with pytest.raises(ValueError):
        M.training_grid(g, (25, 5))


@pytest.mark.parametrize("level", [0.0, 0.1, 0.5, 0.75, 0.9643, 0.99])
def test_oracle_velocity_recovers_x0(level):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    v_oracle = lambda x: eps - x0  # noqa: E731
    for b in [level * 0.9, min(level + 0.005, 0.995)]:  # denoise and inversion directions
        x0_hat = M.direct_align_x0(x0, eps, v_oracle, level, b)
        assert (x0_hat - x0).abs().max() < 1e-6
    # per-sample levels broadcast too
    a = torch.tensor([level, level / 2], dtype=torch.float64)
    x0_hat = M.direct_align_x0(x0, eps, v_oracle, a, a * 0.9)
    assert (x0_hat - x0).abs().max() < 1e-6


def test_float32_recovery_at_099():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    x0_hat = M.recover_x0(M.euler_step(M.add_noise(x0, eps, 0.99), eps - x0, 0.99, 0.95), eps, 0.95)
    assert (x0_hat - x0).abs().max() < 1e-5


def test_branch_levels_follow_reference_indexing():
    L = M.training_grid(M.inference_grid(50, 3.0), (5, 25), 1000)
    T = 1000
    for ts in [5, 50, 100, 500, 995]:
        lv = M.branch_levels(L, ts, 100)
        k = min(T - ts, 100, ts)
        assert lv.k == k and lv.ts2 == max(ts - k, 1)
        assert lv.denoise == (float(L[T - ts - k]), float(L[T - ts]))
        assert lv.inversion == (float(L[T - lv.ts2]), float(L[T - min(lv.ts2 + k, T)]))
        a, b = lv.denoise
        assert a > b  # denoise goes toward clean
        a2, b2 = lv.inversion
        assert a2 < b2  # inversion goes toward noise
        if ts - k >= 1:
            assert b2 == b  # both branches land on the same level
    with pytest.raises(ValueError):
        M.branch_levels(L, 0)


def _autograd_dx0_dv(a, b):
    x0 = torch.zeros(1, dtype=torch.float64)
    eps = torch.ones(1, dtype=torch.float64)
    v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    x0_hat = M.direct_align_x0(x0, eps, lambda x: v + 0 * x, a, b)
    (g,) = torch.autograd.grad(x0_hat.sum(), v)
    return float(g)


def test_sign_of_dx0_dv_in_each_branch():
    L = M.training_grid(M.inference_grid(50, 3.0))
    lv = M.branch_levels(L, 300)
    d_den = _autograd_dx0_dv(*lv.denoise)
    d_inv = _autograd_dx0_dv(*lv.inversion)
    assert d_den < 0 < d_inv
    assert d_den == pytest.approx(M.dx0_dv(*lv.denoise))
    assert d_inv == pytest.approx(M.dx0_dv(*lv.inversion))


def _clip_like_scores(bias):
    """A dot-product reward with an added image-only term b(image)."""
    g = torch.Generator().manual_seed(3)
    f_img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    f_pos = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=-1)
    f_neg = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=-1)
    b = torch.rand(5, generator=g) * 3
    pos, neg = f_img @ f_pos + bias * b, f_img @ f_neg + bias * b
    return pos, neg, b, (f_img, f_pos, f_neg)


def test_text_direction_is_the_weighted_difference_of_dot_product_scores():
    _, _, _, (f_img, f_pos, f_neg) = _clip_like_scores(0.0)
    k = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    direct = (f_img * M.srp_text_direction(f_pos.expand(5, 8), f_neg.expand(5, 8), k)).sum(-1)
    expected = torch.stack([(1 + float(k[i])) * (f_img[i] @ f_pos) - f_img[i] @ f_neg for i in range(5)])
    assert torch.allclose(direct, expected, atol=1e-6)
    # a text-independent feature component u (every text shares it) cancels at k = 0 only
    u = torch.nn.functional.normalize(torch.randn(8, generator=torch.Generator().manual_seed(9)), dim=-1)
    shifted = (f_img * M.srp_text_direction((f_pos + u).expand(5, 8), (f_neg + u).expand(5, 8), k)).sum(-1)
    assert torch.allclose(shifted - direct, k * (f_img @ u), atol=1e-6)
    assert (shifted - direct)[0].abs() < 1e-6 and (shifted - direct)[1:].abs().min() > 1e-4


def test_dynamic_shift_matches_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (64, 256, 1024, 4096, 8100):
        assert M.dynamic_shift_mu(n, 256, 4096, 0.5, 1.15) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15))


def test_discount_schedules():
    kp, ki = M.linear_weights(0.10, 0.25), M.linear_weights(0.30, 0.01)
    assert float(kp[0]) == pytest.approx(0.10) and float(kp[-1]) == pytest.approx(0.25)
    assert float(ki[0]) == pytest.approx(0.30) and float(ki[-1]) == pytest.approx(0.01)
    d = M.noise_discount(100, 3.0)
    assert len(d) == 101 and float(d[0]) == 0 and float(d[-1]) == pytest.approx(1.0)
    assert bool((d[1:] > d[:-1]).all())  # grows with noise
    assert float(d[50]) == pytest.approx(0.75)  # shift 3 at the middle index: 3 * 0.5 / (1 + 2 * 0.5)


def test_hinge():
    r = torch.tensor([0.0, 0.5, 0.7, 1.0])
    assert torch.allclose(M.hinge_loss(r, 0.7), torch.tensor([0.7, 0.2, 0.0, 0.0]))
