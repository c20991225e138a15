"""Time ddil's SD training step against a reference-style LCM step, side by side in one process.

    python -m sd.bench                          # GPU: the SD1.5 UNet architecture, random weights, B = 16 at 512 px
    python -m sd.bench --compile                # the same with regional compilation; compile time reported apart
    python -m sd.bench --device cpu --tiny      # CPU smoke run on the tiny pipeline (seconds)

Three steps, run one after the other on the same teacher, student and EMA-target UNets and the same data:
  reference  the LCM step as diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py writes it:
             teacher cond and uncond as two bf16 calls, the fp32 student under bf16 autocast, the EMA target, a
             per-parameter EMA loop, the loss read on the host every step (prompt embeddings and latents precomputed,
             as for the other two)
  lcm        ddil's LCM step exactly as sd.train runs it (train.build_lcm), with the base states (--betas 1 0 0)
  lcm_ddil   the same with sd.train's DDIL defaults (priors, aggregation buffer, reflection), timed from the training
             step where DAgger's beta_mix equals its mean over a default run, so the rollouts' cost is amortised as
             in training
For each: median and mean ms/step over --steps steps after --warmup, peak GiB (CUDA), UNet evaluations per training
state by role, model FLOP/s from the UNet's FLOPs per sample (torch.utils.flop_counter) and MFU where the device's bf16
peak is known; then the ratios. Prints a table; writes OUT/bench-<device>[-tiny][-compile].json.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import ddil
from sd import config, tiny, train

PROMPTS = Path(__file__).with_name("prompts.txt")
VARIANTS = ("reference", "lcm", "lcm_ddil")
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))  # dense, spec sheets
TARGETS = {"lcm_ddil_speedup_min": 2.0, "compile_s_max": 60.0, "ddil_overhead_max": 0.10, "peak_gib_max": 28.0}  # issue 7
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")  # compiled once per block class, not per UNet


@dataclass
class BenchConfig:
    device: str = "cuda"  # cuda or cpu
    tiny: bool = False  # the tiny pipeline (sd.tiny) instead of the SD1.5 architecture
    batch_size: int = 16  # training states per step
    resolution: int = 0  # image size in pixels; 0 = 512 (SD1.5) or 16 (--tiny)
    steps: int = 20  # timed steps per variant (after warm-up)
    warmup: int = 3  # untimed steps per variant first (compilation happens here)
    compile: bool = False  # regional compilation of every UNet's repeated blocks
    compile_backend: str = "inductor"  # torch.compile backend ('eager' checks the code path without compiling)
    gradient_checkpointing: bool = False  # for the student in every variant
    peak_tflops: float = 0.0  # the device's bf16 dense peak for MFU; 0 = from the device name where known
    variants: tuple = VARIANTS  # which steps to time
    out: str = "results/sd"  # folder of the JSON
    seed: int = 0  # weights, data and noise
    sd_args: tuple = ()  # further sd.train flags for the ddil steps (e.g. --teacher_substeps 4)


# ----------------------------------------------------------------------------------------------------
# Measuring: devices, timing, UNet evaluations and FLOPs (shared with sd.gpu_check)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_flops(name: str, override_tflops: float = 0.0) -> Optional[float]:
    """The device's dense bf16 peak FLOP/s, for MFU: given, or from the device name, else None."""
    if override_tflops > 0:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":  # what the last run left goes first, so its memory is not counted
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(step: Callable[[int], Any], i: int, device: torch.device) -> tuple[float, Any]:
    """(wall ms of step(i), its logs), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    logs = step(i)
    sync(device)
    return 1e3 * (time.perf_counter() - t0), logs


class UNetCounter:
    """UNet sample-evaluations by role, counted by forward pre-hooks on the watched UNets. For FLOPs a sample counts
    3 forward-equivalents when it runs with gradients into trainable weights (forward + backward), 2 when the gradient
    flows only to its input (DMD2's frozen fake score under the GAN term), else 1."""

    def __init__(self):
        self.evals, self.fwd_equiv, self.handles, self.ids = Counter(), 0.0, [], set()

    def watch(self, role: str, unet: torch.nn.Module) -> None:
        if id(unet) not in self.ids:
            self.ids.add(id(unet))
            self.handles.append(unet.register_forward_pre_hook(functools.partial(self._count, role)))

    def _count(self, role: str, unet, args) -> None:
        x = args[0]  # (B, 4, h, w): ddil's adapters and the pipelines pass the sample first
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in unet.parameters())
        self.evals[role] += x.shape[0]
        self.fwd_equiv += x.shape[0] * (3 if trainable else 2 if torch.is_grad_enabled() and x.requires_grad else 1)

    def reset(self) -> None:
        self.evals, self.fwd_equiv = Counter(), 0.0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def unet_flops_per_sample(unet, context: torch.Tensor, latent_shape: tuple) -> float:
    """FLOPs of one UNet forward per sample (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros((2, *latent_shape), device=unet.device, dtype=unet.dtype)
    t = torch.full((2,), 500, device=unet.device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=context.expand(2, -1, -1).to(unet.device, unet.dtype))
    return counter.get_total_flops() / 2


def compile_blocks(unet, backend: str) -> int:
    """Regional compilation: torch.compile every repeated block (transformer and ResNet blocks) in place, so each
    block class compiles a few times (per shape) instead of the whole UNet graph. Returns the blocks compiled."""
    blocks = [m for m in unet.modules() if type(m).__name__ in REPEATED_BLOCKS]
    for m in blocks:
        m.compile(backend=backend)
    return len(blocks)


def allow_recompiles(limit: int = 64) -> None:
    """Each block class sees several shapes (widths, resolutions, batch sizes): let dynamo keep them all."""
    import torch._dynamo.config as dynamo_config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def sd_config(flags: dict, extra: tuple = ()) -> config.SDConfig:
    """sd.train's resolved config from {flag: value} (True: a switch) then `extra` command-line flags, parsed as
    sd.train parses its command line (a bad flag: one line and SystemExit(2); a bad value: ddil.ConfigError)."""
    argv = []
    for key, v in flags.items():
        argv += [f"--{key}"] if v is True else [] if v is False else [f"--{key}", str(v)]
    return config.parse_args(argv + list(extra))


def teacher_model(tiny_pipeline: bool, tmp: Path) -> tuple[str, str]:
    """(pretrained_teacher_model, init): the tiny pipeline saved to tmp, or the SD1.5 architecture at random."""
    if tiny_pipeline:
        return str(tiny.save_tiny(tmp / "tiny")), "pretrained"
    return "random-sd15", "random"


def free(acc) -> None:
    """Drop what accelerate holds of the last run (models, optimizers); on CUDA, collect them and the cached blocks
    (accelerate collects before it lets go of them)."""
    acc.free_memory()
    if acc.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# The reference-style step (diffusers' LCM distillation script) and ddil's


def reference_step(ctx: train.Ctx, teacher, student, target) -> Callable[[int], dict]:
    """The LCM distillation step as diffusers' train_lcm_distill_sd_wds.py writes it (LCM Algorithm 1), on UNets."""
    cfg, lcm, device = ctx.cfg, ctx.subs["lcm"], ctx.acc.device
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    solver = torch.tensor(ddil.lcm_origin_timesteps(lcm.original_steps), device=device)  # DDIMSolver's timesteps
    skip, ab = len(ctx.alpha_bar) // lcm.original_steps, ctx.alpha_bar.to(device).float()
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")  # noqa: E731
    a_s = lambda t: (ab[t].sqrt()[:, None, None, None], (1 - ab[t]).sqrt()[:, None, None, None])  # noqa: E731

    def x0_of(eps, x, t):
        alpha, sigma = a_s(t)
        return (x - sigma * eps) / alpha

    def scalings(t):
        return [v.float()[:, None, None, None] for v in ddil.lcm_scalings(t, lcm.timestep_scaling, lcm.sigma_data)]

    def step(i: int) -> dict:
        x0, ids = ctx.draw_data(ctx.B, ctx.gen)
        embeds, uncond = ctx.cache(ids), ctx.cache.uncond(len(ids))
        start = solver[torch.randint(0, len(solver), (ctx.B,), device=device)]
        prev = (start - skip).clamp(min=0)
        noise = torch.randn_like(x0)
        alpha, sigma = a_s(start)
        x_t = alpha * x0 + sigma * noise
        w = lcm.w_min + (lcm.w_max - lcm.w_min) * torch.rand(ctx.B, device=device)
        w_emb = ddil.guidance_scale_embedding(w, student.config.time_cond_proj_dim).to(x0)
        (c_skip_start, c_out_start), (c_skip, c_out) = scalings(start), scalings(prev)
        with amp():  # 1. the online student
            eps = student(x_t, start, timestep_cond=w_emb, encoder_hidden_states=embeds.float()).sample
        model_pred = c_skip_start * x_t + c_out_start * x0_of(eps.float(), x_t, start)
        with torch.no_grad(), amp():  # 2. the teacher, cond and uncond as two calls, CFG, one DDIM step
            dt = teacher.dtype
            eps_c = teacher(x_t.to(dt), start, encoder_hidden_states=embeds.to(dt)).sample.float()
            eps_u = teacher(x_t.to(dt), start, encoder_hidden_states=uncond.to(dt)).sample.float()
            x0_c, x0_u = x0_of(eps_c, x_t, start), x0_of(eps_u, x_t, start)
            wb = w[:, None, None, None]
            alpha_p, sigma_p = a_s(prev)
            x_prev = alpha_p * (x0_c + wb * (x0_c - x0_u)) + sigma_p * (eps_c + wb * (eps_c - eps_u))
        with torch.no_grad(), amp():  # 3. the EMA target
            eps_tg = target(x_prev.float(), prev, timestep_cond=w_emb, encoder_hidden_states=embeds.float()).sample
        target_f = c_skip * x_prev + c_out * x0_of(eps_tg.float(), x_prev, prev)
        if lcm.loss == "l2":
            loss = F.mse_loss(model_pred.float(), target_f.float())
        else:
            loss = (torch.sqrt((model_pred.float() - target_f.float()) ** 2 + lcm.huber_c**2) - lcm.huber_c).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # diffusers' update_ema: one mul_ and add_ per parameter tensor
            for p_t, p in zip(target.parameters(), student.parameters()):
                p_t.detach().mul_(lcm.ema_decay).add_(p, alpha=1 - lcm.ema_decay)
        return {"loss": loss.detach().item()}
    return step


