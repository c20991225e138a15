"""Tests for toy/metrics.py on the builtin mixtures."""
import math

import pytest
import torch

from toy.metrics import (MMD_BANDWIDTHS, MODE_MASS, covariate_shift, cross_entropy, data_floor, density_coverage,
                         energy_distance, mmd, mmd_bandwidths, mode_radius, mode_stats, nll, sample_metrics)
from toy.mixtures import BUILTINS, load_mixture, log_prob, noisy, plane, sample

N = 1500


def draw(name: str, n: int, seed: int) -> torch.Tensor:
    """n samples of a builtin mixture, shape (n, 2)."""
    return sample(BUILTINS[name](), n, torch.Generator().manual_seed(seed))[0]


@pytest.mark.parametrize("distance", [mmd, energy_distance])
def test_two_sample_distances(distance):
    x, y = draw("ring8", N, 0), draw("ring8", N, 1)
    same = distance(x, y)
    small = distance(x, y + torch.tensor([0.1, 0.0]))
    large = distance(x, y + torch.tensor([0.3, 0.0]))
    assert abs(same) < 2e-3
    assert small > 10 * abs(same) and small > 0
    assert large > 2 * small


def test_distances_chunking_matches_direct():
    x, y = draw("grid25", 1100, 2), draw("aniso", 1100, 3)  # crosses the 1024-row chunk boundary
    d = torch.cdist(x.double(), y.double())
    dxx, dyy = torch.cdist(x.double(), x.double()), torch.cdist(y.double(), y.double())
    n = len(x)
    want = 2 * d.mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (n * (n - 1))
    assert energy_distance(x, y) == pytest.approx(want.item(), rel=1e-6)
    k = lambda d2: torch.exp(-d2 / (2 * 0.5**2))  # noqa: E731
    kxx = (k(dxx**2).sum() - n) / (n * (n - 1))
    kyy = (k(dyy**2).sum() - n) / (n * (n - 1))
    assert mmd(x, y, bandwidths=(0.5,)) == pytest.approx((kxx + kyy - 2 * k(d**2).mean()).item(), rel=1e-6)


def test_nll_and_cross_entropy():
    gmm = BUILTINS["ring8"]()
    x = draw("ring8", N, 4)
    assert nll(gmm, x) == pytest.approx(-log_prob(gmm, x).double().mean().item(), rel=1e-6)
    assert cross_entropy(gmm, x, 1.0, 0.0) == pytest.approx(nll(gmm, x), rel=1e-5)
    assert nll(gmm, x + 0.3) > nll(gmm, x) + 1.0


def test_density_coverage_identical_and_collapsed():
    real, fake = draw("ring8", N, 5), draw("ring8", N, 6)
    same = density_coverage(real, fake)
    assert 0.8 <= same["density"] <= 1.2 and same["coverage"] > 0.9
    x, comp = sample(BUILTINS["ring8"](), N, torch.Generator().manual_seed(7))
    collapsed = density_coverage(real, x[comp == 0])  # every fake sample from mode 0
    assert collapsed["coverage"] < 0.2 and collapsed["density"] > 0.5
    point = density_coverage(real, x[:1].repeat(100, 1))  # mode collapse to a single point
    assert point["coverage"] < 0.05
    with pytest.raises(ValueError):
        density_coverage(real, x[:0])


def test_density_coverage_shift_lowers_density():
    real, fake = draw("ring8", N, 5), draw("ring8", N, 6)
    shifted = density_coverage(real, fake + 0.3)
    assert shifted["density"] < 0.4 and shifted["coverage"] < 0.3


