"""CLI of the pair generator: a corpus in, a resumable ``pairs.jsonl`` out.

Run: ``python -m preflexor_core.datagen --corpus PATH --out pairs.jsonl --n 100 --teacher extractive
[--model DIR|FILE.gguf|NAME] [--k-samples 4] [--with-thinking]``; ``--help`` lists every option. Prints one JSON
summary line (``GenerationStats``); bad input (checked before any work: the output file, an HTTP teacher
that does not answer) is one ``error:`` line and exit status 2, and so is a run that dropped every row.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1-2.3.

Tests: ``python -m pytest -q tests/test_datagen.py -k cli``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from ..infra.errors import run_cli
from ..infra.io import check_output_file
from ..llm.registry import DTYPE_CHOICES, NAMED_MODELS, ModelSpecError, load_model_and_tokenizer, resolve_model
from ..retrieval import GraphRetriever
from ..retrieval.embedding import HashingEmbedder, MiniLMEmbedder
from ..thinking.layout import DEFAULT_CATEGORIES
from ..teachers import TeacherError, check_teacher_endpoint, teacher_from_spec, teacher_kind
from ..teachers.net import DEFAULT_MAX_REPLY_BYTES, DEFAULT_TIMEOUT_S, MAX_REPLY_BYTES_LIMIT, MAX_TIMEOUT_S, redact_url
from .pairs_io import DatagenError, nothing_produced, read_pairs
from .pipeline import REJECTED_SOURCES, DatagenConfig, generate_pairs


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
    ap.add_argument("--n", type=int, default=DatagenConfig.n, help="rows to generate: ids SEED-0 .. SEED-(n-1) (default: %(default)s)")
    ap.add_argument("--teacher", default="extractive",
                    help="'extractive' (offline, corpus sentences only), an http(s):// URL of an "
                         "OpenAI-compatible server, or a checkpoint dir (default: %(default)s)")
    ap.add_argument("--teacher-model", default=None, help="model name sent to a URL teacher")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable with the URL teacher's API key (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight to a URL teacher (default: %(default)s)")
    ap.add_argument("--teacher-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help="URL teacher: overall deadline of one request in seconds (connect, headers and body "
                         "together) (default: %(default)s)")
    ap.add_argument("--max-reply-bytes", type=int, default=DEFAULT_MAX_REPLY_BYTES,
                    help="URL teacher: largest reply accepted, in bytes (default: %(default)s)")
    ap.add_argument("--model", default=None, metavar="DIR|FILE.gguf|NAME",
                    help="policy whose samples become 'rejected': a checkpoint dir, a .gguf file or a known "
                         f"model name ({', '.join(NAMED_MODELS)}); without it the "
                         "teacher's plain answers (no context) are used")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                    help="policy weights dtype; auto = float32 (the policy runs on the cpu) (default: %(default)s)")
    ap.add_argument("--rejected-from", choices=REJECTED_SOURCES, default=None,
                    help="source of 'rejected' (default: policy with --model, else teacher)")
    ap.add_argument("--with-thinking", action="store_true",
                    help="stage 2: the policy answers the thinking prompt, its response opened with <|thinking|>")
    ap.add_argument("--thinking-format", choices=["categories", "graph"], default=DatagenConfig.thinking_format,
                    help="chosen thinking: the paper's categories, or a knowledge graph (Brainstorm, Graph, Graph "
                         "JSON, Patterns, Synthesis; extractive teacher only) (default: %(default)s)")
    ap.add_argument("--k-samples", type=int, default=DatagenConfig.k_samples,
                    help="policy samples per question; the lowest-scored is kept (default: %(default)s)")
    ap.add_argument("--scorer", default="embedding", choices=["embedding", "judge"],
                    help="score samples by embedding cosine to the chosen answer, or ask the teacher to judge")
    ap.add_argument("--only-wrong", action="store_true",
                    help="drop rows whose rejected sample scores above --wrong-threshold")
    ap.add_argument("--wrong-threshold", type=float, default=DatagenConfig.wrong_threshold,
                    help="score above which a rejected sample counts as right (default: %(default)s)")
    ap.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES),
                    help="comma-separated thinking categories (default: the paper's six)")
    ap.add_argument("--nodes", type=int, default=DatagenConfig.number_nodes_to_get, help="random chunks per question (default: %(default)s)")
    ap.add_argument("--no-rag", action="store_true", help="use only the source chunks as context")
    ap.add_argument("--embedder", choices=["default", "hashing", "minilm"], default="default",
                    help="retriever embedder when building (default: MiniLM if installed, else hashing)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="policy sample length (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.8, help="policy temperature (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=DatagenConfig.batch_size, help="questions per generate call (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=DatagenConfig.seed, help="row ids and all random choices (default: %(default)s)")
    ap.add_argument("--teacher-max-items", type=int, default=5,
                    help="extractive teacher: sentences or items per thinking category (default: %(default)s)")
    ap.add_argument("--teacher-answer-sentences", type=int, default=4,
                    help="extractive teacher: at most this many sentences in the chosen answer (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _build_retriever(args) -> GraphRetriever:
    if args.retriever_dir:
        if not os.path.isdir(args.retriever_dir):
            raise DatagenError(f"--retriever-dir {args.retriever_dir}: no such directory")
        return GraphRetriever.load(args.retriever_dir)
    emb = {"hashing": HashingEmbedder, "minilm": MiniLMEmbedder}.get(args.embedder)
    return GraphRetriever.build([Path(p) for p in args.corpus], embedder=emb() if emb else None)


# Every numeric flag and its meaningful range, checked before any work (flag, test, allowed): the upper
# limits refuse a typo (1e9) before anything is allocated. NaN fails every test.
_UPPER = {"n": 10**7, "concurrency": 256, "k_samples": 256, "nodes": 4096, "max_new_tokens": 1 << 17,
          "batch_size": 4096, "teacher_max_items": 4096, "teacher_answer_sentences": 4096,
          "max_reply_bytes": MAX_REPLY_BYTES_LIMIT}
_RANGES = [(name, lambda v, hi=hi: 1 <= v <= hi, f"in 1..{hi}") for name, hi in _UPPER.items()] + [
    ("temperature", lambda v: 0 <= v <= 100, "in [0, 100] (0 = greedy)"),
    ("teacher_timeout", lambda v: 0 < v <= MAX_TIMEOUT_S, f"in (0, {MAX_TIMEOUT_S:g}] seconds"),
    ("wrong_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("seed", lambda v: 0 <= v < 2**63, "in 0..2**63-1")]


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_arg_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in args.corpus:
        if not os.path.exists(path):
            ap.error(f"--corpus {path}: no such file or directory; give .txt/.md/.jsonl "
                     "files or folders of them")
    for name, ok, allowed in _RANGES:
        value = getattr(args, name)
        if not ok(value):
            ap.error(f"--{name.replace('_', '-')} {value}: must be {allowed}")
    try:
        teacher_kind(args.teacher, args.teacher_model)
    except ValueError as e:
        ap.error(f"--teacher {redact_url(args.teacher)!r}: {e}")
    if args.model:
        try:
            resolve_model(args.model)
        except ModelSpecError as e:
            ap.error(f"--model: {e}")
    rejected_from = args.rejected_from or ("policy" if args.model else "teacher")
    if rejected_from == "policy" and not args.model:
        ap.error("--rejected-from policy needs --model DIR (the policy checkpoint)")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if not categories:
        ap.error("--categories is empty")
    # before any work: the output must be ours (a pairs file or new) and writable; the teacher must answer
    read_pairs(check_output_file(args.out, "--out"))
    check_teacher_endpoint(args.teacher, args.teacher_model, api_key_env=args.api_key_env)

    try:
        retriever = _build_retriever(args)
        teacher = teacher_from_spec(args.teacher, retriever=retriever, model=args.teacher_model,
                                    seed=args.seed, api_key_env=args.api_key_env,
                                    concurrency=args.concurrency, max_items=args.teacher_max_items,
                                    timeout=args.teacher_timeout, max_reply_bytes=args.max_reply_bytes,
                                    max_answer_sentences=args.teacher_answer_sentences)
        policy = sampling = None
        if rejected_from == "policy":
            from ..sampler import SamplingParams
            model, tok = load_model_and_tokenizer(args.model, "cpu", args.dtype)
            policy = (model.eval(), tok)
            sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=0.9, top_k=50)
        config = DatagenConfig(
            n=args.n, categories=categories, number_nodes_to_get=args.nodes, use_rag=not args.no_rag,
            rejected_from=rejected_from, with_thinking=args.with_thinking, k_samples=args.k_samples,
            scorer=teacher if args.scorer == "judge" else "embedding",
            only_include_wrong_answers=args.only_wrong, wrong_threshold=args.wrong_threshold,
            seed=args.seed, out_path=args.out, sampling=sampling, progress=not args.no_progress,
            batch_size=args.batch_size, thinking_format=args.thinking_format)
        rows = generate_pairs(retriever, teacher, policy=policy, config=config)
    except (DatagenError, TeacherError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "rows": len(rows), **rows.stats.as_dict()}))
    st = rows.stats
    if st.written == 0 and st.requested > st.existing:
        raise nothing_produced(f"datagen --out {args.out}", st.skipped, total=st.requested - st.existing)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
