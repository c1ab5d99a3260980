"""The recursive reasoning loop: think, reflect, improve, answer again; integrate at the end.

PRefLexOR (Buehler, arXiv 2410.12375, "Recursive reasoning"): each iteration the policy thinks
(iteration 1) or reflects on the current thinking (later ones), a critic improves the thinking, and
the policy answers with the improved thinking forced at the start of its response. After ``depth``
iterations an integrator (default: the critic) merges the answers. Mode ``from-thinking``: the
critic writes the feedback instead of the policy's ``<|reflect|>``. Depth 0 is the think step only.
Every step is one batched ``sampler.generate`` call for all questions; step ``s`` of iteration ``i``
uses seed ``seed + 100 * i + s`` (with temperature 0 a batch equals one question at a time).
``thinking_format="graph"`` asks for the graph sections (``thinking.formats.chat``) and records, per
iteration, the format and graph-validity rewards (``rewards.structure``) of its completion.
Tests: ``python -m pytest -q tests/test_reasoning.py``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..thinking.formats import chat, check_format_name
from ..thinking.spans import extract_spans, strip_special_tokens
from ..thinking.tokens import REFLECT_END, REFLECT_START, THINK_END, THINK_START
from ..sampler import SamplingParams
from ..rewards.structure import format_reward, graph_validity_reward
from .critics import call_many
from .policy import Policy, as_policy

__all__ = ["IterationTrace", "QuestionTrace", "recursive_response", "recursive_response_from_thinking",
           "MODES", "StepStream"]

MODES = ("reflect", "from-thinking")
StepStream = Callable[[int, int, str, str], None]   # (question_index, iteration, step, text_delta)


@dataclass
class IterationTrace:
    """One iteration for one question. ``improved_thinking`` is None at depth 0 (no critic)."""

    iteration: int
    thinking: str = ""
    reflection: str = ""
    improved_thinking: str | None = None
    answer: str = ""
    draft_answer: str | None = None        # the answer the policy wrote in its thinking pass, if any
    raw: dict[str, str] = field(default_factory=dict)        # raw policy outputs per step
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (batched steps: whole batch)
    tokens: dict[str, int] = field(default_factory=dict)     # generated tokens per step + span lengths
    # thinking_format="graph": {"format": x, "graph_validity": y} of completion() (empty otherwise)
    rewards: dict[str, float] = field(default_factory=dict)

    def completion(self) -> str:
        """The text this iteration's answer was read from: the answer pass (the improved thinking
        forced between ``<|thinking|>`` and ``<|/thinking|>``, then the policy's reply), or at depth 0
        the thinking pass (``<|thinking|>`` forced, then the policy's thinking and draft answer)."""
        return self.raw.get("answer", self.raw.get("think", ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class QuestionTrace:
    question: str
    iterations: list[IterationTrace] = field(default_factory=list)
    final_answer: str = ""
    integrated: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Run:
    """What every step needs: the policy, the critic, sampling, and the questions in flight."""

    policy: Policy
    critic: Any
    sampling: Any
    questions: list[str]
    stream: StepStream | None
    max_batch_size: int | None
    thinking_format: str = "categories"

    def __post_init__(self):
        self.chats = [chat(q, self.thinking_format) for q in self.questions]
        self.heads = [self.policy.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in self.chats]

    def params(self, iteration: int, step: int, **overrides):
        s = self.sampling
        seed = None if s.seed is None else s.seed + 100 * iteration + step
        return dataclasses.replace(s, n=1, seed=seed, truncate_prompt_left=True, **overrides)

    def generate(self, prompts, params, iteration: int, step: str):
        """One batched policy call; returns (completions, seconds)."""
        cb = None
        if self.stream is not None:
            def cb(prompt_index: int, sample_index: int, delta: str) -> None:
                self.stream(prompt_index, iteration, step, delta)
        t0 = time.perf_counter()
        outs = self.policy.generate(prompts, params, stream=cb, max_batch_size=self.max_batch_size)
        return outs, time.perf_counter() - t0

    def timed_critic(self, method: str, items: list[tuple]) -> tuple[list[str], float]:
        t0 = time.perf_counter()
        out = call_many(self.critic, method, items)
        return [strip_special_tokens(x) for x in out], time.perf_counter() - t0


def _generated(c) -> int:
    return len(c.token_ids) - c.num_forced_tokens


# ============================================================================ steps

def _think(run: _Run, recs: list[IterationTrace]) -> None:
    """Iteration 1: the policy thinks (``<|thinking|>`` forced); its thinking, reflection and draft."""
    outs, dt = run.generate(run.chats, run.params(1, 0, prepend_response=THINK_START), 1, "think")
    for r, c in zip(recs, outs):
        sp = extract_spans(c.text)
        r.thinking, r.reflection = sp.thinking, sp.reflect
        r.draft_answer = sp.answer if sp.thinking_closed else ""
        r.raw["think"] = c.text
        r.timings["think_s"] = dt
        r.tokens["think_generated"] = _generated(c)


def _reflect(run: _Run, recs: list[IterationTrace], it: int) -> None:
    """Later iterations: the policy writes a ``<|reflect|>`` on the current thinking (forced)."""
    s = run.sampling
    params = run.params(it, 0, prepend_response="", stop=list(dict.fromkeys([*s.stop, REFLECT_END, THINK_END])))
    prompts = []
    for r, head in zip(recs, run.heads):
        head = head + THINK_START
        t, dropped = run.policy.fit_thinking(head, r.thinking, "\n" + REFLECT_START, params.max_new_tokens)
        r.tokens["reflect_thinking_dropped"] = dropped
        prompts.append(head + t + "\n" + REFLECT_START)
    outs, dt = run.generate(prompts, params, it, "reflect")
    for r, c in zip(recs, outs):
        r.reflection = strip_special_tokens(c.text)
        r.raw["reflect"] = c.text
        r.timings["reflect_s"] = dt
        r.tokens["reflect_generated"] = _generated(c)


def _critic_feedback(run: _Run, recs: list[IterationTrace]) -> None:
    """Mode ``from-thinking``: the critic writes the feedback on the thinking."""
    fb, dt = run.timed_critic("feedback", [(q, r.thinking) for q, r in zip(run.questions, recs)])
    for r, f in zip(recs, fb):
        r.reflection = f
        r.timings["feedback_s"] = dt


def _improve(run: _Run, recs: list[IterationTrace]) -> None:
    """The critic turns thinking + feedback into improved thinking."""
    improved, dt = run.timed_critic("improve", [(q, r.thinking, r.reflection) for q, r in zip(run.questions, recs)])
    for r, x in zip(recs, improved):
        r.improved_thinking = x
        r.timings["improve_s"] = dt


def _answer(run: _Run, recs: list[IterationTrace], it: int) -> None:
    """The policy answers with ``<|thinking|>improved<|/thinking|>\\n`` forced.

    The forced text differs per question, so it is appended to each rendered prompt (what
    ``prepend_response`` does) and put back in front of the reply; improved thinking too long for
    the context loses its oldest tokens (``tokens["answer_thinking_dropped"]``).
    """
    forced = []
    for r, head in zip(recs, run.heads):
        x, dropped = run.policy.fit_thinking(head + THINK_START, r.improved_thinking, THINK_END + "\n",
                                             run.sampling.max_new_tokens)
        r.tokens["answer_thinking_dropped"] = dropped
        forced.append(THINK_START + x + THINK_END + "\n")
    prompts = [h + f for h, f in zip(run.heads, forced)]
    outs, dt = run.generate(prompts, run.params(it, 1, prepend_response=""), it, "answer")
    for r, c, f in zip(recs, outs, forced):
        r.raw["answer"] = f + c.text
        r.answer = extract_spans(r.raw["answer"]).answer
        r.timings["answer_s"] = dt
        r.tokens["answer_generated"] = _generated(c)


def _integrate(integrator, traces: list[QuestionTrace]) -> None:
    """The integrator merges the answers of all iterations into each final answer."""
    t0 = time.perf_counter()
    merged = call_many(integrator, "integrate", [(tr.question, [r.answer for r in tr.iterations]) for tr in traces])
    dt = time.perf_counter() - t0
    for tr, m in zip(traces, merged):
        tr.final_answer = strip_special_tokens(m)
        tr.integrated = True
        tr.timings["integrate_s"] = dt


def _count(policy: Policy, recs: list[IterationTrace]) -> None:
    for r in recs:
        r.tokens.update({"thinking": policy.count_tokens(r.thinking),
                         "reflection": policy.count_tokens(r.reflection),
                         "improved_thinking": policy.count_tokens(r.improved_thinking or ""),
                         "answer": policy.count_tokens(r.answer)})
        r.timings["total_s"] = sum(v for k, v in r.timings.items() if k.endswith("_s") and k != "total_s")


def _score_graph(recs: list[IterationTrace]) -> None:
    """Graph format: the format and graph-validity reward values of each iteration's completion."""
    for r in recs:
        text = r.completion()
        r.rewards = {"format": format_reward(text).value, "graph_validity": graph_validity_reward(text).value}


def _iteration(run: _Run, it: int, thinking: list[str], depth: int, mode: str) -> list[IterationTrace]:
    """One iteration for all questions, from ``thinking`` (the previous improved thinking)."""
    recs = [IterationTrace(iteration=it, thinking=t) for t in thinking]
    if it == 1:
        _think(run, recs)
    elif mode == "reflect":
        _reflect(run, recs, it)
    if depth == 0:
        for r in recs:
            r.answer = r.draft_answer or ""
    else:
        if mode == "from-thinking":
            _critic_feedback(run, recs)
        _improve(run, recs)
        _answer(run, recs, it)
    _count(run.policy, recs)
    if run.thinking_format == "graph":
        _score_graph(recs)
    return recs


# ============================================================================ entry points

def _check(questions: list[str], depth, mode: str, critic, thinking_format: str) -> None:
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question {i + 1} is empty; give a non-empty question")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be an int >= 0 (0 = a single pass), got {depth!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_format_name(thinking_format)
    if depth > 0 and critic is None:
        raise ValueError("depth >= 1 needs a critic (e.g. GraphCritic(retriever) or ModelCritic(model, tok))")


def recursive_response(policy, critic, question, depth: int = 3, integrator=None, sampling=None, *,
                       mode: str = "reflect", integrate: bool = True, stream: StepStream | None = None,
                       max_batch_size: int | None = None, thinking_format: str = "categories"):
    """Recursive reflective reasoning for one question (-> :class:`QuestionTrace`) or a list of them
    (-> list, same order; every step is one batched ``generate`` call for all of them).

    ``policy``: :class:`Policy` or ``(model, tokenizer)``. ``critic``: a ``Critic`` (unused at
    depth 0; may be None then). ``integrator``: merges the answers (default: the critic).
    ``sampling``: ``SamplingParams`` for the policy (``n``, ``seed`` and ``prepend_response`` are set
    per step). ``stream(question_index, iteration, step, delta)`` receives policy text as it comes;
    steps are ``"think"``, ``"reflect"`` and ``"answer"``. ``thinking_format``: "categories" (the
    question + ``THINKING_INSTRUCTION``) or "graph" (the question + ``GRAPH_INSTRUCTION``; each
    iteration's ``rewards`` then holds its format and graph-validity reward values).
    """

    single = isinstance(question, str)
    questions = [question] if single else list(question)
    _check(questions, depth, mode, critic, thinking_format)
    policy = as_policy(policy)
    if sampling is None:
        sampling = SamplingParams(max_new_tokens=256, temperature=0.1, top_p=0.9, top_k=50, seed=0)
    traces = [QuestionTrace(question=q) for q in questions]
    if not questions:
        return traces
    t_all = time.perf_counter()
    run = _Run(policy, critic, sampling, questions, stream, max_batch_size, thinking_format)
    thinking = [""] * len(questions)
    for it in range(1, max(depth, 1) + 1):
        recs = _iteration(run, it, thinking, depth, mode)
        for tr, r in zip(traces, recs):
            tr.iterations.append(r)
        thinking = [r.improved_thinking for r in recs]
    if depth >= 1 and integrate:
        _integrate(integrator if integrator is not None else critic, traces)
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
    (the policy's own reflection is not used; later iterations start from the improved thinking).
    ``kwargs`` go to :func:`recursive_response` (``thinking_format``, ``integrate``, ``stream``, ...)."""
    return recursive_response(policy, critic, question, depth=depth, integrator=integrator,
                              sampling=sampling, mode="from-thinking", **kwargs)
