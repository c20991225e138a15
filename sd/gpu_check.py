"""make sd-gpu-check: every sd.train method on the full SD1.5 architecture, then a few-step sample, with the numbers.

    python -m sd.gpu_check                                  # GPU: random-init SD1.5, 512 px, bf16 (make sd-gpu-check)
    python -m sd.gpu_check --device cpu --tiny --steps 2    # the same code at tiny scale on CPU (make test runs it)

For each of lcm, pd and dmd2, without and with gradient checkpointing: sd.train's own set-up and training step
(train.setup, train.BUILD) for --steps steps with sd.train's defaults, timed; then the student samples --sample_steps
steps through sd.sample (a stock StableDiffusionPipeline with the student's saved scheduler for lcm and pd; ddil's
generator policy for dmd2). Writes OUT (results/sd/gpu-check.json): device, per run ms/step (median after the first
step), peak GiB, UNet evaluations per training state by role, and the sample's size and spread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import ddil
from sd import adapters, bench, config, data, sample, train

METHODS = ("lcm", "pd", "dmd2")
CHECKPOINTING = {"both": (False, True), "off": (False,), "on": (True,)}


@dataclass
class CheckConfig:
    device: str = "cuda"  # cuda or cpu
    tiny: bool = False  # the tiny pipeline instead of the SD1.5 architecture
    steps: int = 20  # training steps per run
    batch_size: int = 16  # training states per step
    resolution: int = 0  # image size; 0 = 512 (SD1.5) or 16 (--tiny)
    methods: tuple = METHODS  # which methods to run
    checkpointing: str = "both"  # gradient checkpointing: off, on or both
    sample_steps: int = 4  # student steps of the final sample
    out: str = "results/sd/gpu-check.json"  # the JSON written
    seed: int = 0  # weights, data and noise
    sd_args: tuple = ()  # further sd.train flags for every run (e.g. --fake_updates 2)


def stock_pipeline(parts: train.Parts, unet, cfg: config.SDConfig):
    """A StableDiffusionPipeline from the run's parts in memory, the student's UNet and its saved sampler scheduler."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=adapters.plain_unet(unet), scheduler=train.sampler_scheduler(cfg, parts.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=torch.bfloat16 if cfg.device == "cuda" else torch.float32)  # the run is over: cast in place


def check_one(method: str, checkpointing: bool, g: CheckConfig, model: str, init: str, tmp: Path) -> dict:
    """One method: set-up, g.steps timed training steps, a sample. Returns its row of the JSON."""
    cfg = bench.sd_config(run_flags(g, method, checkpointing, model, init, tmp / f"{method}-{int(checkpointing)}"), g.sd_args)
    device = torch.device(g.device)
    bench.reset_peak(device)
    t0 = time.perf_counter()
    Path(cfg.output_dir).mkdir(parents=True)  # the teacher-data cache
    ctx, nets, parts = train.setup(cfg, train.preflight(cfg))
    run = train.BUILD[method](ctx, nets)
    setup_s, counter = time.perf_counter() - t0, bench.UNetCounter()
    for role, unet in (("teacher", parts.unet), *nets.items()):
        counter.watch(role, unet)
    times, logs = [], {}
    for i in range(cfg.max_train_steps):
        ms, logs = bench.timed(run.step, i, device)
        times.append(ms)
        for role, unet in run.nets.items():  # PD's round teacher appears with round 2
            counter.watch(role, unet)
    ddil.check_finite(logs, cfg.max_train_steps - 1, method)
    row = {"method": method, "gradient_checkpointing": checkpointing, "setup_s": setup_s, "first_step_ms": times[0],
           "ms_per_step": statistics.median(times[1:] or times), "peak_gib": bench.peak_gib(device),
           "unet_evals_per_state": {k: v / (cfg.max_train_steps * g.batch_size) for k, v in sorted(counter.evals.items())},
           "unet_evals_per_step": sum(counter.evals.values()) / cfg.max_train_steps,
           "last_losses": {k: float(v) for k, v in logs.items() if k.startswith("loss")},
           "rollout_age": float(logs.get("rollout_age", float("nan")))}
    counter.close()
    row["sample"] = sample_row(parts, run, cfg, g)
    bench.free(ctx.acc)
    return row


