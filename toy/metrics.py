"""Sample-quality metrics for the toy mixtures; every function takes sample tensors of shape (n, D), any D.

Each metric means the same in every dimension D:
  mode precision/coverage  a hit is within the Mahalanobis radius that holds MODE_MASS = 1 - e^-4.5 = 98.9 % of a
                           component's own mass, sqrt(chi2.ppf(MODE_MASS, D)): 3 in 2-D, 7.28 in 32-D (a fixed 3
                           would hold 8.7 % in 16-D and nothing in 32-D)
  MMD                      RBF bandwidths h sqrt(D / 2) for the 2-D set h in MMD_BANDWIDTHS: squared distances sum
                           D coordinates, so a per-coordinate discrepancy gives the same kernel value in every D
                           (at D = 2 these are the 2-D bandwidths; the noisy states whose shift is measured have
                           distances that grow as sqrt(D), which fixed bandwidths would see as all-zero kernels)
  density/coverage         k-NN balls of the real samples (Naeem et al. 2020): scale-free in any D
  NLL, cross-entropy       exact; they grow with D (each off-plane dimension adds its own entropy), so compare them
                           with data_floor's row of the same D
Pairwise quantities are accumulated over row chunks so that memory stays O(chunk * n). Distances are float64
(squared distances by one matmul per chunk); RBF kernels are evaluated and summed in float32 from them
(relative error ~1e-7 per kernel mean, far below the MMD's sampling noise of ~1e-4).
"""
import math
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from scipy.stats import chi2

from toy.mixtures import GMM, log_prob, mahalanobis_sq, noisy, noisy_log_prob, sample

F64 = torch.float64
CHUNK = 1024
MODE_MASS = 1 - math.exp(-4.5)  # the share of a 2-D Gaussian's mass within Mahalanobis radius 3
MMD_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)  # RBF bandwidths at D = 2; scaled by sqrt(D / 2), see mmd_bandwidths
EXP_MIN_F32 = -80.0  # RBF exponents are clamped here (float32 exp's fast range), see _rbf_sums
FLOOR_SEEDS = (20_000, 40_000)  # data_floor's two data sets: toy.run's held-out data, then an independent one


def _f64(x: torch.Tensor) -> torch.Tensor:
    """Detached float64 copy of a sample tensor, shape (n, D)."""
    return x.detach().to(F64)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances |a_i - b_j|^2 = |a_i|^2 + |b_j|^2 - 2 a_i.b_j as one float64 matmul of
    [a, |a|^2, 1] and [-2 b, 1, |b|^2] (as torch.cdist does; ~8x faster than adding a broadcast base), (len(a), len(b))."""
    one_a, one_b = a.new_ones(len(a), 1), b.new_ones(len(b), 1)
    a_aug = torch.cat([a, a.square().sum(1, keepdim=True), one_a], dim=1)  # (c, D + 2)
    b_aug = torch.cat([-2 * b, one_b, b.square().sum(1, keepdim=True)], dim=1)  # (m, D + 2)
    return (a_aug @ b_aug.T).clamp_min_(0)


def _pair_sum(a: torch.Tensor, b: torch.Tensor, fn: Callable, same: bool = False) -> torch.Tensor:
    """sum_{i,j} fn(|a_i - b_j|^2) over row chunks of a; fn maps (c, m) squared distances to a sum.
    same=True (b is a) sets the diagonal to exactly 0, which the unbiased estimators subtract."""
    total = 0.0
    for start in range(0, len(a), CHUNK):
        d2 = _sqdist(a[start : start + CHUNK], b)  # (c, m)
        if same:
            d2.diagonal(offset=start).zero_()
        total = total + fn(d2)
    return total


def mmd_bandwidths(d: int) -> tuple[float, ...]:
    """The default RBF bandwidths in D dimensions: MMD_BANDWIDTHS times sqrt(D / 2) (see the module docstring)."""
    return tuple(h * math.sqrt(d / 2) for h in MMD_BANDWIDTHS)


def _rbf_sums(d2: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Per-bandwidth sums of the RBF kernel exp(-d^2 / (2 h^2)) over a block of squared distances, shape (K,).
    In float32, with exponents clamped at EXP_MIN_F32: exp of a float32 below -87 makes denormals and takes a
    slow path (~15x); a kernel value of e^-80 = 2e-35 instead of less changes no sum."""
    d2 = d2.float()
    return torch.stack([d2.mul(-0.5 / h**2).clamp_(min=EXP_MIN_F32).exp_().sum() for h in bandwidths]).double()


