"""patterngen as a Hugging Face `transformers` attention implementation.

    import patterngen as pg
    from patterngen.integrations.transformers import register

    register()                                    # name "patterngen"
    config.patterngen_pattern = (pg.Sink(4) | pg.Band(1023)) & pg.Causal()
    model = LlamaForCausalLM._from_config(config, attn_implementation="patterngen")

The model's attention modules then call `pg.attention` with a Spec built for
the actual query and key lengths of each call (prefill and decoding differ),
with the model's head counts and head dim; Specs are cached per length.

The pattern comes from the model config, read at every call (so it can be
changed after loading):

- `config.patterngen_pattern`: one pattern for every layer, a sequence with one
  pattern per layer, or a callable `layer_idx -> pattern`. Sequences are 1-D;
  Causal and Band align the last query with the last key, as decoding with a
  KV cache needs.
- `config.patterngen_spec`: a callable `(layer_idx, q_len, kv_len) -> Spec` for
  full control (n-D grids, cross attention); its Spec is checked against the
  model's heads, head dim and the call's lengths.

What it refuses rather than silently ignoring: padding (a 2-D attention mask
with zeros), custom 4-D attention masks, attention dropout, soft-capping and
learned sink logits, none of which `pg.attention` takes. Patterns live on the
config object; they are not JSON, so remove them before `save_pretrained`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ..api import attention
from ..ir import Pattern, Spec

PATTERN_ATTR = "patterngen_pattern"
SPEC_ATTR = "patterngen_spec"


@functools.lru_cache(maxsize=256)
def _spec_from_pattern(pattern: Pattern, nq: int, nkv: int, heads: int, kv_heads: int, head_dim: int) -> Spec:
    return Spec(pattern, q_shape=nq, kv_shape=nkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@functools.lru_cache(maxsize=256)
def _spec_from_factory(factory: Callable, layer_idx, nq: int, nkv: int) -> Spec:
    spec = factory(layer_idx, nq, nkv)
    if not isinstance(spec, Spec):
        raise TypeError(f"config.{SPEC_ATTR}: must return a patterngen.Spec, got {type(spec).__name__} "
                        f"for layer {layer_idx} (q_len={nq}, kv_len={nkv})")
    return spec


def _layer_pattern(value, layer_idx) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if layer_idx is None or not 0 <= layer_idx < len(value):
            raise ValueError(f"config.{PATTERN_ATTR}: a per-layer sequence of {len(value)} patterns has no "
                             f"entry for layer_idx={layer_idx!r}")
        pattern = value[layer_idx]
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
        return _spec_from_pattern(_layer_pattern(pattern, layer_idx), q_len, kv_len, num_heads, num_kv_heads,
                                  head_dim)
    if not callable(factory):
        raise TypeError(f"config.{SPEC_ATTR}: expected a callable (layer_idx, q_len, kv_len) -> Spec, "
                        f"got {type(factory).__name__}")
    spec = _spec_from_factory(factory, layer_idx, q_len, kv_len)
    got = (spec.nq, spec.nkv, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    want = (q_len, kv_len, num_heads, num_kv_heads, head_dim)
    if got != want:
        names = ("q tokens", "kv tokens", "num_heads", "num_kv_heads", "head_dim")
        diff = ", ".join(f"{n} {g} (model: {w})" for n, g, w in zip(names, got, want) if g != w)
        raise ValueError(f"config.{SPEC_ATTR}: the Spec for layer {layer_idx} does not match the model: {diff}")
    return spec


def patterngen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: torch.Tensor | None,
                                 scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The `transformers` attention-function contract: query [B, H, Nq, D], key/value
    [B, Hkv, Nkv, D] -> (output [B, Nq, H, D] as eager attention returns it, None)."""
    if attention_mask is not None:
        raise ValueError(f"attention_mask: the patterngen attention takes its mask from the pattern; got a "
                         f"{tuple(attention_mask.shape)} mask (custom 4-D masks are not supported)")
    if dropout and module.training:
        raise ValueError(f"dropout: the patterngen attention has no attention dropout, got {dropout} "
                         f"(set the config's attention_dropout to 0.0)")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not supported by the patterngen attention (got a value for it)")
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"module: {type(module).__name__} has no `config` to read the patterngen pattern from")
    _, heads, nq, head_dim = query.shape
    kv_heads, nkv = key.shape[1], key.shape[2]
    spec = spec_for(config, getattr(module, "layer_idx", None), nq, nkv, heads, kv_heads, head_dim)
    out = attention(query, key, value, spec, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _padding_guard(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """Mask builder for our name: no dense mask is built (the pattern is the mask), but a
    padding mask would be silently dropped, so one with any masked position is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attention_mask: the patterngen attention does not take padding masks (the given 2-D "
                         "mask has zeros); run unpadded sequences or one sequence per batch")
    return None


def register(name: str = "patterngen") -> str:
    """Register the patterngen attention (and its mask builder) under `name` in
    transformers' registries; returns `name` for `attn_implementation=`."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash"):
        raise ValueError(f"name: expected a new attention implementation name, got {name!r} "
                         f"(not 'eager', 'sdpa' or a flash attention name)")
    from transformers import AttentionInterface
    AttentionInterface.register(name, patterngen_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers build no masks for unknown implementations
        return name
    AttentionMaskInterface.register(name, _padding_guard)
    return name


__all__ = ["register", "patterngen_attention_forward", "spec_for", "PATTERN_ATTR", "SPEC_ATTR"]
