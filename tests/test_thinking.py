"""The thinking room (preflexor_core/thinking): one prompt builder, one list of formats, the tokens, and
every stage asking it rather than restating it.

Run: ``python -m pytest -q tests/test_thinking.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from preflexor_core.thinking import formats, tokens
from preflexor_core.thinking.formats import (GRAPH_INSTRUCTION, THINKING_FORMATS, THINKING_INSTRUCTION, chat,
                                             check_format_name, instruction, prompt)

ROOT = Path(__file__).resolve().parents[1]


def test_the_formats_come_from_one_literal():
    assert THINKING_FORMATS == ("categories", "graph")
    assert formats.ThinkingFormat.__args__ == THINKING_FORMATS


@pytest.mark.parametrize("fmt, suffix", [("categories", THINKING_INSTRUCTION), ("graph", GRAPH_INSTRUCTION)])
def test_prompt_strips_the_question_and_appends_the_instruction(fmt, suffix):
    assert prompt("  Why is nacre tough?\n", fmt) == "Why is nacre tough?" + suffix
    assert instruction(fmt) == suffix
    assert chat(" q ", fmt) == [{"role": "user", "content": "q" + suffix}]


def test_the_default_format_is_the_papers():
    assert prompt("q") == "q" + THINKING_INSTRUCTION


def test_an_unknown_format_names_the_formats():
    with pytest.raises(ValueError, match=r"--thinking-format must be one of categories, graph, got 'tree'"):
        check_format_name("tree", where="--thinking-format")
    with pytest.raises(ValueError, match="categories, graph"):
        prompt("q", "tree")


def test_the_tokens_are_the_papers_and_the_trained_ids_keep_their_order():
    assert tokens.THINKING_TOKENS == ["<|thinking|>", "<|/thinking|>", "<|reflect|>", "<|/reflect|>"]
    assert tokens.TRAINED_SPECIAL_TOKENS[5:] == tokens.THINKING_TOKENS
    assert tokens.strip_pipeline_tags("a<|thinking|>b<|/reflect|>c") == "abc"


def test_every_training_prompt_is_built_by_the_one_prompt():
    from preflexor_core.train.grpo_stage import GRPOPrompt
    assert GRPOPrompt("  q? ", "ref", None).prompt == prompt("q?", "graph")


def _source(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["THINKING_INSTRUCTION", "GRAPH_INSTRUCTION"])
def test_no_stage_appends_an_instruction_itself(name):
    """Outside the thinking room the instructions are never concatenated to a question by hand."""
    users = []
    for p in sorted((ROOT / "preflexor_core").rglob("*.py")):
        if "thinking" in p.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and any(
                    isinstance(side, ast.Name) and side.id == name for side in (node.left, node.right)):
                users.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not users, f"{name} added to a question outside thinking/formats.py: {users}"


def test_no_stage_restates_the_format_names():
    """The tuple ("categories", "graph") lives in thinking/formats.py only."""
    restated = []
    for p in sorted((ROOT / "preflexor_core").rglob("*.py")):
        if p.name == "formats.py" and p.parent.name == "thinking":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List)) and {getattr(e, "value", None) for e in node.elts} == \
                    {"categories", "graph"}:
                restated.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not restated, f"the format names restated: {restated}"
