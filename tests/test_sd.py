"""sd/: ddil.py's algorithms on Stable Diffusion through diffusers, end to end on a TINY pipeline (CPU).

The tiny pipeline is saved with save_pretrained once per session, so every run goes through the real
from_pretrained loading path; students are loaded back into stock diffusers pipelines.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import ddil  # noqa: E402
from sd import adapters, checkpoint, config, sample, tiny, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in snow", "a bowl of ramen", "a lighthouse in a storm", "a cat asleep on books"]
METHODS = ("lcm", "pd", "dmd2")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny UNets gain nothing from threads, and a second thread spin-waits when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(argv: list) -> int:
    """sd.train's main in this process on one thread (see one_thread; session fixtures run before it), with
    accelerate's process-wide state reset afterwards."""
    from accelerate.state import AcceleratorState
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The tiny pipeline folder (16 px images, 8x8 latents) and a 4-prompt file beside it."""
    d = tmp_path_factory.mktemp("sd")
    tiny.save_tiny(d / "tiny")
    (d / "prompts.txt").write_text("# test prompts\n" + "\n".join(PROMPTS) + "\n")
    return d


def argv(model: Path, out: Path, method: str, *extra) -> list:
    """3 steps of DDIL (priors 0.5 0.25 0.25, an 8-state buffer) with clipping reflection, a checkpoint every step."""
    return ["--method", method, "--pretrained_teacher_model", model / "tiny", "--prompts_file", model / "prompts.txt",
            "--output_dir", out, "--device", "cpu", "--resolution", 16, "--train_batch_size", 4, "--max_train_steps", 3,
            "--num_inference_steps", 2, "--pd_start_steps", 4, "--teacher_substeps", 2, "--betas", 0.5, 0.25, 0.25,
            "--buffer_capacity", 8, "--reflect", "clip", "--latents_per_prompt", 2, "--data_num_inference_steps", 4,
            "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--fake_updates", 2, "--gan_weight", 0.1, *extra]


@pytest.fixture(scope="session")
def runs(model, tmp_path_factory) -> dict:
    """One 3-step run per method: {method: output_dir}."""
    out = {}
    for m in METHODS:
        out[m] = tmp_path_factory.mktemp(f"run-{m}")
        assert run_main(argv(model, out[m], m)) == 0
    return out


def losses(out: Path) -> dict:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / train.LOG).read_text().splitlines())}


# ----------------------------------------------------------------------------------------------------
# Training end to end


@pytest.mark.parametrize("method", METHODS)
def test_three_steps_with_ddil_and_reflection(runs, method):
    out = runs[method]
    logged = losses(out)
    assert sorted(logged) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # limit 2
    cfg = json.loads((out / "checkpoint-3" / "ddil_config.json").read_text())
    assert cfg == json.loads((out / "config.json").read_text())
    assert cfg["method"] == method and cfg["betas"] == [0.5, 0.25, 0.25] and cfg["reflect_range"] > 0
    rank = torch.load(out / "checkpoint-3" / "rank_state_0.pt", weights_only=False)
    assert rank["buffer"]["size"] > 0  # rollout states were aggregated
    assert (out / "teacher_latents.safetensors").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_student_loads_in_stock_pipeline(model, runs, method):
    student = runs[method] / "student"
    unet = UNet2DConditionModel.from_pretrained(student)
    sched = {"lcm": LCMScheduler, "pd": DDIMScheduler, "dmd2": DDIMScheduler}[method].from_pretrained(
        student, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(model / "tiny", unet=unet, scheduler=sched, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=8.5 if method == "lcm" else 1.0, height=16,
                  width=16, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    if method == "lcm":  # the w-embedding is in the UNet and the pipeline walks ddil's LCM grid
        assert unet.config.time_cond_proj_dim == 256
        assert pipe.scheduler.timesteps.tolist() == ddil.lcm_grid(2)
    if method == "pd":
        assert pipe.scheduler.timesteps.tolist() == ddil.uniform_grid(2)


@pytest.mark.parametrize("method", ["lcm", "pd"])
def test_ddil_policy_on_the_adapter_is_the_stock_pipeline(runs, method):
    """ddil.sample with the student's policy on the Student adapter gives the stock pipeline's latents, from the same
    noise: the adapter feeds the UNet as diffusers does (text states, LCM's w-embedding of guidance_scale - 1)."""
    pipe, cfg = sample.load_pipeline(str(runs[method] / "student"), "cpu")
    cache = adapters.EmbeddingCache.from_prompts(PROMPTS[:2], pipe.tokenizer, pipe.text_encoder)
    student, alpha_bar = adapters.Student(pipe.unet, cache), adapters.alpha_bar_of(dict(pipe.scheduler.config))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    if method == "lcm":
        policy, grid, w, scale = ddil.consistency_policy(student, alpha_bar, None, ddil.LCMConfig()), ddil.lcm_grid(2), 6.5, 7.5
    else:
        policy, grid, w, scale = ddil.ddim_policy(student, alpha_bar, None), ddil.uniform_grid(2), 0.0, 1.0
    got, _ = ddil.sample(policy, x_T, grid, torch.arange(2), torch.full((2,), w), torch.Generator().manual_seed(2))
    want = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=scale, latents=x_T.clone(), output_type="latent",
                generator=torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_sample_writes_a_grid(runs, tmp_path, method):
    png = tmp_path / "grid.png"
    assert sample.main([str(a) for a in ["--student", runs[method] / "student", "--steps", 2, "--device", "cpu",
                                         "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", png]]) == 0
    from PIL import Image
    width, height = Image.open(png).size  # 2 prompts side by side, 16 px images enlarged, captions under them
    assert width == 2 * sample.MIN_TILE + sample.GAP and height > sample.MIN_TILE


@pytest.mark.parametrize("method", METHODS)
def test_resume_matches_an_uninterrupted_run(model, runs, tmp_path, method):
    """Resuming after step 2 gives step 3's loss and the final student bit for bit (PD: inside round 2)."""
    out = runs[method]
    assert run_main(argv(model, tmp_path, method, "--resume_from_checkpoint", out / "checkpoint-2")) == 0
    assert losses(tmp_path) == {3: losses(out)[3]}
    a, b = (load_file(str(d / "student" / "diffusion_pytorch_model.safetensors")) for d in (out, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_student(model, tmp_path):
    """LCM-LoRA: no target network; the saved student has the LoRA merged and loads as a stock UNet."""
    assert run_main(argv(model, tmp_path, "lcm", "--use_lora", "--lora_rank", 4, "--max_train_steps", 2)) == 0
    assert not (tmp_path / "checkpoint-2" / "unet_target").exists()
    assert (tmp_path / "checkpoint-2" / "student_lora.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "student")
    base = UNet2DConditionModel.from_pretrained(model / "tiny", subfolder="unet")
    assert unet.config.time_cond_proj_dim is None and not any("lora" in k for k in unet.state_dict())
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), base.parameters()))  # LoRA merged in


def test_imagefolder_data(model, tmp_path):
    """diffusers' imagefolder layout: images and metadata.jsonl, VAE-encoded on the fly (here with DMD2's GAN head,
    gradient checkpointing and bf16 autocast)."""
    from PIL import Image
    data_dir = tmp_path / "images"
    data_dir.mkdir()
    for i, prompt in enumerate(PROMPTS):
        Image.new("RGB", (24, 20), (60 * i, 100, 200 - 40 * i)).save(data_dir / f"{i}.png")
    (data_dir / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": p}) + "\n"
                                                     for i, p in enumerate(PROMPTS)))
    assert run_main(argv(model, tmp_path / "out", "dmd2", "--train_data_dir", data_dir, "--max_train_steps", 2,
                         "--gradient_checkpointing", "--mixed_precision", "bf16")) == 0
    assert (tmp_path / "out" / "student" / "config.json").is_file()


