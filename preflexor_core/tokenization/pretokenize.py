"""Pre-tokenizer splits shared by tokenizers trained here and tokenizers read from GGUF files.

A leaf module (only ``tokenizers``). Tests: tests/test_tokenizer.py, tests/test_gguf.py.
"""
from __future__ import annotations

from tokenizers import Regex, pre_tokenizers as pt

# Llama-3 pre-tokenizer split pattern (contractions, letters, 1-3 digit groups, punctuation, spaces).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_pre_tokenizer():
    """Llama-3's pre-tokenizer: the regex split above, then byte-level mapping without its own regex."""
    return pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