def mean_mix_step(cfg: config.SDConfig) -> int:
    """The first training step whose DAgger beta_mix is at most its mean over the whole run: rollouts there cost
    what they cost on average (teacher steps are the dear ones)."""
    ddil_cfg = config.sub_configs(cfg)["ddil"]
    mixes = [ddil.beta_mix_at(s, ddil_cfg) for s in range(cfg.max_train_steps)]
    mean = sum(mixes) / len(mixes)
    return next(s for s, m in enumerate(mixes) if m <= mean + 1e-12)


def with_priors(ctx: train.Ctx, **flags) -> train.Ctx:
    """The context with some sd.train flags changed (its ddil configs rebuilt)."""
    cfg = dataclasses.replace(ctx.cfg, **flags)
    return dataclasses.replace(ctx, cfg=cfg, subs=config.sub_configs(cfg))


# ----------------------------------------------------------------------------------------------------
# One variant, the table, the file


def measure(step: Callable[[int], Any], start: int, b: BenchConfig, device: torch.device, counter: UNetCounter,
            fwd_flops: float, peak: Optional[float]) -> dict:
    """Warm-up, then b.steps timed steps from training step `start`: times, memory, UNet evaluations, FLOP/s."""
    reset_peak(device)
    warm = [timed(step, start + i, device)[0] for i in range(b.warmup)]
    counter.reset()
    times = [timed(step, start + b.warmup + i, device)[0] for i in range(b.steps)]
    median = statistics.median(times)
    flops = fwd_flops * counter.fwd_equiv / b.steps  # model FLOPs per training step
    return {"median_ms": median, "mean_ms": statistics.fmean(times), "min_ms": min(times), "max_ms": max(times),
            "warmup_ms": warm, "compile_s": max(0.0, (sum(warm) - b.warmup * median) / 1e3) if b.compile else None,
            "peak_gib": peak_gib(device),
            "unet_evals_per_state": {k: v / (b.steps * b.batch_size) for k, v in sorted(counter.evals.items())},
            "model_tflop_per_step": flops / 1e12, "model_tflop_per_s": flops / median * 1e3 / 1e12,
            "mfu": flops / median * 1e3 / peak if peak else None}


