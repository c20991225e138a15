"""Unit tests of the algorithms in ddil.py: fast, CPU, tiny tensors, toy denoisers."""
import contextlib
import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ddil
from ddil import T_CLEAN, ConfigError, States

AB = ddil.make_alpha_bar()
HYP = settings(max_examples=30, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full(v: int, n: int) -> torch.Tensor:
    return torch.full((n,), v, dtype=torch.long)


def toy_teacher(x, t, cond, w):
    """A fixed nonlinear eps model of x and t (any dtype)."""
    tt = ddil.append_dims(t.to(x.dtype) / 1000.0, x.ndim)
    return 0.7 * torch.tanh(x * (1 + tt)) + 0.2 * torch.sin(3 * x) * tt


def toy_student(x, t, cond, w):
    tt = ddil.append_dims(t.to(x.dtype) / 1000.0, x.ndim)
    return 0.5 * torch.tanh(x) - 0.1 * tt * x


def point_mass_denoiser(c: torch.Tensor):
    """The exact eps for data that is a point mass at c: eps = (x_t - alpha_t c) / sigma_t."""
    def eps(x, t, cond, w):
        alpha, sigma = ddil.alpha_sigma(AB, t, x)
        return (x - alpha * c) / sigma
    return eps


# ---------------------------------------------------------------------------------------------------
# Parameterisations and the schedule


@HYP
@given(alpha=st.floats(0.01, 1.0, exclude_max=True), seed=st.integers(0, 2**16))
def test_parameterisations_round_trip(alpha, seed):
    g = gen(seed)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    a = torch.tensor(alpha, dtype=torch.float64)
    s = (1 - a**2).sqrt()
    x_t = a * x0 + s * eps
    tol = dict(rtol=1e-9, atol=1e-9 / alpha)
    torch.testing.assert_close(ddil.eps_to_x0(x_t, eps, a, s), x0, **tol)
    torch.testing.assert_close(ddil.x0_to_eps(x_t, x0, a, s), eps, **dict(rtol=1e-9, atol=1e-9 / s.item()))
    v = ddil.to_v(x0, eps, a, s)
    torch.testing.assert_close(ddil.v_to_x0(x_t, v, a, s), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddil.v_to_eps(x_t, v, a, s), eps, rtol=1e-9, atol=1e-9)
    # and the composition x0 -> eps -> x0 for an arbitrary x0 guess
    guess = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ddil.eps_to_x0(x_t, ddil.x0_to_eps(x_t, guess, a, s), a, s), guess, **tol)


def test_alpha_bar_clean_and_snr():
    t = torch.tensor([T_CLEAN, 0, 500, 999])
    ab = ddil.alpha_bar_at(AB, t)
    assert ab[0] == 1.0 and torch.equal(ab[1:], AB[[0, 500, 999]])
    alpha, sigma = ddil.alpha_sigma(AB, t, torch.zeros(4, 2, 3))
    assert alpha.shape == (4, 1, 1) and alpha[0].item() == 1.0 and sigma[0].item() == 0.0
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert torch.all(AB[1:] < AB[:-1]) and 0 < AB[-1] < AB[0] < 1


def test_truncated_snr_weight():
    t = torch.arange(1000)
    snr = ddil.snr(AB, t)
    w = ddil.truncated_snr_weight(AB, t)
    assert torch.all(w >= 1)
    assert torch.equal(w[snr > 1], snr[snr > 1])
    assert torch.all(w[snr <= 1] == 1)
    assert (snr > 1).any() and (snr < 1).any()


# ---------------------------------------------------------------------------------------------------
# Reflection of x0_hat


@HYP
@given(r=st.floats(0.1, 10.0), u=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=20))
def test_reflect_fold_identity_inside(r, u):
    x = torch.tensor(u, dtype=torch.float64) * r
    torch.testing.assert_close(ddil.reflect_fold(x, r), x, rtol=0, atol=4 * torch.finfo(torch.float64).eps * r)


@HYP
@given(r=st.floats(0.1, 10.0), xs=st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=20))
def test_reflect_fold_always_in_range(r, xs):
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor(xs, dtype=dtype)
        y = ddil.reflect_fold(x, r)
        rr = torch.tensor(r, dtype=dtype)
        assert torch.isfinite(y).all()
        assert (y >= -rr).all() and (y <= rr).all(), (x, y)


@HYP
@given(r=st.floats(0.1, 10.0), frac=st.floats(0.0, 1.0))
def test_reflect_fold_continuous_mirror(r, frac):
    e = torch.tensor(frac * 2 * r, dtype=torch.float64)  # e in [0, 2r]
    tol = dict(rtol=0, atol=1e-12 * r)
    torch.testing.assert_close(ddil.reflect_fold(r + e, r), r - e, **tol)
    torch.testing.assert_close(ddil.reflect_fold(-r - e, r), -r + e, **tol)
    # period 4r and oddness
    torch.testing.assert_close(ddil.reflect_fold(r + e + 4 * r, r), r - e, rtol=0, atol=1e-11 * r)
    torch.testing.assert_close(ddil.reflect_fold(-(r + e), r), -ddil.reflect_fold(r + e, r), **tol)


def test_reflect_x0_modes():
    x = torch.randn(3, 2, 4, 4, generator=gen(0)) * 3
    assert ddil.reflect_x0(x, None) is x
    assert ddil.reflect_x0(x, ddil.ReflectConfig(mode="none")) is x
    torch.testing.assert_close(ddil.reflect_x0(x, ddil.ReflectConfig(mode="clip", range=0.7)), x.clamp(-0.7, 0.7))
    d = ddil.reflect_x0(x, ddil.ReflectConfig(mode="dynamic", ratio=0.9, max_value=2.0))
    torch.testing.assert_close(d, ddil.dynamic_threshold(x, 0.9, 2.0))
    assert d.abs().max() <= 1.0 + 1e-6  # dynamic thresholding divides by s: the output is in [-1, 1]
    f = ddil.reflect_x0(x, ddil.ReflectConfig(mode="reflect", range=1.5))
    torch.testing.assert_close(f, ddil.reflect_fold(x, 1.5))
    assert f.abs().max() <= 1.5
    inside = x.abs() <= 1.5
    torch.testing.assert_close(f[inside], x[inside])


def test_dynamic_threshold_is_per_sample():
    x = torch.stack([torch.linspace(-1, 1, 100), torch.linspace(-4, 4, 100)]).reshape(2, 1, 10, 10)
    y = ddil.dynamic_threshold(x, 0.995, 10.0)
    torch.testing.assert_close(y[0], x[0])  # |x| <= 1: s = 1, unchanged
    s = torch.quantile(x[1].abs().flatten(), 0.995)
    torch.testing.assert_close(y[1], x[1].clamp(-s, s) / s)


# ---------------------------------------------------------------------------------------------------
# LCM scalings


