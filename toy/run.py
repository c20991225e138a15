"""One toy distillation run: a base method (PD, LCM or DMD2), optionally with DDIL and a reflected sampler,
distilled from the exact teacher of a Gaussian mixture (2-D, or lifted to D dimensions: ring8-d32), then measured:
sample quality, covariate shift and the on-policy error ratios.

    python -m toy.run --method lcm --ddil --reflect reflect --steps 4 --seed 0
    python -m toy.run --help
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import ddil
from toy import metrics, mixtures
from toy import shift as shift_mod
from toy.models import AnalyticTeacher, MLPDenoiser, count_nfe, fit_to_teacher, fresh_copy

METHODS = ("pd", "lcm", "dmd2")
DDIL_BETAS = (0.5, 0.25, 0.25)  # the priors --ddil turns on: forward, teacher, student
LABELS = ("base", "exact")  # the method's own targets, or the oracle's: the exact teacher's converged step


@dataclass
class ToyConfig:
    method: str = "lcm"  # base method: 'pd', 'lcm' or 'dmd2'
    mixture: str = "ring8"  # built-in mixture name or path to a mixture JSON
    conditional: bool = False  # class-conditional students and teacher (CFG with w)
    steps: int = 4  # N student steps at inference
    seed: int = 0  # seeds the network init, training and evaluation noise
    width: int = 128  # student MLP width (capacity knob)
    depth: int = 3  # student MLP hidden layers
    batch_size: int = 256  # training states per step
    train_steps: int = 1500  # optimiser steps (PD: split evenly over its rounds; DMD2: generator steps)
    lr: float = 1e-3  # Adam learning rate (students and the DMD2 fake score)
    init_steps: int = 2000  # regression steps of the network teacher every student starts from
    teacher_substeps: int = 48  # K: exact-teacher DDIM substeps per student interval (rollouts, PD round 1); 4K = 192 is ~2x the data noise floor
    n_eval: int = 2000  # samples for every metric
    schedule: ddil.ScheduleConfig = field(default_factory=ddil.ScheduleConfig)  # the noise schedule
    reflect: ddil.ReflectConfig = field(default_factory=lambda: ddil.ReflectConfig(range=0.0, max_value=0.0))  # reflected sampler; 0 = from the data
    ddil: ddil.DDILConfig = field(default_factory=ddil.DDILConfig)  # state priors, DAgger mixing, buffer
    lcm: ddil.LCMConfig = field(default_factory=lambda: ddil.LCMConfig(w_min=0.0, w_max=1.0))  # LCM settings
    pd: ddil.PDConfig = field(default_factory=lambda: ddil.PDConfig(N_start=8, N_final=4))  # PD settings
    dmd2: ddil.DMD2Config = field(default_factory=lambda: ddil.DMD2Config(fake_updates=2))  # DMD2 settings
    labels: str = "base"  # 'base': the method's own targets; 'exact': the exact teacher's converged step (the oracle, ddil 7d)
    oracle_substeps: int = 16  # K of the exact labels' DDIM solve per student interval: within 2e-4 (MSE) of K = 96 at D = 32
    rollout_substeps: int = 0  # K of the exact teacher when it acts in a rollout; 0: teacher_substeps (the oracle: its own K)

    def validate(self) -> "ToyConfig":
        ddil.validate_fields(self, {
            "method": (lambda v: v in METHODS, "'pd', 'lcm' or 'dmd2'"),
            "steps": (lambda v: 1 <= v <= self.lcm.original_steps, f"in [1, original_steps={self.lcm.original_steps}]"),
            "width": (lambda v: v >= 1, ">= 1"), "depth": (lambda v: v >= 1, ">= 1"),
            "batch_size": (lambda v: v >= 1, ">= 1"), "train_steps": (lambda v: v >= 1, ">= 1"),
            "lr": (lambda v: v > 0, "> 0"), "init_steps": (lambda v: v >= 0, ">= 0"), "seed": (lambda v: v >= 0, ">= 0"),
            "teacher_substeps": (lambda v: v >= 1, ">= 1"), "n_eval": (lambda v: v >= 10, ">= 10"),
            "labels": (lambda v: v in LABELS, "'base' or 'exact'"), "oracle_substeps": (lambda v: v >= 1, ">= 1"),
            "rollout_substeps": (lambda v: v >= 0, ">= 0 (0: teacher_substeps)"),
        })
        subs = {"schedule": self.schedule, "reflect": self.reflect, "ddil": self.ddil, "lcm": self.lcm, "dmd2": self.dmd2}
        if self.method == "pd":
            subs["pd"] = self.pd
        for name, sub in subs.items():
            try:
                sub.validate()
            except ddil.ConfigError as e:  # name the nested field: reflect.ratio=1.5 ...
                raise ddil.ConfigError(f"{name}.{e}") from None
        if self.method == "pd":
            ddil.require(self.pd.N_final == self.steps, "pd.N_final", self.pd.N_final, f"= steps ({self.steps})")
        return self


# ----------------------------------------------------------------------------------------------------
# Setup: mixture, schedule, teacher, the network teacher students start from


@functools.lru_cache(maxsize=32)
def mixture_range(spec: str) -> float:
    """data_range of a mixture spec, computed once per process."""
    return data_range(mixtures.load_mixture(spec))


def data_range(gmm: mixtures.GMM) -> float:
    """Half-width of the reflection domain [-r, r]: 5% beyond the largest |x| of 10^5 data samples."""
    x, _ = mixtures.sample(gmm, 100_000, torch.Generator().manual_seed(12345))
    return round(1.05 * x.abs().max().item(), 3)


def new_student(cfg: ToyConfig, gmm: mixtures.GMM, alpha_bar: torch.Tensor) -> MLPDenoiser:
    """An untrained student network of this config's architecture."""
    return MLPDenoiser(alpha_bar, gmm.means.shape[1], cfg.width, cfg.depth,
                       gmm.num_classes if cfg.conditional else 0, w_embed=cfg.conditional and cfg.method == "lcm")


