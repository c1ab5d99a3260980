"""Stage checkpoints with exact resume, and the final export of a stage.

``checkpoints/stageN/``: ``model.safetensors`` (full weights; under LoRA ``trainable.safetensors``,
the adapters and token rows only), ``trainer_state.pt`` (optimizer, scheduler, RNG states, data
position, config; tensors and plain types, ``weights_only`` loads), ``run_config.json`` (options and
position, for ``resume.check_resume``) and, under FSDP2, one ``optimizer-rank{R}.pt`` per rank; the
checkpoint before is kept as ``stageN.prev/`` (hard links). ``stageN/``: the HF checkpoint (+ tokenizer, + LoRA ``adapter/``
when used, merged into the weights) and ``DONE``. Every write is atomic (``io.atomic_dir``).
Saving and loading are collective: every rank calls them. ``run`` is the ``stage.StageRun``.

Tests: ``python -m pytest -q tests/test_trainer.py -k resume``
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import save_file, load_file

from ..infra.errors import writing
from ..infra.io import atomic_dir, recover_dir
from ..llm.gguf import write_gguf
from ..llm.lora import merge_lora, save_adapter
from ..teachers.net import redact_url
from . import distributed as D
from .resume import damaged, keep_previous, verify_checkpoint, write_run_config, previous_dir

log = logging.getLogger("preflexor.train")

WEIGHTS_FILE = "model.safetensors"          # full weights (full fine-tuning)
TRAINABLE_FILE = "trainable.safetensors"    # LoRA: adapters + trainable token rows only (the base is frozen)

__all__ = ["WEIGHTS_FILE", "TRAINABLE_FILE", "rng_state", "set_rng_state", "seed_everything", "save_checkpoint",
           "load_checkpoint", "save_final"]


def rng_state() -> dict:
    """RNG states of python / numpy / torch / cuda as tensors and plain types (``weights_only`` loads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _trainable_state(run) -> dict[str, torch.Tensor]:
    """Under LoRA, what a checkpoint holds of the model: the trainable tensors (adapters, token rows)."""
    return {n: p.detach() for n, p in run.base.named_parameters() if p.requires_grad}


def save_checkpoint(run) -> None:
    """Weights + trainer state (rank 0); under FSDP2 each rank also writes its optimizer shard into
    rank 0's staging folder, which rank 0 renames into place once every shard is written."""
    if run.lora_cfg is not None:
        state = _trainable_state(run) if run.is_main else None
    else:
        state = D.full_state_dict(run.base) if run.fsdp or run.is_main else None   # all-gather under FSDP2
    if run.is_main and run.cfg.checkpoint.keep_previous:
        keep_previous(run.ckpt_dir)
    what = f"the stage-{run.stage} checkpoint"
    hint = _intact(run.ckpt_dir) + "; free disk space and rerun with --resume"
    with writing(what, run.ckpt_dir, hint), contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(run.ckpt_dir)) if run.is_main else None
        if run.fsdp:
            tmp = D.broadcast_object(tmp)
            torch.save(run.opt.state_dict(), os.path.join(tmp, f"optimizer-rank{run.rank}.pt"))
            D.barrier()
        if run.is_main:
            _write_main(run, tmp, state)
    D.barrier()


def _intact(ckpt) -> str:
    """What a failed save leaves: the checkpoint before it, where it is (saves are atomic)."""
    if (ckpt / "trainer_state.pt").exists():
        return f"the previous checkpoint in {ckpt} is intact"
    if (previous_dir(ckpt) / "trainer_state.pt").exists():
        return f"the previous checkpoint in {previous_dir(ckpt)} is intact"
    return "no earlier checkpoint of this stage existed"


def _redacted(nested: dict) -> dict:
    """The config sections with a password in a URL redacted (a checkpoint is shared, passwords are not)."""
    return {k: _redacted(v) if isinstance(v, dict) else redact_url(v) for k, v in nested.items()}


def _write_main(run, tmp: str, state: dict[str, torch.Tensor]) -> None:
    name = WEIGHTS_FILE if run.lora_cfg is None else TRAINABLE_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, name))
    torch.save({"optimizer": None if run.fsdp else run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                "rng": rng_state(), "position": dict(run.pos), "config": _redacted(asdict(run.cfg)),
                "world_size": run.world}, os.path.join(tmp, "trainer_state.pt"))
    write_run_config(run.cfg, tmp, run.pos)


