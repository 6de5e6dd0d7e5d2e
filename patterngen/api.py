"""Public entry points: `pg.attention` and `pg.compile`.

`pg.attention` calls the `patterngen::attention` custom op (patterngen/op.py):
the exact, differentiable reference backend on CPU, the generated Triton
forward and backward kernels on CUDA, traced by `torch.compile` as one opaque
node. `pg.compile` fixes a backend and tiling (or autotunes) and calls the same op,
so its kernels trace, differentiate and export alike (`patterngen.dispatch.choose`
decides every call, with the reason).
"""
from __future__ import annotations

import functools

import torch

from .backends.inputs import (check_head_indices, check_inputs, check_scale, check_score_mods, check_segments,
                              check_sinks)
from .dispatch import compile_options
from .ir import Spec
from .op import attention_forward, attention_op, runs_eagerly
from .registry import spec_from_repr, spec_key
from .analysis.plan import build_plan
from .analysis.tiling import volume
from .routing.blocks import block_counts, box_routed
from .runtime import runtime_attention
from .core.tiles import Tiling

BACKENDS = ("auto", "reference", "triton")


def _check_spec(spec) -> Spec:
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a patterngen.Spec, got {type(spec).__name__}")
    return spec


def _op_key(spec: Spec, has_indices: bool) -> str:
    """The op's key for `spec`, after checking that block indices come exactly with Routed specs.
    Eager only: under torch.compile `attention` calls `_op_key_of_repr`."""
    if spec.routed is None and has_indices:
        raise ValueError("block_indices: given, but the spec has no Routed pattern")
    if spec.routed is not None and not has_indices:
        raise ValueError(f"block_indices: the spec contains {spec.routed!r}, so block indices "
                         f"[B, heads, q_blocks, topk] are needed (see patterngen.route)")
    return spec_key(spec)


def _op_key_of_repr(text: str, has_indices: bool) -> str:
    """`_op_key` under torch.compile, from the spec's repr: Dynamo runs it eagerly and keeps the
    key as a constant of the graph, so a fixed spec never causes a recompile.

    It takes the repr, a string Dynamo traces, and not the Spec: a Spec built inside the compiled
    code (even by a cached factory, which Dynamo traces through) exists only in Dynamo's trace,
    and the object Dynamo would hand over is an empty shell without fields."""
    return _op_key(spec_from_repr(text), has_indices)


# What torch.compiler.assume_constant_result sets; the decorator itself would import
# torch._dynamo, and with it triton, at `import patterngen`, before a user can set
# TRITON_INTERPRET.
_op_key_of_repr._dynamo_marked_constant = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec, scale: float | None = None,
              block_indices: torch.Tensor | None = None, return_lse: bool = False,
              head_indices: torch.Tensor | None = None, *, sinks: torch.Tensor | None = None,
              softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              kv_lens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
              kv_offsets: torch.Tensor | None = None, q_clusters: torch.Tensor | None = None,
              kv_clusters: torch.Tensor | None = None, _options: str = ""):
    """Sparse attention of `spec`: q [B, Hq, Nq, D], k/v [B, Hkv, Nkv, D] -> out [B, Hq, Nq, D]
    (and the log-sum-exp [B, Hq, Nq], float32 or float64 for float64 inputs, when `return_lse`).

    `scale` defaults to 1/sqrt(D); `block_indices` are the run-time blocks of a Routed
    spec (see `pg.route`). `head_indices` [B, Nq, k] (integers in [-1, Hq), -1 unused)
    routes heads per query token, Mixture-of-Head style (see `pg.route_heads`): only the
    listed (token, head) pairs are computed, the others give zeros (lse -inf) and no
    gradient. `sinks` [Hq] are learned sink logits (gpt-oss): each joins its head's softmax
    denominators with no value, so lse includes it; differentiable in them too. `softcap` c
    (Gemma 2) turns each scaled score s into c * tanh(s / c); `alibi_slopes` [Hq] (1-D specs)
    then add -slope[h] * |i - j|, query i at position i + Nkv - Nq (bottom-right, as
    FlashAttention), constants (no gradient); both before masking.

    Pieces (a length-free 1-D spec; int32 index tensors, FlashAttention's and vLLM's conventions):
    `cu_seqlens_q`/`cu_seqlens_k` [docs + 1] pack documents into q [1, Hq, total_q, D] and
    k/v [1, Hkv, total_k, D], the spec applying inside each with positions from its start;
    `kv_lens` [B]: only the first kv_lens[b] keys of entry b exist, queries aligned to the last
    of them; with `block_table` [B, max_pages] too, k and v are paged caches [pages, Hkv,
    page_size, D] (entry b's i-th page is block_table[b, i]); with `kv_offsets` [B] instead,
    entry b's keys are k[b, :, kv_offsets[b]:][:kv_lens[b]] (left padding, positions counted
    from the first real token). Pieces run as one launch of each kernel where the walks are
    in closed form, else each as its own call (patterngen/segments.py): no tile spans two
    pieces, keys past a length are never read.
    Clustered specs (`pg.Clustered()`, Routing Transformer): `q_clusters` [B, Hq, Nq] and
    `kv_clusters` [B, Hq or Hkv, Nkv] int cluster ids (-1: in no cluster; see `pg.cluster`).
    Specs holding Clustered() or box-routed blocks (BiFormer) run per head class
    (`patterngen/runtime.py`): static parts through the op, heads that are exactly the
    run-time node on its fast path, the rest on the run-time node's own pairs.

    Differentiable in q, k and v; a row with no visible key gives zeros. Runs
    the `patterngen::attention` op: the reference backend on CPU, the generated Triton
    kernels on CUDA, and `torch.compile` traces it without graph breaks.
    """
    _check_spec(spec)
    check_inputs(q, k, v, spec, paged=block_table is not None)
    scale = check_scale(scale, spec.head_dim)
    if block_indices is not None and not isinstance(block_indices, torch.Tensor):
        raise TypeError(f"block_indices: expected a torch.Tensor or None, got {type(block_indices).__name__}")
    if box_routed(spec) or spec.clustered or q_clusters is not None or kv_clusters is not None:
        _refuse("Clustered() or box-routed specs", head_indices=head_indices, sinks=sinks, softcap=softcap,
                alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, kv_lens=kv_lens,
                block_table=block_table, kv_offsets=kv_offsets)
        ops = functools.partial(attention, _options=_options)  # the parts the op runs go through this call
        out, lse = runtime_attention(q, k, v, spec, scale, block_indices, q_clusters, kv_clusters, ops)
        return (out, lse) if return_lse else out
    check_head_indices(head_indices, q)
    check_sinks(sinks, q, spec.num_heads, head_indices)
    softcap = check_score_mods(softcap, alibi_slopes, q, spec, head_indices)
    check_segments(q, k, spec, cu_seqlens_q, cu_seqlens_k, kv_lens, block_table, block_indices, kv_offsets)
    has_indices = block_indices is not None
    key = _op_key_of_repr(repr(spec), has_indices) if torch.compiler.is_compiling() else _op_key(spec, has_indices)
    pieces = (cu_seqlens_q, cu_seqlens_k, kv_lens, block_table, kv_offsets)
    op = attention_forward if runs_eagerly(q, k, v, block_indices, head_indices, sinks, alibi_slopes,
                                           *pieces) else attention_op
    out, lse = op(q, k, v, key, scale, block_indices, head_indices, _options, sinks, softcap, alibi_slopes, *pieces)
    return (out, lse) if return_lse else out


