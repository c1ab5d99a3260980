"""On-the-fly preference data: question -> retrieval -> thinking scratchpad + answer -> rejected.

What: ``generate_pairs(retriever, teacher, policy=...)`` builds PRefLexOR preference rows
``{"id", "prompt", "chosen", "rejected", ...metadata}`` (TRL column names) and appends them to
``pairs.jsonl``. For each row:

1. ``number_nodes_to_get`` random corpus chunks (or the top chunks of a topic) -> a question
   (``teacher.make_question`` when the teacher has it, else a prompt to the teacher).
   The training prompt is the question plus ``" Use <|thinking|>."``; the chat template is applied
   at training time (``data.tokenize_pair``), never stored.
2. RAG context: the source chunks + ``retriever.search(question)`` + ``retriever.expand`` (graph
   neighbours and concept paths), see ``teachers.gather_context``.
3. One section per thinking category (``teacher.fill_category`` or one prompt per category) and
   an answer. ``chosen`` has exactly this layout::

       <|thinking|>\\n**Reasoning Steps**:\\n\\n{text}\\n\\n**Relevant Materials or Concepts**:\\n\\n{text}\\n\\n...<|/thinking|>\\n{answer}

   i.e. ``THINK_START + "\\n" + "".join(f"**{cat}**:\\n\\n{text}\\n\\n") + THINK_END + "\\n" + answer``
   (see :func:`format_chosen`; empty sections are left out).
4. ``rejected``: ``k_samples`` policy samples for every question of a batch in ONE ``generate``
   call (stage 1: the bare question; stage 2, ``with_thinking=True``: the prompt with the
   thinking instruction and the response opened with ``<|thinking|>``), each scored against the
   chosen answer (embedding cosine with the retriever's embedder, a callable, or a teacher
   judge); the lowest-scored sample is kept. ``rejected_from="teacher"`` asks the teacher for
   plain answers without context instead. ``only_include_wrong_answers`` drops rows whose kept
   sample scores above ``wrong_threshold``.

Rows are written one by one with flush + fsync, ids are ``f"{seed}-{i}"``; a rerun with the same
seed skips ids already in the file (a torn last line left by a crash is cut away first). Bad
teacher output (empty question / answer, no thinking) skips the row and is counted in
``GenerationStats.skipped``; the run goes on.

References: PRefLexOR (Buehler, arXiv 2410.12375) Sec. 2.1-2.3 and its notebooks
(``get_question_and_answers``: random nodes -> question -> RAG -> categories -> answer; in-situ
rejected answers from the trained model; ``only_include_wrong_answers``); ORPO (Hong et al.
2024, arXiv 2403.07691); DPO (Rafailov et al. 2023, arXiv 2305.18290).

Run: ``python -m preflexor_core.datagen --corpus PATH --out pairs.jsonl --n 100 --teacher extractive
[--model DIR] [--k-samples 4] [--with-thinking]``; ``--help`` lists every option.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .teachers import (DEFAULT_CATEGORIES, THINK_END, THINK_START, THINKING_INSTRUCTION, Context,
                       TeacherAuthError, TeacherError, TeacherNotFoundError, _hash_seed,
                       gather_context, teacher_from_spec)

log = logging.getLogger(__name__)

REJECTED_SOURCES = ("policy", "teacher")
DEFAULT_WRONG_THRESHOLD = 0.8

QUESTION_PROMPT = (
    "You write exam questions for scientists. Read the text below and write ONE challenging "
    "question that connects at least two of its concepts and can be answered from the text. "
    "Reply with the question only.\n\nText:\n{text}")
CATEGORY_PROMPT = (
    "Question: {question}\n\nContext:\n{context}\n\nWrite the \"{category}\" section of a structured "
    "reasoning scratchpad for answering the question, using only facts from the context. {hint} "
    "Reply with the section content only, without a heading.")
CATEGORY_HINTS = {
    "Reasoning Steps": "Give numbered steps that lead from the question to the answer.",
    "Relevant Materials or Concepts": "Give a bulleted list of the key materials and concepts.",
    "Design Principles": "List the design principles or strategies involved.",
    "Material Properties": "List the relevant material properties, with values where given.",
    "Hypothesis": "State a testable hypothesis that follows from the context.",
    "Additional Background": "Give short background facts that help to answer.",
}
ANSWER_PROMPT = ("Context:\n{context}\n\nAnswer the question accurately and concisely, using the "
                 "context.\n\nQuestion: {question}")
JUDGE_PROMPT = ("Reference answer:\n{reference}\n\nCandidate answer:\n{candidate}\n\nQuestion: "
                "{question}\n\nRate from 0 to 10 how correct and complete the candidate is compared "
                "with the reference. Reply with the number only.")


class DatagenError(ValueError):
    """Bad input to the pair generator (arguments, corpus, output file)."""


class PairsFileError(DatagenError):
    """``pairs.jsonl`` is corrupt in a way that resuming cannot repair."""


# ============================================================================ formats

def format_thinking(sections: Sequence[tuple[str, str]]) -> str:
    """``<|thinking|>\\n**Cat**:\\n\\n{text}\\n\\n...<|/thinking|>`` (sections with text only)."""
    body = "".join(f"**{cat}**:\n\n{text.strip()}\n\n" for cat, text in sections if text and text.strip())
    return f"{THINK_START}\n{body}{THINK_END}"


def format_chosen(sections: Sequence[tuple[str, str]], answer: str) -> str:
    return f"{format_thinking(sections)}\n{answer.strip()}"


def answer_part(text: str) -> str:
    """The answer after the last ``<|/thinking|>``; "" when a thinking span never closes."""
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1].strip()
    if THINK_START in text:
        return ""
    return text.strip()


def _strip_thinking_tokens(text: str) -> str:
    return text.replace(THINK_START, "").replace(THINK_END, "").strip()


def _clean_section(category: str, text: str) -> str:
    text = _strip_thinking_tokens(text or "")
    # an LLM may echo the heading: "**Design Principles**:" / "Design Principles:"
    text = re.sub(rf"^\s*(\*\*)?{re.escape(category)}(\*\*)?\s*:?\s*(\*\*)?\s*", "", text, flags=re.I)
    return text.strip()


def _clean_question(text: str) -> str:
    text = _strip_thinking_tokens(text or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    q = next((ln for ln in lines if ln.endswith("?")), lines[0])
    q = re.sub(r"^(question\s*\d*\s*[:.)-]\s*)", "", q, flags=re.I).strip().strip('"').strip()
    return q


# ============================================================================ stats / output

@dataclass
class GenerationStats:
    """Counters of one ``generate_pairs`` call."""

    requested: int = 0
    existing: int = 0              # ids already in the output file (resume)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> rows
    teacher_errors: int = 0
    policy_samples: int = 0
    elapsed_s: float = 0.0

    @property
    def pairs_per_minute(self) -> float:
        return 60.0 * self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requested": self.requested, "existing": self.existing, "written": self.written,
                "skipped": dict(self.skipped), "teacher_errors": self.teacher_errors,
                "policy_samples": self.policy_samples, "elapsed_s": round(self.elapsed_s, 3),
                "pairs_per_minute": round(self.pairs_per_minute, 2)}


class Pairs(list):
    """The rows (existing + new, by index) with ``.stats`` (:class:`GenerationStats`)."""

    stats: GenerationStats


def read_pairs(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Rows of a pairs file. A torn last line (no newline / not JSON) is ignored, or cut from the
    file with ``repair=True``; bad JSON anywhere else raises :class:`PairsFileError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    lines = data[:keep].split(b"\n")[:-1] if keep else []
    rows, offset = [], 0
    for lineno, raw in enumerate(lines, start=1):
        start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not an object with an 'id'")
        except (ValueError, UnicodeDecodeError) as e:
            if all(not ln.strip() for ln in lines[lineno:]):  # the last line: a torn write
                keep = start
                break
            raise PairsFileError(f"{path}:{lineno}: not a valid pair row ({e}); only a torn last "
                                 "line can be repaired; fix or remove this line by hand") from None
        rows.append(row)
    if keep < len(data):
        if repair:
            log.warning("%s: removing a torn last line (%d bytes) left by an interrupted run",
                        path, len(data) - keep)
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        else:
            log.warning("%s: ignoring a torn last line (%d bytes)", path, len(data) - keep)
    return rows


class PairWriter:
    """Append-only JSONL writer: one row per ``write``, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise DatagenError(f"output directory does not exist: {parent}")
        self.rows = read_pairs(self.path, repair=True)
        self.ids = {str(r["id"]) for r in self.rows}
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.ids.add(str(row["id"]))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ============================================================================ scorers

