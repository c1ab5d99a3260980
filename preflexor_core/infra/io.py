"""Atomic directory writes, recovery from interrupted ones, umask-respecting modes, output-path checks.

A directory is written into a temporary sibling ``.NAME.tmp-PID-*``, then swapped with the destination
in one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames via ``NAME.old-PID``), so a reader
never sees a half-written one. ``recover_dir`` (called before every write and by resume) removes the
temp siblings of dead processes and restores ``NAME`` when a crash fell between the two renames.
Files and folders get the modes the umask gives (``0o666`` / ``0o777`` less the umask), also those
made by ``mkstemp`` / ``mkdtemp``. ``check_output_file`` / ``check_output_dir`` refuse an output path
before the work starts; ``write_fallback`` saves results when the final write still fails.
``atomic_write`` is the one way a single file is replaced (temp sibling, fsync, rename) and
``read_jsonl`` the one JSONL reader (line numbers in its errors; torn lines skipped on request).

    with atomic_dir("runs/x/stage1") as tmp:      # tmp: a fresh sibling folder
        ...write files into tmp...                # swapped into runs/x/stage1 on success

Tests: ``python -m pytest -q tests/test_checkpoint.py -k atomic tests/test_reliability_io.py``
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import sys
import tempfile
import json
import logging
import time
from collections.abc import Callable, Iterator

from .errors import PreflexorError

__all__ = ["atomic_dir", "atomic_replace_dir", "atomic_file", "atomic_write", "read_jsonl", "parse_jsonl_line", "JSONLError", "fsync_write", "recover_dir", "current_umask", "file_mode",
           "dir_mode", "apply_umask", "OutputPathError", "check_output_file", "check_output_dir",
           "write_fallback"]

log = logging.getLogger("preflexor.io")

LEGACY_TMP_MAX_AGE_S = 3600.0      # a temp sibling without a pid in its name is removed once this old


class OutputPathError(PreflexorError, OSError):
    """An output path that cannot be written (read-only, a directory where a file belongs, ...)."""


class JSONLError(PreflexorError, ValueError):
    """A JSONL line that is not a JSON object."""


# -- modes ------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask (read from /proc when possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def apply_umask(path: str | os.PathLike, recursive: bool = False) -> None:
    """Give ``path`` (and, with ``recursive``, everything under it) the modes a plain ``open`` /
    ``mkdir`` would: ``mkstemp`` makes 0600 files and ``mkdtemp`` 0700 folders whatever the umask."""
    path = os.fspath(path)
    fm, dm = file_mode(), dir_mode()
    os.chmod(path, dm if os.path.isdir(path) else fm)
    if recursive and os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), dm)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, fm)


# -- the swap ---------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _renameat2 = getattr(_libc, "renameat2", None)
    except OSError:
        _renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically; False when the OS or the file system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _split(final: str) -> tuple[str, str]:
    final = os.path.abspath(os.fspath(final)).rstrip("/")
    return os.path.dirname(final), os.path.basename(final)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_replace_dir(tmp: str, final: str, carry_over: bool = True,
                       keep: Callable[[str], bool] | None = None) -> None:
    """Move the finished ``tmp`` directory to ``final``. Files of an existing ``final``
    that ``tmp`` lacks are copied in first when ``carry_over`` (and ``keep(name)`` is true).
    Modes follow the umask. The swap is one atomic exchange where the OS has it; otherwise
    ``final`` -> ``final.old-PID``, ``tmp`` -> ``final``, and ``recover_dir`` repairs a crash between."""
    final = os.path.abspath(os.fspath(final)).rstrip("/")
    if os.path.isdir(final) and carry_over:
        for name in os.listdir(final):
            src, dst = os.path.join(final, name), os.path.join(tmp, name)
            if os.path.exists(dst) or (keep is not None and not keep(name)):
                continue
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    apply_umask(tmp, recursive=True)
    if not os.path.isdir(final):
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)     # tmp now holds the previous contents
    else:
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | os.PathLike) -> None:
    """Repair what an interrupted ``atomic_dir`` of ``final`` left behind (call before reading it).

    ``final`` missing with ``final.old-PID`` present (a crash between the two renames): the complete
    temp dir of that PID becomes ``final`` when it is there, else the old directory is restored.
    Temp siblings and old dirs of processes that are gone are removed (legacy temp names without
    a pid once older than ``LEGACY_TMP_MAX_AGE_S``); those of live processes are left alone.
    """
    parent, base = _split(os.fspath(final))
    final = os.path.join(parent, base)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    tmp_re = re.compile(re.escape(f".{base}.tmp-") + r"(?:(\d+)-)?")
    old_re = re.compile(re.escape(f"{base}.old-") + r"(\d+)$")
    tmps: dict[str, int | None] = {}
    olds: dict[str, int] = {}
    for name in names:
        if (m := tmp_re.match(name)) and os.path.isdir(os.path.join(parent, name)):
            tmps[name] = int(m.group(1)) if m.group(1) else None
        elif m := old_re.match(name):
            olds[name] = int(m.group(1))
    dead_olds = {n: pid for n, pid in olds.items() if not _pid_alive(pid)}
    if not os.path.isdir(final) and dead_olds:
        newest = max(dead_olds, key=lambda n: os.path.getmtime(os.path.join(parent, n)))
        pid = dead_olds.pop(newest)
        same = [t for t, p in tmps.items() if p == pid]
        if len(same) == 1:            # the old dir exists only once its replacement was complete
            os.rename(os.path.join(parent, same[0]), final)
            tmps.pop(same[0])
            shutil.rmtree(os.path.join(parent, newest), ignore_errors=True)
        else:
            os.rename(os.path.join(parent, newest), final)
    for name in dead_olds:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    now = time.time()
    for name, pid in tmps.items():
        path = os.path.join(parent, name)
        if pid is None:
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(path) > LEGACY_TMP_MAX_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
        elif not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, carry_over: bool = False,
               keep: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield a fresh temporary sibling of ``final``; on normal exit it replaces ``final``
    (``atomic_replace_dir``), on an exception it is removed and ``final`` is left untouched.
    Leftovers of earlier interrupted writes are repaired first (``recover_dir``)."""
    final = os.path.abspath(os.fspath(final)).rstrip("/")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    recover_dir(final)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-{os.getpid()}-", dir=parent)
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None) -> Iterator[str]:
    """A temporary sibling of the file ``path`` to write into; when the block ends without an error it is
    fsynced, given the umask's mode (or ``mode``) and renamed over ``path`` in one step, so a reader sees
    the old file or the new one, never a torn one; when the block raises, it is removed."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode() if mode is None else mode)      # mkstemp alone gives 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int | None = None) -> None:
    """Replace the file ``path`` with ``data`` (text as UTF-8, newlines as given) through ``atomic_file``."""
    with atomic_file(path, mode) as tmp:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(data)


def parse_jsonl_line(line: str | bytes) -> tuple[dict | None, str]:
    """``(row, "")`` for a line that holds one JSON object, else ``(None, why not)``."""
    try:
        row = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    return (row, "") if isinstance(row, dict) else (None, f"expected a JSON object, got {type(row).__name__}")


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False, what: str = "JSONL"
               ) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for each non-blank line of ``path``, one JSON object per line (UTF-8).

    A file with binary content, or a line that is not a JSON object, raises :class:`JSONLError` naming
    the file and the line (``{path}:{n}: ...``); with ``skip_bad`` such a line is skipped with a warning
    instead (a line torn by an interrupted append). ``what`` names the kind of file in messages."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        lines = ["\x00"]
    if any("\x00" in line for line in lines):
        raise JSONLError(f"{what} file {path} is not a text file (binary content); {what} files hold one "
                         "JSON object per line (UTF-8)")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row, reason = parse_jsonl_line(line)
        if not reason:
            yield n, row
        elif skip_bad:
            log.warning("%s:%d: skipping a line: %s (an interrupted write?)", path, n, reason)
        else:
            raise JSONLError(f"{path}:{n}: {reason}; {what} files hold one JSON object per line")


# -- output paths -----------------------------------------------------------------------------------
def _existing_ancestor(path: str) -> str:
    d = path
    while not os.path.exists(d):
        d = os.path.dirname(d)
    return d


def _probe_dir(d: str, flag: str, path: str) -> None:
    """A file can be created in the existing folder ``d`` (tried, not guessed: root ignores modes,
    read-only mounts do not)."""
    if not os.path.isdir(d):
        raise OutputPathError(f"{flag} {path}: {d} is a file, not a directory; choose a path under a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".preflexor-write-test-", dir=d)
    except OSError as e:
        raise OutputPathError(f"{flag} {path}: cannot create files in {d} ({e.strerror or e}); "
                              "choose a writable location or fix its permissions") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, flag: str = "output") -> str:
    """Refuse, before any work, a file path the results could not be written to; returns it absolute."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        raise OutputPathError(f"{flag} {path}: is an existing directory, not a file; give a file name "
                              f"such as {os.path.join(os.fspath(path), 'out.json')}")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise OutputPathError(f"{flag} {path}: the existing file is not writable; choose another path "
                              "or fix its permissions")
    _probe_dir(_existing_ancestor(os.path.dirname(p)), flag, os.fspath(path))
    return p


def check_output_dir(path: str | os.PathLike, flag: str = "output") -> str:
    """Refuse, before any work, a folder that could not be created or written; returns it absolute."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise OutputPathError(f"{flag} {path}: is an existing file, not a directory; choose a folder path")
    _probe_dir(_existing_ancestor(p), flag, os.fspath(path))
    return p


def write_fallback(name: str, data: str | bytes) -> str:
    """Write ``data`` to a new file in the system temp dir (``preflexor-<name>-*``); returns its path."""
    stem, ext = os.path.splitext(os.path.basename(name) or "results")
    fd, path = tempfile.mkstemp(prefix=f"preflexor-{stem}-", suffix=ext or ".txt", dir=tempfile.gettempdir())
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return path
