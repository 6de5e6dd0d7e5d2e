"""How a Spec, which is not a tensor, reaches the op: as its JSON text.

The op `patterngen::attention` takes the spec's JSON form (`spec_key`), so a compiled or
exported graph holds the whole spec as a constant string: it never recompiles because of
the spec, and an exported program or AOTInductor package runs in a fresh process that
only imports patterngen. Reading the text back (`lookup_spec`) is cached, as is the text of
a spec; under torch.compile a Spec built inside the compiled function exists only in
Dynamo's trace, and its repr, which Dynamo computes, is read back here (`spec_from_repr`).

Caches (least recently used first out): `MAX_SPECS` texts per direction.
"""
from __future__ import annotations

import functools

from .ir import Spec
from .ir.parse import parse_repr
from .ir.serialize import from_json

MAX_SPECS = 256


@functools.lru_cache(maxsize=MAX_SPECS)
def spec_key(spec: Spec) -> str:
    """The op's text for `spec`: its JSON form (equal specs give equal text)."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    return spec.to_json()


@functools.lru_cache(maxsize=MAX_SPECS)
def lookup_spec(key: str) -> Spec:
    """The Spec of the op's text `key` (`spec_key`)."""
    try:
        spec = from_json(key)
    except ValueError as e:
        raise ValueError(f"spec: the op's spec argument is not a Spec's JSON form: {e}") from None
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: the op's spec argument holds a pattern, not a Spec: {key[:200]}")
    return spec


@functools.lru_cache(maxsize=MAX_SPECS)
def spec_from_repr(text: str) -> Spec:
    """The Spec whose repr is `text`, rebuilt from that Python with the IR's constructors.

    For torch.compile: a Spec built inside compiled code (directly, or by a cached factory that
    Dynamo traces through) exists only in Dynamo's trace, so eager code receives its repr, a
    string Dynamo computes; every IR object prints as the Python that builds it."""
    try:
        spec = parse_repr(text)
    except ValueError as e:
        raise ValueError(f"spec: a Spec built inside torch.compile is rebuilt from its repr, and that failed: "
                         f"{e}; build the Spec outside the compiled function") from None
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got the pattern {text[:200]}")
    return spec


__all__ = ["MAX_SPECS", "lookup_spec", "spec_from_repr", "spec_key"]
