"""The process-wide registry of specs by key: how a Spec, which is not a tensor, reaches the op.

The key is derived from the spec's repr, so it is stable across calls and processes
and a compiled graph holds a constant string that never causes a recompile. Under
torch.compile a Spec built inside the compiled function exists only in Dynamo's trace;
its repr, which Dynamo computes, is read back here (`spec_from_repr`).
"""
from __future__ import annotations

import hashlib
import threading

from .ir import Spec
from .ir.parse import parse_repr

_LOCK = threading.Lock()
_SPECS: dict[str, Spec] = {}
_KEYS: dict[Spec, str] = {}


def spec_key(spec: Spec) -> str:
    """The registry key of `spec` (registering it on first use): equal specs share a key."""
    key = _KEYS.get(spec)
    if key is not None:
        return key
    with _LOCK:
        if spec in _KEYS:
            return _KEYS[spec]
        base = "pg-" + hashlib.sha256(repr(spec).encode()).hexdigest()[:20]
        key, n = base, 0
        while key in _SPECS:  # two unequal specs with one repr: keep them apart
            n += 1
            key = f"{base}-{n}"
        _SPECS[key] = spec
        _KEYS[spec] = key
        return key


def lookup_spec(key: str) -> Spec:
    """The spec registered under `key` (by `spec_key` in this process)."""
    try:
        return _SPECS[key]
    except KeyError:
        raise ValueError(f"spec_key: {key!r} names no registered spec; register it with "
                         f"patterngen.registry.spec_key(spec) in this process first") from None


_REBUILT: dict[str, Spec] = {}


def spec_from_repr(text: str) -> Spec:
    """The Spec whose repr is `text`, rebuilt from that Python with the IR's constructors.

    For torch.compile: a Spec built inside compiled code (directly, or by a cached factory that
    Dynamo traces through) exists only in Dynamo's trace, so eager code receives its repr, a
    string Dynamo computes; every IR object prints as the Python that builds it."""
    spec = _REBUILT.get(text)
    if spec is not None:
        return spec
    try:
        spec = parse_repr(text)
    except ValueError as e:
        raise ValueError(f"spec: a Spec built inside torch.compile is rebuilt from its repr, and that failed: "
                         f"{e}; build the Spec outside the compiled function") from None
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got the pattern {text[:200]}")
    with _LOCK:
        return _REBUILT.setdefault(text, spec)



__all__ = ["lookup_spec", "spec_from_repr", "spec_key"]
