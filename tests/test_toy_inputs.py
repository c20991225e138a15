"""What a new user of the toy entry points meets first (issue 8): bad input and bad paths stop before any
compute with one line naming the flag, exit code 2 and nothing written; a NaN stop names its phase; the
summary, tables and figures say what they measured."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toy import plots, run, study, study_cells, suite

ROOT = Path(__file__).resolve().parents[1]


def no_compute(monkeypatch):
    """Make every entry point fail the test if it starts computing."""
    fail = lambda *a, **k: pytest.fail("compute started on invalid input")  # noqa: E731
    monkeypatch.setattr(run, "run_one", fail)
    monkeypatch.setattr(suite, "ProcessPoolExecutor", fail)
    monkeypatch.setattr(study, "compute_all", fail)


def one_error_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------
# As a user types them: subprocesses (each pays the torch import, so only a few)


@pytest.mark.parametrize("argv", [
    ["toy.run", "--out", "{tmp}"],  # an existing directory
    ["toy.run", "--betas", "0.5", "0.5"],  # argparse: one line, not the usage block
    ["toy.suite", "--out", "{tmp}/a_file/results"],  # unwritable: a file where a folder must be
])
def test_bad_input_in_a_subprocess_exits_2_with_one_line_and_writes_nothing(argv, tmp_path):
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", *[a.format(tmp=tmp_path) for a in argv]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr)
    assert proc.stdout == "" and "usage:" not in proc.stderr
    assert listing(tmp_path) == before  # no output, no stray .tmp


# ----------------------------------------------------------------------------------------------------
# toy.run, in process


@pytest.mark.parametrize("argv, says", [
    (["--seed", "-1"], "--seed -1 is invalid: allowed >= 0"),
    (["--buffer", "-1", "--ddil"], "--buffer -1 is invalid"),
    (["--ddil", "--buffer", "10"], "--buffer 10 is invalid: allowed >= 320"),  # was a traceback after the pre-fit
    (["--refresh", "2"], "--refresh 2.0 is invalid"),
    (["--reflect", "dynamic", "--reflect-ratio", "1.5"], "--reflect-ratio 1.5 is invalid"),
    (["--gan-weight", "-1"], "--gan-weight -1.0 is invalid"),
    (["--betas", "0.5", "0.5", "0.5"], "--betas FRWD + TEACHER + STUDENT 1.5 is invalid"),
    (["--mixture", "no/such/mixture.json"], "--mixture 'no/such/mixture.json' does not exist"),
])
def test_run_errors_name_the_flag_typed(argv, says, capsys, monkeypatch):
    no_compute(monkeypatch)
    assert run.main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert says in err
    assert not err.startswith(("error: ddil.", "error: reflect.", "error: dmd2.", "error: mixture "))


@pytest.mark.parametrize("argv, says", [
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--betas", "0.5", "0.5"], "argument --betas: expected 3 arguments"),
    (["--refresh", "nan"], "argument --refresh: 'nan' is not a finite number"),
    (["--reflect-range", "inf"], "argument --reflect-range: 'inf' is not a finite number"),
])
def test_argparse_errors_are_one_line(argv, says, capsys, monkeypatch):
    no_compute(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    err = one_error_line(capsys.readouterr().err)
    assert says in err and "usage:" not in err


def test_mixture_that_is_a_directory_says_so(tmp_path, capsys, monkeypatch):
    no_compute(monkeypatch)
    assert run.main(["--mixture", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("out, says", [
    ("{tmp}", "is a directory"),
    ("{tmp}/a_file/run.json", "'{tmp}/a_file' is a file, not a directory"),
])
def test_run_out_checked_before_compute(out, says, tmp_path, capsys, monkeypatch):
    no_compute(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    assert run.main(["--out", out.format(tmp=tmp_path)]) == 2
    assert says.format(tmp=tmp_path) in one_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc, where no file can be created")
def test_run_out_unwritable_folder_checked_before_compute(capsys, monkeypatch):
    no_compute(monkeypatch)
    assert run.main(["--out", "/proc/ddil-test/run.json"]) == 2
    assert "--out '/proc/ddil-test/run.json' is not writable" in one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_run_out_read_only_folder_checked_before_compute(tmp_path, capsys, monkeypatch):
    no_compute(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run.main(["--out", str(ro / "run.json")]) == 2
        assert "is not writable" in one_error_line(capsys.readouterr().err)
        assert listing(ro) == []
    finally:
        ro.chmod(0o700)


def test_check_writable_accepts_new_folders_and_leaves_nothing(tmp_path):
    run.check_writable(tmp_path / "new" / "deeper" / "run.json", "--out")
    run.check_writable(tmp_path / "new_dir", "--out", "dir")
    assert listing(tmp_path) == []  # the probe file is gone, no folder made


# ----------------------------------------------------------------------------------------------------
# toy.suite and toy.study: paths checked before the runs


@pytest.mark.parametrize("argv, says", [
    (["--out", "{tmp}/a_file"], "--out '{tmp}/a_file' is a file"),
    (["--out", "{tmp}/a_file/results"], "is not writable"),
    (["--seeds", "0"], "--seeds 0 is invalid: allowed >= 1"),
    (["--jobs", "0"], "--jobs 0 is invalid: allowed >= 1"),
    (["--steps", "0"], "--steps 0 is invalid"),
    (["--mixture", "nope.json"], "--mixture 'nope.json' does not exist"),
])
def test_suite_bad_input_before_the_runs(argv, says, tmp_path, capsys, monkeypatch):
    no_compute(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    assert suite.main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert says.format(tmp=tmp_path) in one_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("argv, says", [
    (["--out", "{tmp}/a_file"], "--out '{tmp}/a_file' is a file"),
    (["--cache", "{tmp}/a_file/cache"], "--cache '{tmp}/a_file/cache' is not writable"),
    (["--jobs", "0"], "--jobs 0 is invalid"),
    (["--train-steps", "0"], "--train-steps 0 is invalid"),
])
def test_study_bad_input_before_the_runs(argv, says, tmp_path, capsys, monkeypatch):
    no_compute(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    assert study.main([a.format(tmp=tmp_path) for a in argv] + ["--quick"]) == 2
    assert says.format(tmp=tmp_path) in one_error_line(capsys.readouterr().err)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("main", [suite.main, study.main])
def test_suite_and_study_argparse_errors_are_one_line(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--jobs", "1.5"])
    assert exc.value.code == 2 and "usage:" not in one_error_line(capsys.readouterr().err)


def test_buffer_check_accepts_every_suite_and_study_config():
    """The up-front buffer check rejects nothing the suite or the study runs (each resolves, so validates)."""
    for cfg in suite.suite_configs([0], False, "ring8", 4):
        run.resolve(cfg)
    assert len(study_cells.study_cells(study_cells.Scale())) > 300


def test_unreadable_study_cache_entry_is_recomputed_not_a_traceback(tmp_path):
    (tmp_path / "half.json").write_text('{"config": {"method": ')
    assert study_cells.load_cached(tmp_path / "half.json") is None
    assert study_cells.load_cached(tmp_path / "absent.json") is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert study_cells.load_cached(tmp_path / "ok.json") == {"a": 1}


# ----------------------------------------------------------------------------------------------------
# The NaN stop names its phase


def test_prefit_nan_is_named_as_the_prefit_not_step_0():
    cfg = run.ToyConfig(lr=1e30, init_steps=5, train_steps=2, n_eval=50, batch_size=16)  # the regression diverges
    with pytest.raises(run.PrefitError, match="network-teacher pre-fit: non-finite weights") as exc:
        run.run_one(cfg)
    assert "step 0" not in str(exc.value)


def _nan_net(net, *a, **k):
    with torch.no_grad():
        net.net[-1].bias.fill_(float("nan"))
    return net


def test_main_prints_one_line_naming_the_phase(capsys, monkeypatch):
    monkeypatch.setattr(run, "fit_to_teacher", _nan_net)
    assert run.main(["--train-steps", "3"]) == 1
    err = one_error_line(capsys.readouterr().err.strip().splitlines()[-1])
    assert "network-teacher pre-fit" in err and "step 0" not in err
    monkeypatch.setattr(run, "fit_to_teacher", lambda net, *a, **k: net)  # a finite network teacher, then a NaN loss
    monkeypatch.setitem(run.TRAIN, "lcm", lambda cfg, *a: run.ddil.distill(lambda step: {"loss": float("nan")}, cfg.train_steps, "lcm", a[-1]))
    assert run.main(["--train-steps", "3"]) == 1
    err = one_error_line(capsys.readouterr().err.strip().splitlines()[-1])
    assert err.startswith("error: distillation stopped: lcm: non-finite loss=nan at step 0")


# ----------------------------------------------------------------------------------------------------
# What a user reads: the progress bar, the summary line, tables, figures


@pytest.mark.parametrize("argv, label", [
    (["--method", "dmd2"], "base"),  # its priors are (0, 0, 1): backward simulation, still the base method
    (["--method", "dmd2", "--ddil"], "+DDIL"),
    (["--ddil", "--reflect", "reflect"], "+DDIL+reflected"),
    (["--betas", "0.5", "0", "0.5", "--reflect", "clip"], "betas 0.5/0/0.5+clip"),
])
def test_variant_label(argv, label):
    assert run.parse_args(argv)[2] == label


def test_progress_bar_names_the_variant_and_summary_uses_table_units(capsys, monkeypatch):
    def fake_run_one(cfg, on_step):
        on_step(0, {"loss": 0.5})
        m = {"mmd": 0.01234, "nll": 1.0, "mode_coverage": 1.0, "mode_precision": 0.9, "density": 1.0, "coverage": 0.9,
             "shift_last": 0.0005}
        return {"metrics": m, "cost": {"teacher_nfe_per_step": 256, "student_nfe_per_step": 256}, "time": {"train_s": 1.0}}
    monkeypatch.setattr(run, "run_one", fake_run_one)
    assert run.main(["--method", "dmd2", "--train-steps", "1"]) == 0
    out, err = capsys.readouterr()
    assert "DMD2 base" in err and "ddil=" not in err
    assert out.startswith("DMD2 base, N=4, seed 0: MMD 12.34 x1e-3,") and "shift 0.50 x1e-3" in out


def _result(method: str, use_ddil: bool, seed: int, value: float) -> dict:
    cfg = dataclasses.asdict(run.variant_config(method, use_ddil, "none", seed=seed))
    return {"config": cfg, "metrics": {c[0]: value for c in suite.COLUMNS}}


def test_single_seed_tables_print_a_dash_not_zero_spread():
    md, _ = suite.table([_result("lcm", False, 0, 0.01)], {"rows": {}})
    assert "10.00 ± –" in md and "± 0.00" not in md
    md, _ = suite.table([_result("lcm", False, 0, 0.01), _result("lcm", False, 1, 0.02)], {"rows": {}})
    assert "15.00 ± 7.07" in md and "–" not in md
    one = study_cells.metric_table({"LCM base": [_result("lcm", False, 0, 0.01)]})
    assert "10.00 ± –" in one and "± 0.00" not in one
    assert run.pm(1.0, 0.0, 1) == "1.00 ± –" and run.pm(1.0, 0.5, 3, ".1f") == "1.0 ± 0.5"


def test_reference_row_is_named_by_what_was_measured():
    ref = suite.teacher_reference("ring8", 4, [0], n_eval=50, substeps=24, sweep=False)
    assert "teacher DDIM 96 (as in rollouts)" in ref["rows"]
    assert not any("converged" in name for name in ref["rows"])


def _fake_results(gmm) -> tuple[list, dict]:
    """Suite-shaped results for two methods x two variants, with states and shift rows, and a reference."""
    grid, out = [999, 759, 499, 259], []
    for method in ("lcm", "dmd2"):
        for use_ddil in (False, True):
            x, _ = run.mixtures.sample(gmm, 60, torch.Generator().manual_seed(1))
            shift = [{"k": k, "t": grid[k], "mmd_to_forward": 1e-3 * k, "mmd_to_ref": -1e-3} for k in (1, 2, 3)]
            metrics = {"samples": x.tolist(), "states": [x.tolist()] * 4, "shift": shift, "mmd": 0.01, "shift_last": 0.003}
            out.append({"config": dataclasses.asdict(run.variant_config(method, use_ddil, "none")), "grid": grid, "metrics": metrics})
    reference = {"rows": {"data vs data (floor)": [{"mmd": -0.0004}]}, "steps_used": 192,
                 "sweep": {str(S): [{"mmd": v}] for S, v in ((4, 0.16), (192, 0.002), (512, -0.0003))}}
    return out, reference


def test_figures_have_legends_bands_and_no_negative_symlog(tmp_path, monkeypatch):
    figs = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, top=1.0: figs.setdefault(Path(path).stem, fig))
    gmm = run.mixtures.load_mixture("ring8")
    results, reference = _fake_results(gmm)
    plots.samples_figure(results, gmm, tmp_path / "samples.png")
    plots.states_figure(results, gmm, tmp_path / "states.png")
    shift_line = plots.shift_figure(results, tmp_path / "shift.png", reference)
    plots.teacher_figure(reference, tmp_path / "teacher.png")
    legend = lambda name: [t.get_text() for t in figs[name].legends[0].get_texts()]  # noqa: E731  one shared legend
    assert "data" in legend("samples")
    assert "fresh samples of p_tau_k" in legend("states") and "base student states" in legend("states")
    assert len(figs["states"].axes) == 2 * 2 * 3  # base and +DDIL side by side: 2 methods x (2 variants x 3 steps)
    assert any("noise floor" in t for t in legend("shift")) and "noise floor" in shift_line
    assert all(ax.patches for ax in figs["shift"].axes)  # the band is in every panel
    ax = figs["teacher"].axes[0]
    assert ax.get_ylim()[0] == 0 and min(ax.lines[0].get_ydata()) == 0  # the 512-step -0.3e-3 is drawn at 0


def test_failed_atomic_write_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "r.md").write_text("old")
    monkeypatch.setattr(run.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        run.write_text_atomic("new", tmp_path / "r.md")
    assert listing(tmp_path) == ["r.md"] and (tmp_path / "r.md").read_text() == "old"