def test_lcm_scalings_boundary():
    c_skip, c_out = ddil.lcm_scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_skip[2] < 1e-5 and abs(c_out[2].item() - 1) < 1e-5
    assert torch.all((c_skip > 0) & (c_skip <= 1)) and torch.all((c_out >= 0) & (c_out <= 1))
    x = torch.randn(3, 2, 4, generator=gen(0))
    x0 = torch.randn(3, 2, 4, generator=gen(1))
    torch.testing.assert_close(ddil.consistency_fn(x, x0, torch.zeros(3, dtype=torch.long), ddil.LCMConfig()), x,
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Grids


def test_grids():
    assert ddil.uniform_grid(4) == [999, 749, 499, 249]
    N = 1
    while 2 * N <= 1000:
        assert ddil.uniform_grid(N) == ddil.uniform_grid(2 * N)[::2], N
        N *= 2
    assert ddil.uniform_grid(1) == [999]
    assert ddil.lcm_grid(4) == [999, 759, 499, 259]
    assert ddil.lcm_grid(1) == [999]
    with pytest.raises(ConfigError):
        ddil.lcm_grid(51)
    with pytest.raises(ConfigError):
        ddil.lcm_grid(0)
    with pytest.raises(ConfigError):
        ddil.uniform_grid(0)
    assert ddil.pd_rounds(16, 4) == [16, 8, 4]
    assert ddil.pd_rounds(4, 4) == [4]
    assert ddil.pd_rounds(8, 1) == [8, 4, 2, 1]
    for bad in ((12, 4), (2, 4), (12, 5), (8, 0)):
        with pytest.raises(ConfigError):
            ddil.pd_rounds(*bad)
    k = torch.tensor([0, 1, 2, 3])
    assert ddil.next_time([999, 749, 499, 249], k).tolist() == [749, 499, 249, T_CLEAN]
    assert ddil.grid_time([999, 749, 499, 249], k).tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("K", [1, 2, 3, 8, 50])
def test_substep_times(K):
    t = torch.tensor([999, 749, 10, 0, 3])
    s = torch.tensor([749, 499, T_CLEAN, T_CLEAN, 2])
    times = ddil.substep_times(t, s, K)
    assert times.shape == (K + 1, 5) and times.dtype == torch.long
    assert torch.equal(times[0], t) and torch.equal(times[-1], s)
    assert torch.all(times[1:] <= times[:-1])


# ---------------------------------------------------------------------------------------------------
# Teacher solver, PD


@pytest.mark.parametrize("K", [1, 2, 3, 7, 20])
def test_teacher_solve_exact_for_point_mass(K):
    c = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -0.5]], dtype=torch.float64)
    eps_fn = point_mass_denoiser(c)
    x_T = torch.randn(2, 3, generator=gen(K), dtype=torch.float64)
    x0 = ddil.teacher_solve(eps_fn, x_T, full(999, 2), full(T_CLEAN, 2), None, None, AB, None, K)
    torch.testing.assert_close(x0, c, rtol=0, atol=1e-9)
    # to an intermediate time: DDIM keeps eps, so x_s = alpha_s c + sigma_s eps_T
    x_s = ddil.teacher_solve(eps_fn, x_T, full(999, 2), full(500, 2), None, None, AB, None, K)
    a, s = ddil.alpha_sigma(AB, full(500, 2), x_T)
    torch.testing.assert_close(x_s, a * c + s * eps_fn(x_T, full(999, 2), None, None), rtol=0, atol=1e-9)


def test_teacher_solve_k1_is_one_ddim_step():
    x = torch.randn(4, 3, generator=gen(0), dtype=torch.float64)
    t, s = torch.tensor([999, 700, 300, 5]), torch.tensor([800, 400, T_CLEAN, 0])
    got = ddil.teacher_solve(toy_teacher, x, t, s, None, None, AB, None, 1)
    x0, eps = ddil.predict(toy_teacher, x, t, None, None, AB)
    torch.testing.assert_close(got, ddil.ddim_step(x0, eps, s, AB))


def test_pd_target_reproduces_two_teacher_steps():
    grid, fine = ddil.uniform_grid(4), ddil.uniform_grid(8)
    assert grid == fine[::2]
    B = 5
    for k in range(4):
        x_t = torch.randn(B, 3, 2, generator=gen(k), dtype=torch.float64) * 2
        t = full(grid[k], B)
        t1 = full(fine[2 * k + 1], B)
        t2 = full(fine[2 * k + 2] if 2 * k + 2 < 8 else T_CLEAN, B)
        x_mid = ddil.teacher_solve(toy_teacher, x_t, t, t1, None, None, AB, None, 1)
        x_end = ddil.teacher_solve(toy_teacher, x_mid, t1, t2, None, None, AB, None, 1)
        x_tilde = ddil.pd_target(x_t, x_end, t, t2, AB)
        alpha, sigma = ddil.alpha_sigma(AB, t, x_t)
        eps = ddil.x0_to_eps(x_t, x_tilde, alpha, sigma)
        student = ddil.ddim_step(x_tilde, eps, t2, AB)
        torch.testing.assert_close(student, x_end, rtol=0, atol=1e-5)
        if k == 3:
            assert t2[0].item() == T_CLEAN
            torch.testing.assert_close(x_tilde, x_end, rtol=0, atol=1e-12)


def _pd_exact_student(teacher, grid, fine):
    """A student whose x0_hat at any grid state is exactly PD's target x_tilde."""
    where = {t: k for k, t in enumerate(grid)}

    def eps(x, t, cond, w):
        k = torch.tensor([where[int(v)] for v in t])
        t_mid, t_end = ddil.next_time(fine, 2 * k), ddil.next_time(fine, 2 * k + 1)
        x_mid = ddil.teacher_solve(teacher, x, t, t_mid, cond, w, AB, None, 1)
        x_end = ddil.teacher_solve(teacher, x_mid, t_mid, t_end, cond, w, AB, None, 1)
        x_tilde = ddil.pd_target(x, x_end, t, t_end, AB)
        alpha, sigma = ddil.alpha_sigma(AB, t, x)
        return ddil.x0_to_eps(x, x_tilde, alpha, sigma)
    return eps


def test_pd_loss_zero_for_exact_student():
    grid, fine = ddil.uniform_grid(4), ddil.uniform_grid(8)
    k = torch.arange(8) % 4
    x = torch.randn(8, 2, generator=gen(3), dtype=torch.float64) * 2
    s = States(x, ddil.grid_time(grid, k), k, torch.zeros(8, dtype=torch.long))
    exact = ddil.pd_loss(_pd_exact_student(toy_teacher, grid, fine), toy_teacher, s, fine, AB, None)
    assert exact.shape == (8,)
    assert exact.abs().max() < 1e-8
    other = ddil.pd_loss(toy_student, toy_teacher, s, fine, AB, None)
    assert (other > 1e-4).all()


# ---------------------------------------------------------------------------------------------------
# DMD2 and GAN losses


def test_dmd_loss_gradient():
    x0_gen = torch.randn(3, 2, 4, 4, generator=gen(0), dtype=torch.float64, requires_grad=True)
    t = torch.tensor([100, 500, 900])
    noise = torch.randn(3, 2, 4, 4, generator=gen(1), dtype=torch.float64)
    D = 2 * 4 * 4

    loss = ddil.dmd_loss(x0_gen, toy_teacher, toy_teacher, t, noise, None, None, AB)
    assert loss.shape == (3,)
    (grad,) = torch.autograd.grad(loss.sum(), x0_gen)
    assert torch.equal(grad, torch.zeros_like(grad))

    loss = ddil.dmd_loss(x0_gen, toy_teacher, toy_student, t, noise, None, None, AB)
    (grad,) = torch.autograd.grad(loss.sum(), x0_gen)
    assert grad.abs().max() > 1e-3
    with torch.no_grad():
        x_t = ddil.q_sample(x0_gen, t, noise, AB)
        x0_real, _ = ddil.predict(toy_teacher, x_t, t, None, None, AB)
        x0_fake, _ = ddil.predict(toy_student, x_t, t, None, None, AB)
        norm = (x0_gen - x0_real).abs().flatten(1).mean(1).view(3, 1, 1, 1)
        g = (x0_fake - x0_real) / norm
    torch.testing.assert_close(grad * D, g, rtol=1e-4, atol=1e-5)
    assert loss.dtype == torch.float32  # ddil's mse computes in float32
    torch.testing.assert_close(loss.double(), 0.5 * (g**2).flatten(1).mean(1), rtol=1e-4, atol=1e-7)


