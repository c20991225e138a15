"""Tests for toy/mixtures.py: builtins, JSON i/o, exact densities, exact epsilon, sampling."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toy.mixtures import (
    BUILTINS,
    GMM,
    MixtureError,
    MAX_SCALE,
    MIN_STD,
    OFF_PLANE_STD,
    component_stds,
    exact_eps,
    exact_eps_cond,
    exact_eps_guided,
    load_mixture,
    mahalanobis_sq,
    log_prob,
    make_gmm,
    min_separation,
    moments,
    noisy,
    noisy_log_prob,
    overall_std,
    plane,
    restrict,
    sample,
    save_mixture,
    validate,
)

F64 = torch.float64


def random_gmm(seed: int, m: int, d: int = 2) -> GMM:
    """Random small mixture: means in [-2, 2]^d, SPD covs A A^T + 0.05 I, random weights and 2 labels."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, d, generator=g, dtype=F64) * 0.5
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=F64)  # (M, D, D)
    w = torch.rand(m, generator=g, dtype=F64) + 0.1
    means = 4 * torch.rand(m, d, generator=g, dtype=F64) - 2
    return make_gmm(w / w.sum(), means, covs, torch.arange(m) % 2)


def random_lowrank_gmm(seed: int, m: int, d: int) -> GMM:
    """Random mixture whose component k is c_k I plus (k % 3) random rank-one terms: the spectrum's bulk-plus-
    low-rank path, with components of different rank (padded)."""
    g = torch.Generator().manual_seed(seed)
    covs = []
    for k in range(m):
        u = torch.randn(d, k % 3, generator=g, dtype=F64)
        covs.append(0.05 + 0.2 * torch.rand(1, generator=g, dtype=F64) * torch.eye(d, dtype=F64) + u @ u.T * 0.3)
    w = torch.rand(m, generator=g, dtype=F64) + 0.1
    means = 4 * torch.rand(m, d, generator=g, dtype=F64) - 2
    return make_gmm(w / w.sum(), means, torch.stack(covs), torch.arange(m) % 2)


# ----------------------------------------------------------------------------- builtins


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_scale_and_separation(name):
    gmm = BUILTINS[name]()
    validate(gmm)
    stds = component_stds(gmm)  # (M, D)
    assert 0.8 <= overall_std(gmm) <= 1.25
    assert stds[:, 0].min() >= 0.08
    assert min_separation(gmm) >= 5 * stds[:, -1].max()  # 5 stds even along the widest axis
    assert gmm.name == name and gmm.num_classes >= 1


def test_builtin_labels():
    assert BUILTINS["ring8"]().labels.tolist() == [0, 1] * 4
    assert BUILTINS["grid25"]().num_classes == 5
    u = BUILTINS["unequal"]()
    assert ((u.weights >= 0.15) == (u.labels == 0)).all()


# ----------------------------------------------------------------------------- JSON i/o


def test_load_builtin_by_name():
    gmm = load_mixture("ring8")
    assert torch.equal(gmm.means, BUILTINS["ring8"]().means)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_save_load_round_trip(tmp_path, name):
    gmm = BUILTINS[name]()
    path = tmp_path / "m.json"
    save_mixture(gmm, path)
    back = load_mixture(str(path))
    for field in ("weights", "means", "covs", "labels"):
        assert torch.equal(getattr(back, field), getattr(gmm, field)), field
    assert back.name == gmm.name


GOOD = {"weights": [0.5, 0.5], "means": [[0, 0], [1, 1]], "covs": [[[1, 0], [0, 1]], [[1, 0], [0, 1]]]}
BAD = [
    ("negative weight", {"weights": [1.5, -0.5]}, "weights"),
    ("weights sum", {"weights": [0.5, 0.6]}, "weights"),
    ("non-symmetric cov", {"covs": [[[1, 0.5], [0, 1]], [[1, 0], [0, 1]]]}, "covs"),
    ("non-PD cov", {"covs": [[[1, 0], [0, 1]], [[1, 2], [2, 1]]]}, "covs"),
    ("cov dimension", {"covs": [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]] * 2}, "covs"),
    ("means count", {"means": [[0, 0], [1, 1], [2, 2]]}, "means"),
    ("ragged means", {"means": [[0, 0], [1]]}, "means"),
    ("labels", {"labels": [0, -1]}, "labels"),
    ("missing key", {"covs": None}, "covs"),
]


