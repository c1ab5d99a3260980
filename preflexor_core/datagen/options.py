"""The pair-generation options that train.py and ``python -m preflexor_core.datagen`` share (and
``--thinking-format`` / ``--categories``, which inference and evaluation share too), declared once.

Fields are CLI options (``infra.cli.opt``): one name, one default and one help text wherever they
appear. Tests: ``python -m pytest -q tests/test_cli_options.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..infra.cli import opt
from ..thinking.formats import ThinkingFormat
from ..thinking.layout import DEFAULT_CATEGORIES

__all__ = ["Embedder", "TeacherOptions", "PairOptions", "ThinkingFormatOptions", "CategoriesOptions"]

Embedder = Literal["auto", "minilm", "hashing"]


@dataclass(kw_only=True)
class TeacherOptions:
    """The teacher that writes the chosen answers."""
    teacher: str = opt("extractive", "'extractive' (offline, grounded in the corpus), an OpenAI-compatible base "
                       "URL (http...), or a checkpoint directory")
    teacher_model: str = opt("gpt-4o-mini", "model name sent to an HTTP teacher (API key from $OPENAI_API_KEY)")
    teacher_timeout: float = opt(60.0, "HTTP teacher: overall deadline of one request in seconds (connect, "
                                 "headers and body together)", gt=0.0, cap=24 * 3600.0, resume_safe=True)
    max_reply_bytes: int = opt(8 << 20, "HTTP teacher: largest reply accepted, in bytes", ge=1, cap=1 << 30,
                               resume_safe=True)
    teacher_max_items: int = opt(1, "extractive teacher: sentences or items per thinking category (shorter "
                                 "thinking trains faster)", ge=1, cap=4096)
    teacher_answer_sentences: int = opt(2, "extractive teacher: at most this many corpus sentences in the "
                                        "chosen answer", ge=1, cap=4096)


@dataclass(kw_only=True)
class ThinkingFormatOptions:
    """The thinking format asked for."""
    thinking_format: ThinkingFormat = opt("categories", "the thinking written and asked for: categories (the "
                                          "paper's) or graph (Brainstorm, Graph, Graph JSON, Patterns, Synthesis; "
                                          "extractive teacher; train's stage 3 always uses graph)", stages="12")


@dataclass(kw_only=True)
class CategoriesOptions:
    """The thinking categories."""
    categories: str = opt(",".join(DEFAULT_CATEGORIES), "comma-separated thinking categories (the paper's six)")


@dataclass(kw_only=True)
class PairOptions:
    """Questions, retrieval and the policy's own samples (the rejected answers)."""
    embedder: Embedder = opt("auto", "retriever embedder: auto (the bundled MiniLM weights when installed, else "
                             "character hashing), minilm or hashing")
    number_nodes_to_get: int = opt(3, "corpus nodes sampled per generated question", ge=1, cap=4096, stages="12")
    k_samples: int = opt(2, "policy samples per question; the lowest-scored becomes the rejected answer",
                         ge=1, cap=256, stages="2")
    sample_max_new_tokens: int = opt(160, "max new tokens when sampling rejected answers without thinking "
                                     "(train: stage 1)", ge=1, cap=1 << 17, stages="1")
    thinking_max_new_tokens: int = opt(768, "max new tokens when sampling rejected answers with thinking (train: "
                                       "stage 2; datagen: --with-thinking); thinking cut off by this cap is "
                                       "handled by train's --on-unclosed", ge=1, cap=1 << 17, stages="2")
    sample_temperature: float = opt(0.8, "temperature when sampling rejected answers", ge=0.0, le=100.0,
                                    stages="12")
    sample_top_p: float = opt(0.9, "top-p when sampling rejected answers", gt=0.0, le=1.0, stages="12")