def test_gan_losses():
    lr = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    lf = torch.tensor([2.0, -1.0, 0.0, 0.3, -5.0])
    sp = lambda v: torch.log1p(torch.exp(v))  # noqa: E731
    torch.testing.assert_close(ddil.gan_generator_loss(lf), sp(-lf))
    torch.testing.assert_close(ddil.gan_discriminator_loss(lr, lf), sp(-lr) + sp(lf))
    assert ddil.gan_generator_loss(torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_pseudo_huber_and_mse():
    a = torch.randn(4, 3, 2, generator=gen(0))
    b = torch.randn(4, 3, 2, generator=gen(1))
    torch.testing.assert_close(ddil.mse(a, b), ((a - b) ** 2).flatten(1).mean(1))
    c = 0.01
    torch.testing.assert_close(ddil.pseudo_huber(a, b, c), (torch.sqrt((a - b) ** 2 + c**2) - c).flatten(1).mean(1))
    assert torch.all(ddil.pseudo_huber(a, a, c) == 0)


# ---------------------------------------------------------------------------------------------------
# Replay buffer


def states_of(values, source=0, cond="none", with_w=False):
    """States whose x encodes the given values (x = [v, -v]), t = v, k = v % 4."""
    v = torch.as_tensor(values, dtype=torch.float32)
    n = len(v)
    x = torch.stack([v, -v], 1)
    c = {"none": None, "tensor": v[:, None] * 10, "dict": {"a": v * 2, "b": torch.stack([v, v], 1)}}[cond]
    return States(x, v.long(), v.long() % 4, torch.full((n,), source, dtype=torch.long), c,
                  v * 3 if with_w else None)


def stored_values(buf):
    return sorted(buf.store.x[: len(buf), 0].long().tolist())


def test_buffer_capacity_never_exceeded():
    for policy in ("fifo", "reservoir"):
        buf = ddil.ReplayBuffer(13, policy)
        g, seen = gen(0), 0
        for _ in range(40):
            n = int(torch.randint(1, 30, (1,), generator=g))
            buf.add(states_of(range(seen, seen + n)))
            seen += n
            assert len(buf) <= 13 and len(buf) == min(seen, 13) and buf.seen == seen
            assert buf.store.x.shape[0] == 13


def test_buffer_fifo_order():
    c, n = 7, 23
    buf = ddil.ReplayBuffer(c, "fifo")
    for i in range(n):
        buf.add(states_of([i]))
        assert stored_values(buf) == list(range(max(0, i + 1 - c), i + 1))
    # mixed batch sizes
    buf = ddil.ReplayBuffer(c, "fifo")
    i = 0
    for size in (3, 1, 5, 2, 6, 4, 2):
        buf.add(states_of(range(i, i + size)))
        i += size
        assert stored_values(buf) == list(range(max(0, i - c), i))
    # a batch larger than the capacity keeps its newest c
    buf = ddil.ReplayBuffer(c, "fifo")
    buf.add(states_of(range(20)))
    assert stored_values(buf) == list(range(13, 20))
    buf.add(states_of(range(100, 103)))
    assert stored_values(buf) == list(range(16, 20)) + [100, 101, 102]
    buf.add(states_of(range(200, 230)))
    assert stored_values(buf) == list(range(223, 230))


def test_buffer_reservoir_is_uniform():
    cap, total, trials = 10, 60, 600
    counts = torch.zeros(total)
    for trial in range(trials):
        buf = ddil.ReplayBuffer(cap, "reservoir", seed=trial)
        for start in range(0, total, 6):
            buf.add(states_of(range(start, start + 6)))
        assert len(buf) == cap
        vals = stored_values(buf)
        assert len(set(vals)) == cap  # no state stored twice
        counts[vals] += 1
    freq = counts / trials
    p = cap / total
    assert abs(freq.mean().item() - p) < 1e-6  # exactly cap states per trial
    assert (freq - p).abs().max() < 0.07  # each state ~ cap / seen (binomial sd ~0.015)
    assert abs(freq[:20].mean() - p) < 0.03 and abs(freq[-20:].mean() - p) < 0.03  # old and new alike


def test_buffer_sample_by_source_and_missing_source():
    buf = ddil.ReplayBuffer(32, "fifo")
    buf.add(states_of(range(10), source=ddil.SOURCE_TEACHER))
    buf.add(states_of(range(10, 15), source=ddil.SOURCE_STUDENT))
    assert buf.count(ddil.SOURCE_TEACHER) == 10 and buf.count(ddil.SOURCE_STUDENT) == 5
    assert buf.count(ddil.SOURCE_FRWD) == 0
    s = buf.sample(200, gen(0), ddil.SOURCE_STUDENT)
    assert len(s) == 200 and torch.all(s.source == ddil.SOURCE_STUDENT)
    assert set(s.x[:, 0].long().tolist()) == set(range(10, 15))
    s = buf.sample(400, gen(1))
    assert set(s.x[:, 0].long().tolist()) == set(range(15))
    with pytest.raises(ConfigError):
        buf.sample(3, gen(0), ddil.SOURCE_FRWD)
    with pytest.raises(ConfigError):
        ddil.ReplayBuffer(0)
    with pytest.raises(ConfigError):
        ddil.ReplayBuffer(4, "lifo")


@pytest.mark.parametrize("cond", ["none", "tensor", "dict"])
@pytest.mark.parametrize("with_w", [False, True])
def test_buffer_conds_and_w_stay_aligned(cond, with_w):
    buf = ddil.ReplayBuffer(8, "reservoir", seed=1)
    for start in range(0, 30, 5):
        buf.add(states_of(range(start, start + 5), cond=cond, with_w=with_w))
    s = buf.sample(50, gen(2))
    v = s.x[:, 0]
    assert torch.equal(s.x[:, 1], -v) and torch.equal(s.t, v.long()) and torch.equal(s.k, v.long() % 4)
    if cond == "none":
        assert s.cond is None
    elif cond == "tensor":
        assert torch.equal(s.cond, v[:, None] * 10)
    else:
        assert set(s.cond) == {"a", "b"}
        assert torch.equal(s.cond["a"], v * 2) and torch.equal(s.cond["b"], torch.stack([v, v], 1))
    if with_w:
        assert torch.equal(s.w, v * 3)
    else:
        assert s.w is None


def _same_states(a: States, b: States):
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t) and torch.equal(a.k, b.k)
    assert torch.equal(a.source, b.source)
    if isinstance(a.cond, dict):
        assert all(torch.equal(a.cond[key], b.cond[key]) for key in a.cond)
    elif a.cond is None:
        assert b.cond is None
    else:
        assert torch.equal(a.cond, b.cond)
    assert (a.w is None and b.w is None) or torch.equal(a.w, b.w)


@pytest.mark.parametrize("cond", ["none", "tensor", "dict"])
def test_buffer_state_dict_round_trip(cond):
    a = ddil.ReplayBuffer(10, "reservoir", seed=5)
    for start in range(0, 25, 5):
        a.add(states_of(range(start, start + 5), cond=cond, with_w=True))
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)  # a checkpoint: serialised
    blob.seek(0)
    b = ddil.ReplayBuffer(10, "reservoir", seed=999)  # a different replacement seed: restored from the dict
    b.load_state_dict(torch.load(blob))
    assert (len(b), b.seen, b.policy, b.capacity) == (len(a), a.seen, a.policy, a.capacity)
    _same_states(a.sample(30, gen(3)), b.sample(30, gen(3)))
    for start in range(100, 160, 6):  # later reservoir adds pick the same slots
        a.add(states_of(range(start, start + 6), cond=cond, with_w=True))
        b.add(states_of(range(start, start + 6), cond=cond, with_w=True))
        assert stored_values(a) == stored_values(b)
    _same_states(a.sample(30, gen(4)), b.sample(30, gen(4)))


