"""``pairs.jsonl``: the append-only, resumable file of preference rows, and the counters of a run.

``PairWriter(path)`` appends one JSON row per ``write`` (flush + fsync) after cutting a torn last
line left by a crash; ``read_pairs(path)`` reads the rows (a torn last line is ignored, bad JSON
elsewhere raises :class:`PairsFileError`). ``Pairs`` is the list ``generate_pairs`` returns, with
``.stats`` (:class:`GenerationStats`).

References: TRL's preference columns (``prompt``, ``chosen``, ``rejected``).

Tests: ``python -m pytest -q tests/test_datagen.py -k "resume or torn or corrupt or stale"``.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class DatagenError(ValueError):
    """Bad input to the pair generator (arguments, corpus, output file)."""


class PairsFileError(DatagenError):
    """``pairs.jsonl`` is corrupt in a way that resuming cannot repair."""


@dataclass
class GenerationStats:
    """Counters of one ``generate_pairs`` call."""

    requested: int = 0
    existing: int = 0              # ids already in the output file (resume)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> rows
    teacher_errors: int = 0
    policy_samples: int = 0
    elapsed_s: float = 0.0

    @property
    def pairs_per_minute(self) -> float:
        return 60.0 * self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requested": self.requested, "existing": self.existing, "written": self.written,
                "skipped": dict(self.skipped), "teacher_errors": self.teacher_errors,
                "policy_samples": self.policy_samples, "elapsed_s": round(self.elapsed_s, 3),
                "pairs_per_minute": round(self.pairs_per_minute, 2)}


class Pairs(list):
    """The rows (existing + new, by index) with ``.stats`` (:class:`GenerationStats`)."""

    stats: GenerationStats


def read_pairs(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Rows of a pairs file. A torn last line (no newline / not JSON) is ignored, or cut from the
    file with ``repair=True``; bad JSON anywhere else raises :class:`PairsFileError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    lines = data[:keep].split(b"\n")[:-1] if keep else []
    rows, offset = [], 0
    for lineno, raw in enumerate(lines, start=1):
        start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not an object with an 'id'")
        except (ValueError, UnicodeDecodeError) as e:
            if all(not ln.strip() for ln in lines[lineno:]):  # the last line: a torn write
                keep = start
                break
            raise PairsFileError(f"{path}:{lineno}: not a valid pair row ({e}); only a torn last "
                                 "line can be repaired; fix or remove this line by hand") from None
        rows.append(row)
    if keep < len(data):
        if repair:
            log.warning("%s: removing a torn last line (%d bytes) left by an interrupted run",
                        path, len(data) - keep)
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        else:
            log.warning("%s: ignoring a torn last line (%d bytes)", path, len(data) - keep)
    return rows


class PairWriter:
    """Append-only JSONL writer: one row per ``write``, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise DatagenError(f"output directory does not exist: {parent}")
        self.rows = read_pairs(self.path, repair=True)
        self.ids = {str(r["id"]) for r in self.rows}
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.ids.add(str(row["id"]))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

