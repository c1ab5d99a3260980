"""The thinking formats by name, and the one prompt that asks for them.

Two formats: ``"categories"`` (the paper's: ``**Reasoning Steps**``, ``**Relevant Materials or
Concepts**`` ... inside the thinking span; PRefLexOR, arXiv 2410.12375, Sec. 2.2) and ``"graph"``
(Graph-PRefLexOR, arXiv 2501.08120: Brainstorm, Graph, Graph JSON, Patterns, Synthesis).

    prompt("What makes nacre tough?", "categories")   # -> "What makes nacre tough? Use <|thinking|>."

Training prompts (datagen, GRPO), inference and evaluation all build the user turn with
``prompt``, so the model sees the same instruction everywhere.

Tests: ``python -m pytest -q tests/test_thinking.py``.
"""
from __future__ import annotations

from typing import Literal, get_args

ThinkingFormat = Literal["categories", "graph"]
THINKING_FORMATS: tuple[str, ...] = get_args(ThinkingFormat)

# Appended to a question to ask for the format.
THINKING_INSTRUCTION = " Use <|thinking|>."
GRAPH_INSTRUCTION = (" Use <|thinking|> with the sections Brainstorm, Graph (one 'a -[relation]-> b' per line), "
                     "Graph JSON, Patterns and Synthesis.")
_INSTRUCTIONS = {"categories": THINKING_INSTRUCTION, "graph": GRAPH_INSTRUCTION}


def check_format_name(fmt: str, where: str = "thinking_format") -> str:
    """``fmt`` when it names a thinking format; else a ValueError that lists the formats."""
    if fmt not in _INSTRUCTIONS:
        raise ValueError(f"{where} must be one of {', '.join(THINKING_FORMATS)}, got {fmt!r}")
    return fmt


def instruction(fmt: str = "categories") -> str:
    """The sentence appended to a question to ask for ``fmt``."""
    return _INSTRUCTIONS[check_format_name(fmt)]


def prompt(question: str, fmt: str = "categories") -> str:
    """The user turn: the question (surrounding whitespace stripped) and the instruction for ``fmt``."""
    return question.strip() + instruction(fmt)


def chat(question: str, fmt: str = "categories") -> list[dict]:
    """``prompt`` as a one-turn chat, ready for the tokenizer's chat template."""
    return [{"role": "user", "content": prompt(question, fmt)}]
