"""The project's error base class, the CLI wrapper that turns its errors into one line, and --device checks.

``PreflexorError`` is the base that the package's own error classes share (``ConfigError``,
``DeviceError``, ...). ``with writing("the stage-1 checkpoint", path, hint):`` turns a failed write
(ENOSPC, EIO, a read-only disk, quota: an ``OSError``, or the ``RuntimeError`` / ``SafetensorError``
that torch.save and safetensors raise from C++ with "iostream error" / "No space left" in their
message) into one :class:`WriteFailedError` line that says what was being written, where and what to
do; ``run_cli`` reports such a C++ write failure in one line even where no ``writing`` wraps it. An
error with an ``exit_code`` attribute (an interrupted run: 128 + the signal) exits with that code. ``run_cli(main)`` runs a CLI's ``main(argv)``: bad input (a project error or
an OS error such as a missing or unwritable file) prints ``error: <message>`` on one line to stderr
and gives exit code 2; a traceback is for bugs only, and ``PREFLEXOR_DEBUG=1`` shows it for the
errors above too. ``check_device("cuda")`` refuses a device this torch cannot use, before any work.

    sys.exit(run_cli(main))                  # the last line of a CLI
    device = check_device(args.device)       # "auto" passes through; "bogus" / "cuda" on CPU-only torch -> DeviceError

Tests: ``python -m pytest -q tests/test_cli_errors.py``.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable, Iterator, Sequence

import torch

from . import env

__all__ = ["PreflexorError", "DeviceError", "WriteFailedError", "register_error", "is_project_error", "run_cli",
           "check_device", "writing", "write_failure_reason", "DEBUG_ENV", "EXIT_BAD_INPUT"]

DEBUG_ENV = env.DEBUG
EXIT_BAD_INPUT = 2            # argparse's code for a usage error; the CLIs use it for every bad input
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


class PreflexorError(Exception):
    """Base of the project's own errors: a message that says what was wrong, where, and what to do."""


class DeviceError(PreflexorError, ValueError):
    """A --device this torch build or this machine cannot provide."""


class WriteFailedError(PreflexorError, OSError):
    """Writing an output failed (disk full, I/O error, read-only disk); says what, where and what to do."""


# The messages C++ writers (torch.save's PyTorchStreamWriter, safetensors, iostreams) give a failed write.
_CPP_WRITE_FAILURE = re.compile(r"No space left on device|iostream error|file write failed|Disk quota exceeded|"
                                r"Read-only file system|StorageFull|Input/output error|unexpected pos \d+ vs",
                                re.IGNORECASE)


