"""The toy study's wall time, predicted from its cache: every cell's own compute time (toy.run's timers, saved in
the cache file), handed to --jobs workers in the study's order (toy.study_cells.compute_all: longest first by
cost_rank, each to the first free worker). The network-teacher pre-fits run before any cell and are not timed in
the cache: the script counts them (time them from make toy-study's log). Prints numbers; it is not a timed test. Use it to size the study before running it from an empty cache, and to compare
a prediction with a measured `make toy-study`.

    .venv/bin/python scripts/study_time.py                  # the default Scale, results/toy/cache, 2 workers
    .venv/bin/python scripts/study_time.py --jobs 4
"""
from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

from toy import study_cells


def predict(cells, cache: Path, jobs: int) -> dict:
    """Simulate compute_all on cached cell times (train + evaluation). Cells missing from the cache are left out."""
    runs = {c.key: c.cfg for c in cells}
    times = {k: r["time"]["train_s"] + r["time"]["eval_s"] for k in runs
             if (r := study_cells.load_cached(cache / f"{k}.json")) is not None}
    free = [0.0] * jobs
    for k in sorted(times, key=lambda k: -study_cells.cost_rank(runs[k])):  # each cell to the first free worker
        heapq.heapreplace(free, free[0] + times[k])
    first_part: dict[str, str] = {}
    for c in cells:  # a run shared by several parts counts in the first that lists it
        first_part.setdefault(c.key, c.part)
    parts: dict[str, float] = {}
    for key, t in times.items():
        parts[first_part[key]] = parts.get(first_part[key], 0.0) + t
    return {"runs": len(runs), "cached": len(times), "prefits": len({study_cells.init_key(c) for c in runs.values()}),
            "compute_s": sum(times.values()), "wall_s": max(free), "parts_s": parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/study_time.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("results/toy/cache"), help="the study's cell cache")
    p.add_argument("--jobs", type=int, default=2, help="workers, >= 1")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs} is invalid: allowed >= 1")
    if not a.cache.is_dir():
        p.error(f"--cache {a.cache} is invalid: allowed a folder of cached cells (make toy-study writes one)")
    out = predict(study_cells.study_cells(study_cells.Scale()), a.cache, a.jobs)
    print(f"{out['runs']} distinct runs, {out['cached']} of them cached; {out['prefits']} network-teacher pre-fits")
    print(f"cells: {out['compute_s'] / 60:.1f} min of single-process compute; on {a.jobs} workers in the study's order "
          f"{out['wall_s'] / 60:.1f} min wall (cached cells only; add the pre-fits and the report)")
    print("single-process compute by part: " + ", ".join(f"{p} {s / 60:.1f} min" for p, s in
                                                      sorted(out["parts_s"].items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
