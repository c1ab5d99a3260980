"""Tests for preflexor_core.losses and preflexor_core.losses.masks.

The reference formulas are written out independently here in float64 with plain ``math``
(TRL's ORPO / DPO math; TRL itself is not a dependency).

Run: python -m pytest -q tests/test_losses.py
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from preflexor_core import Llama, ModelConfig
from preflexor_core.losses import (IGNORE_INDEX, ORPO_MAX_LOGP, UnclosedThinking, dpo_loss, log1mexp,
                                   logps_from_hidden, orpo_loss, sequence_logps, thinking_mask, thinking_mask_batch)

S, E = 5, 6          # thinking start / end token ids in the hand-made sequences
I = IGNORE_INDEX


# ----------------------------------------------------------------------------- reference math
def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return math.exp(_logsig(x))


def ref_orpo(c: float, r: float, beta: float):
    c, r = min(c, ORPO_MAX_LOGP), min(r, ORPO_MAX_LOGP)
    log_odds = (c - r) - (math.log(-math.expm1(c)) - math.log(-math.expm1(r)))
    return -beta * _logsig(log_odds), log_odds


def ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    h = (pc - pr) - (rc - rr)
    z = beta * h
    if loss_type == "sigmoid":
        return -_logsig(z) * (1 - ls) - _logsig(-z) * ls
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return _sig(z) * (_logsig(z) - math.log(1 - ls)) + _sig(-z) * (_logsig(-z) - math.log(ls))


def tiny_model(seed: int = 0, vocab: int = 48) -> Llama:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Llama(cfg)


# ----------------------------------------------------------------------------- log1mexp / ORPO
def test_log1mexp_matches_float64_over_range():
    x = -torch.logspace(-30, 2.5, 400, dtype=torch.float64)
    got = log1mexp(x.float()).double()
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


ORPO_CASES = [(-1e-8, -50.0), (-50.0, -1e-8), (-1e-8, -1e-8), (0.0, -3.0), (-3.0, 0.0), (-0.7, -0.69),
              (-1.2, -2.5), (-80.0, -0.01), (-1e-3, -100.0)]


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_matches_formula_and_is_finite(beta):
    g = torch.Generator().manual_seed(1)
    rand = (-torch.rand(32, generator=g, dtype=torch.float64) * 5).tolist()
    cases = ORPO_CASES + list(zip(rand[:16], rand[16:]))
    c = torch.tensor([a for a, _ in cases], requires_grad=True)
    r = torch.tensor([b for _, b in cases], requires_grad=True)
    losses, cr, rr, log_odds = orpo_loss(c, r, beta)
    assert losses.dtype == torch.float32 and losses.shape == (len(cases),)
    want = [ref_orpo(a, b, beta) for a, b in cases]
    torch.testing.assert_close(losses.double(), torch.tensor([w[0] for w in want], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_odds.double(), torch.tensor([w[1] for w in want], dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cr, beta * c.detach())
    torch.testing.assert_close(rr, beta * r.detach())
    assert not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    # the penalty pushes chosen up and rejected down wherever it is not clamped
    assert (c.grad[c.detach() < -1e-6] <= 0).all() and (r.grad[r.detach() < -1e-6] >= 0).all()


def test_orpo_gradient_matches_float64_autograd():
    c = torch.tensor([-0.5, -2.0, -1e-4, -30.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-0.9, -1.0, -5.0, -1e-3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, 0.25)[0], (c, r))


def test_orpo_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        orpo_loss(torch.zeros(3) - 1, torch.zeros(2) - 1, 0.1)


# ----------------------------------------------------------------------------- DPO family
@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0),
                                          ("exo_pair", 5e-3), ("exo_pair", 0.3)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_match_formulas(loss_type, ls, beta):
    g = torch.Generator().manual_seed(2)
    x = (-torch.rand(4, 20, generator=g, dtype=torch.float64) * 200)
    x[:, 0] = torch.tensor([-1.0, -900.0, -900.0, -1.0], dtype=torch.float64)    # logits = +1798
    x[:, 1] = torch.tensor([-900.0, -1.0, -1.0, -900.0], dtype=torch.float64)    # logits = -1798
    x[:, 2] = -1e-8
    pc, pr, rc, rr = (t.float().clone().requires_grad_(True) for t in x)
    losses, crw, rrw = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=ls)
    want = torch.tensor([ref_dpo(*col, beta, loss_type, ls) for col in x.t().tolist()], dtype=torch.float64)
    assert losses.dtype == torch.float32
    # fp32 inputs of magnitude ~1e3: absolute error of the log-ratio is ~1e-4
    torch.testing.assert_close(losses.double(), want, rtol=1e-4, atol=2e-3 if loss_type == "ipo" else 1e-4)
    torch.testing.assert_close(crw, beta * (pc - rc).detach())
    torch.testing.assert_close(rrw, beta * (pr - rr).detach())
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert rc.grad is None or (rc.grad == 0).all()                               # reference is a constant


def test_dpo_rejects_bad_arguments():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, 0.5, loss_type="exo_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, 0.5, loss_type="exo_pair", label_smoothing=1.0)
    with pytest.raises(ValueError, match="sigmoid, exo_pair, ipo, hinge"):
        dpo_loss(z, z, z, z, 0.5, loss_type="kto")
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(z, torch.zeros(3), z, z, 0.5)


def test_exo_pair_minimum_is_at_smoothed_target():
    # KL(p || target) is 0 exactly where sigmoid(z) = 1 - eps
    eps = 0.05
    z = torch.tensor([math.log((1 - eps) / eps)], dtype=torch.float64)
    loss = dpo_loss(z, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64), 1.0, "exo_pair", eps)[0]
    assert abs(loss.item()) < 1e-12


# ----------------------------------------------------------------------------- thinking masks
def test_answer_only_several_spans_masks_through_last_end():
    ids = [1, 2, S, 10, 11, E, 20, S, 12, E, 21, 22, 2]
    lab = [I, I, S, 10, 11, E, 20, S, 12, E, 21, 22, 2]
    out = thinking_mask(ids, lab, S, E, "answer_only")
    assert out.tolist() == [I] * 10 + [21, 22, 2]
    out = thinking_mask(torch.tensor(ids), torch.tensor(lab), S, E, "answer_only",
                        include_thinking_token_in_labels=True)
    assert out.tolist() == [I] * 9 + [E, 21, 22, 2]



def test_answer_only_after_the_first_end_scores_a_second_close_as_answer():
    # thinking, close, answer, a second close, more answer: "first" keeps the malformed tail in the loss
    ids = [1, 2, S, 10, 11, E, 20, 21, E, 22, 2]
    lab = [I, I, S, 10, 11, E, 20, 21, E, 22, 2]
    assert thinking_mask(ids, lab, S, E, "answer_only", answer_after="first").tolist() == [I] * 6 + [20, 21, E, 22, 2]
    assert thinking_mask(ids, lab, S, E, "answer_only", answer_after="last").tolist() == [I] * 9 + [22, 2]
    assert thinking_mask(ids, lab, S, E, "answer_only", answer_after="first",
                         include_thinking_token_in_labels=True).tolist() == [I] * 5 + [E, 20, 21, E, 22, 2]
    single = [1, 2, S, 10, E, 20, 2]                              # one block: both give the same labels
    assert (thinking_mask(single, single, S, E, "answer_only", answer_after="first").tolist()
            == thinking_mask(single, single, S, E, "answer_only", answer_after="last").tolist())
    with pytest.raises(ValueError, match="answer_after"):
        thinking_mask(ids, lab, S, E, "answer_only", answer_after="middle")

def test_answer_only_without_thinking_is_unchanged_and_input_not_modified():
    lab = torch.tensor([I, I, 30, 31, 2])
    out = thinking_mask([1, 2, 30, 31, 2], lab, S, E, "answer_only")
    assert out.tolist() == lab.tolist() and out is not lab
    lab2 = torch.tensor([I, S, 10, E, 20])
    thinking_mask([1, S, 10, E, 20], lab2, S, E)
    assert lab2.tolist() == [I, S, 10, E, 20]


def test_prompt_tokens_are_not_searched_and_prompt_opened_span():
    # a start/end pair inside the prompt is ignored; completion holds no thinking -> unchanged
    ids, lab = [S, 9, E, 30, 31], [I, I, I, 30, 31]
    assert thinking_mask(ids, lab, S, E).tolist() == lab
    # the prompt opens thinking, the completion closes it
    ids, lab = [1, S, 10, 11, E, 20, 2], [I, I, 10, 11, E, 20, 2]
    assert thinking_mask(ids, lab, S, E).tolist() == [I] * 5 + [20, 2]
    g = torch.Generator().manual_seed(0)
    out = thinking_mask(ids, lab, S, E, "random_fraction", fraction=1.0, generator=g)
    assert out.tolist() == [I, I, I, I, E, 20, 2]


def test_end_at_last_position():
    ids = [1, S, 10, E]
    lab = [I, S, 10, E]
    assert thinking_mask(ids, lab, S, E).tolist() == [I] * 4
    assert thinking_mask(ids, lab, S, E, include_thinking_token_in_labels=True).tolist() == [I, I, I, E]


def test_unclosed_thinking_drop_and_keep():
    ids = [1, S, 10, E, 20, S, 11, 12]          # second span truncated
    lab = [I, S, 10, E, 20, S, 11, 12]
    with pytest.raises(UnclosedThinking) as err:
        thinking_mask(ids, lab, S, E)
    assert err.value.start_pos == 5
    with pytest.raises(UnclosedThinking):
        thinking_mask(ids, lab, S, E, "random_fraction")
    assert thinking_mask(ids, lab, S, E, on_unclosed="keep").tolist() == lab
    assert thinking_mask(ids, lab, S, E, "none").tolist() == lab        # none never inspects spans


def test_random_fraction_exact_count_only_inside_spans_and_deterministic():
    span1, span2 = list(range(10, 30)), list(range(30, 37))              # 20 and 7 inner tokens
    ids = [1, 2, S] + span1 + [E, 40, 41, S] + span2 + [E, 42, 2]
    lab = [I, I] + ids[2:]
    frac = 0.3
    g = torch.Generator().manual_seed(123)
    out = thinking_mask(ids, lab, S, E, "random_fraction", fraction=frac, generator=g)
    masked = {i for i, v in enumerate(out.tolist()) if v == I} - {0, 1}
    inner1 = set(range(3, 23))
    inner2 = set(range(27, 34))
    assert masked <= inner1 | inner2
    assert len(masked & inner1) == 6 and len(masked & inner2) == 2      # round(0.3*20), round(0.3*7)=2.1->2
    out2 = thinking_mask(ids, lab, S, E, "random_fraction", fraction=frac, generator=torch.Generator().manual_seed(123))
    assert out2.tolist() == out.tolist()
    out3 = thinking_mask(ids, lab, S, E, "random_fraction", fraction=frac, generator=torch.Generator().manual_seed(7))
    assert out3.tolist() != out.tolist()
    full = thinking_mask(ids, lab, S, E, "random_fraction", fraction=1.0)
    assert {i for i, v in enumerate(full.tolist()) if v == I} - {0, 1} == inner1 | inner2
    assert thinking_mask(ids, lab, S, E, "random_fraction", fraction=0.0).tolist() == lab


def test_mask_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        thinking_mask([1], [1], S, E, "thinking_only")
    with pytest.raises(ValueError, match="fraction"):
        thinking_mask([1], [1], S, E, "random_fraction", fraction=1.5)
    with pytest.raises(ValueError, match="same length"):
        thinking_mask([1, 2], [1], S, E)


def test_thinking_mask_batch_keep_mask():
    pad = 0
    ids = torch.tensor([[1, S, 10, E, 20, 2, pad],         # fine
                        [1, S, 10, 11, 12, 13, 14],        # truncated inside thinking -> drop
                        [1, S, 10, 11, E, pad, pad],       # nothing left after masking -> drop
                        [1, 30, 31, 2, pad, pad, pad]])    # no thinking -> unchanged
    lab = ids.clone()
    lab[:, 0] = I
    lab[0, 6] = lab[2, 5:] = lab[3, 4:] = I
    new, keep = thinking_mask_batch(ids, lab, S, E, "answer_only")
    assert keep.tolist() == [True, False, False, True]
    assert new[0].tolist() == [I, I, I, I, 20, 2, I]
    assert (new[1] == I).all()
    assert new[3].tolist() == lab[3].tolist()
    new, keep = thinking_mask_batch(ids, lab, S, E, "answer_only", on_unclosed="keep")
    assert keep.tolist() == [True, True, False, True] and new[1].tolist() == lab[1].tolist()


# ----------------------------------------------------------------------------- sequence log-probs
def _right_padded_batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    lengths, prompt = [9, 6, 12], [3, 2, 4]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    am = torch.zeros(3, T, dtype=torch.long)
    lab = torch.full((3, T), I)
    for b, (n, p) in enumerate(zip(lengths, prompt)):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=g)
        am[b, :n] = 1
        lab[b, p:n] = ids[b, p:n]
    return ids, am, lab


def test_sequence_logps_matches_naive_full_logits():
    model = tiny_model()
    ids, am, lab = _right_padded_batch(model.config.vocab_size)
    lp, counts = sequence_logps(model, ids, lab, am)
    lp_mean, _ = sequence_logps(model, ids, lab, am, average=True)
    with torch.no_grad():
        logits = model(ids, attention_mask=am).double()                 # (B, T, V)
    logp = torch.log_softmax(logits, -1)
    want, want_n = [], []
    for b in range(ids.shape[0]):
        s, n = 0.0, 0
        for t in range(1, ids.shape[1]):
            if lab[b, t] != I:
                s += logp[b, t - 1, lab[b, t]].item()
                n += 1
        want.append(s)
        want_n.append(n)
    assert counts.tolist() == want_n == [6, 4, 8]
    torch.testing.assert_close(lp.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lp_mean.double(), torch.tensor(want, dtype=torch.float64) / torch.tensor(want_n),
                               rtol=1e-5, atol=1e-5)
    # padding positions are never scored even when a caller leaves their labels in
    lab_bad = lab.clone()
    lab_bad[am == 0] = 1
    torch.testing.assert_close(sequence_logps(model, ids, lab_bad, am)[0], lp)


def test_logps_from_hidden_shift_and_shapes():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    lab = torch.tensor([[3, I, 4, 5, I], [I, I, I, I, I]])
    out = logps_from_hidden(hidden, w, lab)
    assert out.shape == (2, 4)
    full = torch.log_softmax(hidden @ w.t(), -1)
    torch.testing.assert_close(out[0], torch.stack([torch.tensor(0.0), full[0, 1, 4], full[0, 2, 5],
                                                    torch.tensor(0.0)]))
    assert (out[1] == 0).all()
    with pytest.raises(ValueError, match="same"):
        logps_from_hidden(hidden, w, lab[:, :4])


# ----------------------------------------------------------------------------- training steps
def _pairs(vocab: int, n: int = 6, seed: int = 5):
    """n preference pairs, chosen and rejected stacked as [chosen..., rejected...] (right padded)."""
    g = torch.Generator().manual_seed(seed)
    T, P = 12, 4
    ids = torch.randint(1, vocab, (2 * n, T), generator=g)
    ids[n:, :P] = ids[:n, :P]                                           # same prompt
    am = torch.ones_like(ids)
    am[::3, -2:] = 0
    ids[am == 0] = 0
    lab = ids.clone()
    lab[:, :P] = I
    lab[am == 0] = I
    return ids, am, lab


def test_orpo_step_lowers_loss():
    model = tiny_model(1)
    ids, am, lab = _pairs(model.config.vocab_size)
    n = ids.shape[0] // 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def total_loss():
        lp, cnt = sequence_logps(model, ids, lab, am, average=True)
        losses, *_ = orpo_loss(lp[:n], lp[n:], beta=0.1)
        nll = -(lp[:n] * cnt[:n]).sum() / cnt[:n].sum()                 # token-mean NLL of chosen
        return nll + losses.mean()

    before = total_loss()
    opt.zero_grad()
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    with torch.no_grad():
        after = total_loss()
    assert after.item() < before.item()


def test_dpo_steps_lower_loss_and_reach_reward_accuracy():
    policy = tiny_model(2)
    ref = copy.deepcopy(policy).requires_grad_(False)
    ids, am, lab = _pairs(policy.config.vocab_size, n=6, seed=6)
    n = ids.shape[0] // 2
    with torch.no_grad():
        ref_lp, _ = sequence_logps(ref, ids, lab, am)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    history, acc = [], 0.0
    for _ in range(30):
        lp, _ = sequence_logps(policy, ids, lab, am)
        losses, cr, rr = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], beta=0.5, loss_type="exo_pair",
                                  label_smoothing=5e-3)
        loss = losses.mean()
        history.append(loss.item())
        acc = (cr > rr).float().mean().item()
        if acc > 0.9 and len(history) > 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[1] < history[0]
    assert acc > 0.9, f"reward accuracy {acc} after {len(history)} steps"


def test_logps_from_hidden_fallback_when_kernel_missing(monkeypatch):
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 6, 8, generator=g)
    w = torch.randn(13, 8, generator=g)
    lab = torch.randint(0, 13, (2, 6), generator=g)
    lab[0, :2] = I
    with_kernel = logps_from_hidden(hidden, w, lab)
    monkeypatch.setitem(__import__("sys").modules, "preflexor_core.kernels", None)   # import now fails
    torch.testing.assert_close(logps_from_hidden(hidden, w, lab), with_kernel, rtol=1e-5, atol=1e-5)


def _two_pairs_tiny():
    """A 1-layer tiny policy and reference and two pairs of unequal lengths (mean != sum / constant):
    (policy, ref, examples, padded batch)."""
    from preflexor_core import Llama, ModelConfig
    from preflexor_core.train.batches import PairExample, collate_pairs
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, num_hidden_layers=1)
    policy, ref = Llama(cfg).eval(), Llama(cfg).eval()
    ex = []
    for n_c, n_r in ((5, 9), (7, 3)):
        p = torch.randint(0, 64, (4,)).tolist()
        c, r = torch.randint(0, 64, (n_c,)).tolist(), torch.randint(0, 64, (n_r,)).tolist()
        ex.append(PairExample(p + c, [-100] * 4 + c, p + r, [-100] * 4 + r))
    return policy, ref, ex, collate_pairs(ex, pad_id=0)


def _label_logps(model, ids, labels) -> torch.Tensor:
    """The log-probs of one row's labelled tokens from a full log_softmax (float64), independent of
    forward_logps."""
    lp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].double(), -1)
    tgt = torch.tensor(labels[1:])
    keep = tgt != -100
    return lp[keep].gather(1, tgt[keep][:, None])[:, 0]


def test_ipo_objective_uses_per_token_mean_logps_like_trl():
    """dpo_objective(loss_type="ipo") vs an independent formula: TRL's IPO loss (logits - 1/(2 beta))^2
    with logits from length-normalised log-probs, computed here from full log_softmax logits."""
    from preflexor_core.losses.preference import forward_logps
    from preflexor_core.train import PreferenceConfig, dpo_objective
    policy, ref, ex, batch = _two_pairs_tiny()

    def mean_logps(model):
        rows = [(e.chosen_ids, e.chosen_labels) for e in ex] + [(e.rejected_ids, e.rejected_labels) for e in ex]
        return torch.stack([_label_logps(model, ids, lab).mean() for ids, lab in rows])

    beta = 0.3
    with torch.no_grad():
        pm, rm = mean_logps(policy), mean_logps(ref)
        logits = (pm[:2] - pm[2:]) - (rm[:2] - rm[2:])
        want = ((logits - 1 / (2 * beta)) ** 2).mean()
        ref_sums, _ = forward_logps(ref, batch)
        pref = PreferenceConfig(dpo_loss_type="ipo", dpo_beta=beta, label_smoothing=0.0)
        loss, m = dpo_objective(policy, batch, ref_sums[:2], ref_sums[2:], pref)
    assert float(loss) == pytest.approx(float(want), rel=1e-4)
    # on summed log-probs (the old behaviour) the value is clearly different
    with torch.no_grad():
        sums, _ = forward_logps(policy, batch)
    h = (sums[:2] - sums[2:]) - (ref_sums[:2] - ref_sums[2:])
    assert abs(float(((h - 1 / (2 * beta)) ** 2).mean()) - float(want)) > 1e-2


@pytest.mark.parametrize("loss_type", ["exo_pair", "sigmoid"])
def test_rpo_anchor_adds_alpha_times_chosen_nll_to_value_and_gradients(loss_type):
    """rpo_alpha: loss(alpha) = loss(0) + alpha * NLL(chosen labelled tokens), with the NLL computed here
    independently from full log_softmax logits; the gradients are those of that sum (TRL's rpo_alpha)."""
    from preflexor_core.losses.preference import forward_logps
    from preflexor_core.train import PreferenceConfig, dpo_objective
    policy, ref, ex, batch = _two_pairs_tiny()
    with torch.no_grad():
        ref_sums, _ = forward_logps(ref, batch)
        chosen = torch.cat([_label_logps(policy, e.chosen_ids, e.chosen_labels) for e in ex])
    nll = -float(chosen.mean())
    alpha = 0.7

    def run(a):
        policy.zero_grad()
        pref = PreferenceConfig(dpo_loss_type=loss_type, dpo_beta=0.5, rpo_alpha=a)
        loss, m = dpo_objective(policy, batch, ref_sums[:2], ref_sums[2:], pref)
        loss.backward()
        return loss.item(), m, [p.grad.clone() for p in policy.parameters()]

    base, m0, g0 = run(0.0)
    anchored, m1, g1 = run(alpha)
    assert m0["nll"] == pytest.approx(nll, rel=1e-4)
    assert anchored == pytest.approx(base + alpha * nll, rel=1e-5)
    assert abs(anchored - base) > 0.1                 # the anchor is not a no-op at this alpha
    policy.zero_grad()
    sums, counts = forward_logps(policy, batch)
    (-alpha * sums[:2].sum() / counts[:2].sum()).backward()
    g_nll = [p.grad.clone() for p in policy.parameters()]
    for a, b, c in zip(g1, g0, g_nll):
        torch.testing.assert_close(a, b + c, rtol=1e-4, atol=1e-6)
