"""The oracle DAgger arm (ddil.py 7d; toy.run's 'oracle' arm): its labels are the exact teacher's converged step from
each state it trains on, to the point the student's own step aims at, and the arm trains on fresh student rollouts."""
import dataclasses

import pytest
import torch

import ddil
from toy import mixtures, run
from toy.models import AnalyticTeacher

K = 8


@pytest.fixture(scope="module")
def setup():
    gmm = mixtures.load_mixture("ring8-d8")
    alpha_bar = ddil.make_alpha_bar()
    return AnalyticTeacher(gmm, alpha_bar), alpha_bar, ddil.uniform_grid(4)


def states_at(grid, t, D=8, seed=0):
    """Arbitrary states at times t (n,), in their student intervals."""
    t = torch.tensor(t)
    x = torch.randn(len(t), D, generator=torch.Generator().manual_seed(seed))
    return ddil.States(x, t, ddil.interval_index(grid, t), torch.full_like(t, ddil.SOURCE_STUDENT))


def chained_solve(teacher, alpha_bar, grid, x, t, to_clean):
    """The reference, one state at a time: teacher_solve with K substeps to the next grid point, then K per interval
    to clean (to_clean), written without ddil.oracle_labels' batching."""
    points = list(grid) + [ddil.T_CLEAN]
    k = int(ddil.interval_index(grid, torch.tensor([t]))[0])
    x, t = x[None].clone(), torch.tensor([t])
    for s in points[k + 1: (len(points) if to_clean else k + 2)]:
        x = ddil.teacher_solve(teacher, x, t, torch.tensor([s]), None, None, alpha_bar, None, K)
        t = torch.tensor([s])
    return x[0]


