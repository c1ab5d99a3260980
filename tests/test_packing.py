"""Packed preference batches on any device, and prefix sharing: each prompt encoded once for its two
answers. Both must give the padded layout's per-sequence log-prob sums and counts and the same
gradients (float rounding apart), for the ORPO and DPO/EXO objectives.

Run: ``python -m pytest -q tests/test_packing.py``.
"""
from __future__ import annotations

import random

import pytest
import torch

from preflexor_core import Llama, ModelConfig
from preflexor_core.kernels import IGNORE_INDEX
from preflexor_core.llm.attention import Packed, _attend, check_pieces
from preflexor_core.losses.preference import forward_logps
from preflexor_core.train.batches import PairExample, collate_pairs, shared_prompt_length
from preflexor_core.train.config import PreferenceConfig
from preflexor_core.train.objectives import dpo_objective, orpo_objective

LAYOUTS = {"padded": {}, "packed": {"packed": True}, "shared": {"packed": True, "share_prompt": True}}


def _model(seed: int = 0, family: str | None = None, **over) -> Llama:
    torch.manual_seed(seed)
    size = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **over)
    cfg = ModelConfig.for_family(family, **size) if family else ModelConfig(**size)
    return Llama(cfg).train()


def _pairs(n: int = 3, seed: int = 0, vocab: int = 97, common_answer_start: int = 0) -> list[PairExample]:
    """Pairs with a shared prompt (labels ignored) and answers of different lengths; optionally both
    answers begin with the same scored tokens (which must not be shared)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
        start = [rng.randrange(3, vocab) for _ in range(common_answer_start)]
        c = start + [rng.randrange(3, vocab) for _ in range(rng.randint(3, 15))]
        r = start + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        out.append(PairExample(p + c, [IGNORE_INDEX] * len(p) + c, p + r, [IGNORE_INDEX] * len(p) + r, index=i))
    return out


def _run(model, batch, objective: str):
    model.zero_grad(set_to_none=True)
    if objective == "orpo":
        loss, _ = orpo_objective(model, batch, beta=0.1)
    else:
        n = batch.n_pairs
        ref = (torch.linspace(-40, -20, n), torch.linspace(-30, -25, n))
        loss, _ = dpo_objective(model, batch, *ref, PreferenceConfig(dpo_loss_type="exo_pair", dpo_beta=0.5,
                                                                     label_smoothing=5e-3))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("common", [0, 2])
@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_sums_and_counts_match_the_padded_layout(layout, common):
    model = _model().eval()
    ex = _pairs(common_answer_start=common)
    with torch.no_grad():
        s0, c0 = forward_logps(model, collate_pairs(ex, 0))
        s1, c1 = forward_logps(model, collate_pairs(ex, 0, **LAYOUTS[layout]))
    assert torch.equal(c0, c1)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-4)        # fp32 sums of ~15 log-probs each


@pytest.mark.parametrize("objective", ["orpo", "exo"])
@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_loss_and_every_gradient_match_the_padded_layout(layout, objective):
    model = _model(seed=1)
    ex = _pairs(n=4, seed=2)
    l0, g0 = _run(model, collate_pairs(ex, 0), objective)
    l1, g1 = _run(model, collate_pairs(ex, 0, **LAYOUTS[layout]), objective)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:    # reassociated fp32 sums: relative 1e-4 of each tensor's scale
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-4 * float(g0[k].abs().max()) + 1e-8, msg=k)


def test_shared_rows_hold_each_prompt_once():
    ex = _pairs(n=3)
    padded, shared = collate_pairs(ex, 0), collate_pairs(ex, 0, packed=True, share_prompt=True)
    prompts = [shared_prompt_length(e) for e in ex]
    assert shared.input_ids.shape[1] == sum(len(e.chosen_ids) + len(e.rejected_ids) for e in ex) - sum(
        p - 1 for p in prompts)
    assert shared.input_ids.shape[1] < int(padded.attention_mask.sum()) < padded.input_ids.numel()


def test_the_shared_prefix_stops_at_the_first_scored_token():
    p, a = [5, 6, 7], [8, 9]
    e = PairExample(p + a + [10], [IGNORE_INDEX] * 3 + a + [10], p + a + [11], [IGNORE_INDEX] * 3 + a + [11], index=0)
    assert shared_prompt_length(e) == 3          # the prompt only: the common answer tokens are scored
    none = PairExample([1, 2], [IGNORE_INDEX, 2], [3, 2], [IGNORE_INDEX, 2], index=0)
    assert shared_prompt_length(none) == 0       # nothing in common: the rejected side keeps everything
    model = _model().eval()
    with torch.no_grad():
        s0, _ = forward_logps(model, collate_pairs([e, none], 0))
        s1, _ = forward_logps(model, collate_pairs([e, none], 0, packed=True, share_prompt=True))
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-4)


def test_pieces_are_checked():
    with pytest.raises(ValueError, match="cover the row in order"):
        check_pieces([(0, 3, ((0, 3),)), (4, 6, ((4, 6),))], 6)
    with pytest.raises(ValueError, match="cover 3 of the row's 6"):
        check_pieces([(0, 3, ((0, 3),))], 6)
    with pytest.raises(ValueError, match="ending with its own queries"):
        check_pieces([(0, 3, ((0, 3),)), (3, 6, ((3, 6), (0, 2)))], 6)


def test_a_shared_row_needs_a_model_without_sliding_windows():
    model = _model(family="mistral", sliding_window=4).eval()
    b = collate_pairs(_pairs(n=2), 0, packed=True, share_prompt=True)
    with pytest.raises(ValueError, match="without sliding-window layers"):
        forward_logps(model, b)
    forward_logps(model, collate_pairs(_pairs(n=2), 0, packed=True))       # plain packing: windows apply


@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2)])
def test_triton_pieces_match_sdpa_pieces(Hq, Hkv, monkeypatch):
    """The end-aligned pieces through the Triton kernels (interpreter) equal the SDPA ones, forward and
    backward, including a piece whose keys are a shared prefix plus its own tokens."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    T, D = 13, 16
    q = torch.randn(1, Hq, T, D, requires_grad=True)
    k = torch.randn(1, Hkv, T, D, requires_grad=True)
    v = torch.randn(1, Hkv, T, D, requires_grad=True)
    pieces = check_pieces([(0, 7, ((0, 7),)), (7, 13, ((0, 4), (7, 13)))], T)
    mask = Packed(torch.tensor([0, 7, 13], dtype=torch.int32), 7, pieces)
    outs, grads = [], []
    for mode in ("reference", "triton"):
        monkeypatch.setenv("PREFLEXOR_KERNELS", mode)
        o = _attend(q, k, v, mask, causal=True)
        g = torch.autograd.grad(o.square().sum(), (q, k, v))
        outs.append(o.detach())
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_grpo_rows_of_one_prompt_share_it_and_come_back_in_place():
    """GRPO's per-token log-probs from rows packed with their prompt shared equal the padded rows'."""
    from preflexor_core.losses.preference import logps_from_hidden
    from preflexor_core.train.batches import pack_sharing
    model = _model(seed=3)
    rng = random.Random(4)
    rows, prompt_of = [], []
    for p_i in range(2):
        p = [rng.randrange(3, 97) for _ in range(rng.randint(5, 9))]
        for _ in range(3):                           # G = 3 samples of this prompt
            c = [rng.randrange(3, 97) for _ in range(rng.randint(2, 8))]
            rows.append((p + c, [IGNORE_INDEX] * len(p) + c))
            prompt_of.append(p_i)
    T = max(len(x) for x, _ in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE_INDEX)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    for j, (x, lx) in enumerate(rows):
        ids[j, :len(x)], lab[j, :len(x)], att[j, :len(x)] = torch.tensor(x), torch.tensor(lx), 1
    want = logps_from_hidden(model(ids, attention_mask=att, return_hidden=True), model.output_weight, lab)
    first = {}
    leader = [first.setdefault(p, j) for j, p in enumerate(prompt_of)]
    b = pack_sharing(rows, [None if lead == j else lead for j, lead in enumerate(leader)])
    assert b.input_ids.shape[1] < int(att.sum())
    tok = logps_from_hidden(model(b.input_ids, position_ids=b.position_ids, return_hidden=True,
                                  cu_seqlens=b.cu_seqlens, pieces=b.pieces), model.output_weight, b.labels)[0]
    row, col = b.origin[1:, 0], b.origin[1:, 1] - 1
    keep = col >= 0
    got = tok.new_zeros(want.shape).index_put((row[keep], col[keep]), tok[keep])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(got.sum(), model.output_weight)[0]
    g0 = torch.autograd.grad(logps_from_hidden(model(ids, attention_mask=att, return_hidden=True),
                                               model.output_weight, lab).sum(), model.output_weight)[0]
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