def ratios(res: dict) -> dict:
    """ddil over the reference, and DDIL's overhead over ddil's own LCM step (median, mean, model FLOPs)."""
    out = {}
    for stat in ("median_ms", "mean_ms"):
        if "reference" in res:
            out[f"speedup_vs_reference_{stat[:-3]}"] = {k: res["reference"][stat] / v[stat] for k, v in res.items()
                                                        if k != "reference"}
        if "lcm" in res and "lcm_ddil" in res:
            out[f"ddil_overhead_{stat[:-3]}"] = res["lcm_ddil"][stat] / res["lcm"][stat] - 1
    if "lcm" in res and "lcm_ddil" in res:  # the same in model FLOPs: what no kernel can remove
        out["ddil_overhead_flops"] = res["lcm_ddil"]["model_tflop_per_step"] / res["lcm"]["model_tflop_per_step"] - 1
    return out


def check_targets(res: dict, rat: dict) -> dict:
    """Issue 7's targets at full scale: {target: (measured, met)}."""
    got = {"lcm_ddil_speedup_min": rat.get("speedup_vs_reference_median", {}).get("lcm_ddil"),
           "compile_s_max": sum(v["compile_s"] or 0 for v in res.values()) if any(v["compile_s"] is not None for v in res.values()) else None,
           "ddil_overhead_max": rat.get("ddil_overhead_median"),
           "peak_gib_max": res.get("lcm_ddil", {}).get("peak_gib")}
    met = lambda k, v: v >= TARGETS[k] if k.endswith("_min") else v <= TARGETS[k]  # noqa: E731
    return {k: {"target": TARGETS[k], "measured": v, "met": None if v is None else met(k, v)} for k, v in got.items()}


