"""Build and launch the generated kernels of a spec and tiling: forward and backward.

Building checks the tiling, groups the heads, picks the kv walk, renders and imports the
kernel module (once: the lengths are run-time arguments). The plan tables depend on the
lengths: a fixed-length spec has one set, built on first use; a length-free spec
(`Spec(pattern, num_heads=..., head_dim=...)`) reads nq and nkv from each call's tensors
and builds the tables of those lengths from `spec.bind(nq, nkv)` when its walk needs
them, keeping the most recent `tables.LENGTH_TABLES`. A closed-form forward needs none.
A launch copies the tables to the inputs' device once and calls the kernels; it returns
(out, lse) or (dq, dk, dv) like the reference backend.
"""
from __future__ import annotations

from functools import cached_property

import torch

from ...analysis.tiling import default_tiling, volume
from ...core.tiles import TileGrid, Tiling
from ...ir import Spec
from ...routing.blocks import normalize_block_indices
from ..inputs import check_scale
from .cache import load_source
from .checks import check_launch_dtype, check_lengths, check_routed_block, check_tiling
from .config import (PREPROCESS_BLOCK_M, PREPROCESS_CONFIG, STATIC_CHUNK, KernelConfig, backward_config,
                     default_config, dq_tiling, head_block, pow2_ceil, transposable_tiling)
from .cross_compile import CompiledKernel, compile_generated
from .ranges import closed_form
from .render import Walk, forward_walk, render_backward, render_forward
from .tables import DeviceTables, LengthCache, LengthTables, head_groups, routed_transpose

LOG2E = 1.4426950408889634


def cuda_arch(device: torch.device | None = None) -> int | None:
    """The compute capability of a CUDA device as one number (90 for sm_90; `device` None: the
    current one), or None off CUDA: where there is none, or `device` is not a CUDA device."""
    if device is None and not torch.cuda.is_available() or device is not None and device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def softmax_scale(head_dim: int, scale: float | None) -> float:
    """SDPA's default scale 1/sqrt(head_dim) (`check_scale`'s rule) unless one is given."""
    return check_scale(None, head_dim) if scale is None else float(scale)


def log2_lse(lse: torch.Tensor) -> torch.Tensor:
    """The backward kernels' log2-domain lse; rows that saw nothing get +inf so that their
    probabilities are 0."""
    return torch.where(torch.isinf(lse), float("inf"), lse.float() * LOG2E).contiguous()


# a tile's first token stays below its tensor's length plus this many tokens
_TILE_SLACK = 256


def int64_offsets(*tensors: torch.Tensor) -> bool:
    """Whether the kernels must multiply a tile's first token by the stride along the tokens in
    int64 (their INT64_OFFSETS): some [B, H, N, D] tensor's offsets along N reach 2**31
    elements. Below that, as for all but the largest inputs, int32 products save about five
    instructions per tensor and kv tile; the other variant compiles on first use."""
    return any((x.shape[2] + _TILE_SLACK) * x.stride(2) >= 2 ** 31 for x in tensors)


NO_SCORE_MODS = {"SOFTCAP": False, "ALIBI": False}
"""The forward and backward kernels' score-modification constexprs when a call has none."""


def score_mods(softcap: float | None, alibi_slopes: torch.Tensor | None, placeholder: torch.Tensor) -> tuple:
    """(SLOPES, softcap, constexprs) as the forward and backward kernels take them: the slopes in
    float32 (`placeholder`, any float32 tensor on the device, when there are none: never read)."""
    slopes = placeholder if alibi_slopes is None else alibi_slopes.float().contiguous()
    return slopes, 0.0 if softcap is None else float(softcap), {"SOFTCAP": softcap is not None,
                                                                 "ALIBI": alibi_slopes is not None}


