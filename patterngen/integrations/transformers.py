"""patterngen as a Hugging Face `transformers` attention implementation.

    import patterngen as pg
    from patterngen.integrations.transformers import register

    register()                                    # name "patterngen"
    config.patterngen_pattern = (pg.Sink(4) | pg.Band(1023)) & pg.Causal()
    model = LlamaForCausalLM._from_config(config, attn_implementation="patterngen")

The model's attention modules then call `pg.attention` with a length-free Spec
(no q_shape) of the layer's pattern, head counts and head dim: every call, prefill
or decoding, reads its lengths from the tensors and runs the same kernels. A
pattern with a `Window` (whose neighbourhoods depend on the extent) gets a Spec
per length instead (the most recent 256 kept).

The pattern comes from the model config, read at every call (so it can be
changed after loading):

- `config.patterngen_pattern`: one pattern for every layer, a sequence with one
  pattern per layer, or a callable `layer_idx -> pattern`. Sequences are 1-D;
  Causal and Band align the last query with the last key, as decoding with a
  KV cache needs. A pattern may also be given in its JSON dict form
  (`pattern.to_dict()`), which is what a saved config holds.
- `config.patterngen_spec`: a callable `(layer_idx, q_len, kv_len) -> Spec` for
  full control (n-D grids, cross attention); its Spec is checked against the
  model's heads, head dim and the call's lengths.

Saving: `register()` teaches `PreTrainedConfig` to write patterns (and per-layer
sequences of them) in their versioned JSON form (`patterngen.ir.serialize`), so
`save_pretrained` writes a valid config.json and `from_pretrained` (with
`attn_implementation="patterngen"`) runs the same pattern. A callable pattern or
a Spec factory has no JSON form: saving refuses it with a ValueError before any
file is written.

KV caches: keys must sit at their positions from 0 on. A static cache
(`cache_implementation="static"`, `StaticCache`) hands every call all of its
preallocated slots; the mask builder registered with the attention reads the
real length from the cache (tokens already cached + the new queries) and the
attention attends only that filled prefix, so static and dynamic caches give the
same tokens (reading the length is one host sync per forward, and a graph break
under torch.compile). A sliding-window cache layer that has started dropping old keys
(the config sets `sliding_window`) is refused with a ValueError: the pattern
addresses positions the cache no longer holds.

What it refuses rather than silently ignoring: padding (a 2-D attention mask
with zeros), custom 4-D attention masks, attention dropout, soft-capping and
learned sink logits, none of which `pg.attention` takes; and every mask that
transformers asks for other than the base mask the pattern replaces (causal,
bidirectional, sliding-window or chunked, whatever its window): packed sequences
(several documents in one row, which transformers detects from position_ids that
restart within a row when there is no attention_mask and no cache, or flash-
attention `cu_seq_lens_*` kwargs), blockwise overlays (`block_sequence_ids`, e.g.
image tokens attending bidirectionally) and a model's own `or_mask_function` /
`and_mask_function`. The mask builder recognises the base masks by the structure
of the `mask_function` transformers hands it (compared with what the installed
`transformers.masking_utils` builds) and refuses any other, known or not, with a
ValueError saying what it found. Run one document per row; patterngen's
packed-document support (cu_seqlens) is planned but not used here yet. With a
cache (as `use_cache` defaults to), transformers itself does not look for packing
and asks for the plain causal mask, so eager attention crosses documents too, and
patterngen gives the same answer. Under torch.compile (a model compiled with
fullgraph=True runs as one graph) the structural check cannot be traced, and
transformers composes its packed-sequence mask for every input while tracing;
there the attention asserts inside the graph, at run time, that position_ids rise
by one along each row, so packed documents stop with a RuntimeError.

Older transformers (before `masking_utils.AttentionMaskInterface`, < 4.53) have no
mask builder to register: a model (Llama and its kin, as read in 4.52) then builds
its own 4-D mask for an unknown attention implementation, which the attention
refuses (custom 4-D masks), so patterngen does not run there at all rather than
run with a dropped mask.
"""
from __future__ import annotations

import functools

import torch

from ..api import attention
from ..ir import Pattern
from .hf_masks import packed_error, padding_guard
from .hf_specs import PATTERN_ATTR, SPEC_ATTR, _pattern_from_dict, spec_for