@pytest.mark.parametrize("case, patch, field", BAD, ids=[b[0] for b in BAD])
def test_bad_json_names_field(tmp_path, case, patch, field):
    data = {**GOOD, **patch}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MixtureError, match=field):
        load_mixture(str(path))


def test_good_json_loads(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    gmm = load_mixture(str(path))
    assert gmm.means.shape == (2, 2) and gmm.labels.tolist() == [0, 0] and gmm.name == "good"


def test_unknown_builtin_and_malformed_json(tmp_path):
    with pytest.raises(MixtureError, match="no_such_mixture.*ring8"):
        load_mixture("no_such_mixture")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(MixtureError, match="JSON"):
        load_mixture(str(path))


# ----------------------------------------------------------------------------- densities


def test_log_prob_integrates_to_one():
    gmm = BUILTINS["ring8"]()
    h = 0.02
    ticks = torch.arange(-2.5, 2.5, h, dtype=F64) + h / 2  # cell midpoints
    xx, yy = torch.meshgrid(ticks, ticks, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (G, 2)
    mass = log_prob(gmm, grid).double().exp().sum().item() * h * h
    assert mass == pytest.approx(1.0, abs=0.02)
    assert log_prob(gmm, grid).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_noisy_at_clean_level_is_data(name):
    gmm = BUILTINS[name]()
    x, _ = sample(gmm, 200, torch.Generator().manual_seed(1))
    ref = log_prob(gmm, x)
    torch.testing.assert_close(log_prob(noisy(gmm, 1.0, 0.0), x), ref)
    torch.testing.assert_close(noisy_log_prob(gmm, x, torch.ones(200), torch.zeros(200)), ref)


def test_noisy_log_prob_matches_noisy_mixture():
    gmm = BUILTINS["aniso"]()
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    a, s = 0.6, 0.8
    per_sample = noisy_log_prob(gmm, x, torch.full((100,), a), torch.full((100,), s))
    torch.testing.assert_close(per_sample, log_prob(noisy(gmm, a, s), x).double(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- exact epsilon


@settings(max_examples=100, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), alpha=st.floats(0.05, 0.999))
def test_exact_eps_is_minus_sigma_score(seed, m, alpha):
    gmm = random_gmm(seed, m)
    sigma = math.sqrt(1 - alpha**2)
    n = 64
    g = torch.Generator().manual_seed(seed + 1)
    x = (alpha * sample(gmm, n, g)[0].double() + sigma * torch.randn(n, 2, generator=g, dtype=F64)).requires_grad_()
    a, s = torch.full((n,), alpha, dtype=F64), torch.full((n,), sigma, dtype=F64)
    (grad,) = torch.autograd.grad(noisy_log_prob(gmm, x, a, s).sum(), x)
    torch.testing.assert_close(exact_eps(gmm, x, a, s), -s[:, None] * grad, atol=1e-4, rtol=0)


@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), alpha=st.floats(0.05, 0.999))
def test_exact_eps_cond_is_restricted_eps(seed, m, alpha):
    gmm = random_gmm(seed, m)
    sigma = math.sqrt(1 - alpha**2)
    n = 32
    x = 2 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    a, s = torch.full((n,), alpha, dtype=F64), torch.full((n,), sigma, dtype=F64)
    for c in gmm.labels.unique().tolist():
        cls = torch.full((n,), c, dtype=torch.long)
        want = exact_eps(restrict(gmm, c), x, a, s)
        torch.testing.assert_close(exact_eps_cond(gmm, x, a, s, cls), want, atol=1e-10, rtol=1e-8)


def test_exact_eps_per_sample_levels_and_mixed_classes():
    gmm = BUILTINS["ring8"]()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 2, generator=g)
    alpha = torch.rand(50, generator=g) * 0.9 + 0.05
    sigma = (1 - alpha**2).sqrt()
    cls = torch.arange(50) % 2
    batched = exact_eps_cond(gmm, x, alpha, sigma, cls)
    assert batched.dtype == torch.float32 and batched.shape == (50, 2)
    for i in (0, 7, 31):
        one = exact_eps(restrict(gmm, int(cls[i])), x[i : i + 1], alpha[i : i + 1], sigma[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], one)