class PrefitError(FloatingPointError):
    """The network teacher's pre-fit ended with non-finite weights, before any distillation step."""


def stop_message(e: FloatingPointError) -> str:
    """The one line a NaN stop prints: the phase (network-teacher pre-fit or distillation), then the guard's words."""
    return f"error: {e}" if isinstance(e, PrefitError) else f"error: distillation stopped: {e}"


def make_student(cfg: ToyConfig, gmm: mixtures.GMM, alpha_bar: torch.Tensor, teacher: AnalyticTeacher) -> MLPDenoiser:
    """The network teacher (seeded), fitted to the exact teacher: every student is a copy of it."""
    torch.manual_seed(cfg.seed)
    net = new_student(cfg, gmm, alpha_bar)
    net = fit_to_teacher(net, teacher, cfg.init_steps, cfg.batch_size, cfg.lr, torch.Generator().manual_seed(cfg.seed))
    if not all(torch.isfinite(p).all() for p in net.parameters()):  # else distillation would stop at "step 0"
        raise PrefitError(f"network-teacher pre-fit: non-finite weights after its {cfg.init_steps} regression steps "
                          f"on the exact teacher (mixture {cfg.mixture!r}), before any distillation step")
    return net


def fit_init_state(cfg: ToyConfig) -> dict:
    """make_student's weights for cfg, to share one network teacher across runs and worker processes."""
    cfg, gmm = resolve(cfg)
    alpha_bar = ddil.make_alpha_bar(cfg.schedule)
    return make_student(cfg, gmm, alpha_bar, AnalyticTeacher(gmm, alpha_bar)).state_dict()


def run_from_init(cfg: ToyConfig, init_state: dict) -> dict:
    """run_one, starting from network-teacher weights made by fit_init_state."""
    cfg_r, gmm = resolve(cfg)
    init = new_student(cfg_r, gmm, ddil.make_alpha_bar(cfg_r.schedule))
    init.load_state_dict(init_state)
    return run_one(cfg, init=init)


def single_thread() -> None:
    """Worker-process initialiser: one torch thread per process, one process per core."""
    torch.set_num_threads(1)


def progress(**kw):
    """A tqdm bar on a terminal; where stderr is not one (a log file, CI) one plain line at most every 30 s."""
    from tqdm import tqdm
    return tqdm(**kw) if sys.stderr.isatty() else tqdm(**{**kw, "mininterval": 30, "ascii": True, "leave": True})


def draw_fns(cfg: ToyConfig, gmm: mixtures.GMM):
    """draw_data(n, gen) -> (x0, labels|None) and draw_w(n, gen) -> w|None, for ddil.ddil_states."""
    def draw_data(n, gen):
        x0, comp = mixtures.sample(gmm, n, gen)
        return x0, (gmm.labels[comp] if cfg.conditional else None)

    def draw_w(n, gen):
        if not cfg.conditional:
            return None
        return cfg.lcm.w_min + (cfg.lcm.w_max - cfg.lcm.w_min) * torch.rand(n, generator=gen)
    return draw_data, draw_w


# ----------------------------------------------------------------------------------------------------
# Training, one function per base method. Each returns the student's sampling policy and grid.


def rollout_substeps(cfg: ToyConfig) -> int:
    """K of the exact teacher when it acts in a rollout: cfg.rollout_substeps, or teacher_substeps when that is 0. The
    oracle arm sets it to oracle_substeps, so its expert acts as it labels (DAgger's mixed policy
    beta pi* + (1 - beta) pi_hat, Ross et al. 2011)."""
    return cfg.rollout_substeps or cfg.teacher_substeps


def _states_fn(cfg, grid, base_grid, teacher_step, student_step, alpha_bar, draw_data, draw_w, gen, ages: list):
    """states(step) -> ddil.States for this run's priors, with the aggregation buffer if configured. Appends the
    mean age of each batch's rollout states to `ages` (nan when a batch has none)."""
    buf = ddil.ReplayBuffer(cfg.ddil.buffer_capacity, cfg.ddil.buffer_policy, seed=cfg.seed) if cfg.ddil.buffer_capacity else None

    def states(step: int, refresh: bool = True) -> ddil.States:
        s = ddil.ddil_states(cfg.batch_size, draw_data, draw_w, base_grid, grid, teacher_step, student_step,
                             alpha_bar, cfg.ddil, step, buf, gen, refresh)
        ages.append(float(ddil.mean_age(s, step)))
        return s
    return states


PD_LOOKAHEAD = 10  # PD: training steps whose states, and teacher targets, are made together (fewer, larger tensor ops)


def pd_lookahead(d: ddil.DDILConfig) -> int:
    """How many consecutive PD steps may draw their states at once, at the first of them, and get the same states:
    none of those states may depend on the student's updates in between. Forward and teacher-rollout states never do;
    student rollouts are made at every step without a buffer (so 1), and with one only at refreshes, every
    refresh_every steps (so a divisor of it: a block starts at every refresh)."""
    if d.buffer_capacity == 0:
        return 1 if d.beta_student > 0 else PD_LOOKAHEAD
    return math.gcd(PD_LOOKAHEAD, d.refresh_every)


