"""The bundled example specs: each loads, validates and plans at full size quickly,
and each has the property its model relies on (checked on sampled rows with the
element-wise semantics, or on the plan's exact counts)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import patterngen as pg
from patterngen.analysis.tiling import default_tiling
from patterngen.routing.blocks import block_masks, normalize_block_indices
from patterngen.core.semantics import visible
from patterngen.tools.checks import check_plan_rows, demo_block_indices
from patterngen.tools.specfiles import load_specs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.glob("*.py"))


def one(name: str, var: str = "spec") -> pg.Spec:
    return dict(load_specs(EXAMPLES / name))[var]


def visible_keys(spec: pg.Spec, head: int, rows: torch.Tensor, block_mask=None) -> torch.Tensor:
    """Bool [len(rows), Nkv] of the given query rows, from the semantics (no dense mask)."""
    kv = torch.arange(spec.nkv)[None, :]
    return visible(spec.head_patterns[head], rows[:, None], kv, spec, block_mask).expand(len(rows), spec.nkv)


SAMPLE = torch.tensor([0, 1, 3, 4, 100, 1023, 1024, 1027, 4094, 4095, 4096, 4097, 20000, 32767])


def test_there_are_examples():
    assert len(FILES) >= 8


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_example_loads_plans_and_checks(path):
    specs = load_specs(path)
    assert specs
    source = path.read_text()
    assert source.lstrip().startswith('"""') and "arXiv" in source  # names the model and cites a source
    for name, spec in specs:
        assert isinstance(spec, pg.Spec)
        if spec.clustered:  # run-time clusters: no plan ahead (test_clustered.py runs it)
            with pytest.raises(ValueError, match="holds Clustered"):
                pg.build_plan(spec)
            continue
        idx = demo_block_indices(spec)
        tiling = default_tiling(spec)  # flat 64 x 64 on sequences, 64-token boxes on grids
        t0 = time.perf_counter()
        plan = pg.build_plan(spec, tiling, idx)
        assert time.perf_counter() - t0 < 30, f"{path.name}:{name} planned too slowly"
        c = plan.counts()
        assert 0 < c["visited"] < c["tile_pairs"], f"{path.name}:{name} is not sparse at all"
        ok, msg = check_plan_rows(plan.spec, plan, idx, max_tiles=3)  # box-routed specs plan as their flat form
        assert ok, f"{path.name}:{name}: {msg}"


def test_mistral_window_of_4096_keys():
    spec = one("mistral_sliding_window.py")
    assert (spec.nq, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32768, 32, 8, 128)
    vis = visible_keys(spec, 0, SAMPLE)
    assert vis.sum(1).tolist() == torch.clamp(SAMPLE + 1, max=4096).tolist()
    assert all(bool(vis[i, q]) and not bool(vis[i, q - 4096]) for i, q in enumerate(SAMPLE.tolist()) if q >= 4096)
    # the plan visits exactly the tiles of a 64-tile band below the diagonal, far fewer than causal
    plan = pg.build_plan(spec)
    per_head = sum(min(i, 64) + 1 for i in range(512))
    assert plan.counts()["visited"] == 32 * per_head
    assert per_head < 512 * 513 // 2 / 4


def test_streaming_llm_sinks_and_recent_window():
    spec = one("streaming_llm.py")
    vis = visible_keys(spec, 0, SAMPLE)
    for i, q in enumerate(SAMPLE.tolist()):
        want = set(range(min(4, q + 1))) | set(range(max(0, q - 1023), q + 1))
        assert set(torch.nonzero(vis[i]).flatten().tolist()) == want


def test_longformer_globals_see_everything_and_are_seen():
    spec = one("longformer_bigbird.py")
    rows = torch.tensor([0, 1, 2, 500, 16383])
    vis = visible_keys(spec, 0, rows)
    assert vis[:2].all() and vis[:, :2].all()
    want = set(range(500 - 256, 500 + 257)) | {0, 1} | set(range(511, 16384, 512))  # window, globals, summaries
    assert set(torch.nonzero(vis[3]).flatten().tolist()) == want
    base = one("longformer_bigbird.py", "longformer_base")
    assert base.nq == 4096 and base.num_heads == 12 and base.head_dim == 64


