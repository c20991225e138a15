"""Gaussian mixtures with closed-form noisy marginals, exact scores and exact epsilon targets.

A mixture p_0(x) = sum_k w_k N(x; mu_k, Sigma_k) pushed through the forward process
x_t = alpha * x_0 + sigma * eps, eps ~ N(0, I), stays a mixture (the marginal p_t):

    p_t(x) = sum_k w_k N(x; alpha mu_k, C_k),   C_k = alpha^2 Sigma_k + sigma^2 I.

Everything the toy experiments need (sampling, log densities, the exact epsilon a perfect
teacher would predict) follows from this formula.  Density math runs in float64.  We write
Sigma_k = U_k diag(lam_k) U_k^T once, so C_k = U_k diag(alpha^2 lam_k + sigma^2) U_k^T and
every noise level costs only elementwise operations.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

F64 = torch.float64
SYM_TOL = 1e-6
SUM_TOL = 1e-6
JSON_KEYS = ("weights", "means", "covs", "labels", "name")


class MixtureError(ValueError):
    """A mixture specification is malformed; the message names the bad field."""


@dataclass(frozen=True, eq=False)
class GMM:
    weights: torch.Tensor  # (M,) mixture weights, >= 0, sum to 1
    means: torch.Tensor  # (M, D) component means
    covs: torch.Tensor  # (M, D, D) component covariances, symmetric positive definite
    labels: torch.Tensor  # (M,) long, class id of each component; zeros if unconditional
    name: str = "custom"

    @property
    def num_classes(self) -> int:
        """Number of classes, labels.max() + 1."""
        return int(self.labels.max()) + 1


# ----------------------------------------------------------------------------- validation


def _to_float(field: str, value) -> torch.Tensor:
    """Convert one numeric field to a float64 tensor, or raise MixtureError naming it."""
    try:
        t = torch.as_tensor(value, dtype=F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise MixtureError(f"{field}: could not read as a numeric array ({e})") from None
    if not torch.isfinite(t).all():
        raise MixtureError(f"{field}: all entries must be finite numbers")
    return t


def _to_labels(labels, m: int) -> torch.Tensor:
    """Convert labels (or None -> zeros) to a (M,) long tensor of non-negative integers."""
    if labels is None:
        return torch.zeros(m, dtype=torch.long)
    t = _to_float("labels", labels)
    if t.shape != (m,) or (t != t.round()).any() or (t < 0).any():
        raise MixtureError(f"labels: expected {m} non-negative integers (one per component), got {t.tolist()}")
    return t.long()


def _check_shapes(w: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> None:
    """Shapes must be weights (M,), means (M, D), covs (M, D, D)."""
    if w.ndim != 1 or len(w) == 0:
        raise MixtureError(f"weights: expected a non-empty list of M numbers, got shape {tuple(w.shape)}")
    m = len(w)
    if mu.ndim != 2 or mu.shape[0] != m or mu.shape[1] == 0:
        raise MixtureError(f"means: expected shape (M, D) with M = {m} (len(weights)), got {tuple(mu.shape)}")
    d = mu.shape[1]
    if cov.shape != (m, d, d):
        raise MixtureError(f"covs: expected shape (M, D, D) = ({m}, {d}, {d}) to match means, got {tuple(cov.shape)}")


def _check_weights(w: torch.Tensor) -> None:
    """Weights must be >= 0 and sum to 1 (tolerance 1e-6)."""
    if (w < 0).any():
        raise MixtureError(f"weights: must all be >= 0, got min {w.min().item():.6g}")
    if abs(w.sum().item() - 1.0) > SUM_TOL:
        raise MixtureError(f"weights: must sum to 1 (tol {SUM_TOL}), got {w.sum().item():.9g}")


def _check_covs(cov: torch.Tensor) -> None:
    """Each covariance must be symmetric (tolerance 1e-6) and positive definite (Cholesky succeeds)."""
    asym = (cov - cov.transpose(-1, -2)).abs().amax(dim=(-1, -2))  # (M,)
    if (asym > SYM_TOL).any():
        k = int(asym.argmax())
        raise MixtureError(f"covs: component {k} is not symmetric (max |C - C^T| = {asym[k].item():.3g})")
    _, info = torch.linalg.cholesky_ex(cov)  # (M,) nonzero where Cholesky fails
    if (info != 0).any():
        k = int((info != 0).nonzero()[0])
        raise MixtureError(f"covs: component {k} is not positive definite")


def validate(gmm: GMM) -> GMM:
    """Check a mixture is well formed; return a canonical copy (float64, long labels) or raise MixtureError."""
    w, mu, cov = (_to_float(f, getattr(gmm, f)) for f in ("weights", "means", "covs"))
    _check_shapes(w, mu, cov)
    _check_weights(w)
    _check_covs(cov)
    labels = _to_labels(gmm.labels, len(w))
    return GMM(w, mu, cov, labels, str(gmm.name))


def make_gmm(weights, means, covs, labels=None, name: str = "custom") -> GMM:
    """Build and validate a mixture from array-likes; labels default to zeros (unconditional)."""
    return validate(GMM(weights, means, covs, labels, name))


# ----------------------------------------------------------------------------- moments


def moments(gmm: GMM) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture mean m = sum_k w_k mu_k and covariance sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T."""
    w, mu = gmm.weights, gmm.means  # (M,), (M, D)
    mean = w @ mu  # (D,)
    second = torch.einsum("m,mij->ij", w, gmm.covs + mu[:, :, None] * mu[:, None, :])  # (D, D)
    return mean, second - torch.outer(mean, mean)


