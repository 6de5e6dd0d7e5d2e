"""Build, launch and cross-compile the generated Triton forward kernel of a spec."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...analysis.classify import TileAnalysis, has_routed
from ...ir import Pattern, Routed, Spec, Union
from ...analysis.plan import TilePlan
from ...analysis.tiling import default_tiling
from ...routing.blocks import normalize_block_indices
from ...core.tiles import TileGrid, Tiling
from .aot import CompiledKernel, compile_kernel
from .ranges import closed_form
from .cache import load_source, write_source
from .codegen import forward_walk, render_backward, render_forward


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters besides the tiles (which the plan fixes)."""

    num_warps: int = 4
    num_stages: int = 2


def default_config(block_m: int, block_d: int) -> KernelConfig:
    """Deterministic choice used without a GPU to tune on: more warps for bigger accumulators."""
    return KernelConfig(num_warps=8 if block_m * block_d >= 64 * 128 else 4, num_stages=2)


def default_kernel_tiling(spec: Spec) -> Tiling:
    """The tiling policy's default (patterngen.analysis.tiling), which kernels can always run."""
    return default_tiling(spec)


def _check_tiling(spec: Spec, tiling: Tiling) -> None:
    for name, tile in (("q_tile", tiling.q_tile), ("kv_tile", tiling.kv_tile)):
        vol = math.prod(tile) if isinstance(tile, tuple) else tile
        if vol < 16 or vol & (vol - 1):
            raise ValueError(f"tiling: {name}={tile!r} has {vol} tokens; the Triton backend needs a power of two "
                             f">= 16 (tl.dot and tl.arange), e.g. 64, 128 or boxes such as (16, 8)")


def check_routed_block(spec: Spec) -> None:
    """A routed block is one tile of the kernel, so it must suit tl.dot as a tile does."""
    block = None if spec.routed is None else spec.routed.block
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"{spec.routed!r}: the Triton backend needs the routed block to be a power of two "
                         f">= 16 (each routed block is one kernel tile), got block={block}; use block 16, 32, "
                         f"64 or 128, or the reference backend (pg.compile(spec, backend='reference'))")


def check_launch_dtype(q: torch.Tensor) -> None:
    """Refuse bfloat16 on the Triton interpreter (CPU tensors): its tl.dot on bfloat16 is wrong in
    Triton 3.9 itself (errors near 1e9 even for a dense tile), so the numbers would be garbage."""
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise TypeError("q: bfloat16 is not run under TRITON_INTERPRET=1: the Triton interpreter computes "
                        "tl.dot on bfloat16 wrongly (a Triton bug), so its results cannot be trusted; use "
                        "float16 or float32 on the interpreter, or bfloat16 on a CUDA GPU")


def split_routed(pattern: Pattern) -> tuple[Routed | None, Pattern | None]:
    """(Routed part, static part) of a head pattern of the form Routed, Routed | static, or static."""
    if isinstance(pattern, Routed):
        return pattern, None
    if isinstance(pattern, Union):
        routed = [p for p in pattern.parts if isinstance(p, Routed)]
        rest = [p for p in pattern.parts if not isinstance(p, Routed)]
        if len(routed) == 1 and not any(has_routed(p) for p in rest):
            return routed[0], Union.of(*rest)
    if has_routed(pattern):
        raise NotImplementedError(f"triton backend: {pattern!r}: Routed blocks are generated only as "
                                  f"`Routed(...)` or `Routed(...) | static`; use backend='reference'")
    return None, pattern


_INT_TABLES = ("ROWS", "COLS", "WORK", "HEAD_GROUP", "IDX", "ROWS_T", "COLS_T", "HIDX", "SLOTS", "PREF", "KV_LO",
               "KV_HI", "RUN_PTR", "RUNS", "RT_PTR", "RT_Q")


def cross_compile(source: str, kernel: str, arg_names: list[str], consts: dict, dtype: torch.dtype, arch: int,
                  config: KernelConfig, head_dim: int) -> CompiledKernel:
    """Compile `kernel` of a generated module for sm_<arch> without a GPU."""
    elem = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    signature = {}
    for name in arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in _INT_TABLES:
            signature[name] = "*i32"
        elif name == "CLASSES":
            signature[name] = "*i8"
        elif name.isupper():
            signature[name] = f"*{elem}"  # Q, K, V, O and their gradients
        else:
            signature[name] = "fp32" if name == "sm_scale" else "i32"
    # what the JIT specialises at run time: 16-byte aligned pointers, and strides of q, k, v and
    # their gradients that are multiples of 16 (contiguous tensors with head_dim % 16 == 0); the
    # strides of index tensors (si*) depend on top-k and get no such promise
    aligned = [i for i, (n, t) in enumerate(signature.items())
               if t.startswith("*") or (n[0] == "s" and n != "sm_scale" and not n.startswith("si")
                                         and head_dim % 16 == 0)]
    return compile_kernel(path=str(write_source(source)), kernel=kernel, signature=signature, constexprs=consts,
                          aligned=aligned, arch=arch, num_warps=config.num_warps, num_stages=config.num_stages)


