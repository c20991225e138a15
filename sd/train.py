"""Distil Stable Diffusion into a few-step student with the unchanged algorithms of ddil.py.

    python -m sd.train --method lcm                            # SD v1.5, one GPU, prompts from sd/prompts.txt
    python -m sd.tiny /tmp/tiny && python -m sd.train --method lcm --pretrained_teacher_model /tmp/tiny \\
        --resolution 16 --device cpu --train_batch_size 4 --max_train_steps 20      # a CPU smoke run
    accelerate launch --num_processes 8 -m sd.train --method dmd2 ...                 # several GPUs (DDP)

Each step is ddil's own training step of the base method (ddil.lcm_train_step, pd_train_step, dmd2_train_step, the
ones the toy runs) on batches from ddil.ddil_states (forward, teacher and DAgger-mixed student states, the aggregation
buffer). What SD adds enters through their hooks: the DDP-wrapped module, accelerate's autocast, and the optimiser
step (accelerate's backward with fp16 loss scaling and DDP sync, gradient clipping, the lr schedule).
Losses stay on the device; the loop reads them every --log_every steps.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import ddil
from sd import adapters, checkpoint, data, tiny
from sd.adapters import EmbeddingCache, FakeScore, Student, Teacher
from sd.config import (DEFAULT_PROMPTS, PACKAGE_PROMPTS, InputError, SDConfig, check_output, parse_args, progress,
                       sub_configs, to_json, write_json)

LOG = "train_log.jsonl"


# ----------------------------------------------------------------------------------------------------
# Checks before any model loads


@dataclass
class Inputs:
    model: Optional[str]  # the teacher: a local folder or a Hub id (None with --init random)
    images: Any  # indexable images, or None for prompts-only data
    prompts: list  # captions of the images, or the prompts; a state's cond is an index into this list
    resume: Optional[Path]  # checkpoint to resume from
    warnings: list = field(default_factory=list)  # one-line warnings, printed by main on the main process


def resolve_model(name: str) -> str:
    """A local pipeline folder, or a Hub id that is cached (or, online, downloadable): its model_index.json must be found."""
    msg = (f"--pretrained_teacher_model {name}: {{}}. Offline, pass a local diffusers pipeline folder, or set "
           f"HF_HUB_OFFLINE=1 with the model already in the Hugging Face cache")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        if not (path / "model_index.json").is_file():
            raise InputError(msg.format("no such pipeline folder (no model_index.json)"))
        checkpoint.check_safetensors(path, f"--pretrained_teacher_model {name}")
        return str(path)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    if isinstance(cached := try_to_load_from_cache(name, "model_index.json"), str):
        checkpoint.check_safetensors(Path(cached).parent, f"--pretrained_teacher_model {name}")
        return name  # cached
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        hf_hub_download(name, "model_index.json", local_files_only=offline)
    except Exception as e:  # noqa: BLE001  (not cached, no network, no such repo: all the same to the user)
        raise InputError(msg.format(f"not found ({type(e).__name__})")) from None
    return name


def read_source(cfg: SDConfig) -> tuple[Any, list]:
    if cfg.train_data_dir:
        return data.read_imagefolder(cfg.train_data_dir, cfg.caption_column)
    if cfg.dataset_name:
        return data.read_hf_dataset(cfg.dataset_name, cfg.image_column, cfg.caption_column)
    return None, data.read_prompts(str(PACKAGE_PROMPTS) if cfg.prompts_file == DEFAULT_PROMPTS else cfg.prompts_file)


def teacher_data_warning(cfg: SDConfig) -> list:
    """With prompts-only data x_0 are teacher samples, so DDIL's forward states (arXiv 2410.11971, Sec. 3) and DMD2's
    GAN real side (Yin et al. 2024) preserve the teacher's samples, not real data: one line that says so."""
    uses = ([f"DDIL's forward states (--betas {' '.join(map(str, cfg.betas))})"]
            if cfg.betas[0] > 0 and cfg.betas[1] + cfg.betas[2] > 0 else [])
    uses += [f"DMD2's GAN real side (--gan_weight {cfg.gan_weight})"] if cfg.method == "dmd2" and cfg.gan_weight > 0 else []
    if not uses:
        return []
    return [f"warning: the data are teacher samples (prompts-only, no --train_data_dir/--dataset_name), so "
            f"{' and '.join(uses)} keep the student near the teacher's samples, not real images"]


