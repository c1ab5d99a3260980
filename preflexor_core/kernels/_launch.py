"""Launch planning shared by the Triton launchers: device limits, tile configurations per device,
the precision of fp32 dots, grids under CUDA's launch limits, and the 32-bit tile-offset bound.

Everything here is plain Python on shapes and numbers, so it is tested without a GPU
(``tests/test_kernels_launch.py``, meta tensors of more than 2^31 elements) and the configurations
it picks are compiled for sm_80/86/89/90 by ``tests/triton_compile.py``.

- Device limits come from Triton's active driver (``driver.active.utils.get_device_properties``:
  the opt-in shared memory per block and the SM count), so a consumer card (sm_86/sm_89, 99 KB per
  block) gets tiles that fit, and a compile check with a fake driver sees what a GPU would.
- fp32 dots follow ``torch.get_float32_matmul_precision()`` like torch's own matmuls: "highest" ->
  IEEE fp32 (FMA, no tensor cores), "high" / "medium" -> TF32 tensor cores.
- 64-bit offsets: the kernels compute every per-program base offset (batch, head, sequence start,
  row block) as a 64-bit scalar and keep only in-tile offsets (< block rows x row stride) in 32 bits;
  ``check_tile_span`` bounds those. Grids keep y and z <= 65535 (``grid_3d`` spreads large counts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..infra import env

INT32_MAX = 2**31 - 1
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535
KB = 1024


@dataclass(frozen=True)
class DeviceLimits:
    capability: int          # 80 for sm_80
    max_shared: int          # bytes of shared memory one block may use (opt-in maximum)
    sm_count: int


def interpreting() -> bool:
    return env.triton_interpret()


_limits_cache: dict[tuple[int, int], DeviceLimits] = {}


def device_limits(device: torch.device) -> DeviceLimits:
    """Limits of the device Triton launches on (the active driver's current device for non-CUDA
    tensors, e.g. the meta tensors of the compile check)."""
    from triton.runtime.driver import driver  # triton: the driver is looked up only when a launch needs limits
    drv = driver.active
    index = device.index if device.type == "cuda" and device.index is not None else drv.get_current_device()
    key = (id(drv), int(index))
    if key not in _limits_cache:
        props = drv.utils.get_device_properties(index)
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            cap = major * 10 + minor
        else:
            cap = int(drv.get_current_target().arch)
        _limits_cache[key] = DeviceLimits(cap, int(props["max_shared_mem"]), int(props["multiprocessor_count"]))
    return _limits_cache[key]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: for fp32 operands "ieee" when torch's float32 matmul precision
    is "highest" (its default), "tf32" for "high" / "medium"; 16-bit operands ignore it ("tf32")."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ----------------------------------------------------------------------------- attention tiles
# Candidates per (pass, head-dim bucket), preferred first: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# The first whose shared-memory estimate fits the device is used. BLOCK_M is the query tile and
# BLOCK_N the key tile in every pass (in dK/dV the key tile is the program's own, fixed block).
# Each table entry is compiled for sm_80/86/89/90 by ``make compile-check`` (no spills, fits).
_ATTN = {           # 16-bit inputs
    ("fwd", 64): [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2)],
    ("fwd", 128): [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
    ("fwd", 256): [(64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 1)],
    # dK/dV: a 32-row query tile; 64 rows held 255 registers and spilled 4-56 bytes.
    ("dkdv", 64): [(32, 64, 8, 2), (32, 32, 4, 1)],
    ("dkdv", 128): [(32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
    ("dkdv", 256): [(32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)],
    ("dq", 64): [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    ("dq", 128): [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    ("dq", 256): [(32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)],
}
# Cards with under 128 KB per block (sm_86 / sm_89): their ptxas spilled the 128-row forward tile at
# head dim 128 (60 bytes, varlen), which fits their shared memory; start one step smaller.
_ATTN_SMALL_SMEM = {("fwd", 128): [(64, 64, 4, 2), (64, 32, 4, 2)]}
# Before sm_90 (mma, not wgmma), where triton 3.6 spilled 8-12 bytes: the forward at 128 x 64 (non-causal;
# 128 x 32 holds 198 registers) and dK/dV at 32 x 64, head dim 64 (32 x 32 holds 168; on sm_90 it spilled).
_ATTN_PRE_HOPPER = {("fwd", 128): [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
                    ("dkdv", 64): [(32, 32, 4, 2), (32, 32, 4, 1)]}
_ATTN_TF32 = {      # fp32 inputs on TF32 tensor cores: twice the bytes per element
    ("fwd", 64): [(128, 32, 4, 2), (64, 32, 4, 2), (64, 16, 4, 1)],
    ("fwd", 128): [(128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 1)],
    ("fwd", 256): [(32, 32, 8, 2), (32, 16, 8, 1), (16, 16, 4, 1)],
    ("dkdv", 64): [(16, 64, 4, 2), (16, 32, 4, 1)],         # 32 x 64: 12 bytes of spills (triton 3.6)
    ("dkdv", 128): [(16, 64, 8, 2), (16, 32, 4, 2), (16, 32, 4, 1)],
    ("dkdv", 256): [(16, 32, 8, 1), (16, 16, 4, 1)],
    ("dq", 64): [(64, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 1)],
    ("dq", 128): [(64, 32, 8, 2), (64, 16, 4, 2), (32, 16, 4, 1)],
    ("dq", 256): [(32, 16, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
}
# IEEE fp32 dots run on FMA units with their operands in registers: smaller tiles, no tensor cores.
# A 16-wide key tile keeps them spill-free up to head dim 256 (32-wide tiles spilled 400-1100 bytes).
_ATTN_IEEE = {
    "fwd": [(32, 16, 4, 2), (16, 16, 4, 1)],     # 8 warps: ptxas for sm_86/89 kept 64 registers, spilled
    "dkdv": [(32, 16, 8, 1), (16, 16, 4, 1)],
    "dq": [(32, 16, 8, 1), (16, 16, 4, 1)],
}
_ATTN_IEEE_256 = {"dkdv": [(16, 16, 4, 1)]}     # 32 x 16 at head dim 256: 12 bytes of spills (triton 3.6)


def attention_smem(kind: str, bm: int, bn: int, bd: int, stages: int, elem: int) -> int:
    """Shared-memory estimate (bytes) of one program: its pipelined input tiles plus one staged
    [BLOCK_M, BLOCK_N] operand; the compile check holds the estimate against the compiled kernels."""
    if kind == "fwd":       # Q once, K and V per stage
        return elem * bd * (bm + 2 * stages * bn)
    if kind == "dkdv":      # K and V once, Q and dO per stage (fp32: in two operand layouts), P / dS
        return elem * (bd * (2 * bn + (4 if elem >= 4 else 2) * stages * bm) + bm * bn)
    return elem * (bd * (2 * bm + 2 * stages * bn) + bm * bn)        # dq: Q, dO once; K, V per stage


def attention_config(kind: str, head_dim: int, dtype: torch.dtype, limits: DeviceLimits | None,
                     precision: str = "tf32") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kind`` in fwd | dkdv | dq. ``limits`` None
    (the interpreter): small tiles for speed."""
    if limits is None:
        return 32, 32, 4, 1
    elem = torch.empty((), dtype=dtype).element_size()
    bd = max(16, triton.next_power_of_2(head_dim))
    bucket = 64 if bd <= 64 else 128 if bd <= 128 else 256
    if elem >= 4 and precision == "ieee":
        cands = _ATTN_IEEE_256.get(kind, _ATTN_IEEE[kind]) if bucket == 256 else _ATTN_IEEE[kind]
    elif elem >= 4:
        cands = _ATTN_TF32[(kind, bucket)]
    else:
        cands = _ATTN[(kind, bucket)]
        if limits.capability < 90:
            cands = _ATTN_PRE_HOPPER.get((kind, bucket), cands)
        if limits.max_shared < 128 * KB:
            cands = _ATTN_SMALL_SMEM.get((kind, bucket), cands)
    budget = limits.max_shared - 2 * KB          # reduction scratch and alignment
    for bm, bn, warps, stages in cands:
        if attention_smem(kind, bm, bn, bd, stages, elem) <= budget:
            return max(16, bm), bn, warps, stages
    bm, bn, warps, _ = cands[-1]
    return max(16, bm), bn, warps, 1


