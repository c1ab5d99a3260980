"""Offline extractive teacher: deterministic for a seed, no LLM, only quotes the corpus.

``ExtractiveTeacher(retriever, seed=0)`` writes questions from templates over a chunk's concepts,
fills each thinking category from the graph retriever (concept paths, neighbours, cue-word
sentences, top chunks) and answers with the corpus sentences that overlap the question most; the
thinking holds the evidence and never repeats the answer's sentences (the conclusion).
Every sentence it emits is a corpus sentence (line breaks inside a sentence become single
spaces); only list bullets / headers (concept terms) and step numbers are its own. It is the
default teacher of the embedded run and of the tests.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1-2.2 (question, RAG, thinking
categories, answer).

Tests: ``python -m pytest -q tests/test_teachers.py -k extractive``.
"""
from __future__ import annotations

import random
import re
from typing import Any, Sequence

from ..text.words import content_words, is_prose, mentions, split_sentences
from ..thinking.formats import THINKING_INSTRUCTION
from ..retrieval.context import Context, Sentence, chunk_concepts, concepts_of, gather_context
from ..retrieval.graph import concept_node
from .base import Messages, check_messages, hash_seed, last_user_text
from .graph_writer import GraphWriter

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
        rng = random.Random(hash_seed(self.seed, "question", text, salt))
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
        n_chunks = max(1, len(self.retriever))

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
        # The answer's sentences (the conclusion) are kept out of the thinking (the evidence).
        concl = {s.text for s in self._answer_sentences(question, ctx)}
        if key == "reasoning steps":
            return self._reasoning_steps(question, ctx, concl)
        if key in ("relevant materials or concepts", "relevant materials", "relevant concepts"):
            return self._concept_list(question, ctx)
        if key == "additional background":
            return self._background(ctx, concl)
        cues = CATEGORY_CUES.get(key)
        if cues is None:  # a user-defined category: cue on its own words
            cues = tuple(sorted(content_words(category)))
        return self._cued_sentences(question, ctx, cues, concl)

    def _reasoning_steps(self, question: str, ctx: Context, exclude: set[str] = frozenset()) -> str:
        sents = [s for s in ctx.sentences() if s.text not in exclude]
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

    def _cued_sentences(self, question: str, ctx: Context, cues: Sequence[str],
                        exclude: set[str] = frozenset()) -> str:
        """Sentences carrying the category's cue words, ranked by cue count + question overlap."""
        ranked = [t for t in self._ranked(question, ctx) if t[1].text not in exclude]
        cued = [(sc + 1.5 * _cue_count(s.text, cues), s) for sc, s in ranked if _cue_count(s.text, cues)]
        cued.sort(key=lambda t: (-t[0], t[1].rank, t[1].position))
        picked = cued[: self.max_items]
        if not picked:  # nothing carries a cue word: fall back to the most relevant sentences
            picked = ranked[: min(2, len(ranked))]
        picked = sorted(picked, key=lambda t: (t[1].rank, t[1].position))
        return "\n".join(f"- {s.text}" for _, s in picked)

    def _background(self, ctx: Context, exclude: set[str] = frozenset()) -> str:
        firsts = []
        for h in ctx.hits[: min(self.k, self.max_items)]:
            ss = [x for x in split_sentences(getattr(h, "text", "")) if x not in exclude]
            first = next((x for x in ss if is_prose(x)), ss[0] if ss else "")
            if first and first not in firsts:
                firsts.append(first)
        return " ".join(firsts)

    # ---------------------------------------------------------------- answer
    def answer(self, question: str, context=None, n_min: int = 2, n_max: int | None = None) -> str:
        """2 to ``max_answer_sentences`` context sentences with the highest overlap with the question's
        concepts (the conclusion; ``fill_category`` keeps these sentences out of the thinking)."""
        ctx = self._as_context(question, context)
        return " ".join(s.text for s in self._answer_sentences(question, ctx, n_min, n_max))

    def _answer_sentences(self, question: str, ctx: Context, n_min: int = 2,
                          n_max: int | None = None) -> list[Sentence]:
        """The answer's sentences, most relevant first."""
        n_max = self.max_answer_sentences if n_max is None else n_max
        n_min = min(n_min, n_max)
        ranked = self._ranked(question, ctx)
        good = [t for t in ranked if t[0] > 0][:n_max]
        if len(good) < n_min:
            good = ranked[: min(n_min, len(ranked))]
        return [s for _, s in good]

    def graph_thinking(self, question: str, context=None):
        """The graph-format thinking of ``question`` (``graph_writer.GraphWriter`` over this retriever;
        ``.thinking``, ``.sources``); the answer's sentences are kept out of it."""
        ctx = self._as_context(question, context)
        if getattr(self, "_graph_writer", None) is None:
            # Brainstorm and Synthesis quote as many sentences as a category holds (at most 2 each)
            self._graph_writer = GraphWriter(self.retriever, max_quotes=min(2, self.max_items))
        return self._graph_writer.write(question, ctx, answer=self.answer(question, ctx))

    def plain_answer(self, question: str, salt: Any = "") -> str:
        """An answer *without* retrieval: the best-overlapping sentences of a few random chunks.

        Still corpus sentences, but not grounded in the question's context: the extractive
        stand-in for "the teacher answers without context" (rejected_from="teacher").
        """
        rng = random.Random(hash_seed(self.seed, "plain", question, salt))
        chunks = self.retriever.chunks
        hits = rng.sample(chunks, min(self.k, len(chunks)))
        ctx = Context(question=question, hits=hits,
                      question_concepts=concepts_of(self.retriever, question))
        return self.answer(question, ctx)

    # ---------------------------------------------------------------- generic
    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        question = last_user_text(check_messages(messages)).strip()
        if question.endswith(THINKING_INSTRUCTION.strip()):
            question = question[: -len(THINKING_INSTRUCTION.strip())].strip()
        text = self.answer(question, self.context(question))
        return _truncate_words(text, max_tokens)

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512, return_exceptions: bool = False) -> list[str]:
        return [self.complete(m, temperature, max_tokens) for m in list_of_messages]


def _concept_df(retriever, term: str) -> int | None:
    """How many chunks mention ``term`` (from the retriever's graph), or None when unknown."""
    node = retriever.graph.graph.nodes.get(concept_node(term))
    return None if node is None else int(node["df"])


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
