"""Sample-quality metrics for the toy mixtures; every function takes sample tensors of shape (n, D).

Pairwise quantities are accumulated over row chunks so that memory stays O(chunk * n), which
keeps n = 4000 (16M pairs) cheap.  All arithmetic is float64.
"""
from functools import partial
from typing import Callable, Optional, Sequence

import torch

from toy.mixtures import GMM, log_prob, noisy, noisy_log_prob, sample

F64 = torch.float64
CHUNK = 1024


def _f64(x: torch.Tensor) -> torch.Tensor:
    """Detached float64 copy of a sample tensor, shape (n, D)."""
    return x.detach().to(F64)


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances (no matmul trick, so d(x, x) = 0 exactly), shape (len(a), len(b))."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _pair_sum(a: torch.Tensor, b: torch.Tensor, fn: Callable) -> torch.Tensor:
    """sum_{i,j} fn(|a_i - b_j|) accumulated over row chunks of a; fn maps (c, m) distances to a sum."""
    total = 0.0
    for start in range(0, len(a), CHUNK):
        total = total + fn(_dist(a[start : start + CHUNK], b))
    return total


def _rbf_sums(d: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Per-bandwidth sums of the RBF kernel exp(-d^2 / (2 h^2)) over a block of distances, shape (K,)."""
    d2 = d.square()  # (c, m)
    return torch.stack([d2.mul(-0.5 / h**2).exp_().sum() for h in bandwidths])


def _need_two(*xs: torch.Tensor) -> None:
    """Unbiased pairwise estimators need at least two samples on each side."""
    if min(len(x) for x in xs) < 2:
        raise ValueError("need at least 2 samples in each set")


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    """Unbiased MMD^2_u (Gretton et al. 2012, eq. 3) with RBF kernels, summed over bandwidths; can be < 0."""
    x, y = _f64(x), _f64(y)  # (m, D), (n, D)
    _need_two(x, y)
    m, n = len(x), len(y)
    kern = partial(_rbf_sums, bandwidths=[float(h) for h in bandwidths])
    kxx = (_pair_sum(x, x, kern) - m) / (m * (m - 1))  # drop the diagonal, k(x_i, x_i) = 1
    kyy = (_pair_sum(y, y, kern) - n) / (n * (n - 1))
    kxy = _pair_sum(x, y, kern) / (m * n)
    return (kxx + kyy - 2 * kxy).sum().item()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo 2013), unbiased U-statistic; can be < 0."""
    x, y = _f64(x), _f64(y)
    _need_two(x, y)
    m, n = len(x), len(y)
    total = torch.sum
    exy = _pair_sum(x, y, total) / (m * n)
    exx = _pair_sum(x, x, total) / (m * (m - 1))  # diagonal terms are exactly 0
    eyy = _pair_sum(y, y, total) / (n * (n - 1))
    return (2 * exy - exx - eyy).item()


def nll(gmm: GMM, x: torch.Tensor) -> float:
    """Negative log-likelihood under the data distribution, mean_i -log p_0(x_i)."""
    return -log_prob(gmm, _f64(x)).double().mean().item()


def cross_entropy(gmm: GMM, x: torch.Tensor, alpha: float, sigma: float) -> float:
    """Cross-entropy of samples under the noisy marginal, mean_i -log p_t(x_i) at scalar (alpha, sigma)."""
    return -noisy_log_prob(gmm, _f64(x), float(alpha), float(sigma)).mean().item()


def _mahalanobis(gmm: GMM, x: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances sqrt((x - mu_k)^T Sigma_k^{-1} (x - mu_k)), shape (n, M)."""
    prec = torch.linalg.inv(gmm.covs.to(F64))  # (M, D, D)
    diff = x[:, None, :] - gmm.means.to(F64)  # (n, M, D)
    return torch.einsum("nmd,mde,nme->nm", diff, prec, diff).clamp_min(0).sqrt()


def mode_stats(gmm: GMM, x: torch.Tensor, radius: float = 3.0) -> dict:
    """Mode precision/coverage: nearest mode by Mahalanobis distance, a hit if within `radius`.

    precision = fraction of samples that hit a mode.  counts[k] = hits assigned to mode k.
    A mode is covered if counts[k] >= max(1, 0.1 * n * w_k) (at least 10% of its expected
    share, and at least one hit); coverage = fraction of covered modes.  In 2-D, a radius of
    3 contains 1 - exp(-4.5) = 98.9% of a component's own mass.
    """
    maha = _mahalanobis(gmm, _f64(x))  # (n, M)
    dmin, nearest = maha.min(dim=1)  # (n,), (n,)
    hit = dmin <= radius
    counts = torch.bincount(nearest[hit], minlength=len(gmm.weights))  # (M,)
    needed = (0.1 * len(x) * gmm.weights).clamp_min(1.0)  # (M,)
    covered = (counts >= needed).double().mean().item()
    return {"precision": hit.double().mean().item(), "coverage": covered, "counts": counts.tolist()}


def _knn_radii(real: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each real point to its k-th nearest other real point, shape (N,)."""
    radii = [_dist(real[s : s + CHUNK], real).kthvalue(k + 1, dim=1).values for s in range(0, len(real), CHUNK)]
    return torch.cat(radii)  # the (k+1)-th smallest skips the point itself (distance 0)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics"), k-NN balls on real."""
    real, fake = _f64(real), _f64(fake)  # (N, D), (M, D)
    if len(fake) == 0 or len(real) <= k:
        raise ValueError(f"need at least 1 fake and more than k={k} real samples")
    radii = _knn_radii(real, k)  # (N,)
    inside_total, covered = 0.0, []
    for s in range(0, len(real), CHUNK):
        inside = _dist(real[s : s + CHUNK], fake) <= radii[s : s + CHUNK, None]  # (c, M)
        inside_total += inside.sum().item()
        covered.append(inside.any(dim=1))
    density = inside_total / (k * len(fake))
    return {"density": density, "coverage": torch.cat(covered).double().mean().item()}


def _forward_samples(gmm: GMM, n: int, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Fresh samples of the forward marginal p_t, x_t = alpha x_0 + sigma eps, shape (n, D)."""
    x, _ = sample(noisy(gmm, alpha, sigma), n, generator)
    return x


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
    mmd_to_ref = metric(states[k], ref[k]).  generator defaults to a seed-0 generator.
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
        if ref is not None:
            row["mmd_to_ref"] = metric(x, ref[k])
        out.append(row)
    return out
