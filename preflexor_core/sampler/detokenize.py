"""Incremental detokenisation of a generated row and stop-string search.

``RowText`` keeps the stable decoded text of one row with prefix/read offsets (the approach of HF
text-generation-inference and vLLM), finds stop strings as text grows, and holds back text that
could still become a stop string when streaming. ``trim_to_text`` cuts ids to the shortest prefix
whose decoded text covers the kept text. Tests: ``python -m pytest tests/test_sampler.py -q -k stop``.
"""
from __future__ import annotations


class RowText:
    """Incremental detokenisation of one row (prefix/read offsets) plus stop-string search."""

    def __init__(self, tokenizer, ids: list[int], forced_text: str, stops: list[str]):
        self.tok = tokenizer
        self.ids = ids                       # shared list: the row's generated ids (forced first)
        self.text = forced_text              # stable decoded text so far
        self.prefix_offset = 0
        self.read_offset = len(ids)
        self.prefix_text = forced_text
        self.stops = stops
        self.max_stop = max((len(s) for s in stops), default=0)
        self.searched = len(forced_text)     # stop strings must end after the forced text
        self.forced_len = len(forced_text)
        self.emitted = 0

    def push(self) -> int | None:
        """Account for newly appended ids; returns the char index of a stop string, else None."""
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(self.prefix_text) or new_text.endswith("\ufffd"):
            return None                      # incomplete multi-byte character: wait for more tokens
        self.text += new_text[len(self.prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        if not self.stops:
            return None
        start = max(self.forced_len, self.searched - self.max_stop + 1)
        hits = [p for p in (self.text.find(s, start) for s in self.stops) if p >= 0]
        self.searched = len(self.text)
        return min(hits) if hits else None

    def streamable(self) -> str:
        """Text safe to stream now: hold back what could still become a stop string."""
        upto = len(self.text) - (self.max_stop - 1 if self.stops else 0)
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta


def trim_to_text(tokenizer, ids: list[int], keep_chars: int, floor: int) -> list[int]:
    """Shortest prefix ids[:k] (k >= floor) whose decoded text is at least ``keep_chars`` long."""
    k = len(ids)
    while k - 1 >= floor and len(tokenizer.decode(ids[:k - 1])) >= keep_chars:
        k -= 1
    return ids[:k]
