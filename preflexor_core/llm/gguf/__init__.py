"""GGUF (llama.cpp's file format) in and out for the llama, qwen2, qwen3 and gemma3 architectures.

    model = Llama.from_pretrained("m.gguf")    # -> load_gguf_model(path, Llama, ...)
    tok = Tokenizer.from_pretrained("m.gguf")  # -> tokenization/gguf_vocab.load_gguf_tokenizer
    write_gguf(model, tok, "out.gguf", dtype="q8_0")

This package is below the model: it passes its class in. The container (header checks, metadata) and the
tokenizer read from metadata are the tokenization room's (tokenization/gguf_file.py, gguf_vocab.py);
here: reader.py (config, dequantization), writer.py (model + tokenizer -> .gguf), layout.py (names,
q/k row order). ``load_gguf_model`` checks the header's sizes against this machine
(``limits.check_gguf_fits``) before anything is built.
Tests: .venv/bin/python -m pytest -q tests/test_gguf.py tests/test_convert.py
"""
from ...tokenization.gguf_file import open_gguf
from ..limits import check_gguf_fits
from .reader import load_gguf_model as _load_gguf_model
from .writer import write_gguf

__all__ = ["load_gguf_model", "write_gguf"]


def load_gguf_model(path: str, model_cls, dtype=None, device="cpu", reader=None):
    """``reader.load_gguf_model`` once the header's sizes fit this machine (``limits.check_gguf_fits``:
    checked before any model is built or tensor read); ``reader``: an already opened file."""
    reader = reader if reader is not None else open_gguf(path)
    check_gguf_fits(path, dtype=dtype, device=device, reader=reader)
    return _load_gguf_model(path, model_cls, dtype=dtype, device=device, reader=reader)
