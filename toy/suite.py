"""`make toy`: PD, LCM and DMD2, each as base, +DDIL and +DDIL+reflected, at N student steps over several
seeds, against the exact teacher. Prints a mean +- std table and writes results/toy/: results.json,
results.md and PNG figures.

    python -m toy.suite            # full: 3 seeds (about 5 minutes on 2 cores)
    python -m toy.suite --quick    # 1 seed, short training (under a minute)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import ddil
from toy import metrics, mixtures, run

VARIANTS = {"base": (False, "none"), "+DDIL": (True, "none"), "+DDIL+reflected": (True, "reflect")}
COLUMNS = [("mmd", "MMD", 1e3, "x1e-3, lower is better"), ("nll", "NLL", 1, "exact, lower"),
           ("mode_coverage", "modes", 1, "coverage, higher"), ("mode_precision", "precision", 1, "higher"),
           ("density", "density", 1, "~1 is ideal"), ("coverage", "coverage", 1, "higher"),
           ("shift_last", "shift", 1e3, "MMD x1e-3 of x_{tau_{N-1}} to p_{tau_{N-1}}, lower"),
           ("ratio_last", "err ratio", 1, "one-step error on own / on teacher states at the last step (toy.shift), "
            "1 = no covariate shift")]


def suite_configs(seeds, quick: bool, mixture: str, steps: int) -> list[run.ToyConfig]:
    """Every (method, variant, seed) config of the suite."""
    kw = dict(mixture=mixture, steps=steps)
    if quick:
        kw.update(train_steps=300, init_steps=800, n_eval=1000, teacher_substeps=24)  # a smoke run, not the result
    cfgs = []
    for seed in seeds:
        for method in run.METHODS:
            for name, (use_ddil, reflect) in VARIANTS.items():
                cfg = run.variant_config(method, use_ddil, reflect, seed=seed, **kw)
                cfg.pd = dataclasses.replace(cfg.pd, N_start=2 * steps, N_final=steps)
                cfgs.append(cfg)
    return cfgs


def teacher_reference(mixture: str, steps: int, seeds, n_eval: int, substeps: int, sweep: bool = True) -> dict:
    """Reference rows: the exact teacher's own N-step DDIM, and its N * K-step DDIM (the rollouts' teacher);
    plus the teacher-accuracy sweep over total DDIM steps and the data-vs-data noise floor."""
    gmm = mixtures.load_mixture(mixture)
    alpha_bar = ddil.make_alpha_bar()
    teacher = run.AnalyticTeacher(gmm, alpha_bar)
    fine = f"teacher DDIM {steps * substeps} (as in rollouts)"  # named by what it is, not by a claim of convergence
    rows = {f"teacher DDIM {steps}": [], fine: [], "data vs data (floor)": []}
    sweep = {S: [] for S in ((4, 8, 16, 32, 64, 128, 192, 256, 512) if sweep else ())}
    for seed in seeds:
        gen = torch.Generator().manual_seed(10_000 + seed)
        x_T = torch.randn(n_eval, gmm.means.shape[1], generator=gen)
        data, _ = mixtures.sample(gmm, n_eval, torch.Generator().manual_seed(20_000 + seed))
        for S in sweep:
            x0, _ = ddil.sample(ddil.teacher_policy(teacher, alpha_bar, None, S), x_T, [alpha_bar.shape[0] - 1])
            sweep[S].append(metrics.sample_metrics(gmm, x0, data))
        grid = ddil.uniform_grid(steps)
        for K, name in ((1, f"teacher DDIM {steps}"), (substeps, fine)):
            x0, _ = ddil.sample(ddil.teacher_policy(teacher, alpha_bar, None, K), x_T, grid)
            rows[name].append({**metrics.sample_metrics(gmm, x0, data), "shift_last": float("nan"), "ratio_last": float("nan")})
        other, _ = mixtures.sample(gmm, n_eval, torch.Generator().manual_seed(40_000 + seed))
        rows["data vs data (floor)"].append({**metrics.sample_metrics(gmm, other, data), "shift_last": float("nan"),
                                             "ratio_last": float("nan")})
    return {"rows": rows, "sweep": {str(S): v for S, v in sweep.items()}, "steps_used": steps * substeps}


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def table(results: list[dict], reference: dict) -> tuple[str, dict]:
    """Markdown table of mean +- std over seeds ('–' for the std of a single seed), and the same numbers as a dict."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        cfg = r["config"]
        key = f"{cfg['method'].upper()} {run.variant_name(cfg)}"
        groups.setdefault(key, []).append(r["metrics"])
    for name, rows in reference["rows"].items():
        groups[name] = rows
    header = "| variant | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    summary = {}
    for key, rows in groups.items():
        summary[key] = {c[0]: mean_std([row[c[0]] for row in rows]) for c in COLUMNS}
        cells = []
        for col, _, scale, _ in COLUMNS:
            m, s = summary[key][col]
            cells.append("–" if m != m else run.pm(m * scale, s * scale, len(rows)))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


SUITE_FLAGS = {"seeds": "--seeds", "jobs": "--jobs", "steps": "--steps", "mixture": "--mixture"}  # field -> flag


