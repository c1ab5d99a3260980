"""Tests for recursive reflective reasoning (preflexor_core/reasoning/) and the infer.py CLI.

Fixtures are built here: a small byte-level BPE tokenizer, a tiny random Llama saved as a
checkpoint, and a GraphRetriever over a few sentences with the hashing embedder. A random model
writes gibberish, so the tests check structure, determinism, batching and error handling, not
answer quality. Run: ``python -m pytest -q tests/test_reasoning.py``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.reasoning import (GraphCritic, Policy, QuestionTrace, check_endpoint, CriticUnreachableError,
                                      make_critic, recursive_response, recursive_response_from_thinking)
from preflexor_core.thinking.spans import extract_spans, strip_special_tokens
from preflexor_core.reasoning.session import InferConfig, InputError, read_questions
from preflexor_core.thinking.formats import chat
from preflexor_core.retrieval import GraphRetriever
from preflexor_core.retrieval.embedding import HashingEmbedder
from preflexor_core.sampler import SamplingParams
from preflexor_core.thinking.tokens import REFLECT_END, REFLECT_START, THINK_END, THINK_START, THINKING_TOKENS
from preflexor_core.thinking.formats import THINKING_INSTRUCTION

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "infer.py"

CORPUS = [
    "Nacre is a brick-and-mortar composite of aragonite platelets bonded by a thin protein layer.",
    "The protein layer lets aragonite platelets slide, which dissipates energy and makes nacre tough.",
    "Spider silk combines crystalline beta-sheet regions with amorphous protein chains.",
    "The beta-sheet crystals give spider silk its strength, while the amorphous chains give extensibility.",
    "Bone is a hierarchical composite of collagen fibrils and hydroxyapatite mineral crystals.",
    "Collagen fibrils in bone carry tension, and the hydroxyapatite mineral carries compression.",
    "Hierarchical structure is a shared design principle of nacre, bone and spider silk.",
    "Energy dissipation at many length scales makes hierarchical composites resistant to fracture.",
]
QUESTIONS = ["Why is nacre tough?", "How does spider silk combine strength and extensibility?",
             "What role does collagen play in bone?"]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, seed=0)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.train_bpe(CORPUS * 3 + QUESTIONS * 3, vocab_size=400)
    t.add_special_tokens(THINKING_TOKENS)  # train_bpe already has them; a no-op kept for other tokenizers
    return t


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def policy(model, tok):
    return Policy(model, tok)


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def retriever():
    return GraphRetriever.build(list(CORPUS), embedder=HashingEmbedder(128))


@pytest.fixture(scope="module")
def retriever_dir(retriever, tmp_path_factory):
    d = tmp_path_factory.mktemp("retriever")
    retriever.save(str(d))
    return d


def run_infer(*args, cwd=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(INFER), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


def load_infer_module():
    spec = importlib.util.spec_from_file_location("infer_cli", INFER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- span extraction
TS, TE, RS, RE = THINK_START, THINK_END, REFLECT_START, REFLECT_END


@pytest.mark.parametrize("text, thinking, reflect, answer", [
    # well formed
    (f"{TS}step one{TE} the answer", "step one", "", "the answer"),
    (f"{TS}think{RS}do better{RE}{TE}\nanswer", "think", "do better", "answer"),
    (f"{TS}think{TE}{RS}critique{RE} answer", "think", "critique", "answer"),
    # no thinking at all: everything is the answer
    ("just an answer", "", "", "just an answer"),
    ("", "", "", ""),
    # missing start (the start was in the prompt)
    (f"thinking text{TE} answer", "thinking text", "", "answer"),
    # missing end: unclosed thinking, no answer
    (f"{TS}never closed", "never closed", "", ""),
    (f"{TS}unclosed{RS}and unclosed reflection", "unclosed", "and unclosed reflection", ""),
    # repeated blocks: the last complete one wins, the answer follows the last end
    (f"{TS}first{TE} a1 {TS}second{TE} a2", "second", "", "a2"),
    (f"{TS}a{RS}r1{RE}{TE}x{TS}b{RS}r2{RE}{TE} final", "b", "r2", "final"),
    # nested / unbalanced starts: the last start before the end opens the block
    (f"{TS}outer {TS}inner{TE} ans", "inner", "", "ans"),
    # stray extra end: the block stops at its first end, the answer follows the last end
    (f"{TS}a{TE}b{TE}c", "a", "", "c"),
    # a new block opened after the answer and never closed is not answer
    (f"{TS}t{TE} answer {TS}dangling", "t", "", "answer"),
    (f"{TS}t{TE} answer {RS}dangling reflection", "t", "dangling reflection", "answer"),
    # reflection inside thinking is removed from the thinking; text around it is kept
    (f"{TS}before{RS}r{RE}after{TE} ans", "before\nafter", "r", "ans"),
    # unclosed reflection inside thinking ends at the thinking end
    (f"{TS}t{RS}r{TE} ans", "t", "r", "ans"),
    # a reflection end without a start gives no reflection
    (f"{TS}t {RE}{TE} ans", "t", "", "ans"),
    # other special tokens are stripped
    (f"{TS}t{TE} a<|eot_id|>", "t", "", "a"),
    (f"{TS}{TE}", "", "", ""),
])
def test_extract_spans_malformed(text, thinking, reflect, answer):
    sp = extract_spans(text)
    assert (sp.thinking, sp.reflect, sp.answer) == (thinking, reflect, answer)
    for part in (sp.thinking, sp.reflect, sp.answer):
        assert not any(t in part for t in THINKING_TOKENS)


def test_extract_spans_closed_flag_and_type_error():
    assert extract_spans(f"{TS}x{TE}y").thinking_closed
    assert not extract_spans(f"{TS}x").thinking_closed
    assert strip_special_tokens(f"a{TE}b") == "a b"
    with pytest.raises(TypeError):
        extract_spans(None)


# ----------------------------------------------------------------------------- the loop
class CountingCritic:
    """Deterministic critic that records its calls (no model, no retriever)."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def improve(self, question, thinking, feedback):
        self.calls.append("improve")
        return f"improved[{question[:12]}]({len(thinking)})"

    def feedback(self, question, thinking):
        self.calls.append("feedback")
        return f"feedback on {len(thinking)} chars"

    def integrate(self, question, answers):
        self.calls.append("integrate")
        return " | ".join(answers) + " :: merged"


