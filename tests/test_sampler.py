"""Sampler: KV cache vs full recomputation, batching, seeds, stops, streaming, transformers parity, errors."""
import pytest
import torch

from preflexor_core import Llama, ModelConfig, Tokenizer
from preflexor_core.sampler import (Completion, KVCache, SamplingParams, decode_one_token, generate, prefill,
                                    row_key, sample, seeds_for_rows, static_decode_step)

TEXTS = [
    "Spider silk combines high strength with extensibility; its beta-sheet nanocrystals resist shear.",
    "Nacre is 95% aragonite by volume, yet it is 3000 times tougher than aragonite alone.",
    "Bone's hierarchy spans collagen fibrils, mineralised fibres and osteons.",
    "Wood cells are hollow tubes whose walls hold cellulose microfibrils at an angle.",
    "Keratin in hooves and horns absorbs impact through sacrificial bonds. Café — 你好",
] * 20
PROMPTS = ["Nacre is", "Spider silk combines high strength with", "Bone"]
GREEDY = dict(temperature=0.0, stop_token_ids=[])


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    # initializer_range 0.2: peaked logits, so greedy choices are far from numerical ties.
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    return Llama(cfg).eval()


def full_recompute_greedy(model, ids, steps):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(t)
            out.append(t)
    return out


# ----------------------------------------------------------------------------- KV cache
def test_cache_logits_match_full_forward(model, tok):
    prompts = [tok.encode(p) for p in PROMPTS]
    cache = KVCache.for_model(model, len(prompts), 64)
    with torch.inference_mode():
        logits = prefill(model, cache, prompts)
        assert cache.host_lengths == [len(p) for p in prompts]
        assert cache.lengths.tolist() == [len(p) for p in prompts]
        nxt = torch.tensor([3, 7, 11])
        step = decode_one_token(model, cache, nxt)
        for b, p in enumerate(prompts):
            ref = model(torch.tensor([p + [int(nxt[b])]]))[0]
            assert torch.allclose(logits[b], ref[-2], atol=1e-5)
            assert torch.allclose(step[b], ref[-1], atol=1e-5)


def test_cache_select_expand_and_per_row_writes():
    cache = KVCache(1, 2, 1, 8, 2)
    cache.set_lengths([1, 3])
    k = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 2.0]]]])              # (B=2, H=1, T=1, D=2)
    kk, vv = cache.update(0, k, -k)
    assert kk.shape == (2, 1, 4, 2)                                   # up to max(lengths) + T
    assert cache.k[0, 0, 0, 1].tolist() == [1.0, 1.0] and cache.k[0, 1, 0, 3].tolist() == [2.0, 2.0]
    assert cache.k[0, 0, 0, 3].tolist() == [0.0, 0.0]
    cache.advance(1)
    assert cache.host_lengths == [2, 4] and cache.lengths.tolist() == [2, 4]
    cache.expand(2)
    assert cache.host_lengths == [2, 2, 4, 4] and cache.batch_size == 4
    assert cache.k[0, 3, 0, 3].tolist() == [2.0, 2.0] and cache.v[0, 1, 0, 1].tolist() == [-1.0, -1.0]
    cache.select([2])
    assert cache.lengths.tolist() == [4] and cache.k[0, 0, 0, 3].tolist() == [2.0, 2.0]
    mask = KVCache(1, 2, 1, 8, 2)
    mask.set_lengths([1, 3])
    assert mask.decode_mask()[:, 0, 0].tolist() == [[True, True, False, False], [True, True, True, True]]