def check_resume(cfg: SDConfig, resume: Optional[Path]) -> None:
    """A resume continues the checkpoint's own run; a fresh run does not mix into an earlier run's checkpoints."""
    if resume is not None:
        checkpoint.check_resume_config(resume, cfg)
        return
    found = checkpoint.list_checkpoints(Path(cfg.output_dir))
    if found and not cfg.overwrite_output_dir:
        raise InputError(f"--output_dir {cfg.output_dir} holds checkpoints of an earlier run ({found[-1].name}): pass "
                         f"--resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete them, or "
                         f"another --output_dir")


def preflight(cfg: SDConfig) -> Inputs:
    """Every check that needs no model: processes, device, optional packages, output folder, data, teacher files,
    checkpoint and its config. Nothing is written."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train_batch_size < world or cfg.train_batch_size % world:
        raise InputError(f"--train_batch_size {cfg.train_batch_size} is the global batch: it must be a multiple of "
                         f"the number of processes ({world}), at least one state per process")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device found. A full-size SD run needs a GPU; for a CPU smoke run "
                         "use --device cpu with the tiny pipeline (python -m sd.tiny DIR; make sd-tiny)")
    optional = {"tensorboard": ("--report_to tensorboard", cfg.report_to == "tensorboard"), "peft": ("--use_lora", cfg.use_lora)}
    for pkg, (flag, wanted) in optional.items():
        try:
            if wanted:
                importlib.import_module(pkg)
        except ImportError:
            raise InputError(f"{flag} needs the {pkg} package: pip install {pkg}") from None
    check_output("--output_dir", cfg.output_dir, folder=True)
    images, prompts = read_source(cfg)
    model = resolve_model(cfg.pretrained_teacher_model) if cfg.init == "pretrained" else None
    resume = checkpoint.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    check_resume(cfg, resume)
    return Inputs(model=model, images=images, prompts=prompts, resume=resume,
                  warnings=teacher_data_warning(cfg) if images is None else [])


# ----------------------------------------------------------------------------------------------------
# The pipeline's parts and the networks of each method


@dataclass
class Parts:
    unet: Any  # the teacher UNet2DConditionModel (fp32 until the students are copied from it)
    vae: Any  # AutoencoderKL (kept in fp32, as diffusers' training scripts do)
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler_config: dict  # the pipeline's scheduler config: the noise schedule


def load_parts(cfg: SDConfig, model: Optional[str]) -> Parts:
    """From the teacher pipeline folder or Hub id, or (--init random) the SD1.5 architecture with random weights."""
    from diffusers import DDPMScheduler
    if model is None:
        pipe = tiny.build_pipeline(tiny.SD15_UNET, tiny.SD15_VAE, tiny.SD15_TEXT, cfg.seed)
        return Parts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    with checkpoint.loading(f"--pretrained_teacher_model {model}"):  # a damaged file: one line, not a traceback
        sched = DDPMScheduler.load_config(model, subfolder="scheduler")
        if sched.get("prediction_type", "epsilon") != "epsilon":
            raise InputError(f"--pretrained_teacher_model {model}: prediction_type={sched['prediction_type']!r}; "
                             f"sd/ distils epsilon-prediction teachers (SD 1.x)")
        return Parts(UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                     AutoencoderKL.from_pretrained(model, subfolder="vae"),
                     CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                     AutoTokenizer.from_pretrained(model, subfolder="tokenizer"), dict(sched))


def make_nets(cfg: SDConfig, teacher_unet) -> dict:
    """The trained UNets, fp32 copies of the teacher: 'student' plus LCM's EMA 'target' or DMD2's 'fake' score."""
    student = adapters.student_unet(teacher_unet, w_embed=cfg.method == "lcm" and not cfg.use_lora,
                                    w_dim=cfg.unet_time_cond_proj_dim)
    if cfg.use_lora:
        adapters.add_lora(student, cfg.lora_rank)
    nets = {"student": student}
    if cfg.method == "lcm" and not cfg.use_lora:  # LCM-LoRA has no target net: the student is its own target
        nets["target"] = adapters.frozen_copy(student)
    if cfg.method == "dmd2":
        nets["fake"] = adapters.student_unet(teacher_unet, w_embed=False)
    if cfg.gradient_checkpointing:
        for name in ("student", "fake"):
            if name in nets:
                nets[name].enable_gradient_checkpointing()
    return nets


def sampler_scheduler(cfg: SDConfig, scheduler_config: dict):
    """The stock diffusers scheduler that samples this student: LCMScheduler (LCM), DDIM on the trailing grid with
    alpha_bar(clean) = 1 (PD, as ddil's grid); DMD2 samples with ddil.generator_policy (sd.sample), its file is DDPM's."""
    from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler
    if cfg.method == "lcm":
        return LCMScheduler.from_config(scheduler_config, original_inference_steps=cfg.num_ddim_timesteps,
                                        timestep_scaling=cfg.timestep_scaling_factor, **scheduler_reflection(cfg))
    if cfg.method == "pd":  # prediction_type: what the student predicts (epsilon or v)
        return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                         prediction_type=cfg.prediction_type, **scheduler_reflection(cfg))
    return DDPMScheduler.from_config(scheduler_config, **scheduler_reflection(cfg))


def scheduler_reflection(cfg: SDConfig) -> dict:
    """The trained reflection (ddil.reflect_x0) in diffusers' scheduler options, where they can express it:
    clip -> clip_sample to [-r, r]; dynamic with r = 1 -> thresholding (Imagen's rule, = ddil.dynamic_threshold).
    The mirror fold and dynamic with r != 1 have no diffusers option: the file says none, sd.sample applies them.
    Note: StableDiffusionPipeline(scheduler=...) resets clip_sample to False (a fix for old SD configs); set
    pipe.scheduler after building the pipeline, as sd.sample does."""
    off = dict(clip_sample=False, thresholding=False)
    if cfg.reflect == "clip":
        return {**off, "clip_sample": True, "clip_sample_range": cfg.reflect_range or 1.0}
    if cfg.reflect == "dynamic" and (cfg.reflect_range or 1.0) == 1.0:
        return {**off, "thresholding": True, "dynamic_thresholding_ratio": cfg.reflect_ratio,
                "sample_max_value": cfg.reflect_max}
    return off


def save_student(unet, folder: Path, cfg: SDConfig, scheduler_config: dict) -> None:
    """The student in diffusers format (LoRA merged), its scheduler in folder/scheduler, the run's config."""
    adapters.plain_unet(unet).save_pretrained(folder)
    sampler_scheduler(cfg, scheduler_config).save_pretrained(folder / "scheduler")
    write_json(to_json(cfg), folder / "ddil_config.json")


# ----------------------------------------------------------------------------------------------------
# Training steps. Each base method: ddil's training step on states from ddil.ddil_states, with sd's hooks.


@dataclass
class Ctx:
    cfg: SDConfig  # the resolved config
    acc: Any  # accelerate.Accelerator
    teacher: Teacher  # the guided SD teacher
    cache: EmbeddingCache  # prompt embeddings
    alpha_bar: torch.Tensor  # (T,) float64, the teacher's schedule
    reflect: Optional[ddil.ReflectConfig]  # reflected sampler (None = off)
    draw_data: Callable  # ddil's draw_data(n, gen) -> (x0 latents, prompt ids)
    draw_w: Callable  # ddil's draw_w(n, gen) -> w (n,)
    gen: torch.Generator  # this process's generator for states, noise and data
    B: int  # states per step in this process
    subs: dict  # ddil configs: ddil, reflect, lcm, dmd2 (, pd)


@dataclass
class Run:
    student: Student  # the trained student (unwrapped)
    step: Callable[[int], dict]  # step(i) -> logs
    opts: dict  # name -> (optimizer, lr scheduler)
    nets: dict  # other UNets saved in checkpoints as diffusers folders
    heads: dict = field(default_factory=dict)  # small trained modules (DMD2's GAN head)
    state: dict = field(default_factory=dict)  # 'buffer': ReplayBuffer | None; method state saved with it
    restore: Callable[[dict], None] = lambda state: None  # rebuild method state (PD's round) before loading


def optimizer(ctx: Ctx, module) -> tuple:
    """AdamW over the trainable parameters, with diffusers' lr scheduler (stepped once per optimiser step)."""
    from diffusers.optimization import get_scheduler
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=ctx.cfg.learning_rate,
                            weight_decay=ctx.cfg.adam_weight_decay)
    return opt, get_scheduler(ctx.cfg.lr_scheduler, opt, num_warmup_steps=ctx.cfg.lr_warmup_steps,
                              num_training_steps=ctx.cfg.max_train_steps)


def prepare(ctx: Ctx, module) -> tuple:
    """(the module as trained: DDP-wrapped with several processes, (its optimizer, lr scheduler))."""
    opt, sched = optimizer(ctx, module)
    online, opt = ctx.acc.prepare(module, opt)
    return online, (opt, sched)


def update(ctx: Ctx, opt_sched: tuple, loss: torch.Tensor) -> None:
    """ddil's `update` hook: one optimiser step on a scalar loss with accelerate's backward (loss scaling, DDP sync),
    clipping of the optimiser's own parameters, the step, the lr schedule."""
    opt, sched = opt_sched
    ctx.acc.backward(loss)
    ctx.acc.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], ctx.cfg.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def hooks(ctx: Ctx) -> dict:
    """What SD hands ddil's training steps: its optimiser step and accelerate's autocast."""
    return {"update": functools.partial(update, ctx), "autocast": ctx.acc.autocast}