def blocked(states, targets, L: int, n_steps: int):
    """batches(step) -> (States, targets of them), for steps called in order 0, 1, ..., n_steps - 1: at every L-th
    step the states of the next L steps are drawn, states(step + i) in order as the steps would draw them, and
    targets(all of them) is made in one call. With pd_lookahead's L the states are those of step-by-step drawing."""
    ready: dict = {}

    def batches(step: int):
        if step % L == 0:
            parts = [states(step + i) for i in range(min(L, n_steps - step))]
            made = targets(ddil.cat_states(parts)).split([len(p) for p in parts])
            ready.clear()
            ready.update({step + i: (p, y) for i, (p, y) in enumerate(zip(parts, made))})
        return ready.pop(step)
    return batches


def oracle_step(opt, states, x0_fn, distance, teacher, alpha_bar, reflect, K: int, grid):
    """step_fn of the oracle arm for a student whose output is a clean sample (LCM's f, DMD2's G): each state's label
    is the exact teacher's converged solve to clean (ddil.oracle_labels, K substeps per student interval)."""
    exact = ddil.teacher_policy(teacher, alpha_bar, reflect, K, grid)

    def step_fn(step):
        s = states(step)
        return ddil.oracle_train_step(opt, s, x0_fn, ddil.oracle_labels(exact, s, grid, to_clean=True), distance)
    return step_fn


def exact_x_tilde(exact_step, s: ddil.States, grid, alpha_bar) -> torch.Tensor:
    """PD's x_tilde from the oracle's label: the x0 whose DDIM step from x at t lands on the exact teacher's converged
    step to tau_{k+1} (pd_target, Salimans & Ho 2022 Eq. 8 with the exact step in place of the two teacher steps)."""
    y = ddil.oracle_labels(exact_step, s, grid, to_clean=False)
    return ddil.pd_target(s.x, y, s.t, ddil.next_time(grid, s.k), alpha_bar)


def train_lcm(cfg, student, teacher, alpha_bar, reflect, gen, on_step):
    ages: list = []
    grid = ddil.lcm_grid(cfg.steps, cfg.lcm.original_steps, cfg.schedule.T)
    target = fresh_copy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, fused=True)
    policy = ddil.consistency_policy(student, alpha_bar, reflect, cfg.lcm)
    states = _states_fn(cfg, grid, ddil.lcm_base_grid(cfg.lcm.original_steps, cfg.schedule.T),
                        ddil.teacher_policy(teacher, alpha_bar, reflect, rollout_substeps(cfg), grid),
                        policy, alpha_bar, *draw_fns(cfg, teacher.gmm), gen, ages)
    step_fn = lambda step: ddil.lcm_train_step(student, target, teacher, opt, states(step), alpha_bar, reflect, cfg.lcm)  # noqa: E731
    if cfg.labels == "exact":  # the oracle: f(x, t) regressed on the exact ODE endpoint with LCM's own distance
        f = lambda s: ddil.consistency_fn(s.x, ddil.predict(student, s.x, s.t, s.cond, s.w, alpha_bar, reflect)[0], s.t, cfg.lcm)  # noqa: E731
        distance = functools.partial(ddil.pseudo_huber, c=cfg.lcm.huber_c) if cfg.lcm.loss == "huber" else ddil.mse
        step_fn = oracle_step(opt, states, f, distance, teacher, alpha_bar, reflect, cfg.oracle_substeps, grid)
    ddil.distill(step_fn, cfg.train_steps, "lcm", on_step)
    return policy, grid, {}, ages


def train_pd(cfg, student, teacher, alpha_bar, reflect, gen, on_step):
    rounds = ddil.pd_rounds(cfg.pd.N_start, cfg.pd.N_final)
    per_round = max(1, cfg.train_steps // len(rounds))
    ages: list = []
    round_teacher, K = teacher, cfg.teacher_substeps // 2  # round 1: the exact teacher, K substeps per half-step
    for r, N in enumerate(rounds):
        grid, fine = ddil.uniform_grid(N, cfg.schedule.T), ddil.uniform_grid(2 * N, cfg.schedule.T)
        exact_step = ddil.teacher_policy(teacher, alpha_bar, reflect, rollout_substeps(cfg), grid)  # the rollouts' teacher
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, fused=True)
        policy = ddil.ddim_policy(student, alpha_bar, reflect)
        states = _states_fn(cfg, grid, grid, exact_step, policy, alpha_bar, *draw_fns(cfg, teacher.gmm), gen, ages)
        targets = functools.partial(ddil.pd_x_tilde, round_teacher, fine_grid=fine, alpha_bar=alpha_bar, reflect=reflect,
                                    K=max(K, 1))
        if cfg.labels == "exact":  # the oracle: the exact teacher's converged step to tau_{k+1}, not the round teacher's
            label_step = ddil.teacher_policy(teacher, alpha_bar, reflect, cfg.oracle_substeps, grid)
            targets = functools.partial(exact_x_tilde, label_step, grid=grid, alpha_bar=alpha_bar)
        batches = blocked(states, targets, pd_lookahead(cfg.ddil), per_round)

        def step_fn(step, batches=batches, fine=fine, opt=opt, round_teacher=round_teacher, K=K):
            s, x_tilde = batches(step)
            return ddil.pd_train_step(student, round_teacher, opt, s, fine, alpha_bar, reflect, max(K, 1), x_tilde=x_tilde)
        offset = r * per_round
        ddil.distill(step_fn, per_round, "pd", lambda step, logs: on_step(offset + step, logs))
        round_teacher, K = ddil.pd_next_round(fresh_copy(student)), cfg.pd.teacher_substeps
        round_teacher.register_forward_pre_hook(lambda m, args: setattr(teacher, "nfe", teacher.nfe + args[0].shape[0]))
    return policy, grid, {}, ages


