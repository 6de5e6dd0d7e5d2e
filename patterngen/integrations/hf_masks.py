"""What transformers asks the patterngen attention to mask, checked before it runs.

The pattern is the mask, so no dense mask is built; but a mask the pattern cannot express
must never be dropped silently. `padding_guard` is the mask builder registered with the
attention: it refuses padding, packed documents, blockwise overlays and a model's own mask
functions (recognised by the structure of the `mask_function` transformers hands it,
compared with what the installed `transformers.masking_utils` builds), and reads the real
key length of a static cache. See patterngen/integrations/transformers.py for the whole
contract.
"""
from __future__ import annotations

import functools

import torch


def _as_int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def packed_error(detected: str) -> str:
    return (f"{detected}; the patterngen attention replaces the mask with its pattern over the whole row, so "
            f"attention would silently cross document boundaries. Run one document per row (no padding: equal "
            f"lengths, or one document at a time), or call pg.attention with cu_seqlens_q/cu_seqlens_k "
            f"directly; this integration does not pass them yet")


# -- the mask transformers asks for: only a base mask, which the pattern replaces --------------------
_DEPTH = 8  # nested deeper than any mask transformers builds: left unexplored, so unknown


def _inner_masks(fn, depth: int):
    """The mask functions `fn`'s closure holds, in order (`and_masks` / `or_masks` keep theirs
    in a tuple; the packed-sequence remapping wraps one). Other closure values (a window
    size, index tensors) are skipped."""
    if depth >= _DEPTH or getattr(fn, "__code__", None) is None:
        return
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if callable(item) and not isinstance(item, torch.Tensor):
                yield item


def _mask_tree(fn, depth: int = 0):
    """The structure of a mask function as a hashable tree: its code object and the trees of
    the mask functions it holds. Base masks differ by structure only; their sizes (window,
    chunk) are what the pattern replaces. A callable without Python code (a partial, an
    object with __call__) is a leaf that matches no known mask."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("opaque", type(fn).__qualname__, ())
    return (code, tuple(_mask_tree(f, depth + 1) for f in _inner_masks(fn, depth)))


def _mask_parts(fn, depth: int = 0):
    """`fn` and every mask function nested in it."""
    yield fn
    for f in _inner_masks(fn, depth):
        yield from _mask_parts(f, depth + 1)


def _build(factory, *tries):
    """`factory(*args)` for the first of the argument lists it accepts (signatures differ
    across transformers versions); None if it is missing or accepts none."""
    for args in tries if factory is not None else ():
        try:
            return factory(*args)
        except TypeError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _known_masks():
    """From the installed `transformers.masking_utils`: the trees of the base masks that the
    pattern replaces, and the code objects of the overlays that deviate from them (to name
    what was detected). Built from its own factories, so the check follows the installed
    version's structure rather than a copy of it."""
    from transformers import masking_utils as mu
    idx = torch.zeros(1, 1, dtype=torch.long)
    causal = getattr(mu, "causal_mask_function", None)
    base = [causal, getattr(mu, "bidirectional_mask_function", None),
            _build(getattr(mu, "sliding_window_causal_mask_function", None), (1,)),
            _build(getattr(mu, "sliding_window_bidirectional_mask_function", None), (1,)),
            _build(getattr(mu, "chunked_causal_mask_function", None), (1, idx[0]), (1,))]
    overlays = {
        "packed": _build(getattr(mu, "packed_sequence_mask_function", None), (idx,)),
        "remapped": _build(getattr(mu, "remap_positions_for_packed_sequence", None), (causal, idx)),
        "blockwise": _build(getattr(mu, "blockwise_overlay", None), (idx,)),
        "or": _build(getattr(mu, "or_masks", None), (causal,)),
        "and": _build(getattr(mu, "and_masks", None), (causal,)),
    }
    trees = {_mask_tree(fn) for fn in base if fn is not None}
    codes = {name: fn.__code__ for name, fn in overlays.items() if fn is not None}
    known = set(codes.values()) | {f.__code__ for fn in base if fn is not None for f in _mask_parts(fn)}
    return trees, codes, known


def check_mask_function(mask_function) -> None:
    """Refuse a mask other than a base mask (causal, bidirectional, sliding-window or chunked,
    as the installed transformers builds them), since the pattern replaces the mask: packed
    sequences, blockwise overlays and a model's `or_mask_function` / `and_mask_function`
    would otherwise be silently dropped. Any mask function it does not recognise is refused."""
    if mask_function is None:  # transformers' mask builders default to the causal mask
        return
    trees, codes, known = _known_masks()
    if _mask_tree(mask_function) in trees:
        return
    parts = list(_mask_parts(mask_function))
    found = {name for name, code in codes.items() if any(getattr(f, "__code__", None) is code for f in parts)}
    if found & {"packed", "remapped"}:
        raise ValueError(packed_error("position_ids: several documents are packed in one row, so transformers "
                                       "asks for a packed-sequence mask that keeps them apart (it does so when "
                                       "position_ids restart within a row and there is no attention_mask and no "
                                       "cache, or when the model passes sequence ids)"))
    what = []
    if "blockwise" in found:
        what.append("a blockwise overlay (block_sequence_ids: the tokens of a block attend to each other "
                    "bidirectionally, e.g. image tokens)")
    foreign = [f"{getattr(f, '__module__', None) or '?'}.{getattr(f, '__qualname__', type(f).__qualname__)}"
               for f in parts if getattr(f, "__code__", None) not in known]
    if foreign:
        what.append(f"mask functions of the model ({', '.join(dict.fromkeys(foreign))}), passed as "
                    f"or_mask_function / and_mask_function, e.g. bidirectional attention among image tokens")
    if not what:
        what.append("a combination of transformers' mask functions that is not a plain causal, bidirectional, "
                    "sliding-window or chunked mask")
    raise ValueError(
        f"mask_function: transformers asks for a mask that differs from the causal / bidirectional / "
        f"sliding-window / chunked base mask which the patterngen pattern replaces: {'; and '.join(what)}. "
        f"The patterngen attention would silently drop it. Run inputs that need no such mask (e.g. text only), "
        f"or use another attn_implementation for this model")


