"""sd/ as a new user meets it: inputs checked before any compute (exit 2, one line, nothing written), one-line
errors for damaged model files, safe resume and rotation, readable messages and grids, sampling with the
reflection the student was trained with, and density/coverage by the metric's authors (prdc).
Everything runs on the tiny pipeline of sd/tiny.py (CPU, no download)."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
import conftest  # noqa: E402
import ddil  # noqa: E402
from sd import adapters, checkpoint, config, data, sample, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in snow", "a bowl of ramen"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


run_main = conftest.run_sd_train  # sd.train's main in this process


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny pipeline (16 px) and a 2-prompt file beside it."""
    return conftest.tiny_sd_folder(tmp_path_factory, "sdin", PROMPTS)


def argv(model: Path, out: Path, *extra) -> list:
    """A 2-step LCM run (base method, no rollouts), a checkpoint every step."""
    return ["--method", "lcm", "--pretrained_teacher_model", model / "tiny", "--prompts_file", model / "prompts.txt",
            "--output_dir", out, "--device", "cpu", "--resolution", 16, "--train_batch_size", 2, "--max_train_steps", 2,
            "--num_inference_steps", 2, "--betas", 1, 0, 0, "--latents_per_prompt", 1, "--data_num_inference_steps", 2,
            "--checkpointing_steps", 1, "--checkpoints_total_limit", 3, *extra]


@pytest.fixture(scope="module")
def run(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lcm-run")
    assert run_main(argv(model, out)) == 0
    return out


def snapshot(folder: Path) -> dict:
    """Every file under folder with its size and mtime: to see that nothing was written."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def one_error_line(capsys, *expect) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert all(e in err[0] for e in expect), err
    return err[0]


def exit_code(main, args: list) -> int:
    """main's return value, or the code it exits with (argparse: --help, a bad flag)."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def damaged_teacher(model: Path, tmp: Path, damage: str) -> Path:
    """A copy of the tiny pipeline with one file damaged."""
    d = tmp / "teacher"
    shutil.copytree(model / "tiny", d)
    f = {"truncate": d / "unet" / "diffusion_pytorch_model.safetensors",
         "random": d / "vae" / "diffusion_pytorch_model.safetensors", "config": d / "unet" / "config.json"}[damage]
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2] if damage != "random" else os.urandom(len(raw)))
    return d


# ----------------------------------------------------------------------------------------------------
# sd.train: bad paths, damaged teachers and resumes stop before any compute, in one line, writing nothing


TRAIN_BAD = {
    "output_dir is a file": (lambda m, t: ["--output_dir", _file(t)], "--output_dir", "is a file, not a folder"),
    "output_dir under a file": (lambda m, t: ["--output_dir", _file(t) / "sub"], "--output_dir", "nothing can be written"),
    "negative seed": (lambda m, t: ["--seed", -1], "--seed=-1"),
    "truncated teacher": (lambda m, t: ["--pretrained_teacher_model", damaged_teacher(m, t, "truncate")],
                          "--pretrained_teacher_model", "corrupt safetensors file unet/diffusion_pytorch_model"),
    "random teacher": (lambda m, t: ["--pretrained_teacher_model", damaged_teacher(m, t, "random")],
                       "--pretrained_teacher_model", "corrupt safetensors file vae/diffusion_pytorch_model"),
    "teacher config": (lambda m, t: ["--pretrained_teacher_model", damaged_teacher(m, t, "config")],
                       "--pretrained_teacher_model", "cannot load it"),
}


def _file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file"


@pytest.mark.parametrize("case", TRAIN_BAD)
def test_train_bad_path_or_teacher_is_one_line_and_writes_nothing(model, tmp_path, capsys, case):
    make, *expect = TRAIN_BAD[case]
    extra = make(model, tmp_path)
    out = tmp_path / "out"
    assert run_main(argv(model, out, *extra)) == 2
    one_error_line(capsys, *expect)
    assert not out.exists()


def test_train_unwritable_output_dir(model, tmp_path, monkeypatch, capsys):
    """A folder the user may not write to (os.access; root may write anywhere, so it is simulated)."""
    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and access(p, mode, **kw))
    assert run_main(argv(model, locked / "out")) == 2
    one_error_line(capsys, "--output_dir", "is not writable")
    assert not (locked / "out").exists()


