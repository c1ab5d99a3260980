"""Teachers: who writes the *chosen* side of a preference pair.

What:
- ``Teacher`` protocol: ``name``, ``complete(messages, temperature=0.0, max_tokens=512) -> str``
  and ``complete_many(list_of_messages, ...) -> list[str]`` (batched or concurrent; order kept).
- ``OpenAITeacher(base_url, model)``: an OpenAI-compatible ``/v1/chat/completions`` client on the
  standard library only (``urllib.request`` + ``json``). Several requests in flight (thread pool),
  per-request timeout, retries with exponential backoff + jitter on 429 / 5xx / connection errors
  (``Retry-After`` honoured), and no retry on 401/403 (:class:`TeacherAuthError`) or 404
  (:class:`TeacherNotFoundError`).
- ``LocalTeacher(checkpoint_dir)`` or ``LocalTeacher((model, tokenizer))``: our Llama + sampler,
  prompts rendered with the chat template.
- ``ExtractiveTeacher(retriever, seed=0)``: offline and deterministic for a seed, no LLM. It writes
  questions from templates over a chunk's concepts, fills each thinking category from the graph
  retriever (concept paths, neighbours, cue-word sentences, top chunks), and answers with the
  corpus sentences that overlap the question most. Every sentence it emits is a corpus sentence
  (line breaks inside a sentence become single spaces); only list bullets / headers (concept
  terms) and step numbers are its own. It is the default teacher of the embedded run and tests.
- ``Context`` / ``gather_context(retriever, question, ...)``: the retrieval-augmented context
  (top-k chunks + graph neighbours + concept paths) shared by every teacher and by ``datagen``.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sections 2.1-2.2: a teacher LLM turns random
corpus chunks into questions and, with RAG over the whole corpus, into a structured thinking
scratchpad (Reasoning Steps, Relevant Materials or Concepts, Design Principles, Material
Properties, Hypothesis, Additional Background) plus an answer. OpenAI chat-completions wire format:
https://platform.openai.com/docs/api-reference/chat/create .

Run: ``python -m preflexor_core.teachers --corpus PATH [--question "..."]`` prints an extractive
question, the thinking categories and the answer for one random chunk of ``PATH``.
"""
from __future__ import annotations

import concurrent.futures as cf
import email.utils
import functools
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from .tokenizer import THINK_END, THINK_START, THINKING_INSTRUCTION

Messages = Sequence[dict]


# The paper's thinking categories (PRefLexOR, Sec. 2.2).
DEFAULT_CATEGORIES = ("Reasoning Steps", "Relevant Materials or Concepts", "Design Principles",
                      "Material Properties", "Hypothesis", "Additional Background")


# ============================================================================ errors

class TeacherError(RuntimeError):
    """A teacher could not produce an output."""


class TeacherAuthError(TeacherError):
    """The endpoint refused the credentials (HTTP 401/403); never retried."""


class TeacherNotFoundError(TeacherError):
    """The endpoint or model does not exist (HTTP 404); never retried."""


class TeacherRequestError(TeacherError):
    """The endpoint rejected the request (other 4xx) or sent an unreadable reply; not retried."""


class TeacherUnavailableError(TeacherError):
    """The endpoint kept failing (429 / 5xx / timeouts / connection errors) after all retries."""


# ============================================================================ protocol

@runtime_checkable
class Teacher(Protocol):
    name: str

    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        """The assistant reply to one chat (``[{"role", "content"}, ...]``)."""
        ...

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512) -> list[str]:
        """Replies to many chats, in input order."""
        ...


def _check_messages(messages: Messages) -> list[dict]:
    if isinstance(messages, str):
        raise TypeError("messages must be a list of {'role', 'content'} dicts, got a str; "
                        "wrap it: [{'role': 'user', 'content': text}]")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'; got {m!r}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    if not out:
        raise ValueError("messages is empty; give at least one {'role': 'user', 'content': ...}")
    return out


def last_user_text(messages: Messages) -> str:
    for m in reversed(list(messages)):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return str(list(messages)[-1].get("content", "")) if messages else ""


# ============================================================================ OpenAI-compatible HTTP