def test_flux_gna_is_fully_block_sparse_at_its_stride():
    spec = one("image_dit_neighborhood.py")
    rows = torch.tensor([0, 12345, 65535])
    assert visible_keys(spec, 0, rows).sum(1).tolist() == [80 * 80] * 3
    for tile in ((16, 16), (8, 8)):
        plan = pg.build_plan(spec, pg.Tiling(tile, tile))
        c = plan.counts()
        assert c["partial"] == 0
        assert c["visited"] * 10.24 == pytest.approx(c["tile_pairs"])  # 256*256 / (80*80)
    hdit = one("image_dit_neighborhood.py", "hdit")
    assert hdit.q_shape == (64, 64) and visible_keys(hdit, 0, torch.tensor([0, 2080])).sum(1).tolist() == [49, 49]


def test_video_gna_window_and_block_sparsity():
    spec = one("video_dit_gna.py")
    assert spec.q_shape == (30, 48, 80) and (spec.num_heads, spec.head_dim) == (24, 128)
    rows = torch.tensor([0, 57600, 115199])
    assert visible_keys(spec, 0, rows).sum(1).tolist() == [18 * 24 * 24] * 3
    c = pg.build_plan(spec, pg.Tiling((1, 8, 8), (1, 8, 8))).counts()
    assert c["partial"] == 0 and c["visited"] < c["tile_pairs"] / 10


def test_s2_heads_together_cover_the_causal_context():
    """DKernel's rule per head h: a 1024-token band plus every key of the 64-key blocks b with
    (b + 1 + h) % 8 == 0; the 8 distinct heads' blocks cover every block, so their union is the
    whole causal context; the strided blocks are whole kv tiles (no mask code past the band)."""
    spec = one("s2_attention.py")
    rows = torch.tensor([5, 2000, 32767])
    union = torch.zeros(len(rows), spec.nkv, dtype=torch.bool)
    for h in range(8):
        vis = visible_keys(spec, h, rows)
        for i, q in enumerate(rows.tolist()):
            want = set(range(max(0, q - 1023), q + 1)) | {j for j in range(q + 1) if (j // 64 + 1 + h) % 8 == 0}
            assert set(torch.nonzero(vis[i]).flatten().tolist()) == want
        union |= vis
    assert torch.equal(union, torch.arange(spec.nkv)[None, :] <= rows[:, None])
    assert len(set(spec.head_patterns)) == 8
    plan = pg.build_plan(pg.Spec(spec.head_patterns[0], 32768, num_heads=1, head_dim=128), pg.Tiling(64, 64))
    # partial: the 512 diagonal tiles and the band's left edge of q tiles 16..511, except where a
    # strided block fills the edge tile (head 0: kv tiles 7, 15, ..., one in 8 of them)
    assert plan.counts()["partial"] == 512 + 496 - 62


def test_duo_attention_retrieval_and_streaming_heads():
    spec = one("duo_attention.py")
    plan = pg.build_plan(spec)
    full_head, stream_head = plan.head_plan(0), plan.head_plan(8)
    assert full_head.visited == 512 * 513 // 2  # causal
    assert all(plan.head_plan(h).visited == full_head.visited for h in range(8))
    assert all(plan.head_plan(h).visited == stream_head.visited for h in range(8, 32))
    assert stream_head.visited < full_head.visited / 10
    vis = visible_keys(spec, 31, torch.tensor([20000]))
    assert vis.sum() == 4 + 1024


def test_moba_routing_keeps_own_block_and_topk():
    spec = one("moba_routed.py")
    idx = demo_block_indices(spec)
    masks = block_masks(spec, normalize_block_indices(spec, idx))
    assert (masks.sum(-1) <= 3).all()
    rows = torch.tensor([0, 600, 5000, 8191])
    for h in (0, 17):
        vis = visible_keys(spec, h, rows, masks[0, h])
        assert vis[torch.arange(len(rows)), rows].all()  # the own block, causally: the query sees itself
        assert (vis.sum(1) <= 3 * 512).all() and not vis[rows[:, None] < torch.arange(8192)].any()
