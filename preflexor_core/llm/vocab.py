"""Thinking tokens in a pretrained model's vocabulary: reuse reserved tokens, else add rows that start distinct.

    change = add_thinking_tokens(tok)          # tokenizer only: rename unused reserved tokens or add new ones
    init_token_rows(model, tok, change)        # resize the embedding (and untied head), initialise new rows
    change = setup_thinking_tokens(model, tok) # both; model.new_token_ids = rows the base never trained

Llama-3 vocabularies hold unused ``<|reserved_special_token_N|>`` entries, Gemma's ``<unusedN>``: they
are renamed to the thinking tags (same ids, embedding rows reused). Otherwise the tags are added as special tokens and
each new row (input embedding, and an untied head's row) starts at the mean of the rows of the tag's
own word pieces (``<|/thinking|>`` -> the pieces of "/thinking"), so the four rows differ from the
start. Under LoRA these rows must stay trainable: ``LoRAConfig(trainable_token_indices=
model.new_token_ids)`` (``apply_lora`` refuses an adapter that would freeze them).
Tests: ``python -m pytest -q tests/test_vocab.py``
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tokenizers import Tokenizer as TK

from ..thinking.tokens import THINKING_TOKENS
from ..tokenization.tokenizer import Tokenizer

# Llama-3's <|reserved_special_token_N|> and Gemma's <unusedN>
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_(\d+)\|>|<unused(\d+)>")

__all__ = ["VocabChange", "add_thinking_tokens", "init_token_rows", "setup_thinking_tokens",
           "resize_token_embeddings", "unused_reserved_tokens", "rename_special_tokens", "tag_words"]


@dataclass(frozen=True)
class VocabChange:
    """What ``add_thinking_tokens`` did: each token's id, the ids it added and the reserved ids it renamed."""
    ids: dict[str, int] = field(default_factory=dict)
    added: tuple[int, ...] = ()
    reused: tuple[int, ...] = ()

    @property
    def new_rows(self) -> tuple[int, ...]:
        """Ids whose rows the base model never trained (added or reused): the ones LoRA must train."""
        return tuple(sorted(self.added + self.reused))


def tag_words(token: str) -> str:
    """The text whose word pieces initialise a tag's row: ``<|/thinking|>`` -> ``/thinking``."""
    return token.strip("<|>") or token


def unused_reserved_tokens(tok: Tokenizer) -> list[tuple[int, str]]:
    """[(id, text)] of reserved special tokens (Llama-3's ``<|reserved_special_token_N|>``, Gemma's
    ``<unusedN>``) that the chat template does not mention, in order of N."""
    template = str(getattr(tok, "chat_template", None) or "")
    found = []
    for i, t in tok._tk.get_added_tokens_decoder().items():
        m = RESERVED_TOKEN.fullmatch(t.content)
        if m and t.special and t.content not in template:
            found.append((int(m.group(1) or m.group(2)), i, t.content))
    return [(i, text) for _, i, text in sorted(found)]


def rename_special_tokens(tok: Tokenizer, renames: dict[str, str]) -> None:
    """Give existing added tokens new texts in place (``{old: new}``); each keeps its id."""
    if not renames:
        return
    old_ids = {old: tok.token_to_id(old) for old in renames}
    clash = [new for new in renames.values() if tok.token_to_id(new) is not None]
    if None in old_ids.values() or clash:
        raise ValueError(f"rename_special_tokens: {renames}: every old text must be a token and no new text may "
                         f"exist already (missing {[o for o, i in old_ids.items() if i is None]}, existing {clash})")
    d = json.loads(tok._tk.to_str())
    for entry in d.get("added_tokens", []):
        if entry["content"] in renames:
            entry["content"] = renames[entry["content"]]
    vocab = d.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        for old, new in renames.items():
            if old in vocab:
                vocab[new] = vocab.pop(old)
    tok._tk = TK.from_str(json.dumps(d))
    for old, new in renames.items():
        if tok.token_to_id(new) != old_ids[old] or tok.encode(new) != [old_ids[old]]:
            raise ValueError(f"rename_special_tokens: {old!r} -> {new!r} did not map the new text to id "
                             f"{old_ids[old]}; this tokenizer's layout is not supported for renaming")


