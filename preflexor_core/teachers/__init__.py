"""Teachers: who writes the *chosen* side of a preference pair.

``base`` (the ``Teacher`` protocol, errors), ``chat_client`` (the OpenAI-compatible client that the
teacher, the critic and the judge use) over ``net`` (bounded requests), ``prompts`` (what an LLM
teacher is asked), ``local`` (our own checkpoint), ``extractive`` (offline, corpus sentences only),
``graph_writer`` (graph-format thinking) and ``spec`` (``teacher_from_spec``). The retrieval context
lives in ``retrieval.context``, the text helpers in ``text``.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1-2.2.

Tests: ``python -m pytest -q tests/test_teachers.py``; run: ``python -m preflexor_core.teachers --corpus PATH``.
"""
from .base import (Messages, Teacher, TeacherAuthError, TeacherError, TeacherNotFoundError, TeacherRequestError,
                   TeacherUnavailableError)
from .extractive import ExtractiveTeacher
from .chat_client import OpenAITeacher, chat_completions_url, models_url
from .local import LocalTeacher
from .spec import check_teacher_endpoint, teacher_from_spec, teacher_kind

__all__ = ["Messages", "Teacher", "TeacherError", "TeacherAuthError",
           "TeacherNotFoundError", "TeacherRequestError", "TeacherUnavailableError", "ExtractiveTeacher",
           "OpenAITeacher", "chat_completions_url", "LocalTeacher", "teacher_from_spec", "teacher_kind",
           "check_teacher_endpoint", "models_url"]
