"""Sample a distilled student into a PNG grid, with stock diffusers pipelines where they exist.

    python -m sd.sample --student results/sd-lcm/student --steps 4 --prompt "a red fox in snow" --out grid.png

LCM: StableDiffusionPipeline + the student's LCMScheduler (guidance_scale = w + 1 enters as the w-embedding).
PD: StableDiffusionPipeline + DDIMScheduler on the trailing grid, no CFG (the student is already guided).
DMD2: ddil.generator_policy on ddil.uniform_grid(steps) = [999, 749, 499, 249] at 4 steps, then the VAE.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

import ddil
from sd import adapters, tiny
from sd.config import SDConfig, from_json, sub_configs


class SampleError(ValueError):
    """Bad input to sd.sample / sd.eval (exit code 2)."""


def read_student(folder: str) -> SDConfig:
    """The run config saved beside a student (output_dir/student or checkpoint-STEP/unet)."""
    path = Path(folder) / "ddil_config.json"
    if not path.is_file():
        raise SampleError(f"--student {folder}: not a student folder (no ddil_config.json); "
                          f"use output_dir/student or output_dir/checkpoint-STEP/unet")
    return from_json(json.loads(path.read_text()))


def load_pipeline(folder: str, device: str, teacher: Optional[str] = None):
    """A StableDiffusionPipeline: the teacher's VAE, text encoder and tokenizer, the student's UNet and scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    cfg = read_student(folder)
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(folder).to(dtype)
    scheduler = {"lcm": LCMScheduler, "pd": DDIMScheduler, "dmd2": DDPMScheduler}[cfg.method].from_pretrained(
        folder, subfolder="scheduler")
    if cfg.init == "random":  # the same seeded random SD1.5 the run trained against
        pipe = tiny.build_pipeline(tiny.SD15_UNET, tiny.SD15_VAE, tiny.SD15_TEXT, cfg.seed)
        pipe.unet, pipe.scheduler = unet, scheduler
    else:
        pipe = StableDiffusionPipeline.from_pretrained(teacher or cfg.pretrained_teacher_model, unet=unet,
                                                       scheduler=scheduler, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), cfg


@torch.no_grad()
def generate(pipe, cfg: SDConfig, prompts: list[str], steps: int, guidance_scale: Optional[float], seed: int) -> list:
    """One image per prompt (PIL), the student's sampler with `steps` steps; a fixed seed per call.
    LCM's default guidance_scale is the middle of its training range, w + 1; PD and DMD2 students are guided already."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.method == "dmd2":
        return generate_dmd2(pipe, cfg, prompts, steps, gen)
    if cfg.method == "pd" or guidance_scale is None:
        guidance_scale = (cfg.w_min + cfg.w_max) / 2 + 1 if cfg.method == "lcm" else 1.0
    if pipe.unet.config.time_cond_proj_dim is None:  # no w-embedding (LCM-LoRA): guidance is baked in; don't guide twice
        guidance_scale = 1.0
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=cfg.resolution,
                width=cfg.resolution, generator=gen).images


def generate_dmd2(pipe, cfg: SDConfig, prompts: list[str], steps: int, gen: torch.Generator) -> list:
    """DMD2's multi-step generator (ddil.generator_policy, reflected as in training), decoded by the VAE."""
    cache = adapters.EmbeddingCache.from_prompts(prompts, pipe.tokenizer, pipe.text_encoder)
    student = adapters.Student(pipe.unet, cache)
    alpha_bar = adapters.alpha_bar_of(dict(pipe.scheduler.config))
    reflect = None if cfg.reflect == "none" else sub_configs(cfg)["reflect"]
    res, down = cfg.resolution, pipe.vae_scale_factor
    like = torch.empty(0, device=pipe.device, dtype=pipe.unet.dtype)
    x_T = ddil.randn((len(prompts), pipe.unet.config.in_channels, res // down, res // down), gen, like)
    ids = torch.arange(len(prompts), device=pipe.device)
    x0, _ = ddil.sample(ddil.generator_policy(student, alpha_bar, reflect), x_T, ddil.uniform_grid(steps), ids, None, gen)
    images = pipe.vae.decode(x0.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="output_dir/student or output_dir/checkpoint-STEP/unet")
    p.add_argument("--steps", type=int, default=4, help="sampling steps N, >= 1")
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several); default: 4 of sd/prompts.txt")
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="images per prompt (one row each), >= 1")
    p.add_argument("--guidance_scale", type=float, default=None, help="LCM: pipeline guidance w + 1; default the middle "
                   "of the trained range; PD and DMD2 ignore it (their student is guided)")
    p.add_argument("--pretrained_teacher_model", default=None, help="where the VAE and text encoder are, if not "
                   "where the run found them")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", default="grid.png", help="PNG grid: a row per image of each prompt, a column per prompt")
    a = p.parse_args(argv)
    try:
        if a.steps < 1 or a.num_images_per_prompt < 1:
            raise SampleError("--steps and --num_images_per_prompt must be >= 1")
        pipe, cfg = load_pipeline(a.student, a.device, a.pretrained_teacher_model)
    except (SampleError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from diffusers.utils import make_image_grid
    prompts = a.prompt or [ln for ln in Path(__file__).with_name("prompts.txt").read_text().splitlines()
                           if ln.strip() and not ln.startswith("#")][:4]
    rows = [generate(pipe, cfg, prompts, a.steps, a.guidance_scale, a.seed + r) for r in range(a.num_images_per_prompt)]
    make_image_grid([im for row in rows for im in row], rows=len(rows), cols=len(prompts)).save(a.out)
    print(f"{a.out}: {len(rows)} x {len(prompts)} images, {cfg.method} student, {a.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
