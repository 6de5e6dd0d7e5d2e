"""Checks shared by every backend: the tensors and the scale a spec is called with."""
from __future__ import annotations

import math

import torch

from ..ir import Spec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -- validation --------------------------------------------------------------------
def check_inputs(q, k, v, spec: Spec, paged: bool = False) -> None:
    """q [B, Hq, Nq, D], k and v [B, Hkv, Nkv, D] of one float dtype and device, as `spec` says
    (any Nq and Nkv for a length-free spec: they are never compared, so symbolic lengths stay so);
    `paged`: k and v are caches [pages, Hkv, page_size, D]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, heads, tokens, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported (valid: float16, bfloat16, float32, float64)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}; q, k and v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} differs from q's {q.device}; q, k and v must share a device")
    if k.shape != v.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}; k and v must match")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B and not paged:
        raise ValueError(f"k: batch size {k.shape[0]} differs from q's {B}")
    expected = [("q", "heads", Hq, spec.num_heads, "spec.num_heads"),
                ("q", "head_dim", D, spec.head_dim, "spec.head_dim"),
                ("k", "heads", k.shape[1], spec.num_kv_heads, "spec.num_kv_heads"),
                ("k", "head_dim", k.shape[3], spec.head_dim, "spec.head_dim")]
    if not spec.length_free:
        expected += [("q", "tokens", Nq, spec.nq, f"spec.nq (q_shape={spec.q_shape})"),
                     ("k", "tokens", k.shape[2], spec.nkv, f"spec.nkv (kv_shape={spec.kv_shape})")]
    for name, what, got, want, src in expected:
        if got != want:
            raise ValueError(f"{name}: has {got} {what} (shape {tuple((q if name == 'q' else k).shape)}) but the "
                             f"spec needs {want} = {src}")


def check_head_indices(head_indices, q) -> None:
    """Shape, dtype and device of run-time head routing: integers [B, Nq, k] (k >= 1) on q's device.
    The values are checked where they are used (`head_selection`), to keep this free of syncs."""
    if head_indices is None:
        return
    if not isinstance(head_indices, torch.Tensor):
        raise TypeError(f"head_indices: expected a torch.Tensor or None, got {type(head_indices).__name__}")
    if head_indices.dtype.is_floating_point or head_indices.dtype.is_complex or head_indices.dtype == torch.bool:
        raise TypeError(f"head_indices: expected an integer tensor, got dtype {head_indices.dtype}")
    B, _, Nq, _ = q.shape
    if head_indices.dim() != 3 or head_indices.shape[:2] != (B, Nq) or head_indices.shape[2] < 1:
        raise ValueError(f"head_indices: expected shape [B={B}, Nq={Nq}, k] with k >= 1 (the heads each query "
                         f"token uses, -1 for an unused slot), got {tuple(head_indices.shape)}")
    if head_indices.device != q.device:
        raise ValueError(f"head_indices: device {head_indices.device} differs from q's {q.device}")


def check_head_values(head_indices: torch.Tensor, num_heads: int) -> None:
    """Head indices lie in [-1, H): a kernel would silently skip any other value. (Reads the
    extremes back from the device: one sync.)"""
    lo, hi = (int(head_indices.min()), int(head_indices.max())) if head_indices.numel() else (0, 0)
    if lo < -1 or hi >= num_heads:
        raise ValueError(f"head_indices: values must lie in [-1, {num_heads}) (a head index, or -1 for an unused "
                         f"slot), got values in [{lo}, {hi}]")


def head_selection(head_indices: torch.Tensor, num_heads: int) -> torch.Tensor:
    """bool [B, H, Nq]: whether token n uses head h, from head indices [B, Nq, k] in [-1, H)
    (-1: an unused slot; a head listed twice is chosen once)."""
    check_head_values(head_indices, num_heads)
    idx = torch.where(head_indices < 0, num_heads, head_indices).long()
    B, Nq, _ = head_indices.shape
    chosen = torch.zeros(B, Nq, num_heads + 1, dtype=torch.bool, device=head_indices.device)
    chosen.scatter_(2, idx, True)
    return chosen[..., :num_heads].transpose(1, 2)


def _check_per_head(name: str, t, q: torch.Tensor, num_heads: int, what: str, head_indices) -> None:
    """A float tensor [num_heads] on q's device (one `what` per query head), not with head_indices."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [{num_heads}] (one {what} per query head) or None, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != (num_heads,):
        raise ValueError(f"{name}: expected shape [{num_heads}] (one {what} per query head), got {list(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    if head_indices is not None:
        raise ValueError(f"{name}: not supported together with head_indices yet")


def check_sinks(sinks, q: torch.Tensor, num_heads: int, head_indices) -> None:
    """Learned sink logits: a float tensor [Hq] on q's device, or None."""
    if sinks is not None:
        _check_per_head("sinks", sinks, q, num_heads, "logit", head_indices)


def check_softcap(softcap) -> float | None:
    """Gemma 2's logit cap: None, or a positive finite number c (scores become c * tanh(score / c))."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a positive float or None, got {softcap!r} ({type(softcap).__name__})")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap: must be a positive finite number (or None for no cap), got {softcap!r}")
    return float(softcap)


def check_alibi_slopes(slopes, q: torch.Tensor, spec: Spec, head_indices) -> None:
    """ALiBi slopes: a float tensor [Hq] on q's device, for a 1-D spec (the bias reads token
    distances, which a flattened n-D grid does not have), or None."""
    if slopes is None:
        return
    _check_per_head("alibi_slopes", slopes, q, spec.num_heads, "slope", head_indices)
    if spec.ndim != 1:
        raise ValueError(f"alibi_slopes: needs a 1-D spec (distances |i - j| between tokens), but {spec!r} has "
                         f"{spec.ndim} dimensions")


def check_score_mods(softcap, alibi_slopes, q: torch.Tensor, spec: Spec, head_indices) -> float | None:
    """Both score modifications checked; returns the softcap as a float (or None)."""
    softcap = check_softcap(softcap)
    if softcap is not None and head_indices is not None:
        raise ValueError("softcap: not supported together with head_indices yet")
    check_alibi_slopes(alibi_slopes, q, spec, head_indices)
    return softcap


def _check_index(name: str, t, shape: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor {shape} or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32 (as FlashAttention and vLLM take it; convert with "
                        f".to(torch.int32)), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected shape {shape}, got {list(t.shape)}")


def check_segments(q, k, spec: Spec, cu_seqlens_q, cu_seqlens_k, kv_lens, block_table, block_indices,
                   kv_offsets=None) -> bool:
    """Shapes, dtypes and devices of packed documents (cu_seqlens_q/k), valid key lengths
    (kv_lens, with kv_offsets: where they start) and a paged cache (block_table; k and v are
    then the caches); their values are read where they are used (`patterngen.segments`).
    Returns whether the call is made of pieces."""
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if kv_offsets is not None and (kv_lens is None or block_table is not None):
        raise ValueError("kv_offsets: needs kv_lens (entry b's keys are k[b, :, kv_offsets[b]:kv_offsets[b] + "
                         "kv_lens[b]]) and is not taken with a block_table")
    if block_table is not None and kv_lens is None:
        raise ValueError("block_table: a paged cache needs kv_lens (the number of keys of each batch entry)")
    if not packed and kv_lens is None:
        return False
    if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q, cu_seqlens_k: packed documents need both (cumulative query and key lengths)")
    if packed and kv_lens is not None:
        raise ValueError("kv_lens: not taken together with cu_seqlens_q/k (each document's lengths are its own)")
    if not spec.length_free or spec.ndim != 1:
        what = "cu_seqlens_q/k" if packed else "kv_lens"
        raise ValueError(f"{what}: the spec applies to pieces of different lengths, so it must be a length-free 1-D "
                         f"spec (Spec(pattern, num_heads=..., head_dim=...)), got {spec!r}")
    if spec.routed is not None or block_indices is not None:
        raise ValueError(f"{'cu_seqlens_q/k' if packed else 'kv_lens'}: not supported with Routed patterns yet")
    tensors = [("cu_seqlens_q", cu_seqlens_q, "[documents + 1]", 1), ("cu_seqlens_k", cu_seqlens_k,
                                                                     "[documents + 1]", 1)] if packed else \
        [("kv_lens", kv_lens, f"[B={q.shape[0]}]", 1)] + ([("block_table", block_table, "[B, max_pages]", 2)]
                                                         if block_table is not None else []) + \
        ([("kv_offsets", kv_offsets, f"[B={q.shape[0]}]", 1)] if kv_offsets is not None else [])
    for name, t, shape, dims in tensors:
        _check_index(name, t, shape, dims)
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    if packed:
        if q.shape[0] != 1:
            raise ValueError(f"q: packed documents come as one batch entry [1, heads, total tokens, head_dim], got "
                             f"shape {tuple(q.shape)}")
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0] or cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q, cu_seqlens_k: expected the same number (>= 2) of entries, documents + 1, "
                             f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    else:
        for name, t in (("kv_lens", kv_lens), ("block_table", block_table), ("kv_offsets", kv_offsets)):
            if t is not None and t.shape[0] != q.shape[0]:
                raise ValueError(f"{name}: expected one row per batch entry ({q.shape[0]}), got shape {list(t.shape)}")
    return True


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: None means 1/sqrt(head_dim), otherwise a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a positive float or None, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be a positive finite number (or None for 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def interpreter_dtype_problem(q: torch.Tensor) -> str | None:
    """Why the kernels must not run on `q` under the Triton interpreter (CPU tensors), or None:
    its tl.dot on bfloat16 is wrong in Triton 3.9 itself (errors near 1e9 even for a dense
    tile), so the numbers would be garbage."""
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        return ("bfloat16 is not run under TRITON_INTERPRET=1: the Triton interpreter computes tl.dot on "
                "bfloat16 wrongly (a Triton bug), so its results cannot be trusted; use float16 or float32 on "
                "the interpreter, or bfloat16 on a CUDA GPU")
    return None
