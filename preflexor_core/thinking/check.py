"""Format compliance of one raw output: does it open with one closed thinking block that holds
category headers, followed by an answer (PRefLexOR's format, arXiv 2410.12375)?

The rule, on the raw text (special tokens included): (1) ``<|thinking|>`` and ``<|/thinking|>``
each occur exactly once, in that order; (2) only whitespace precedes ``<|thinking|>``; (3) the
block holds at least ``min_headers`` distinct ``**Category**:`` line headers (categories matched
case-insensitively, spaces inside the asterisks tolerated); (4) the extracted answer
(``reasoning.extract_spans``) is non-empty. Reflection blocks are allowed anywhere.
``header_share`` counts headers after the first ``<|thinking|>`` up to its ``<|/thinking|>``
(the end of the text when unclosed). Tests: ``python -m pytest -q tests/test_evaluation.py -k format``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .spans import extract_spans
from .layout import DEFAULT_CATEGORIES
from .tokens import THINK_END, THINK_START

__all__ = ["FormatCheck", "check_format", "normalize_tags"]

_TAG_RE = re.compile(r"<\|?[ \t]*(/?)[ \t]*thinking[ \t]*\|?>", re.IGNORECASE)


def normalize_tags(text: str) -> str:
    """Thinking tags written as plain text (``<thinking>``, ``</thinking>``, ``<| thinking |>``) -> the
    thinking tokens' text, so a base model that never learned the special tokens is scored fairly."""
    return _TAG_RE.sub(lambda m: THINK_END if m.group(1) else THINK_START, text)


@dataclass
class FormatCheck:
    compliant: bool
    n_think_start: int
    n_think_end: int
    headers: list[str]          # categories with a header in the (first) thinking block, in category order
    header_share: float         # len(headers) / len(categories)
    answer: str                 # extracted answer (extract_spans)
    reason: str                 # "ok" or the first rule that failed


def _header_re(categories: Sequence[str]) -> re.Pattern:
    names = "|".join(re.escape(" ".join(c.split())).replace(r"\ ", r"\s+") for c in categories)
    return re.compile(r"^[ \t]*\*\*[ \t]*(" + names + r")[ \t]*\*\*[ \t]*:", re.IGNORECASE | re.MULTILINE)


def _first_block(text: str) -> tuple[int, str]:
    """(position of the first ``<|thinking|>`` or -1, the text from it to its end tag or the end)."""
    s = text.find(THINK_START)
    if s < 0:
        return s, ""
    e = text.find(THINK_END, s + len(THINK_START))
    return s, text[s + len(THINK_START):] if e < 0 else text[s + len(THINK_START):e]


def _failed_rule(text: str, s: int, n_s: int, n_e: int, n_headers: int, min_headers: int, answer: str) -> str:
    if n_s != 1:
        return "no <|thinking|>" if n_s == 0 else f"{n_s} <|thinking|> tags"
    if n_e != 1:
        return "thinking never closed" if n_e == 0 else f"{n_e} <|/thinking|> tags"
    if text.find(THINK_END) < s:
        return "<|/thinking|> before <|thinking|>"
    if text[:s].strip():
        return "text before <|thinking|>"
    if n_headers < min_headers:
        return f"{n_headers} category header(s), need {min_headers}"
    return "empty answer" if not answer else "ok"


def check_format(text: str, categories: Sequence[str] = DEFAULT_CATEGORIES, min_headers: int = 1) -> FormatCheck:
    """Apply the format-compliance rule of the module docstring to one raw output."""
    if not categories:
        raise ValueError("check_format: need at least one category")
    if not 0 <= min_headers <= len(categories):
        raise ValueError(f"check_format: min_headers={min_headers} must lie in [0, {len(categories)}]")
    n_s, n_e = text.count(THINK_START), text.count(THINK_END)
    s, block = _first_block(text)
    canon = {" ".join(c.split()).lower(): c for c in categories}
    found = {" ".join(m.group(1).split()).lower() for m in _header_re(categories).finditer(block)}
    headers = [c for k, c in canon.items() if k in found]
    answer = extract_spans(text).answer
    reason = _failed_rule(text, s, n_s, n_e, len(headers), min_headers, answer)
    return FormatCheck(reason == "ok", n_s, n_e, headers, len(headers) / len(canon), answer, reason)
