"""The study's aggregation code: confidence intervals, paired verdicts, cache keys and the cache itself,
and the quick study end to end."""
import dataclasses
import json

import pytest
from scipy import stats

from toy import study, study_cells, suite


def test_mean_ci_matches_scipy_t_interval():
    values = [1.0, 2.0, 4.0, 7.0, 11.0]
    mean, half = study_cells.mean_ci(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 5, scale=stats.sem(values))
    assert mean == pytest.approx(5.0)
    assert half == pytest.approx((hi - lo) / 2)
    assert study_cells.mean_ci([3.0]) == (3.0, 0.0)


def test_paired_verdict():
    a = [10.0, 11.0, 12.0, 13.0, 14.0]
    assert study_cells.paired_verdict(a, [x - 2 for x in a]) == "better"  # lower is better, consistently lower
    assert study_cells.paired_verdict(a, [x + 2 for x in a]) == "worse"
    assert study_cells.paired_verdict(a, [x + (1 if i % 2 else -1) for i, x in enumerate(a)]) == "no clear difference"
    assert study_cells.paired_verdict([0.5, 0.6], [0.9, 1.0], lower_is_better=False) == "better"


def tiny(**kw):
    scale = study_cells.Scale(train_steps=2, init_steps=2, n_eval=50)
    return study_cells.cell("lcm", "+DDIL", 0, scale, **kw)


def test_config_key_is_stable_and_changes_with_the_config():
    assert study_cells.config_key(tiny()) == study_cells.config_key(tiny())
    assert study_cells.config_key(tiny()) != study_cells.config_key(tiny(refresh_share=0.5))
    assert study_cells.config_key(tiny()) != study_cells.config_key(dataclasses.replace(tiny(), seed=1))
    assert study_cells.config_key(tiny()) != study_cells.config_key(study_cells.with_reflect(tiny(), mode="clip"))
    assert len(study_cells.config_key(tiny())) == 20


def test_cache_reuses_cells_and_recomputes_a_changed_one(tmp_path, monkeypatch):
    cfg = tiny()
    cells = [study_cells.Cell("p", "a", cfg, study_cells.config_key(cfg))]
    first = study_cells.compute_all(cells, tmp_path, 1, lambda it, total: it)
    path = tmp_path / f"{cells[0].key}.json"
    assert json.loads(path.read_text())["metrics"]["mmd"] == first[cells[0].key]["metrics"]["mmd"]
    monkeypatch.setattr(study_cells, "_compute", lambda args: pytest.fail("a cached cell was recomputed"))
    assert study_cells.compute_all(cells, tmp_path, 1, lambda it, total: it) == first
    changed = tiny(refresh_share=0.5)
    cells2 = [study_cells.Cell("p", "a", changed, study_cells.config_key(changed))]
    monkeypatch.undo()
    again = study_cells.compute_all(cells2, tmp_path, 1, lambda it, total: it)
    assert cells2[0].key in again and (tmp_path / f"{cells2[0].key}.json").exists()
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries


def test_quick_study_writes_all_eight_parts(tmp_path):
    assert study.main(["--quick", "--train-steps", "2", "--jobs", "2", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "STUDY.md").read_text()
    for head in ("## 1. Covariate shift", "## 2. Main table", "## 3. Held-out", "## 4. Ablations", "## 5. Cost",
                 "## 6. Covariate shift vs dimension", "## 7. Verdicts", "## 8. Where on-policy training helps"):
        assert head in report
    assert "| LCM | 16 | +DDIL |" in report and "lowrank-d16" in report  # the D scan and its held-out family
    assert "oracle" in report and "| LCM | 16 | 64 | 150 | oracle |" in report  # part 8's map, with its oracle arm
    for fig in ("shift", "betas", "teacher", "mixing", "buffer", "reflect", "width", "steps", "cost", "dim", "dim-metrics", "map"):
        assert (tmp_path / f"study-{fig}.png").exists()


def test_study_bad_input_exits_2(capsys):
    assert study.main(["--train-steps", "0"]) == 2
    assert "--train-steps" in capsys.readouterr().err


def test_map_cells_change_only_the_state_source_and_share_part_6s_cells():
    """The map's state arms differ from its base cell only in the DDIL config; its base and +DDIL cells at 600 steps,
    width 128, are part 6's own (one cache entry); every arm of every cell has map_seeds seeds."""
    scale = study_cells.Scale()
    cells = study_cells.study_cells(scale)
    by_label = {}
    for c in cells:
        by_label.setdefault((c.part, c.label), []).append(c)
    base = by_label[("map", study_cells.map_label("lcm", "base", 32, 128, 1500))][0].cfg
    for arm in ("+DDIL", "mostly student", "student only"):
        cfg = by_label[("map", study_cells.map_label("lcm", arm, 32, 128, 1500))][0].cfg
        assert dataclasses.replace(cfg, ddil=base.ddil) == base, arm
    oracle = by_label[("map", study_cells.map_label("lcm", "oracle", 32, 128, 1500))][0].cfg
    assert oracle.labels == "exact" and oracle.ddil.buffer_capacity == 0
    keys = lambda part, label: {c.key for c in by_label[(part, label)]}  # noqa: E731
    assert keys("map", study_cells.map_label("pd", "base", 32, 128, 600)) <= keys("dim", "pd base D=32 N=4 w=128")
    seeds = {"map": scale.map_seeds, "map held-out": scale.map_seeds, "mechanism": scale.mechanism_seeds}
    assert all(len(v) == seeds[part] for (part, _), v in by_label.items() if part in seeds)
    held = by_label[("map held-out", "lowrank-d32 lcm student only")][0].cfg
    assert held.mixture == "lowrank-d32" and held.ddil.betas == (0.0, 0.0, 1.0) and held.labels == "base"


def test_make_toys_high_d_runs_are_cells_of_the_map():
    """make toy's high-D panel runs exactly the map's configs at its (D, width, steps): the setting it shows is one the
    map measured, not a neighbour of it."""
    scale = study_cells.Scale()
    keys = {c.key: c.label for c in study_cells.study_cells(scale) if c.part == "map"}
    high = [c for c in suite.suite_configs([0, 1], False, "ring8", 4) if c.mixture == suite.HIGH_D["mixture"]]
    assert len(high) == 2 * 2 * len(suite.HIGH_D["betas"])
    for cfg in high:
        assert study_cells.config_key(cfg) in keys, (cfg.method, cfg.ddil.betas)
