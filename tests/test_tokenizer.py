"""Tokenizer: BPE training, round trips, Llama-3 chat format, special tokens, embedding resize."""
import json

import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.tokenizer import THINKING_TOKENS, TRAINED_SPECIAL_TOKENS, resize_token_embeddings
from preflexor_core import config as C

TEXTS = [
    "Spider silk combines high strength with extensibility; its beta-sheet nanocrystals resist shear.",
    "Nacre is 95% aragonite by volume, yet it is 3000 times tougher than aragonite alone.",
    "Bone's hierarchy spans collagen fibrils, mineralised fibres and osteons.",
    "Wood cells are hollow tubes whose walls hold cellulose microfibrils at an angle.",
    "Keratin in hooves and horns absorbs impact through sacrificial bonds.",
] * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=600)


def test_special_token_ids_match_config_constants(tok):
    for i, t in enumerate(TRAINED_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    assert tok.bos_token_id == C.TRAINED_BOS_ID
    assert tok.token_to_id("<|end_of_text|>") == C.TRAINED_EOS_ID
    assert tok.eos_token_id == C.TRAINED_EOT_ID
    assert set(tok.stop_token_ids) == {C.TRAINED_EOS_ID, C.TRAINED_EOT_ID}


@pytest.mark.parametrize("text", [
    "Nacre is tough.", "  leading spaces and\ttabs\nnew lines\n\n", "Unicode: café — 你好 🙂",
    "numbers 1234567 and contractions it's we'll", "", "<|thinking|>reason<|/thinking|>answer"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_each_special_token_is_one_id(tok):
    for t in TRAINED_SPECIAL_TOKENS:
        ids = tok.encode(f"a {t} b")
        assert ids.count(tok.token_to_id(t)) == 1
        assert len(tok.encode(t)) == 1


def test_added_special_tokens_encode_to_one_id():
    t = Tokenizer.train_bpe(TEXTS, vocab_size=500)
    n0 = t.vocab_size
    added = t.add_special_tokens(["<|critic|>", "<|/critic|>", THINKING_TOKENS[0]])
    assert added == 2 and t.vocab_size == n0 + 2
    for s in ["<|critic|>", "<|/critic|>"]:
        assert len(t.encode(s)) == 1 and t.encode(f"x{s}y").count(t.token_to_id(s)) == 1
        assert t.decode(t.encode(f"x{s}y")) == f"x{s}y"


def test_chat_template_is_llama3_format(tok):
    msgs = [{"role": "system", "content": "You are a materials scientist."},
            {"role": "user", "content": "  Why is nacre tough? "},
            {"role": "assistant", "content": "Brick-and-mortar."}]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a materials scientist.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhy is nacre tough?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nBrick-and-mortar.<|eot_id|>")
    assert tok.apply_chat_template(msgs) == expected
    gen = tok.apply_chat_template(msgs[:2], add_generation_prompt=True)
    assert gen.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match=r"messages\[0\] must be a dict"):
        tok.apply_chat_template([("user", "hi")])


def test_save_load_and_transformers_agree(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    back = Tokenizer.from_pretrained(str(tmp_path))
    text = "Silk <|thinking|>fibres<|/thinking|> 2024"
    assert back.encode(text) == tok.encode(text)
    assert back.eos_token_id == tok.eos_token_id and back.bos_token_id == tok.bos_token_id
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [{"role": "user", "content": "Why is bone tough?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_bpe(TEXTS, vocab_size=100)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_embeddings_keeps_old_rows(tied):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, tie_word_embeddings=tied)
    model = Llama(cfg)
    old_emb = model.model.embed_tokens.weight.detach().clone()
    old_head = model.output_weight.detach().clone()
    resize_token_embeddings(model, 54)
    emb = model.model.embed_tokens.weight
    assert emb.shape == (54, 32) and model.config.vocab_size == 54
    assert torch.equal(emb[:50], old_emb)
    assert torch.allclose(emb[50:], old_emb.mean(0).expand(4, -1), atol=1e-6)
    assert model.output_weight.shape == (54, 32) and torch.equal(model.output_weight[:50], old_head)
    assert model(torch.tensor([[53, 1, 2]])).shape == (1, 3, 54)
    with pytest.raises(ValueError, match="shrinking"):
        resize_token_embeddings(model, 10)