def test_exact_eps_cond_unknown_class():
    gmm = BUILTINS["ring8"]()
    with pytest.raises(MixtureError, match="cls"):
        exact_eps_cond(gmm, torch.zeros(2, 2), 0.5, 0.5, torch.tensor([0, 7]))


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_sample_moments(name):
    gmm = BUILTINS[name]()
    x, comp = sample(gmm, 20_000, torch.Generator().manual_seed(4))
    assert x.shape == (20_000, 2) and x.dtype == torch.float32 and comp.dtype == torch.long
    mean, cov = moments(gmm)
    x = x.double()
    torch.testing.assert_close(x.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.05, rtol=0)
    freq = torch.bincount(comp, minlength=len(gmm.weights)).double() / 20_000
    torch.testing.assert_close(freq, gmm.weights, atol=0.015, rtol=0)


def test_sample_deterministic_and_class_conditional():
    gmm = BUILTINS["grid25"]()
    cls = torch.arange(1000) % 5
    x1, c1 = sample(gmm, 1000, torch.Generator().manual_seed(5), cls)
    x2, c2 = sample(gmm, 1000, torch.Generator().manual_seed(5), cls)
    assert torch.equal(x1, x2) and torch.equal(c1, c2)
    assert torch.equal(gmm.labels[c1], cls)


def test_restrict_renormalises():
    gmm = BUILTINS["unequal"]()
    r = restrict(gmm, 1)
    assert r.weights.sum().item() == pytest.approx(1.0)
    assert (r.labels == 1).all() and len(r.weights) == 3
    with pytest.raises(MixtureError, match="cls"):
        restrict(gmm, 9)


# ----------------------------------------------------------------------------- D dimensions


def _check_eps_vs_autograd(gmm: GMM, alpha: float, seed: int, n: int = 32) -> None:
    d = gmm.dim
    sigma = math.sqrt(1 - alpha**2)
    g = torch.Generator().manual_seed(seed + 1)
    x = (alpha * sample(gmm, n, g)[0].double() + sigma * torch.randn(n, d, generator=g, dtype=F64)).requires_grad_()
    a, s = torch.full((n,), alpha, dtype=F64), torch.full((n,), sigma, dtype=F64)
    (grad,) = torch.autograd.grad(noisy_log_prob(gmm, x, a, s).sum(), x)
    torch.testing.assert_close(exact_eps(gmm, x, a, s), -s[:, None] * grad, atol=1e-6, rtol=1e-6)


@settings(max_examples=40, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), d=st.sampled_from([1, 2, 3, 8, 32]), alpha=st.floats(0.05, 0.999))
def test_exact_eps_is_minus_sigma_score_in_d_dims(seed, m, d, alpha):
    """Full random covariances (r = D - 1 other eigenpairs) and bulk-plus-low-rank ones of mixed rank."""
    _check_eps_vs_autograd(random_gmm(seed, m, d), alpha, seed)
    _check_eps_vs_autograd(random_lowrank_gmm(seed, m, d), alpha, seed)


@settings(max_examples=20, deadline=None, database=None)
@given(name=st.sampled_from(["ring8-d3", "aniso-d8", "grid25-d32", "lowrank-d32", "unequal-d128"]),
       alpha=st.floats(0.05, 0.999), seed=st.integers(0, 1000))
def test_exact_eps_of_lifted_builtins_is_minus_sigma_score(name, alpha, seed):
    gmm = load_mixture(name)
    assert gmm.spectrum.lam.shape[0] <= 2  # bulk plus at most 2 other eigenpairs, whatever D is
    _check_eps_vs_autograd(gmm, alpha, seed)