def test_depth0_is_a_single_pass(policy):
    critic = CountingCritic()
    tr = recursive_response(policy, critic, QUESTIONS[0], depth=0, sampling=GREEDY)
    assert isinstance(tr, QuestionTrace)
    assert len(tr.iterations) == 1
    it = tr.iterations[0]
    assert it.improved_thinking is None and not tr.integrated
    assert critic.calls == []
    assert set(it.raw) == {"think"} and it.raw["think"].startswith(THINK_START)
    sp = extract_spans(it.raw["think"])
    assert (it.thinking, it.reflection) == (sp.thinking, sp.reflect)
    assert tr.final_answer == it.answer
    assert it.tokens["think_generated"] >= 1 and it.timings["think_s"] > 0
    # no critic is needed at depth 0
    assert recursive_response(policy, None, QUESTIONS[0], depth=0, sampling=GREEDY).final_answer == tr.final_answer


def test_depth_loop_structure_and_call_counts(policy, monkeypatch):
    calls = []
    orig = Policy.generate

    def counting(self, prompts, params, stream=None, max_batch_size=None):
        calls.append((len(prompts), params.prepend_response))
        return orig(self, prompts, params, stream=stream, max_batch_size=max_batch_size)

    monkeypatch.setattr(Policy, "generate", counting)
    critic = CountingCritic()
    traces = recursive_response(policy, critic, QUESTIONS, depth=2, sampling=GREEDY)
    # one batched generate call per step for all questions: (think, answer) then (reflect, answer)
    assert [n for n, _ in calls] == [3, 3, 3, 3]
    assert calls[0][1] == THINK_START
    assert critic.calls == ["improve"] * 6 + ["integrate"] * 3
    for q, tr in zip(QUESTIONS, traces):
        assert tr.question == q and tr.integrated
        assert [it.iteration for it in tr.iterations] == [1, 2]
        for it in tr.iterations:
            assert it.improved_thinking.startswith(f"improved[{q[:12]}]")
            # the answer pass was forced to start from the improved thinking
            assert it.raw["answer"].startswith(THINK_START + it.improved_thinking + THINK_END + "\n")
            assert it.answer == extract_spans(it.raw["answer"]).answer
            assert {"improve_s", "answer_s", "total_s"} <= set(it.timings)
            assert it.tokens["answer_generated"] >= 1
        # iteration 2 reflects on iteration 1's improved thinking
        assert tr.iterations[1].thinking == tr.iterations[0].improved_thinking
        assert tr.iterations[1].raw["reflect"] is not None
        assert tr.final_answer == " | ".join(it.answer for it in tr.iterations) + " :: merged"


