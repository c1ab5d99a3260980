"""Convert a checkpoint of any supported family between an HF folder and a llama.cpp GGUF file.

Llama and Mistral become GGUF architecture ``llama``, Qwen2/2.5 ``qwen2``, Qwen3 ``qwen3``, Gemma 3 text
``gemma3``; the way back gives each its own config.json (docs/families.md).

    python -m preflexor_core.convert ckpt/ model.gguf --dtype q8_0     # HF folder -> GGUF (llama.cpp, Ollama, LM Studio)
    python -m preflexor_core.convert model.gguf ckpt/                  # GGUF -> HF folder (safetensors + tokenizer)

The chat template and the special tokens (thinking tokens included, as CONTROL tokens) travel
both ways. GGUF writing and reading live in preflexor_core/llm/gguf/.
Tests: .venv/bin/python -m pytest -q tests/test_convert.py
"""
from __future__ import annotations

import argparse
import json
import os

from ..infra.errors import PreflexorError
from ..infra.io import fsync_write
from ..tokenization.tokenizer import Tokenizer
from .gguf import write_gguf
from .model import Llama

GGUF_DTYPES = ("f16", "bf16", "q8_0", "f32")
HF_DTYPES = ("f32", "f16", "bf16")
_TORCH = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class ConvertError(PreflexorError, ValueError):
    """Bad arguments to the converter: what was wrong and what to pass instead."""


def folder_chat_template(folder: str) -> str | None:
    """The chat template an HF folder ships: tokenizer_config.json ``chat_template`` or chat_template.jinja."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    conf = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(conf):
        return None
    with open(conf, encoding="utf-8") as f:
        tmpl = json.load(f).get("chat_template")
    if isinstance(tmpl, list):   # named templates: use "default"
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    return tmpl if isinstance(tmpl, str) else None


def hf_to_gguf(src: str, dst: str, dtype: str = "f16") -> None:
    if not dst.endswith(".gguf"):
        raise ConvertError(f"{dst}: the output of an HF folder conversion must be a .gguf file name")
    if dtype not in GGUF_DTYPES:
        raise ConvertError(f"--dtype {dtype} cannot be written to GGUF; choose one of {', '.join(GGUF_DTYPES)}")
    model = Llama.from_pretrained(src, dtype="float32")
    tok = Tokenizer.from_pretrained(src)
    template = getattr(tok, "chat_template", None) or folder_chat_template(src)
    write_gguf(model, tok, dst, dtype=dtype, chat_template=template,
               name=os.path.basename(os.path.abspath(src).rstrip("/")))


def gguf_to_hf(src: str, dst: str, dtype: str = "f32") -> None:
    if dtype not in HF_DTYPES:
        raise ConvertError(f"--dtype {dtype} is a GGUF block type; an HF folder stores {', '.join(HF_DTYPES)}")
    if os.path.isfile(dst):
        raise ConvertError(f"{dst}: is a file; the output of a GGUF conversion is an HF folder")
    model = Llama.from_pretrained(src, dtype=_TORCH[dtype])
    tok = Tokenizer.from_pretrained(src)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    conf_path = os.path.join(dst, "tokenizer_config.json")
    with open(conf_path, encoding="utf-8") as f:
        conf = json.load(f)
    changed = False
    if tok.chat_template is not None and conf.get("chat_template") != tok.chat_template:
        conf["chat_template"], changed = tok.chat_template, True      # keep the checkpoint's own template
    if conf.get("add_bos_token") != tok.add_bos_token:
        conf["add_bos_token"], changed = tok.add_bos_token, True
    if changed:
        fsync_write(conf_path, json.dumps(conf, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preflexor_core.convert",
        description="Convert a checkpoint (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text): an HF folder (config.json, *.safetensors, tokenizer.json) to a "
                    "llama.cpp .gguf file, or a .gguf file to an HF folder. The direction follows SRC: a folder "
                    "-> DST must end in .gguf; a .gguf file -> DST is a folder (created or replaced).")
    p.add_argument("src", metavar="SRC", help="an HF folder of a supported family, or a .gguf file (architecture "
                                             "llama, qwen2, qwen3 or gemma3; byte-level BPE vocabulary)")
    p.add_argument("dst", metavar="DST", help="output: a .gguf file name, or a folder")
    p.add_argument("--dtype", default=None,
                   help="weight type. GGUF output: f16 (default), bf16, q8_0 (8-bit blocks, ~half of f16), f32. "
                        "HF output: f32 (default), f16, bf16")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    src, dst = args.src, args.dst
    if os.path.isdir(src):
        hf_to_gguf(src, dst, args.dtype or "f16")
    elif os.path.isfile(src) and src.endswith(".gguf"):
        gguf_to_hf(src, dst, args.dtype or "f32")
    elif not os.path.exists(src):
        raise ConvertError(f"{src}: not found; SRC must be an HF model folder or a .gguf file")
    else:
        raise ConvertError(f"{src}: not a folder or a .gguf file; SRC must be an HF model folder or a .gguf file")
    print(f"wrote {dst}")
    return 0

