"""Preference-optimisation losses and masked sequence log-probabilities.

``sequence_logps`` / ``forward_logps``: per-sequence summed (or mean) label log-probs of padded
rows or packed (``cu_seqlens``) segments; ``orpo_loss``; ``dpo_loss`` (sigmoid, IPO, hinge, EXO).
Labels are aligned to input_ids (IGNORE_INDEX on prompt, padding, masked thinking); the causal
shift happens in ``logps_from_hidden``. IGNORE_INDEX lives in ``kernels`` (re-exported here). The formulas match TRL's ORPO/DPO trainers; the code is our own.

References: ORPO, Hong et al. 2024 (arXiv 2403.07691); DPO, Rafailov et al. 2023 (arXiv 2305.18290);
IPO, Azar et al. 2023 (arXiv 2310.12036); EXO, Ji et al. 2024 (arXiv 2402.00856).

Tests: ``python -m pytest -q tests/test_losses.py``
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import IGNORE_INDEX, linear_logprobs

DPO_LOSS_TYPES = ("sigmoid", "exo_pair", "ipo", "hinge")

# Upper clamp for ORPO's mean log-probs: log(1 - exp(x)) diverges at x = 0 (a sequence scored with
# probability 1, which fp32 log-softmax can return). -1e-12 is far below the resolution of fp32
# log-probs, so every value a model can meaningfully produce passes through unchanged.
ORPO_MAX_LOGP = -1e-12

__all__ = [
    "IGNORE_INDEX", "DPO_LOSS_TYPES", "ORPO_MAX_LOGP", "log1mexp", "logps_from_hidden",
    "sequence_logps", "sequence_sums", "forward_logps", "orpo_loss", "dpo_loss",
]


# ----------------------------------------------------------------------------- log-probs
def logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      softcap: float | None = None) -> torch.Tensor:
    """Per-token log-probs of the *shifted* labels.

    hidden (B, T, H) final (normed) hidden states, weight (V, H) LM-head weight, labels (B, T)
    aligned to input_ids. Returns (B, T - 1) fp32 where entry t = log p(labels[:, t + 1] |
    tokens <= t), and 0 where that label is IGNORE_INDEX. Only labelled rows are sent to the
    log-prob kernel, so prompt tokens cost nothing beyond the forward pass. ``softcap`` (a model's
    final_logit_softcapping, Gemma-style c * tanh(logits / c)) takes a torch path over the labelled rows
    in chunks, since the fused kernel has no cap.
    """
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"logps_from_hidden: expected hidden (B, T, H) and labels (B, T) with the same "
                         f"(B, T); got hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"logps_from_hidden: weight must be (V, H={hidden.shape[2]}); got {tuple(weight.shape)}")
    h = hidden[:, :-1]                                   # (B, T-1, H) position t predicts t+1
    lab = labels[:, 1:].to(hidden.device)                # (B, T-1)
    valid = lab != IGNORE_INDEX                          # (B, T-1)
    out = torch.zeros(lab.shape, dtype=torch.float32, device=hidden.device)
    if bool(valid.any()):
        if softcap is None:
            lp = linear_logprobs(h[valid], weight, lab[valid], ignore_index=IGNORE_INDEX)    # (N,)
        else:
            lp = _softcapped_logprobs(h[valid], weight, lab[valid], float(softcap))
        out = out.masked_scatter(valid, lp.float())
    return out


def _softcapped_logprobs(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cap: float,
                         chunk: int = 1024) -> torch.Tensor:
    """log softmax(cap * tanh(h @ W.T / cap))[label] for (N, H) rows, ``chunk`` rows at a time (fp32 math)."""
    parts = []
    for i in range(0, h.shape[0], chunk):
        z = F.linear(h[i:i + chunk], weight).float()
        z = cap * torch.tanh(z / cap)
        parts.append(torch.log_softmax(z, dim=-1).gather(-1, labels[i:i + chunk, None]).squeeze(-1))
    return torch.cat(parts)


def _unwrap(model):
    """The bare Llama under DDP-style wrappers (which expose it as ``.module``)."""
    return getattr(model, "module", model)


def _softcap(model) -> float | None:
    """The model's final logit softcapping (Gemma-style), or None."""
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, average: bool = False, *,
                   position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   pieces=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probs of the labelled tokens.

    input_ids, labels: (R, T), labels aligned to input_ids (IGNORE_INDEX on prompt, padding and
    masked thinking); attention_mask (R, T) 1 = real token (positions where it is 0 are never
    scored). Padded: one sequence per row. Packed: R = 1 with ``cu_seqlens`` (S + 1,) boundaries
    and ``position_ids`` restarting per sequence; a segment's first label is its prompt's first
    token (IGNORE_INDEX), so no sequence is scored from its predecessor; ``pieces`` (a prefix-shared row)
    let a segment attend to another's prompt (``llm.attention.Packed``). Returns ``(logps, counts)``,
    (S,) fp32 sums over scored tokens of log p (the mean when ``average``; 0 when nothing is
    scored) and (S,) int64 numbers of scored tokens; S = R when not packed.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"sequence_logps: input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape (labels aligned to input_ids)")
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask.to(labels.device) == 0, IGNORE_INDEX)
    shared = {} if pieces is None else {"pieces": pieces}
    hidden = model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   return_hidden=True, cu_seqlens=cu_seqlens, **shared)               # (R, T, H)
    bare = _unwrap(model)
    tok = logps_from_hidden(hidden, bare.output_weight, labels, _softcap(bare))       # (R, T-1)
    return sequence_sums(tok, labels, cu_seqlens, average)


