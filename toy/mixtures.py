"""Gaussian mixtures in D dimensions with closed-form noisy marginals, exact scores and exact epsilon targets.

A mixture p_0(x) = sum_k w_k N(x; mu_k, Sigma_k) pushed through the forward process
x_t = alpha * x_0 + sigma * eps, eps ~ N(0, I), stays a mixture (the marginal p_t):

    p_t(x) = sum_k w_k N(x; alpha mu_k, C_k),   C_k = alpha^2 Sigma_k + sigma^2 I.

Everything the toy experiments need (sampling, log densities, the exact epsilon a perfect teacher
would predict) follows from this formula, in any dimension D (2 is the default). Density math runs
in float64. Each covariance is decomposed once per mixture (`Spectrum`) as a bulk eigenvalue c_k
times I plus r_k other eigenpairs,

    Sigma_k = c_k I + V_k diag(lam_k - c_k) V_k^T,    V_k: (D, r),

and since C_k has the same eigenvectors (eigenvalues alpha^2 lam + sigma^2), every noise level costs
O(n M D (r + 1)) with no decomposition per call. r is 0 for isotropic components and 2 for the
built-in families lifted to D dimensions, whatever D is.

Built-ins (`load_mixture` names; BUILTIN_HELP lists them):
  ring8, grid25, unequal, aniso     2-D mixtures of unit overall std
  <name>-d<D>                       one of them on a fixed random 2-plane of R^D (the data plane,
                                    `plane(gmm)`), with std OFF_PLANE_STD off the plane: ring8-d32
  lowrank-d<D>                      ring8's means; each component a rank-2 covariance in its own
                                    random directions of R^D plus OFF_PLANE_STD off them (D >= 3)
"""
import json
import math
import re
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

F64 = torch.float64
SYM_TOL = 1e-6
SUM_TOL = 1e-6
ORTHO_TOL = 1e-6  # a stored plane must have orthonormal columns to this tolerance
JSON_KEYS = ("weights", "means", "covs", "labels", "name", "plane")
MIN_STD = 0.01  # smallest component std the exact teacher resolves; see _check_scale
MAX_SCALE = 100.0  # largest |mean coordinate| and component std; see _check_scale
MAX_DIM = 1024  # largest D of a built-in name (covs hold M D^2 float64s)
OFF_PLANE_STD = 0.10  # std off the data plane of the lifted built-ins: the 2-D rule (component std >= 0.10, 3x the
# schedule's smallest noise level) in every direction; at 0.05 the 192-step teacher was too sharp off the plane
LOWRANK_STD = 0.15  # std along each of a lowrank component's 2 own directions
PLANE_SEED = 1_000  # the data plane of R^D is drawn from seed PLANE_SEED + D
SPECTRUM_RTOL = 1e-10  # eigenvalues closer than this times the largest are one bulk eigenvalue
EXP_MIN = -700.0  # log posterior ratios are clamped here before exp (float64 exp's fast range), see _softmax


class MixtureError(ValueError):
    """A mixture specification is malformed; the message names the bad field."""


class Spectrum(NamedTuple):
    """Sigma_k = c_k I + V_k diag(lam_k - c_k) V_k^T, laid out so that a call is a few large tensor ops."""
    c: torch.Tensor  # (M,) bulk eigenvalue of each component covariance
    lam: torch.Tensor  # (r, M) its other eigenvalues, lam[j, k] (padding entries equal c_k, which is exact)
    V_mu: torch.Tensor  # (r, M) v_jk . mu_k, for the eigenvectors v_jk of lam[j, k]
    W: torch.Tensor  # (D, M + r M) [mu^T | v_jk in column M + j M + k]: one matmul gives x.mu_k and v_jk.x
    WT: torch.Tensor  # (M + r M, D) W transposed, contiguous
    mu_sq: torch.Tensor  # (M,) |mu_k|^2
    log_w0: torch.Tensor  # (M,) log w_k - D/2 log(2 pi), the constant part of log w_k N(x; ., C_k)