def _load_weights(run, ckpt) -> None:
    if run.lora_cfg is not None:
        sd = _load(lambda p: load_file(str(p), device=str(run.device)), ckpt / TRAINABLE_FILE, ckpt)
        want = set(_trainable_state(run))
        if set(sd) != want:
            raise RuntimeError(f"{ckpt}/{TRAINABLE_FILE} does not hold this run's trainable LoRA tensors "
                               f"(missing {sorted(want - set(sd))[:3]}, unexpected {sorted(set(sd) - want)[:3]}); "
                               f"was it made with other --model/--lora-r flags? Remove {ckpt} to start the stage over")
        run.base.load_state_dict(sd, strict=False)
        return
    sd = _load(lambda p: load_file(str(p), device=str(run.device)), ckpt / WEIGHTS_FILE, ckpt)
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # torch.distributed: FSDP
        set_model_state_dict(run.base, sd, options=StateDictOptions(full_state_dict=True))
        sd = {k: v for k, v in sd.items() if k not in run.base.state_dict()}
    missing, unexpected = ([], []) if run.fsdp else run.base.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}/{WEIGHTS_FILE} does not match the model being trained "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it made with other "
                           f"--model/--lora-r flags? Remove {ckpt} to start the stage over")


def load_checkpoint(run) -> bool:
    """Restore weights, optimizer, scheduler, RNG and data position; False when there is no checkpoint.
    Everything loads with ``torch.load(weights_only=True)``."""
    ckpt = run.ckpt_dir
    if run.is_main:
        recover_dir(ckpt)          # a crash between the renames of a save, temp dirs of dead runs
    D.barrier()
    if not (ckpt / "trainer_state.pt").exists():
        return False
    verify_checkpoint(ckpt)
    _load_weights(run, ckpt)
    st = _load(_torch_load, ckpt / "trainer_state.pt", ckpt)
    if run.fsdp:
        if st.get("world_size") != run.world:
            raise RuntimeError(f"{ckpt} was written by {st.get('world_size')} FSDP2 ranks; resume with "
                               f"the same --nproc_per_node (now {run.world})")
        st["optimizer"] = _load(_torch_load, ckpt / f"optimizer-rank{run.rank}.pt", ckpt)
    run.opt.load_state_dict(st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"])
    run.pos = dict(st["position"])
    log.info("resumed stage %s at %s", run.stage, run.pos)
    return True


def _torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _load(fn, path, ckpt):
    """``fn(path)``; a file that fails to load (truncated, garbled) is reported as damaged, by name."""
    try:
        return fn(path)
    except Exception as e:          # safetensors, zip and unpickling errors share no base class
        raise damaged(path, e, ckpt) from None


def save_final(run) -> None:
    """The stage's HF export (LoRA merged; the adapter saved beside it), tokenizer and DONE marker."""
    state = D.full_state_dict(run.base) if run.fsdp else None       # collective under FSDP2
    if run.is_main:
        with writing(f"the stage-{run.stage} export", run.final_dir,
                     _intact(run.ckpt_dir) + "; free disk space and rerun with --resume (the export is redone)"):
            _export(run, state)
    D.barrier()


def _export(run, state) -> None:
    """Write the stage's HF export (LoRA merged; the adapter beside it), tokenizer, GGUF if asked, DONE."""
    model = run.plain_model(state)
    if run.lora_cfg is not None:
        save_adapter(model, str(run.final_dir / "adapter"), run.lora_cfg)
        model = merge_lora(copy.deepcopy(model))
    model.save_pretrained(str(run.final_dir))
    run.tok.save_pretrained(str(run.final_dir))
    kind = run.cfg.checkpoint.export_gguf
    if kind != "none":
        write_gguf(model, run.tok, str(run.final_dir / f"model-{kind}.gguf"), dtype=kind,
                   name=f"{run.final_dir.parent.name}-{run.final_dir.name}")
    (run.final_dir / "DONE").write_text(json.dumps(run.pos) + "\n")
