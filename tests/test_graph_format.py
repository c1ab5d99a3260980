"""The graph thinking format: the formatter's exact layout, the parser on its output and on
hand-written, imperfect completions (other header spellings, list items, fenced or broken JSON,
missing sections, an unclosed thinking block)."""
import json

import pytest

from preflexor_core.thinking.graph import (GRAPH_SECTIONS, Edge, format_edge,
                                           format_graph_thinking, graph_json, parse_edge, parse_graph_thinking)
from preflexor_core.thinking.layout import join_chosen
from preflexor_core.thinking.tokens import THINK_END, THINK_START

EDGES = [("spider silk", "contains", "beta-sheet nanocrystal"), ("beta-sheet nanocrystal", "raises", "strength")]


def test_format_layout_is_exact():
    text = format_graph_thinking("silk ideas", EDGES, "a chain", "silk is strong", nodes=None)
    js = json.dumps({"nodes": [{"id": "spider silk"}, {"id": "beta-sheet nanocrystal"}, {"id": "strength"}],
                     "edges": [{"source": "spider silk", "relation": "contains", "target": "beta-sheet nanocrystal"},
                               {"source": "beta-sheet nanocrystal", "relation": "raises", "target": "strength"}]})
    assert text == (f"{THINK_START}\n**Brainstorm**:\n\nsilk ideas\n\n**Graph**:\n\n"
                    "spider silk -[contains]-> beta-sheet nanocrystal\nbeta-sheet nanocrystal -[raises]-> strength\n\n"
                    f"**Graph JSON**:\n\n{js}\n\n**Patterns**:\n\na chain\n\n**Synthesis**:\n\nsilk is strong\n\n"
                    f"{THINK_END}")


def test_round_trip():
    thinking = format_graph_thinking("Brainstorm text.", EDGES, "Pattern: A -> B -> C.", "Synthesis text.",
                                     nodes=["spider silk", "strength", "beta-sheet nanocrystal", "toughness"])
    text = join_chosen(thinking, "  Silk is strong because of its nanocrystals. ")
    p = parse_graph_thinking(text)
    assert p.sections == list(GRAPH_SECTIONS)
    assert p.thinking_closed and p.n_think_start == 1 and p.n_think_end == 1
    assert p.edges == [Edge(*e) for e in EDGES] and p.bad_edge_lines == []
    assert p.graph_json == graph_json(EDGES, ["spider silk", "strength", "beta-sheet nanocrystal", "toughness"])
    assert p.json_error == ""
    assert p.texts["Patterns"] == "Pattern: A -> B -> C." and p.texts["Brainstorm"] == "Brainstorm text."
    assert p.answer == "Silk is strong because of its nanocrystals."


def test_parser_tolerates_other_spellings():
    text = (f"{THINK_START}\n** brainstorm ** : silk and bone\n**GRAPH**:\n- silk -[ is a ]-> protein fiber\n"
            "2. bone -[contains]-> collagen\nnot an edge here\n\n**Graph   JSON**:\n```json\n"
            '{"nodes": [{"id": "silk"}], "edges": []}\n```\n**Patterns**:\n\n**Synthesis**: short\n'
            f"{THINK_END}\nThe answer.")
    p = parse_graph_thinking(text)
    assert p.sections == list(GRAPH_SECTIONS)
    assert p.texts["Brainstorm"] == "silk and bone" and p.texts["Synthesis"] == "short"
    assert p.texts["Patterns"] == ""
    assert p.edges == [Edge("silk", "is a", "protein fiber"), Edge("bone", "contains", "collagen")]
    assert p.bad_edge_lines == ["not an edge here"]
    assert p.graph_json == {"nodes": [{"id": "silk"}], "edges": []}


def test_missing_sections_out_of_order_and_unclosed():
    text = f"{THINK_START}\n**Synthesis**:\n\nx\n\n**Brainstorm**:\n\ny\n\n**Brainstorm**:\n\nz\n"
    p = parse_graph_thinking(text)
    assert p.sections == ["Synthesis", "Brainstorm", "Brainstorm"]
    assert p.texts["Brainstorm"] == "y"          # the first occurrence
    assert not p.thinking_closed and p.answer == ""
    assert p.graph_json is None and p.json_error == "" and p.edges == []


def test_broken_json_reports_where():
    text = f'{THINK_START}\n**Graph JSON**:\n\n{{"nodes": [{{"id": "a"}}, "edges": []}}\n{THINK_END}\nok'
    p = parse_graph_thinking(text)
    assert p.graph_json is None
    assert p.json_error.startswith("Graph JSON does not parse") and "line 1 column" in p.json_error
    empty = parse_graph_thinking(f"{THINK_START}\n**Graph JSON**:\n\n{THINK_END}\nok")
    assert empty.json_error == "Graph JSON section is empty"


def test_headers_outside_the_thinking_block_are_ignored():
    p = parse_graph_thinking(f"{THINK_START}\n**Brainstorm**:\n\nb\n{THINK_END}\n**Graph**:\n\na -[r]-> b\n")
    assert p.sections == ["Brainstorm"] and p.edges == []
    assert "a -[r]-> b" in p.answer
    assert parse_graph_thinking("**Graph**:\n\na -[r]-> b").sections == []   # no thinking markup at all


def test_parse_edge():
    assert parse_edge("a b -[r s]-> c d") == Edge("a b", "r s", "c d")
    assert parse_edge("* a -[]-> b") == Edge("a", "", "b")
    for line in ("a -> b", "a -[r]->", "-[r]-> b", "a -[r] b"):
        assert parse_edge(line) is None, line


def test_formatter_errors():
    with pytest.raises(ValueError, match="no edges"):
        format_graph_thinking("b", [], "p", "s")
    with pytest.raises(ValueError, match="edge markup"):
        format_edge("a -[x]-> b", "r", "c")
    with pytest.raises(ValueError, match="edge markup"):
        format_edge("a", "r]s", "c")
    with pytest.raises(ValueError, match="empty relation"):
        format_edge("a", "  ", "c")
    with pytest.raises(ValueError, match="edge 0"):
        format_graph_thinking("b", [("a", "r")], "p", "s")
    with pytest.raises(TypeError, match="expects a str"):
        parse_graph_thinking(None)


def test_thinking_closed_and_prefix():
    ok = parse_graph_thinking(f"  {THINK_START}\n**Brainstorm**: b\n{THINK_END}\nanswer")
    assert ok.thinking_closed and ok.prefix == ""
    before = parse_graph_thinking(f"Sure! {THINK_START}\n**Brainstorm**: b\n{THINK_END}\nanswer")
    assert before.thinking_closed and before.prefix == "Sure!"
    for text in (f"{THINK_END} a {THINK_START} b", f"{THINK_START} a {THINK_START} b {THINK_END} c",
                 f"{THINK_START} a {THINK_END} b {THINK_END} c", f"{THINK_START} a"):
        assert not parse_graph_thinking(text).thinking_closed, text
