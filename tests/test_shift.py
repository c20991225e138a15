"""Tests for toy/shift.py: the one-step error of a student against the exact teacher, and the error ratios,
on cases with known answers."""
import math

import pytest
import torch

import ddil
from toy import mixtures, shift
from toy.models import AnalyticTeacher

AB = ddil.make_alpha_bar()
GRID = ddil.uniform_grid(4)


def setup(name: str = "ring8", n: int = 256):
    gmm = mixtures.load_mixture(name)
    x_T = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(0))
    return gmm, AnalyticTeacher(gmm, AB), x_T


def converged_x0_fn(teacher, s: torch.Tensor, K: int, offset=0.0):
    """A 'student' whose implied DDIM step lands exactly on the teacher's K-substep solve to s (PD's target
    x_tilde, Salimans & Ho 2022), plus a constant offset in x0."""
    def x0_fn(x, t, cond, w):
        x_s = ddil.teacher_solve(teacher, x, t, s, cond, w, AB, None, K)
        return ddil.pd_target(x, x_s, t, s, AB) + offset
    return x0_fn


@pytest.mark.parametrize("name, t, s", [("ring8", 749, 499), ("ring8-d16", 499, 249), ("ring8", 249, ddil.T_CLEAN)])
def test_student_equal_to_converged_teacher_has_zero_error(name, t, s):
    gmm, teacher, x_T = setup(name)
    n = len(x_T)
    x = ddil.teacher_solve(teacher, x_T, torch.full((n,), 999), torch.full((n,), t), None, None, AB, None, 8)
    tt, ss = torch.full((n,), t), torch.full((n,), s)
    err = shift.step_errors(converged_x0_fn(teacher, ss, 8), teacher, x, tt, ss, None, None, AB, None, K=8)
    assert err.shape == (n,) and err.dtype == torch.float64
    assert err.max() < 1e-9
    # against a finer solve the same student is off, and the single DDIM step of the teacher more so
    finer = shift.step_errors(converged_x0_fn(teacher, ss, 8), teacher, x, tt, ss, None, None, AB, None, K=64)
    single = shift.step_errors(shift.ddim_x0_fn(teacher, AB), teacher, x, tt, ss, None, None, AB, None, K=64)
    assert 0 < finer.mean() < single.mean()


@pytest.mark.parametrize("t, s", [(999, 749), (499, 249), (249, ddil.T_CLEAN)])
def test_constant_x0_offset_gives_known_error(t, s):
    """x0_hat + c moves the implied step by (alpha_s - sigma_s alpha_t / sigma_t) c, so the error is that squared,
    averaged over coordinates (at s = clean: c itself)."""
    gmm, teacher, x = setup("ring8-d8", n=128)
    c = torch.linspace(-0.3, 0.5, gmm.dim)  # (D,)
    tt, ss = torch.full((len(x),), t), torch.full((len(x),), s)
    err = shift.step_errors(converged_x0_fn(teacher, ss, 4, offset=c), teacher, x, tt, ss, None, None, AB, None, K=4)
    ab_t, ab_s = ddil.alpha_bar_at(AB, tt[:1]).item(), ddil.alpha_bar_at(AB, ss[:1]).item()
    coef = math.sqrt(ab_s) - math.sqrt(1 - ab_s) * math.sqrt(ab_t) / math.sqrt(1 - ab_t)
    want = coef**2 * c.double().square().mean().item()
    torch.testing.assert_close(err, torch.full_like(err, want), rtol=1e-4, atol=1e-9)