class TritonForward:
    """The forward kernel of one spec and tiling: plan tables on the device, the
    generated module, and a launcher returning (out, lse) like the reference.

    Routed specs need q and kv tiles equal to the routing block, so that a
    selected block is one kv tile; the static part is planned ahead of time.
    """

    def __init__(self, spec: Spec, tiling: Tiling | None = None, config: KernelConfig | None = None):
        check_routed_block(spec)
        tiling = tiling or default_kernel_tiling(spec)
        _check_tiling(spec, tiling)
        if spec.routed is not None and not (tiling.q_tile == tiling.kv_tile == spec.routed.block):
            raise ValueError(f"tiling: {spec.routed!r} needs q and kv tiles equal to its block "
                             f"({spec.routed.block}), got {tiling!r}")
        self.spec = spec
        self.q_grid = TileGrid(spec.q_shape, tiling.q_tile, "q_tile")
        self.kv_grid = TileGrid(spec.kv_shape, tiling.kv_tile, "kv_tile")
        self.block_m, self.block_n = self.q_grid.volume, self.kv_grid.volume
        self.block_d = max(16, 1 << (spec.head_dim - 1).bit_length())
        self.config = config or default_config(self.block_m, self.block_d)
        parts = [split_routed(p) for p in spec.head_patterns]
        self.routed_heads = torch.tensor([r is not None for r, _ in parts])
        statics = list(dict.fromkeys(s for _, s in parts))
        ctx = TileAnalysis(spec, self.q_grid, self.kv_grid)
        empty = TilePlan.from_pairs(self.q_grid.count, *(torch.zeros(0, dtype=torch.long),) * 2,
                                    torch.zeros(0, dtype=torch.int8))
        self.groups = [empty if p is None else TilePlan.from_pairs(self.q_grid.count, *ctx.classify(p))
                       for p in statics]
        self.head_group = torch.tensor([statics.index(s) for _, s in parts], dtype=torch.int32)
        self.segments = None
        if len(statics) == 1 and spec.routed is None and self.q_grid.flat and self.kv_grid.flat:
            self.segments = closed_form(statics[0], spec, self.block_m, self.block_n, self.groups[0])
        self.statics = statics
        self.walk = forward_walk(spec, statics, self.q_grid, self.kv_grid, self.segments)
        self.source = render_forward(spec, statics, self.q_grid, self.kv_grid, self.walk)
        self.module = load_source(self.source)
        self.rows, self.cols, self.work = self._tables()
        longest = max(int(g.q_ptr.diff().max()) for g in self.groups)  # static kv tiles of a q tile
        self.max_static = 1 << max(0, longest - 1).bit_length()
        self._device_tables: dict = {}

    def _tables(self):
        """ROWS [groups, q tiles, 3] = (first, first partial, end) into COLS, full tiles
        first; WORK = (head, q tile) pairs, heaviest first so long rows start early."""
        rows, cols, base = [], [], 0
        for tp in self.groups:
            q, kt, full = tp.pairs()
            order = torch.argsort(q * 2 + (~full).long(), stable=True)  # per q tile: full, then partial
            cols.append(kt[order])
            n_full = torch.bincount(q[full], minlength=tp.num_q_tiles)
            start = tp.q_ptr[:-1] + base
            rows.append(torch.stack([start, start + n_full, tp.q_ptr[1:] + base], 1))
            base += tp.visited
        rows = torch.stack(rows).to(torch.int32)
        cols = torch.cat(cols).to(torch.int32)
        cost = torch.stack([self.groups[g].q_ptr.diff() for g in self.head_group.tolist()])  # [H, q tiles]
        if self.spec.routed is not None:
            cost = cost + self.routed_heads[:, None] * self.spec.routed.topk
        order = torch.argsort(cost.flatten(), descending=True, stable=True)
        work = torch.stack([order // cost.shape[1], order % cost.shape[1]], 1).to(torch.int32)
        return rows, cols, work

    def routed_indices(self, block_indices, batch: int, device) -> torch.Tensor:
        """int32 [B, H, q blocks, topk] block indices as the kernels read them (checked and
        normalised; -1 in the heads whose pattern has no Routed part)."""
        idx = normalize_block_indices(self.spec, block_indices).expand(batch, -1, -1, -1)
        idx = torch.where(self.routed_heads.to(idx.device)[None, :, None, None], idx, -1)
        return idx.to(device=device, dtype=torch.int32).contiguous()

    def tables_on(self, device: torch.device):
        if device not in self._device_tables:
            self._device_tables[device] = tuple(t.to(device) for t in (self.rows, self.cols, self.work,
                                                                         self.head_group))
        return self._device_tables[device]

    def constexprs(self, dtype: torch.dtype, topk: int | None = None) -> dict:
        out = {"HEAD_DIM": self.spec.head_dim, "BLOCK_D": self.block_d, "BLOCK_M": self.block_m,
               "BLOCK_N": self.block_n, "GQA_GROUP": self.spec.num_heads // self.spec.num_kv_heads,
               "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
        if self.spec.routed is not None:
            topk = self.spec.routed.topk if topk is None else topk
            out.update(TOPK=topk, TOPK_P2=max(2, 1 << (topk - 1).bit_length()), MAX_STATIC=self.max_static)
        return out

    def __call__(self, q, k, v, scale: float | None = None,
                 block_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_launch_dtype(q)
        B = q.shape[0]
        routed = [] if self.spec.routed is None else [self.routed_indices(block_indices, B, q.device)]
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        scale = 1.0 / math.sqrt(self.spec.head_dim) if scale is None else float(scale)
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

    # -- ahead-of-time compilation for a GPU we may not have -------------------------
    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16) -> CompiledKernel:
        """Compile for sm_<arch> without a GPU: cubin, PTX and shared memory."""
        return cross_compile(self.source, "attention_fwd", self.module.attention_fwd.arg_names,
                             self.constexprs(dtype), dtype, arch, self.config, self.spec.head_dim)


LOG2E = 1.4426950408889634


def backward_config(block_d: int) -> KernelConfig:
    """The backward kernels' launch: 8 warps from head dim 128 on (two [BLOCK_N, BLOCK_D]
    accumulators in dK/dV), which keeps them spill-free on sm_80/sm_90."""
    return KernelConfig(num_warps=8 if block_d >= 128 else 4, num_stages=2)


def backward_tiling(tiling: Tiling, head_dim: int, spec: Spec | None = None) -> Tiling:
    """The dK/dV kernel holds two accumulators per kv tile; for head dims >= 128 it walks q
    tiles of at most 32 tokens (halving the forward's) to stay within registers: no spills
    on sm_80/sm_90. A Routed `spec` keeps its tiles (they are the routing blocks; its
    kernel walks each block in row halves instead)."""
    if spec is not None and spec.routed is not None:
        return tiling
    q = tiling.q_tile
    while head_dim >= 128 and (q if isinstance(q, int) else math.prod(q)) > 32:
        if isinstance(q, int):
            q //= 2
        else:
            k = next(i for i, t in enumerate(q) if t > 1)
            q = q[:k] + (q[k] // 2,) + q[k + 1:]
    return Tiling(q, tiling.kv_tile)


PREPROCESS_BLOCK_M = 64
PREPROCESS_CONFIG = KernelConfig(num_warps=4, num_stages=2)  # rowsum(dO * O): no pipelining to tune


def transposed_tables(forward: TritonForward) -> tuple[torch.Tensor, torch.Tensor]:
    """ROWS_T [groups, kv tiles, 3] = (first, first partial, end) into COLS_T, the q tiles
    that see each kv tile, full ones first: the dK/dV kernel's walk."""
    rows, cols, base = [], [], 0
    for tp in forward.groups:
        q, kt, full = tp.pairs()
        order = torch.argsort(kt * 2 * tp.num_q_tiles + (~full).long() * tp.num_q_tiles + q, stable=True)
        cols.append(q[order])
        count = torch.bincount(kt, minlength=forward.kv_grid.count)
        n_full = torch.bincount(kt[full], minlength=forward.kv_grid.count)
        ptr = torch.cumsum(count, 0) - count + base
        rows.append(torch.stack([ptr, ptr + n_full, ptr + count], 1))
        base += tp.visited
    return torch.stack(rows).to(torch.int32), torch.cat(cols).to(torch.int32)


def routed_transpose(idx: torch.Tensor, num_kv_tiles: int):
    """(RT_PTR [B*H*kv tiles + 1], RT_Q) int32: per (batch, head, kv block), the q tiles whose
    routed blocks include it, in q order; a block listed twice by one q tile counts once.
    Fixed-size torch ops (a sort, a scatter-add, a cumsum): no host sync."""
    B, H, nq, K = idx.shape
    idx = idx.long()
    earlier = torch.zeros_like(idx, dtype=torch.bool)
    for j in range(1, K):
        earlier[..., j] = (idx[..., j:j + 1] == idx[..., :j]).any(-1)
    valid = (idx >= 0) & ~earlier
    bh = torch.arange(B * H, device=idx.device).view(B, H, 1, 1)
    none = B * H * num_kv_tiles
    key = torch.where(valid, bh * num_kv_tiles + idx, none).flatten()
    qt = torch.arange(nq, device=idx.device).view(1, 1, nq, 1).expand(B, H, nq, K).flatten()
    order = torch.argsort(key * nq + qt)
    counts = torch.zeros(none + 1, dtype=torch.long, device=idx.device).scatter_add_(0, key, torch.ones_like(key))
    ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts[:-1], 0)])
    return ptr.to(torch.int32), qt[order].to(torch.int32)


class TritonBackward:
    """dQ, dK, dV of a forward kernel's spec and tiling, from the same plan: dK/dV walk the
    transposed plan (per kv tile, the q tiles that see it), dQ the forward plan; full tiles
    run without mask code. Deterministic (no atomics). Routed blocks: dQ walks them as the
    forward does, dK/dV the run-time routing transposed (`routed_transpose`)."""

    def __init__(self, forward: TritonForward, config: KernelConfig | None = None):
        source = render_backward(forward.spec, forward.statics, forward.q_grid, forward.kv_grid)
        self._setup(forward, config or backward_config(forward.block_d),
                    source, load_source(source), *transposed_tables(forward))

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
        self._device_tables: dict = {}

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16,
                      preprocess: bool = False) -> list[CompiledKernel]:
        """The dK/dV and dQ kernels compiled for sm_<arch>, and with `preprocess` the trivial
        rowsum(dO * O) kernel too (with the launch options its JIT launch uses)."""
        consts = self.fwd.constexprs(dtype)
        out = [cross_compile(self.source, name, getattr(self.module, name).arg_names, consts, dtype, arch,
                             self.config, self.fwd.spec.head_dim)
               for name in ("attention_bwd_dkdv", "attention_bwd_dq")]
        if preprocess:
            out.append(cross_compile(self.source, "bwd_preprocess", self.module.bwd_preprocess.arg_names,
                                     self._preprocess_consts(), dtype, arch, PREPROCESS_CONFIG,
                                     self.fwd.spec.head_dim))
        return out

    def _preprocess_consts(self) -> dict:
        return {"HEAD_DIM": self.fwd.spec.head_dim, "BLOCK_D": self.fwd.block_d, "BLOCK_M": PREPROCESS_BLOCK_M}

    def __call__(self, q, k, v, out, lse, dout, scale: float | None = None,
                 block_indices: torch.Tensor | None = None):
        """(dq, dk, dv) for the forward's (out, lse) (and a Routed spec's block indices)."""
        check_launch_dtype(q)
        spec, fwd = self.fwd.spec, self.fwd
        B = q.shape[0]
        scale = 1.0 / math.sqrt(spec.head_dim) if scale is None else float(scale)
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        if q.device not in self._device_tables:
            self._device_tables[q.device] = (self.rows_t.to(q.device), self.cols_t.to(q.device))
        rows_t, cols_t = self._device_tables[q.device]
        rows, cols, _, head_group = fwd.tables_on(q.device)
        head_group = head_group.repeat(B)
        # log2-domain lse; rows that saw nothing get +inf so that their probabilities are 0
        lse2 = torch.where(torch.isinf(lse), float("inf"), lse.float() * LOG2E).contiguous()
        delta = torch.empty(B, spec.num_heads, spec.nq, device=q.device, dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        consts = fwd.constexprs(q.dtype)
        common = dict(num_warps=self.config.num_warps, num_stages=self.config.num_stages)
        self.module.bwd_preprocess[(-(-spec.nq // PREPROCESS_BLOCK_M), spec.num_heads, B)](
            out, dout, delta, *out.stride()[:3], spec.num_heads, **self._preprocess_consts(),
            num_warps=PREPROCESS_CONFIG.num_warps, num_stages=PREPROCESS_CONFIG.num_stages)
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
