"""Thinking-span label masks for PRefLexOR stage 2 (DPO / EXO on the answer only).

PRefLexOR (arXiv 2410.12375, sec. 2) trains stage 2 with the thinking span hidden from the loss:
only the answer after the last ``<|/thinking|>`` is scored (``answer_only``), or a random fraction
of the thinking tokens is masked (``random_fraction``). ``labels`` are aligned to ``token_ids``
(the causal shift happens in ``losses.sequence_logps``); thinking is searched only inside the
completion (first to last labelled position), so special tokens in the prompt never count.
Unclosed thinking (e.g. a truncated completion) is never scored as if it were an answer: with
``on_unclosed="drop"`` the pair is dropped, with ``"keep"`` every token is scored.

Tests: ``python -m pytest -q tests/test_losses.py -k mask``
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels import IGNORE_INDEX

MASK_MODES = ("answer_only", "random_fraction", "none")
UNCLOSED_POLICIES = ("drop", "keep")

__all__ = ["MASK_MODES", "UnclosedThinking", "find_thinking_spans", "thinking_mask", "thinking_mask_batch"]


class UnclosedThinking(ValueError):
    """A completion opens a thinking span that never closes (usually a truncated generation)."""

    def __init__(self, start_pos: int):
        self.start_pos = start_pos
        super().__init__(f"thinking span opened at position {start_pos} is never closed; the sequence "
                         "was probably truncated. Drop the pair, or pass on_unclosed='keep' to score all tokens")


def find_thinking_spans(token_ids: Sequence[int], labels: Sequence[int], start_id: int, end_id: int
                        ) -> tuple[list[tuple[int, int]], int | None]:
    """Thinking spans inside the completion.

    Inside the completion, ``start_id`` opens a span and the next ``end_id`` closes it (a
    ``start_id`` inside an open span is just a token of that span). An ``end_id`` with no open span
    closes a span opened in the prompt (a generation prompt that ends with ``<|thinking|>``); that
    span starts right before the completion.

    Returns ``(spans, unclosed_start)``: spans is a list of (open, close) positions, the tokens
    strictly inside a span being open+1 .. close-1 (open = first completion position - 1 when the
    span was opened in the prompt); unclosed_start is the position of a start token that is never
    closed, or None.
    """
    labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not labelled:
        return [], None
    first, last = labelled[0], labelled[-1]
    spans: list[tuple[int, int]] = []
    open_pos: int | None = None
    for i in range(first, last + 1):
        t = token_ids[i]
        if t == start_id and open_pos is None:
            open_pos = i
        elif t == end_id:
            spans.append((first - 1 if open_pos is None else open_pos, i))
            open_pos = None
    return spans, open_pos


def _as_list(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"thinking_mask: expected a 1-D sequence, got shape {tuple(x.shape)}; "
                             "use thinking_mask_batch for (B, T)")
        return x.tolist()
    return list(x)


def thinking_mask(token_ids, labels, start_id: int, end_id: int, mode: str = "answer_only", *,
                  include_thinking_token_in_labels: bool = False, fraction: float = 0.5,
                  generator: torch.Generator | None = None, on_unclosed: str = "drop",
                  answer_after: str = "last") -> torch.Tensor:
    """Mask thinking from one sequence's labels; returns a new 1-D int64 labels tensor.

    token_ids, labels: 1-D (list or tensor) of equal length, labels aligned to token_ids.

    mode="answer_only": every labelled position up to and including the LAST end token (with
        ``answer_after="first"``: the FIRST) is set to IGNORE_INDEX (with ``include_thinking_token_in_labels``
        the end token keeps its label, so the model is still taught to close its thinking). A completion
        with no thinking tokens at all is unchanged (it is all answer). "first" scores everything after
        the first close as answer, a second ``<|/thinking|>`` included: a sampled completion that closes
        its thinking twice is then penalised for it, where "last" hides the malformed part.
    mode="random_fraction": in each span, round(fraction * n) of the n labelled positions strictly
        inside it (never the start/end tokens, never answer tokens) are masked, chosen with
        ``torch.randperm(n, generator=generator)`` -- deterministic for a seeded generator.
    mode="none": labels unchanged (copied).

    Masking position i removes the term log p(token_ids[i] | token_ids[:i]). Unclosed thinking (a
    start with no later end): raises ``UnclosedThinking`` when on_unclosed="drop" (``thinking_mask_batch``
    reports the row as not kept), returns the labels unchanged when on_unclosed="keep".
    """
    if mode not in MASK_MODES:
        raise ValueError(f"thinking_mask: unknown mode {mode!r}; valid: {', '.join(MASK_MODES)}")
    if on_unclosed not in UNCLOSED_POLICIES:
        raise ValueError(f"thinking_mask: unknown on_unclosed {on_unclosed!r}; valid: {', '.join(UNCLOSED_POLICIES)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"thinking_mask: fraction must be in [0, 1]; got {fraction}")
    ids, lab = _as_list(token_ids), _as_list(labels)
    if len(ids) != len(lab):
        raise ValueError(f"thinking_mask: token_ids has {len(ids)} entries but labels has {len(lab)}; "
                         "labels must be aligned to token_ids (same length)")
    out = torch.tensor(lab, dtype=torch.long)
    if mode == "none":
        return out
    spans, unclosed = find_thinking_spans(ids, lab, start_id, end_id)
    if unclosed is not None:
        if on_unclosed == "drop":
            raise UnclosedThinking(unclosed)
        return out
    if not spans:
        return out
    if mode == "answer_only":
        if answer_after not in ("first", "last"):
            raise ValueError(f"thinking_mask: answer_after must be 'first' or 'last', got {answer_after!r}")
        end = spans[0][1] if answer_after == "first" else spans[-1][1]
        stop = end if include_thinking_token_in_labels else end + 1
        out[:stop] = IGNORE_INDEX
        return out
    # random_fraction
    for open_pos, close_pos in spans:
        inside = [i for i in range(open_pos + 1, close_pos) if lab[i] != IGNORE_INDEX]
        k = math.floor(fraction * len(inside) + 0.5)
        if k:
            pick = torch.randperm(len(inside), generator=generator)[:k]
            out[torch.tensor(inside, dtype=torch.long)[pick]] = IGNORE_INDEX
    return out


def thinking_mask_batch(input_ids: torch.Tensor, labels: torch.Tensor, start_id: int, end_id: int,
                        mode: str = "answer_only", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``thinking_mask`` over (B, T) tensors.

    Returns ``(new_labels (B, T), keep (B,) bool)``. keep[b] is False when row b has unclosed thinking
    (with on_unclosed="drop"; its labels are then all IGNORE_INDEX) or when nothing is left to score
    after masking (e.g. the thinking ends at the last token). Drop the whole preference pair when
    either of its rows is not kept.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"thinking_mask_batch: input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must both be (B, T)")
    rows, keep = [], []
    for ids_row, lab_row in zip(input_ids.tolist(), labels.tolist()):
        try:
            new = thinking_mask(ids_row, lab_row, start_id, end_id, mode, **kwargs)
            ok = bool((new != IGNORE_INDEX).any())
        except UnclosedThinking:
            new, ok = torch.full((len(lab_row),), IGNORE_INDEX, dtype=torch.long), False
        rows.append(new)
        keep.append(ok)
    new_labels = torch.stack(rows).to(labels.device) if rows else labels.clone()
    return new_labels, torch.tensor(keep, dtype=torch.bool, device=labels.device)
