"""Training objectives of the three stages, on a padded or packed ``data.Batch``.

``lm_objective`` (stage 0: token NLL), ``orpo_objective`` (stage 1: NLL(chosen) + ORPO odds-ratio
penalty, Hong et al. 2024, arXiv 2403.07691) and ``dpo_objective`` (stage 2: DPO-family loss against
precomputed reference log-probs). Each returns ``(loss, metrics)``; metrics use TRL's log names
(``rewards/chosen``, ...). Batches hold chosen rows first, then rejected. Token and pair sums are
divided by the counts of the whole accumulated batch, so k micro-batches of b = one batch of k*b.

Tests: ``python -m pytest -q tests/test_trainer.py tests/test_losses.py``
"""
from __future__ import annotations

import torch

from .batches import Batch
from ..losses.preference import dpo_loss, forward_logps, orpo_loss
from .config import PreferenceConfig

__all__ = ["lm_objective", "orpo_objective", "dpo_objective", "ADDITIVE_METRICS"]

# Metrics that are this micro-batch's share of the accumulated step's value (summed over micro-batches
# and ranks); every other metric is a mean over this micro-batch (averaged over micro-batches and ranks).
ADDITIVE_METRICS = ("loss", "nll")


def _norm(given, default: torch.Tensor) -> torch.Tensor | float:
    """The normaliser: ``given`` (the whole accumulated batch's count) or this batch's own."""
    return default.clamp(min=1) if given is None else max(float(given), 1.0)


def _reward_metrics(loss, nll, cr, rr) -> dict:
    return {"loss": loss.item(), "nll": nll.item(), "rewards/chosen": cr.mean().item(),
            "rewards/rejected": rr.mean().item(), "rewards/margins": (cr - rr).mean().item(),
            "rewards/accuracies": (cr > rr).float().mean().item()}


def lm_objective(model, batch: Batch, num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """Token negative log-likelihood, summed and divided by ``num_tokens`` (the labelled tokens of the
    whole accumulated batch; default this batch's, i.e. the mean)."""
    sums, counts = forward_logps(model, batch)
    loss = -sums.sum() / _norm(num_tokens, counts.sum())
    return loss, {"loss": loss.item(), "nll": loss.item()}


def orpo_objective(model, batch: Batch, beta: float, num_tokens: float | None = None,
                   num_pairs: float | None = None) -> tuple[torch.Tensor, dict]:
    """ORPO: NLL(chosen) + -beta * log sigmoid(log odds ratio) on mean completion log-probs. The NLL is
    summed over chosen tokens / ``num_tokens``, the odds-ratio term summed over pairs / ``num_pairs``
    (whole accumulated batch; defaults: this batch's, which gives TRL's per-batch means)."""
    sums, counts = forward_logps(model, batch)
    n = batch.n_pairs
    cs, rs, cc, rc = sums[:n], sums[n:], counts[:n], counts[n:]
    nll = -cs.sum() / _norm(num_tokens, cc.sum())
    losses, cr, rr, log_odds = orpo_loss(cs / cc.clamp(min=1), rs / rc.clamp(min=1), beta)
    loss = nll + losses.sum() / _norm(num_pairs, torch.tensor(n))
    return loss, {**_reward_metrics(loss, nll, cr, rr), "log_odds": log_odds.mean().item()}


def dpo_objective(model, batch: Batch, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                  pref: PreferenceConfig, num_tokens: float | None = None,
                  num_pairs: float | None = None) -> tuple[torch.Tensor, dict]:
    """DPO / EXO / hinge on summed completion log-probs, IPO on per-token mean log-probs (as TRL and
    the IPO paper), ``pref.dpo_loss_type``; summed over pairs / ``num_pairs``. ``ref_*`` are the
    reference's SUMMED log-probs of the same completions (divided by the same counts for IPO).
    With ``pref.rpo_alpha`` > 0 the loss adds ``rpo_alpha * NLL(chosen)``, the NLL summed over the chosen
    rows' labelled tokens / ``num_tokens`` (the RPO anchor; TRL adds the same term as ``rpo_alpha``)."""
    sums, counts = forward_logps(model, batch)
    n = batch.n_pairs
    pc, pr, rc, rr = sums[:n], sums[n:], ref_chosen, ref_rejected
    if pref.dpo_loss_type == "ipo":
        cc, rcn = counts[:n].clamp(min=1), counts[n:].clamp(min=1)
        pc, pr, rc, rr = pc / cc, pr / rcn, rc / cc, rr / rcn
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, pref.dpo_beta, pref.dpo_loss_type, pref.label_smoothing)
    loss = losses.sum() / _norm(num_pairs, torch.tensor(n))
    nll = -sums[:n].sum() / _norm(num_tokens, counts[:n].sum())
    if pref.rpo_alpha > 0:
        loss = loss + pref.rpo_alpha * nll
    return loss, _reward_metrics(loss, nll, cr, rr_)
