"""Recursive reflective reasoning at inference: think, reflect, improve the thinking, answer again.

What (PRefLexOR, Buehler, arXiv 2410.12375, Sec. "Recursive reasoning"): the policy reasons inside
``<|thinking|> ... <|/thinking|>`` and criticises its own reasoning inside ``<|reflect|> ... <|/reflect|>``.
At inference a *critic* turns the thinking plus that feedback into improved thinking, the policy
answers again with the improved thinking forced at the start of its response, and this repeats
``depth`` times; an *integrator* finally merges the answers of all iterations into one.

    from preflexor_core.reasoning import recursive_response, GraphCritic, Policy
    traces = recursive_response(Policy(model, tok), GraphCritic(retriever), ["Why is nacre tough?"], depth=3)
    traces[0].final_answer, traces[0].iterations[0].improved_thinking, traces[0].to_dict()

One iteration (``mode="reflect"``, :func:`recursive_response`), all questions batched per step:

1. *think* - the policy is prompted with ``question + " Use <|thinking|>."`` and
   ``prepend_response="<|thinking|>"`` (iteration 1), or with the current thinking forced and a
   ``<|reflect|>`` opened after it (later iterations: it reflects on the improved thinking);
   :func:`extract_spans` gives its thinking and its reflection (the feedback).
2. *improve* - ``critic.improve(question, thinking, feedback)`` -> improved thinking.
3. *answer* - the policy answers with ``"<|thinking|>" + improved + "<|/thinking|>\\n"`` forced at the
   start of its response (appended to each rendered prompt, as ``prepend_response`` would, since it
   differs per question; when it does not fit the context its oldest tokens are dropped, counted in
   ``tokens["answer_thinking_dropped"]``).

``mode="from-thinking"`` (:func:`recursive_response_from_thinking`) is the same loop, but the
feedback is written by the critic (``critic.feedback(question, thinking)``) instead of the policy,
and later iterations start from the previous improved thinking without a policy call.
Depth 0 is a single pass (step 1 only: no critic, no integration). With ``integrate=True`` and
depth >= 1, ``integrator.integrate(question, answers)`` (default: the critic) merges the answers.

Critics (the :class:`Critic` protocol: ``improve``, ``feedback``, ``integrate``; optional batched
``*_many`` variants):

- :class:`ModelCritic` - a Llama + tokenizer prompted as a critic: the policy itself ("same") or
  another checkpoint (``ModelCritic.from_pretrained(dir)``). Batched through the sampler.
- :class:`TeacherCritic` - any ``teachers.Teacher``; with ``teachers.OpenAITeacher`` this is an
  OpenAI-compatible HTTP endpoint (:func:`check_endpoint` tests reachability up front).
- :class:`GraphCritic` - offline and deterministic: adds the corpus facts and concept paths the
  graph retriever finds and the thinking lacks; feedback lists missing concepts; integration picks
  the answer with the highest concept coverage and adds unique supporting sentences of the others.

Traces: :class:`QuestionTrace` per question with one :class:`IterationTrace` per iteration (thinking,
reflection, improved thinking, answer, raw texts, step timings in seconds, token counts) and the
final answer. Timings of policy steps are the wall time of the whole batched step.

Sampling and batching: every step is one ``sampler.generate`` call for all questions still in
flight; step ``s`` of iteration ``i`` uses ``seed + 100 * i + s``. The sampler mixes the prompt's
position in the batch into its per-row seeds, so with ``temperature > 0`` a question's samples
depend on where it sits in the batch; with ``temperature == 0`` (greedy) a batch gives exactly what
the questions give one at a time.

CLI: ``python infer.py --reflect-depth 3 --question "..."`` (see ``infer.py --help``).
Tests: ``python -m pytest -q tests/test_reasoning.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from .tokenizer import (REFLECT_END, REFLECT_START, THINK_END, THINK_START, THINKING_INSTRUCTION,
                        TRAINED_SPECIAL_TOKENS)

__all__ = ["Spans", "extract_spans", "strip_special_tokens", "Policy", "Critic", "ModelCritic",
           "TeacherCritic", "GraphCritic", "IterationTrace", "QuestionTrace", "InferConfig",
           "recursive_response", "recursive_response_from_thinking", "make_critic", "check_endpoint",
           "CriticUnreachableError", "thinking_prompt", "MODES"]

MODES = ("reflect", "from-thinking")
_SPECIALS = tuple(sorted(set(TRAINED_SPECIAL_TOKENS), key=len, reverse=True))
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in _SPECIALS))


# ============================================================================ span extraction

@dataclass
class Spans:
    """The parts of one response; all strings are stripped and free of special tokens."""

    thinking: str
    reflect: str
    answer: str
    thinking_closed: bool = False   # a <|/thinking|> was found (the answer region exists)


_SPECIAL_BETWEEN_WORDS_RE = re.compile(r"(?<=\S)(?:" + _SPECIAL_RE.pattern + r")(?=\S)")


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

    # -- thinking
    region = None
    last_te = text.rfind(THINK_END)
    if last_te >= 0:
        ts = text.rfind(THINK_START, 0, last_te)
        # last TS with a TE after it == last TS before the last TE
        if ts >= 0:
            start = ts + len(THINK_START)
            region = text[start:text.find(THINK_END, start)]
        else:
            region = text[:text.find(THINK_END)]
    else:
        ts = text.rfind(THINK_START)
        if ts >= 0:
            region = text[ts + len(THINK_START):]
    thinking = "" if region is None else strip_special_tokens(_remove_reflect(region))

    # -- reflection
    reflect = ""
    last_re = text.rfind(REFLECT_END)
    rs = text.rfind(REFLECT_START, 0, last_re) if last_re >= 0 else -1
    if rs >= 0:
        start = rs + len(REFLECT_START)
        reflect = text[start:text.find(REFLECT_END, start)]
    else:
        rs = text.rfind(REFLECT_START)
        if rs >= 0:
            start = rs + len(REFLECT_START)
            te = text.find(THINK_END, start)
            reflect = text[start:] if te < 0 else text[start:te]
    reflect = strip_special_tokens(reflect)

    # -- answer
    if last_te >= 0:
        tail = text[last_te + len(THINK_END):]
    elif THINK_START in text:
        tail = ""
    else:
        tail = text
    tail = _remove_reflect(tail)
    cut = tail.find(THINK_START)
    if cut >= 0:
        tail = tail[:cut]
    answer = strip_special_tokens(tail)
    return Spans(thinking=thinking, reflect=reflect, answer=answer, thinking_closed=last_te >= 0)


# ============================================================================ policy

@dataclass
class Policy:
    """The model being asked: a Llama and its tokenizer (generation goes through ``sampler.generate``)."""

    model: Any
    tokenizer: Any

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype=None) -> "Policy":
        from .model import Llama
        from .tokenizer import Tokenizer
        return cls(Llama.from_pretrained(path, dtype=dtype, device=device), Tokenizer.from_pretrained(path))

    def generate(self, prompts, params, stream=None, max_batch_size: int | None = None):
        from .sampler import generate
        return generate(self.model, self.tokenizer, prompts, params, stream=stream, max_batch_size=max_batch_size)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) if text else 0

    def fit_thinking(self, head: str, thinking: str, tail: str, max_new_tokens: int) -> tuple[str, int]:
        """Drop the *oldest* tokens of ``thinking`` until ``head + thinking + tail`` leaves room for
        ``max_new_tokens`` in the context; returns (thinking, number of tokens dropped).

        The newest part is kept because the critic appends its improvements at the end; the
        question (in ``head``) is never dropped here.
        """
        room = (self.model.config.max_position_embeddings - max_new_tokens - self.count_tokens(head)
                - self.count_tokens(tail) - 4)  # margin: re-encoding at the cut can merge differently
        ids = self.tokenizer.encode(thinking) if thinking else []
        if len(ids) <= room:
            return thinking, 0
        keep = max(room, 0)
        return (self.tokenizer.decode(ids[len(ids) - keep:]).lstrip() if keep else ""), len(ids) - keep


def _as_policy(policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (tuple, list)) and len(policy) == 2:
        return Policy(*policy)
    raise TypeError("policy must be a Policy or a (model, tokenizer) pair; got "
                    f"{type(policy).__name__}")


def thinking_prompt(question: str) -> list[dict]:
    """The chat the policy answers: the question plus the instruction to think (as in training)."""
    return [{"role": "user", "content": question.strip() + THINKING_INSTRUCTION}]


# ============================================================================ critics

@runtime_checkable
class Critic(Protocol):
    """Improves thinking, writes feedback on thinking, and merges answers.

    Critics may also define ``improve_many(items)``, ``feedback_many(items)`` and
    ``integrate_many(items)`` taking lists of argument tuples; the loop uses them to batch.
    """

    name: str

    def improve(self, question: str, thinking: str, feedback: str) -> str: ...

    def feedback(self, question: str, thinking: str) -> str: ...

    def integrate(self, question: str, answers: Sequence[str]) -> str: ...


def _call_many(critic, method: str, items: list[tuple]) -> list[str]:
    if not items:
        return []
    many = getattr(critic, method + "_many", None)
    if many is not None:
        out = list(many(items))
        if len(out) != len(items):
            raise RuntimeError(f"{type(critic).__name__}.{method}_many returned {len(out)} results "
                               f"for {len(items)} inputs")
        return out
    one = getattr(critic, method)
    return [one(*x) for x in items]


# -- prompts shared by the LLM-backed critics --------------------------------------------------

CRITIC_SYSTEM = ("You are a careful scientific critic. You read a question and the reasoning written "
                 "to answer it, and you help make that reasoning correct, complete and well grounded.")


def improve_messages(question: str, thinking: str, feedback: str) -> list[dict]:
    return [{"role": "system", "content": CRITIC_SYSTEM},
            {"role": "user", "content":
                f"Question:\n{question}\n\nCurrent thinking:\n{thinking or '(empty)'}\n\n"
                f"Feedback on the thinking:\n{feedback or '(none)'}\n\n"
                "Rewrite the thinking so that it addresses the feedback: keep what is right, fix what "
                "is wrong, add what is missing. Reply with the improved thinking only, without any "
                "preamble and without answering the question."}]


def feedback_messages(question: str, thinking: str) -> list[dict]:
    return [{"role": "system", "content": CRITIC_SYSTEM},
            {"role": "user", "content":
                f"Question:\n{question}\n\nThinking:\n{thinking or '(empty)'}\n\n"
                "Critique this thinking: what is missing, wrong or unsupported, and how should it be "
                "improved? Reply with the feedback only, as a short list."}]


def integrate_messages(question: str, answers: Sequence[str]) -> list[dict]:
    listed = "\n\n".join(f"Answer {i + 1}:\n{a or '(empty)'}" for i, a in enumerate(answers))
    return [{"role": "system", "content": CRITIC_SYSTEM},
            {"role": "user", "content":
                f"Question:\n{question}\n\n{listed}\n\n"
                "These answers come from successive rounds of improved reasoning. Merge them into one "
                "complete, consistent answer that keeps every correct point. Reply with the answer only."}]


def _clean_reply(text: str, kind: str) -> str:
    """An LLM critic's reply -> plain text; markup in the reply picks the relevant span."""
    if any(t in text for t in (THINK_START, THINK_END, REFLECT_START, REFLECT_END)):
        spans = extract_spans(text)
        pick = {"improve": spans.thinking or spans.answer,
                "feedback": spans.reflect or spans.answer or spans.thinking,
                "integrate": spans.answer or spans.thinking}[kind]
        return pick.strip()
    return strip_special_tokens(text)