def chat_completions_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or a full ``.../chat/completions`` URL -> the endpoint URL."""
    if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
        raise ValueError(f"base_url must be an http(s) URL like http://127.0.0.1:8000/v1, got {base_url!r}")
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if re.search(r"/v\d+$", url):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAITeacher:
    """Client for an OpenAI-compatible ``POST /v1/chat/completions`` endpoint (stdlib only).

    ``api_key_env`` names the environment variable holding the key; when it is unset no
    ``Authorization`` header is sent (local servers such as vLLM / llama.cpp need none).
    Retries: up to ``max_retries`` more attempts after the first on 429, 5xx, timeouts and
    connection errors, sleeping ``min(backoff_max, backoff_base * 2**attempt) * U(0.5, 1.5)`` or
    the server's ``Retry-After`` (capped at ``backoff_max``).
    """

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60, max_retries: int = 5, concurrency: int = 8,
                 backoff_base: float = 1.0, backoff_max: float = 60.0,
                 extra_body: dict | None = None, seed: int | None = None):
        if not model:
            raise ValueError("model must name the served model (e.g. 'gpt-4o-mini' or the vLLM model id)")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.extra_body = dict(extra_body or {})
        self.name = f"openai:{model}@{self.url}"
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.retries = 0  # total retries performed (for logs / tests)
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAITeacher(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # ---------------------------------------------------------------- one request
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = min(self.backoff_max, retry_after)
        else:
            with self._rng_lock:
                jitter = self._rng.uniform(0.5, 1.5)
            delay = min(self.backoff_max, self.backoff_base * (2 ** attempt)) * jitter
        with self._count_lock:
            self.retries += 1
        time.sleep(delay)

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise TeacherRequestError(f"{self.url}: reply is not JSON ({e}); first bytes: "
                                              f"{raw[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in (401, 403):
                    raise TeacherAuthError(f"authentication failed: set {self.api_key_env} "
                                           f"(HTTP {e.code} from {self.url}: {detail})") from None
                if e.code == 404:
                    raise TeacherNotFoundError(f"model or endpoint not found: {self.url}, "
                                               f"model={self.model} ({detail})") from None
                if e.code not in self.RETRY_STATUS and e.code < 500:
                    raise TeacherRequestError(f"HTTP {e.code} from {self.url} (model={self.model}): "
                                              f"{detail}") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = _retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
            if attempt < self.max_retries:
                self._sleep_before_retry(attempt, retry_after)
        raise TeacherUnavailableError(f"{self.url} (model={self.model}) failed after "
                                      f"{self.max_retries + 1} attempts; last error: {last}")

    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        body = {"model": self.model, "messages": _check_messages(messages),
                "temperature": float(temperature), "max_tokens": int(max_tokens), **self.extra_body}
        reply = self._post(body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TeacherRequestError(f"{self.url}: reply has no choices[0].message.content: "
                                      f"{json.dumps(reply)[:300]}") from None
        return "" if content is None else str(content)

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512, return_exceptions: bool = False) -> list:
        """Run up to ``concurrency`` requests at once; results in input order.

        With ``return_exceptions=True`` a failed request gives its :class:`TeacherError` in its
        slot instead of raising (so one bad item does not lose a batch).
        """
        items = list(list_of_messages)
        if not items:
            return []

        def one(msgs):
            try:
                return self.complete(msgs, temperature=temperature, max_tokens=max_tokens)
            except TeacherError as e:
                if return_exceptions:
                    return e
                raise

        if self.concurrency == 1 or len(items) == 1:
            return [one(m) for m in items]
        with cf.ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)),
                                   thread_name_prefix="teacher") as pool:
            return list(pool.map(one, items))


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()[:500].decode("utf-8", "replace")
    except Exception:  # the body may already be closed
        raw = ""
    try:
        msg = json.loads(raw).get("error", raw)
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return str(msg)[:300] or e.reason
    except (ValueError, AttributeError):
        return raw.strip()[:300] or str(e.reason)


# ============================================================================ local checkpoint

class LocalTeacher:
    """Our own Llama as a teacher: chats rendered with the chat template, sampled with ``sampler``.

    ``LocalTeacher("ckpt_dir")`` loads ``Llama.from_pretrained`` + ``Tokenizer.from_pretrained``;
    ``LocalTeacher((model, tokenizer))`` wraps objects already in memory. ``complete_many`` sends
    all chats through one batched ``generate`` call.
    """

    def __init__(self, checkpoint_or_pair, device: str = "cpu", dtype=None, seed: int = 0,
                 top_p: float = 0.9, top_k: int = 50, name: str | None = None):
        if isinstance(checkpoint_or_pair, (tuple, list)):
            if len(checkpoint_or_pair) != 2:
                raise ValueError("LocalTeacher takes a checkpoint dir or a (model, tokenizer) pair")
            self.model, self.tokenizer = checkpoint_or_pair
            self.name = name or f"local:{type(self.model).__name__}"
        else:
            path = os.fspath(checkpoint_or_pair)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"teacher checkpoint dir not found: {path}")
            from .model import Llama
            from .tokenizer import Tokenizer
            self.model = Llama.from_pretrained(path, dtype=dtype, device=device)
            self.tokenizer = Tokenizer.from_pretrained(path)
            self.name = name or f"local:{os.path.basename(os.path.normpath(path))}"
        self.model.eval()
        self.seed, self.top_p, self.top_k = seed, top_p, top_k
        self._calls = 0

    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        return self.complete_many([messages], temperature=temperature, max_tokens=max_tokens)[0]

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512, return_exceptions: bool = False) -> list[str]:
        from .sampler import SamplingParams, generate
        chats = [_check_messages(m) for m in list_of_messages]
        if not chats:
            return []
        self._calls += 1
        params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature),
                                top_p=self.top_p, top_k=self.top_k, n=1,
                                seed=self.seed + self._calls)
        outs = generate(self.model, self.tokenizer, chats, params)
        return [o.text.strip() for o in outs]


# ============================================================================ text helpers

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-]*")
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers him his how i if in into is it its itself just many may me might
more most much must my no nor not now of off on once only or other our out over own same shall she
should so some such than that the their them then there these they this those through to too
under until up upon use used uses using very via was we were what when where which while who whom
why will with within without would you your yet thus however therefore whereas often well such
one two three new based show shows shown make makes made way ways like also within among per
""".split())