def autocast_policy(ctx: Ctx, policy: ddil.Policy) -> ddil.Policy:
    """The policy's steps under accelerate's autocast: rollouts in the training precision (data stays outside)."""
    def step(*args):
        with ctx.acc.autocast():
            return policy(*args)
    return step


def states_fn(ctx: Ctx, grid: list, base_grid: list, student_step, run_state: dict) -> Callable:
    """states(step, refresh=True) -> ddil.States: ddil_states with this run's priors and a fresh aggregation buffer."""
    cfg = ctx.cfg
    run_state["buffer"] = buf = ddil.ReplayBuffer(cfg.buffer_capacity, cfg.buffer_policy, ctx.acc.device,
                                                  seed=ctx.gen.initial_seed()) if cfg.buffer_capacity else None
    teacher_step = ddil.teacher_policy(ctx.teacher, ctx.alpha_bar, ctx.reflect, cfg.teacher_substeps, grid)
    student_step = autocast_policy(ctx, student_step)  # the teacher runs in its own half precision already

    def states(step: int, refresh: bool = True) -> ddil.States:
        s = ddil.ddil_states(ctx.B, ctx.draw_data, ctx.draw_w, base_grid, grid, teacher_step, student_step,
                             ctx.alpha_bar, ctx.subs["ddil"], step, buf, ctx.gen, refresh)
        run_state["age"] = ddil.mean_age(s, step)  # logged as rollout_age (no host sync until the log is read)
        return s
    return states


