"""Evaluate a distilled student: FID against a folder of reference images, CLIP score, precision, recall, density
and coverage (Naeem et al. 2020, with its authors' `prdc` package) on Inception features, and LPIPS diversity
between two samples of the same prompt.

    pip install -r requirements-sd.txt        # torchmetrics, torch-fidelity, lpips (they need torchvision)
    python -m sd.eval --student results/sd-lcm/student --ref_dir coco-val-512/ --num_images 1000 --out metrics.json

The arguments, the student's folder, the reference images and the prompts are checked first, then the packages,
then the metric networks (InceptionV3, CLIP ViT-L/14, AlexNet-LPIPS), which download on first use; offline they must
already be cached. Each failure is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sd import data, sample
from sd.config import PACKAGE_PROMPTS, InputError, Parser, check_device, check_output, progress

NEAREST_K = 5  # k of the k-NN balls of precision, recall, density and coverage (Naeem et al. 2020's default)


class EvalError(InputError):
    """Missing packages, weights or inputs (exit code 2)."""


def metrics_modules(device: str) -> dict:
    """The torchmetrics metrics, built lazily: a clear error if the packages or their weights are missing."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        from torchmetrics.multimodal.clip_score import CLIPScore
        import prdc  # noqa: F401
    except ImportError as e:
        raise EvalError(f"sd.eval needs torchmetrics, torch-fidelity, lpips, prdc and a torchvision matching torch "
                        f"({e}): pip install -r requirements-sd.txt") from None
    build = {"FID (InceptionV3)": lambda: FrechetInceptionDistance(feature=2048),
             "CLIP score (CLIP ViT-L/14)": lambda: CLIPScore(model_name_or_path="openai/clip-vit-large-patch14"),
             "LPIPS (AlexNet)": lambda: LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)}
    out = {}
    for name, make in build.items():
        try:
            out[name.split(" (")[0]] = make().to(device)
        except Exception as e:  # noqa: BLE001  (a failed download shows up as many exception types)
            raise EvalError(f"cannot load the weights of {name} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"they download on first use, so run once online or put them in the torch/HF cache") from None
    return out


def to_uint8(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def reference_files(folder: str, n: int) -> list[Path]:
    """Up to n image files of the folder (recursively), in name order; more than NEAREST_K of them."""
    if not Path(folder).is_dir():
        raise EvalError(f"--ref_dir {folder}: no such folder")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in data.IMAGE_EXTS)[:n]
    if len(files) <= NEAREST_K:
        raise EvalError(f"--ref_dir {folder}: {len(files)} images ({', '.join(data.IMAGE_EXTS)}); at least "
                        f"{NEAREST_K + 1} are needed")
    return files


def reference_images(files: list[Path], resolution: int) -> torch.Tensor:
    """The images resized and centre-cropped like the training data: (n, 3, res, res) uint8."""
    return torch.stack([((data.read_pixels(files, i, resolution) + 1) * 127.5).round().clamp(0, 255).byte()
                        for i in range(len(files))])


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = NEAREST_K) -> dict:
    """Precision, recall, density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics"),
    computed by the authors' package prdc on features (N, D) and (M, D)."""
    from prdc import compute_prdc
    with contextlib.redirect_stdout(sys.stderr):  # prdc prints the sample counts; stdout is the JSON result
        out = compute_prdc(real_features=real.double().numpy(), fake_features=fake.double().numpy(), nearest_k=k)
    return {name: float(v) for name, v in out.items()}


@torch.no_grad()
def evaluate(m: dict, pipe, cfg, prompts: list[str], ref: torch.Tensor, n: int, steps: int, batch: int,
             seed: int, device: str) -> dict:
    """n student images for the prompts (cycled), then every metric. Image i and i + len(prompts) share a prompt."""
    texts = [prompts[i % len(prompts)] for i in range(n)]
    fake = torch.cat([to_uint8(sample.generate(pipe, cfg, texts[i : i + batch], steps, None, seed + i))
                      for i in progress(iterable=range(0, n, batch), desc="student images", unit="batch")])
    for i in range(0, n, batch):
        m["FID"].update(fake[i : i + batch].to(device), real=False)
        m["CLIP score"].update(fake[i : i + batch].to(device), texts[i : i + batch])
    for chunk in ref.split(batch):
        m["FID"].update(chunk.to(device), real=True)
    feats = {k: torch.cat([m["FID"].inception(c.to(device)).cpu() for c in v.split(batch)]) for k, v in
             (("real", ref), ("fake", fake))}  # (N, 2048) pool features
    P = min(len(prompts), n // 2)  # pairs: the same prompt, different noise
    lpips = m["LPIPS"](fake[:P].float().div(255).to(device), fake[P : 2 * P].float().div(255).to(device))
    return {"fid": m["FID"].compute().item(), "clip_score": m["CLIP score"].compute().item(),
            **density_coverage(feats["real"], feats["fake"]), "lpips_diversity": lpips.item(),
            "num_images": n, "num_ref": len(ref), "steps": steps, "method": cfg.method}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sd.eval", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="output_dir/student or output_dir/checkpoint-STEP/unet")
    p.add_argument("--ref_dir", required=True, help="folder of reference images (e.g. COCO val at the training "
                   f"resolution), more than {NEAREST_K}")
    p.add_argument("--prompts_file", default=str(PACKAGE_PROMPTS), help="prompts, one a line")
    p.add_argument("--num_images", type=int, default=1000, help=f"student images to generate, > {NEAREST_K}")
    p.add_argument("--steps", type=int, default=4, help="student sampling steps, from 1 to the student's grid")
    p.add_argument("--batch_size", type=int, default=16, help="images per generation / metric batch, >= 1")
    p.add_argument("--seed", type=int, default=0, help="noise seed, >= 0")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    return p


def check_args(a: argparse.Namespace) -> tuple:
    """The user's inputs, before any package or model: (student config, reference files, prompts)."""
    for flag, v, low in (("--num_images", a.num_images, NEAREST_K + 1), ("--batch_size", a.batch_size, 1),
                         ("--seed", a.seed, 0)):
        if v < low:
            raise EvalError(f"{flag} {v}: must be >= {low}")
    check_device("--device", a.device)
    if a.out is not None:
        check_output("--out", a.out, folder=False)
    cfg = sample.read_student(a.student)
    sample.check_steps(a.student, cfg, a.steps)
    return cfg, reference_files(a.ref_dir, a.num_images), data.read_prompts(a.prompts_file)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)  # --help exits 0; a bad flag exits 2 with one line
    try:
        cfg, files, prompts = check_args(a)
        m = metrics_modules(a.device)  # packages and weights, before the student loads
        pipe, cfg = sample.load_pipeline(a.student, a.device)
        res = evaluate(m, pipe, cfg, prompts, reference_images(files, cfg.resolution), a.num_images, a.steps,
                       a.batch_size, a.seed, a.device)
    except (InputError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
