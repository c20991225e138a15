"""Checkpoints of an SD distillation run: output_dir/checkpoint-STEP/

    unet/                  the student, diffusers format (safetensors; LoRA merged): UNet2DConditionModel.from_pretrained
    unet/scheduler/        its sampler's scheduler config;  unet/ddil_config.json  the resolved run config
    unet_target/ ...       other UNets of the method (LCM's EMA target, DMD2's fake score, PD's round teacher)
    heads.safetensors      small trained modules (DMD2's GAN head); student_lora.safetensors (with --use_lora)
    training_state.pt      step, optimizers, lr schedulers, method state (PD's round)
    rank_state_R.pt        per process: RNG states of every generator, the ddil.ReplayBuffer

Writes go to a hidden temporary folder that is renamed into place at the end, so a run killed while writing
leaves the previous checkpoints whole. At most checkpoints_total_limit are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sd.config import InputError

CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE, RANK_STATE = "training_state.pt", "rank_state_{}.pt"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-STEP folders of output_dir, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return int(CKPT.match(path.name).group(1))


def resolve_resume(output_dir: str, arg: Optional[str]) -> Optional[Path]:
    """--resume_from_checkpoint: a folder (or its name inside output_dir), or 'latest' (None if there is none yet)."""
    if not arg:
        return None
    if arg == "latest":
        found = list_checkpoints(Path(output_dir))
        path = found[-1] if found else None
    else:
        path = Path(arg) if Path(arg).is_dir() else Path(output_dir) / arg
        if not path.is_dir():
            raise InputError(f"--resume_from_checkpoint {arg}: no such checkpoint folder")
    if path is not None:
        check_checkpoint(path)
    return path


def check_checkpoint(path: Path) -> None:
    """A checkpoint is whole: its state files exist and are readable zips, every safetensors header parses."""
    from safetensors import safe_open
    for need in (STATE, "unet/config.json", RANK_STATE.format(0)):
        if not (path / need).is_file():
            raise InputError(f"--resume_from_checkpoint {path}: incomplete checkpoint, {need} is missing")
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError: all mean the file is unusable)
            raise InputError(f"--resume_from_checkpoint {path}: corrupt safetensors file "
                             f"{f.relative_to(path)} ({str(e).splitlines()[0]})") from None
    for f in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()  # reads every member and checks its CRC
        except (zipfile.BadZipFile, OSError) as e:
            bad = str(e)
        if bad:
            raise InputError(f"--resume_from_checkpoint {path}: corrupt state file {f.name} ({bad})")


# ----------------------------------------------------------------------------------------------------
# RNG states


def rng_state(gens: dict[str, torch.Generator]) -> dict:
    """Every generator a run draws from: its explicit ones and the global torch, CUDA, numpy, random states."""
    return {"gens": {k: g.get_state() for k, g in gens.items()}, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "random": random.getstate()}


def set_rng_state(d: dict, gens: dict[str, torch.Generator]) -> None:
    for k, g in gens.items():
        g.set_state(d["gens"][k])
    torch.set_rng_state(d["torch"])
    if d["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])
    np.random.set_state(d["numpy"])
    random.setstate(d["random"])


# ----------------------------------------------------------------------------------------------------
# Atomic save and rotation


def save(accelerator, output_dir: Path, step: int, write_main, rank_state: dict, limit: Optional[int]) -> Path:
    """Write checkpoint-STEP atomically: every process writes its rank state, the main process the rest
    (write_main(folder)), into a temporary folder that the main process renames into place."""
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rank_state, tmp / RANK_STATE.format(accelerator.process_index))
    if accelerator.is_main_process:
        write_main(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a re-run over the same step: move the old one aside first
            old = output_dir / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)  # the atomic step
        rotate(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, limit: Optional[int]) -> None:
    """Keep the newest `limit` checkpoints."""
    found = list_checkpoints(output_dir)
    for p in found[: max(0, len(found) - limit)] if limit else []:
        shutil.rmtree(p)
