"""What ``--resume`` checks before any work: something to resume, the same training flags, intact files.

Each checkpoint folder holds ``run_config.json`` (every flat option and the data position). A resume
compares it with the new flags: a change to a field that alters the math or the data of the
remaining steps (learning rate, n-steps, batch size, ...; only fields of the resumed stage) is
refused, naming the flags; ``resume_safe`` fields (max steps, save interval, ...) pass with a note.
``--resume`` with nothing to resume is an error, ``--resume=auto`` then starts. A damaged
checkpoint file names itself and the kept previous checkpoint (``checkpoints/stageN.prev``).

Tests: ``python -m pytest -q tests/test_reliability_train.py -k resume``
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path

import torch

from ..infra.errors import PreflexorError
from ..infra.io import atomic_dir, fsync_write
from ..teachers.net import redact_url
from .config import SECTIONS, flag

log = logging.getLogger("preflexor.train")

__all__ = ["RUN_CONFIG", "ResumeError", "DamagedCheckpointError", "flat_options", "write_run_config",
           "check_resume", "verify_checkpoint", "damaged", "keep_previous", "previous_dir"]

RUN_CONFIG = "run_config.json"


class ResumeError(PreflexorError, ValueError):
    """``--resume`` that cannot continue the run exactly: nothing to resume, or changed training flags."""


class DamagedCheckpointError(PreflexorError, ValueError):
    """A checkpoint file that is truncated or unreadable; the message says which and what to do."""


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for kls in SECTIONS.values() for f in dataclasses.fields(kls)}


def flat_options(cfg) -> dict:
    """Every option of a TrainConfig under its flat (CLI) name; a password in a URL is redacted."""
    return {f.name: redact_url(getattr(getattr(cfg, sec), f.name)) for sec, kls in SECTIONS.items()
            for f in dataclasses.fields(kls)}


def write_run_config(cfg, folder: str | os.PathLike, position: dict) -> None:
    fsync_write(os.path.join(folder, RUN_CONFIG), json.dumps({"options": flat_options(cfg),
                                                               "position": dict(position)}, indent=1) + "\n")


def previous_dir(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".prev")


def keep_previous(ckpt: Path) -> None:
    """Hard-link the complete checkpoint ``ckpt`` into ``ckpt.prev`` (atomically) before it is replaced."""
    if not (ckpt / "trainer_state.pt").exists():
        return
    with atomic_dir(previous_dir(ckpt)) as tmp:
        for name in os.listdir(ckpt):
            src, dst = ckpt / name, os.path.join(tmp, name)
            if src.is_dir():
                shutil.copytree(src, dst)
                continue
            try:
                os.link(src, dst)
            except OSError:                      # a file system without hard links
                shutil.copy2(src, dst)


def _saved(ckpt: Path) -> dict:
    """``{"options": ..., "position": ...}`` of a checkpoint (older ones: from trainer_state.pt)."""
    path = ckpt / RUN_CONFIG
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise damaged(path, e, ckpt) from None
    st = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    nested = st.get("config") or {}
    return {"options": {k: v for sec in nested.values() if isinstance(sec, dict) for k, v in sec.items()},
            "position": st.get("position", {})}


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"the header claims {n} bytes but the file has {size}")
        meta = json.loads(f.read(n))
    end = max((t["data_offsets"][1] for k, t in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: the tensors need {8 + n + end} bytes, the file has {size}")


def _check_torch_file(path: Path) -> None:
    with zipfile.ZipFile(path) as z:           # torch.save's format; a truncated file has no directory
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"member {bad} fails its checksum")


def damaged(path: Path, why, ckpt: Path) -> DamagedCheckpointError:
    """The error for a damaged checkpoint file: which file, why, and what to do."""
    prev = previous_dir(ckpt)
    hint = f"or start the stage over: run without --resume (or remove {ckpt})"
    if (prev / "trainer_state.pt").exists():
        try:
            step = json.loads((prev / RUN_CONFIG).read_text(encoding="utf-8"))["position"]["global_step"]
        except (OSError, ValueError, KeyError, TypeError):
            step = "?"
        hint = (f"the previous checkpoint (global step {step}) is kept in {prev}: remove {ckpt}, rename {prev} "
                f"to {ckpt} and run with --resume again; " + hint)
    return DamagedCheckpointError(f"{path} is damaged ({' '.join(str(why).split())[:200]}), so this checkpoint "
                                  f"cannot be resumed; {hint}")


def verify_checkpoint(ckpt: Path) -> None:
    """Refuse a checkpoint with a truncated or unreadable file (cheap: headers, sizes and zip checksums)."""
    weights = sorted(ckpt.glob("*.safetensors")) or [ckpt / "model.safetensors"]
    for path in [*weights, ckpt / "trainer_state.pt", *sorted(ckpt.glob("optimizer-rank*.pt"))]:
        try:
            if not path.exists():
                raise ValueError("missing")
            (_check_safetensors if path.suffix == ".safetensors" else _check_torch_file)(path)
        except (OSError, ValueError, zipfile.BadZipFile, struct.error, KeyError, TypeError) as e:
            raise damaged(path, e, ckpt) from None


def _differences(saved: dict, new: dict, stage: str) -> tuple[list[str], list[str]]:
    unsafe, safe = [], []
    for name, f in _fields().items():
        if name not in saved or stage not in f.metadata.get("stages", stage):      # default: every stage
            continue
        old, now = saved[name], new[name]
        if old == now or (isinstance(old, list) and tuple(old) == now):
            continue
        (safe if f.metadata.get("resume_safe") else unsafe).append(f"{flag(name)} {old!r} -> {now!r}")
    return unsafe, safe


def check_resume(cfg, out: Path, stages) -> None:
    """Before any work: with ``--resume``, each stage to run must be complete or continue a checkpoint
    made with the same training flags, from intact files; at least one of them must exist."""
    if not cfg.checkpoint.resume:
        return
    found, new = [], flat_options(cfg)
    for s in stages:
        if (out / f"stage{s}" / "DONE").exists():
            found.append(s)
            continue
        ckpt = out / "checkpoints" / f"stage{s}"
        if not (ckpt / "trainer_state.pt").exists():
            continue
        found.append(s)
        verify_checkpoint(ckpt)
        unsafe, safe = _differences(_saved(ckpt)["options"], new, s)
        if unsafe:
            raise ResumeError(f"--resume: {ckpt} was trained with other values of {', '.join(unsafe)}; changing "
                              f"them breaks an exact resume. Resume with the checkpoint's values, or start stage "
                              f"{s} over without --resume (or in a new --out)")
        for change in safe:
            log.info("resume of stage %s: %s (does not change the remaining steps' math or data)", s, change)
    if found:
        return
    where = ", ".join(f"checkpoints/stage{s}/ or stage{s}/DONE" for s in stages)
    if cfg.checkpoint.resume == "auto":
        log.info("--resume=auto: nothing to resume in %s (no %s); starting", out, where)
        return
    raise ResumeError(f"--resume: nothing to resume in {out} (no {where}); check --out, or pass --resume=auto "
                      f"to resume when there is something and start otherwise")