class _LLMCritic:
    """Shared logic of critics that answer chat prompts: subclasses define ``_complete_many``."""

    name = "llm"

    def _complete_many(self, chats: list[list[dict]]) -> list[str]:
        raise NotImplementedError

    def improve_many(self, items: Sequence[tuple[str, str, str]]) -> list[str]:
        replies = self._complete_many([improve_messages(q, t, f) for q, t, f in items])
        # an empty reply keeps the old thinking: the loop must always have something to force
        return [_clean_reply(r, "improve") or strip_special_tokens(t) for r, (_, t, _) in zip(replies, items)]

    def feedback_many(self, items: Sequence[tuple[str, str]]) -> list[str]:
        return [_clean_reply(r, "feedback") for r in self._complete_many([feedback_messages(q, t) for q, t in items])]

    def integrate_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        replies = self._complete_many([integrate_messages(q, a) for q, a in items])
        # an empty merge falls back to the last non-empty answer
        return [_clean_reply(r, "integrate") or next((x for x in reversed(list(a)) if x.strip()), "")
                for r, (_, a) in zip(replies, items)]

    def improve(self, question: str, thinking: str, feedback: str) -> str:
        return self.improve_many([(question, thinking, feedback)])[0]

    def feedback(self, question: str, thinking: str) -> str:
        return self.feedback_many([(question, thinking)])[0]

    def integrate(self, question: str, answers: Sequence[str]) -> str:
        return self.integrate_many([(question, list(answers))])[0]