def _refuse(what: str, **arguments) -> None:
    """A ValueError naming the arguments given (not None) that `what` does not take yet."""
    given = [name for name, value in arguments.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not supported with {what} yet")


class CompiledAttention:
    """A `pg.compile` kernel: `pg.attention` of one spec with the backend and tiling it was
    compiled with, through the same op (so it traces with fullgraph and exports alike)."""

    def __init__(self, spec: Spec, backend: str, tiling: Tiling | None):
        if box_routed(spec) or spec.clustered:
            raise ValueError(f"pg.compile: {spec!r} runs through pg.attention only for now (box-routed and Clustered "
                             f"specs are rearranged per call)")
        self.spec, self.backend, self.tiling = spec, backend, tiling
        if backend == "triton":  # what the Triton backend cannot run is said now, not at the first call
            from .backends.triton import check_routed_block
            check_routed_block(spec)
        if tiling is not None:  # a tiling the spec cannot take is refused now (length-free: at 4 tiles' length)
            probe = spec.bind(4 * _tile_tokens(tiling)) if spec.length_free else spec
            indices = None
            if spec.routed is not None:
                nqb, _ = block_counts(probe)
                indices = torch.full((spec.num_kv_heads, nqb, 1), -1, dtype=torch.long)
            build_plan(probe, tiling, indices)
        self.options = "" if backend == "auto" and tiling is None else compile_options(backend, tiling)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 block_indices: torch.Tensor | None = None, return_lse: bool = False,
                 head_indices: torch.Tensor | None = None, *, sinks: torch.Tensor | None = None,
                 softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                 cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                 kv_lens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                 kv_offsets: torch.Tensor | None = None):
        return attention(q, k, v, self.spec, scale, block_indices, return_lse, head_indices, sinks=sinks,
                         softcap=softcap, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, kv_lens=kv_lens, block_table=block_table,
                         kv_offsets=kv_offsets, _options=self.options)

    def __repr__(self):
        return f"CompiledAttention({self.spec!r}, backend={self.backend!r}, tiling={self.tiling!r})"


def _tile_tokens(tiling: Tiling) -> int:
    return max(volume(tiling.q_tile), volume(tiling.kv_tile))


def compile(spec: Spec, backend: str = "auto", tiling: Tiling | None = None) -> CompiledAttention:
    """A callable `kernel(q, k, v, scale=None, block_indices=None, return_lse=False,
    head_indices=None, *, sinks=None, softcap=None, alibi_slopes=None, cu_seqlens_q=None,
    cu_seqlens_k=None, kv_lens=None, block_table=None, kv_offsets=None)` for `spec`: `pg.attention` through the same op, differentiable.

    `backend` is "auto" (as pg.attention: the Triton kernels on CUDA, the reference
    elsewhere), "reference", or "triton" (the kernels, or an error saying why they cannot
    run); `tiling` fixes the tile shapes (default: the Triton forward takes the autotuner's
    choice among the tiling policy's ranking, timed once per device, dtype and batch bucket).
    """
    _check_spec(spec)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r} (valid: {', '.join(map(repr, BACKENDS))})")
    if tiling is not None and not isinstance(tiling, Tiling):
        raise TypeError(f"tiling: expected a patterngen Tiling or None, got {type(tiling).__name__}")
    return CompiledAttention(spec, backend, tiling)


__all__ = ["attention", "compile", "CompiledAttention", "BACKENDS"]