def test_per_step_errors_reuses_teacher_rollout_targets():
    """On the teacher's own rollout states, passing targets = states[1:] + [x_0] gives the same numbers as solving."""
    gmm, teacher, x_T = setup("unequal", n=128)
    K = 6
    x0, states = ddil.sample(ddil.teacher_policy(teacher, AB, None, K), x_T, GRID)
    x0_fn = shift.ddim_x0_fn(teacher, AB)
    solved = shift.per_step_errors(x0_fn, teacher, states, GRID, AB, K)
    reused = shift.per_step_errors(x0_fn, teacher, states, GRID, AB, K, targets=list(states[1:]) + [x0])
    assert len(solved) == len(GRID) == len(reused)
    for a, b in zip(solved, reused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert all(e.mean() > 0 for e in solved)  # one DDIM step is not the converged solve


def test_consistency_x0_fn_is_the_lcm_step():
    """With fresh noise switched off (sigma_s z -> 0), the LCM policy's step is the step consistency_x0_fn implies at clean."""
    gmm, teacher, x = setup("ring8", n=64)
    cfg = ddil.LCMConfig()
    t, s = torch.full((64,), 259), torch.full((64,), ddil.T_CLEAN)
    x0 = shift.consistency_x0_fn(teacher, AB, None, cfg)(x, t, None, None)
    want = ddil.consistency_policy(teacher, AB, None, cfg)(x, t, s, None, None, None)
    torch.testing.assert_close(shift.implied_step(x0, x, t, s, AB), want)


def test_forward_at_grid_marginals():
    gmm, _, _ = setup()
    x0, _ = mixtures.sample(gmm, 4000, torch.Generator().manual_seed(1))
    states = shift.forward_at_grid(x0, GRID, AB, torch.Generator().manual_seed(2))
    for t, x in zip(GRID, states):
        ab = AB[t].item()
        assert x.shape == x0.shape
        assert x.var(0).mean().item() == pytest.approx(ab * x0.var(0).mean().item() + 1 - ab, rel=0.1)


def test_ratio_of_identical_errors_is_one():
    e = torch.rand(500, generator=torch.Generator().manual_seed(3)).square()
    for r in (shift.ratio_unpaired(e, e), shift.ratio_paired(e, e)):
        assert r.ratio == pytest.approx(1.0) and r.lo <= 1.0 <= r.hi
    assert shift.ratio_paired(e, e).lo == pytest.approx(1.0) and shift.ratio_paired(e, e).hi == pytest.approx(1.0)
    assert shift.ratio_unpaired(e, e).hi - shift.ratio_unpaired(e, e).lo > 0.05  # unpaired ignores the pairing


def test_ratio_cis_cover_a_known_ratio():
    """Errors num = 2 den' with den, den' independent draws of one law: the ratio of means is 2. Over 20 data
    sets the 95 % intervals should nearly all contain 2; the paired CI of num vs 2 * num is exact."""
    hits = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(100 + seed)
        den, other = torch.randn(400, generator=g).square(), torch.randn(400, generator=g).square()
        r = shift.ratio_unpaired(2 * other, den, n_boot=400)
        hits += r.lo <= 2.0 <= r.hi
        assert r.lo < r.ratio < r.hi
    assert hits >= 16
    p = shift.ratio_paired(2 * den, den)
    assert p.ratio == pytest.approx(2.0) and p.lo == pytest.approx(2.0) and p.hi == pytest.approx(2.0)
    with pytest.raises(ValueError, match="equal lengths"):
        shift.ratio_paired(den, den[:10])


def test_ratio_rows_layout():
    g = torch.Generator().manual_seed(5)
    errs = [[torch.rand(50, generator=g) + 0.1 for _ in GRID] for _ in range(3)]
    rows = shift.ratio_rows(*errs, GRID)
    assert [r["t"] for r in rows] == GRID and [r["k"] for r in rows] == [0, 1, 2, 3]
    for r, a, b, c in zip(rows, *errs):
        assert r["own_vs_forward"][0] == pytest.approx((b.mean() / a.mean()).item())
        assert r["own_vs_teacher"][0] == pytest.approx((b.mean() / c.mean()).item())
        assert r["own_vs_forward"][1] <= r["own_vs_forward"][0] <= r["own_vs_forward"][2]


def test_teacher_targets_are_shared_by_every_x0_fn():
    gmm, teacher, x_T = setup("ring8-d8", n=64)
    x0, _ = mixtures.sample(gmm, 64, torch.Generator().manual_seed(7))
    states = shift.forward_at_grid(x0, GRID, AB, torch.Generator().manual_seed(8))
    targets = shift.teacher_targets(teacher, states, GRID, AB, 4)
    assert len(targets) == len(GRID) and targets[-1].shape == x0.shape
    for x0_fn in (shift.ddim_x0_fn(teacher, AB), shift.consistency_x0_fn(teacher, AB, None, ddil.LCMConfig())):
        direct = shift.per_step_errors(x0_fn, teacher, states, GRID, AB, 4)
        shared = shift.per_step_errors(x0_fn, teacher, states, GRID, AB, 4, targets=targets)
        assert all(torch.equal(a, b) for a, b in zip(direct, shared))
