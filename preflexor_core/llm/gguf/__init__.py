"""GGUF (llama.cpp's file format) in and out for the llama, qwen2, qwen3 and gemma3 architectures.

    model = Llama.from_pretrained("m.gguf")    # -> load_gguf_model(path, Llama, ...)
    tok = Tokenizer.from_pretrained("m.gguf")  # -> load_gguf_tokenizer(path, Tokenizer)
    write_gguf(model, tok, "out.gguf", dtype="q8_0")

This package is below the model and the tokenizer: they pass their classes in, it imports neither.
reader.py (header checks, config, dequantization), tokenizer.py (BPE from metadata),
writer.py (model + tokenizer -> .gguf), layout.py (names, q/k row order). ``load_gguf_model`` checks the
header's sizes against this machine (``limits.check_gguf_fits``) before anything is built.
Tests: .venv/bin/python -m pytest -q tests/test_gguf.py tests/test_convert.py
"""
from .reader import SUPPORTED_TYPES, GGUFError, open_gguf, read_metadata
from .reader import load_gguf_model as _load_gguf_model
from .tokenizer import load_gguf_tokenizer, tokenizer_from_metadata
from .writer import write_gguf

__all__ = ["GGUFError", "SUPPORTED_TYPES", "load_gguf_model", "load_gguf_tokenizer", "open_gguf",
           "read_metadata", "tokenizer_from_metadata", "write_gguf"]


def load_gguf_model(path: str, model_cls, dtype=None, device="cpu", reader=None):
    """``reader.load_gguf_model`` once the header's sizes fit this machine (``limits.check_gguf_fits``:
    checked before any model is built or tensor read); ``reader``: an already opened file."""
    from ..limits import check_gguf_fits
    reader = reader if reader is not None else open_gguf(path)
    check_gguf_fits(path, dtype=dtype, device=device, reader=reader)
    return _load_gguf_model(path, model_cls, dtype=dtype, device=device, reader=reader)