def sequence_sums(tok: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                  average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs (R, T-1) from ``logps_from_hidden`` -> per-sequence ``(sums, counts)``: one
    sequence per row, or per ``cu_seqlens`` segment of a packed row (see ``sequence_logps``)."""
    valid = (labels[:, 1:] != IGNORE_INDEX).to(tok.device)                           # (R, T-1)
    if cu_seqlens is None:
        total, counts = tok.sum(-1), valid.sum(-1)
    else:
        if tok.shape[0] != 1:
            raise ValueError(f"sequence_logps: a packed batch (cu_seqlens given) has one row; got {tok.shape[0]}")
        cu = cu_seqlens.to(tok.device).long()
        seg = torch.bucketize(torch.arange(1, tok.shape[1] + 1, device=tok.device), cu[1:-1], right=True)
        n = cu.numel() - 1
        total = tok.new_zeros(n).index_add(0, seg, tok[0])
        counts = torch.zeros(n, dtype=torch.long, device=tok.device).index_add(0, seg, valid[0].long())
    if average:
        total = total / counts.clamp(min=1)
    return total, counts


def forward_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` of a padded or packed ``data.Batch``: (summed logps, counts) per sequence."""
    return sequence_logps(model, batch.input_ids, batch.labels, batch.attention_mask,
                          position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                          pieces=getattr(batch, "pieces", None))


# ----------------------------------------------------------------------------- ORPO
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): log(-expm1(x)) for
    x > -ln 2, log1p(-exp(x)) otherwise. Returns -inf at x = 0 and NaN for x > 0; callers clamp."""
    small = x > -math.log(2.0)
    # Evaluate each branch on a safe argument so the unused branch never produces NaN gradients.
    a = torch.log(-torch.expm1(torch.where(small, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(small, torch.full_like(x, -1.0), x)))
    return torch.where(small, a, b)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 (keep fp64 if given)."""
    return x if x.dtype == torch.float64 else x.float()


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO odds-ratio penalty (Hong et al. 2024, arXiv 2403.07691, eq. 6-7).

    Inputs are per-sequence MEAN log-probs of the completion, c = log P(y_w|x), r = log P(y_l|x)
    (each < 0). With odds(p) = p / (1 - p):

        log_odds = log odds(c) - log odds(r) = (c - r) - (log(1 - e^c) - log(1 - e^r))
        losses   = -beta * log sigmoid(log_odds)              (per example)
        rewards  = beta * c,  beta * r                        (detached)

    The full ORPO objective is ``nll_chosen + losses.mean()`` (nll_chosen = the usual mean token
    cross-entropy of the chosen completion); this is TRL's ORPOTrainer math. Inputs are clamped
    to <= ORPO_MAX_LOGP so a sequence of probability ~1 gives finite values and gradients.

    Returns (losses, chosen_rewards, rejected_rewards, log_odds), all (B,) fp32.
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"orpo_loss: chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                         f"{tuple(rejected_logps.shape)} must have the same shape")
    c = _as_float(chosen_logps).clamp(max=ORPO_MAX_LOGP)
    r = _as_float(rejected_logps).clamp(max=ORPO_MAX_LOGP)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    losses = -beta * F.logsigmoid(log_odds)
    chosen_rewards = (beta * _as_float(chosen_logps)).detach()
    rejected_rewards = (beta * _as_float(rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards, log_odds


# ----------------------------------------------------------------------------- DPO family
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family pairwise losses on SUMMED sequence log-probs (TRL's DPOTrainer math).

    With h = (pc - pr) - (rc - rr) (policy log-ratio minus reference log-ratio), z = beta * h,
    ls = label_smoothing:

        sigmoid  (DPO, Rafailov et al. 2023; conservative DPO when ls > 0):
                 -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)
        ipo      (IPO, Azar et al. 2023):  (h - 1 / (2 beta))^2
        hinge    (SLiC-style):             relu(1 - z)
        exo_pair (EXO, Ji et al. 2024, pairwise form, eps = ls in (0, 1)):
                 sigmoid(z) (log sigmoid(z) - log(1 - eps)) + sigmoid(-z) (log sigmoid(-z) - log eps)
                 i.e. KL(p_theta || p_target) between the policy's 2-way preference distribution
                 and the eps-smoothed label distribution.

    Rewards: chosen = beta * (pc - rc), rejected = beta * (pr - rr), detached.
    Returns (losses, chosen_rewards, rejected_rewards), all (B,) fp32.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 1); got {label_smoothing}")
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError("dpo_loss: loss_type='exo_pair' needs label_smoothing (the EXO epsilon) in (0, 1), "
                         f"got {label_smoothing}; the PRefLexOR recipe uses 5e-3")
    if loss_type == "ipo" and beta <= 0:
        raise ValueError(f"dpo_loss: loss_type='ipo' needs beta > 0 (target margin 1/(2 beta)); got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: all four log-prob tensors must have the same shape; got {sorted(shapes)}")
    pc, pr = _as_float(policy_chosen), _as_float(policy_rejected)
    rc, rr = _as_float(ref_chosen).detach(), _as_float(ref_rejected).detach()
    h = (pc - pr) - (rc - rr)
    z = beta * h
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z) * (1.0 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # exo_pair
        eps = label_smoothing
        losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                  + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return losses, chosen_rewards, rejected_rewards
