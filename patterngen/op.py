"""`patterngen::attention`: sparse attention as a torch.library custom op.

Why an op: `torch.compile` traces a module that calls `pg.attention` without
graph breaks only if the attention is one opaque node with a fake (meta)
implementation and a registered backward. The op's CPU body (and the body on
any device without a generated kernel) is the exact reference backend; on
CUDA it launches the generated Triton kernels, built once per spec and cached
(with `head_indices`, the head-routed MoH kernels); `patterngen.dispatch` makes that
choice and keeps why a call takes the reference (`pg.explain`). The backward is a second
op, so compiled backward graphs stay opaque too: the generated backward
kernels when no lse gradient flows, else the reference recomputed under
autograd (`BACKWARD_KERNELS` overrides both).

A Spec is not a tensor, so the op receives it as a string key into a
process-wide registry (`patterngen.registry.spec_key`). The key is derived from the spec's repr,
stable across calls and processes, so a compiled graph holds a constant
string and never recompiles because of the spec.

Why `custom_op` and not `triton_op`: `torch.compile` decomposes a
`triton_op` into its body, which it cannot trace on a machine without a GPU
driver, and the reference body is data dependent (tile plans, masks).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .backends.inputs import check_head_values, head_selection
from . import dispatch
from .backends.reference import reference_attention
from .ir import Spec
from .analysis.plan import Plan, build_plan
from .registry import lookup_spec, spec_from_repr, spec_key

_PLANS: dict[str, Plan] = {}


def _plan(key: str, spec: Spec) -> Plan | None:
    """The default-tiling plan of a static spec, built once (Routed plans depend on the indices)."""
    if spec.routed is not None:
        return None
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.setdefault(key, build_plan(spec))
    return plan


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_result(q):
    """What attention over no key gives: zeros, and a log-sum-exp of -inf."""
    return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=_acc_dtype(q.dtype))


def _reference(q, k, v, key, scale, block_indices, head_indices=None):
    """The reference result; with head routing, unchosen (token, head) rows become 0 and lse -inf."""
    if dispatch.is_empty(q, k):
        return _empty_result(q)
    spec = lookup_spec(key)
    out, lse = reference_attention(q, k, v, spec, plan=_plan(key, spec), scale=scale, block_indices=block_indices)
    if head_indices is None:
        return out, lse
    chosen = head_selection(head_indices, spec.num_heads)
    return out * chosen[..., None].to(out.dtype), lse.masked_fill(~chosen, float("-inf"))


# -- forward ------------------------------------------------------------------------
@torch.library.custom_op("patterngen::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec_key: str, scale: Optional[float] = None,
                 block_indices: Optional[torch.Tensor] = None, head_indices: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, D], lse [B, Hq, Nq]) of the spec registered under `spec_key`; reference backend."""
    out, lse = _reference(q, k, v, spec_key, scale, block_indices, head_indices)
    return out.contiguous(), lse.contiguous()


@attention_op.register_kernel("cuda")
def _attention_cuda(q, k, v, spec_key, scale=None, block_indices=None, head_indices=None):
    routed_heads = head_indices is not None
    if dispatch.choose(spec_key, q, k, head_indices=routed_heads).backend == "reference":
        out, lse = _reference(q, k, v, spec_key, scale, block_indices, head_indices)
    elif routed_heads:
        check_head_values(head_indices, q.shape[1])
        out, lse = dispatch.kernel(spec_key, "heads_forward").forward(q, k, v, head_indices, scale=scale)
    else:  # the kernel checks block_indices as the reference does (normalize_block_indices)
        out, lse = dispatch.kernel(spec_key, "forward")(q, k, v, scale=scale, block_indices=block_indices)
    # the fake kernel promises contiguous results whatever the input strides
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, spec_key, scale=None, block_indices=None, head_indices=None):
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))
    return out, lse


# -- backward -----------------------------------------------------------------------
BACKWARD_KERNELS: dict[str, Callable] = {}
"""Override hook: spec key -> callable `(dout, dlse, q, k, v, out, lse, scale, block_indices)
-> (dq, dk, dv)` on CUDA tensors. Without an entry, CUDA uses the generated Triton backward
(`dispatch.kernel(key, "backward")`) when no lse gradient flows, and otherwise recomputes the
reference under autograd."""


def _autograd_inside_op():
    """Re-enable autograd inside an op body: the dispatcher excludes the autograd keys
    below the op's own autograd node, so `enable_grad` alone would record nothing."""
    keys = torch._C.DispatchKey
    exclude = (torch._C._dispatch_tls_local_exclude_set()
               .remove(keys.AutogradFunctionality).remove(keys.ADInplaceOrView))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _reference_backward(dout, dlse, q, k, v, key, scale, block_indices, head_indices=None):
    """Exact gradients: differentiate the reference forward again (dlse may be None)."""
    if dispatch.is_empty(q, k):  # nothing depends on q, k or v
        return tuple(torch.zeros_like(t) for t in (q, k, v))
    with _autograd_inside_op(), torch.enable_grad():
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, lse = _reference(qg, kg, vg, key, scale, block_indices, head_indices)
        outs, grads = [out], [dout]
        if dlse is not None:
            outs.append(lse)
            grads.append(dlse)
        dq, dk, dv = torch.autograd.grad(outs, (qg, kg, vg), grads, allow_unused=True)
    return tuple((torch.zeros_like(t) if g is None else g).contiguous() for g, t in zip((dq, dk, dv), (q, k, v)))


@torch.library.custom_op("patterngen::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, spec_key: str,
                          scale: Optional[float] = None, block_indices: Optional[torch.Tensor] = None,
                          head_indices: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `patterngen::attention`; out and lse are the forward's results,
    kept for the kernels that use them (rowsum(dO * O), softmax from lse)."""
    return _reference_backward(dout, dlse, q, k, v, spec_key, scale, block_indices, head_indices)


@attention_backward_op.register_kernel("cuda")
def _attention_backward_cuda(dout, dlse, q, k, v, out, lse, spec_key, scale=None, block_indices=None,
                             head_indices=None):
    override = BACKWARD_KERNELS.get(spec_key) if head_indices is None else None
    if override is not None and q.dtype != torch.float64 and not dispatch.is_empty(q, k):
        grads = override(dout, dlse, q, k, v, out, lse, scale, block_indices)
    elif dlse is not None or dispatch.choose(spec_key, q, k, head_indices=head_indices is not None,
                                             role="backward").backend == "reference":
        # (the generated backward does not take a gradient flowing into the lse)
        return _reference_backward(dout, dlse, q, k, v, spec_key, scale, block_indices, head_indices)
    elif head_indices is not None:
        grads = dispatch.kernel(spec_key, "heads_backward").backward(q, k, v, out, lse, dout, head_indices,
                                                                     scale=scale)
    else:
        grads = dispatch.kernel(spec_key, "backward")(q, k, v, out, lse, dout, scale=scale,
                                                      block_indices=block_indices)
    return tuple(g.contiguous() for g in grads)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, spec_key, scale=None, block_indices=None,
                             head_indices=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key, scale, block_indices, head_indices = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_indices, head_indices)
    ctx.key, ctx.scale = key, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, block_indices, head_indices = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(dout.contiguous(), dlse, q, k, v, out, lse, ctx.key, ctx.scale,
                                       block_indices, head_indices)
    return dq, dk, dv, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["BACKWARD_KERNELS", "attention_backward_op", "attention_op", "lookup_spec", "spec_from_repr", "spec_key"]
