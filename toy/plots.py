"""Figures of the toy suite: fixed axes per mixture, one line under each saying what it shows."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import ddil  # noqa: E402
from toy import mixtures  # noqa: E402
from toy.run import variant_name  # noqa: E402

COLORS = {"base": "tab:red", "+DDIL": "tab:blue", "+DDIL+reflected": "tab:green"}


def _variant(r: dict) -> str:
    return variant_name(r["config"])


def _limits(gmm: mixtures.GMM) -> float:
    x, _ = mixtures.sample(gmm, 20_000, torch.Generator().manual_seed(0))
    return 1.15 * _project(gmm, x).abs().max().item()


def _project(gmm: mixtures.GMM, x: torch.Tensor) -> torch.Tensor:
    """Points (n, D) in the data plane's 2-D coordinates (the identity in 2-D): what every scatter draws."""
    return x.double() @ mixtures.plane(gmm).double()


def _plane_note(gmm: mixtures.GMM) -> str:
    return "" if gmm.dim == 2 else f" In D = {gmm.dim}: the projection onto the data plane."


def _mean(values):
    return sum(values) / len(values)


def _dot(color: str, label: str) -> Line2D:
    """A legend entry for a scatter of small dots."""
    return Line2D([], [], ls="", marker="o", ms=5, c=color, label=label)


def _legend_on_top(fig, handles, path: Path) -> None:
    """One legend for every panel, above them, then save."""
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=9)
    save(fig, path, top=1 - 0.45 / fig.get_figheight())  # leave ~0.45 in for the legend


def samples_figure(results, gmm, path: Path) -> str:
    """Final samples of every method x variant (seed 0) over the data, fixed axes."""
    methods = sorted({r["config"]["method"] for r in results})
    lim = _limits(gmm)
    data = _project(gmm, mixtures.sample(gmm, 2000, torch.Generator().manual_seed(1))[0])
    variants = [v for v in COLORS if any(_variant(r) == v for r in results)]
    fig, axes = plt.subplots(len(methods), len(variants), figsize=(3 * len(variants), 3 * len(methods)), squeeze=False)
    for i, m in enumerate(methods):
        for j, v in enumerate(variants):
            ax = axes[i][j]
            rs = [r for r in results if r["config"]["method"] == m and _variant(r) == v]
            ax.scatter(data[:, 0], data[:, 1], s=1, c="lightgray")
            if rs:
                x = _project(gmm, torch.tensor(min(rs, key=lambda r: r["config"]["seed"])["metrics"]["samples"]))
                ax.scatter(x[:, 0], x[:, 1], s=1, c=COLORS[v])
                ax.set_title(f"{m.upper()} {v}\nMMD {1e3 * _mean([r['metrics']['mmd'] for r in rs]):.1f}e-3", fontsize=9)
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    _legend_on_top(fig, [_dot("lightgray", "data")] + [_dot(COLORS[v], f"{v} samples") for v in variants], path)
    return (f"Final {results[0]['config']['steps']}-step samples (seed 0, colour) over data (grey). "
            f"+DDIL has lower mean MMD than base for {_ddil_wins(results, methods, 'mmd')}." + _plane_note(gmm))


def save(fig, path: Path, top: float = 1.0) -> None:
    """tight_layout (panels below `top`, a figure fraction, leaving room for a shared legend), write a PNG, close."""
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _vals(results, method, variant, key):
    return [r["metrics"][key] for r in results if r["config"]["method"] == method and _variant(r) == variant] or [float("nan")]


def _ddil_wins(results, methods, key: str) -> str:
    """'k of n methods (A, B)': where +DDIL's mean of `key` is below base's."""
    wins = [m for m in methods if _mean(_vals(results, m, "+DDIL", key)) < _mean(_vals(results, m, "base", key))]
    return f"{len(wins)} of {len(methods)} methods ({', '.join(w.upper() for w in wins) or 'none'})"


def noise_floor(reference) -> float:
    """2 x the largest |MMD| x1e-3 between two independent data samples of the evaluation's size: the unbiased
    MMD's noise floor (it is 0 on average and often negative when two sets share one law)."""
    return 2 * max(abs(1e3 * r["mmd"]) for r in reference["rows"]["data vs data (floor)"])


