"""GGUF (llama.cpp's file format) in and out for the llama, qwen2, qwen3 and gemma3 architectures.

    model = Llama.from_pretrained("m.gguf")    # -> load_gguf_model(path, Llama, ...)
    tok = Tokenizer.from_pretrained("m.gguf")  # -> load_gguf_tokenizer(path, Tokenizer)
    write_gguf(model, tok, "out.gguf", dtype="q8_0")

This package is below the model and the tokenizer: they pass their classes in, it imports neither.
reader.py (header checks, config, dequantization), tokenizer.py (BPE from metadata),
writer.py (model + tokenizer -> .gguf), layout.py (names, q/k row order).
Tests: .venv/bin/python -m pytest -q tests/test_gguf.py tests/test_convert.py
"""
from .reader import SUPPORTED_TYPES, GGUFError, load_gguf_model, open_gguf, read_metadata
from .tokenizer import load_gguf_tokenizer, tokenizer_from_metadata
from .writer import write_gguf

__all__ = ["GGUFError", "SUPPORTED_TYPES", "load_gguf_model", "load_gguf_tokenizer", "open_gguf",
           "read_metadata", "tokenizer_from_metadata", "write_gguf"]

