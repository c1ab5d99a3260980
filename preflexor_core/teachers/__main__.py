"""Show what the extractive teacher writes for one random chunk of a corpus.

Run: ``python -m preflexor_core.teachers --corpus PATH [--question "..."] [--seed 0]`` prints the
question, each thinking category and the answer; bad input is one ``error:`` line, exit status 2.

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.2 (thinking categories).

Tests: ``python -m pytest -q tests/test_teachers.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..infra.errors import run_cli
from ..retrieval import GraphRetriever
from ..retrieval.embedding import HashingEmbedder
from ..thinking.layout import DEFAULT_CATEGORIES
from .spec import teacher_from_spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m preflexor_core.teachers",
                                 description="Show what the extractive teacher writes for one random chunk.")
    ap.add_argument("--corpus", required=True, help="a .txt/.md/.jsonl file or a folder of them")
    ap.add_argument("--question", default=None, help="answer this question instead of a generated one")
    ap.add_argument("--seed", type=int, default=0, help="teacher / chunk seed")
    a = ap.parse_args(argv)
    if not os.path.exists(a.corpus):
        ap.error(f"--corpus {a.corpus}: no such file or directory; give a .txt/.md/.jsonl file or a folder of them")
    r = GraphRetriever.build([Path(a.corpus)], embedder=HashingEmbedder())
    t = teacher_from_spec("extractive", retriever=r, seed=a.seed)
    node = r.random_nodes(1, seed=a.seed)
    q = a.question or t.make_question(node)
    ctx = t.context(q, seed_hits=node)
    print(f"Q: {q}\n")
    for cat in DEFAULT_CATEGORIES:
        print(f"**{cat}**:\n{t.fill_category(cat, q, ctx)}\n")
    print(f"A: {t.answer(q, ctx)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