def test_buffer_loaded_from_state_dict_is_independent():
    """load_state_dict must give the new buffer its own storage (as nn.Module.load_state_dict copies):
    adding to the original buffer afterwards must not change the loaded one."""
    a = ddil.ReplayBuffer(6, "fifo")
    a.add(states_of(range(6)))
    b = ddil.ReplayBuffer(6, "fifo")
    b.load_state_dict(a.state_dict())
    before = stored_values(b)
    a.add(states_of(range(100, 103)))
    assert stored_values(b) == before == list(range(6))


# ---------------------------------------------------------------------------------------------------
# DDIL states, rollouts


GRID = ddil.uniform_grid(4)
LCM_BASE = ddil.lcm_base_grid(50)
LCM_GRID = ddil.lcm_grid(4)


def toy_setup(dim=2):
    def draw_data(n, g):
        return torch.randn(n, dim, generator=g), None

    teacher_step = ddil.teacher_policy(toy_teacher, AB, None, K=2)
    student_step = ddil.ddim_policy(toy_student, AB, None)
    return draw_data, (lambda n, g: None), GRID, teacher_step, student_step


def test_ddil_states_source_frequencies_without_buffer():
    draw_data, draw_w, base, ts, ss = toy_setup()
    cfg = ddil.DDILConfig(beta_frwd=0.5, beta_teacher=0.3, beta_student=0.2, beta_mix_start=0.5)
    s = ddil.ddil_states(4000, draw_data, draw_w, base, GRID, ts, ss, AB, cfg, 7, None, gen(0))
    assert len(s) == 4000 and s.x.shape == (4000, 2) and s.cond is None and s.w is None
    for src, beta in enumerate(cfg.betas):
        assert abs((s.source == src).float().mean().item() - beta) < 0.03
    # every state is at tau_k of the grid, made at this step
    assert torch.equal(s.t, ddil.grid_time(GRID, s.k)) and torch.equal(s.made, torch.full((4000,), 7))
    assert torch.isfinite(s.x).all()
    # rollout states at k = 0 are the pure noise x_T (no step taken): unit variance
    noise = s.x[(s.source != ddil.SOURCE_FRWD) & (s.k == 0)]
    assert abs(noise.var().item() - 1) < 0.15


def _counting(fn, counter, key):
    def step(x, t, s, c, w, g):
        counter[key] += len(x)
        return fn(x, t, s, c, w, g)
    return step


def _shrink(x, t, s, c, w, g):  # a cheap policy: any deterministic map
    return 0.9 * x + 0.01 * s[:, None].to(x)


@pytest.mark.parametrize("method", ["lcm", "pd", "dmd2"])
@pytest.mark.parametrize("source", [ddil.SOURCE_FRWD, ddil.SOURCE_TEACHER, ddil.SOURCE_STUDENT])
def test_every_source_keeps_the_base_time_marginal(method, source):
    """10^5 states of one source: chi-square of their times against the base method's own marginal (LCM: uniform on
    the 50-point skipping grid; PD, DMD2: uniform on the student grid). The old rollouts, which put every LCM rollout
    state on the 4 inference times, fail this at p ~ 0."""
    from scipy.stats import chisquare
    grid, base = (LCM_GRID, LCM_BASE) if method == "lcm" else (GRID, GRID)
    betas = [0.0, 0.0, 0.0]
    betas[source] = 1.0
    cfg = ddil.DDILConfig(*betas, beta_mix_start=0.5)
    draw_data = lambda n, g: (torch.zeros(n, 1), None)  # noqa: E731
    s = ddil.ddil_states(100_000, draw_data, lambda n, g: None, base, grid, _shrink, _shrink, AB, cfg, 0, None, gen(3))
    counts = torch.bincount(torch.searchsorted(torch.tensor(base[::-1]), s.t), minlength=len(base))
    assert counts.sum() == 100_000 and chisquare(counts.numpy()).pvalue > 1e-3
    assert torch.equal(s.k, ddil.interval_index(grid, s.t))


def test_lcm_branch_states_are_the_acting_policys_step_from_tau_k():
    """A time between tau_{k+1} and tau_k is reached by the acting policy's own step from the visited state at tau_k."""
    ts = lambda x, t, s, c, w, g: x + s[:, None].to(x)  # noqa: E731  remembers where it went
    ss = lambda x, t, s, c, w, g: x - s[:, None].to(x)  # noqa: E731
    t_out = torch.tensor([[999, 899, 759, 259, 19]])
    k_out = ddil.interval_index(LCM_GRID, t_out.flatten())[None]
    x_T = torch.zeros(1, 1)
    for mix, sign in ((1.0, 1), (0.0, -1)):
        out = ddil.rollout(ts, ss, x_T, LCM_GRID, t_out, k_out, torch.tensor([mix]), None, None, gen(0))[0, :, 0]
        visited = [0.0, sign * 759, sign * (759 + 499), sign * (759 + 499 + 259)]  # x at tau_0..tau_3
        assert out.tolist() == [visited[0], visited[0] + sign * 899, visited[1], visited[3], visited[3] + sign * 19]


def test_rollout_matches_sequential_steps():
    _, _, _, ts, ss = toy_setup()
    x_T = torch.randn(9, 2, generator=gen(0), dtype=torch.float64)
    t_out = torch.tensor(GRID).repeat(9, 1)  # every visited state
    k_out = torch.arange(4).repeat(9, 1)
    x_T_copy = x_T.clone()
    for mix, policy in ((1.0, ts), (0.0, ss)):
        out = ddil.rollout(ts, ss, x_T, GRID, t_out, k_out, torch.full((9,), mix), None, None, gen(1))
        x = x_T
        for i in range(4):
            torch.testing.assert_close(out[:, i], x, rtol=0, atol=1e-12)
            if i < 3:
                x = policy(x, full(GRID[i], 9), full(GRID[i + 1], 9), None, None, None)
    assert torch.equal(x_T, x_T_copy)  # the input is not modified


def test_rollout_dagger_mixing_frequency():
    teacher = lambda x, t, s, c, w, g: x + 1  # noqa: E731  counts teacher steps
    student = lambda x, t, s, c, w, g: x + 1000  # noqa: E731  counts student steps
    t_out, k_out = torch.full((3000, 1), GRID[3]), torch.full((3000, 1), 3)
    out = ddil.rollout(teacher, student, torch.zeros(3000, 1), GRID, t_out, k_out, torch.full((3000,), 0.3), None, None, gen(0))
    n_student = torch.div(out[:, 0, 0], 1000, rounding_mode="floor")
    n_teacher = out[:, 0, 0] - 1000 * n_student
    assert torch.all(n_teacher + n_student == 3)
    assert abs(n_teacher.mean().item() / 3 - 0.3) < 0.02


def test_rollout_passes_conds_and_w_per_sample():
    seen = []

    def policy(x, t, s, cond, w, g):
        seen.append((cond.clone(), w.clone(), x[:, 0].clone()))
        return x

    x_T = torch.arange(6, dtype=torch.float64)[:, None].repeat(1, 2)
    t_out = torch.tensor([[999], [749], [499], [749], [999], [249]])
    cond = torch.arange(6) * 10
    w = torch.arange(6, dtype=torch.float64) * 0.5
    ddil.rollout(policy, policy, x_T, GRID, t_out, ddil.interval_index(GRID, t_out[:, 0])[:, None], torch.ones(6), cond, w, gen(0))
    assert seen
    for c, ww, xv in seen:
        idx = xv.long()
        assert torch.equal(c, cond[idx]) and torch.equal(ww, w[idx])


