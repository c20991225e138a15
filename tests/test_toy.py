"""The toy end to end: a short distillation beats the teacher's own few-step sampler; bad input fails
fast with exit code 2; non-finite losses stop the run; results are written atomically."""
import dataclasses
import json

import pytest
import torch

import ddil
from toy import metrics, mixtures, run, suite
from toy.models import AnalyticTeacher, MLPDenoiser


def small(method, use_ddil=False, reflect="none", **kw):
    base = dict(train_steps=300, init_steps=800, n_eval=1000, teacher_substeps=16)
    base.update(kw)
    cfg = run.variant_config(method, use_ddil, reflect, **base)
    cfg.pd = dataclasses.replace(cfg.pd, N_start=2 * cfg.steps, N_final=cfg.steps)
    return cfg


def teacher_ddim_mmd(cfg) -> float:
    """MMD to held-out data of the exact teacher's own N-step DDIM, with run.evaluate's noise and data."""
    cfg, gmm = run.resolve(cfg)
    alpha_bar = ddil.make_alpha_bar()
    x_T = torch.randn(cfg.n_eval, 2, generator=torch.Generator().manual_seed(10_000 + cfg.seed))
    x0, _ = ddil.sample(ddil.teacher_policy(AnalyticTeacher(gmm, alpha_bar), alpha_bar, None, 1), x_T,
                        ddil.lcm_grid(cfg.steps))
    data, _ = mixtures.sample(gmm, cfg.n_eval, torch.Generator().manual_seed(20_000 + cfg.seed))
    return metrics.sample_metrics(gmm, x0, data)["mmd"]


def test_distilled_4_step_student_beats_teacher_4_step_ddim():
    """< 30 s on CPU: LCM + DDIL (rollouts, buffer, reflection) at N = 4 beats the exact teacher's 4-step DDIM."""
    torch.set_num_threads(2)
    cfg = small("lcm", True, "reflect")
    res = run.run_one(cfg)
    student, teacher = res["metrics"]["mmd"], teacher_ddim_mmd(cfg)
    assert student < 0.6 * teacher, (student, teacher)
    assert res["metrics"]["mode_coverage"] == 1.0
    assert len(res["metrics"]["shift"]) == 3 and all("mmd_to_ref" in row for row in res["metrics"]["shift"])


@pytest.mark.parametrize("method", ["pd", "dmd2"])
def test_other_methods_run_with_ddil(method):
    cfg = small(method, True, "clip", train_steps=20, init_steps=20, n_eval=200)
    res = run.run_one(cfg)
    assert all(v == v for k, v in res["metrics"].items() if isinstance(v, float))  # no NaN metrics
    base = run.run_one(small(method, False, "clip", train_steps=20, init_steps=20, n_eval=200))
    # DDIL's rollouts cost teacher evaluations that the base method does not make (DMD2's base simulates with the
    # student only), and their states are young: made within the last refresh periods
    assert res["cost"]["teacher_nfe_per_step"] > base["cost"]["teacher_nfe_per_step"]
    assert 0 <= res["cost"]["rollout_state_mean_age"] <= 20


def test_conditional_lcm_and_dmd2_gan_paths_run(monkeypatch):
    """Conditional training states carry class labels of the mixture and guidance scales in [w_min, w_max]."""
    seen, ddil_states = [], ddil.ddil_states
    monkeypatch.setattr(ddil, "ddil_states", lambda *a, **kw: seen.append(ddil_states(*a, **kw)) or seen[-1])
    cfg = small("lcm", True, "none", train_steps=10, init_steps=10, n_eval=100, conditional=True)
    run.run_one(cfg)
    gmm = mixtures.load_mixture(cfg.mixture)
    assert len(seen) == 10
    for s in seen:
        assert s.cond is not None and set(s.cond.tolist()) <= set(gmm.labels.tolist())
        assert s.w is not None and bool(((s.w >= cfg.lcm.w_min) & (s.w <= cfg.lcm.w_max)).all())
    monkeypatch.undo()
    cfg = small("dmd2", True, "none", train_steps=5, init_steps=5, n_eval=100)
    cfg.dmd2 = dataclasses.replace(cfg.dmd2, gan_weight=0.1)
    assert run.run_one(cfg)["metrics"]["mmd"] == run.run_one(cfg)["metrics"]["mmd"]  # deterministic for a seed


def test_nan_loss_stops_with_step_and_method():
    cfg, gmm = run.resolve(small("lcm"))
    init = MLPDenoiser(ddil.make_alpha_bar(), 2, cfg.width, cfg.depth)
    with torch.no_grad():
        init.net[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"lcm: non-finite loss=nan at step 0"):
        run.run_one(cfg, init=init)