def test_noisy_log_prob_matches_full_covariance_formula_in_d_dims():
    """The bulk-plus-low-rank log density equals torch's MultivariateNormal with the full C_k."""
    for gmm in (random_gmm(1, 3, 5), random_lowrank_gmm(2, 4, 6), load_mixture("lowrank-d16")):
        x = torch.randn(20, gmm.dim, generator=torch.Generator().manual_seed(3), dtype=F64)
        a, s = 0.7, math.sqrt(1 - 0.49)
        cov = a**2 * gmm.covs + s**2 * torch.eye(gmm.dim, dtype=F64)
        comps = torch.distributions.MultivariateNormal(a * gmm.means, covariance_matrix=cov)
        want = torch.logsumexp(comps.log_prob(x[:, None, :]) + gmm.weights.log(), dim=1)
        torch.testing.assert_close(noisy_log_prob(gmm, x, a, s), want, rtol=1e-9, atol=1e-9)
        maha = torch.einsum("nmd,mde,nme->nm", x[:, None] - gmm.means, torch.linalg.inv(gmm.covs), x[:, None] - gmm.means)
        torch.testing.assert_close(mahalanobis_sq(gmm, x), maha, rtol=1e-8, atol=1e-8)


def test_guided_eps_is_cfg_of_exact_eps():
    gmm = load_mixture("ring8-d8")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 8, generator=g)
    a = torch.rand(40, generator=g) * 0.9 + 0.05
    s = (1 - a**2).sqrt()
    cls, w = torch.arange(40) % 3 - 1, torch.rand(40, generator=g) * 4  # -1: unconditional
    eps_u = exact_eps(gmm, x, a, s)
    eps_c = exact_eps_cond(gmm, x, a, s, cls.clamp(min=0))
    want = torch.where((cls >= 0)[:, None], eps_c + w[:, None] * (eps_c - eps_u), eps_u)
    torch.testing.assert_close(exact_eps_guided(gmm, x, a, s, cls, w), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(MixtureError, match="cls"):
        exact_eps_guided(gmm, x, a, s, torch.full((40,), 5))


def test_spectrum_is_computed_once(monkeypatch):
    gmm = load_mixture("aniso-d32")
    x = torch.randn(10, 32)
    first = exact_eps(gmm, x, 0.5, 0.8)
    def no_eigh(*args, **kwargs):
        raise AssertionError("eigh called again")
    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    torch.testing.assert_close(exact_eps(gmm, x, 0.5, 0.8), first)
    noisy_log_prob(gmm, x, 0.3, 0.9), mahalanobis_sq(gmm, x)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_lifted_builtin_is_the_2d_mixture_on_its_plane(name):
    base, lifted = BUILTINS[name](), load_mixture(f"{name}-d32")
    q = plane(lifted)  # (32, 2)
    assert lifted.name == f"{name}-d32" and lifted.dim == 32 and q.shape == (32, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=F64))
    torch.testing.assert_close(lifted.means @ q, base.means)
    torch.testing.assert_close(q.T @ lifted.covs @ q, base.covs)
    off = torch.linalg.eigvalsh(lifted.covs)[:, :30]  # the 30 off-plane eigenvalues (all below the in-plane ones)
    torch.testing.assert_close(off, torch.full_like(off, OFF_PLANE_STD**2))
    x, _ = sample(lifted, 4000, torch.Generator().manual_seed(5))
    resid = x.double() - (x.double() @ q) @ q.T  # off-plane part
    assert resid.std().item() == pytest.approx(OFF_PLANE_STD, rel=0.05)
    two_d = load_mixture(f"{name}-d2")
    assert torch.equal(two_d.means, base.means) and torch.equal(two_d.covs, base.covs)
    assert torch.equal(load_mixture(f"{name}-d32").plane, load_mixture("lowrank-d32").plane)  # one data plane per D


def test_lowrank_components_are_rank_two_plus_small():
    gmm = load_mixture("lowrank-d16")
    lam = torch.linalg.eigvalsh(gmm.covs)  # (8, 16) ascending
    torch.testing.assert_close(lam[:, -2:], torch.full((8, 2), 0.15**2, dtype=F64))
    torch.testing.assert_close(lam[:, :-2], torch.full((8, 14), OFF_PLANE_STD**2, dtype=F64))
    vecs = torch.linalg.eigh(gmm.covs)[1][:, :, -2:]  # each component's own 2 directions differ
    assert (vecs[0].T @ vecs[1]).abs().max() < 0.9
    assert gmm.spectrum.lam.shape == (2, 8)