def test_from_thinking_mode_uses_critic_feedback(policy):
    critic = CountingCritic()
    tr = recursive_response_from_thinking(policy, critic, QUESTIONS[1], depth=2, sampling=GREEDY,
                                          integrate=False)
    assert critic.calls == ["feedback", "improve", "feedback", "improve"]
    assert all(it.reflection.startswith("feedback on") for it in tr.iterations)
    assert "reflect" not in tr.iterations[1].raw  # later iterations need no policy thinking pass
    assert not tr.integrated and tr.final_answer == tr.iterations[-1].answer


def test_batch_equals_one_at_a_time(policy, retriever):
    critic = GraphCritic(retriever)
    batched = recursive_response(policy, critic, QUESTIONS, depth=2, sampling=GREEDY)
    for q, b in zip(QUESTIONS, batched):
        single = recursive_response(policy, critic, q, depth=2, sampling=GREEDY)
        assert single.final_answer == b.final_answer
        for s_it, b_it in zip(single.iterations, b.iterations):
            assert (s_it.raw, s_it.thinking, s_it.reflection, s_it.improved_thinking, s_it.answer) == \
                   (b_it.raw, b_it.thinking, b_it.reflection, b_it.improved_thinking, b_it.answer)


def test_stream_deltas_rebuild_generated_text(policy):
    got = {}

    def cb(q, iteration, step, delta):
        got[(q, iteration, step)] = got.get((q, iteration, step), "") + delta

    traces = recursive_response(policy, CountingCritic(), QUESTIONS[:2], depth=1, sampling=GREEDY, stream=cb)
    for q, tr in enumerate(traces):
        it = tr.iterations[0]
        assert got[(q, 1, "think")] == it.raw["think"]  # the forced <|thinking|> is streamed too
        forced = THINK_START + it.improved_thinking + THINK_END + "\n"
        assert forced + got[(q, 1, "answer")] == it.raw["answer"]


def test_long_improved_thinking_loses_oldest_tokens_not_the_question(policy, tok):
    class LongCritic(CountingCritic):
        def improve(self, question, thinking, feedback):
            return "old " * 1500 + "NEWEST FACT"

    tr = recursive_response(policy, LongCritic(), QUESTIONS[0], depth=1, sampling=GREEDY, integrate=False)
    it = tr.iterations[0]
    assert it.tokens["answer_thinking_dropped"] > 0
    forced = extract_spans(it.raw["answer"]).thinking
    assert forced.endswith("NEWEST FACT") and len(forced) < len(it.improved_thinking)
    head = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    room = policy.model.config.max_position_embeddings - GREEDY.max_new_tokens
    assert len(tok.encode(head)) + len(tok.encode(it.raw["answer"])) - it.tokens["answer_generated"] <= room + 2


def test_model_critic_replies_are_never_empty(model, tok):
    from preflexor_core.reasoning import ModelCritic
    c = ModelCritic(model, tok, max_new_tokens=4)
    assert c.improve("q?", "some thinking", "fb")  # a reply, or the old thinking when the reply is empty
    merged = c.integrate_many([("q?", ["first answer", "second answer"]), ("r?", ["", "only answer"])])
    assert len(merged) == 2 and all(isinstance(m, str) and m for m in merged)
    assert isinstance(c.feedback("q?", "t"), str)


def test_bad_arguments(policy):
    with pytest.raises(ValueError, match="empty"):
        recursive_response(policy, CountingCritic(), ["ok", "  "], depth=1)
    with pytest.raises(ValueError, match="depth"):
        recursive_response(policy, CountingCritic(), "q", depth=-1)
    with pytest.raises(ValueError, match="critic"):
        recursive_response(policy, None, "q", depth=1)
    with pytest.raises(ValueError, match="mode"):
        recursive_response(policy, CountingCritic(), "q", depth=1, mode="nope")


