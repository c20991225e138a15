"""Rollout cost of DDIL's states: policy NFEs per stored rollout state and per training step, for the toy's DDIL
settings (make toy) at N = 4, measured by counting the calls of cheap stand-in policies (no training).

    python scripts/rollout_cost.py                       # this checkout's ddil.py
    git show 6d6c641:ddil.py > /tmp/ddil_before.py && python scripts/rollout_cost.py --ddil /tmp/ddil_before.py

The policies are ddil's own (teacher_policy with K = 48 substeps per student interval, as toy.run's teacher_substeps;
the student's DDIM or consistency step) over a denoiser that counts its evaluations and returns zeros.
The 'before' code (6d6c641) kept one state per rollout, at tau_k with k ~ U{0..N-1}; with a buffer of 2048.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_ddil(path: str | None):
    if path is None:
        import ddil
        return ddil
    spec = importlib.util.spec_from_file_location("ddil_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def measure(ddil, method: str, K: int, steps: int, buffer_capacity: int, B: int = 256) -> dict:
    """Counts over `steps` training steps of ddil_states with the toy's DDIL priors, buffer and refresh."""
    calls = {"teacher": 0, "student": 0, "stored": 0}

    def counting(key):  # a denoiser that counts its sample-evaluations
        def denoiser(x, t, cond, w):
            calls[key] += len(x)
            return torch.zeros_like(x)
        return denoiser
    new_api = hasattr(ddil, "lcm_base_grid")
    grid = ddil.lcm_grid(4) if method == "lcm" else ddil.uniform_grid(4)
    if new_api:
        times = ddil.lcm_base_grid(50) if method == "lcm" else grid
    else:
        times = ddil.lcm_forward_times(50) if method == "lcm" else ddil.grid_forward_times(grid)
    betas = (0.0, 0.0, 1.0) if method == "dmd2-base" else (0.5, 0.25, 0.25)
    cfg = ddil.DDILConfig(*betas, beta_mix_start=1.0, beta_mix_end=0.0, beta_mix_steps=steps // 2,
                          buffer_capacity=buffer_capacity, refresh_every=10)
    buf = ddil.ReplayBuffer(buffer_capacity) if buffer_capacity else None
    gen = torch.Generator().manual_seed(0)
    alpha_bar = ddil.make_alpha_bar()
    teacher_kw = {"grid": grid} if new_api else {}  # proportional substeps on branches inside an interval
    teacher_step = ddil.teacher_policy(counting("teacher"), alpha_bar, None, K, **teacher_kw)
    student_step = (ddil.consistency_policy(counting("student"), alpha_bar, None, ddil.LCMConfig()) if method == "lcm"
                    else ddil.ddim_policy(counting("student"), alpha_bar, None))
    draw = lambda n, g: (torch.zeros(n, 2), None)  # noqa: E731
    for step in range(steps):
        seen = buf.seen if buf is not None else 0
        s = ddil.ddil_states(B, draw, lambda n, g: None, times, grid, teacher_step, student_step, alpha_bar, cfg, step, buf, gen)
        calls["stored"] += (buf.seen - seen) if buf is not None else int((s.source != 0).sum())
    n = calls["stored"]
    return {"teacher_nfe_per_state": calls["teacher"] / n, "student_nfe_per_state": calls["student"] / n,
            "teacher_nfe_per_step": calls["teacher"] / steps, "student_nfe_per_step": calls["student"] / steps,
            "states_per_step": n / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ddil", default=None, help="path of a ddil.py to measure (default: this checkout's)")
    p.add_argument("--buffer", type=int, default=512, help="buffer capacity (toy default: 512 now, 2048 before)")
    p.add_argument("--steps", type=int, default=200, help="training steps to count over")
    p.add_argument("--K", type=int, default=48, help="teacher substeps per student interval")
    a = p.parse_args(argv)
    ddil = load_ddil(a.ddil)
    print(f"ddil: {a.ddil or 'this checkout'}; buffer {a.buffer}; N = 4; K = {a.K}; B = 256; priors 0.5 0.25 0.25")
    print(f"{'method':8} {'teacher NFE/state':>18} {'student NFE/state':>18} {'teacher NFE/step':>17} {'student NFE/step':>17}")
    for method in ("pd", "lcm", "dmd2"):
        r = measure(ddil, method, a.K, a.steps, a.buffer)
        print(f"{method:8} {r['teacher_nfe_per_state']:18.1f} {r['student_nfe_per_state']:18.2f} "
              f"{r['teacher_nfe_per_step']:17.0f} {r['student_nfe_per_step']:17.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