def overall_std(gmm: GMM) -> float:
    """Overall data std: sqrt of the mean per-dimension variance, sqrt(tr Cov / D)."""
    _, cov = moments(gmm)
    return math.sqrt(cov.trace().item() / cov.shape[0])


def component_stds(gmm: GMM) -> torch.Tensor:
    """Per-component standard deviations along principal axes, sqrt(eig(Sigma_k)) ascending, shape (M, D)."""
    return torch.linalg.eigvalsh(gmm.covs).sqrt()


def min_separation(gmm: GMM) -> float:
    """Smallest Euclidean distance between two component means (inf for a single component)."""
    d = torch.cdist(gmm.means, gmm.means)  # (M, M)
    d.fill_diagonal_(math.inf)
    return d.min().item()


def scale_to_unit_std(gmm: GMM) -> GMM:
    """Rescale about the origin (means / s, covs / s^2) so that overall_std becomes 1."""
    s = overall_std(gmm)
    return GMM(gmm.weights, gmm.means / s, gmm.covs / s**2, gmm.labels, gmm.name)


# ----------------------------------------------------------------------------- builtins


def _rotation(theta: float) -> torch.Tensor:
    """2-D rotation matrix R(theta), shape (2, 2)."""
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def _isotropic(m: int, std: float) -> torch.Tensor:
    """M copies of std^2 I_2, shape (M, 2, 2)."""
    return std**2 * torch.eye(2, dtype=F64).expand(m, 2, 2).clone()