def content_words(text: str) -> set[str]:
    """Lower-case non-stopword words of ``text`` (length >= 3), crude suffix-stripped."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if len(w) < 3 or w in STOPWORDS:
            continue
        out.add(_stem(w))
    return out


def _stem(w: str) -> str:
    for suf in ("ies", "es", "s"):
        if w.endswith(suf) and len(w) - len(suf) >= 4:
            return w[: -len(suf)] + ("y" if suf == "ies" else "")
    return w


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with inner whitespace collapsed; uses the retriever's splitter."""
    try:
        from .retrieval.chunking import sentence_spans
        spans = sentence_spans(text)
        sents = [text[s:e] for s, e in spans]
    except ImportError:  # pragma: no cover - chunking ships with the package
        sents = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [" ".join(s.split()) for s in sents if s.strip()]


def normalize_text(text: str) -> str:
    """Words of ``text`` normalised the way graph concepts are (lowercase, plural stripped),
    space-joined, so ``mentions(sentence, concept)`` is a word-sequence test."""
    try:
        from .retrieval.graph import normalize_term
        return normalize_term(text)
    except ImportError:  # pragma: no cover - the graph module ships with the package
        return " ".join(_stem(w) for w in re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower()))


def mentions(normalized_text: str, concept: str) -> bool:
    """Whether a concept term occurs as whole words in an already normalised text."""
    c = _normalized_concept(concept)
    return bool(c) and f" {c} " in f" {normalized_text} "


@functools.lru_cache(maxsize=1 << 14)
def _normalized_concept(concept: str) -> str:
    return normalize_text(concept)


def _hash_seed(*parts: Any) -> int:
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


# ============================================================================ retrieval context

@dataclass
class Sentence:
    text: str
    chunk_id: str
    rank: int       # rank of its chunk in the retrieval (0 = best)
    position: int   # index of the sentence inside its chunk
    norm: str = ""  # normalize_text(text)

    def __post_init__(self):
        if not self.norm:
            self.norm = normalize_text(self.text)


