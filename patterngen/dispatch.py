"""Which backend runs a call, and why.

One place for the decisions of the op (`patterngen::attention` and its backward) and of
`pg.compile`'s kernels: a Triton kernel (generated here, or loaded from a build by
`pg.load`) or the exact reference backend. The checks return the reason instead of
raising or swallowing it (`can_run_kernel`, and the kernel caches keep why a spec has no
kernel), so that `pg.explain` says what a call would run and why, and `calls` counts what
ran. Kernels are built once per (spec, role) and cached; a spec the Triton backend cannot
generate is cached with its reason.

Off CUDA the op runs the reference backend, except under TRITON_INTERPRET=1 for kernels
loaded from a build and within `kernels_on_cpu()`, where the kernels run in the Triton
interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .backends.inputs import interpreter_dtype_problem
from .ir import Spec

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROLES = ("forward", "backward", "heads_forward", "heads_backward")

_LOCK = threading.Lock()
_KERNELS: dict[tuple[str, str], tuple[object | None, str | None]] = {}
_LOADED: dict[str, object] = {}
_ON_CPU = [0]

calls: Counter = Counter()
"""What the op ran, by (role, kind): kind is "triton" (a generated kernel), "loaded" (a kernel
loaded from a build) or "reference"."""


@dataclass(frozen=True)
class Choice:
    """What a call runs: `backend` is "triton" or "reference"; `reason` says why; `kernel`
    is the kernel to launch (None for the reference); `loaded` marks a kernel from a build."""

    backend: str
    reason: str
    role: str = "forward"
    kernel: object = field(default=None, compare=False, repr=False)
    loaded: bool = False

    @property
    def kind(self) -> str:
        return "loaded" if self.loaded else self.backend

    def __str__(self):
        return f"{self.backend}: {self.reason}"


def is_empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No (query, key) pair at all: zero batch entries, heads, queries or keys."""
    return q.numel() == 0 or k.shape[2] == 0


def _refusal(q: torch.Tensor, k: torch.Tensor) -> tuple[type, str] | None:
    if is_empty(q, k):
        return ValueError, "the input is empty (no query-key pair): the result is zeros with lse -inf"
    if q.dtype not in KERNEL_DTYPES:
        return TypeError, f"dtype {q.dtype}: the Triton kernels take float16, bfloat16 or float32"
    if q.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ValueError, (f"device {q.device}: the Triton kernels run on CUDA tensors (or on the CPU "
                                f"under TRITON_INTERPRET=1)")
        problem = interpreter_dtype_problem(q)
        if problem is not None:
            return TypeError, problem
    return None


