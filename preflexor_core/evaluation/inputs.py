"""Evaluation inputs: question and preference-pair JSONL files, model specs (checkpoint dirs, .gguf, names).

Bad input raises :class:`EvaluationInputError` naming the file and line (or the directory) and
what it should hold. Tests: ``python -m pytest -q tests/test_evaluation.py -k "load or main"``.
"""
from __future__ import annotations

from pathlib import Path

from ..infra.io import JSONLError, read_jsonl
from ..llm.registry import ModelSpecError, resolve_checkpoint

__all__ = ["EvaluationInputError", "DEFAULT_QUESTIONS", "load_questions", "load_pairs", "check_model_dir"]

DEFAULT_QUESTIONS = str(Path(__file__).resolve().parents[1] / "corpus" / "eval_questions.jsonl")


class EvaluationInputError(ValueError):
    """A bad input file or directory (the message names it and, for files, the line)."""


def _read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    p = Path(path)
    if not p.is_file():
        raise EvaluationInputError(f"{what} file {path} does not exist" if not p.exists()
                                   else f"{what} file {path} is not a file")
    try:
        rows = list(read_jsonl(p, what=what))
    except JSONLError as e:
        raise EvaluationInputError(str(e)) from None
    if not rows:
        raise EvaluationInputError(f"{what} file {path} has no rows")
    return rows


def load_questions(path: str, limit: int | None = None, spread: bool = False) -> list[dict]:
    """Rows ``{"id", "question", "reference", ...}`` (reference: a string or a list of strings): the first
    ``limit``, or with ``spread`` ``limit`` rows evenly spaced over the whole file (each of its topics)."""
    out = []
    for n, row in _read_jsonl(path, "questions"):
        q, ref = row.get("question"), row.get("reference")
        if not isinstance(q, str) or not q.strip():
            raise EvaluationInputError(f"{path}:{n}: field 'question' missing or not a non-empty string "
                                       f"(rows need 'question' and 'reference')")
        if not (isinstance(ref, str) or (isinstance(ref, list) and ref and all(isinstance(x, str) for x in ref))):
            raise EvaluationInputError(f"{path}:{n}: field 'reference' missing or not a string / list of strings "
                                       f"(rows need 'question' and 'reference')")
        out.append({**row, "id": str(row.get("id", f"line{n}"))})
        if limit is not None and len(out) >= limit and not spread:
            break
    if spread and limit is not None and len(out) > limit:
        out = [out[i * len(out) // limit] for i in range(limit)]
    return out


def load_pairs(path: str, limit: int | None = None) -> list[dict]:
    """Preference rows ``{"prompt", "chosen", "rejected", ...}``; the first ``limit`` rows."""
    out = []
    for n, row in _read_jsonl(path, "pairs"):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                rid = f" (id {row['id']!r})" if "id" in row else ""
                raise EvaluationInputError(f"{path}:{n}{rid}: field {key!r} missing or not a string "
                                           f"(rows need 'prompt', 'chosen', 'rejected')")
        out.append(row)
        if limit is not None and len(out) >= limit:
            break
    return out


def check_model_dir(path: str) -> str:
    """The checkpoint path of ``path`` (a known model name, a .gguf file or a checkpoint folder with config
    and tokenizer: ``llm.registry.resolve_checkpoint``); else :class:`EvaluationInputError`."""
    try:
        return resolve_checkpoint(path)
    except ModelSpecError as e:
        raise EvaluationInputError(str(e)) from None