def train_dmd2(cfg, student, teacher, alpha_bar, reflect, gen, on_step):
    grid = ddil.uniform_grid(cfg.steps, cfg.schedule.T)
    fake = fresh_copy(student)  # the fake score starts from the teacher's weights, as in DMD2
    fake_nfe = count_nfe(fake)
    head = torch.nn.Linear(cfg.width, 1)  # DMD2's GAN classifier on the fake score's features
    fake.add_module("gan_head", head)  # inside the fake score, so it is frozen with it for the generator update
    disc = lambda x_t, t, cond: head(fake.features(x_t, t, cond))[:, 0]  # noqa: E731
    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.lr, fused=True)
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg.lr, fused=True)
    policy = ddil.generator_policy(student, alpha_bar, reflect)
    draw_data, draw_w = draw_fns(cfg, teacher.gmm)
    ages: list = []
    states = _states_fn(cfg, grid, grid, ddil.teacher_policy(teacher, alpha_bar, reflect, rollout_substeps(cfg), grid),
                        policy, alpha_bar, draw_data, draw_w, gen, ages)
    step_fn = lambda step: ddil.dmd2_train_step(  # noqa: E731  (each update draws fresh states and real data)
        student, fake, teacher, opt_g, opt_f, ddil.step_batches(states, step), alpha_bar, cfg.dmd2, gen, disc=disc,
        next_real=lambda: draw_data(cfg.batch_size, gen))
    if cfg.labels == "exact":  # the oracle: G(x) regressed on the exact ODE endpoint (no fake score: it is not needed)
        g = lambda s: ddil.predict(student, s.x, s.t, s.cond, s.w, alpha_bar, reflect)[0]  # noqa: E731
        noise_start = lambda step: ddil.pure_noise_start(states(step), alpha_bar.shape[0], gen)  # noqa: E731
        step_fn = oracle_step(opt_g, noise_start, g, ddil.mse, teacher, alpha_bar, reflect, cfg.oracle_substeps, grid)
    ddil.distill(step_fn, cfg.train_steps, "dmd2", on_step)
    return policy, grid, {"fake": fake_nfe}, ages


TRAIN = {"pd": train_pd, "lcm": train_lcm, "dmd2": train_dmd2}


# ----------------------------------------------------------------------------------------------------
# Evaluation


class TeacherSide(NamedTuple):
    """Everything evaluate measures that does not depend on the student, for one (mixture, seed, grid, ...)."""
    data: torch.Tensor  # (n, D) held-out data
    ref_states: list  # (c): the exact teacher's K-substep rollout states at tau_k from the student's x_T
    ref_next: list  # its converged step from each of them: its next state, and its samples after the last
    forward: list  # (a): the data diffused to each tau_k
    forward_targets: list  # the teacher's converged step from each forward state
    ratios_teacher: list  # the control: error ratios of the teacher's own single DDIM step


_TEACHER_SIDE: dict = {}  # per process: runs of one suite or study share a seed, grid and mixture


def teacher_side(cfg: ToyConfig, grid, teacher: AnalyticTeacher, alpha_bar, reflect, x_T, cond, w) -> TeacherSide:
    """The student-independent half of evaluate, made once per process and key (it is deterministic in the key:
    the evaluation noise, data and conditions are seeded by cfg.seed, and the teacher draws no noise)."""
    gmm = teacher.gmm
    key = (cfg.mixture, float(gmm.means.double().sum()), float(gmm.covs.double().sum()), cfg.seed, cfg.n_eval,
           tuple(grid), repr(reflect), cfg.teacher_substeps, repr(cfg.schedule), cfg.conditional)
    if key in _TEACHER_SIDE:
        return _TEACHER_SIDE[key]
    K = cfg.teacher_substeps
    ref_x0, ref_states = ddil.sample(ddil.teacher_policy(teacher, alpha_bar, reflect, K), x_T, grid, cond, w)
    ref_next = list(ref_states[1:]) + [ref_x0]
    data, _ = mixtures.sample(gmm, cfg.n_eval, torch.Generator().manual_seed(20_000 + cfg.seed))
    forward = shift_mod.forward_at_grid(data, grid, alpha_bar, torch.Generator().manual_seed(50_000 + cfg.seed))
    forward_targets = shift_mod.teacher_targets(teacher, forward, grid, alpha_bar, K, cond, w, reflect)
    _, ddim_states = ddil.sample(ddil.teacher_policy(teacher, alpha_bar, reflect, 1), x_T, grid, cond, w)
    control = error_ratios(shift_mod.ddim_x0_fn(teacher, alpha_bar, reflect), ddim_states, (ref_states, ref_next),
                           (forward, forward_targets), grid, teacher, alpha_bar, reflect, cfg, cond, w)
    if len(_TEACHER_SIDE) >= 16:
        _TEACHER_SIDE.pop(next(iter(_TEACHER_SIDE)))
    _TEACHER_SIDE[key] = TeacherSide(data, ref_states, ref_next, forward, forward_targets, control)
    return _TEACHER_SIDE[key]