def test_default_prompts_file_is_found_from_any_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.parse_args([str(a) for a in argv(model, tmp_path / "out")[:4] + argv(model, tmp_path / "out")[6:]])
    assert cfg.prompts_file == config.DEFAULT_PROMPTS and not Path(cfg.prompts_file).exists()  # relative to the cwd
    inputs = train.preflight(cfg)
    assert inputs.prompts == data.read_prompts(str(config.PACKAGE_PROMPTS)) and len(inputs.prompts) == 50


def test_resume_with_other_flags_names_each_and_writes_nothing(model, run, capsys):
    before = snapshot(run)
    assert run_main(argv(model, run, "--method", "dmd2", "--resolution", 32, "--resume_from_checkpoint", "latest")) == 2
    line = one_error_line(capsys, "--method dmd2 (checkpoint: lcm)", "--resolution 32 (checkpoint: 16)")
    assert "--max_train_steps" in line and "--seed" not in line  # what may change; only differing flags are named
    assert snapshot(run) == before


def test_resume_allows_only_safe_changes(tmp_path):
    """--max_train_steps may change unless it sets a schedule (PD's rounds, a decaying lr)."""
    def saved(**kw):
        cfg = config.resolve(config.SDConfig(device="cpu", reflect_range=2.5, **kw))
        (tmp_path / checkpoint.CONFIG).write_text(json.dumps(config.to_json(cfg)))
        return cfg
    base = saved()
    checkpoint.check_resume_config(tmp_path, config.resolve(config.SDConfig(
        device="cpu", max_train_steps=5000, checkpointing_steps=7, output_dir="elsewhere")))  # reflect_range 0 = auto
    with pytest.raises(config.InputError, match=r"--reflect_range 3.0 \(checkpoint: 2.5\)"):
        checkpoint.check_resume_config(tmp_path, config.dataclasses.replace(base, reflect_range=3.0))
    for kw in (dict(method="pd"), dict(lr_scheduler="cosine")):
        base = saved(**kw)
        with pytest.raises(config.InputError, match="--max_train_steps 5000 "):
            checkpoint.check_resume_config(tmp_path, config.dataclasses.replace(base, max_train_steps=5000))


def test_fresh_run_into_old_checkpoints_stops_unless_told(model, run, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(run, out)
    before = snapshot(out)
    assert run_main(argv(model, out)) == 2
    one_error_line(capsys, "--output_dir", "checkpoint-2", "--resume_from_checkpoint latest", "--overwrite_output_dir")
    assert snapshot(out) == before
    (out / train.LOG).write_text('{"step": 1, "loss": 9}\n{"step": 2, "loss": 9}\n{"step": 3, "loss": 9}\n')
    assert run_main(argv(model, out, "--overwrite_output_dir", "--max_train_steps", 1)) == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    assert [json.loads(r)["step"] for r in (out / train.LOG).read_text().splitlines()] == [1]


def test_resume_latest_without_checkpoint_says_so(model, tmp_path, capsys):
    cfg = config.parse_args([str(a) for a in argv(model, tmp_path / "new", "--resume_from_checkpoint", "latest")])
    assert train.preflight(cfg).resume is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0] and "step 0" in err[0], err


def test_resume_truncates_the_log_to_the_checkpoint(model, run, tmp_path):
    """Killed after step 2 with checkpoint-1 kept: resuming re-logs step 2 once, with the same loss."""
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoint-2")
    rows = (out / train.LOG).read_text().splitlines()
    (out / train.LOG).write_text("\n".join(rows) + '\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # a torn last line
    assert run_main(argv(model, out, "--resume_from_checkpoint", "latest")) == 0
    got = [json.loads(r) for r in (out / train.LOG).read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2] and got[1]["loss"] == json.loads(rows[1])["loss"]


def test_truncate_log_keeps_rows_up_to_the_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 2, 4)) + '{"st')
    checkpoint.truncate_log(log, 2)
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2, 2]
    checkpoint.truncate_log(log, 0)
    assert log.read_text() == ""


# ----------------------------------------------------------------------------------------------------
# Checkpoint rotation, killed at every file-system operation


class _OneProcess:
    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass


