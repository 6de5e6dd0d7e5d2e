"""`patterngen::attention`: sparse attention as a torch.library custom op.

Why an op: `torch.compile` traces a module that calls `pg.attention` without
graph breaks only if the attention is one opaque node with a fake (meta)
implementation and a registered backward. One body serves every device:
`patterngen.dispatch` picks the backend of each call and keeps why (`pg.explain`): on
CUDA the Triton kernels, generated once per spec and cached (with `head_indices`, the
head-routed MoH kernels), or loaded from a build (`pg.load`); elsewhere, and for what
the kernels do not take, the exact reference backend. The backward is a second op, so
compiled backward graphs stay opaque too: the Triton backward kernels when no lse
gradient flows, else the reference recomputed under autograd (`BACKWARD_KERNELS`
overrides both on CUDA).

A Spec is not a tensor, so the op receives it as its JSON text (`patterngen.registry.spec_key`):
a compiled graph holds a constant string and never recompiles because of the spec, and an
exported program carries its spec, so it runs in a fresh process. A length-free spec (no
q_shape) takes each call's lengths from the tensors: the fake kernel only copies shapes, so
symbolic lengths trace once for every length. `options` (JSON, `compile_options`) carries what
a `pg.compile` kernel asks for: its backend and tiling.

Why `custom_op` and not `triton_op` (measured on an H200, 2026-11-30,
benchmarks/triton_op_probe.py, results in benchmarks/results/):
- A `triton_op` body is traced by torch.compile, so it must be plain tensor code around
  `wrap_triton` launches. The reference body is data dependent (plans, masks) and, on the CPU,
  the Triton interpreter reads data pointers, which tracing forbids ("Cannot access data pointer
  of Tensor", seen with a toy triton_op under TRITON_INTERPRET=1). Table walks need host tables
  per length. Only closed-form CUDA kernels could be a triton_op, beside this op, not instead.
- Eager, the two cost the same: a decode call (1 x 8192 keys, 32 heads, bf16) 33.7 us through
  pg.attention (this op's body, called directly when nothing is traced: `runs_eagerly`) and
  34.1 us through a triton_op; prefill 4096: 241.5 vs 242.8 us.
- Under torch.compile the opaque op costs more per call: decode 148 us (57 us with CUDA graphs),
  prefill 303 us (290 us). A triton_op would let Inductor launch the kernel from its own code,
  but compiling it failed then: Inductor passes Python floats as float64, which made the
  softmax state float64 (the templates now cast the scale to float32; not yet re-measured).
- AOTInductor packages of this op run in a fresh process that imports patterngen (the spec is
  the op's argument); a triton_op would embed the kernel instead, with no Python at all.
So the one op stays a custom_op for every device; a triton_op for closed-form CUDA forwards is
the next step once it compiles and shows the compiled-call saving on a GPU.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .backends.inputs import check_head_values, head_selection
from . import dispatch, segments
from .backends.reference import SMALL_PAIRS, reference_attention, small_attention, small_attention_cpu
from .ir import Spec
from .analysis.plan import Plan, build_plan
from .registry import lookup_spec, spec_from_repr, spec_key

MAX_PLANS = 64
"""Reference plans kept, one per fixed-length spec (a length-free spec has one per length seen),
least recently used first out."""


@functools.lru_cache(maxsize=MAX_PLANS)
def _static_plan(spec: Spec, tiling) -> Plan:
    return build_plan(spec, tiling)


def cache_entries() -> dict[str, int]:
    """How many entries each of the package's bounded caches holds now (for benchmarks and tests)."""
    from . import registry
    from .ir.spec import _bound
    return {"kernels": len(dispatch._KERNELS), "spec_texts": registry.spec_key.cache_info().currsize,
            "specs": registry.lookup_spec.cache_info().currsize, "bound_specs": _bound.cache_info().currsize,
            "plans": _static_plan.cache_info().currsize, "tilings": dispatch.policy_tiling.cache_info().currsize}