def test_hf_dataset_source(model, tmp_path, monkeypatch):
    """--dataset_name goes through 🤗 datasets' load_dataset (a stand-in module here: no download, maybe no package)."""
    import types
    from PIL import Image

    class Split(list):
        column_names = ["image", "caption"]

        def __getitem__(self, key):
            return [row[key] for row in self] if isinstance(key, str) else list.__getitem__(self, key)
    rows = Split({"image": Image.new("RGB", (20, 16), (40 * i, 90, 160)), "caption": [p, "alt"]} for i, p in enumerate(PROMPTS))
    fake = types.SimpleNamespace(load_dataset=lambda name, split: rows if (name, split) == ("toy/fox", "train") else None)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert run_main(argv(model, tmp_path, "lcm", "--dataset_name", "toy/fox", "--caption_column", "caption",
                         "--max_train_steps", 1)) == 0


def test_init_random_trains_and_samples(model, tmp_path, monkeypatch):
    """--init random: the pipeline is built from embedded configs with seeded random weights (no download), and
    sd.sample rebuilds the same one. Full SD1.5 is too big for this test, so the tiny configs stand in."""
    for name in ("UNET", "VAE", "TEXT"):
        monkeypatch.setattr(tiny, f"SD15_{name}", getattr(tiny, f"TINY_{name}"))
    extra = ("--init", "random", "--pretrained_teacher_model", "ignored/with-random-init", "--max_train_steps", 1)
    assert run_main(argv(model, tmp_path, "lcm", *extra)) == 0
    assert sample.main([str(a) for a in ["--student", tmp_path / "student", "--steps", 2, "--device", "cpu",
                                         "--prompt", PROMPTS[0], "--out", tmp_path / "grid.png"]]) == 0


