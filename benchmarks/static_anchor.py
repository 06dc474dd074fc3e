"""The reference kernel for `benchmarks/static.py`: a causal flash-attention forward written the
way Triton's 06-fused-attention tutorial writes it (our own code, same structure): Q tile held in
registers, K/V streamed in two passes (the tiles strictly below the diagonal with no mask, then
the diagonal tiles with the causal mask), exp2 online softmax, lse written.

Two forms of the same kernel:
- `flash_fwd_tma`: K/V/Q/O through device-side tensor descriptors (`tl.make_tensor_descriptor`),
  which Triton lowers to TMA on sm_90; what the tutorial does on Hopper.
- `flash_fwd_ptr`: plain pointers with the strides the JIT would specialise (divisible by 16:
  `benchmarks/static.py` passes them as aligned), what the tutorial's pointer form gets on sm_80.

Tutorial assumptions kept: q/k/v/o are [Z, H, N_CTX, HEAD_DIM] contiguous with equal head counts
and N_CTX a multiple of BLOCK_M (no bounds checks). This file imports only triton: the compile
child loads it by path.
"""

import triton
import triton.language as tl


@triton.jit
def _tma_inner(acc, l_i, m_i, q, desc_k, desc_v, off_kv, start_m, qk_scale, offs_m, offs_n,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr):
    if DIAGONAL:
        lo, hi = start_m * BLOCK_M, (start_m + 1) * BLOCK_M
        lo = tl.multiple_of(lo, BLOCK_M)
    else:
        lo, hi = 0, start_m * BLOCK_M
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = desc_k.load([off_kv + start_n, 0]).T
        qk = tl.dot(q, k)
        if DIAGONAL:
            keep = offs_m[:, None] >= (start_n + offs_n[None, :])
            qk = qk * qk_scale + tl.where(keep, 0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([off_kv + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def flash_fwd_tma(Q, K, V, O, M, sm_scale, Z, H, N_CTX,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    rows = Z * H * N_CTX
    desc_q = tl.make_tensor_descriptor(Q, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
    off_kv = off_hz * N_CTX
    off_q = off_kv + start_m * BLOCK_M
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2): exp2 instead of exp
    q = desc_q.load([off_q, 0])
    acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, desc_k, desc_v, off_kv, start_m, qk_scale,
                               offs_m, offs_n, BLOCK_M, BLOCK_N, False)
    acc, l_i, m_i = _tma_inner(acc, l_i, m_i, q, desc_k, desc_v, off_kv, start_m, qk_scale,
                               offs_m, offs_n, BLOCK_M, BLOCK_N, True)
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(M + off_hz * N_CTX + offs_m, m_i)
    desc_o.store([off_q, 0], acc.to(desc_o.dtype))


@triton.jit
def _ptr_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_m, qk_scale,
               offs_m, offs_n, offs_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DIAGONAL: tl.constexpr):
    if DIAGONAL:
        lo, hi = start_m * BLOCK_M, (start_m + 1) * BLOCK_M
        lo = tl.multiple_of(lo, BLOCK_M)
    else:
        lo, hi = 0, start_m * BLOCK_M
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = tl.load(k_base + (start_n + offs_n)[None, :] * stride_kn + offs_d[:, None])
        qk = tl.dot(q, k)
        if DIAGONAL:
            keep = offs_m[:, None] >= (start_n + offs_n[None, :])
            qk = qk * qk_scale + tl.where(keep, 0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + (start_n + offs_n)[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def flash_fwd_ptr(Q, K, V, O, M, sm_scale,
                  stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                  stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om,
                  Z, H, N_CTX,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z, off_h = off_hz // H, off_hz % H
    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
    o_base = O + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2): exp2 instead of exp
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :])
    acc, l_i, m_i = _ptr_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_m,
                               qk_scale, offs_m, offs_n, offs_d, BLOCK_M, BLOCK_N, False)
    acc, l_i, m_i = _ptr_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_m,
                               qk_scale, offs_m, offs_n, offs_d, BLOCK_M, BLOCK_N, True)
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(M + off_hz * N_CTX + offs_m, m_i)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty))
