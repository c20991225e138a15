"""One toy distillation run: a base method (PD, LCM or DMD2), optionally with DDIL and a reflected sampler,
distilled from the exact teacher of a 2D Gaussian mixture, then measured.

    python -m toy.run --method lcm --ddil --reflect reflect --steps 4 --seed 0
    python -m toy.run --help
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import ddil
from toy import metrics, mixtures
from toy.models import AnalyticTeacher, MLPDenoiser, count_nfe, fit_to_teacher, fresh_copy

METHODS = ("pd", "lcm", "dmd2")
DDIL_BETAS = (0.5, 0.25, 0.25)  # the priors --ddil turns on: forward, teacher, student


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

    def validate(self) -> "ToyConfig":
        ddil.validate_fields(self, {
            "method": (lambda v: v in METHODS, "'pd', 'lcm' or 'dmd2'"),
            "steps": (lambda v: 1 <= v <= self.lcm.original_steps, f"in [1, original_steps={self.lcm.original_steps}]"),
            "width": (lambda v: v >= 1, ">= 1"), "depth": (lambda v: v >= 1, ">= 1"),
            "batch_size": (lambda v: v >= 1, ">= 1"), "train_steps": (lambda v: v >= 1, ">= 1"),
            "lr": (lambda v: v > 0, "> 0"), "init_steps": (lambda v: v >= 0, ">= 0"),
            "teacher_substeps": (lambda v: v >= 1, ">= 1"), "n_eval": (lambda v: v >= 10, ">= 10"),
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


def make_student(cfg: ToyConfig, gmm: mixtures.GMM, alpha_bar: torch.Tensor, teacher: AnalyticTeacher) -> MLPDenoiser:
    """The network teacher (seeded), fitted to the exact teacher: every student is a copy of it."""
    torch.manual_seed(cfg.seed)
    net = new_student(cfg, gmm, alpha_bar)
    return fit_to_teacher(net, teacher, cfg.init_steps, cfg.batch_size, cfg.lr, torch.Generator().manual_seed(cfg.seed))


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


def _states_fn(cfg, grid, forward_times, teacher_step, student_step, alpha_bar, draw_data, draw_w, gen):
    """states(step) -> ddil.States for this run's priors, with the aggregation buffer if configured."""
    buf = ddil.ReplayBuffer(cfg.ddil.buffer_capacity, cfg.ddil.buffer_policy, seed=cfg.seed) if cfg.ddil.buffer_capacity else None
    return lambda step: ddil.ddil_states(cfg.batch_size, draw_data, draw_w, forward_times, grid, teacher_step,
                                         student_step, alpha_bar, cfg.ddil, step, buf, gen)


def train_lcm(cfg, student, teacher, alpha_bar, reflect, gen, on_step):
    grid = ddil.lcm_grid(cfg.steps, cfg.lcm.original_steps, cfg.schedule.T)
    target = fresh_copy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    policy = ddil.consistency_policy(student, alpha_bar, reflect, cfg.lcm)
    states = _states_fn(cfg, grid, ddil.lcm_forward_times(cfg.lcm.original_steps, cfg.schedule.T),
                        ddil.teacher_policy(teacher, alpha_bar, reflect, cfg.teacher_substeps),
                        policy, alpha_bar, *draw_fns(cfg, teacher.gmm), gen)
    step_fn = lambda step: ddil.lcm_train_step(student, target, teacher, opt, states(step), alpha_bar, reflect, cfg.lcm)  # noqa: E731
    ddil.distill(step_fn, cfg.train_steps, "lcm", on_step)
    return policy, grid, {}


