"""Benchmark of the toy's hot paths (issue 10, item 4). Prints numbers; it is not a timed test.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_toy.py            # everything, about a minute
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_toy.py --part eps  # only the exact-teacher calls

Parts:
  solve  ddil.teacher_solve per substep at batch 256, K = 48: with the exact teacher, and with a denoiser that
         costs nothing (returns zeros), which is ddil's own per-substep overhead
  eps    exact-teacher calls per second (AnalyticTeacher, batch 256, random t) at d = 2, 32, 128: ring8 lifted
         onto a fixed random 2-plane with off-plane std 0.05, built here so the script also runs on code
         from before d-dimensional builtins existed.
  train  ms per training step of PD, LCM and DMD2, base and +DDIL, at `make toy`'s settings (batch 256,
         K = 48, buffer 512, refresh every 10) over --steps steps, one process, one thread; plus the
         evaluation time of each run (n_eval = 2000) and the network-teacher pre-fit time (2000 steps);
         and each step's network floor: the student networks' own forward and backward passes that the
         step makes (its NFEs x the measured cost of one MLP sample-evaluation, plus its optimiser updates),
         which no rearrangement of the rest removes.
Times are CPU seconds of this process (time.process_time, also inside toy.run's own timers) unless --clock wall:
on a machine shared with other work, wall times measure the other work too.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddil  # noqa: E402
from toy import mixtures, run  # noqa: E402
from toy.models import AnalyticTeacher  # noqa: E402


def lifted_ring8(d: int, off_std: float = 0.05) -> mixtures.GMM:
    """ring8 on a seeded random 2-plane Q of R^d: means Q mu, covs Q S Q^T + off_std^2 (I - Q Q^T)."""
    base = mixtures.ring8()
    if d == 2:
        return base
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(d), dtype=torch.float64))
    off = off_std**2 * (torch.eye(d, dtype=torch.float64) - q @ q.T)  # (d, d)
    covs = q @ base.covs @ q.T + off  # (M, d, d)
    return mixtures.make_gmm(base.weights, base.means @ q.T, (covs + covs.transpose(1, 2)) / 2, base.labels)


CLOCK = time.process_time  # set by --clock


def bench_eps(dims, n: int = 256, seconds: float = 1.5) -> None:
    """Calls per second of the exact teacher at batch n, random t, for each d."""
    alpha_bar = ddil.make_alpha_bar()
    for d in dims:
        teacher = AnalyticTeacher(lifted_ring8(d), alpha_bar)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(n, d, generator=g), torch.randint(0, 1000, (n,), generator=g)
        teacher(x, t)  # warm-up
        calls, t0 = 0, CLOCK()
        while CLOCK() - t0 < seconds:
            teacher(x, t)
            calls += 1
        dt = (CLOCK() - t0) / calls
        print(f"eps  d={d:<4d} batch {n}: {1 / dt:8.0f} calls/s  ({1e3 * dt:.3f} ms/call)", flush=True)


def bench_solve(n: int = 256, K: int = 48, repeats: int = 10) -> None:
    """us per teacher_solve substep, with the exact teacher and with a free denoiser (ddil's own overhead)."""
    alpha_bar = ddil.make_alpha_bar()
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    t, s = torch.full((n,), 999), torch.full((n,), 749)
    free = lambda x_t, t_, cond, w: torch.zeros_like(x_t)  # noqa: E731
    for name, denoiser in (("exact teacher", AnalyticTeacher(mixtures.ring8(), alpha_bar)), ("free denoiser", free)):
        ddil.teacher_solve(denoiser, x, t, s, None, None, alpha_bar, None, K)  # warm-up
        t0 = CLOCK()
        for _ in range(repeats):
            ddil.teacher_solve(denoiser, x, t, s, None, None, alpha_bar, None, K)
        us = 1e6 * (CLOCK() - t0) / (repeats * K)
        print(f"solve {name:<13s} batch {n}: {us:7.1f} us per substep", flush=True)


def net_costs(mixture: str, n: int = 256, repeats: int = 200) -> tuple[float, float]:
    """ms of one student MLP forward without gradient at batch n, and of one update (forward, backward, fused Adam)."""
    gmm = mixtures.load_mixture(mixture)
    net = run.new_student(run.ToyConfig(mixture=mixture), gmm, ddil.make_alpha_bar())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(n, gmm.means.shape[1], generator=g), torch.randint(0, 1000, (n,), generator=g)

    def update():
        opt.zero_grad(set_to_none=True)
        net(x, t).square().mean().backward()
        opt.step()
    out = []
    for fn in (lambda: net(x, t).detach(), update):
        with torch.no_grad() if fn is not update else contextlib.nullcontext():
            fn()
            t0 = CLOCK()
            for _ in range(repeats):
                fn()
        out.append(1e3 * (CLOCK() - t0) / repeats)
    return out[0], out[1]


def bench_train(steps: int, mixture: str) -> None:
    """ms per training step and eval seconds for each method and variant, from one shared pre-fit, with each step's
    network floor: (student + fake NFEs - the updates' own batches) / 256 forwards, plus its updates."""
    t0 = CLOCK()
    init_state = run.fit_init_state(run.ToyConfig(mixture=mixture))  # make toy's pre-fit: 2000 steps
    print(f"pre-fit (network teacher, 2000 steps, {mixture}): {CLOCK() - t0:.2f} s", flush=True)
    fwd, upd = net_costs(mixture)
    print(f"student MLP at batch 256: forward {fwd:.2f} ms, update (forward + backward + Adam) {upd:.2f} ms", flush=True)
    updates = {"pd": 1, "lcm": 1, "dmd2": 3}  # optimiser updates per step (DMD2: generator + 2 fake-score updates)
    uncounted = {"pd": 1.0, "lcm": 1.0, "dmd2": 0.0}  # batch-forwards no NFE counter sees as a student's: LCM's EMA
    # target (one per step); PD's second-round network teacher (two half-steps per step over half the steps)
    for method in run.METHODS:
        for use_ddil in (False, True):
            cfg = run.variant_config(method, use_ddil, "none", train_steps=steps, mixture=mixture)
            res = run.run_from_init(cfg, init_state)
            c = res["cost"]
            nets = c["student_nfe_per_step"] + c.get("fake_nfe_per_step", 0.0)  # every student-network evaluation
            forwards = nets / cfg.batch_size + uncounted[method]
            floor = (forwards - updates[method]) * fwd + updates[method] * upd
            name = f"{method.upper()} {'+DDIL' if use_ddil else 'base'}"
            print(f"train {name:<10s} {c['ms_per_step']:7.1f} ms/step over {steps} steps (network floor {floor:5.1f} ms: "
                  f"{forwards:.1f} batch-forwards, {updates[method]} update(s)); "
                  f"eval {res['time']['eval_s']:.2f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_toy.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", choices=("all", "solve", "eps", "train"), default="all", help="what to measure")
    p.add_argument("--steps", type=int, default=100, help="training steps per run, >= 2")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 32, 128], help="dimensions of the eps benchmark, >= 2")
    p.add_argument("--mixture", default="ring8", help="mixture of the training benchmark")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time")
    a = p.parse_args(argv)
    if a.steps < 2 or min(a.dims) < 2:
        print("error: --steps and --dims must be >= 2", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    run.time = types.SimpleNamespace(perf_counter=CLOCK)  # toy.run's own phase timers read the same clock
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.clock} clock", flush=True)
    t0 = time.perf_counter()
    if a.part in ("all", "solve"):
        bench_solve()
    if a.part in ("all", "eps"):
        bench_eps(a.dims)
    if a.part in ("all", "train"):
        bench_train(a.steps, a.mixture)
    print(f"total {time.perf_counter() - t0:.1f} s wall", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
