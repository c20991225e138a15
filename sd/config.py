"""The configuration of an SD distillation run (a flat dataclass, saved as JSON) and its command line.

Flags are named as in diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py, where one exists.
The help text of each field is its comment; `python -m sd.train --help` prints them all with the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import ddil

METHODS = ("lcm", "pd", "dmd2")
DEFAULT_PROMPTS = "sd/prompts.txt"  # the default --prompts_file: the package's own file, found from any directory
PACKAGE_PROMPTS = Path(__file__).with_name("prompts.txt")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
METHOD_DEFAULTS = {  # filled in by resolve() where a field is None: diffusers' LCM script, DMD2's SD1.5 settings
    "lcm": {"learning_rate": 1e-4, "guidance_scale": None, "max_grad_norm": 1.0},
    "pd": {"learning_rate": 1e-4, "guidance_scale": 7.5, "max_grad_norm": 1.0},
    "dmd2": {"learning_rate": 1e-5, "guidance_scale": 1.75, "max_grad_norm": 10.0},  # Yin et al. 2024, train_sd.py
}
BASE_SETTINGS = """each method's BASE setting (the published method: no DDIL states, no reflection):
  lcm   --betas 1 0 0 --buffer_capacity 0 --reflect none
        forward states q(x_t | x_0) at t uniform on the 50-point skipping grid (diffusers' LCM distillation)
  pd    --betas 1 0 0 --buffer_capacity 0 --reflect none
        forward states on the current round's student grid (Salimans & Ho 2022)
  dmd2  --betas 0 0 1 --beta_mix_start 0 --beta_mix_end 0 --buffer_capacity 0 --reflect none
        backward simulation: the generator's own fresh rollouts (DMD2's multi-step training), NOT 1 0 0;
        DMD2's SD1.5 weights are the defaults: --gan_weight 1e-3 --disc_weight 1e-2 --fake_updates 10