def longest_first(cfgs: list[run.ToyConfig]) -> list[run.ToyConfig]:
    """The order to hand runs to the workers: DDIL variants (rollouts) before base ones, and PD before DMD2
    before LCM, roughly their cost per step (scripts/bench_toy.py), so that no worker idles at the end."""
    rank = {"pd": 0, "dmd2": 1, "lcm": 2}
    return sorted(cfgs, key=lambda c: (run.variant_name(dataclasses.asdict(c)) == "base", rank[c.method]))


def merge_references(parts: list[dict]) -> dict:
    """One teacher_reference from per-seed ones (in seed order): every row's and sweep's lists concatenated."""
    return {"rows": {name: [row for p in parts for row in p["rows"][name]] for name in parts[0]["rows"]},
            "sweep": {S: [row for p in parts for row in p["sweep"][S]] for S in parts[0]["sweep"]},
            "steps_used": parts[0]["steps_used"]}


def run_in_pool(pool, cfgs: list[run.ToyConfig], seeds: list[int], a, bar) -> tuple[list[dict], dict]:
    """Every run and the teacher reference on the worker pool: each seed's network-teacher pre-fit first (shared by
    all its variants), the reference per seed beside them, then the runs longest first as their pre-fit is ready.
    Returns the results in the order of cfgs."""
    base = {c.seed: c for c in cfgs if c.method == "lcm" and run.variant_name(dataclasses.asdict(c)) == "base"}
    inits = {seed: pool.submit(run.fit_init_state, base[seed]) for seed in seeds}
    refs = [pool.submit(teacher_reference, a.mixture, a.steps, [seed], cfgs[0].n_eval, cfgs[0].teacher_substeps)
            for seed in seeds]  # they need no pre-fit: a worker makes them while another fits
    jobs = {id(c): pool.submit(run.run_from_init, c, inits[c.seed].result()) for c in longest_first(cfgs)}
    for job in jobs.values():
        job.add_done_callback(lambda _: bar.update(1))
    results = [jobs[id(c)].result() for c in cfgs]
    bar.close()
    return results, merge_references([r.result() for r in refs])


def main(argv=None) -> int:
    p = run.Parser(prog="python -m toy.suite", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 300 steps, K=24 teacher substeps: a smoke run (26 s on 2 quiet cores)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (full mode), >= 1")
    p.add_argument("--steps", type=int, default=4, help="N student steps, in [1, 50]")
    p.add_argument("--mixture", default="ring8", help=f"built-in ({', '.join(mixtures.BUILTINS)}) or a mixture JSON path")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes, >= 1")
    p.add_argument("--out", type=Path, default=Path("results/toy"), help="output directory, checked before the runs")
    a = p.parse_args(argv)
    try:
        ddil.require(a.seeds >= 1, "seeds", a.seeds, ">= 1")
        ddil.require(a.jobs >= 1, "jobs", a.jobs, ">= 1")
        seeds = [0] if a.quick else list(range(a.seeds))
        cfgs = suite_configs(seeds, a.quick, a.mixture, a.steps)
        for cfg in cfgs:
            run.resolve(cfg)
        run.check_writable(a.out, "--out", "dir")
        for name in ("results.json", "results.md"):
            run.check_writable(a.out / name, "--out", "file")
    except (ddil.ConfigError, mixtures.MixtureError) as e:
        print(f"error: {run.flag_message(e, SUITE_FLAGS)}", file=sys.stderr)
        return 2
    from toy import plots
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(a.jobs, initializer=run.single_thread) as pool:
            results, reference = run_in_pool(pool, cfgs, seeds, a, run.progress(total=len(cfgs), desc="toy runs"))
    except FloatingPointError as e:  # the NaN guard of one run: say in which phase it stopped
        print(run.stop_message(e), file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    md, summary = table(results, reference)
    print(md)
    print(f"\n{len(cfgs)} runs, {len(seeds)} seed(s), {elapsed:.0f} s wall on {a.jobs} worker(s)")
    a.out.mkdir(parents=True, exist_ok=True)
    figures = plots.suite_figures(results, reference, a.out, a.mixture)
    command = "python -m toy.suite" + (" --quick" if a.quick else f" --seeds {a.seeds}") + f" --steps {a.steps} --mixture {a.mixture}"
    run.write_json_atomic({"command": command, "wall_s": elapsed, "summary": summary, "runs": results,
                           "reference": reference}, a.out / "results.json")
    write_markdown(a.out / "results.md", md, figures, command, elapsed, len(cfgs), seeds, a.jobs)
    return 0


def write_markdown(path: Path, md: str, figures: dict, command: str, elapsed: float, n_runs: int, seeds, jobs: int) -> None:
    legend = "; ".join(f"{c[1]}: {c[3]}" for c in COLUMNS)
    text = [f"# Toy results\n\nMade by `{command}` ({n_runs} runs, seeds {seeds}, {elapsed:.0f} s wall, {jobs} workers). "
            f"Mean ± std over seeds{' (one seed: no spread, shown as –)' if len(seeds) == 1 else ''}.\n\n{md}\n\n{legend}.\n"]
    for title, (file, finding) in figures.items():
        text.append(f"\n## {title}\n\n![{title}]({file})\n\n{finding}\n")
    run.write_text_atomic("".join(text), path)


if __name__ == "__main__":
    sys.exit(main())