def seq_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) element strides; packed [total, H, D] tensors have no batch stride."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


class AttentionLayout:
    """Shape bookkeeping of the attention launchers (padded vs packed): sizes, tiles, grids, spans."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            _, self.hq, self.d = q.shape
            self.hkv = k.shape[1]
            self.nbatch = cu_seqlens.shape[0] - 1
            self.t = self.s = int(max_seqlen)
        else:
            self.nbatch, self.hq, self.t, self.d = q.shape
            self.hkv, self.s = k.shape[1], k.shape[2]
        self.group = self.hq // self.hkv
        self.block_d = max(16, triton.next_power_of_2(self.d))
        self.cu = cu_seqlens.contiguous() if self.varlen else torch.empty(1, dtype=torch.int32, device=q.device)
        self.dtype = q.dtype
        self.limits = None if interpreting() else device_limits(q.device)
        self.precision = dot_precision(q.dtype)

    def config(self, kind: str) -> tuple[int, int, int, int]:
        return attention_config(kind, self.d, self.dtype, self.limits, self.precision)

    def grid(self, length: int, block: int, heads: int) -> tuple[int, int, int]:
        return grid_3d(triton.cdiv(max(length, 1), block), self.nbatch * heads)

    def check_spans(self, tensors, block_rows: int) -> None:
        for name, t in tensors:
            check_tile_span("flash_attention", name, seq_strides(t, self.varlen)[2], block_rows, self.block_d)

    def lse_buffer(self, q):
        if self.varlen:                                        # [Hq, total]
            buf = torch.zeros(self.hq, q.shape[0], dtype=torch.float32, device=q.device)
            return buf, 0, buf.stride(0)
        buf = torch.zeros(self.nbatch, self.hq, self.t, dtype=torch.float32, device=q.device)
        return buf, buf.stride(0), buf.stride(1)


# ----------------------------------------------------------------------------- log-prob tiles
def logprobs_config(dtype: torch.dtype, limits: DeviceLimits | None,
                    precision: str = "tf32") -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)."""
    if limits is None:
        return 16, 32, 32, 4, 1
    elem = torch.empty((), dtype=dtype).element_size()
    if elem >= 4 and precision == "ieee":     # FMA dots; 4 warps spilled 16 bytes on sm_86/89
        return 32, 64, 32, 8, 2
    cands = [(64, 128, 64, 8, 3), (64, 128, 64, 8, 2), (64, 64, 64, 4, 2), (32, 64, 32, 4, 2)]
    budget = limits.max_shared - 2 * KB
    for bn, bv, bh, warps, stages in cands:
        if elem * bh * (bn + bv) * stages <= budget:           # hidden and weight tiles per stage
            return bn, bv, bh, warps, stages
    return cands[-1]