def shift_figure(results, path: Path, reference) -> str:
    """Covariate shift per student step: MMD of the student's states at tau_k to p_{tau_k}, mean over seeds,
    against the MMD's noise floor (a band)."""
    methods = sorted({r["config"]["method"] for r in results})
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False)
    floor = noise_floor(reference)
    ymin, ymax = -floor, floor
    for ax, m in zip(axes[0], methods):
        ax.axhspan(-floor, floor, color="lightgray", alpha=0.6, lw=0)
        for v, c in COLORS.items():
            rs = [r for r in results if r["config"]["method"] == m and _variant(r) == v]
            if not rs or not rs[0]["metrics"]["shift"]:
                continue
            ks = [row["k"] for row in rs[0]["metrics"]["shift"]]
            fwd = [1e3 * _mean([r["metrics"]["shift"][i]["mmd_to_forward"] for r in rs]) for i in range(len(ks))]
            ref = [1e3 * _mean([r["metrics"]["shift"][i]["mmd_to_ref"] for r in rs]) for i in range(len(ks))]
            ax.plot(ks, fwd, "-o", c=c)
            ax.plot(ks, ref, "--", c=c, alpha=0.7)
            ymin, ymax = min(ymin, min(fwd + ref)), max(ymax, max(fwd + ref))
        ax.set_title(m.upper()), ax.set_xlabel("student step k"), ax.set_ylabel("MMD x1e-3")
        ax.set_xticks(range(1, len(rs[0]["grid"]) if rs else 2))
        ax.axhline(0, c="k", lw=0.5)
    for ax in axes[0]:
        ax.set_ylim(1.3 * ymin - 0.1, 1.1 * ymax + 0.1)
    handles = [Line2D([], [], c=c, marker="o", label=v) for v, c in COLORS.items()]
    handles += [Line2D([], [], c="k", ls="-", label="states vs p_tau"), Line2D([], [], c="k", ls="--", label="vs teacher states"),
                Patch(color="lightgray", alpha=0.6, label=f"noise floor (±{floor:.2f})")]
    _legend_on_top(fig, handles, path)
    return (f"Distance of inference-time states to the forward marginal (solid) and to the teacher's own states (dashed), "
            f"mean over seeds. The grey band is the unbiased MMD's noise floor, ±2x the largest |MMD| between two "
            f"independent data samples of the same size (±{floor:.2f}e-3); values inside it, negative ones included, "
            f"cannot be told from no shift. DDIL lowers the last-step shift for {_ddil_wins(results, methods, 'shift_last')}.")


def states_figure(results, gmm, path: Path) -> str:
    """The student's intermediate states x_{tau_k} (seed 0) over fresh samples of the forward marginal p_{tau_k},
    base and +DDIL side by side."""
    methods = sorted({r["config"]["method"] for r in results})
    grid = results[0]["grid"]
    alpha_bar = ddil.make_alpha_bar()
    ks = list(range(1, len(grid)))
    if not ks:
        return "One-step students have no intermediate states."
    variants = ("base", "+DDIL")
    fig, axes = plt.subplots(len(methods), 2 * len(ks), figsize=(2.3 * 2 * len(ks), 2.4 * len(methods)), squeeze=False)
    lim = 2.2
    for i, m in enumerate(methods):
        rs = {v: [r for r in results if r["config"]["method"] == m and _variant(r) == v and r["config"]["seed"] == 0] for v in variants}
        for j, k in enumerate(ks):
            t = torch.tensor([rs["base"][0]["grid"][k] if rs["base"] else grid[k]])
            ab = ddil.alpha_bar_at(alpha_bar, t).item()
            fwd, _ = mixtures.sample(mixtures.noisy(gmm, ab**0.5, (1 - ab) ** 0.5), 1500, torch.Generator().manual_seed(k))
            fwd = _project(gmm, fwd)
            for q, v in enumerate(variants):
                ax = axes[i][2 * j + q]
                ax.scatter(fwd[:, 0], fwd[:, 1], s=1, c="lightgray")
                if rs[v]:
                    x = _project(gmm, torch.tensor(rs[v][0]["metrics"]["states"][k]))
                    ax.scatter(x[:, 0], x[:, 1], s=1, c=COLORS[v])
                ax.set_title(f"{m.upper()} {v}, k={k} (t={int(t)})", fontsize=8)
                ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    _legend_on_top(fig, [_dot("lightgray", "fresh samples of p_tau_k")] + [_dot(COLORS[v], f"{v} student states") for v in variants], path)
    return ("Intermediate states of base (red, left of each pair) and +DDIL (blue, right) students, seed 0, over fresh "
            "samples of the forward marginal p_{tau_k} (grey) they were trained on." + _plane_note(gmm))


