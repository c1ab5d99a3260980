"""The offline critic: deterministic improvements from the corpus graph retriever.

It adds the corpus facts and concept paths that ``retrieval.GraphRetriever`` finds and the
thinking lacks, lists missing concepts as feedback, and integrates answers by concept coverage.
Text is compared after ``text.normalize_text`` (as graph concepts are stored: lowercase, plurals
stripped). It plays the critic of PRefLexOR's recursive reasoning (arXiv 2410.12375) without an LLM.
Tests: ``python -m pytest -q tests/test_reasoning.py -k graph_critic``.
"""
from __future__ import annotations

from typing import Sequence

from ..text.words import mentions, normalize_text, split_sentences
from ..thinking.spans import strip_special_tokens

__all__ = ["GraphCritic"]


class GraphCritic:
    """Offline, deterministic critic over a ``GraphRetriever`` (``search``, ``expand``, ``concepts_of``).

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
            raise TypeError("GraphCritic needs a GraphRetriever "
                            "(e.g. GraphRetriever.load(dir) or GraphRetriever.build(texts))")
        self.retriever = retriever
        self.k, self.max_facts, self.max_support, self.max_concepts = k, max_facts, max_support, max_concepts
        self.name = "graph"

    # ---------------------------------------------------------------- retriever access
    def _search(self, query: str) -> list:
        query = " ".join(query.split())
        return list(self.retriever.search(query, k=self.k)) if query else []

    def _concepts(self, text: str) -> list[str]:
        """Concepts of ``text`` that the corpus graph knows, case-insensitively deduplicated."""
        if not text.strip():
            return []
        out, seen = [], set()
        for c in self.retriever.concepts_of(text, in_graph=True):
            if c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
        return out

    def _paths(self, hits: list, query: str) -> list[list[str]]:
        """Concept paths (two concepts or more) from ``retriever.expand(hits, query=query)``."""
        if not hits:
            return []
        return [list(p) for p in self.retriever.expand(hits, query=query).concept_paths if len(p) >= 2]

    def relevant_concepts(self, question: str, hits: list | None = None) -> list[str]:
        """Concepts of the question, then of the top hits (deduplicated, at most ``max_concepts``)."""
        hits = self._search(question) if hits is None else hits
        out = self._concepts(question)
        for h in hits[:2]:
            for c in self._concepts(h.text):
                if c.lower() not in {x.lower() for x in out}:
                    out.append(c)
        return out[: self.max_concepts]

    # ---------------------------------------------------------------- Critic
    def feedback(self, question: str, thinking: str) -> str:
        concepts = self.relevant_concepts(question)
        tn = normalize_text(thinking)
        missing = [c for c in concepts if not mentions(tn, c)]
        if not thinking.strip():
            return ("The thinking is empty. Reason step by step about: " + ", ".join(concepts) + "."
                    if concepts else "The thinking is empty. Reason step by step about the question.")
        if missing:
            return ("Missing concepts: " + ", ".join(missing) + ". Add facts about them and connect "
                    "them to the question.")
        return ("The thinking mentions the key concepts (" + ", ".join(concepts) + "); check that each "
                "step follows from the facts.") if concepts else "No missing concepts were found."

    def _new_facts(self, hits: list, thinking_norm: str, wanted: list[str]) -> list[str]:
        """Up to ``max_facts`` hit sentences not in the thinking; those naming wanted concepts first."""
        candidates, seen = [], set()
        for rank, h in enumerate(hits):
            for pos, s in enumerate(split_sentences(h.text)):
                sn = normalize_text(s)
                if len(sn.split()) < 3 or sn in seen or sn in thinking_norm:
                    continue
                seen.add(sn)
                gain = sum(1 for c in wanted if mentions(sn, c))
                candidates.append((-gain, rank, pos, s))
        return [s for *_, s in sorted(candidates)[: self.max_facts]]

    def _new_path(self, hits: list, question: str, thinking: str) -> str | None:
        for p in sorted(self._paths(hits, question), key=len, reverse=True):
            line = " -> ".join(p)
            if line.lower() not in thinking.lower():
                return line
        return None

    def improve(self, question: str, thinking: str, feedback: str) -> str:
        thinking = strip_special_tokens(thinking)
        hits = self._search(question + " " + thinking)
        tn = normalize_text(thinking)
        wanted = [c for c in self.relevant_concepts(question, hits) if not mentions(tn, c)]
        wanted += [c for c in self._concepts(feedback) if c.lower() not in {w.lower() for w in wanted}
                   and not mentions(tn, c)]
        facts = self._new_facts(hits, tn, wanted)
        path = self._new_path(hits, question, thinking)
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
            tn = normalize_text(text)
            return {c.lower() for c in concepts if mentions(tn, c)}

        best_i, best = max(nonempty, key=lambda t: (len(covered(t[1])), t[0]))
        have, best_norm, extra = covered(best), normalize_text(best), []
        for i, a in nonempty:
            if i == best_i:
                continue
            for s in split_sentences(a):
                new = covered(s) - have
                sn = normalize_text(s)
                if not sn or sn in best_norm or not new:
                    continue
                extra.append(s)
                have |= new
                if len(extra) >= self.max_support:
                    return " ".join([best] + extra)
        return " ".join([best] + extra)