def add_thinking_tokens(tok: Tokenizer, tokens=THINKING_TOKENS) -> VocabChange:
    """Make each of ``tokens`` one special token: present ones stay, missing ones take unused reserved
    tokens first (renamed in place), the rest are added at the end of the vocabulary."""
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    reserved = unused_reserved_tokens(tok)[:len(missing)]
    rename_special_tokens(tok, {text: t for (_, text), t in zip(reserved, missing)})
    before = tok.vocab_size
    tok.add_special_tokens(missing[len(reserved):])
    ids = {t: tok.token_to_id(t) for t in tokens}
    added = tuple(sorted(i for t, i in ids.items() if t in missing[len(reserved):]))
    if any(i < before for i in added):
        raise ValueError(f"add_thinking_tokens: new tokens got ids {added} inside the old vocabulary of {before}")
    return VocabChange(ids=ids, added=added, reused=tuple(sorted(i for i, _ in reserved)))


def resize_token_embeddings(model, new_vocab_size: int) -> None:
    """Resize ``model``'s embedding (and untied head) to ``new_vocab_size`` rows.

    New rows are initialised to the mean of the old rows (``init_token_rows`` then gives token rows
    their own values); old rows are kept exactly. Updates ``model.config.vocab_size``.
    """
    emb = model.model.embed_tokens
    old = emb.weight.shape[0]
    if new_vocab_size == old:
        return
    if new_vocab_size < old:
        raise ValueError(f"new_vocab_size={new_vocab_size} < current {old}: shrinking would drop trained rows")

    def grow(w: torch.Tensor) -> nn.Parameter:
        with torch.no_grad():
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            return nn.Parameter(torch.cat([w, mean.expand(new_vocab_size - old, -1)], 0).contiguous())

    emb.weight = grow(emb.weight)
    emb.num_embeddings = new_vocab_size
    if model.lm_head is not None:
        model.lm_head.weight = grow(model.lm_head.weight)
        model.lm_head.out_features = new_vocab_size
    model.config.vocab_size = new_vocab_size


def _distinct(rows: torch.Tensor) -> bool:
    """No two rows equal (within fp32 rounding of their size)."""
    r = rows.float()
    d = torch.cdist(r, r).fill_diagonal_(float("inf"))
    return bool((d > 1e-6 * (1.0 + r.norm(dim=1).max())).all())


@torch.no_grad()
def init_token_rows(model, tok: Tokenizer, change: VocabChange) -> None:
    """Grow ``model`` to ``tok.vocab_size`` rows and initialise the rows of ``change.added`` to the mean
    of their tags' word-piece rows, in the embedding and in an untied head. The other tokens' rows
    (reused reserved or already present) are kept unless they coincide (e.g. all zero, or an old
    mean-of-all-rows resize), in which case they are initialised the same way. Sets
    ``model.new_token_ids``: every row of ``change.ids`` that the base model never trained."""
    old = model.model.embed_tokens.weight.shape[0]
    if tok.vocab_size > old:
        resize_token_embeddings(model, tok.vocab_size)
    tables = [model.model.embed_tokens.weight] + ([model.lm_head.weight] if model.lm_head is not None else [])
    todo = set(change.added)
    kept = [i for i in change.ids.values() if i not in todo]
    if len(kept) > 1 and not _distinct(tables[0][kept]):
        todo |= set(kept)
    specials = set(change.ids.values())
    for token, i in change.ids.items():
        if i not in todo:
            continue
        pieces = [p for p in tok.encode(tag_words(token)) if p < old and p not in specials]
        if not pieces:
            raise ValueError(f"init_token_rows: {tag_words(token)!r} encodes to no ordinary token of the base "
                             f"vocabulary, so {token!r} has nothing to start from; add it with a tokenizer that "
                             f"can spell it")
        for w in tables:
            w[i] = w[pieces].float().mean(0).to(w.dtype)
    rows = sorted(change.ids.values())
    if len(rows) > 1 and not _distinct(tables[0][rows]):
        raise ValueError(f"init_token_rows: the rows of {list(change.ids)} are not distinct after initialisation; "
                         f"their tags' word pieces coincide in this vocabulary")
    model.new_token_ids = tuple(sorted(set(change.new_rows) | todo))


def setup_thinking_tokens(model, tok: Tokenizer, tokens=THINKING_TOKENS) -> VocabChange:
    """``add_thinking_tokens`` then ``init_token_rows``: the tokenizer and ``model`` are updated in place."""
    change = add_thinking_tokens(tok, tokens)
    init_token_rows(model, tok, change)
    return change
