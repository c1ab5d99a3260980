"""Tests for preflexor_core.llm.vocab: thinking tokens reuse reserved tokens or get distinct new rows; they train under LoRA.

Run: python -m pytest -q tests/test_vocab.py
"""
from __future__ import annotations

import copy

import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.llm.lora import LoRAConfig, apply_lora, merge_lora
from preflexor_core.losses.preference import orpo_loss, sequence_logps
from preflexor_core.thinking.tokens import THINKING_TOKENS
from preflexor_core.llm.vocab import (add_thinking_tokens, init_token_rows, rename_special_tokens,
                                      resize_token_embeddings, setup_thinking_tokens, tag_words,
                                      unused_reserved_tokens)

TEXTS = ["thinking about reflect and reflection, nacre is thinking material", "the /thinking /reflect tags",
         "Reasoning steps: think, reflect, answer. Mother of pearl is tough."] * 20


def base_tokenizer(tmp_path, reserved: int = 0, template: str | None = None,
                   reserved_format: str = "<|reserved_special_token_{}|>") -> Tokenizer:
    """A byte-level BPE without thinking tokens (like a pretrained checkpoint's), optionally with
    reserved special tokens after the ordinary vocabulary (Llama-3-style names unless told)."""
    import json

    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import AddedToken
    tk.add_special_tokens([AddedToken(reserved_format.format(i), special=True, normalized=False)
                           for i in range(reserved)])
    d = tmp_path / f"tok{reserved}-{abs(hash(reserved_format))}"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    conf = {"eos_token": "<|endoftext|>", "bos_token": None}
    if template is not None:
        conf["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    return Tokenizer.from_pretrained(str(d))


def tiny(vocab: int, tie: bool, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=tie))


def pairwise_distinct(rows: torch.Tensor) -> bool:
    return all(not torch.allclose(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows)))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_embeddings_keeps_old_rows(tied):
    model = tiny(50, tied)
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


@pytest.mark.parametrize("tied", [True, False])
def test_new_thinking_rows_start_at_their_word_pieces(tmp_path, tied):
    tok = base_tokenizer(tmp_path)
    V = tok.vocab_size
    model = tiny(V, tied)
    emb0 = model.model.embed_tokens.weight.detach().clone()
    head0 = model.output_weight.detach().clone()
    change = setup_thinking_tokens(model, tok)
    assert change.reused == () and change.added == tuple(range(V, V + 4))
    assert [change.ids[t] for t in THINKING_TOKENS] == list(range(V, V + 4))
    assert model.config.vocab_size == tok.vocab_size == V + 4 and model.new_token_ids == change.added
    assert all(tok.encode(t) == [change.ids[t]] for t in THINKING_TOKENS)
    emb = model.model.embed_tokens.weight.detach()
    assert torch.equal(emb[:V], emb0)
    for t in THINKING_TOKENS:
        pieces = tok.encode(tag_words(t))
        assert pieces and max(pieces) < V
        torch.testing.assert_close(emb[change.ids[t]], emb0[pieces].mean(0))
        torch.testing.assert_close(model.output_weight[change.ids[t]].detach(), head0[pieces].mean(0))
    new = emb[V:]
    assert pairwise_distinct(new) and pairwise_distinct(model.output_weight.detach()[V:])
    assert not any(torch.allclose(r, emb0.mean(0)) for r in new)       # not the old mean-of-all-rows init
    logits = model(torch.tensor([[1, 2, V, V + 1]]))[0, -1]
    assert len(set(logits[V:].tolist())) == 4                          # their logits differ from the start


def test_reserved_tokens_are_renamed_and_their_rows_kept(tmp_path):
    template = "{{ '<|reserved_special_token_1|>' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = base_tokenizer(tmp_path, reserved=8, template=template)
    reserved = {text: tok.token_to_id(text) for text in (f"<|reserved_special_token_{i}|>" for i in range(8))}
    V = tok.vocab_size
    assert tok.chat_template == template
    free = [i for i, _ in unused_reserved_tokens(tok)]
    assert free == [reserved[f"<|reserved_special_token_{i}|>"] for i in (0, 2, 3, 4, 5, 6, 7)]
    model = tiny(V, tie=True)
    emb0 = model.model.embed_tokens.weight.detach().clone()
    change = setup_thinking_tokens(model, tok)
    assert change.added == () and tok.vocab_size == V and model.config.vocab_size == V
    assert list(change.reused) == free[:4] and sorted(change.ids.values()) == free[:4]
    for t in THINKING_TOKENS:
        assert tok.encode(f"a {t} b").count(change.ids[t]) == 1 and tok.decode([change.ids[t]]) == t
        assert tok.token_to_id(tok.id_to_token(change.ids[t])) == change.ids[t]
    assert tok.token_to_id("<|reserved_special_token_0|>") is None
    assert torch.equal(model.model.embed_tokens.weight.detach(), emb0)        # rows reused as they are
    assert model.new_token_ids == change.reused
    tok.save_pretrained(str(tmp_path / "saved"))
    again = Tokenizer.from_pretrained(str(tmp_path / "saved"))
    assert {t: again.token_to_id(t) for t in THINKING_TOKENS} == change.ids
    assert add_thinking_tokens(again).new_rows == ()                          # nothing left to add


