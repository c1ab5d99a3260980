"""Shared pytest setup for the CPU suite."""
import os

# Triton kernels run on CPU only in Triton's interpreter; the flag must be set before triton is
# imported anywhere in this process. It only matters where a test forces PREFLEXOR_KERNELS=triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Training precision on CPU follows the CPU's bf16 support (cpu_features.native_cpu_bf16); the suite pins fp32
# so that its numbers are the same on every machine (tests that want autocast turn it on themselves).
os.environ.setdefault("PREFLEXOR_CPU_BF16", "0")


import pytest  # noqa: E402

from preflexor_core.llm.cpu_features import available_isas, forced_isa  # noqa: E402


@pytest.fixture(params=available_isas())
def every_isa(request):
    """Runs the test once per CPU ISA path at or below this machine's own (avx512, avx2, generic), so that
    every machine tests every path it can run. PREFLEXOR_CPU_ISA lowers the top for the whole suite."""
    with forced_isa(request.param):
        yield request.param


@pytest.fixture(scope="session")
def interpreter_bf16_dot_ok() -> bool:
    """Whether Triton's interpreter computes tl.dot on bf16 operands correctly (Triton 3.9's returns
    garbage, ~1e10); tests of bf16 kernels skip or fall back to fp16 when it does not."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(X, Z, N: tl.constexpr):
        o = tl.arange(0, N)
        x = tl.load(X + o[:, None] * N + o[None, :])
        tl.store(Z + o[:, None] * N + o[None, :], tl.dot(x, x))

    x = torch.randn(16, 16).to(torch.bfloat16)
    z = torch.empty(16, 16)
    _probe_kernel[(1,)](x, z, N=16)
    return torch.allclose(z, x.float() @ x.float(), atol=1e-2, rtol=1e-2)


class IdTokenizer:
    """Prompts are space-separated token ids, so the sampler and any reference see exactly the same ids."""

    stop_token_ids: list[int] = []

    def encode(self, text):
        return [int(x) for x in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        raise NotImplementedError("id prompts are raw strings of token ids")


@pytest.fixture
def id_tokenizer() -> IdTokenizer:
    return IdTokenizer()