@dataclass(frozen=True, eq=False)
class GMM:
    weights: torch.Tensor  # (M,) mixture weights, >= 0, sum to 1
    means: torch.Tensor  # (M, D) component means
    covs: torch.Tensor  # (M, D, D) component covariances, symmetric positive definite
    labels: torch.Tensor  # (M,) long, class id of each component; zeros if unconditional
    name: str = "custom"
    plane: Optional[torch.Tensor] = None  # (D, 2) orthonormal basis of the data plane, or None (see plane())

    @property
    def num_classes(self) -> int:
        """Number of classes, labels.max() + 1."""
        return int(self.labels.max()) + 1

    @property
    def dim(self) -> int:
        """The dimension D."""
        return self.means.shape[1]

    @cached_property
    def spectrum(self) -> Spectrum:
        """The eigen-decomposition of every covariance, computed once per mixture (see the module docstring)."""
        return _spectrum(self.weights.to(F64), self.means.to(F64), self.covs.to(F64))


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


def _check_covs(cov: torch.Tensor) -> torch.Tensor:
    """Each covariance must be symmetric (tolerance 1e-6) and positive definite. Returns its stds (M, D)."""
    asym = (cov - cov.transpose(-1, -2)).abs().amax(dim=(-1, -2))  # (M,)
    if (asym > SYM_TOL).any():
        k = int(asym.argmax())
        raise MixtureError(f"covs: component {k} is not symmetric (max |C - C^T| = {asym[k].item():.3g})")
    lam = torch.linalg.eigvalsh(cov)  # (M, D) ascending
    if (lam[:, 0] <= 0).any():
        k = int((lam[:, 0] <= 0).nonzero()[0])
        raise MixtureError(f"covs: component {k} is not positive definite (smallest eigenvalue {lam[k, 0].item():.3g})")
    return lam.sqrt()


def _check_scale(mu: torch.Tensor, stds: torch.Tensor) -> None:
    """The scales the exact teacher and the toy's float32 states handle: |mean coordinates| and stds up to
    MAX_SCALE (the schedules assume data of about unit scale), stds down to MIN_STD (about a third of the
    SD schedule's smallest noise level sigma_0 = 0.029: a narrower component ends the sampler at its mean)."""
    if mu.abs().max() > MAX_SCALE:
        raise MixtureError(f"means: |coordinate| up to {mu.abs().max().item():.3g}; allowed <= {MAX_SCALE:g} "
                           f"(rescale the mixture: the noise schedules assume data of about unit scale)")
    if stds.max() > MAX_SCALE:
        raise MixtureError(f"covs: a component std of {stds.max().item():.3g}; allowed <= {MAX_SCALE:g} "
                           f"(rescale the mixture: the noise schedules assume data of about unit scale)")
    if stds.min() < MIN_STD:
        k = int(stds[:, 0].argmin())
        raise MixtureError(f"covs: component {k} has std {stds[k, 0].item():.3g} along an axis; allowed >= {MIN_STD:g} "
                           f"(narrower than a third of the smallest noise level, the exact teacher's samples collapse onto the mean)")


def _check_plane(plane, d: int) -> Optional[torch.Tensor]:
    """An optional (D, 2) basis with orthonormal columns."""
    if plane is None:
        return None
    q = _to_float("plane", plane)
    if q.shape != (d, 2) or d < 2:
        raise MixtureError(f"plane: expected shape (D, 2) = ({d}, 2) with D >= 2, got {tuple(q.shape)}")
    if (q.T @ q - torch.eye(2, dtype=F64)).abs().max() > ORTHO_TOL:
        raise MixtureError(f"plane: columns must be orthonormal (tol {ORTHO_TOL})")
    return q


def validate(gmm: GMM) -> GMM:
    """Check a mixture is well formed; return a canonical copy (float64, long labels) or raise MixtureError."""
    w, mu, cov = (_to_float(f, getattr(gmm, f)) for f in ("weights", "means", "covs"))
    _check_shapes(w, mu, cov)
    _check_weights(w)
    _check_scale(mu, _check_covs(cov))
    labels = _to_labels(gmm.labels, len(w))
    return GMM(w, mu, cov, labels, str(gmm.name), _check_plane(gmm.plane, mu.shape[1]))


def make_gmm(weights, means, covs, labels=None, name: str = "custom", plane=None) -> GMM:
    """Build and validate a mixture from array-likes; labels default to zeros (unconditional)."""
    return validate(GMM(weights, means, covs, labels, name, plane))


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
    return replace(gmm, means=gmm.means / s, covs=gmm.covs / s**2)


