"""``teacher_from_spec``: one place that builds every teacher from a spec string and its options.

``"extractive"`` -> :class:`ExtractiveTeacher` (needs a retriever), ``http(s)://...`` ->
:class:`OpenAITeacher` (needs ``model``), a checkpoint directory -> :class:`LocalTeacher`.
``check_teacher_endpoint(spec, model)`` asks an HTTP teacher once, briefly, before any work.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1 (the teacher writes the chosen side).

Tests: ``python -m pytest -q tests/test_teachers.py -k spec``.
"""
from __future__ import annotations

import inspect
import os

from .base import Teacher, TeacherAuthError, TeacherUnavailableError
from .extractive import ExtractiveTeacher
from .chat_client import OpenAITeacher
from .net import redact_url
from .local import LocalTeacher

# Options each kind of teacher takes (its constructor's keywords, less what the spec gives).
_OPTIONS = {kind: frozenset(inspect.signature(cls).parameters) - given for kind, cls, given in (
    ("extractive", ExtractiveTeacher, {"retriever", "seed"}),
    ("http", OpenAITeacher, {"base_url", "model", "seed"}),
    ("local", LocalTeacher, {"checkpoint_or_pair", "seed"}))}


def teacher_kind(spec: str, model: str | None = None) -> str:
    """``"extractive"``, ``"http"`` or ``"local"`` for a valid spec; ValueError saying what to
    give otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("teacher spec is empty; use 'extractive', an http(s):// URL or a checkpoint dir")
    spec = spec.strip()
    if spec == "extractive":
        return "extractive"
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ValueError(f"teacher URL {redact_url(spec)} needs a model name (--teacher-model NAME)")
        return "http"
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"teacher dir {spec} has no config.json; expected a checkpoint dir "
                             "(config.json + *.safetensors + tokenizer.json)")
        return "local"
    raise ValueError(f"bad teacher spec {redact_url(spec)!r}: expected 'extractive', an http(s):// URL of an "
                     "OpenAI-compatible server, or an existing checkpoint directory")


CHECK_TIMEOUT_S = 3.0


def check_teacher_endpoint(spec: str, model: str | None = None, timeout: float = CHECK_TIMEOUT_S,
                           api_key_env: str = "OPENAI_API_KEY", flag: str = "--teacher") -> None:
    """For an ``http(s)://`` spec, one short request to the server (``OpenAITeacher.check``); a server
    that does not answer raises :class:`TeacherUnavailableError` naming the flag, the URL and what to
    do. Other specs need no network and pass."""
    if not isinstance(spec, str) or not spec.strip().startswith(("http://", "https://")):
        return
    try:
        OpenAITeacher(spec.strip(), model or "-", api_key_env=api_key_env).check(timeout=timeout)
    except (TeacherUnavailableError, TeacherAuthError) as e:
        raise type(e)(f"{flag}: {e}; or use {flag} extractive (offline, no server)") from None


def teacher_from_spec(spec: str, retriever=None, model: str | None = None, seed: int = 0,
                      **options) -> Teacher:
    """The teacher ``spec`` names, built with the ``options`` its kind takes.

    ``options`` may hold options of every kind (e.g. the extractive ``max_items`` and
    ``max_answer_sentences`` next to the HTTP ``concurrency``): each teacher gets its own and
    the rest are ignored, so one call serves every spec; a name no teacher takes is an error.
    ``seed`` goes to the extractive and local teachers.
    """
    unknown = sorted(set(options) - frozenset().union(*_OPTIONS.values()))
    if unknown:
        valid = ", ".join(f"{k}: {', '.join(sorted(v))}" for k, v in _OPTIONS.items())
        raise ValueError(f"unknown teacher option(s) {', '.join(unknown)}; options by teacher: {valid}")
    kind = teacher_kind(spec, model)
    own = {k: v for k, v in options.items() if k in _OPTIONS[kind]}
    spec = spec.strip()
    if kind == "extractive":
        if retriever is None:
            raise ValueError("the extractive teacher needs a retriever")
        return ExtractiveTeacher(retriever, seed=seed, **own)
    if kind == "http":
        return OpenAITeacher(spec, model, **own)
    return LocalTeacher(spec, seed=seed, **own)
