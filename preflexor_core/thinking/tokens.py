"""The control tokens of the thinking format, and the chat markers of the tokenizers trained here.

``<|thinking|> ... <|/thinking|>`` holds the reasoning, ``<|reflect|> ... <|/reflect|>`` a reflection
inside it (PRefLexOR, arXiv 2410.12375, Sec. 2.2). The tokenizer adds them (or reuses reserved
tokens, ``llm.vocab``) and lets them through where the pipeline wrote them; everything else in the
project asks this module for their strings.

``TRAINED_SPECIAL_TOKENS`` are the special tokens of a tokenizer trained here (Llama-3's chat
markers, then the thinking tokens, ids 0..8 in this order); span extraction strips them from
generated text.

Tests: ``python -m pytest -q tests/test_tokenizer.py tests/test_thinking.py``.
"""
from __future__ import annotations

THINK_START, THINK_END = "<|thinking|>", "<|/thinking|>"
REFLECT_START, REFLECT_END = "<|reflect|>", "<|/reflect|>"
THINKING_TOKENS = [THINK_START, THINK_END, REFLECT_START, REFLECT_END]

BOS, EOS, START_HEADER, END_HEADER, EOT = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Order matters: train_bpe gives these ids 0..8 (see llm.config.TRAINED_*_ID).
TRAINED_SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, *THINKING_TOKENS]


def strip_pipeline_tags(text: str) -> str:
    """``text`` without the pipeline's own tags (``THINKING_TOKENS``): for text the pipeline did not write
    (corpus, teacher replies, questions) before it is placed where those tags mean structure."""
    for tag in THINKING_TOKENS:
        text = text.replace(tag, "")
    return text
