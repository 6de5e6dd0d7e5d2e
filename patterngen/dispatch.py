"""Which backend runs a call, and why.

One place for the decisions of the op (`patterngen::attention` and its backward) and of
`pg.compile`'s kernels: a Triton kernel (generated here, or loaded from a build by
`pg.load`) or the exact reference backend. The checks return the reason instead of
raising or swallowing it (`can_run_kernel`, and the kernel caches keep why a spec has no
kernel), so that `pg.explain` says what a call would run and why, and `calls` counts what
ran. Kernels are built once per (spec, role, variant) and cached (the `MAX_KERNELS` most
recently used); a spec the Triton backend cannot generate is cached with its reason.

A length-free spec (no q_shape) has two kernels per role, whatever the lengths: a decode
kernel of `DECODE_ROWS`-row q tiles for calls with at most that many queries, and a prefill
kernel on the tiling policy's choice at `TYPICAL_LENGTH` tokens.

Off CUDA the op runs the reference backend, except under TRITON_INTERPRET=1 for kernels
loaded from a build and within `kernels_on_cpu()`, where the kernels run in the Triton
interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .backends.inputs import interpreter_dtype_problem
from .ir import Spec

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROLES = ("forward", "backward", "heads_forward", "heads_backward")

MAX_KERNELS = 128
"""Kernel cache entries kept: (spec, role, variant) -> (kernel, reason); the least recently used
go first (their sources stay in the on-disk cache, so a rebuild imports, never regenerates)."""
DECODE_ROWS = 16
"""A length-free spec's calls with at most this many queries run its decode kernel (16-row q
tiles, the least `tl.dot` takes), longer ones its prefill kernel."""
TYPICAL_LENGTH = 4096
"""The length at which the simulator ranks a length-free spec's tilings for its prefill kernel."""
RANKED_TILINGS = 64
"""How far down the simulator's ranking the policy looks for a tiling the forward holds in
registers (on large grids, every box of its first few choices may be too large)."""

_LOCK = threading.Lock()
_KERNELS: OrderedDict[tuple[str, str, str], tuple[object | None, str | None]] = OrderedDict()
_LOADED: dict[str, object] = {}  # a registry of the builds a user loaded, not a cache: never evicted
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


@functools.lru_cache(maxsize=MAX_KERNELS)
def policy_tiling(spec: Spec, variant: str = ""):
    """The tiling policy on the simulator's ranking, once per spec whatever the roles built:
    the tiles `patterngen build`, `pg.compile` (untuned, or first to time) and the op use. The
    first ranked tiling whose score and output accumulators the forward holds in registers
    (`fits_forward`; a routing block is kept as it is). A length-free spec is ranked at
    TYPICAL_LENGTH tokens; its decode variant has DECODE_ROWS query rows and that kv tile, at
    most 64 keys from head dim 128 on (a 128-key tile spills there)."""
    from .core.tiles import Tiling
    if not spec.length_free:
        return _first_fitting(spec)
    prefill = _first_fitting(spec.bind(TYPICAL_LENGTH, TYPICAL_LENGTH))
    if variant == "decode" and spec.routed is None:
        return Tiling(DECODE_ROWS, min(prefill.kv_tile, 64) if spec.head_dim >= 128 else prefill.kv_tile)
    return prefill


def _first_fitting(spec: Spec):
    from .backends.triton.config import fits_forward
    from .sim import ranked_kernel_tilings
    ranked = ranked_kernel_tilings(spec, limit=RANKED_TILINGS)
    return next((t for t in ranked if fits_forward(t, spec.head_dim)), ranked[0])


def forward_tiling(key: str, variant: str = ""):
    """`policy_tiling` of the spec whose JSON text is `key`."""
    from .registry import lookup_spec
    return policy_tiling(lookup_spec(key), variant)