def test_mode_stats_centres_and_single_mode():
    gmm = BUILTINS["ring8"]()
    centres = gmm.means.repeat(10, 1).float()  # 10 samples exactly at each centre
    stats = mode_stats(gmm, centres)
    assert stats["precision"] == 1.0 and stats["coverage"] == 1.0 and stats["counts"] == [10] * 8
    one = gmm.means[3] + 0.12 * torch.randn(400, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    stats = mode_stats(gmm, one)
    assert stats["coverage"] == pytest.approx(1 / 8)
    assert stats["precision"] > 0.95 and stats["counts"][3] == max(stats["counts"])
    far = mode_stats(gmm, torch.full((10, 2), 5.0))
    assert far["precision"] == 0.0 and far["coverage"] == 0.0


def test_mode_stats_on_true_samples():
    for name in BUILTINS:
        stats = mode_stats(BUILTINS[name](), draw(name, N, 9))
        assert stats["precision"] > 0.97 and stats["coverage"] == 1.0, name


def test_covariate_shift_on_forward_samples():
    gmm = BUILTINS["ring8"]()
    alphas = [0.3, 0.8, 0.99]
    sigmas = [math.sqrt(1 - a**2) for a in alphas]
    g = torch.Generator().manual_seed(10)
    states = [sample(noisy(gmm, a, s), 1000, g)[0] for a, s in zip(alphas, sigmas)]
    shifted = [x + 0.3 for x in states]
    rows = covariate_shift(gmm, states, alphas, sigmas, ref=shifted, generator=torch.Generator().manual_seed(11))
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"mmd_to_forward", "xent", "xent_forward", "mmd_to_ref"}
        assert abs(row["mmd_to_forward"]) < 5e-3
        assert row["xent"] == pytest.approx(row["xent_forward"], abs=0.1)
        assert row["mmd_to_ref"] > 10 * abs(row["mmd_to_forward"])
    off = covariate_shift(gmm, shifted, alphas, sigmas, generator=torch.Generator().manual_seed(11))
    assert all(o["xent"] > r["xent"] + 0.01 for o, r in zip(off, rows))
    assert all(o["mmd_to_forward"] > 0.01 for o in off)
    again = covariate_shift(gmm, states, alphas, sigmas, generator=torch.Generator().manual_seed(11))
    assert [r["mmd_to_forward"] for r in again] == [r["mmd_to_forward"] for r in rows]


# ----------------------------------------------------------------------------- D dimensions


def test_mode_radius_holds_the_same_mass_in_every_d():
    assert mode_radius(2) == pytest.approx(3.0, abs=1e-9)  # 1 - exp(-4.5) is what radius 3 holds in 2-D
    assert MODE_MASS == pytest.approx(0.98889, abs=1e-5)
    for d in (2, 8, 32):
        gmm = load_mixture(f"ring8-d{d}")
        x, _ = sample(gmm, 4000, torch.Generator().manual_seed(d))
        stats = mode_stats(gmm, x)
        assert stats["precision"] == pytest.approx(MODE_MASS, abs=0.01), d
        assert stats["coverage"] == 1.0
    gmm16 = load_mixture("ring8-d16")
    x16, _ = sample(gmm16, 4000, torch.Generator().manual_seed(16))
    assert mode_stats(gmm16, x16, radius=3.0)["precision"] < 0.15  # the old fixed radius: ~8.7 % in 16-D


def test_mode_stats_in_d_dims_sees_off_plane_error():
    gmm = load_mixture("ring8-d32")
    x, _ = sample(gmm, 2000, torch.Generator().manual_seed(1))
    q = plane(gmm).float()
    on_plane = (x @ q) @ q.T  # the same points with the off-plane spread removed
    blown = on_plane + 3 * (x - on_plane)  # off-plane std 0.15 instead of 0.05
    assert mode_stats(gmm, on_plane)["precision"] == 1.0
    assert mode_stats(gmm, blown)["precision"] < 0.05


def test_mmd_bandwidths_scale_with_sqrt_d():
    assert mmd_bandwidths(2) == pytest.approx(MMD_BANDWIDTHS)
    assert mmd_bandwidths(32) == pytest.approx([4 * h for h in MMD_BANDWIDTHS])
    gmm = load_mixture("ring8-d32")
    x, y = (sample(gmm, 1000, torch.Generator().manual_seed(s))[0] for s in (2, 3))
    q = plane(gmm).float()
    on_plane = (y @ q) @ q.T
    same, off = mmd(x, y), mmd(x, on_plane + 3 * (y - on_plane))
    assert abs(same) < 2e-3 and off > 20 * abs(same)
    # the same data noised to sigma ~ 1: with 2-D bandwidths every kernel is ~0 and the MMD sees nothing
    noise = [torch.randn(1000, 32, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    shifted = mmd(noise[0], noise[1] + 0.3)
    assert shifted > 0.01 and mmd(noise[0], noise[1] + 0.3, bandwidths=MMD_BANDWIDTHS) < 1e-4


@pytest.mark.parametrize("name", ["ring8", "lowrank-d32"])
def test_data_floor_row(name):
    gmm = load_mixture(name)
    row = data_floor(gmm, 1000, seed=0, alpha_sigma=(0.6, 0.8))
    data, _ = sample(gmm, 1000, torch.Generator().manual_seed(20_000))
    assert set(row) == set(sample_metrics(gmm, data, data)) | {"shift_last"}
    assert abs(row["mmd"]) < 3e-3 and abs(row["shift_last"]) < 3e-3 and abs(row["energy"]) < 0.01
    assert row["mode_precision"] > 0.97 and row["mode_coverage"] == 1.0 and 0.8 < row["density"] < 1.2
    assert row["nll"] == pytest.approx(nll(gmm, data), abs=0.2)
    assert math.isnan(data_floor(gmm, 200, seed=1)["shift_last"])