def test_gemma_unused_tokens_are_reused(tmp_path):
    """Gemma's vocabulary reserves <unusedN>: the thinking tags take the first free ones, in order of N."""
    tok = base_tokenizer(tmp_path, reserved=12, reserved_format="<unused{}>",
                         template="{{ '<unused0>' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    free = [i for i, _ in unused_reserved_tokens(tok)]
    assert free == [tok.token_to_id(f"<unused{i}>") for i in range(1, 12)]      # <unused0> is in the template
    V = tok.vocab_size
    change = add_thinking_tokens(tok)
    assert change.added == () and tok.vocab_size == V and list(change.reused) == free[:4]
    assert tok.token_to_id("<unused1>") is None and tok.token_to_id("<unused5>") is not None


def test_zero_reserved_rows_are_initialised_and_partial_reuse(tmp_path):
    tok = base_tokenizer(tmp_path, reserved=2)
    V = tok.vocab_size
    model = tiny(V, tie=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[V - 2:] = 0                           # untrained reserved rows
    change = setup_thinking_tokens(model, tok)
    assert change.reused == (V - 2, V - 1) and change.added == (V, V + 1)
    assert [change.ids[t] for t in THINKING_TOKENS] == [V - 2, V - 1, V, V + 1]
    assert model.new_token_ids == (V - 2, V - 1, V, V + 1)
    rows = model.model.embed_tokens.weight.detach()[V - 2:]
    assert pairwise_distinct(rows) and rows.abs().sum(1).min() > 0


def test_rename_errors_are_specific(tmp_path):
    tok = base_tokenizer(tmp_path, reserved=1)
    with pytest.raises(ValueError, match="missing"):
        rename_special_tokens(tok, {"<|nope|>": "<|thinking|>"})
    with pytest.raises(ValueError, match="existing"):
        rename_special_tokens(tok, {"<|reserved_special_token_0|>": "<|endoftext|>"})


def _train_steps(model, tok, ids, steps: int = 4, lr: float = 5e-2):
    """A few ORPO steps on one pair whose chosen answer uses the thinking tokens."""
    prompt = tok.encode("nacre is tough because")
    chosen = prompt + [ids["<|thinking|>"]] + tok.encode(" reflect") + [ids["<|/thinking|>"], ids["<|reflect|>"],
                                                                        ids["<|/reflect|>"]] + tok.encode(" pearl")
    rejected = prompt + tok.encode(" thinking material")
    T = max(len(chosen), len(rejected))

    def row(seq):
        x = torch.tensor(seq + [0] * (T - len(seq)))
        y = x.clone()
        y[:len(prompt)] = -100
        y[len(seq):] = -100
        return x, y

    (xc, yc), (xr, yr) = row(chosen), row(rejected)
    x, y = torch.stack([xc, xr]), torch.stack([yc, yr])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        means, _ = sequence_logps(model, x, y, average=True)
        losses, *_ = orpo_loss(means[:1], means[1:], beta=0.1)
        loss = -means[0] + losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("tied", [True, False])
def test_thinking_rows_train_under_lora_and_merge(tmp_path, tied):
    tok = base_tokenizer(tmp_path)
    model = tiny(tok.vocab_size, tied)
    change = setup_thinking_tokens(model, tok)
    rows = list(change.ids.values())
    with pytest.raises(ValueError, match="would stay frozen"):
        apply_lora(copy.deepcopy(model), LoRAConfig(r=4))            # no trainable rows after adding tokens
    apply_lora(model, LoRAConfig(r=4, alpha=8, trainable_token_indices=model.new_token_ids))
    emb0 = model.model.embed_tokens.effective_weight().detach().clone()
    head0 = model.output_weight.detach().clone()
    assert pairwise_distinct(emb0[rows])
    _train_steps(model, tok, change.ids)
    emb1 = model.model.embed_tokens.effective_weight().detach()
    head1 = model.output_weight.detach()
    assert pairwise_distinct(emb1[rows]) and pairwise_distinct(head1[rows])
    for i in rows:
        assert not torch.allclose(emb1[i], emb0[i]) and not torch.allclose(head1[i], head0[i])
    others = [i for i in range(tok.vocab_size) if i not in rows]
    assert torch.equal(emb1[others], emb0[others]) and torch.equal(head1[others], head0[others])
    x = torch.tensor([[1, 2, rows[0], 5, rows[1]]])
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapters():
            assert torch.equal(model.model.embed_tokens.effective_weight(), emb0)
    merge_lora(model)
    assert set(model.state_dict()) == set(tiny(tok.vocab_size, tied).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.output_weight[rows], head1[rows])


def test_frozen_new_rows_are_refused(tmp_path):
    tok = base_tokenizer(tmp_path)
    untied = tiny(tok.vocab_size, tie=False)
    setup_thinking_tokens(untied, tok)
    with pytest.raises(ValueError, match=r"embedding and LM head rows would stay frozen"):
        apply_lora(untied, LoRAConfig(r=4))
    with pytest.raises(ValueError, match=r"LM head rows would stay frozen"):
        apply_lora(untied, LoRAConfig(r=4, trainable_token_indices={"embed_tokens": untied.new_token_ids}))
    # an untied head adapter updates every head row, so embedding rows alone are enough then
    apply_lora(untied, LoRAConfig(r=4, include_head=True, trainable_token_indices=untied.new_token_ids))
    assert set(untied.model.embed_tokens.token_ids) == set(untied.new_token_ids)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def pretrained_dir(tmp_path, corpus_text: str):
    """A small "pretrained" checkpoint like SmolLM2's: tied embeddings, ChatML, no thinking tokens."""
    import json

    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([corpus_text] * 3 + TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / "pretrained"
    model = tiny(tk.get_vocab_size(), tie=True, seed=1)
    model.config.eos_token_id = tk.token_to_id("<|im_end|>")
    model.save_pretrained(str(d))
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    return d


def test_lora_stage1_trains_the_added_thinking_rows(tmp_path):
    from safetensors.torch import load_file

    from preflexor_core.train import TrainConfig, Trainer
    corpus_text = ("Nacre is a brick-and-mortar composite of aragonite tablets and a thin organic matrix. "
                   "Tablet sliding dissipates energy, which makes nacre far tougher than pure aragonite.\n\n"
                   "Spider silk is a protein fibre whose beta-sheet nanocrystals give it strength.\n\n")
    corpus = tmp_path / "corpus.md"
    corpus.write_text(corpus_text * 3)
    src = pretrained_dir(tmp_path, corpus_text)
    # the rows the run starts from: the base checkpoint with the thinking tokens set up
    tok0 = Tokenizer.from_pretrained(str(src))
    start = Llama.from_pretrained(str(src))
    change = setup_thinking_tokens(start, tok0)
    rows = [change.ids[t] for t in THINKING_TOKENS]
    assert change.added == tuple(rows) and pairwise_distinct(start.output_weight.detach()[rows])
    out = tmp_path / "run"
    cfg = TrainConfig.from_flat(stage="1", model=str(src), corpus=str(corpus), out=str(out), embedder="hashing",
                                lora_r=4, lora_alpha=8, orpo_lr=1e-2, warmup_steps=0, iterations=1,
                                pairs_per_iteration=4, n_steps=3, batch_size=2, sample_max_new_tokens=8,
                                max_length=256, max_prompt_length=96, progress=False, seed=5)
    Trainer(cfg).run()
    adapter = out / "stage1" / "adapter"
    import json
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["trainable_token_indices"] == rows                    # tied: PEFT's list form
    delta = load_file(str(adapter / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    trained = Llama.from_pretrained(str(out / "stage1"))
    emb = trained.model.embed_tokens.weight.detach()
    torch.testing.assert_close(emb[rows], delta.to(emb.dtype))        # merged into the export
    assert pairwise_distinct(emb[rows])
    for i in rows:
        assert (emb[i] - start.model.embed_tokens.weight.detach()[i]).abs().max() > 1e-4, i
    others = [i for i in range(emb.shape[0]) if i not in rows]
    torch.testing.assert_close(emb[others], start.model.embed_tokens.weight.detach()[others])  # frozen under LoRA
    again = Tokenizer.from_pretrained(str(out / "stage1"))
    assert [again.token_to_id(t) for t in THINKING_TOKENS] == rows


def test_a_little_more_lora_training_closes_the_thinking_greedily(tmp_path):
    from preflexor_core.sampler import SamplingParams, generate
    tok = base_tokenizer(tmp_path)
    model = tiny(tok.vocab_size, tie=True)
    change = setup_thinking_tokens(model, tok)
    apply_lora(model, LoRAConfig(r=8, alpha=16, trainable_token_indices=model.new_token_ids))
    prompt = "nacre is tough because<|thinking|> reflect"
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    model.eval()
    assert generate(model, tok, [prompt], params)[0].token_ids[0] != change.ids["<|/thinking|>"]
    _train_steps(model, tok, change.ids, steps=20, lr=1e-2)
    model.eval()
    out = generate(model, tok, [prompt], params)[0]
    assert out.token_ids[0] == change.ids["<|/thinking|>"] and out.text.startswith("<|/thinking|>")