@pytest.mark.parametrize("spec, match", [("ring8-d1", r"D in \[2, 1024\]"), ("lowrank-d2", r"D in \[3, 1024\]"),
                                         ("ring8-d5000", "1024"), ("ring9-d8", "not a built-in"),
                                         ("no_such.json", "no such file")])
def test_bad_builtin_names(spec, match):
    with pytest.raises(MixtureError, match=match):
        load_mixture(spec)


@pytest.mark.parametrize("name", ["ring8-d32", "lowrank-d8"])
def test_save_load_round_trip_in_d_dims(tmp_path, name):
    gmm = load_mixture(name)
    path = tmp_path / "m.json"
    save_mixture(gmm, path)
    back = load_mixture(str(path))
    for field in ("weights", "means", "covs", "labels", "plane"):
        assert torch.equal(getattr(back, field), getattr(gmm, field)), field
    assert back.name == gmm.name and back.dim == gmm.dim
    x = torch.randn(5, gmm.dim)
    torch.testing.assert_close(exact_eps(back, x, 0.6, 0.8), exact_eps(gmm, x, 0.6, 0.8))


def test_plane_fallbacks():
    assert torch.equal(plane(BUILTINS["ring8"]()), torch.eye(2, dtype=F64))
    one = make_gmm([1.0], [[0.5]], [[[0.04]]])
    assert torch.equal(plane(one), torch.tensor([[1.0, 0.0]], dtype=F64))
    stretched = make_gmm([0.5, 0.5], [[0, -3, 0], [0, 3, 0]], torch.diag(torch.tensor([0.25, 0.01, 1.0])).expand(2, 3, 3))
    q = plane(stretched)  # principal axes: y (means), then z
    torch.testing.assert_close(q, torch.tensor([[0, 0], [1, 0], [0, 1.0]], dtype=F64))


BAD_SCALE = [
    ("huge mean", {"means": [[0, 0], [1e30, 1]]}, rf"means: .*allowed <= {MAX_SCALE:g}"),
    ("tiny variance", {"covs": [[[1e-12, 0], [0, 1e-12]], [[1, 0], [0, 1]]]}, rf"covs: component 0 .*allowed >= {MIN_STD:g}"),
    ("huge variance", {"covs": [[[1e6, 0], [0, 1]], [[1, 0], [0, 1]]]}, rf"covs: .*allowed <= {MAX_SCALE:g}"),
    ("plane not orthonormal", {"plane": [[1, 1], [0, 1]]}, "plane: columns must be orthonormal"),
    ("plane shape", {"plane": [[1, 0, 0], [0, 1, 0]]}, r"plane: expected shape \(D, 2\)"),
]


@pytest.mark.parametrize("case, patch, match", BAD_SCALE, ids=[b[0] for b in BAD_SCALE])
def test_scales_the_exact_teacher_cannot_handle_are_rejected(tmp_path, case, patch, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**GOOD, **patch}))
    with pytest.raises(MixtureError, match=match) as info:
        load_mixture(str(path))
    assert "\n" not in str(info.value)


def test_one_dimensional_mixture_is_exact():
    """D = 1 is supported: the exact eps, densities and sampling need nothing of D >= 2."""
    gmm = make_gmm([0.3, 0.7], [[-1.0], [1.0]], [[[0.04]], [[0.09]]])
    _check_eps_vs_autograd(gmm, 0.5, 0)
    x, _ = sample(gmm, 20_000, torch.Generator().manual_seed(6))
    assert x.shape == (20_000, 1) and x.mean().item() == pytest.approx(0.4, abs=0.03)


@pytest.mark.parametrize("patch, flag_text", [({"means": [[0, 0], [1e30, 1]]}, "means"),
                                              ({"covs": [[[1e-12, 0], [0, 1e-12]], [[1, 0], [0, 1]]]}, "covs")])
def test_toy_run_rejects_bad_scales_in_one_line(tmp_path, capsys, patch, flag_text):
    """issue 8: what the exact teacher cannot handle stops toy.run before any compute: exit 2, one line, nothing written."""
    from toy import run
    path, out = tmp_path / "bad.json", tmp_path / "out" / "run.json"
    path.write_text(json.dumps({**GOOD, **patch}))
    assert run.main(["--mixture", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and flag_text in err and len(err.splitlines()) == 1
    assert not out.parent.exists()
