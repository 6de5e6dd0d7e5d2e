"""Which Spec a `transformers` attention call runs: from the config's `patterngen_pattern` (a
pattern, one per layer, or layer_idx -> pattern) or `patterngen_spec` ((layer_idx, q_len,
kv_len) -> Spec), checked against the call's shapes. Shared by the attention function
(patterngen/integrations/transformers.py) and the bounded cache (hf_cache.py)."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

from ..ir import Pattern, Spec, Window, from_json

PATTERN_ATTR = "patterngen_pattern"
SPEC_ATTR = "patterngen_spec"


@functools.lru_cache(maxsize=256)
def _spec_from_pattern(pattern: Pattern, heads: int, kv_heads: int, head_dim: int) -> Spec | None:
    """The layer's length-free Spec, or None for a pattern that needs its extent (a Window)."""
    if any(isinstance(node, Window) for node in pattern.walk()):
        return None
    return Spec(pattern, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@functools.lru_cache(maxsize=256)
def _sized_spec(pattern: Pattern, nq: int, nkv: int, heads: int, kv_heads: int, head_dim: int) -> Spec:
    return Spec(pattern, q_shape=nq, kv_shape=nkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@functools.lru_cache(maxsize=256)
def _spec_from_factory(factory: Callable, layer_idx, nq: int, nkv: int) -> Spec:
    spec = factory(layer_idx, nq, nkv)
    if not isinstance(spec, Spec):
        raise TypeError(f"config.{SPEC_ATTR}: must return a patterngen.Spec, got {type(spec).__name__} "
                        f"for layer {layer_idx} (q_len={nq}, kv_len={nkv})")
    return spec


def _pattern_from_dict(value: dict, where: str = f"config.{PATTERN_ATTR}") -> Pattern:
    """The pattern of a JSON dict form (as config.json stores it), parsed once per distinct text."""
    return _pattern_from_text(json.dumps(value), where)


@functools.lru_cache(maxsize=256)
def _pattern_from_text(text: str, where: str) -> Pattern:
    try:
        pattern = from_json(text)
    except ValueError as e:
        raise ValueError(f"{where}: not a valid patterngen pattern: {e}") from e
    if not isinstance(pattern, Pattern):
        raise ValueError(f"{where}: holds the JSON form of a {type(pattern).__name__}, not of a pattern")
    return pattern


def _layer_pattern(value, layer_idx) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, dict):
        return _pattern_from_dict(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if layer_idx is None or not 0 <= layer_idx < len(value):
            raise ValueError(f"config.{PATTERN_ATTR}: a per-layer sequence of {len(value)} patterns has no "
                             f"entry for layer_idx={layer_idx!r}")
        pattern = value[layer_idx]
        if isinstance(pattern, dict):
            pattern = _pattern_from_dict(pattern, f"config.{PATTERN_ATTR}[{layer_idx}]")
    elif callable(value):
        pattern = value(layer_idx)
    else:
        raise TypeError(f"config.{PATTERN_ATTR}: expected a patterngen pattern, a sequence of patterns (one "
                        f"per layer) or a callable layer_idx -> pattern, got {type(value).__name__}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"config.{PATTERN_ATTR}: layer {layer_idx} gave {pattern!r}, not a patterngen pattern")
    return pattern


def spec_for(config, layer_idx, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int,
             head_dim: int) -> Spec:
    """The Spec one attention call of layer `layer_idx` runs, from the config's pattern
    or spec factory; checked against the call's shapes."""
    pattern = getattr(config, PATTERN_ATTR, None)
    factory = getattr(config, SPEC_ATTR, None)
    if (pattern is None) == (factory is None):
        raise ValueError(f"config: set exactly one of `{PATTERN_ATTR}` (a pattern, per-layer patterns or "
                         f"layer_idx -> pattern) and `{SPEC_ATTR}` ((layer_idx, q_len, kv_len) -> Spec) for "
                         f"the patterngen attention; got {PATTERN_ATTR}={pattern!r}, {SPEC_ATTR}={factory!r}")
    if pattern is not None:
        pattern = _layer_pattern(pattern, layer_idx)
        spec = _spec_from_pattern(pattern, num_heads, num_kv_heads, head_dim)
        return spec if spec is not None else _sized_spec(pattern, q_len, kv_len, num_heads, num_kv_heads, head_dim)
    if not callable(factory):
        raise TypeError(f"config.{SPEC_ATTR}: expected a callable (layer_idx, q_len, kv_len) -> Spec, "
                        f"got {type(factory).__name__}")
    spec = _spec_from_factory(factory, layer_idx, q_len, kv_len)
    lengths = (q_len, kv_len) if spec.length_free else (spec.nq, spec.nkv)  # a length-free spec takes any
    got = (*lengths, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    want = (q_len, kv_len, num_heads, num_kv_heads, head_dim)
    if got != want:
        names = ("q tokens", "kv tokens", "num_heads", "num_kv_heads", "head_dim")
        diff = ", ".join(f"{n} {g} (model: {w})" for n, g, w in zip(names, got, want) if g != w)
        raise ValueError(f"config.{SPEC_ATTR}: the Spec for layer {layer_idx} does not match the model: {diff}")
    return spec
