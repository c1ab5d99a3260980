"""Span extraction: split a response into thinking, reflection and answer, tolerating bad markup.

The markup is PRefLexOR's (Buehler, arXiv 2410.12375): ``<|thinking|> ... <|/thinking|>`` holds
the reasoning, ``<|reflect|> ... <|/reflect|>`` the model's critique of it, the answer follows
the thinking. The rules for malformed text are in :func:`extract_spans`.
Tests: ``python -m pytest -q tests/test_reasoning.py -k spans``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .tokens import REFLECT_END, REFLECT_START, THINK_END, THINK_START, TRAINED_SPECIAL_TOKENS

__all__ = ["Spans", "extract_spans", "strip_special_tokens"]

_SPECIALS = tuple(sorted(set(TRAINED_SPECIAL_TOKENS), key=len, reverse=True))
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in _SPECIALS))
_SPECIAL_BETWEEN_WORDS_RE = re.compile(r"(?<=\S)(?:" + _SPECIAL_RE.pattern + r")(?=\S)")


@dataclass
class Spans:
    """The parts of one response; all strings are stripped and free of special tokens."""

    thinking: str
    reflect: str
    answer: str
    thinking_closed: bool = False   # a <|/thinking|> was found (the answer region exists)


def strip_special_tokens(text: str) -> str:
    """``text`` without chat / thinking / reflect special-token strings, whitespace stripped.

    A token between two non-space characters becomes one space (``a<|/thinking|>b`` -> ``a b``).
    """
    return _SPECIAL_RE.sub("", _SPECIAL_BETWEEN_WORDS_RE.sub(" ", text)).strip()


def _remove_reflect(region: str) -> str:
    """``region`` without complete reflect blocks (each becomes a line break), cut at an unclosed
    ``<|reflect|>``."""
    out, pos = [], 0
    while True:
        s = region.find(REFLECT_START, pos)
        if s < 0:
            out.append(region[pos:])
            break
        e = region.find(REFLECT_END, s + len(REFLECT_START))
        out.append(region[pos:s])
        out.append("\n")
        if e < 0:          # unclosed reflection: everything after it is reflection, not this region
            break
        pos = e + len(REFLECT_END)
    return "".join(out)


def _thinking_region(text: str, last_te: int) -> str | None:
    if last_te >= 0:
        ts = text.rfind(THINK_START, 0, last_te)   # last TS with a TE after it == last TS before the last TE
        if ts >= 0:
            start = ts + len(THINK_START)
            return text[start:text.find(THINK_END, start)]
        return text[:text.find(THINK_END)]
    ts = text.rfind(THINK_START)
    return text[ts + len(THINK_START):] if ts >= 0 else None


def _reflect_region(text: str) -> str:
    last_re = text.rfind(REFLECT_END)
    rs = text.rfind(REFLECT_START, 0, last_re) if last_re >= 0 else -1
    if rs >= 0:
        start = rs + len(REFLECT_START)
        return text[start:text.find(REFLECT_END, start)]
    rs = text.rfind(REFLECT_START)
    if rs < 0:
        return ""
    start = rs + len(REFLECT_START)
    te = text.find(THINK_END, start)
    return text[start:] if te < 0 else text[start:te]


def _answer_region(text: str, last_te: int) -> str:
    if last_te >= 0:
        tail = text[last_te + len(THINK_END):]
    elif THINK_START in text:
        tail = ""
    else:
        tail = text
    tail = _remove_reflect(tail)
    cut = tail.find(THINK_START)
    return tail[:cut] if cut >= 0 else tail


def extract_spans(text: str) -> Spans:
    """Split a response into thinking, reflection and answer, tolerating malformed markup.

    Rules (TS = ``<|thinking|>``, TE = ``<|/thinking|>``, RS = ``<|reflect|>``, RE = ``<|/reflect|>``):

    Thinking region, first rule that applies:
      1. complete block: the *last* TS that has a TE somewhere after it; the region runs from it to
         the first TE after it (an earlier TS without its own TE - a nested/restarted start - is
         therefore ignored, and later stray TEs do not extend the block);
      2. missing start: no TS before any TE -> from the start of the text to the first TE;
      3. unclosed: a TS but no TE after it -> from the last TS to the end of the text;
      4. no thinking markup at all -> empty thinking.
      In the region, complete reflect blocks are removed and an unclosed RS cuts it ("up to a
      reflect"); the rest, stripped of special tokens, is the thinking.

    Reflection: the last RS that has an RE after it, up to the first RE after it; else an unclosed
    RS up to the next TE or the end of the text; else empty (an RE without any RS gives nothing:
    where it started cannot be told).

    Answer: the text after the *last* TE. With no TE: empty when a TS exists (thinking never closed,
    so no answer), otherwise the whole text. In that region complete reflect blocks are removed, an
    unclosed TS or RS cuts it (a new block the model never finished is not answer), and remaining
    special tokens are stripped.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_spans expects a str, got {type(text).__name__}")
    last_te = text.rfind(THINK_END)
    region = _thinking_region(text, last_te)
    return Spans(thinking="" if region is None else strip_special_tokens(_remove_reflect(region)),
                 reflect=strip_special_tokens(_reflect_region(text)),
                 answer=strip_special_tokens(_answer_region(text, last_te)),
                 thinking_closed=last_te >= 0)
