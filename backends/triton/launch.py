"""Build and launch the generated kernels of a spec and tiling: forward and backward.

Building checks the tiling, plans each group of heads, renders and imports the kernel
module, and lays the plans out as tables (once per spec and tiling). A launch copies the
tables to the inputs' device once and calls the kernels; it returns (out, lse) or
(dq, dk, dv) like the reference backend.
"""
from __future__ import annotations

import torch

from ...analysis.tiling import default_tiling
from ...core.tiles import TileGrid, Tiling
from ...ir import Spec
from ...routing.blocks import normalize_block_indices
from ..inputs import check_scale
from .cache import load_source
from .checks import check_launch_dtype, check_routed_block, check_tiling
from .config import (PREPROCESS_BLOCK_M, PREPROCESS_CONFIG, KernelConfig, backward_config, default_config, head_block,
                     pow2_ceil)
from .cross_compile import CompiledKernel, compile_generated
from .ranges import closed_form
from .render import forward_walk, render_backward, render_forward
from .tables import (DeviceTables, forward_tables, group_plans, head_groups, max_static, routed_transpose,
                     transposed_tables)

LOG2E = 1.4426950408889634


def softmax_scale(head_dim: int, scale: float | None) -> float:
    """SDPA's default scale 1/sqrt(head_dim) (`check_scale`'s rule) unless one is given."""
    return check_scale(None, head_dim) if scale is None else float(scale)


def log2_lse(lse: torch.Tensor) -> torch.Tensor:
    """The backward kernels' log2-domain lse; rows that saw nothing get +inf so that their
    probabilities are 0."""
    return torch.where(torch.isinf(lse), float("inf"), lse.float() * LOG2E).contiguous()


