"""Teachers: the offline extractive teacher (deterministic, grounded) and the OpenAI-compatible
HTTP client against a fake server on 127.0.0.1 (retries, auth / not-found errors, concurrency,
request bodies)."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preflexor_core.thinking.layout import DEFAULT_CATEGORIES
from preflexor_core.teachers import (ExtractiveTeacher, OpenAITeacher, TeacherAuthError, TeacherNotFoundError,
                                     TeacherRequestError, TeacherUnavailableError, chat_completions_url,
                                     teacher_from_spec)
from preflexor_core.retrieval import GraphRetriever
from preflexor_core.retrieval.embedding import HashingEmbedder
from preflexor_core.text.words import split_sentences

# A small materials corpus: one paragraph per document.
CORPUS = [
    "Nacre is a composite of aragonite platelets and a thin organic matrix. The brick-and-mortar "
    "architecture of nacre deflects cracks and raises its toughness far above that of pure aragonite. "
    "The design principle of nacre is a hierarchical arrangement of stiff platelets in a soft matrix.",
    "Spider silk combines high tensile strength with large extensibility. The strength of dragline silk "
    "reaches about 1.3 GPa, comparable to high-grade steel. Beta-sheet nanocrystals in spider silk act "
    "as cross-links that carry load.",
    "Collagen fibrils are the basic building blocks of bone and tendon. Bone is a hierarchical composite "
    "of collagen fibrils and hydroxyapatite minerals. The elastic modulus of cortical bone is around 20 GPa.",
    "Graphene is a single layer of carbon atoms arranged in a hexagonal lattice. Its Young's modulus is "
    "about 1 TPa and its intrinsic strength is about 130 GPa. Graphene sheets may act as reinforcement "
    "in polymer composites.",
    "Hierarchical structures appear in many biological materials, from bone to nacre to wood. "
    "Researchers suggest that hierarchy allows materials to combine strength and toughness. "
    "This design strategy inspires synthetic composites with tailored fracture resistance.",
    "Wood is a cellular composite of cellulose fibrils embedded in lignin and hemicellulose. The cellulose "
    "fibrils give wood its stiffness along the grain. Wood toughness depends on the microfibril angle in "
    "the cell wall.",
    "Crack deflection and crack bridging are toughening mechanisms found in nacre and bone. These "
    "mechanisms dissipate energy and slow crack growth. A composite with weak interfaces may deflect "
    "cracks more effectively.",
    "Beta-sheet nanocrystals are small crystalline domains in silk proteins. Confinement of beta-sheet "
    "nanocrystals to a few nanometers increases their strength. We hypothesize that smaller nanocrystals "
    "make silk fibers tougher.",
    "Hydroxyapatite is a calcium phosphate mineral found in bone and teeth. Hydroxyapatite crystals are "
    "stiff but brittle. In bone, hydroxyapatite minerals are embedded between collagen fibrils.",
    "Polymer composites reinforced with carbon fibers have a high strength to weight ratio. The "
    "interface between fiber and matrix controls load transfer. Surface treatments of carbon fibers "
    "improve interfacial strength.",
    "Self-healing materials can repair damage autonomously. Microcapsules filled with a healing agent "
    "rupture when a crack passes and release the agent. This approach might extend the service life of "
    "polymer composites.",
    "Protein materials such as silk and collagen are built from a small set of amino acids. Their "
    "mechanical properties arise from hierarchical assembly and hydrogen bonding. Hydrogen bonds break "
    "and reform, which gives protein materials a self-healing capacity.",
    "Additive manufacturing enables architected materials with complex internal geometry. Lattice "
    "structures produced by 3D printing reach a high stiffness at a low density. Bioinspired lattices "
    "mimic the architecture of bone.",
    "The fracture toughness of a material measures its resistance to crack propagation. Ceramics have "
    "a low fracture toughness of a few MPa m^0.5. Toughening strategies in nature combine stiff minerals "
    "with soft organic phases.",
    "Machine learning models can predict the mechanical properties of composites from their structure. "
    "Graph neural networks represent a material as a network of building blocks. Such models might "
    "accelerate the design of hierarchical materials.",
]


def _norm(s: str) -> str:
    return " ".join(s.split())


CORPUS_NORM = [_norm(p) for p in CORPUS]
CORPUS_SENTENCES = {s for p in CORPUS for s in split_sentences(p)}


def build_retriever(texts=CORPUS):
    """A GraphRetriever over the test corpus with the fast hashing embedder."""
    return GraphRetriever.build(list(texts), embedder=HashingEmbedder(128))


def in_corpus(sentence: str) -> bool:
    s = _norm(sentence)
    return any(s in p for p in CORPUS_NORM)


def check_grounded(text: str, category: str | None = None, concepts_ok=()) -> None:
    """Every sentence of ``text`` occurs in the corpus; bullets of concept lists are concept terms;
    step numbers / concept-path headers are the only other text."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("Concept path: "):
            for c in line[len("Concept path: "):].split(" -> "):
                assert c.lower() in " ".join(CORPUS_NORM).lower() or c in concepts_ok, \
                    f"path term {c!r} is neither corpus text nor a corpus concept"
            continue
        body = re.sub(r"^(\d+\.|-)\s+", "", line)
        if category == "Relevant Materials or Concepts":
            assert body.lower() in " ".join(CORPUS_NORM).lower() or body in concepts_ok, \
                f"concept {body!r} not in the corpus"
            continue
        for s in split_sentences(body):
            assert in_corpus(s), f"{category}: sentence not in corpus: {s!r}"