def train_pd(cfg, student, teacher, alpha_bar, reflect, gen, on_step):
    rounds = ddil.pd_rounds(cfg.pd.N_start, cfg.pd.N_final)
    per_round = max(1, cfg.train_steps // len(rounds))
    round_teacher, K = teacher, cfg.teacher_substeps // 2  # round 1: the exact teacher, K substeps per half-step
    exact_step = ddil.teacher_policy(teacher, alpha_bar, reflect, cfg.teacher_substeps)
    for r, N in enumerate(rounds):
        grid, fine = ddil.uniform_grid(N, cfg.schedule.T), ddil.uniform_grid(2 * N, cfg.schedule.T)
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        policy = ddil.ddim_policy(student, alpha_bar, reflect)
        states = _states_fn(cfg, grid, ddil.grid_forward_times(grid), exact_step, policy, alpha_bar, *draw_fns(cfg, teacher.gmm), gen)
        step_fn = lambda step: ddil.pd_train_step(student, round_teacher, opt, states(step), fine, alpha_bar, reflect, max(K, 1))  # noqa: E731
        offset = r * per_round
        ddil.distill(step_fn, per_round, "pd", lambda step, logs: on_step(offset + step, logs))
        round_teacher, K = ddil.pd_next_round(fresh_copy(student)), cfg.pd.teacher_substeps
        round_teacher.register_forward_pre_hook(lambda m, args: setattr(teacher, "nfe", teacher.nfe + args[0].shape[0]))
    return policy, grid, {}


def train_dmd2(cfg, student, teacher, alpha_bar, reflect, gen, on_step):
    grid = ddil.uniform_grid(cfg.steps, cfg.schedule.T)
    fake = fresh_copy(student)  # the fake score starts from the teacher's weights, as in DMD2
    fake_nfe = count_nfe(fake)
    head = torch.nn.Linear(cfg.width, 1)  # DMD2's GAN classifier on the fake score's features
    fake.add_module("gan_head", head)  # inside the fake score, so it is frozen with it for the generator update
    disc = lambda x_t, t, cond: head(fake.features(x_t, t, cond))[:, 0]  # noqa: E731
    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    opt_f = torch.optim.Adam(fake.parameters(), lr=cfg.lr)
    policy = ddil.generator_policy(student, alpha_bar, reflect)
    draw_data, draw_w = draw_fns(cfg, teacher.gmm)
    states = _states_fn(cfg, grid, ddil.grid_forward_times(grid), ddil.teacher_policy(teacher, alpha_bar, reflect, cfg.teacher_substeps),
                        policy, alpha_bar, draw_data, draw_w, gen)
    step_fn = lambda step: ddil.dmd2_train_step(  # noqa: E731  (each update draws fresh states and real data)
        student, fake, teacher, opt_g, opt_f, lambda: states(step), alpha_bar, cfg.dmd2, gen, disc=disc,
        next_real=lambda: draw_data(cfg.batch_size, gen))
    ddil.distill(step_fn, cfg.train_steps, "dmd2", on_step)
    return policy, grid, {"fake": fake_nfe}


TRAIN = {"pd": train_pd, "lcm": train_lcm, "dmd2": train_dmd2}


# ----------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(cfg: ToyConfig, policy, grid, teacher: AnalyticTeacher, alpha_bar, reflect) -> dict:
    """Final-sample metrics against held-out data, and covariate shift of the states the student visits."""
    gmm, n = teacher.gmm, cfg.n_eval
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    x_T = torch.randn(n, gmm.means.shape[1], generator=gen)
    cond, w = _eval_cond(cfg, gmm, n, gen)
    x0, states = ddil.sample(policy, x_T, grid, cond, w, gen)
    _, ref_states = ddil.sample(ddil.teacher_policy(teacher, alpha_bar, reflect, cfg.teacher_substeps), x_T, grid, cond, w, gen)
    data, _ = mixtures.sample(gmm, n, torch.Generator().manual_seed(20_000 + cfg.seed))  # held-out data
    out = sample_metrics(gmm, x0, data)
    ab = ddil.alpha_bar_at(alpha_bar, torch.tensor(grid))
    shift = metrics.covariate_shift(gmm, states[1:], ab[1:].sqrt().tolist(), (1 - ab[1:]).sqrt().tolist(),
                                    ref=ref_states[1:], generator=torch.Generator().manual_seed(30_000 + cfg.seed))
    out["shift"] = [{"k": k + 1, "t": grid[k + 1], **row} for k, row in enumerate(shift)]
    out["shift_last"] = shift[-1]["mmd_to_forward"] if shift else 0.0
    out["samples"] = x0[:500].tolist()
    out["states"] = [s[:500].tolist() for s in states]
    return out


def _eval_cond(cfg, gmm, n, gen):
    """Evaluation conditions: class labels drawn as in the data and w = 0 (plain conditional) when conditional."""
    if not cfg.conditional:
        return None, None
    _, comp = mixtures.sample(gmm, n, gen)
    return gmm.labels[comp], torch.zeros(n)


def sample_metrics(gmm: mixtures.GMM, x: torch.Tensor, data: torch.Tensor) -> dict:
    """MMD and energy distance to held-out data, exact NLL, mode precision/coverage, density/coverage."""
    x = torch.nan_to_num(x, nan=1e3, posinf=1e3, neginf=-1e3)
    modes = metrics.mode_stats(gmm, x)
    dc = metrics.density_coverage(data, x)
    return {"mmd": metrics.mmd(x, data), "energy": metrics.energy_distance(x, data), "nll": metrics.nll(gmm, x),
            "mode_precision": modes["precision"], "mode_coverage": modes["coverage"],
            "density": dc["density"], "coverage": dc["coverage"]}


# ----------------------------------------------------------------------------------------------------
# One run


def resolve(cfg: ToyConfig) -> tuple[ToyConfig, mixtures.GMM]:
    """Validate, load the mixture and fill data-dependent defaults (the reflection range)."""
    ddil.require(cfg.method in METHODS, "method", cfg.method, "'pd', 'lcm' or 'dmd2'")
    gmm = mixtures.load_mixture(cfg.mixture)
    if cfg.reflect.range == 0:
        cfg = dataclasses.replace(cfg, reflect=dataclasses.replace(cfg.reflect, range=mixture_range(cfg.mixture)))
    if cfg.reflect.max_value == 0:  # dynamic: s may reach ~2 (in units of the range) before it saturates
        cfg = dataclasses.replace(cfg, reflect=dataclasses.replace(cfg.reflect, max_value=max(1.0, cfg.reflect.range)))
    cfg.validate()
    if cfg.conditional:
        ddil.require(gmm.num_classes >= 2, "conditional", True, f"a mixture with >= 2 classes ({cfg.mixture} has 1)")
    return cfg, gmm


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
    policy, grid, extra = TRAIN[cfg.method](cfg, student, teacher, alpha_bar, reflect, gen, on_step or (lambda s, l: None))
    t2 = time.perf_counter()
    counts = {"teacher": [teacher.nfe], "student": student_nfe, **extra}  # sample-evaluations; PD's round teachers count as teacher
    cost = {f"{k}_nfe_per_step": v[0] / cfg.train_steps for k, v in counts.items()}
    cost["ms_per_step"] = 1e3 * (t2 - t1) / cfg.train_steps
    out = evaluate(cfg, policy, grid, teacher, alpha_bar, reflect)
    return {"config": dataclasses.asdict(cfg), "grid": grid, "metrics": out, "cost": cost,
            "time": {"init_s": t1 - t0, "train_s": t2 - t1, "eval_s": time.perf_counter() - t2}}


def write_json_atomic(obj, path: Path) -> None:
    """Write JSON to path via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Command line


def variant_config(method: str, use_ddil: bool, reflect: str, **kw) -> ToyConfig:
    """The config of a named variant: the base method's own states, or the DDIL priors."""
    cfg = ToyConfig(method=method, **kw)
    base = (0.0, 0.0, 1.0) if method == "dmd2" else (1.0, 0.0, 0.0)  # DMD2's backward simulation is a student rollout
    betas = DDIL_BETAS if use_ddil else base
    cfg.ddil = dataclasses.replace(cfg.ddil, beta_frwd=betas[0], beta_teacher=betas[1], beta_student=betas[2],
                                   beta_mix_start=1.0 if use_ddil else 0.0,  # base DMD2 simulates with the student only
                                   beta_mix_steps=cfg.train_steps // 2, buffer_capacity=2048 if use_ddil else 0,
                                   refresh_every=10)
    cfg.reflect = dataclasses.replace(cfg.reflect, mode=reflect)
    return cfg


def parse_args(argv=None) -> ToyConfig:
    d = ToyConfig()
    p = argparse.ArgumentParser(prog="python -m toy.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default=d.method, help="base method: pd, lcm or dmd2")
    p.add_argument("--ddil", action="store_true", help=f"DDIL state mixture, priors (frwd, teacher, student) = {DDIL_BETAS}")
    p.add_argument("--betas", type=float, nargs=3, metavar=("FRWD", "TEACHER", "STUDENT"), help="explicit DDIL priors, >= 0, sum 1")
    p.add_argument("--reflect", default="none", help="reflected sampler: none, clip, dynamic or reflect")
    p.add_argument("--reflect-range", type=float, default=0.0, help="domain [-r, r] for clip/reflect; 0 = from the data")
    p.add_argument("--reflect-ratio", type=float, default=0.995, help="dynamic thresholding percentile, in (0, 1]")
    p.add_argument("--reflect-max", type=float, default=0.0, help="dynamic thresholding max s in units of the range, >= 1; 0 = the range's value")
    p.add_argument("--gan-weight", type=float, default=0.0, help="DMD2 generator GAN term weight, >= 0 (0 = off)")
    p.add_argument("--steps", type=int, default=d.steps, help="N student steps, in [1, 50]")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, training and evaluation")
    p.add_argument("--mixture", default=d.mixture, help=f"built-in ({', '.join(mixtures.BUILTINS)}) or a mixture JSON path")
    p.add_argument("--conditional", action="store_true", help="class-conditional teacher and student, CFG with w")
    p.add_argument("--width", type=int, default=d.width, help="student MLP width, >= 1")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training states per step, >= 1")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="optimiser steps, >= 1")
    p.add_argument("--teacher-substeps", type=int, default=d.teacher_substeps, help="K exact-teacher substeps per student interval")
    p.add_argument("--buffer", type=int, default=None, help="aggregation buffer capacity (0 = fresh rollouts); default 2048 with --ddil")
    p.add_argument("--refresh", type=float, default=0.25, help="share of rollout states regenerated per step, in (0, 1]")
    p.add_argument("--out", type=Path, default=None, help="write the run's JSON here (atomically)")
    a = p.parse_args(argv)
    if a.method not in METHODS:  # before the variant config is built, so the error names the flag
        raise ddil.ConfigError(f"method={a.method!r} is invalid: allowed 'pd', 'lcm' or 'dmd2'")
    cfg = variant_config(a.method, a.ddil or a.betas is not None, a.reflect, steps=a.steps, seed=a.seed,
                         mixture=a.mixture, conditional=a.conditional, width=a.width, batch_size=a.batch_size,
                         train_steps=a.train_steps, teacher_substeps=a.teacher_substeps)
    cfg.pd = dataclasses.replace(cfg.pd, N_start=2 * a.steps, N_final=a.steps)
    cfg.reflect = dataclasses.replace(cfg.reflect, range=a.reflect_range, ratio=a.reflect_ratio, max_value=a.reflect_max)
    cfg.dmd2 = dataclasses.replace(cfg.dmd2, gan_weight=a.gan_weight)
    upd = {"refresh_share": a.refresh}
    if a.betas is not None:
        upd.update(beta_frwd=a.betas[0], beta_teacher=a.betas[1], beta_student=a.betas[2])
    if a.buffer is not None:
        upd["buffer_capacity"] = a.buffer
    cfg.ddil = dataclasses.replace(cfg.ddil, **upd)
    return cfg, a.out


def main(argv=None) -> int:
    try:
        cfg, out = parse_args(argv)
        cfg, _ = resolve(cfg)
    except (ddil.ConfigError, mixtures.MixtureError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm
    bar = tqdm(total=cfg.train_steps, desc=f"{cfg.method} ddil={cfg.ddil.betas != (1.0, 0.0, 0.0)}", leave=False)
    res = run_one(cfg, on_step=lambda step, logs: (bar.update(1), bar.set_postfix(loss=f"{logs['loss']:.4g}")))
    bar.close()
    m = res["metrics"]
    print(f"{cfg.method} steps={cfg.steps} betas={cfg.ddil.betas} reflect={cfg.reflect.mode}: "
          f"mmd={m['mmd']:.4f} nll={m['nll']:.3f} modes={m['mode_coverage']:.2f} precision={m['mode_precision']:.3f} "
          f"density={m['density']:.3f} coverage={m['coverage']:.3f} shift_last={m['shift_last']:.4f} "
          f"({res['time']['train_s']:.1f}s train; NFE/step teacher {res['cost']['teacher_nfe_per_step']:.0f}, "
          f"student {res['cost']['student_nfe_per_step']:.0f})")
    if out is not None:
        write_json_atomic(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