class TritonForward:
    """The forward kernel of one spec and tiling: plan tables on the device, the
    generated module, and a launcher returning (out, lse) like the reference.

    Routed specs need q and kv tiles equal to the routing block, so that a
    selected block is one kv tile; the static part is planned ahead of time.
    """

    def __init__(self, spec: Spec, tiling: Tiling | None = None, config: KernelConfig | None = None):
        check_routed_block(spec)
        tiling = tiling or default_tiling(spec)
        check_tiling(spec, tiling)
        self._set_tiles(spec, tiling, config)
        self.statics, self.head_group, self.routed_heads = head_groups(spec)
        self.groups = group_plans(spec, self.statics, self.q_grid, self.kv_grid)
        self.segments = None
        if len(self.statics) == 1 and spec.routed is None and self.q_grid.flat and self.kv_grid.flat:
            self.segments = closed_form(self.statics[0], spec, self.block_m, self.block_n, self.groups[0])
        self.walk = forward_walk(spec, self.statics, self.q_grid, self.kv_grid, self.segments)
        self.source = render_forward(spec, self.statics, self.q_grid, self.kv_grid, self.walk)
        self.module = load_source(self.source)
        self.rows, self.cols, self.work = forward_tables(spec, self.groups, self.head_group, self.routed_heads)
        self.max_static = max_static(self.groups)
        self._hold_tables()

    def _set_tiles(self, spec: Spec, tiling: Tiling, config: KernelConfig | None) -> None:
        self.spec = spec
        self.q_grid = TileGrid(spec.q_shape, tiling.q_tile, "q_tile")
        self.kv_grid = TileGrid(spec.kv_shape, tiling.kv_tile, "kv_tile")
        self.block_m, self.block_n = self.q_grid.volume, self.kv_grid.volume
        self.block_d = head_block(spec.head_dim)
        self.config = config or default_config(self.block_m, self.block_d)

    def _hold_tables(self) -> None:
        """The plan tables (and which heads are routed), copied to each device once (`tables_on`)."""
        self.device_tables = DeviceTables(rows=self.rows, cols=self.cols, work=self.work, head_group=self.head_group,
                                          routed_heads=self.routed_heads)

    @classmethod
    def from_saved(cls, spec: Spec, tiling: Tiling, config: KernelConfig, module, tables: dict) -> "TritonForward":
        """A launcher from a build's imported module and saved plan tables: nothing rendered or analysed."""
        self = cls.__new__(cls)
        self._set_tiles(spec, tiling, config)
        self.module, self.source = module, None
        self.rows, self.cols, self.work = tables["rows"], tables["cols"], tables["work"]
        self.head_group, self.routed_heads = tables["head_group"], tables["routed_heads"]
        self.max_static = int(tables["max_static"])
        self._hold_tables()
        return self

    def routed_indices(self, block_indices, batch: int, device) -> torch.Tensor:
        """int32 [B, H, q blocks, topk] block indices as the kernels read them (checked and
        normalised; -1 in the heads whose pattern has no Routed part)."""
        idx = normalize_block_indices(self.spec, block_indices).expand(batch, -1, -1, -1)
        idx = torch.where(self.device_tables.get("routed_heads", idx.device)[None, :, None, None], idx, -1)
        return idx.to(device=device, dtype=torch.int32).contiguous()

    def tables_on(self, device: torch.device):
        """(ROWS, COLS, WORK, HEAD_GROUP) on `device`, copied once."""
        return self.device_tables.on(device, "rows", "cols", "work", "head_group")

    def constexprs(self, dtype: torch.dtype, topk: int | None = None) -> dict:
        out = {"HEAD_DIM": self.spec.head_dim, "BLOCK_D": self.block_d, "BLOCK_M": self.block_m,
               "BLOCK_N": self.block_n, "GQA_GROUP": self.spec.num_heads // self.spec.num_kv_heads,
               "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
        if self.spec.routed is not None:
            topk = self.spec.routed.topk if topk is None else topk
            out.update(TOPK=topk, TOPK_P2=max(2, pow2_ceil(topk)), MAX_STATIC=self.max_static)
        return out

    def __call__(self, q, k, v, scale: float | None = None,
                 block_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_launch_dtype(q)
        B = q.shape[0]
        routed = [] if self.spec.routed is None else [self.routed_indices(block_indices, B, q.device)]
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        scale = softmax_scale(self.spec.head_dim, scale)
        out = torch.empty_like(q)
        lse = torch.empty(B, self.spec.num_heads, self.spec.nq, device=q.device, dtype=torch.float32)
        rows, cols, work, head_group = self.tables_on(q.device)
        head_group = head_group.repeat(B)  # [B, H]: static groups are the same for every batch entry
        grid = (work.shape[0], B)
        self.module.attention_fwd[grid](
            q, k, v, out, lse, rows, cols, work, head_group, *routed, scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *(routed[0].stride()[:2] if routed else ()), self.spec.num_heads, self.q_grid.count,
            **self.constexprs(q.dtype, routed[0].shape[-1] if routed else None),
            num_warps=self.config.num_warps, num_stages=self.config.num_stages)
        return out, lse

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16) -> CompiledKernel:
        """Compile for sm_<arch> without a GPU: cubin, PTX and shared memory."""
        return compile_generated(self.source, "attention_fwd", self.module.attention_fwd.arg_names,
                                 self.constexprs(dtype), dtype, arch, self.config, self.spec.head_dim)


def preprocess_consts(fwd: TritonForward) -> dict:
    return {"HEAD_DIM": fwd.spec.head_dim, "BLOCK_D": fwd.block_d, "BLOCK_M": PREPROCESS_BLOCK_M}


def preprocess(module, fwd: TritonForward, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """DELTA = rowsum(dO * O) [B, H, Nq] in float32, by the module's `bwd_preprocess` kernel
    (every backward template has one)."""
    B, H = out.shape[:2]
    delta = torch.empty(B, H, fwd.spec.nq, device=out.device, dtype=torch.float32)
    module.bwd_preprocess[(-(-fwd.spec.nq // PREPROCESS_BLOCK_M), H, B)](
        out, dout, delta, *out.stride()[:3], H, **preprocess_consts(fwd),
        num_warps=PREPROCESS_CONFIG.num_warps, num_stages=PREPROCESS_CONFIG.num_stages)
    return delta


class TritonBackward:
    """dQ, dK, dV of a forward kernel's spec and tiling, from the same plan: dK/dV walk the
    transposed plan (per kv tile, the q tiles that see it), dQ the forward plan; full tiles
    run without mask code. Deterministic (no atomics). Routed blocks: dQ walks them as the
    forward does, dK/dV the run-time routing transposed (`routed_transpose`)."""

    def __init__(self, forward: TritonForward, config: KernelConfig | None = None):
        source = render_backward(forward.spec, forward.statics, forward.q_grid, forward.kv_grid)
        self._setup(forward, config or backward_config(forward.block_d), source, load_source(source),
                    *transposed_tables(forward.groups, forward.kv_grid.count))

    @classmethod
    def from_saved(cls, forward: TritonForward, module, rows_t: torch.Tensor, cols_t: torch.Tensor,
                   config: KernelConfig) -> "TritonBackward":
        """A launcher from a module and tables saved by an ahead-of-time build: nothing is
        rendered or analysed (`forward` only supplies its plan tables and constants)."""
        self = cls.__new__(cls)
        self._setup(forward, config, None, module, rows_t, cols_t)
        return self

    def _setup(self, forward, config, source, module, rows_t, cols_t):
        self.fwd, self.config, self.source, self.module = forward, config, source, module
        self.rows_t, self.cols_t = rows_t, cols_t
        self.device_tables = DeviceTables(rows_t=rows_t, cols_t=cols_t)

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16,
                      preprocess: bool = False) -> list[CompiledKernel]:
        """The dK/dV and dQ kernels compiled for sm_<arch>, and with `preprocess` the trivial
        rowsum(dO * O) kernel too (with the launch options its JIT launch uses)."""
        consts = self.fwd.constexprs(dtype)
        out = [compile_generated(self.source, name, getattr(self.module, name).arg_names, consts, dtype, arch,
                                 self.config, self.fwd.spec.head_dim)
               for name in ("attention_bwd_dkdv", "attention_bwd_dq")]
        if preprocess:
            out.append(compile_generated(self.source, "bwd_preprocess", self.module.bwd_preprocess.arg_names,
                                         preprocess_consts(self.fwd), dtype, arch, PREPROCESS_CONFIG,
                                         self.fwd.spec.head_dim))
        return out

    def __call__(self, q, k, v, out, lse, dout, scale: float | None = None,
                 block_indices: torch.Tensor | None = None):
        """(dq, dk, dv) for the forward's (out, lse) (and a Routed spec's block indices)."""
        check_launch_dtype(q)
        spec, fwd = self.fwd.spec, self.fwd
        B = q.shape[0]
        scale = softmax_scale(spec.head_dim, scale)
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        rows_t, cols_t = self.device_tables.on(q.device, "rows_t", "cols_t")
        rows, cols, head_group = fwd.device_tables.on(q.device, "rows", "cols", "head_group")
        head_group = head_group.repeat(B)
        lse2 = log2_lse(lse)
        delta = preprocess(self.module, fwd, out, dout)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        consts = fwd.constexprs(q.dtype)
        common = dict(num_warps=self.config.num_warps, num_stages=self.config.num_stages)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
        dkdv_routed, dq_routed, idx_strides, nq_t = (), (), (), ()
        if spec.routed is not None:
            idx = fwd.routed_indices(block_indices, B, q.device)
            consts = fwd.constexprs(q.dtype, idx.shape[-1])
            dkdv_routed = (rows, cols, idx, *routed_transpose(idx, fwd.kv_grid.count))
            dq_routed, idx_strides, nq_t = (idx,), idx.stride()[:2], (fwd.q_grid.count,)
        self.module.attention_bwd_dkdv[(fwd.kv_grid.count, spec.num_kv_heads, B)](
            q, k, v, dout, lse2, delta, dk, dv, rows_t, cols_t, head_group, *dkdv_routed, scale, *strides,
            *dk.stride()[:3], *dv.stride()[:3], *idx_strides, spec.num_heads, fwd.kv_grid.count, *nq_t, **consts,
            **common)
        self.module.attention_bwd_dq[(fwd.q_grid.count, spec.num_heads, B)](
            q, k, v, dout, lse2, delta, dq, rows, cols, head_group, *dq_routed, scale, *strides, *dq.stride()[:3],
            *idx_strides, spec.num_heads, fwd.q_grid.count, **consts, **common)
        return dq, dk, dv

