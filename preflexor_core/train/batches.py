"""Training data: tokenised preference pairs, padded or packed batches, and the packed LM stream.

    row = {"prompt": ..., "chosen": ..., "rejected": ...}           (TRL column names)
    ex, why = tokenize_pair(tok, row, PairFormat(mask_mode="answer_only"))   # None + reason when dropped
    batch = collate_pairs([ex, ...], pad_id, packed=False)          # chosen rows first, then rejected

Rows are untrusted text: a control token's string inside a prompt or completion (``<|im_end|>``,
``<|start_header_id|>``, any added token of the vocabulary) is encoded as plain text, so each row
has exactly the template's control tokens plus the one end of turn appended to each completion
(``Tokenizer.encode_text``); only the pipeline's thinking tags stay special.

Labels are aligned to input_ids (IGNORE_INDEX on the prompt, padding and masked thinking);
the causal shift happens in ``losses.logps_from_hidden``. The end-of-turn token that closes
each completion stays in the labels, even when the pad id equals it.

Packed batches put a micro-batch's sequences into one row (B = 1), positions restarting per
sequence, with ``cu_seqlens`` boundaries (varlen attention: no compute spent on padding).

Tests: ``python -m pytest -q tests/test_data.py``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..kernels import IGNORE_INDEX
from ..losses.masks import MASK_MODES, UnclosedThinking, thinking_mask
from ..thinking.tokens import THINK_END, THINK_START


@dataclass(kw_only=True)
class PairFormat:
    """How a preference row becomes token ids and labels."""
    max_length: int = 1024                 # prompt + completion, tokens
    max_prompt_length: int = 512           # prompts are truncated from the left (BOS kept)
    truncation_mode: str = "keep_start"    # completion: "keep_start" or "keep_end"
    mask_mode: str = "none"                # thinking masking: none | answer_only | random_fraction
    mask_fraction: float = 0.5             # for random_fraction
    include_thinking_token_in_labels: bool = False
    on_unclosed: str = "drop"              # a completion whose thinking never ends: drop | keep
    answer_after: str = "first"            # answer_only: the answer follows the first (or last) <|/thinking|>

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode={self.truncation_mode!r}: use 'keep_start' or 'keep_end'")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self.mask_mode!r}: use one of {MASK_MODES}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be < max_length={self.max_length}")


@dataclass
class PairExample:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    index: int = -1


def _completion(tok, text: str, budget: int, mode: str) -> list[int]:
    ids = tok.encode_text(text)   # untrusted: only the pipeline's thinking tags may be control tokens
    end = tok.end_of_turn_id      # the chat template's end-of-turn token, else eos
    if end is not None and (not ids or ids[-1] != end):
        ids = ids + [end]
    if len(ids) > budget:
        ids = ids[:budget] if mode == "keep_start" else ids[-budget:]
    return ids


def prompt_ids(tok, prompt: str, max_prompt_length: int) -> list[int]:
    # the template neutralises the prompt: only its markup and the thinking tags are control tokens
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if len(ids) > max_prompt_length:
        keep_bos = bool(ids) and ids[0] == tok.bos_token_id
        ids = ([ids[0]] if keep_bos else []) + ids[len(ids) - max_prompt_length + int(keep_bos):]
    return ids


def tokenize_pair(tok, row: dict, fmt: PairFormat, generator: torch.Generator | None = None,
                  index: int = -1) -> tuple[PairExample | None, str | None]:
    """Tokenise one row. Returns (example, None) or (None, reason) when the pair is dropped."""
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"preference row {index}: field {key!r} missing or not a string "
                             f"(rows need 'prompt', 'chosen', 'rejected')")
    p = prompt_ids(tok, row["prompt"], fmt.max_prompt_length)
    budget = fmt.max_length - len(p)
    out = []
    start_id, end_id = tok.token_to_id(THINK_START), tok.token_to_id(THINK_END)
    for key in ("chosen", "rejected"):
        c = _completion(tok, row[key], budget, fmt.truncation_mode)
        if not c:
            return None, f"empty_{key}"
        ids = p + c
        labels = [IGNORE_INDEX] * len(p) + c
        if fmt.mask_mode != "none":
            if start_id is None or end_id is None:
                raise ValueError(f"mask_mode={fmt.mask_mode!r} needs {THINK_START} and {THINK_END} in the "
                                 f"tokenizer; add them with tok.add_special_tokens(THINKING_TOKENS)")
            try:
                lab = thinking_mask(ids, labels, start_id, end_id, fmt.mask_mode,
                                    include_thinking_token_in_labels=fmt.include_thinking_token_in_labels,
                                    fraction=fmt.mask_fraction, generator=generator, on_unclosed=fmt.on_unclosed,
                                    answer_after=fmt.answer_after)
            except UnclosedThinking:
                return None, f"unclosed_thinking_{key}"
            labels = lab.tolist()
        if all(x == IGNORE_INDEX for x in labels[1:]):
            return None, f"nothing_to_score_{key}"
        out += [ids, labels]
    return PairExample(*out, index=index), None


@dataclass
class Batch:
    """input_ids/labels/attention_mask (R, T); rows [0, n) chosen, [n, 2n) rejected (pairs) .
    Packed: R = 1, position_ids restart per sequence, cu_seqlens (S + 1,) int32 boundaries. Prefix-shared
    (``collate_pairs(..., share_prompt=True)``): a rejected sequence holds only the prompt's last token and
    its answer, and ``pieces`` let it attend to its chosen twin's prompt (``llm.attention.Packed``)."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    n_pairs: int = 0
    pieces: tuple | None = None
    origin: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.labels), mv(self.attention_mask), mv(self.position_ids),
                     mv(self.cu_seqlens), self.max_seqlen, self.n_pairs, self.pieces, self.origin)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()

    def label_counts(self) -> torch.Tensor:
        """(S,) int64 scored tokens per sequence, counted as ``losses.sequence_logps`` counts them
        (shifted labels that are not IGNORE_INDEX, padding excluded); S = rows, or packed segments."""
        lab = self.labels if self.attention_mask is None else \
            self.labels.masked_fill(self.attention_mask.to(self.labels.device) == 0, IGNORE_INDEX)
        valid = (lab[:, 1:] != IGNORE_INDEX).long()                         # (R, T-1)
        if self.cu_seqlens is None:
            return valid.sum(-1)
        cu = self.cu_seqlens.to(valid.device).long()
        seg = torch.bucketize(torch.arange(1, lab.shape[1], device=valid.device), cu[1:-1], right=True)
        return torch.zeros(cu.numel() - 1, dtype=torch.long, device=valid.device).index_add(0, seg, valid[0])