@pytest.mark.parametrize("method", ["pd", "lcm"])
def test_rollout_nfes_per_stored_state(method):
    """DAgger keeps every visited state: a PD teacher rollout of N - 1 steps stores N states, (N - 1)/N steps per state
    (the old rollouts to one k ~ U{0..N-1} paid (N - 1)/2 per state). LCM pays the visited steps plus one step per
    branch to a time between grid points."""
    grid, base = (LCM_GRID, LCM_BASE) if method == "lcm" else (GRID, GRID)
    calls = {"teacher": 0, "student": 0}
    ts, ss = _counting(_shrink, calls, "teacher"), _counting(_shrink, calls, "student")
    draw_data = lambda n, g: (torch.zeros(n, 1), None)  # noqa: E731
    n = 4000
    ddil.rollout_states(n, 0, draw_data, lambda n, g: None, grid, base, ts, ss, 1.0, 0, gen(0))
    per_state = calls["teacher"] / n
    if method == "pd":
        assert per_state == pytest.approx(3 / 4) and calls["student"] == 0
    else:  # 4 distinct times of 50: mostly branches, and the rollout walks to the deepest interval asked for
        assert 0.75 < per_state < 1.75


def _mean_age_over_run(B, cfg, steps, grid=GRID):
    draw_data = lambda n, g: (torch.zeros(n, 1), None)  # noqa: E731
    buf = ddil.ReplayBuffer(cfg.buffer_capacity, cfg.buffer_policy)
    g, ages = gen(0), []
    for step in range(steps):
        s = ddil.ddil_states(B, draw_data, lambda n, g: None, grid, grid, _shrink, _shrink, AB, cfg, step, buf, g)
        ages.append(ddil.mean_age(s, step))
    return sum(a for a in ages[steps // 2:] if a == a) / len(ages[steps // 2:])


@pytest.mark.parametrize("where", ["toy", "sd"])
def test_mean_age_of_trained_on_rollout_states_is_bounded_at_the_defaults(where):
    """With a FIFO buffer of capacity C refreshed at r states per step, a trained-on rollout state is about C / (2 r)
    steps old (plus the refresh period). The defaults keep that to a few tens of steps: the correction tracks the
    student. (The old SD default, C = 1024, was ~250 steps.)"""
    if where == "toy":
        from toy import run
        cfg, B = run.variant_config("lcm", True, "none").ddil, run.ToyConfig().batch_size
    else:
        from sd.config import SDConfig, resolve, sub_configs
        sd = resolve(SDConfig())
        cfg, B = sub_configs(sd)["ddil"], sd.train_batch_size
    rate = cfg.refresh_share * B * (cfg.beta_teacher + cfg.beta_student)
    bound = cfg.buffer_capacity / (2 * rate) + cfg.refresh_every
    age = _mean_age_over_run(B, cfg, steps=300)
    assert 0 < age <= 1.25 * bound and bound <= 40, (age, bound)


def test_mean_age():
    s = States(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
               torch.tensor([0, 1, 2, 2]), made=torch.tensor([9, 3, 5, 8]))
    assert ddil.mean_age(s, 10) == pytest.approx((7 + 5 + 2) / 3)
    assert math.isnan(ddil.mean_age(s.index(torch.tensor([0])), 10))


@pytest.mark.parametrize("refresh_every", [1, 5])
def test_ddil_states_with_buffer_refresh(refresh_every):
    """With a buffer, each refresh makes ceil(share * every * B * beta) rollout states per source, plus whatever
    the buffer lacks for the batch, in whole rollouts (every state of a paid rollout is kept); batches still follow
    the priors."""
    draw_data, draw_w, base, ts, ss = toy_setup()
    cfg = ddil.DDILConfig(beta_frwd=0.5, beta_teacher=0.3, beta_student=0.2, buffer_capacity=4096,
                          refresh_share=0.25, refresh_every=refresh_every)
    buf = ddil.ReplayBuffer(4096, "fifo")
    g = gen(1)
    B, totals, n_total = 400, torch.zeros(3), 0
    for step in range(12):
        before = {src: buf.count(src) for src in (ddil.SOURCE_TEACHER, ddil.SOURCE_STUDENT)}
        s = ddil.ddil_states(B, draw_data, draw_w, base, GRID, ts, ss, AB, cfg, step, buf, g)
        assert len(s) == B
        n = {src: int((s.source == src).sum()) for src in range(3)}
        for src, beta in ((ddil.SOURCE_TEACHER, 0.3), (ddil.SOURCE_STUDENT, 0.2)):
            q = 0.25 * refresh_every * B * beta if step % refresh_every == 0 else 0  # 30 / 20 (x every) states
            lack = -(-(n[src] - before[src]) // 4) * 4  # what the batch needs, in whole rollouts of N = 4 states
            made = buf.count(src) - before[src]
            assert made % 4 == 0 and made >= lack and (made == lack or abs(made - q) < 4), (step, src, made, q, lack)
        totals += torch.tensor([n[0], n[1], n[2]], dtype=torch.float)
        n_total += len(s)
    assert torch.allclose(totals / n_total, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("betas, field", [((-0.1, 0.6, 0.5), "beta_frwd"), ((0.5, 0.5, 0.5), "beta_frwd"),
                                          ((0.5, -0.5, 1.0), "beta_teacher"), ((0.4, 0.7, -0.1), "beta_student")])
def test_invalid_betas(betas, field):
    draw_data, draw_w, base, ts, ss = toy_setup()
    cfg = ddil.DDILConfig(*betas)
    with pytest.raises(ConfigError, match=field):
        ddil.ddil_states(8, draw_data, draw_w, base, GRID, ts, ss, AB, cfg, 0, None, gen(0))
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


def test_beta_mix_anneal():
    cfg = ddil.DDILConfig(beta_mix_start=1.0, beta_mix_end=0.2, beta_mix_steps=100)
    assert ddil.beta_mix_at(0, cfg) == pytest.approx(1.0)
    assert ddil.beta_mix_at(25, cfg) == pytest.approx(0.8)
    assert ddil.beta_mix_at(50, cfg) == pytest.approx(0.6)
    assert ddil.beta_mix_at(100, cfg) == pytest.approx(0.2)
    assert ddil.beta_mix_at(5000, cfg) == pytest.approx(0.2)
    const = ddil.DDILConfig(beta_mix_start=1.0, beta_mix_end=0.3, beta_mix_steps=0)
    assert ddil.beta_mix_at(0, const) == pytest.approx(0.3) == ddil.beta_mix_at(10, const)


def test_sample_visits_the_grid():
    c = torch.tensor([[0.5, -0.25]], dtype=torch.float64).repeat(3, 1)
    x_T = torch.randn(3, 2, generator=gen(0), dtype=torch.float64)
    pol = ddil.ddim_policy(point_mass_denoiser(c), AB, None)
    x0, states = ddil.sample(pol, x_T, GRID)
    assert len(states) == 4 and torch.equal(states[0], x_T)
    torch.testing.assert_close(x0, c, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Configs and checks


@pytest.mark.parametrize("cfg, field", [
    (ddil.ScheduleConfig(kind="foo"), "kind"),
    (ddil.ScheduleConfig(T=1), "T"),
    (ddil.ScheduleConfig(beta_start=0.1, beta_end=0.01), "beta_end"),
    (ddil.ReflectConfig(ratio=0), "ratio"),
    (ddil.ReflectConfig(ratio=1.5), "ratio"),
    (ddil.ReflectConfig(mode="fold"), "mode"),
    (ddil.ReflectConfig(range=0), "range"),
    (ddil.ReflectConfig(max_value=0.5), "max_value"),
    (ddil.LCMConfig(loss="l1"), "loss"),
    (ddil.LCMConfig(ema_decay=1.0), "ema_decay"),
    (ddil.LCMConfig(w_min=5.0, w_max=4.0), "w_max"),
    (ddil.DMD2Config(t_max=0.01), "t_max"),
    (ddil.DMD2Config(fake_updates=0), "fake_updates"),
    (ddil.DDILConfig(teacher_substeps=0), "teacher_substeps"),
    (ddil.DDILConfig(refresh_share=0.0), "refresh_share"),
    (ddil.DDILConfig(buffer_policy="lifo"), "buffer_policy"),
    (ddil.PDConfig(teacher_substeps=0), "teacher_substeps"),
    (ddil.PDConfig(N_start=12, N_final=4), "N_start"),
])
def test_config_validation_names_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


@pytest.mark.parametrize("cfg", [ddil.ScheduleConfig(), ddil.ReflectConfig(), ddil.LCMConfig(), ddil.DMD2Config(),
                                 ddil.DDILConfig(), ddil.PDConfig(),
                                 ddil.DDILConfig(0.5, 0.3, 0.2, buffer_capacity=64, buffer_policy="reservoir")])
def test_default_configs_valid(cfg):
    cfg.validate()


def test_check_finite_and_distill():
    ddil.check_finite({"loss": 1.0, "loss_fake": -2.0}, 3, "dmd2")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError) as e:
            ddil.check_finite({"loss": 1.0, "loss_fake": bad}, 17, "lcm")
        assert "17" in str(e.value) and "lcm" in str(e.value) and "loss_fake" in str(e.value)
    calls = []
    with pytest.raises(FloatingPointError, match="pd"):
        ddil.distill(lambda step: {"loss": float("nan") if step == 3 else 1.0}, 10, "pd",
                     on_step=lambda step, logs: calls.append(step))
    assert calls == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------
# Training steps on a tiny nn.Module


class EpsMLP(torch.nn.Module):
    """forward(x, t, cond, w) -> eps from an MLP on [x, t / 1000]."""

    def __init__(self, dim=2, hidden=16, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(),
                                           torch.nn.Linear(hidden, dim))

    def forward(self, x, t, cond, w):
        return self.net(torch.cat([x, t.to(x.dtype)[:, None] / 1000.0], 1))


class Disc(torch.nn.Module):
    def __init__(self, dim=2, seed=3):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))

    def forward(self, x, t, cond):
        return self.net(torch.cat([x, t.to(x.dtype)[:, None] / 1000.0], 1)).squeeze(1)


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def changed(before, m):
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def frozen_teacher(seed=1):
    t = EpsMLP(seed=seed).eval()
    t.requires_grad_(False)
    return t


def test_lcm_train_step():
    student, teacher = EpsMLP(seed=0), frozen_teacher()
    target = copy.deepcopy(student)
    target.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    cfg = ddil.LCMConfig()
    g = gen(0)
    origin = torch.tensor(ddil.lcm_origin_timesteps())
    t_teacher = params(teacher)
    for step in range(2):
        t = origin[torch.randint(0, 50, (32,), generator=g)]
        s = States(torch.randn(32, 2, generator=g), t, torch.full((32,), -1), torch.zeros(32, dtype=torch.long))
        s_before, tg_before = params(student), params(target)
        logs = ddil.lcm_train_step(student, target, teacher, opt, s, AB, None, cfg)
        assert math.isfinite(logs["loss"]) and logs["loss"] > 0
        assert changed(s_before, student)
        for p_t, old, p in zip(target.parameters(), tg_before, student.parameters()):
            torch.testing.assert_close(p_t, cfg.ema_decay * old + (1 - cfg.ema_decay) * p.detach())
            assert (p_t - p).norm() <= (old - p).norm() + 1e-12  # moved toward the student
        assert changed(tg_before, target)
    assert not changed(t_teacher, teacher)


@pytest.mark.parametrize("loss", ["l2", "huber"])
@pytest.mark.parametrize("reflect", [None, ddil.ReflectConfig(mode="clip", range=0.5)])
def test_lcm_loss_matches_hand_computation(loss, reflect):
    """One teacher DDIM step t -> max(t - T/n, 0) (reflected), the target's consistency function there (reflected),
    against the student's consistency function at t, with the same reflection of x0_hat as the target side."""
    student, target, teacher = EpsMLP(seed=0), EpsMLP(seed=5), frozen_teacher()
    cfg = ddil.LCMConfig(loss=loss, huber_c=0.01)
    t = torch.tensor([999, 519, 39, 19, 0, 259])
    x = torch.randn(6, 2, generator=gen(1)) * 2
    s = States(x, t, torch.full((6,), -1), torch.zeros(6, dtype=torch.long))
    got = ddil.lcm_loss(student, target, teacher, s, AB, reflect, cfg)
    with torch.no_grad():
        t_prev = (t - 20).clamp(min=0)
        x0_t, eps_t = ddil.predict(teacher, x, t, None, None, AB, reflect)
        x_prev = torch.where((t == t_prev)[:, None], x, ddil.ddim_step(x0_t, eps_t, t_prev, AB))
        x0_tg, _ = ddil.predict(target, x_prev, t_prev, None, None, AB, reflect)
        f_tg = ddil.consistency_fn(x_prev, x0_tg, t_prev, cfg)
        x0_s = ddil.reflect_x0(ddil.eps_to_x0(x, student(x, t, None, None), *ddil.alpha_sigma(AB, t, x)), reflect)
        f = ddil.consistency_fn(x, x0_s, t, cfg)
        d = f - f_tg
        want = (d**2).mean(1) if loss == "l2" else (torch.sqrt(d**2 + 0.01**2) - 0.01).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[4].item() == 0.0  # t = 0: f = x on both sides
    if reflect is not None:  # both sides reflected: a student whose raw x0_hat leaves the domain is clipped online too
        raw = ddil.eps_to_x0(x, student(x, t, None, None), *ddil.alpha_sigma(AB, t, x))
        assert (raw.abs() > 0.5).any()
    got.mean().backward()  # gradients reach the student only
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_pd_train_step():
    teacher = frozen_teacher()
    student = EpsMLP(seed=1)  # PD: the student starts from the teacher's weights
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    grid, fine = ddil.uniform_grid(4), ddil.uniform_grid(8)
    g = gen(0)
    t_teacher = params(teacher)
    for _ in range(2):
        k = torch.randint(0, 4, (32,), generator=g)
        s = States(torch.randn(32, 2, generator=g), ddil.grid_time(grid, k), k, torch.zeros(32, dtype=torch.long))
        before = params(student)
        logs = ddil.pd_train_step(student, teacher, opt, s, fine, AB, None)
        assert math.isfinite(logs["loss"]) and logs["loss"] > 0
        assert changed(before, student)
    assert not changed(t_teacher, teacher)
    nxt = ddil.pd_next_round(student)
    assert not nxt.training and not any(p.requires_grad for p in nxt.parameters())
    assert all(torch.equal(a, b) for a, b in zip(nxt.parameters(), student.parameters()))


def dmd2_states(n=32, t=749, seed=0):
    """next_states for dmd2_train_step: a fresh random batch at time t per call, each one recorded."""
    g, made = gen(seed), []

    def next_states():
        made.append(States(torch.randn(n, 2, generator=g), torch.full((n,), t), torch.zeros(n, dtype=torch.long),
                           torch.zeros(n, dtype=torch.long)))
        return made[-1]
    return next_states, made


def test_dmd2_two_time_scale_updates():
    """One generator update moving only the generator (the fake score and GAN head frozen, no gradient reaches
    them), then fake_updates updates of the fake score and head only, which the GAN head's loss reaches."""
    teacher = frozen_teacher()
    generator, fake, disc = EpsMLP(seed=4), EpsMLP(seed=1), Disc()
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-2)
    opt_f = torch.optim.Adam(list(fake.parameters()) + list(disc.parameters()), lr=1e-2)
    cfg, g = ddil.DMD2Config(gan_weight=0.1, fake_updates=2), gen(0)
    seen = []

    def update(opt, loss):  # records which modules this loss's backward reaches
        for m in (generator, fake, disc):
            m.zero_grad(set_to_none=True)
        loss.backward()
        grads = {name: [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters()]
                 for name, m in (("generator", generator), ("fake", fake), ("disc", disc))}
        seen.append((opt, {name: any(v) for name, v in grads.items()}, params(fake), params(generator)))
        opt.step()
    next_states, _ = dmd2_states()
    t_teacher, f0 = params(teacher), params(fake)
    logs = ddil.dmd2_train_step(generator, fake, teacher, opt_g, opt_f, next_states, AB, cfg, g, disc=disc,
                                next_real=lambda: (torch.randn(32, 2, generator=g) * 0.5 + 1, None), update=update)
    assert [opt for opt, *_ in seen] == [opt_g, opt_f, opt_f]
    assert seen[0][1] == {"generator": True, "fake": False, "disc": False}  # the GAN term reaches only the generator
    assert all(grads == {"generator": False, "fake": True, "disc": True} for _, grads, *_ in seen[1:])
    assert all(torch.equal(a, b) for a, b in zip(seen[0][2], f0))  # the fake score frozen during the generator update
    assert not changed(seen[1][3], generator)  # the fake updates leave the generator alone
    assert changed(f0, fake) and all(p.requires_grad for p in fake.parameters())  # unfrozen again
    assert not changed(t_teacher, teacher)
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad for v in logs.values())