@dataclass
class Context:
    """What a teacher sees for one question: retrieved chunks, graph neighbours, concept paths."""

    question: str
    hits: list = field(default_factory=list)            # retriever Hits, best first
    neighbours: list[str] = field(default_factory=list)  # concept terms next to the question's concepts
    paths: list[list[str]] = field(default_factory=list)  # shortest concept paths between them
    question_concepts: list[str] = field(default_factory=list)

    @property
    def chunk_ids(self) -> list[str]:
        return [str(getattr(h, "chunk_id", "")) for h in self.hits]

    def sentences(self, min_words: int = 5) -> list[Sentence]:
        """The context's sentences, de-duplicated; headings (``#``) and fragments shorter than
        ``min_words`` words are left out unless nothing else is there."""
        out, seen = [], set()
        for r, h in enumerate(self.hits):
            for p, s in enumerate(split_sentences(getattr(h, "text", str(h)))):
                if s in seen:  # overlapping chunks repeat sentences
                    continue
                seen.add(s)
                out.append(Sentence(s, str(getattr(h, "chunk_id", r)), r, p))
        good = [s for s in out if _is_prose(s.text, min_words)]
        return good or out

    def render(self, max_chars: int = 6000) -> str:
        """Plain-text context for LLM prompts."""
        parts = []
        for i, h in enumerate(self.hits):
            parts.append(f"[{i + 1}] {' '.join(getattr(h, 'text', str(h)).split())}")
        if self.neighbours:
            parts.append("Related concepts: " + ", ".join(self.neighbours))
        for p in self.paths:
            parts.append("Concept path: " + " -> ".join(p))
        text = "\n\n".join(parts)
        return text[:max_chars]

    @classmethod
    def from_text(cls, question: str, text: str) -> "Context":
        """A context from raw text (no retriever): one pseudo-hit per paragraph."""
        paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()] or [text]
        return cls(question=question, hits=[_TextHit(p, f"context@{i}") for i, p in enumerate(paras)])


def _is_prose(sentence: str, min_words: int = 5) -> bool:
    return not sentence.lstrip().startswith(("#", "|", "```")) and len(sentence.split()) >= min_words


@dataclass
class _TextHit:
    text: str
    chunk_id: str
    score: float = 0.0
    source: str = "context"


def concepts_of(retriever, text: str) -> list[str]:
    """Concept terms of ``text``, best first: the ones in the retriever's graph when there are
    any, else all of its terms, else (no ``concepts_of``) its longer content words."""
    fn = getattr(retriever, "concepts_of", None)
    if fn is not None:
        try:
            found = list(fn(text, in_graph=True))
        except TypeError:  # a retriever without the in_graph option
            found = []
        if not found:
            found = list(fn(text))
        if found:
            return [str(c) for c in found]
    seen, out = set(), []
    for w in _WORD.findall(text):
        lw = w.lower()
        if len(lw) < 5 or lw in STOPWORDS or lw in seen:
            continue
        seen.add(lw)
        out.append(lw)
    return out[:8]


def chunk_concepts(retriever, hit) -> list[str]:
    """Concepts of one chunk: its graph concepts (ranked as the graph stored them) when known."""
    graph = getattr(retriever, "graph", None)
    cid = getattr(hit, "chunk_id", None)
    if graph is not None and cid is not None and hasattr(graph, "concepts_of_chunk"):
        try:
            found = list(graph.concepts_of_chunk(cid))
        except KeyError:
            found = []
        if found:
            return found
    return concepts_of(retriever, getattr(hit, "text", str(hit)))


def _expand(retriever, hits, question: str) -> tuple[list, list[str], list[list[str]]]:
    """``retriever.expand`` -> (neighbour chunks, neighbour concept terms, concept paths)."""
    fn = getattr(retriever, "expand", None)
    if fn is None or not hits:
        return [], [], []
    try:
        res = fn(hits, hops=1, query=question)
    except TypeError:  # an expand without the query option
        res = fn(hits, hops=1)
    if isinstance(res, dict):
        neighbours = res.get("neighbors", res.get("neighbours", []))
        paths = res.get("concept_paths", res.get("paths", []))
    else:
        neighbours = getattr(res, "neighbors", getattr(res, "neighbours", [])) or []
        paths = getattr(res, "concept_paths", getattr(res, "paths", [])) or []
    chunks = [n for n in neighbours if not isinstance(n, str)]
    terms = [n for n in neighbours if isinstance(n, str)]
    paths = [[str(c) for c in p] for p in paths if len(p) >= 2]
    return chunks, terms, paths