def table(res: dict, rat: dict) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = [f"{'step':<10} {'median ms':>10} {'mean ms':>9} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6} "
            f"{'compile s':>9}  UNet evals per state"]
    for name, r in res.items():
        evals = " ".join(f"{k} {v:.2f}" for k, v in r["unet_evals_per_state"].items())
        rows.append(f"{name:<10} {r['median_ms']:>10.1f} {r['mean_ms']:>9.1f} {fmt(r['peak_gib'], '.1f'):>9} "
                    f"{r['model_tflop_per_s']:>8.2f} {fmt(r['mfu'], '.1%'):>6} {fmt(r['compile_s'], '.1f'):>9}  {evals}")
    for k, v in rat.items():
        rows.append(f"{k}: " + (", ".join(f"{n} {x:.2f}x" for n, x in v.items()) if isinstance(v, dict) else f"{v:+.1%}"))
    return "\n".join(rows)


def run(b: BenchConfig, tmp: Path) -> dict:
    """Every variant of b in this process; returns the JSON record."""
    model, init = teacher_model(b.tiny, tmp)
    cfg = sd_config(lcm_flags(b, model, init, tmp / "run"), b.sd_args)
    Path(cfg.output_dir).mkdir(parents=True)  # the teacher-data cache
    ctx, nets, parts = train.setup(cfg, train.preflight(cfg))
    device, name = ctx.acc.device, device_name(ctx.acc.device)
    fwd_flops = unet_flops_per_sample(parts.unet, ctx.cache.uncond(1), tuple(ctx.draw_data(1, ctx.gen)[0].shape[1:]))
    if b.compile:
        allow_recompiles()
        for unet in (parts.unet, nets["student"], nets["target"]):
            compile_blocks(unet, b.compile_backend)
    counter = UNetCounter()
    for role, unet in (("teacher", parts.unet), ("student", nets["student"]), ("target", nets["target"])):
        counter.watch(role, unet)
    peak, start, res = peak_flops(name, b.peak_tflops), mean_mix_step(cfg), {}
    steps = {"reference": lambda: reference_step(ctx, parts.unet, nets["student"], nets["target"]),
             "lcm": lambda: train.build_lcm(with_priors(ctx, betas=(1.0, 0.0, 0.0), buffer_capacity=0), nets).step,
             "lcm_ddil": lambda: train.build_lcm(ctx, nets).step}
    for variant in b.variants:
        res[variant] = measure(steps[variant](), start, b, device, counter, fwd_flops, peak)
        free(ctx.acc)
    counter.close()
    rat = ratios(res)
    full = device.type == "cuda" and not b.tiny and b.batch_size == 16 and b.resolution == 512
    return {"device": name, "torch": torch.__version__, "diffusers": _version("diffusers"), "bench": dataclasses.asdict(b),
            "sd_config": config.to_json(cfg), "timed_from_step": start, "unet_gflop_per_sample": fwd_flops / 1e9,
            "peak_bf16_tflops": peak / 1e12 if peak else None, "results": res, "ratios": rat,
            "targets": check_targets(res, rat) if full else None}