@pytest.mark.parametrize("argv, field", [
    (["--betas", "-0.1", "0.6", "0.5"], "beta_frwd"),
    (["--betas", "0.5", "0.6", "0.1"], "beta_frwd + beta_teacher + beta_student"),
    (["--steps", "51"], "steps"),
    (["--reflect", "dynamic", "--reflect-ratio", "0"], "reflect.ratio"),
    (["--reflect", "dynamic", "--reflect-ratio", "1.5"], "reflect.ratio"),
    (["--reflect", "mirror"], "reflect.mode"),
    (["--method", "gan"], "method"),
    (["--mixture", "moons"], "mixture"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--refresh", "0"], "ddil.refresh_share"),
])
def test_bad_input_exits_2_with_one_line_naming_the_field(argv, field, capsys, monkeypatch):
    monkeypatch.setattr(run, "run_one", lambda *a, **k: pytest.fail("compute started on invalid input"))
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and field in err


def test_bad_mixture_json_exits_2(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"weights": [0.7, 0.7], "means": [[0, 0], [1, 1]], "covs": [[[1, 0], [0, 1]]] * 2}))
    assert run.main(["--mixture", str(path)]) == 2
    assert "weights" in capsys.readouterr().err


def test_custom_mixture_json_runs(tmp_path):
    path = tmp_path / "mine.json"
    mixtures.save_mixture(mixtures.unequal(), path)
    cfg = small("lcm", mixture=str(path), train_steps=5, init_steps=5, n_eval=100)
    res = run.run_one(cfg)
    # the file's mixture is the one used: its data range sets the reflection domain, unlike ring8's
    assert res["config"]["reflect"]["range"] == run.data_range(mixtures.unequal()) != run.data_range(mixtures.ring8())


def test_write_json_atomic_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "r.json"
    run.write_json_atomic({"a": 1}, path)
    with pytest.raises(TypeError):
        run.write_json_atomic({"a": object()}, path)  # not serialisable: fails before touching the file
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_suite_table_mean_std():
    assert suite.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert suite.mean_std([5.0]) == (5.0, 0.0)


@pytest.mark.parametrize("module", ["toy.run", "toy.suite", "toy.study", "sd.tiny", "sd.sample", "sd.eval"])
def test_every_entry_point_has_help(module, capsys):
    import importlib
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0
    assert "usage: python -m " + module in capsys.readouterr().out


@pytest.mark.parametrize("use_ddil,buffer", [(False, None), (True, None), (True, 0)])
def test_pd_lookahead_trains_on_the_states_of_step_by_step_drawing(monkeypatch, use_ddil, buffer):
    """PD draws PD_LOOKAHEAD steps' states at once and makes their targets in one teacher call; where that cannot
    change the states (no student rollout between refreshes) the run equals step-by-step drawing, and without a
    buffer student rollouts follow the student step by step (lookahead 1)."""
    def trained(L):
        monkeypatch.setattr(run, "PD_LOOKAHEAD", L)
        cfg = small("pd", use_ddil, train_steps=24, init_steps=0, n_eval=50, teacher_substeps=8)
        if buffer is not None:
            cfg.ddil = dataclasses.replace(cfg.ddil, buffer_capacity=buffer)
        return run.run_one(cfg)["metrics"]["samples"]
    assert run.pd_lookahead(small("pd", True).ddil) == 10
    assert run.pd_lookahead(dataclasses.replace(small("pd", True).ddil, buffer_capacity=0)) == 1
    assert run.pd_lookahead(dataclasses.replace(small("pd", True).ddil, refresh_every=4)) == 2
    torch.testing.assert_close(torch.tensor(trained(5)), torch.tensor(trained(1)), rtol=1e-4, atol=1e-5)


def test_teacher_side_of_evaluation_is_made_once_per_key_and_equals_a_fresh_one(monkeypatch):
    """evaluate's student-independent half is shared by the runs of one seed, grid and sampler, and only by them."""
    monkeypatch.setattr(run, "_TEACHER_SIDE", {})
    kw = dict(train_steps=5, init_steps=5, n_eval=100, teacher_substeps=8)
    lcm = run.run_one(small("lcm", **kw))["metrics"]
    run.run_one(small("pd", **kw))  # another grid
    run.run_one(small("lcm", False, "reflect", **kw))  # another sampler
    assert len(run._TEACHER_SIDE) == 3
    lcm_ddil = run.run_one(small("lcm", True, **kw))["metrics"]  # another student, the same key
    assert len(run._TEACHER_SIDE) == 3 and lcm_ddil["ratios_teacher"] == lcm["ratios_teacher"]
    run._TEACHER_SIDE.clear()
    assert run.run_one(small("lcm", **kw))["metrics"]["ratios_teacher"] == lcm["ratios_teacher"]
