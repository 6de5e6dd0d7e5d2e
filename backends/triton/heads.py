"""Head-routed (Mixture-of-Head) kernels: only the (token, head) pairs a router chose are computed.

Per (batch, head), a compaction kernel lists the q slots (tokens in q-tile order)
whose token chose the head, as a stable prefix sum, and counts them per q tile.
Forward and dQ programs then take BLOCK_M compacted rows at a time; such a tile
spans consecutive q tiles ta..tb of the static plan and visits the union of
their kv tiles (undilated windows: the neighbourhood of the rows' bounding box,
in closed form). dK/dV programs walk, per kv tile, the runs of consecutive q
tiles that see it (the transposed plan), whose chosen rows are contiguous in the
compacted list. Work therefore scales with the chosen pairs, not with all heads.
Lengths are kernel arguments, as in the dense-head kernels: a length-free spec gets
the tables of each call's lengths from its TritonForward (`lengths`).
"""
from __future__ import annotations

import torch

from ...core.tiles import Tiling
from ...ir import Spec
from .cache import load_source
from .checks import check_launch_dtype, check_lengths
from .config import KernelConfig, pow2_ceil
from .cross_compile import CompiledKernel, compile_generated
from .launch import TritonForward, int64_offsets, log2_lse, no_pairs, preprocess, softmax_scale
from .render import heads_walk, render_heads

MAX_CLASS_TABLE = 1 << 28
"""Largest (groups x q tiles x kv tiles) byte table of tile classes the table path keeps on the device."""
COMPACT_CONFIG = KernelConfig(num_warps=4, num_stages=1)  # a prefix sum: nothing to pipeline
BACKWARD_CONFIG = KernelConfig(num_warps=8, num_stages=2)
"""The head-routed dQ and dK/dV launch at every head dim: rows gathered through SLOTS take
registers of their own, and with `backward_config`'s 4 warps at head dim 64 the dK/dV kernel
spilled (129 instructions on sm_90, 17 on sm_80; none at 8 warps)."""


