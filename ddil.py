"""
ddil.py: Diffusion Distillation with Imitation Learning, every algorithm in one file (torch only).

DDIL (Garrepalli, Mahajan, Hayat, Porikli 2024, arXiv:2410.11971) trains a few-step student on a
mixture of states: forward diffusion of data (keeps the data marginal), teacher backward rollouts,
and the student's own backward rollouts (DAgger: corrects covariate shift). At each state the teacher
gives feedback through the base method's loss: PD, LCM or DMD2. A bounded aggregation (replay) buffer
pays for the rollouts, and a reflected sampler keeps x0_hat inside the data domain at every step.

References
  DDPM    Ho et al. 2020                   schedule, forward process q(x_t | x_0)
  DDIM    Song et al. 2021                 deterministic sampler (eta = 0), Eq. 12
  Imagen  Saharia et al. 2022              dynamic thresholding of x0_hat
  RDM     Lou & Ermon 2023                 reflected diffusion: keep x0_hat in the domain
  PD      Salimans & Ho 2022               progressive distillation, Algorithm 2
  LCM     Luo et al. 2023                  latent consistency distillation, Algorithm 1 and Eq. 9
  DMD2    Yin et al. 2024                  distribution matching distillation, Eq. 2-4, Sec. 4
  DAgger  Ross et al. 2011                 dataset aggregation, Algorithm 3.1

Sections (dependency order)
  0. Errors, broadcasting and randomness   ConfigError, append_dims, randn/rand/randint, index_cond
  1. Noise schedule                        ScheduleConfig, make_alpha_bar, rescale_zero_terminal_snr, alpha_sigma
  2. Parameterisations                     eps/x0/v conversions, q_sample
  3. Reflected x0_hat                      ReflectConfig, clip_x0, dynamic_threshold, reflect_fold
  4. Samplers and policies                 predict, ddim_step, teacher_solve, *_policy, sample
  5. Timestep grids                        lcm_grid, uniform_grid, pd_grids
  6. DDIL states: rollouts and buffer      DDILConfig, States, lcm_base_grid, rollout, ReplayBuffer, ddil_states
  7. Losses                                LCM (7a), PD (7b: pd_x_tilde, pd_loss), DMD2 (7c), the oracle (7d)
  8. Training steps and the loop           lcm_train_step, pd_train_step, dmd2_train_step, oracle_train_step, distill

DDIL changes where states come from, never when (Sec. 6)
  A base method trains at its own times: LCM uniform on the 50-point skipping grid, PD and DMD2 on the student
  grid. All three sources follow that marginal: a rollout keeps `states_per_rollout` distinct times drawn
  uniformly from the base grid. A time on the student grid is a state the rollout visits; a time t inside
  (tau_{k+1}, tau_k) is reached by the step the acting policy would take from tau_k to t: for an LCM student its
  consistency output f(x, tau_k) re-noised to t (what its own multistep sampler does with t as the next point,
  at no extra teacher cost), for the teacher its ODE from tau_k to t. So DAgger aggregates every state the
  rollout visits, and no source shifts the time marginal (tests/test_ddil.py: chi-square per source).

The denoiser contract (one for the toy and for Stable Diffusion)
  denoiser(x_t, t, cond, w) -> eps_hat
    x_t  (B, *)   noisy state          t  (B,) long, 0..T-1       cond  None | Tensor (B, ...) | dict
    w    (B,) or None: guidance scale. A teacher applies classifier-free guidance with it,
         eps = eps_c + w (eps_c - eps_u) (so a pipeline's guidance_scale is w + 1); a student
         may embed it (LCM's w-condition) or ignore it.

Symbols
  T            number of discrete timesteps (1000); t = -1 is "clean", with alpha_bar = 1
  alpha_bar    cumulative product of (1 - beta_t)           alpha = sqrt(alpha_bar)
  sigma        sqrt(1 - alpha_bar)                          SNR = alpha^2 / sigma^2
  x0_hat       predicted clean sample; eps_hat predicted noise; v = alpha eps - sigma x0
  tau_k        k-th point of the student's N-step grid, tau_0 = 999 > ... > tau_{N-1} > clean
  K            teacher ODE substeps between two student grid points
  c_skip,c_out LCM boundary scalings; f(x, t) = c_skip x + c_out x0_hat
  x_tilde      PD's distillation target; w(lambda) = max(SNR, 1)
  beta_frwd, beta_teacher, beta_student   DDIL priors over the three state sources
  beta_mix     DAgger mixing: probability that the teacher takes a step inside a student rollout
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

T_CLEAN = -1  # time index of clean data: alpha_bar(-1) = 1, for the last step to data
Denoiser = Callable[[Tensor, Tensor, Any, Optional[Tensor]], Tensor]  # (x_t, t, cond, w) -> eps_hat
Policy = Callable[..., Tensor]  # (x, t, s, cond, w, gen) -> x_s: one step of a rollout, t > s


# ----------------------------------------------------------------------------------------------------
# 0. Errors, broadcasting and randomness


class ConfigError(ValueError):
    """A config value is out of range. The message names the field and what is allowed."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a one-line ConfigError naming the field when `ok` is false."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def validate_fields(cfg: Any, rules: dict) -> Any:
    """Check every field of a config dataclass against rules {name: (predicate, allowed-text)}."""
    for f in fields(cfg):
        if f.name in rules:
            ok, allowed = rules[f.name]
            require(ok(getattr(cfg, f.name)), f.name, getattr(cfg, f.name), allowed)
    return cfg


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Broadcast a per-sample (B,) tensor to (B, 1, ..., 1) with `ndim` dims (k-diffusion's helper)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _gen_device(gen: Optional[torch.Generator]) -> torch.device:
    return gen.device if gen is not None else torch.device("cpu")


def randn(shape, gen: Optional[torch.Generator], like: Tensor) -> Tensor:
    """N(0, I) noise drawn on the generator's device, returned on `like`'s device and dtype."""
    z = torch.randn(shape, generator=gen, device=_gen_device(gen), dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype)


def rand(n: int, gen: Optional[torch.Generator], device) -> Tensor:
    """U[0, 1) of shape (n,), drawn on the generator's device."""
    return torch.rand(n, generator=gen, device=_gen_device(gen)).to(device)


def randint(low: int, high: int, n: int, gen: Optional[torch.Generator], device) -> Tensor:
    """Integers uniform in [low, high) of shape (n,), drawn on the generator's device."""
    return torch.randint(low, high, (n,), generator=gen, device=_gen_device(gen)).to(device)


def apply_cond(cond: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """fn applied to a per-sample condition: None, a Tensor (B, ...) or each Tensor of a dict."""
    if cond is None:
        return None
    return {key: fn(v) for key, v in cond.items()} if isinstance(cond, dict) else fn(cond)


def index_cond(cond: Any, idx: Tensor) -> Any:
    """Select samples of a per-sample condition."""
    return apply_cond(cond, lambda v: v[idx.to(v.device)])


def cat_cond(conds: list) -> Any:
    """Concatenate per-sample conditions along the batch."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


# ----------------------------------------------------------------------------------------------------
# 1. Noise schedule (DDPM, discrete VP, T = 1000)


@dataclass
class ScheduleConfig:
    kind: str = "scaled_linear"  # 'scaled_linear' (Stable Diffusion), 'linear' (DDPM) or 'cosine' (iDDPM)
    T: int = 1000  # number of discrete training timesteps
    beta_start: float = 0.00085  # beta at t = 0 (linear kinds)
    beta_end: float = 0.012  # beta at t = T - 1 (linear kinds)
    zero_terminal_snr: bool = False  # rescale so alpha_bar_{T-1} = 0 (Lin et al. 2024, Alg. 1); then floored at 2^-24

    def validate(self) -> "ScheduleConfig":
        return validate_fields(self, {
            "kind": (lambda v: v in ("scaled_linear", "linear", "cosine"), "'scaled_linear', 'linear' or 'cosine'"),
            "T": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
            "beta_start": (lambda v: 0 < v < 1, "in (0, 1)"),
            "beta_end": (lambda v: self.beta_start <= v < 1, "in [beta_start, 1)"),
            "zero_terminal_snr": (lambda v: isinstance(v, bool), "True or False"),
        })


def betas_for_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 Eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) pi/2)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)


ZERO_SNR_FLOOR = 2.0**-24  # alpha_bar_{T-1} of a zero-terminal-SNR schedule, as diffusers' Euler and DPM-Solver set it


def rescale_zero_terminal_snr(alpha_bar: Tensor) -> Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1: shift and
    scale sqrt(alpha_bar) so it keeps its value at t = 0 and reaches 0 at t = T - 1 (diffusers'
    rescale_zero_terminal_snr, written on alpha_bar, which is what the betas it returns multiply back to)."""
    root = alpha_bar.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return root**2


def make_alpha_bar(cfg: ScheduleConfig = ScheduleConfig()) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), DDPM Eq. 4. Returns (T,) float64.
    With zero_terminal_snr the last value is ZERO_SNR_FLOOR rather than 0, so that x0 = (x - sigma eps) / alpha
    stays finite at t = T - 1 (diffusers' DDPM and DDIM schedulers keep 0 there and need v-prediction). Even so,
    an eps-predicting network's x0_hat there is its eps error times 1 / alpha = 4096: such a schedule wants
    v-prediction students (Lin et al. 2024, Sec. 3.2), as the toy MLP is inside; the exact teacher is exact."""
    cfg.validate()
    if cfg.kind == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion's schedule
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.T, dtype=torch.float64) ** 2
    elif cfg.kind == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.T, dtype=torch.float64)
    else:
        betas = betas_for_cosine(cfg.T)
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    if cfg.zero_terminal_snr:
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
        alpha_bar[-1] = ZERO_SNR_FLOOR
    return alpha_bar


def alpha_bar_at(alpha_bar: Tensor, t: Tensor) -> Tensor:
    """alpha_bar_t for per-sample t (B,), with alpha_bar(T_CLEAN = -1) = 1."""
    ab = alpha_bar.to(t.device)[t.clamp(min=0)]
    return torch.where(t >= 0, ab, torch.ones_like(ab))


def alpha_sigma_table(alpha_bar: Tensor, device, dtype) -> Tensor:
    """(2, T + 1) table of alpha_t (row 0) and sigma_t (row 1) in float64 then cast, column t + 1 (column 0: clean),
    made once per schedule, device and dtype and kept on the schedule tensor itself (it goes with it): every network
    call needs it, and rebuilding it cost more than the toy's networks."""
    per = alpha_bar.__dict__.setdefault("_ddil_tables", {})
    key = (device, dtype)
    table = per.get(key)
    if table is None:
        ab = torch.cat([alpha_bar.new_ones(1), alpha_bar]).double()
        table = per[key] = torch.stack([ab.sqrt(), (1 - ab).sqrt()]).to(device=device, dtype=dtype)
    return table


def alpha_sigma(alpha_bar: Tensor, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), broadcast to x (t = -1: clean, (1, 0)).
    t may have any shape: the results have t's shape followed by x.ndim - 1 ones (one gather for both)."""
    table = alpha_sigma_table(alpha_bar, x.device, x.dtype)
    i = (t if t.device == x.device else t.to(x.device)) + 1
    a_s = table.index_select(1, i.flatten()).view((2,) + tuple(t.shape) + (1,) * (x.ndim - 1))
    return a_s[0], a_s[1]


def snr(alpha_bar: Tensor, t: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (Kingma et al. 2021), shape (B,)."""
    ab = alpha_bar_at(alpha_bar, t)
    return ab / (1 - ab)


# ----------------------------------------------------------------------------------------------------
# 2. Parameterisations and the forward process


def eps_to_x0(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0_hat = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps_hat = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def v_to_x0(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = alpha x_t - sigma v (Salimans & Ho 2022, Appendix D)."""
    return alpha * x_t - sigma * v


def v_to_eps(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = sigma x_t + alpha v."""
    return sigma * x_t + alpha * v


def to_v(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x0 (the velocity target of Salimans & Ho 2022)."""
    return alpha * eps - sigma * x0


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward diffusion x_t = alpha_t x0 + sigma_t eps, a draw from q(x_t | x_0) (DDPM Eq. 4)."""
    alpha, sigma = alpha_sigma(alpha_bar, t, x0)
    return alpha * x0 + sigma * noise


# ----------------------------------------------------------------------------------------------------
# 3. Reflected x0_hat: keep every prediction inside the data domain (RDM; Imagen thresholding)


@dataclass
class ReflectConfig:
    mode: str = "none"  # 'none', 'clip' (to +-range), 'dynamic' (Imagen percentile) or 'reflect' (mirror fold)
    range: float = 1.0  # the data domain is [-range, range]; dynamic thresholds in units of it (1 = Imagen)
    ratio: float = 0.995  # dynamic: percentile of |x0_hat| / range per sample, in (0, 1]
    max_value: float = 1.0  # dynamic: the threshold s (in units of range) is clamped to [1, max_value]

    def validate(self) -> "ReflectConfig":
        return validate_fields(self, {
            "mode": (lambda v: v in ("none", "clip", "dynamic", "reflect"), "'none', 'clip', 'dynamic' or 'reflect'"),
            "range": (lambda v: v > 0, "> 0"),
            "ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "max_value": (lambda v: v >= 1, ">= 1"),
        })


def clip_x0(x0: Tensor, r: float) -> Tensor:
    """Static thresholding: clamp x0_hat to [-r, r] (diffusers' clip_sample)."""
    return x0.clamp(-r, r)


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float, r: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3) in units of the domain half-width r:
    s = clamp(quantile(|x0| / r, ratio), 1, max), then clamp to [-s r, s r] and divide by s, per sample.
    r = 1 is Imagen's rule and diffusers' `_threshold_sample`; r > 1 serves data that legitimately exceed 1
    (SD latents, the toy), which the r = 1 rule would shrink."""
    flat = x0.reshape(x0.shape[0], -1).abs()  # (B, D)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs float32/64
    s = torch.quantile(flat / r, ratio, dim=1).clamp(min=1.0, max=max_value)  # (B,)
    s = append_dims(s, x0.ndim).to(x0)
    return x0.clamp(-s * r, s * r) / s


def reflect_fold(x0: Tensor, r: float) -> Tensor:
    """Mirror reflection into [-r, r], the boundary condition of reflected diffusion (Lou & Ermon 2023):
    fold the real line with period 4r; the identity inside the domain."""
    y = torch.remainder(x0 + r, 4 * r)  # [0, 4r)
    return torch.where(y > 2 * r, 4 * r - y, y) - r


def reflect_x0(x0: Tensor, cfg: Optional[ReflectConfig]) -> Tensor:
    """Apply the configured map of x0_hat into the data domain (none when cfg is None)."""
    if cfg is None or cfg.mode == "none":
        return x0
    if cfg.mode == "clip":
        return clip_x0(x0, cfg.range)
    if cfg.mode == "dynamic":
        return dynamic_threshold(x0, cfg.ratio, cfg.max_value, cfg.range)
    return reflect_fold(x0, cfg.range)


# ----------------------------------------------------------------------------------------------------
# 4. Samplers and policies. Every step goes through `predict`, so reflection is applied in all of them.


def predict(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Any, w: Optional[Tensor],
            alpha_bar: Tensor, reflect: Optional[ReflectConfig] = None) -> tuple[Tensor, Tensor]:
    """One network evaluation: (x0_hat mapped into the domain, eps_hat). The eps is the model's own,
    as in diffusers' DDIM/LCM steps with thresholding."""
    eps = denoiser(x_t, t, cond, w)
    alpha, sigma = alpha_sigma(alpha_bar, t, x_t)
    return reflect_x0(eps_to_x0(x_t, eps, alpha, sigma), reflect), eps


def ddim_step(x0_hat: Tensor, eps_hat: Tensor, s: Tensor, alpha_bar: Tensor) -> Tensor:
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12): x_s = alpha_s x0_hat + sigma_s eps_hat."""
    alpha_s, sigma_s = alpha_sigma(alpha_bar, s, x0_hat)
    return alpha_s * x0_hat + sigma_s * eps_hat


def substep_times(t: Tensor, s: Tensor, K: int, n: Optional[Tensor] = None) -> Tensor:
    """K + 1 integer times from t down to s per sample, shape (K + 1, B): n_b (B,) even substeps (default K), then
    staying at s. A solve to clean (s = -1) spends n_b - 1 even substeps to t = 0 and the last from 0 to clean, so the
    jump to alpha = 1 starts at the schedule's smallest noise level (a coarse last step there shrinks the data's
    thin directions: in D = 32 an off-plane std of 0.1 came out as ~0.084 from t = 4)."""
    n = torch.full_like(t, K) if n is None else n
    to_clean = (s < 0) & (n >= 2)
    end, m = torch.where(to_clean, 0, s).double(), torch.where(to_clean, n - 1, n).double()  # the even part
    i = torch.arange(K + 1, device=t.device, dtype=torch.float64)[:, None]  # (K+1, 1)
    times = torch.round(t[None].double() + (end - t.double())[None] * (i / m[None]).clamp(max=1)).long()  # (K+1, B)
    return torch.where(i >= n[None].double(), s[None], times)  # (K+1, B)


@torch.no_grad()
def teacher_solve(teacher: Denoiser, x: Tensor, t: Tensor, s: Tensor, cond: Any, w: Optional[Tensor],
                  alpha_bar: Tensor, reflect: Optional[ReflectConfig], K: int, n: Optional[Tensor] = None) -> Tensor:
    """The teacher's probability-flow ODE from t to s by reflected DDIM substeps: K, or n_b <= K per sample.
    Only samples that move are evaluated: a substep that rounds to the same integer time costs no NFE. Each substep
    is `predict` then `ddim_step`, with every substep's (alpha, sigma) gathered once up front."""
    times, x = substep_times(t, s, K, n), x.clone()
    alpha, sigma = alpha_sigma(alpha_bar, times, x)  # (K + 1, B, 1, ...) each
    move = times[1:] != times[:-1]  # (K, B)
    moving = move.sum(1).tolist()  # one host sync for the whole solve
    for i in range(K):
        if moving[i] == len(x):
            eps = teacher(x, times[i], cond, w)
            x0 = reflect_x0(eps_to_x0(x, eps, alpha[i], sigma[i]), reflect)
            x = alpha[i + 1] * x0 + sigma[i + 1] * eps
        elif moving[i]:
            j = move[i].nonzero().squeeze(1)
            eps = teacher(x[j], times[i, j], index_cond(cond, j), None if w is None else w[j])
            x0 = reflect_x0(eps_to_x0(x[j], eps, alpha[i, j], sigma[i, j]), reflect)
            x[j] = alpha[i + 1, j] * x0 + sigma[i + 1, j] * eps
    return x


def teacher_policy(teacher: Denoiser, alpha_bar: Tensor, reflect: Optional[ReflectConfig], K: int,
                   grid: Optional[list[int]] = None) -> Policy:
    """Teacher step between two student grid points: K reflected DDIM substeps. Given the student grid, a step to a
    time inside a student interval (a rollout's branch, Sec. 6) takes proportionally fewer: the same substep length."""
    def step(x, t, s, cond, w, gen):
        n = None
        if grid is not None:
            span = (t - next_time(grid, interval_index(grid, t))).double()  # length of the interval that starts at t
            n = torch.ceil(K * (t - s).double() / span).long().clamp(1, K)
        return teacher_solve(teacher, x, t, s, cond, w, alpha_bar, reflect, K, n)
    return step


def ddim_policy(student: Denoiser, alpha_bar: Tensor, reflect: Optional[ReflectConfig]) -> Policy:
    """A PD student's step: one reflected DDIM step from t to s (1 NFE)."""
    def step(x, t, s, cond, w, gen):
        x0, eps = predict(student, x, t, cond, w, alpha_bar, reflect)
        return ddim_step(x0, eps, s, alpha_bar)
    return step


def renoise_step(x0_hat: Tensor, s: Tensor, gen: Optional[torch.Generator], alpha_bar: Tensor) -> Tensor:
    """Multistep consistency sampling (LCM Algorithm 1; DMD2 backward simulation): re-noise x0_hat to s
    with fresh noise. At s = clean this returns x0_hat."""
    return q_sample(x0_hat, s, randn(x0_hat.shape, gen, x0_hat), alpha_bar)


# ----------------------------------------------------------------------------------------------------
# 5. Timestep grids. A grid is a descending list of N ints; the step after the last goes to clean.


def lcm_origin_timesteps(original_steps: int = 50, T: int = 1000) -> list[int]:
    """LCM's skipping-step base grid [T/n - 1, 2T/n - 1, ..., T - 1] (n = original_steps)."""
    c = T // original_steps
    return [i * c - 1 for i in range(1, original_steps + 1)]


def lcm_grid(N: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """The N-step LCM schedule, chosen from the base grid exactly as diffusers' LCMScheduler.set_timesteps:
    indices floor(linspace(0, n, N, endpoint=False)) into the descending base grid. N=4: [999, 759, 499, 259]."""
    require(1 <= N <= original_steps, "steps", N, f"in [1, original_steps={original_steps}]")
    origin = lcm_origin_timesteps(original_steps, T)[::-1]
    step = original_steps / N  # float, as numpy.linspace computes it
    return [origin[int(math.floor(i * step))] for i in range(N)]


def uniform_grid(N: int, T: int = 1000) -> list[int]:
    """tau_i = T - 1 - floor(i T / N): DMD2's [999, 749, 499, 249] at N = 4. Nested, so the N grid is
    every other point of the 2N grid (what progressive distillation halves)."""
    require(1 <= N <= T, "steps", N, f"in [1, T={T}]")
    return [T - 1 - (i * T) // N for i in range(N)]


def pd_rounds(N_start: int, N_final: int) -> list[int]:
    """Progressive distillation's halving schedule (Salimans & Ho 2022, Alg. 2): N_start, N_start/2, ..., N_final."""
    require(N_final >= 1, "N_final", N_final, ">= 1")
    require(N_start >= N_final and (N_start // N_final) & (N_start // N_final - 1) == 0 and N_start % N_final == 0,
            "N_start", N_start, f"N_final={N_final} times a power of two")
    rounds, N = [], N_start
    while N >= N_final:
        rounds.append(N)
        N //= 2
    return rounds


def next_time(grid: list[int], k: Tensor) -> Tensor:
    """tau_{k+1} for per-sample step indices k (B,), with clean after the last grid point."""
    table = torch.tensor(list(grid) + [T_CLEAN], device=k.device)
    return table[k + 1]


def grid_time(grid: list[int], k: Tensor) -> Tensor:
    """tau_k for per-sample step indices k (B,)."""
    return torch.tensor(grid, device=k.device)[k]


def interval_index(grid: list[int], t: Tensor) -> Tensor:
    """k with tau_{k+1} < t <= tau_k (tau_N = clean) for per-sample t (B,): the student step whose interval holds t."""
    table = torch.tensor(grid, device=t.device)
    return (table[None, :] >= t[:, None]).sum(1) - 1  # (B,)


@torch.no_grad()
def sample(policy: Policy, x_T: Tensor, grid: list[int], cond: Any = None, w: Optional[Tensor] = None,
           gen: Optional[torch.Generator] = None) -> tuple[Tensor, list[Tensor]]:
    """Run a policy along tau_0 > ... > tau_{N-1} > clean. Returns (x_0, [x_{tau_0}, ..., x_{tau_{N-1}}]),
    the states the policy visits at inference: where covariate shift is measured."""
    B, x, states = x_T.shape[0], x_T, []
    for t, s in zip(grid, list(grid[1:]) + [T_CLEAN]):
        states.append(x)
        t_, s_ = torch.full((B,), t, device=x.device), torch.full((B,), s, device=x.device)
        x = policy(x, t_, s_, cond, w, gen)
    return x, states


# ----------------------------------------------------------------------------------------------------
# 6. DDIL states: forward, teacher-backward and student-backward, and the aggregation buffer

SOURCE_FRWD, SOURCE_TEACHER, SOURCE_STUDENT = 0, 1, 2  # ids of the three state sources
SOURCE_NAMES = ("forward", "teacher", "student")


@dataclass
class DDILConfig:
    beta_frwd: float = 1.0  # prior on forward-diffusion states q(x_tau | x_0) (1, 0, 0 = the base method)
    beta_teacher: float = 0.0  # prior on teacher backward-rollout states
    beta_student: float = 0.0  # prior on student backward-rollout states (DAgger, with beta_mix)
    beta_mix_start: float = 1.0  # DAgger mixing at step 0: P(the teacher takes a step of a student rollout)
    beta_mix_end: float = 0.0  # DAgger mixing after the anneal
    beta_mix_steps: int = 1000  # training steps over which beta_mix anneals linearly (0 = constant end value)
    teacher_substeps: int = 8  # K: teacher DDIM substeps per student interval in rollouts
    buffer_capacity: int = 0  # aggregation buffer size in states (0 = no buffer: every rollout state is fresh)
    buffer_policy: str = "fifo"  # 'fifo' (evict oldest) or 'reservoir' (uniform over all states ever seen)
    refresh_share: float = 0.25  # with a buffer: rollouts made per step, as a share of the batch's rollout states
    refresh_every: int = 1  # with a buffer: steps between refreshes (DAgger iterations); each makes that many steps' share
    states_per_rollout: int = 0  # distinct training times kept from each rollout (0 = N, the student steps)

    @property
    def betas(self) -> tuple[float, float, float]:
        return (self.beta_frwd, self.beta_teacher, self.beta_student)

    def validate(self) -> "DDILConfig":
        validate_priors(self.betas)
        unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
        return validate_fields(self, {
            "beta_mix_start": unit, "beta_mix_end": unit, "refresh_share": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "beta_mix_steps": (lambda v: v >= 0, ">= 0"), "refresh_every": (lambda v: v >= 1, ">= 1"),
            "teacher_substeps": (lambda v: v >= 1, ">= 1"),
            "buffer_capacity": (lambda v: v >= 0, ">= 0"),
            "buffer_policy": (lambda v: v in ("fifo", "reservoir"), "'fifo' or 'reservoir'"),
            "states_per_rollout": (lambda v: v >= 0, ">= 0 (0 = the number of student steps)"),
        })


def validate_priors(betas: tuple[float, float, float]) -> None:
    """The DDIL priors are a distribution: each >= 0 and they sum to 1."""
    for name, b in zip(("beta_frwd", "beta_teacher", "beta_student"), betas):
        require(b >= 0, name, b, ">= 0, with beta_frwd + beta_teacher + beta_student = 1")
    require(abs(sum(betas) - 1) < 1e-6, "beta_frwd + beta_teacher + beta_student", round(sum(betas), 6), "= 1")


def beta_mix_at(step: int, cfg: DDILConfig) -> float:
    """The DAgger mixing coefficient at a training step: linear from beta_mix_start to beta_mix_end."""
    frac = 1.0 if cfg.beta_mix_steps == 0 else min(step / cfg.beta_mix_steps, 1.0)
    return cfg.beta_mix_start + frac * (cfg.beta_mix_end - cfg.beta_mix_start)


def draw_sources(B: int, betas: tuple[float, float, float], gen: Optional[torch.Generator]) -> Tensor:
    """Source id of each of B states, i.i.d. from the priors (beta_frwd, beta_teacher, beta_student)."""
    validate_priors(betas)
    probs = torch.tensor(betas, dtype=torch.float64, device=_gen_device(gen))
    return torch.multinomial(probs, B, replacement=True, generator=gen)


@dataclass
class States:
    x: Tensor  # (B, *) the states x_tau
    t: Tensor  # (B,) long, the timestep tau of each state (on the base method's training grid)
    k: Tensor  # (B,) long, the student interval it lies in: tau_{k+1} < t <= tau_k (see interval_index)
    source: Tensor  # (B,) long, SOURCE_FRWD / SOURCE_TEACHER / SOURCE_STUDENT
    cond: Any = None  # per-sample condition (None, Tensor (B, ...) or dict of them)
    w: Optional[Tensor] = None  # (B,) guidance scale the state was made with, or None
    made: Optional[Tensor] = None  # (B,) long, the training step that made the state (its age = step - made)

    def __len__(self) -> int:
        return self.x.shape[0]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "States":
        """fn applied to every tensor (x, t, k, source, cond, w, made)."""
        return States(*(apply_cond(getattr(self, f.name), fn) for f in fields(self)))

    def index(self, idx: Tensor) -> "States":
        return self.apply(lambda v: v[idx.to(v.device)])


def cat_states(parts: list[States]) -> States:
    """Concatenate batches of states."""
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return States(x=cat("x"), t=cat("t"), k=cat("k"), source=cat("source"), cond=cat_cond([p.cond for p in parts]),
                  w=cat("w"), made=cat("made"))


def mean_age(s: States, step: int) -> Tensor:
    """Mean age in training steps of the rollout (teacher and student) states of a batch, a 0-dim tensor (nan if the
    batch has none; no host sync). DAgger corrects the student it rolled out with: stale states correct a student
    that no longer exists."""
    rolled = (s.source != SOURCE_FRWD).double()
    made = s.made if s.made is not None else torch.full_like(s.t, step)
    return ((step - made).double() * rolled).sum() / rolled.sum()  # 0 / 0 = nan without rollout states


def lcm_base_grid(original_steps: int = 50, T: int = 1000) -> list[int]:
    """LCM's training times, descending: the skipping-step grid that diffusers' DDIMSolver samples t from
    uniformly (LCM Algorithm 1). PD and DMD2 train on their student grid itself."""
    return lcm_origin_timesteps(original_steps, T)[::-1]


def validate_base_grid(base_grid: list[int], grid: list[int]) -> None:
    """The base training grid holds every student grid point and nothing above tau_0."""
    require(set(grid) <= set(base_grid), "base_grid", "...", f"a grid containing the student grid {grid}")
    require(max(base_grid) == grid[0] and min(base_grid) >= 0, "base_grid", (max(base_grid), min(base_grid)),
            f"times in [0, tau_0={grid[0]}] with tau_0 in it")


def forward_states(x0: Tensor, t: Tensor, k: Tensor, cond: Any, w: Optional[Tensor], alpha_bar: Tensor,
                   gen: Optional[torch.Generator]) -> States:
    """Source (a): forward diffusion of data, x_tau ~ q(x_tau | x_0). Keeps the data marginal and diversity."""
    x = q_sample(x0, t, randn(x0.shape, gen, x0), alpha_bar)
    return States(x, t, k, torch.full_like(t, SOURCE_FRWD), cond, w)


class ReplayBuffer:
    """The aggregation buffer: DAgger's dataset D <- D u D_i, bounded at `capacity` states. 'fifo' evicts
    the oldest; 'reservoir' keeps a uniform sample of every state ever added (Vitter 1985, Algorithm R)."""

    def __init__(self, capacity: int, policy: str = "fifo", device="cpu", seed: int = 0):
        require(capacity >= 1, "buffer_capacity", capacity, ">= 1")
        require(policy in ("fifo", "reservoir"), "buffer_policy", policy, "'fifo' or 'reservoir'")
        self.capacity, self.policy, self.device = capacity, policy, torch.device(device)
        self.store: Optional[States] = None  # tensors of length capacity, allocated on the first add
        self.size, self.seen = 0, 0  # filled slots; states ever added
        self.gen = torch.Generator().manual_seed(seed)  # reservoir replacement draws

    def __len__(self) -> int:
        return self.size

    def count(self, source: int) -> int:
        """How many stored states came from `source`."""
        return 0 if self.store is None else int((self.store.source[: self.size] == source).sum())

    def _allocate(self, s: States) -> None:
        empty = lambda v: torch.zeros((self.capacity,) + tuple(v.shape[1:]), dtype=v.dtype, device=self.device)  # noqa: E731
        cond = None if s.cond is None else ({k: empty(v) for k, v in s.cond.items()} if isinstance(s.cond, dict) else empty(s.cond))
        self.store = States(empty(s.x), empty(s.t), empty(s.k), empty(s.source), cond, None if s.w is None else empty(s.w),
                            None if s.made is None else empty(s.made))

    def _slots(self, n: int) -> tuple[Tensor, Tensor]:
        """Slots for n incoming states, and which of the n are kept."""
        if self.policy == "fifo":  # of a batch larger than the buffer only the newest `capacity` are kept
            return torch.arange(self.seen, self.seen + n) % self.capacity, torch.arange(n) >= n - self.capacity
        i = torch.arange(self.seen, self.seen + n)  # Algorithm R: the i-th state replaces slot j ~ U[0, i]
        j = (torch.rand(n, generator=self.gen, dtype=torch.float64) * (i + 1)).long()
        slots = torch.where(i < self.capacity, i, j)
        last = {slot: pos for pos, slot in enumerate(slots.tolist()) if slot < self.capacity}  # sequential: last write wins
        keep = torch.zeros(n, dtype=torch.bool)
        keep[list(last.values())] = True
        return slots, keep

    def add(self, s: States) -> None:
        """Insert a batch of states (moved to the buffer's device)."""
        if self.store is None:
            self._allocate(s)
        slots, keep = self._slots(len(s))
        src = s.index(keep.nonzero().squeeze(1).to(s.x.device))
        slots = slots[keep].to(self.device)
        for name in ("x", "t", "k", "source", "w", "made"):
            if getattr(self.store, name) is not None:
                getattr(self.store, name)[slots] = getattr(src, name).to(self.device)
        if isinstance(self.store.cond, dict):
            for key in self.store.cond:
                self.store.cond[key][slots] = src.cond[key].to(self.device)
        elif self.store.cond is not None:
            self.store.cond[slots] = src.cond.to(self.device)
        self.seen += len(s)
        self.size = min(self.seen, self.capacity)

    def sample(self, n: int, gen: Optional[torch.Generator], source: Optional[int] = None, device=None) -> States:
        """n states uniformly with replacement, optionally only from one source."""
        pool = torch.arange(self.size, device=self.device)
        if source is not None:
            pool = pool[self.store.source[: self.size] == source]
        require(len(pool) > 0, "buffer source", source, "a source with stored states")
        pick = pool[randint(0, len(pool), n, gen, self.device)]
        out = self.store.index(pick)
        return out if device is None else out.apply(lambda v: v.to(device))

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "policy": self.policy, "size": self.size, "seen": self.seen,
                "gen": self.gen.get_state(), "store": None if self.store is None else vars(self.store).copy()}

    def load_state_dict(self, d: dict) -> None:
        self.capacity, self.policy, self.size, self.seen = d["capacity"], d["policy"], d["size"], d["seen"]
        self.gen.set_state(d["gen"])
        # copies, so a loaded buffer never shares storage with its source
        self.store = None if d["store"] is None else States(**d["store"]).apply(lambda v: v.to(self.device).clone())


def fresh_counts(n_teacher: int, n_student: int, B: int, cfg: DDILConfig, step: int,
                 buffer: Optional[ReplayBuffer], refresh: bool = True, m: int = 1,
                 gen: Optional[torch.Generator] = None) -> tuple[int, int]:
    """How many teacher and student rollout states to make this step. Without a buffer: the batch's own counts.
    With one, in whole rollouts of m states (every state of a paid rollout is kept): every refresh_every steps,
    q = refresh_share refresh_every B beta states per source on average (q / m rollouts, the fraction rounded up
    with its own probability), and at any step whatever the buffer lacks to serve this batch. So the rollout cost
    per step is refresh_share of the buffer-free cost on average. refresh=False (a step's later batches) makes only
    what the buffer lacks."""
    if buffer is None:
        return n_teacher, n_student
    due = refresh and step % cfg.refresh_every == 0
    out = []
    for source, n, beta in ((SOURCE_TEACHER, n_teacher, cfg.beta_teacher), (SOURCE_STUDENT, n_student, cfg.beta_student)):
        rollouts = cfg.refresh_share * cfg.refresh_every * B * beta / m if due else 0.0
        whole = math.floor(rollouts + 1e-9)
        if rollouts - whole > 1e-9:  # stochastic rounding, E = q / m: a small quota is a rollout every few steps
            whole += int(rand(1, gen, "cpu").item() < rollouts - whole)
        out.append(max(whole * m, -(-(n - buffer.count(source)) // m) * m))
    return out[0], out[1]


def _targets(R: int, m: int, base_grid: list[int], grid: list[int], gen: Optional[torch.Generator], device) -> tuple[Tensor, Tensor]:
    """m distinct base-grid times per rollout, uniform without replacement (so each is uniform on the grid):
    times (R, m) and their student intervals k (R, m)."""
    order = torch.rand(R, len(base_grid), generator=gen, device=_gen_device(gen)).argsort(dim=1)[:, :m]  # (R, m)
    t = torch.tensor(base_grid)[order.cpu()].to(device)
    return t, interval_index(grid, t.flatten()).reshape(R, m)


def _policy_calls(x: Tensor, rows: Tensor, s: Tensor, by_teacher: Tensor, i: int, grid: list[int], steps: tuple,
                  cond: Any, w: Optional[Tensor], gen: Optional[torch.Generator]) -> Tensor:
    """One batched call per policy: rollout rows[j] steps from tau_i to s[j], by the teacher where by_teacher[rows[j]]."""
    acting = by_teacher[rows]
    n_teacher = int(acting.sum())
    if n_teacher in (0, len(rows)):  # one policy acts on every row (a teacher rollout; a student one at beta_mix 0)
        return steps[0 if n_teacher else 1](x[rows], torch.full_like(rows, grid[i]), s, index_cond(cond, rows),
                                            None if w is None else w[rows], gen)
    out = torch.empty((len(rows),) + x.shape[1:], dtype=x.dtype, device=x.device)
    for use_teacher, policy in zip((True, False), steps):
        j = (acting == use_teacher).nonzero().squeeze(1)
        if len(j):
            r = rows[j]
            out[j] = policy(x[r], torch.full_like(r, grid[i]), s[j], index_cond(cond, r), None if w is None else w[r], gen)
    return out


@torch.no_grad()
def rollout(teacher_step: Policy, student_step: Policy, x_T: Tensor, grid: list[int], t_out: Tensor, k_out: Tensor,
            beta_mix: Tensor, cond: Any, w: Optional[Tensor], gen: Optional[torch.Generator]) -> Tensor:
    """DAgger-mixed backward rollouts (Ross et al. 2011, Alg. 3.1) from x_T along tau_0 > tau_1 > ..., one per row,
    returning the states at the times t_out (R, m), in student intervals k_out (R, m): x (R, m, *).
    At each student step the teacher acts with probability beta_mix (R,) (1 = a teacher rollout), else the student.
    Every visited state tau_k that is asked for is kept (DAgger aggregates all visited states). A time t inside
    (tau_{k+1}, tau_k) is reached the way the policy acting at tau_k would reach it: that policy's own step from
    tau_k to t. For an LCM student this is its consistency output f(x, tau_k) re-noised to t (multistep sampling
    with t as the next point); for the teacher it is its ODE from tau_k to t."""
    R, m = t_out.shape
    out = torch.empty((R, m) + x_T.shape[1:], dtype=x_T.dtype, device=x_T.device)
    x, steps = x_T.clone(), (teacher_step, student_step)
    by_teacher = rand(R * len(grid), gen, x_T.device).reshape(R, len(grid)) < beta_mix[:, None]  # (R, N)
    deepest = k_out.max(dim=1).values  # (R,)
    for i, tau in enumerate(grid):
        hit = (k_out == i) & (t_out == tau)  # visited states asked for
        out[hit] = x[hit.nonzero()[:, 0]]
        branch = ((k_out == i) & (t_out != tau)).nonzero()  # (n_b, 2) rows, cols
        advance = (deepest > i).nonzero().squeeze(1) if i + 1 < len(grid) else deepest[:0]
        rows = torch.cat([branch[:, 0], advance])
        s = torch.cat([t_out[branch[:, 0], branch[:, 1]], torch.full_like(advance, grid[min(i + 1, len(grid) - 1)])])
        if len(rows):
            y = _policy_calls(x, rows, s, by_teacher[:, i], i, grid, steps, cond, w, gen)
            out[branch[:, 0], branch[:, 1]] = y[: len(branch)]
            x[advance] = y[len(branch):]
    return out


def rollout_states(n_teacher: int, n_student: int, draw_data: Callable, draw_w: Callable, grid: list[int],
                   base_grid: list[int], teacher_step: Policy, student_step: Policy, beta_mix: float, step: int,
                   gen: Optional[torch.Generator], per_rollout: int = 0, keep_all: bool = False) -> States:
    """Sources (b) and (c): n_teacher teacher and n_student DAgger-mixed student states (no grad), each at a time
    uniform on the base method's training grid, as its forward states are. Each rollout from x_T ~ N(0, I) keeps
    m = per_rollout (0: N) distinct times, so a rollout of N - 1 steps pays for up to m stored states. keep_all
    (for a buffer) returns all m states of the ceil(n / m) rollouts per source, not just n: none is paid for and
    thrown away."""
    m = min(per_rollout or len(grid), len(base_grid))
    R_t, R_s = -(-n_teacher // m), -(-n_student // m)  # ceil
    x0, cond = draw_data(R_t + R_s, gen)  # x0 only gives the shape and device; cond is used
    w = draw_w(R_t + R_s, gen)
    t, k = _targets(R_t + R_s, m, base_grid, grid, gen, x0.device)
    mix = torch.cat([torch.ones(R_t), torch.full((R_s,), float(beta_mix))]).to(x0.device)  # (R,) P(teacher step)
    x = rollout(teacher_step, student_step, randn(x0.shape, gen, x0), grid, t, k, mix, cond, w, gen)
    row = torch.arange(R_t + R_s, device=x0.device)[:, None].expand(-1, m)  # (R, m) the rollout of each state
    n_t, n_s = (R_t * m, R_s * m) if keep_all else (n_teacher, n_student)
    keep = torch.cat([_pick(R_t * m, n_t, gen), R_t * m + _pick(R_s * m, n_s, gen)]).to(x0.device)
    rows = row.flatten()[keep]
    source = torch.where(rows < R_t, SOURCE_TEACHER, SOURCE_STUDENT)
    return States(x.flatten(0, 1)[keep], t.flatten()[keep], k.flatten()[keep], source, index_cond(cond, rows),
                  None if w is None else w[rows], torch.full_like(rows, step))


def _pick(pool: int, n: int, gen: Optional[torch.Generator]) -> Tensor:
    """n of range(pool) uniformly without replacement, in random order."""
    return torch.randperm(pool, generator=gen, device=_gen_device(gen))[:n].cpu()


def ddil_states(B: int, draw_data: Callable, draw_w: Callable, base_grid: list[int], grid: list[int],
                teacher_step: Policy, student_step: Policy, alpha_bar: Tensor, cfg: DDILConfig, step: int,
                buffer: Optional[ReplayBuffer], gen: Optional[torch.Generator], refresh: bool = True) -> States:
    """DDIL's training-state distribution (arXiv:2410.11971, Sec. 3): B states from the beta-mixture of
    (a) forward diffusion, (b) teacher and (c) DAgger-mixed student backward rollouts. Every source follows the
    base method's own time marginal, t uniform on base_grid (LCM: the 50-point skipping grid, lcm_base_grid;
    PD, DMD2: the student grid), so DDIL changes only where states come from, never when. With a buffer,
    rollouts go into it (see fresh_counts; refresh=False for a step's later batches) and each source's share of the
    batch is drawn from it.
      draw_data(n, gen) -> (x0 (n, *), cond)   draw_w(n, gen) -> (n,) | None"""
    validate_base_grid(base_grid, grid)
    src = draw_sources(B, cfg.betas, gen)
    n_frwd, n_teacher, n_student = (int((src == s).sum()) for s in (SOURCE_FRWD, SOURCE_TEACHER, SOURCE_STUDENT))
    parts = []
    if n_frwd:
        x0, cond = draw_data(n_frwd, gen)
        t = torch.tensor(base_grid)[randint(0, len(base_grid), n_frwd, gen, "cpu")].to(x0.device)
        s = forward_states(x0, t, interval_index(grid, t), cond, draw_w(n_frwd, gen), alpha_bar, gen)
        parts.append(dataclasses.replace(s, made=torch.full_like(t, step)))
    m = min(cfg.states_per_rollout or len(grid), len(base_grid))  # states per rollout: refreshes come in these
    m_teacher, m_student = fresh_counts(n_teacher, n_student, B, cfg, step, buffer, refresh, m, gen)
    if buffer is not None:  # else FIFO would evict this very batch's first source before it is sampled
        require(buffer.capacity >= m_teacher + m_student, "buffer_capacity", buffer.capacity,
                f">= the rollout states one refresh makes ({m_teacher + m_student}: refresh_share x refresh_every x B, "
                f"or one batch, per source, in whole rollouts of {m})")
    fresh = None
    if m_teacher + m_student:
        fresh = rollout_states(m_teacher, m_student, draw_data, draw_w, grid, base_grid, teacher_step, student_step,
                               beta_mix_at(step, cfg), step, gen, cfg.states_per_rollout, keep_all=buffer is not None)
    if buffer is None:
        parts += [fresh] if fresh is not None else []
    else:
        if fresh is not None:
            buffer.add(fresh)
        device = parts[0].x.device if parts else (fresh.x.device if fresh is not None else None)
        parts += [buffer.sample(n, gen, s, device) for s, n in ((SOURCE_TEACHER, n_teacher), (SOURCE_STUDENT, n_student)) if n]
    return cat_states(parts)



def step_batches(states: Callable[..., States], step: int) -> Callable[[], States]:
    """next_states() for a step that trains on several batches (DMD2's fake-score updates): every call is a fresh
    batch (new forward noise and data, new buffer draws, rollouts wherever there is no buffer); only the first
    refreshes the buffer, so a step pays one refresh. states(step, refresh) wraps ddil_states."""
    calls = iter(range(1 << 62))
    return lambda: states(step, refresh=next(calls) == 0)


# ----------------------------------------------------------------------------------------------------
# 7a. LCM: latent consistency distillation (Luo et al. 2023, Algorithm 1)


@dataclass
class LCMConfig:
    original_steps: int = 50  # base DDIM grid; the solver skips k = T / original_steps timesteps
    timestep_scaling: float = 10.0  # c_skip / c_out time scaling (diffusers LCMScheduler)
    sigma_data: float = 0.5  # c_skip / c_out data scale
    loss: str = "huber"  # 'l2' or 'huber' (pseudo-Huber, Song & Dhariwal 2023)
    huber_c: float = 0.001  # pseudo-Huber c
    ema_decay: float = 0.95  # decay of the target network f_theta^- (diffusers' default)
    w_min: float = 3.0  # guidance scale range sampled in training (conditional teachers only)
    w_max: float = 15.0  # ... (train w; a pipeline's guidance_scale is w + 1)

    def validate(self) -> "LCMConfig":
        return validate_fields(self, {
            "original_steps": (lambda v: 1 <= v <= 1000, "in [1, T]"),
            "loss": (lambda v: v in ("l2", "huber"), "'l2' or 'huber'"),
            "huber_c": (lambda v: v > 0, "> 0"), "timestep_scaling": (lambda v: v > 0, "> 0"),
            "sigma_data": (lambda v: v > 0, "> 0"),
            "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "w_min": (lambda v: v >= 0, ">= 0"), "w_max": (lambda v: v >= self.w_min, ">= w_min"),
        })


def lcm_scalings(t: Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """Boundary-condition scalings of the consistency function (LCM Eq. 9; diffusers LCMScheduler):
    c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2). c_skip(0) = 1, c_out(0) = 0."""
    st = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_fn(x_t: Tensor, x0_hat: Tensor, t: Tensor, cfg: LCMConfig) -> Tensor:
    """The consistency function f(x, t) = c_skip(t) x + c_out(t) x0_hat (LCM Eq. 9)."""
    c_skip, c_out = lcm_scalings(t, cfg.timestep_scaling, cfg.sigma_data)
    return append_dims(c_skip.to(x_t), x_t.ndim) * x_t + append_dims(c_out.to(x_t), x_t.ndim) * x0_hat


def consistency_policy(student: Denoiser, alpha_bar: Tensor, reflect: Optional[ReflectConfig], cfg: LCMConfig) -> Policy:
    """An LCM student's step (multistep consistency sampling, LCM Algorithm 1, = diffusers LCMScheduler.step):
    x_s = alpha_s f(x_t, t) + sigma_s z, and f itself at the last step."""
    def step(x, t, s, cond, w, gen):
        x0, _ = predict(student, x, t, cond, w, alpha_bar, reflect)
        return renoise_step(consistency_fn(x, x0, t, cfg), s, gen, alpha_bar)
    return step


def guidance_scale_embedding(w: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal embedding of the guidance scale w (LCM's w-condition; as diffusers' pipelines compute it
    from w * 1000). Returns (B, dim)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c per element, averaged per sample (B,)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c).flatten(1).mean(1)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample (B,)."""
    return ((a.float() - b.float()) ** 2).flatten(1).mean(1)


def lcm_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, s: States, alpha_bar: Tensor,
             reflect: Optional[ReflectConfig], cfg: LCMConfig) -> Tensor:
    """Latent consistency distillation loss (LCM Algorithm 1), per sample (B,):
    d(f_theta(x_{t_{n+k}}, t_{n+k}), f_theta^-(x_hat_{t_n}, t_n)), where x_hat_{t_n} is the teacher's
    (guided, reflected) DDIM step from t_{n+k} to t_n = max(t_{n+k} - k, 0). Both sides apply the same reflection
    of x0_hat, the map the student's sampler applies at inference, so the loss trains the function that is deployed
    (with 'clip', a prediction outside the domain gets no gradient: there the deployed output is the boundary)."""
    t = s.t
    t_prev = (t - alpha_bar.shape[0] // cfg.original_steps).clamp(min=0)
    with torch.no_grad():
        x_prev = teacher_solve(teacher, s.x, t, t_prev, s.cond, s.w, alpha_bar, reflect, K=1)
        x0_target, _ = predict(target, x_prev, t_prev, s.cond, s.w, alpha_bar, reflect)
        f_target = consistency_fn(x_prev, x0_target, t_prev, cfg)
    x0, _ = predict(student, s.x, t, s.cond, s.w, alpha_bar, reflect)  # the same map as the target and at inference
    f = consistency_fn(s.x, x0, t, cfg)
    return pseudo_huber(f, f_target, cfg.huber_c) if cfg.loss == "huber" else mse(f, f_target)


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta (the EMA target network of LCM / consistency models)."""
    params = list(target.parameters())
    if params:  # one multi-tensor op over all parameters (as torch's own foreach optimisers)
        torch._foreach_lerp_(params, [p.detach() for p in online.parameters()], 1 - decay)
    buffers = list(target.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(online.buffers()))


# ----------------------------------------------------------------------------------------------------
# 7b. PD: progressive distillation (Salimans & Ho 2022, Algorithm 2)


@dataclass
class PDConfig:
    N_start: int = 8  # student steps in the first round (its teacher takes 2 N_start steps)
    N_final: int = 4  # student steps after the last round; rounds halve N
    teacher_substeps: int = 1  # DDIM substeps per teacher half-step (1 = PD as published; more for an exact first teacher)

    def validate(self) -> "PDConfig":
        pd_rounds(self.N_start, self.N_final)
        return validate_fields(self, {"teacher_substeps": (lambda v: v >= 1, ">= 1")})


def pd_target(x_t: Tensor, x_t2: Tensor, t: Tensor, t2: Tensor, alpha_bar: Tensor) -> Tensor:
    """PD's target x_tilde (Salimans & Ho 2022, Alg. 2): the x0 for which one DDIM step t -> t'' lands on the
    teacher's two-step result x_t2: x_tilde = (x_t'' - (sigma_t''/sigma_t) x_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)."""
    alpha, sigma = alpha_sigma(alpha_bar, t, x_t)
    alpha2, sigma2 = alpha_sigma(alpha_bar, t2, x_t)
    ratio = sigma2 / sigma
    return (x_t2 - ratio * x_t) / (alpha2 - ratio * alpha)


def truncated_snr_weight(alpha_bar: Tensor, t: Tensor) -> Tensor:
    """Truncated SNR weighting w(lambda) = max(SNR_t, 1) (Salimans & Ho 2022, Sec. 4), shape (B,)."""
    return snr(alpha_bar, t).clamp(min=1.0)


@torch.no_grad()
def pd_x_tilde(teacher: Denoiser, s: States, fine_grid: list[int], alpha_bar: Tensor,
               reflect: Optional[ReflectConfig], K: int = 1) -> Tensor:
    """PD's regression target at states s (B, *): the teacher takes two (reflected) DDIM half-steps t -> t' -> t'' on
    the 2N grid `fine_grid` (K substeps each), and pd_target maps the result to x_tilde. It depends on the states and
    the teacher only, not on the student, so the targets of several batches may be made in one call."""
    t_mid, t_end = next_time(fine_grid, 2 * s.k), next_time(fine_grid, 2 * s.k + 1)
    x_mid = teacher_solve(teacher, s.x, s.t, t_mid, s.cond, s.w, alpha_bar, reflect, K)
    x_end = teacher_solve(teacher, x_mid, t_mid, t_end, s.cond, s.w, alpha_bar, reflect, K)
    return pd_target(s.x, x_end, s.t, t_end, alpha_bar)


def pd_loss(student: Denoiser, teacher: Denoiser, s: States, fine_grid: list[int], alpha_bar: Tensor,
            reflect: Optional[ReflectConfig], K: int = 1, x_tilde: Optional[Tensor] = None) -> Tensor:
    """Progressive distillation loss at states on the student grid (B,): max(SNR, 1) ||x_tilde - x0_hat||^2,
    with x_tilde = pd_x_tilde(teacher, s, ...) unless the caller made it already."""
    if x_tilde is None:
        x_tilde = pd_x_tilde(teacher, s, fine_grid, alpha_bar, reflect, K)
    x0, _ = predict(student, s.x, s.t, s.cond, s.w, alpha_bar, reflect)  # reflected as its DDIM step is at inference
    return truncated_snr_weight(alpha_bar, s.t).to(x0) * mse(x0, x_tilde)


# ----------------------------------------------------------------------------------------------------
# 7c. DMD2: distribution matching distillation, improved (Yin et al. 2024)


@dataclass
class DMD2Config:
    t_min: float = 0.02  # distribution-matching timesteps t ~ U[t_min T, t_max T] (DMD2's min/max_step_percent)
    t_max: float = 0.98  # ...
    fake_updates: int = 5  # two time-scale rule: fake-score updates per generator update (DMD2: 5 ImageNet, 10 SD1.5)
    gan_weight: float = 0.0  # weight of the generator's GAN term; 0 disables the GAN head (DMD2 SD1.5: 1e-3)
    disc_weight: float = 1e-2  # weight of the discriminator loss in the fake-score update (DMD2 SD1.5: 1e-2)

    def validate(self) -> "DMD2Config":
        return validate_fields(self, {
            "t_min": (lambda v: 0 <= v < 1, "in [0, 1)"), "t_max": (lambda v: self.t_min < v <= 1, "in (t_min, 1]"),
            "fake_updates": (lambda v: v >= 1, ">= 1"), "gan_weight": (lambda v: v >= 0, ">= 0"),
            "disc_weight": (lambda v: v >= 0, ">= 0"),
        })


def dmd_times(n: int, T: int, cfg: DMD2Config, gen: Optional[torch.Generator], device) -> Tensor:
    """Distribution-matching timesteps t ~ U{t_min T, ..., t_max T} (B,)."""
    return randint(int(cfg.t_min * T), int(cfg.t_max * T), n, gen, device)


def pure_noise_start(s: States, T: int, gen: Optional[torch.Generator]) -> States:
    """States at t = T - 1 become pure noise N(0, I): what DMD2's generator sees there at inference and in training
    (DMD2 code, sd_unified_model.prepare_denoising_data). A forward state there would still carry alpha_{T-1} x0
    (0.068 x0 on SD's schedule); a rollout state there is x_T already, so it changes in value, not in law."""
    start = append_dims(s.t == T - 1, s.x.ndim)
    return replace(s, x=torch.where(start, randn(s.x.shape, gen, s.x), s.x))


def dmd_loss(x0_gen: Tensor, teacher: Denoiser, fake: Denoiser, t: Tensor, noise: Tensor, cond: Any,
             w: Optional[Tensor], alpha_bar: Tensor) -> Tensor:
    """DMD2's distribution-matching generator loss (Yin et al. 2024, Eq. 2-3), per sample (B,):
    0.5 ||x - sg(x - g)||^2, g = (x0_fake - x0_real) / mean|x - x0_real|, both scores at x_t = q(x_t | x).
    Its gradient w.r.t. x is g: the difference of the fake and real scores, normalised."""
    x_t = q_sample(x0_gen, t, noise, alpha_bar)
    with torch.no_grad():
        x0_real, _ = predict(teacher, x_t, t, cond, w, alpha_bar)  # real score, guided when conditional
        x0_fake, _ = predict(fake, x_t, t, cond, None, alpha_bar)
        norm = append_dims((x0_gen - x0_real).abs().flatten(1).mean(1), x0_gen.ndim)
        g = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * mse(x0_gen, (x0_gen - g).detach())


def denoising_loss(denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor, cond: Any, alpha_bar: Tensor) -> Tensor:
    """The DDPM eps-prediction loss ||eps_hat(x_t, t) - eps||^2 (Ho et al. 2020, Eq. 14), per sample (B,).
    DMD2 trains the fake score with it on detached generator samples."""
    return mse(denoiser(q_sample(x0, t, noise, alpha_bar), t, cond, None), noise)


def gan_logits(disc: Callable, x0: Tensor, cond: Any, alpha_bar: Tensor, gen: Optional[torch.Generator]) -> Tensor:
    """DMD2's diffusion-GAN classifier (Sec. 4.2), D(x_t, t, cond) with x_t ~ q(x_t | x0) at its own t ~ U{0..T-1}
    and noise, drawn afresh for every call (DMD2's compute_cls_logits): never the distribution-matching t. (B,)"""
    t = randint(0, alpha_bar.shape[0], x0.shape[0], gen, x0.device)
    return disc(q_sample(x0, t, randn(x0.shape, gen, x0), alpha_bar), t, cond)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(x_fake)) (Goodfellow et al. 2014; DMD2 Eq. 4), (B,)."""
    return F.softplus(-logits_fake)


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss softplus(-D(x_real)) + softplus(D(x_fake)) (DMD2 Eq. 4), (B,)."""
    return F.softplus(-logits_real) + F.softplus(logits_fake)


def dmd2_generator_loss(generator: Denoiser, teacher: Denoiser, fake: Denoiser, s: States, alpha_bar: Tensor,
                        cfg: DMD2Config, gen: Optional[torch.Generator], disc: Optional[Callable]) -> Tensor:
    """DMD2's generator loss at states s (B,): distribution matching (Eq. 2-3) at t ~ U[t_min T, t_max T], plus
    gan_weight times the non-saturating GAN term (Eq. 4) at an independent diffusion-GAN t and noise."""
    x0_gen, _ = predict(generator, s.x, s.t, s.cond, s.w, alpha_bar)
    t, noise = dmd_times(len(s), alpha_bar.shape[0], cfg, gen, s.x.device), randn(s.x.shape, gen, s.x)
    loss = dmd_loss(x0_gen, teacher, fake, t, noise, s.cond, s.w, alpha_bar)
    if cfg.gan_weight > 0:
        loss = loss + cfg.gan_weight * gan_generator_loss(gan_logits(disc, x0_gen, s.cond, alpha_bar, gen))
    return loss


def fake_score_loss(generator: Denoiser, fake: Denoiser, s: States, x0_real: Optional[Tensor], cond_real: Any,
                    alpha_bar: Tensor, cfg: DMD2Config, gen: Optional[torch.Generator], disc: Optional[Callable]) -> Tensor:
    """The fake score's denoising loss on detached generator samples at states s, plus disc_weight times the
    discriminator loss (DMD2 Eq. 4): real samples x0_real under their own conditions against those fakes,
    each scored at its own diffusion-GAN t. Per sample (B,)."""
    with torch.no_grad():
        x0_gen, _ = predict(generator, s.x, s.t, s.cond, s.w, alpha_bar)
    t = randint(0, alpha_bar.shape[0], len(s), gen, s.x.device)
    loss = denoising_loss(fake, x0_gen, t, randn(s.x.shape, gen, s.x), s.cond, alpha_bar)
    if cfg.gan_weight > 0:
        logits_real = gan_logits(disc, x0_real, cond_real, alpha_bar, gen)  # each at its own t
        logits_fake = gan_logits(disc, x0_gen, s.cond, alpha_bar, gen)
        loss = loss + cfg.disc_weight * gan_discriminator_loss(logits_real, logits_fake)
    return loss


def generator_policy(generator: Denoiser, alpha_bar: Tensor, reflect: Optional[ReflectConfig]) -> Policy:
    """A multi-step DMD2 generator's step (backward simulation): x0 = G(x_t), re-noised to the next grid point."""
    def step(x, t, s, cond, w, gen):
        x0, _ = predict(generator, x, t, cond, w, alpha_bar, reflect)
        return renoise_step(x0, s, gen, alpha_bar)
    return step


# ----------------------------------------------------------------------------------------------------
# 7d. The oracle DAgger arm: an upper bound on what any state mixture can do, not DDIL itself. DAgger's
# guarantee (Ross et al. 2011, Thm. 3.1) assumes the expert labels every visited state with its own action. Here
# the expert is the exact teacher run to convergence, and each student is regressed on it with its base method's
# own distance. Its states are fresh student rollouts every step (no buffer), with the teacher's share of the
# rollout steps annealed 1 -> 0 (beta_mix): DDILConfig(beta_student=1, buffer_capacity=0).


@torch.no_grad()
def oracle_labels(teacher_step: Policy, s: States, grid: list[int], to_clean: bool) -> Tensor:
    """The oracle's label of each state: the exact teacher's converged solve from x at t, by teacher_step
    (teacher_policy with K substeps per student interval) along the student grid, to the point the student's own
    step aims at: the next grid point tau_{k+1} (to_clean False: a PD student's DDIM step), or clean (to_clean True:
    an LCM student's f(x, t) and a DMD2 generator's x0, which their samplers then re-noise). (B, *)"""
    x, t, k = s.x.clone(), s.t.clone(), s.k.clone()
    stop = torch.full_like(k, len(grid)) if to_clean else k + 1  # the student interval to stop at (N: clean)
    for _ in range(len(grid)):
        go = (k < stop).nonzero().squeeze(1)
        if not len(go):
            break
        s_next = next_time(grid, k[go])
        x[go] = teacher_step(x[go], t[go], s_next, index_cond(s.cond, go), None if s.w is None else s.w[go], None)
        t[go], k[go] = s_next, k[go] + 1
    return x


def oracle_loss(x0_fn: Callable[[States], Tensor], s: States, x0_label: Tensor, distance: Callable) -> Tensor:
    """The oracle's regression (B,): distance(x0_fn(s), x0_label), the student's clean-sample output against the
    label in x0 space (PD: pd_target of the label; LCM: f(x, t) and its pseudo-Huber; DMD2: G(x) and MSE)."""
    return distance(x0_fn(s), x0_label)


# ----------------------------------------------------------------------------------------------------
# 8. Training steps (one per base method) and the loop, shared by toy/ and sd/. The caller builds States with
# ddil_states. What differs between domains enters by keyword: `online`, the module to run with gradients (a
# DDP wrapper), `update(opt, loss)`, the optimiser step (accelerate's backward, clipping, lr schedule), and
# `autocast()`, the precision context. Steps return detached tensors, so a caller syncs only when it logs.

Update = Callable[[Any, Tensor], None]  # update(opt, scalar loss): one optimiser step; `opt` is the caller's own


def _update(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on a scalar loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def lcm_train_step(student: torch.nn.Module, target: torch.nn.Module, teacher: Denoiser, opt, s: States,
                   alpha_bar: Tensor, reflect: Optional[ReflectConfig], cfg: LCMConfig, *,
                   online: Optional[Denoiser] = None, update: Update = _update,
                   autocast: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """One LCM (+DDIL) update on states s (LCM Algorithm 1), then the EMA target update. The loss runs through
    `online` (default: student); the EMA reads `student`. target is student: no EMA (LCM-LoRA's own target)."""
    with autocast():
        loss = lcm_loss(student if online is None else online, target, teacher, s, alpha_bar, reflect, cfg).mean()
    update(opt, loss)
    if target is not student:
        ema_update(target, student, cfg.ema_decay)
    return {"loss": loss.detach()}


def pd_train_step(student: torch.nn.Module, teacher: Denoiser, opt, s: States, fine_grid: list[int],
                  alpha_bar: Tensor, reflect: Optional[ReflectConfig], K: int = 1, *,
                  online: Optional[Denoiser] = None, update: Update = _update,
                  autocast: Callable[[], Any] = contextlib.nullcontext, x_tilde: Optional[Tensor] = None) -> dict:
    """One PD (+DDIL) update on states s of the current round (Salimans & Ho 2022, Algorithm 2). x_tilde: the
    targets pd_x_tilde(teacher, s, ...) if the caller made them already (e.g. for several batches at once)."""
    with autocast():
        loss = pd_loss(student if online is None else online, teacher, s, fine_grid, alpha_bar, reflect, K,
                       x_tilde).mean()
    update(opt, loss)
    return {"loss": loss.detach()}


def pd_next_round(student: torch.nn.Module) -> torch.nn.Module:
    """PD's halving: the trained student becomes the next round's frozen teacher, and the next student
    starts from its weights (Salimans & Ho 2022, Alg. 2). Returns the frozen teacher copy."""
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return teacher


def dmd2_train_step(generator: torch.nn.Module, fake: torch.nn.Module, teacher: Denoiser, opt_g, opt_f,
                    next_states: Callable[[], States], alpha_bar: Tensor, cfg: DMD2Config,
                    gen: Optional[torch.Generator], disc: Optional[Callable] = None,
                    next_real: Optional[Callable[[], tuple]] = None, *, online: Optional[Denoiser] = None,
                    fake_online: Optional[Denoiser] = None, update: Update = _update,
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """One DMD2 (+DDIL) step, the two time-scale update rule (Yin et al. 2024, Sec. 4.1): a generator update, then
    cfg.fake_updates fake-score (and discriminator) updates. Every update draws a FRESH batch, next_states() (new
    noise, conditions and rollouts) and, with the GAN, next_real(), as DMD2 draws a new batch per update.
      next_states() -> States; its states at t = T - 1 are made pure noise (pure_noise_start)
      next_real() -> (x0 (B, *), cond): real samples with their own conditions (used only if gan_weight > 0)
      disc(x_t, t, cond) -> logits (B,): the GAN head on the fake score's features (used only if gan_weight > 0);
      its weights are frozen with `fake` for the generator update, so keep them in `fake` or pass an nn.Module
      online, fake_online: the modules run with gradients (default generator, fake); batches are drawn outside
      `autocast` (a caller that wants its rollouts in low precision wraps its policies)."""
    T, guidance = alpha_bar.shape[0], [m for m in (fake, disc) if isinstance(m, torch.nn.Module)]
    for m in guidance:  # frozen for the whole generator update (a checkpointed graph recomputes the same one)
        m.requires_grad_(False)
    s = pure_noise_start(next_states(), T, gen)
    with autocast():
        loss_g = dmd2_generator_loss(generator if online is None else online, teacher, fake, s, alpha_bar, cfg,
                                     gen, disc).mean()
    update(opt_g, loss_g)
    for m in guidance:
        m.requires_grad_(True)
    for _ in range(cfg.fake_updates):
        s = pure_noise_start(next_states(), T, gen)
        x0_real, cond_real = next_real() if cfg.gan_weight > 0 else (None, None)
        with autocast():
            loss_f = fake_score_loss(generator, fake if fake_online is None else fake_online, s, x0_real, cond_real,
                                     alpha_bar, cfg, gen, disc).mean()
        update(opt_f, loss_f)
    return {"loss": loss_g.detach(), "loss_fake": loss_f.detach()}


def oracle_train_step(opt, s: States, x0_fn: Callable[[States], Tensor], x0_label: Tensor, distance: Callable, *,
                      update: Update = _update, autocast: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """One update of the oracle DAgger arm (7d) on states s with their oracle_labels; x0_fn runs the student (or its
    DDP wrapper) with gradients. A PD oracle is pd_train_step with x_tilde = pd_target of its labels instead."""
    with autocast():
        loss = oracle_loss(x0_fn, s, x0_label, distance).mean()
    update(opt, loss)
    return {"loss": loss.detach()}


def check_finite(logs: dict, step: int, method: str) -> None:
    """Stop a run whose loss (a log key starting with 'loss') is NaN or inf, naming the step and method. Values are
    numbers or 0-dim tensors (reading a tensor syncs with its device: call this where the caller logs)."""
    for key, v in logs.items():
        if key.startswith("loss") and not math.isfinite(float(v)):
            raise FloatingPointError(f"{method}: non-finite {key}={float(v)} at step {step}")


def distill(train_step: Callable[[int], dict], n_steps: int, method: str,
            on_step: Optional[Callable[[int, dict], None]] = None) -> None:
    """The training loop: n_steps calls of train_step(step) -> logs, stopping on a non-finite loss."""
    for step in range(n_steps):
        logs = train_step(step)
        check_finite(logs, step, method)
        if on_step is not None:
            on_step(step, logs)