class Killed(BaseException):
    pass


def _write(folder: Path) -> None:
    (folder / "unet").mkdir()
    (folder / "unet" / "weights").write_bytes(b"w" * 100)
    (folder / "training_state.pt").write_bytes(b"x")


def _whole(p: Path) -> bool:
    return (p / "training_state.pt").is_file() and (p / "unet" / "weights").is_file()


@pytest.mark.parametrize("after", [False, True], ids=["before-op", "after-op"])
def test_rotation_killed_anywhere_leaves_whole_checkpoints_within_the_limit(tmp_path, monkeypatch, after):
    """A kill before or just after any rename or delete of save(): the visible checkpoints are whole and at most
    `limit`; the next save sweeps what was left hidden and succeeds."""
    replace, rmtree, limit = os.replace, shutil.rmtree, 3
    for kill_at in range(1, 30):
        out = tmp_path / f"k{kill_at}"
        out.mkdir()
        for step in range(1, limit + 1):
            checkpoint.save(_OneProcess(), out, step, _write, {}, limit)
        calls = [0]

        def op(fn):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == kill_at and not after:
                    raise Killed
                res = fn(*a, **kw)
                if calls[0] == kill_at:
                    raise Killed
                return res
            return wrapped
        monkeypatch.setattr(os, "replace", op(replace))
        monkeypatch.setattr(shutil, "rmtree", op(rmtree))
        try:
            checkpoint.save(_OneProcess(), out, limit + 1, _write, {}, limit)
            killed = False
        except Killed:
            killed = True
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        visible = checkpoint.list_checkpoints(out)
        assert len(visible) <= limit and all(_whole(p) for p in visible), (kill_at, [p.name for p in visible])
        checkpoint.save(_OneProcess(), out, limit + 2, _write, {}, limit)
        assert [p.name for p in out.iterdir()] and all(not checkpoint.HIDDEN.match(p.name) for p in out.iterdir())
        assert len(checkpoint.list_checkpoints(out)) <= limit
        if not killed:
            assert kill_at > 3  # every operation of a save was tried
            return
    pytest.fail("save never finished")


# ----------------------------------------------------------------------------------------------------
# Messages a user reads: the NaN stop, the teacher samples' progress, the teacher-data warning


def test_nan_stop_names_phase_and_the_logs_step(model, tmp_path, monkeypatch, capsys):
    build = train.BUILD["lcm"]

    def nan_at_step_2(ctx, nets):
        run = build(ctx, nets)
        step = run.step
        run.step = lambda i: {**step(i), "loss": float("nan")} if i == 1 else step(i)
        return run
    monkeypatch.setitem(train.BUILD, "lcm", nan_at_step_2)
    assert run_main(argv(model, tmp_path, "--max_train_steps", 3)) == 1
    err = [s for s in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in s]
    assert len(err) == 1 and err[0].startswith("error: sd.train lcm, training: non-finite loss=nan at step 2"), err
    assert "checkpoint-1" in err[0]
    assert [json.loads(r)["step"] for r in (tmp_path / train.LOG).read_text().splitlines()] == [1]


def test_teacher_samples_show_progress_and_stop_on_nan(capsys):
    alpha_bar = ddil.make_alpha_bar()
    kw = dict(alpha_bar=alpha_bar, n_prompts=3, per_prompt=2, shape=(4, 2, 2), steps=2, w=0.0, seed=0, batch=4,
              device="cpu")
    x0, ids = data.teacher_samples(lambda x, t, c, w: torch.zeros_like(x), progress=True, **kw)
    assert x0.shape == (6, 4, 2, 2) and ids.tolist() == [0, 0, 1, 1, 2, 2]
    err = capsys.readouterr().err
    assert "teacher samples" in err and "6/6" in err
    with pytest.raises(FloatingPointError, match="teacher samples .* prompts 0-1"):
        data.teacher_samples(lambda x, t, c, w: torch.full_like(x, float("nan")), **kw)


