"""Weight-only int8 decoding (preflexor_core/sampler/int8.py): quantization, kernel vs reference, logits
error vs fp32 on the tiny preset, generate(decode_weights="int8"), the infer CLI flag.

    python -m pytest tests/test_int8.py -q
"""
import pytest
import torch

from preflexor_core import Llama, ModelConfig
from preflexor_core.sampler import SamplingParams, generate, int8_linears, quantize_per_channel
from preflexor_core.sampler import int8 as int8_mod


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny")).eval()


def test_quantize_per_channel_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.logspace(-3, 1, 37)[:, None]      # rows of very different scales
    w[5] = 0.0
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37,)
    assert int(q.abs().max()) == 127 and s[5] == 1.0 and not q[5].any()
    err = (int8_mod.dequantize(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all())           # round to nearest: half a step per row
    with pytest.raises(ValueError, match=r"floating \(N, K\) weight"):
        quantize_per_channel(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_kernel_matches_the_dequantized_reference(dtype, rows):
    torch.manual_seed(1)
    q, s = quantize_per_channel(torch.randn(67, 96))
    x = torch.randn(2, rows, 96).to(dtype)
    got = int8_mod.int8_linear(x, q, s)
    want = int8_mod.int8_linear_reference(x.float(), q, s)
    assert got.dtype == dtype and got.shape == (2, rows, 67)
    # the CPU kernel takes bf16 activations: relative error ~2^-8 of the row norm, times sqrt(K) terms
    bound = 4 * 2.0 ** -8 * (x.float().norm(dim=-1, keepdim=True) * int8_mod.dequantize(q, s).norm(dim=1))
    assert bool(((got.float() - want).abs() <= bound).all())
    with pytest.raises(ValueError, match="expects 96"):
        int8_mod.int8_linear(torch.randn(1, 95), q, s)


def test_int8_logits_error_vs_fp32_on_tiny(tiny):
    """Stated bound: max |logit error| <= 3% of the fp32 logits' max magnitude (measured 1.5%)."""
    torch.manual_seed(2)
    ids = torch.randint(0, tiny.config.vocab_size, (3, 24))
    with torch.inference_mode():
        ref = tiny(ids)
        with int8_linears(tiny) as n:
            got = tiny(ids)
        again = tiny(ids)
    assert n == 4 * tiny.config.num_hidden_layers + 1              # fused qkv, o, fused gate/up, down; head
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err <= 0.03, float(err)
    assert torch.equal(again, ref)                                   # leaving the block restores fp32
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_generate_int8_keeps_weights_and_mostly_agrees(tiny, id_tokenizer):
    tok = id_tokenizer
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    prompts = [" ".join(str(7 * i + j) for j in range(12)) for i in range(4)]
    p = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    fp = [c.token_ids for c in generate(tiny, tok, prompts, p)]
    q8 = [c.token_ids for c in generate(tiny, tok, prompts, p, decode_weights="int8")]
    assert all(len(c) == 8 for c in q8)
    assert sum(a[0] == b[0] for a, b in zip(fp, q8)) >= 3           # first greedy token, 4 prompts
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="decode_weights='int4'"):
        generate(tiny, tok, prompts, p, decode_weights="int4")


def test_int8_off_cpu_path_is_the_reference(monkeypatch, tiny):
    """Where the CPU kernel is not used (other devices), the dequantize-matmul reference runs."""
    monkeypatch.setattr(int8_mod, "_cpu_kernel_ok", lambda x: False)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 10))
    with torch.inference_mode():
        ref = tiny(ids)
        with int8_linears(tiny):
            got = tiny(ids)
    assert 0 < (got - ref).abs().max() / ref.abs().max() <= 0.03


def test_infer_cli_decode_weights_flag_reaches_the_policy(monkeypatch, capsys):
    import infer
    from preflexor_core.reasoning import session as cli
    from preflexor_core.reasoning.policy import Policy
    assert infer.parse_args(["--question", "q"]).decode_weights == cli.InferConfig().decode_weights == "fp"
    cfg = infer.parse_args(["--question", "q", "--decode-weights", "int8", "--reflect-depth", "0"])
    assert cfg.decode_weights == "int8"
    with pytest.raises(SystemExit):
        infer.parse_args(["--question", "q", "--decode-weights", "int4"])
    capsys.readouterr()
    seen = []

    class SpyPolicy(Policy):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.decode_weights)
            raise RuntimeError("stop after building the policy")
    monkeypatch.setattr(cli, "Policy", SpyPolicy)
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda *a: (None, None))
    monkeypatch.setattr(cli, "check_inputs", lambda cfg: None)
    with pytest.raises(RuntimeError, match="stop after building the policy"):
        cli.main(cfg)
    assert seen == ["int8"]
    # ... and the policy hands it to sampler.generate
    import preflexor_core.reasoning.policy as policy_mod
    monkeypatch.setattr(policy_mod, "generate", lambda *a, **k: k["decode_weights"])
    assert Policy(None, None, decode_weights="int8").generate(["q"], None) == "int8"
