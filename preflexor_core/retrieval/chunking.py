"""Corpus reading and sentence-aware chunking for the graph retriever.

What: reads ``.txt`` / ``.md`` / ``.markdown`` files and ``.jsonl`` files (one JSON object per
line with a ``text`` field), from one file or a folder (recursive, sorted by relative path so a
rebuild sees the same order), and splits each document into chunks of whole sentences holding at
most ``max_tokens`` tokens, with an overlap between consecutive chunks counted in sentences or in
tokens. A sentence longer than ``max_tokens`` is cut at word boundaries.

Tokens are whitespace-separated words by default; pass ``tokenizer=callable`` (text -> sequence of
tokens, e.g. ``lambda s: tok.encode(s)``) to count model tokens instead.

Chunk ids are ``"<source>@<char offset>"``: the same inputs always give the same ids.

References: PRefLexOR (arXiv 2410.12375) retrieves from chunked raw text to ground the
"thinking" scratchpad; chunk sizes follow the usual RAG practice (a few hundred tokens, 1-2
sentences of overlap).

Run: ``python -m preflexor_core.retrieval.chunking PATH [--max-tokens 200]`` prints a summary.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..infra.io import parse_jsonl_line
from ..text.words import sentence_spans

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES

Tokenizer = Callable[[str], Sequence]


class CorpusError(ValueError):
    """A corpus input could not be used (missing, unreadable, unsupported or empty)."""


@dataclass(frozen=True)
class Chunk:
    """A contiguous slice ``text == document[start:start + len(text)]`` of one source document."""

    chunk_id: str
    text: str
    source: str
    start: int


@dataclass(frozen=True)
class Document:
    source: str
    text: str


# ----------------------------------------------------------------------------- reading

def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"cannot decode {path} as UTF-8 ({e.reason} at byte {e.start}); "
                          "convert the file to UTF-8 or remove it from the corpus") from e
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror or e}; check that the file exists "
                          "and is readable") from e


def _read_jsonl(path: Path, source: str, field: str = "text") -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        row, problem = parse_jsonl_line(line)
        if problem and not problem.startswith("expected"):
            raise CorpusError(f"{path}:{lineno}: invalid JSON: {problem}; each line of a .jsonl "
                              f"corpus file must be one JSON object with a {field!r} field")
        if row is None or field not in row:
            raise CorpusError(f"{path}:{lineno}: no {field!r} field in this JSON line; each line "
                              f"must be an object like {{\"{field}\": \"...\"}}")
        if not isinstance(row[field], str):
            raise CorpusError(f"{path}:{lineno}: field {field!r} is {type(row[field]).__name__}, "
                              "expected a string")
        if row[field].strip():
            docs.append(Document(f"{source}:{lineno}", row[field]))
    return docs


def read_file(path: str | os.PathLike, source: str | None = None) -> list[Document]:
    """Read one corpus file into documents (one for text files, one per line for .jsonl)."""
    path = Path(path)
    source = source if source is not None else path.as_posix()
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if not path.is_file():
        raise CorpusError(f"corpus path is not a regular file: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, source)
    if suffix in TEXT_SUFFIXES:
        text = _read_text_file(path)
        return [Document(source, text)] if text.strip() else []
    raise CorpusError(f"unsupported corpus file type {suffix or '(no suffix)'!r}: {path}; "
                      f"supported: {', '.join(SUPPORTED_SUFFIXES)}")


def iter_corpus_files(folder: str | os.PathLike) -> list[Path]:
    """Supported files under ``folder`` (recursive, hidden entries skipped), sorted by relative path."""
    folder = Path(folder)
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_path(path: str | os.PathLike) -> list[Document]:
    """Read a file or a folder (recursively) into documents, in a deterministic order."""
    path = Path(path)
    if path.is_dir():
        return [d for f in iter_corpus_files(path) for d in read_file(f)]
    return read_file(path)


# ----------------------------------------------------------------------------- sentences

# ----------------------------------------------------------------------------- chunking

def _count(text: str, tokenizer: Tokenizer | None) -> int:
    return len(text.split()) if tokenizer is None else len(tokenizer(text))


def _split_long(text: str, span: tuple[int, int], max_tokens: int,
                tokenizer: Tokenizer | None) -> list[tuple[int, int]]:
    """Cut one over-long sentence into word-boundary pieces of at most ``max_tokens`` tokens."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[span[0]:span[1]])]
    words = [(span[0] + s, span[0] + e) for s, e in words]
    pieces = []
    i = 0
    while i < len(words):
        j = i + 1
        # grow greedily; each word is >= 1 token so at most max_tokens words fit
        while j < len(words) and j - i < max_tokens and \
                _count(text[words[i][0]:words[j][1]], tokenizer) <= max_tokens:
            j += 1
        pieces.append((words[i][0], words[j - 1][1]))
        i = j
    return pieces


