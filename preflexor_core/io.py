"""Atomic directory writes, shared by checkpoints, LoRA adapters, the retriever and trainer state.

A directory is written into a temporary sibling, then renamed over the destination, so a reader
never sees a half-written one and a crash leaves the old directory intact.

    with atomic_dir("runs/x/stage1") as tmp:      # tmp: a fresh sibling folder
        ...write files into tmp...                # renamed to runs/x/stage1 on success

Tests: ``python -m pytest -q tests/test_checkpoint.py -k atomic``
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

__all__ = ["atomic_dir", "atomic_replace_dir", "fsync_write"]


def atomic_replace_dir(tmp: str, final: str, carry_over: bool = True,
                       keep: Callable[[str], bool] | None = None) -> None:
    """Move the finished ``tmp`` directory to ``final``. Files of an existing ``final``
    that ``tmp`` lacks are copied in first when ``carry_over`` (and ``keep(name)`` is true)."""
    if os.path.isdir(final):
        if carry_over:
            for name in os.listdir(final):
                src, dst = os.path.join(final, name), os.path.join(tmp, name)
                if os.path.exists(dst) or (keep is not None and not keep(name)):
                    continue
                if os.path.isdir(src):
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
        old = final.rstrip("/") + f".old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, carry_over: bool = False,
               keep: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield a fresh temporary sibling of ``final``; on normal exit it replaces ``final``
    (``atomic_replace_dir``), on an exception it is removed and ``final`` is left untouched."""
    final = os.path.abspath(os.fspath(final))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        yield tmp
        atomic_replace_dir(tmp, final, carry_over=carry_over, keep=keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_write(path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (text as UTF-8)."""
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
