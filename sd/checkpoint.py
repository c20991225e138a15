"""Checkpoints of an SD distillation run: output_dir/checkpoint-STEP/

    unet/                  the student, diffusers format (safetensors; LoRA merged): UNet2DConditionModel.from_pretrained
    unet/scheduler/        its sampler's scheduler config;  unet/ddil_config.json  the resolved run config
    unet_target/ ...       other UNets of the method (LCM's EMA target, DMD2's fake score, PD's round teacher)
    heads.safetensors      small trained modules (DMD2's GAN head); student_lora.safetensors (with --use_lora)
    training_state.pt      step, optimizers, lr schedulers, method state (PD's round)
    rank_state_R.pt        per process: RNG states of every generator, the ddil.ReplayBuffer

Writes go to a hidden temporary folder that is renamed into place at the end, so a run killed while writing
leaves the previous checkpoints whole. At most checkpoints_total_limit are kept: the oldest are hidden (renamed)
BEFORE the new one appears and deleted only once hidden, so at every instant each visible checkpoint is whole and
there are never more than the limit, wherever the run is killed. Leftover hidden folders are swept by the next save.

A resumed run must be the same run: every flag but RESUME_MAY_CHANGE must equal the checkpoint's saved config.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sd.config import InputError, SDConfig, to_json

CKPT = re.compile(r"^checkpoint-(\d+)$")
HIDDEN = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")  # a save in progress, or a checkpoint being deleted
STATE, RANK_STATE, CONFIG = "training_state.pt", "rank_state_{}.pt", "ddil_config.json"
RESUME_MAY_CHANGE = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps",
                     "checkpointing_steps", "checkpoints_total_limit", "report_to", "gradient_checkpointing")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-STEP folders of output_dir, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return int(CKPT.match(path.name).group(1))


def resolve_resume(output_dir: str, arg: Optional[str]) -> Optional[Path]:
    """--resume_from_checkpoint: a folder (or its name inside output_dir), or 'latest' (None, said in one line on
    the main process, if there is none yet)."""
    if not arg:
        return None
    if arg == "latest":
        found = list_checkpoints(Path(output_dir))
        path = found[-1] if found else None
        if path is None and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: --resume_from_checkpoint latest: no checkpoint in {output_dir} yet, so this run starts "
                  f"at step 0", file=sys.stderr)
    else:
        path = Path(arg) if Path(arg).is_dir() else Path(output_dir) / arg
        if not path.is_dir():
            raise InputError(f"--resume_from_checkpoint {arg}: no such checkpoint folder")
    if path is not None:
        check_checkpoint(path)
    return path


def check_checkpoint(path: Path) -> None:
    """A checkpoint is whole: its state files exist and are readable zips, every safetensors header parses."""
    for need in (STATE, "unet/config.json", RANK_STATE.format(0), CONFIG):
        if not (path / need).is_file():
            raise InputError(f"--resume_from_checkpoint {path}: incomplete checkpoint, {need} is missing")
    check_safetensors(path, f"--resume_from_checkpoint {path}")
    for f in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()  # reads every member and checks its CRC
        except (zipfile.BadZipFile, OSError) as e:
            bad = str(e)
        if bad:
            raise InputError(f"--resume_from_checkpoint {path}: corrupt state file {f.name} ({bad})")


def check_safetensors(folder: Path, what: str) -> None:
    """Every .safetensors file under folder is whole: its header parses and its size matches the header (a truncated
    or random file fails here in milliseconds, before any model loads)."""
    from safetensors import safe_open
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError: all mean the file is unusable)
            raise InputError(f"{what}: corrupt safetensors file {f.relative_to(folder)} "
                             f"({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


@contextmanager
def loading(what: str):
    """Any failure while a model or state loads (a damaged file, a wrong folder) becomes one InputError line naming
    what was loaded; running out of memory stays what it is."""
    try:
        yield
    except (InputError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (diffusers, transformers and safetensors raise many types)
        raise InputError(f"{what}: cannot load it ({type(e).__name__}: {first_line(e)})") from None


# ----------------------------------------------------------------------------------------------------
# A resumed run is the same run


def may_change(cfg: SDConfig) -> set:
    """Flags a resume may change. --max_train_steps only where it sets no schedule: PD splits it into rounds,
    and every lr schedule but the constant ones is stretched over it."""
    safe = set(RESUME_MAY_CHANGE)
    if cfg.method == "pd" or cfg.lr_scheduler not in ("constant", "constant_with_warmup"):
        safe.discard("max_train_steps")
    return safe


def show(v) -> str:
    """A config value as typed on the command line."""
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def check_resume_config(path: Path, cfg: SDConfig) -> None:
    """Refuse, in one line naming every differing flag, to resume a checkpoint with other settings than its run's.
    --reflect_range 0 (resolved from the data) matches the saved, resolved range."""
    saved = json.loads((path / CONFIG).read_text())
    now = json.loads(json.dumps(to_json(cfg)))  # tuples as lists, as saved
    skip = may_change(cfg) | ({"reflect_range"} if cfg.reflect_range == 0 else set())
    if "max_train_steps" in skip and now.get("beta_mix_steps") == cfg.max_train_steps // 2:
        skip |= {"beta_mix_steps"}  # its default follows --max_train_steps; the resumed run keeps the saved anneal
    diff = [f"--{k} {show(now[k])} (checkpoint: {show(saved[k])})" for k in now
            if k in saved and k not in skip and now[k] != saved[k]]
    if diff:
        raise InputError(f"--resume_from_checkpoint {path}: the run was trained with other settings: {'; '.join(diff)}. "
                         f"Resume with the run's values (only --{', --'.join(sorted(may_change(cfg) - {'resume_from_checkpoint'}))} "
                         f"may change), or start a fresh run in another --output_dir")


def keep_saved_anneal(path: Optional[Path], cfg: SDConfig) -> SDConfig:
    """On a resume whose --beta_mix_steps was left at its default (half of --max_train_steps), the run keeps the
    DAgger anneal it was trained with, whatever the new --max_train_steps."""
    if path is None or cfg.beta_mix_steps != cfg.max_train_steps // 2:
        return cfg
    saved = json.loads((path / CONFIG).read_text()).get("beta_mix_steps")
    return cfg if saved is None else dataclasses.replace(cfg, beta_mix_steps=saved)


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to `step` (a resumed run re-logs the steps after its checkpoint);
    a torn last line of a killed run goes too. Rewritten through a temporary file."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


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
    (write_main(folder)), into a hidden folder; the main process makes room (rotate) and renames it into place."""
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        sweep_hidden(output_dir)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rank_state, tmp / RANK_STATE.format(accelerator.process_index))
    if accelerator.is_main_process:
        write_main(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rotate(output_dir, limit, adding=step)
        if final.exists():  # a re-run over the same step: the old one goes first
            delete(final)
        os.replace(tmp, final)  # the atomic step
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, limit: Optional[int], adding: Optional[int] = None) -> None:
    """Delete the oldest checkpoints so that at most `limit` remain once checkpoint-`adding` (if given) is added."""
    found = [p for p in list_checkpoints(output_dir) if step_of(p) != adding]
    room = (limit - (adding is not None)) if limit else len(found)
    for p in found[: max(0, len(found) - room)]:
        delete(p)


def delete(path: Path) -> None:
    """Remove a checkpoint without ever showing it half-deleted: hide it by a rename, then delete."""
    hidden = path.with_name(f".{path.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden)


def sweep_hidden(output_dir: Path) -> None:
    """Remove what a killed save or delete left behind: hidden .checkpoint-STEP.tmp / .old folders."""
    for p in output_dir.iterdir() if output_dir.is_dir() else []:
        if HIDDEN.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
