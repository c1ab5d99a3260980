"""``pairs.jsonl``: the append-only, resumable file of preference rows, and the counters of a run.

``PairWriter(path)`` appends one JSON row per ``write`` (flush + fsync) after cutting a torn last
line (no newline) left by a crash; it is the file's only writer (a lock, ``.NAME.lock`` beside it: a
second writer is refused naming the first one's pid) and refuses a field longer than
``MAX_FIELD_CHARS``. ``read_pairs(path)`` reads and checks the rows (errors name the file, line and id;
an id that appears twice is refused); a file that is not a pairs file is refused, never modified. ``Pairs`` is the list
``generate_pairs`` returns, with ``.stats`` (:class:`GenerationStats`); ``nothing_produced`` is the
error of a run that dropped every row, naming the dominant reason.

References: TRL's preference columns (``prompt``, ``chosen``, ``rejected``).

Tests: ``python -m pytest -q tests/test_datagen.py tests/test_reliability_io.py``.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from ..infra.errors import writing
from ..infra.io import parse_jsonl_line
from ..infra.rundir import WriterLock, file_lock_path

log = logging.getLogger(__name__)

MAX_FIELD_CHARS = 1 << 20          # longest text field of a row (prompt, chosen, rejected, ...)


class DatagenError(ValueError):
    """Bad input to the pair generator (arguments, corpus, output file)."""


class PairsFileError(DatagenError):
    """``pairs.jsonl`` is corrupt in a way that resuming cannot repair."""


class NotPairsFileError(PairsFileError):
    """The output path holds a file that is not a pairs file: it is never modified."""


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


PAIR_KEYS = ("prompt", "chosen", "rejected")

# What to do when every row was skipped for a reason (datagen's and tokenisation's reasons).
SKIP_HINTS = {
    "teacher_error": "the teacher failed on every request (see the warnings above): check --teacher and its server",
    "no_nodes": "the retriever gave no chunks: check the corpus and --nodes / --number-nodes-to-get (>= 1)",
    "empty_question": "the teacher wrote no usable question: check the teacher",
    "no_thinking": "the teacher wrote no thinking sections: check the teacher and --categories",
    "empty_answer": "the teacher wrote no answer: check the teacher",
    "empty_rejected": "the policy's samples were all empty: raise --max-new-tokens / --sample-max-new-tokens",
    "identical": "the rejected answer equalled the chosen one: use a policy (--model) or another teacher",
    "not_wrong": "--only-wrong dropped every row: raise --wrong-threshold or drop --only-wrong",
    "unclosed_thinking": "the policy's thinking never closed: raise --thinking-max-new-tokens or pass "
                         "--on-unclosed keep",
    "empty_chosen": "a completion was cut to nothing: raise --max-length or lower --max-prompt-length",
    "nothing_to_score": "no completion token was left to score: raise --max-length",
    "too_long": "a generated field was longer than the cap (a runaway teacher or sampler?): check the teacher",
}


class NothingProducedError(DatagenError):
    """A run or stage dropped every row it generated; the message names the dominant reason."""


def nothing_produced(what: str, *reasons: dict, total: int | None = None) -> NothingProducedError:
    """The error for ``what`` (e.g. "datagen --out pairs.jsonl") when every row was dropped: the drop
    counts (merged from ``reasons``), the most common reason and what to do about it."""
    counts: Counter = Counter()
    for r in reasons:
        counts.update({str(k): int(v) for k, v in (r or {}).items() if v})
    if not counts:
        return NothingProducedError(f"{what}: no rows were produced ({total or 0} generated, none kept) and no "
                                    "reason was recorded; check the teacher, the corpus and the counts given")
    top, n = counts.most_common(1)[0]
    hint = next((h for k, h in SKIP_HINTS.items() if top == k or top.startswith(k + "_")), "see the log")
    listed = ", ".join(f"{k} {v}" for k, v in counts.most_common())
    return NothingProducedError(f"{what}: every row was dropped ({listed}); the main cause, {top} "
                                f"({n} of {sum(counts.values())}): {hint}")


def row_problem(row) -> str | None:
    """What makes ``row`` unusable as a preference row, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if "id" not in row:
        return "no 'id' field"
    bad = [k for k in PAIR_KEYS if not isinstance(row.get(k), str)]
    if bad:
        return (f"field(s) {', '.join(repr(k) for k in bad)} missing or not a string (rows need "
                f"'id', {', '.join(repr(k) for k in PAIR_KEYS)})")
    return None


def _looks_like_row_start(tail: bytes) -> bool:
    """A torn write of one of our rows (``{"id": ...`` as json.dumps writes it)."""
    return tail.startswith(b'{"id": ') or (tail.startswith(b'{"') and b'"prompt": ' in tail)


def read_pairs(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Rows of a pairs file, each checked (``row_problem``).

    Only a last line with no newline is torn (a crash mid-write): it is ignored, or cut from the
    file with ``repair=True``. A file that is not a pairs file (its first line is not one of our
    rows) raises :class:`NotPairsFileError` and is never modified; a bad row elsewhere raises
    :class:`PairsFileError` naming the file, the line and the row's id.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise DatagenError(f"{path} is a directory, not a pairs file; give a .jsonl file path")
    with open(path, "rb") as f:
        data = f.read()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    lines = data[:keep].split(b"\n")[:-1] if keep else []
    rows = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        row, problem = parse_jsonl_line(raw)
        problem = problem or row_problem(row)
        if problem is None:
            rid = str(row["id"])
            if rid in first_line:
                raise PairsFileError(f"{path}:{lineno}: id {row['id']!r} appears again (first on line "
                                     f"{first_line[rid]}); a pairs file has one row per id (were two writers "
                                     "at work?): remove the duplicate lines")
            first_line[rid] = lineno
            rows.append(row)
            continue
        ours = isinstance(row, dict) and ("id" in row and any(k in row for k in PAIR_KEYS))
        if not rows and not ours:
            raise NotPairsFileError(f"{path} is not a pairs file (line {lineno}: {problem}; a pairs file holds "
                                    "one JSON row with 'id', 'prompt', 'chosen', 'rejected' per line); it was "
                                    "left untouched: choose another output path or move the file away")
        rid = f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else ""
        raise PairsFileError(f"{path}:{lineno}{rid}: not a valid pair row: {problem}; only a torn last "
                             "line (no newline) is repaired; fix or remove this line by hand") from None
    if keep < len(data):
        tail = data[keep:]
        if not rows and not _looks_like_row_start(tail.lstrip()):
            raise NotPairsFileError(f"{path} is not a pairs file (its only line, {tail[:40]!r}..., is not a "
                                    "row of ours); it was left untouched: choose another output path or "
                                    "move the file away")
        if repair:
            log.warning("%s: removing a torn last line (%d bytes, no newline) left by an interrupted run",
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
        self._lock = WriterLock(file_lock_path(self.path), "--out", what=self.path).acquire()
        try:
            self.rows = read_pairs(self.path, repair=True)
            self._f = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self._lock.release()
            raise
        self.ids = {str(r["id"]) for r in self.rows}

    def write(self, row: dict) -> None:
        long = [k for k, v in row.items() if isinstance(v, str) and len(v) > MAX_FIELD_CHARS]
        if long:
            raise DatagenError(f"{self.path}: row {row.get('id')!r} has field(s) {', '.join(long)} longer than "
                               f"{MAX_FIELD_CHARS} characters; a generated field is capped at that")
        with writing(f"pair {row.get('id')!r}", self.path,
                     "the rows before it are kept; free disk space and rerun (rows already there are skipped)"):
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        self.ids.add(str(row["id"]))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

