"""The toy study's design (toy/study.py runs it, toy/study_report.py writes it up): its scale, its cells, each
one toy run (toy.run.run_one) cached by the hash of its resolved config and written atomically, so an interrupted
study resumes where it stopped and a changed config recomputes its cell; and the statistics over seeds (95 %
Student-t intervals, paired verdicts)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


import ddil
from toy import run

TUNE_MIXTURE = "ring8"  # every hyperparameter was chosen on this mixture only
HELD_OUT = ("unequal", "aniso")  # never used to choose anything
METHODS = run.METHODS
VARIANTS = {"base": (False, "none"), "+DDIL": (True, "none"), "+reflected": (False, "reflect"),
            "+DDIL+reflected": (True, "reflect")}
ABLATION_METHOD = "dmd2"  # ablations run on the method where DDIL changes the most in `make toy`
COLUMNS = [("mmd", "MMD ×1e-3", 1e3), ("nll", "NLL", 1), ("mode_coverage", "modes", 1), ("mode_precision", "precision", 1),
           ("density", "density", 1), ("coverage", "coverage", 1), ("shift_last", "shift ×1e-3", 1e3),
           ("ratio_last", "err ratio", 1)]


@dataclass
class Scale:
    seeds_main: int = 3  # seeds of the 2-D main and held-out tables
    seeds_ablation: int = 2  # seeds of every ablation cell and of part 6's scans
    train_steps: int = 600  # optimiser steps of every cell (make toy uses 1500; the study trades length for breadth)
    init_steps: int = 2000  # regression steps of the network teacher students start from
    beta_divisions: int = 3  # the simplex grid of priors has steps of 1 / beta_divisions
    steps: tuple = (2, 4, 8)  # student steps N of part 1
    methods: tuple = METHODS  # base methods of parts 1-3
    held_out: tuple = ("unequal",)  # held-out 2-D mixtures of part 3 (of HELD_OUT)
    ablations: bool = True  # run part 4
    n_eval: int = 2000  # samples per metric
    dims: tuple = (2, 8, 32, 128)  # part 6: data dimension D of ring8-d<D> (ring8 on a 2-plane of R^D)
    seeds_dim: int = 5  # seeds of part 6's verdict cells (N = 4, width 128, every D; and the high-D held-out family)
    dim_scan: int = 32  # the D of part 6's scans over N and width (seeds_ablation seeds each)
    dim_widths: tuple = (256,)  # student widths of the width scan, beside 128
    dim_held_out: tuple = ("lowrank-d32",)  # high-D held-out families of part 6 (never tuned on)
    zero_snr_control: bool = True  # part 6: base and +DDIL at D = dim_scan on a zero-terminal-SNR schedule
    map_dims: tuple = (32, 8)  # part 8, the on-policy map, on ring8-d<D>: the first D gets every cell, the others one
    map_widths: tuple = (64, 128, 512)  # the map's width scan, at map_steps[1] steps (128: also the length scan's width)
    map_steps: tuple = (600, 1500, 6000)  # the map's length scan, at width 128
    map_seeds: int = 3  # seeds of every map cell
    map_held_out: tuple = ("lowrank-d32",)  # part 8's held-out families: PD and LCM base, +DDIL, student only (never tuned on)
    mechanism_seeds: int = 5  # seeds of the mechanism's cells (PD at the widest width: base's spread over seeds is wide)
    map_dmd2_max: tuple = (128, 1500)  # DMD2 (3 networks a step) runs only cells up to this (width, steps)
    mechanism: bool = True  # part 8: PD +DDIL at the widest width of the scan, one change at a time


QUICK = Scale(seeds_main=2, seeds_ablation=1, train_steps=150, init_steps=500, beta_divisions=2, steps=(2, 4),
              methods=("lcm",), held_out=("unequal",), ablations=True, n_eval=500, dims=(2, 16), seeds_dim=2,
              dim_scan=16, dim_widths=(64,), dim_held_out=("lowrank-d16",), map_dims=(16,), map_widths=(32, 64),
              map_steps=(100, 150, 200), map_seeds=2, map_held_out=("lowrank-d16",), map_dmd2_max=(64, 150),
              mechanism=False)


# ----------------------------------------------------------------------------------------------------
# Cells: (part, label, config, cache key), and the cache


class Cell(NamedTuple):
    part: str  # which part of the report ('shift', 'main ring8', 'betas', ...)
    label: str  # the row / bar it belongs to
    cfg: run.ToyConfig  # the run (its seed is one of the row's seeds)
    key: str  # config_key(cfg), the cache file name


def cell(method: str, variant: str, seed: int, scale: Scale, mixture: str = TUNE_MIXTURE, steps: int = 4,
         **ddil_kw) -> run.ToyConfig:
    """The config of one cell: a named variant, then any DDIL overrides (priors, buffer, mixing)."""
    use_ddil, reflect = VARIANTS[variant]
    cfg = run.variant_config(method, use_ddil, reflect, seed=seed, mixture=mixture, steps=steps,
                             train_steps=scale.train_steps, init_steps=scale.init_steps, n_eval=scale.n_eval)
    cfg.pd = dataclasses.replace(cfg.pd, N_start=2 * steps, N_final=steps)
    cfg.ddil = dataclasses.replace(cfg.ddil, **ddil_kw)
    if use_ddil and "buffer_capacity" not in ddil_kw:  # other priors or refresh: the default rule, not a stale 512
        cfg.ddil = dataclasses.replace(cfg.ddil, buffer_capacity=run.default_buffer(cfg.ddil, cfg.batch_size, cfg.steps))
    return cfg


def with_reflect(cfg: run.ToyConfig, **kw) -> run.ToyConfig:
    cfg.reflect = dataclasses.replace(cfg.reflect, **kw)
    return cfg


def ablation_cells(scale: Scale) -> list[tuple]:
    """Part 4: each ablation varies one thing around +DDIL on the ablation method, ring8, N = 4."""
    m, out = ABLATION_METHOD, []
    seeds = range(scale.seeds_ablation)
    add = lambda part, label, make: out.extend((part, label, make(s)) for s in seeds)  # noqa: E731
    d = scale.beta_divisions
    grid = [(f / d, t / d, (d - f - t) / d) for f in range(d + 1) for t in range(d + 1 - f)]
    for b in grid:
        add("betas", f"{b[0]:.2f}/{b[1]:.2f}/{b[2]:.2f}", lambda s, b=b: cell(
            m, "+DDIL", s, scale, beta_frwd=b[0], beta_teacher=b[1], beta_student=b[2],
            beta_mix_start=1.0 if b[1] + b[2] else 0.0))
    add("teacher", "teacher on (0.5/0.25/0.25)", lambda s: cell(m, "+DDIL", s, scale))
    add("teacher", "teacher off (0.5/0/0.5)", lambda s: cell(m, "+DDIL", s, scale, beta_teacher=0.0, beta_student=0.5))
    add("teacher", "teacher off, refresh 0.5 (2x student rollouts)", lambda s: cell(
        m, "+DDIL", s, scale, beta_teacher=0.0, beta_student=0.5, refresh_share=0.5))
    add("mixing", "annealed 1 -> 0", lambda s: cell(m, "+DDIL", s, scale))
    for b in (0.0, 0.5, 1.0):
        add("mixing", f"constant {b}", lambda s, b=b: cell(m, "+DDIL", s, scale, beta_mix_start=b, beta_mix_end=b))
    for cap, share in ((0, 1.0), (512, 0.25), (2048, 0.1), (2048, 0.25), (8192, 0.25)):
        add("buffer", f"capacity {cap}, refresh {share}" if cap else "no buffer (all fresh)",
            lambda s, cap=cap, share=share: cell(m, "+DDIL", s, scale, buffer_capacity=cap, refresh_share=share))
    add("reflect", "none", lambda s: cell(m, "+DDIL", s, scale))
    for frac in (0.75, 1.0):
        for mode in ("clip", "reflect"):
            add("reflect", f"{mode} r={frac}x data range", lambda s, mode=mode, frac=frac: with_reflect(
                cell(m, "+DDIL", s, scale), mode=mode, range=round(frac * run.mixture_range(TUNE_MIXTURE), 3)))
    for ratio in (0.995,):
        add("reflect", f"dynamic ratio {ratio}", lambda s, ratio=ratio: with_reflect(cell(m, "+DDIL", s, scale), mode="dynamic", ratio=ratio))
    for width in (32, 128, 256):
        for v in ("base", "+DDIL"):
            add("width", f"{v} width {width}", lambda s, v=v, width=width: dataclasses.replace(cell(m, v, s, scale), width=width))
    return out


def study_cells(scale: Scale) -> list[Cell]:
    """Every cell of the study, tagged by part and label. Identical configs share one cache entry."""
    out = []
    for method in scale.methods:
        for N in scale.steps:  # part 1
            for v in ("base", "+DDIL"):
                out += [("shift", f"{method} {v} N={N}", cell(method, v, s, scale, steps=N)) for s in range(scale.seeds_ablation)]
        for mixture in (TUNE_MIXTURE,) + tuple(scale.held_out):  # parts 2 and 3
            for v in VARIANTS:
                out += [(f"main {mixture}", f"{method.upper()} {v}", cell(method, v, s, scale, mixture=mixture)) for s in range(scale.seeds_main)]
        out += [("cost", f"{method.upper()} base, 2x steps", dataclasses.replace(cell(method, "base", s, scale), train_steps=2 * scale.train_steps))
                for s in range(scale.seeds_main)]  # part 5: the base method given DDIL's wall time
    out += ablation_cells(scale) if scale.ablations else []
    out = map_cells(scale) + (mechanism_cells(scale) if scale.mechanism and "pd" in scale.methods else []) + out
    out += dim_cells(scale)
    return [Cell(part, label, cfg, config_key(cfg)) for part, label, cfg in out]


def dim_mixture(d: int, family: str = TUNE_MIXTURE) -> str:
    """The mixture name of a family in D dimensions: ring8 itself at D = 2, else ring8-d<D>."""
    return family if d == 2 else f"{family}-d{d}"


ZERO_SNR = "zero-SNR"  # the label tag of part 6's zero-terminal-SNR control cells


def dim_cells(scale: Scale) -> list[tuple]:
    """Part 6, covariate shift vs dimension: every method base vs +DDIL at N = 4, width 128 for each D
    (seeds_dim seeds: the verdict cells); at D = dim_scan, N in scale.steps and the widths (seeds_ablation
    seeds); the high-D held-out families; and the zero-terminal-SNR control at D = dim_scan (seeds_ablation seeds).
    Labels: '<method> <variant> D=<D> N=<N> w=<width>[ <mixture>| zero-SNR]'."""
    out = []
    for m in scale.methods:
        for v in ("base", "+DDIL"):
            one = lambda d, N, width, seeds, mixture=None: [(  # noqa: E731
                "dim", f"{m} {v} D={d} N={N} w={width}" + (f" {mixture}" if mixture else ""),
                dataclasses.replace(cell(m, v, s, scale, mixture=mixture or dim_mixture(d), steps=N), width=width))
                for s in range(seeds)]
            for d in scale.dims:
                out += one(d, 4, 128, scale.seeds_dim)
            for N in scale.steps:
                out += one(scale.dim_scan, N, 128, scale.seeds_ablation) if N != 4 else []
            for width in scale.dim_widths:
                out += one(scale.dim_scan, 4, width, scale.seeds_ablation)
            for mixture in scale.dim_held_out:
                d = int(mixture.rsplit("-d", 1)[1])
                out += one(d, 4, 128, scale.seeds_dim, mixture)
            if scale.zero_snr_control:  # Lin et al. 2024: x_T ~ N(0, I) is then exactly p_T, so no sampler starts off it
                out += [("dim", f"{m} {v} D={scale.dim_scan} N=4 w=128 {ZERO_SNR}", dataclasses.replace(
                    cell(m, v, s, scale, mixture=dim_mixture(scale.dim_scan)),
                    schedule=ddil.ScheduleConfig(zero_terminal_snr=True))) for s in range(scale.seeds_ablation)]
    return out


MAP_ARMS = ("base", "+DDIL", "mostly student", "student only", "oracle", "oracle labels")  # of run.ARMS, in this order
HELD_OUT_MAP_METHODS = ("pd", "lcm")  # part 8's held-out check: make toy's high-D panel's methods
HELD_OUT_MAP_ARMS = ("base", "+DDIL", "student only")  # the arms a user would choose between


def map_label(m: str, arm: str, d: int, width: int, steps: int) -> str:
    return f"{m} {arm} D={d} w={width} steps={steps}"


def length_scan_width(scale: Scale) -> int:
    """The width of the map's length scan and of its other Ds: 128 (part 6's), else the widest of the scan."""
    return 128 if 128 in scale.map_widths else max(scale.map_widths)


def map_grid(scale: Scale, d: int, m: str) -> list[tuple[int, int]]:
    """The (width, steps) cells of one method and D: at the first D the width scan at map_steps[1] and the length scan
    at width 128 (a cross, not the full product); at the other Ds the shortest length at width 128. DMD2 only up to
    map_dmd2_max."""
    mid, w0 = scale.map_steps[1], length_scan_width(scale)
    if d != scale.map_dims[0]:
        cells = [(w0, scale.map_steps[0])]
    else:
        cells = sorted({(w, mid) for w in scale.map_widths} | {(w0, n) for n in scale.map_steps})
    if m == "dmd2":
        cells = [(w, n) for w, n in cells if w <= scale.map_dmd2_max[0] and n <= scale.map_dmd2_max[1]]
    return cells


def map_arms(m: str, width: int, steps: int, scale: Scale) -> list[str]:
    """The arms of one cell. DMD2's base already trains on its own backward simulations, so its student arms are its
    base; 'mostly student' runs at width 128 up to map_steps[1] steps, and 'oracle labels' (forward states with exact
    labels: what the labels alone buy) from map_steps[1] steps on, above the smallest width."""
    if m == "dmd2":
        return ["base", "+DDIL", "oracle"]
    arms = ["base", "+DDIL", "student only", "oracle"]
    arms += ["mostly student"] if width == 128 and steps <= scale.map_steps[1] else []
    arms += ["oracle labels"] if steps >= scale.map_steps[1] and width != min(scale.map_widths) else []
    return [a for a in MAP_ARMS if a in arms]


def map_config(m: str, arm: str, seed: int, scale: Scale, d, width: int, steps: int) -> run.ToyConfig:
    """One map cell's run on ring8-d<d> (d an int) or on the mixture named d. base and +DDIL are the study's own cells
    (part 6's at 600 steps: the cache shares them)."""
    sc, mixture = dataclasses.replace(scale, train_steps=steps), d if isinstance(d, str) else dim_mixture(d)
    if arm in ("base", "+DDIL"):
        return dataclasses.replace(cell(m, arm, seed, sc, mixture=mixture), width=width)
    cfg = run.arm_config(m, arm, seed=seed, mixture=mixture, steps=4, train_steps=steps, init_steps=scale.init_steps,
                         n_eval=scale.n_eval, width=width)
    cfg.pd = dataclasses.replace(cfg.pd, N_start=8, N_final=4)
    return cfg


def map_cells(scale: Scale) -> list[tuple]:
    """Part 8, where on-policy training helps: for each method, D, (width, steps) and arm, map_seeds seeds; and on each
    held-out family (map_held_out) PD and LCM's base, +DDIL and student-only arms at width 128, map_steps[1] steps."""
    out = []
    for d in scale.map_dims:
        for m in scale.methods:
            for width, steps in map_grid(scale, d, m):
                for arm in map_arms(m, width, steps, scale):
                    out += [("map", map_label(m, arm, d, width, steps), map_config(m, arm, s, scale, d, width, steps))
                            for s in range(scale.map_seeds)]
    for mixture in scale.map_held_out:
        for m in (m for m in scale.methods if m in HELD_OUT_MAP_METHODS):
            for arm in HELD_OUT_MAP_ARMS:
                out += [("map held-out", f"{mixture} {m} {arm}", map_config(m, arm, s, scale, mixture, 128, scale.map_steps[1]))
                        for s in range(scale.map_seeds)]
    return out


MECHANISM = {  # PD +DDIL at the widest width: each changes one thing of +DDIL (label: DDILConfig overrides, labels)
    "+DDIL (0.5/0.25/0.25, buffer 512, mixing 1 -> 0)": ({}, "base"),
    "forward share 0.75 (0.75/0.125/0.125)": ({"beta_frwd": 0.75, "beta_teacher": 0.125, "beta_student": 0.125}, "base"),
    "teacher rollouts only (0.5/0.5/0)": ({"beta_teacher": 0.5, "beta_student": 0.0}, "base"),
    "student rollouts only (0.5/0/0.5)": ({"beta_teacher": 0.0, "beta_student": 0.5}, "base"),
    "exact labels (not the round teacher's)": ({}, "exact"),
    "no buffer (fresh rollouts)": ({"buffer_capacity": 0}, "base"),
    "mixing constant 0 (the student acts from step 0)": ({"beta_mix_start": 0.0}, "base"),
}


def mechanism_cells(scale: Scale) -> list[tuple]:
    """Part 8's mechanism of PD +DDIL at width max(map_widths), D = map_dims[0], map_steps[1] steps: base (as in the
    map) and the MECHANISM changes of +DDIL, mechanism_seeds seeds each."""
    d, width, steps = scale.map_dims[0], max(scale.map_widths), scale.map_steps[1]
    out = [("mechanism", "base", map_config("pd", "base", s, scale, d, width, steps)) for s in range(scale.mechanism_seeds)]
    for label, (kw, labels) in MECHANISM.items():
        for s in range(scale.mechanism_seeds):
            cfg = map_config("pd", "+DDIL", s, scale, d, width, steps)
            cfg.ddil, cfg.labels = dataclasses.replace(cfg.ddil, **kw), labels
            if "buffer_capacity" not in kw:
                cfg.ddil = dataclasses.replace(cfg.ddil, buffer_capacity=run.default_buffer(cfg.ddil, cfg.batch_size, cfg.steps))
            out.append(("mechanism", label, cfg))
    return out


def config_key(cfg: run.ToyConfig) -> str:
    """Cache key: sha256 of the resolved config as canonical JSON (any changed field changes the key)."""
    resolved, _ = run.resolve(cfg)  # resolve returns a new config; cfg is left as it was
    blob = json.dumps(dataclasses.asdict(resolved), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def init_key(cfg: run.ToyConfig) -> tuple:
    """Cells that share a network teacher (students start from it) share this key."""
    return (cfg.mixture, cfg.seed, cfg.width, cfg.depth, cfg.init_steps, cfg.batch_size, cfg.lr)


def _compute(args) -> tuple[str, dict]:
    key, cfg, init_state, cache = args
    res = run.run_from_init(cfg, init_state)
    res["metrics"].pop("states", None)  # keep the cache small: samples stay for the figures
    run.write_json_atomic(res, cache / f"{key}.json")
    return key, res


def cost_rank(cfg: run.ToyConfig) -> float:
    """A rough relative cost of one cell, to hand the longest to the workers first (so none idles at the end): steps,
    times about 8 for the oracle's converged labels, 3 for DMD2's three networks, 2 for rollouts, and a wider MLP."""
    factor = (8.0 if cfg.ddil.beta_student > 0 else 3.0) if cfg.labels == "exact" else (3.0 if cfg.method == "dmd2" else 1.0)
    rollouts = 2.0 if cfg.ddil.beta_teacher + cfg.ddil.beta_student > 0 else 1.0
    return cfg.train_steps * factor * rollouts * (1 + cfg.width / 256)


def load_cached(path: Path):
    """A cached cell's result, or None when it is missing or unreadable (then the cell is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or not JSON (a file damaged outside the study's atomic writes)
        return None


def compute_all(cells, cache: Path, jobs: int, progress) -> dict[str, dict]:
    """Run every uncached cell (fitting the needed network teachers first) and return {key: result}."""
    cache.mkdir(parents=True, exist_ok=True)
    keys = {c.key: c.cfg for c in cells}
    results = {k: r for k in keys if (r := load_cached(cache / f"{k}.json")) is not None}
    todo = {k: c for k, c in keys.items() if k not in results}
    if not todo:
        return results
    needed = {}
    for c in todo.values():
        needed.setdefault(init_key(c), c)
    with ProcessPoolExecutor(jobs, initializer=run.single_thread) as pool:
        inits = dict(zip(needed, pool.map(run.fit_init_state, needed.values())))
        work = [(k, c, inits[init_key(c)], cache) for k, c in sorted(todo.items(), key=lambda kc: -cost_rank(kc[1]))]
        for key, res in progress(pool.map(_compute, work), total=len(work)):
            results[key] = res
    return results


# ----------------------------------------------------------------------------------------------------
# Statistics


def t_quantile(n: int) -> float:
    """The two-sided 95% Student-t quantile t_{0.975, n-1}."""
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval, t_{0.975, n-1} s / sqrt(n); 0 for n = 1."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n) * s / math.sqrt(n)


def paired_verdict(a: list[float], b: list[float], lower_is_better: bool = True) -> str:
    """Compare b against a, paired by seed: 'better', 'worse' or 'no clear difference' (95% CI of b - a)."""
    d, half = mean_ci([y - x for x, y in zip(a, b)])
    if abs(d) <= half or len(a) < 2:
        return "no clear difference"
    return "better" if (d < 0) == lower_is_better else "worse"


# ----------------------------------------------------------------------------------------------------
# The report


def group(cells, results, part: str) -> dict[str, list[dict]]:
    """{label: [result per seed, ordered by seed]} for one part."""
    out: dict[str, list] = {}
    for c in cells:
        if c.part == part:
            out.setdefault(c.label, []).append((c.cfg.seed, results[c.key]))
    return {k: [r for _, r in sorted(v, key=lambda x: x[0])] for k, v in out.items()}


def metric_table(groups: dict[str, list[dict]]) -> str:
    lines = ["| variant | " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for label, rs in groups.items():
        cells = []
        for key, _, scale in COLUMNS:
            m, h = mean_ci([r["metrics"][key] for r in rs])
            cells.append(run.pm(m * scale, h * scale, len(rs)))  # '± –' for a single seed
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(groups: dict[str, list[dict]], methods) -> list[str]:
    """One plain-words line per method and comparison, from paired 95% CIs over seeds."""
    out = []
    for m in methods:
        base = groups.get(f"{m.upper()} base")
        for v in ("+DDIL", "+reflected", "+DDIL+reflected"):
            other = groups.get(f"{m.upper()} {v}")
            if not base or not other:
                continue
            mmd = paired_verdict([r["metrics"]["mmd"] for r in base], [r["metrics"]["mmd"] for r in other])
            modes = paired_verdict([r["metrics"]["mode_coverage"] for r in base], [r["metrics"]["mode_coverage"] for r in other], False)
            d, h = mean_ci([1e3 * (o["metrics"]["mmd"] - b["metrics"]["mmd"]) for b, o in zip(base, other)])
            diff = f"{d:+.1f} ± {h:.1f}" if len(base) > 1 else f"{d:+.1f} ± –"  # one seed: no interval
            out.append(f"- {m.upper()} {v} vs base: MMD **{mmd}** (difference {diff} ×1e-3), mode coverage {modes}.")
    return out