def evaluate(cfg: ToyConfig, policy, grid, teacher: AnalyticTeacher, alpha_bar, reflect, x0_fn) -> dict:
    """Final-sample metrics against held-out data; covariate shift of the states the student visits (MMD and
    cross-entropy to p_tau, per step); and the on-policy error ratios (toy.shift) of the student and, as the
    control, of the teacher's own single DDIM step (teacher_side: made once per process and key)."""
    gmm, n = teacher.gmm, cfg.n_eval
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    x_T = torch.randn(n, gmm.means.shape[1], generator=gen)
    cond, w = _eval_cond(cfg, gmm, n, gen)
    x0, states = ddil.sample(policy, x_T, grid, cond, w, gen)
    ref = teacher_side(cfg, grid, teacher, alpha_bar, reflect, x_T, cond, w)
    out = metrics.sample_metrics(gmm, x0, ref.data)
    ab = ddil.alpha_bar_at(alpha_bar, torch.tensor(grid))
    shift = metrics.covariate_shift(gmm, states[1:], ab[1:].sqrt().tolist(), (1 - ab[1:]).sqrt().tolist(),
                                    ref=ref.ref_states[1:], generator=torch.Generator().manual_seed(30_000 + cfg.seed))
    out["shift"] = [{"k": k + 1, "t": grid[k + 1], **row} for k, row in enumerate(shift)]
    out["shift_last"] = shift[-1]["mmd_to_forward"] if shift else 0.0
    out["ratios"] = error_ratios(x0_fn, states, (ref.ref_states, ref.ref_next),
                                 (ref.forward, ref.forward_targets), grid, teacher, alpha_bar, reflect, cfg, cond, w)
    out["ratios_teacher"] = ref.ratios_teacher
    out["ratio_last"] = out["ratios"][-1]["own_vs_teacher"][0]
    out["ratio_teacher_last"] = ref.ratios_teacher[-1]["own_vs_teacher"][0]  # the control's (b)/(c) at the last step
    out["err_own_last"] = out["ratios"][-1]["err_own"]  # the student's one-step error on its own states, last step
    out["samples"] = rounded(x0[:500])  # for figures: 4 decimals (every metric above used the full values)
    out["states"] = [rounded(s[:500]) for s in states]
    return out


def rounded(x: torch.Tensor, decimals: int = 4) -> list:
    """x as nested lists of floats rounded to `decimals`: what a figure needs, at a fraction of the JSON size."""
    return x.double().round(decimals=decimals).tolist()


def error_ratios(x0_fn, own, ref, forward, grid, teacher, alpha_bar, reflect, cfg: ToyConfig, cond, w) -> list[dict]:
    """Per student step k, a one-step error against the exact teacher's converged step (K substeps) on
    (a) forward states forward[0], whose converged steps forward[1] are made, (b) the policy's own states `own` and
    (c) the teacher's rollout states ref[0] from the same x_T, whose converged steps ref[1] are made; with (b)/(a)
    and (b)/(c) and their 95 % CIs."""
    K = cfg.teacher_substeps
    err = lambda states, targets=None: shift_mod.per_step_errors(  # noqa: E731
        x0_fn, teacher, states, grid, alpha_bar, K, cond=cond, w=w, reflect=reflect, targets=targets)
    return shift_mod.ratio_rows(err(*forward), err(own), err(*ref), grid)


def _eval_cond(cfg, gmm, n, gen):
    """Evaluation conditions: class labels drawn as in the data and w = 0 (plain conditional) when conditional."""
    if not cfg.conditional:
        return None, None
    _, comp = mixtures.sample(gmm, n, gen)
    return gmm.labels[comp], torch.zeros(n)


# ----------------------------------------------------------------------------------------------------
# One run


def resolve(cfg: ToyConfig) -> tuple[ToyConfig, mixtures.GMM]:
    """Validate, load the mixture and fill data-dependent defaults (the reflection range)."""
    ddil.require(cfg.method in METHODS, "method", cfg.method, "'pd', 'lcm' or 'dmd2'")
    check_mixture_path(cfg.mixture)
    gmm = mixtures.load_mixture(cfg.mixture)
    if cfg.reflect.range == 0:
        cfg = dataclasses.replace(cfg, reflect=dataclasses.replace(cfg.reflect, range=mixture_range(cfg.mixture)))
    if cfg.reflect.max_value == 0:  # dynamic: s may reach ~2 (in units of the range) before it saturates
        cfg = dataclasses.replace(cfg, reflect=dataclasses.replace(cfg.reflect, max_value=max(1.0, cfg.reflect.range)))
    cfg.validate()
    if cfg.conditional:
        ddil.require(gmm.num_classes >= 2, "conditional", True, f"a mixture with >= 2 classes ({cfg.mixture} has 1)")
    check_buffer(cfg)
    return cfg, gmm


def check_mixture_path(spec: str) -> None:
    """A mixture that is neither built in nor an existing JSON file fails here, saying which it is."""
    allowed = f"a {mixtures.BUILTIN_HELP}, or a mixture JSON file"
    path = Path(spec)
    named = spec in mixtures.BUILTINS or re.fullmatch(r"[a-z0-9]+-d\d+", spec) is not None  # load_mixture checks D
    if not named and not path.exists():
        raise ddil.ConfigError(f"mixture={spec!r} does not exist: allowed {allowed}")
    if not named and path.is_dir():
        raise ddil.ConfigError(f"mixture={spec!r} is a directory: allowed {allowed}")


def buffer_need(d: ddil.DDILConfig, batch_size: int, steps: int = 4) -> tuple[int, int]:
    """(the smallest buffer that works, the rollouts one refresh makes): a buffer holds one refresh,
    refresh_share refresh_every B beta states per rollout source in whole rollouts of N (ddil.fresh_counts), and one
    batch."""
    m = d.states_per_rollout or steps  # rollout states come in whole rollouts of m (ddil.fresh_counts)
    refresh = sum(math.ceil(d.refresh_share * d.refresh_every * batch_size * b / m) * m for b in (d.beta_teacher, d.beta_student))
    return max(refresh, batch_size), refresh