# ----------------------------------------------------------------------------- graph thinking format
def _graph_body(edges, nodes=None) -> str:
    """A graph-format thinking without its <|thinking|> tags (what a critic returns)."""
    from preflexor_core.thinking.graph import format_graph_thinking
    block = format_graph_thinking("platelets and protein", edges, "a chain", "it slides", nodes=nodes)
    return block[len(THINK_START):-len(THINK_END)].strip()


# question 1: a valid graph (validity 1); question 2: "protein layer" is not a listed node, so one of
# the two JSON edges dangles: validity (json 1 + no_dangling 1/2 + agreement 1) / 3
GRAPHS = [_graph_body([("nacre", "contains", "aragonite"), ("aragonite", "bonded by", "protein layer")]),
          _graph_body([("nacre", "contains", "aragonite"), ("aragonite", "slides on", "protein layer")],
                      nodes=["nacre", "aragonite"])]
VALIDITY = [1.0, 2.5 / 3]


class GraphWritingCritic(CountingCritic):
    """Improves the thinking of question ``i`` (in QUESTIONS order) into ``GRAPHS[i]``."""

    name = "graph-writing"

    def improve(self, question, thinking, feedback):
        self.calls.append("improve")
        return GRAPHS[QUESTIONS.index(question)]


def test_graph_format_instruction_reaches_the_policy(policy, monkeypatch):
    from preflexor_core.thinking.formats import GRAPH_INSTRUCTION
    assert chat(" q? ", "graph") == [{"role": "user", "content": "q?" + GRAPH_INSTRUCTION}]
    assert chat("q?") == [{"role": "user", "content": "q?" + THINKING_INSTRUCTION}]
    asked = []
    orig = Policy.generate

    def recording(self, prompts, params, stream=None, max_batch_size=None):
        asked.append(list(prompts))
        return orig(self, prompts, params, stream=stream, max_batch_size=max_batch_size)

    monkeypatch.setattr(Policy, "generate", recording)
    recursive_response(policy, CountingCritic(), QUESTIONS[:2], depth=1, sampling=GREEDY, integrate=False,
                       thinking_format="graph")
    think_chats, answer_prompts = asked
    # the think pass gets the chat, the answer pass the rendered prompt: both carry the graph instruction
    assert think_chats == [chat(q, "graph") for q in QUESTIONS[:2]]
    for q, p in zip(QUESTIONS[:2], answer_prompts):
        assert q + GRAPH_INSTRUCTION in p and THINKING_INSTRUCTION not in p
    asked.clear()
    recursive_response(policy, CountingCritic(), QUESTIONS[0], depth=1, sampling=GREEDY, integrate=False)
    assert asked[0] == [chat(QUESTIONS[0])]          # the default is unchanged
    assert QUESTIONS[0] + THINKING_INSTRUCTION in asked[1][0] and GRAPH_INSTRUCTION not in asked[1][0]
    with pytest.raises(ValueError, match="thinking_format must be one of categories, graph"):
        recursive_response(policy, CountingCritic(), "q", depth=1, thinking_format="tree")
    with pytest.raises(ValueError, match="categories, graph"):
        chat("q", "tree")


def test_graph_format_trace_carries_the_rewards_of_each_iteration(policy):
    from preflexor_core.rewards import format_reward, graph_validity_reward
    traces = recursive_response(policy, GraphWritingCritic(), QUESTIONS[:2], depth=2, sampling=GREEDY,
                                integrate=False, thinking_format="graph")
    for tr, graph, validity in zip(traces, GRAPHS, VALIDITY):
        for it in tr.iterations:
            assert it.improved_thinking == graph
            assert it.completion() == it.raw["answer"]
            assert it.completion().startswith(THINK_START + graph + THINK_END + "\n")
            assert set(it.rewards) == {"format", "graph_validity"}
            assert it.rewards["graph_validity"] == pytest.approx(validity)
            assert it.rewards["graph_validity"] == graph_validity_reward(THINK_START + graph + THINK_END).value
            assert it.rewards["format"] == format_reward(it.completion()).value
            # all five sections, in order, in the forced thinking: at least (1 + 1) / 4
            assert it.rewards["format"] >= 0.5
            assert it.to_dict()["rewards"] == it.rewards
        assert tr.to_dict()["iterations"][-1]["rewards"]["graph_validity"] == pytest.approx(validity)
    # depth 0: the thinking pass is scored; the random model writes no graph
    tr = recursive_response(policy, None, QUESTIONS[0], depth=0, sampling=GREEDY, thinking_format="graph")
    it = tr.iterations[0]
    assert it.completion() == it.raw["think"]
    assert it.rewards == {"format": format_reward(it.raw["think"]).value, "graph_validity": 0.0}
    # the categories format records no graph rewards
    tr = recursive_response(policy, GraphWritingCritic(), QUESTIONS[0], depth=1, sampling=GREEDY)
    assert tr.iterations[0].rewards == {}