def lcm_flags(b: BenchConfig, model: str, init: str, out: Path) -> dict:
    """sd.train's flags for the ddil steps: its defaults but for the model, device, batch and a small teacher-data set
    (its content does not change the cost)."""
    return dict(method="lcm", pretrained_teacher_model=model, init=init, output_dir=out, device=b.device,
                resolution=b.resolution, train_batch_size=b.batch_size, seed=b.seed, prompts_file=PROMPTS,
                mixed_precision="bf16" if b.device == "cuda" else "no", gradient_checkpointing=b.gradient_checkpointing,
                latents_per_prompt=1, data_num_inference_steps=1)


def _version(pkg: str) -> str:
    import importlib.metadata
    return importlib.metadata.version(pkg)


# ----------------------------------------------------------------------------------------------------
# Command line


def add_machine_args(p: argparse.ArgumentParser, d) -> None:
    """--device, --tiny, --batch_size and --resolution, with defaults from config d: shared with sd.gpu_check."""
    p.add_argument("--device", default=d.device, choices=("cuda", "cpu"), help="where to run (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="the tiny pipeline (sd.tiny) instead of SD1.5's architecture")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="training states per step, >= 1 (default %(default)s)")
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="image size, a multiple of 8; 0 = 512 (SD1.5), 16 (--tiny) (default %(default)s)")


def parse_args(argv=None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m sd.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__, epilog="Any other flag is an sd.train flag for the ddil steps, "
                                                            "e.g. --teacher_substeps 4 --refresh_share 0.1.")
    add_machine_args(p, d)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per variant, >= 1 (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first, >= 1 (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="regional compilation: torch.compile each transformer and "
                                                          "ResNet block of every UNet (compile time reported apart)")
    p.add_argument("--compile_backend", default=d.compile_backend,
                   help="torch.compile backend; 'eager' checks the code path only (default %(default)s)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute the student's activations")
    p.add_argument("--peak_tflops", type=float, default=d.peak_tflops,
                   help="the device's dense bf16 peak for MFU, > 0; 0 = known from the device name (H100, H200, A100)")
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=VARIANTS, help="the steps to time")
    p.add_argument("--out", default=d.out, help="folder of bench-<device>.json (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data and noise (default %(default)s)")
    a, sd_args = p.parse_known_args(argv)
    b = BenchConfig(**{**vars(a), "variants": tuple(dict.fromkeys(a.variants)), "sd_args": tuple(sd_args)})
    b = dataclasses.replace(b, resolution=b.resolution or (tiny.TINY_RESOLUTION if b.tiny else 512))
    check_flags(b, (("--batch_size", b.batch_size >= 1, ">= 1"), ("--steps", b.steps >= 1, ">= 1"),
                    ("--warmup", b.warmup >= 1, ">= 1"), ("--peak_tflops", b.peak_tflops >= 0, ">= 0"),
                    ("--resolution", b.resolution % 8 == 0 and b.resolution >= 8, "a positive multiple of 8")))
    sd_config(lcm_flags(b, "model", "pretrained", Path("out")), b.sd_args)  # sd.train's checks, before any compute
    return b


def check_flags(ns, rules) -> None:
    """One-line errors before any compute: rules of (flag, ok, allowed), and a CUDA device that exists."""
    for flag, ok, allowed in rules:
        if not ok:
            raise config.InputError(f"{flag} {getattr(ns, flag[2:])}: allowed {allowed}")
    if ns.device == "cuda" and not torch.cuda.is_available():
        raise config.InputError("--device cuda: no CUDA device found; for a CPU smoke run use --device cpu --tiny")


def parsed(parse_args, argv):
    """The parsed flags, or the exit code: 0 for --help, 2 (with one line) for bad input."""
    try:
        return parse_args(argv)
    except SystemExit as e:
        return e.code
    except (config.InputError, ddil.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def write_record(rec: dict, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    config.write_json(rec, path)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    b = parsed(parse_args, argv)
    if isinstance(b, int):
        return b
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as tmp:
        rec = run(b, Path(tmp))
    print(f"{rec['device']}: B = {b.batch_size} at {b.resolution} px, UNet {rec['unet_gflop_per_sample']:.4g} GFLOP/sample, "
          f"timed from training step {rec['timed_from_step']}")
    print(table(rec["results"], rec["ratios"]))
    path = Path(b.out) / f"bench-{slug(rec['device'])}{'-tiny' if b.tiny else ''}{'-compile' if b.compile else ''}.json"
    return write_record(rec, path)


if __name__ == "__main__":
    sys.exit(main())
