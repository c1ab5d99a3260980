"""The GGUF container (llama.cpp's file format): open a file with header checks, read its metadata.

Below both readers of a .gguf file: the tokenizer (``gguf_vocab``, its ``tokenizer.ggml.*`` keys) and
the model (``llm/gguf``: config, weights, writing). Uses the ``gguf`` package (llama.cpp's own reader,
pinned in requirements.txt), an optional dependency imported only when a file is opened.

    meta = read_metadata(open_gguf("model.gguf"))

Tests: .venv/bin/python -m pytest -q tests/test_gguf.py
"""
from __future__ import annotations

import os
from typing import Any

# Tensor types the model loader (llm/gguf/reader.py) dequantizes (all covered by tests/test_gguf.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and what is wrong."""


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` over ``path`` after checking the magic and that no tensor runs past the end."""
    import gguf  # gguf: optional, only .gguf files need it
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (wrong magic: starts with {magic!r}, expected b'GGUF'); "
                        f"pass a .gguf file written by llama.cpp or gguf's GGUFWriter")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise GGUFError(f"{path}: a tensor has an unknown quant type ({e}); supported types: "
                            f"{', '.join(SUPPORTED_TYPES)}") from None
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({size} bytes; the reader failed with: {e}); "
                        f"re-download or re-convert it") from None
    except Exception as e:  # memmap / struct errors on a cut-off header
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {type(e).__name__}: {e}); "
                        f"re-download or re-convert it") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                            f"{t.data_offset + t.n_bytes}, the file has {size}; re-download or re-convert it")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """All key/value metadata of the file as Python values (arrays as lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