def test_sd15_configs_are_the_real_architecture():
    """The embedded SD1.5 configs give SD1.5's parameter counts (built on the meta device: no memory)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        nets = (UNet2DConditionModel(**tiny.SD15_UNET), AutoencoderKL(**tiny.SD15_VAE),
                CLIPTextModel(CLIPTextConfig(**tiny.SD15_TEXT)))
    assert [sum(p.numel() for p in n.parameters()) for n in nets] == [859_520_964, 83_653_863, 123_060_480]


def test_ddp_two_processes(model, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): the global batch is split, every process saves its rank state."""
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sd.train", *map(str, argv(model, tmp_path, "lcm", "--max_train_steps", 2))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "rank_state_0.pt").is_file() and (ckpt / "rank_state_1.pt").is_file()
    assert sorted(losses(tmp_path)) == [1, 2] and (tmp_path / "student" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr and exit code 2, before any model loads


def _imagefolder(tmp_path, with_images: bool, with_captions: bool) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    if with_images:
        from PIL import Image
        Image.new("RGB", (16, 16)).save(d / "a.png")
    if with_captions:
        (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    return d


BAD = {
    "missing model": (lambda m, t: ["--pretrained_teacher_model", t / "nope"], "--pretrained_teacher_model"),
    "uncached hub id offline": (lambda m, t: ["--pretrained_teacher_model", "no-such-org/no-such-model"], "HF_HUB_OFFLINE"),
    "no cuda": (lambda m, t: ["--device", "cuda"], "--device cpu"),
    "empty dataset folder": (lambda m, t: ["--train_data_dir", _imagefolder(t, False, False)], "no images"),
    "images without captions": (lambda m, t: ["--train_data_dir", _imagefolder(t, True, False)], "without captions"),
    "resolution": (lambda m, t: ["--resolution", 20], "resolution=20"),
    "priors": (lambda m, t: ["--betas", 0.5, 0.5, 0.5], "beta_frwd + beta_teacher + beta_student"),
    "unknown method": (lambda m, t: ["--method", "gan"], "invalid choice"),
    "missing checkpoint": (lambda m, t: ["--resume_from_checkpoint", t / "checkpoint-9"], "no such checkpoint"),
    "datasets not installed": (lambda m, t: ["--dataset_name", "some/dataset"], "pip install datasets"),
    "tensorboard not installed": (lambda m, t: ["--report_to", "tensorboard"], "pip install tensorboard"),
}
OPTIONAL = {"datasets not installed": "datasets", "tensorboard not installed": "tensorboard"}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_with_one_line(model, tmp_path, monkeypatch, capsys, case):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    if case in OPTIONAL:
        monkeypatch.setitem(sys.modules, OPTIONAL[case], None)  # as if not installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, expect = BAD[case]
    monkeypatch.setattr(adapters, "student_unet", lambda *a, **k: pytest.fail("a model was built"))
    assert run_main(argv(model, tmp_path / "out", "lcm", *make(model, tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err


def test_batch_smaller_than_processes(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert run_main(argv(model, tmp_path, "lcm")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train_batch_size 4" in err[0] and "(8)" in err[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_one_line(model, runs, tmp_path, capsys, damage):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(runs["lcm"] / "checkpoint-2", ckpt)
    f = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00not a safetensors file" * 8)
    assert run_main(argv(model, tmp_path, "lcm", "--resume_from_checkpoint", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt safetensors file unet/diffusion_pytorch_model.safetensors" in err[0], err


def test_eval_without_its_packages_is_one_line(runs, monkeypatch, capsys):
    from sd import eval as sd_eval
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    assert sd_eval.main(["--student", str(runs["lcm"] / "student"), "--ref_dir", "."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -r requirements-sd.txt" in err[0], err


def test_help_documents_every_flag():
    res = subprocess.run([sys.executable, "-m", "sd.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for f in config.fields(config.SDConfig):
        assert f"--{f.name}" in text and f.metadata["help"].split()[0] in text, f.name


# ----------------------------------------------------------------------------------------------------
# Pieces: atomic checkpoints, the adapters against diffusers


class _OneProcess:
    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass


def test_checkpoint_write_is_atomic(tmp_path):
    """A write that dies half-way leaves the earlier checkpoints whole and no checkpoint-STEP folder."""
    ok = lambda folder: (folder / "training_state.pt").write_bytes(b"x")  # noqa: E731
    checkpoint.save(_OneProcess(), tmp_path, 1, ok, {}, limit=None)

    def dies(folder):
        (folder / "unet").mkdir()
        raise KeyboardInterrupt  # killed while writing
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(_OneProcess(), tmp_path, 2, dies, {}, limit=None)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    for step in (2, 3, 4):
        checkpoint.save(_OneProcess(), tmp_path, step, ok, {}, limit=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_teacher_is_one_batched_cfg_call(model):
    """Teacher: cond and uncond in one UNet call, eps = eps_c + w (eps_c - eps_u); the cache equals the pipeline's
    own prompt encoding."""
    pipe = StableDiffusionPipeline.from_pretrained(model / "tiny", safety_checker=None)
    cache = adapters.EmbeddingCache.from_prompts(PROMPTS, pipe.tokenizer, pipe.text_encoder)
    want, _ = pipe.encode_prompt(PROMPTS[1], "cpu", 1, False)
    torch.testing.assert_close(cache(torch.tensor([1])), want)
    teacher, calls = adapters.Teacher(pipe.unet, cache), []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 20])
    ids, w = torch.tensor([0, 2, 3]), torch.tensor([0.0, 1.5, 6.5])
    eps = teacher(x, t, ids, w)
    assert calls == [6]
    with torch.no_grad():
        eps_c = pipe.unet(x, t, encoder_hidden_states=cache(ids)).sample
        eps_u = pipe.unet(x, t, encoder_hidden_states=cache.uncond(3)).sample
    torch.testing.assert_close(eps, eps_c + w[:, None, None, None] * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(teacher(x, t, ids, None), eps_c, rtol=1e-4, atol=1e-5)