def variant(key: str, q: torch.Tensor) -> str:
    """Which of a spec's kernels serves q: "" for a fixed-length spec, else "decode" for at
    most DECODE_ROWS queries and "prefill" above."""
    from .registry import lookup_spec
    if not lookup_spec(key).length_free:
        return ""
    return "decode" if q.shape[2] <= DECODE_ROWS else "prefill"


def _build(key: str, role: str, var: str):
    from .backends.triton import TritonBackward, TritonForward, TritonHeads, backward_tiling
    from .registry import lookup_spec
    spec = lookup_spec(key)
    if var.startswith("tiling:"):
        from .backends.triton.config import tiling_from_json
        tiling = tiling_from_json(json.loads(var[len("tiling:"):]))
    else:
        tiling = forward_tiling(key, var)
    if role == "forward":
        return TritonForward(spec, tiling)
    if role == "backward":
        if kernel(key, "forward", var) is None:
            raise NotImplementedError(reason(key, "forward", var))
        return TritonBackward(TritonForward(spec, backward_tiling(tiling, spec.head_dim, spec)))
    if role == "heads_backward":
        tiling = backward_tiling(tiling, spec.head_dim)
    return TritonHeads(spec, tiling)


def _recall(slot: tuple) -> tuple[object | None, str | None] | None:
    """The kernel cache's entry for `slot`, marked most recently used, or None."""
    with _LOCK:
        entry = _KERNELS.get(slot)
        if entry is not None:
            _KERNELS.move_to_end(slot)
        return entry


def _remember(slot: tuple, entry: tuple[object | None, str | None]) -> tuple[object | None, str | None]:
    """Keep `entry` for `slot` (a racing thread's entry wins), dropping the least recently used."""
    with _LOCK:
        entry = _KERNELS.setdefault(slot, entry)
        while len(_KERNELS) > MAX_KERNELS:
            _KERNELS.popitem(last=False)
        return entry


def _entry(key: str, role: str, var: str = "") -> tuple[object | None, str | None]:
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    slot = (key, role, var)
    entry = _recall(slot)
    if entry is not None:
        return entry
    try:
        entry = (_build(key, role, var), None)
    except ImportError as exc:  # a CUDA torch without triton
        entry = (None, f"triton cannot be imported ({exc})")
    except (NotImplementedError, ValueError) as exc:  # the backend's own word on this spec
        entry = (None, str(exc))
    return _remember(slot, entry)


def kernel(key: str, role: str, var: str = ""):
    """The cached generated Triton kernels of the spec `key` (its JSON text) for `role`
    ("forward", "backward": dK/dV and dQ, "heads_forward" / "heads_backward": head-routed
    MoH) and `variant`, or None where the backend does not generate them (`reason` says why)."""
    return _entry(key, role, var)[0]


def reason(key: str, role: str, var: str = "") -> str | None:
    """Why `kernel(key, role, variant)` is None (None when there is a kernel)."""
    return _entry(key, role, var)[1]


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


def compile_options(backend: str = "auto", tiling=None) -> str:
    """The op's `options` text for a `pg.compile` kernel: its backend, and its tiling or, where it
    names none, the autotuner's choice."""
    from .backends.triton.config import tiling_json
    return json.dumps({"backend": backend, "tiling": None if tiling is None else tiling_json(tiling)})


@functools.lru_cache(maxsize=MAX_KERNELS)
def read_options(options: str) -> tuple[str, object, bool]:
    """(backend, tiling or None, tune) of an `options` text; "" is pg.attention's (auto, policy)."""
    if not options:
        return "auto", None, False
    from .backends.triton.config import tiling_from_json
    data = json.loads(options)
    tiling = None if data["tiling"] is None else tiling_from_json(data["tiling"])
    return data["backend"], tiling, tiling is None