@pytest.mark.parametrize("flags, names", [
    (("--betas", 0.5, 0.25, 0.25), ["--betas 0.5 0.25 0.25"]),
    (("--betas", 1, 0, 0), []),
    (("--method", "dmd2", "--betas", 1, 0, 0, "--gan_weight", 0.1), ["--gan_weight 0.1"]),
    (("--method", "dmd2", "--betas", 0.5, 0, 0.5, "--gan_weight", 0.1), ["--betas", "--gan_weight"]),
    (("--method", "dmd2", "--betas", 0, 0, 1, "--gan_weight", 0), []),
])
def test_warning_when_ddil_or_the_gan_run_on_teacher_samples(model, tmp_path, flags, names):
    inputs = train.preflight(config.parse_args([str(a) for a in argv(model, tmp_path / "o", *flags)]))
    assert len(inputs.warnings) == (1 if names else 0)
    assert all(n in inputs.warnings[0] and "teacher samples" in inputs.warnings[0] for n in names)


def test_no_teacher_data_warning_with_real_images(model, tmp_path):
    from PIL import Image
    (tmp_path / "d").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    cfg = config.parse_args([str(a) for a in argv(model, tmp_path / "o", "--betas", 0.5, 0.25, 0.25,
                                                  "--train_data_dir", tmp_path / "d")])
    assert train.preflight(cfg).warnings == []


def test_unreadable_training_image_is_one_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="bad.png cannot be read"):
        data.read_pixels([bad], 0, 16)


# ----------------------------------------------------------------------------------------------------
# sd.sample: inputs checked first, a labelled grid, the trained reflection


def make_student(model: Path, folder: Path, method: str, **kw) -> Path:
    """A student folder as sd.train saves it, without training: the tiny teacher's UNet (+ LCM's w-embedding)."""
    from diffusers import UNet2DConditionModel
    cfg = config.resolve(config.SDConfig(method=method, pretrained_teacher_model=str(model / "tiny"), device="cpu",
                                         resolution=16, num_inference_steps=2, pd_start_steps=4, **kw))
    unet = UNet2DConditionModel.from_pretrained(model / "tiny", subfolder="unet")
    student = adapters.student_unet(unet, w_embed=method == "lcm", w_dim=cfg.unet_time_cond_proj_dim)
    sched = json.loads((model / "tiny" / "scheduler" / "scheduler_config.json").read_text())
    train.save_student(student, folder, cfg, sched)
    return folder


@pytest.fixture(scope="module")
def lcm_student(model, tmp_path_factory) -> Path:
    return make_student(model, tmp_path_factory.mktemp("student") / "lcm", "lcm")


