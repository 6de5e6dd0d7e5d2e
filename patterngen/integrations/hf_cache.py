"""A bounded KV cache for `transformers` models that run the patterngen attention.

`PatternCache(model.config)` keeps, per layer and kv head, only the cached positions that a
later query can still see (`pg.kv_keep`): the streaming heads of a DuoAttention spec (sinks
plus a window) hold a constant number of keys, retrieval heads (causal) keep every key, and
the generated tokens are those of an unbounded cache. Heads keep different positions, so a
layer stores one tensor per kv head with the positions it holds.

What a step attends (`PatternLayer.update`): the kept keys and the new ones, per kv head, laid
out right-aligned in one [B, Hkv, longest, D] tensor that carries the positions (`positions_of`).
The attention (`bounded_attention`) runs the kv heads that still hold every position through
`pg.attention` with their part of the spec, and the others over their few keys with the
pattern evaluated at their true positions.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..analysis.keep import keep_positions
from ..backends.reference.attention import masked_attention
from ..core.semantics import visible
from ..ir import Heads, Spec
from ..op import apply_sinks
from .hf_specs import spec_for

_POSITIONS = "_patterngen_positions"


def positions_of(key: torch.Tensor) -> list[torch.Tensor] | None:
    """The positions each kv head's keys hold, when `key` comes from a `PatternLayer` (else None):
    head h's n_h keys are the last n_h slots of key[:, h]."""
    return getattr(key, _POSITIONS, None)


def _right_aligned(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, n_h, D] per head -> [B, H, longest, D], each head's keys in its last n_h slots."""
    longest = max(p.shape[1] for p in parts)
    B, _, D = parts[0].shape
    out = parts[0].new_zeros(B, len(parts), longest, D)
    for h, p in enumerate(parts):
        out[:, h, longest - p.shape[1]:] = p
    return out


class PatternLayer(CacheLayerMixin):
    """One layer's bounded cache: per kv head, the kept keys, values and their positions."""

    is_compileable = False
    is_sliding = False

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec, self.seen = spec, 0
        self.head_keys = self.head_values = self.positions = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.head_keys = [key_states.new_zeros(B, 0, D) for _ in range(H)]
        self.head_values = [value_states.new_zeros(B, 0, D) for _ in range(H)]
        self.positions = [torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(H)]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        new = torch.arange(self.seen, self.seen + t, device=self.device)
        keys = [torch.cat([k, key_states[:, h]], 1) for h, k in enumerate(self.head_keys)]
        values = [torch.cat([v, value_states[:, h]], 1) for h, v in enumerate(self.head_values)]
        positions = [torch.cat([p, new]) for p in self.positions]
        out_k, out_v = _right_aligned(keys), _right_aligned(values)
        setattr(out_k, _POSITIONS, positions)
        self.seen += t
        keep = keep_positions(self.spec, self.seen, positions)  # what a later query can still see
        self.head_keys = [k[:, m] for k, m in zip(keys, keep)]
        self.head_values = [v[:, m] for v, m in zip(values, keep)]
        self.positions = [p[m] for p, m in zip(positions, keep)]
        return out_k, out_v

    def kept(self) -> list[int]:
        """Keys held per kv head."""
        return [int(p.numel()) for p in self.positions] if self.is_initialized else []

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # positions count from 0, whatever was dropped

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.is_initialized = 0, False
        self.head_keys = self.head_values = self.positions = None

    def _batch(self, fn) -> None:
        """Apply `fn` to every kept tensor's batch dimension (the positions are shared)."""
        if self.is_initialized:
            self.head_keys = [fn(k) for k in self.head_keys]
            self.head_values = [fn(v) for v in self.head_values]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch(lambda t: t[indices])


class PatternCache(Cache):
    """A transformers cache whose layers keep what the patterngen pattern of each layer can still
    see (`PatternLayer`). Built from a config with `patterngen_pattern` (a pattern, one per layer,
    or layer_idx -> pattern), for the patterngen attention."""

    def __init__(self, config, **kwargs):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or \
            text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layers = []
        for i in range(text.num_hidden_layers):
            spec = spec_for(config, i, 1, 1, heads, kv_heads, head_dim).unbound()
            layers.append(PatternLayer(spec))
        super().__init__(layers=layers, **kwargs)

    def kept(self) -> list[list[int]]:
        """Keys held per layer and kv head (the cache's memory, in tokens)."""
        return [layer.kept() for layer in self.layers]


def bounded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: Spec,
                      positions: list[torch.Tensor], scale: float | None, sinks, softcap, attention) -> torch.Tensor:
    """Attention of `query` (the last nq of `total` positions) over a `PatternLayer`'s keys:
    kv heads holding every position run `attention` (pg.attention) with their part of `spec`;
    the others attend their kept keys with the pattern at their true positions."""
    B, H, nq, D = query.shape
    hkv = key.shape[1]
    group = H // hkv
    total = int(positions[0].max()) + 1 if positions[0].numel() else nq
    whole = [h for h, p in enumerate(positions) if p.numel() == total]
    out = query.new_zeros(query.shape)
    if whole:
        qh = [h * group + g for h in whole for g in range(group)]
        part = Spec(Heads([spec.head_patterns[i] for i in qh]), num_heads=len(qh), num_kv_heads=len(whole),
                    head_dim=spec.head_dim)
        idx = torch.tensor(whole, device=key.device)
        out[:, qh] = attention(query[:, qh], key[:, idx], value[:, idx], part, scale=scale,
                               sinks=None if sinks is None else sinks[qh], softcap=softcap)
    step = spec.bind(nq, total)
    rows = torch.arange(nq, device=query.device)[:, None]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32  # as the reference accumulates
    for h in (h for h in range(hkv) if h not in whole):
        n = positions[h].numel()
        k, v = key[:, h, key.shape[2] - n:], value[:, h, key.shape[2] - n:]
        for g in range(group):
            qh = h * group + g
            mask = visible(spec.head_patterns[qh], rows, positions[h][None, :], step)
            o, lse, _ = masked_attention(query[:, qh].to(acc), k.to(acc), v.to(acc), mask,
                                         scale if scale is not None else D ** -0.5, softcap)
            if sinks is not None:
                o, _ = apply_sinks(o[:, None], lse[:, None], sinks[qh:qh + 1].to(acc))
                o = o[:, 0]
            out[:, qh] = o.to(out.dtype)
    return out
