"""Part 8 of STUDY.md: where on-policy training helps. The map over method x width x training length x arm (with the
oracle DAgger arm), and the mechanism of PD +DDIL at the widest width. Generated from the study's cells
(toy/study_cells.py: map_cells, mechanism_cells); toy/study_report.py puts it into STUDY.md."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ddil  # noqa: E402
from toy import mixtures, run, study_cells  # noqa: E402
from toy.models import AnalyticTeacher  # noqa: E402
from toy.plots import save  # noqa: E402
from toy.study_cells import mean_ci  # noqa: E402

ARM_COLORS = {"base": "tab:red", "+DDIL": "tab:blue", "mostly student": "tab:cyan", "student only": "tab:green",
              "oracle": "black", "oracle labels": "tab:grey"}


def own_error(r: dict, k: int = -1) -> float:
    """The student's one-step error on its own inference states at step k (toy.shift, (b)): what DAgger promises to
    lower."""
    return r["metrics"]["ratios"][k]["err_own"]


def _row(r: dict, key: str, k: int = -1) -> float:
    return r["metrics"]["ratios"][k][key]


def _ratio(r: dict, k: int = -1, which: str = "ratios") -> float:
    return r["metrics"][which][k]["own_vs_teacher"][0]


def control_ratio(rs: list[dict], k: int = -1) -> float:
    """The teacher's own (b)/(c) at step k, the control, averaged over the runs' seeds (each seed has its own)."""
    return sum(_ratio(r, k, "ratios_teacher") for r in rs) / len(rs)


def paired(base: list[dict], other: list[dict], value) -> tuple[float, float, int]:
    """mean and 95% half-width of value(other) - value(base), paired by seed (both lists are ordered by seed)."""
    n = min(len(base), len(other))
    d, h = mean_ci([value(o) - value(b) for b, o in zip(base[:n], other[:n])])
    return d, h, n


def verdict(d: float, h: float, n: int, lower_is_better: bool = True) -> str:
    if n < 2 or abs(d) <= h:
        return "no clear difference"
    return "better" if (d < 0) == lower_is_better else "worse"


def _ci(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m, h = mean_ci([scale * v for v in values])
    return run.pm(m, h, len(values), f".{digits}f")


def _delta(d: float, h: float, n: int, scale: float = 1e3, digits: int = 2) -> str:
    return f"{scale * d:+.{digits}f} ± {scale * h:.{digits}f}" if n > 1 else f"{scale * d:+.{digits}f} ± –"


# ----------------------------------------------------------------------------------------------------
# The map


def map_table(g: dict, scale) -> str:
    """Every map cell: the last-step own-state error and its paired difference to base, the ratio (b)/(c) beside the
    teacher's control, the final metrics and the cost."""
    rows = ["| method | D | width | steps | arm | own-state error ×1e-3 | Δ vs base ×1e-3 (paired) | (b)/(c) | teacher (b)/(c) | "
            "NLL | MMD ×1e-3 | coverage | ms / step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in scale.map_dims:
        for m in scale.methods:
            for width, steps in study_cells.map_grid(scale, d, m):
                base = g[study_cells.map_label(m, "base", d, width, steps)]
                for arm in study_cells.map_arms(m, width, steps, scale):
                    rs = g[study_cells.map_label(m, arm, d, width, steps)]
                    delta = "–" if arm == "base" else _delta(*paired(base, rs, own_error))
                    rows.append(f"| {m.upper()} | {d} | {width} | {steps} | {arm} | {_ci([own_error(r) for r in rs], 1e3)} | "
                                f"{delta} | {_ci([_ratio(r) for r in rs])} | {control_ratio(rs):.2f} | "
                                f"{_ci([r['metrics']['nll'] for r in rs], 1, 1)} | {_ci([r['metrics']['mmd'] for r in rs], 1e3, 1)} | "
                                f"{_ci([r['metrics']['coverage'] for r in rs])} | "
                                f"{sum(r['cost']['ms_per_step'] for r in rs) / len(rs):.1f} |")
    return "\n".join(rows)


def map_figure(g: dict, scale, out: Path) -> None:
    """Own-state error at the last step against width (at map_steps[1] steps) and against training steps (at width 128),
    one column per method at the first D, one line per arm (mean and 95% CI over seeds)."""
    d, mid, w0 = scale.map_dims[0], scale.map_steps[1], study_cells.length_scan_width(scale)
    fig, axes = plt.subplots(2, len(scale.methods), figsize=(3.6 * len(scale.methods), 5.6), squeeze=False)
    for j, m in enumerate(scale.methods):
        cells = study_cells.map_grid(scale, d, m)
        for i, (axis, pick) in enumerate((("width", lambda w, n: n == mid), ("training steps", lambda w, n: w == w0))):
            ax = axes[i][j]
            xs_all = sorted({(w if i == 0 else n) for w, n in cells if pick(w, n)})
            for arm in study_cells.MAP_ARMS:
                pts = [(w if i == 0 else n, g[study_cells.map_label(m, arm, d, w, n)]) for w, n in cells
                       if pick(w, n) and arm in study_cells.map_arms(m, w, n, scale)]
                if not pts:
                    continue
                ci = [mean_ci([1e3 * own_error(r) for r in rs]) for _, rs in pts]
                ax.errorbar([x for x, _ in pts], [c[0] for c in ci], yerr=[c[1] for c in ci], fmt="o", ms=3, capsize=2,
                            c=ARM_COLORS[arm], label=arm, ls="--" if arm.startswith("oracle") else "-")
            ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xticks(xs_all, [str(x) for x in xs_all])
            ax.set_title(f"{m.upper()}, D = {d}: " + (f"{mid} steps" if i == 0 else f"width {w0}"), fontsize=9)
            ax.set_xlabel(axis, fontsize=8)
        axes[0][j].set_ylabel("own-state error, last step ×1e-3", fontsize=8)
    axes[0][0].legend(fontsize=6)
    save(fig, out / "study-map.png")


def cell_finding(g: dict, m: str, d: int, width: int, steps: int, scale) -> str:
    """One line for a cell: is there shift to correct (base's last-step (b)/(c) minus the teacher's control), does the
    oracle lower the own-state error, what the labels alone do, and which non-oracle arm does best."""
    lab = lambda arm: study_cells.map_label(m, arm, d, width, steps)  # noqa: E731
    base, arms = g[lab("base")], study_cells.map_arms(m, width, steps, scale)
    e, eh = mean_ci([_ratio(r) - _ratio(r, which="ratios_teacher") for r in base])  # each seed against its own control
    parts = [f"shift beyond the control {e:+.2f} ± {eh:.2f}"]
    od, oh, on = paired(base, g[lab("oracle")], own_error)
    parts.append(f"oracle vs base **{verdict(od, oh, on)}** ({_delta(od, oh, on)} ×1e-3)")
    if "oracle labels" in arms:
        ld, lh, ln = paired(base, g[lab("oracle labels")], own_error)
        parts.append(f"exact labels on forward states {verdict(ld, lh, ln)} ({_delta(ld, lh, ln)})")
        sd, sh, sn = paired(g[lab("oracle labels")], g[lab("oracle")], own_error)
        parts.append(f"the oracle's own states vs forward states, both with exact labels: {verdict(sd, sh, sn)} "
                     f"({_delta(sd, sh, sn)})")
    (bd, bh, bn), best = best_mixture(g, m, d, width, steps, scale)
    parts.append(f"best state mixture: {best}, {verdict(bd, bh, bn)} ({_delta(bd, bh, bn)})")
    return f"- {m.upper()} D={d} w={width} {steps} steps: " + "; ".join(parts) + "."


def best_mixture(g: dict, m: str, d: int, width: int, steps: int, scale) -> tuple[tuple, str]:
    """The non-oracle arm with the lowest mean own-state error, paired against base: ((d, h, n), arm)."""
    lab = lambda arm: study_cells.map_label(m, arm, d, width, steps)  # noqa: E731
    arms = [a for a in study_cells.map_arms(m, width, steps, scale) if a not in ("base", "oracle", "oracle labels")]
    return min((paired(g[lab("base")], g[lab(a)], own_error), a) for a in arms)


def map_summary(g: dict, scale) -> list[str]:
    """What the map finds, in four lines computed from its cells: where a state mixture (with the base method's own
    labels) lowers the own-state error, where the oracle does, and what the oracle's states add to exact labels."""
    cells = [(m, d, w, n) for d in scale.map_dims for m in scale.methods for w, n in study_cells.map_grid(scale, d, m)]
    name = lambda m, d, w, n: f"{m.upper()} D={d} w={w} {n} steps"  # noqa: E731
    helps, none, oracle_helps, states_given_labels = [], [], [], []
    for m, d, w, n in cells:
        (bd, bh, bn), best = best_mixture(g, m, d, w, n, scale)
        (helps if verdict(bd, bh, bn) == "better" else none).append(f"{name(m, d, w, n)} ({best} {_delta(bd, bh, bn)})")
        base, lab = g[study_cells.map_label(m, "base", d, w, n)], lambda arm: study_cells.map_label(m, arm, d, w, n)  # noqa: E731
        if verdict(*paired(base, g[lab("oracle")], own_error)) == "better":
            oracle_helps.append(name(m, d, w, n))
        if "oracle labels" in study_cells.map_arms(m, w, n, scale):
            sd, sh, sn = paired(g[lab("oracle labels")], g[lab("oracle")], own_error)
            states_given_labels.append(f"{name(m, d, w, n)} {verdict(sd, sh, sn)} ({_delta(sd, sh, sn)})")
    return [f"- **A state mixture with the base method's labels lowers the own-state error** (the best of the cell's "
            f"non-oracle arms, paired 95% CI, not corrected for picking the best; every arm's own Δ is in the table) in "
            f"{len(helps)} of {len(cells)} cells: " + ("; ".join(helps) or "none") + ".",
            f"- **No state mixture does** in the other {len(none)}: " + ("; ".join(none) or "none") + ".",
            f"- **The oracle DAgger arm lowers it** in {len(oracle_helps)} of {len(cells)} cells"
            + (f" (not in: {'; '.join(name(*c) for c in cells if name(*c) not in oracle_helps)})" if len(oracle_helps) < len(cells) else "") + ".",
            "- **What the oracle's own states add to exact labels** (oracle vs oracle labels, ×1e-3): "
            + ("; ".join(states_given_labels) or "not measured") + "."]


def held_out_table(cells, results, scale) -> str:
    """Part 8's held-out families: the arms a user chooses between, with paired differences to base."""
    g = study_cells.group(cells, results, "map held-out")
    rows = ["| mixture | method | arm | own-state error ×1e-3 | Δ vs base ×1e-3 (paired) | (b)/(c) | teacher (b)/(c) | NLL | "
            "MMD ×1e-3 | coverage |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mixture in scale.map_held_out:
        for m in (m for m in scale.methods if m in study_cells.HELD_OUT_MAP_METHODS):
            base = g[f"{mixture} {m} base"]
            for arm in study_cells.HELD_OUT_MAP_ARMS:
                rs = g[f"{mixture} {m} {arm}"]
                diff = paired(base, rs, own_error)
                delta = "–" if arm == "base" else f"{_delta(*diff)} ({verdict(*diff)})"
                rows.append(f"| {mixture} | {m.upper()} | {arm} | {_ci([own_error(r) for r in rs], 1e3)} | {delta} | "
                            f"{_ci([_ratio(r) for r in rs])} | {control_ratio(rs):.2f} | "
                            f"{_ci([r['metrics']['nll'] for r in rs], 1, 1)} | {_ci([r['metrics']['mmd'] for r in rs], 1e3, 1)} | "
                            f"{_ci([r['metrics']['coverage'] for r in rs])} |")
    return "\n".join(rows)


def oracle_label_bias(d: int, K: int, n: int = 2048) -> tuple[float, float]:
    """Measured, not assumed: the mean squared difference between the oracle's labels at K substeps per interval and at
    K = 96, on forward states of ring8-d<d> at the 4-step grid's points: (to the next grid point, to clean)."""
    gmm, ab = mixtures.load_mixture(study_cells.dim_mixture(d)), ddil.make_alpha_bar()
    teacher, grid = AnalyticTeacher(gmm, ab), ddil.uniform_grid(4)
    x0, _ = mixtures.sample(gmm, n, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor(grid)[torch.randint(0, len(grid), (n,), generator=gen)]
    s = ddil.forward_states(x0, t, ddil.interval_index(grid, t), None, None, ab, gen)
    out = []
    for to_clean in (False, True):
        y, ref = (ddil.oracle_labels(ddil.teacher_policy(teacher, ab, None, k, grid), s, grid, to_clean) for k in (K, 96))
        out.append((y - ref).square().mean().item())
    return out[0], out[1]


def map_part(cells, results, scale, out: Path) -> str:
    g = study_cells.group(cells, results, "map")
    map_figure(g, scale, out)
    K = run.ToyConfig().oracle_substeps
    bias_next, bias_clean = oracle_label_bias(scale.map_dims[0], K)
    smallest = min(own_error(r) for rs in g.values() for r in rs)
    findings = [cell_finding(g, m, d, w, n, scale) for d in scale.map_dims for m in scale.methods
                for w, n in study_cells.map_grid(scale, d, m)]
    text = (f"Every arm trains the same student (the same network teacher, seed, batch, optimiser and the base method's "
            f"own time marginal) and differs only where it says: **base** (the method's own states and targets), **+DDIL** "
            f"(priors {'/'.join(map(str, run.DDIL_BETAS))}, buffer, mixing 1 → 0), **mostly student** (0.25/0/0.75) and "
            f"**student only** (0/0/1), both buffered with base targets; and two arms that change the labels too: the "
            f"**oracle** DAgger arm (fresh student rollouts every step, no buffer, the teacher's share of rollout steps "
            f"annealed 1 → 0, the teacher acting in them with the same K as it labels, every state labelled by the exact "
            f"teacher's converged step: to the next grid point for PD, "
            f"to clean for LCM's f and DMD2's G, with the method's own distance; ddil.py §7d) and **oracle labels** (the "
            f"base method's forward states with the oracle's labels: what exact labels alone buy). The oracle's labels use "
            f"K = {K} DDIM substeps per interval; measured against K = 96 on forward states of ring8-d{scale.map_dims[0]} "
            f"they differ by {bias_next:.1e} (to the next point) and {bias_clean:.1e} (to clean) in mean squared error; "
            f"the smallest own-state error in the table is {smallest:.1e}. Measured: each student's one-step error against the exact teacher's converged "
            f"step on its **own** inference states at the last step (toy/shift.py (b)), compared across arms paired by seed "
            f"(same network teacher, same evaluation noise), beside the ratio (b)/(c) (which can fall because both terms "
            f"move), NLL, MMD, coverage and the cost. {scale.map_seeds} seeds; N = 4. The width scan runs at "
            f"{scale.map_steps[1]} steps, the length scan at width 128; DMD2 (three networks per step) only up to width "
            f"{scale.map_dmd2_max[0]} and {scale.map_dmd2_max[1]} steps.\n\n"
            f"![own-state error vs width and steps](study-map.png)\n\nOwn-state error at the last student step against "
            f"width (top) and training steps (bottom), per arm; dashed: the two oracle arms. Lower is better.\n\n"
            + map_table(g, scale) + "\n\n### What the map finds\n\n" + "\n".join(map_summary(g, scale))
            + "\n\n### Findings, cell by cell (paired 95% CIs of the own-state error)\n\n" + "\n".join(findings))
    if scale.map_held_out:
        text += (f"\n\n### Held-out families ({scale.map_seeds} seeds, width 128, {scale.map_steps[1]} steps, never tuned on)\n\n"
                 f"The arms a user would choose between, on families the map's choices were not made on.\n\n"
                 + held_out_table(cells, results, scale))
    if scale.mechanism and "pd" in scale.methods:
        text += "\n\n" + mechanism_part(cells, results, scale)
    return text


# ----------------------------------------------------------------------------------------------------
# The mechanism of PD +DDIL at the widest width


def mechanism_part(cells, results, scale) -> str:
    """Each change of PD +DDIL against +DDIL itself (paired by seed), on every state set's last-step error and NLL."""
    g = study_cells.group(cells, results, "mechanism")
    d, width, steps = scale.map_dims[0], max(scale.map_widths), scale.map_steps[1]
    ref = g[next(iter(study_cells.MECHANISM))]
    rows = ["| PD, width %d | own ×1e-3 | forward ×1e-3 | teacher-state ×1e-3 | Δ own vs +DDIL | Δ forward vs +DDIL | NLL | "
            "Δ NLL vs +DDIL |" % width, "|---|---|---|---|---|---|---|---|"]
    lines = []
    for label, rs in g.items():
        cols = [_ci([_row(r, key) for r in rs], 1e3) for key in ("err_own", "err_forward", "err_teacher")]
        do, df, dn = (paired(ref, rs, f) for f in (own_error, lambda r: _row(r, "err_forward"), lambda r: r["metrics"]["nll"]))
        same = rs is ref
        rows.append(f"| {label} | " + " | ".join(cols) + f" | {'–' if same else _delta(*do)} | {'–' if same else _delta(*df)} | "
                    f"{_ci([r['metrics']['nll'] for r in rs], 1, 2)} | {'–' if same else _delta(*dn, scale=1)} |")
        if not same:
            lines.append(f"- {label}: own-state error {verdict(*do)}, forward-state error {verdict(*df)}, NLL {verdict(*dn)} "
                         f"than +DDIL.")
    seeds = "; ".join(f"{label.split(' (')[0]}: " + ", ".join(f"{1e3 * own_error(r):.2f}" for r in g[label])
                      for label in ("base", next(iter(study_cells.MECHANISM))))
    lines.append(f"- Per seed (seeds 0–{scale.mechanism_seeds - 1}), the own-state error ×1e-3 of {seeds}.")
    return (f"### Mechanism: PD +DDIL at width {width} (D = {d}, {steps} steps, {scale.mechanism_seeds} seeds)\n\n"
            f"Each row changes one thing of +DDIL (or is the base method). Errors are the last student step's, on the "
            f"student's own states, on forward states and on the teacher's rollout states; differences are paired by seed "
            f"against +DDIL (negative: the change lowers it).\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines))