def ratio_figure(results, path: Path) -> str:
    """The on-policy error ratio (b)/(c) per student step (toy.shift): the student's one-step error on its own
    states over that on the teacher's states from the same x_T; the teacher's own single DDIM step as the control."""
    methods = sorted({r["config"]["method"] for r in results})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.0), squeeze=False, sharey=True)
    worst = {}
    for i, m in enumerate(methods):
        ax = axes[0][i]
        for v, c in COLORS.items():
            rs = [r for r in results if r["config"]["method"] == m and _variant(r) == v]
            if not rs:
                continue
            ks, seen = list(range(len(rs[0]["metrics"]["ratios"]))), rs
            y = [_mean([r["metrics"]["ratios"][k]["own_vs_teacher"][0] for r in rs]) for k in ks]
            ax.plot(ks, y, "-o", c=c, ms=3)
            worst[(m, v)] = y[-1]
        ctrl = [_mean([r["metrics"]["ratios_teacher"][k]["own_vs_teacher"][0] for r in seen]) for k in ks]
        ax.plot(ks, ctrl, "--", c="grey")
        ax.axhline(1, c="k", lw=0.5)
        ax.set_title(m.upper(), fontsize=9), ax.set_xlabel("student step k"), ax.set_xticks(ks)
    axes[0][0].set_ylabel("error on own / on teacher states")
    handles = [Line2D([], [], c=c, marker="o", ms=3, label=v) for v, c in COLORS.items()]
    _legend_on_top(fig, handles + [Line2D([], [], c="grey", ls="--", label="teacher's 1-step DDIM (control)")], path)
    last = "; ".join(f"{m.upper()} base {worst[(m, 'base')]:.2f}, +DDIL {worst[(m, '+DDIL')]:.2f}"
                     for m in methods if (m, "base") in worst and (m, "+DDIL") in worst)
    return ("Covariate shift as DAgger means it: a ratio above 1 is a student that errs more on the states it visits "
            f"than on the teacher's states from the same noise (mean over seeds). At the last step: {last}.")


def error_figure(results, path: Path) -> str:
    """Per method, per student step: the student's one-step error on its own states (toy.shift (b), mean and range over
    seeds), and its ratio to the error on the teacher's states beside the teacher's own single DDIM step (the control)."""
    methods = sorted({r["config"]["method"] for r in results})
    variants = [v for v in COLORS if any(_variant(r) == v for r in results)]
    fig, axes = plt.subplots(2, len(methods), figsize=(3.6 * len(methods), 5.4), squeeze=False)
    last = []
    for j, m in enumerate(methods):
        for v in variants:
            rs = [r for r in results if r["config"]["method"] == m and _variant(r) == v]
            ks = list(range(len(rs[0]["metrics"]["ratios"])))
            own = [[1e3 * r["metrics"]["ratios"][k]["err_own"] for r in rs] for k in ks]
            axes[0][j].errorbar(ks, [_mean(o) for o in own], yerr=[[_mean(o) - min(o) for o in own], [max(o) - _mean(o) for o in own]],
                                fmt="o", ls="-", c=COLORS[v], ms=3, capsize=2)
            axes[1][j].plot(ks, [_mean([r["metrics"]["ratios"][k]["own_vs_teacher"][0] for r in rs]) for k in ks], "-o", c=COLORS[v], ms=3)
            last.append(f"{m.upper()} {v} {_mean(own[-1]):.2f}e-3")
        ctrl = [_mean([r["metrics"]["ratios_teacher"][k]["own_vs_teacher"][0] for r in rs]) for k in ks]
        axes[1][j].plot(ks, ctrl, "--", c="grey")
        axes[1][j].axhline(1, c="k", lw=0.5)
        axes[0][j].set_yscale("log"), axes[0][j].set_title(f"{m.upper()}: error on own states x1e-3", fontsize=9)
        axes[1][j].set_title(f"{m.upper()}: own / teacher states", fontsize=9)
        for ax in axes[:, j]:
            ax.set_xticks(ks), ax.set_xlabel("student step k", fontsize=8)
    handles = [Line2D([], [], c=COLORS[v], marker="o", ms=3, label=v) for v in variants]
    _legend_on_top(fig, handles + [Line2D([], [], c="grey", ls="--", label="teacher's 1-step DDIM (control)")], path)
    return ("Top: each student's one-step error against the exact teacher's converged step on the states it visits itself "
            "(mean, bars the range over seeds); bottom: that error over the one on the teacher's states from the same noise, "
            "with the teacher's own single DDIM step as the control (above the control: covariate shift beyond how hard the "
            f"states are). Last step: {'; '.join(last)}.")