def gather_context(retriever, question: str, k: int = 5, seed_hits: Sequence = (),
                   use_rag: bool = True, k_graph: int = 3, k_concepts: int = 8) -> Context:
    """RAG context for ``question``: ``seed_hits`` (the chunks it came from), the top-``k``
    search hits and up to ``k_graph`` graph-neighbour chunks (``retriever.expand``), de-duplicated
    in that order; the concept paths linking the question's concepts; and the concepts that
    co-occur with them in the graph. ``use_rag=False`` keeps only ``seed_hits``."""
    qc = concepts_of(retriever, question)
    candidates = list(seed_hits)
    neighbours: list[str] = []
    paths: list[list[str]] = []
    if use_rag:
        candidates += list(retriever.search(question, k=k))
        chunks, terms, paths = _expand(retriever, _dedupe(candidates), question)
        candidates += chunks[:k_graph]
        neighbours = list(terms)
        nb_fn = getattr(retriever, "neighbors_of_concept", None)
        if nb_fn is not None:
            for c in qc[:3]:
                neighbours += [t for t, _ in nb_fn(c, k=k_concepts)]
    neighbours = [t for t in dict.fromkeys(neighbours) if t not in qc][:k_concepts]
    return Context(question=question, hits=_dedupe(candidates), neighbours=neighbours, paths=paths,
                   question_concepts=qc)


def _dedupe(hits: Sequence) -> list:
    out, seen = [], set()
    for h in hits:
        cid = getattr(h, "chunk_id", id(h))
        if cid not in seen:
            seen.add(cid)
            out.append(h)
    return out


# ============================================================================ extractive teacher

# Cue words per category (matched on lower-cased word prefixes / substrings).
CATEGORY_CUES: dict[str, tuple[str, ...]] = {
    "design principles": ("principle", "design", "strategy", "strategies", "architect", "hierarch",
                          "inspire", "mimic", "bioinspired", "approach"),
    "material properties": ("modulus", "strength", "tough", "stiff", "gpa", "mpa", "hardness",
                            "density", "elastic", "fracture", "ductil", "strain", "stress",
                            "propert", "conductiv"),
    "hypothesis": ("hypothes", "may", "might", "suggest", "propose", "could", "likely",
                   "possibl", "predict", "expect", "speculat"),
}

QUESTION_TEMPLATES_2 = (
    "How does {a} relate to {b} in {topic}?",
    "What design principles connect {a} and {b}?",
    "Why does {a} matter for {b}?",
    "How could {a} be used to improve {b} in {topic}?",
    "What mechanisms link {a} and {b}, and what does this imply for {topic}?",
    "How do {a} and {b} together shape the behaviour of {topic}?",
)
QUESTION_TEMPLATES_1 = (
    "Why does {a} matter in {topic}?",
    "What is the role of {a} in {topic}?",
    "What design principles govern {a}?",
    "How can the properties of {a} be explained?",
)


