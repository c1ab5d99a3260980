"""On-the-fly preference pairs: question -> retrieval -> thinking scratchpad + answer -> rejected.

``generate_pairs(retriever, teacher, policy, config=DatagenConfig(...))`` (or the config's fields
as keywords) writes rows ``{"id", "prompt", "chosen", ..., **row_meta}``, ids ``f"{id_prefix or seed}-{i}"``.
Per row: random chunks (or a topic's top hits) -> a question; RAG context (``gather_context``);
one section per thinking category and an answer = chosen; ``k_samples`` policy samples per
question, all questions of a batch in ONE ``generate`` call, the lowest-scored kept = rejected
(or the teacher's plain answers, ``rejected_from="teacher"``). A rerun skips ids already in the
file; bad teacher output skips its row (``GenerationStats.skipped``).

References: PRefLexOR (Buehler, arXiv 2410.12375) Sec. 2.1-2.3 and its notebooks
(``get_question_and_answers``); ORPO (arXiv 2403.07691); DPO (arXiv 2305.18290).

Tests: ``python -m pytest -q tests/test_datagen.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from tqdm import tqdm

from ..thinking.formats import check_format_name, prompt
from ..thinking.layout import (DEFAULT_CATEGORIES, answer_part, clean_question, clean_section, format_chosen,
                               strip_thinking_tokens)
from ..retrieval.context import Context, gather_context
from ..teachers.base import TeacherAuthError, TeacherError, TeacherNotFoundError, complete_many, hash_seed
from ..teachers.prompts import ANSWER_PROMPT, CATEGORY_HINTS, CATEGORY_PROMPT, QUESTION_PROMPT
from .pairs_io import MAX_FIELD_CHARS, DatagenError, GenerationStats, Pairs, PairWriter
from .rejected import _user, policy_samples, teacher_samples
from .scorers import make_scorer

log = logging.getLogger(__name__)

REJECTED_SOURCES = ("policy", "teacher")
DEFAULT_WRONG_THRESHOLD = 0.8

@dataclass(kw_only=True)
class DatagenConfig:
    """What ``generate_pairs`` makes. ``sampling``: a ``sampler.SamplingParams`` (``n``, ``seed``
    and ``prepend_response`` are set here; default 256 new tokens, temperature 0.8, top-p 0.9).
    ``scorer``: "embedding" (cosine with the retriever's embedder), ``fn(question, reference,
    candidate) -> float``, an object with ``score_many``, or a Teacher used as judge."""

    n: int = 100                                # rows: ids f"{seed}-{i}" (or id_prefix), i < n
    categories: Sequence[str] = DEFAULT_CATEGORIES   # thinking sections, in order
    number_nodes_to_get: int = 3                # random chunks a question comes from
    use_rag: bool = True                        # False: only the source chunks as context
    rejected_from: str = "policy"               # "policy" samples or the "teacher"'s plain answers
    with_thinking: bool = False                 # stage 2: policy answers the thinking prompt
    k_samples: int = 1                          # samples per question; the lowest-scored is kept
    scorer: Any = "embedding"
    only_include_wrong_answers: bool = False    # drop rows whose kept sample scores > wrong_threshold
    wrong_threshold: float = DEFAULT_WRONG_THRESHOLD
    seed: int = 0                               # row ids and every random choice
    out_path: str | os.PathLike | None = None   # pairs.jsonl to append to (and resume from)
    sampling: Any = None
    progress: bool = True                       # tqdm progress bar
    topics: Sequence[str] | None = None         # draw chunks from a random topic's top hits
    k_context: int = 5                          # search hits per question
    batch_size: int = 8                         # questions per generate call; a crash loses <= 1 batch
    teacher_max_tokens: int = 512               # reply budget of LLM teachers
    id_prefix: str | None = None                # row ids f"{id_prefix}-{i}" (default: the seed)
    row_meta: dict | None = None                # extra fields stored in every new row (provenance)
    thinking_format: str = "categories"         # "graph": teachers.graph_writer (extractive teacher only)
    decode_weights: str = "fp"                  # the policy's samples: "fp" or "int8" (sampler.generate)

    def __post_init__(self):
        if self.n < 0:
            raise DatagenError(f"n must be >= 0, got {self.n}")
        if self.rejected_from not in REJECTED_SOURCES:
            raise DatagenError(f"rejected_from must be one of {REJECTED_SOURCES}, got {self.rejected_from!r}")
        if self.k_samples < 1:
            raise DatagenError(f"k_samples must be >= 1, got {self.k_samples}")
        if self.batch_size < 1:
            raise DatagenError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decode_weights not in ("fp", "int8"):
            raise DatagenError(f"decode_weights must be fp or int8, got {self.decode_weights!r}")
        self.categories = tuple(str(c) for c in self.categories)
        if not self.categories:
            raise DatagenError("categories is empty; give at least one thinking category")
        try:
            check_format_name(self.thinking_format)
        except ValueError as e:
            raise DatagenError(str(e)) from None


def generate_pairs(retriever, teacher, policy=None, tokenizer=None, config: DatagenConfig | None = None,
                   **options) -> Pairs:
    """Generate ``config.n`` preference rows; ``options`` are :class:`DatagenConfig` fields that
    override ``config``'s (e.g. ``generate_pairs(r, t, policy, n=8, seed=3)``).

    ``policy`` is a ``(model, tokenizer)`` pair (or a model with ``tokenizer=``), needed for
    ``rejected_from="policy"``. Returns every row of the output file (existing and new, ordered by
    index) as :class:`Pairs` with ``.stats`` (:class:`GenerationStats`).
    """
    names = {f.name for f in dataclasses.fields(DatagenConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"generate_pairs got unknown option(s) {', '.join(unknown)}; "
                        f"DatagenConfig fields: {', '.join(sorted(names))}")
    cfg = dataclasses.replace(config, **options) if config is not None else DatagenConfig(**options)
    model = None
    if cfg.rejected_from == "policy":
        if policy is None:
            raise DatagenError("rejected_from='policy' needs policy=(model, tokenizer); "
                               "or use rejected_from='teacher'")
        model, tokenizer = policy if isinstance(policy, (tuple, list)) else (policy, tokenizer)
        if tokenizer is None:
            raise DatagenError("the policy needs a tokenizer: pass policy=(model, tokenizer)")
    return _Pipeline(retriever, teacher, model, tokenizer, cfg).run()


def _is_fatal(e: BaseException) -> bool:
    return isinstance(e, (TeacherAuthError, TeacherNotFoundError))


@dataclass
class _Prepared:
    """The chosen side of one row."""

    index: int
    id: str
    question: str
    context: Context
    source_ids: list[str]
    sections: list[tuple[str, str]]
    answer: str
    graph: Any = None                 # graph_writer.GraphThinking (thinking_format="graph")

    @property
    def prompt(self) -> str:
        return prompt(self.question, "graph" if self.graph is not None else "categories")

    @property
    def chosen(self) -> str:
        return self.graph.chosen(self.answer) if self.graph is not None else format_chosen(self.sections, self.answer)


class _Pipeline:
    """One ``generate_pairs`` call: batches of rows, chosen sides first, then the rejected ones."""

    def __init__(self, retriever, teacher, model, tokenizer, cfg: DatagenConfig):
        self.retriever, self.teacher, self.model, self.tokenizer, self.cfg = retriever, teacher, model, tokenizer, cfg
        self.scorer = make_scorer(cfg.scorer, retriever)
        self.stats = GenerationStats(requested=cfg.n)
        prefix = cfg.seed if cfg.id_prefix is None else cfg.id_prefix
        self.ids = [f"{prefix}-{i}" for i in range(cfg.n)]
        self.task_questions = hasattr(teacher, "make_question")
        self.task_sections = hasattr(teacher, "fill_category") and hasattr(teacher, "answer")

    def run(self) -> Pairs:
        t0 = time.perf_counter()
        cfg, stats = self.cfg, self.stats
        writer = PairWriter(cfg.out_path) if cfg.out_path is not None else None
        existing = {str(r["id"]): r for r in (writer.rows if writer else [])}
        todo = [i for i, rid in enumerate(self.ids) if rid not in existing]
        stats.existing = cfg.n - len(todo)
        new_rows: list[dict] = []
        bar = None
        if cfg.progress:
            bar = tqdm(total=cfg.n, initial=stats.existing, desc="pairs", unit="pair", dynamic_ncols=True)
        try:
            for b in range(0, len(todo), cfg.batch_size):
                batch = todo[b:b + cfg.batch_size]
                prepared, error = self.prepare_batch(batch)
                for row in self.finish_batch(prepared):
                    if writer is not None:
                        writer.write(row)
                    new_rows.append(row)
                    stats.written += 1
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(written=stats.written, skipped=sum(stats.skipped.values()))
                if error is not None:
                    raise error
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            stats.elapsed_s = time.perf_counter() - t0
        log.info("datagen: %s", json.dumps(stats.as_dict()))
        order = {rid: i for i, rid in enumerate(self.ids)}
        merged = sorted(list(existing.values()) + new_rows,
                        key=lambda r: (order.get(str(r["id"]), cfg.n), str(r["id"])))
        out = Pairs(merged)
        out.stats = stats
        return out

    # ---------------------------------------------------------------- chosen side
    def _nodes(self, i: int) -> list:
        row_seed = hash_seed(self.cfg.seed, i) % (2**31)
        if self.cfg.topics:
            topic = random.Random(row_seed).choice(list(self.cfg.topics))
            return list(self.retriever.search(topic, k=self.cfg.number_nodes_to_get))
        return list(self.retriever.random_nodes(self.cfg.number_nodes_to_get, seed=row_seed))

    def prepare_batch(self, batch: list[int]) -> tuple[list[_Prepared], Exception | None]:
        """The chosen side of each row of ``batch``. Rows are prepared one after another so that an
        unexpected exception keeps the rows finished before it (they are written, then it re-raises)."""
        stats = self.stats
        nodes = {i: self._nodes(i) for i in batch}
        questions: dict[int, Any] = {}
        if not self.task_questions:  # LLM teachers: all questions of the batch at once
            chats = [_user(QUESTION_PROMPT.format(text="\n\n".join(getattr(h, "text", str(h)) for h in nodes[i])))
                     for i in batch]
            try:
                replies = complete_many(self.teacher, chats, temperature=0.7, max_tokens=128)
            except Exception as e:  # the whole call failed: nothing of this batch is ready
                if isinstance(e, TeacherError) and not _is_fatal(e):
                    stats.teacher_errors += len(batch)
                    stats.skipped["teacher_error"] += len(batch)
                    return [], None
                return [], e
            questions = dict(zip(batch, replies))
        llm: dict[int, tuple] = {}
        if not self.task_sections:  # LLM teachers: every section and answer prompt of the batch at once
            try:
                llm = self._section_replies(batch, nodes, questions)
            except Exception as e:
                return [], e
        prepared = []
        for i in batch:
            try:
                p = self.prepare_row(i, nodes[i], questions.get(i), llm.get(i))
            except TeacherError as e:
                if _is_fatal(e):
                    return prepared, e
                stats.teacher_errors += 1
                stats.skipped["teacher_error"] += 1
                log.warning("row %s skipped: %s", self.ids[i], e)
                continue
            except Exception as e:
                return prepared, e
            if p is not None:
                prepared.append(p)
        return prepared, None

    def _question(self, i: int, nodes: list, question_reply) -> str:
        if isinstance(question_reply, BaseException):
            raise question_reply
        if self.task_questions:
            # salted by (seed, index), not the row id: ids carry provenance (a hash of settings and paths),
            # and the same corpus and seed must give the same questions wherever the corpus lives
            return clean_question(self.teacher.make_question(nodes, salt=f"{self.cfg.seed}-{i}"))
        return clean_question(question_reply)

    def _context(self, question: str, nodes: list) -> Context:
        return gather_context(self.retriever, question, k=self.cfg.k_context, seed_hits=nodes,
                              use_rag=self.cfg.use_rag)

    def _section_replies(self, batch, nodes, questions) -> dict[int, tuple]:
        """(question, context, replies to the category + answer prompts) per row, from one
        ``complete_many`` call; rows whose question failed are left out (``prepare_row`` counts them)."""
        rows, chats = [], []
        for i in batch:
            try:
                q = self._question(i, nodes[i], questions.get(i))
            except TeacherError:
                continue
            if not q or not nodes[i]:
                continue
            ctx = self._context(q, nodes[i])
            rows.append((i, q, ctx))
            rendered = ctx.render()
            chats += [_user(CATEGORY_PROMPT.format(question=q, context=rendered, category=c,
                                                   hint=CATEGORY_HINTS.get(c, ""))) for c in self.cfg.categories]
            chats.append(_user(ANSWER_PROMPT.format(context=rendered, question=q)))
        flat = complete_many(self.teacher, chats, temperature=0.0, max_tokens=self.cfg.teacher_max_tokens)
        per = len(self.cfg.categories) + 1
        return {i: (q, ctx, flat[j * per:(j + 1) * per]) for j, (i, q, ctx) in enumerate(rows)}

    def prepare_row(self, i: int, nodes: list, question_reply, llm: tuple | None) -> _Prepared | None:
        """Row ``i``'s chosen side, or None (reason counted in ``stats.skipped``)."""
        skipped = self.stats.skipped
        if not nodes:
            skipped["no_nodes"] += 1
            return None
        question, ctx, replies = llm if llm is not None else (self._question(i, nodes, question_reply), None, None)
        if not question:
            skipped["empty_question"] += 1
            return None
        if self.cfg.thinking_format == "graph":
            return self._graph_row(i, nodes, question)
        if self.task_sections:
            ctx = self._context(question, nodes)
            texts = [self.teacher.fill_category(c, question, ctx) for c in self.cfg.categories]
            answer = self.teacher.answer(question, ctx)
        else:
            for rep in replies:
                if isinstance(rep, BaseException):
                    raise rep
            texts, answer = replies[:-1], answer_part(replies[-1] or "")
        sections = [(c, clean_section(c, t)) for c, t in zip(self.cfg.categories, texts)]
        sections = [(c, t) for c, t in sections if t]
        if not sections:
            skipped["no_thinking"] += 1
            return None
        answer = strip_thinking_tokens(answer or "")
        if not answer:
            skipped["empty_answer"] += 1
            return None
        source_ids = [str(getattr(h, "chunk_id", "")) for h in nodes]
        return _Prepared(i, self.ids[i], question, ctx, source_ids, sections, answer)

    def _graph_row(self, i: int, nodes: list, question: str) -> _Prepared | None:
        if not hasattr(self.teacher, "graph_thinking"):
            raise DatagenError(f"thinking_format='graph' needs a teacher with graph_thinking (the extractive "
                               f"teacher); {getattr(self.teacher, 'name', type(self.teacher).__name__)} has none")
        ctx = self._context(question, nodes)
        try:
            graph = self.teacher.graph_thinking(question, ctx)
        except ValueError:            # no two concepts share a corpus sentence
            self.stats.skipped["no_thinking"] += 1
            return None
        answer = strip_thinking_tokens(self.teacher.answer(question, ctx) or "")
        if not answer:
            self.stats.skipped["empty_answer"] += 1
            return None
        return _Prepared(i, self.ids[i], question, ctx, [str(getattr(h, "chunk_id", "")) for h in nodes],
                         [], answer, graph)

    # ---------------------------------------------------------------- rejected side
    def finish_batch(self, prepared: list[_Prepared]) -> list[dict]:
        """The rows of ``prepared``: samples, scores, the lowest-scored sample as rejected."""
        if not prepared:
            return []
        cfg, stats = self.cfg, self.stats
        if cfg.rejected_from == "policy":
            samples = policy_samples(self.model, self.tokenizer, prepared, cfg)
            stats.policy_samples += sum(len(s) for s in samples)
        else:
            samples = teacher_samples(self.teacher, prepared, cfg)
            for x in (x for s in samples for x in s):
                if isinstance(x, BaseException) and _is_fatal(x):
                    raise x
        samples = [[x if isinstance(x, str) else "" for x in s] for s in samples]  # a failed sample is empty
        scores = self.scorer.score_many([p.question for p in prepared], [p.answer for p in prepared], samples)
        rows = []
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for p, cands, sc in zip(prepared, samples, scores):
            live = [j for j, c in enumerate(cands) if c.strip()]
            if not live:
                stats.skipped["empty_rejected"] += 1
                continue
            j = min(live, key=lambda j: (sc[j], j))
            rejected, chosen = cands[j], p.chosen
            if rejected.strip() == chosen.strip():
                stats.skipped["identical"] += 1
                continue
            if max(len(rejected), len(chosen), len(p.prompt)) > MAX_FIELD_CHARS:
                stats.skipped["too_long"] += 1
                continue
            if cfg.only_include_wrong_answers and sc[j] > cfg.wrong_threshold:
                stats.skipped["not_wrong"] += 1
                continue
            rows.append({
                "id": p.id, "prompt": p.prompt, "chosen": chosen, "rejected": rejected,
                "question": p.question, "answer": p.answer,
                "source_chunk_ids": p.source_ids, "context_chunk_ids": p.context.chunk_ids,
                "categories": [c for c, _ in p.sections],
                "scores": [round(float(x), 6) for x in sc], "rejected_score": round(float(sc[j]), 6),
                "rejected_index": j, "rejected_from": cfg.rejected_from, "with_thinking": bool(cfg.with_thinking),
                "scorer": self.scorer.name, "teacher": getattr(self.teacher, "name", type(self.teacher).__name__),
                "seed": cfg.seed, "index": p.index, "created": created, "thinking_format": cfg.thinking_format,
                **({"sources": p.graph.sources} if p.graph is not None else {}), **(cfg.row_meta or {}),
            })
        return rows
