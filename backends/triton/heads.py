"""Head-routed (Mixture-of-Head) kernels: only the (token, head) pairs a router chose are computed.

Per (batch, head), a compaction kernel lists the q slots (tokens in q-tile order)
whose token chose the head, as a stable prefix sum, and counts them per q tile.
Forward and dQ programs then take BLOCK_M compacted rows at a time; such a tile
spans consecutive q tiles ta..tb of the static plan and visits the union of
their kv tiles (undilated windows: the neighbourhood of the rows' bounding box,
in closed form). dK/dV programs walk, per kv tile, the runs of consecutive q
tiles that see it (the transposed plan), whose chosen rows are contiguous in the
compacted list. Work therefore scales with the chosen pairs, not with all heads.
"""
from __future__ import annotations

import torch

from ...core.tiles import Tiling
from ...ir import Spec
from .cache import load_source
from .checks import check_launch_dtype
from .config import KernelConfig, backward_config, pow2_ceil
from .cross_compile import CompiledKernel, compile_generated
from .launch import TritonForward, log2_lse, preprocess, softmax_scale
from .render import heads_walk, render_heads
from .tables import DeviceTables, heads_tables

MAX_CLASS_TABLE = 1 << 28
"""Largest (groups x q tiles x kv tiles) byte table of tile classes the table path keeps on the device."""
COMPACT_CONFIG = KernelConfig(num_warps=4, num_stages=1)  # a prefix sum: nothing to pipeline


class TritonHeads:
    """Head-routed forward and backward of one spec and tiling; `head_indices[B, Nq, k]` lists
    the heads each query token uses (-1: unused slot). Unchosen (token, head) rows give zero
    output, lse -inf and zero dq, and contribute nothing to dk and dv."""

    def __init__(self, spec: Spec, tiling: Tiling | None = None, config: KernelConfig | None = None):
        if spec.routed is not None:
            raise NotImplementedError("triton backend: head routing with Routed block patterns is not generated; "
                                      "use the reference backend")
        self.fwd = fwd = TritonForward(spec, tiling, config)  # grids, plan groups, head groups, constants
        self.spec, self.config = spec, fwd.config
        self.backward_config = config or backward_config(fwd.block_d)
        self.walk = heads_walk(spec, fwd.statics, fwd.q_grid, fwd.kv_grid)
        tables = self.walk.name == "tile_union"  # the tile-class table it walks; windows need none
        nq_t, nkv_t = fwd.q_grid.count, fwd.kv_grid.count
        groups = len(fwd.groups)
        if tables and groups * nq_t * nkv_t > MAX_CLASS_TABLE:
            raise NotImplementedError(f"triton backend: head routing for {spec!r} with these tiles needs a "
                                      f"{groups} x {nq_t} x {nkv_t} tile-class table; use larger tiles")
        self.tables = heads_tables(fwd.groups, nq_t, nkv_t, classes=tables)
        self.source = render_heads(spec, fwd.statics, fwd.q_grid, fwd.kv_grid, self.walk)
        self.module = load_source(self.source)
        self.device_tables = DeviceTables(**self.tables)

    def tables_on(self, device) -> dict:
        """The head-routed tables (`heads_tables`) on `device`, copied once."""
        return self.device_tables.all_on(device)

    def head_groups(self, batch: int, device) -> torch.Tensor:
        """[B, H] static group of each head (the same for every batch entry)."""
        return self.fwd.device_tables.get("head_group", device).repeat(batch)

    # -- launches ----------------------------------------------------------------------
    def compact_consts(self, topk: int) -> dict:
        """The compaction kernel's constants for `topk` heads per token."""
        bm = self.fwd.block_m
        return {"TOPK": topk, "TOPK_P2": max(2, pow2_ceil(topk)), "BLOCK_M": bm,
                "CHUNK": max(bm, min(1024, pow2_ceil(self.fwd.q_grid.count * bm)))}

    def compact(self, head_indices: torch.Tensor):
        """(SLOTS [B, H, q slots], PREF [B, H, q tiles + 1]) of int32 head indices [B, Nq, k]."""
        B, _, topk = head_indices.shape
        H, nq_t, bm = self.spec.num_heads, self.fwd.q_grid.count, self.fwd.block_m
        hidx = head_indices.to(torch.int32).contiguous()
        slots = torch.empty(B, H, nq_t * bm, dtype=torch.int32, device=hidx.device)
        pref = torch.empty(B, H, nq_t + 1, dtype=torch.int32, device=hidx.device)
        self.module.compact_heads[(H, B)](hidx, slots, pref, hidx.stride(0), hidx.stride(1), H, nq_t,
                                          **self.compact_consts(topk), **self._launch(COMPACT_CONFIG))
        return slots, pref

    @staticmethod
    def _launch(config: KernelConfig) -> dict:
        return dict(num_warps=config.num_warps, num_stages=config.num_stages)

    def forward(self, q, k, v, head_indices, scale: float | None = None):
        """(out, lse) with only the chosen (token, head) rows computed."""
        check_launch_dtype(q)
        spec, fwd = self.spec, self.fwd
        B = q.shape[0]
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        scale = softmax_scale(spec.head_dim, scale)
        slots, pref = self.compact(head_indices)
        out = torch.zeros_like(q)
        lse = torch.full((B, spec.num_heads, spec.nq), float("-inf"), device=q.device, dtype=torch.float32)
        t = self.tables_on(q.device)
        self.module.attention_fwd_heads[(fwd.q_grid.count, spec.num_heads, B)](
            q, k, v, out, lse, slots, pref, self.head_groups(B, q.device), t["KV_LO"], t["KV_HI"], t["CLASSES"], scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], spec.num_heads,
            fwd.q_grid.count, fwd.kv_grid.count, **fwd.constexprs(q.dtype), **self._launch(self.config))
        return out, lse

    def backward(self, q, k, v, out, lse, dout, head_indices, scale: float | None = None):
        """(dq, dk, dv) of `forward`'s (out, lse); unchosen rows get dq = 0."""
        check_launch_dtype(q)
        spec, fwd = self.spec, self.fwd
        B = q.shape[0]
        scale = softmax_scale(spec.head_dim, scale)
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        slots, pref = self.compact(head_indices)
        t, head_group = self.tables_on(q.device), self.head_groups(B, q.device)
        lse2 = log2_lse(lse)
        delta = preprocess(self.module, fwd, out, dout)
        dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
        consts = fwd.constexprs(q.dtype)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
        sizes = (spec.num_heads, fwd.q_grid.count, fwd.kv_grid.count)
        self.module.attention_bwd_dkdv_heads[(fwd.kv_grid.count, spec.num_kv_heads, B)](
            q, k, v, dout, lse2, delta, dk, dv, slots, pref, head_group, t["RUN_PTR"], t["RUNS"], scale,
            *strides, *dk.stride()[:3], *dv.stride()[:3], *sizes, **consts, **self._launch(self.backward_config))
        self.module.attention_bwd_dq_heads[(fwd.q_grid.count, spec.num_heads, B)](
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