def with_age(logs: dict, run_state: dict) -> dict:
    """A step's logs and the mean age (training steps) of its rollout states, nan when it trained on none."""
    return {**logs, "rollout_age": run_state["age"]}


def build_lcm(ctx: Ctx, nets: dict) -> Run:
    """LCM (Luo et al. 2023, Algorithm 1) on DDIL states; the EMA target, or the student itself with LoRA."""
    cfg, lcm = ctx.cfg, ctx.subs["lcm"]
    student = Student(nets["student"], ctx.cache)
    target = Student(nets["target"], ctx.cache) if "target" in nets else student
    online, opt = prepare(ctx, student)
    grid, run_state = ddil.lcm_grid(cfg.num_inference_steps, cfg.num_ddim_timesteps), {}
    policy = ddil.consistency_policy(student, ctx.alpha_bar, ctx.reflect, lcm)
    states = states_fn(ctx, grid, ddil.lcm_base_grid(cfg.num_ddim_timesteps), policy, run_state)

    def step(i: int) -> dict:
        return with_age(ddil.lcm_train_step(student, target, ctx.teacher, opt, states(i), ctx.alpha_bar, ctx.reflect,
                                            lcm, online=online, **hooks(ctx)), run_state)
    return Run(student, step, {"student": opt}, {k: v for k, v in nets.items() if k == "target"}, state=run_state)


