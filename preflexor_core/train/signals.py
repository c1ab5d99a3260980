"""SIGTERM and SIGINT stop training cleanly: a resumable checkpoint at the next step boundary, then one line.

``with stop_on_signals() as stop:`` (the run, in the main thread) catches SIGTERM (schedulers, ``timeout``,
``docker stop``) and SIGINT (Ctrl-C). The first one only sets ``stop.signum``; the training loop asks
``stop.requested()`` after each optimizer step (agreed across ranks under torchrun), saves a checkpoint and
raises :class:`TrainingInterrupted` (exit code 128 + the signal, one ``error:`` line naming the checkpoint
and ``--resume``). A second signal interrupts at once (KeyboardInterrupt; the checkpoint of the last save
stays intact: every save is atomic). The previous handlers come back when the block ends.

Tests: ``python -m pytest -q tests/test_security_files.py -k signal``.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch

from ..infra.errors import PreflexorError

__all__ = ["TrainingInterrupted", "StopFlag", "stop_on_signals", "current_stop"]


class TrainingInterrupted(PreflexorError):
    """Training stopped on SIGTERM / SIGINT after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopFlag:
    """Which signal asked the run to stop (None: none)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def requested(self) -> bool:
        """True when any rank was signalled (a collective under torchrun: every rank calls it each step)."""
        local = self.signum is not None
        try:
            import torch.distributed as dist  # torch.distributed: absent from some torch builds
            if dist.is_available() and dist.is_initialized():
                t = torch.tensor([self.signum or 0], dtype=torch.int64,
                                 device="cuda" if dist.get_backend() == "nccl" else "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if int(t.item()) and self.signum is None:
                    self.signum = int(t.item())
                return bool(int(t.item()))
        except (ImportError, RuntimeError):
            pass
        return local


_current: list[StopFlag] = []


def current_stop() -> StopFlag | None:
    """The flag of the innermost ``stop_on_signals`` block, if any."""
    return _current[-1] if _current else None


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():    # handlers live in the main thread only
        _current.append(flag)
        try:
            yield flag
        finally:
            _current.remove(flag)
        return

    def handler(signum, frame):
        if flag.signum is not None:                  # the second signal: stop now
            raise KeyboardInterrupt
        flag.signum = signum

    old = {s: signal.signal(s, handler) for s in signals}
    _current.append(flag)
    try:
        yield flag
    finally:
        _current.remove(flag)
        for s, h in old.items():
            signal.signal(s, h)
