"""The on-policy error ratio (issue 10): is a student's one step worse on the states it visits than on the
states it trained on? Covariate shift in DAgger's sense (Ross et al. 2011), measured against the exact teacher.

One definition for all three methods. From a state x at tau_k, the student's x0_hat = x0_fn(x, t, cond, w)
implies a deterministic DDIM step to s = tau_{k+1} (Song et al. 2021, Eq. 12, with the eps that x0_hat
implies); the reference is the exact teacher's converged probability-flow ODE solve from the same x to s
(ddil.teacher_solve, K substeps). The error is the mean over coordinates of the squared difference, per
sample (n,). At the last step s is clean (ddil.T_CLEAN) and this compares x0s.

    x0_fn  PD, DMD2: ddim_x0_fn(student, ...)         ddil.predict's x0
           LCM:      consistency_x0_fn(student, ...)  ddil.consistency_fn of it
           control:  ddim_x0_fn(teacher, ...)         the exact teacher's own single DDIM step

Measured per k on (a) forward states q(x_tau_k | x_0) (what a base PD/LCM student trains on), (b) the
student's own inference states, (c) the teacher's rollout states from the same x_T as (b). The teacher's
solves (teacher_targets) are the costly part; make them once per state set and reuse them. ratio_rows
reports (b)/(a), a ratio of means with an unpaired bootstrap CI, and (b)/(c) with a paired bootstrap CI
(the same x_T), both 95 %. A ratio above 1 means the student errs more where it goes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

import ddil

X0Fn = Callable[[Tensor, Tensor, Any, Optional[Tensor]], Tensor]  # (x, t, cond, w) -> x0_hat
N_BOOT = 1000  # bootstrap resamples of every CI
BOOT_SEED = 0  # the bootstrap's fixed generator seed


# ----------------------------------------------------------------------------------------------------
# x0_fn of each method


def ddim_x0_fn(denoiser: ddil.Denoiser, alpha_bar: Tensor, reflect: Optional[ddil.ReflectConfig] = None) -> X0Fn:
    """x0_hat of a PD student, a DMD2 generator or the teacher: ddil.predict's (reflected) x0."""
    return lambda x, t, cond, w: ddil.predict(denoiser, x, t, cond, w, alpha_bar, reflect)[0]


def consistency_x0_fn(denoiser: ddil.Denoiser, alpha_bar: Tensor, reflect: Optional[ddil.ReflectConfig],
                      cfg: ddil.LCMConfig) -> X0Fn:
    """x0_hat of an LCM student: the consistency function f(x, t) = c_skip x + c_out x0 (LCM Eq. 9)."""
    return lambda x, t, cond, w: ddil.consistency_fn(x, ddil.predict(denoiser, x, t, cond, w, alpha_bar, reflect)[0], t, cfg)


# ----------------------------------------------------------------------------------------------------
# One-step errors


def implied_step(x0_hat: Tensor, x: Tensor, t: Tensor, s: Tensor, alpha_bar: Tensor) -> Tensor:
    """The deterministic DDIM step t -> s that x0_hat implies (DDIM Eq. 12 with eps = (x - alpha_t x0_hat) / sigma_t);
    x0_hat itself when s is clean."""
    alpha, sigma = ddil.alpha_sigma(alpha_bar, t, x)
    return ddil.ddim_step(x0_hat, ddil.x0_to_eps(x, x0_hat, alpha, sigma), s, alpha_bar)


def sq_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean over coordinates of the squared difference, per sample, in float64 (n,)."""
    return (a.double() - b.double()).square().flatten(1).mean(1)


@torch.no_grad()
def step_errors(x0_fn: X0Fn, teacher: ddil.Denoiser, x: Tensor, t: Tensor, s: Tensor, cond: Any, w: Optional[Tensor],
                alpha_bar: Tensor, reflect: Optional[ddil.ReflectConfig], K: int, target: Optional[Tensor] = None) -> Tensor:
    """The student's one-step error from states x at t (n,) to s (n,) against the exact teacher's K-substep
    solve from x to s, per sample (n,). `target`, if given, is that solve already made (e.g. the teacher's
    next rollout state) and is used instead of solving again."""
    if target is None:
        target = ddil.teacher_solve(teacher, x, t, s, cond, w, alpha_bar, reflect, K)
    return sq_error(implied_step(x0_fn(x, t, cond, w), x, t, s, alpha_bar), target)


def _step_times(grid: Sequence[int], k: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(tau_k, tau_{k+1}) per sample (n,), clean after the last grid point."""
    n = x.shape[0]
    return torch.full((n,), grid[k], device=x.device), torch.full((n,), (list(grid) + [ddil.T_CLEAN])[k + 1], device=x.device)


@torch.no_grad()
def teacher_targets(teacher: ddil.Denoiser, states: Sequence[Tensor], grid: Sequence[int], alpha_bar: Tensor, K: int,
                    cond: Any = None, w: Optional[Tensor] = None, reflect: Optional[ddil.ReflectConfig] = None) -> list[Tensor]:
    """The exact teacher's K-substep solve from each states[k] at tau_k to tau_{k+1}: the reference of every
    x0_fn measured on these states. Make it once and pass it as targets to measure several x0_fns."""
    return [ddil.teacher_solve(teacher, x, *_step_times(grid, k, x), cond, w, alpha_bar, reflect, K)
            for k, x in enumerate(states)]