def write_failure_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is a failed write, in a few words (None when it is not one)."""
    if isinstance(exc, WriteFailedError):
        return str(exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return f"{reason} (errno {exc.errno})" if exc.errno else reason
    msg = str(exc)
    m = _CPP_WRITE_FAILURE.search(msg)
    if m is None:
        return None
    if re.search(r"No space left|StorageFull|unexpected pos", msg, re.IGNORECASE):
        return "No space left on device"
    return m.group(0)


@contextlib.contextmanager
def writing(what: str, path, hint: str = "") -> Iterator[None]:
    """Run the block; a failed write in it becomes one :class:`WriteFailedError` line naming ``what``,
    ``path`` and ``hint`` (e.g. that the previous checkpoint is intact). Other errors pass unchanged."""
    try:
        yield
    except WriteFailedError:
        raise
    except Exception as e:
        reason = write_failure_reason(e)
        if reason is None:
            raise
        raise WriteFailedError(f"could not write {what} to {os.fspath(path)}: {' '.join(reason.split())[:200]}"
                               f"{'; ' + hint if hint else ''}") from None


# Error classes that predate PreflexorError (CheckpointError, TokenizerError, DatagenError,
# TeacherError, EvaluationInputError, CorpusError, EmbedderError, GGUFError, ...) are recognised by
# the package's naming rule rather than by a list that would go stale as modules move: a class
# defined inside preflexor_core whose name ends in "Error" reports bad input (a file, a flag, a
# server), never a bug. Internal control-flow exceptions are named otherwise (masks.UnclosedThinking).
_PACKAGE = __name__.split(".")[0]
# OSError (missing file, permission denied, disk full, connection refused) is about the user's
# environment, and its message names the file or address; so it also counts as bad input.
_ENVIRONMENT_ERRORS: tuple[type[BaseException], ...] = (OSError,)
_registered: list[type[BaseException]] = []


def register_error(cls: type[BaseException]) -> type[BaseException]:
    """Mark an error class (e.g. a CLI's own ``InputError``) as bad input for ``run_cli``; usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise TypeError(f"register_error expects an exception class, got {cls!r}")
    if cls not in _registered:
        _registered.append(cls)
    return cls


def _is_package_error_class(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return (module == _PACKAGE or module.startswith(_PACKAGE + ".")) and cls.__name__.endswith("Error")


def is_project_error(exc: BaseException, extra: Sequence[type[BaseException]] = ()) -> bool:
    """True when ``exc`` reports bad input (see ``run_cli``), False for anything that is a bug."""
    if isinstance(exc, (PreflexorError, *_ENVIRONMENT_ERRORS, *_registered, *extra)):
        return True
    return any(_is_package_error_class(c) for c in type(exc).__mro__)


def _one_line(exc: BaseException) -> str:
    msg = Exception.__str__(exc) if isinstance(exc, KeyError) else str(exc)   # KeyError quotes its message
    msg = " ".join(msg.split())
    return msg or type(exc).__name__


def _debug() -> bool:
    return env.debug()


def run_cli(main_fn: Callable[..., int | None], argv: Sequence[str] | None = None, *,
            errors: Sequence[type[BaseException]] = ()) -> int:
    """Run ``main_fn(argv)`` and return its exit code; bad input -> ``error: <message>`` on stderr, code 2.

    ``errors`` adds a CLI's own input-error classes. ``PREFLEXOR_DEBUG=1`` re-raises them instead, so the
    traceback shows. Any other exception propagates with its traceback (a bug). ``SystemExit`` (argparse)
    becomes its code; Ctrl-C prints ``error: interrupted`` and gives 130.
    """
    try:
        code = main_fn(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _debug():
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        cpp_write = not is_project_error(e, errors) and write_failure_reason(e) is not None
        if _debug() or not (is_project_error(e, errors) or cpp_write):
            raise
        msg = f"a write failed: {write_failure_reason(e)}" if cpp_write else _one_line(e)
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        code = getattr(e, "exit_code", EXIT_BAD_INPUT)
        return code if isinstance(code, int) and code > 0 else EXIT_BAD_INPUT
    return 0 if code is None else int(code)


def check_device(spec: str | None, *, flag: str = "--device") -> str | None:
    """Validate a device string before any work starts; return it unchanged.

    ``None`` and ``"auto"`` pass through (the caller picks cuda when available, else cpu). Anything
    else must be ``cpu`` or ``cuda[:N]`` that this torch build and machine provide; otherwise
    ``DeviceError`` names the flag, the value and what to pass instead.
    """
    if spec is None or spec == "auto":
        return spec
    allowed = "expected auto, cpu, cuda or cuda:N"
    if not isinstance(spec, str):
        raise DeviceError(f"{flag} {spec!r}: not a device string; {allowed}")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag} {spec!r}: not a device; {allowed}") from None
    if dev.type not in SUPPORTED_DEVICE_TYPES:
        raise DeviceError(f"{flag} {spec!r}: device type {dev.type!r} is not supported; {allowed}")
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise DeviceError(f"{flag} {spec!r}: this torch build ({torch.__version__}) has no CUDA support; "
                              f"use {flag} cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag} {spec!r}: torch sees no CUDA device (driver missing or "
                              f"CUDA_VISIBLE_DEVICES empty); use {flag} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{flag} {spec!r}: only {count} CUDA device(s) visible "
                              f"(cuda:0..cuda:{count - 1}); pick one of them")
    return spec