def _on_circle(m: int, radius: float) -> torch.Tensor:
    """M points equally spaced on a circle, shape (M, 2)."""
    angles = 2 * math.pi * torch.arange(m, dtype=F64) / m  # (M,)
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def _centred(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Shift means so the mixture mean sum_k w_k mu_k is zero."""
    return mu - w @ mu


def ring8() -> GMM:
    """8 equal modes on a circle (std 0.12, radius chosen for unit overall std); 2 classes alternate."""
    std = 0.12
    radius = math.sqrt(2 * (1 - std**2))  # overall variance per dim = radius^2 / 2 + std^2 = 1
    w = torch.full((8,), 1 / 8, dtype=F64)
    g = make_gmm(w, _on_circle(8, radius), _isotropic(8, std), torch.arange(8) % 2, "ring8")
    return scale_to_unit_std(g)


def grid25() -> GMM:
    """5x5 grid of equal modes (std 0.10); class = row index (5 classes)."""
    std = 0.10
    h = math.sqrt((1 - std**2) / 2)  # variance of {-2,..,2} h is 2 h^2, plus std^2 gives 1
    ticks = h * torch.arange(-2, 3, dtype=F64)  # (5,)
    rows, cols = torch.meshgrid(ticks, ticks, indexing="ij")  # (5, 5) each
    mu = torch.stack([cols.flatten(), -rows.flatten()], dim=1)  # (25, 2), row 0 at the top
    labels = torch.arange(25) // 5
    g = make_gmm(torch.full((25,), 1 / 25, dtype=F64), mu, _isotropic(25, std), labels, "grid25")
    return scale_to_unit_std(g)


def unequal() -> GMM:
    """6 isotropic modes on a hexagon with weights 0.4 ... 0.04; class 0 = heavy modes (w >= 0.15)."""
    w = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=F64)
    mu = _centred(w, _on_circle(6, 1.0))  # (6, 2)
    labels = (w < 0.15).long()
    g = make_gmm(w, mu, _isotropic(6, 0.085), labels, "unequal")
    return scale_to_unit_std(g)


def aniso() -> GMM:
    """5 elongated, rotated modes (axis stds 0.25 and 0.10 after scaling) on a pentagon; held-out mixture."""
    w = torch.tensor([0.24, 0.22, 0.20, 0.18, 0.16], dtype=F64)
    radius = 1.385  # ~unit overall std once covariances are added
    tilts = [0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi / 9]
    axes = torch.diag(torch.tensor([0.25**2, 0.10**2], dtype=F64))  # (2, 2)
    covs = torch.stack([_rotation(t) @ axes @ _rotation(t).T for t in tilts])  # (5, 2, 2)
    mu = _centred(w, _on_circle(5, radius))
    g = make_gmm(w, mu, (covs + covs.transpose(1, 2)) / 2, torch.arange(5) % 2, "aniso")
    return scale_to_unit_std(g)


BUILTINS: dict[str, Callable[[], GMM]] = {"ring8": ring8, "grid25": grid25, "unequal": unequal, "aniso": aniso}


# ----------------------------------------------------------------------------- JSON i/o


def _read_json(path: Path) -> dict:
    """Parse a mixture JSON file into a dict, or raise MixtureError."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixtureError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MixtureError(f"{path}: top level must be a JSON object with keys weights, means, covs")
    return data


def _from_dict(data: dict, default_name: str) -> GMM:
    """Build a validated GMM from a parsed JSON object."""
    for key in ("weights", "means", "covs"):
        if key not in data:
            raise MixtureError(f"{key}: required key missing (need weights, means, covs; optional labels, name)")
    unknown = sorted(set(data) - set(JSON_KEYS))
    if unknown:
        raise MixtureError(f"{unknown[0]}: unknown key (allowed: {', '.join(JSON_KEYS)})")
    return make_gmm(data["weights"], data["means"], data["covs"], data.get("labels"), data.get("name", default_name))


def load_mixture(spec: str) -> GMM:
    """Load a builtin mixture by name, or a JSON file {weights, means, covs, [labels], [name]}."""
    if spec in BUILTINS:
        return BUILTINS[spec]()
    path = Path(spec)
    if not path.is_file():
        raise MixtureError(f"mixture {spec!r}: not a builtin ({', '.join(BUILTINS)}) and not a JSON file")
    return _from_dict(_read_json(path), path.stem)


def save_mixture(gmm: GMM, path) -> None:
    """Write a mixture as JSON, the inverse of load_mixture."""
    data = {
        "name": gmm.name,
        "weights": gmm.weights.tolist(),
        "means": gmm.means.tolist(),
        "covs": gmm.covs.tolist(),
        "labels": gmm.labels.tolist(),
    }
    Path(path).write_text(json.dumps(data, indent=1))


# ----------------------------------------------------------------------------- sampling


def _class_mask(gmm: GMM, cls: torch.Tensor) -> torch.Tensor:
    """Boolean (n, M) mask of components whose label equals cls[i]; every class must have one."""
    mask = gmm.labels.to(cls.device)[None, :] == cls.long()[:, None]  # (n, M)
    if not mask.any(dim=1).all():
        bad = cls[~mask.any(dim=1)].unique().tolist()
        raise MixtureError(f"cls: class ids {bad} have no components (labels are {gmm.labels.unique().tolist()})")
    return mask


def _draw_components(gmm: GMM, n: int, generator: torch.Generator, cls=None) -> torch.Tensor:
    """Draw component indices k ~ w (or w restricted to label cls[i] and renormalised), shape (n,)."""
    if cls is None:
        return torch.multinomial(gmm.weights, n, replacement=True, generator=generator)
    probs = gmm.weights[None, :] * _class_mask(gmm, cls.cpu())  # (n, M), rows renormalised by multinomial
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample(gmm: GMM, n: int, generator: torch.Generator, cls=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling: k ~ w (within class cls[i] if given), x = mu_k + L_k z with L_k L_k^T = Sigma_k."""
    comp = _draw_components(gmm, n, generator, cls)  # (n,)
    z = torch.randn(n, gmm.means.shape[1], generator=generator, dtype=F64)  # (n, D)
    chol = torch.linalg.cholesky(gmm.covs)  # (M, D, D)
    x = gmm.means[comp] + (chol[comp] @ z[:, :, None]).squeeze(-1)  # (n, D)
    return x.float(), comp


def restrict(gmm: GMM, cls: int) -> GMM:
    """Class-conditional mixture p(x | c): components with label c, weights renormalised."""
    keep = gmm.labels == cls  # (M,)
    if not keep.any():
        raise MixtureError(f"cls: class {cls} has no components (labels are {gmm.labels.unique().tolist()})")
    w = gmm.weights[keep]
    return GMM(w / w.sum(), gmm.means[keep], gmm.covs[keep], gmm.labels[keep], f"{gmm.name}|{cls}")


def noisy(gmm: GMM, alpha: float, sigma: float) -> GMM:
    """Marginal of x_t = alpha x_0 + sigma eps: means alpha mu_k, covs alpha^2 Sigma_k + sigma^2 I."""
    eye = torch.eye(gmm.means.shape[1], dtype=gmm.covs.dtype)
    covs = alpha**2 * gmm.covs + sigma**2 * eye  # (M, D, D)
    return GMM(gmm.weights, alpha * gmm.means, covs, gmm.labels, gmm.name)


# ----------------------------------------------------------------------------- exact densities and scores


def _per_sample(v, n: int, device) -> torch.Tensor:
    """A scalar or (n,) noise coefficient as a float64 (n,) tensor."""
    t = torch.as_tensor(v, dtype=F64, device=device)
    return t.expand(n) if t.ndim == 0 else t.reshape(n)


def _eigen_terms(gmm: GMM, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """Eigenvalues of C_k per sample and U_k^T (x - alpha mu_k): Sigma_k = U_k diag(lam_k) U_k^T."""
    lam, u = torch.linalg.eigh(gmm.covs.to(x.device, F64))  # (M, D), (M, D, D)
    a, s = alpha[:, None, None], sigma[:, None, None]  # (n, 1, 1)
    var = a**2 * lam + s**2  # (n, M, D) eigenvalues of C_k = alpha^2 Sigma_k + sigma^2 I
    diff = x[:, None, :] - a * gmm.means.to(x.device, F64)  # (n, M, D)
    proj = torch.einsum("nmd,mde->nme", diff, u)  # (n, M, D) coordinates in the eigenbasis
    return var, proj, u


def _log_joint(gmm: GMM, var: torch.Tensor, proj: torch.Tensor, cls=None) -> torch.Tensor:
    """log w_k + log N(x; alpha mu_k, C_k), shape (n, M); -inf outside class cls[i] when given."""
    d = var.shape[-1]
    log_normal = -0.5 * ((proj**2 / var).sum(-1) + var.log().sum(-1) + d * math.log(2 * math.pi))  # (n, M)
    out = gmm.weights.to(var.device, F64).log() + log_normal
    if cls is not None:
        out = out.masked_fill(~_class_mask(gmm, cls.to(var.device)), -math.inf)
    return out


def noisy_log_prob(gmm: GMM, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """log p_t(x_i) = logsumexp_k [log w_k + log N(x_i; alpha_i mu_k, C_k)] per sample; differentiable in x."""
    x64 = x.to(F64)  # (n, D)
    n = x64.shape[0]
    var, proj, _ = _eigen_terms(gmm, x64, _per_sample(alpha, n, x.device), _per_sample(sigma, n, x.device))
    return torch.logsumexp(_log_joint(gmm, var, proj), dim=1).to(x.dtype)  # (n,)


def log_prob(gmm: GMM, x: torch.Tensor) -> torch.Tensor:
    """Exact data log density log p_0(x) (float64 inside), returned as float32, shape (n,)."""
    return noisy_log_prob(gmm, x.to(F64), 1.0, 0.0).float()


def _eps_from_terms(gmm: GMM, x, alpha, sigma, cls=None) -> torch.Tensor:
    """eps = -sigma grad log p_t = sigma sum_k r_k(x) C_k^{-1} (x - alpha mu_k), shape (n, D)."""
    x64 = x.to(F64)  # (n, D)
    n = x64.shape[0]
    sigma = _per_sample(sigma, n, x.device)
    var, proj, u = _eigen_terms(gmm, x64, _per_sample(alpha, n, x.device), sigma)
    resp = torch.softmax(_log_joint(gmm, var, proj, cls), dim=1)  # (n, M) posterior r_k(x)
    solve = torch.einsum("nme,mde->nmd", proj / var, u)  # (n, M, D) C_k^{-1} (x - alpha mu_k)
    eps = sigma[:, None] * (resp[:, :, None] * solve).sum(1)  # (n, D)
    return eps.to(x.dtype)


def exact_eps(gmm: GMM, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Exact epsilon-prediction of the noisy marginal p_t, eps = -sigma grad_x log p_t(x) (Tweedie), shape (n, D)."""
    return _eps_from_terms(gmm, x, alpha, sigma)


def exact_eps_cond(gmm: GMM, x: torch.Tensor, alpha, sigma, cls: torch.Tensor) -> torch.Tensor:
    """Exact class-conditional epsilon, -sigma grad log p_t(x | cls_i), by masking other classes' log-weights."""
    return _eps_from_terms(gmm, x, alpha, sigma, cls)
