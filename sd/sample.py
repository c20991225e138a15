"""Sample a distilled student into a labelled PNG grid, with the sampler and the reflection it was trained with.

    python -m sd.sample --student results/sd-lcm/student --steps 4 --prompt "a red fox in snow" --out grid.png

Every method samples with its own ddil policy on the student's grid, mapping x0_hat into the latent domain by the
reflection of its run (ddil.reflect_x0 with the saved ddil_config.json), as its DDIL rollouts did in training:
LCM: ddil.consistency_policy on ddil.lcm_grid (= LCMScheduler; guidance_scale = w + 1 enters as the w-embedding).
PD: ddil.ddim_policy on ddil.uniform_grid (= DDIMScheduler on the trailing grid), no CFG (the student is guided).
DMD2: ddil.generator_policy on ddil.uniform_grid(steps) = [999, 749, 499, 249] at 4 steps.
With --reflect none these are the stock diffusers samplers (tests/test_sd.py checks it); the saved scheduler config
carries the reflection too where diffusers' clip_sample / thresholding can express it (sd.train.scheduler_reflection).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

import ddil
from sd import adapters, checkpoint, data, tiny
from sd.config import PACKAGE_PROMPTS, InputError, Parser, SDConfig, check_device, check_output, from_json, sub_configs

MIN_TILE = 128  # grid tiles are at least this many pixels: tiny (16 px) images are enlarged to be seen
GAP = 4  # white pixels between the grid's tiles


class SampleError(InputError):
    """Bad input to sd.sample / sd.eval (exit code 2)."""


def read_student(folder: str) -> SDConfig:
    """The run config saved beside a student (output_dir/student or checkpoint-STEP/unet)."""
    path = Path(folder) / "ddil_config.json"
    if not path.is_file():
        raise SampleError(f"--student {folder}: not a student folder (no ddil_config.json); "
                          f"use output_dir/student or output_dir/checkpoint-STEP/unet")
    try:
        return from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise SampleError(f"--student {folder}: unreadable ddil_config.json ({checkpoint.first_line(e)})") from None


def max_steps(folder: str, cfg: SDConfig) -> int:
    """The most steps the student's sampler has: LCM picks from its num_ddim_timesteps skipping grid, the others
    from the T timesteps of the schedule."""
    if cfg.method == "lcm":
        return cfg.num_ddim_timesteps
    sched = Path(folder) / "scheduler" / "scheduler_config.json"
    return json.loads(sched.read_text()).get("num_train_timesteps", 1000) if sched.is_file() else 1000


def check_steps(folder: str, cfg: SDConfig, steps: int) -> None:
    top = max_steps(folder, cfg)
    if not 1 <= steps <= top:
        why = f"the LCM skipping grid of --num_ddim_timesteps {top}" if cfg.method == "lcm" else f"T = {top} timesteps"
        raise SampleError(f"--steps {steps}: this {cfg.method} student samples with 1 to {top} steps ({why}); "
                          f"it was trained for {cfg.num_inference_steps}")


def load_pipeline(folder: str, device: str, teacher: Optional[str] = None):
    """A StableDiffusionPipeline: the teacher's VAE, text encoder and tokenizer, the student's UNet and scheduler.
    A damaged or missing file is one SampleError line naming the folder."""
    from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    cfg = read_student(folder)
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    checkpoint.check_safetensors(Path(folder), f"--student {folder}")
    with checkpoint.loading(f"--student {folder}"):
        unet = UNet2DConditionModel.from_pretrained(folder).to(dtype)
        scheduler = {"lcm": LCMScheduler, "pd": DDIMScheduler, "dmd2": DDPMScheduler}[cfg.method].from_pretrained(
            folder, subfolder="scheduler")
    if cfg.init == "random":  # the same seeded random SD1.5 the run trained against
        pipe = tiny.build_pipeline(tiny.SD15_UNET, tiny.SD15_VAE, tiny.SD15_TEXT, cfg.seed)
        pipe.unet, pipe.scheduler = unet, scheduler
    else:
        teacher = teacher or cfg.pretrained_teacher_model
        if Path(teacher).is_dir():
            checkpoint.check_safetensors(Path(teacher), f"--pretrained_teacher_model {teacher}")
        with checkpoint.loading(f"--pretrained_teacher_model {teacher} (the VAE and text encoder)"):
            pipe = StableDiffusionPipeline.from_pretrained(teacher, unet=unet, safety_checker=None)
        pipe.scheduler = scheduler  # after __init__, which would reset a clip_sample=True to False (old SD configs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), cfg


# ----------------------------------------------------------------------------------------------------
# Sampling: the student's policy with its trained reflection


def trained_reflection(cfg: SDConfig) -> Optional[ddil.ReflectConfig]:
    """The reflection of the student's run (ddil.reflect_x0's config, its r resolved from the data), from its saved
    config: sampling maps x0_hat as the DDIL rollouts of training did."""
    return None if cfg.reflect == "none" else sub_configs(cfg)["reflect"]


def student_sampler(cfg: SDConfig, student, alpha_bar: torch.Tensor, steps: int) -> tuple:
    """(policy, grid) of the student's method, reflected as in training."""
    reflect, T = trained_reflection(cfg), len(alpha_bar)
    if cfg.method == "lcm":
        policy = ddil.consistency_policy(student, alpha_bar, reflect, sub_configs(cfg)["lcm"])
        return policy, ddil.lcm_grid(steps, cfg.num_ddim_timesteps, T)
    if cfg.method == "pd":
        return ddil.ddim_policy(student, alpha_bar, reflect), ddil.uniform_grid(steps, T)
    return ddil.generator_policy(student, alpha_bar, reflect), ddil.uniform_grid(steps, T)


