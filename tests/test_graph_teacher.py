"""The extractive teacher's graph-format chosen side (teachers/graph_writer.py) and its datagen flag:
every edge grounded in one corpus sentence, the output parses and scores 1.0 on format and validity.

Run: ``python -m pytest -q tests/test_graph_teacher.py``.
"""
import json

import pytest

from preflexor_core.thinking.graph import parse_graph_thinking
from preflexor_core.retrieval import GraphRetriever
from preflexor_core.retrieval.context import Context
from preflexor_core.retrieval.embedding import HashingEmbedder
from preflexor_core.rewards import format_reward, graph_validity_reward, groundedness_reward
from preflexor_core.teachers.extractive import ExtractiveTeacher
from preflexor_core.teachers.graph_writer import GraphWriter
from preflexor_core.text.words import mentions, normalize_text, split_sentences
from preflexor_core.train.trainer import shipped_corpus_files


@pytest.fixture(scope="module")
def retriever():
    return GraphRetriever.build(shipped_corpus_files(), embedder=HashingEmbedder())


@pytest.fixture(scope="module")
def cases(retriever):
    teacher = ExtractiveTeacher(retriever, seed=0)
    out = []
    for i in range(6):
        nodes = retriever.random_nodes(3, seed=100 + i)
        q = teacher.make_question(nodes, salt=i)
        ctx = teacher.context(q, seed_hits=nodes)
        out.append((q, teacher.graph_thinking(q, ctx), teacher.answer(q, ctx)))
    return out


def _corpus_sentences(retriever):
    return [normalize_text(s) for c in retriever.chunks for s in split_sentences(c.text)]


def test_every_edge_is_grounded_in_one_corpus_sentence(retriever, cases):
    sents = _corpus_sentences(retriever)
    for q, g, _ in cases:
        assert g.edges, q
        for e in g.edges:
            assert any(mentions(s, e.source) and mentions(s, e.target) for s in sents), (q, e)
        for n in g.nodes:
            assert retriever.graph.has_concept(n), (q, n)


def test_sources_name_the_joining_sentence(retriever, cases):
    by_chunk = {str(c.chunk_id): " ".join(c.text.split()) for c in retriever.chunks}
    for _, g, _ in cases:
        assert len(g.sources) == len(g.edges)
        for e, src in zip(g.edges, g.sources):
            assert (src["source"], src["relation"], src["target"]) == (e.source, e.relation, e.target)
            assert src["sentence"] in by_chunk[src["chunk_id"]]
            norm = normalize_text(src["sentence"])
            assert mentions(norm, e.source) and mentions(norm, e.target)


def test_chosen_parses_and_scores_full_format_and_validity(retriever, cases):
    for q, g, answer in cases:
        chosen = g.chosen(answer)
        p = parse_graph_thinking(chosen)
        assert p.thinking_closed and not p.bad_edge_lines and p.answer == answer.strip()
        assert format_reward(chosen).value == 1.0, format_reward(chosen).note
        assert graph_validity_reward(chosen).value == 1.0, graph_validity_reward(chosen).note
        assert groundedness_reward(chosen, retriever).value == 1.0, groundedness_reward(chosen, retriever).note


def test_answer_sentences_stay_out_of_the_thinking(cases):
    for _, g, answer in cases:
        p = parse_graph_thinking(g.thinking)
        for name in ("Brainstorm", "Synthesis"):
            for s in split_sentences(p.texts[name]):
                if len(s.split()) > 4:
                    assert s not in answer


def test_no_shared_sentence_is_an_error(retriever):
    ctx = Context(question="q", question_concepts=["zzqx"], neighbours=[], paths=[])
    with pytest.raises(ValueError, match="share a corpus sentence"):
        GraphWriter(retriever).write("q", ctx)


def test_datagen_graph_format_rows(retriever, tmp_path):
    from preflexor_core.datagen import generate_pairs
    teacher = ExtractiveTeacher(retriever, seed=1)
    rows = generate_pairs(retriever, teacher, n=3, rejected_from="teacher", thinking_format="graph", seed=5,
                          out_path=tmp_path / "pairs.jsonl", progress=False)
    assert len(rows) >= 2
    for r in rows:
        assert r["thinking_format"] == "graph" and r["sources"]
        assert format_reward(r["chosen"]).value == 1.0
        assert graph_validity_reward(r["chosen"]).value == 1.0
        assert "Graph JSON" in r["prompt"]
    saved = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(x["sources"] for x in saved)
