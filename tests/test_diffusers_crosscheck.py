"""Every formula of ddil.py that diffusers also implements, checked against diffusers itself.

diffusers keeps its schedules in float32, ddil in float64, so comparisons of schedule-dependent values use
float32-level tolerances; purely elementwise maps (thresholding, scalings, embeddings) are compared tightly.
"""
import dataclasses
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ddil

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LCMScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
AB = ddil.make_alpha_bar()
SHAPE = (2, 4, 8, 8)
HYP = settings(max_examples=30, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def const_eps(eps: torch.Tensor):
    """A denoiser that ignores its inputs and returns a fixed eps."""
    return lambda x, t, cond, w: eps


# ---------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("kwargs, cfg, rtol", [
    (dict(SD), ddil.ScheduleConfig(), 1e-5),
    (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
     ddil.ScheduleConfig(kind="linear", beta_start=1e-4, beta_end=0.02), 1e-5),
    (dict(beta_schedule="squaredcos_cap_v2"), ddil.ScheduleConfig(kind="cosine"), 1e-4),
], ids=["scaled_linear", "linear", "cosine"])
def test_make_alpha_bar_matches_ddpm_scheduler(kwargs, cfg, rtol):
    want = DDPMScheduler(**kwargs).alphas_cumprod.double()
    got = ddil.make_alpha_bar(cfg)
    assert got.dtype == torch.float64 and got.shape == (1000,)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("kwargs, kind", [
    (dict(SD), "scaled_linear"),
    (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "linear"),
    (dict(beta_schedule="squaredcos_cap_v2"), "cosine"),
], ids=["scaled_linear", "linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers(kwargs, kind):
    """Lin et al. 2024 Alg. 1: DDPMScheduler(rescale_betas_zero_snr=True) has alpha_bar_{T-1} = 0 exactly; ddil
    floors it at 2^-24 exactly as EulerDiscreteScheduler does, so x0 from eps stays finite at t = T - 1.
    diffusers' float32 cumprod differs by up to ~4e-5 relative on the tiny tail values."""
    cfg = ddil.ScheduleConfig(kind=kind, beta_start=kwargs.get("beta_start", 0.00085),
                              beta_end=kwargs.get("beta_end", 0.012), zero_terminal_snr=True)
    got = ddil.make_alpha_bar(cfg)
    ddpm = DDPMScheduler(rescale_betas_zero_snr=True, **kwargs).alphas_cumprod.double()
    euler = EulerDiscreteScheduler(rescale_betas_zero_snr=True, **kwargs).alphas_cumprod.double()
    assert ddpm[-1] == 0 and got[-1] == euler[-1] == 2.0**-24
    torch.testing.assert_close(got, euler, rtol=1e-4, atol=0)
    torch.testing.assert_close(got[:-1], ddpm[:-1], rtol=1e-4, atol=0)
    torch.testing.assert_close(got[0], ddil.make_alpha_bar(dataclasses.replace(cfg, zero_terminal_snr=False))[0])
    assert (got[:-1] > 0).all() and (got[1:-1] < got[:-2]).all()  # still a decreasing schedule before the floor


def test_zero_terminal_snr_x0_is_finite_at_T():
    """At t = T - 1 of a zero-SNR schedule, predict's x0_hat from eps stays finite (alpha = 2^-12, not 0)."""
    ab = ddil.make_alpha_bar(ddil.ScheduleConfig(zero_terminal_snr=True))
    x = torch.randn(4, 3, generator=gen(0))
    t = torch.full((4,), 999)
    alpha, sigma = ddil.alpha_sigma(ab, t, x)
    v = torch.randn(4, 3, generator=gen(1))
    x0, _ = ddil.predict(lambda x_t, t_, c, w: ddil.v_to_eps(x_t, v, alpha, sigma), x, t, None, None, ab)
    # v survives the float32 round trip eps -> x0 up to |x| 2^-24 / alpha = |x| 2^-12 per rounding
    torch.testing.assert_close(x0, ddil.v_to_x0(x, v, alpha, sigma), atol=4e-3, rtol=0)
    with pytest.raises(ddil.ConfigError, match="zero_terminal_snr"):
        ddil.make_alpha_bar(ddil.ScheduleConfig(zero_terminal_snr=1))


def test_q_sample_matches_add_noise():
    sched = DDPMScheduler(**SD)
    g = gen(0)
    x0 = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    for t in ([0, 999], [17, 500], [250, 750]):
        t = torch.tensor(t)
        want = sched.add_noise(x0, noise, t)
        got = ddil.q_sample(x0, t, noise, AB)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# DDIM (eta = 0), plain, with dynamic thresholding and with clipping


DDIM_CASES = [
    (dict(clip_sample=False, thresholding=False), ddil.ReflectConfig()),
    (dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
     ddil.ReflectConfig(mode="dynamic", ratio=0.9, max_value=1.5)),
    (dict(clip_sample=True, clip_sample_range=0.8), ddil.ReflectConfig(mode="clip", range=0.8)),
]


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("kwargs, reflect", DDIM_CASES, ids=["plain", "dynamic", "clip"])
def test_ddim_step_matches_ddim_scheduler(n, kwargs, reflect):
    sched = DDIMScheduler(**SD, set_alpha_to_one=True, steps_offset=0, **kwargs)
    sched.set_timesteps(n)
    ts = [int(t) for t in sched.timesteps]
    assert ts[-1] == 0  # the last step goes to clean
    g = gen(n)
    for t in ts:
        x = torch.randn(SHAPE, generator=g) * 3  # large, so the thresholds bite
        eps = torch.randn(SHAPE, generator=g)
        want = sched.step(eps, t, x, eta=0.0).prev_sample
        prev = t - 1000 // n
        s = prev if prev >= 0 else ddil.T_CLEAN
        tt, ss = torch.full((2,), t), torch.full((2,), s)
        x0, e = ddil.predict(const_eps(eps), x, tt, None, None, AB, reflect)
        assert e is eps  # the eps used in the step is the model's own, not re-derived from the clipped x0
        got = ddil.ddim_step(x0, e, ss, AB)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
        if s == ddil.T_CLEAN:  # DDIM's final_alpha_cumprod = 1: the last step returns x0_hat
            torch.testing.assert_close(got, x0)


def test_ddim_thresholds_actually_bite():
    """Guard for the test above: with these inputs, dynamic thresholding and clipping change x0_hat."""
    g = gen(1)
    x, eps = torch.randn(SHAPE, generator=g) * 3, torch.randn(SHAPE, generator=g)
    t = torch.full((2,), 500)
    raw, _ = ddil.predict(const_eps(eps), x, t, None, None, AB, None)
    for cfg in DDIM_CASES[1:]:
        mapped, _ = ddil.predict(const_eps(eps), x, t, None, None, AB, cfg[1])
        assert (mapped - raw).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------
# Thresholding


@HYP
@given(ratio=st.floats(0.5, 1.0, exclude_min=True), max_value=st.floats(1.0, 3.0), scale=st.floats(0.1, 5.0),
       seed=st.integers(0, 2**16))
def test_dynamic_threshold_matches_diffusers(ratio, max_value, scale, seed):
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    x = torch.randn(3, 2, 5, 4, generator=gen(seed)) * scale
    got = ddil.dynamic_threshold(x, ratio, max_value)
    want = sched._threshold_sample(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_dynamic_threshold_float64_matches_diffusers():
    """diffusers keeps a float64 sample in float64 (it upcasts only half types); so must ddil.
    Percentiles inside [1, max_value] so that s is the interpolated quantile, not the clamp."""
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=gen(0)) * 1.5
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    want = sched._threshold_sample(x)
    got = ddil.dynamic_threshold(x, 0.9, 3.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@HYP
@given(r=st.floats(0.1, 3.0), scale=st.floats(0.1, 5.0), seed=st.integers(0, 2**16))
def test_clip_x0_is_clamp(r, scale, seed):
    x = torch.randn(2, 3, 4, 4, generator=gen(seed)) * scale
    torch.testing.assert_close(ddil.clip_x0(x, r), torch.clamp(x, -r, r), rtol=0, atol=0)
    cfg = ddil.ReflectConfig(mode="clip", range=r)
    torch.testing.assert_close(ddil.reflect_x0(x, cfg), x.clamp(-r, r), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# LCM: scalings, grids, sampler step, guidance embedding


@pytest.mark.parametrize("t", [0, 1, 2, 5, 19, 39, 100, 259, 499, 759, 998, 999])
def test_lcm_scalings_match_lcm_scheduler(t):
    want_skip, want_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(t)
    got_skip, got_out = ddil.lcm_scalings(torch.tensor([t]))
    assert got_skip.item() == pytest.approx(want_skip, rel=1e-12, abs=1e-15)
    assert got_out.item() == pytest.approx(want_out, rel=1e-12, abs=1e-15)


def test_lcm_scalings_all_t_match_lcm_scheduler():
    t = torch.arange(1000)
    want_skip, want_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(t.double())
    got_skip, got_out = ddil.lcm_scalings(t)
    torch.testing.assert_close(got_skip, want_skip, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("original_steps", [50, 25])
def test_lcm_grid_matches_lcm_scheduler(original_steps):
    sched = LCMScheduler(original_inference_steps=original_steps)
    for N in range(1, original_steps + 1):
        sched.set_timesteps(N, original_inference_steps=original_steps)
        assert ddil.lcm_grid(N, original_steps) == sched.timesteps.tolist(), N
    with pytest.raises(ddil.ConfigError):
        ddil.lcm_grid(original_steps + 1, original_steps)


def test_randn_draws_the_same_noise_as_randn_tensor():
    like = torch.zeros(SHAPE)
    got = ddil.randn(SHAPE, gen(123), like)
    want = randn_tensor(SHAPE, generator=gen(123), device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("thresholding", [False, True])
def test_consistency_policy_matches_lcm_scheduler_step(thresholding):
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5) if thresholding else {}
    reflect = ddil.ReflectConfig(mode="dynamic", ratio=0.9, max_value=1.5) if thresholding else None
    sched = LCMScheduler(**SD, set_alpha_to_one=True, clip_sample=False, timestep_scaling=10.0, **kwargs)
    sched.set_timesteps(4)
    grid = sched.timesteps.tolist()
    assert grid == ddil.lcm_grid(4) == [999, 759, 499, 259]

    fixed = torch.randn(SHAPE, generator=gen(7))
    denoiser = lambda x, t, cond, w: 0.5 * torch.tanh(x) + fixed  # noqa: E731  a fixed, deterministic eps model
    policy = ddil.consistency_policy(denoiser, AB, reflect, ddil.LCMConfig())
    g_ref, g_ddil = gen(99), gen(99)
    x = torch.randn(SHAPE, generator=gen(8)) * 3
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else ddil.T_CLEAN
        eps = denoiser(x, None, None, None)
        out = sched.step(eps, t, x, generator=g_ref)
        tt, ss = torch.full((2,), t), torch.full((2,), s)
        # the consistency function f(x, t) = LCMScheduler's `denoised`
        x0, _ = ddil.predict(denoiser, x, tt, None, None, AB, reflect)
        f = ddil.consistency_fn(x, x0, tt, ddil.LCMConfig())
        torch.testing.assert_close(f, out.denoised, rtol=1e-4, atol=1e-5)
        # the full step, with the same noise from an identically seeded generator
        got = policy(x, tt, ss, None, None, g_ddil)
        torch.testing.assert_close(got, out.prev_sample, rtol=1e-4, atol=1e-5)
        x = out.prev_sample


@pytest.mark.parametrize("w", [[0.0], [1.0, 2.0], [3.0, 7.5, 15.0], [0.25, 4.0, 8.0, 12.0]])
@pytest.mark.parametrize("dim", [256, 255])
def test_guidance_scale_embedding_matches_pipeline(w, dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor(w)
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    got = ddil.guidance_scale_embedding(w, dim)
    assert got.shape == (len(w), dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
