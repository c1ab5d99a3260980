"""Answer-overlap metrics: SQuAD normalisation and token F1, longest common subsequence, ROUGE-L.

- ``token_f1``: the official SQuAD v2.0 script's ``compute_f1`` (Rajpurkar et al., EMNLP 2016):
  lowercase, delete punctuation (ASCII ``string.punctuation`` plus every Unicode category P*),
  remove a / an / the, split on whitespace; F1 of the bag-of-tokens overlap.
- ``rouge_l``: ROUGE-L (Lin, 2004) on the same tokens: LCS length over prediction (precision) and
  reference (recall), F-measure with beta = 1.
Either side empty: 1 if both are, else 0 (as SQuAD). A list of references: the maximum.
Tests: ``python -m pytest -q tests/test_evaluation.py -k "f1 or rouge or normalize"``.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Sequence

__all__ = ["normalize_answer", "answer_tokens", "token_f1", "lcs_length", "rouge_l"]

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, delete punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _refs(reference: str | Sequence[str]) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("need at least one reference")
    return refs


def _f_measure(matched: int, pred: list[str], gold: list[str]) -> float:
    """F1 of ``matched`` tokens out of ``pred`` (precision) and ``gold`` (recall); empty vs empty is 1."""
    if not pred or not gold:
        return float(pred == gold)
    if matched == 0:
        return 0.0
    p, r = matched / len(pred), matched / len(gold)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD token F1 of ``prediction`` against a reference (max over a list of references)."""
    pred = answer_tokens(prediction)
    return max(_f_measure(sum((Counter(pred) & Counter(gold)).values()), pred, gold)
               for gold in map(answer_tokens, _refs(reference)))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (beta = 1) on SQuAD-normalised tokens (max over a list of references)."""
    pred = answer_tokens(prediction)
    return max(_f_measure(lcs_length(pred, gold), pred, gold) for gold in map(answer_tokens, _refs(reference)))