def _plan(spec: Spec, tiling=None) -> Plan | None:
    """The plan of a static fixed-length spec, built once (Routed plans depend on the indices)."""
    return None if spec.routed is not None else _static_plan(spec, tiling)


def bound_spec(key: str, q: torch.Tensor, k: torch.Tensor) -> Spec:
    """The fixed-length spec of a call: the spec of `key`, bound to q's and k's lengths when length-free."""
    spec = lookup_spec(key)
    return spec.bind(q.shape[2], k.shape[2]) if spec.length_free else spec


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_result(q):
    """What attention over no key gives: zeros, and a log-sum-exp of -inf."""
    return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=_acc_dtype(q.dtype))


def reference(q, k, v, spec: Spec, scale=None, block_indices=None, head_indices=None, plan: Plan | None = None,
              tiling=None, softcap=None, alibi_slopes=None):
    """The reference result (differentiable); with head routing, unchosen (token, head) rows
    become 0 and lse -inf. `plan` (else one of `tiling`) is the tile plan it follows."""
    if dispatch.is_empty(q, k):
        return _empty_result(q)
    out, lse = reference_attention(q, k, v, spec, plan=plan, scale=scale, block_indices=block_indices,
                                   tiling=None if plan is not None else tiling, softcap=softcap,
                                   alibi_slopes=alibi_slopes)
    if head_indices is None:
        return out, lse
    chosen = head_selection(head_indices, spec.num_heads)
    return out * chosen[..., None].to(out.dtype), lse.masked_fill(~chosen, float("-inf"))


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the softmax whose denominator also holds exp(sinks[h]), a learned logit with
    no value (gpt-oss): lse' = logaddexp(lse, sink), out' = out * exp(lse - lse'). A row that
    saw nothing keeps out 0 and gets lse' = sink. Exact for every backend, since the sink only
    rescales each row."""
    lse2 = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None])
    return (out * torch.exp(lse - lse2)[..., None]).to(out.dtype), lse2


def sink_gradient(dout: torch.Tensor, dlse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                  sinks: torch.Tensor) -> torch.Tensor:
    """dL/dsinks from the sink-including (out, lse): the sink's probability p = exp(s - lse) per
    row, and dL/ds = sum over rows of p * (dlse - rowsum(dout * out)) (out' = sum_j p_j v_j with
    every p_j scaled by 1 - p)."""
    acc = lse.dtype
    p = torch.exp(sinks.to(acc)[None, :, None] - lse)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    g = p * ((0.0 if dlse is None else dlse.to(acc)) - delta)
    return g.sum((0, 2)).to(sinks.dtype)


def _reference(q, k, v, key, scale, block_indices, head_indices=None, options="", differentiable=False,
               softcap=None, alibi_slopes=None):
    """The reference result of one op call; `differentiable` where autograd records it (the
    backward's recomputation), which the fused CPU path of small calls is not, through its lse
    (nor can it cap scores or add ALiBi)."""
    spec = bound_spec(key, q, k)
    tiling = dispatch.read_options(options)[1]
    if (head_indices is None and spec.routed is None and tiling is None and spec.nq * spec.nkv <= SMALL_PAIRS
            and not dispatch.is_empty(q, k)):  # a decoding step or a short prompt: no plan to build
        if (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and not differentiable
                and softcap is None and alibi_slopes is None):
            return small_attention_cpu(q, k, v, spec, scale)
        return small_attention(q, k, v, spec, scale, softcap, alibi_slopes)
    return reference(q, k, v, spec, scale, block_indices, head_indices, plan=_plan(spec, tiling), softcap=softcap,
                     alibi_slopes=alibi_slopes)


# -- forward ------------------------------------------------------------------------
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: str, scale: Optional[float] = None,
                      block_indices: Optional[torch.Tensor] = None, head_indices: Optional[torch.Tensor] = None,
                      options: str = "", sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                      alibi_slopes: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                      cu_seqlens_k: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
                      block_table: Optional[torch.Tensor] = None,
                      kv_offsets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, D], lse [B, Hq, Nq]) of the spec whose JSON text is `spec`, on the
    backend `dispatch.choose` picks; with `sinks` [Hq], as `apply_sinks` makes them; `softcap`
    and `alibi_slopes` [Hq] modify the scores (`reference_attention`). Packed documents, valid
    key lengths and paged caches run as pieces (`patterngen.segments`)."""
    if cu_seqlens_q is not None or kv_lens is not None:
        if block_table is not None:
            k, v = (segments.gather_pages(t, block_table, kv_lens) for t in (k, v))
        kernel = _one_launch(spec, q, k, v, options, head_indices)
        if kernel is not None and cu_seqlens_q is None:  # key lengths: every entry in one launch, no host read
            out, lse = kernel(q, k, v, scale=scale, sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                              pieces=(segments.length_segments(q, k, kv_lens, kv_offsets), q.shape[2]))
            return out.contiguous(), lse.contiguous()
        pieces = segments.segments(q, k, cu_seqlens_q, cu_seqlens_k, kv_lens, kv_offsets)
        if kernel is not None:  # every document in one launch of a closed-form kernel
            segs = torch.tensor([s.row for s in pieces], dtype=torch.int32, device=q.device)
            out, lse = kernel(q, k, v, scale=scale, sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes,
                              pieces=(segs, max(s.q1 - s.q0 for s in pieces)))
            return out.contiguous(), lse.contiguous()
        out, lse = q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=_acc_dtype(q.dtype))
        for seg in pieces:
            if seg.empty:  # no pair: nothing to launch (a kernel backend would refuse it)
                o, l = _empty_result(seg.queries(q))
                o, l = (o, l) if sinks is None else apply_sinks(o, l, sinks)
            else:
                o, l = attention_forward(seg.queries(q), seg.keys(k), seg.keys(v), spec, scale, None,
                                         seg.heads(head_indices), options, sinks, softcap, alibi_slopes)
            seg.queries(out).copy_(o)
            seg.queries(lse).copy_(l)
        return out, lse
    choice = dispatch.choose(spec, q, k, head_indices=head_indices is not None, options=options, v=v,
                             block_indices=block_indices)
    dispatch.calls[choice.role, choice.kind] += 1
    if choice.backend == "reference":
        out, lse = _reference(q, k, v, spec, scale, block_indices, head_indices, options, softcap=softcap,
                              alibi_slopes=alibi_slopes)
    elif head_indices is not None:
        check_head_values(head_indices, q.shape[1])
        out, lse = choice.kernel.forward(q, k, v, head_indices, scale=scale)
    else:  # the kernel checks block_indices as the reference does (normalize_block_indices)
        out, lse = choice.kernel(q, k, v, scale=scale, block_indices=block_indices, sinks=sinks, softcap=softcap,
                                 alibi_slopes=alibi_slopes)
        sinks = None  # applied in the kernel's epilogue
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    # the fake kernel promises contiguous results whatever the input strides
    return out.contiguous(), lse.contiguous()


def _one_launch(spec: str, q, k, v, options: str, head_indices):
    """The forward kernel that runs every piece of a call in one launch (`TritonForward`'s
    `pieces`: the closed-form walk of a length-free spec), or None: each piece is then a call."""
    if head_indices is not None or dispatch.is_empty(q, k) or not lookup_spec(spec).length_free:
        return None
    choice = dispatch.choose(spec, q, k, options=options, v=v)
    if choice.backend != "triton" or getattr(choice.kernel, "walk_name", None) != "closed_form":
        return None
    dispatch.calls[choice.role, choice.kind] += 1
    return choice.kernel


def _one_launch_backward(spec: str, q, k, dlse, options: str, head_indices):
    """The backward kernels that run every piece of a call in one launch each (`TritonBackward`'s
    `pieces`), or None: each piece is then a call. Not with a gradient into the lse, which only
    the reference takes (as for a whole call)."""
    if head_indices is not None or dlse is not None or dispatch.is_empty(q, k) or not lookup_spec(spec).length_free:
        return None
    choice = dispatch.choose(spec, q, k, role="backward", options=options)
    if choice.backend != "triton" or not getattr(choice.kernel, "takes_pieces", False):
        return None
    dispatch.calls[choice.role, choice.kind] += 1
    return choice.kernel


attention_op = torch.library.custom_op("patterngen::attention", mutates_args=())(attention_forward)


def runs_eagerly(*tensors) -> bool:
    """Whether a call may run `attention_forward` itself rather than through the op: plain tensors
    that record no gradient, outside any tracing (Dynamo, export, make_fx, functorch), where the op
    would run the same body after ~20 us of dispatch, a decoding step's worth on the CPU."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)
                             and not torch._C._functorch.is_functorch_wrapped_tensor(t)) for t in tensors)


@attention_op.register_fake
def _attention_fake(q, k, v, spec, scale=None, block_indices=None, head_indices=None, options="", sinks=None,
                    softcap=None, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, kv_lens=None,
                    block_table=None, kv_offsets=None):
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))
    return out, lse


# -- backward -----------------------------------------------------------------------
BACKWARD_KERNELS: dict[str, Callable] = {}
"""Override hook: spec key -> callable `(dout, dlse, q, k, v, out, lse, scale, block_indices)
-> (dq, dk, dv)` on CUDA tensors, used instead of `dispatch.choose`'s backward."""


def _autograd_inside_op():
    """Re-enable autograd inside an op body: the dispatcher excludes the autograd keys
    below the op's own autograd node, so `enable_grad` alone would record nothing."""
    keys = torch._C.DispatchKey
    exclude = (torch._C._dispatch_tls_local_exclude_set()
               .remove(keys.AutogradFunctionality).remove(keys.ADInplaceOrView))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _reference_backward(dout, dlse, q, k, v, key, scale, block_indices, head_indices=None, options="", sinks=None,
                        softcap=None, alibi_slopes=None):
    """Exact gradients: differentiate the reference forward again (dlse may be None)."""
    if dispatch.is_empty(q, k):  # nothing depends on q, k or v
        return tuple(torch.zeros_like(t) for t in (q, k, v))
    with _autograd_inside_op(), torch.enable_grad():
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, lse = _reference(qg, kg, vg, key, scale, block_indices, head_indices, options, differentiable=True,
                              softcap=softcap, alibi_slopes=alibi_slopes)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks.detach())
        outs, grads = [out], [dout]
        if dlse is not None:
            outs.append(lse)
            grads.append(dlse)
        dq, dk, dv = torch.autograd.grad(outs, (qg, kg, vg), grads, allow_unused=True)
    return tuple((torch.zeros_like(t) if g is None else g).contiguous() for g, t in zip((dq, dk, dv), (q, k, v)))


