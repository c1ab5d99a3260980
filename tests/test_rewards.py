"""Rewards of graph-format completions on hand-written completions (valid, broken JSON, dangling
edges, disagreeing sections, ungrounded nodes, missing and shuffled sections, unclosed thinking),
correctness against hand-computed F1 / ROUGE-L, the combiner, and the HTTP judge against a
counting server on 127.0.0.1 (cache, concurrency, retries, failures)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import networkx as nx
import numpy as np
import pytest

from preflexor_core.thinking.graph import format_graph_thinking
from preflexor_core.thinking.layout import join_chosen
from preflexor_core.retrieval import GraphRetriever
from preflexor_core.retrieval.embedding import HashingEmbedder
from preflexor_core.retrieval.graph import KnowledgeGraph
from preflexor_core.rewards import (CorpusConcepts, GraphRewards, HTTPJudge, JudgeError, Reward, RewardWeights,
                                    answer_concepts, combine_rewards, correctness_reward, format_reward,
                                    graph_utility_reward, graph_validity_reward, groundedness_reward, parse_grade)
from preflexor_core.thinking.graph_io import completion_graph, json_digraph
from preflexor_core.thinking.graph_io import GraphJSONError
from preflexor_core.thinking.tokens import THINK_END, THINK_START

CORPUS = [
    "Spider silk contains beta-sheet nanocrystals. Beta-sheet nanocrystals raise the strength of spider silk. "
    "Nacre is a composite of aragonite platelets.",
    "Nacre deflects cracks. The toughness of nacre comes from aragonite platelets and a soft organic matrix. "
    "Bone is made of collagen fibrils and hydroxyapatite.",
    "Collagen fibrils give bone its toughness. Hydroxyapatite is stiff and brittle. Wood contains cellulose fibrils.",
]
EDGES = [("spider silk", "contains", "beta-sheet nanocrystal"), ("nacre", "made of", "aragonite platelet"),
         ("collagen fibril", "toughens", "bone")]
ANSWER = "Beta-sheet nanocrystals strengthen spider silk, and aragonite platelets give nacre its toughness."
JSON_OK = json.dumps({"nodes": [{"id": n} for n in ["spider silk", "beta-sheet nanocrystal", "nacre",
                                                     "aragonite platelet", "collagen fibril", "bone"]],
                      "edges": [{"source": s, "relation": r, "target": t} for s, r, t in EDGES]})
GRAPH_LINES = "\n".join(f"{s} -[{r}]-> {t}" for s, r, t in EDGES)


def completion(graph=GRAPH_LINES, js=JSON_OK, sections=("Brainstorm", "Graph", "Graph JSON", "Patterns", "Synthesis"),
               answer=ANSWER, close=True):
    texts = {"Brainstorm": "Silk, nacre and bone.", "Graph": graph, "Graph JSON": js,
             "Patterns": "stiff phase -> toughness", "Synthesis": "Stiff crystals in a soft matrix."}
    body = "".join(f"**{s}**:\n\n{texts[s]}\n\n" for s in sections)
    return f"{THINK_START}\n{body}" + (f"{THINK_END}\n{answer}" if close else "")


VALID = completion()


@pytest.fixture(scope="module")
def retriever():
    return GraphRetriever.build(CORPUS, embedder=HashingEmbedder())


@pytest.fixture(scope="module")
def corpus(retriever):
    return CorpusConcepts.from_graph(retriever)


def test_valid_completion_is_what_the_formatter_writes():
    nodes = [n["id"] for n in json.loads(JSON_OK)["nodes"]]
    written = join_chosen(format_graph_thinking("Silk, nacre and bone.", EDGES, "stiff phase -> toughness",
                                                "Stiff crystals in a soft matrix.", nodes=nodes), ANSWER)
    assert written == VALID


# ----------------------------------------------------------------------------- format
def test_format_reward_valid():
    r = format_reward(VALID)
    assert r == Reward(1.0, {"thinking": 1.0, "sections": 1.0, "order": 1.0, "answer": 1.0}, "ok")


def test_format_reward_missing_sections():
    r = format_reward(completion(sections=("Brainstorm", "Graph", "Graph JSON")))
    assert r.components == {"thinking": 1.0, "sections": 0.6, "order": 0.6, "answer": 1.0}
    assert r.value == pytest.approx(0.8) and r.note == "missing sections: Patterns, Synthesis"


def test_format_reward_out_of_order():
    r = format_reward(completion(sections=("Synthesis", "Graph", "Graph JSON", "Patterns", "Brainstorm")))
    assert r.components["sections"] == 1.0 and r.components["order"] == pytest.approx(3 / 5)
    assert r.note == "sections out of order"


def test_format_reward_unclosed_empty_answer_and_prefix():
    r = format_reward(completion(close=False))
    assert r.components["thinking"] == 0.0 and r.components["answer"] == 0.0
    assert r.value == pytest.approx(0.5) and r.note == "thinking not closed"
    assert format_reward(completion(answer="  ")).note == "empty answer"
    pre = format_reward("Sure. " + VALID)
    assert pre.components["thinking"] == 0.0 and pre.note == "text before <|thinking|>"
    assert format_reward("plain text answer").value == pytest.approx(0.25)   # only the answer is there


# ----------------------------------------------------------------------------- graph validity
def test_graph_validity_valid():
    r = graph_validity_reward(VALID)
    assert r == Reward(1.0, {"json": 1.0, "no_dangling": 1.0, "agreement": 1.0}, "ok")


def test_graph_validity_broken_json():
    r = graph_validity_reward(completion(js=JSON_OK[:-3]))
    assert r.value == 0.0 and r.components == {"json": 0.0, "no_dangling": 0.0, "agreement": 0.0}
    assert r.note.startswith("Graph JSON does not parse")
    assert graph_validity_reward(completion(sections=("Brainstorm", "Graph"))).note == "no Graph JSON section"


@pytest.mark.parametrize("obj, msg", [
    ([], "must be an object"),
    ({"nodes": []}, 'needs a "edges" array, got nothing'),
    ({"nodes": {}, "edges": []}, 'needs a "nodes" array, got an object'),
    ({"nodes": [{"name": "a"}], "edges": []}, r'nodes\[0\] has no "id"'),
    ({"nodes": [{"id": ["a"]}], "edges": []}, r"nodes\[0\].id must be a string, got an array"),
    ({"nodes": ["a"], "edges": [{"source": "a"}]}, r'edges\[0\] has no "target"'),
    ({"nodes": ["a"], "edges": ["a->b"]}, r"edges\[0\] must be an object"),
    ({"nodes": ["a", " "], "edges": []}, r"nodes\[1\].id is empty"),
])
def test_json_schema_errors_name_the_item(obj, msg):
    with pytest.raises(GraphJSONError, match=msg):
        json_digraph(obj)
    r = graph_validity_reward(completion(js=json.dumps(obj)))
    assert r.value == 0.0 and r.components["json"] == 0.0


def test_graph_validity_dangling_edges():
    obj = json.loads(JSON_OK)
    obj["nodes"] = [n for n in obj["nodes"] if n["id"] != "bone"]
    r = graph_validity_reward(completion(js=json.dumps(obj)))
    assert r.components == {"json": 1.0, "no_dangling": pytest.approx(2 / 3), "agreement": 1.0}
    assert r.value == pytest.approx((1 + 2 / 3 + 1) / 3) and r.note == "dangling edges"
    g, edges = json_digraph(obj)
    assert isinstance(g, nx.DiGraph) and g.nodes["bone"]["declared"] is False
    assert g.edges["collagen fibril", "bone"]["relation"] == "toughens" and len(edges) == 3


def test_graph_validity_agreement_is_jaccard_of_normalised_triples():
    # text and JSON differ in one relation; case and plurals do not count as differences
    lines = "Spider Silks -[contains]-> beta-sheet nanocrystals\nnacre -[made of]-> aragonite platelet\n" \
            "collagen fibril -[weakens]-> bone"
    r = graph_validity_reward(completion(graph=lines))
    assert r.components["agreement"] == pytest.approx(2 / 4)
    assert r.note == "Graph and Graph JSON disagree"
    assert graph_validity_reward(completion(graph="")).components["agreement"] == 0.0


def test_graph_validity_empty_graph():
    r = graph_validity_reward(completion(graph="", js='{"nodes": [{"id": "a"}], "edges": []}'))
    assert r.components == {"json": 1.0, "no_dangling": 0.0, "agreement": 0.0}
    assert r.note == "Graph JSON has no edges"


# ----------------------------------------------------------------------------- groundedness
def test_corpus_concepts(corpus, retriever):
    assert corpus.has_concept("Spider Silks") and corpus.has_concept("aragonite platelet")
    assert not corpus.has_concept("unicorn horn")
    assert corpus.cooccur("spider silk", "beta-sheet nanocrystals")
    assert not corpus.cooccur("nacre", "bone")            # same chunk, never one sentence
    assert len(corpus.sentences_with("toughness")) == 2
    same = CorpusConcepts.from_graph(retriever.graph)      # a KnowledgeGraph works too
    assert same.concepts == corpus.concepts and same.sentences == corpus.sentences


def test_corpus_concepts_needs_texts(tmp_path, retriever):
    retriever.graph.to_json(tmp_path / "g.json")           # chunk texts left out
    with pytest.raises(ValueError, match="chunk nodes have no text"):
        CorpusConcepts.from_graph(KnowledgeGraph.from_json(tmp_path / "g.json"))
    with pytest.raises(ValueError, match="0 concept and 0 chunk nodes"):
        CorpusConcepts.from_graph(nx.Graph())
    with pytest.raises(TypeError, match="needs a GraphRetriever"):
        CorpusConcepts.from_graph("corpus.txt")


def test_groundedness_valid(corpus, retriever):
    r = groundedness_reward(VALID, corpus)
    assert r == Reward(1.0, {"nodes": 1.0, "edges": 1.0}, "ok")
    assert groundedness_reward(VALID, retriever) == r        # a retriever is accepted directly


def test_groundedness_ungrounded_nodes_and_edges(corpus):
    lines = "unicorn horn -[contains]-> spider silk\nnacre -[contains]-> bone"
    js = json.dumps({"nodes": [{"id": n} for n in ("unicorn horn", "spider silk", "nacre", "bone")],
                     "edges": [{"source": "unicorn horn", "relation": "contains", "target": "spider silk"},
                               {"source": "nacre", "relation": "contains", "target": "bone"}]})
    r = groundedness_reward(completion(graph=lines, js=js), corpus)
    # 3 of 4 nodes are corpus concepts; neither edge's endpoints share a corpus sentence
    assert r.components == {"nodes": 0.75, "edges": 0.0}
    assert r.value == pytest.approx(0.375)


def test_groundedness_falls_back_to_the_text_graph(corpus):
    r = groundedness_reward(completion(js="{broken"), corpus)
    assert r.value == 1.0 and "Graph JSON invalid" in r.note
    assert completion_graph(completion(js="{broken"))[2] == "text"
    none = groundedness_reward(completion(graph="", js="{broken"), corpus)
    assert none.value == 0.0 and none.note == "no graph"


# ----------------------------------------------------------------------------- graph utility
def test_answer_concepts(corpus):
    assert answer_concepts("Nacre and bone deflect cracks; unicorns do not.", corpus) == ["nacre", "bone", "crack"]


def test_graph_utility(corpus):
    wanted = answer_concepts(ANSWER, corpus)
    assert "toughness" in wanted and "spider silk" in wanted and "silk" in wanted
    r = graph_utility_reward(VALID, corpus)
    # every concept but "toughness" is named by a node ("silk" inside "spider silk")
    assert r.value == pytest.approx(1 - 1 / len(wanted)) and r.note == "not in the graph: toughness"
    full = graph_utility_reward(completion(answer="Spider silk contains beta-sheet nanocrystals."), corpus)
    assert full.value == 1.0 and full.note == "ok"
    assert graph_utility_reward(completion(answer="Yes."), corpus).note == "answer has no concepts"
    assert graph_utility_reward(completion(graph="", js="{"), corpus).note == "no graph"
    # no corpus: the answer's key terms; a concept no node names earns the share of its words in nodes
    assert answer_concepts("Nacre deflects cracks well.") == ["nacre deflect crack", "crack"]
    partial = graph_utility_reward(completion(answer="Nacre deflects cracks well."), None)
    assert partial.value == pytest.approx((1 / 3 + 0) / 2)


# ----------------------------------------------------------------------------- correctness
class FixedEmbedder:
    name, dim = "fixed", 2

    def __init__(self, table):
        self.table = table

    def encode(self, texts, batch_size=64):
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_correctness_hand_computed():
    # pred tokens [silk, is, strong], gold [spider, silk, is, very, strong]: P = 1, R = 3/5, F1 = 0.75;
    # the LCS is also 3 tokens, so ROUGE-L = 0.75
    r = correctness_reward(completion(answer="Silk is strong."), "The spider silk is very strong")
    assert r.components == {"f1": pytest.approx(0.75), "rouge_l": pytest.approx(0.75)}
    # order matters for ROUGE-L only: LCS of [strong, is, silk] and the gold is 1 token
    r2 = correctness_reward(completion(answer="strong is silk"), "spider silk is very strong")
    assert r2.components["f1"] == pytest.approx(0.75)
    assert r2.components["rouge_l"] == pytest.approx(2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5))


def test_correctness_with_embedder_and_empty_answer():
    emb = FixedEmbedder({"x y": [1.0, 0.0], "x z": [0.6, 0.8], "neg": [-1.0, 0.0]})
    r = correctness_reward(completion(answer="x y"), "x z", embedder=emb)
    assert r.components["cosine"] == pytest.approx(0.6)
    assert r.value == pytest.approx((0.5 + 0.5 + 0.6) / 3)     # F1 = ROUGE-L = 1/2 (one of two tokens)
    assert correctness_reward(completion(answer="neg"), "x y", embedder=emb).components["cosine"] == 0.0
    same = correctness_reward(completion(answer="Silk is tough."), "silk is tough", embedder=HashingEmbedder())
    assert same.value == pytest.approx(1.0, abs=1e-6)
    empty = correctness_reward(completion(close=False), "x y", embedder=emb)
    assert empty.value == 0.0 and empty.note == "empty answer"
    with pytest.raises(ValueError, match="reference answer is empty"):
        correctness_reward(VALID, " ")


# ----------------------------------------------------------------------------- combiner
def test_combine_rewards_weighted_mean_and_components():
    parts = {"format": Reward(1.0, {"thinking": 1.0}), "graph_validity": Reward(0.5, {"json": 1.0}, "dangling edges")}
    r = combine_rewards(parts, RewardWeights(format=1.0, graph_validity=3.0))
    assert r.value == pytest.approx((1.0 + 3 * 0.5) / 4)
    assert r.components == {"format": 1.0, "format.thinking": 1.0, "graph_validity": 0.5, "graph_validity.json": 1.0}
    assert r.note == "graph_validity: dangling edges"
    with pytest.raises(ValueError, match="unknown reward"):
        combine_rewards({"style": Reward(1.0)})
    with pytest.raises(ValueError, match="no reward with a weight > 0"):
        combine_rewards(parts, RewardWeights(format=0, graph_validity=0))


def test_reward_weights_validation():
    assert RewardWeights().graph_utility == 0.5
    assert RewardWeights.from_dict({"judge": 2}).judge == 2.0
    with pytest.raises(ValueError, match="unknown reward"):
        RewardWeights.from_dict({"fmt": 1})
    with pytest.raises(ValueError, match="format must be a float >= 0"):
        RewardWeights(format=-1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Reward(1.5)


def test_graph_rewards_scores_and_ranks(retriever, corpus):
    scorer = GraphRewards(corpus=retriever)
    ref = "Beta-sheet nanocrystals make spider silk strong; aragonite platelets toughen nacre."
    texts = [VALID, completion(js="{broken"), completion(sections=("Brainstorm", "Graph")), completion(close=False)]
    out = scorer.score_many(texts, references=[ref] * 4)
    w = RewardWeights()
    parts = [format_reward(VALID), graph_validity_reward(VALID), groundedness_reward(VALID, corpus),
             graph_utility_reward(VALID, corpus), correctness_reward(VALID, ref)]
    weights = [w.format, w.graph_validity, w.groundedness, w.graph_utility, w.correctness]
    assert out[0].value == pytest.approx(sum(a * p.value for a, p in zip(weights, parts)) / sum(weights))
    assert out[0].components["groundedness.edges"] == 1.0 and "correctness.f1" in out[0].components
    assert out[0].value > max(o.value for o in out[1:])
    assert "judge" not in out[0].components
    # without corpus and reference, groundedness and correctness drop out (renormalised)
    bare = GraphRewards().score(VALID)
    assert set(k for k in bare.components if "." not in k) == {"format", "graph_validity", "graph_utility"}
    with pytest.raises(ValueError, match="2 references for 1 completions"):
        scorer.score_many([VALID], references=[ref, ref])


# ----------------------------------------------------------------------------- judge
class JudgeServer:
    """An OpenAI-compatible server on 127.0.0.1 that counts requests: grade 8 for answers that
    mention silk, "2/10" otherwise; HTTP 400 when the prompt holds "boom"; 503 for the first
    ``fail_first`` requests; each reply after ``delay`` seconds."""

    def __init__(self, delay=0.0, fail_first=0):
        self.count, self.in_flight, self.max_in_flight = 0, 0, 0
        self.delay, self.fail_first, self.lock = delay, fail_first, threading.Lock()
        self.bodies = []
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    srv.count += 1
                    n = srv.count
                    srv.bodies.append(body)
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                time.sleep(srv.delay)
                with srv.lock:
                    srv.in_flight -= 1
                prompt = body["messages"][0]["content"]
                answer = prompt.split("Answer to grade:")[1].split("\n")[0]
                if n <= srv.fail_first:
                    code, reply = 503, {"error": "busy"}
                elif "boom" in prompt:
                    code, reply = 400, {"error": {"message": "bad prompt"}}
                else:
                    code = 200
                    reply = {"choices": [{"message": {"content": "8" if "silk" in answer.lower() else "2/10"}}]}
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer(delay=0.1)
    yield s
    s.close()


def test_parse_grade():
    assert parse_grade("7") == 7.0 and parse_grade("Grade: 8.5/10") == 8.5 and parse_grade(" 10 ") == 10.0
    assert parse_grade("none") is None and parse_grade("42") is None and parse_grade("") is None


def test_judge_scores_caches_and_reruns_for_free(server, tmp_path):
    cache = tmp_path / "judge" / "cache.json"
    qs = ["Why is silk strong?", "What is nacre?", "Why is silk strong?", "What is bone?"]
    cs = [completion(answer="Silk has nanocrystals."), completion(answer="Nacre is a composite."),
          completion(answer="Silk has nanocrystals."), completion(answer="Bone is bone.")]
    judge = HTTPJudge(server.url, "judge-model", cache_path=cache, concurrency=4)
    out = judge.score_many(qs, cs, ["ref"] * 4)
    assert [r.value for r in out] == [0.8, 0.2, 0.8, 0.2]
    assert server.count == 3 and judge.requests == 3          # the repeated item is asked once
    assert server.max_in_flight >= 2                          # requests ran concurrently
    assert server.bodies[0]["model"] == "judge-model" and server.bodies[0]["temperature"] == 0.0
    assert len(json.loads(cache.read_text())) == 3
    again = HTTPJudge(server.url, "judge-model", cache_path=cache)
    assert [r.value for r in again.score_many(qs, cs, ["ref"] * 4)] == [0.8, 0.2, 0.8, 0.2]
    assert server.count == 3 and again.requests == 0          # a rerun costs nothing
    other = HTTPJudge(server.url, "other-model", cache_path=cache)
    other.score_many(qs[:1], cs[:1], ["ref"])
    assert server.count == 4                                  # the key includes the model


def test_judge_retries_and_failures(tmp_path):
    s = JudgeServer(fail_first=1)
    try:
        judge = HTTPJudge(s.url, "m", cache_path=tmp_path / "c.json", backoff_base=0.01, max_retries=2)
        assert judge.score_many(["q"], [completion(answer="silk")])[0].value == 0.8
        assert s.count == 2 and judge.client.retries == 1
        with pytest.raises(JudgeError, match="1 of 2 judge requests"):
            judge.score_many(["q", "q"], [completion(answer="boom"), completion(answer="Silk again")])
        assert s.count == 4
        judge.score_many(["q"], [completion(answer="Silk again")])    # the good one was cached
        assert s.count == 4
    finally:
        s.close()


def test_judge_in_graph_rewards_and_bad_inputs(server, tmp_path):
    judge = HTTPJudge(server.url, "m", cache_path=tmp_path / "c.json")
    scorer = GraphRewards(judge=judge, weights=RewardWeights(format=1, graph_validity=0, graph_utility=0, judge=1))
    r = scorer.score(completion(answer="Silk."), question="q")
    assert r.components["judge"] == 0.8 and r.value == pytest.approx((1.0 + 0.8) / 2)
    with pytest.raises(ValueError, match="needs the questions"):
        scorer.score(VALID)
    with pytest.raises(ValueError, match="must contain {answer}"):
        HTTPJudge(server.url, "m", prompt="Grade {question}")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object of replies"):
        HTTPJudge(server.url, "m", cache_path=bad)
