"""GRPO building blocks, pure functions: group advantages, dynamic sampling, the clipped loss.

``group_advantages`` (r - group mean) / (std + eps) with ``scale="group"|"batch"|"none"``;
``keep_groups_with_spread`` drops groups whose rewards are all equal (no learning signal);
``grpo_loss`` the clipped policy-gradient loss with the ``grpo`` / ``dr_grpo`` / ``dapo``
normalisations and an optional k3 KL to a reference (re-exported by ``losses``). The math
matches TRL's GRPOTrainer; the code is our own.

References: GRPO, Shao et al. 2024, DeepSeekMath (arXiv 2402.03300); Dr. GRPO, Liu et al. 2025
(arXiv 2503.20783); DAPO, Yu et al. 2025 (arXiv 2503.14476); k3 KL estimator, Schulman 2020.

Tests: ``python -m pytest -q tests/test_grpo.py``.
"""
from __future__ import annotations

import torch

__all__ = ["GRPO_LOSS_TYPES", "REWARD_SCALES", "ADVANTAGE_EPS", "group_advantages", "keep_groups_with_spread",
           "grpo_loss"]

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
REWARD_SCALES = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # added to the std (TRL's value): a group of near-equal rewards stays finite


def _rewards_tensor(rewards, group_size: int, where: str) -> torch.Tensor:
    r = rewards.detach() if isinstance(rewards, torch.Tensor) else torch.as_tensor(list(rewards))
    r = r.to(torch.float64 if r.dtype == torch.float64 else torch.float32).flatten()
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
    if r.numel() == 0 or r.numel() % group_size:
        raise ValueError(f"{where}: {r.numel()} rewards do not split into groups of {group_size}; "
                         "pass B * G rewards, the G samples of each prompt next to each other")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{where}: rewards contain NaN or inf at positions "
                         f"{torch.nonzero(~torch.isfinite(r)).flatten().tolist()[:8]}")
    return r


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """GRPO advantages of B * G rewards laid out group by group (the G samples of a prompt adjacent).

        A_i = (r_i - mean(group of i)) / (s + eps)

    ``scale="group"``: s = the unbiased std of i's group (DeepSeekMath); ``"batch"``: s = the
    unbiased std of all B * G rewards; ``"none"``: no division (A_i = r_i - group mean, Dr. GRPO).
    Returns a (B * G,) float tensor (float64 in, float64 out; else float32).
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; valid: {', '.join(REWARD_SCALES)}")
    r = _rewards_tensor(rewards, group_size, "group_advantages")
    if scale == "group" and group_size < 2:
        raise ValueError("group_advantages: scale='group' needs group_size >= 2 (a std of one sample is undefined)")
    if scale == "batch" and r.numel() < 2:
        raise ValueError("group_advantages: scale='batch' needs at least 2 rewards")
    g = r.view(-1, group_size)                                          # (B, G)
    adv = (g - g.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        adv = adv / (g.std(dim=1, keepdim=True).expand_as(g).flatten() + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    return adv


def keep_groups_with_spread(rewards, group_size: int, min_spread: float = 0.0) -> list[int]:
    """Dynamic sampling (DAPO): the indices of the samples whose group's reward spread
    ``max - min`` exceeds ``min_spread``, in order; a group of equal rewards has zero advantage
    everywhere and is dropped whole. Index rewards, completions and advantages with it."""
    r = _rewards_tensor(rewards, group_size, "keep_groups_with_spread")
    g = r.view(-1, group_size)
    spread = g.max(dim=1).values - g.min(dim=1).values
    keep = torch.nonzero(spread > min_spread).flatten().tolist()
    return [k * group_size + j for k in keep for j in range(group_size)]


def _check_shapes(logps, old_logps, advantages, mask, ref_logps) -> None:
    if logps.dim() != 2:
        raise ValueError(f"grpo_loss: logps must be per-token (B, T); got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
        if t is not None and tuple(t.shape) != tuple(logps.shape):
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)}, logps {tuple(logps.shape)}; "
                             "all per-token tensors must be (B, T)")
    if tuple(advantages.shape) not in ((logps.shape[0],), (logps.shape[0], 1)):
        raise ValueError(f"grpo_loss: advantages must be (B,) = ({logps.shape[0]},); got {tuple(advantages.shape)}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate on per-token log-probs (TRL's GRPOTrainer math).

    logps (B, T) current policy, old_logps (B, T) the policy that sampled (None: logps detached,
    i.e. one update per generation), advantages (B,), mask (B, T) 1 = completion token,
    ref_logps (B, T) the reference (needed when beta > 0). Per token, with A the row's advantage:

        ratio = exp(logps - old_logps)
        l     = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
              + beta * (exp(ref - logps) - (ref - logps) - 1)          (k3 KL, when beta > 0)

    Reduction over masked tokens (m = mask): ``grpo`` (DeepSeekMath): mean_b [sum_t l m / max(1, sum_t m)];
    ``dr_grpo`` (Dr. GRPO): sum l m / (B * max_completion_length), default T; ``dapo`` (DAPO,
    token level; give it epsilon_high > epsilon_low for the asymmetric clip): sum l m / max(1, sum m).

    Returns (loss, stats); stats (floats, masked token means): ``clip_low`` (ratio < 1 - eps_low and
    A < 0), ``clip_high`` (ratio > 1 + eps_high and A > 0), ``clip_region`` (either), ``ratio``, ``kl``.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; valid: {', '.join(GRPO_LOSS_TYPES)}")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"grpo_loss: epsilon_low={epsilon_low} and epsilon_high={epsilon_high} must be >= 0")
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"grpo_loss: beta={beta} > 0 needs ref_logps (the reference model's per-token log-probs)")
    _check_shapes(logps, old_logps, advantages, mask, ref_logps)
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    lp = logps.to(dtype)
    old = lp.detach() if old_logps is None else old_logps.detach().to(dtype)
    m = mask.to(dtype)
    a = advantages.detach().to(dtype).reshape(-1, 1)                  # (B, 1)
    on = m > 0                        # padded positions may hold any value: keep them out of exp()
    ratio = torch.exp(torch.where(on, lp - old, torch.zeros_like(lp)))   # (B, T)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.min(ratio * a, clipped * a)                    # (B, T)
    kl = None
    if beta > 0:
        d = torch.where(on, ref_logps.detach().to(dtype) - lp, torch.zeros_like(lp))
        kl = torch.exp(d) - d - 1.0                                   # k3 estimator of KL(pi || ref)
        per_token = per_token + beta * kl
    B, T = lp.shape
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        L = T if max_completion_length is None else int(max_completion_length)
        if L < 1:
            raise ValueError(f"grpo_loss: max_completion_length must be >= 1, got {max_completion_length}")
        loss = (per_token * m).sum() / (B * L)
    else:  # dapo
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        low = ((ratio < 1.0 - epsilon_low) & (a < 0)).to(dtype)
        high = ((ratio > 1.0 + epsilon_high) & (a > 0)).to(dtype)
        stats = {"clip_low": float((low * m).sum() / n), "clip_high": float((high * m).sum() / n),
                 "clip_region": float((torch.maximum(low, high) * m).sum() / n),
                 "ratio": float((ratio * m).sum() / n),
                 "kl": float((kl * m).sum() / n) if kl is not None else 0.0}
    return loss, stats