def plane(gmm: GMM) -> torch.Tensor:
    """A (D, 2) basis to draw the data in 2-D, x @ plane(gmm): the stored data plane of a lifted mixture;
    the identity for D = 2; the first axis (and a zero column) for D = 1; otherwise the top two principal
    axes of the mixture covariance, each signed so that its largest entry is positive."""
    d = gmm.dim
    if gmm.plane is not None:
        return gmm.plane
    if d <= 2:
        return torch.eye(d, 2, dtype=F64)
    _, vecs = torch.linalg.eigh(moments(gmm)[1])  # ascending eigenvalues
    q = vecs[:, [-1, -2]]  # (D, 2)
    sign = torch.sign(q.gather(0, q.abs().argmax(0, keepdim=True)))  # (1, 2)
    return q * sign


# ----------------------------------------------------------------------------- builtins


def _rotation(theta: float) -> torch.Tensor:
    """2-D rotation matrix R(theta), shape (2, 2)."""
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def _isotropic(m: int, std: float, d: int = 2) -> torch.Tensor:
    """M copies of std^2 I_d, shape (M, d, d)."""
    return std**2 * torch.eye(d, dtype=F64).expand(m, d, d).clone()


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
BUILTIN_HELP = (f"built-in {', '.join(BUILTINS)}; <name>-d<D> puts one on a random 2-plane of R^D (e.g. ring8-d32, "
                f"D in [2, {MAX_DIM}]); lowrank-d<D> has rank-2 components in random directions (D >= 3)")