def _need_two(*xs: torch.Tensor) -> None:
    """Unbiased pairwise estimators need at least two samples on each side."""
    if min(len(x) for x in xs) < 2:
        raise ValueError("need at least 2 samples in each set")


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Optional[Sequence[float]] = None) -> float:
    """Unbiased MMD^2_u (Gretton et al. 2012, eq. 3) with RBF kernels, summed over bandwidths (default
    mmd_bandwidths(D)); can be < 0."""
    x, y = _f64(x), _f64(y)  # (m, D), (n, D)
    _need_two(x, y)
    m, n = len(x), len(y)
    hs = mmd_bandwidths(x.shape[1]) if bandwidths is None else bandwidths
    kern = partial(_rbf_sums, bandwidths=[float(h) for h in hs])
    kxx = (_pair_sum(x, x, kern, same=True) - m) / (m * (m - 1))  # drop the diagonal, k(x_i, x_i) = 1
    kyy = (_pair_sum(y, y, kern, same=True) - n) / (n * (n - 1))
    kxy = _pair_sum(x, y, kern) / (m * n)
    return (kxx + kyy - 2 * kxy).sum().item()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo 2013), unbiased U-statistic; can be < 0."""
    x, y = _f64(x), _f64(y)
    _need_two(x, y)
    m, n = len(x), len(y)
    total = lambda d2: d2.sqrt().sum()  # noqa: E731
    exy = _pair_sum(x, y, total) / (m * n)
    exx = _pair_sum(x, x, total, same=True) / (m * (m - 1))  # diagonal terms are exactly 0
    eyy = _pair_sum(y, y, total, same=True) / (n * (n - 1))
    return (2 * exy - exx - eyy).item()


def nll(gmm: GMM, x: torch.Tensor) -> float:
    """Negative log-likelihood under the data distribution, mean_i -log p_0(x_i)."""
    return -log_prob(gmm, _f64(x)).double().mean().item()


def cross_entropy(gmm: GMM, x: torch.Tensor, alpha: float, sigma: float) -> float:
    """Cross-entropy of samples under the noisy marginal, mean_i -log p_t(x_i) at scalar (alpha, sigma)."""
    return -noisy_log_prob(gmm, _f64(x), float(alpha), float(sigma)).mean().item()


def mode_radius(d: int, mass: float = MODE_MASS) -> float:
    """The Mahalanobis radius holding `mass` of a D-dim Gaussian: sqrt(chi2.ppf(mass, D)); 3 at D = 2."""
    return math.sqrt(chi2.ppf(mass, d))


def mode_stats(gmm: GMM, x: torch.Tensor, radius: Optional[float] = None) -> dict:
    """Mode precision/coverage: nearest mode by Mahalanobis distance, a hit if within `radius`
    (default mode_radius(D): the radius holding 98.9 % of a component's own mass in any D).

    precision = fraction of samples that hit a mode.  counts[k] = hits assigned to mode k.
    A mode is covered if counts[k] >= max(1, 0.1 * n * w_k) (at least 10% of its expected
    share, and at least one hit); coverage = fraction of covered modes.
    """
    radius = mode_radius(gmm.dim) if radius is None else radius
    maha2 = mahalanobis_sq(gmm, _f64(x))  # (n, M)
    dmin2, nearest = maha2.min(dim=1)  # (n,), (n,)
    hit = dmin2 <= radius**2
    counts = torch.bincount(nearest[hit], minlength=len(gmm.weights))  # (M,)
    needed = (0.1 * len(x) * gmm.weights).clamp_min(1.0)  # (M,)
    covered = (counts >= needed).double().mean().item()
    return {"precision": hit.double().mean().item(), "coverage": covered, "counts": counts.tolist()}


def _knn_radii2(real: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance from each real point to its k-th nearest other real point, shape (N,)."""
    radii = []
    for s in range(0, len(real), CHUNK):
        d2 = _sqdist(real[s : s + CHUNK], real)
        d2.diagonal(offset=s).zero_()
        radii.append(d2.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest skips the point itself (distance 0)
    return torch.cat(radii)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics"), k-NN balls on real."""
    real, fake = _f64(real), _f64(fake)  # (N, D), (M, D)
    if len(fake) == 0 or len(real) <= k:
        raise ValueError(f"need at least 1 fake and more than k={k} real samples")
    radii2 = _knn_radii2(real, k)  # (N,)
    inside_total, covered = 0.0, []
    for s in range(0, len(real), CHUNK):
        inside = _sqdist(real[s : s + CHUNK], fake) <= radii2[s : s + CHUNK, None]  # (c, M)
        inside_total += inside.sum().item()
        covered.append(inside.any(dim=1))
    density = inside_total / (k * len(fake))
    return {"density": density, "coverage": torch.cat(covered).double().mean().item()}


def sample_metrics(gmm: GMM, x: torch.Tensor, data: torch.Tensor) -> dict:
    """Every final-sample metric of x against held-out data: MMD and energy distance, exact NLL, mode
    precision/coverage, density/coverage. Non-finite samples count as far away (1e3)."""
    x = torch.nan_to_num(x, nan=1e3, posinf=1e3, neginf=-1e3)
    modes = mode_stats(gmm, x)
    dc = density_coverage(data, x)
    return {"mmd": mmd(x, data), "energy": energy_distance(x, data), "nll": nll(gmm, x),
            "mode_precision": modes["precision"], "mode_coverage": modes["coverage"],
            "density": dc["density"], "coverage": dc["coverage"]}


def _forward_samples(gmm: GMM, n: int, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Fresh samples of the forward marginal p_t, x_t = alpha x_0 + sigma eps, shape (n, D)."""
    x, _ = sample(noisy(gmm, alpha, sigma), n, generator)
    return x


def data_floor(gmm: GMM, n: int, seed: int, alpha_sigma: Optional[tuple[float, float]] = None) -> dict:
    """The data-vs-data floor row: sample_metrics of n fresh data samples against n held-out ones (the
    held-out set of toy.run for this seed), i.e. what a perfect sampler scores at this n, in this D. With
    alpha_sigma = (alpha, sigma) of the last student state also "shift_last": the MMD between two
    independent samples of that noisy marginal (the floor of the shift column), else NaN."""
    data, _ = sample(gmm, n, torch.Generator().manual_seed(FLOOR_SEEDS[0] + seed))
    other, _ = sample(gmm, n, torch.Generator().manual_seed(FLOOR_SEEDS[1] + seed))
    row = {**sample_metrics(gmm, other, data), "shift_last": math.nan}
    if alpha_sigma is not None:
        gen = torch.Generator().manual_seed(FLOOR_SEEDS[1] + seed)
        row["shift_last"] = mmd(*(_forward_samples(gmm, n, *alpha_sigma, gen) for _ in range(2)))
    return row


def covariate_shift(
    gmm: GMM,
    states: Sequence[torch.Tensor],
    alphas: Sequence[float],
    sigmas: Sequence[float],
    ref: Optional[Sequence[torch.Tensor]] = None,
    metric: Callable = mmd,
    generator: Optional[torch.Generator] = None,
) -> list[dict]:
    """Covariate shift of inference-time states (DDIL, Sec. 3): distance of the student's states at tau_k to p_{tau_k}.

    For each k: mmd_to_forward = metric(states[k], fresh forward samples of the same size),
    xent = cross-entropy of states[k] under p_{tau_k}, xent_forward = that of the fresh forward
    samples (its floor, the entropy of p_{tau_k} up to sampling noise), and if ref is given
    mmd_to_ref = metric of one half of states[k] against the other half of ref[k] (the two are paired by their x_T,
    and the unbiased MMD assumes independent samples: paired ones read below 0).  generator defaults to a seed-0 generator.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for k, x in enumerate(states):
        a, s = float(alphas[k]), float(sigmas[k])
        fwd = _forward_samples(gmm, len(x), a, s, generator)  # (n, D)
        row = {
            "mmd_to_forward": metric(x, fwd),
            "xent": cross_entropy(gmm, x, a, s),
            "xent_forward": cross_entropy(gmm, fwd, a, s),
        }
        if ref is not None:  # ref[k] comes from the same x_T as x: compare disjoint halves, independent samples
            half = len(x) // 2
            row["mmd_to_ref"] = metric(x[:half], ref[k][half:])
        out.append(row)
    return out
