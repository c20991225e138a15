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
    cfgs = [c for c in suite.suite_configs(seeds, True, "ring8", 2, "none")
            if (c.method, run.variant_name(dataclasses.asdict(c))) in (("lcm", "base"), ("pd", "+DDIL"), ("dmd2", "base"))]
    return [dataclasses.replace(c, train_steps=2, init_steps=2, n_eval=40, teacher_substeps=2) for c in cfgs]


def test_longest_first_puts_ddil_and_pd_first():
    order = [(c.method, run.variant_name(dataclasses.asdict(c))) for c in suite.longest_first(tiny_configs([0]))]
    assert order == [("pd", "+DDIL"), ("dmd2", "base"), ("lcm", "base")]


def test_run_in_pool_keeps_order_and_merges_reference(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(suite, "teacher_reference", functools.partial(SERIAL_REFERENCE, sweep=False))  # no sweep: fast
    cfgs, bar = tiny_configs([0, 1]), Bar()
    args = types.SimpleNamespace(mixture="ring8", steps=2, high_d="none")
    with ThreadPoolExecutor(2) as pool:
        results, reference = suite.run_in_pool(pool, cfgs, [0, 1], args, bar)
    assert bar.n == len(cfgs) == len(results)
    assert [(r["config"]["method"], r["config"]["seed"]) for r in results] == [(c.method, c.seed) for c in cfgs]
    serial = SERIAL_REFERENCE("ring8", 2, [0, 1], 40, 2, sweep=False)
    assert reference["rows"].keys() == serial["rows"].keys()
    for name, rows in serial["rows"].items():
        assert [r["mmd"] for r in reference["rows"][name]] == [r["mmd"] for r in rows]



def test_the_high_d_panel_runs_from_its_own_prefit_with_its_own_reference(monkeypatch):
    """make toy's high-D panel: PD and LCM, base and +DDIL at HIGH_D's width, steps and priors, on the high-D mixture;
    its runs start from a network teacher fitted on that mixture, and its reference rows carry the mixture's name."""
    cfgs = suite.suite_configs([0], False, "ring8", 4, "ring8-d8")
    high = [c for c in cfgs if c.mixture == "ring8-d8"]
    assert sorted((c.method, run.variant_name(dataclasses.asdict(c))) for c in high) == [
        ("lcm", "+DDIL"), ("lcm", "base"), ("pd", "+DDIL"), ("pd", "base")]
    assert all(c.width == suite.HIGH_D["width"] and c.train_steps == suite.HIGH_D["train_steps"] for c in high)
    assert all(c.ddil.betas == suite.HIGH_D["betas"][c.method] for c in high if run.variant_name(dataclasses.asdict(c)) == "+DDIL")
    torch.set_num_threads(1)
    monkeypatch.setattr(suite, "teacher_reference", functools.partial(SERIAL_REFERENCE, sweep=False))
    fitted = []
    real_fit = run.fit_init_state
    monkeypatch.setattr(run, "fit_init_state", lambda c: (fitted.append(c.mixture), real_fit(c))[1])
    tiny = [dataclasses.replace(c, train_steps=2, init_steps=2, n_eval=40, teacher_substeps=2)
            for c in (high[0], tiny_configs([0])[0])]
    with ThreadPoolExecutor(2) as pool:
        results, reference = suite.run_in_pool(pool, tiny, [0], types.SimpleNamespace(mixture="ring8", steps=4, high_d="ring8-d8"), Bar())
    assert sorted(fitted) == ["ring8", "ring8-d8"]
    assert [r["config"]["mixture"] for r in results] == ["ring8-d8", "ring8"]
    assert "data vs data (floor) (ring8-d8)" in reference["rows"] and "data vs data (floor)" in reference["rows"]
    md, _ = suite.table(results, reference, "ring8")
    assert "| PD base (ring8-d8) |" in md  # high[0] is PD base
