"""GRPO building blocks: grpo_loss against a plain-loop reference of the formula (values, stats and
gradients; clipped and masked tokens; every loss type), group advantages and dynamic sampling on
fixed rewards."""
import math

import pytest
import torch

from preflexor_core.losses.grpo import ADVANTAGE_EPS, group_advantages, keep_groups_with_spread
from preflexor_core.losses import grpo_loss


# ----------------------------------------------------------------------------- reference
def reference_loss(logps, old, adv, mask, loss_type, eps_low, eps_high, beta=0.0, ref=None, max_len=None):
    """The loss written token by token with Python loops and scalar tensor ops."""
    B, T = logps.shape
    rows, total, n_tok = [], 0.0, 0
    for b in range(B):
        row, n = 0.0, 0
        for t in range(T):
            if mask[b][t] == 0:
                continue
            ratio = torch.exp(logps[b, t] - old[b][t])
            a = float(adv[b])
            unclipped = ratio * a
            lo, hi = 1.0 - eps_low, 1.0 + eps_high
            clipped = (torch.clamp(ratio, lo, hi)) * a
            term = -(unclipped if unclipped.item() <= clipped.item() else clipped)
            if beta:
                d = ref[b][t] - logps[b, t]
                term = term + beta * (torch.exp(d) - d - 1.0)
            row = row + term
            n += 1
        rows.append(row / max(n, 1))
        total = total + row
        n_tok += n
    if loss_type == "grpo":
        return sum(rows) / B
    if loss_type == "dr_grpo":
        return total / (B * (max_len or T))
    return total / max(n_tok, 1)


