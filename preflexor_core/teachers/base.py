"""What every teacher shares: the ``Teacher`` protocol, its errors, the paper's thinking categories
and message checks.

A teacher writes the *chosen* side of a preference pair: ``name``, ``complete(messages,
temperature=0.0, max_tokens=512) -> str`` and ``complete_many(list_of_messages, ...) -> list[str]``
(batched or concurrent; input order kept).

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1-2.2 (teacher LLM, thinking categories).

Tests: ``python -m pytest -q tests/test_teachers.py``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Protocol, Sequence, runtime_checkable

Messages = Sequence[dict]

class TeacherError(RuntimeError):
    """A teacher could not produce an output."""


class TeacherAuthError(TeacherError):
    """The endpoint refused the credentials (HTTP 401/403); never retried."""


class TeacherNotFoundError(TeacherError):
    """The endpoint or model does not exist (HTTP 404); never retried."""


class TeacherRequestError(TeacherError):
    """The endpoint rejected the request (other 4xx) or sent an unreadable reply; not retried."""


class TeacherUnavailableError(TeacherError):
    """The endpoint kept failing (429 / 5xx / timeouts / connection errors) after all retries."""


@runtime_checkable
class Teacher(Protocol):
    name: str

    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        """The assistant reply to one chat (``[{"role", "content"}, ...]``)."""
        ...

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512) -> list[str]:
        """Replies to many chats, in input order."""
        ...


def check_messages(messages: Messages) -> list[dict]:
    """``messages`` as a list of ``{"role", "content"}`` dicts of strings; errors say what to fix."""
    if isinstance(messages, str):
        raise TypeError("messages must be a list of {'role', 'content'} dicts, got a str; "
                        "wrap it: [{'role': 'user', 'content': text}]")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'; got {m!r}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    if not out:
        raise ValueError("messages is empty; give at least one {'role': 'user', 'content': ...}")
    return out


def last_user_text(messages: Messages) -> str:
    """The content of the last user message (else of the last message; "" when there is none)."""
    for m in reversed(list(messages)):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return str(list(messages)[-1].get("content", "")) if messages else ""


def hash_seed(*parts: Any) -> int:
    """A stable 64-bit seed from ``parts`` (same parts -> same seed in every process)."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def complete_many(teacher, chats: Sequence[Messages], **kw) -> list:
    """``teacher.complete_many(chats, **kw)`` with each failed item as its exception in its slot,
    for teachers whose ``complete_many`` takes ``return_exceptions`` (the protocol does not require it)."""
    if not chats:
        return []
    try:
        return teacher.complete_many(chats, return_exceptions=True, **kw)
    except TypeError as e:
        if "return_exceptions" not in str(e):
            raise
        return teacher.complete_many(chats, **kw)
