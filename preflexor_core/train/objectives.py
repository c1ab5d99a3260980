"""Training objectives of the three stages, on a padded or packed ``data.Batch``.

``lm_objective`` (stage 0: mean token NLL), ``orpo_objective`` (stage 1: NLL(chosen) + ORPO odds-ratio
penalty, Hong et al. 2024, arXiv 2403.07691) and ``dpo_objective`` (stage 2: DPO-family loss against
precomputed reference log-probs). Each returns ``(loss, metrics)``; metrics use TRL's log names
(``rewards/chosen``, ``rewards/margins``, ...). Batches hold chosen rows first, then rejected.

Tests: ``python -m pytest -q tests/test_trainer.py tests/test_losses.py``
"""
from __future__ import annotations

import torch

from ..data import Batch
from ..losses import dpo_loss, forward_logps, orpo_loss
from .config import PreferenceConfig

__all__ = ["lm_objective", "orpo_objective", "dpo_objective"]


def _reward_metrics(loss, nll, cr, rr) -> dict:
    return {"loss": loss.item(), "nll": nll.item(), "rewards/chosen": cr.mean().item(),
            "rewards/rejected": rr.mean().item(), "rewards/margins": (cr - rr).mean().item(),
            "rewards/accuracies": (cr > rr).float().mean().item()}


def lm_objective(model, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Mean token negative log-likelihood of the labelled tokens."""
    sums, counts = forward_logps(model, batch)
    loss = -sums.sum() / counts.sum().clamp(min=1)
    return loss, {"loss": loss.item(), "nll": loss.item()}


def orpo_objective(model, batch: Batch, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO: NLL(chosen) + mean(-beta * log sigmoid(log odds ratio)) on mean completion log-probs."""
    sums, counts = forward_logps(model, batch)
    n = batch.n_pairs
    cs, rs, cc, rc = sums[:n], sums[n:], counts[:n], counts[n:]
    nll = -cs.sum() / cc.sum().clamp(min=1)
    losses, cr, rr, log_odds = orpo_loss(cs / cc.clamp(min=1), rs / rc.clamp(min=1), beta)
    loss = nll + losses.mean()
    return loss, {**_reward_metrics(loss, nll, cr, rr), "log_odds": log_odds.mean().item()}


def dpo_objective(model, batch: Batch, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                  pref: PreferenceConfig) -> tuple[torch.Tensor, dict]:
    """DPO / EXO / IPO / hinge (``pref.dpo_loss_type``) on summed completion log-probs."""
    sums, counts = forward_logps(model, batch)
    n = batch.n_pairs
    losses, cr, rr = dpo_loss(sums[:n], sums[n:], ref_chosen, ref_rejected, pref.dpo_beta, pref.dpo_loss_type,
                              pref.label_smoothing)
    loss = losses.mean()
    nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
    return loss, _reward_metrics(loss, nll, cr, rr)
