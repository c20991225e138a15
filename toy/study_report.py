"""STUDY.md and its figures, generated from the study's cells (toy/study_cells.py, run by toy/study.py). Never edit STUDY.md by hand."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from toy import mixtures, run, study_cells, study_map, suite  # noqa: E402
from toy.study_cells import mean_ci  # noqa: E402
from toy.study_map import control_ratio  # noqa: E402
from toy.plots import save  # noqa: E402

COLORS = {"base": "tab:red", "+DDIL": "tab:blue"}


def _m(rs, key, scale=1.0):
    """Mean and 95% CI half-width of a metric over a list of runs."""
    m, h = mean_ci([scale * r["metrics"][key] for r in rs])
    return m, h


# ----------------------------------------------------------------------------------------------------
# Part 1: covariate shift per step


def shift_part(cells, results, scale, out: Path) -> str:
    g = study_cells.group(cells, results, "shift")
    fig, axes = plt.subplots(2 * len(scale.methods), len(scale.steps), figsize=(3.4 * len(scale.steps), 2.6 * 2 * len(scale.methods)), squeeze=False)
    rows = ["| method | N | k | t | base MMD ×1e-3 | +DDIL MMD ×1e-3 | base xent − floor | +DDIL xent − floor |", "|---|---|---|---|---|---|---|---|"]
    for i, m in enumerate(scale.methods):
        for j, N in enumerate(scale.steps):
            curves = {}
            for v in ("base", "+DDIL"):
                rs = g[f"{m} {v} N={N}"]
                ks = [row["k"] for row in rs[0]["metrics"]["shift"]]
                mmd = [mean_ci([1e3 * r["metrics"]["shift"][q]["mmd_to_forward"] for r in rs]) for q in range(len(ks))]
                gap = [mean_ci([r["metrics"]["shift"][q]["xent"] - r["metrics"]["shift"][q]["xent_forward"] for r in rs]) for q in range(len(ks))]
                curves[v] = (ks, mmd, gap, [row["t"] for row in rs[0]["metrics"]["shift"]])
                for ax, series in ((axes[2 * i][j], mmd), (axes[2 * i + 1][j], gap)):
                    ax.errorbar(ks, [s[0] for s in series], yerr=[s[1] for s in series], fmt="-o", c=COLORS[v], label=v, capsize=2)
            n = len(g[f"{m} base N={N}"])  # seeds per cell: '± –' for a single seed
            for q, k in enumerate(curves["base"][0]):
                b, d = curves["base"], curves["+DDIL"]
                rows.append(f"| {m.upper()} | {N} | {k} | {b[3][q]} | {run.pm(*b[1][q], n)} | {run.pm(*d[1][q], n)} | "
                            f"{run.pm(*b[2][q], n, '.3f')} | {run.pm(*d[2][q], n, '.3f')} |")
            axes[2 * i][j].set_title(f"{m.upper()} N={N}: MMD to p_tau (x1e-3)", fontsize=9)
            axes[2 * i + 1][j].set_title(f"{m.upper()} N={N}: xent - entropy floor (nats)", fontsize=9)
            for ax in (axes[2 * i][j], axes[2 * i + 1][j]):
                ax.axhline(0, c="k", lw=0.5), ax.set_xlabel("student step k")
    axes[0][0].legend(fontsize=7)
    save(fig, out / "study-shift.png")
    return "\n".join(rows)


def shift_finding(cells, results, scale) -> str:
    """One line per method: the last intermediate step's shift (MMD to p_tau) for base and +DDIL at the largest N."""
    g = study_cells.group(cells, results, "shift")
    N = max(scale.steps)
    parts = []
    for m in scale.methods:
        b, d = (mean_ci([1e3 * r["metrics"]["shift"][-1]["mmd_to_forward"] for r in g[f"{m} {v} N={N}"]]) for v in ("base", "+DDIL"))
        n = len(g[f"{m} base N={N}"])
        parts.append(f"{m.upper()} {run.pm(*b, n, '.1f')} (base) vs {run.pm(*d, n, '.1f')} (+DDIL)")
    return (f"At N = {N}, the shift of the last intermediate state (MMD ×1e-3 to p_tau): " + "; ".join(parts)
            + ". Values within about ±2 are at the MMD's noise floor for these sample sizes.")