def _orthonormal(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A random (d, r) matrix with orthonormal columns (QR of a Gaussian matrix, signs fixed)."""
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(rr))[None, :]


def data_plane(d: int) -> torch.Tensor:
    """The fixed data plane of R^d shared by every lifted built-in: I_2 for d = 2, else seeded random, (d, 2)."""
    return torch.eye(2, dtype=F64) if d == 2 else _orthonormal(d, 2, torch.Generator().manual_seed(PLANE_SEED + d))


def _flat(q: torch.Tensor, in_plane: torch.Tensor, off_std: float) -> torch.Tensor:
    """Covariances q S_k q^T + off_std^2 (I - q q^T) for (M, r, r) in-subspace blocks S_k, shape (M, D, D)."""
    d = q.shape[0]
    off = off_std**2 * (torch.eye(d, dtype=F64) - q @ q.T)  # (D, D)
    covs = q @ in_plane @ q.T + off  # (M, D, D)
    return (covs + covs.transpose(1, 2)) / 2


def lift(base: GMM, d: int, off_std: float = OFF_PLANE_STD) -> GMM:
    """A 2-D mixture on the data plane Q of R^d: means Q mu_k, covs Q Sigma_k Q^T + off_std^2 (I - Q Q^T).
    Projected onto the plane it is the 2-D mixture exactly; off the plane every component has std off_std."""
    q = data_plane(d)
    return make_gmm(base.weights, base.means @ q.T, _flat(q, base.covs, off_std), base.labels, f"{base.name}-d{d}", q)


def lowrank(d: int, std: float = LOWRANK_STD, off_std: float = OFF_PLANE_STD) -> GMM:
    """ring8's means on the data plane; component k has std `std` along 2 random directions U_k of R^d (its
    own, seeded) and off_std off them: Sigma_k = std^2 U_k U_k^T + off_std^2 (I - U_k U_k^T), rank 2 + small."""
    base, q = ring8(), data_plane(d)
    gen = torch.Generator().manual_seed(PLANE_SEED + 7 * d + 1)
    covs = torch.stack([_flat(_orthonormal(d, 2, gen), std**2 * torch.eye(2, dtype=F64)[None], off_std)[0]
                        for _ in range(len(base.weights))])  # (M, D, D)
    return make_gmm(base.weights, base.means @ q.T, covs, base.labels, f"lowrank-d{d}", q)


def _parse_lifted(spec: str) -> Optional[GMM]:
    """The mixture of a name '<base>-d<D>' (None if spec is not of that form)."""
    m = re.fullmatch(r"([a-z0-9]+)-d(\d+)", spec)
    if m is None or m.group(1) not in (*BUILTINS, "lowrank"):
        return None
    base, d = m.group(1), int(m.group(2))
    low = 3 if base == "lowrank" else 2
    if not low <= d <= MAX_DIM:
        raise MixtureError(f"mixture {spec!r}: D = {d}; allowed D in [{low}, {MAX_DIM}] for {base}-d<D>")
    return lowrank(d) if base == "lowrank" else lift(BUILTINS[base](), d)


@lru_cache(maxsize=16)
def _builtin(spec: str) -> Optional[GMM]:
    """A built-in by name, made once per process (a GMM is immutable), or None."""
    return BUILTINS[spec]() if spec in BUILTINS else _parse_lifted(spec)


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
            raise MixtureError(f"{key}: required key missing (need weights, means, covs; optional labels, name, plane)")
    unknown = sorted(set(data) - set(JSON_KEYS))
    if unknown:
        raise MixtureError(f"{unknown[0]}: unknown key (allowed: {', '.join(JSON_KEYS)})")
    return make_gmm(data["weights"], data["means"], data["covs"], data.get("labels"), data.get("name", default_name),
                    data.get("plane"))


def load_mixture(spec: str) -> GMM:
    """Load a built-in by name (BUILTIN_HELP), or a JSON file {weights, means, covs, [labels], [name], [plane]}."""
    gmm = _builtin(spec)
    if gmm is not None:
        return gmm
    path = Path(spec)
    if not path.exists():
        raise MixtureError(f"mixture {spec!r}: no such file, and not a built-in ({', '.join(BUILTINS)}, <name>-d<D>, lowrank-d<D>)")
    if not path.is_file():
        raise MixtureError(f"mixture {spec!r}: not a built-in and not a JSON file")
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
    if gmm.plane is not None:
        data["plane"] = gmm.plane.tolist()
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
    """Ancestral sampling: k ~ w (within class cls[i] if given), x = mu_k + Sigma_k^{1/2} z, z ~ N(0, I), with
    Sigma_k^{1/2} = sqrt(c_k) I + sum_j (sqrt(lam_jk) - sqrt(c_k)) v_jk v_jk^T from the cached spectrum."""
    comp = _draw_components(gmm, n, generator, cls)  # (n,)
    z = torch.randn(n, gmm.dim, generator=generator, dtype=F64)  # (n, D)
    sp = gmm.spectrum
    (r, M), root_c = sp.lam.shape, sp.c.sqrt()
    x = gmm.means[comp] + root_c[comp, None] * z  # (n, D)
    if r:
        pick = torch.nn.functional.one_hot(comp, M).to(F64)[:, None, :]  # (n, 1, M)
        coef = (z @ sp.W[:, M:]).view(n, r, M) * (sp.lam.sqrt() - root_c) * pick  # (n, r, M) only component k's
        x = x + coef.flatten(1) @ sp.WT[M:]
    return x.float(), comp


def restrict(gmm: GMM, cls: int) -> GMM:
    """Class-conditional mixture p(x | c): components with label c, weights renormalised."""
    keep = gmm.labels == cls  # (M,)
    if not keep.any():
        raise MixtureError(f"cls: class {cls} has no components (labels are {gmm.labels.unique().tolist()})")
    w = gmm.weights[keep]
    return replace(gmm, weights=w / w.sum(), means=gmm.means[keep], covs=gmm.covs[keep], labels=gmm.labels[keep],
                   name=f"{gmm.name}|{cls}")


def noisy(gmm: GMM, alpha: float, sigma: float) -> GMM:
    """Marginal of x_t = alpha x_0 + sigma eps: means alpha mu_k, covs alpha^2 Sigma_k + sigma^2 I."""
    eye = torch.eye(gmm.dim, dtype=gmm.covs.dtype)
    return replace(gmm, means=alpha * gmm.means, covs=alpha**2 * gmm.covs + sigma**2 * eye)


# ----------------------------------------------------------------------------- exact densities and scores


def _bulk(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The most repeated eigenvalue c of one covariance (ascending lam (D,)) and a mask of the others."""
    same = (lam[:, None] - lam[None, :]).abs() <= SPECTRUM_RTOL * lam[-1]  # (D, D)
    j = int(same.sum(1).argmax())
    return lam[j], ~same[j]