def run_flags(g: CheckConfig, method: str, checkpointing: bool, model: str, init: str, out: Path) -> dict:
    """sd.train's flags of one run: its defaults but for the model, device, batch, steps and a small teacher-data set."""
    return dict(method=method, pretrained_teacher_model=model, init=init, output_dir=out, device=g.device,
                resolution=g.resolution, train_batch_size=g.batch_size, max_train_steps=g.steps, seed=g.seed,
                mixed_precision="bf16" if g.device == "cuda" else "no", gradient_checkpointing=checkpointing,
                prompts_file=bench.PROMPTS, latents_per_prompt=1, data_num_inference_steps=2)


def sample_row(parts: train.Parts, run: train.Run, cfg: config.SDConfig, g: CheckConfig) -> dict:
    """The student's g.sample_steps-step sample of two prompts through sd.sample: its time, size and pixel spread."""
    pipe = stock_pipeline(parts, run.student.unet, cfg)
    t0 = time.perf_counter()
    images = sample.generate(pipe, cfg, data.read_prompts(str(bench.PROMPTS))[:2], g.sample_steps, None, g.seed)
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return {"steps": g.sample_steps, "ms": 1e3 * (time.perf_counter() - t0), "size": list(pixels.shape),
            "pixel_std": float(pixels.std()), "ok": bool(pixels.std() > 0)}


def run_all(g: CheckConfig, tmp: Path) -> dict:
    model, init = bench.teacher_model(g.tiny, tmp)
    rows = []
    for method in g.methods:
        for checkpointing in CHECKPOINTING[g.checkpointing]:
            rows.append(check_one(method, checkpointing, g, model, init, tmp))
    device = torch.device(g.device)
    return {"device": bench.device_name(device), "torch": torch.__version__, "diffusers": bench._version("diffusers"),
            "check": {k: getattr(g, k) for k in g.__dataclass_fields__}, "runs": rows}


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> CheckConfig:
    d = CheckConfig()
    p = argparse.ArgumentParser(prog="python -m sd.gpu_check", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__, epilog="Any other flag is an sd.train flag for every run, "
                                                            "e.g. --fake_updates 2 --teacher_substeps 4.")
    bench.add_machine_args(p, d)
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run, >= 1 (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS, help="methods to run")
    p.add_argument("--checkpointing", default=d.checkpointing, choices=tuple(CHECKPOINTING),
                   help="gradient checkpointing off, on, or a run with each (default %(default)s)")
    p.add_argument("--sample_steps", type=int, default=d.sample_steps, help="student steps of the sample, >= 1 (default %(default)s)")
    p.add_argument("--out", default=d.out, help="the JSON to write (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data and noise (default %(default)s)")
    a, sd_args = p.parse_known_args(argv)
    g = CheckConfig(**{**vars(a), "methods": tuple(dict.fromkeys(a.methods)), "sd_args": tuple(sd_args)})
    g.resolution = g.resolution or (16 if g.tiny else 512)
    bench.check_flags(g, (("--steps", g.steps >= 1, ">= 1"), ("--batch_size", g.batch_size >= 1, ">= 1"),
                          ("--sample_steps", g.sample_steps >= 1, ">= 1"),
                          ("--resolution", g.resolution % 8 == 0 and g.resolution >= 8, "a positive multiple of 8")))
    for method in g.methods:  # sd.train's checks, before any compute
        bench.sd_config(run_flags(g, method, False, "model", "pretrained", Path("out")), g.sd_args)
    return g


def main(argv=None) -> int:
    g = bench.parsed(parse_args, argv)
    if isinstance(g, int):
        return g
    with tempfile.TemporaryDirectory(prefix="sd-gpu-check-") as tmp:
        rec = run_all(g, Path(tmp))
    for r in rec["runs"]:
        print(f"{r['method']:<5} checkpointing={str(r['gradient_checkpointing']):<5} {r['ms_per_step']:8.1f} ms/step  "
              f"peak {'-' if r['peak_gib'] is None else format(r['peak_gib'], '.1f')} GiB  "
              f"UNet evals/state {r['unet_evals_per_state']}  sample ok={r['sample']['ok']}")
    return bench.write_record(rec, Path(g.out))


if __name__ == "__main__":
    sys.exit(main())