def test_static_cache_step_equals_dynamic_decode(model, tok):
    """The fixed-shape step that CUDA graphs capture, run eagerly on CPU."""
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        dyn, sta = KVCache.for_model(model, 3, 40), KVCache.for_model(model, 3, 40)
        tok_d = prefill(model, dyn, prompts).argmax(-1)
        prefill(model, sta, prompts)
        sta.static = True
        tokens, mask, arange = torch.zeros(3, dtype=torch.long), torch.zeros(3, 1, 1, 40, dtype=torch.bool), torch.arange(40)
        for _ in range(6):
            ld = decode_one_token(model, dyn, tok_d)
            tokens.copy_(tok_d)
            ls = static_decode_step(model, sta, tokens, mask, arange)
            assert torch.allclose(ls, ld, atol=1e-5)
            assert sta.lengths.tolist() == dyn.lengths.tolist()
            tok_d = ld.argmax(-1)


def test_greedy_with_cache_equals_full_recompute(model, tok):
    ids = tok.encode(PROMPTS[1])
    out = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=16, **GREEDY))
    assert len(out) == 1 and out[0].finish_reason == "length"
    assert out[0].token_ids == full_recompute_greedy(model, ids, 16)
    assert out[0].text == tok.decode(out[0].token_ids)


def test_mixed_lengths_batch_equals_each_alone(model, tok):
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    batch = generate(model, tok, PROMPTS, params)
    assert [c.prompt_index for c in batch] == [0, 1, 2]
    for i, p in enumerate(PROMPTS):
        alone = generate(model, tok, [p], params)[0]
        assert batch[i].token_ids == alone.token_ids
        assert batch[i].token_ids == full_recompute_greedy(model, tok.encode(p), 12)


def test_rows_finishing_early_are_compacted_without_changing_others(model, tok, monkeypatch):
    solo = [generate(model, tok, p, SamplingParams(max_new_tokens=12, **GREEDY))[0].token_ids for p in PROMPTS]
    stop = solo[0][2]
    sizes = []
    original = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda self, rows: (sizes.append(len(rows)), original(self, rows))[1])
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])
    batch = generate(model, tok, PROMPTS, params)
    assert sizes[0] == 3 and min(sizes) < 3                           # prefill rows, then a compaction
    for i, ids in enumerate(solo):
        want = ids[:ids.index(stop)] if stop in ids else ids
        assert batch[i].token_ids == want
        assert batch[i].finish_reason == ("stop" if stop in ids else "length")


def test_chat_input_uses_template(model, tok):
    chat = [{"role": "user", "content": "Why is nacre tough?"}]
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    a = generate(model, tok, chat, params)
    b = generate(model, tok, [tok.apply_chat_template(chat, add_generation_prompt=True)], params)
    c = generate(model, tok, [chat, "Bone"], params)
    assert a[0].token_ids == b[0].token_ids == c[0].token_ids and len(c) == 2


# ----------------------------------------------------------------------------- seeds / sampling
def test_seed_reproducible_at_n_gt_1_and_batch_invariant(model, tok):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=123, stop_token_ids=[])
    a = generate(model, tok, PROMPTS[:2], params)
    b = generate(model, tok, PROMPTS[:2], params)
    c = generate(model, tok, PROMPTS[:2], params, max_batch_size=2)
    assert [(x.prompt_index, x.sample_index) for x in a] == [(p, s) for p in range(2) for s in range(3)]
    assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1                 # samples of one prompt differ
    d = generate(model, tok, PROMPTS[:2], SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=124,
                                                         stop_token_ids=[]))
    assert [x.token_ids for x in a] != [x.token_ids for x in d]


def test_row_draw_does_not_depend_on_batch_index():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    keys = [row_key(5, p, 0, 0) for p in range(6)]
    args = lambda n: (torch.ones(n), torch.zeros(n, dtype=torch.long), torch.full((n,), 0.9))
    full = sample(logits, *args(6), seeds_for_rows(keys))
    perm = [4, 1, 5]
    part = sample(logits[perm], *args(3), seeds_for_rows([keys[i] for i in perm]))
    assert part.tolist() == full[perm].tolist()