MAX_SPLITS = 16
"""The most kv splits a split-KV forward launch takes (its partials cost splits x out in scratch)."""
MERGE_ROWS = 16
PACK_ROWS = 64
"""The most rows (query heads x q tile tokens) a GQA-packed forward program takes (`gqa_pack`):
a decode kernel's 16-row q tiles pack four heads."""


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def kv_splits(programs: int, kv_tiles: int, sms: int | None) -> int:
    """How many kv splits a forward launch of `programs` programs over rows of up to `kv_tiles`
    kv tiles takes: enough to give every SM a program when the grid leaves some idle (decoding
    a few queries against a long cache), at most MAX_SPLITS and one per kv tile; 1 off CUDA."""
    if sms is None or programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-sms // programs), kv_tiles))


def no_pairs(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Nothing to launch: no batch entry, head, query or key (the result is zeros, lse -inf)."""
    return q.numel() == 0 or k.shape[2] == 0


class TritonForward:
    """The forward kernel of one spec and tiling: the generated module, the plan tables of
    the lengths it runs, and a launcher returning (out, lse) like the reference.

    A length-free spec takes any q [B, H, Nq, D], k/v [B, Hkv, Nkv, D] (flat tiles only);
    a fixed one the lengths of its shapes. A Routed spec's flat tiles divide its routing block:
    a selected block is walked as its kv tiles, a q tile follows its q block's routing; the
    static part is planned ahead of the call at the kernel's tiles.
    """

    def __init__(self, spec: Spec, tiling: Tiling | None = None, config: KernelConfig | None = None):
        check_routed_block(spec)
        tiling = tiling or default_tiling(spec)
        check_tiling(spec, tiling)
        self._set_tiles(spec, tiling, config)
        self.statics, self.head_group, self.routed_heads = head_groups(spec)
        self._hold_tables()
        self.walk = self.choose_walk()
        self.source = render_forward(spec, self.statics, *self.template_grids(), self.walk)
        self.module = load_source(self.source)
        if self._fixed is not None and self.walk.name != "closed_form":
            self._fixed.forward  # noqa: B018 - a fixed spec plans now, as it always did (errors at build)

    def choose_walk(self) -> Walk:
        """The kv walk of this plan's tiling (`forward_walk`): closed-form segments where they
        exist for flat tiles (checked against the exact plan of a fixed spec), a window's
        neighbourhood, else the index table."""
        spec, segments = self.spec, None
        if len(self.statics) == 1 and spec.routed is None and isinstance(self.tiling.q_tile, int) \
                and isinstance(self.tiling.kv_tile, int):
            if spec.length_free:
                segments = closed_form(self.statics[0], self.block_m, self.block_n)
            else:
                fixed = self.lengths(spec.nq, spec.nkv)
                segments = closed_form(self.statics[0], self.block_m, self.block_n, fixed.groups[0],
                                       (spec.nq, spec.nkv))
        return forward_walk(spec, self.statics, *self.template_grids(), segments)

    def _set_tiles(self, spec: Spec, tiling: Tiling, config: KernelConfig | None) -> None:
        self.spec, self.tiling = spec, tiling
        self.block_m, self.block_n = volume(tiling.q_tile), volume(tiling.kv_tile)
        self.block_d = head_block(spec.head_dim)
        self.config = config

    @property
    def config(self) -> KernelConfig:
        """The launch parameters for 16-bit inputs on this machine's GPU: the ones given (or
        tuned), else `default_config` of its arch."""
        return self.config_for(cuda_arch(), 2)

    @config.setter
    def config(self, config: KernelConfig | None) -> None:
        self._config = config

    def config_for(self, arch: int | None, elem_bytes: int, pack: int = 1) -> KernelConfig:
        """The launch parameters on sm_<arch> (None: no GPU) for inputs of `elem_bytes` bytes, with
        `pack` heads' rows per q tile (`gqa_pack`)."""
        box = not (isinstance(self.tiling.q_tile, int) and isinstance(self.tiling.kv_tile, int))
        return self._config or default_config(arch, self.block_m * pack, self.block_n, self.block_d, elem_bytes, box)

    def _hold_tables(self, saved: dict | None = None) -> None:
        """Head groups on the devices (`device_tables`), and the length tables: one set for a
        fixed spec (`saved`: a build's), an LRU of them for a length-free one."""
        self.device_tables = DeviceTables(head_group=self.head_group, routed_heads=self.routed_heads)
        self._fixed = self._cache = None
        if self.spec.length_free:
            self._cache = LengthCache(self._make_tables)
        else:
            self._fixed = self._make_tables(self.spec.nq, self.spec.nkv, saved)

    def _make_tables(self, nq: int, nkv: int, saved: dict | None = None) -> LengthTables:
        """A length's tables; a length-free spec's from its second length on from `_segments`."""
        return LengthTables(self.spec.bind(nq, nkv), self.tiling, self.statics, self.head_group, self.routed_heads,
                            saved, self._segments if self._cache else None)

    @cached_property
    def _segments(self) -> list | None:
        """The closed-form segments of each group's static part at these flat tiles (None where a
        group has none), derived once (sympy, a fraction of a second) from a length-free spec's
        second distinct length on: calls whose lengths keep changing (packed documents in
        training) then plan each new length in torch arithmetic, not the tile analysis (16
        documents' dK/dV tables: 21 ms of host time a call before, on this project's CPU)."""
        tiles = (self.tiling.q_tile, self.tiling.kv_tile)
        if not all(isinstance(t, int) for t in tiles):
            return None
        return [None if p is None else closed_form(p, *tiles) for p in self.statics]

    def template_grids(self) -> tuple:
        """What the templates address tiles with (render.tile_context): a fixed spec's grids,
        else the flat tile sizes."""
        if self.spec.length_free:
            return self.tiling.q_tile, self.tiling.kv_tile
        return self._fixed.q_grid, self._fixed.kv_grid

    def lengths(self, nq: int, nkv: int) -> LengthTables:
        """The tables (and bound spec, grids, plans) of a call with nq queries and nkv keys;
        ValueError when a fixed spec is called with other lengths."""
        if self._fixed is not None:
            check_lengths(self.spec, nq, nkv)
            return self._fixed
        return self._cache.get(nq, nkv)

    # -- the fixed spec's tables, as builds save them ---------------------------------
    @property
    def q_grid(self) -> TileGrid | None:
        """The q tile grid of a fixed spec (None when length-free: see `lengths`)."""
        return None if self._fixed is None else self._fixed.q_grid

    @property
    def kv_grid(self) -> TileGrid | None:
        return None if self._fixed is None else self._fixed.kv_grid

    def _fixed_tables(self) -> LengthTables:
        if self._fixed is None:
            raise ValueError(f"{self.spec!r} is length-free: its tables are per call, see lengths(nq, nkv)")
        return self._fixed

    @property
    def rows(self) -> torch.Tensor:
        return self._fixed_tables().device.host_table("rows")

    @property
    def cols(self) -> torch.Tensor:
        return self._fixed_tables().device.host_table("cols")

    @property
    def work(self) -> torch.Tensor:
        return self._fixed_tables().device.host_table("work")

    @property
    def segments(self) -> tuple | None:
        """The closed-form kv-tile segments of a rendered closed-form walk (None otherwise)."""
        walk = getattr(self, "walk", None)
        return walk.segments if walk is not None else None

    @property
    def walk_name(self) -> str | None:
        """The forward's kv walk (render.Walk's name); a build's module names it."""
        walk = getattr(self, "walk", None)
        return walk.name if walk is not None else getattr(self.module, "WALK", None)

    @classmethod
    def from_saved(cls, spec: Spec, tiling: Tiling, config: KernelConfig | None, module,
                   tables: dict | None) -> "TritonForward":
        """A launcher from a build's imported module and saved plan tables: nothing rendered, and
        for a fixed spec nothing analysed. A length-free build saves no tables (`tables` None or
        holding only the head groups): those of each length are planned at its first call."""
        self = cls.__new__(cls)
        self._set_tiles(spec, tiling, config)
        self.module, self.source, self.walk = module, None, None
        self.statics, self.head_group, self.routed_heads = head_groups(spec)  # the patterns' split, no plan
        tables = tables or {}
        if "head_group" in tables:
            self.head_group, self.routed_heads = tables["head_group"], tables["routed_heads"]
        self._hold_tables(None if spec.length_free else
                          {n: tables[n] for n in ("rows", "cols", "work", "rows_t", "cols_t") if n in tables})
        return self

    def routed_indices(self, block_indices, batch: int, device, nq: int | None = None,
                       nkv: int | None = None) -> torch.Tensor:
        """int32 [B, H, q blocks, topk] block indices as the kernels read them (checked and
        normalised against the spec of these lengths; -1 in the heads whose pattern has no
        Routed part)."""
        spec = self.spec if nq is None else self.lengths(nq, nkv).spec
        idx = normalize_block_indices(spec, block_indices).expand(batch, -1, -1, -1)
        idx = torch.where(self.device_tables.get("routed_heads", idx.device)[None, :, None, None], idx, -1)
        return idx.to(device=device, dtype=torch.int32).contiguous()

    def visit_rows(self, idx: torch.Tensor, num_q_tiles: int) -> torch.Tensor:
        """Scratch VISIT [B, H, q tiles, TOPK_P2 * KV_SUB] int32 for a routed walk: each program
        lists there the run-time kv tiles it visits (routing indices `idx` as `routed_indices`)."""
        consts = self.constexprs(torch.float32, idx.shape[-1])
        return torch.empty(*idx.shape[:2], num_q_tiles, consts["TOPK_P2"] * consts["KV_SUB"], dtype=torch.int32,
                           device=idx.device)

    def head_groups(self, batch: int, device) -> torch.Tensor:
        """[B, H] static group of each head (the same for every batch entry)."""
        return self.device_tables.get("head_group", device).repeat(batch)

    def constexprs(self, dtype: torch.dtype, topk: int | None = None, wide: bool = False) -> dict:
        """The kernels' compile-time arguments; `wide`: `int64_offsets` of the launch's tensors.
        The forward's HAS_SINKS is set per call (`__call__`)."""
        out = {"HEAD_DIM": self.spec.head_dim, "BLOCK_D": self.block_d, "BLOCK_M": self.block_m,
               "BLOCK_N": self.block_n, "GQA_GROUP": self.spec.num_heads // self.spec.num_kv_heads,
               "PRECISION": "ieee" if dtype == torch.float32 else "tf32", "INT64_OFFSETS": wide}
        if self.spec.routed is not None:
            topk = self.spec.routed.topk if topk is None else topk
            block = self.spec.routed.block
            out.update(TOPK=topk, TOPK_P2=max(2, pow2_ceil(topk)), STATIC_CHUNK=STATIC_CHUNK,
                       Q_SUB=block // self.block_m, KV_SUB=block // self.block_n)
        return out

    def gqa_pack(self, nq: int) -> int:
        """Query heads per program (the forward's PACK): on the closed-form walk, when one q tile
        holds every query (decoding), the most query heads of a kv head (a power of two dividing
        the GQA group) whose rows fit PACK_ROWS, which then read each kv tile once; else 1."""
        group = self.spec.num_heads // self.spec.num_kv_heads
        if self.walk_name != "closed_form" or nq > self.block_m:
            return 1
        pack = 1
        while group % (2 * pack) == 0 and 2 * pack * self.block_m <= PACK_ROWS:
            pack *= 2
        return pack

    def __call__(self, q, k, v, scale: float | None = None, block_indices: torch.Tensor | None = None,
                 sinks: torch.Tensor | None = None, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, num_splits: int | None = None,
                 pieces: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse); `sinks` [H]: learned sink logits, applied in the epilogue (op.apply_sinks);
        `softcap`, `alibi_slopes` [H]: the score modifications (`modified_scores` in the templates).
        `num_splits`: split-KV programs per work item (None: `kv_splits`' choice on CUDA; the
        closed-form and table walks take them, others run whole), merged by `merge_splits`.
        `pieces` (closed-form walk, length-free spec): (SEGS int32 [pieces, 5], the longest
        piece's queries), pieces of the inputs in one launch (`varlen`); rows outside every
        piece are left as they are (the caller's zeros)."""
        check_launch_dtype(q)
        B, H, nq, nkv = q.shape[0], self.spec.num_heads, q.shape[2], k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(B, H, nq, device=q.device, dtype=torch.float32)
        if no_pairs(q, k):
            check_lengths(self.spec, nq, nkv)
            lse.fill_(float("-inf"))
            return out.zero_(), lse if sinks is None else lse.copy_(sinks.float()[None, :, None].expand_as(lse))
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        scale = softmax_scale(self.spec.head_dim, scale)
        if pieces is not None:
            if self.walk_name != "closed_form" or not self.spec.length_free:
                raise ValueError(f"pieces: one launch for many pieces needs the closed-form walk of a length-free "
                                 f"spec, not the {self.walk_name} walk of {self.spec!r}")
            segs, longest = pieces
            nq_t, lt = -(-longest // self.block_m), None
            out.zero_()
            lse.fill_(float("-inf"))
        else:
            segs, lt = lse, self.lengths(nq, nkv)
            nq_t = lt.q_grid.count
        routed = []
        if self.spec.routed is not None:
            idx = self.routed_indices(block_indices, B, q.device, nq, nkv)
            routed = [idx, self.visit_rows(idx, nq_t)]
        pack = self.gqa_pack(nq if pieces is None else pieces[1])
        if self.walk_name == "closed_form":  # work order and kv tiles from the program id: no tables
            tables, grid = (), (nq_t * H // pack, B if pieces is None else segs.shape[0])
        else:
            rows, cols, work = lt.device.on(q.device, "rows", "cols", "work")
            tables, grid = (rows, cols, work, self.head_groups(B, q.device)), (work.shape[0], B)
        config = self.config_for(cuda_arch(q.device), q.element_size(), pack)
        slopes, cap, mods = score_mods(softcap, alibi_slopes, lse)
        sink_arg = lse if sinks is None else sinks.float().contiguous()
        splits = 1
        if self.walk_name in ("closed_form", "table"):
            splits = num_splits or kv_splits(grid[0] * grid[1], -(-nkv // self.block_n),
                                             sm_count(q.device) if q.is_cuda else None)
        o, l = out, lse
        if splits > 1:  # partials of each split, merged below
            o = torch.empty(splits * B, *q.shape[1:], device=q.device, dtype=torch.float32)
            l = torch.empty(splits * B, H, nq, device=q.device, dtype=torch.float32)
            if pieces is not None:  # rows outside every piece: zeros, lse -inf, as in `out`
                o.zero_()
                l.fill_(float("-inf"))
        self.module.attention_fwd[(*grid, splits)](
            q, k, v, o, l, sink_arg, slopes, segs, *tables, *routed, scale, cap,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            *(routed[0].stride()[:2] if routed else ()), H, nq_t, nq, nkv, splits, B,
            **{**self.constexprs(q.dtype, routed[0].shape[-1] if routed else None, int64_offsets(q, k, v, out)),
               "BLOCK_M": self.block_m * pack}, PACK=pack,
            HAS_SINKS=sinks is not None and splits == 1, SPLIT_KV=splits > 1, VARLEN=pieces is not None, **mods,
            num_warps=config.num_warps, num_stages=config.num_stages)
        if splits > 1:
            out = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # contiguous, as the merge writes it
            rows = B * H * nq
            self.module.merge_splits[(-(-rows // MERGE_ROWS),)](
                o, l, out, lse, sink_arg, rows, H, nq, splits, HEAD_DIM=self.spec.head_dim, BLOCK_D=self.block_d,
                BLOCK_R=MERGE_ROWS, HAS_SINKS=sinks is not None, num_warps=4)
        return out, lse

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16,
                      mods: dict | None = None) -> CompiledKernel:
        """Compile for sm_<arch> without a GPU, with the launch parameters of that arch: cubin, PTX
        and shared memory (the lengths are plain int arguments, so one compilation serves every
        length). `mods`: constexprs set per call to compile other than off (SOFTCAP, ALIBI,
        SPLIT_KV, HAS_SINKS)."""
        consts = {**self.constexprs(dtype), "HAS_SINKS": False, "SPLIT_KV": False, "VARLEN": False, "PACK": 1,
                  **NO_SCORE_MODS, **(mods or {})}
        consts["BLOCK_M"] *= consts["PACK"]  # PACK heads' rows per q tile
        config = self.config_for(arch, dtype.itemsize, consts["PACK"])
        return compile_generated(self.source, "attention_fwd", self.module.attention_fwd.arg_names, consts, dtype,
                                 arch, config, self.spec.head_dim)


def preprocess_consts(fwd: TritonForward) -> dict:
    return {"HEAD_DIM": fwd.spec.head_dim, "BLOCK_D": fwd.block_d, "BLOCK_M": PREPROCESS_BLOCK_M}


def preprocess(module, fwd: TritonForward, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """DELTA = rowsum(dO * O) [B, H, Nq] in float32, by the module's `bwd_preprocess` kernel
    (every backward template has one)."""
    B, H, nq = out.shape[:3]
    delta = torch.empty(B, H, nq, device=out.device, dtype=torch.float32)
    module.bwd_preprocess[(-(-nq // PREPROCESS_BLOCK_M), H, B)](
        out, dout, delta, *out.stride()[:3], H, nq, **preprocess_consts(fwd),
        num_warps=PREPROCESS_CONFIG.num_warps, num_stages=PREPROCESS_CONFIG.num_stages)
    return delta


class TritonBackward:
    """dQ, dK, dV of a forward kernel's spec and tiling, by two kernels on two plans of the
    same pattern: dK/dV walks, per kv tile, the q tiles that see it (the transposed plan of
    the forward's tiling), and dQ, per q tile, the kv tiles of the transposed tiling
    (`dq_tiling`), so that each kernel's wide tiles are the M of its matmuls; full tiles run
    without mask code. Deterministic (no atomics). Routed blocks: dQ walks them as the forward
    does, dK/dV the run-time routing transposed (`routed_transpose`), each as its tiles. A
    length-free forward gives a length-free backward: the tables of each call's lengths come
    from the plans' `lengths`. Boxes that cannot trade places between the grids run as flat
    tiles (`transposable_tiling`)."""

    def __init__(self, forward: TritonForward, config: KernelConfig | None = None):
        dkdv = plan(forward, transposable_tiling(forward.tiling, forward.spec))
        dq = plan(dkdv, dq_tiling(dkdv.tiling))
        source = render_backward(forward.spec, forward.statics, *dkdv.template_grids(), dq.choose_walk())
        self._setup(forward, dkdv, config or backward_config(dkdv.block_d, dkdv.block_n), source, load_source(source),
                    dq)

    @classmethod
    def from_saved(cls, forward: TritonForward, module, config: KernelConfig,
                   tables: dict | None = None) -> "TritonBackward":
        """A launcher from a module saved by an ahead-of-time build: nothing is rendered.
        `forward` is the dK/dV plan (with a fixed build's saved tables) and supplies the
        constants; `tables`, a fixed build's backward tables, hold the dQ plan's as
        `saved_tables` wrote them."""
        self = cls.__new__(cls)
        dq = {"rows": tables["dq_rows"], "cols": tables["dq_cols"]} if tables and "dq_rows" in tables else None
        self._setup(forward, forward, config, None, module, plan(forward, dq_tiling(forward.tiling), dq))
        return self

    def _setup(self, forward, dkdv, config, source, module, dq):
        self.fwd, self.dkdv, self.dq, self.config, self.source, self.module = forward, dkdv, dq, config, source, module

    @property
    def dq_tables(self) -> bool:
        """Whether the dQ kernel walks index tables (else closed-form or window ranges: the
        module's WALK, the dQ kernel's, chosen for its own tiling)."""
        return self.module.WALK in ("table", "routed")

    @property
    def rows_t(self) -> torch.Tensor:
        """A fixed spec's transposed tables (ROWS_T, COLS_T) of the dK/dV plan."""
        return self.dkdv._fixed_tables().device.host_table("rows_t")

    @property
    def cols_t(self) -> torch.Tensor:
        return self.dkdv._fixed_tables().device.host_table("cols_t")

    def saved_tables(self) -> dict:
        """A fixed spec's backward tables as builds save them beside the dK/dV plan's forward
        tables: ROWS_T, COLS_T, and the dQ plan's ROWS, COLS (dq_rows, dq_cols) where its tiling
        differs."""
        out = {"rows_t": self.rows_t, "cols_t": self.cols_t}
        if self.dq is not self.dkdv:
            fixed = self.dq._fixed_tables().device
            out.update(dq_rows=fixed.host_table("rows"), dq_cols=fixed.host_table("cols"))
        return out

    def cross_compile(self, arch: int, dtype: torch.dtype = torch.bfloat16,
                      preprocess: bool = False, mods: dict | None = None) -> list[CompiledKernel]:
        """The dK/dV and dQ kernels compiled for sm_<arch>, and with `preprocess` the trivial
        rowsum(dO * O) kernel too (with the launch options its JIT launch uses); `mods` as the forward's."""
        out = [compile_generated(self.source, name, getattr(self.module, name).arg_names,
                                 {**kern.constexprs(dtype), **NO_SCORE_MODS, "VARLEN": False, **(mods or {})}, dtype,
                                 arch, self.config, self.fwd.spec.head_dim)
               for name, kern in (("attention_bwd_dkdv", self.dkdv), ("attention_bwd_dq", self.dq))]
        if preprocess:
            out.append(compile_generated(self.source, "bwd_preprocess", self.module.bwd_preprocess.arg_names,
                                         preprocess_consts(self.fwd), dtype, arch, PREPROCESS_CONFIG,
                                         self.fwd.spec.head_dim))
        return out

    @property
    def takes_pieces(self) -> bool:
        """Whether one launch of each kernel runs many pieces (`__call__`'s `pieces`): a
        length-free spec on flat tiles whose dQ kernel walks in closed form (dK/dV reads each
        piece's transposed tables, concatenated)."""
        return self.fwd.spec.length_free and not self.dq_tables and self.fwd.spec.routed is None

    def _piece_tables(self, pieces: list[tuple[int, int, int, int, int]], device) -> tuple:
        """(SEGS [pieces, 5], TBASE [pieces], ROWS_T, COLS_T, longest kv tiles, longest dQ q
        tiles) of pieces (b, q0, q1, k0, k1), each piece's transposed tables (`lengths`, cached
        per length) concatenated: its ROWS_T entries shifted past the earlier pieces' COLS_T."""
        rows, cols, bases, base, cols_base = [], [], [], 0, 0
        for _, q0, q1, k0, k1 in pieces:
            rows_t, cols_t = self.dkdv.lengths(q1 - q0, k1 - k0).transposed
            rows.append(rows_t.reshape(-1, 3) + cols_base)
            cols.append(cols_t)
            bases.append(base)
            base += rows_t.shape[0] * rows_t.shape[1]
            cols_base += len(cols_t)
        segs = torch.tensor(pieces, dtype=torch.int32)
        host = (segs, torch.tensor(bases, dtype=torch.int32), torch.cat(rows).to(torch.int32),
                torch.cat(cols).to(torch.int32))
        nkt = max(-(-(k1 - k0) // self.dkdv.block_n) for *_, k0, k1 in pieces)
        nqt = max(-(-(q1 - q0) // self.dq.block_m) for _, q0, q1, *_ in pieces)
        return (*(t.to(device, non_blocking=True) for t in host), nkt, nqt)

    def __call__(self, q, k, v, out, lse, dout, scale: float | None = None,
                 block_indices: torch.Tensor | None = None, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, pieces: list | None = None):
        """(dq, dk, dv) for the forward's (out, lse) (and a Routed spec's block indices, and the
        forward's score modifications). `pieces` ([(b, q0, q1, k0, k1)], non-empty ones, where
        `takes_pieces`): every piece in one launch of each kernel (`VARLEN`), rows and keys
        outside every piece get zero gradients."""
        check_launch_dtype(q)
        spec, fwd = self.fwd.spec, self.fwd
        B, nq, nkv = q.shape[0], q.shape[2], k.shape[2]
        if no_pairs(q, k) or pieces == []:
            check_lengths(spec, nq, nkv)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        scale = softmax_scale(spec.head_dim, scale)
        q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
        if pieces is None:
            lt, lt_dq = self.dkdv.lengths(nq, nkv), self.dq.lengths(nq, nkv)
            rows_t, cols_t = lt.device.on(q.device, "rows_t", "cols_t")
            dq_rows = lt_dq.device.on(q.device, "rows", "cols") if self.dq_tables else ()
            segs = tbase = lse  # not read
            nkt, nqt, nqt_dq, units = lt.kv_grid.count, lt.q_grid.count, lt_dq.q_grid.count, B
        else:
            if not self.takes_pieces:
                raise ValueError(f"pieces: one launch for many pieces needs a length-free spec whose dQ kernel walks "
                                 f"in closed form, not {spec!r}")
            segs, tbase, rows_t, cols_t, nkt, nqt_dq = self._piece_tables(pieces, q.device)
            dq_rows, nqt, units = (), 0, len(pieces)
        head_group = fwd.head_groups(B, q.device)
        lse2 = log2_lse(lse)
        delta = preprocess(self.module, fwd, out, dout)
        make = torch.empty_like if pieces is None else torch.zeros_like
        dq, dk, dv = make(q), make(k), make(v)
        wide = int64_offsets(q, k)  # contiguous: dO, dQ as Q, V, dK, dV as K
        consts, dq_consts = self.dkdv.constexprs(q.dtype, None, wide), self.dq.constexprs(q.dtype, None, wide)
        slopes, cap, mods = score_mods(softcap, alibi_slopes, delta)
        common = dict(num_warps=self.config.num_warps, num_stages=self.config.num_stages, **mods)
        # contiguous: Q, dO, dQ share one layout, K, V, dK, dV another (the kernels take one stride set each)
        strides = (*q.stride()[:3], *k.stride()[:3])
        dkdv_routed, dq_routed, idx_strides = (), (), ()
        if spec.routed is not None:  # dK/dV takes the routing transposed, dQ walks it as the forward
            idx = fwd.routed_indices(block_indices, B, q.device, nq, nkv)
            topk = idx.shape[-1]
            consts, dq_consts = self.dkdv.constexprs(q.dtype, topk, wide), self.dq.constexprs(q.dtype, topk, wide)
            kv_blocks = -(-nkv // spec.routed.block)
            dkdv_routed = routed_transpose(idx, kv_blocks)
            dq_routed, idx_strides = (idx, self.dq.visit_rows(idx, nqt_dq)), idx.stride()[:2]
        varlen = pieces is not None
        self.module.attention_bwd_dkdv[(nkt, spec.num_kv_heads, units)](
            q, k, v, dout, lse2, delta, dk, dv, slopes, rows_t, cols_t, head_group, segs, tbase, *dkdv_routed, scale,
            cap, *strides, spec.num_heads, nkt, nqt, nq, nkv, **consts, VARLEN=varlen, **common)
        self.module.attention_bwd_dq[(nqt_dq, spec.num_heads, units)](
            q, k, v, dout, lse2, delta, dq, slopes, *dq_rows, head_group, segs, *dq_routed, scale, cap, *strides,
            *idx_strides, spec.num_heads, nqt_dq, nq, nkv, **dq_consts, VARLEN=varlen, **common)
        return dq, dk, dv


def plan(forward: TritonForward, tiling: Tiling, saved: dict | None = None) -> TritonForward:
    """`forward` when it has `tiling`, else a launcher of its spec that only holds the plan
    tables of `tiling` (`saved`: a build's; nothing rendered): a backward kernel's own plan."""
    if tiling == forward.tiling:
        return forward
    return TritonForward.from_saved(forward.spec, tiling, None, None, saved)  # never launched: no config
