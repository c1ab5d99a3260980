"""Critics of the recursive loop: the :class:`Critic` protocol and the LLM-backed critics.

- :class:`ModelCritic`: a Llama + tokenizer prompted as a critic, the policy itself ("same") or
  another checkpoint (``ModelCritic.from_pretrained(dir)``); batched through the sampler.
- :class:`TeacherCritic`: any ``teachers.Teacher``; with ``teachers.OpenAITeacher`` an
  OpenAI-compatible HTTP endpoint (:func:`check_endpoint` tests reachability up front).
- :func:`make_critic` builds one from a spec (``same``, ``graph``, a URL, a checkpoint dir).
The offline critic is ``graph_critic.GraphCritic``. Method: PRefLexOR, arXiv 2410.12375.
Tests: ``python -m pytest -q tests/test_reasoning.py -k critic``.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Protocol, Sequence, runtime_checkable

from ..infra import env
from ..thinking.spans import extract_spans, strip_special_tokens
from ..thinking.tokens import REFLECT_END, REFLECT_START, THINK_END, THINK_START
from ..sampler import SamplingParams
from ..teachers import OpenAITeacher
from ..teachers.net import RequestDeadlineError, fetch, redact_url
from .graph_critic import GraphCritic
from .policy import Policy, as_policy

__all__ = ["Critic", "ModelCritic", "TeacherCritic", "CriticUnreachableError", "check_endpoint",
           "make_critic", "call_many", "CRITIC_SYSTEM", "improve_messages", "feedback_messages",
           "integrate_messages"]


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


def call_many(critic, method: str, items: list[tuple]) -> list[str]:
    """``critic.<method>_many(items)`` when the critic has it, else ``<method>(*item)`` per item."""
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


# ============================================================================ prompts

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


# ============================================================================ LLM critics

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


# ============================================================================ construction / reachability

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
        raise ValueError(f"critic URL must look like http://host:port/v1, got {redact_url(base_url)!r}")
    url = _models_url(base_url)
    req = urllib.request.Request(url, headers={"Accept": "application/json"}, method="GET")
    key = env.secret("OPENAI_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:    # an overall deadline, a size cap, and no redirect to another origin (the key stays home)
        _, raw = fetch(req, timeout=timeout, max_bytes=1 << 20)
    except urllib.error.HTTPError:
        return []
    except (urllib.error.URLError, OSError, RequestDeadlineError) as e:
        reason = getattr(e, "reason", e)
        raise CriticUnreachableError(f"critic endpoint {redact_url(base_url)} is unreachable "
                                     f"({redact_url(url)}: {redact_url(str(reason))})") from None
    try:   # a reply that is not the OpenAI model list names no models
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
        p = as_policy(policy)
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
            raise ValueError(f"critic endpoint {redact_url(spec)} does not list its models; name one with "
                             "--critic-model")
        return TeacherCritic(OpenAITeacher(spec, model, timeout=timeout, max_retries=2),
                             max_tokens=max_new_tokens, temperature=temperature)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"critic dir {spec} has no config.json; expected a checkpoint dir "
                             "(config.json + *.safetensors + tokenizer.json)")
        return ModelCritic.from_pretrained(spec, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    raise ValueError(f"bad critic {redact_url(spec)!r}: expected same, graph, an http(s):// URL of an "
                     "OpenAI-compatible server, or an existing checkpoint directory")