class ExtractiveTeacher:
    """Offline teacher that only quotes the corpus (deterministic for ``seed``).

    Task-level methods used by ``datagen``: :meth:`make_question`, :meth:`fill_category`,
    :meth:`answer`; plus :meth:`complete` / :meth:`complete_many` (answer by extraction from the
    sentences retrieved for the last user message).
    """

    def __init__(self, retriever, seed: int = 0, k: int = 5, max_items: int = 5, max_answer_sentences: int = 4):
        if retriever is None or not hasattr(retriever, "search"):
            raise TypeError("ExtractiveTeacher needs a retriever with .search(query, k) "
                            "(e.g. GraphRetriever.build(texts))")
        self.retriever = retriever
        self.seed = int(seed)
        self.k = int(k)
        self.max_items = int(max_items)
        if max_items < 1 or max_answer_sentences < 1:
            raise ValueError(f"max_items={max_items} and max_answer_sentences={max_answer_sentences} must be >= 1")
        self.max_answer_sentences = int(max_answer_sentences)
        self.name = f"extractive(seed={self.seed})"

    def __repr__(self) -> str:
        return f"ExtractiveTeacher(seed={self.seed}, k={self.k})"

    # ---------------------------------------------------------------- context
    def context(self, question: str, seed_hits: Sequence = (), use_rag: bool = True) -> Context:
        return gather_context(self.retriever, question, k=self.k, seed_hits=seed_hits, use_rag=use_rag)

    def _as_context(self, question: str, context) -> Context:
        if isinstance(context, Context):
            return context
        if context is None:
            return self.context(question)
        if isinstance(context, str):
            return Context.from_text(question, context)
        return self.context(question, seed_hits=list(context))  # a list of hits

    # ---------------------------------------------------------------- question
    def make_question(self, hits_or_chunk, salt: Any = "") -> str:
        """A question from templates over the concepts of a chunk (or of several hits).

        Deterministic for (seed, chunk text, salt): the same chunk gives the same question.
        """
        if isinstance(hits_or_chunk, str) or hasattr(hits_or_chunk, "text"):
            hits_or_chunk = [hits_or_chunk]
        items = list(hits_or_chunk)
        text = "\n\n".join(h if isinstance(h, str) else getattr(h, "text", "") for h in items)
        if not text.strip():
            return ""
        rng = random.Random(_hash_seed(self.seed, "question", text, salt))
        per_text = [concepts_of(self.retriever, h) if isinstance(h, str) else chunk_concepts(self.retriever, h)
                    for h in items]
        concepts: list[str] = list(dict.fromkeys(c for cs in per_text for c in cs))
        if not concepts:
            return ""
        ranked = self._salient(concepts)
        singles = [c for c in concepts if " " not in c]
        if len(ranked) >= 2:
            a, b = rng.sample(ranked[: min(len(ranked), 5)], 2)
            topic = next((c for c in singles if c not in (a, b) and c not in a and c not in b), "this system")
            q = rng.choice(QUESTION_TEMPLATES_2).format(a=a, b=b, topic=topic)
        else:
            a = ranked[0]
            topic = next((c for c in singles if c != a and c not in a), "this system")
            q = rng.choice(QUESTION_TEMPLATES_1).format(a=a, topic=topic)
        return q[0].upper() + q[1:]

    def _salient(self, concepts: Sequence[str]) -> list[str]:
        """Concepts ordered for questions: terms shared by several chunks before one-off
        phrases; then two-word terms, three-word terms, single words; terms found in many chunks
        (generic) last; else the given order."""
        n_chunks = max(1, len(getattr(self.retriever, "chunks", []) or []))

        def key(item):
            i, c = item
            df = _concept_df(self.retriever, c)
            generic = df is not None and df > max(3, 0.15 * n_chunks)
            words = c.count(" ") + 1
            rare = df is not None and df < 2  # a one-off phrase, not a corpus concept
            return (rare, {2: 0, 3: 1}.get(words, 2), generic, i)

        return [c for _, c in sorted(enumerate(concepts), key=key)]

    # ---------------------------------------------------------------- scoring helpers
    def _terms(self, question: str, ctx: Context) -> tuple[list[str], set[str]]:
        concepts = [c.lower() for c in (ctx.question_concepts or concepts_of(self.retriever, question))]
        return concepts, content_words(question)

    @staticmethod
    def _overlap(sentence: Sentence, concepts: list[str], words: set[str]) -> float:
        score = sum(2.0 for c in concepts if mentions(sentence.norm, c))
        sw = content_words(sentence.text)
        if sw:
            score += len(sw & words) / (1.0 + 0.05 * len(sw))
        return score

    def _ranked(self, question: str, ctx: Context, sents: list[Sentence] | None = None) -> list[tuple[float, Sentence]]:
        concepts, words = self._terms(question, ctx)
        sents = ctx.sentences() if sents is None else sents
        scored = [(self._overlap(s, concepts, words), s) for s in sents]
        scored.sort(key=lambda t: (-t[0], t[1].rank, t[1].position))
        return scored

    # ---------------------------------------------------------------- categories
    def fill_category(self, category: str, question: str, context=None) -> str:
        """Text of one thinking category, built only from corpus sentences and concept terms."""
        ctx = self._as_context(question, context)
        key = " ".join(category.lower().split())
        if key == "reasoning steps":
            return self._reasoning_steps(question, ctx)
        if key in ("relevant materials or concepts", "relevant materials", "relevant concepts"):
            return self._concept_list(question, ctx)
        if key == "additional background":
            return self._background(ctx)
        cues = CATEGORY_CUES.get(key)
        if cues is None:  # a user-defined category: cue on its own words
            cues = tuple(sorted(content_words(category)))
        return self._cued_sentences(question, ctx, cues, salt=key)

    def _reasoning_steps(self, question: str, ctx: Context) -> str:
        sents = ctx.sentences()
        steps: list[str] = []
        used: set[str] = set()
        header = ""
        path = max(ctx.paths, key=len) if ctx.paths else []
        if path:
            header = "Concept path: " + " -> ".join(path)
            for a, b in zip(path, path[1:]):
                best = [s for s in sents if s.text not in used and mentions(s.norm, a) and mentions(s.norm, b)]
                if not best:
                    best = [s for s in sents if s.text not in used and mentions(s.norm, b)]
                if best:
                    used.add(best[0].text)
                    steps.append(best[0].text)
        for _, s in self._ranked(question, ctx, sents):
            if len(steps) >= max(3, min(self.max_items, len(path))):
                break
            if s.text not in used:
                used.add(s.text)
                steps.append(s.text)
        lines = [header] if header else []
        lines += [f"{i}. {s}" for i, s in enumerate(steps, start=1)]
        return "\n".join(lines)

    def _concept_list(self, question: str, ctx: Context) -> str:
        terms: list[str] = []
        for c in list(ctx.question_concepts) + list(ctx.neighbours) + [c for p in ctx.paths for c in p]:
            if c and c.lower() not in {t.lower() for t in terms}:
                terms.append(c)
        if len(terms) < 3:
            for h in ctx.hits:
                for c in chunk_concepts(self.retriever, h):
                    if c.lower() not in {t.lower() for t in terms}:
                        terms.append(c)
        return "\n".join(f"- {t}" for t in terms[: max(3, self.max_items + 3)])

    def _cued_sentences(self, question: str, ctx: Context, cues: Sequence[str], salt: str) -> str:
        """Sentences carrying the category's cue words, ranked by cue count + question overlap."""
        ranked = self._ranked(question, ctx)
        cued = [(sc + 1.5 * _cue_count(s.text, cues), s) for sc, s in ranked if _cue_count(s.text, cues)]
        cued.sort(key=lambda t: (-t[0], t[1].rank, t[1].position))
        picked = cued[: self.max_items]
        if not picked:  # nothing carries a cue word: fall back to the most relevant sentences
            picked = ranked[: min(2, len(ranked))]
        picked = sorted(picked, key=lambda t: (t[1].rank, t[1].position))
        return "\n".join(f"- {s.text}" for _, s in picked)

    def _background(self, ctx: Context) -> str:
        firsts = []
        for h in ctx.hits[: min(self.k, self.max_items)]:
            ss = split_sentences(getattr(h, "text", ""))
            first = next((x for x in ss if _is_prose(x)), ss[0] if ss else "")
            if first and first not in firsts:
                firsts.append(first)
        return " ".join(firsts)

    # ---------------------------------------------------------------- answer
    def answer(self, question: str, context=None, n_min: int = 2, n_max: int | None = None) -> str:
        """2 to ``max_answer_sentences`` context sentences with the highest overlap with the question's concepts."""
        n_max = self.max_answer_sentences if n_max is None else n_max
        n_min = min(n_min, n_max)
        ctx = self._as_context(question, context)
        ranked = self._ranked(question, ctx)
        good = [t for t in ranked if t[0] > 0][:n_max]
        if len(good) < n_min:
            good = ranked[: min(n_min, len(ranked))]
        return " ".join(s.text for _, s in good)  # most relevant first

    def plain_answer(self, question: str, salt: Any = "") -> str:
        """An answer *without* retrieval: the best-overlapping sentences of a few random chunks.

        Still corpus sentences, but not grounded in the question's context: the extractive
        stand-in for "the teacher answers without context" (rejected_from="teacher").
        """
        rng = random.Random(_hash_seed(self.seed, "plain", question, salt))
        chunks = list(getattr(self.retriever, "chunks", []) or [])
        if chunks:
            hits = rng.sample(chunks, min(self.k, len(chunks)))
        else:
            hits = list(self.retriever.random_nodes(self.k, seed=rng.randrange(2**31)))
        ctx = Context(question=question, hits=hits,
                      question_concepts=concepts_of(self.retriever, question))
        return self.answer(question, ctx)

    # ---------------------------------------------------------------- generic
    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        question = last_user_text(_check_messages(messages)).strip()
        if question.endswith(THINKING_INSTRUCTION.strip()):
            question = question[: -len(THINKING_INSTRUCTION.strip())].strip()
        text = self.answer(question, self.context(question))
        return _truncate_words(text, max_tokens)

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512, return_exceptions: bool = False) -> list[str]:
        return [self.complete(m, temperature, max_tokens) for m in list_of_messages]