# ----------------------------------------------------------------------------- grids and offsets
def grid_3d(x: int, count: int) -> tuple[int, int, int]:
    """Grid (x, y, z) whose y * z >= count with y, z <= 65535; the kernel's linear index is
    ``program_id(1) + program_id(2) * num_programs(1)`` and programs past ``count`` return."""
    if x < 1 or x > GRID_X_MAX:
        raise ValueError(f"grid x={x} is outside CUDA's limit [1, {GRID_X_MAX}]")
    count = max(1, int(count))
    y = min(count, GRID_YZ_MAX)
    z = triton.cdiv(count, y)
    if z > GRID_YZ_MAX:
        raise ValueError(f"{count} programs along y do not fit CUDA's grid (at most {GRID_YZ_MAX}^2)")
    return x, y, z


def grid_2d(x: int, y: int, what: str) -> tuple[int, int]:
    """(x, y) checked against CUDA's launch limits, with ``what`` naming y in the error."""
    if not 1 <= x <= GRID_X_MAX:
        raise ValueError(f"grid x={x} is outside CUDA's limit [1, {GRID_X_MAX}]")
    if not 1 <= y <= GRID_YZ_MAX:
        raise ValueError(f"{what}: {y} programs along grid y exceed CUDA's limit of {GRID_YZ_MAX}; "
                         "use larger blocks or split the call")
    return x, y


def check_tile_span(op: str, name: str, row_stride: int, block_rows: int, block_cols: int) -> None:
    """In-tile offsets (row * row_stride + col, row < block_rows) stay 32-bit in the kernels."""
    span = (block_rows - 1) * abs(int(row_stride)) + block_cols
    if span > INT32_MAX:
        raise ValueError(f"{op}: {name}'s row stride {row_stride} makes one {block_rows}-row tile span "
                         f"{span} elements, over the 32-bit in-tile offset limit; make {name} contiguous")
