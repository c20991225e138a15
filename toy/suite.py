"""`make toy`: two panels against the exact teacher, over several seeds. In 2-D (ring8) PD, LCM and DMD2 as base and
+DDIL (DMD2 also +DDIL+reflected); in high D (ring8-d32, where covariate shift lives) PD and LCM as base and +DDIL at
the setting the study's map (STUDY.md part 8) supports. Prints mean +- std tables and writes results/toy/: results.json,
results.md and PNG figures.

    python -m toy.suite            # full: 3 seeds (under 5 minutes on 2 quiet cores)
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
REFLECTED = ("dmd2",)  # the 2-D panel's +DDIL+reflected runs: reflection moved nothing measurable for PD and LCM
HIGH_D = dict(mixture="ring8-d32", width=128, train_steps=1500,  # the high-D panel: where the study's map finds shift
              betas={"pd": run.DDIL_BETAS, "lcm": run.ARMS["student only"]})  # +DDIL's priors per method: the map's
# best state mixture for LCM at this cell (STUDY.md part 8); for PD no mixture beats base there, so DDIL's own priors
COLUMNS = [("mmd", "MMD", 1e3, "x1e-3, lower is better"), ("nll", "NLL", 1, "exact, lower"),
           ("mode_coverage", "modes", 1, "coverage, higher"), ("mode_precision", "precision", 1, "higher"),
           ("density", "density", 1, "~1 is ideal"), ("coverage", "coverage", 1, "higher"),
           ("shift_last", "shift", 1e3, "MMD x1e-3 of x_{tau_{N-1}} to p_{tau_{N-1}}, lower"),
           ("ratio_last", "err ratio", 1, "one-step error on own / on teacher states at the last step (toy.shift), "
            "1 = no covariate shift"),
           ("ratio_teacher_last", "control", 1, "the same ratio for the teacher's own single DDIM step: a ratio above it is "
            "covariate shift beyond how hard the states are"),
           ("err_own_last", "own err", 1e3, "x1e-3, the one-step error on the student's own states at the last step, lower")]


def suite_configs(seeds, quick: bool, mixture: str, steps: int, high_d: str = HIGH_D["mixture"]) -> list[run.ToyConfig]:
    """Every (panel, method, variant, seed) config of the suite: the 2-D panel on `mixture`, and the high-D panel
    (HIGH_D) on `high_d` unless it is 'none'."""
    kw = dict(mixture=mixture, steps=steps)
    if quick:
        kw.update(train_steps=300, init_steps=800, n_eval=1000, teacher_substeps=24)  # a smoke run, not the result
    cfgs = []
    for seed in seeds:
        for method in run.METHODS:
            for name, (use_ddil, reflect) in VARIANTS.items():
                if reflect != "none" and method not in REFLECTED:
                    continue
                cfgs.append(variant(method, use_ddil, reflect, seed, kw))
        for method in HIGH_D["betas"] if high_d != "none" else ():
            hd = {**kw, "mixture": high_d, "width": HIGH_D["width"]}
            hd["train_steps"] = kw.get("train_steps", HIGH_D["train_steps"]) if quick else HIGH_D["train_steps"]
            for use_ddil in (False, True):
                cfgs.append(variant(method, use_ddil, "none", seed, hd, HIGH_D["betas"][method]))
    return cfgs


def variant(method: str, use_ddil: bool, reflect: str, seed: int, kw: dict, betas=run.DDIL_BETAS) -> run.ToyConfig:
    """One run: a named variant (run.variant_config), +DDIL with the priors `betas` and the buffer they need."""
    cfg = run.variant_config(method, use_ddil, reflect, seed=seed, **kw)
    cfg.pd = dataclasses.replace(cfg.pd, N_start=2 * kw["steps"], N_final=kw["steps"])
    if use_ddil and tuple(betas) != run.DDIL_BETAS:
        cfg.ddil = dataclasses.replace(cfg.ddil, beta_frwd=betas[0], beta_teacher=betas[1], beta_student=betas[2])
        cfg.ddil = dataclasses.replace(cfg.ddil, buffer_capacity=run.default_buffer(cfg.ddil, cfg.batch_size, cfg.steps))
    return cfg


def panel_key(cfg: dict, mixture: str) -> str:
    """A run's row in the tables: method and variant, with the priors when they are not DDIL's, and the mixture in the
    high-D panel."""
    name = f"{cfg['method'].upper()} {run.variant_name(cfg)}"
    betas = (cfg["ddil"]["beta_frwd"], cfg["ddil"]["beta_teacher"], cfg["ddil"]["beta_student"])
    if run.variant_name(cfg) == "+DDIL" and betas != run.DDIL_BETAS:
        name += " " + "/".join(f"{b:g}" for b in betas)
    return name if cfg["mixture"] == mixture else f"{name} ({cfg['mixture']})"


NO_SHIFT = {key: float("nan") for key in ("shift_last", "ratio_last", "ratio_teacher_last", "err_own_last")}  # reference rows


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
            rows[name].append({**metrics.sample_metrics(gmm, x0, data), **NO_SHIFT})
        other, _ = mixtures.sample(gmm, n_eval, torch.Generator().manual_seed(40_000 + seed))
        rows["data vs data (floor)"].append({**metrics.sample_metrics(gmm, other, data), **NO_SHIFT})
    return {"rows": rows, "sweep": {str(S): v for S, v in sweep.items()}, "steps_used": steps * substeps}


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def table(results: list[dict], reference: dict, mixture: str = "ring8") -> tuple[str, dict]:
    """Markdown table of mean +- std over seeds ('–' for the std of a single seed), and the same numbers as a dict.
    Rows are named by panel_key (the high-D panel's carry their mixture), then the reference rows."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(panel_key(r["config"], mixture), []).append(r["metrics"])
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


SUITE_FLAGS = {"seeds": "--seeds", "jobs": "--jobs", "steps": "--steps", "mixture": "--mixture", "high_d": "--high-d"}  # field -> flag


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


def init_key(cfg: run.ToyConfig) -> tuple:
    """Runs that start from one network teacher (run.fit_init_state) share this key."""
    return (cfg.mixture, cfg.seed, cfg.width)


def run_in_pool(pool, cfgs: list[run.ToyConfig], seeds: list[int], a, bar) -> tuple[list[dict], dict]:
    """Every run and the teacher references on the worker pool: each (mixture, seed, width)'s network-teacher pre-fit
    first (shared by all its variants), the references per seed and panel beside them, then the runs longest first as
    their pre-fit is ready. Returns the results in the order of cfgs, and the references (the high-D panel's rows carry
    its mixture in their names)."""
    first = {}
    for c in cfgs:
        first.setdefault(init_key(c), c)
    inits = {key: pool.submit(run.fit_init_state, c) for key, c in first.items()}
    panels = [a.mixture] + ([a.high_d] if a.high_d != "none" else [])
    refs = {mx: [pool.submit(teacher_reference, mx, a.steps, [seed], cfgs[0].n_eval, cfgs[0].teacher_substeps,
                             sweep=mx == a.mixture) for seed in seeds] for mx in panels}  # they need no pre-fit: a worker makes them while another fits
    jobs = {id(c): pool.submit(run.run_from_init, c, inits[init_key(c)].result()) for c in longest_first(cfgs)}
    for job in jobs.values():
        job.add_done_callback(lambda _: bar.update(1))
    results = [jobs[id(c)].result() for c in cfgs]
    bar.close()
    reference = merge_references([r.result() for r in refs[a.mixture]])
    for mx in panels[1:]:
        high = merge_references([r.result() for r in refs[mx]])
        reference["rows"].update({f"{name} ({mx})": rows for name, rows in high["rows"].items() if name != f"teacher DDIM {a.steps}"})
    return results, reference


def main(argv=None) -> int:
    p = run.Parser(prog="python -m toy.suite", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 300 steps, K=24 teacher substeps: a smoke run (26 s on 2 quiet cores)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (full mode), >= 1")
    p.add_argument("--steps", type=int, default=4, help="N student steps, in [1, 50]")
    p.add_argument("--mixture", default="ring8", help=f"the 2-D panel's mixture: built-in ({', '.join(mixtures.BUILTINS)}) or a mixture JSON path")
    priors = ", ".join(f"{m.upper()} {'/'.join(f'{b:g}' for b in v)}" for m, v in HIGH_D["betas"].items())
    p.add_argument("--high-d", default=HIGH_D["mixture"], help="the high-D panel's mixture (base and +DDIL at width "
                   f"{HIGH_D['width']}, {HIGH_D['train_steps']} steps, priors {priors}), or 'none'")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes, >= 1")
    p.add_argument("--out", type=Path, default=Path("results/toy"), help="output directory, checked before the runs")
    a = p.parse_args(argv)
    try:
        ddil.require(a.seeds >= 1, "seeds", a.seeds, ">= 1")
        ddil.require(a.jobs >= 1, "jobs", a.jobs, ">= 1")
        ddil.require(a.steps >= 1, "steps", a.steps, ">= 1 (and <= LCM's original_steps, 50)")  # before any config divides by it
        seeds = [0] if a.quick else list(range(a.seeds))
        if a.high_d != "none":
            try:
                run.check_mixture_path(a.high_d)
                mixtures.load_mixture(a.high_d)
            except (ddil.ConfigError, mixtures.MixtureError) as e:
                raise ddil.ConfigError(f"high_d={a.high_d!r} is invalid: allowed a mixture ('ring8-d32', a JSON path) or "
                                       f"'none' ({str(e).split(': ', 1)[-1]})") from None
        cfgs = suite_configs(seeds, a.quick, a.mixture, a.steps, a.high_d)
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
    md, summary = table(results, reference, a.mixture)
    print(md)
    print(f"\n{len(cfgs)} runs, {len(seeds)} seed(s), {elapsed:.0f} s wall on {a.jobs} worker(s)")
    a.out.mkdir(parents=True, exist_ok=True)
    flat = [r for r in results if r["config"]["mixture"] == a.mixture]
    figures = plots.suite_figures(flat, reference, a.out, a.mixture)
    if a.high_d != "none":
        figures.update(plots.high_d_figures([r for r in results if r["config"]["mixture"] == a.high_d], a.out, a.high_d))
    command = ("python -m toy.suite" + (" --quick" if a.quick else f" --seeds {a.seeds}")
               + f" --steps {a.steps} --mixture {a.mixture} --high-d {a.high_d}")
    for r in results:  # the high-D panel's intermediate states (5 x 500 x D) are not drawn: keep results.json small
        if r["config"]["mixture"] != a.mixture:
            r["metrics"].pop("states", None)
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
