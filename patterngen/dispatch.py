"""Which backend runs a call, and why.

One place for the decision the op (`patterngen::attention` and its backward) makes on
every call: a generated Triton kernel or the exact reference backend. The checks
return the reason instead of raising or swallowing it (`can_run_kernel`, and the
kernel caches keep why a spec has no kernel), so that `pg.explain` can say what a
call would run and why, and a fallback to the reference is never a silent mystery.
Kernels are built once per (spec, role) and cached; a spec the Triton backend
cannot generate is cached with its reason.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from .ir import Spec

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOCK = threading.Lock()
_KERNELS: dict[tuple[str, str], tuple[object | None, str | None]] = {}


@dataclass(frozen=True)
class Choice:
    """What a call runs: `backend` is "triton" or "reference"; `reason` says why."""

    backend: str
    reason: str

    def __str__(self):
        return f"{self.backend}: {self.reason}"


def is_empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No (query, key) pair at all: zero batch entries, heads, queries or keys."""
    return q.numel() == 0 or k.shape[2] == 0


def can_run_kernel(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """None when the op's generated kernels take these tensors, else why not."""
    if is_empty(q, k):
        return "the input is empty (no query-key pair): the result is zeros with lse -inf"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype}: the Triton kernels take float16, bfloat16 or float32"
    if q.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return f"device {q.device}: the Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)"
        if q.dtype == torch.bfloat16:
            return "bfloat16 under TRITON_INTERPRET=1: the interpreter's tl.dot on bfloat16 is wrong"
    return None


def _build(key: str, role: str):
    from .backends.triton import TritonBackward, TritonForward, TritonHeads, backward_tiling, default_kernel_tiling
    from .registry import lookup_spec
    from .core.tiles import Tiling
    spec = lookup_spec(key)
    if role == "forward":
        return TritonForward(spec)
    if role == "backward":
        fwd = kernel(key, "forward")
        if fwd is None:
            raise NotImplementedError(reason(key, "forward"))
        return TritonBackward(TritonForward(spec, backward_tiling(Tiling(fwd.q_grid.tile, fwd.kv_grid.tile),
                                                                  spec.head_dim, spec)))
    tiling = default_kernel_tiling(spec)
    if role == "heads_backward":
        tiling = backward_tiling(tiling, spec.head_dim)
    return TritonHeads(spec, tiling)


ROLES = ("forward", "backward", "heads_forward", "heads_backward")


def _entry(key: str, role: str) -> tuple[object | None, str | None]:
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    entry = _KERNELS.get((key, role))
    if entry is None:
        try:
            entry = (_build(key, role), None)
        except ImportError as exc:  # a CUDA torch without triton
            entry = (None, f"triton cannot be imported ({exc})")
        except (NotImplementedError, ValueError) as exc:  # the backend's own word on this spec
            entry = (None, str(exc))
        with _LOCK:
            entry = _KERNELS.setdefault((key, role), entry)
    return entry


def kernel(key: str, role: str):
    """The cached Triton kernels of the spec registered under `key` for `role` ("forward",
    "backward": dK/dV and dQ, "heads_forward" / "heads_backward": head-routed MoH), or None
    where the backend does not generate them (`reason` says why)."""
    return _entry(key, role)[0]


def reason(key: str, role: str) -> str | None:
    """Why `kernel(key, role)` is None (None when there is a kernel)."""
    return _entry(key, role)[1]


def choose(key: str, q: torch.Tensor, k: torch.Tensor, *, head_indices: bool = False,
           role: str = "forward") -> Choice:
    """The backend of one op call (forward or backward) for these tensors."""
    why = can_run_kernel(q, k)
    if why is not None:
        return Choice("reference", why)
    role = ("heads_" + role) if head_indices else role
    why = reason(key, role)
    if why is not None:
        return Choice("reference", f"no generated {role.replace('_', ' ')} kernel: {why}")
    return Choice("triton", f"the generated {role.replace('_', ' ')} kernel ({type(kernel(key, role)).__name__})")


def explain(spec: Spec, q: torch.Tensor, k: torch.Tensor | None = None, *, head_indices=None) -> str:
    """What `pg.attention(q, k, v, spec, ...)` runs for these tensors, forward and backward, and why."""
    from .registry import spec_key
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    if not isinstance(q, torch.Tensor) or (k is not None and not isinstance(k, torch.Tensor)):
        raise TypeError("q, k: expected torch.Tensors (k defaults to q's shape with the spec's kv heads and tokens)")
    if k is None:
        k = q.new_empty(q.shape[0], spec.num_kv_heads, spec.nkv, q.shape[-1])
    if q.device.type != "cuda":  # the op's body on other devices (the kernel path is registered for CUDA)
        off = Choice("reference", f"device {q.device}: off CUDA the op runs the exact reference backend")
        return f"forward {off}\nbackward {off}"
    key = spec_key(spec)
    routed = head_indices is not None
    forward = choose(key, q, k, head_indices=routed)
    backward = choose(key, q, k, head_indices=routed, role="backward")
    return f"forward {forward}\nbackward {backward}"


__all__ = ["Choice", "KERNEL_DTYPES", "ROLES", "can_run_kernel", "choose", "explain", "is_empty", "kernel", "reason"]