def _spectrum(w: torch.Tensor, mu: torch.Tensor, covs: torch.Tensor) -> Spectrum:
    """Split each Sigma_k into its bulk eigenvalue c_k and r other eigenpairs (r = the most any component
    has; components with fewer are padded with eigenvalue c_k, whose correction term is exactly 0)."""
    lam_all, u = torch.linalg.eigh(covs)  # (M, D), (M, D, D)
    bulks = [_bulk(lam) for lam in lam_all]
    r = max(int(other.sum()) for _, other in bulks)
    lam_rows, vec_rows = [], []
    for (c_k, other), lam_k, u_k in zip(bulks, lam_all, u):
        idx = torch.argsort((~other).to(torch.int8), stable=True)[:r]  # the other eigenpairs first
        lam_rows.append(torch.where(other[idx], lam_k[idx], c_k))
        vec_rows.append(u_k[:, idx])
    c, lam, V = torch.stack([b for b, _ in bulks]), torch.stack(lam_rows).T, torch.stack(vec_rows, dim=2)  # (M,), (r, M), (D, r, M)
    d = mu.shape[1]
    W = torch.cat([mu.T, V.reshape(d, -1)], dim=1)  # (D, M + r M)
    V_mu = torch.einsum("drm,md->rm", V, mu)  # (r, M)
    return Spectrum(c, lam.contiguous(), V_mu, W, W.T.contiguous(), mu.square().sum(1), w.log() - 0.5 * d * math.log(2 * math.pi))


def _per_sample(v, n: int, device) -> torch.Tensor:
    """A scalar or (n,) noise coefficient as a float64 (n,) tensor."""
    t = torch.as_tensor(v, dtype=F64, device=device)
    return t.expand(n) if t.ndim == 0 else t.reshape(n)


class _Terms(NamedTuple):
    """Per-sample, per-component pieces of N(x; alpha mu_k, C_k) in the spectrum's basis."""
    quad: torch.Tensor  # (n, M) squared Mahalanobis distance (x - alpha mu_k)^T C_k^{-1} (x - alpha mu_k)
    log_joint: torch.Tensor  # (n, M) log w_k + log N(x; alpha mu_k, C_k)
    inv_v: torch.Tensor  # (n, M) 1 / (alpha^2 c_k + sigma^2), the bulk eigenvalue of C_k^{-1}
    gp: torch.Tensor  # (n, r, M) (1 / (alpha^2 lam + sigma^2) - 1 / v) v_jk . (x - alpha mu_k)