class ModelCritic(_LLMCritic):
    """A Llama checkpoint prompted as the critic (the policy itself, or another checkpoint).

    Prompts are rendered with the chat template and sampled in one batch per call; prompts longer
    than the model's context are truncated from the left.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, name: str | None = None):
        self.policy = Policy(model, tokenizer)
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed = seed
        self.calls = 0
        self.name = name or "model"

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype=None, **kwargs) -> "ModelCritic":
        p = Policy.from_pretrained(path, device=device, dtype=dtype)
        kwargs.setdefault("name", f"model:{os.path.basename(os.path.normpath(path))}")
        return cls(p.model, p.tokenizer, **kwargs)

    def _complete_many(self, chats: list[list[dict]]) -> list[str]:
        from .sampler import SamplingParams
        self.calls += 1
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k, seed=self.seed + 7919 * self.calls,
                                truncate_prompt_left=True)
        return [c.text for c in self.policy.generate(chats, params)]


class TeacherCritic(_LLMCritic):
    """Any ``teachers.Teacher`` (``complete_many(chats, temperature, max_tokens)``) as the critic;
    with ``teachers.OpenAITeacher`` an OpenAI-compatible endpoint (requests run concurrently)."""

    def __init__(self, teacher, max_tokens: int = 512, temperature: float = 0.0):
        self.teacher = teacher
        self.max_tokens, self.temperature = max_tokens, temperature
        self.name = f"teacher:{getattr(teacher, 'name', type(teacher).__name__)}"

    def _complete_many(self, chats: list[list[dict]]) -> list[str]:
        return list(self.teacher.complete_many(chats, temperature=self.temperature, max_tokens=self.max_tokens))


# -- the offline graph critic --------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-]*")


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _sentences(text: str) -> list[str]:
    try:
        from .retrieval.chunking import sentence_spans
        parts = [text[s:e] for s, e in sentence_spans(text)]
    except ImportError:  # pragma: no cover - the retrieval package ships with preflexor_core
        parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


class GraphCritic:
    """Offline, deterministic critic over a graph retriever (``search``, ``expand``, ``concepts_of``).

    - ``improve``: appends ``**Additional facts**:`` - up to ``max_facts`` corpus sentences from
      ``retriever.search(question + thinking)`` that the thinking does not already contain (sentences
      naming the concepts the feedback or the thinking lacks come first) - and ``**Concept path**:
      a -> b -> c``, the longest path from ``retriever.expand`` not yet written in the thinking.
      If nothing new is found the thinking is returned unchanged.
    - ``feedback``: lists the relevant concepts (of the question and of the top hits) that the
      thinking does not mention.
    - ``integrate``: the answer covering the most relevant concepts (ties: the later one), plus up
      to ``max_support`` sentences of the other answers that add concepts it lacks.
    """

    FACTS_HEADER = "**Additional facts**:"
    PATH_HEADER = "**Concept path**:"

    def __init__(self, retriever, k: int = 5, max_facts: int = 3, max_support: int = 2,
                 max_concepts: int = 8):
        if retriever is None or not hasattr(retriever, "search"):
            raise TypeError("GraphCritic needs a retriever with .search(query, k) "
                            "(e.g. GraphRetriever.load(dir) or GraphRetriever.build(texts))")
        self.retriever = retriever
        self.k, self.max_facts, self.max_support, self.max_concepts = k, max_facts, max_support, max_concepts
        self.name = "graph"

    # ---------------------------------------------------------------- retriever access
    def _search(self, query: str) -> list:
        query = " ".join(query.split())
        return list(self.retriever.search(query, k=self.k)) if query else []

    def _concepts(self, text: str) -> list[str]:
        """Concepts of ``text`` known to the graph (``concepts_of(text, in_graph=True)`` when supported)."""
        fn = getattr(self.retriever, "concepts_of", None)
        if fn is None or not text.strip():
            return []
        try:
            found = fn(text, in_graph=True)
        except TypeError:  # a retriever whose concepts_of takes only the text
            found = fn(text)
        out, seen = [], set()
        for c in map(str, found):
            if c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
        return out

    def _paths(self, hits: list, query: str) -> list[list[str]]:
        """Concept paths from ``retriever.expand(hits, query=query)`` (``Expansion.concept_paths``)."""
        fn = getattr(self.retriever, "expand", None)
        if fn is None or not hits:
            return []
        try:
            res = fn(hits, query=query)
        except TypeError:
            res = fn(hits)
        if isinstance(res, dict):
            paths = res.get("concept_paths", res.get("paths", []))
        elif isinstance(res, tuple) and len(res) == 2:
            paths = res[1]
        else:
            paths = getattr(res, "concept_paths", None) or getattr(res, "paths", None) or []
        return [[str(c) for c in p] for p in paths if len(p) >= 2]

    def relevant_concepts(self, question: str, hits: list | None = None) -> list[str]:
        """Concepts of the question, then of the top hits (deduplicated, at most ``max_concepts``)."""
        hits = self._search(question) if hits is None else hits
        out = self._concepts(question)
        for h in hits[:2]:
            for c in self._concepts(getattr(h, "text", str(h))):
                if c.lower() not in {x.lower() for x in out}:
                    out.append(c)
        return out[: self.max_concepts]

    @staticmethod
    def _mentions(text_norm: str, concept: str) -> bool:
        c = _norm(concept)
        return bool(c) and f" {c} " in f" {text_norm} "

    # ---------------------------------------------------------------- Critic
    def feedback(self, question: str, thinking: str) -> str:
        concepts = self.relevant_concepts(question)
        tn = _norm(thinking)
        missing = [c for c in concepts if not self._mentions(tn, c)]
        if not thinking.strip():
            return ("The thinking is empty. Reason step by step about: " + ", ".join(concepts) + "."
                    if concepts else "The thinking is empty. Reason step by step about the question.")
        if missing:
            return ("Missing concepts: " + ", ".join(missing) + ". Add facts about them and connect "
                    "them to the question.")
        return ("The thinking mentions the key concepts (" + ", ".join(concepts) + "); check that each "
                "step follows from the facts.") if concepts else "No missing concepts were found."

    def improve(self, question: str, thinking: str, feedback: str) -> str:
        thinking = strip_special_tokens(thinking)
        hits = self._search(question + " " + thinking)
        tn = _norm(thinking)
        wanted = [c for c in self.relevant_concepts(question, hits) if not self._mentions(tn, c)]
        wanted += [c for c in self._concepts(feedback) if c.lower() not in {w.lower() for w in wanted}
                   and not self._mentions(tn, c)]
        candidates, seen = [], set()
        for rank, h in enumerate(hits):
            for pos, s in enumerate(_sentences(getattr(h, "text", str(h)))):
                sn = _norm(s)
                if len(sn.split()) < 3 or sn in seen or sn in tn:
                    continue
                seen.add(sn)
                gain = sum(1 for c in wanted if self._mentions(sn, c))
                candidates.append((-gain, rank, pos, s))
        facts = [s for *_, s in sorted(candidates)[: self.max_facts]]
        path = None
        for p in sorted(self._paths(hits, question), key=len, reverse=True):
            line = " -> ".join(p)
            if line.lower() not in thinking.lower():
                path = line
                break
        parts = [thinking] if thinking else []
        if facts:
            parts.append(self.FACTS_HEADER + "\n" + "\n".join(f"- {s}" for s in facts))
        if path:
            parts.append(f"{self.PATH_HEADER} {path}")
        return "\n\n".join(parts)

    def integrate(self, question: str, answers: Sequence[str]) -> str:
        answers = [strip_special_tokens(a) for a in answers]
        nonempty = [(i, a) for i, a in enumerate(answers) if a]
        if not nonempty:
            return ""
        concepts = self.relevant_concepts(question)

        def covered(text: str) -> set[str]:
            tn = _norm(text)
            return {c.lower() for c in concepts if self._mentions(tn, c)}

        best_i, best = max(nonempty, key=lambda t: (len(covered(t[1])), t[0]))
        have = covered(best)
        best_norm = _norm(best)
        extra = []
        for i, a in nonempty:
            if i == best_i:
                continue
            for s in _sentences(a):
                sn = _norm(s)
                new = covered(s) - have
                if not sn or sn in best_norm or not new:
                    continue
                extra.append(s)
                have |= new
                if len(extra) >= self.max_support:
                    break
            if len(extra) >= self.max_support:
                break
        return " ".join([best] + extra)


# -- construction / reachability ----------------------------------------------------------------

class CriticUnreachableError(ConnectionError):
    """The critic's HTTP endpoint did not answer (connection refused, DNS failure, timeout)."""