# ----------------------------------------------------------------------------- graph critic
def test_graph_critic_improves_with_missing_facts_and_paths(retriever):
    c = GraphCritic(retriever, max_facts=2)
    q = "Why is nacre tough?"
    thinking = "Nacre is made of platelets."
    fb = c.feedback(q, thinking)
    assert fb.startswith("Missing concepts:")
    improved = c.improve(q, thinking, fb)
    assert improved.startswith(thinking)
    assert GraphCritic.FACTS_HEADER in improved
    facts = [line[2:] for line in improved.split(GraphCritic.FACTS_HEADER)[1].splitlines() if line.startswith("- ")]
    assert 1 <= len(facts) <= 2
    corpus_sents = {" ".join(s.split()) for s in CORPUS}
    assert all(f in corpus_sents for f in facts)
    assert c.improve(q, thinking, fb) == improved  # deterministic
    # facts already present are not added again
    again = c.improve(q, improved, c.feedback(q, improved))
    for f in facts:
        assert again.count(f) == 1
    # a concept path, when the graph has one, is written as a -> b
    if GraphCritic.PATH_HEADER in improved:
        assert " -> " in improved.split(GraphCritic.PATH_HEADER)[1]


def test_graph_critic_counts_plural_mentions(retriever):
    # concepts are stored singular ("spider silk"); the thinking's plurals mention them
    c = GraphCritic(retriever)
    q = "Why is nacre tough?"
    concepts = c.relevant_concepts(q)
    assert {"spider silk", "design principle", "hierarchical structure"} <= set(concepts)
    fb = c.feedback(q, "Hierarchical structures and design principles of spider silks.")
    missing = fb.split("Missing concepts: ")[1].split(". Add")[0].split(", ")
    assert "nacre" in missing
    assert not {"spider silk", "design principle", "hierarchical structure"} & set(missing)


def test_graph_critic_integration_prefers_coverage(retriever):
    c = GraphCritic(retriever)
    q = "Why is nacre tough?"
    weak = "It is hard to say."
    strong = "Nacre is tough because aragonite platelets slide on a protein layer and dissipate energy."
    assert c.integrate(q, [weak, strong, ""]).startswith(strong)
    assert c.integrate(q, ["", "  "]) == ""
    assert c.integrate(q, [strong, weak]) == c.integrate(q, [strong, weak])