def _terms(sp: Spectrum, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> _Terms:
    """log N(x; alpha mu_k, C_k) with C_k = (alpha^2 c_k + sigma^2) I + sum_j alpha^2 (lam_jk - c_k) v_jk v_jk^T:
    |x - alpha mu_k|^2 / v_k + sum_j g_jk p_jk^2 with p_jk = v_jk . (x - alpha mu_k), and the log-determinant
    (D - r) log v_k + sum_j log(alpha^2 lam_jk + sigma^2). Few, large tensor ops: this runs once per teacher call."""
    n, d = x.shape
    r, M = sp.lam.shape
    a, a2, s2 = alpha[:, None], (alpha * alpha)[:, None], (sigma * sigma)[:, None]  # (n, 1)
    inv_v = torch.addcmul(s2, a2, sp.c).reciprocal_()  # (n, M)
    proj = x @ sp.W  # (n, M + r M): x . mu_k, then v_jk . x
    base = torch.addcmul(x.square().sum(1, keepdim=True), a2, sp.mu_sq)  # (n, M) |x|^2 + alpha^2 |mu_k|^2
    quad = torch.addcmul(base, a, proj[:, :M], value=-2).clamp_min_(0).mul_(inv_v)  # (n, M) |x - alpha mu_k|^2 / v_k
    half_logdet = inv_v.log().mul_(0.5 * (r - d))  # (n, M) the bulk part of log det C_k / 2
    gp = proj[:, M:].view(n, r, M)
    if r:  # the components' other eigen-directions (none for isotropic components)
        var = torch.addcmul(s2[:, :, None], a2[:, :, None], sp.lam)  # (n, r, M) their eigenvalues of C_k
        p = torch.addcmul(gp, a[:, :, None], sp.V_mu, value=-1)  # (n, r, M) v_jk . (x - alpha mu_k)
        gp = (var.reciprocal() - inv_v[:, None, :]).mul_(p)
        quad.add_((gp * p).sum(1))
        half_logdet.add_(var.log().sum(1), alpha=0.5)
    log_joint = torch.add(sp.log_w0, quad, alpha=-0.5).sub_(half_logdet)
    return _Terms(quad, log_joint, inv_v, gp)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over components, dim 1. Log-ratios are clamped at EXP_MIN: exp of a float64 below about -708
    takes a slow path (10-40x), and a posterior weight of e^-700 = 1e-304 instead of 0 changes nothing."""
    e = (logits - logits.amax(1, keepdim=True)).clamp_(min=EXP_MIN).exp_()
    return e.div_(e.sum(1, keepdim=True))


def _solve(sp: Spectrum, tm: _Terms, x: torch.Tensor, alpha: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """sum_k resp_k C_k^{-1} (x - alpha mu_k) for responsibilities resp (n, M), shape (n, D):
    C_k^{-1} y = y / v_k + sum_j g_jk (v_jk . y) v_jk, so the whole sum is x sum_k resp_k / v_k plus one matmul."""
    rv = resp * tm.inv_v  # (n, M)
    coef = torch.cat([rv * -alpha[:, None], (resp[:, None, :] * tm.gp).flatten(1)], dim=1)  # (n, M + r M)
    return torch.addcmul(coef @ sp.WT, x, rv.sum(1, keepdim=True))


def _prepare(gmm: GMM, x: torch.Tensor, alpha, sigma):
    """float64 x, per-sample (alpha, sigma) and the mixture's spectrum on x's device."""
    x64 = x.to(F64)  # (n, D)
    n = x64.shape[0]
    sp = gmm.spectrum if x.device.type == "cpu" else Spectrum(*(v.to(x.device) for v in gmm.spectrum))
    return x64, _per_sample(alpha, n, x.device), _per_sample(sigma, n, x.device), sp


def noisy_log_prob(gmm: GMM, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """log p_t(x_i) = logsumexp_k [log w_k + log N(x_i; alpha_i mu_k, C_k)] per sample; differentiable in x."""
    x64, alpha, sigma, sp = _prepare(gmm, x, alpha, sigma)
    return torch.logsumexp(_terms(sp, x64, alpha, sigma).log_joint, dim=1).to(x.dtype)  # (n,)


def log_prob(gmm: GMM, x: torch.Tensor) -> torch.Tensor:
    """Exact data log density log p_0(x) (float64 inside), returned as float32, shape (n,)."""
    return noisy_log_prob(gmm, x.to(F64), 1.0, 0.0).float()


def mahalanobis_sq(gmm: GMM, x: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances (x_i - mu_k)^T Sigma_k^{-1} (x_i - mu_k), float64 (n, M)."""
    x64, alpha, sigma, sp = _prepare(gmm, x, 1.0, 0.0)
    return _terms(sp, x64, alpha, sigma).quad


def exact_eps_guided(gmm: GMM, x: torch.Tensor, alpha, sigma, cls=None, w=None) -> torch.Tensor:
    """Exact eps = -sigma grad log p_t (Tweedie), with classifier-free guidance when cls (n,) is given:
    eps_c + w (eps_c - eps_u), eps_c = -sigma grad log p_t(x | cls_i); cls_i = -1 means unconditional.
    One pass: eps is linear in the posterior r_k(x), so the guided eps uses (1 + w) r^c - w r^u. (n, D)."""
    x64, alpha, sigma, sp = _prepare(gmm, x, alpha, sigma)
    tm = _terms(sp, x64, alpha, sigma)
    resp = _softmax(tm.log_joint)  # (n, M) posterior r_k(x)
    if cls is not None:
        cls = cls.to(x.device)
        mask = (gmm.labels.to(x.device)[None, :] == cls[:, None]) | (cls < 0)[:, None]  # (n, M); -1: every component
        if not mask.any(1).all():
            _class_mask(gmm, cls[~mask.any(1)])  # raises, naming the classes without components
        resp_c = _softmax(tm.log_joint.masked_fill(~mask, -math.inf))
        w64 = torch.zeros(len(x64), dtype=F64, device=x.device) if w is None else w.to(x.device, F64)
        resp = (1 + w64[:, None]) * resp_c - w64[:, None] * resp
    return _solve(sp, tm, x64, alpha, resp).mul_(sigma[:, None]).to(x.dtype)


def exact_eps(gmm: GMM, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Exact epsilon-prediction of the noisy marginal p_t, eps = -sigma grad_x log p_t(x) (Tweedie), shape (n, D)."""
    return exact_eps_guided(gmm, x, alpha, sigma)


def exact_eps_cond(gmm: GMM, x: torch.Tensor, alpha, sigma, cls: torch.Tensor) -> torch.Tensor:
    """Exact class-conditional epsilon, -sigma grad log p_t(x | cls_i), by masking other classes' log-weights."""
    _class_mask(gmm, cls.to(x.device))  # every class must exist (clamping in the guided path would hide it)
    return exact_eps_guided(gmm, x, alpha, sigma, cls)