def can_run_kernel(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """None when the Triton kernels take these tensors, else why not."""
    refusal = _refusal(q, k)
    return None if refusal is None else refusal[1]


@functools.lru_cache(maxsize=1024)
def _forward_tiling(key: str):
    """The tiling policy on the simulator's ranking, once per spec whatever the roles built:
    the tiles `patterngen build` and an untuned `pg.compile` use too."""
    from .registry import lookup_spec
    from .sim import ranked_kernel_tilings
    return ranked_kernel_tilings(lookup_spec(key))[0]


def _build(key: str, role: str):
    from .backends.triton import TritonBackward, TritonForward, TritonHeads, backward_tiling
    from .registry import lookup_spec
    spec = lookup_spec(key)
    tiling = _forward_tiling(key)
    if role == "forward":
        return TritonForward(spec, tiling)
    if role == "backward":
        if kernel(key, "forward") is None:
            raise NotImplementedError(reason(key, "forward"))
        return TritonBackward(TritonForward(spec, backward_tiling(tiling, spec.head_dim, spec)))
    if role == "heads_backward":
        tiling = backward_tiling(tiling, spec.head_dim)
    return TritonHeads(spec, tiling)


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
    """The cached generated Triton kernels of the spec registered under `key` for `role`
    ("forward", "backward": dK/dV and dQ, "heads_forward" / "heads_backward": head-routed
    MoH), or None where the backend does not generate them (`reason` says why)."""
    return _entry(key, role)[0]


def reason(key: str, role: str) -> str | None:
    """Why `kernel(key, role)` is None (None when there is a kernel)."""
    return _entry(key, role)[1]


def register_loaded(key: str, kernels) -> None:
    """Run the kernels of a build (`pg.load`) for the spec registered under `key`:
    `kernels.select(role, q)` gives (kernel, what it is) for q's arch and dtype, or
    (None, why none); the op then prefers them to generating its own."""
    with _LOCK:
        _LOADED[key] = kernels


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Within it, the op runs its generated kernels on CPU tensors in the Triton interpreter
    (TRITON_INTERPRET=1, set before triton is imported), as it does on CUDA."""
    with _LOCK:
        _ON_CPU[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ON_CPU[0] -= 1


def choose(key: str, q: torch.Tensor, k: torch.Tensor, *, head_indices: bool = False, role: str = "forward",
           lse_grad: bool = False) -> Choice:
    """The backend of one op call (forward, or backward with `lse_grad` when a gradient flows
    into the lse) for these tensors."""
    why = can_run_kernel(q, k)
    if why is not None:
        return Choice("reference", why, role)
    if lse_grad:
        return Choice("reference", "a gradient flows into the lse, which the Triton backward does not take: "
                                   "the reference under autograd", role)
    role = ("heads_" + role) if head_indices else role
    name = role.replace("_", " ")
    loaded, why_not_loaded = _LOADED.get(key), None
    if loaded is not None:
        kern, what = loaded.select(role, q)
        if kern is not None:
            return Choice("triton", what, role, kern, loaded=True)
        why_not_loaded = what
    if q.device.type != "cuda" and not _ON_CPU[0]:
        detail = f" ({why_not_loaded})" if why_not_loaded else ""
        return Choice("reference", f"device {q.device}: off CUDA the op runs the exact reference backend{detail}",
                      role)
    why = reason(key, role)
    if why is not None:
        return Choice("reference", f"no generated {name} kernel: {why}", role)
    kern = kernel(key, role)
    return Choice("triton", f"the generated {name} kernel ({type(kern).__name__})", role, kern)


def choose_compiled(backend: str, q: torch.Tensor, k: torch.Tensor, *, needs_grad: bool,
                    head_indices: bool = False, routed: bool = False) -> Choice:
    """What a `pg.compile` kernel of `backend` runs (its Triton kernel is forward only):
    "triton" its kernel, raising what keeps it from these tensors; "auto" the kernel for
    CUDA tensors when no gradient is needed; "reference" the reference."""
    if backend == "reference":
        return Choice("reference", "backend='reference'")
    refusal = _refusal(q, k)
    if refusal is None and head_indices and routed:
        refusal = NotImplementedError, "head_indices with a Routed spec: the head-routed kernels are not generated"
    if backend == "triton":
        if refusal is not None:
            raise refusal[0](f"backend='triton': {refusal[1]}")
        return Choice("triton", "backend='triton'")
    if refusal is not None:
        return Choice("reference", refusal[1])
    if not q.is_cuda:
        return Choice("reference", f"backend='auto': device {q.device} runs the reference backend")
    if needs_grad:
        return Choice("reference", "backend='auto': a gradient is needed and the kernel is forward only")
    return Choice("triton", "backend='auto': CUDA tensors, no gradient")


def explain(spec: Spec, q: torch.Tensor, k: torch.Tensor | None = None, *, head_indices=None) -> str:
    """What `pg.attention(q, k, v, spec, ...)` runs for these tensors, forward and backward, and why."""
    from .registry import spec_key
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    if not isinstance(q, torch.Tensor) or (k is not None and not isinstance(k, torch.Tensor)):
        raise TypeError("q, k: expected torch.Tensors (k defaults to q's shape with the spec's kv heads and tokens)")
    if k is None:
        k = q.new_empty(q.shape[0], spec.num_kv_heads, spec.nkv, q.shape[-1])
    key = spec_key(spec)
    routed = head_indices is not None
    forward = choose(key, q, k, head_indices=routed)
    backward = choose(key, q, k, head_indices=routed, role="backward")
    return f"forward {forward}\nbackward {backward}"


__all__ = ["Choice", "KERNEL_DTYPES", "ROLES", "calls", "can_run_kernel", "choose", "choose_compiled", "explain",
           "is_empty", "kernel", "kernels_on_cpu", "reason", "register_loaded"]