def teacher_figure(reference, path: Path) -> str:
    """Teacher accuracy: MMD of the exact teacher's DDIM samples to data vs its number of steps, with the floor."""
    sweep = reference["sweep"]
    S = [int(s) for s in sweep]
    m = [1e3 * _mean([r["mmd"] for r in sweep[str(s)]]) for s in S]
    tol = noise_floor(reference)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.axhspan(0, tol, color="lightgray", alpha=0.6, lw=0, label=f"noise floor, 2x max |data vs data| ({tol:.2f})")
    ax.plot(S, [max(v, 0.0) for v in m], "-o", label="exact teacher, DDIM")  # the unbiased MMD may dip below 0: drawn at 0
    ax.set_xscale("log", base=2), ax.set_yscale("symlog", linthresh=1.0), ax.set_ylim(bottom=0)  # linear below 1, log above
    ax.set_xlabel("total DDIM steps"), ax.set_ylabel("MMD to data x1e-3"), ax.legend(fontsize=7)
    save(fig, path)
    ok = [s for s, v in zip(S, m) if v <= max(tol, 1e-9)]
    used = reference.get("steps_used")
    at_used = f" At the {used} steps the runs use it is {m[S.index(used)]:.2f}e-3." if used in S else ""
    return (f"The exact teacher's DDIM reaches 2x the data-vs-data MMD floor ({tol:.2f}e-3) at "
            f"{min(ok) if ok else 'none of the tested'} steps.{at_used} Its 4-step DDIM is {m[S.index(4)]:.0f}e-3.")


def suite_figures(results, reference, out: Path, mixture: str) -> dict:
    """Write every suite figure; returns {title: (file name, one-line finding)}."""
    gmm = mixtures.load_mixture(mixture)
    figs = {}
    figs["Final samples"] = ("samples.png", samples_figure(results, gmm, out / "samples.png"))
    figs["Covariate shift per student step"] = ("shift.png", shift_figure(results, out / "shift.png", reference))
    figs["Student states over the forward marginals"] = ("states.png", states_figure(results, gmm, out / "states.png"))
    figs["On-policy error ratio per student step"] = ("ratio.png", ratio_figure(results, out / "ratio.png"))
    figs["Teacher accuracy"] = ("teacher.png", teacher_figure(reference, out / "teacher.png"))
    return figs


def high_d_figures(results, out: Path, mixture: str) -> dict:
    """The high-D panel's figures: the error per student step, and the samples on the data plane."""
    gmm, tag = mixtures.load_mixture(mixture), mixture.rsplit("-", 1)[-1]
    return {f"High D ({mixture}): error per student step": (f"error-{tag}.png", error_figure(results, out / f"error-{tag}.png")),
            f"High D ({mixture}): final samples": (f"samples-{tag}.png", samples_figure(results, gmm, out / f"samples-{tag}.png"))}