the defaults train DDIL on top: priors 0.5 0.25 0.25, DAgger mixing 1 -> 0, an aggregation buffer, and
dynamic thresholding of x0_hat in latent space"""


DDIL_FLAGS = {  # a ddil config field -> the flag that sets it, so a ddil validation error names the flag
    "beta_frwd": "betas", "beta_teacher": "betas", "beta_student": "betas",
    "beta_frwd + beta_teacher + beta_student": "betas", "mode": "reflect", "range": "reflect_range",
    "ratio": "reflect_ratio", "max_value": "reflect_max", "original_steps": "num_ddim_timesteps", "loss": "loss_type",
    "timestep_scaling": "timestep_scaling_factor", "N_start": "pd_start_steps", "N_final": "num_inference_steps",
}


class InputError(ValueError):
    """Bad input found before any model loads (exit code 2). The message is one line naming the flag."""


def opt(default: Any, help: str, **kw) -> Any:
    """A config field; `help` is its comment and its --help text."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SDConfig:
    # --- model and data
    method: str = opt("lcm", "base method: lcm, pd or dmd2", choices=METHODS)
    pretrained_teacher_model: str = opt("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                        "teacher pipeline: a local diffusers folder or a Hub id (cached, or online)")
    init: str = opt("pretrained", "pretrained: load the teacher's weights; random: the FULL SD1.5 architecture "
                    "with random weights from embedded configs (no download; for memory/speed checks)",
                    choices=("pretrained", "random"))
    output_dir: str = opt("results/sd", "checkpoints, the final student, config.json and train_log.jsonl go here")
    train_data_dir: Optional[str] = opt(None, "image folder with metadata.jsonl (file_name, text): diffusers' imagefolder")
    dataset_name: Optional[str] = opt(None, "🤗 datasets name or path (train split; needs `pip install datasets`)")
    image_column: str = opt("image", "--dataset_name: the image column")
    caption_column: str = opt("text", "the caption column (--dataset_name) or metadata.jsonl key (--train_data_dir)")
    prompts_file: str = opt(DEFAULT_PROMPTS, "prompts-only data (used without --train_data_dir/--dataset_name): "
                            "x_0 are teacher samples made once and cached in output_dir; the default is the "
                            "package's own file, whatever the working directory")
    latents_per_prompt: int = opt(4, "prompts-only data: teacher samples per prompt, >= 1")
    data_num_inference_steps: int = opt(25, "prompts-only data: teacher DDIM steps per sample, >= 1")
    data_guidance_scale: float = opt(7.5, "prompts-only data: teacher guidance scale (pipeline convention), >= 1")
    resolution: int = opt(512, "image size in pixels, a multiple of 8 (the tiny pipeline: 16)")
    # --- optimisation
    train_batch_size: int = opt(16, "GLOBAL batch of training states per step, split evenly over processes")
    max_train_steps: int = opt(1000, "optimiser steps of the student (PD: split evenly over its rounds), >= 1")
    learning_rate: Optional[float] = opt(None, "AdamW learning rate, > 0; default 1e-4 (lcm, pd), 1e-5 (dmd2)")
    lr_scheduler: str = opt("constant", "diffusers' get_scheduler name", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(500, "warm-up steps of the lr scheduler (not used by 'constant'), >= 0")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay, >= 0")
    max_grad_norm: Optional[float] = opt(None, "gradient clipping norm, > 0; default 1.0 (lcm, pd), 10.0 (dmd2)")
    mixed_precision: str = opt("no", "autocast of the trained nets; on CUDA the frozen teacher and text encoder "
                               "run in fp16 (fp16) or bf16 (no, bf16); on CPU everything is fp32",
                               choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute UNet activations in backward: less memory, slower")
    use_lora: bool = opt(False, "train LoRA adapters instead of the full student (LCM: no target net, as LCM-LoRA)")
    lora_rank: int = opt(64, "LoRA rank (and alpha), >= 1")
    seed: int = opt(0, "seeds weights that start random, data order, noise and rollouts")
    device: str = opt("cuda", "cuda (pick GPUs with CUDA_VISIBLE_DEVICES) or cpu (with the tiny pipeline: "
                      "`python -m sd.tiny DIR`)", choices=("cuda", "cpu"))
    checkpointing_steps: int = opt(500, "save output_dir/checkpoint-STEP every this many steps, >= 1")
    checkpoints_total_limit: Optional[int] = opt(None, "keep at most this many checkpoints (oldest removed), >= 1")
    resume_from_checkpoint: Optional[str] = opt(None, "a checkpoint folder, or 'latest' in output_dir (none there "
                                                "yet: a fresh run, said in one line); flags other than "
                                                "--max_train_steps, --checkpointing_steps, ... must match the run's")
    overwrite_output_dir: bool = opt(False, "a fresh run into an output_dir that holds checkpoints: delete them and "
                                     "train_log.jsonl first (without it, such a run stops before any compute)")
    report_to: str = opt("none", "also log to TensorBoard in output_dir/logs", choices=("none", "tensorboard"))
    log_every: int = opt(10, "log losses (averaged), ms/step and the progress bar every this many steps, at each "
                         "checkpoint and at the end: the loop's only host syncs, >= 1")
    # --- student and guidance
    num_inference_steps: int = opt(4, "N student steps at inference, >= 1 (LCM: <= num_ddim_timesteps)")
    guidance_scale: Optional[float] = opt(None, "pd, dmd2: the teacher's fixed guidance (pipeline convention, "
                                          "w = scale - 1), >= 1; default 7.5 (pd), 1.75 (dmd2); lcm samples w")
    # --- DDIL (arXiv:2410.11971): state priors, DAgger mixing, aggregation buffer
    betas: tuple = opt((0.5, 0.25, 0.25), "DDIL priors over forward, teacher and student states, >= 0, sum 1; "
                       "each method's base setting is listed at the end", nargs=3, metavar=("FRWD", "TEACHER", "STUDENT"), type=float)
    beta_mix_start: float = opt(1.0, "DAgger: P(teacher takes a step of a student rollout) at step 0, in [0, 1]")
    beta_mix_end: float = opt(0.0, "DAgger: that probability after the anneal, in [0, 1]")
    beta_mix_steps: Optional[int] = opt(None, "steps of the linear beta_mix anneal, >= 0; default half of max_train_steps")
    teacher_substeps: int = opt(8, "K: teacher DDIM substeps per student interval in rollouts, >= 1")
    buffer_capacity: int = opt(64, "aggregation buffer size in states (0: fresh rollouts every step), >= 0; a few "
                               "batches, so trained-on rollout states are ~capacity / (2 x rollouts per step) steps old")
    buffer_policy: str = opt("fifo", "buffer eviction", choices=("fifo", "reservoir"))
    refresh_share: float = opt(0.25, "rollouts made per step as a share of the batch's rollout states, in (0, 1]")
    refresh_every: int = opt(1, "steps between buffer refreshes, >= 1")
    # --- reflected sampler, in latent space
    reflect: str = opt("dynamic", "map of x0_hat into the latent domain [-r, r]: none, clip, dynamic (Imagen's "
                       "percentile thresholding in units of r) or reflect (mirror fold)",
                       choices=("none", "clip", "dynamic", "reflect"))
    reflect_ratio: float = opt(0.995, "dynamic: percentile of |x0_hat|, in (0, 1]")
    reflect_max: float = opt(2.0, "dynamic: largest threshold s in units of r (1 = clip), >= 1")
    reflect_range: float = opt(0.0, "latent domain [-r, r]; 0 = 1.05 max|x_0| of the data, >= 0")
    # --- LCM (diffusers' defaults)
    w_min: float = opt(5.0, "lcm: smallest training guidance w (a pipeline's guidance_scale is w + 1), >= 0")
    w_max: float = opt(15.0, "lcm: largest training guidance w, >= w_min")
    ema_decay: float = opt(0.95, "lcm: EMA decay of the target network, in [0, 1)")
    loss_type: str = opt("l2", "lcm: consistency distance", choices=("l2", "huber"))
    huber_c: float = opt(0.001, "lcm: pseudo-Huber c, > 0")
    num_ddim_timesteps: int = opt(50, "lcm: DDIM solver grid; the teacher skips 1000/this timesteps, in [1, 1000]")
    timestep_scaling_factor: float = opt(10.0, "lcm: c_skip/c_out time scaling, > 0")
    unet_time_cond_proj_dim: int = opt(256, "lcm: size of the student's w-embedding (time_cond_proj_dim), >= 1")
    # --- PD
    pd_start_steps: int = opt(8, "pd: student steps of the first round; rounds halve down to num_inference_steps")
    prediction_type: str = opt("epsilon", "pd: what the student UNet predicts: epsilon (as the teacher) or v_prediction "
                               "(Salimans & Ho 2022: eps errors grow by sigma/alpha = 14.6 at t = 999 when turned "
                               "into x0_hat; v does not). The saved scheduler says which. A v student starts from "
                               "the teacher's eps weights, so its first round also converts the output",
                               choices=("epsilon", "v_prediction"))
    # --- DMD2
    fake_updates: int = opt(10, "dmd2: fake-score updates per generator update (two time-scale rule; DMD2 SD1.5: "
                            "10), each on a fresh batch of states and real data, >= 1")
    gan_weight: float = opt(1e-3, "dmd2: weight of the generator's GAN term (head on the fake score's mid-block, "
                            "at its own t ~ U[0, T)), >= 0; 0 = no GAN head (DMD2 SD1.5: 1e-3)")
    disc_weight: float = opt(1e-2, "dmd2: weight of the discriminator loss in the fake-score update, >= 0 "
                             "(DMD2 SD1.5: 1e-2)")

    def validate(self) -> "SDConfig":
        try:
            self._validate_flags()
        except ddil.ConfigError as e:  # a field here is a flag: name it as typed
            raise ddil.ConfigError(f"--{e}") from None
        for sub in sub_configs(self).values():
            try:
                sub.validate()
            except ddil.ConfigError as e:  # ddil names its own field: add the flag
                name = str(e).split("=")[0]
                raise ddil.ConfigError(f"--{DDIL_FLAGS.get(name, name)}: {e}") from None
        return self

    def _validate_flags(self) -> None:
        pos, nonneg = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
        ddil.validate_fields(self, {
            "method": (lambda v: v in METHODS, "'lcm', 'pd' or 'dmd2'"),
            "resolution": (lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
            "train_batch_size": pos, "max_train_steps": pos, "checkpointing_steps": pos, "lora_rank": pos,
            "latents_per_prompt": pos, "data_num_inference_steps": pos, "num_inference_steps": pos,
            "unet_time_cond_proj_dim": pos, "log_every": pos, "lr_warmup_steps": nonneg, "adam_weight_decay": nonneg,
            "learning_rate": (lambda v: v > 0, "> 0"), "max_grad_norm": (lambda v: v > 0, "> 0"),
            "data_guidance_scale": (lambda v: v >= 1, ">= 1"),
            "guidance_scale": (lambda v: v is None or v >= 1, ">= 1"),
            "checkpoints_total_limit": (lambda v: v is None or v >= 1, "None or >= 1"),
            "device": (lambda v: v in ("cuda", "cpu"), "'cuda' or 'cpu'"),
            "reflect_range": nonneg, "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
            "train_data_dir": (lambda v: v is None or self.dataset_name is None, "only one of it and --dataset_name"),
            "prediction_type": (lambda v: v == "epsilon" or (v == "v_prediction" and self.method == "pd"),
                                "'epsilon', or 'v_prediction' with --method pd"),
        })
        if self.method == "lcm":
            ddil.require(self.num_inference_steps <= self.num_ddim_timesteps, "num_inference_steps",
                         self.num_inference_steps, f"<= --num_ddim_timesteps ({self.num_ddim_timesteps})")


def sub_configs(cfg: SDConfig) -> dict:
    """The ddil configs this run hands to ddil.py, built from the flat flags by keyword."""
    frwd, teacher, student = cfg.betas
    out = {
        "ddil": ddil.DDILConfig(beta_frwd=frwd, beta_teacher=teacher, beta_student=student,
                                beta_mix_start=cfg.beta_mix_start, beta_mix_end=cfg.beta_mix_end,
                                beta_mix_steps=cfg.beta_mix_steps, teacher_substeps=cfg.teacher_substeps,
                                buffer_capacity=cfg.buffer_capacity, buffer_policy=cfg.buffer_policy,
                                refresh_share=cfg.refresh_share, refresh_every=cfg.refresh_every),
        "reflect": ddil.ReflectConfig(mode=cfg.reflect, range=cfg.reflect_range or 1.0, ratio=cfg.reflect_ratio,
                                      max_value=cfg.reflect_max),
        "lcm": ddil.LCMConfig(original_steps=cfg.num_ddim_timesteps, timestep_scaling=cfg.timestep_scaling_factor,
                              loss=cfg.loss_type, huber_c=cfg.huber_c, ema_decay=cfg.ema_decay, w_min=cfg.w_min,
                              w_max=cfg.w_max),
        "dmd2": ddil.DMD2Config(fake_updates=cfg.fake_updates, gan_weight=cfg.gan_weight, disc_weight=cfg.disc_weight),
    }
    if cfg.method == "pd":
        out["pd"] = ddil.PDConfig(N_start=cfg.pd_start_steps, N_final=cfg.num_inference_steps)
    return out


def resolve(cfg: SDConfig) -> SDConfig:
    """Fill the method's defaults (fields left None) and validate."""
    fill = {k: v for k, v in METHOD_DEFAULTS.get(cfg.method, {}).items() if getattr(cfg, k) is None}
    if cfg.beta_mix_steps is None:  # DAgger's anneal spans half the run, whatever its length
        fill["beta_mix_steps"] = cfg.max_train_steps // 2
    return dataclasses.replace(cfg, **fill).validate()


# ----------------------------------------------------------------------------------------------------
# Command line


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every flag's help; the description and epilog keep their line breaks."""


def progress(**kw):
    """A tqdm bar on a terminal; where stderr is not one (a log file, CI) one plain line at most every 30 s."""
    from tqdm import tqdm
    return tqdm(**kw) if sys.stderr.isatty() else tqdm(**{**kw, "mininterval": 30, "ascii": True, "leave": True})


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)  # -1e-4 is a value, not a flag

    def error(self, message: str):
        """One line and exit code 2, instead of argparse's usage dump."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sd.train", formatter_class=Formatter, epilog=BASE_SETTINGS,
               description="Distil Stable Diffusion into a few-step student with ddil.py: LCM, PD or DMD2, each with\n"
                           "DDIL states and a reflected sampler. Every flag shows its range and default.")
    for f in fields(SDConfig):
        meta, default = dict(f.metadata), f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = meta.pop("help")
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", action="store_true", help=help_)
            continue
        kind = meta.pop("type", None) or {"int": int, "float": float, "Optional[int]": int,
                                          "Optional[float]": float}.get(str(f.type), str)
        p.add_argument(f"--{f.name}", type=kind, default=default, help=help_, **meta)
    return p


def parse_args(argv=None) -> SDConfig:
    a = vars(build_parser().parse_args(argv))
    a["betas"] = tuple(a["betas"])
    return resolve(SDConfig(**a))


def to_json(cfg: SDConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_json(d: dict) -> SDConfig:
    """A saved config; unknown keys are rejected."""
    unknown = sorted(set(d) - {f.name for f in fields(SDConfig)})
    if unknown:
        raise ddil.ConfigError(f"unknown config keys {unknown}")
    return SDConfig(**{**d, "betas": tuple(d["betas"])})


def write_json(obj: dict, path: Path) -> None:
    """JSON via a temporary file and rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Checks of what the user typed that need the file system or the machine (before any compute)


def check_output(flag: str, path: str, folder: bool) -> None:
    """An output path is usable: a folder (folder=True) or a file that may be created or replaced. Its nearest
    existing ancestor must be a writable folder. Nothing is created here."""
    p = Path(path).expanduser().absolute()
    if p.exists() and p.is_dir() != folder:
        raise InputError(f"{flag} {path}: exists and is {'a file, not a folder' if folder else 'a folder, not a file'}")
    parent = p if p.exists() and folder else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {parent} is not writable")


def check_device(flag: str, name: str) -> str:
    """A torch device this machine has: cpu, cuda or cuda:N."""
    import torch
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {name}: not a device sd/ runs on; use cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{flag} {name}: no CUDA device found; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA devices")
    return name