@torch.no_grad()
def sample_latents(pipe, cfg: SDConfig, prompts: list[str], steps: int, guidance_scale: Optional[float],
                   gen: torch.Generator) -> torch.Tensor:
    """x_0 latents (n, 4, h, w) of one sample per prompt. LCM's default guidance_scale is the middle of its training
    range, w + 1; PD, DMD2 and LCM-LoRA (no w-embedding) ignore it: their student is guided already."""
    cache = adapters.EmbeddingCache.from_prompts(prompts, pipe.tokenizer, pipe.text_encoder)
    student, alpha_bar = adapters.Student(pipe.unet, cache), adapters.alpha_bar_of(dict(pipe.scheduler.config))
    policy, grid = student_sampler(cfg, student, alpha_bar, steps)
    scale = guidance_scale if guidance_scale is not None else (cfg.w_min + cfg.w_max) / 2 + 1
    res, down = cfg.resolution, pipe.vae_scale_factor
    like = torch.empty(0, device=pipe.device, dtype=pipe.unet.dtype)
    x_T = ddil.randn((len(prompts), pipe.unet.config.in_channels, res // down, res // down), gen, like)
    ids, w = torch.arange(len(prompts), device=pipe.device), torch.full((len(prompts),), scale - 1.0, device=pipe.device)
    x0, _ = ddil.sample(policy, x_T, grid, ids, w if cfg.method == "lcm" else None, gen)
    return x0


@torch.no_grad()
def generate(pipe, cfg: SDConfig, prompts: list[str], steps: int, guidance_scale: Optional[float], seed: int) -> list:
    """One image per prompt (PIL): sample_latents with a fixed seed per call, decoded by the VAE."""
    x0 = sample_latents(pipe, cfg, prompts, steps, guidance_scale, torch.Generator().manual_seed(seed))
    images = pipe.vae.decode(x0.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


# ----------------------------------------------------------------------------------------------------
# The grid


def labelled_grid(rows: list[list], prompts: list[str], tile: int):
    """A PIL grid: a column per prompt, a row per image of it, each tile `tile` px (small images enlarged with
    nearest-neighbour, so their pixels stay sharp) with GAP px of white between them, the prompt under each column."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=max(11, tile // 12))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    draw, pitch = ImageDraw.Draw(Image.new("RGB", (1, 1))), tile + GAP
    captions = [wrap(p, font, tile - 4, draw) for p in prompts]
    line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + 2
    top = pitch * len(rows)  # the captions' first line
    grid = Image.new("RGB", (pitch * len(prompts) - GAP, top + 4 + line_h * max(len(c) for c in captions)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((tile, tile), Image.NEAREST if im.width < tile else Image.LANCZOS), (c * pitch, r * pitch))
    pen = ImageDraw.Draw(grid)
    for c, lines in enumerate(captions):
        for k, line in enumerate(lines):
            pen.text((c * pitch + 2, top + k * line_h), line, fill="black", font=font)
    return grid


def wrap(text: str, font, width: int, draw) -> list[str]:
    """Greedy word wrap to `width` pixels; at most 3 lines, the last one cut with an ellipsis."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines if len(lines) <= 3 else lines[:2] + [lines[2] + " …"]


# ----------------------------------------------------------------------------------------------------
# Command line


def check_args(a: argparse.Namespace) -> SDConfig:
    """Every check that needs no model; returns the student's run config."""
    for flag, v in (("--num_images_per_prompt", a.num_images_per_prompt), ("--tile", a.tile or 1)):
        if v < 1:
            raise SampleError(f"{flag} {v}: must be >= 1")
    if a.seed < 0:
        raise SampleError(f"--seed {a.seed}: must be >= 0")
    if a.guidance_scale is not None and a.guidance_scale < 1:
        raise SampleError(f"--guidance_scale {a.guidance_scale}: must be >= 1 (the pipeline convention, "
                          f"guidance w = scale - 1 >= 0)")
    check_device("--device", a.device)
    if Path(a.out).suffix.lower() not in data.IMAGE_EXTS:
        raise SampleError(f"--out {a.out}: not an image file name; end it in one of {', '.join(data.IMAGE_EXTS)}")
    check_output("--out", a.out, folder=False)
    cfg = read_student(a.student)
    check_steps(a.student, cfg, a.steps)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sd.sample", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="output_dir/student or output_dir/checkpoint-STEP/unet")
    p.add_argument("--steps", type=int, default=4, help="sampling steps N, from 1 to the student's grid (LCM: "
                   "num_ddim_timesteps, else 1000)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several); default: 4 of sd/prompts.txt")
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="images per prompt (one row each), >= 1")
    p.add_argument("--guidance_scale", type=float, default=None, help="LCM: pipeline guidance w + 1, >= 1; default the "
                   "middle of the trained range; PD and DMD2 ignore it (their student is guided)")
    p.add_argument("--pretrained_teacher_model", default=None, help="where the VAE and text encoder are, if not "
                   "where the run found them")
    p.add_argument("--seed", type=int, default=0, help="noise seed, >= 0")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--tile", type=int, default=None, help=f"pixels per image in the grid; default the resolution, "
                   f"at least {MIN_TILE} (smaller images are enlarged)")
    p.add_argument("--out", default="grid.png", help="image file (.png, .jpg, ...): a column per prompt with the "
                   "prompt under it, a row per image of each prompt")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)  # --help exits 0; a bad flag exits 2 with one line
    try:
        cfg = check_args(a)
        pipe, cfg = load_pipeline(a.student, a.device, a.pretrained_teacher_model)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = a.prompt or data.read_prompts(str(PACKAGE_PROMPTS))[:4]
    rows = [generate(pipe, cfg, prompts, a.steps, a.guidance_scale, a.seed + r) for r in range(a.num_images_per_prompt)]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, prompts, a.tile or max(cfg.resolution, MIN_TILE)).save(a.out)
    print(f"{a.out}: {len(rows)} x {len(prompts)} images, {cfg.method} student, {a.steps} steps, "
          f"reflection {cfg.reflect}" + (f" (r = {cfg.reflect_range})" if cfg.reflect != "none" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