def build_pd(ctx: Ctx, nets: dict) -> Run:
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2) on DDIL states: max_train_steps split evenly over
    rounds N_start, N_start/2, ..., N; each later round's teacher is a frozen copy of the student, its optimizer
    state and aggregation buffer start afresh. Round 1's teacher is the guided SD teacher. --prediction_type
    v_prediction: the student and the later rounds' teachers predict v (adapters.VStudent)."""
    cfg = ctx.cfg
    rounds = ddil.pd_rounds(cfg.pd_start_steps, cfg.num_inference_steps)
    per_round = max(1, cfg.max_train_steps // len(rounds))
    adapter = functools.partial(adapters.VStudent, alpha_bar=ctx.alpha_bar) if cfg.prediction_type == "v_prediction" \
        else Student
    student = adapter(nets["student"], ctx.cache)
    online, opt = prepare(ctx, student)
    policy = ddil.ddim_policy(student, ctx.alpha_bar, ctx.reflect)
    run = Run(student, None, {"student": opt}, {}, state={"round": -1})
    cur: dict = {}

    def start_round(r: int, fresh: bool = True) -> None:
        run.state["round"], grid = r, ddil.uniform_grid(rounds[r])
        cur["fine"], cur["states"] = ddil.uniform_grid(2 * rounds[r]), states_fn(ctx, grid, grid, policy, run.state)
        cur["teacher"] = ctx.teacher
        if r > 0:
            run.nets["round_teacher"] = ddil.pd_next_round(adapters.plain_unet(student.unet))
            cur["teacher"] = adapter(run.nets["round_teacher"], ctx.cache)
            if fresh:
                opt[0].optimizer.state.clear()

    def restore(state: dict) -> None:
        if state["round"] >= 0:
            start_round(state["round"], fresh=False)

    def step(i: int) -> dict:
        r = min(i // per_round, len(rounds) - 1)
        if r != run.state["round"]:
            start_round(r)
        logs = ddil.pd_train_step(student, cur["teacher"], opt, cur["states"](i), cur["fine"], ctx.alpha_bar,
                                  ctx.reflect, ctx.subs["pd"].teacher_substeps, online=online, **hooks(ctx))
        return {**with_age(logs, run.state), "round": r}
    run.step, run.restore = step, restore
    return run


def build_dmd2(ctx: Ctx, nets: dict) -> Run:
    """DMD2 (Yin et al. 2024) on DDIL states: ddil.dmd2_train_step, a generator update by the distribution-matching
    loss (+ GAN term), then fake_updates fake-score (+ discriminator) updates, each on a fresh ddil_states batch (its
    rollouts and share of buffer refresh included) and fresh real data."""
    cfg, dmd = ctx.cfg, ctx.subs["dmd2"]
    student, fake = Student(nets["student"], ctx.cache), FakeScore(nets["fake"], ctx.cache, gan=dmd.gan_weight > 0)
    fake.to(ctx.acc.device)
    (online, opt_g), (fake_online, opt_f) = prepare(ctx, student), prepare(ctx, fake)
    grid, run_state = ddil.uniform_grid(cfg.num_inference_steps), {}
    states = states_fn(ctx, grid, grid, ddil.generator_policy(student, ctx.alpha_bar, ctx.reflect), run_state)
    disc = fake.disc if dmd.gan_weight > 0 else None  # unwrapped: DDP runs one forward per backward
    real = lambda: ctx.draw_data(ctx.B, ctx.gen)  # noqa: E731  (the GAN's real side, with its own prompts)

    def step(i: int) -> dict:
        return with_age(ddil.dmd2_train_step(student, fake, ctx.teacher, opt_g, opt_f, ddil.step_batches(states, i),
                                             ctx.alpha_bar, dmd, ctx.gen, disc, real, online=online,
                                             fake_online=fake_online, **hooks(ctx)), run_state)
    heads = {"fake_head": fake.head} if fake.head is not None else {}
    return Run(student, step, {"student": opt_g, "fake": opt_f}, {"fake": nets["fake"]}, heads, run_state)


BUILD = {"lcm": build_lcm, "pd": build_pd, "dmd2": build_dmd2}


# ----------------------------------------------------------------------------------------------------
# Set-up: the accelerator, the teacher, the data, the schedule


def setup(cfg: SDConfig, inputs: Inputs):
    """Everything a run needs, in order: parts (fp32) -> students copied from the teacher -> devices and dtypes ->
    prompt embeddings -> data -> reflection range. Returns (ctx, nets, parts)."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
                      log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
                      project_dir=str(Path(cfg.output_dir) / "logs"))
    torch.manual_seed(cfg.seed)  # the same new layers (w-embedding, LoRA, GAN head) on every process
    parts = load_parts(cfg, inputs.model)
    nets = make_nets(cfg, parts.unet)
    device = acc.device
    half = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    frozen = half if device.type == "cuda" else torch.float32  # the teacher and text encoder
    for net in nets.values():
        net.to(device)
    parts.unet.to(device, frozen)
    parts.text_encoder.to(device, frozen).requires_grad_(False)
    parts.vae.to(device).requires_grad_(False)
    cache = EmbeddingCache.from_prompts(inputs.prompts, parts.tokenizer, parts.text_encoder)
    teacher = Teacher(parts.unet, cache)
    alpha_bar = adapters.alpha_bar_of(parts.scheduler_config).to(device)  # ddil reads it at every call: a host copy would sync
    draw_data, x0 = make_data(cfg, inputs, acc, teacher, alpha_bar, parts)
    cfg = dataclasses.replace(cfg, reflect_range=cfg.reflect_range or data.data_range(x0))  # resolved: saved as used
    subs = sub_configs(cfg)
    w_fixed = None if cfg.guidance_scale is None else cfg.guidance_scale - 1.0
    def draw_w(n, gen):  # noqa: E306
        if w_fixed is not None:
            return torch.full((n,), w_fixed, device=device)
        return cfg.w_min + (cfg.w_max - cfg.w_min) * ddil.rand(n, gen, device)
    gen = torch.Generator().manual_seed((cfg.seed << 16) + acc.process_index)  # a stream per process
    ctx = Ctx(cfg, acc, teacher, cache, alpha_bar, subs["reflect"] if cfg.reflect != "none" else None, draw_data,
              draw_w, gen, cfg.train_batch_size // acc.num_processes, subs)
    return ctx, nets, parts


def make_data(cfg: SDConfig, inputs: Inputs, acc, teacher, alpha_bar, parts):
    """(draw_data, x0 sample for the reflection range). Prompts-only: teacher samples, made once by the main
    process and cached in output_dir as safetensors."""
    down = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    shape = (parts.unet.config.in_channels, cfg.resolution // down, cfg.resolution // down)
    if inputs.images is not None:
        draw = data.image_draw(inputs.images, cfg.resolution, parts.vae, acc.device)
        return draw, draw(min(64, len(inputs.images)), torch.Generator().manual_seed(cfg.seed))[0]
    key = dict(model=cfg.pretrained_teacher_model, init=cfg.init, prompts=data.prompts_hash(inputs.prompts),
               per_prompt=cfg.latents_per_prompt, shape=list(shape), steps=cfg.data_num_inference_steps,
               guidance=cfg.data_guidance_scale, seed=cfg.seed)
    make = lambda: data.teacher_samples(teacher, alpha_bar, len(inputs.prompts), cfg.latents_per_prompt, shape,  # noqa: E731
                                        cfg.data_num_inference_steps, cfg.data_guidance_scale - 1, cfg.seed,
                                        max(cfg.train_batch_size, 8), acc.device, progress=acc.is_local_main_process)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with acc.main_process_first():
        latents, ids = data.cached(Path(cfg.output_dir) / "teacher_latents.safetensors", key, make)
    return data.latent_draw(latents, ids, acc.device), latents


# ----------------------------------------------------------------------------------------------------
# Checkpoints: write and load


def writer(run: Run, ctx: Ctx, parts: Parts, step: int) -> Callable[[Path], None]:
    """write(folder): everything of the main process in a checkpoint."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_student(run.student.unet, folder / "unet", ctx.cfg, parts.scheduler_config)
        for name, unet in run.nets.items():
            unet.save_pretrained(folder / f"unet_{name}")
        if run.heads:
            save_file({f"{n}.{k}": v.contiguous() for n, h in run.heads.items() for k, v in h.state_dict().items()},
                      str(folder / "heads.safetensors"))
        if ctx.cfg.use_lora:
            from peft.utils import get_peft_model_state_dict
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(run.student.unet).items()},
                      str(folder / "student_lora.safetensors"))
        state = {"step": step, "config": to_json(ctx.cfg), "method_state": {k: v for k, v in run.state.items() if k != "buffer"},
                 "opts": {k: (o.state_dict(), s.state_dict()) for k, (o, s) in run.opts.items()}}
        torch.save(state, folder / checkpoint.STATE)
        write_json(to_json(ctx.cfg), folder / "ddil_config.json")
    return write


