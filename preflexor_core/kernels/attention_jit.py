"""The Triton device code of flash attention (FlashAttention-2): the forward kernel, the backward's
preprocess (rowwise dO . O), dK/dV (one program per key block, over its GQA group's query heads, no
atomics) and dQ kernels, and the sequence-bounds / program-id helpers they share.

What each kernel computes, the layouts and the precision rules: attention.py, whose launchers plan the
tiles and grids (``_launch``) and call these. Tests: ``tests/test_kernels_attention.py`` (interpreter),
``tests/test_kernels_launch.py`` (launch plans).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _seq_bounds(CU, b, T, S, VARLEN: tl.constexpr):
    """(q_start, k_start, q_len, k_len) of batch row / packed sequence b, all int32 tensors (adding
    a tensor zero keeps T or S a tensor even when Triton specialises an argument equal to 1)."""
    zero = b * 0
    if VARLEN:
        q_start = tl.load(CU + b)
        q_len = tl.load(CU + b + 1) - q_start
        k_start = q_start
        k_len = q_len
    else:
        q_start = zero
        k_start = zero
        k_len = S + zero
        q_len = T + zero
    return q_start, k_start, q_len, k_len


@triton.jit
def _program_bh(NBH):
    """Linear (batch, head) index of this program over grid y and z (``_launch.grid_3d``)."""
    pid = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    return pid, pid < NBH


@triton.jit
def _flash_attention_fwd_kernel(
    Q, K, V, O, LSE, CU,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh,
    T, S, HQ, NBH, HEAD_DIM, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh, live = _program_bh(NBH)
    if not live:
        return
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    diag = k_len - q_len                                    # query i sits at key position i + diag

    offs_r = tl.arange(0, BLOCK_M)                          # in-tile offsets stay 32-bit,
    offs_m = m0 + offs_r                                    # per-program bases are 64-bit scalars
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    row0 = (q_start + m0).to(tl.int64)

    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qt + offs_r[:, None] * stride_qt
                + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + diag)
    for n0 in range(0, hi, BLOCK_N):
        n64 = tl.cast(n0, tl.int64)
        cols = n0 + offs_n
        n_ok = cols < k_len
        kt = tl.load(k_base + n64 * stride_kt + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                  # (D, N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale                  # (M, N), log2 units
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + n64 * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)                  # (N, D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b64 * stride_ob + h64 * stride_oh + row0 * stride_ot + offs_r[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + row0 + offs_r, lse, mask=m_ok)


@triton.jit
def _flash_attention_bwd_preprocess_kernel(
    O, DO, DELTA, CU,
    stride_ob, stride_oh, stride_ot,
    stride_db, stride_dh, stride_dt,
    stride_lb, stride_lh,
    T, S, HQ, NBH, HEAD_DIM,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d O[i, d] * dO[i, d] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh, live = _program_bh(NBH)
    if not live:
        return
    b = pid_bh // HQ
    h = pid_bh % HQ
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = m0 + offs_r < q_len
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64, h64, row0 = b.to(tl.int64), h.to(tl.int64), (q_start + m0).to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + row0 * stride_ot + offs_r[:, None] * stride_ot
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + row0 * stride_dt + offs_r[:, None] * stride_dt
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + row0 + offs_r, delta, mask=m_ok)


@triton.jit
def _flash_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh,
    T, S, HKV, NBH, HEAD_DIM, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One key block of one kv head: dV = sum P^T dO, dK = sum dS^T Q * scale over its query heads."""
    pid_n = tl.program_id(0)
    pid_bh, live = _program_bh(NBH)
    if not live:
        return
    b = pid_bh // HKV
    hk = pid_bh % HKV
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    diag = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    cols = n0 + offs_c
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = cols < k_len
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    b64, hk64, col0 = b.to(tl.int64), hk.to(tl.int64), (k_start + n0).to(tl.int64)
    tile_k = offs_c[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + col0 * stride_kt + tile_k, mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + col0 * stride_vt + offs_c[:, None] * stride_vt
                + offs_d[None, :], mask=kv_mask, other=0.0)                          # (N, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:                                              # queries with i + diag >= n0 see this block
        lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
    q_row0 = q_start.to(tl.int64)
    for g in range(GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qt
        do_base = DO + b64 * stride_db + h64 * stride_dh + q_row0 * stride_dt
        l_base = b64 * stride_lb + h64 * stride_lh + q_row0
        for m0 in range(lo, q_len, BLOCK_M):
            m64 = tl.cast(m0, tl.int64)
            m_ok = m0 + offs_m < q_len
            qm = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + m64 * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qm,
                        other=0.0)                                                                    # (M, D)
            do = tl.load(do_base + m64 * stride_dt + offs_m[:, None] * stride_dt + offs_d[None, :], mask=qm,
                         other=0.0)
            lse = tl.load(LSE + l_base + m64 + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + l_base + m64 + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale                     # (M, N)
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= (m0 + offs_m)[:, None] + diag)
            p = tl.math.exp2(tl.where(ok, s, float("-inf")) - lse[:, None])
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                              # (M, N)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + col0 * stride_dkt + offs_c[:, None] * stride_dkt
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + col0 * stride_dvt + offs_c[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh,
    T, S, HQ, NBH, HEAD_DIM, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query block of one query head: dQ = sum dS K * scale."""
    pid_m = tl.program_id(0)
    pid_bh, live = _program_bh(NBH)
    if not live:
        return
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    q_start, k_start, q_len, k_len = _seq_bounds(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    diag = k_len - q_len

    offs_r = tl.arange(0, BLOCK_M)
    rows = m0 + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < q_len
    d_ok = offs_d < HEAD_DIM
    qm = m_ok[:, None] & d_ok[None, :]
    b64, h64, hk64, row0 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64), (q_start + m0).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qt + offs_r[:, None] * stride_qt
                + offs_d[None, :], mask=qm, other=0.0)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + row0 * stride_dt + offs_r[:, None] * stride_dt
                 + offs_d[None, :], mask=qm, other=0.0)
    l_off = b64 * stride_lb + h64 * stride_lh + row0
    lse = tl.load(LSE + l_off + offs_r, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + l_off + offs_r, mask=m_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vt
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + diag)
    for n0 in range(0, hi, BLOCK_N):
        n64 = tl.cast(n0, tl.int64)
        cols = n0 + offs_n
        n_ok = cols < k_len
        kvm = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n64 * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kvm, other=0.0)
        v = tl.load(v_base + n64 * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kvm, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
        p = tl.math.exp2(tl.where(ok, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqt + offs_r[:, None] * stride_dqt
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qm)
