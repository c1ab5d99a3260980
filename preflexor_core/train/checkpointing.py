"""Stage checkpoints with exact resume, and the final export of a stage.

``checkpoints/stageN/``: ``model.safetensors`` (full weights), ``trainer_state.pt`` (optimizer,
scheduler, RNG of python / numpy / torch / cuda, data position, config) and, under FSDP2, one
``optimizer-rank{R}.pt`` per rank. ``stageN/``: the HF checkpoint (+ tokenizer, + LoRA ``adapter/``
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

from .. import distributed as D
from ..io import atomic_dir

log = logging.getLogger("preflexor.train")

__all__ = ["rng_state", "set_rng_state", "seed_everything", "save_checkpoint", "load_checkpoint", "save_final"]


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(run) -> None:
    """Full weights + trainer state (rank 0); under FSDP2 each rank also writes its optimizer shard
    into rank 0's staging folder, which rank 0 renames into place once every shard is written."""
    state = D.full_state_dict(run.base) if run.fsdp or run.is_main else None   # all-gather under FSDP2
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(run.ckpt_dir)) if run.is_main else None
        if run.fsdp:
            tmp = D.broadcast_object(tmp)
            torch.save(run.opt.state_dict(), os.path.join(tmp, f"optimizer-rank{run.rank}.pt"))
            D.barrier()
        if run.is_main:
            _write_main(run, tmp, state)
    D.barrier()


def _write_main(run, tmp: str, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizer": None if run.fsdp else run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                "rng": rng_state(), "position": dict(run.pos), "config": asdict(run.cfg),
                "world_size": run.world}, os.path.join(tmp, "trainer_state.pt"))


def load_checkpoint(run) -> bool:
    """Restore weights, optimizer, scheduler, RNG and data position; False when there is no checkpoint."""
    from safetensors.torch import load_file
    ckpt = run.ckpt_dir
    if not (ckpt / "trainer_state.pt").exists():
        return False
    sd = load_file(str(ckpt / "model.safetensors"), device=str(run.device))
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(run.base, sd, options=StateDictOptions(full_state_dict=True))
        sd = {k: v for k, v in sd.items() if k not in run.base.state_dict()}
    missing, unexpected = ([], []) if run.fsdp else run.base.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}/model.safetensors does not match the model being trained "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it made with other "
                           f"--model/--lora-r flags? Remove {ckpt} to start the stage over")
    st = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if run.fsdp:
        if st.get("world_size") != run.world:
            raise RuntimeError(f"{ckpt} was written by {st.get('world_size')} FSDP2 ranks; resume with "
                               f"the same --nproc_per_node (now {run.world})")
        st["optimizer"] = torch.load(ckpt / f"optimizer-rank{run.rank}.pt", map_location="cpu", weights_only=False)
    run.opt.load_state_dict(st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"])
    run.pos = dict(st["position"])
    log.info("resumed stage %s at %s", run.stage, run.pos)
    return True


def save_final(run) -> None:
    """The stage's HF export (LoRA merged; the adapter saved beside it), tokenizer and DONE marker."""
    state = D.full_state_dict(run.base) if run.fsdp else None       # collective under FSDP2
    if run.is_main:
        model = run.plain_model(state)
        if run.lora_cfg is not None:
            from ..lora import merge_lora, save_adapter
            save_adapter(model, str(run.final_dir / "adapter"), run.lora_cfg)
            model = merge_lora(copy.deepcopy(model))
        model.save_pretrained(str(run.final_dir))
        run.tok.save_pretrained(str(run.final_dir))
        (run.final_dir / "DONE").write_text(json.dumps(run.pos) + "\n")
    D.barrier()