@pytest.fixture(scope="module")
def retriever():
    return build_retriever()


# ============================================================================ extractive teacher

def _run_teacher(retriever, seed):
    t = ExtractiveTeacher(retriever, seed=seed)
    out = []
    for i in range(4):
        nodes = retriever.random_nodes(2, seed=100 + i)
        q = t.make_question(nodes, salt=i)
        ctx = t.context(q, seed_hits=nodes)
        cats = {c: t.fill_category(c, q, ctx) for c in DEFAULT_CATEGORIES}
        out.append((q, cats, t.answer(q, ctx)))
    return out


def test_extractive_teacher_is_deterministic(retriever):
    a = _run_teacher(retriever, seed=3)
    b = _run_teacher(retriever, seed=3)
    assert a == b
    questions = [q for q, _, _ in a]
    assert all(q.endswith("?") and len(q) > 15 for q in questions)
    assert len(set(questions)) >= 3, questions
    # a different seed picks different templates / concepts somewhere
    c = _run_teacher(retriever, seed=4)
    assert [q for q, _, _ in c] != questions


def test_extractive_teacher_is_grounded(retriever):
    for q, cats, answer in _run_teacher(retriever, seed=0) + _run_teacher(retriever, seed=1):
        sents = split_sentences(answer)
        assert 2 <= len(sents) <= 4, answer
        for s in sents:
            assert in_corpus(s), f"answer sentence not in corpus: {s!r}"
        for cat, text in cats.items():
            assert text.strip(), f"empty category {cat} for {q!r}"
            check_grounded(text, cat, concepts_ok=set(retriever.concepts_of(" ".join(CORPUS))))


def test_extractive_categories_have_their_shape(retriever):
    t = ExtractiveTeacher(retriever, seed=0)
    q = "How does crack deflection relate to toughness in nacre?"
    ctx = t.context(q)
    steps = t.fill_category("Reasoning Steps", q, ctx)
    numbered = [ln for ln in steps.splitlines() if re.match(r"^\d+\. ", ln)]
    assert len(numbered) >= 2 and numbered[0].startswith("1. ")
    concepts = t.fill_category("Relevant Materials or Concepts", q, ctx)
    assert all(ln.startswith("- ") for ln in concepts.splitlines()) and len(concepts.splitlines()) >= 3
    props = t.fill_category("Material Properties", q, ctx)
    assert re.search(r"toughness|strength|modulus|GPa|MPa|stiff|fracture", props, re.I), props
    hyp = t.fill_category("Hypothesis", q, ctx)
    assert re.search(r"hypothes|may|might|suggest|propose|could", hyp, re.I), hyp
    background = t.fill_category("Additional Background", q, ctx)
    assert background and all(in_corpus(s) for s in split_sentences(background))
    # the answer quotes the sentences that share the question's concepts
    ans = t.answer(q, ctx)
    assert "nacre" in ans.lower() and ("crack" in ans.lower() or "tough" in ans.lower())
    # a user-defined category works and is grounded too
    custom = t.fill_category("Toughening Mechanisms", q, ctx)
    check_grounded(custom, "Toughening Mechanisms")
    # generic chat completion also answers by extraction
    reply = t.complete([{"role": "user", "content": q + " Use <|thinking|>."}])
    assert reply and all(in_corpus(s) for s in split_sentences(reply))