class TritonHeads:
    """Head-routed forward and backward of one spec and tiling; `head_indices[B, Nq, k]` lists
    the heads each query token uses (-1: unused slot). Unchosen (token, head) rows give zero
    output, lse -inf and zero dq, and contribute nothing to dk and dv. A length-free spec
    takes any lengths, as TritonForward does (the tables of each come from its `lengths`)."""

    def __init__(self, spec: Spec, tiling: Tiling | None = None, config: KernelConfig | None = None):
        if spec.routed is not None:
            raise NotImplementedError("triton backend: head routing with Routed block patterns is not generated; "
                                      "use the reference backend")
        self.fwd = fwd = TritonForward(spec, tiling, config)  # head groups, constants, tables per length
        self.spec, self.config = spec, fwd.config
        self.backward_config = config or BACKWARD_CONFIG
        grids = fwd.template_grids()
        self.walk = heads_walk(spec, fwd.statics, *grids)
        self.classes = self.walk.name == "tile_union"  # the tile-class table it walks; windows need none
        if not spec.length_free:
            self._check_size(fwd.lengths(spec.nq, spec.nkv))
        self.source = render_heads(spec, fwd.statics, *grids, self.walk)
        self.module = load_source(self.source)

    def _check_size(self, lt) -> None:
        groups, nq_t, nkv_t = len(self.fwd.statics), lt.q_grid.count, lt.kv_grid.count
        if self.classes and groups * nq_t * nkv_t > MAX_CLASS_TABLE:
            raise NotImplementedError(f"triton backend: head routing for {lt.spec!r} with these tiles needs a "
                                      f"{groups} x {nq_t} x {nkv_t} tile-class table; use larger tiles")

    def tables_on(self, device, nq: int, nkv: int) -> dict:
        """The head-routed tables (`heads_tables`) of these lengths on `device`, copied once."""
        lt = self.fwd.lengths(nq, nkv)
        if self.spec.length_free:
            self._check_size(lt)
        return lt.heads(self.classes).all_on(device)

    def head_groups(self, batch: int, device) -> torch.Tensor:
        """[B, H] static group of each head (the same for every batch entry)."""
        return self.fwd.head_groups(batch, device)

    # -- launches ----------------------------------------------------------------------
    def compact_consts(self, topk: int) -> dict:
        """The compaction kernel's constants for `topk` heads per token: its chunk of slots
        covers a fixed spec's q tiles up to 1024 slots, and is 1024 for a length-free spec
        (no launch constant depends on the lengths)."""
        bm = self.fwd.block_m
        slots = 1024 if self.spec.length_free else pow2_ceil(self.fwd.q_grid.count * bm)
        return {"TOPK": topk, "TOPK_P2": max(2, pow2_ceil(topk)), "BLOCK_M": bm, "CHUNK": max(bm, min(1024, slots))}

    def compact(self, head_indices: torch.Tensor):
        """(SLOTS [B, H, q slots], PREF [B, H, q tiles + 1]) of int32 head indices [B, Nq, k]."""
        B, nq, topk = head_indices.shape
        H, bm = self.spec.num_heads, self.fwd.block_m
        nq_t = -(-nq // bm) if self.spec.length_free else self.fwd.q_grid.count  # boxes: the grid's tiles
        hidx = head_indices.to(torch.int32).contiguous()
        slots = torch.empty(B, H, nq_t * bm, dtype=torch.int32, device=hidx.device)
        pref = torch.empty(B, H, nq_t + 1, dtype=torch.int32, device=hidx.device)
        self.module.compact_heads[(H, B)](hidx, slots, pref, hidx.stride(0), hidx.stride(1), H, nq_t, nq,
                                          **self.compact_consts(topk), **self._launch(COMPACT_CONFIG))
        return slots, pref

    @staticmethod
    def _launch(config: KernelConfig) -> dict:
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)

    def forward(self, q, k, v, head_indices, scale: float | None = None):
        """(out, lse) with only the chosen (token, head) rows computed."""
        check_launch_dtype(q)
        spec, fwd = self.spec, self.fwd
        B, nq, nkv = q.shape[0], q.shape[2], k.shape[2]
        out = torch.zeros_like(q)
        lse = torch.full((B, spec.num_heads, nq), float("-inf"), device=q.device, dtype=torch.float32)
        check_lengths(spec, nq, nkv)
        if no_pairs(q, k):
            return out, lse
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        scale = softmax_scale(spec.head_dim, scale)
        t = self.tables_on(q.device, nq, nkv)
        lt = fwd.lengths(nq, nkv)
        slots, pref = self.compact(head_indices)
        self.module.attention_fwd_heads[(lt.q_grid.count, spec.num_heads, B)](
            q, k, v, out, lse, slots, pref, self.head_groups(B, q.device), t["KV_LO"], t["KV_HI"], t["CLASSES"], scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], spec.num_heads,
            lt.q_grid.count, lt.kv_grid.count, nq, nkv, **fwd.constexprs(q.dtype, None, int64_offsets(q, k, v, out)),
            **self._launch(self.config))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, head_indices, scale: float | None = None):
        """(dq, dk, dv) of `forward`'s (out, lse); unchosen rows get dq = 0."""
        check_launch_dtype(q)
        spec, fwd = self.spec, self.fwd
        B, nq, nkv = q.shape[0], q.shape[2], k.shape[2]
        check_lengths(spec, nq, nkv)
        if no_pairs(q, k):
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        scale = softmax_scale(spec.head_dim, scale)
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        t, head_group = self.tables_on(q.device, nq, nkv), self.head_groups(B, q.device)
        lt = fwd.lengths(nq, nkv)
        slots, pref = self.compact(head_indices)
        lse2 = log2_lse(lse)
        delta = preprocess(self.module, fwd, out, dout)
        dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
        consts = fwd.constexprs(q.dtype, None, int64_offsets(q, k, v, dout))  # dq, dk, dv: as q, k, v
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
        sizes = (spec.num_heads, lt.q_grid.count, lt.kv_grid.count, nq, nkv)
        self.module.attention_bwd_dkdv_heads[(lt.kv_grid.count, spec.num_kv_heads, B)](
            q, k, v, dout, lse2, delta, dk, dv, slots, pref, head_group, t["RUN_PTR"], t["RUNS"], scale,
            *strides, *dk.stride()[:3], *dv.stride()[:3], *sizes, **consts, **self._launch(self.backward_config))
        self.module.attention_bwd_dq_heads[(lt.q_grid.count, spec.num_heads, B)](
            q, k, v, dout, lse2, delta, dq, slots, pref, head_group, t["KV_LO"], t["KV_HI"], t["CLASSES"],
            scale, *strides, *dq.stride()[:3], *sizes, **consts, **self._launch(self.backward_config))
        return dq, dk, dv

    # -- ahead-of-time compilation ---------------------------------------------------------
    KERNELS = ("compact_heads", "attention_fwd_heads", "attention_bwd_dq_heads", "attention_bwd_dkdv_heads")

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16, topk: int = 4,
                      names: tuple[str, ...] = KERNELS) -> list[CompiledKernel]:
        """The kernels `names` (default: compaction, forward, dQ, dK/dV) compiled for sm_<arch>
        without a GPU; the compaction for `topk` heads per token."""
        consts = {"compact_heads": self.compact_consts(topk)}
        configs = {"compact_heads": COMPACT_CONFIG, "attention_fwd_heads": self.config}
        return [compile_generated(self.source, name, getattr(self.module, name).arg_names,
                                  consts.get(name, self.fwd.constexprs(dtype)), dtype, arch,
                                  configs.get(name, self.backward_config), self.spec.head_dim)
                for name in names]