def rank_state(run: Run, ctx: Ctx) -> dict:
    buf = run.state.get("buffer")
    return {"rng": checkpoint.rng_state({"train": ctx.gen}), "buffer": None if buf is None else buf.state_dict()}


def load_state(run: Run, ctx: Ctx, path: Path) -> int:
    """Restore a run from a checkpoint folder; returns the step to continue from."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    try:
        state = torch.load(path / checkpoint.STATE, map_location="cpu", weights_only=False)
        rank = torch.load(path / checkpoint.RANK_STATE.format(ctx.acc.process_index), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise InputError(f"--resume_from_checkpoint {path}: unreadable state ({str(e).splitlines()[0]}); "
                         f"was it written with {ctx.acc.num_processes} processes?") from None
    run.state.update(state["method_state"])
    run.restore(state["method_state"])
    if ctx.cfg.use_lora:
        from peft.utils import set_peft_model_state_dict
        set_peft_model_state_dict(run.student.unet, load_file(str(path / "student_lora.safetensors")))
    else:
        run.student.unet.load_state_dict(UNet2DConditionModel.from_pretrained(path / "unet").state_dict())
    for name, unet in run.nets.items():
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(path / f"unet_{name}").state_dict())
    if run.heads:
        heads = load_file(str(path / "heads.safetensors"))
        for n, h in run.heads.items():
            h.load_state_dict({k[len(n) + 1:]: v for k, v in heads.items() if k.startswith(n + ".")})
    for k, (o, s) in run.opts.items():
        o.load_state_dict(state["opts"][k][0])
        s.load_state_dict(state["opts"][k][1])
    checkpoint.set_rng_state(rank["rng"], {"train": ctx.gen})
    if rank["buffer"] is not None:
        run.state["buffer"].load_state_dict(rank["buffer"])
    return state["step"]


def load(run: Run, ctx: Ctx, path: Path) -> int:
    """Restore a run from a checkpoint folder (load_state); any failure is one line naming the checkpoint."""
    with checkpoint.loading(f"--resume_from_checkpoint {path}"):
        return load_state(run, ctx, path)


# ----------------------------------------------------------------------------------------------------
# The loop


class LogWindow:
    """The steps' logs, kept on the device and averaged over the steps since the last read: one host sync per read."""

    def __init__(self):
        self.logs, self.n, self.t0 = {}, 0, time.perf_counter()

    def add(self, logs: dict) -> None:
        for key, v in logs.items():
            self.logs.setdefault(key, []).append(v)
        self.n += 1

    def read(self) -> dict:
        """{key: mean over the window} (plain numbers, such as PD's round: the latest), ms per step; then empty."""
        keys = [k for k, v in self.logs.items() if torch.is_tensor(v[0])]
        # losses average plainly (a NaN must surface); other readings, such as rollout_age, skip steps without them
        avg = lambda k: (torch.mean if k.startswith("loss") else torch.nanmean)(torch.stack(self.logs[k]).float())  # noqa: E731
        means = torch.stack([avg(k) for k in keys]).tolist() if keys else []  # the sync
        row = {k: v[-1] for k, v in self.logs.items() if k not in keys} | dict(zip(keys, means))
        row["ms"] = 1e3 * (time.perf_counter() - self.t0) / self.n
        self.__init__()
        return row