def _tuned(key: str, var: str, q, k, v, block_indices):
    """The autotuned forward of a pg.compile kernel without a tiling, per device, dtype and batch
    bucket (timed once, then read from the on-disk tuning cache)."""
    from .analysis.tiling import pow2_ceil
    slot = (key, "forward", f"tune:{q.device}:{q.dtype}:{pow2_ceil(q.shape[0])}:{var}")
    entry = _recall(slot)
    if entry is None:
        from .backends.triton import tuned_kernel
        from .registry import lookup_spec
        from .sim import ranked_kernel_tilings
        spec = lookup_spec(key)
        ranked = [forward_tiling(key, var)]  # the policy's choice first: what runs without a GPU to time on
        if not spec.length_free:
            ranked += [t for t in ranked_kernel_tilings(spec) if t not in ranked]
        entry = _remember(slot, (tuned_kernel(spec, q, k, v, block_indices, tilings=ranked), None))
    return entry[0]


def choose(key: str, q: torch.Tensor, k: torch.Tensor, *, head_indices: bool = False, role: str = "forward",
           lse_grad: bool = False, options: str = "", v: torch.Tensor | None = None,
           block_indices: torch.Tensor | None = None) -> Choice:
    """The backend of one op call (forward, or backward with `lse_grad` when a gradient flows
    into the lse) for these tensors; `options` are a pg.compile kernel's (`compile_options`):
    backend "reference" always runs the reference, "triton" the kernels or raises why not."""
    backend, tiling, tune = read_options(options)
    if backend == "reference":
        return Choice("reference", "backend='reference'", role)
    refusal = _refusal(q, k)
    if refusal is not None:
        if backend == "triton":
            raise refusal[0](f"backend='triton': {refusal[1]}")
        return Choice("reference", refusal[1], role)
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
    if q.device.type != "cuda" and not _ON_CPU[0] and backend != "triton":
        detail = f" ({why_not_loaded})" if why_not_loaded else ""
        return Choice("reference", f"device {q.device}: off CUDA the op runs the exact reference backend{detail}",
                      role)
    var = variant(key, q)
    if tiling is not None:
        from .backends.triton.config import tiling_json
        var = "tiling:" + json.dumps(tiling_json(tiling))
    elif tune and role == "forward" and v is not None:
        kern = _tuned(key, var, q, k, v, block_indices)
        return Choice("triton", f"the autotuned forward kernel ({type(kern).__name__})", role, kern)
    why = reason(key, role, var)
    if why is not None:
        if backend == "triton":
            raise NotImplementedError(f"backend='triton': no generated {name} kernel: {why}")
        return Choice("reference", f"no generated {name} kernel: {why}", role)
    kern = kernel(key, role, var)
    what = f" ({var.split(':')[0]} variant)" if var else ""
    return Choice("triton", f"the generated {name} kernel{what} ({type(kern).__name__})", role, kern)


def explain(spec: Spec, q: torch.Tensor, k: torch.Tensor | None = None, *, head_indices=None) -> str:
    """What `pg.attention(q, k, v, spec, ...)` runs for these tensors, forward and backward, and why."""
    from .registry import spec_key
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    if not isinstance(q, torch.Tensor) or (k is not None and not isinstance(k, torch.Tensor)):
        raise TypeError("q, k: expected torch.Tensors (k defaults to q's shape with the spec's kv heads and tokens)")
    if k is None:
        nkv = q.shape[2] if spec.length_free else spec.nkv
        k = q.new_empty(q.shape[0], spec.num_kv_heads, nkv, q.shape[-1])
    key = spec_key(spec)
    routed = head_indices is not None
    forward = choose(key, q, k, head_indices=routed)
    backward = choose(key, q, k, head_indices=routed, role="backward")
    return f"forward {forward}\nbackward {backward}"


__all__ = ["Choice", "KERNEL_DTYPES", "ROLES", "calls", "can_run_kernel", "choose", "compile_options", "explain",
           "is_empty", "kernel", "kernels_on_cpu", "reason", "register_loaded"]