def _concept_df(retriever, term: str) -> int | None:
    """How many chunks mention ``term`` (from the retriever's graph), or None when unknown."""
    g = getattr(getattr(retriever, "graph", None), "graph", None)
    try:
        return int(g.nodes[f"concept:{term}"]["df"])
    except (AttributeError, KeyError, TypeError):
        return None


def _cue_count(sentence: str, cues: Sequence[str]) -> int:
    """How many of ``cues`` occur in ``sentence``: cues of up to 5 letters must start a word
    (or equal it, for 3-letter cues such as "may"), longer cues may occur anywhere."""
    low = sentence.lower()
    words = re.findall(r"[a-z0-9]+", low)
    n = 0
    for cue in cues:
        cue = cue.lower()
        if len(cue) <= 5:
            if any(w == cue or (len(cue) >= 4 and w.startswith(cue)) for w in words):
                n += 1
        elif cue in low:
            n += 1
    return n


def _truncate_words(text: str, max_tokens: int) -> str:
    words = text.split(" ")
    return text if len(words) <= max_tokens else " ".join(words[:max_tokens])


# ============================================================================ construction

def teacher_from_spec(spec: str, retriever=None, model: str | None = None, seed: int = 0,
                      **kwargs) -> Teacher:
    """``"extractive"`` | ``http(s)://...`` (needs ``model``) | a checkpoint directory."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("teacher spec is empty; use 'extractive', an http(s):// URL or a checkpoint dir")
    spec = spec.strip()
    if spec == "extractive":
        if retriever is None:
            raise ValueError("the extractive teacher needs a retriever")
        return ExtractiveTeacher(retriever, seed=seed)
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ValueError(f"teacher URL {spec} needs a model name (--teacher-model NAME)")
        return OpenAITeacher(spec, model, **kwargs)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"teacher dir {spec} has no config.json; expected a checkpoint dir "
                             "(config.json + *.safetensors + tokenizer.json)")
        return LocalTeacher(spec, seed=seed)
    raise ValueError(f"bad teacher spec {spec!r}: expected 'extractive', an http(s):// URL of an "
                     "OpenAI-compatible server, or an existing checkpoint directory")


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Show what the extractive teacher writes for one random chunk.")
    ap.add_argument("--corpus", required=True, help="a .txt/.md/.jsonl file or a folder of them")
    ap.add_argument("--question", default=None, help="answer this question instead of a generated one")
    ap.add_argument("--seed", type=int, default=0, help="teacher / chunk seed")
    a = ap.parse_args()
    from .retrieval import GraphRetriever
    from .retrieval.embedding import HashingEmbedder
    r = GraphRetriever.build([a.corpus], embedder=HashingEmbedder())
    t = ExtractiveTeacher(r, seed=a.seed)
    node = r.random_nodes(1, seed=a.seed)
    q = a.question or t.make_question(node)
    ctx = t.context(q, seed_hits=node)
    print(f"Q: {q}\n")
    for cat in DEFAULT_CATEGORIES:
        print(f"**{cat}**:\n{t.fill_category(cat, q, ctx)}\n")
    print(f"A: {t.answer(q, ctx)}")


if __name__ == "__main__":
    _main()