def chunk_text(text: str, source: str, max_tokens: int = 200, overlap: int = 1,
               overlap_unit: str = "sentences", tokenizer: Tokenizer | None = None) -> list[Chunk]:
    """Split one document into sentence-aware chunks.

    Each chunk is a run of whole sentences (or pieces of an over-long sentence) with at most
    ``max_tokens`` tokens. Consecutive chunks share up to ``overlap`` trailing sentences
    (``overlap_unit="sentences"``) or the trailing whole sentences that hold at most ``overlap``
    tokens (``overlap_unit="tokens"``); overlap is reduced when it would not leave room for a new
    sentence, and every chunk starts at a later sentence than the one before it. A single word
    that alone exceeds ``max_tokens`` (possible with a model tokenizer) becomes its own chunk.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if overlap_unit not in ("sentences", "tokens"):
        raise ValueError(f"overlap_unit must be 'sentences' or 'tokens', got {overlap_unit!r}")
    if overlap_unit == "tokens" and overlap >= max_tokens:
        raise ValueError(f"overlap ({overlap} tokens) must be smaller than max_tokens ({max_tokens})")

    units: list[tuple[int, int]] = []
    for span in sentence_spans(text):
        if _count(text[span[0]:span[1]], tokenizer) <= max_tokens:
            units.append(span)
        else:
            units.extend(_split_long(text, span, max_tokens, tokenizer))
    if not units:
        return []
    unit_tokens = [_count(text[s:e], tokenizer) for s, e in units]

    def fits(i: int, j: int) -> bool:  # units[i..j] inclusive in one chunk
        if tokenizer is None:  # whitespace token counts add up exactly
            return sum(unit_tokens[i:j + 1]) <= max_tokens
        return _count(text[units[i][0]:units[j][1]], tokenizer) <= max_tokens

    chunks = []
    first = 0
    while True:
        last = first
        while last + 1 < len(units) and fits(first, last + 1):
            last += 1
        start, end = units[first][0], units[last][1]
        chunks.append(Chunk(f"{source}@{start}", text[start:end], source, start))
        if last + 1 >= len(units):
            break
        # overlap: step back from the unit after `last` over whole trailing units
        nxt = last + 1
        if overlap_unit == "sentences":
            back = max(first + 1, last + 1 - overlap)
        else:
            back = last + 1
            while back - 1 > first and sum(unit_tokens[back - 1:last + 1]) <= overlap:
                back -= 1
        while back < nxt and not fits(back, nxt):
            back += 1
        first = back
    return chunks


def chunk_documents(docs: Iterable[Document], **kwargs) -> list[Chunk]:
    """Chunk every document in order; ``kwargs`` go to :func:`chunk_text`."""
    return [c for d in docs for c in chunk_text(d.text, d.source, **kwargs)]


def _main() -> None:
    ap = argparse.ArgumentParser(description="Chunk a corpus file or folder and print a summary.")
    ap.add_argument("path", help="a .txt/.md/.jsonl file or a folder of them")
    ap.add_argument("--max-tokens", type=int, default=200, help="max whitespace tokens per chunk")
    ap.add_argument("--overlap", type=int, default=1, help="overlap between consecutive chunks")
    ap.add_argument("--overlap-unit", choices=["sentences", "tokens"], default="sentences",
                    help="unit of --overlap")
    a = ap.parse_args()
    chunks = chunk_documents(read_path(a.path), max_tokens=a.max_tokens, overlap=a.overlap,
                             overlap_unit=a.overlap_unit)
    sizes = [len(c.text.split()) for c in chunks]
    print(f"{len(chunks)} chunks from {len({c.source for c in chunks})} sources; "
          f"tokens/chunk min {min(sizes, default=0)} max {max(sizes, default=0)}")
    for c in chunks[:3]:
        print(f"--- {c.chunk_id}\n{c.text[:300]}")


if __name__ == "__main__":
    _main()