def _models_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    if not re.search(r"/v\d+$", url):
        url += "/v1"
    return url + "/models"


def check_endpoint(base_url: str, timeout: float = 3.0) -> list[str]:
    """GET ``<base>/v1/models`` with a short timeout; returns the served model ids (maybe none).

    Any HTTP reply (even an error status) means the server is reachable. Connection refused, a
    DNS failure or a timeout raise :class:`CriticUnreachableError` naming the URL.
    """
    if not re.match(r"^https?://[^/\s]+", base_url or ""):
        raise ValueError(f"critic URL must look like http://host:port/v1, got {base_url!r}")
    url = _models_url(base_url)
    req = urllib.request.Request(url, headers={"Accept": "application/json"}, method="GET")
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError:
        return []
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CriticUnreachableError(f"critic endpoint {base_url} is unreachable ({url}: {reason})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
        return [str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        return []


def make_critic(spec: str, policy=None, retriever=None, critic_model: str | None = None,
                max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                timeout: float = 60.0, check_timeout: float = 3.0):
    """A critic from a spec: ``same`` (the policy), ``graph`` (needs ``retriever``), an
    ``http(s)://`` URL of an OpenAI-compatible server, or a checkpoint directory."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("critic spec is empty; use same, graph, an http(s):// URL or a checkpoint dir")
    spec = spec.strip()
    if spec == "same":
        if policy is None:
            raise ValueError("critic 'same' needs the policy (model, tokenizer)")
        p = _as_policy(policy)
        return ModelCritic(p.model, p.tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed, name="same")
    if spec == "graph":
        if retriever is None:
            raise ValueError("critic 'graph' needs a retriever (a GraphRetriever directory)")
        return GraphCritic(retriever)
    if spec.startswith(("http://", "https://")):
        served = check_endpoint(spec, timeout=check_timeout)
        model = critic_model or (served[0] if served else None)
        if not model:
            raise ValueError(f"critic endpoint {spec} does not list its models; name one with --critic-model")
        from .teachers import OpenAITeacher
        return TeacherCritic(OpenAITeacher(spec, model, timeout=timeout, max_retries=2),
                             max_tokens=max_new_tokens, temperature=temperature)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"critic dir {spec} has no config.json; expected a checkpoint dir "
                             "(config.json + *.safetensors + tokenizer.json)")
        return ModelCritic.from_pretrained(spec, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    raise ValueError(f"bad critic {spec!r}: expected same, graph, an http(s):// URL of an OpenAI-compatible "
                     "server, or an existing checkpoint directory")


# ============================================================================ traces

@dataclass
class IterationTrace:
    """One iteration for one question. ``improved_thinking`` is None at depth 0 (no critic)."""

    iteration: int
    thinking: str
    reflection: str
    improved_thinking: str | None
    answer: str
    draft_answer: str | None = None        # the answer the policy wrote in its thinking pass, if any
    raw: dict[str, str] = field(default_factory=dict)        # raw policy outputs per step
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (batched steps: whole batch)
    tokens: dict[str, int] = field(default_factory=dict)     # generated tokens per step + span lengths


@dataclass
class QuestionTrace:
    question: str
    iterations: list[IterationTrace] = field(default_factory=list)
    final_answer: str = ""
    integrated: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ============================================================================ config

@dataclass(kw_only=True)
class InferConfig:
    """Every default of ``infer.py`` (the CLI only parses flags into this)."""

    questions: list[str] = field(default_factory=list)
    questions_file: str | None = None     # .txt (one per line) or .jsonl ("question" field)
    model: str | None = None              # None -> the embedded demo checkpoint (DEMO_MODEL_DIRS)
    retriever: str = "runs/demo/retriever"
    critic: str | None = None             # None -> graph when the retriever exists, else same
    critic_model: str | None = None
    reflect_depth: int = 3
    mode: str = "reflect"
    integrate: bool = True
    max_new_tokens: int = 256
    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0
    stream: bool = False
    json: str | None = None
    device: str = "cpu"
    critic_timeout: float = 60.0
    check_timeout: float = 3.0


DEMO_MODEL_DIRS = ("runs/demo/stage2", "runs/demo/stage1", "runs/demo/stage0")
DEMO_COMMAND = "`make demo` (or `python train.py --stage all`)"


# ============================================================================ the loop

StepStream = Callable[[int, int, str, str], None]   # (question_index, iteration, step, text_delta)


def _step_params(sampling, iteration: int, step: int, **overrides):
    seed = None if sampling.seed is None else sampling.seed + 100 * iteration + step
    return dataclasses.replace(sampling, n=1, seed=seed, truncate_prompt_left=True, **overrides)


def _run_step(policy: Policy, prompts, params, rows: list[int], iteration: int, step: str,
              stream: StepStream | None, max_batch_size):
    cb = None
    if stream is not None:
        def cb(prompt_index: int, sample_index: int, delta: str) -> None:
            stream(rows[prompt_index], iteration, step, delta)
    t0 = time.perf_counter()
    outs = policy.generate(prompts, params, stream=cb, max_batch_size=max_batch_size)
    return outs, time.perf_counter() - t0


def _generated(c) -> int:
    return len(c.token_ids) - int(getattr(c, "num_forced_tokens", 0))


def recursive_response(policy, critic, question, depth: int = 3, integrator=None, sampling=None, *,
                       mode: str = "reflect", integrate: bool = True, stream: StepStream | None = None,
                       max_batch_size: int | None = None):
    """Recursive reflective reasoning for one question (-> :class:`QuestionTrace`) or a list of them
    (-> list, same order; every step is one batched ``generate`` call for all of them).

    ``policy``: :class:`Policy` or ``(model, tokenizer)``. ``critic``: a :class:`Critic` (unused at
    depth 0; may be None then). ``integrator``: merges the answers (default: the critic).
    ``sampling``: ``SamplingParams`` for the policy (``n``, ``seed`` and ``prepend_response`` are set
    per step). ``stream(question_index, iteration, step, delta)`` receives policy text as it comes;
    steps are ``"think"``, ``"reflect"`` and ``"answer"``.
    """
    from .sampler import SamplingParams

    single = isinstance(question, str)
    questions = [question] if single else list(question)
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question {i + 1} is empty; give a non-empty question")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be an int >= 0 (0 = a single pass), got {depth!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if depth > 0 and critic is None:
        raise ValueError("depth >= 1 needs a critic (e.g. GraphCritic(retriever) or ModelCritic(model, tok))")
    policy = _as_policy(policy)
    sampling = sampling if sampling is not None else SamplingParams(max_new_tokens=256, temperature=0.1,
                                                                    top_p=0.9, top_k=50, seed=0)
    integrator = integrator if integrator is not None else critic
    n = len(questions)
    traces = [QuestionTrace(question=q) for q in questions]
    if n == 0:
        return traces
    t_all = time.perf_counter()
    chats = [thinking_prompt(q) for q in questions]
    rows = list(range(n))
    thinking: list[str] = [""] * n

    for it in range(1, max(depth, 1) + 1):
        recs = [IterationTrace(iteration=it, thinking="", reflection="", improved_thinking=None, answer="")
                for _ in range(n)]
        # -- 1. thinking and feedback
        if it == 1:
            params = _step_params(sampling, it, 0, prepend_response=THINK_START)
            outs, dt = _run_step(policy, chats, params, rows, it, "think", stream, max_batch_size)
            for r, c in zip(recs, outs):
                sp = extract_spans(c.text)
                r.thinking, r.reflection = sp.thinking, sp.reflect
                r.draft_answer = sp.answer if sp.thinking_closed else ""
                r.raw["think"] = c.text
                r.timings["think_s"] = dt
                r.tokens["think_generated"] = _generated(c)
        else:
            for r, t in zip(recs, thinking):
                r.thinking = t
            if mode == "reflect":
                params = _step_params(sampling, it, 0, prepend_response="",
                                      stop=list(dict.fromkeys([*sampling.stop, REFLECT_END, THINK_END])))
                prompts = []
                for r, ch, t in zip(recs, chats, thinking):
                    head = policy.tokenizer.apply_chat_template(ch, add_generation_prompt=True) + THINK_START
                    t, dropped = policy.fit_thinking(head, t, "\n" + REFLECT_START, params.max_new_tokens)
                    r.tokens["reflect_thinking_dropped"] = dropped
                    prompts.append(head + t + "\n" + REFLECT_START)
                outs, dt = _run_step(policy, prompts, params, rows, it, "reflect", stream, max_batch_size)
                for r, c in zip(recs, outs):
                    r.reflection = strip_special_tokens(c.text)
                    r.raw["reflect"] = c.text
                    r.timings["reflect_s"] = dt
                    r.tokens["reflect_generated"] = _generated(c)
        if depth == 0:
            for r in recs:
                r.answer = r.draft_answer or ""
        else:
            if mode == "from-thinking":
                t0 = time.perf_counter()
                fb = _call_many(critic, "feedback", [(q, r.thinking) for q, r in zip(questions, recs)])
                dt = time.perf_counter() - t0
                for r, f in zip(recs, fb):
                    r.reflection = strip_special_tokens(f)
                    r.timings["feedback_s"] = dt
            # -- 2. the critic improves the thinking
            t0 = time.perf_counter()
            improved = _call_many(critic, "improve",
                                  [(q, r.thinking, r.reflection) for q, r in zip(questions, recs)])
            dt = time.perf_counter() - t0
            improved = [strip_special_tokens(x) for x in improved]
            for r, x in zip(recs, improved):
                r.improved_thinking = x
                r.timings["improve_s"] = dt
            # -- 3. the policy answers from the improved thinking
            # the forced "<|thinking|>improved<|/thinking|>\n" differs per question, so it is appended
            # to each rendered prompt (what prepend_response does) and put back in front of the text;
            # improved thinking too long for the context loses its oldest tokens (counted in the trace)
            heads = [policy.tokenizer.apply_chat_template(ch, add_generation_prompt=True) for ch in chats]
            forced = []
            for r, h, x in zip(recs, heads, improved):
                x, dropped = policy.fit_thinking(h + THINK_START, x, THINK_END + "\n", sampling.max_new_tokens)
                r.tokens["answer_thinking_dropped"] = dropped
                forced.append(THINK_START + x + THINK_END + "\n")
            prompts = [h + f for h, f in zip(heads, forced)]
            params = _step_params(sampling, it, 1, prepend_response="")
            t0 = time.perf_counter()
            outs, _ = _run_step(policy, prompts, params, rows, it, "answer", stream, max_batch_size)
            outs = [dataclasses.replace(c, text=f + c.text) for c, f in zip(outs, forced)]
            dt = time.perf_counter() - t0
            for r, c in zip(recs, outs):
                r.answer = extract_spans(c.text).answer
                r.raw["answer"] = c.text
                r.timings["answer_s"] = dt
                r.tokens["answer_generated"] = _generated(c)
            thinking = list(improved)
        for r in recs:
            r.tokens.update({"thinking": policy.count_tokens(r.thinking),
                             "reflection": policy.count_tokens(r.reflection),
                             "improved_thinking": policy.count_tokens(r.improved_thinking or ""),
                             "answer": policy.count_tokens(r.answer)})
            r.timings["total_s"] = sum(v for k, v in r.timings.items() if k.endswith("_s") and k != "total_s")
        for tr, r in zip(traces, recs):
            tr.iterations.append(r)

    # -- integration
    if depth >= 1 and integrate:
        t0 = time.perf_counter()
        merged = _call_many(integrator, "integrate",
                            [(tr.question, [r.answer for r in tr.iterations]) for tr in traces])
        dt = time.perf_counter() - t0
        for tr, m in zip(traces, merged):
            tr.final_answer = strip_special_tokens(m)
            tr.integrated = True
            tr.timings["integrate_s"] = dt
    else:
        for tr in traces:
            tr.final_answer = tr.iterations[-1].answer
    total = time.perf_counter() - t_all
    for tr in traces:
        tr.timings["total_s"] = total
    return traces[0] if single else traces


def recursive_response_from_thinking(policy, critic, question, depth: int = 3, integrator=None,
                                     sampling=None, **kwargs):
    """:func:`recursive_response` where the critic writes the feedback from the thinking alone
    (the policy's own reflection is not used; later iterations start from the improved thinking)."""
    return recursive_response(policy, critic, question, depth=depth, integrator=integrator,
                              sampling=sampling, mode="from-thinking", **kwargs)
