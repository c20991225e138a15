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

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import conftest  # noqa: E402
import ddil  # noqa: E402
from sd import adapters, checkpoint, config, sample, tiny, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in snow", "a bowl of ramen", "a lighthouse in a storm", "a cat asleep on books"]
METHODS = ("lcm", "pd", "dmd2")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


run_main = conftest.run_sd_train  # sd.train's main in this process


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The tiny pipeline folder (16 px images, 8x8 latents) and a 4-prompt file beside it."""
    return conftest.tiny_sd_folder(tmp_path_factory, "sd", PROMPTS, header="# test prompts\n")


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


@pytest.mark.parametrize("method", ["lcm", "pd"])
def test_student_loads_in_stock_pipeline(model, runs, method):
    """LCM and PD students load into a stock pipeline with their saved scheduler, which walks ddil's grid (the
    latents themselves are compared in test_ddil_policy_on_the_adapter_is_the_stock_pipeline)."""
    student = runs[method] / "student"
    unet = UNet2DConditionModel.from_pretrained(student)
    sched = {"lcm": LCMScheduler, "pd": DDIMScheduler}[method].from_pretrained(student, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(model / "tiny", unet=unet, scheduler=sched, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=8.5 if method == "lcm" else 1.0, height=16,
                  width=16, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 0
    if method == "lcm":  # the w-embedding is in the UNet and the pipeline walks ddil's LCM grid
        assert unet.config.time_cond_proj_dim == 256
        assert pipe.scheduler.timesteps.tolist() == ddil.lcm_grid(2)
    if method == "pd":
        assert pipe.scheduler.timesteps.tolist() == ddil.uniform_grid(2)


def test_dmd2_student_samples_by_backward_simulation(runs):
    """A multi-step DMD2 generator samples with its own sampler (sd.sample: ddil.generator_policy), not DDIM: each
    next state is the generator's x0_hat at the current one, re-noised with fresh noise to the next grid time, and the
    output is its x0_hat at the last state."""
    pipe, cfg = sample.load_pipeline(str(runs["dmd2"] / "student"), "cpu")
    cfg = config.dataclasses.replace(cfg, reflect="none")
    cache = adapters.EmbeddingCache.from_prompts(PROMPTS[:2], pipe.tokenizer, pipe.text_encoder)
    student, alpha_bar = adapters.Student(pipe.unet, cache), adapters.alpha_bar_of(dict(pipe.scheduler.config))
    policy, grid = sample.student_sampler(cfg, student, alpha_bar, 2)
    assert grid == ddil.uniform_grid(2)
    ids, gen = torch.arange(2), torch.Generator().manual_seed(0)
    x_T = ddil.randn((2, 4, 8, 8), gen, torch.empty(0))
    with torch.no_grad():
        x0, states = ddil.sample(policy, x_T, grid, ids, None, gen)
        x0_first, _ = ddil.predict(student, states[0], torch.full((2,), grid[0]), ids, None, alpha_bar)
        x0_last, _ = ddil.predict(student, states[1], torch.full((2,), grid[1]), ids, None, alpha_bar)
    torch.testing.assert_close(x0, x0_last)  # no re-noise at the end
    a, sig = ddil.alpha_sigma(alpha_bar, torch.full((2,), grid[1]), x0)
    z = (states[1] - a * x0_first) / sig  # the fresh noise of the re-noising step
    assert abs(z.std().item() - 1) < 0.2 and (z - x_T).abs().mean() > 0.5  # fresh, not the starting noise


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


@pytest.fixture(scope="session")
def v_run(model, tmp_path_factory) -> Path:
    """PD with a v-prediction student, 5 steps (rounds 4 -> 2 steps), logged every 2 steps and at a checkpoint at 4."""
    out = tmp_path_factory.mktemp("run-pd-v")
    assert run_main(argv(model, out, "pd", "--prediction_type", "v_prediction", "--max_train_steps", 5,
                         "--log_every", 2, "--checkpointing_steps", 4)) == 0
    return out


def test_pd_v_prediction_student_samples_in_a_stock_pipeline(model, v_run):
    """The v student is saved with prediction_type v_prediction; a stock pipeline loads it and gives the latents of
    ddil.sample with the student's DDIM policy on the VStudent adapter (v turned into ddil's eps), from the same noise."""
    student = v_run / "student"
    sched = DDIMScheduler.from_pretrained(student, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction"
    pipe, cfg = sample.load_pipeline(str(student), "cpu")
    assert cfg.prediction_type == "v_prediction" and pipe.scheduler.config.prediction_type == "v_prediction"
    cache = adapters.EmbeddingCache.from_prompts(PROMPTS[:2], pipe.tokenizer, pipe.text_encoder)
    alpha_bar = adapters.alpha_bar_of(dict(pipe.scheduler.config))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    policy = ddil.ddim_policy(adapters.VStudent(pipe.unet, cache, alpha_bar), alpha_bar, None)
    got, _ = ddil.sample(policy, x_T, ddil.uniform_grid(2), torch.arange(2), None)
    want = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, latents=x_T.clone(), output_type="latent").images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    eps, _ = ddil.sample(ddil.ddim_policy(adapters.Student(pipe.unet, cache), alpha_bar, None), x_T, ddil.uniform_grid(2),
                         torch.arange(2), None)
    assert not torch.allclose(eps, want, atol=1e-2)  # read as eps, the same UNet samples something else
    images = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, height=16, width=16, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_v_student_converts_v_to_eps(model):
    """VStudent: eps = sigma x_t + alpha v, so x0_hat = alpha x_t - sigma v (Salimans & Ho 2022, Appendix D)."""
    unet = UNet2DConditionModel.from_pretrained(model / "tiny", subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(model / "tiny", safety_checker=None)
    cache = adapters.EmbeddingCache.from_prompts(PROMPTS[:3], pipe.tokenizer, pipe.text_encoder)
    alpha_bar = adapters.alpha_bar_of(dict(pipe.scheduler.config))
    x, t, ids = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 3]), torch.arange(3)
    with torch.no_grad():
        v = unet(x, t, encoder_hidden_states=cache(ids)).sample
        x0, _ = ddil.predict(adapters.VStudent(unet, cache, alpha_bar), x, t, ids, None, alpha_bar)
    ab = alpha_bar[t].float()[:, None, None, None]
    torch.testing.assert_close(x0, ab.sqrt() * x - (1 - ab).sqrt() * v, rtol=1e-4, atol=1e-4)


def test_log_every_reads_the_losses_every_n_steps_at_checkpoints_and_at_the_end(v_run):
    rows = [json.loads(line) for line in (v_run / train.LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert all(r["ms"] > 0 and np.isfinite(r["loss"]) and r["round"] in (0, 1) for r in rows)
    assert rows[-1]["round"] == 1  # 5 steps over 2 rounds: step 5 is in round 2


def test_sub_configs_are_built_by_keyword():
    """Every ddil config field comes from its own flag: distinct values, so a shifted field would show."""
    cfg = config.resolve(config.SDConfig(
        betas=(0.5, 0.3, 0.2), beta_mix_start=0.9, beta_mix_end=0.1, beta_mix_steps=77, teacher_substeps=3,
        buffer_capacity=64, buffer_policy="reservoir", refresh_share=0.4, refresh_every=5, reflect="reflect",
        reflect_range=2.5, reflect_ratio=0.9, reflect_max=1.7, num_ddim_timesteps=25, timestep_scaling_factor=7.0,
        loss_type="huber", huber_c=0.003, ema_decay=0.9, w_min=2.0, w_max=9.0, fake_updates=3, gan_weight=0.2,
        disc_weight=0.03, method="pd", pd_start_steps=16, num_inference_steps=2))
    subs = config.sub_configs(cfg)
    want = {
        "ddil": dict(beta_frwd=0.5, beta_teacher=0.3, beta_student=0.2, beta_mix_start=0.9, beta_mix_end=0.1,
                     beta_mix_steps=77, teacher_substeps=3, buffer_capacity=64, buffer_policy="reservoir",
                     refresh_share=0.4, refresh_every=5),
        "reflect": dict(mode="reflect", range=2.5, ratio=0.9, max_value=1.7),
        "lcm": dict(original_steps=25, timestep_scaling=7.0, sigma_data=0.5, loss="huber", huber_c=0.003,
                    ema_decay=0.9, w_min=2.0, w_max=9.0),
        "dmd2": dict(fake_updates=3, gan_weight=0.2, disc_weight=0.03),
        "pd": dict(N_start=16, N_final=2),
    }
    for name, fields in want.items():
        assert {k: getattr(subs[name], k) for k in fields} == fields, name


def test_dmd2_defaults_are_dmd2s_sd15_settings():
    """tianweiy/DMD2 experiments/sdv1.5: gen_cls_loss_weight 1e-3, guidance_cls_loss_weight 1e-2,
    dfake_gen_update_ratio 10, max_grad_norm 10, lr 1e-5 (from scratch), real_guidance_scale 1.75."""
    cfg = config.parse_args(["--method", "dmd2"])
    dmd = config.sub_configs(cfg)["dmd2"]
    assert (dmd.gan_weight, dmd.disc_weight, dmd.fake_updates) == (1e-3, 1e-2, 10)
    assert (cfg.max_grad_norm, cfg.learning_rate, cfg.guidance_scale) == (10.0, 1e-5, 1.75)
    assert config.parse_args(["--method", "lcm"]).max_grad_norm == 1.0


def test_sd_uses_ddils_training_steps_and_never_toy():
    """sd/train.py calls ddil's training steps (the toy's) and computes no loss or optimiser step of its own; no module
    of sd/ imports toy/; the loop reads no loss per step."""
    import ast
    called = {n.attr for n in ast.walk(ast.parse((ROOT / "sd" / "train.py").read_text()))
              if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "ddil"}
    assert {"lcm_train_step", "pd_train_step", "dmd2_train_step"} <= called
    assert not called & {"lcm_loss", "pd_loss", "dmd_loss", "fake_score_loss", "ema_update", "dmd2_generator_loss"}
    assert ".item()" not in (ROOT / "sd" / "train.py").read_text()
    for path in sorted((ROOT / "sd").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "toy" or n.startswith("toy.") for n in names), path


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
    "v prediction off pd": (lambda m, t: ["--prediction_type", "v_prediction"], "--method pd"),
    "log_every": (lambda m, t: ["--log_every", 0], "log_every=0"),
    "negative learning rate": (lambda m, t: ["--learning_rate", "-1e-4"], "--learning_rate=-0.0001 is invalid: allowed > 0"),
    "negative decimal learning rate": (lambda m, t: ["--learning_rate", "-.5"], "--learning_rate=-0.5 is invalid"),
    "zero learning rate": (lambda m, t: ["--learning_rate", "0"], "--learning_rate=0.0 is invalid"),
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
    assert "dmd2 --betas 0 0 1 --beta_mix_start 0 --beta_mix_end 0 --buffer_capacity 0" in text  # DMD2's base
    assert "lcm --betas 1 0 0" in text and "pd --betas 1 0 0" in text


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
