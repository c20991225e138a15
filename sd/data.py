"""Training data for sd/: where x_0 (VAE latents) and the prompt ids of ddil's draw_data(n, gen) come from.

Three sources, checked before any model loads:
  --train_data_dir DIR   diffusers' imagefolder: images plus metadata.jsonl lines {"file_name": ..., "text": ...}
  --dataset_name NAME    a 🤗 datasets name or path with image and caption columns (needs `pip install datasets`)
  --prompts_file FILE    prompts only: x_0 are teacher samples (25-step DDIM), made once and cached as safetensors
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

import ddil
from sd.config import progress as progress_bar

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Bad training data; the message is one line naming the flag."""


# ----------------------------------------------------------------------------------------------------
# Reading the sources: (images, captions), images indexable by position


def read_imagefolder(path: str, caption_column: str = "text") -> tuple[list[Path], list[str]]:
    """Images under `path` (recursively) and their captions from metadata.jsonl (diffusers' imagefolder layout)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--train_data_dir {path}: no such folder")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DataError(f"--train_data_dir {path}: no images ({', '.join(IMAGE_EXTS)}) in the folder")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"--train_data_dir {path}: images without captions: add metadata.jsonl with lines "
                        f'{{"file_name": "a.png", "{caption_column}": "a caption"}}')
    captions = {}
    for i, line in enumerate(meta.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
            if row is not None:
                captions[row["file_name"]] = str(row[caption_column])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"--train_data_dir {path}: metadata.jsonl line {i} is not "
                            f'{{"file_name": ..., "{caption_column}": ...}} ({type(e).__name__}: {e})') from None
    missing = [p for p in images if p.relative_to(root).as_posix() not in captions]
    if missing:
        raise DataError(f"--train_data_dir {path}: {len(missing)} images without a caption in metadata.jsonl, "
                        f"e.g. {missing[0].relative_to(root).as_posix()}")
    return images, [captions[p.relative_to(root).as_posix()] for p in images]


def read_hf_dataset(name: str, image_column: str, caption_column: str):
    """The train split of a 🤗 datasets dataset: (the dataset's image column, captions)."""
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset_name needs the 🤗 datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001  (any loader failure is a bad --dataset_name)
        raise DataError(f"--dataset_name {name}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in ds.column_names:
            raise DataError(f"{flag} {col}: not a column of {name} (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"--dataset_name {name}: the train split is empty")
    captions = [c if isinstance(c, str) else c[0] for c in ds[caption_column]]  # a list of captions: the first
    return _Column(ds, image_column), captions


class _Column:
    """Lazy access to one column of a 🤗 dataset, so images are decoded only when drawn."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i][self.column]


def read_prompts(path: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts_file {path}: no such file")
    prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"--prompts_file {path}: no prompts (one a line)")
    return prompts


# ----------------------------------------------------------------------------------------------------
# x_0: VAE latents of images, or teacher samples


def to_pixels(image, resolution: int) -> Tensor:
    """Resize the shorter side to `resolution` (bilinear), centre-crop, scale to [-1, 1]: (3, res, res)."""
    from PIL import Image
    image = (Image.open(image) if isinstance(image, (str, Path)) else image).convert("RGB")
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def read_pixels(images, i: int, resolution: int) -> Tensor:
    """Image i as to_pixels gives it; an unreadable image is one DataError line naming it."""
    try:
        return to_pixels(images[i], resolution)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated files, bad headers
        raise DataError(f"training image {images[i] if isinstance(images[i], (str, Path)) else i} cannot be read "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def image_draw(images, resolution: int, vae, device) -> Callable:
    """ddil's draw_data for images: n random images, VAE-encoded (a posterior sample) times scaling_factor;
    cond = the image's index, which is also its caption's id in the EmbeddingCache."""
    @torch.no_grad()
    def draw(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(images), (n,), generator=gen)
        px = torch.stack([read_pixels(images, i, resolution) for i in idx.tolist()]).to(device, vae.dtype)
        z = vae.encode(px).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        return z.float(), idx.to(device)
    return draw


def latent_draw(latents: Tensor, ids: Tensor, device) -> Callable:
    """ddil's draw_data from a fixed set of latents (teacher samples) and their prompt ids."""
    latents, ids = latents.to(device), ids.to(device)
    def draw(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = ddil.randint(0, len(latents), n, gen, device)
        return latents[idx], ids[idx]
    return draw


@torch.no_grad()
def teacher_samples(teacher, alpha_bar: Tensor, n_prompts: int, per_prompt: int, shape: tuple, steps: int, w: float,
                    seed: int, batch: int, device, progress: bool = False) -> tuple[Tensor, Tensor]:
    """per_prompt samples of each prompt by the teacher's guided DDIM (ddil.sample + ddil.teacher_policy, K = 1)
    on the uniform `steps`-point grid. Returns latents (n, *shape) float32 on the CPU and prompt ids (n,).
    A progress bar (progress=True) counts the samples; a non-finite sample stops the run naming this phase."""
    ids = torch.arange(n_prompts).repeat_interleave(per_prompt)
    policy, grid = ddil.teacher_policy(teacher, alpha_bar, None, 1), ddil.uniform_grid(steps, len(alpha_bar))
    gen, like, out = torch.Generator().manual_seed(seed), torch.empty(0, device=device), []
    with progress_bar(total=len(ids), desc=f"teacher samples ({steps} DDIM steps, cached)", unit="img",
              disable=not progress) as bar:
        for chunk in ids.split(batch):
            x_T = ddil.randn((len(chunk), *shape), gen, like)
            x0, _ = ddil.sample(policy, x_T, grid, chunk.to(device), torch.full((len(chunk),), w, device=device), gen)
            if not torch.isfinite(x0).all():
                bar.close()
                raise FloatingPointError(f"teacher samples (prompts-only data), prompts {chunk[0]}-{chunk[-1]}: "
                                         f"non-finite latents; the teacher diverged (with --mixed_precision fp16, try bf16)")
            out.append(x0.float().cpu())
            bar.update(len(chunk))
    return torch.cat(out), ids


def cached(path: Path, key: dict, make: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(latents, ids) from a safetensors file made by `make` for this `key`, remade if the key differs.
    Written to a temporary file and renamed, so a killed run never leaves half a cache."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file
    tag = json.dumps(key, sort_keys=True)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == tag:
                    d = load_file(str(path))
                    return d["latents"], d["ids"]
        except (SafetensorError, OSError):
            pass  # an unreadable cache is remade
    latents, ids = make()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"latents": latents.contiguous(), "ids": ids.contiguous()}, str(tmp), metadata={"key": tag})
    os.replace(tmp, path)
    return latents, ids


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def data_range(x0: Tensor) -> float:
    """Half-width of the reflection domain [-r, r] in latent space: 5% beyond the largest |x_0| of the data."""
    return round(1.05 * x0.abs().max().item(), 3)