def summary_lines(cells, results, scale) -> list[str]:
    """Per method and variant: the paired MMD verdict on each mixture, in one line."""
    mixtures = (study_cells.TUNE_MIXTURE,) + tuple(scale.held_out)
    groups = {mx: study_cells.group(cells, results, f"main {mx}") for mx in mixtures}
    out = []
    for m in scale.methods:
        for v in ("+DDIL", "+reflected", "+DDIL+reflected"):
            says = []
            for mx in mixtures:
                g = groups[mx]
                a, b = g[f"{m.upper()} base"], g[f"{m.upper()} {v}"]
                verdict = study_cells.paired_verdict([r["metrics"]["mmd"] for r in a], [r["metrics"]["mmd"] for r in b])
                cov = study_cells.paired_verdict([r["metrics"]["mode_coverage"] for r in a], [r["metrics"]["mode_coverage"] for r in b], False)
                says.append(f"{mx}: {verdict}" + (f" (mode coverage {cov})" if cov != "no clear difference" else ""))
            out.append(f"- **{m.upper()} {v}** vs base, MMD: " + "; ".join(says) + ".")
    return out


# ----------------------------------------------------------------------------------------------------
# Parts 2-3: main tables with reference rows


def reference_rows(mixture: str, scale) -> str:
    ref = suite.teacher_reference(mixture, 4, list(range(scale.seeds_main)), scale.n_eval, 48, sweep=False)
    lines = []
    for name, rows in ref["rows"].items():
        cells = []
        for key, _, s in study_cells.COLUMNS:
            vals = [r[key] for r in rows if r[key] == r[key]]
            if not vals:
                cells.append("–")
                continue
            m, h = mean_ci([s * v for v in vals])
            cells.append(run.pm(m, h, len(vals)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_part(cells, results, scale, mixture: str) -> tuple[str, list[str]]:
    g = study_cells.group(cells, results, f"main {mixture}")
    table = study_cells.metric_table(g) + "\n" + reference_rows(mixture, scale)
    return table, study_cells.verdict_lines(g, scale.methods)


# ----------------------------------------------------------------------------------------------------
# Part 4: ablations, one figure and one finding each


def bar_part(cells, results, part: str, title: str, out: Path, key: str = "mmd") -> str:
    """A bar chart of MMD (mean, 95% CI) per label of an ablation part; returns its one-line finding."""
    g = study_cells.group(cells, results, part)
    labels = list(g)
    stats = [_m(g[lab], key, 1e3) for lab in labels]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 3.4))
    ax.bar(range(len(labels)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("MMD to data x1e-3 (lower is better)"), ax.set_title(title, fontsize=9)
    save(fig, out / f"study-{part}.png")
    best = min(range(len(labels)), key=lambda i: stats[i][0])
    worst = max(range(len(labels)), key=lambda i: stats[i][0])
    overlap = stats[best][0] + stats[best][1] >= stats[worst][0] - stats[worst][1]
    n = len(g[labels[best]])
    tail = ("; a single seed gives no confidence interval." if n < 2 else
            "; the CIs overlap, so no setting is clearly better." if overlap else ".")
    return (f"Best: {labels[best]} ({run.pm(*stats[best], n, '.1f')}); worst: {labels[worst]} "
            f"({run.pm(*stats[worst], n, '.1f')})" + tail)


def betas_part(cells, results, out: Path) -> str:
    """The beta priors over a grid on the simplex, drawn on a triangle coloured by MMD."""
    g = study_cells.group(cells, results, "betas")
    pts = []
    for label, rs in g.items():
        f, t, s = (float(x) for x in label.split("/"))
        pts.append((f, t, s, _m(rs, "mmd", 1e3)[0]))
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    xs = [t + s / 2 for f, t, s, _ in pts]
    ys = [s * 3 ** 0.5 / 2 for f, t, s, _ in pts]
    sc = ax.scatter(xs, ys, c=[p[3] for p in pts], s=260, cmap="YlGnBu")
    for x, y, p in zip(xs, ys, pts):
        ax.annotate(f"{p[3]:.0f}", (x, y), ha="center", va="center", fontsize=7, color="k")
    ax.plot([0, 1, 0.5, 0], [0, 0, 3 ** 0.5 / 2, 0], c="k", lw=0.5)
    ax.text(0, -0.07, "forward", ha="center"), ax.text(1, -0.07, "teacher", ha="center"), ax.text(0.5, 0.9, "student", ha="center")
    ax.set_xlim(-0.1, 1.1), ax.set_ylim(-0.12, 0.95), ax.set_aspect("equal"), ax.axis("off")
    fig.colorbar(sc, ax=ax, label="MMD x1e-3")
    save(fig, out / "study-betas.png")
    best, worst = min(pts, key=lambda p: p[3]), max(pts, key=lambda p: p[3])
    return (f"Best priors (frwd/teacher/student) {best[0]:.2f}/{best[1]:.2f}/{best[2]:.2f} at {best[3]:.1f}e-3; "
            f"worst {worst[0]:.2f}/{worst[1]:.2f}/{worst[2]:.2f} at {worst[3]:.1f}e-3.")


def width_part(cells, results, out: Path) -> str:
    g = study_cells.group(cells, results, "width")
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    widths = sorted({int(k.split()[-1]) for k in g})
    gaps = []
    for v in ("base", "+DDIL"):
        st = [_m(g[f"{v} width {w}"], "mmd", 1e3) for w in widths]
        ax.errorbar(widths, [s[0] for s in st], yerr=[s[1] for s in st], fmt="-o", c=COLORS[v], label=v, capsize=2)
        gaps.append(st)
    ax.set_xscale("log", base=2), ax.set_xlabel("student width"), ax.set_ylabel("MMD x1e-3"), ax.legend(fontsize=7)
    save(fig, out / "study-width.png")
    wins = [w for w, b, d in zip(widths, gaps[0], gaps[1]) if d[0] < b[0]]
    return f"+DDIL has the lower mean MMD at widths {wins or 'none'} of {widths}."


def steps_part(cells, results, scale, out: Path) -> str:
    g = study_cells.group(cells, results, "shift")
    fig, axes = plt.subplots(1, len(scale.methods), figsize=(3.6 * len(scale.methods), 3.0), squeeze=False)
    wins = []
    for ax, m in zip(axes[0], scale.methods):
        for v in ("base", "+DDIL"):
            st = [_m(g[f"{m} {v} N={N}"], "mmd", 1e3) for N in scale.steps]
            ax.errorbar(scale.steps, [s[0] for s in st], yerr=[s[1] for s in st], fmt="-o", c=COLORS[v], label=v, capsize=2)
        for N in scale.steps:
            if _m(g[f"{m} +DDIL N={N}"], "mmd")[0] < _m(g[f"{m} base N={N}"], "mmd")[0]:
                wins.append(f"{m.upper()} N={N}")
        ax.set_title(m.upper()), ax.set_xlabel("student steps N"), ax.set_ylabel("MMD x1e-3"), ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    save(fig, out / "study-steps.png")
    return f"+DDIL has the lower mean MMD in: {', '.join(wins) or 'none'}."


# ----------------------------------------------------------------------------------------------------
# Part 5: cost


def cost_part(cells, results, scale, out: Path) -> str:
    g = study_cells.group(cells, results, f"main {study_cells.TUNE_MIXTURE}")
    g.update(study_cells.group(cells, results, "cost"))
    lines = ["| variant | teacher NFE / step | student NFE / step | fake NFE / step | ms / step | train s | MMD ×1e-3 |", "|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, rs in g.items():
        c = {k: sum(r["cost"].get(k, 0.0) for r in rs) / len(rs) for k in ("teacher_nfe_per_step", "student_nfe_per_step", "fake_nfe_per_step", "ms_per_step")}
        train_s = sum(r["time"]["train_s"] for r in rs) / len(rs)
        mmd = _m(rs, "mmd", 1e3)
        lines.append(f"| {label} | {c['teacher_nfe_per_step']:.0f} | {c['student_nfe_per_step']:.0f} | {c['fake_nfe_per_step']:.0f} | "
                     f"{c['ms_per_step']:.1f} | {train_s:.1f} | {run.pm(*mmd, len(rs), '.1f')} |")
        ax.scatter(train_s, mmd[0], label=label, s=18)
    ax.set_xlabel("training wall time per run (s, 1 thread)"), ax.set_ylabel("MMD x1e-3"), ax.set_yscale("log")
    ax.legend(fontsize=5, ncol=2)
    save(fig, out / "study-cost.png")
    return "\n".join(lines)


def equal_time_lines(cells, results, scale) -> list[str]:
    main = study_cells.group(cells, results, f"main {study_cells.TUNE_MIXTURE}")
    cost = study_cells.group(cells, results, "cost")
    out = []
    for m in scale.methods:
        long_base, ddil_rs = cost.get(f"{m.upper()} base, 2x steps"), main.get(f"{m.upper()} +DDIL")
        if not long_base or not ddil_rs:
            continue
        ratio = (sum(r["time"]["train_s"] for r in ddil_rs) / sum(r["time"]["train_s"] for r in main[f"{m.upper()} base"]))
        v = study_cells.paired_verdict([r["metrics"]["mmd"] for r in long_base], [r["metrics"]["mmd"] for r in ddil_rs])
        out.append(f"- {m.upper()}: +DDIL takes {ratio:.1f}x the base wall time per run. Against base trained for 2x the steps, "
                   f"+DDIL's MMD is **{v}** ({_m(ddil_rs, 'mmd', 1e3)[0]:.1f} vs {_m(long_base, 'mmd', 1e3)[0]:.1f} ×1e-3).")
    return out


# ----------------------------------------------------------------------------------------------------
# Part 6: covariate shift vs dimension (the on-policy error ratios of toy.shift)


def _ratio(r: dict, k: int, key: str = "own_vs_teacher", which: str = "ratios") -> float:
    """A run's error ratio at student step k (negative k counts from the end)."""
    return r["metrics"][which][k][key][0]


def _dim_label(m: str, v: str, d: int, N: int = 4, width: int = 128, mixture: str = "") -> str:
    return f"{m} {v} D={d} N={N} w={width}" + (f" {mixture}" if mixture else "")


def _fmt(mh: tuple[float, float], n: int, digits: int = 2) -> str:
    """'mean ± 95% half-width' of n seeds ('± –' for one seed, which has no spread)."""
    return run.pm(mh[0], mh[1], n, f".{digits}f")


def _ci(values: list[float], digits: int = 2) -> str:
    return _fmt(mean_ci(values), len(values), digits)


def dim_figure(g: dict, scale, out: Path) -> None:
    """(b)/(c) per student step k, one panel per method and D: base, +DDIL and the teacher's own DDIM step."""
    dims = scale.dims
    fig, axes = plt.subplots(len(scale.methods), len(dims), figsize=(2.9 * len(dims), 2.5 * len(scale.methods)),
                             squeeze=False, sharey=True)
    for i, m in enumerate(scale.methods):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            for v in ("base", "+DDIL"):
                rs = g[_dim_label(m, v, d)]
                ks = list(range(len(rs[0]["metrics"]["ratios"])))
                ci = [mean_ci([_ratio(r, k) for r in rs]) for k in ks]
                ax.errorbar(ks, [c[0] for c in ci], yerr=[c[1] for c in ci], fmt="-o", c=COLORS[v], label=v, capsize=2, ms=3)
            ctrl = [control_ratio(g[_dim_label(m, "base", d)], k) for k in ks]
            ax.plot(ks, ctrl, "--", c="grey", label="teacher's 1-step DDIM")
            ax.axhline(1, c="k", lw=0.5)
            ax.set_title(f"{m.upper()}, D = {d}", fontsize=9), ax.set_xticks(ks)
            ax.set_xlabel("student step k") if i == len(scale.methods) - 1 else None
        axes[i][0].set_ylabel("error ratio own / teacher states")
    axes[0][0].legend(fontsize=6)
    save(fig, out / "study-dim.png")


def dim_metrics_figure(g: dict, scale, out: Path) -> None:
    """Final NLL, mode coverage and the last-step error ratio against D, base vs +DDIL, per method."""
    keys = [("nll", "exact NLL (lower)"), ("mode_coverage", "mode coverage (higher)"), (None, "last-step error ratio (b)/(c)")]
    fig, axes = plt.subplots(len(scale.methods), len(keys), figsize=(3.3 * len(keys), 2.4 * len(scale.methods)), squeeze=False)
    for i, m in enumerate(scale.methods):
        for j, (key, title) in enumerate(keys):
            ax = axes[i][j]
            for v in ("base", "+DDIL"):
                vals = [mean_ci([r["metrics"][key] if key else _ratio(r, -1) for r in g[_dim_label(m, v, d)]]) for d in scale.dims]
                ax.errorbar(scale.dims, [c[0] for c in vals], yerr=[c[1] for c in vals], fmt="-o", c=COLORS[v], label=v, capsize=2, ms=3)
            ax.set_xscale("log", base=2), ax.set_title(f"{m.upper()}: {title}", fontsize=8)
            ax.set_xlabel("D") if i == len(scale.methods) - 1 else None
    axes[0][0].legend(fontsize=6)
    save(fig, out / "study-dim-metrics.png")


def dim_table(g: dict, scale) -> str:
    """One row per method and D (N = 4, width 128): error ratios at the last step, the teacher control, final metrics."""
    rows = ["| method | D | variant | (b)/(a) last k | (b)/(c) last k | teacher (b)/(c) | xent excess last k | NLL | modes | MMD ×1e-3 | ms / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in scale.methods:
        for d in scale.dims:
            for v in ("base", "+DDIL"):
                rs = g[_dim_label(m, v, d)]
                xent = mean_ci([r["metrics"]["shift"][-1]["xent"] - r["metrics"]["shift"][-1]["xent_forward"] for r in rs]) \
                    if rs[0]["metrics"]["shift"] else (float("nan"), 0.0)
                rows.append(f"| {m.upper()} | {d} | {v} | {_ci([_ratio(r, -1, 'own_vs_forward') for r in rs])} | "
                            f"{_ci([_ratio(r, -1) for r in rs])} | {control_ratio(rs):.2f} | "
                            f"{_fmt(xent, len(rs))} | {_ci([r['metrics']['nll'] for r in rs])} | "
                            f"{_ci([r['metrics']['mode_coverage'] for r in rs])} | "
                            f"{_ci([1e3 * r['metrics']['mmd'] for r in rs], 1)} | "
                            f"{sum(r['cost']['ms_per_step'] for r in rs) / len(rs):.1f} |")
            rows += reference_dim_rows(m, d, scale)
    return "\n".join(rows)


def reference_dim_rows(m: str, d: int, scale) -> list[str]:
    """Under each D's first method: the exact teacher's rollout-grade DDIM (K = 48 per interval) and data against
    data, the floors of the final metrics in this D (in high D the discretised teacher is sharper than the data)."""
    if m != scale.methods[0]:
        return []
    ref = suite.teacher_reference(study_cells.dim_mixture(d), 4, list(range(scale.seeds_dim)), scale.n_eval, 48, sweep=False)
    out = []
    for name, rs in ref["rows"].items():
        if name == "teacher DDIM 4":  # only the 192-step teacher and the floor
            continue
        out.append(f"| reference | {d} | {name} | – | – | – | – | {_ci([r['nll'] for r in rs])} | "
                   f"{_ci([r['mode_coverage'] for r in rs])} | {_ci([1e3 * r['mmd'] for r in rs], 1)} | – |")
    return out


def scan_table(g: dict, scale) -> str:
    """At D = dim_scan: the last-step (b)/(c) ratio and NLL for each N and width, base vs +DDIL."""
    d = scale.dim_scan
    rows = ["| method | N | width | base (b)/(c) | +DDIL (b)/(c) | teacher (b)/(c) | base NLL | +DDIL NLL |", "|---|---|---|---|---|---|---|---|"]
    settings = [(N, 128) for N in scale.steps] + [(4, w) for w in scale.dim_widths]
    for m in scale.methods:
        for N, width in sorted(set(settings)):
            b, p = (g.get(_dim_label(m, v, d, N, width)) for v in ("base", "+DDIL"))
            if not b or not p:
                continue
            rows.append(f"| {m.upper()} | {N} | {width} | {_ci([_ratio(r, -1) for r in b])} | "
                        f"{_ci([_ratio(r, -1) for r in p])} | {control_ratio(b):.2f} | "
                        f"{_ci([r['metrics']['nll'] for r in b])} | {_ci([r['metrics']['nll'] for r in p])} |")
    return "\n".join(rows)


def held_out_dim_table(g: dict, scale) -> str:
    rows = ["| mixture | method | variant | (b)/(c) last k | NLL | modes | MMD ×1e-3 |", "|---|---|---|---|---|---|---|"]
    for mixture in scale.dim_held_out:
        d = int(mixture.rsplit("-d", 1)[1])
        for m in scale.methods:
            for v in ("base", "+DDIL"):
                rs = g[_dim_label(m, v, d, mixture=mixture)]
                rows.append(f"| {mixture} | {m.upper()} | {v} | {_ci([_ratio(r, -1) for r in rs])} | "
                            f"{_ci([r['metrics']['nll'] for r in rs])} | {_ci([r['metrics']['mode_coverage'] for r in rs])} | "
                            f"{_ci([1e3 * r['metrics']['mmd'] for r in rs], 1)} |")
    return "\n".join(rows)


def zero_snr_table(g: dict, scale) -> str:
    """At D = dim_scan: the last-step ratios of base and +DDIL and of the teacher's own DDIM step, on the default schedule
    (seeds in common with the control) and on the zero-terminal-SNR one (Lin et al. 2024), with NLL."""
    d = scale.dim_scan
    rows = ["| method | variant | schedule | (b)/(a) last k | (b)/(c) last k | teacher (b)/(c) last k | NLL |", "|---|---|---|---|---|---|---|"]
    for m in scale.methods:
        for v in ("base", "+DDIL"):
            zero = g.get(_dim_label(m, v, d, mixture=study_cells.ZERO_SNR))
            if not zero:
                continue
            default = g[_dim_label(m, v, d)][: len(zero)]  # the same seeds (both lists are ordered by seed)
            for name, rs in (("default (SD's)", default), ("zero terminal SNR", zero)):
                rows.append(f"| {m.upper()} | {v} | {name} | {_ci([_ratio(r, -1, 'own_vs_forward') for r in rs])} | "
                            f"{_ci([_ratio(r, -1) for r in rs])} | {control_ratio(rs):.2f} | "
                            f"{_ci([r['metrics']['nll'] for r in rs])} |")
    return "\n".join(rows)


def dim_findings(g: dict, scale) -> list[str]:
    """Plain-words answers, each from paired 95% CIs over seeds: does the base student's last-step error ratio exceed the
    teacher's own (the control), does it grow with D, does DDIL bring it toward 1, and do the samples improve."""
    out = []
    for m in scale.methods:
        excess, toward, better = [], [], []
        for d in scale.dims:
            b, p = g[_dim_label(m, "base", d)], g[_dim_label(m, "+DDIL", d)]
            e = mean_ci([_ratio(r, -1) - _ratio(r, -1, which="ratios_teacher") for r in b])  # each seed against its own control
            excess.append(f"D={d}: {e[0]:+.2f} ± {e[1]:.2f}")
            toward.append(f"D={d} {study_cells.paired_verdict([abs(_ratio(r, -1) - 1) for r in b], [abs(_ratio(r, -1) - 1) for r in p])}")
            says = [f"{name} {study_cells.paired_verdict([r['metrics'][key] for r in b], [r['metrics'][key] for r in p], low)}"
                    for key, name, low in (("nll", "NLL", True), ("mmd", "MMD", True), ("mode_coverage", "coverage", False))]
            better.append(f"D={d}: " + ", ".join(says))
        out.append(f"- **{m.upper()}**: base (b)/(c) at the last step minus the teacher's own: " + "; ".join(excess) + ".")
        out.append(f"  - +DDIL vs base, |(b)/(c) − 1| at the last step: " + "; ".join(toward) + ".")
        out.append(f"  - +DDIL vs base, final samples: " + "; ".join(better) + ".")
    return out


def dim_part(cells, results, scale, out: Path) -> str:
    g = study_cells.group(cells, results, "dim")
    dim_figure(g, scale, out)
    dim_metrics_figure(g, scale, out)
    return (f"Mixtures ring8-d<D>: ring8 on a random 2-plane of R^D, std {mixtures.OFF_PLANE_STD} off the plane (D = 2 is ring8). For each "
            f"student step k, the student's one-step error against the exact teacher's converged step from the same state, "
            f"on (a) forward states q(x_tau_k | x_0), (b) its own inference states and (c) the teacher's rollout states from "
            f"the same x_T (toy/shift.py). (b)/(c) > 1 means the student errs more on the states it visits than on the "
            f"teacher's; the teacher's own single DDIM step gives the same ratios for a policy with no distillation error "
            f"(the control: how hard the states themselves are). N = 4, width 128, {scale.seeds_dim} seeds.\n\n"
            f"![error ratio per step](study-dim.png)\n\nThe error ratio (b)/(c) per student step (mean, 95% CI over seeds).\n\n"
            + dim_table(g, scale) + "\n\n![final metrics vs D](study-dim-metrics.png)\n\nFinal metrics and the last-step ratio "
            f"against D.\n\n### Findings\n\n" + "\n".join(dim_findings(g, scale))
            + f"\n\n### Scans at D = {scale.dim_scan} ({scale.seeds_ablation} seeds): student steps N and width\n\n" + scan_table(g, scale)
            + f"\n\n### Held-out families in high D ({scale.seeds_dim} seeds, never tuned on)\n\n" + held_out_dim_table(g, scale)
            + (f"\n\n### Control: a zero-terminal-SNR schedule (D = {scale.dim_scan}, {scale.seeds_ablation} seeds)\n\n"
               f"SD's schedule ends at alpha_bar = 0.0047, so x_T ~ N(0, I) is not exactly p_T and every sampler, the teacher's "
               f"included, starts slightly off the marginal. Rescaled to zero terminal SNR (Lin et al. 2024; ddil.ScheduleConfig"
               f"(zero_terminal_snr=True)) it starts on it. If the ratios here match the default schedule's, the shift measured "
               f"above is not the schedule's.\n\n" + zero_snr_table(g, scale) if scale.zero_snr_control else "") + "\n")


# ----------------------------------------------------------------------------------------------------


def write(cells, results, scale, out: Path, command: str, elapsed: float, jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    distinct = {c.key: results[c.key] for c in cells}
    compute = sum(r["time"]["init_s"] + r["time"]["train_s"] + r["time"]["eval_s"] for r in distinct.values())
    md = [f"# DDIL on exact-teacher toys: the study\n\nGenerated by `{command}` ({len(cells)} cells, "
          f"{len(distinct)} distinct runs, {compute / 60:.0f} min of single-process compute summed over the runs, "
          f"{jobs} workers). Do not edit by hand. Every cell of parts 1–7 trains for {scale.train_steps} steps at batch 256 "
          f"(part 8 varies the length); mean ± 95% confidence half-width (Student t over seeds). Hyperparameters were "
          f"chosen on **{study_cells.TUNE_MIXTURE}** only (in high D on ring8-d<D> only); "
          f"{', '.join(dict.fromkeys(scale.held_out + scale.dim_held_out + scale.map_held_out))} are held out.\n"]
    md.append(f"\n## 1. Covariate shift, measured directly\n\nFor each base method and N, the student's inference-time state at "
              f"tau_k against the forward marginal p_tau_k: MMD, and the exact cross-entropy E[-log p_tau_k(x)] minus that of fresh "
              f"samples of p_tau_k (0 = on the marginal). {scale.seeds_ablation} seeds.\n\n![shift](study-shift.png)\n\n"
              + shift_part(cells, results, scale, out) + "\n\n" + shift_finding(cells, results, scale) + "\n")
    verdicts = []
    for i, mixture in enumerate((study_cells.TUNE_MIXTURE,) + tuple(scale.held_out)):
        table, lines = main_part(cells, results, scale, mixture)
        tag = "tuning mixture" if mixture == study_cells.TUNE_MIXTURE else "held out"
        head = "2. Main table" if i == 0 else f"3. Held-out mixture: {mixture}"
        md.append(f"\n## {head} ({mixture}, {tag}, N = 4, {scale.seeds_main} seeds)\n\n{table}\n\n" + "\n".join(lines) + "\n")
        verdicts.append((mixture, lines))
    if scale.ablations:
        md.append(f"\n## 4. Ablations ({study_cells.ABLATION_METHOD.upper()} +DDIL on {study_cells.TUNE_MIXTURE}, N = 4, {scale.seeds_ablation} seeds; MMD ×1e-3)\n")
        parts = [("β priors on the simplex", "study-betas.png", betas_part(cells, results, out)),
                 ("Teacher-backward states on vs off", "study-teacher.png", bar_part(cells, results, "teacher", "teacher-backward states", out)),
                 ("DAgger mixing schedule", "study-mixing.png", bar_part(cells, results, "mixing", "beta_mix schedule", out)),
                 ("Buffer capacity and refresh share", "study-buffer.png", bar_part(cells, results, "buffer", "aggregation buffer", out)),
                 ("Reflection mode and threshold", "study-reflect.png", bar_part(cells, results, "reflect", "reflected sampler", out)),
                 ("Student capacity (width)", "study-width.png", width_part(cells, results, out)),
                 ("Number of student steps (all methods, from part 1)", "study-steps.png", steps_part(cells, results, scale, out))]
        for title, fig, finding in parts:
            md.append(f"\n### {title}\n\n![{title}]({fig})\n\n{finding}\n")
    md.append("\n## 5. Cost accounting (ring8; NFEs are sample-evaluations per training step)\n\n"
              + cost_part(cells, results, scale, out) + "\n\n![cost](study-cost.png)\n\n" + "\n".join(equal_time_lines(cells, results, scale)) + "\n")
    md.append("\n## 6. Covariate shift vs dimension\n\n" + dim_part(cells, results, scale, out))
    md.append("\n## 7. Verdicts\n\nFrom paired 95% confidence intervals over seeds (a difference whose interval contains 0 is "
              "reported as no clear difference). In short:\n\n" + "\n".join(summary_lines(cells, results, scale)) + "\n\nRow by row:\n")
    for mixture, lines in verdicts:
        md.append(f"\n**{mixture}**\n\n" + "\n".join(lines) + "\n")
    md.append("\n## 8. Where on-policy training helps: a width × steps × arm map, with an oracle DAgger arm\n\n"
              + study_map.map_part(cells, results, scale, out) + "\n")
    run.write_text_atomic("".join(md), out / "STUDY.md")
