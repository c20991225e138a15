"""toy.suite's worker-pool schedule: shared pre-fits, longest runs first, the teacher reference per seed, results
in the suite's order and a merged reference equal to the serial one."""
import dataclasses
import functools
import types
from concurrent.futures import ThreadPoolExecutor

import torch

from toy import run, suite

SERIAL_REFERENCE = suite.teacher_reference


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k

    def close(self):
        pass


def tiny_configs(seeds):
    cfgs = [c for c in suite.suite_configs(seeds, True, "ring8", 2)
            if (c.method, run.variant_name(dataclasses.asdict(c))) in (("lcm", "base"), ("pd", "+DDIL"), ("dmd2", "base"))]
    return [dataclasses.replace(c, train_steps=2, init_steps=2, n_eval=40, teacher_substeps=2) for c in cfgs]


def test_longest_first_puts_ddil_and_pd_first():
    order = [(c.method, run.variant_name(dataclasses.asdict(c))) for c in suite.longest_first(tiny_configs([0]))]
    assert order == [("pd", "+DDIL"), ("dmd2", "base"), ("lcm", "base")]


def test_run_in_pool_keeps_order_and_merges_reference(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(suite, "teacher_reference", functools.partial(SERIAL_REFERENCE, sweep=False))  # no sweep: fast
    cfgs, bar = tiny_configs([0, 1]), Bar()
    args = types.SimpleNamespace(mixture="ring8", steps=2)
    with ThreadPoolExecutor(2) as pool:
        results, reference = suite.run_in_pool(pool, cfgs, [0, 1], args, bar)
    assert bar.n == len(cfgs) == len(results)
    assert [(r["config"]["method"], r["config"]["seed"]) for r in results] == [(c.method, c.seed) for c in cfgs]
    serial = SERIAL_REFERENCE("ring8", 2, [0, 1], 40, 2, sweep=False)
    assert reference["rows"].keys() == serial["rows"].keys()
    for name, rows in serial["rows"].items():
        assert [r["mmd"] for r in reference["rows"][name]] == [r["mmd"] for r in rows]

