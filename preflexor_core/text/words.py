"""Plain-text helpers shared by the teachers, the retrieval context and the graph critic.

Sentence splitting (the retriever's splitter, inner whitespace collapsed), ``STOPWORDS`` and
``content_words`` (the words that carry meaning), ``normalize_text`` (words normalised the way
graph concepts are) and ``mentions`` (a whole-word concept test on normalised text).

References: PRefLexOR (arXiv 2410.12375), Sec. 2.1-2.2: the scratchpads quote corpus sentences
that mention the question's concepts.

Tests: ``python -m pytest -q tests/test_teachers.py tests/test_retrieval.py``.
"""
from __future__ import annotations

import functools
import re


WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-]*")
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers him his how i if in into is it its itself just many may me might
more most much must my no nor not now of off on once only or other our out over own same shall she
should so some such than that the their them then there these they this those through to too
under until up upon use used uses using very via was we were what when where which while who whom
why will with within without would you your yet thus however therefore whereas often well such
one two three new based show shows shown make makes made way ways like also within among per
""".split())


def content_words(text: str) -> set[str]:
    """Lower-case non-stopword words of ``text`` (length >= 3), crude suffix-stripped."""
    return {stem(w) for w in WORD.findall(text.lower()) if len(w) >= 3 and w not in STOPWORDS}


def stem(w: str) -> str:
    """``w`` without a plural ending (``ies`` -> ``y``, ``es``, ``s``) when 4+ letters remain."""
    for suf in ("ies", "es", "s"):
        if w.endswith(suf) and len(w) - len(suf) >= 4:
            return w[: -len(suf)] + ("y" if suf == "ies" else "")
    return w


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with inner whitespace collapsed; uses the retriever's splitter."""
    sents = [text[s:e] for s, e in sentence_spans(text)]
    return [" ".join(s.split()) for s in sents if s.strip()]


def normalize_text(text: str) -> str:
    """Words of ``text`` normalised the way graph concepts are (lowercase, plural stripped),
    space-joined, so ``mentions(sentence, concept)`` is a word-sequence test."""
    return normalize_term(text)


def mentions(normalized_text: str, concept: str) -> bool:
    """Whether a concept term occurs as whole words in an already normalised text."""
    c = _normalized_concept(concept)
    return bool(c) and f" {c} " in f" {normalized_text} "


@functools.lru_cache(maxsize=1 << 14)
def _normalized_concept(concept: str) -> str:
    return normalize_text(concept)


def is_prose(sentence: str, min_words: int = 5) -> bool:
    """A sentence of running text: not a heading, table row or code fence, ``min_words``+ words."""
    return not sentence.lstrip().startswith(("#", "|", "```")) and len(sentence.split()) >= min_words


# ----------------------------------------------------------------------------- sentences

# Words ending in "." that do not end a sentence.
_ABBREVIATIONS = frozenset(
    "e.g i.e etc al fig figs eq eqs ref refs vs cf dr mr mrs ms prof st no vol pp approx ca resp "
    "sec ch jan feb mar apr jun jul aug sep sept oct nov dec inc ltd co jr sr".split())
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n\s*\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text`` (whitespace trimmed).

    A sentence ends at ``.``/``!``/``?`` (plus closing quotes/brackets) followed by whitespace,
    unless the word before the period is a known abbreviation or a single letter (initials), and
    at every blank line (paragraph break; also separates Markdown headings and list blocks).
    """
    spans = []
    begin = 0
    for m in _SENTENCE_END.finditer(text):
        if m.group(0)[0] == ".":
            word = re.search(r"(\S+)$", text[begin:m.start()])
            token = word.group(1).lower().lstrip("([\"'") if word else ""
            if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
                continue
        end = m.end() if not m.group(0).startswith("\n") else m.start()
        spans.append((begin, end))
        begin = m.end()
    spans.append((begin, len(text)))
    out = []
    for s, e in spans:
        seg = text[s:e]
        stripped = seg.strip()
        if stripped:
            s2 = s + (len(seg) - len(seg.lstrip()))
            out.append((s2, s2 + len(stripped)))
    return out


# ----------------------------------------------------------------------------- concept terms

_NO_PLURAL = frozenset("""species series physics mechanics dynamics mathematics economics genetics
news lens bias gas chaos atlas canvas thermodynamics kinetics optics electronics means""".split())

# words (letters first; inner digits, hyphens and apostrophes allowed) or single punctuation marks
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-'][A-Za-z0-9]+)*|\d+(?:[.,]\d+)*|[^\sA-Za-z0-9]")


def normalize_word(word: str) -> str:
    """Lowercase, drop a possessive, strip a simple English plural."""
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    if w in _NO_PLURAL or w.endswith(("ics", "ss", "us", "is")) or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "xes", "zes", "ches", "shes")):
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


def normalize_term(term: str) -> str:
    """Normalise a (multi-word) term the way concepts are stored: ``"Spider Silks" -> "spider silk"``."""
    return " ".join(normalize_word(w) for w in _TOKEN.findall(term) if w[0].isalnum())