def padding_guard(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
                   kv_offset=0, attention_mask=None, **kwargs):
    """Mask builder for our name. No dense mask is built (the pattern is the mask), but
    what the pattern cannot see is settled here, once per forward:

    - a mask function other than a base mask (causal, bidirectional, sliding-window,
      chunked), which the pattern replaces, is refused: packed sequences (position_ids
      restarting within a row), blockwise overlays (block_sequence_ids) and a model's
      or_mask_function / and_mask_function would be silently dropped;
    - a left-padding mask (a 2-D mask whose rows are zeros, then ones) is returned as int32
      [B, real]: the attention then runs each row from its first real token (`kv_offsets`,
      positions counted from there, as transformers counts them). Other zeros (right
      padding, holes) are refused (under torch.compile, where any given mask takes this
      path, by an assertion in the graph);
    - the real key length is read from the cache: tokens it already holds
      (`q_offset`) plus the new queries. A static cache hands the attention all of
      its `kv_length` preallocated slots; then an all-True bool mask [B, real] is
      returned (the flash-attention convention), and the attention keeps only
      those first `real` keys. Otherwise None, as before;
    - a cache whose keys no longer start at position 0 (a sliding-window layer that
      dropped old keys, `kv_offset` > 0) is refused.
    """
    if not torch.compiler.is_compiling():  # Dynamo cannot trace the introspection: see transformers._assert_one_document
        check_mask_function(kwargs.get("mask_function"))
    left_only = ("attention_mask: the patterngen attention takes left padding only (each row's zeros before all "
                 "of its tokens; tokenizer padding_side='left'), but the 2-D mask has zeros after a token (right "
                 "padding or holes)")
    if attention_mask is None:
        padded = False
    elif torch.compiler.is_compiling():  # no data-dependent branch in the graph: a given mask may pad
        padded, rows = True, attention_mask.to(torch.int32)
        torch._assert_async(((rows.diff(dim=-1) >= 0).all() & rows[:, -1].bool().all()), left_only)
    else:
        padded = not bool(attention_mask.all())
        rows = attention_mask.to(torch.int32)
        if padded and not (bool((rows.diff(dim=-1) >= 0).all()) and bool(rows[:, -1].all())):
            raise ValueError(left_only)
    if q_length is None:  # transformers 4.5x: the queries' cache positions instead of lengths and offsets
        cache_position = kwargs.get("cache_position")
        if cache_position is None or kv_length is None:
            raise ValueError("the patterngen mask builder got neither q_length nor cache_position from "
                             "transformers, so it cannot tell how many keys the cache holds")
        q_length, q_offset = cache_position.shape[-1], _as_int(cache_position[0])
    kv_offset = _as_int(kv_offset)
    config = kwargs.get("config")
    if kv_offset:
        window = getattr(config, "sliding_window", None)
        raise ValueError(f"past_key_values: this cache layer no longer holds the keys before position {kv_offset} "
                         f"(a sliding-window cache layer, DynamicSlidingWindowLayer or StaticSlidingWindowLayer, "
                         f"which transformers builds when config.sliding_window is set (here {window!r}) and "
                         f"which drops old keys); "
                         f"the patterngen pattern addresses every key position from 0, so it cannot run on it. "
                         f"Use a cache that keeps every key, e.g. set config.sliding_window = None before "
                         f"building the cache")
    real = _as_int(q_offset) + q_length
    if kv_length is None or real > kv_length:
        raise ValueError(f"past_key_values: the cache holds {_as_int(q_offset)} tokens and this call adds "
                         f"{q_length}, but transformers sizes the keys at {kv_length}; patterngen cannot tell "
                         f"which keys are real")
    if attention_mask is not None and attention_mask.shape[-1] != real:
        raise ValueError(f"attention_mask: the 2-D mask covers {attention_mask.shape[-1]} tokens, but the cache "
                         f"holds {_as_int(q_offset)} and this call adds {q_length} ({real} in all); pass a mask "
                         f"over exactly those tokens")
    if padded:
        return rows
    if real == kv_length:
        return None
    return torch.ones(batch_size, real, dtype=torch.bool, device=kwargs.get("device"))
