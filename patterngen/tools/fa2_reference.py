"""A reference FlashAttention-2, forward and backward, as plain Triton kernels: the yardstick of
`patterngen audit`, compiled at the audited kernel's tiles, warps, stages, head dim and arch so
that the instructions of one kv-tile step compare directly.

The structure is the well-known one of Triton's fused-attention tutorial (written anew here):
the forward keeps the online softmax in base 2 with the scale folded into the exp2 argument;
dK/dV hold one kv tile and walk the q tiles in the transposed, kv-major form (scores as kv rows
x q columns, so every product has the kv tile's rows); dQ holds one q tile and walks the kv
tiles. A causal kernel walks the full tiles in one loop (no mask code) and the tiles on the
diagonal in a second, masked loop, which gives the audit both a full and a partial step.

Tensors are [B, H, N, D], contiguous, one head dim D (a power of two >= 16) and N a multiple of
both tiles: a reference, not a general kernel. The imports are absolute because
`cross_compile` loads this file as a standalone module in a clean process.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
KERNELS = ("fa2_fwd", "fa2_bwd_dkdv", "fa2_bwd_dq")
_ELEMENT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, stride_n, offs_m, offs_d, lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax of one q tile over the kv tiles starting in [lo, hi); m_i is in log2 units."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        s = tl.dot(q, tl.load(K + offs_n[None, :] * stride_n + offs_d[:, None]))
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_n + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _program_tile(stride_z, stride_h, num_heads, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's tile: its first token, (batch, head) index, the offset of that head, the
    tile's token indices and the head-dim indices (grid: tiles, B * H)."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    base = (bh // num_heads) * stride_z + (bh % num_heads) * stride_h
    return start, bh, base, start + tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM)


@triton.jit
def fa2_fwd(Q, K, V, O, LSE, sm_scale, stride_z, stride_h, stride_n, num_heads, seq_len,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """O and LSE (log2 units: m + log2(l)) of one q tile of one (batch, head); grid (N / BLOCK_M, B * H)."""
    start_m, bh, base, offs_m, offs_d = _program_tile(stride_z, stride_h, num_heads, BLOCK_M, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :])
    qk_scale = sm_scale * LOG2E
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_hi = (start_m // BLOCK_N) * BLOCK_N if CAUSAL else seq_len
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K + base, V + base, stride_n, offs_m, offs_d, 0, full_hi,
                               qk_scale, BLOCK_N, False)
    if CAUSAL:
        diag_hi = tl.cdiv(start_m + BLOCK_M, BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K + base, V + base, stride_n, offs_m, offs_d, full_hi,
                                   diag_hi, qk_scale, BLOCK_N, True)
    tl.store(O + base + offs_m[:, None] * stride_n + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + bh * seq_len + offs_m, m_i + tl.math.log2(l_i))


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_n, offs_n, offs_d, lo, hi, qk_scale,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """dK, dV of one kv tile from the q tiles starting in [lo, hi), transposed: P^T is kv x q."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + offs_m0
        qT = tl.load(Q + offs_m[None, :] * stride_n + offs_d[:, None])
        pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - tl.load(LSE + offs_m)[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_n + offs_d[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dsT = pT * (tl.dot(v, tl.trans(do)) - tl.load(DELTA + offs_m)[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def fa2_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, stride_z, stride_h, stride_n, num_heads,
                 seq_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dK, dV of one kv tile of one (batch, head); grid (N / BLOCK_N, B * H)."""
    start_n, bh, base, offs_n, offs_d = _program_tile(stride_z, stride_h, num_heads, BLOCK_N, HEAD_DIM)
    kv = base + offs_n[:, None] * stride_n + offs_d[None, :]
    k, v = tl.load(K + kv), tl.load(V + kv)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lse, delta = LSE + bh * seq_len, DELTA + bh * seq_len
    full_lo = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M if CAUSAL else 0
    if CAUSAL:
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q + base, DO + base, lse, delta, stride_n, offs_n, offs_d,
                             (start_n // BLOCK_M) * BLOCK_M, full_lo, qk_scale, BLOCK_M, True)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q + base, DO + base, lse, delta, stride_n, offs_n, offs_d, full_lo, seq_len,
                         qk_scale, BLOCK_M, False)
    tl.store(DK + kv, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv, dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_n, offs_m, offs_d, lo, hi, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dQ of one q tile from the kv tiles starting in [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        kT = tl.load(K + offs_n[None, :] * stride_n + offs_d[:, None])
        vT = tl.load(V + offs_n[None, :] * stride_n + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        ds = p * (tl.dot(do, vT) - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.jit
def fa2_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, stride_z, stride_h, stride_n, num_heads, seq_len,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ of one q tile of one (batch, head); grid (N / BLOCK_M, B * H)."""
    start_m, bh, base, offs_m, offs_d = _program_tile(stride_z, stride_h, num_heads, BLOCK_M, HEAD_DIM)
    rows = base + offs_m[:, None] * stride_n + offs_d[None, :]
    q, do = tl.load(Q + rows), tl.load(DO + rows)
    lse, delta = tl.load(LSE + bh * seq_len + offs_m), tl.load(DELTA + bh * seq_len + offs_m)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_hi = (start_m // BLOCK_N) * BLOCK_N if CAUSAL else seq_len
    dq = _dq_tiles(dq, q, do, lse, delta, K + base, V + base, stride_n, offs_m, offs_d, 0, full_hi, qk_scale,
                   BLOCK_N, False)
    if CAUSAL:
        dq = _dq_tiles(dq, q, do, lse, delta, K + base, V + base, stride_n, offs_m, offs_d, full_hi,
                       tl.cdiv(start_m + BLOCK_M, BLOCK_N) * BLOCK_N, qk_scale, BLOCK_N, True)
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v: expected one shape [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in _ELEMENT:
        raise TypeError(f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    check_tiles(q.shape[3], block_m, block_n)
    if q.shape[2] % block_m or q.shape[2] % block_n:
        raise ValueError(f"q: the length {q.shape[2]} must be a multiple of block_m={block_m} and "
                         f"block_n={block_n}")


def check_tiles(head_dim: int, block_m: int, block_n: int) -> None:
    """The reference needs powers of two >= 16 (tl.dot's smallest dims) for its tiles and head dim."""
    for name, x in (("head_dim", head_dim), ("block_m", block_m), ("block_n", block_n)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {x}")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, *, block_m: int = 64,
            block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse in log2 units [B, H, N], float32) of softmax(q k^T / sqrt(D)) v."""
    _check(q, k, v, block_m, block_n)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    fa2_fwd[(N // block_m, B * H)](q, k, v, out, lse, 1 / math.sqrt(D), *q.stride()[:3], H, N, HEAD_DIM=D,
                                   BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, num_warps=num_warps,
                                   num_stages=num_stages)
    return out, lse


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             dout: torch.Tensor, causal: bool = False, *, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
             num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for `forward`'s (out, lse) and the gradient `dout` of out."""
    _check(q, k, v, block_m, block_n)
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    B, H, N, D = q.shape
    delta = (out.float() * dout.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    launch = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, num_warps=num_warps,
                  num_stages=num_stages)
    scale = 1 / math.sqrt(D)
    fa2_bwd_dkdv[(N // block_n, B * H)](q, k, v, dout, dk, dv, lse, delta, scale, *q.stride()[:3], H, N, **launch)
    fa2_bwd_dq[(N // block_m, B * H)](q, k, v, dout, dq, lse, delta, scale, *q.stride()[:3], H, N, **launch)
    return dq, dk, dv


def cross_compile(kernel: str, arch: int, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                  num_warps: int, num_stages: int, causal: bool = True):
    """One reference kernel compiled for sm_<arch> without a GPU (a CompiledKernel)."""
    from patterngen.backends.triton.cross_compile import compile_kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if dtype not in _ELEMENT:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
    check_tiles(head_dim, block_m, block_n)
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "CAUSAL": causal}
    signature = {}
    for name in globals()[kernel].arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = "*fp32" if name in ("LSE", "DELTA") else f"*{_ELEMENT[dtype]}"
        else:  # upper-case names are tensors, the rest scalars
            signature[name] = "fp32" if name == "sm_scale" else "i32"
    # as a JIT launch on contiguous tensors would specialise: aligned pointers, strides % 16 == 0
    aligned = [i for i, (n, t) in enumerate(signature.items()) if t.startswith("*") or n.startswith("stride")]
    return compile_kernel(path=__file__, kernel=kernel, signature=signature, constexprs=consts, aligned=aligned,
                          arch=arch, num_warps=num_warps, num_stages=num_stages)