def test_dmd2_fake_updates_see_fresh_states_and_real_data():
    """Every fake-score update draws its own batch: the generator samples it trains on (the generator's no-grad
    inputs) are the fresh states, distinct across updates, and the discriminator sees fresh real data."""
    teacher, generator, fake, disc = frozen_teacher(), EpsMLP(seed=4), EpsMLP(seed=1), Disc()
    gen_inputs, disc_conds = [], []
    generator.register_forward_pre_hook(lambda m, args: gen_inputs.append((torch.is_grad_enabled(), args[0].clone())))
    disc.register_forward_pre_hook(lambda m, args: disc_conds.append(args[2]))
    g, n_real = gen(1), []

    def next_real():  # real batch i carries condition i, to see which batch the discriminator scored
        n_real.append(len(n_real))
        return torch.randn(16, 2, generator=g) + 3, torch.full((16,), n_real[-1])
    next_states, made = dmd2_states(16)
    opt_g, opt_f = torch.optim.SGD(generator.parameters(), lr=0.1), torch.optim.SGD(fake.parameters(), lr=0.1)
    cfg = ddil.DMD2Config(fake_updates=3, gan_weight=0.1)
    ddil.dmd2_train_step(generator, fake, teacher, opt_g, opt_f, next_states, AB, cfg, g, disc=disc, next_real=next_real)
    assert len(made) == 1 + cfg.fake_updates
    no_grad = [x for grad, x in gen_inputs if not grad]
    assert [grad for grad, _ in gen_inputs] == [True] + [False] * cfg.fake_updates
    assert all(torch.equal(x, s.x) for x, s in zip(no_grad, made[1:]))  # each fake update: its own fresh states
    assert all(not torch.equal(a, b) for i, a in enumerate(no_grad) for b in no_grad[i + 1:])
    assert torch.equal(gen_inputs[0][1], made[0].x)  # the generator update: the first batch
    real_conds = [int(c[0]) for c in disc_conds if c is not None]  # fakes carry the states' cond, None here
    assert real_conds == list(range(cfg.fake_updates)) and len(disc_conds) == 1 + 2 * cfg.fake_updates