# ----------------------------------------------------------------------------- stops, prepend, length
def test_stop_string_trims_text_and_ids(model, tok):
    ref = generate(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    stop = tok.decode(ref.token_ids[2:5])
    assert stop.strip(), "need a visible stop string"
    streamed = []
    out = generate(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=12, stop=[stop], **GREEDY),
                   stream=lambda p, s, d: streamed.append(d))[0]
    cut = ref.text.find(stop)
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:cut] and stop not in out.text
    assert out.token_ids == ref.token_ids[:len(out.token_ids)]
    assert tok.decode(out.token_ids).startswith(out.text)
    assert len(out.token_ids) <= 3 and "".join(streamed) == out.text


def test_stop_token_ids_end_row(model, tok):
    ref = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    k = next(i for i in range(1, 12) if ref.token_ids[i] not in ref.token_ids[:i])
    out = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                          stop_token_ids=[ref.token_ids[k]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[:k]
    assert out.text == tok.decode(ref.token_ids[:k])


def test_max_new_tokens_and_prepend_response(model, tok):
    out = generate(model, tok, PROMPTS[2], SamplingParams(max_new_tokens=5, **GREEDY))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    think = tok.token_to_id("<|thinking|>")
    pre = generate(model, tok, PROMPTS[2], SamplingParams(max_new_tokens=5, prepend_response="<|thinking|>",
                                                          return_logprobs=True, **GREEDY))[0]
    direct = generate(model, tok, PROMPTS[2] + "<|thinking|>", SamplingParams(max_new_tokens=5, **GREEDY))[0]
    assert pre.token_ids[0] == think and pre.num_forced_tokens == 1 and len(pre.token_ids) == 6
    assert pre.token_ids[1:] == direct.token_ids
    assert pre.text == "<|thinking|>" + direct.text and len(pre.logprobs) == 5


def test_logprobs_and_repetition_penalty_match_recompute(model, tok):
    ids = tok.encode(PROMPTS[0])
    out = generate(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=8, repetition_penalty=1.8,
                                                          return_logprobs=True, **GREEDY))[0]
    seq, want, lps = list(ids), [], []
    with torch.no_grad():
        for _ in range(8):
            raw = model(torch.tensor([seq]))[0, -1]
            pen = raw.clone()
            for t in set(seq):
                pen[t] = pen[t] / 1.8 if pen[t] > 0 else pen[t] * 1.8
            t = int(pen.argmax())
            want.append(t)
            lps.append(float(raw.log_softmax(-1)[t]))
            seq.append(t)
    assert out.token_ids == want
    assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(lps), atol=1e-4)


def test_streaming_concatenation_equals_text(model, tok):
    got: dict[tuple[int, int], list[str]] = {}
    outs = generate(model, tok, PROMPTS, SamplingParams(max_new_tokens=15, temperature=1.0, n=2, seed=3),
                    stream=lambda p, s, d: got.setdefault((p, s), []).append(d))
    assert len(outs) == 6
    for c in outs:
        assert "".join(got.get((c.prompt_index, c.sample_index), [])) == c.text
        assert c.finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- transformers parity