# ----------------------------------------------------------------------------- HTTP critic
class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        type(self).requests.append(("GET", self.path, None))
        if self.path == "/v1/models":
            self._send({"object": "list", "data": [{"id": "fake-critic", "object": "model"}]})
        else:
            self._send({"error": {"message": "not found"}}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(("POST", self.path, body))
        prompt = body["messages"][-1]["content"]
        if "Rewrite the thinking" in prompt:
            text = "IMPROVED thinking about " + prompt.split("\n")[1]
        elif "Merge them" in prompt:
            text = f"MERGED {prompt.count('Answer ')} answers"
        else:
            text = "FEEDBACK: mention the protein layer"
        self._send({"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]})


@pytest.fixture()
def fake_server():
    _FakeOpenAI.requests = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(5)


def test_http_critic_against_fake_server(policy, fake_server):
    assert check_endpoint(fake_server) == ["fake-critic"]
    critic = make_critic(fake_server, policy=policy)  # model name taken from /v1/models
    traces = recursive_response(policy, critic, QUESTIONS[:2], depth=2, sampling=GREEDY)
    for q, tr in zip(QUESTIONS, traces):
        assert [it.improved_thinking for it in tr.iterations] == [f"IMPROVED thinking about {q}"] * 2
        assert tr.final_answer == "MERGED 2 answers" and tr.integrated
    posts = [r for r in _FakeOpenAI.requests if r[0] == "POST"]
    assert len(posts) == 2 * 2 + 2  # improve per question and iteration, integrate per question
    assert all(p[1] == "/v1/chat/completions" and p[2]["model"] == "fake-critic" for p in posts)
    # from-thinking: the endpoint also writes the feedback
    tr = recursive_response_from_thinking(policy, make_critic(fake_server, critic_model="fake-critic"),
                                          QUESTIONS[0], depth=1, sampling=GREEDY)
    assert tr.iterations[0].reflection == "FEEDBACK: mention the protein layer"


def test_check_endpoint_unreachable():
    with pytest.raises(CriticUnreachableError, match="127.0.0.1:9"):
        check_endpoint("http://127.0.0.1:9/v1", timeout=2)


# ----------------------------------------------------------------------------- infer.py
def test_infer_cli_graph_critic_depth3(model_dir, retriever_dir, tmp_path):
    out = tmp_path / "trace.json"
    r = run_infer("--model", model_dir, "--retriever", retriever_dir, "--reflect-depth", 3,
                  "--max-new-tokens", 8, "--temperature", 0, "--json", out,
                  "--question", QUESTIONS[0], "--question", QUESTIONS[1])
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["options"]["critic"] == "graph" and doc["options"]["reflect_depth"] == 3
    assert [q["question"] for q in doc["questions"]] == QUESTIONS[:2]
    for q in doc["questions"]:
        assert len(q["iterations"]) == 3 and q["integrated"]
        for it in q["iterations"]:
            assert {"thinking", "reflection", "improved_thinking", "answer", "timings", "tokens"} <= set(it)
            assert it["timings"]["total_s"] > 0 and it["tokens"]["answer_generated"] >= 1
        # the random model's thinking holds no corpus sentence: the graph critic adds facts
        assert GraphCritic.FACTS_HEADER in q["iterations"][0]["improved_thinking"]
        assert isinstance(q["final_answer"], str)
    assert "Question 1: " + QUESTIONS[0] in r.stdout and "Question 2: " in r.stdout


def test_infer_cli_in_process_questions_file_and_depth0(model_dir, tmp_path, capsys):
    infer = load_infer_module()
    qf = tmp_path / "qs.jsonl"
    qf.write_text("\n".join(json.dumps({"question": q}) for q in QUESTIONS[:2]) + "\n")
    out = tmp_path / "t.json"
    rc = infer.main(["--model", str(model_dir), "--retriever", str(tmp_path / "none"), "--questions", str(qf),
                     "--reflect-depth", "0", "--max-new-tokens", "6", "--json", str(out), "--stream"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["options"]["critic"] == "same"  # no retriever dir -> the policy is the critic
    assert [len(q["iterations"]) for q in doc["questions"]] == [1, 1]
    assert all(q["iterations"][0]["improved_thinking"] is None for q in doc["questions"])
    assert "[question 2 | iteration 1 | think]" in capsys.readouterr().out
    txt = tmp_path / "qs.txt"
    txt.write_text("first question\n\n second question \n")
    assert read_questions(str(txt)) == ["first question", "second question"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        read_questions(str(bad))


def test_infer_cli_same_critic_in_process(model_dir, tmp_path):
    infer = load_infer_module()
    out = tmp_path / "t.json"
    rc = infer.main(["--model", str(model_dir), "--critic", "same", "--reflect-depth", "1",
                     "--max-new-tokens", "6", "--mode", "from-thinking", "--no-integrate",
                     "--json", str(out), "--question", QUESTIONS[2]])
    assert rc == 0
    q = json.loads(out.read_text())["questions"][0]
    assert len(q["iterations"]) == 1 and not q["integrated"]
    assert q["final_answer"] == q["iterations"][0]["answer"]
    assert q["iterations"][0]["improved_thinking"]  # never empty: falls back to the old thinking


def test_infer_cli_graph_format_prints_and_exports_graphs(model_dir, tmp_path, monkeypatch, capsys):
    import networkx as nx
    from preflexor_core.reasoning import session as cli
    infer = load_infer_module()
    monkeypatch.setattr(cli, "build_critic", lambda cfg, policy: GraphWritingCritic())
    out, graphs = tmp_path / "t.json", tmp_path / "graphs"
    rc = infer.main(["--model", str(model_dir), "--thinking-format", "graph", "--graph-out", str(graphs),
                     "--reflect-depth", "1", "--no-integrate", "--max-new-tokens", "6", "--json", str(out),
                     "--question", QUESTIONS[0], "--question", QUESTIONS[1]])
    assert rc == 0
    stdout = capsys.readouterr().out
    # one graph line per question, after its answer; question 2's graph has 3 nodes (one dangling)
    want = ["graph: 3 nodes, 2 edges, validity 1.00", "graph: 3 nodes, 2 edges, validity 0.83"]
    assert [line for line in stdout.splitlines() if line.startswith("graph: ")] == want
    assert stdout.index("Answer (") < stdout.index(want[0]) < stdout.index("Question 2: ") < stdout.index(want[1])
    doc = json.loads(out.read_text())
    assert doc["options"]["thinking_format"] == "graph"
    assert [q["iterations"][0]["rewards"]["graph_validity"] for q in doc["questions"]] == \
           pytest.approx(VALIDITY)
    assert sorted(os.listdir(graphs)) == ["q1.graphml", "q2.graphml"]
    g = nx.read_graphml(graphs / "q2.graphml")
    assert set(g.nodes) == {"nacre", "aragonite", "protein layer"}
    assert {(u, v, d["relation"]) for u, v, d in g.edges(data=True)} == \
           {("nacre", "aragonite", "contains"), ("aragonite", "protein layer", "slides on")}
    g1 = nx.read_graphml(graphs / "q1.graphml")
    assert set(g1.nodes) == {"nacre", "aragonite", "protein layer"}
    assert g1.edges["aragonite", "protein layer"]["relation"] == "bonded by"


def test_infer_cli_thinking_format_checks_in_config(model_dir, tmp_path, capsys):
    from preflexor_core.infra.io import OutputPathError
    from preflexor_core.reasoning.session import check_inputs, main
    rc = main(InferConfig(questions=["q"], model=str(model_dir), thinking_format="tree"))
    assert rc == 2
    assert "--thinking-format must be one of categories, graph, got 'tree'" in capsys.readouterr().err
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(OutputPathError, match="--graph-out .*existing file"):
        check_inputs(InferConfig(questions=["q"], model=str(model_dir), thinking_format="graph", graph_out=str(f)))


@pytest.mark.parametrize("case", ["missing_model", "empty_question", "negative_depth", "unreachable_critic",
                                  "bad_thinking_format", "graph_out_without_graph"])
def test_infer_cli_bad_input(case, model_dir, tmp_path):
    args = {
        "missing_model": ["--model", tmp_path / "no-such-model", "--question", "q"],
        "empty_question": ["--model", model_dir, "--question", "  "],
        "negative_depth": ["--model", model_dir, "--question", "q", "--reflect-depth=-1"],
        "unreachable_critic": ["--model", model_dir, "--question", "q", "--critic", "http://127.0.0.1:9/v1"],
        "bad_thinking_format": ["--model", model_dir, "--question", "q", "--thinking-format", "tree"],
        "graph_out_without_graph": ["--model", model_dir, "--question", "q", "--graph-out", tmp_path / "g"],
    }[case]
    expected = {
        "missing_model": "make demo",
        "empty_question": "question 1 is empty",
        "negative_depth": "--reflect-depth must be >= 0",
        "unreachable_critic": "http://127.0.0.1:9/v1 is unreachable",
        "bad_thinking_format": "--thinking-format: invalid choice: 'tree' (choose from",
        "graph_out_without_graph": "--graph-out needs --thinking-format graph",
    }[case]
    r = run_infer(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_infer_cli_default_model_missing_names_demo_command(tmp_path):
    r = run_infer("--question", "q", cwd=tmp_path)  # no runs/demo here
    assert r.returncode == 2
    assert "make demo" in r.stderr and "python train.py --stage all" in r.stderr
