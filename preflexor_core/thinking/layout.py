"""The text layout of a preference row: the thinking scratchpad, the chosen response, the answer
part of a response, and the cleaning of teacher replies.

``chosen`` is exactly::

    <|thinking|>\\n**Reasoning Steps**:\\n\\n{text}\\n\\n**Relevant Materials or Concepts**:\\n\\n{text}\\n\\n...<|/thinking|>\\n{answer}

i.e. ``THINK_START + "\\n" + "".join(f"**{cat}**:\\n\\n{text}\\n\\n") + THINK_END + "\\n" + answer``
(empty sections are left out).

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.2 (thinking tokens and categories).

Tests: ``python -m pytest -q tests/test_datagen.py -k format``.
"""
from __future__ import annotations

import re
from typing import Sequence

from .tokens import THINK_END, THINK_START
from .tokens import strip_pipeline_tags


# The paper's thinking categories (PRefLexOR, Sec. 2.2).
DEFAULT_CATEGORIES = ("Reasoning Steps", "Relevant Materials or Concepts", "Design Principles",
                      "Material Properties", "Hypothesis", "Additional Background")


def format_thinking(sections: Sequence[tuple[str, str]]) -> str:
    """``<|thinking|>\\n**Cat**:\\n\\n{text}\\n\\n...<|/thinking|>`` (sections with text only)."""
    body = "".join(f"**{cat}**:\n\n{text.strip()}\n\n" for cat, text in sections if text and text.strip())
    return f"{THINK_START}\n{body}{THINK_END}"


def join_chosen(thinking: str, answer: str) -> str:
    """A response: the thinking block, a newline, the answer (the chosen side of a preference row)."""
    return f"{thinking}\n{answer.strip()}"


def format_chosen(sections: Sequence[tuple[str, str]], answer: str) -> str:
    return join_chosen(format_thinking(sections), answer)


def answer_part(text: str) -> str:
    """The answer after the last ``<|/thinking|>``; "" when a thinking span never closes."""
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1].strip()
    if THINK_START in text:
        return ""
    return text.strip()


def strip_thinking_tokens(text: str) -> str:
    """``text`` without the pipeline's own tags (thinking and reflect): text the pipeline did not write
    must not open or close its structure. Every other control token's string is encoded as plain text
    when rows are tokenised (``Tokenizer.encode_text``)."""
    return strip_pipeline_tags(text).strip()


def clean_section(category: str, text: str) -> str:
    """A teacher's section text without thinking tokens or an echoed heading."""
    text = strip_thinking_tokens(text or "")
    # an LLM may echo the heading: "**Design Principles**:" / "Design Principles:"
    text = re.sub(rf"^\s*(\*\*)?{re.escape(category)}(\*\*)?\s*:?\s*(\*\*)?\s*", "", text, flags=re.I)
    return text.strip()


def clean_question(text: str) -> str:
    """The question of a teacher reply: its first line ending in "?" (else its first line),
    without a "Question 1:" label or quotes."""
    text = strip_thinking_tokens(text or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    q = next((ln for ln in lines if ln.endswith("?")), lines[0])
    return re.sub(r"^(question\s*\d*\s*[:.)-]\s*)", "", q, flags=re.I).strip().strip('"').strip()