def test_dmd2_gan_term_draws_its_own_t_over_the_whole_range():
    """The generator's GAN term scores x0_gen at an independent t ~ U{0..T-1} (DMD2's diffusion GAN), not at the
    distribution-matching t ~ U[t_min T, t_max T] the teacher is queried at."""
    times = {"teacher": [], "disc": []}

    def teacher(x, t, cond, w):
        times["teacher"].append(t.clone())
        return toy_teacher(x, t, cond, w)

    def disc(x_t, t, cond):
        times["disc"].append(t.clone())
        return x_t.sum(1) * 0
    generator, fake = EpsMLP(seed=4), EpsMLP(seed=1)
    opt_g, opt_f = torch.optim.SGD(generator.parameters(), lr=0.0), torch.optim.SGD(fake.parameters(), lr=0.0)
    next_states, _ = dmd2_states(2000)
    cfg = ddil.DMD2Config(fake_updates=1, gan_weight=1.0)
    ddil.dmd2_train_step(generator, fake, teacher, opt_g, opt_f, next_states, AB, cfg, gen(2), disc=disc,
                         next_real=lambda: (torch.zeros(2000, 2), None))
    t_dm, t_gan = times["teacher"][0], times["disc"][0]
    assert t_dm.min() >= 20 and t_dm.max() < 980  # DMD's own range
    assert t_gan.min() < 20 and t_gan.max() >= 980 and not torch.equal(t_dm, t_gan)
    assert not torch.equal(times["disc"][1], times["disc"][2])  # real and fake each at their own t


def test_pure_noise_start():
    """Forward states at t = T - 1 keep alpha_{T-1} x0 of the data; DMD2's generator sees pure noise there."""
    n, x0 = 4000, torch.full((4000, 2), 30.0)
    t = torch.where(torch.arange(n) % 2 == 0, 999, 749)
    s = ddil.forward_states(x0, t, torch.zeros(n, dtype=torch.long), None, None, AB, gen(0))
    start = t == 999
    assert s.x[start].mean() > 1.5  # 0.068 * 30 = 2.0 of signal
    out = ddil.pure_noise_start(s, 1000, gen(1))
    assert abs(out.x[start].mean()) < 0.1 and abs(out.x[start].std() - 1) < 0.05
    assert torch.equal(out.x[~start], s.x[~start]) and torch.equal(out.t, s.t)


