"""On-the-fly preference data: question -> retrieval -> thinking scratchpad + answer -> rejected.

``pipeline`` (``generate_pairs`` + ``DatagenConfig``: the chosen side, then the rows), ``rejected``
(policy or teacher samples), ``scorers`` (rejected-sample scoring), ``pairs_io`` (resumable
``pairs.jsonl``), ``options`` (the option sections its CLI shares with training), ``__main__`` (the
CLI). The layout of a chosen response is the thinking room's (``thinking.layout``).

References: PRefLexOR (Buehler, arXiv 2410.12375), Sec. 2.1-2.3.

Tests: ``python -m pytest -q tests/test_datagen.py``; run: ``python -m preflexor_core.datagen --help``.
"""
from .pairs_io import (DatagenError, GenerationStats, NothingProducedError, NotPairsFileError, PairWriter, Pairs,
                       PairsFileError, nothing_produced, read_pairs)
from .pipeline import DEFAULT_WRONG_THRESHOLD, REJECTED_SOURCES, DatagenConfig, generate_pairs
from .scorers import CallableScorer, EmbeddingScorer, JudgeScorer, make_scorer

__all__ = ["DatagenError", "GenerationStats", "PairWriter", "Pairs", "PairsFileError",
           "read_pairs", "NotPairsFileError", "NothingProducedError", "nothing_produced",
           "DEFAULT_WRONG_THRESHOLD", "REJECTED_SOURCES", "DatagenConfig", "generate_pairs",
           "CallableScorer", "EmbeddingScorer", "JudgeScorer", "make_scorer"]