def per_step_errors(x0_fn: X0Fn, teacher: ddil.Denoiser, states: Sequence[Tensor], grid: Sequence[int], alpha_bar: Tensor,
                    K: int, cond: Any = None, w: Optional[Tensor] = None, reflect: Optional[ddil.ReflectConfig] = None,
                    targets: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """step_errors at every student step: states[k] (n, *) at tau_k = grid[k], to tau_{k+1} (clean after the
    last). Returns N per-sample error tensors (n,). targets: the teacher's solves made already, either by
    teacher_targets or, for the teacher's own rollout states from ddil.sample(teacher_policy(K)), states[1:] + [x_0]."""
    if targets is None:
        targets = teacher_targets(teacher, states, grid, alpha_bar, K, cond, w, reflect)
    return [step_errors(x0_fn, teacher, x, *_step_times(grid, k, x), cond, w, alpha_bar, reflect, K, targets[k])
            for k, x in enumerate(states)]


def forward_at_grid(x0: Tensor, grid: Sequence[int], alpha_bar: Tensor, gen: Optional[torch.Generator]) -> list[Tensor]:
    """State set (a): the data x0 (n, *) diffused to each tau_k with fresh noise, q(x_tau_k | x_0) (DDPM Eq. 4)."""
    return [ddil.q_sample(x0, torch.full((x0.shape[0],), t), ddil.randn(x0.shape, gen, x0), alpha_bar) for t in grid]


# ----------------------------------------------------------------------------------------------------
# Ratios with 95 % bootstrap confidence intervals


class Ratio(NamedTuple):
    ratio: float  # mean(num) / mean(den)
    lo: float  # 2.5 % bootstrap quantile
    hi: float  # 97.5 % bootstrap quantile


@functools.lru_cache(maxsize=8)
def _boot_counts(n_boot: int, sizes: tuple[int, ...], seed: int) -> tuple[Tensor, ...]:
    """Bootstrap resampling as count matrices (n_boot, n) float64, one per sample size in `sizes`, the indices drawn
    in that order from one generator seeded with `seed`. Row b counts how often each element is drawn, so the
    resampled means are one matrix product. Made once per process and shape (every ratio reuses the same draws)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        idx = torch.randint(0, n, (n_boot, n), generator=gen)
        out.append(torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64)))
    return tuple(out)


def _resample_means(v: Tensor, counts: Tensor) -> Tensor:
    """Means of v (n,) over each bootstrap resample, given as a count matrix (B, n): shape (B,)."""
    return counts @ v.double() / v.shape[0]


def _ratio(num: Tensor, den: Tensor, num_means: Tensor, den_means: Tensor) -> Ratio:
    """The point ratio of means and the percentile interval of the bootstrap ratios."""
    q = torch.quantile(num_means / den_means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return Ratio((num.double().mean() / den.double().mean()).item(), q[0].item(), q[1].item())


def ratio_unpaired(num: Tensor, den: Tensor, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Ratio:
    """mean(num) / mean(den) of two independent samples of errors, with a 95 % percentile bootstrap CI that
    resamples each side independently (Efron & Tibshirani 1993, Ch. 13); a fixed generator makes it repeatable."""
    i, j = _boot_counts(n_boot, (len(num), len(den)), seed)
    return _ratio(num, den, _resample_means(num, i), _resample_means(den, j))


def ratio_paired(num: Tensor, den: Tensor, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Ratio:
    """mean(num) / mean(den) of paired errors (num[i] and den[i] from the same x_T), with a 95 % paired bootstrap CI
    that resamples the pairs together, so their correlation narrows the interval."""
    if len(num) != len(den):
        raise ValueError(f"paired errors need equal lengths, got {len(num)} and {len(den)}")
    (i,) = _boot_counts(n_boot, (len(num),), seed)
    return _ratio(num, den, _resample_means(num, i), _resample_means(den, i))


def ratio_rows(err_forward: Sequence[Tensor], err_own: Sequence[Tensor], err_teacher: Sequence[Tensor],
               grid: Sequence[int]) -> list[dict]:
    """Per student step k: the mean errors on (a) forward, (b) own and (c) teacher states, and the ratios
    own_vs_forward = (b)/(a) (unpaired) and own_vs_teacher = (b)/(c) (paired), each [ratio, lo, hi]."""
    rows = []
    for k, (a, b, c) in enumerate(zip(err_forward, err_own, err_teacher)):
        rows.append({"k": k, "t": grid[k], "err_forward": a.double().mean().item(), "err_own": b.double().mean().item(),
                     "err_teacher": c.double().mean().item(), "own_vs_forward": list(ratio_unpaired(b, a)),
                     "own_vs_teacher": list(ratio_paired(b, c))})
    return rows