SAMPLE_BAD = {
    "no image extension": (["--out", "{t}/grid"], "--out", "not an image file name"),
    "out under a file": (["--out", "{t}/a-file/grid.png"], "--out", "nothing can be written"),
    "out is a folder": (["--out", "{t}"], "--out"),
    "steps beyond the schedule": (["--steps", "1000"], "--steps 1000", "1 to 50 steps"),
    "device": (["--device", "tpu"], "--device tpu"),
    "negative guidance": (["--guidance_scale", "-3"], "--guidance_scale -3"),
    "negative seed": (["--seed", "-1"], "--seed -1"),
    "not a student": (["--student", "{t}"], "--student", "no ddil_config.json"),
    "truncated student": (["--student", "{t}/damaged"], "--student", "corrupt safetensors file"),
    "unknown flag": (["--stpes", "2"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", SAMPLE_BAD)
def test_sample_bad_input_is_one_line_and_writes_nothing(lcm_student, tmp_path, capsys, case):
    (tmp_path / "a-file").write_text("x")
    damaged = tmp_path / "damaged"
    shutil.copytree(lcm_student, damaged)
    f = damaged / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    flags, *expect = SAMPLE_BAD[case]
    before = snapshot(tmp_path)
    args = {"--student": str(lcm_student), "--steps": "2", "--device": "cpu", "--out": f"{tmp_path}/grid.png"}
    args.update(dict(zip(flags[::2], flags[1::2])))
    assert exit_code(sample.main, [s.format(t=tmp_path) for kv in args.items() for s in kv]) == 2
    one_error_line(capsys, *expect)
    assert snapshot(tmp_path) == before


def test_sample_with_a_damaged_teacher_is_one_line(model, lcm_student, tmp_path, capsys):
    teacher = damaged_teacher(model, tmp_path, "truncate")
    assert sample.main(["--student", str(lcm_student), "--steps", "2", "--device", "cpu", "--pretrained_teacher_model",
                        str(teacher), "--out", str(tmp_path / "g.png")]) == 2
    one_error_line(capsys, "--pretrained_teacher_model", "corrupt safetensors file unet/")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("prog", ["sd.train", "sd.sample", "sd.tiny"])
def test_bad_output_path_in_a_real_process(tmp_path, prog):
    """The exit code and stderr of the real command line (python -m ...), not just main()'s return value."""
    (tmp_path / "a-file").write_text("x")
    args = {"sd.train": ["--device", "cpu", "--output_dir", tmp_path / "a-file"],
            "sd.sample": ["--student", tmp_path, "--out", tmp_path / "grid.txt"],
            "sd.tiny": [tmp_path / "a-file" / "tiny"]}[prog]
    res = subprocess.run([sys.executable, "-m", prog, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_grid_is_legible(tmp_path):
    """Tiny images are enlarged (nearest-neighbour: each pixel a block) and each column has its prompt under it."""
    from PIL import Image
    im = [Image.new("RGB", (16, 16), c) for c in ((200, 30, 30), (30, 30, 200))]
    im[0].putpixel((0, 0), (0, 255, 0))
    grid, pitch = sample.labelled_grid([im, im], ["a red fox in snow", "a bowl of ramen " * 6], 128), 128 + sample.GAP
    assert grid.width == 128 + pitch and grid.height > 2 * pitch
    assert grid.getpixel((3, 3)) == (0, 255, 0) and grid.getpixel((9, 9)) == (200, 30, 30)  # an 8x8 block per pixel
    assert grid.getpixel((pitch + 2, pitch + 2)) == (30, 30, 200) and grid.getpixel((129, 5)) == (255, 255, 255)
    for col in range(2):
        strip = grid.crop((col * pitch, 2 * pitch, col * pitch + 128, grid.height)).convert("L")
        assert strip.getextrema()[0] < 128  # dark text on white


def test_saved_sample_grid_has_captions(model, lcm_student, tmp_path):
    from PIL import Image
    assert sample.main(["--student", str(lcm_student), "--steps", "2", "--device", "cpu", "--prompt", PROMPTS[0],
                        "--num_images_per_prompt", "2", "--out", str(tmp_path / "g" / "grid.png")]) == 0
    grid = Image.open(tmp_path / "g" / "grid.png")
    assert grid.width == sample.MIN_TILE and grid.height > 2 * sample.MIN_TILE + sample.GAP


# ----------------------------------------------------------------------------------------------------
# Sampling uses the reflection the student was trained with


def stock_latents(pipe, x_T, gen, scale):
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=scale, latents=x_T.clone(), output_type="latent",
                generator=gen).images


@pytest.mark.parametrize("method, reflect, expect", [
    ("lcm", dict(reflect="clip", reflect_range=0.05), dict(clip_sample=True, clip_sample_range=0.05, thresholding=False)),
    ("pd", dict(reflect="dynamic", reflect_range=1.0, reflect_ratio=0.9, reflect_max=1.5),
     dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, clip_sample=False)),
])
def test_saved_scheduler_carries_the_trained_reflection(model, tmp_path, method, reflect, expect):
    """Where diffusers can express the reflection, the saved scheduler does: a stock pipeline then gives sd.sample's
    latents (ddil's policy with ddil.reflect_x0), which differ from the unreflected ones."""
    folder = make_student(model, tmp_path / method, method, **reflect)
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {k: saved[k] for k in expect} == expect
    pipe, cfg = sample.load_pipeline(str(folder), "cpu")
    scale = 7.5 if method == "lcm" else 1.0
    gen = torch.Generator().manual_seed(3)
    x_T = ddil.randn((2, 4, 8, 8), gen, torch.empty(0))
    got = sample.sample_latents(pipe, cfg, PROMPTS, 2, scale, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, stock_latents(pipe, x_T, gen, scale), rtol=1e-4, atol=1e-5)
    plain = sample.sample_latents(pipe, config.dataclasses.replace(cfg, reflect="none"), PROMPTS, 2, scale,
                                  torch.Generator().manual_seed(3))
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method, reflect", [("lcm", "reflect"), ("pd", "reflect"), ("dmd2", "reflect"),
                                             ("lcm", "dynamic")])
def test_sample_applies_a_reflection_diffusers_cannot_express(model, tmp_path, method, reflect):
    """The mirror fold (and dynamic thresholding with r != 1) has no diffusers option: the saved scheduler says
    none, and sd.sample applies it, so every x0_hat, the last one included, lies in [-r, r]."""
    r = 0.05
    folder = make_student(model, tmp_path / method, method, reflect=reflect, reflect_range=r)
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["clip_sample"] is False and saved["thresholding"] is False
    pipe, cfg = sample.load_pipeline(str(folder), "cpu")
    assert sample.trained_reflection(cfg) == ddil.ReflectConfig(reflect, r, cfg.reflect_ratio, cfg.reflect_max)
    x0 = sample.sample_latents(pipe, cfg, PROMPTS, 2, None, torch.Generator().manual_seed(0))
    plain = sample.sample_latents(pipe, config.dataclasses.replace(cfg, reflect="none"), PROMPTS, 2, None,
                                  torch.Generator().manual_seed(0))
    assert x0.abs().max() <= r * (1 + 1e-4) < plain.abs().max()


# ----------------------------------------------------------------------------------------------------
# sd.eval: the user's inputs before its packages; density and coverage from the authors' prdc


def test_eval_checks_inputs_before_packages(lcm_student, tmp_path, monkeypatch, capsys):
    from sd import eval as sd_eval
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    base = ["--student", str(lcm_student), "--steps", "2", "--device", "cpu"]
    assert sd_eval.main(base + ["--ref_dir", str(tmp_path / "missing")]) == 2
    one_error_line(capsys, "--ref_dir", "no such folder")
    assert sd_eval.main(base + ["--ref_dir", str(tmp_path), "--num_images", "3"]) == 2
    one_error_line(capsys, "--num_images 3")
    from PIL import Image
    for i in range(6):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(tmp_path / f"{i}.png")
    assert sd_eval.main(base + ["--ref_dir", str(tmp_path), "--prompts_file", str(tmp_path / "none.txt")]) == 2
    one_error_line(capsys, "--prompts_file")
    assert sd_eval.main(base + ["--ref_dir", str(tmp_path)]) == 2  # inputs fine: now the missing package
    one_error_line(capsys, "pip install -r requirements-sd.txt")


def test_toy_density_coverage_matches_the_authors_prdc():
    """toy/metrics.py's density and coverage equal prdc's (Naeem et al.'s own code) on continuous data, where
    their < and <= cannot differ; a shifted fake set lowers both, so the check is not of a constant."""
    from sd.eval import density_coverage as prdc_dc
    from toy.metrics import density_coverage as toy_dc
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g, dtype=torch.float64)
    for shift in (0.0, 1.0):
        fake = torch.randn(200, 8, generator=g, dtype=torch.float64) + shift
        got, want = toy_dc(real, fake, k=5), prdc_dc(real, fake, k=5)
        assert got["density"] == pytest.approx(want["density"], abs=1e-12)
        assert got["coverage"] == pytest.approx(want["coverage"], abs=1e-12)
        if shift:
            assert want["density"] < 0.5 and want["coverage"] < 0.5


def test_sd_never_imports_toy():
    for f in sorted((ROOT / "sd").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "toy" or n.startswith("toy.") for n in names), f.name


def test_resume_keeps_the_saved_dagger_anneal(tmp_path):
    """--max_train_steps may change on a resume; beta_mix_steps left at its default keeps the checkpoint's anneal."""
    from sd import checkpoint
    from sd.config import SDConfig, resolve
    (tmp_path / checkpoint.CONFIG).write_text(json.dumps({"beta_mix_steps": 500}))
    longer = resolve(SDConfig(max_train_steps=5000))
    assert longer.beta_mix_steps == 2500
    assert checkpoint.keep_saved_anneal(tmp_path, longer).beta_mix_steps == 500
    explicit = resolve(SDConfig(max_train_steps=5000, beta_mix_steps=300))
    assert checkpoint.keep_saved_anneal(tmp_path, explicit).beta_mix_steps == 300
    assert checkpoint.keep_saved_anneal(None, longer).beta_mix_steps == 2500