def make_case(seed=0, B=4, T=7, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = (old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 2 * spread).requires_grad_()
    ref = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)[:B]
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    mask[3, 0] = 0
    return logps, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_grpo_loss_matches_loop_reference_values_and_grads(loss_type, beta, eps):
    logps, old, adv, mask, ref = make_case()
    max_len = 9 if loss_type == "dr_grpo" else None
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1],
                        beta=beta, ref_logps=ref if beta else None, max_completion_length=max_len)
    (g,) = torch.autograd.grad(loss, logps)
    lp2 = logps.detach().clone().requires_grad_()
    want = reference_loss(lp2, old, adv, mask, loss_type, eps[0], eps[1], beta, ref, max_len)
    (g_ref,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want.reshape(()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.all(g[mask == 0] == 0)


def test_case_has_clipped_tokens_with_zero_gradient():
    """The test case above exercises clipping: some tokens are outside the region on the side
    where the clip binds, and their gradient is exactly zero (without KL)."""
    logps, old, adv, mask, _ = make_case()
    ratio = torch.exp(logps.detach() - old)
    a = adv.reshape(-1, 1)
    bound = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    bound &= mask > 0
    assert bound.sum() >= 3
    loss, stats = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    (g,) = torch.autograd.grad(loss, logps)
    assert torch.all(g[bound] == 0)
    assert torch.all(g[(~bound) & (mask > 0)] != 0)
    assert stats["clip_region"] == pytest.approx(float(bound.sum() / mask.sum()))


def test_stats_are_masked_token_means():
    logps, old, adv, mask, ref = make_case(seed=3, spread=0.6)
    ratio = torch.exp(logps.detach() - old)
    a = adv.reshape(-1, 1).expand_as(ratio)
    n = float(mask.sum())
    want = {"clip_low": 0.0, "clip_high": 0.0, "clip_region": 0.0, "ratio": 0.0, "kl": 0.0}
    for b in range(ratio.shape[0]):
        for t in range(ratio.shape[1]):
            if mask[b, t] == 0:
                continue
            r, av = float(ratio[b, t]), float(a[b, t])
            lo, hi = r < 0.8 and av < 0, r > 1.3 and av > 0
            want["clip_low"] += lo / n
            want["clip_high"] += hi / n
            want["clip_region"] += (lo or hi) / n
            want["ratio"] += r / n
            d = float(ref[b, t] - logps.detach()[b, t])
            want["kl"] += (math.exp(d) - d - 1) / n
    _, stats = grpo_loss(logps, old, adv, mask, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.3,
                         beta=0.05, ref_logps=ref)
    assert want["clip_low"] > 0 and want["clip_high"] > 0
    assert stats == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_on_policy_loss_is_minus_mean_advantage_and_grad_is_advantage_weighted():
    """old_logps=None: ratio = 1, the loss value is -A averaged by the reduction and the gradient
    of each unmasked token is -A / normaliser (the REINFORCE direction)."""
    logps, _, adv, mask, _ = make_case()
    loss, stats = grpo_loss(logps, None, adv, mask, loss_type="dapo")
    (g,) = torch.autograd.grad(loss, logps)
    n = mask.sum()
    torch.testing.assert_close(loss, -(adv.reshape(-1, 1) * mask).sum() / n)
    torch.testing.assert_close(g, -(adv.reshape(-1, 1) * mask) / n)
    assert stats["ratio"] == pytest.approx(1.0) and stats["clip_region"] == 0.0


def test_reductions_differ_as_documented():
    """grpo weights sequences equally, dapo weights tokens equally, dr_grpo divides by B * L."""
    logps = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    vals = {t: grpo_loss(logps, None, adv, mask, loss_type=t)[0].item() for t in ("grpo", "dr_grpo", "dapo")}
    assert vals["grpo"] == pytest.approx(-1.0)            # each row's mean is -1
    assert vals["dapo"] == pytest.approx(-1.0)            # 5 tokens of -1 over 5
    assert vals["dr_grpo"] == pytest.approx(-5 / 8)       # 5 tokens over B * T = 8
    lp2 = logps.detach().clone().requires_grad_()
    g_grpo, = torch.autograd.grad(grpo_loss(lp2, None, adv, mask, loss_type="grpo")[0], lp2)
    assert g_grpo[0, 0] == pytest.approx(-0.5) and g_grpo[1, 0] == pytest.approx(-0.125)
    assert grpo_loss(logps, None, adv, mask, loss_type="dr_grpo", max_completion_length=10)[0].item() \
        == pytest.approx(-5 / 20)


def test_padding_values_never_reach_the_loss():
    logps, old, adv, mask, ref = make_case()
    junk_old, junk_ref = old.clone(), ref.clone()
    junk_old[mask == 0] = -1e4
    junk_ref[mask == 0] = 1e4
    a, _ = grpo_loss(logps, old, adv, mask, beta=0.1, ref_logps=ref)
    b, stats = grpo_loss(logps, junk_old, adv, mask, beta=0.1, ref_logps=junk_ref)
    assert torch.isfinite(b) and a.item() == pytest.approx(b.item())
    assert all(math.isfinite(v) for v in stats.values())


def test_bool_mask_and_float32_inputs():
    logps, old, adv, mask, _ = make_case()
    l64, _ = grpo_loss(logps, old, adv, mask)
    l32, _ = grpo_loss(logps.detach().float(), old.float(), adv.float(), mask.bool())
    assert l32.dtype == torch.float32 and l32.item() == pytest.approx(l64.item(), rel=1e-5)


@pytest.mark.parametrize("kwargs, msg", [
    ({"loss_type": "ppo"}, "unknown loss_type"),
    ({"beta": 0.1}, "needs ref_logps"),
    ({"epsilon_low": -0.1}, "must be >= 0"),
    ({"loss_type": "dr_grpo", "max_completion_length": 0}, "max_completion_length"),
])
def test_grpo_loss_rejects_bad_arguments(kwargs, msg):
    logps, old, adv, mask, _ = make_case()
    with pytest.raises(ValueError, match=msg):
        grpo_loss(logps, old, adv, mask, **kwargs)


def test_grpo_loss_rejects_bad_shapes():
    logps, old, adv, mask, _ = make_case()
    with pytest.raises(ValueError, match="old_logps has shape"):
        grpo_loss(logps, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logps, old, adv[:2], mask)
    with pytest.raises(ValueError, match=r"per-token \(B, T\)"):
        grpo_loss(logps[0], old[0], adv, mask[0])


# ----------------------------------------------------------------------------- advantages
REWARDS = [0.0, 1.0, 0.5, 0.5,   0.2, 0.2, 0.2, 0.2,   1.0, 0.0, 0.0, 0.0]


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_group_advantages_group_scale():
    adv = group_advantages(REWARDS, group_size=4, scale="group")
    want = []
    for k in range(3):
        grp = REWARDS[4 * k: 4 * k + 4]
        m, s = sum(grp) / 4, _std(grp)
        want += [(r - m) / (s + ADVANTAGE_EPS) for r in grp]
    assert adv.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert adv[4:8].abs().max() == 0            # equal rewards: zero advantage, no NaN
    assert adv[:4].tolist() == pytest.approx([-1.2245, 1.2245, 0.0, 0.0], abs=1e-3)


def test_group_advantages_batch_and_none_scale():
    s = _std(REWARDS)
    centred = []
    for k in range(3):
        grp = REWARDS[4 * k: 4 * k + 4]
        centred += [r - sum(grp) / 4 for r in grp]
    assert group_advantages(REWARDS, 4, scale="none").tolist() == pytest.approx(centred, abs=1e-7)
    assert group_advantages(REWARDS, 4, scale="batch").tolist() == \
        pytest.approx([c / (s + ADVANTAGE_EPS) for c in centred], abs=1e-6)


def test_group_advantages_sum_to_zero_per_group_and_keep_dtype():
    r = torch.rand(6 * 5, dtype=torch.float64)
    adv = group_advantages(r, 5)
    assert adv.dtype == torch.float64
    assert adv.view(6, 5).sum(1).abs().max() < 1e-12


@pytest.mark.parametrize("args, msg", [
    (([0.1, 0.2, 0.3], 2), "do not split into groups"),
    (([0.1, 0.2], 1), "group_size >= 2"),
    (([0.1, float("nan")], 2), "NaN or inf"),
    (([0.1, 0.2], 0), "positive int"),
])
def test_group_advantages_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        group_advantages(*args)
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages([0.1, 0.2], 2, scale="rank")


def test_keep_groups_with_spread_drops_flat_groups():
    assert keep_groups_with_spread(REWARDS, 4) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert keep_groups_with_spread([0.3, 0.3, 0.3, 0.3], 2) == []
    assert keep_groups_with_spread(torch.tensor([0.0, 0.5, 1.0, 1.0]), 2) == [0, 1]
    # a threshold on the spread: the second group (spread 0.05) goes too
    assert keep_groups_with_spread([0.0, 1.0, 0.5, 0.55], 2, min_spread=0.1) == [0, 1]
    with pytest.raises(ValueError, match="do not split"):
        keep_groups_with_spread([0.0, 1.0, 0.5], 2)