def patterngen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: torch.Tensor | None,
                                 scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The `transformers` attention-function contract: query [B, H, Nq, D], key/value
    [B, Hkv, Nkv, D] -> (output [B, Nq, H, D] as eager attention returns it, None)."""
    pieces = {}
    if attention_mask is not None:
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
                and attention_mask.dtype in (torch.bool, torch.int32)):
            shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
            raise ValueError(f"attention_mask: the patterngen attention takes its mask from the pattern; got a "
                             f"{shape} mask (custom 4-D masks are not supported)")
        # from our mask builder: the keys that hold tokens are the first `real` slots (a static cache)
        real = attention_mask.shape[-1]
        if not query.shape[2] <= real <= key.shape[2]:
            raise ValueError(f"attention_mask: the cache says {real} keys are filled, but this call has "
                             f"{query.shape[2]} queries and {key.shape[2]} key slots (valid: queries <= filled "
                             f"<= slots)")
        key, value = key[:, :, :real], value[:, :, :real]
        if attention_mask.dtype == torch.int32:  # left padding (padding_guard): each row from its first token
            starts = (attention_mask == 0).sum(-1, dtype=torch.int32)
            pieces = dict(kv_offsets=starts, kv_lens=real - starts)
    if dropout and module.training:
        raise ValueError(f"dropout: the patterngen attention has no attention dropout, got {dropout} "
                         f"(set the config's attention_dropout to 0.0)")
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):  # flash-attention kwargs of packed batches: free to check
        if kwargs.get(name) is not None:
            raise ValueError(packed_error(f"{name}: the batch holds packed documents (flash-attention "
                                           f"cu_seq_lens kwargs, e.g. from DataCollatorWithFlattening)"))
    softcap = kwargs.get("softcap")  # Gemma 2's attention logit cap
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))  # gpt-oss's learned sink logits, one per head
    if torch.compiler.is_compiling():
        _assert_one_document(kwargs.get("position_ids"), attention_mask)
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"module: {type(module).__name__} has no `config` to read the patterngen pattern from")
    _, heads, nq, head_dim = query.shape
    kv_heads, nkv = key.shape[1], key.shape[2]
    from .hf_cache import bounded_attention, positions_of  # transformers' own modules are loaded by now
    positions = positions_of(key)  # keys from a bounded PatternCache: per head, the positions it holds
    if positions is not None:
        if pieces:
            raise ValueError("attention_mask: padding is not supported with a PatternCache (its heads keep "
                             "different positions); run unpadded batches with it")
        nkv = int(max(int(p.max()) for p in positions if p.numel())) + 1
    spec = spec_for(config, getattr(module, "layer_idx", None), nq, nkv, heads, kv_heads, head_dim)
    if positions is not None:
        out = bounded_attention(query, key, value, spec.unbound(), positions, scaling, sinks, softcap, attention)
        return out.transpose(1, 2).contiguous(), None
    if pieces and not spec.length_free:
        spec = spec.unbound()  # each row has its own length
    out = attention(query, key, value, spec, scale=scaling, sinks=sinks, softcap=softcap, **pieces)
    return out.transpose(1, 2).contiguous(), None


def _assert_one_document(position_ids, attention_mask=None) -> None:
    """Under torch.compile: transformers cannot tell packed from unpacked positions while tracing
    (it always composes its packed-sequence mask then), and the mask builder's structural check
    cannot be traced, so the positions are checked inside the graph instead: a run-time assertion
    that they rise by one along each row (one document per row) between real tokens (a left-padding
    mask from `padding_guard`, int32, marks the others)."""
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] > 1:
        rising = position_ids.diff(dim=-1) == 1
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.int32:
            real = attention_mask[:, -position_ids.shape[-1]:] != 0
            rising = rising | ~(real[:, 1:] & real[:, :-1])
        torch._assert_async(rising.all(),
                            "patterngen: position_ids restart within a row (packed documents); the patterngen "
                            "attention runs one document per row")


# -- saving: the JSON form of the config's patterns -------------------------------------------------
def _json_form(value, where: str, strict: bool):
    """A config's patterngen setting with its patterns in JSON dict form. What has no JSON
    form (a callable) is kept as it is, or refused with a ValueError if `strict`."""
    if value is None:
        return None
    if isinstance(value, Pattern):
        return value.to_dict()
    if isinstance(value, dict):
        if strict:
            _pattern_from_dict(value, where)  # refuse a dict that would not load back
        return value
    if isinstance(value, (list, tuple)):
        return [_json_form(v, f"{where}[{i}]", strict) for i, v in enumerate(value)]
    if not strict:
        return value
    if callable(value):
        raise ValueError(f"{where}: a callable has no JSON form, so this config cannot be written as JSON "
                         f"(config.json would not restore it); set a pattern or a list with one pattern per layer "
                         f"instead (for example pg.Causal(), or [pattern_0, pattern_1, ...]), or remove it "
                         f"before save_pretrained")
    raise ValueError(f"{where}: {value!r} ({type(value).__name__}) has no JSON form; expected a patterngen pattern "
                     f"or a list with one pattern per layer")


def _json_settings(config_dict: dict, strict: bool = False, where: str = "config") -> dict:
    """`config_dict` (from `PreTrainedConfig.to_dict`) with its patterngen patterns in JSON form;
    if `strict`, a ValueError for settings without one, in nested configs too."""
    if PATTERN_ATTR in config_dict:
        config_dict[PATTERN_ATTR] = _json_form(config_dict[PATTERN_ATTR], f"{where}.{PATTERN_ATTR}", strict)
    if strict and config_dict.get(SPEC_ATTR) is not None:
        raise ValueError(f"{where}.{SPEC_ATTR}: a Spec factory (a callable) has no JSON form, so this config cannot "
                         f"be written as JSON; set {where}.{PATTERN_ATTR} to the pattern (or one pattern per "
                         f"layer) instead, or set {where}.{SPEC_ATTR} = None before save_pretrained")
    if strict:
        for key, value in config_dict.items():
            if isinstance(value, dict):
                _json_settings(value, True, f"{where}.{key}")
    return config_dict


def _install_config_hooks() -> None:
    """Teach `PreTrainedConfig` the JSON form of patterngen settings: `to_dict` gives patterns
    as dicts (callables stay as they are: transformers calls `to_dict` when it builds a
    model), `to_json_string` (config.json, `repr`) refuses what has no JSON form with a
    clear ValueError, and `to_json_file` checks before it opens the file, so a refused
    setting never leaves a truncated config.json behind."""
    import transformers
    cls = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    if getattr(cls.to_dict, "_patterngen_hook", False):
        return
    to_dict, to_json_string, to_json_file = cls.to_dict, cls.to_json_string, cls.to_json_file

    @functools.wraps(to_dict)
    def to_dict_with_patterns(self, *args, **kwargs):
        return _json_settings(to_dict(self, *args, **kwargs))

    @functools.wraps(to_json_string)
    def to_json_string_checked(self, *args, **kwargs):
        _json_settings(self.to_dict(), strict=True)
        return to_json_string(self, *args, **kwargs)

    @functools.wraps(to_json_file)
    def to_json_file_checked(self, *args, **kwargs):
        _json_settings(self.to_dict(), strict=True)  # before the file is opened (and truncated)
        return to_json_file(self, *args, **kwargs)

    to_dict_with_patterns._patterngen_hook = True
    cls.to_dict = to_dict_with_patterns
    cls.to_json_string = to_json_string_checked
    cls.to_json_file = to_json_file_checked


def register(name: str = "patterngen") -> str:
    """Register the patterngen attention (and its mask builder) under `name` in
    transformers' registries; returns `name` for `attn_implementation=`."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash"):
        raise ValueError(f"name: expected a new attention implementation name, got {name!r} "
                         f"(not 'eager', 'sdpa' or a flash attention name)")
    from transformers import AttentionInterface
    AttentionInterface.register(name, patterngen_attention_forward)
    _install_config_hooks()
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: models build their own 4-D masks, which the attention refuses
        return name
    AttentionMaskInterface.register(name, padding_guard)
    return name


def __getattr__(name: str):
    """`PatternCache` (hf_cache.py), imported on first use: it subclasses transformers' Cache, and
    this module loads without transformers."""
    if name == "PatternCache":
        from .hf_cache import PatternCache
        return PatternCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["register", "patterngen_attention_forward", "spec_for", "PatternCache", "PATTERN_ATTR", "SPEC_ATTR"]
