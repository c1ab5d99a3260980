"""Output folders and files the project owns: a marker that says so, and one writer at a time.

``claim_dir(path, what, force=False)``: ``path`` becomes a run folder of the project. A missing or empty
folder is created and marked (``MARKER``, a small JSON file); a marked one is ours; a non-empty folder
without the marker belongs to the user and is refused (:class:`NotOurFolderError`) unless ``force``
(``--force-out``): the project never deletes or rewrites files it did not write. A run folder made by
an earlier version (it holds ``checkpoints/stageN/run_config.json``, ``stageN/DONE`` or a ``built_from.json``
record in ``retriever/`` or ``tokenizer/``) is ours too.

``WriterLock(path, flag)``: an exclusive ``fcntl.flock`` on ``path`` (a lock file holding the holder's
pid), taken without waiting. A second writer gets :class:`LockedError`, one line naming the holder's
pid; a holder that died released its lock with its last file descriptor, so a crash never blocks the
next run. Re-entrant within one process (a nested writer of the same folder shares the lock).

    claim_dir(out, "--out", force=args.force_out)
    with WriterLock(run_lock_path(out), "--out"):
        ...write into out...

Tests: ``python -m pytest -q tests/test_security_files.py``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from pathlib import Path

from .errors import PreflexorError
from .io import atomic_write

__all__ = ["MARKER", "LOCK_FILE", "NotOurFolderError", "LockedError", "claim_dir", "is_ours", "WriterLock",
           "run_lock_path", "file_lock_path"]

MARKER = ".preflexor-run"
LOCK_FILE = ".preflexor-lock"


class NotOurFolderError(PreflexorError, OSError):
    """An output folder with files the project did not write (no marker); refused unless forced."""


class LockedError(PreflexorError, OSError):
    """Another process is writing the same run folder or pairs file."""


def _legacy_run(path: Path) -> bool:
    """A run folder written before the marker existed: files only this project writes."""
    return (any(path.glob("checkpoints/stage*/run_config.json")) or any(path.glob("stage*/DONE"))
            or (path / "retriever" / "built_from.json").is_file() or (path / "tokenizer" / "built_from.json").is_file())


def is_ours(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder the project marked (or a run folder of an earlier version)."""
    p = Path(path)
    return (p / MARKER).is_file() or (p.is_dir() and _legacy_run(p))


def _write_marker(p: Path, what: str) -> None:
    atomic_write(p / MARKER, json.dumps({"project": "preflexor", "kind": what,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "note": "files here are written and replaced by preflexor"}) + "\n")


def claim_dir(path: str | os.PathLike, flag: str = "--out", *, force: bool = False, what: str = "run",
              force_flag: str = "--force-out") -> Path:
    """Make ``path`` a marked folder of the project, or refuse a user's non-empty folder (see the module
    docstring). Returns the path."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotOurFolderError(f"{flag} {p} is a file, not a folder; give a folder path")
    if p.is_dir() and (p / MARKER).is_file():
        return p
    if p.is_dir() and any(p.iterdir()) and not _legacy_run(p) and not force:
        shown = ", ".join(sorted(x.name for x in p.iterdir())[:5])
        raise NotOurFolderError(
            f"{flag} {p} is a non-empty folder that this project did not make (no {MARKER} marker; it holds "
            f"{shown}{', ...' if len(list(p.iterdir())) > 5 else ''}); its files could be replaced, so it is "
            f"left alone: choose a new or empty folder, or pass {force_flag} to write into it anyway")
    p.mkdir(parents=True, exist_ok=True)
    _write_marker(p, what)
    return p


def run_lock_path(folder: str | os.PathLike) -> str:
    return os.path.join(os.fspath(folder), LOCK_FILE)


def file_lock_path(file: str | os.PathLike) -> str:
    """The lock file of a single output file: ``.NAME.lock`` beside it."""
    d, name = os.path.split(os.path.abspath(os.fspath(file)))
    return os.path.join(d, f".{name}.lock")


_held: dict[str, list] = {}          # real path -> [fd, count]: this process's locks
_held_lock = threading.Lock()


class WriterLock:
    """Exclusive, non-blocking ``flock`` on ``path`` with the holder's pid inside (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, flag: str = "--out", what: str = "run folder"):
        self.path, self.flag, self.what = os.fspath(path), flag, what
        self._key: str | None = None

    def acquire(self) -> "WriterLock":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        key = os.path.realpath(self.path)
        with _held_lock:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                where = os.path.dirname(os.path.abspath(self.path)) if self.what == "run folder" else self.what
                raise LockedError(f"{self.flag} {where} is being written by another process (pid {holder}); "
                                  f"wait for it to finish, stop it, or use another {self.flag}") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held[key] = [fd, 1]
            self._key = key
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._key is None:
            return
        with _held_lock:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[self._key]
                    try:
                        fcntl.flock(entry[0], fcntl.LOCK_UN)
                    finally:
                        os.close(entry[0])
        self._key = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