def test_greedy_matches_transformers_generate(model, tok, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    model.save_pretrained(str(tmp_path))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    for prompt, penalty in ((PROMPTS[1], 1.0), (PROMPTS[0], 1.3)):
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, min_new_tokens=20, repetition_penalty=penalty,
                              pad_token_id=0)[0, len(ids):].tolist()
        ours = generate(model, tok, prompt, SamplingParams(max_new_tokens=20, repetition_penalty=penalty,
                                                           **GREEDY))[0]
        assert ours.token_ids == ref


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, msg", [
    (dict(n=0), "n must be"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(stop=[""]), "stop"),
])
def test_bad_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_bad_prompts_and_truncation(model, tok):
    assert generate(model, tok, [], SamplingParams()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tok, ["Bone", ""], SamplingParams(max_new_tokens=2))
    with pytest.raises(TypeError, match="prompts"):
        generate(model, tok, 42, SamplingParams(max_new_tokens=2))
    long = " ".join(TEXTS[:8])
    n = len(tok.encode(long))
    assert n + 100 > 256
    with pytest.raises(ValueError, match=r"max_position_embeddings=256.*truncate_prompt_left"):
        generate(model, tok, long, SamplingParams(max_new_tokens=100))
    out = generate(model, tok, long, SamplingParams(max_new_tokens=4, truncate_prompt_left=True, **GREEDY)
                   if n + 4 > 256 else SamplingParams(max_new_tokens=100, truncate_prompt_left=True, **GREEDY))
    assert isinstance(out[0], Completion) and out[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_new_tokens=300"):
        generate(model, tok, "Bone", SamplingParams(max_new_tokens=300, truncate_prompt_left=True))


# ----------------------------------------------------------------------------- oneDNN packed linears (CPU)
def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_packed_linears_match_f_linear_and_restore(model, dtype, tol, every_isa):
    from preflexor_core.llm.cpu_features import onednn_bf16_packing
    from preflexor_core.sampler import cpu_packed_linears
    m = Llama(model.config).eval().to(dtype)
    m.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, m.config.hidden_size).to(dtype)
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    lin = attn.o_proj
    want = [lin(x), m.project_logits(x), *attn.project_qkv(x), *mlp.project_gate_up(x)]
    if dtype == torch.bfloat16 and not onednn_bf16_packing():
        # no oneDNN bf16 reorder on this path (it raises without AVX-512): packing declines, nothing patched
        with torch.inference_mode(), cpu_packed_linears(m) as packed:
            assert not packed and "forward" not in lin.__dict__ and "project_logits" not in m.__dict__
            assert torch.equal(lin(x), want[0])
        return
    with torch.inference_mode(), cpu_packed_linears(m) as packed:
        assert packed
        assert "forward" in lin.__dict__ and "project_logits" in m.__dict__
        assert "project_qkv" in attn.__dict__ and "project_gate_up" in mlp.__dict__      # fused products
        assert "forward" not in attn.q_proj.__dict__ and "forward" not in mlp.up_proj.__dict__
        got = [lin(x), m.project_logits(x), *attn.project_qkv(x), *mlp.project_gate_up(x)]
    assert len(got) == len(want) == 7
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)
    # leaving the block restores the class methods and bit-identical outputs
    for mod, name in ((lin, "forward"), (m, "project_logits"), (attn, "project_qkv"), (mlp, "project_gate_up")):
        assert name not in mod.__dict__
    assert torch.equal(lin(x), want[0]) and torch.equal(m.project_logits(x), want[1])
    assert all(torch.equal(a, b) for a, b in zip(attn.project_qkv(x), want[2:5]))


def test_cpu_packing_keeps_greedy_outputs_and_can_be_turned_off(model, tok, monkeypatch):
    from preflexor_core.sampler import cpu_pack
    calls = []
    real = cpu_pack._packed_linear
    monkeypatch.setattr(cpu_pack, "_packed_linear", lambda ws, b: calls.append(len(ws)) or real(ws, b))
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    packed = [c.token_ids for c in generate(model, tok, PROMPTS, params)]
    L = model.config.num_hidden_layers
    # per layer: fused q/k/v, o_proj, fused gate/up, down_proj; then the LM head (and lm_head's forward)
    assert sorted(calls) == sorted([3, 1, 2, 1] * L + [1] * (1 + (model.lm_head is not None)))
    assert sum(calls) == len(_linears(model)) + 1          # every projection and the LM head
    n = len(calls)
    monkeypatch.setenv("PREFLEXOR_CPU_PACK", "0")
    plain = [c.token_ids for c in generate(model, tok, PROMPTS, params)]
    assert len(calls) == n and packed == plain
    monkeypatch.setenv("PREFLEXOR_CPU_PACK", "auto")
    monkeypatch.setattr(cpu_pack, "CPU_PACK_MAX_BYTES", 1024)   # copies too large for "auto"
    assert [c.token_ids for c in generate(model, tok, PROMPTS, params)] == plain
    assert len(calls) == n
    monkeypatch.setenv("PREFLEXOR_CPU_PACK", "yes")
    with pytest.raises(ValueError, match="PREFLEXOR_CPU_PACK='yes'"):
        generate(model, tok, PROMPTS, params)