def default_buffer(d: ddil.DDILConfig, batch_size: int, steps: int = 4) -> int:
    """The toy's buffer capacity: 512 (two batches), or one refresh where a refresh makes more. Small, so the
    trained-on rollout states are young: about capacity / (2 x rollouts per step) steps old."""
    return max(512, buffer_need(d, batch_size, steps)[0])


def check_buffer(cfg: ToyConfig) -> None:
    """The buffer must hold the rollouts one refresh makes and one batch: ddil.ddil_states would otherwise stop at
    the first step."""
    d = cfg.ddil
    if d.buffer_capacity == 0 or d.beta_teacher + d.beta_student == 0:
        return
    need, refresh = buffer_need(d, cfg.batch_size, cfg.steps)
    ddil.require(d.buffer_capacity >= need, "ddil.buffer_capacity", d.buffer_capacity,
                 f">= {need} (one batch, and the {refresh} rollouts one refresh makes), or 0 for no buffer")


def run_one(cfg: ToyConfig, on_step=None, init: Optional[MLPDenoiser] = None) -> dict:
    """Distil and evaluate one configuration. Returns the resolved config, metrics and timings."""
    cfg, gmm = resolve(cfg)
    alpha_bar = ddil.make_alpha_bar(cfg.schedule)
    teacher = AnalyticTeacher(gmm, alpha_bar)
    t0 = time.perf_counter()
    student = copy.deepcopy(init) if init is not None else make_student(cfg, gmm, alpha_bar, teacher)
    t1 = time.perf_counter()
    reflect = cfg.reflect if cfg.reflect.mode != "none" else None
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    student_nfe, teacher.nfe = count_nfe(student), 0
    policy, grid, extra, ages = TRAIN[cfg.method](cfg, student, teacher, alpha_bar, reflect, gen, on_step or (lambda s, l: None))
    t2 = time.perf_counter()
    counts = {"teacher": [teacher.nfe], "student": student_nfe, **extra}  # sample-evaluations; PD's round teachers count as teacher
    cost = {f"{k}_nfe_per_step": v[0] / cfg.train_steps for k, v in counts.items()}
    cost["ms_per_step"] = 1e3 * (t2 - t1) / cfg.train_steps
    aged = [a for a in ages if a == a]  # steps whose batch held rollout states
    cost["rollout_state_mean_age"] = sum(aged) / len(aged) if aged else float("nan")  # training steps
    x0_fn = (shift_mod.consistency_x0_fn(student, alpha_bar, reflect, cfg.lcm) if cfg.method == "lcm"
             else shift_mod.ddim_x0_fn(student, alpha_bar, reflect))  # what the student's step does with x0_hat
    out = evaluate(cfg, policy, grid, teacher, alpha_bar, reflect, x0_fn)
    return {"config": dataclasses.asdict(cfg), "grid": grid, "metrics": out, "cost": cost,
            "time": {"init_s": t1 - t0, "train_s": t2 - t1, "eval_s": time.perf_counter() - t2}}


def write_json_atomic(obj, path: Path) -> None:
    """Write JSON to path via a temporary file and rename, so a reader never sees half a file."""
    write_text_atomic(json.dumps(obj, indent=1), path)


def write_text_atomic(text: str, path: Path) -> None:
    """Write text to path via a temporary file and rename; a failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removed if the write failed


def check_writable(path: Path, flag: str, kind: str = "file") -> None:
    """Before any compute: raise a one-line ConfigError naming `flag` unless `path` can be written as a file
    (kind 'file') or filled as a directory (kind 'dir'). The nearest existing folder is probed with a temporary
    file that is removed at once, so nothing is left behind."""
    shown = f"{flag} {str(path)!r}"
    if kind == "file" and path.is_dir():
        raise ddil.ConfigError(f"{shown} is a directory: allowed a file path such as {str(path / 'run.json')!r}")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ddil.ConfigError(f"{shown} is a file: allowed a directory (existing or new)")
    folder = path if kind == "dir" else path.parent
    while not folder.exists():  # the folders write_json_atomic / mkdir would create
        folder = folder.parent
    if not folder.is_dir():
        raise ddil.ConfigError(f"{shown} is not writable: {str(folder)!r} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ddil-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ddil.ConfigError(f"{shown} is not writable: {e.strerror} in {str(folder)!r}") from None


def pm(mean: float, spread: float, n: int, spec: str = ".2f") -> str:
    """A table cell 'mean ± spread'; 'mean ± –' from a single seed, which has no spread."""
    return f"{mean:{spec}} ± {spread:{spec}}" if n > 1 else f"{mean:{spec}} ± –"


# ----------------------------------------------------------------------------------------------------
# Command line


BASE_BETAS = {"pd": (1.0, 0.0, 0.0), "lcm": (1.0, 0.0, 0.0), "dmd2": (0.0, 0.0, 1.0)}  # DMD2's backward simulation is a student rollout


def variant_config(method: str, use_ddil: bool, reflect: str, **kw) -> ToyConfig:
    """The config of a named variant: the base method's own states, or the DDIL priors."""
    cfg = ToyConfig(method=method, **kw)
    betas = DDIL_BETAS if use_ddil else BASE_BETAS[method]
    cfg.ddil = dataclasses.replace(cfg.ddil, beta_frwd=betas[0], beta_teacher=betas[1], beta_student=betas[2],
                                   beta_mix_start=1.0 if use_ddil else 0.0,  # base DMD2 simulates with the student only
                                   beta_mix_steps=cfg.train_steps // 2, buffer_capacity=512 if use_ddil else 0,
                                   refresh_every=10)
    cfg.reflect = dataclasses.replace(cfg.reflect, mode=reflect)
    return cfg