def test_train_steps_run_through_the_hooks():
    """LCM and PD: the loss runs through `online` inside `autocast`, the optimiser step is `update(opt, loss)`, and
    LCM's EMA reads the student; with target = student (LCM-LoRA) there is no EMA."""
    teacher, calls = frozen_teacher(), []

    class Online(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            calls.append("online")
            return self.m(*a)

    @contextlib.contextmanager
    def autocast():
        calls.append("autocast")
        yield

    def update(opt, loss):
        calls.append(("update", opt, loss.ndim))
        ddil._update(opt, loss)
    origin = torch.tensor(ddil.lcm_origin_timesteps())
    t = origin[torch.randint(0, 50, (16,), generator=gen(0))]
    s = States(torch.randn(16, 2, generator=gen(1)), t, torch.full((16,), -1), torch.zeros(16, dtype=torch.long))
    student = EpsMLP(seed=0)
    target, opt = copy.deepcopy(student).requires_grad_(False), torch.optim.SGD(student.parameters(), lr=0.5)
    hooks = dict(online=Online(student), update=update, autocast=autocast)
    logs = ddil.lcm_train_step(student, target, teacher, opt, s, AB, None, ddil.LCMConfig(), **hooks)
    assert calls == ["autocast", "online", ("update", opt, 0)] and not logs["loss"].requires_grad
    assert changed(params(EpsMLP(seed=0)), target)  # the EMA moved the target
    before = params(student)
    ddil.lcm_train_step(student, student, teacher, opt, s, AB, None, ddil.LCMConfig())  # its own target: no EMA
    assert changed(before, student)
    calls.clear()
    k = torch.randint(0, 4, (16,), generator=gen(2))
    s = States(s.x, ddil.grid_time(GRID, k), k, torch.zeros(16, dtype=torch.long))
    ddil.pd_train_step(student, teacher, opt, s, ddil.uniform_grid(8), AB, None, **hooks)
    assert calls == ["autocast", "online", ("update", opt, 0)]


@settings(max_examples=30, deadline=None)
@given(r=st.floats(0.5, 4.0), ratio=st.floats(0.5, 1.0), max_value=st.floats(1.0, 3.0))
def test_dynamic_threshold_in_units_of_the_range(r, ratio, max_value):
    """Range-relative dynamic thresholding: data inside [-r, r] is untouched, the output lies in [-r, r],
    and it equals the r = 1 rule applied to x / r, scaled back."""
    g = torch.Generator().manual_seed(0)
    inside = (torch.rand(4, 3, 5, generator=g) * 2 - 1) * r
    assert torch.allclose(ddil.dynamic_threshold(inside, ratio, max_value, r), inside)
    big = torch.randn(4, 3, 5, generator=g) * 3 * r
    out = ddil.dynamic_threshold(big, ratio, max_value, r)
    assert out.abs().max() <= r * (1 + 1e-6)
    assert torch.allclose(out, r * ddil.dynamic_threshold(big / r, ratio, max_value), atol=1e-5)


def test_discriminator_scores_real_samples_with_their_own_conditions():
    """DMD2's classifier sees real data with the real data's conditions, fakes with the states' conditions."""
    seen = []

    def disc(x_t, t, cond):
        seen.append(cond)
        return x_t.sum(1)
    s = States(torch.randn(4, 2), torch.full((4,), 999), torch.zeros(4, dtype=torch.long),
               torch.zeros(4, dtype=torch.long), cond=torch.tensor([0, 0, 0, 0]))
    cond_real = torch.tensor([1, 2, 3, 4])
    gen_net = lambda x, t, c, w: torch.zeros_like(x)  # noqa: E731
    ddil.fake_score_loss(gen_net, gen_net, s, torch.randn(4, 2), cond_real, AB, ddil.DMD2Config(gan_weight=1.0), gen(0), disc)
    assert torch.equal(seen[0], cond_real) and torch.equal(seen[1], s.cond)


def test_reservoir_batch_with_colliding_slots_keeps_the_last_write():
    """Algorithm R is sequential: within one batch, a slot drawn twice holds the later state. What `add` stored is
    compared with a one-state-at-a-time Algorithm R that draws the same uniforms."""
    buf = ddil.ReplayBuffer(2, "reservoir", seed=0)
    draws = torch.Generator().manual_seed(0)  # the buffer's own replacement stream, replayed
    want, seen = [None, None], 0
    for n in range(50):  # many batches of 8 into 2 slots: collisions are certain
        x = torch.arange(8 * n, 8 * n + 8, dtype=torch.float32)[:, None]
        u = torch.rand(8, generator=draws, dtype=torch.float64)
        for q in range(8):  # Vitter's Algorithm R, one state at a time
            i = seen + q
            j = i if i < 2 else int(u[q] * (i + 1))
            if j < 2:
                want[j] = float(x[q, 0])
        seen += 8
        buf.add(States(x, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)))
        assert buf.store.x[:, 0].tolist() == want, n
    assert len(buf) == 2


def test_buffer_smaller_than_one_refresh_is_a_config_error():
    draw_data, draw_w, base, ts, ss = toy_setup()
    cfg = ddil.DDILConfig(beta_frwd=0.0, beta_teacher=0.5, beta_student=0.5, buffer_capacity=8)
    with pytest.raises(ConfigError, match="buffer_capacity"):
        ddil.ddil_states(64, draw_data, draw_w, base, GRID, ts, ss, AB, cfg, 0, ddil.ReplayBuffer(8), gen(0))


def test_teacher_branch_takes_proportional_substeps():
    """Given the student grid, a teacher step to a time inside a student interval takes ceil(K x share) substeps (the
    same substep length as a full interval), evaluating only the samples that still move; the full step takes K."""
    calls = []

    def teacher(x, t, cond, w):
        calls.append(len(x))
        return toy_teacher(x, t, cond, w)
    K, grid = 8, LCM_GRID  # [999, 759, 499, 259]
    step = ddil.teacher_policy(teacher, AB, None, K, grid)
    x = torch.randn(3, 2, generator=gen(0), dtype=torch.float64)
    t, s = torch.tensor([999, 999, 759]), torch.tensor([759, 879, 739])
    got = step(x, t, s, None, None, None)
    assert sum(calls) == 8 + 4 + 1  # full interval; half of it; 20 of 260 steps -> ceil(8 x 20 / 260) = 1
    for b, n in enumerate((8, 4, 1)):  # each equals a plain solve with its own substep count
        want = ddil.teacher_solve(toy_teacher, x[b:b + 1], t[b:b + 1], s[b:b + 1], None, None, AB, None, n)
        torch.testing.assert_close(got[b:b + 1], want, rtol=0, atol=1e-12)


def test_step_batches_refresh_once_and_draw_fresh_batches():
    """DMD2's 1 + fake_updates batches of one step: each is fresh, and only the first refreshes the buffer (later ones
    make only what the buffer lacks: nothing, once it holds a batch's worth)."""
    draw_data, draw_w, base, ts, ss = toy_setup()
    cfg = ddil.DDILConfig(0.5, 0.25, 0.25, buffer_capacity=64, refresh_share=0.5)
    buf, g = ddil.ReplayBuffer(64), gen(0)
    states = lambda step, refresh=True: ddil.ddil_states(32, draw_data, draw_w, base, GRID, ts, ss, AB, cfg, step,  # noqa: E731
                                                          buf, g, refresh)
    for step in range(3):  # fills the buffer
        states(step)
    nxt = ddil.step_batches(states, 3)
    seen = buf.seen
    batches = [nxt()]
    assert buf.seen - seen >= 2 * math.ceil(0.5 * 32 * 0.25)  # the step's refresh of both rollout sources
    seen = buf.seen
    batches += [nxt() for _ in range(3)]
    assert buf.seen == seen  # no more refreshes
    for a, b in zip(batches, batches[1:]):
        assert not torch.equal(a.x, b.x)


def test_small_refresh_quota_is_met_on_average_in_whole_rollouts():
    """SD's defaults ask 1 state per source per step, with rollouts of N = 4 states: a rollout every ~4 steps
    (stochastic rounding), never a whole rollout per step of which 3 states are paid for and thrown away."""
    cfg = ddil.DDILConfig(0.5, 0.25, 0.25, buffer_capacity=64, refresh_share=0.25)
    buf = ddil.ReplayBuffer(64)
    buf.add(States(torch.zeros(64, 1), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long),
                   torch.tensor([1, 2] * 32)))  # a full buffer: nothing is lacking
    g = gen(0)
    made = [ddil.fresh_counts(4, 4, 16, cfg, step, buf, True, 4, g) for step in range(2000)]
    teacher = torch.tensor([m[0] for m in made], dtype=torch.float)
    assert set(teacher.tolist()) <= {0.0, 4.0} and abs(teacher.mean().item() - 1.0) < 0.1