def test_cpu_packing_with_lora_adapters_uses_the_adapted_weights(model, tok, monkeypatch):
    from preflexor_core.llm.lora import LoRAConfig, apply_lora, disable_adapters
    torch.manual_seed(1)
    m = Llama(model.config.replace(tie_word_embeddings=False)).eval()   # an untied head, adapted too
    apply_lora(m, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), include_head=True))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)   # a non-zero update, so the adapters change the outputs
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    packed = [c.token_ids for c in generate(m, tok, PROMPTS, params)]
    monkeypatch.setenv("PREFLEXOR_CPU_PACK", "0")
    assert packed == [c.token_ids for c in generate(m, tok, PROMPTS, params)]
    with disable_adapters(m):   # the adapters matter: without them greedy output differs
        assert packed != [c.token_ids for c in generate(m, tok, PROMPTS, params)]


def test_cpu_packed_weights_are_reused_until_the_weights_change(model, tok, monkeypatch):
    import gc
    from preflexor_core.sampler import cpu_pack
    m = Llama(model.config).eval()
    m.load_state_dict(model.state_dict())
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    mlp = m.model.layers[0].mlp
    w, emb = mlp.down_proj.weight, m.output_weight             # a projection, the head
    gate_up = ("mkldnn", id(mlp.gate_proj.weight), id(mlp.up_proj.weight))   # a fused pair
    entry = lambda key: cpu_pack._PACKED[key][1]
    before = [c.token_ids for c in generate(m, tok, PROMPTS, params)]
    packed_w, packed_emb, packed_gu = entry(("mkldnn", id(w))), entry(("mkldnn", id(emb))), entry(gate_up)
    assert [c.token_ids for c in generate(m, tok, PROMPTS, params)] == before
    assert entry(("mkldnn", id(w))) is packed_w and entry(gate_up) is packed_gu     # unchanged: no repack
    with torch.no_grad():
        emb.mul_(-1.0)                                             # in place, like an optimizer step
        mlp.up_proj.weight.mul_(1.5)                               # one half of a fused pair
    after = [c.token_ids for c in generate(m, tok, PROMPTS, params)]
    assert entry(("mkldnn", id(w))) is packed_w
    assert entry(("mkldnn", id(emb))) is not packed_emb            # the changed ones were repacked
    assert entry(gate_up) is not packed_gu
    monkeypatch.setenv("PREFLEXOR_CPU_PACK", "0")
    assert after == [c.token_ids for c in generate(m, tok, PROMPTS, params)] and after != before
    n = len(cpu_pack._PACKED)
    del m, mlp, w, emb, packed_w, packed_emb, packed_gu
    gc.collect()
    assert len(cpu_pack._PACKED) < n                                # entries go away with their weights


# ----------------------------------------------------------------------------- decode attention (CPU, non-fp32)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_sdpa_with_gqa_and_mask(dtype, tol):
    import torch.nn.functional as F
    from preflexor_core.llm.ops import decode_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    mask = torch.arange(11)[None, None, None, :] <= torch.tensor([10, 4, 0])[:, None, None, None]   # (B, 1, 1, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(decode_attention(q, k, v, None),
                               F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        decode_attention(q[:, :5], k, v, mask)


def test_bf16_decode_steps_match_the_full_forward(model, tok, every_isa):
    m = Llama(model.config).eval().to(torch.bfloat16)
    m.load_state_dict(model.state_dict())
    ids = [tok.encode(p) for p in PROMPTS]
    out = generate(m, tok, PROMPTS, SamplingParams(max_new_tokens=6, **GREEDY))
    agree = total = 0
    with torch.inference_mode():
        for p, c in zip(ids, out):
            full = m(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].float().argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(full, c.token_ids))
            total += len(c.token_ids)
    assert agree / total >= 0.9, (agree, total)      # bf16: the two paths round differently, near-ties may flip