ARMS = {  # the arms of the on-policy map (toy.study part 8) and make toy's high-D panel: priors, buffer, labels
    "base": None,  # the base method's own states and targets
    "+DDIL": DDIL_BETAS,  # DDIL's priors, buffer and mixing (variant_config)
    "mostly student": (0.25, 0.0, 0.75),  # the same, most states from DAgger-mixed student rollouts
    "student only": (0.0, 0.0, 1.0),  # every state from a student rollout (still buffered, still the base targets)
    "oracle": (0.0, 0.0, 1.0),  # fresh student rollouts every step, no buffer, labels the exact teacher's converged step
    "oracle labels": None,  # the base method's states with the oracle's labels: what the labels alone buy
}


def arm_config(method: str, arm: str, **kw) -> ToyConfig:
    """The config of one arm of the map (ARMS). Only the source of the states changes between the base, DDIL and
    student arms; the two oracle arms change the labels too, and say so in their names."""
    ddil.require(arm in ARMS, "arm", arm, ", ".join(repr(a) for a in ARMS))
    cfg = variant_config(method, ARMS[arm] is not None, "none", **kw)
    if arm in ("mostly student", "student only", "oracle"):
        b = ARMS[arm]
        cfg.ddil = dataclasses.replace(cfg.ddil, beta_frwd=b[0], beta_teacher=b[1], beta_student=b[2])
        cfg.ddil = dataclasses.replace(cfg.ddil, buffer_capacity=0 if arm == "oracle" else default_buffer(cfg.ddil, cfg.batch_size, cfg.steps))
    if arm in ("oracle", "oracle labels"):
        cfg.labels = "exact"
    if arm == "oracle":
        cfg.rollout_substeps = cfg.oracle_substeps  # the expert acts as it labels
    return cfg


def variant_name(cfg: dict) -> str:
    """The suite's name of a run's variant, from its saved config (dataclasses.asdict of a ToyConfig)."""
    d = cfg["ddil"]  # base: the method's own priors, no buffer, no teacher share (a student-only +DDIL has a buffer)
    betas = (d["beta_frwd"], d["beta_teacher"], d["beta_student"])
    use_ddil = betas != BASE_BETAS[cfg["method"]] or d["buffer_capacity"] > 0 or d["beta_mix_start"] > 0
    name = ("+DDIL" if use_ddil else "") + ("+reflected" if cfg["reflect"]["mode"] != "none" else "") or "base"
    return name + (" +exact labels" if cfg.get("labels", "base") == "exact" else "")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2, instead of the usage block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)  # -1e-4 is a value, not a flag

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """argparse type: a finite float (nan and inf would only surface as a NaN stop mid-run)."""
    v = float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


FLAGS = {  # config field (as ddil.ConfigError names it) -> the flag that sets it, so errors name what was typed
    "method": "--method", "mixture": "--mixture", "conditional": "--conditional", "steps": "--steps", "seed": "--seed",
    "width": "--width", "batch_size": "--batch-size", "train_steps": "--train-steps", "teacher_substeps": "--teacher-substeps",
    "reflect.mode": "--reflect", "reflect.range": "--reflect-range", "reflect.ratio": "--reflect-ratio",
    "reflect.max_value": "--reflect-max", "dmd2.gan_weight": "--gan-weight", "ddil.buffer_capacity": "--buffer",
    "ddil.refresh_share": "--refresh", "ddil.beta_frwd": "--betas FRWD", "ddil.beta_teacher": "--betas TEACHER",
    "ddil.beta_student": "--betas STUDENT", "ddil.beta_frwd + beta_teacher + beta_student": "--betas FRWD + TEACHER + STUDENT",
    "labels": "--labels", "oracle": "--oracle",
}


def flag_message(e: Exception, flags: dict = FLAGS) -> str:
    """A ConfigError 'field=value is invalid: ...' as '--flag value is invalid: ... (field)', naming the flag."""
    msg = str(e)
    field, sep, rest = msg.partition("=")
    if not sep or field not in flags:
        return msg
    flag = flags[field]
    same = flag.split()[0][2:].replace("-", "_") == field
    return f"{flag} {rest}" + ("" if same else f" ({field})")


def variant_label(use_ddil: bool, betas, reflect: str) -> str:
    """The variant's name as the suite's tables give it (base, +DDIL, +DDIL+reflected), from the flags."""
    name = f"betas {'/'.join(f'{b:g}' for b in betas)}" if betas is not None else ("+DDIL" if use_ddil else "base")
    return name + ("" if reflect == "none" else "+reflected" if reflect == "reflect" else f"+{reflect}")


