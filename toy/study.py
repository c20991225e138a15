"""`make toy-study`: the toy study of DDIL's claims, with the ablations the paper lacks. It writes
results/toy/STUDY.md (generated, never hand-edited) and its figures.

    python -m toy.study            # full: parts 1-8 (part 8: the on-policy map with the oracle DAgger arm); resumes from results/toy/cache/
    python -m toy.study --quick    # a small subset, about a minute

Every cell is one toy run (toy.run.run_one), cached by the hash of its resolved config, written
atomically: an interrupted study resumes where it stopped, and a changed config recomputes its cell.
The cells are defined in toy/study_cells.py; the report is written by toy/study_report.py and toy/study_map.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import ddil
from toy import mixtures, run, study_report
from toy.study_cells import QUICK, Scale, compute_all, study_cells


STUDY_FLAGS = {"jobs": "--jobs", "train_steps": "--train-steps"}  # field -> flag, so errors name what was typed


def main(argv=None) -> int:
    p = run.Parser(prog="python -m toy.study", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a small subset ({'/'.join(m.upper() for m in QUICK.methods)} only, "
                   f"N in {list(QUICK.steps)}, {QUICK.train_steps} steps, {QUICK.seeds_main} seeds)")
    p.add_argument("--train-steps", type=int, default=None, help="override the steps of every cell of parts 1-7 (part 8 keeps its map's lengths), >= 1 (tests use it)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes, >= 1")
    p.add_argument("--out", type=Path, default=Path("results/toy"), help="report directory (STUDY.md, study-*.png), checked before the runs")
    p.add_argument("--cache", type=Path, default=None, help="cell cache directory; default OUT/cache; checked before the runs")
    a = p.parse_args(argv)
    scale = dataclasses.replace(QUICK if a.quick else Scale())
    cache = a.cache or a.out / "cache"
    try:
        ddil.require(a.jobs >= 1, "jobs", a.jobs, ">= 1")
        if a.train_steps is not None:
            ddil.require(a.train_steps >= 1, "train_steps", a.train_steps, ">= 1")
            scale.train_steps = a.train_steps
        run.check_writable(a.out, "--out", "dir")
        run.check_writable(a.out / "STUDY.md", "--out", "file")
        run.check_writable(cache, "--cache" if a.cache else "--out", "dir")
        cells = study_cells(scale)  # resolves (validates) every config
    except (ddil.ConfigError, mixtures.MixtureError) as e:
        print(f"error: {run.flag_message(e, STUDY_FLAGS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        results = compute_all(cells, cache, a.jobs, lambda it, total: run.progress(iterable=it, total=total, desc="study cells"))
    except FloatingPointError as e:  # the NaN guard of one cell: say in which phase it stopped
        print(run.stop_message(e), file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    command = ("python -m toy.study" + (" --quick" if a.quick else "")
               + (f" --train-steps {a.train_steps}" if a.train_steps else ""))
    study_report.write(cells, results, scale, a.out, command, elapsed, a.jobs)
    print(f"{len(cells)} cells ({len(results)} distinct runs), {elapsed:.0f} s; report: {a.out / 'STUDY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