def attention_backward(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, spec: str,
                       scale: Optional[float] = None, block_indices: Optional[torch.Tensor] = None,
                       head_indices: Optional[torch.Tensor] = None, options: str = "",
                       sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                       alibi_slopes: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                       cu_seqlens_k: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
                       block_table: Optional[torch.Tensor] = None,
                       kv_offsets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `patterngen::attention`; out and lse are the forward's results,
    kept for the kernels that use them (rowsum(dO * O), softmax from lse). With sinks they are
    the sink-including ones, from which the kernels' gradients are already exact (the sink
    column has no value); the reference recomputes them with the sinks. Pieces (packed
    documents, kv_lens, paged caches) run in one launch of each kernel where the kernels take
    them (`_one_launch_backward`), else one by one."""
    if cu_seqlens_q is not None or kv_lens is not None:
        caches = (k, v)
        if block_table is not None:
            k, v = (segments.gather_pages(t, block_table, kv_lens) for t in caches)
        pieces = [s for s in segments.segments(q, k, cu_seqlens_q, cu_seqlens_k, kv_lens, kv_offsets) if not s.empty]
        kernel = _one_launch_backward(spec, q, k, dlse, options, head_indices)
        if kernel is not None:  # every piece in one launch of each backward kernel
            grads = list(kernel(q, k, v, out, lse, dout, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                pieces=[s.row for s in pieces]))
            if block_table is not None:
                grads[1:] = [segments.scatter_pages(g, t, block_table, kv_lens) for g, t in zip(grads[1:], caches)]
            return tuple(grads)
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        for seg in pieces:
            g = attention_backward(seg.queries(dout), None if dlse is None else seg.queries(dlse), seg.queries(q),
                                   seg.keys(k), seg.keys(v), seg.queries(out), seg.queries(lse), spec, scale, None,
                                   seg.heads(head_indices), options, sinks, softcap, alibi_slopes)
            for pick, total, part in zip((seg.queries, seg.keys, seg.keys), grads, g):
                pick(total).add_(part)
        if block_table is not None:
            grads[1:] = [segments.scatter_pages(g, t, block_table, kv_lens) for g, t in zip(grads[1:], caches)]
        return tuple(grads)
    plain = head_indices is None and softcap is None and alibi_slopes is None  # what the override hook takes
    override = BACKWARD_KERNELS.get(spec) if plain and q.is_cuda else None
    if override is not None and q.dtype != torch.float64 and not dispatch.is_empty(q, k):
        return tuple(g.contiguous() for g in override(dout, dlse, q, k, v, out, lse, scale, block_indices))
    choice = dispatch.choose(spec, q, k, head_indices=head_indices is not None, role="backward",
                             lse_grad=dlse is not None, options=options, block_indices=block_indices)
    dispatch.calls[choice.role, choice.kind] += 1
    if choice.backend == "reference":
        return _reference_backward(dout, dlse, q, k, v, spec, scale, block_indices, head_indices, options, sinks,
                                   softcap, alibi_slopes)
    if head_indices is not None:
        grads = choice.kernel.backward(q, k, v, out, lse, dout, head_indices, scale=scale)
    else:
        grads = choice.kernel(q, k, v, out, lse, dout, scale=scale, block_indices=block_indices, softcap=softcap,
                              alibi_slopes=alibi_slopes)
    return tuple(g.contiguous() for g in grads)


attention_backward_op = torch.library.custom_op("patterngen::attention_backward", mutates_args=())(attention_backward)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, spec, scale=None, block_indices=None,
                             head_indices=None, options="", sinks=None, softcap=None, alibi_slopes=None,
                             cu_seqlens_q=None, cu_seqlens_k=None, kv_lens=None, block_table=None, kv_offsets=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key, scale, block_indices, head_indices, options, sinks, softcap, alibi_slopes, *pieces = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_indices, head_indices, sinks, alibi_slopes, *pieces)
    ctx.key, ctx.scale, ctx.options, ctx.softcap = key, scale, options, softcap
    ctx.set_materialize_grads(False)  # an unused lse gives dlse None: the Triton backward can run


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, block_indices, head_indices, sinks, alibi_slopes, *pieces = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(dout.contiguous(), dlse, q, k, v, out, lse, ctx.key, ctx.scale,
                                       block_indices, head_indices, ctx.options, sinks, ctx.softcap, alibi_slopes,
                                       *pieces)
    dsinks = sink_gradient(dout, dlse, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[8] else None
    # ALiBi slopes and the pieces' index tensors are constants
    return dq, dk, dv, None, None, None, None, None, dsinks, None, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["BACKWARD_KERNELS", "apply_sinks", "attention_backward", "attention_backward_op", "attention_forward", "attention_op", "cache_entries", "runs_eagerly", "bound_spec", "reference",
           "lookup_spec", "spec_from_repr", "spec_key"]