class EmbeddingScorer:
    """Cosine similarity between a sample's answer and the chosen answer (unit-norm embeddings)."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.name = f"embedding:{getattr(embedder, 'name', type(embedder).__name__)}"

    def score_many(self, questions: Sequence[str], references: Sequence[str],
                   candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat = [answer_part(c) for cs in candidates for c in cs]
        ref = self.embedder.encode(list(references))
        cand = self.embedder.encode(flat) if flat else None
        out, j = [], 0
        for i, cs in enumerate(candidates):
            row = []
            for c in flat[j:j + len(cs)]:
                row.append(float(ref[i] @ cand[j]) if c.strip() else 0.0)
                j += 1
            out.append(row)
        return out


class CallableScorer:
    """Wraps ``fn(question, reference_answer, candidate_text) -> float``."""

    def __init__(self, fn: Callable[[str, str, str], float]):
        self.fn = fn
        self.name = f"callable:{getattr(fn, '__name__', type(fn).__name__)}"

    def score_many(self, questions, references, candidates) -> list[list[float]]:
        return [[float(self.fn(q, r, c)) for c in cs] for q, r, cs in zip(questions, references, candidates)]


class JudgeScorer:
    """A teacher rates each candidate 0-10 against the reference; score = rating / 10."""

    def __init__(self, teacher, max_tokens: int = 8):
        self.teacher = teacher
        self.max_tokens = max_tokens
        self.name = f"judge:{teacher.name}"

    def score_many(self, questions, references, candidates) -> list[list[float]]:
        chats = [[{"role": "user", "content": JUDGE_PROMPT.format(
            reference=r, candidate=answer_part(c) or "(no answer)", question=q)}]
            for q, r, cs in zip(questions, references, candidates) for c in cs]
        replies = _complete_many(self.teacher, chats, max_tokens=self.max_tokens)
        flat = []
        for rep in replies:
            m = re.search(r"\d+(?:\.\d+)?", rep) if isinstance(rep, str) else None
            flat.append(min(10.0, float(m.group(0))) / 10.0 if m else 0.0)
        out, j = [], 0
        for cs in candidates:
            out.append(flat[j:j + len(cs)])
            j += len(cs)
        return out


def make_scorer(scorer, retriever):
    if scorer == "embedding":
        emb = getattr(retriever, "embedder", None)
        if emb is None:
            from .retrieval.embedding import HashingEmbedder
            log.warning("retriever has no .embedder; scoring rejected samples with HashingEmbedder")
            emb = HashingEmbedder()
        return EmbeddingScorer(emb)
    if hasattr(scorer, "score_many"):
        return scorer
    if hasattr(scorer, "complete"):
        return JudgeScorer(scorer)
    if callable(scorer):
        return CallableScorer(scorer)
    raise DatagenError(f"scorer must be 'embedding', a callable (question, reference, candidate) -> "
                       f"float, or a Teacher used as judge; got {scorer!r}")


# ============================================================================ helpers

def _complete_many(teacher, chats, **kw) -> list:
    """``teacher.complete_many`` with failed items as exceptions when the teacher supports it."""
    if not chats:
        return []
    try:
        return teacher.complete_many(chats, return_exceptions=True, **kw)
    except TypeError as e:
        if "return_exceptions" not in str(e):
            raise
        return teacher.complete_many(chats, **kw)


def _random_nodes(retriever, n: int, seed: int) -> list:
    fn = getattr(retriever, "random_nodes", None)
    if fn is not None:
        return list(fn(n, seed=seed))
    import random
    chunks = list(retriever.chunks)
    return random.Random(seed).sample(chunks, min(n, len(chunks)))


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _is_fatal(e: BaseException) -> bool:
    return isinstance(e, (TeacherAuthError, TeacherNotFoundError))


@dataclass
class _Prepared:
    index: int
    id: str
    question: str
    context: Context
    source_ids: list[str]
    sections: list[tuple[str, str]]
    answer: str

    @property
    def prompt(self) -> str:
        return self.question + THINKING_INSTRUCTION

    @property
    def chosen(self) -> str:
        return format_chosen(self.sections, self.answer)


# ============================================================================ main loop

def generate_pairs(retriever, teacher, policy=None, tokenizer=None, n: int = 100,
                   categories: Sequence[str] = DEFAULT_CATEGORIES, number_nodes_to_get: int = 3,
                   use_rag: bool = True, rejected_from: str = "policy", with_thinking: bool = False,
                   k_samples: int = 1, scorer: Any = "embedding",
                   only_include_wrong_answers: bool = False,
                   wrong_threshold: float = DEFAULT_WRONG_THRESHOLD, seed: int = 0,
                   out_path: str | os.PathLike | None = None, sampling=None, progress: bool = True,
                   topics: Sequence[str] | None = None, k_context: int = 5, batch_size: int = 8,
                   teacher_max_tokens: int = 512) -> Pairs:
    """Generate ``n`` preference rows (ids ``f"{seed}-{i}"``, i < n); see the module docstring.

    ``policy`` is a ``(model, tokenizer)`` pair (or a model with ``tokenizer=``) and is needed for
    ``rejected_from="policy"``. ``sampling`` is a ``sampler.SamplingParams`` (``n``, ``seed`` and
    ``prepend_response`` are set here; default: 256 new tokens, temperature 0.8, top-p 0.9).
    ``batch_size`` questions share one ``generate`` call (K samples each); rows are written as
    soon as their batch is done, so a crash loses at most one batch in progress (pass
    ``batch_size >= n`` for a single call). ``topics``: draw each row's chunks from the top search
    hits of a random topic instead of random chunks. ``k_context``: search hits per question.
    ``teacher_max_tokens``: reply budget of LLM teachers. ``scorer``: "embedding" (cosine with
    the retriever's embedder), ``fn(question, reference, candidate) -> float``, an object with
    ``score_many``, or a Teacher used as judge. Returns every row of the output file (existing and
    new, ordered by index) as :class:`Pairs` with ``.stats`` (:class:`GenerationStats`).
    """
    t0 = time.perf_counter()
    if n < 0:
        raise DatagenError(f"n must be >= 0, got {n}")
    if rejected_from not in REJECTED_SOURCES:
        raise DatagenError(f"rejected_from must be one of {REJECTED_SOURCES}, got {rejected_from!r}")
    if k_samples < 1:
        raise DatagenError(f"k_samples must be >= 1, got {k_samples}")
    if batch_size < 1:
        raise DatagenError(f"batch_size must be >= 1, got {batch_size}")
    categories = [str(c) for c in categories]
    if not categories:
        raise DatagenError("categories is empty; give at least one thinking category")
    model = None
    if rejected_from == "policy":
        if policy is None:
            raise DatagenError("rejected_from='policy' needs policy=(model, tokenizer); "
                               "or use rejected_from='teacher'")
        if isinstance(policy, (tuple, list)):
            model, tokenizer = policy
        else:
            model = policy
        if tokenizer is None:
            raise DatagenError("the policy needs a tokenizer: pass policy=(model, tokenizer)")
    score = make_scorer(scorer, retriever)

    stats = GenerationStats(requested=n)
    writer = PairWriter(out_path) if out_path is not None else None
    existing = {str(r["id"]): r for r in (writer.rows if writer else [])}
    all_ids = [f"{seed}-{i}" for i in range(n)]
    todo = [i for i, rid in enumerate(all_ids) if rid not in existing]
    stats.existing = n - len(todo)
    new_rows: list[dict] = []

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, initial=stats.existing, desc="pairs", unit="pair", dynamic_ncols=True)
    try:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            prepared, error = _prepare_batch(batch, all_ids, retriever, teacher, categories,
                                             number_nodes_to_get, use_rag, seed, topics, k_context,
                                             teacher_max_tokens, stats)
            rows = _finish_batch(prepared, teacher, model, tokenizer, rejected_from, with_thinking,
                                 k_samples, score, only_include_wrong_answers, wrong_threshold,
                                 seed, sampling, teacher_max_tokens, stats)
            for row in rows:
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

    order = {rid: i for i, rid in enumerate(all_ids)}
    merged = list(existing.values()) + new_rows
    merged.sort(key=lambda r: (order.get(str(r["id"]), n), str(r["id"])))
    out = Pairs(merged)
    out.stats = stats
    return out


def _prepare_batch(batch, all_ids, retriever, teacher, categories, number_nodes_to_get, use_rag,
                   seed, topics, k_context, max_tokens, stats) -> tuple[list[_Prepared], Exception | None]:
    """The chosen side of each row of ``batch``. Rows are prepared one after another so that an
    unexpected exception keeps the rows finished before it (they are written, then it re-raises)."""
    import random
    task_questions = hasattr(teacher, "make_question")
    task_sections = hasattr(teacher, "fill_category") and hasattr(teacher, "answer")

    # nodes for every row, then questions (LLM teachers: all questions of the batch at once)
    nodes = {}
    for i in batch:
        row_seed = _hash_seed(seed, i) % (2**31)
        if topics:
            topic = random.Random(row_seed).choice(list(topics))
            nodes[i] = list(retriever.search(topic, k=number_nodes_to_get))
        else:
            nodes[i] = _random_nodes(retriever, number_nodes_to_get, row_seed)
    questions: dict[int, Any] = {}
    if not task_questions:
        chats = [_user(QUESTION_PROMPT.format(text="\n\n".join(getattr(h, "text", str(h)) for h in nodes[i])))
                 for i in batch]
        try:
            replies = _complete_many(teacher, chats, temperature=0.7, max_tokens=128)
        except Exception as e:  # the whole call failed: nothing of this batch is ready
            if isinstance(e, TeacherError) and not _is_fatal(e):
                stats.teacher_errors += len(batch)
                stats.skipped["teacher_error"] += len(batch)
                return [], None
            return [], e
        questions = dict(zip(batch, replies))

    prepared = []
    replies: dict[int, list] = {}
    if not task_sections:  # LLM teachers: every section and answer prompt of the batch at once
        try:
            replies = _section_replies(batch, all_ids, nodes, questions, retriever, teacher,
                                       categories, use_rag, k_context, max_tokens, task_questions)
        except Exception as e:
            return [], e
    for i in batch:
        try:
            p = _prepare_row(i, all_ids[i], nodes[i], questions.get(i), retriever, teacher,
                             categories, use_rag, k_context, max_tokens, task_questions,
                             task_sections, stats, replies.get(i))
        except TeacherError as e:
            if _is_fatal(e):
                return prepared, e
            stats.teacher_errors += 1
            stats.skipped["teacher_error"] += 1
            log.warning("row %s skipped: %s", all_ids[i], e)
            continue
        except Exception as e:
            return prepared, e
        if p is not None:
            prepared.append(p)
    return prepared, None


def _row_question(i, rid, nodes, question_reply, teacher, task_questions) -> str:
    if isinstance(question_reply, BaseException):
        raise question_reply
    return _clean_question(teacher.make_question(nodes, salt=rid) if task_questions else question_reply)


def _section_prompts(question: str, ctx: Context, categories) -> list[list[dict]]:
    rendered = ctx.render()
    chats = [_user(CATEGORY_PROMPT.format(question=question, context=rendered, category=c,
                                          hint=CATEGORY_HINTS.get(c, ""))) for c in categories]
    chats.append(_user(ANSWER_PROMPT.format(context=rendered, question=question)))
    return chats


def _section_replies(batch, all_ids, nodes, questions, retriever, teacher, categories, use_rag,
                     k_context, max_tokens, task_questions) -> dict[int, list]:
    """(question, context, replies to the category + answer prompts) per row, from one
    ``complete_many`` call; rows whose question failed are left out (``_prepare_row`` counts them)."""
    rows, chats = [], []
    for i in batch:
        try:
            q = _row_question(i, all_ids[i], nodes[i], questions.get(i), teacher, task_questions)
        except TeacherError:
            continue
        if not q or not nodes[i]:
            continue
        ctx = gather_context(retriever, q, k=k_context, seed_hits=nodes[i], use_rag=use_rag)
        rows.append((i, q, ctx))
        chats += _section_prompts(q, ctx, categories)
    flat = _complete_many(teacher, chats, temperature=0.0, max_tokens=max_tokens)
    per = len(categories) + 1
    return {i: [q, ctx, flat[j * per:(j + 1) * per]] for j, (i, q, ctx) in enumerate(rows)}


def _prepare_row(i, rid, nodes, question_reply, retriever, teacher, categories, use_rag, k_context,
                 max_tokens, task_questions, task_sections, stats, llm=None) -> _Prepared | None:
    if not nodes:
        stats.skipped["no_nodes"] += 1
        return None
    if llm is not None:
        question, ctx, replies = llm
    else:
        question = _row_question(i, rid, nodes, question_reply, teacher, task_questions)
        ctx = None
    if not question:
        stats.skipped["empty_question"] += 1
        return None
    if task_sections:
        ctx = gather_context(retriever, question, k=k_context, seed_hits=nodes, use_rag=use_rag)
        texts = [teacher.fill_category(c, question, ctx) for c in categories]
        answer = teacher.answer(question, ctx)
    else:
        for rep in replies:
            if isinstance(rep, BaseException):
                raise rep
        texts, answer = replies[:-1], answer_part(replies[-1] or "")
    sections = [(c, _clean_section(c, t)) for c, t in zip(categories, texts)]
    sections = [(c, t) for c, t in sections if t]
    if not sections:
        stats.skipped["no_thinking"] += 1
        return None
    answer = _strip_thinking_tokens(answer or "")
    if not answer:
        stats.skipped["empty_answer"] += 1
        return None
    source_ids = [str(getattr(h, "chunk_id", "")) for h in nodes]
    return _Prepared(i, rid, question, ctx, source_ids, sections, answer)


def _policy_samples(model, tokenizer, prepared, with_thinking, k_samples, sampling, seed) -> list[list[str]]:
    from .sampler import SamplingParams, generate
    params = sampling if sampling is not None else SamplingParams(max_new_tokens=256, temperature=0.8,
                                                                  top_p=0.9, top_k=50)
    prepend = THINK_START if with_thinking else ""
    params = dataclasses.replace(params, n=k_samples, prepend_response=prepend,
                                 seed=_hash_seed(seed, "policy", prepared[0].index) % (2**31))
    chats = [_user(p.prompt if with_thinking else p.question) for p in prepared]
    outs = generate(model, tokenizer, chats, params)
    if len(outs) != len(prepared) * k_samples:
        raise RuntimeError(f"sampler returned {len(outs)} completions for {len(prepared)} prompts "
                           f"x n={k_samples}")
    texts = []
    for o in outs:
        t = o.text
        if prepend and not t.startswith(prepend):
            t = prepend + t
        texts.append(t.strip())
    return [texts[j * k_samples:(j + 1) * k_samples] for j in range(len(prepared))]


def _teacher_samples(teacher, prepared, k_samples, seed, max_tokens) -> list[list[Any]]:
    if hasattr(teacher, "plain_answer"):
        return [[teacher.plain_answer(p.question, salt=f"{p.id}/{s}") for s in range(k_samples)]
                for p in prepared]
    chats = [_user(p.question) for p in prepared for _ in range(k_samples)]
    replies = _complete_many(teacher, chats, temperature=0.7 if k_samples > 1 else 0.0,
                             max_tokens=max_tokens)
    return [replies[j * k_samples:(j + 1) * k_samples] for j in range(len(prepared))]


def _finish_batch(prepared, teacher, model, tokenizer, rejected_from, with_thinking, k_samples,
                  score, only_wrong, wrong_threshold, seed, sampling, max_tokens, stats) -> list[dict]:
    if not prepared:
        return []
    if rejected_from == "policy":
        samples = _policy_samples(model, tokenizer, prepared, with_thinking, k_samples, sampling, seed)
        stats.policy_samples += sum(len(s) for s in samples)
    else:
        samples = _teacher_samples(teacher, prepared, k_samples, seed, max_tokens)
        for s in samples:
            for x in s:
                if isinstance(x, BaseException) and _is_fatal(x):
                    raise x
    # a failed teacher sample counts as an empty one
    samples = [[x if isinstance(x, str) else "" for x in s] for s in samples]
    scores = score.score_many([p.question for p in prepared], [p.answer for p in prepared], samples)
    rows = []
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for p, cands, sc in zip(prepared, samples, scores):
        live = [j for j, c in enumerate(cands) if c.strip()]
        if not live:
            stats.skipped["empty_rejected"] += 1
            continue
        j = min(live, key=lambda j: (sc[j], j))
        rejected = cands[j]
        chosen = p.chosen
        if rejected.strip() == chosen.strip():
            stats.skipped["identical"] += 1
            continue
        if only_wrong and sc[j] > wrong_threshold:
            stats.skipped["not_wrong"] += 1
            continue
        rows.append({
            "id": p.id, "prompt": p.prompt, "chosen": chosen, "rejected": rejected,
            "question": p.question, "answer": p.answer,
            "source_chunk_ids": p.source_ids, "context_chunk_ids": p.context.chunk_ids,
            "categories": [c for c, _ in p.sections],
            "scores": [round(float(x), 6) for x in sc], "rejected_score": round(float(sc[j]), 6),
            "rejected_index": j, "rejected_from": rejected_from, "with_thinking": bool(with_thinking),
            "scorer": score.name, "teacher": getattr(teacher, "name", type(teacher).__name__),
            "seed": seed, "index": p.index, "created": created,
        })
    return rows


# ============================================================================ CLI

def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m preflexor_core.datagen",
        description="Generate PRefLexOR preference pairs (prompt / chosen with a thinking "
                    "scratchpad / rejected) from a text corpus into a resumable JSONL file.")
    ap.add_argument("--corpus", required=True, nargs="+", metavar="PATH",
                    help="corpus: .txt/.md/.jsonl files (.jsonl: one {\"text\": ...} per line) or "
                         "folders of them (read recursively)")
    ap.add_argument("--retriever-dir", default=None,
                    help="load a saved GraphRetriever from this folder instead of building one")
    ap.add_argument("--out", default="pairs.jsonl",
                    help="output JSONL; rows already in it (same --seed) are skipped (default: %(default)s)")
    ap.add_argument("--n", type=int, default=100, help="rows to generate: ids SEED-0 .. SEED-(n-1) (default: %(default)s)")
    ap.add_argument("--teacher", default="extractive",
                    help="'extractive' (offline, corpus sentences only), an http(s):// URL of an "
                         "OpenAI-compatible server, or a checkpoint dir (default: %(default)s)")
    ap.add_argument("--teacher-model", default=None, help="model name sent to a URL teacher")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable with the URL teacher's API key (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight to a URL teacher (default: %(default)s)")
    ap.add_argument("--model", default=None,
                    help="policy checkpoint dir whose samples become 'rejected'; without it the "
                         "teacher's plain answers (no context) are used")
    ap.add_argument("--rejected-from", choices=REJECTED_SOURCES, default=None,
                    help="source of 'rejected' (default: policy with --model, else teacher)")
    ap.add_argument("--with-thinking", action="store_true",
                    help="stage 2: the policy answers the thinking prompt, its response opened with <|thinking|>")
    ap.add_argument("--k-samples", type=int, default=1,
                    help="policy samples per question; the lowest-scored is kept (default: %(default)s)")
    ap.add_argument("--scorer", default="embedding", choices=["embedding", "judge"],
                    help="score samples by embedding cosine to the chosen answer, or ask the teacher to judge")
    ap.add_argument("--only-wrong", action="store_true",
                    help="drop rows whose rejected sample scores above --wrong-threshold")
    ap.add_argument("--wrong-threshold", type=float, default=DEFAULT_WRONG_THRESHOLD,
                    help="score above which a rejected sample counts as right (default: %(default)s)")
    ap.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES),
                    help="comma-separated thinking categories (default: the paper's six)")
    ap.add_argument("--nodes", type=int, default=3, help="random chunks per question (default: %(default)s)")
    ap.add_argument("--no-rag", action="store_true", help="use only the source chunks as context")
    ap.add_argument("--embedder", choices=["default", "hashing", "minilm"], default="default",
                    help="retriever embedder when building (default: MiniLM if installed, else hashing)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="policy sample length (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.8, help="policy temperature (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="row ids and all random choices (default: %(default)s)")
    ap.add_argument("--teacher-max-items", type=int, default=5,
                    help="extractive teacher: sentences or items per thinking category (default: %(default)s)")
    ap.add_argument("--teacher-answer-sentences", type=int, default=4,
                    help="extractive teacher: at most this many sentences in the chosen answer (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _build_retriever(args):
    from .retrieval import GraphRetriever
    if args.retriever_dir:
        if not os.path.isdir(args.retriever_dir):
            raise DatagenError(f"--retriever-dir {args.retriever_dir}: no such directory")
        return GraphRetriever.load(args.retriever_dir)
    if args.embedder == "hashing":
        from .retrieval.embedding import HashingEmbedder
        emb = HashingEmbedder()
    elif args.embedder == "minilm":
        from .retrieval.embedding import MiniLMEmbedder
        emb = MiniLMEmbedder()
    else:
        emb = None
    return GraphRetriever.build([Path(p) for p in args.corpus], embedder=emb)


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_arg_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in args.corpus:
        if not os.path.exists(path):
            ap.error(f"--corpus {path}: no such file or directory; give .txt/.md/.jsonl "
                     "files or folders of them")
    if args.n < 0:
        ap.error(f"--n must be >= 0, got {args.n}")
    if args.k_samples < 1:
        ap.error(f"--k-samples must be >= 1, got {args.k_samples}")
    spec = args.teacher
    if not (spec == "extractive" or spec.startswith(("http://", "https://")) or os.path.isdir(spec)):
        ap.error(f"--teacher {spec!r}: expected 'extractive', an http(s):// URL of an "
                 "OpenAI-compatible server, or an existing checkpoint directory")
    if spec.startswith(("http://", "https://")) and not args.teacher_model:
        ap.error(f"--teacher {spec} needs --teacher-model NAME (the model the server serves)")
    if args.model and not os.path.isdir(args.model):
        ap.error(f"--model {args.model}: no such checkpoint directory")
    rejected_from = args.rejected_from or ("policy" if args.model else "teacher")
    if rejected_from == "policy" and not args.model:
        ap.error("--rejected-from policy needs --model DIR (the policy checkpoint)")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if not categories:
        ap.error("--categories is empty")

    try:
        retriever = _build_retriever(args)
        kw = {}
        if spec.startswith(("http://", "https://")):
            kw = dict(api_key_env=args.api_key_env, concurrency=args.concurrency)
        if spec == "extractive":
            from .teachers import ExtractiveTeacher
            teacher = ExtractiveTeacher(retriever, seed=args.seed, max_items=args.teacher_max_items,
                                        max_answer_sentences=args.teacher_answer_sentences)
        else:
            teacher = teacher_from_spec(spec, retriever=retriever, model=args.teacher_model,
                                        seed=args.seed, **kw)
        policy = None
        sampling = None
        if rejected_from == "policy":
            from .model import Llama
            from .sampler import SamplingParams
            from .tokenizer import Tokenizer
            policy = (Llama.from_pretrained(args.model).eval(), Tokenizer.from_pretrained(args.model))
            sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=0.9, top_k=50)
        scorer = teacher if args.scorer == "judge" else "embedding"
        rows = generate_pairs(retriever, teacher, policy=policy, n=args.n, categories=categories,
                              number_nodes_to_get=args.nodes, use_rag=not args.no_rag,
                              rejected_from=rejected_from, with_thinking=args.with_thinking,
                              k_samples=args.k_samples, scorer=scorer,
                              only_include_wrong_answers=args.only_wrong,
                              wrong_threshold=args.wrong_threshold, seed=args.seed,
                              out_path=args.out, sampling=sampling, progress=not args.no_progress,
                              batch_size=args.batch_size)
    except (DatagenError, TeacherError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "rows": len(rows), **rows.stats.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
