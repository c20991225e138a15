"""Evaluate a distilled student: FID against a folder of reference images, CLIP score, density and coverage
(Naeem et al. 2020) on Inception features, and LPIPS diversity between two samples of the same prompt.

    pip install -r requirements-sd.txt        # torchmetrics, torch-fidelity, lpips (they need torchvision)
    python -m sd.eval --student results/sd-lcm/student --ref_dir coco-val-512/ --num_images 1000 --out metrics.json

The metric networks (InceptionV3, CLIP ViT-L/14, AlexNet-LPIPS) download on first use; offline they must
already be cached, else the command stops with a one-line error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sd import data, sample


class EvalError(ValueError):
    """Missing packages, weights or inputs (exit code 2)."""


def metrics_modules(device: str) -> dict:
    """The torchmetrics metrics, built lazily: a clear error if the packages or their weights are missing."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as e:
        raise EvalError(f"sd.eval needs torchmetrics, torch-fidelity, lpips and a torchvision matching torch ({e}): "
                        f"pip install -r requirements-sd.txt") from None
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


def reference_images(folder: str, resolution: int, n: int) -> torch.Tensor:
    """Up to n images of the folder, resized and centre-cropped like the training data: (n, 3, res, res) uint8."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in data.IMAGE_EXTS)[:n] if Path(folder).is_dir() else []
    if len(files) < 2:
        raise EvalError(f"--ref_dir {folder}: needs at least 2 images ({', '.join(data.IMAGE_EXTS)})")
    return torch.stack([((data.to_pixels(f, resolution) + 1) * 127.5).round().clamp(0, 255).byte() for f in files])


@torch.no_grad()
def evaluate(m: dict, pipe, cfg, prompts: list[str], ref: torch.Tensor, n: int, steps: int, batch: int,
             seed: int, device: str) -> dict:
    """n student images for the prompts (cycled), then every metric. Image i and i + len(prompts) share a prompt."""
    from toy.metrics import density_coverage  # k-NN density and coverage, shared with the toy
    texts = [prompts[i % len(prompts)] for i in range(n)]
    fake = torch.cat([to_uint8(sample.generate(pipe, cfg, texts[i : i + batch], steps, None, seed + i))
                      for i in range(0, n, batch)])
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
            **density_coverage(feats["real"].double(), feats["fake"].double()), "lpips_diversity": lpips.item(),
            "num_images": n, "num_ref": len(ref), "steps": steps, "method": cfg.method}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="output_dir/student or output_dir/checkpoint-STEP/unet")
    p.add_argument("--ref_dir", required=True, help="folder of reference images (e.g. COCO val at the training resolution)")
    p.add_argument("--prompts_file", default=str(Path(__file__).with_name("prompts.txt")), help="prompts, one a line")
    p.add_argument("--num_images", type=int, default=1000, help="student images to generate, >= 2")
    p.add_argument("--steps", type=int, default=4, help="student sampling steps, >= 1")
    p.add_argument("--batch_size", type=int, default=16, help="images per generation / metric batch, >= 1")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    a = p.parse_args(argv)
    try:
        if a.num_images < 2 or a.steps < 1 or a.batch_size < 1:
            raise EvalError("--num_images >= 2, --steps >= 1 and --batch_size >= 1 are required")
        m = metrics_modules(a.device)  # packages and weights first, before the student loads
        pipe, cfg = sample.load_pipeline(a.student, a.device)
        ref = reference_images(a.ref_dir, cfg.resolution, a.num_images)
        res = evaluate(m, pipe, cfg, data.read_prompts(a.prompts_file), ref, a.num_images, a.steps, a.batch_size,
                       a.seed, a.device)
    except (EvalError, sample.SampleError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
