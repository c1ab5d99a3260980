"""CLI of the pair generator: a corpus in, a resumable ``pairs.jsonl`` out.

Run: ``python -m preflexor_core.datagen --corpus PATH --out pairs.jsonl --n 100 --teacher extractive
[--model DIR|FILE.gguf|NAME] [--k-samples 4] [--with-thinking]``; ``--help`` lists every option (the
fields of ``DatagenOptions``; ``--preset demo`` is `make demo`'s held-out set). Prints one JSON
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ..infra.cli import (HELP_FORMATTER, GenBatchOptions, ProgressOptions, SeedOptions, add_options, add_preset,
                         check_fields, opt, parse)
from ..infra.errors import run_cli
from ..infra.io import check_output_file
from ..llm.registry import (NAMED_MODELS, DtypeOptions, ModelSpecError, load_model_and_tokenizer,
                            resolve_checkpoint)
from ..retrieval import GraphRetriever
from ..retrieval.embedding import HashingEmbedder, MiniLMEmbedder
from ..sampler import SamplingParams
from ..teachers import TeacherError, check_teacher_endpoint, teacher_from_spec, teacher_kind
from ..teachers.net import redact_url
from .options import CategoriesOptions, PairOptions, TeacherOptions, ThinkingFormatOptions
from .pairs_io import DatagenError, nothing_produced, read_pairs
from .pipeline import DEFAULT_WRONG_THRESHOLD, REJECTED_SOURCES, DatagenConfig, generate_pairs


@dataclass(kw_only=True)
class DatagenOptions(TeacherOptions, PairOptions, GenBatchOptions, ThinkingFormatOptions, CategoriesOptions,
                     DtypeOptions, SeedOptions, ProgressOptions):
    """Every option of ``python -m preflexor_core.datagen`` (the shared ones: ``datagen.options``, ``infra.cli``)."""
    corpus: list[str] = opt(None, "corpus: .txt/.md/.jsonl files (.jsonl: one {\"text\": ...} per line) or "
                            "folders of them (read recursively)", nargs="+", required=True, metavar="PATH")
    retriever: str | None = opt(None, "load a saved GraphRetriever from this folder instead of building one from "
                                "--corpus", metavar="DIR")
    out: str = opt("pairs.jsonl", "output JSONL; rows already in it (same --seed) are skipped")
    n: int = opt(DatagenConfig.n, "rows to generate: ids SEED-0 .. SEED-(n-1)", ge=1)
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable with the URL teacher's API key")
    concurrency: int = opt(8, "requests in flight to a URL teacher", ge=1, cap=256)
    model: str | None = opt(None, "policy whose samples become 'rejected': a checkpoint folder, a .gguf file or a "
                            f"known model name ({', '.join(NAMED_MODELS)}); without it the teacher's plain answers "
                            "(no context) are used", metavar="DIR|FILE.gguf|NAME")
    rejected_from: Literal[REJECTED_SOURCES] | None = opt(None, "source of 'rejected' (default: policy with "
                                                          "--model, else teacher)")
    with_thinking: bool = opt(False, "stage 2: the policy answers the thinking prompt, its response opened with "
                              "<|thinking|> (its length: --thinking-max-new-tokens, else --sample-max-new-tokens)")
    scorer: Literal["embedding", "judge"] = opt("embedding", "score samples by embedding cosine to the chosen "
                                                "answer, or ask the teacher to judge")
    only_wrong: bool = opt(False, "drop rows whose rejected sample scores above --wrong-threshold")
    wrong_threshold: float = opt(DEFAULT_WRONG_THRESHOLD, "score above which a rejected sample counts as right",
                                 ge=0.0, le=1.0)
    rag: bool = opt(True, "retrieve context for each question (--no-rag: only the source chunks)")


# The `make demo` recipes (--preset NAME): the held-out pairs of the demo run.
PRESETS: dict[str, dict] = {
    "demo": {"with_thinking": True, "k_samples": 2, "thinking_max_new_tokens": 640, "n": 32, "seed": 9001,
             "gen_batch_size": 32},
    "demo-tiny": {"with_thinking": True, "k_samples": 2, "thinking_max_new_tokens": 768, "n": 32, "seed": 9001,
                  "gen_batch_size": 32},
}


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m preflexor_core.datagen", formatter_class=HELP_FORMATTER,
        description="Generate PRefLexOR preference pairs (prompt / chosen with a thinking "
                    "scratchpad / rejected) from a text corpus into a resumable JSONL file.")
    add_preset(ap, PRESETS)
    add_options(ap, DatagenOptions)
    return ap


def _build_retriever(o: DatagenOptions) -> GraphRetriever:
    if o.retriever:
        if not os.path.isdir(o.retriever):
            raise DatagenError(f"--retriever {o.retriever}: no such directory")
        return GraphRetriever.load(o.retriever)
    emb = {"hashing": HashingEmbedder, "minilm": MiniLMEmbedder}.get(o.embedder)
    return GraphRetriever.build([Path(p) for p in o.corpus], embedder=emb() if emb else None)


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_arg_parser()
    args = vars(parse(ap, argv, PRESETS))
    args.pop("preset")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in args["corpus"]:
        if not os.path.exists(path):
            ap.error(f"--corpus {path}: no such file or directory; give .txt/.md/.jsonl "
                     "files or folders of them")
    try:
        o = DatagenOptions(**args)
        check_fields(o)
    except ValueError as e:
        ap.error(str(e))
    try:
        teacher_kind(o.teacher, o.teacher_model)
    except ValueError as e:
        ap.error(f"--teacher {redact_url(o.teacher)!r}: {e}")
    if o.model:
        try:
            resolve_checkpoint(o.model)
        except ModelSpecError as e:
            ap.error(f"--model: {e}")
    rejected_from = o.rejected_from or ("policy" if o.model else "teacher")
    if rejected_from == "policy" and not o.model:
        ap.error("--rejected-from policy needs --model DIR (the policy checkpoint)")
    categories = [c.strip() for c in o.categories.split(",") if c.strip()]
    if not categories:
        ap.error("--categories is empty")
    # before any work: the output must be ours (a pairs file or new) and writable; the teacher must answer
    read_pairs(check_output_file(o.out, "--out"))
    check_teacher_endpoint(o.teacher, o.teacher_model, api_key_env=o.api_key_env)

    try:
        retriever = _build_retriever(o)
        teacher = teacher_from_spec(o.teacher, retriever=retriever, model=o.teacher_model,
                                    seed=o.seed, api_key_env=o.api_key_env,
                                    concurrency=o.concurrency, max_items=o.teacher_max_items,
                                    timeout=o.teacher_timeout, max_reply_bytes=o.max_reply_bytes,
                                    max_answer_sentences=o.teacher_answer_sentences)
        policy = sampling = None
        if rejected_from == "policy":
            model, tok = load_model_and_tokenizer(o.model, "cpu", o.dtype)
            policy = (model.eval(), tok)
            sampling = SamplingParams(
                max_new_tokens=o.thinking_max_new_tokens if o.with_thinking else o.sample_max_new_tokens,
                temperature=o.sample_temperature, top_p=o.sample_top_p, top_k=50)
        config = DatagenConfig(
            n=o.n, categories=categories, number_nodes_to_get=o.number_nodes_to_get, use_rag=o.rag,
            rejected_from=rejected_from, with_thinking=o.with_thinking, k_samples=o.k_samples,
            scorer=teacher if o.scorer == "judge" else "embedding",
            only_include_wrong_answers=o.only_wrong, wrong_threshold=o.wrong_threshold,
            seed=o.seed, out_path=o.out, sampling=sampling, progress=o.progress,
            batch_size=o.gen_batch_size, thinking_format=o.thinking_format)
        rows = generate_pairs(retriever, teacher, policy=policy, config=config)
    except (DatagenError, TeacherError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": o.out, "rows": len(rows), **rows.stats.as_dict()}))
    st = rows.stats
    if st.written == 0 and st.requested > st.existing:
        raise nothing_produced(f"datagen --out {o.out}", st.skipped, total=st.requested - st.existing)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