def collate_sequences(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, packed: bool = False) -> Batch:
    """(ids, labels) pairs -> a padded (right) batch, or one packed row with cu_seqlens."""
    if packed:
        ids = [t for s, _ in seqs for t in s]
        lab = [t for _, l in seqs for t in l]
        lens = [len(s) for s, _ in seqs]
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
        pos = torch.cat([torch.arange(n) for n in lens])
        return Batch(torch.tensor([ids]), torch.tensor([lab]), None, pos[None], cu, max(lens))
    T = max(len(s) for s, _ in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (s, l) in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return Batch(input_ids, labels, mask)


def collate_pairs(examples: Sequence[PairExample], pad_id: int, packed: bool = False,
                  share_prompt: bool = False) -> Batch:
    """Chosen rows first, then rejected: padded, packed, or packed with each prompt encoded once
    (``share_prompt``; see ``shared_prompt_length``)."""
    if share_prompt:
        return _collate_shared(examples)
    seqs = [(e.chosen_ids, e.chosen_labels) for e in examples] + \
           [(e.rejected_ids, e.rejected_labels) for e in examples]
    b = collate_sequences(seqs, pad_id, packed)
    b.n_pairs = len(examples)
    return b


def shared_prefix_length(a: tuple[list[int], list[int]], b: tuple[list[int], list[int]]) -> int:
    """L: the tokens two (ids, labels) sequences share at their start, none of them scored in either
    (labels[1:L] ignored), i.e. their common prompt. Shared in a packed row, the second keeps only token
    L - 1 (whose hidden state predicts its first own token) and what follows; each keeps a token of its own."""
    (x, lx), (y, ly) = a, b
    n = min(len(x), len(y)) - 1
    L = 0
    while L < n and x[L] == y[L] and (L == 0 or (lx[L] == IGNORE_INDEX and ly[L] == IGNORE_INDEX)):
        L += 1
    return L


def shared_prompt_length(e: PairExample) -> int:
    """``shared_prefix_length`` of a pair's chosen and rejected sequences (their prompt)."""
    return shared_prefix_length((e.chosen_ids, e.chosen_labels), (e.rejected_ids, e.rejected_labels))


def pack_sharing(seqs: Sequence[tuple[list[int], list[int]]], leader: Sequence[int | None]) -> Batch:
    """One packed row of ``seqs`` (in order) where sequence j shares the prompt of the earlier sequence
    ``leader[j]`` (None: shares nothing): it keeps only the shared prompt's last token (label ignored)
    and its own tokens, positions continuing the prompt's, and its attention piece is keyed by the
    leader's prompt, then itself (``llm.attention.Packed``). ``origin`` maps every packed token back to
    (sequence, position in the unshared sequence), for per-token results in the padded layout."""
    ids, lab, pos, lens, pieces, starts, origin = [], [], [], [], [], [], []
    for j, (x, lx) in enumerate(seqs):
        lead = leader[j]
        if lead is not None and not 0 <= lead < j:
            raise ValueError(f"pack_sharing: sequence {j} may share only an earlier sequence's prompt, got {lead}")
        keep = max(shared_prefix_length(seqs[lead], (x, lx)) - 1, 0) if lead is not None else 0
        q0 = len(ids)
        starts.append(q0)
        ids += x[keep:]
        lab += ([IGNORE_INDEX] + lx[keep + 1:]) if keep else lx
        pos += range(keep, len(x))
        origin += [(j, p) for p in range(keep, len(x))]
        lens.append(len(x) - keep)
        kv = ((starts[lead], starts[lead] + keep), (q0, len(ids))) if keep else ((q0, len(ids)),)
        pieces.append((q0, len(ids), kv))
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return Batch(torch.tensor([ids]), torch.tensor([lab]), None, torch.tensor([pos]), cu, max(lens),
                 pieces=tuple(pieces), origin=torch.tensor(origin, dtype=torch.long))


def _collate_shared(examples: Sequence[PairExample]) -> Batch:
    """[chosen_1 .. chosen_n | rejected_1 .. rejected_n], each rejected sharing its chosen twin's prompt:
    the padded layout's sums and counts per sequence (up to float rounding) from fewer tokens."""
    n = len(examples)
    seqs = [(e.chosen_ids, e.chosen_labels) for e in examples] + \
           [(e.rejected_ids, e.rejected_labels) for e in examples]
    b = pack_sharing(seqs, [None] * n + list(range(n)))
    b.n_pairs = n
    return b


def pack_lm_stream(token_lists: Sequence[list[int]], seq_len: int, sep_id: int | None) -> torch.Tensor:
    """Concatenate documents (each followed by ``sep_id``) and cut into (N, seq_len) blocks;
    the tail shorter than a block is dropped."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if sep_id is not None:
            stream.append(sep_id)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of seq_len={seq_len}; "
                         f"use a larger corpus or a smaller seq_len")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)
