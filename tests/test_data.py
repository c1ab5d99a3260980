"""Preference-pair tokenisation, truncation, thinking masks in context, padded vs packed batches."""
import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.train.batches import PairFormat, collate_pairs, pack_lm_stream, tokenize_pair
from preflexor_core.losses.preference import IGNORE_INDEX, forward_logps
from preflexor_core.thinking.tokens import EOT

TEXTS = ["Nacre tablets slide and dissipate energy.", "Silk crystals resist shear because they are small.",
         "Bone is hierarchical: fibrils, fibres and osteons."] * 30


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=400)


ROW = {"prompt": "Why is nacre tough? Use <|thinking|>.",
       "chosen": "<|thinking|>\n**Reasoning Steps**:\n\nTablets slide.\n\n<|/thinking|>\nNacre tablets slide.",
       "rejected": "Silk crystals resist shear."}


def test_prompt_masked_and_eot_kept(tok):
    ex, why = tokenize_pair(tok, ROW, PairFormat(max_length=256, max_prompt_length=64))
    assert why is None
    eot = tok.token_to_id(EOT)
    for ids, labels in ((ex.chosen_ids, ex.chosen_labels), (ex.rejected_ids, ex.rejected_labels)):
        assert ids[-1] == eot and labels[-1] == eot                      # end of turn stays in the loss
        n_prompt = labels.index(next(l for l in labels if l != IGNORE_INDEX))
        prompt = tok.apply_chat_template([{"role": "user", "content": ROW["prompt"]}], add_generation_prompt=True,
                                         tokenize=True)
        assert n_prompt == len(prompt) and ids[:n_prompt] == prompt


def test_answer_only_masks_thinking(tok):
    ex, _ = tokenize_pair(tok, ROW, PairFormat(max_length=256, max_prompt_length=64, mask_mode="answer_only"))
    end = tok.token_to_id("<|/thinking|>")
    pos = ex.chosen_ids.index(end)
    assert all(l == IGNORE_INDEX for l in ex.chosen_labels[:pos + 1])
    assert ex.chosen_labels[pos + 1:] == ex.chosen_ids[pos + 1:]
    # rejected has no thinking: all completion tokens scored
    assert sum(l != IGNORE_INDEX for l in ex.rejected_labels) == len(tok.encode(ROW["rejected"])) + 1



def test_answer_only_pairs_score_everything_after_the_first_close(tok):
    """Stage 2's default: a rejected sample that closes its thinking twice has its second close scored."""
    row = dict(ROW, rejected="<|thinking|>\nsome thought\n<|/thinking|>\nAn answer.\n<|/thinking|>\nMore.")
    end = tok.token_to_id("<|/thinking|>")
    for after, scored_ends in (("first", 1), ("last", 0)):
        ex, _ = tokenize_pair(tok, row, PairFormat(max_length=256, max_prompt_length=64, mask_mode="answer_only",
                                                   answer_after=after))
        assert sum(l == end for l in ex.rejected_labels) == scored_ends, after
    assert PairFormat().answer_after == "first"

def test_unclosed_thinking_dropped_or_kept(tok):
    row = dict(ROW, rejected="<|thinking|>\nI never close my thinking")
    ex, why = tokenize_pair(tok, row, PairFormat(mask_mode="answer_only", max_length=256, max_prompt_length=64))
    assert ex is None and why == "unclosed_thinking_rejected"
    ex, why = tokenize_pair(tok, row, PairFormat(mask_mode="answer_only", on_unclosed="keep", max_length=256,
                                                 max_prompt_length=64))
    assert why is None and all(l != IGNORE_INDEX for l in ex.rejected_labels[-5:])


def test_truncation_left_prompt_and_completion_modes(tok):
    long_row = dict(ROW, prompt="nacre " * 200, chosen="silk " * 300)
    fmt = PairFormat(max_length=96, max_prompt_length=32)
    ex, _ = tokenize_pair(tok, long_row, fmt)
    assert len(ex.chosen_ids) == 96 and ex.chosen_ids[0] == tok.bos_token_id
    prompt_len = sum(1 for l in ex.chosen_labels if l == IGNORE_INDEX)
    assert prompt_len == 32
    full_prompt = tok.apply_chat_template([{"role": "user", "content": long_row["prompt"]}],
                                          add_generation_prompt=True, tokenize=True)
    assert ex.chosen_ids[1:32] == full_prompt[-31:]                     # left truncation keeps the end
    ex_end, _ = tokenize_pair(tok, long_row, PairFormat(max_length=96, max_prompt_length=32, truncation_mode="keep_end"))
    assert ex_end.chosen_ids[-1] == tok.token_to_id(EOT)
    assert ex.chosen_ids[-1] != tok.token_to_id(EOT)


def test_bad_row_is_specific(tok):
    with pytest.raises(ValueError, match="row 7: field 'rejected'"):
        tokenize_pair(tok, {"prompt": "a", "chosen": "b"}, PairFormat(), index=7)


def test_packed_equals_padded(tok):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = [ROW, dict(ROW, chosen="Bone is hierarchical.", rejected="No."), dict(ROW, prompt="Why silk?")]
    exs = [tokenize_pair(tok, r, PairFormat(max_length=256, max_prompt_length=64))[0] for r in rows]
    padded = collate_pairs(exs, tok.pad_token_id, packed=False)
    packed = collate_pairs(exs, tok.pad_token_id, packed=True)
    assert packed.input_ids.shape[0] == 1 and packed.input_ids.shape[1] == padded.attention_mask.sum()
    with torch.no_grad():
        s1, c1 = forward_logps(model, padded)
        s2, c2 = forward_logps(model, packed)
    assert torch.equal(c1, c2)
    assert torch.allclose(s1, s2, atol=1e-4)


def test_pack_lm_stream():
    blocks = pack_lm_stream([[1, 2, 3], [4, 5]], 3, sep_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_lm_stream([[1]], 8, sep_id=None)