def parse_args(argv=None) -> tuple[ToyConfig, Optional[Path], str]:
    """The run's config, its --out path and its variant's name, from the command line."""
    d = ToyConfig()
    p = Parser(prog="python -m toy.run", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default=d.method, help="base method: pd, lcm or dmd2")
    p.add_argument("--ddil", action="store_true", help=f"DDIL state mixture, priors (frwd, teacher, student) = {DDIL_BETAS}")
    p.add_argument("--betas", type=finite_float, nargs=3, metavar=("FRWD", "TEACHER", "STUDENT"), help="explicit DDIL priors, >= 0, sum 1")
    p.add_argument("--oracle", action="store_true", help="the oracle DAgger arm: fresh student rollouts every step (no buffer), "
                   "labelled by the exact teacher's converged step; an upper bound, not DDIL")
    p.add_argument("--labels", default="base", help="'base' (the method's own targets) or 'exact' (the exact teacher's "
                   "converged step, as the oracle)")
    p.add_argument("--reflect", default="none", help="reflected sampler: none, clip, dynamic or reflect")
    p.add_argument("--reflect-range", type=finite_float, default=0.0, help="domain [-r, r] for clip/reflect; 0 = from the data")
    p.add_argument("--reflect-ratio", type=finite_float, default=0.995, help="dynamic thresholding percentile, in (0, 1]")
    p.add_argument("--reflect-max", type=finite_float, default=0.0, help="dynamic thresholding max s in units of the range, >= 1; 0 = the range's value")
    p.add_argument("--gan-weight", type=finite_float, default=0.0, help="DMD2 generator GAN term weight, >= 0 (0 = off)")
    p.add_argument("--steps", type=int, default=d.steps, help="N student steps, in [1, 50]")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, training and evaluation, >= 0")
    p.add_argument("--mixture", default=d.mixture, help=f"{mixtures.BUILTIN_HELP}; or a mixture JSON path")
    p.add_argument("--conditional", action="store_true", help="class-conditional teacher and student, CFG with w")
    p.add_argument("--width", type=int, default=d.width, help="student MLP width, >= 1")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training states per step, >= 1")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="optimiser steps, >= 1")
    p.add_argument("--teacher-substeps", type=int, default=d.teacher_substeps, help="K exact-teacher substeps per student interval")
    p.add_argument("--buffer", type=int, default=None, help="aggregation buffer capacity (0 = fresh rollouts); default 512 with --ddil")
    p.add_argument("--refresh", type=finite_float, default=0.25, help="share of rollout states regenerated per step, in (0, 1]")
    p.add_argument("--out", type=Path, default=None, help="write the run's JSON here (atomically); checked before any compute")
    a = p.parse_args(argv)
    if a.method not in METHODS:  # before the variant config is built, so the error names the flag
        raise ddil.ConfigError(f"method={a.method!r} is invalid: allowed 'pd', 'lcm' or 'dmd2'")
    if a.oracle and (a.ddil or a.betas is not None or a.buffer is not None or a.reflect != "none"):
        raise ddil.ConfigError("oracle=True is invalid: allowed without --ddil, --betas, --buffer and --reflect (the oracle "
                               "sets its own states, without a buffer or reflection)")
    kw = dict(steps=a.steps, seed=a.seed, mixture=a.mixture, conditional=a.conditional, width=a.width,
              batch_size=a.batch_size, train_steps=a.train_steps, teacher_substeps=a.teacher_substeps)
    cfg = (arm_config(a.method, "oracle", **kw) if a.oracle
           else variant_config(a.method, a.ddil or a.betas is not None, a.reflect, **kw))
    cfg.labels = "exact" if a.oracle else a.labels
    cfg.pd = dataclasses.replace(cfg.pd, N_start=2 * a.steps, N_final=a.steps)
    cfg.reflect = dataclasses.replace(cfg.reflect, range=a.reflect_range, ratio=a.reflect_ratio, max_value=a.reflect_max)
    cfg.dmd2 = dataclasses.replace(cfg.dmd2, gan_weight=a.gan_weight)
    upd = {"refresh_share": a.refresh}
    if a.betas is not None:
        upd.update(beta_frwd=a.betas[0], beta_teacher=a.betas[1], beta_student=a.betas[2])
    if a.buffer is not None:
        upd["buffer_capacity"] = a.buffer
    cfg.ddil = dataclasses.replace(cfg.ddil, **upd)
    label = "oracle" if a.oracle else variant_label(a.ddil, a.betas, a.reflect) + (" +exact labels" if a.labels == "exact" else "")
    return cfg, a.out, label


def summary_line(cfg: ToyConfig, label: str, res: dict) -> str:
    """The run's one line of metrics, in the units of the suite's tables (MMD and shift x1e-3)."""
    m, c = res["metrics"], res["cost"]
    return (f"{cfg.method.upper()} {label}, N={cfg.steps}, seed {cfg.seed}: MMD {1e3 * m['mmd']:.2f} x1e-3, "
            f"NLL {m['nll']:.3f}, modes {m['mode_coverage']:.2f}, precision {m['mode_precision']:.3f}, "
            f"density {m['density']:.3f}, coverage {m['coverage']:.3f}, shift {1e3 * m['shift_last']:.2f} x1e-3 "
            f"({res['time']['train_s']:.1f} s training; NFE/step teacher {c['teacher_nfe_per_step']:.0f}, "
            f"student {c['student_nfe_per_step']:.0f})")


def main(argv=None) -> int:
    try:
        cfg, out, label = parse_args(argv)
        cfg, _ = resolve(cfg)
        if out is not None:
            check_writable(out, "--out")
    except (ddil.ConfigError, mixtures.MixtureError) as e:
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 2
    bar = progress(total=cfg.train_steps, desc=f"{cfg.method.upper()} {label}", leave=False)
    try:
        res = run_one(cfg, on_step=lambda step, logs: (bar.update(1), bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)))
    except FloatingPointError as e:  # the NaN guard: say in which phase the run stopped
        bar.close()
        print(stop_message(e), file=sys.stderr)
        return 1
    bar.close()
    print(summary_line(cfg, label, res))
    if out is not None:
        write_json_atomic(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
