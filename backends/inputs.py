"""Checks shared by every backend: the tensors and the scale a spec is called with."""
from __future__ import annotations

import math

import torch

from ..ir import Spec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -- validation --------------------------------------------------------------------
def check_inputs(q, k, v, spec: Spec) -> None:
    """q [B, Hq, Nq, D], k and v [B, Hkv, Nkv, D] of one float dtype and device, as `spec` says."""
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
    if k.shape[0] != B:
        raise ValueError(f"k: batch size {k.shape[0]} differs from q's {B}")
    expected = (("q", "heads", Hq, spec.num_heads, "spec.num_heads"),
                ("q", "tokens", Nq, spec.nq, f"spec.nq (q_shape={spec.q_shape})"),
                ("q", "head_dim", D, spec.head_dim, "spec.head_dim"),
                ("k", "heads", k.shape[1], spec.num_kv_heads, "spec.num_kv_heads"),
                ("k", "tokens", k.shape[2], spec.nkv, f"spec.nkv (kv_shape={spec.kv_shape})"),
                ("k", "head_dim", k.shape[3], spec.head_dim, "spec.head_dim"))
    for name, what, got, want, src in expected:
        if got != want:
            raise ValueError(f"{name}: has {got} {what} (shape {tuple((q if name == 'q' else k).shape)}) but the "
                             f"spec needs {want} = {src}")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: None means 1/sqrt(head_dim), otherwise a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a positive float or None, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be a positive finite number (or None for 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)