# ============================================================================ fake OpenAI server

class _Server:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1 with a scripted status sequence."""

    def __init__(self, statuses=(), delay=0.0, retry_after=None):
        self.statuses = list(statuses)   # popped per request; empty -> 200
        self.delay = delay
        self.retry_after = retry_after
        self.bodies, self.headers = [], []
        self.lock = threading.Lock()
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                with srv.lock:
                    srv.bodies.append(body)
                    srv.headers.append(dict(self.headers))
                    status = srv.statuses.pop(0) if srv.statuses else 200
                if srv.delay:
                    time.sleep(srv.delay)
                if self.path != "/v1/chat/completions":
                    status = 404
                if status != 200:
                    data = json.dumps({"error": {"message": f"status {status}"}}).encode()
                    self.send_response(status)
                    if srv.retry_after is not None and status in (429, 503):
                        self.send_header("Retry-After", str(srv.retry_after))
                else:
                    last = body["messages"][-1]["content"]
                    data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                "content": f"echo: {last}"}}]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _msgs(text):
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_url_forms():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/x/v1/chat/completions") == "https://h/x/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        chat_completions_url("h:1")


def test_request_body_and_auth_header(monkeypatch):
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test")
    with _Server() as s:
        t = OpenAITeacher(s.url, "m-1", api_key_env="TEST_TEACHER_KEY")
        assert t.complete(_msgs("hello"), temperature=0.3, max_tokens=17) == "echo: hello"
    body = s.bodies[0]
    assert body["model"] == "m-1"
    assert body["messages"] == _msgs("hello")
    assert body["temperature"] == 0.3 and body["max_tokens"] == 17
    assert s.headers[0]["Authorization"] == "Bearer sk-test"


def test_503_is_retried_then_succeeds():
    with _Server(statuses=[503, 503]) as s:
        t = OpenAITeacher(s.url, "m", max_retries=5, backoff_base=0.01)
        assert t.complete(_msgs("x")) == "echo: x"
    assert len(s.bodies) == 3 and t.retries == 2


def test_retry_after_is_honoured():
    with _Server(statuses=[429], retry_after=0.3) as s:
        t = OpenAITeacher(s.url, "m", max_retries=2, backoff_base=0.001)
        t0 = time.perf_counter()
        assert t.complete(_msgs("y")) == "echo: y"
        assert time.perf_counter() - t0 >= 0.3
    assert len(s.bodies) == 2


def test_retries_exhausted_is_unavailable():
    with _Server(statuses=[500] * 10) as s:
        t = OpenAITeacher(s.url, "m", max_retries=2, backoff_base=0.001)
        with pytest.raises(TeacherUnavailableError, match="after 3 attempts.*HTTP 500"):
            t.complete(_msgs("z"))
    assert len(s.bodies) == 3


def test_401_fails_clearly_without_retry(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with _Server(statuses=[401, 401, 401]) as s:
        t = OpenAITeacher(s.url, "m", api_key_env="NO_SUCH_KEY_VAR", backoff_base=0.001)
        with pytest.raises(TeacherAuthError, match="authentication failed: set NO_SUCH_KEY_VAR"):
            t.complete(_msgs("a"))
    assert len(s.bodies) == 1 and t.retries == 0


def test_404_fails_clearly_without_retry():
    with _Server() as s:
        t = OpenAITeacher(s.url.replace("/v1", "/wrong/v1"), "no-such-model", backoff_base=0.001)
        with pytest.raises(TeacherNotFoundError, match=r"model or endpoint not found: .*/wrong/v1/chat/"
                                                        r"completions, model=no-such-model"):
            t.complete(_msgs("a"))
    assert len(s.bodies) == 1


def test_400_is_not_retried():
    with _Server(statuses=[400]) as s:
        t = OpenAITeacher(s.url, "m", backoff_base=0.001)
        with pytest.raises(TeacherRequestError, match="HTTP 400"):
            t.complete(_msgs("a"))
    assert len(s.bodies) == 1


def test_connection_refused_is_retried_then_unavailable():
    with _Server() as s:
        url = s.url
    t = OpenAITeacher(url, "m", max_retries=1, backoff_base=0.001, timeout=2)
    with pytest.raises(TeacherUnavailableError, match="after 2 attempts"):
        t.complete(_msgs("a"))
    assert t.retries == 1


def test_concurrent_requests_keep_order():
    with _Server(delay=0.2) as s:
        t = OpenAITeacher(s.url, "m", concurrency=8)
        t.complete(_msgs("warm-up"))  # first-call setup (opener, name lookup) is not measured
        t0 = time.perf_counter()
        out = t.complete_many([_msgs(f"q{i}") for i in range(8)], max_tokens=5)
        dt = time.perf_counter() - t0
    assert out == [f"echo: q{i}" for i in range(8)]
    # 8 requests of 0.2 s each: sequential would take >= 1.6 s
    assert dt < 1.0, f"8 concurrent requests took {dt:.2f} s"


def test_complete_many_return_exceptions():
    with _Server(statuses=[400]) as s:
        t = OpenAITeacher(s.url, "m", concurrency=1, backoff_base=0.001)
        out = t.complete_many([_msgs("a"), _msgs("b")], return_exceptions=True)
    assert isinstance(out[0], TeacherRequestError) and out[1] == "echo: b"


def test_teacher_from_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="bad teacher spec"):
        teacher_from_spec("gpt-4o")
    with pytest.raises(ValueError, match="needs a model name"):
        teacher_from_spec("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="no config.json"):
        teacher_from_spec(str(tmp_path))
    assert isinstance(teacher_from_spec("http://127.0.0.1:1/v1", model="m"), OpenAITeacher)


def test_teacher_from_spec_builds_every_teacher_with_its_options(retriever):
    """One call serves every spec: each teacher takes its own options, the others' are ignored."""
    opts = dict(max_items=1, max_answer_sentences=2, concurrency=3, api_key_env="SOME_KEY_VAR")
    t = teacher_from_spec("extractive", retriever=retriever, seed=5, **opts)
    assert isinstance(t, ExtractiveTeacher) and (t.seed, t.max_items, t.max_answer_sentences) == (5, 1, 2)
    q = "How does crack deflection relate to toughness in nacre?"
    ctx = t.context(q)
    assert len(split_sentences(t.answer(q, ctx))) == 2
    assert len(t.fill_category("Hypothesis", q, ctx).splitlines()) == 1
    assert t.answer(q, ctx) == ExtractiveTeacher(retriever, seed=5, max_answer_sentences=2).answer(q, ctx)
    h = teacher_from_spec(" http://127.0.0.1:1/v1 ", model="m", seed=5, **opts)
    assert isinstance(h, OpenAITeacher) and (h.concurrency, h.api_key_env) == (3, "SOME_KEY_VAR")
    with pytest.raises(ValueError, match=r"unknown teacher option\(s\) max_itmes; options by teacher: "
                                         r"extractive: k, max_answer_sentences, max_items"):
        teacher_from_spec("extractive", retriever=retriever, max_itmes=1)
    with pytest.raises(ValueError, match="needs a retriever"):
        teacher_from_spec("extractive")
    with pytest.raises(ValueError, match="max_items=0"):
        teacher_from_spec("extractive", retriever=retriever, max_items=0)


# ============================================================================ local checkpoint

def test_local_teacher_batches_chats_through_the_sampler(tmp_path):
    import torch
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.teachers import LocalTeacher
    from preflexor_core.tokenization.tokenizer import Tokenizer
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=320)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Llama(cfg).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    t = teacher_from_spec(str(tmp_path), seed=4, top_k=7, max_items=2)  # max_items: extractive only
    assert isinstance(t, LocalTeacher) and t.name.startswith("local:") and (t.seed, t.top_k) == (4, 7)
    chats = [_msgs("Why is nacre tough?"), _msgs("What is silk made of?")]
    greedy = t.complete_many(chats, temperature=0.0, max_tokens=6)
    assert len(greedy) == 2 and all(isinstance(x, str) for x in greedy)
    assert greedy == t.complete_many(chats, temperature=0.0, max_tokens=6)  # greedy is repeatable
    assert t.complete(chats[0], max_tokens=6) == greedy[0]