def write_log(row: dict, i: int, cfg: SDConfig, acc, bar) -> None:
    """Stop on a non-finite loss (naming the phase and the log's step); write train_log.jsonl, the progress bar and
    the trackers."""
    check_finite(row, i + 1, cfg.method, Path(cfg.output_dir))
    if acc.is_main_process:
        with open(Path(cfg.output_dir) / LOG, "a") as f:
            f.write(json.dumps({"step": i + 1, **row}) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4g}", ms=f"{row['ms']:.0f}", refresh=False)
    acc.log(row, step=i + 1)


def train(cfg: SDConfig, inputs: Inputs) -> Optional[Path]:
    """Distil; returns output_dir/student (None on the other processes). output_dir is first written once every
    model has loaded: the teacher samples' cache, then (a fresh run with --overwrite_output_dir) the old checkpoints
    go, the log is cut to the resumed step, config.json is written."""
    out = Path(cfg.output_dir)
    ctx, nets, parts = setup(cfg, inputs)
    cfg, acc = ctx.cfg, ctx.acc
    run = BUILD[cfg.method](ctx, nets)
    start = load(run, ctx, inputs.resume) if inputs.resume is not None else 0
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for old in checkpoint.list_checkpoints(out) if inputs.resume is None else []:  # preflight: only when asked
            checkpoint.delete(old)
        checkpoint.truncate_log(out / LOG, start)
        write_json(to_json(cfg), out / "config.json")
    acc.wait_for_everyone()
    if cfg.report_to == "tensorboard":
        acc.init_trackers("ddil-sd", config={k: str(v) if isinstance(v, (tuple, type(None))) else v
                                             for k, v in to_json(cfg).items()})
    bar = progress(total=cfg.max_train_steps, initial=start, desc=f"sd {cfg.method}", disable=not acc.is_local_main_process)
    window = LogWindow()
    try:
        for i in range(start, cfg.max_train_steps):
            window.add(run.step(i))
            bar.update(1)
            due = (i + 1) % cfg.checkpointing_steps == 0
            if due or (i + 1) % cfg.log_every == 0 or i + 1 == cfg.max_train_steps:
                write_log(window.read(), i, cfg, acc, bar)
            if due:
                checkpoint.save(acc, out, i + 1, writer(run, ctx, parts, i + 1), rank_state(run, ctx),
                                cfg.checkpoints_total_limit)
    finally:
        bar.close()  # before any error line, so that line stands on its own
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_student(run.student.unet, out / "student", cfg, parts.scheduler_config)
        if "target" in run.nets:  # LCM's EMA target too, as diffusers' LCM script saves unet_target
            save_student(run.nets["target"], out / "student_target", cfg, parts.scheduler_config)
    acc.end_training()
    return out / "student" if acc.is_main_process else None


def check_finite(logs: dict, step: int, method: str, out: Path) -> None:
    """ddil's NaN guard, said as sd.train counts: the phase, the step as train_log.jsonl numbers it (from 1), and
    the checkpoint to go back to."""
    try:
        ddil.check_finite(logs, step, f"sd.train {method}, training")
    except FloatingPointError as e:
        found = checkpoint.list_checkpoints(out)
        last = f"the last checkpoint is {found[-1].name}" if found else "no checkpoint was written yet"
        raise FloatingPointError(f"{e} (steps count from 1, as in {LOG}); {last}") from None


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        inputs = preflight(cfg)
        cfg = checkpoint.keep_saved_anneal(inputs.resume, cfg)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, one line)
        return e.code
    except (ddil.ConfigError, InputError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in inputs.warnings if int(os.environ.get("RANK", "0")) == 0 else []:
        print(line, file=sys.stderr)
    try:
        student = train(cfg, inputs)
    except (InputError, data.DataError) as e:  # found while loading (a damaged teacher, an unreadable image)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if student is not None:
        print(f"student: {student}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