@pytest.mark.parametrize("to_clean", [False, True])
def test_oracle_labels_are_the_exact_teachers_converged_step(setup, to_clean):
    teacher, alpha_bar, grid = setup
    s = states_at(grid, [999, 749, 499, 249, 999, 600, 120, 300])  # grid points and points inside intervals (LCM)
    got = ddil.oracle_labels(ddil.teacher_policy(teacher, alpha_bar, None, K, grid), s, grid, to_clean)
    want = torch.stack([chained_solve(teacher, alpha_bar, grid, x, int(t), to_clean) for x, t in zip(s.x, s.t)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not to_clean:  # from a grid point: one solve to tau_{k+1}, what toy.shift measures the student against
        one = ddil.teacher_solve(teacher, s.x[:4], s.t[:4], ddil.next_time(grid, s.k[:4]), None, None, alpha_bar, None, K)
        torch.testing.assert_close(got[:4], one)


def test_oracle_labels_converge_with_the_substeps(setup):
    """The labels approach the K = 96 solve as K grows: the labels are a converged solve, not one DDIM step."""
    teacher, alpha_bar, grid = setup
    s = states_at(grid, [999, 749, 499, 249] * 8, seed=1)
    label = lambda k: ddil.oracle_labels(ddil.teacher_policy(teacher, alpha_bar, None, k, grid), s, grid, True)  # noqa: E731
    ref = label(96)
    errs = [(label(k) - ref).square().mean().item() for k in (1, 4, 16)]
    assert errs[0] > 4 * errs[1] > 16 * errs[2]  # DDIM is first order: 4x the substeps, about 1/16 the MSE; asked: at least 1/4


@pytest.mark.parametrize("method", ["pd", "lcm", "dmd2"])
def test_oracle_arm_trains_on_fresh_rollouts_with_exact_labels(monkeypatch, method):
    """Every batch the oracle arm trains on is fresh student-rollout states (no buffer), and its labels are the exact
    teacher's converged solve from each of them (PD: the x_tilde whose DDIM step lands on the solve to tau_{k+1})."""
    cfg = run.arm_config(method, "oracle", mixture="ring8-d8", train_steps=4, init_steps=0, n_eval=20, oracle_substeps=K)
    cfg_r, gmm = run.resolve(cfg)
    assert cfg.labels == "exact" and cfg.ddil.buffer_capacity == 0 and cfg.ddil.betas == (0.0, 0.0, 1.0)
    alpha_bar = ddil.make_alpha_bar()
    teacher = AnalyticTeacher(gmm, alpha_bar)
    seen = []
    if method == "pd":
        real = ddil.pd_train_step
        monkeypatch.setattr(ddil, "pd_train_step", lambda *a, x_tilde=None, **k: (seen.append((a[3], x_tilde)), real(*a, x_tilde=x_tilde, **k))[1])
    else:
        real = ddil.oracle_train_step
        monkeypatch.setattr(ddil, "oracle_train_step", lambda opt, s, f, y, d, **k: (seen.append((s, y)), real(opt, s, f, y, d, **k))[1])
    run.run_one(cfg)
    assert len(seen) == cfg.train_steps
    for s, label in seen:
        assert (s.source == ddil.SOURCE_STUDENT).all()
        grid = ddil.uniform_grid(4) if method != "lcm" else ddil.lcm_grid(4)
        if method == "pd":  # the round's grid: round 1 has 8 points
            grid = ddil.uniform_grid(8) if len(set(s.t.tolist()) - set(ddil.uniform_grid(4))) else grid
        want = torch.stack([chained_solve(teacher, alpha_bar, grid, x, int(t), method != "pd") for x, t in zip(s.x, s.t)])
        if method == "pd":
            want = ddil.pd_target(s.x, want, s.t, ddil.next_time(grid, ddil.interval_index(grid, s.t)), alpha_bar)
        if method == "dmd2":  # the generator sees pure noise at t = T - 1, as in DMD2
            assert set(s.t.tolist()) <= set(grid)
        torch.testing.assert_close(label, want, rtol=1e-4, atol=1e-5)


def test_oracle_flag_and_bad_labels_fail_before_compute(capsys):
    assert run.main(["--oracle", "--ddil"]) == 2
    assert "--oracle" in capsys.readouterr().err
    assert run.main(["--labels", "round"]) == 2
    assert "--labels 'round' is invalid: allowed 'base' or 'exact'" in capsys.readouterr().err


def test_arms_change_only_what_they_say():
    """The state arms share the base method's targets and times; only the oracle arms change the labels."""
    base = run.arm_config("lcm", "base")
    for arm in run.ARMS:
        cfg = run.arm_config("lcm", arm)
        assert cfg.labels == ("exact" if arm.startswith("oracle") else "base")
        assert cfg.rollout_substeps == (cfg.oracle_substeps if arm == "oracle" else 0)  # the oracle's expert acts as it labels
        same = dataclasses.replace(cfg, ddil=base.ddil, labels=base.labels, rollout_substeps=base.rollout_substeps)
        assert same == base, arm
    with pytest.raises(ddil.ConfigError, match="arm='dagger'"):
        run.arm_config("lcm", "dagger")


@pytest.mark.parametrize("method", ["pd", "lcm", "dmd2"])
def test_oracle_expert_acts_in_rollouts_as_it_labels(monkeypatch, method):
    """In the oracle arm the teacher acts in the rollouts with the K it labels with (DAgger's mixed policy uses the
    expert that labels); every other arm's rollouts use teacher_substeps. Training only: evaluation is stopped."""
    Ks = {}
    real = ddil.teacher_policy
    monkeypatch.setattr(ddil, "teacher_policy", lambda *a, **k: (Ks.setdefault(arm, []).append(a[3]), real(*a, **k))[1])

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(run, "evaluate", stop)
    for arm in ("oracle", "student only", "+DDIL exact labels"):
        cfg = run.arm_config(method, arm.removesuffix(" exact labels"), mixture="ring8-d8", train_steps=2, init_steps=0,
                             n_eval=20, oracle_substeps=K, teacher_substeps=6)
        cfg.labels = "exact" if arm.endswith("labels") else cfg.labels  # the mechanism's row: only the labels change
        with pytest.raises(Stop):
            run.run_one(cfg)
    assert Ks["oracle"] and set(Ks["oracle"]) == {K}
    assert Ks["student only"] and set(Ks["student only"]) == {6}
    assert 6 in Ks["+DDIL exact labels"] and set(Ks["+DDIL exact labels"]) <= {6, K}  # rollouts at 6, labels at K


def test_variant_name_tells_the_arms_apart():
    """The suite's row names: a student-only +DDIL (no forward share, but a buffer and mixing) is not base, DMD2's
    base (student rollouts of its own) is base, and reflection and exact labels are named."""
    name = lambda cfg: run.variant_name(dataclasses.asdict(cfg))  # noqa: E731
    assert name(run.arm_config("lcm", "student only")) == "+DDIL"
    assert name(run.arm_config("lcm", "base")) == "base"
    assert name(run.variant_config("dmd2", False, "none")) == "base"
    assert name(run.variant_config("dmd2", True, "reflect")) == "+DDIL+reflected"
    assert name(run.variant_config("pd", False, "clip")) == "+reflected"
    assert name(run.arm_config("pd", "oracle labels")) == "base +exact labels"
    assert name(run.arm_config("pd", "oracle")) == "+DDIL +exact labels"
