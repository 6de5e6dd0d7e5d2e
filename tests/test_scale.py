"""Flattened-index patterns at scale: closed forms that stay exact and never touch tokens.

Band, Causal, Sink, Global, Strided and Full under unions and intersections are
classified per tile (`analysis.FlatForm`) and counted per conjunction in closed form
(`counting.count_closed`). The first half checks those paths against the dense oracle
on small grids, with the batching and fallback limits forced small so that every
branch runs; the second half checks that plans and simulations of 10^6..10^8 tokens
do no per-token work, by making every per-token entry point raise.
"""
from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from hypothesis import currently_in_test_context, given, note, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.analysis import KvCount, flat_form, flat_terms
from patterngen.analysis import flat_index
from patterngen.analysis import key_only as key_counts
from patterngen.core import tile_eval
from patterngen.core.semantics import visible
from patterngen.sim import counting
from patterngen.core.tiles import TileGrid
from tests.strategies import patterns, scaled
from tests.helpers import check_plan

TILES = [1, 2, 3, 5, 8, 16, 64]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Time the work, not OpenMP: on a loaded 2-core machine two intra-op threads stall for
    seconds at random (0.05 s of work measured at 0.5-2.9 s), one thread does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@st.composite
def flat_cases(draw):
    """A flattened-index pattern on a 1-D or 2-D grid (Nq != Nkv half the time) with flat
    tiles, or on a 2-D grid with box tiles that span whole rows (contiguous, not flat)."""
    if draw(st.booleans()):
        q_shape = (draw(st.integers(1, 150)),)
        kv_shape = q_shape if draw(st.booleans()) else (draw(st.integers(1, 150)),)
        tiling = pg.Tiling(draw(st.sampled_from(TILES)), draw(st.sampled_from(TILES)))
    else:
        w = draw(st.integers(1, 9))
        q_shape = (draw(st.integers(1, 14)), w)
        kv_shape = q_shape if draw(st.booleans()) else (draw(st.integers(1, 14)), w)
        if draw(st.booleans()):
            tiling = pg.Tiling((draw(st.integers(1, 4)), w), (draw(st.integers(1, 4)), w))
        else:
            tiling = pg.Tiling(draw(st.sampled_from(TILES)), draw(st.sampled_from(TILES)))
    pattern = draw(patterns(q_shape, kv_shape, window=False, depth=2))
    return pg.Spec(pattern, q_shape, kv_shape), tiling


def _limits(rows: int | None = None, pairs: int | None = None, kv_table: int | None = None,
            max_terms: int | None = None) -> ExitStack:
    """Force the closed-form paths' batch sizes and fallback limits (flat_terms caches its answer
    per pattern, so its cache is cleared on entry and exit)."""
    stack = ExitStack()
    for module, name, value in ((flat_index, "ROWS_PER_BATCH", rows), (flat_index, "PAIRS_PER_BATCH", pairs),
                                (key_counts, "MAX_TABLE", kv_table), (flat_index, "MAX_TERMS", max_terms)):
        if value is not None:
            stack.enter_context(mock.patch.object(module, name, value))
    flat_terms.cache_clear()
    stack.callback(flat_terms.cache_clear)
    return stack


def check_all(spec: pg.Spec, tiling: pg.Tiling):
    """Plan, per-q-tile profile, simulator figures and visible pairs against the oracle."""
    if currently_in_test_context():
        note(f"spec={spec!r} tiling={tiling!r}")
    plan = check_plan(spec, tiling)
    tp = plan.groups[0]
    visited = tp.q_ptr.diff()
    rows = torch.repeat_interleave(torch.arange(tp.num_q_tiles), visited)
    full = torch.zeros(tp.num_q_tiles, dtype=torch.long).index_add_(0, rows, tp.full.long())
    ff = flat_form(spec.pattern, spec, plan.q_grid, plan.kv_grid)
    if ff is not None:
        v, f = ff.profile()
        assert torch.equal(v, visited) and torch.equal(f, full)
    report = pg.simulate(spec, tiling.q_tile, tiling.kv_tile)
    assert report.visible_pairs == int(pg.dense_mask(spec).sum())
    assert (report.visited, report.full) == (tp.visited, tp.num_full)
    return ff


@settings(max_examples=scaled(150))
@given(flat_cases())
def test_flat_patterns_match_oracle(case):
    spec, tiling = case
    ff = check_all(spec, tiling)
    assert (ff is None) == (flat_terms(spec.pattern) is None)  # every tile here is contiguous


@settings(max_examples=scaled(50))
@given(flat_cases())
def test_flat_patterns_in_tiny_batches(case):
    """One q tile per batch of runs and a few tile pairs per batch of exact statuses."""
    with _limits(rows=1, pairs=3):
        check_all(*case)


@settings(max_examples=scaled(40))
@given(flat_cases(), st.sampled_from(["kv_table", "max_terms"]))
def test_fallbacks_stay_exact(case, which):
    """Key-only parts too large to tabulate (chunked key scans) or too many union terms (the
    tree analysis with element-wise refinement) give the same plans."""
    with _limits(kv_table=1) if which == "kv_table" else _limits(max_terms=1):
        check_all(*case)


@st.composite
def key_only(draw, depth: int = 2):
    leaf = st.one_of(st.just(pg.Full()), st.integers(1, 40).map(pg.Sink),
                     st.integers(1, 6).flatmap(lambda s: st.integers(0, s - 1).map(lambda o: pg.Strided(s, o))))
    if depth == 0 or draw(st.booleans()):
        return draw(leaf)
    parts = draw(st.lists(key_only(depth - 1), min_size=2, max_size=3))
    out = parts[0]
    op = draw(st.sampled_from("|&"))
    for p in parts[1:]:
        out = (out | p) if op == "|" else (out & p)
    return out


@settings(max_examples=scaled(100))
@given(key_only(), st.lists(st.tuples(st.integers(-5, 90), st.integers(-5, 90)), min_size=1, max_size=20))
def test_kv_count_matches_keys(pattern, intervals):
    """Visible keys in an interval, from the residue table, equal a count over the keys."""
    kc = KvCount(pattern)
    a = torch.tensor([x for x, _ in intervals])
    b = torch.tensor([y for _, y in intervals])
    keys = torch.arange(100)
    vis = visible(pattern, torch.zeros((), dtype=torch.long), keys, pg.Spec(pg.Full(), 100))
    want = [int(vis[max(0, x):max(0, y + 1)].sum()) for x, y in intervals]
    assert kc.count(a, b).tolist() == want


@pytest.mark.parametrize("pattern", [
    pg.Strided(2, 0) & pg.Strided(2, 1) | pg.Causal(),           # a congruence without solution
    pg.Strided(3, 1) & pg.Band(5, 2) | pg.Sink(3) & pg.Strided(2),
    (pg.Sink(4) | pg.Band(15)) & pg.Causal(),
    pg.Global(9) | pg.Band(3, 4) & pg.Causal() | pg.Strided(5, 2),
    pg.Global(7) & pg.Global(20) | pg.Band(0, 6),
    pg.Band(3, 0) | pg.Band(0, 5) | pg.Strided(3),               # two delta intervals unite into one
])
@pytest.mark.parametrize("shapes", [(100, 100), (37, 100), (100, 37)])
@pytest.mark.parametrize("tiling", [pg.Tiling(16, 16), pg.Tiling(5, 8), pg.Tiling(64, 1)])
def test_named_compositions(pattern, shapes, tiling):
    assert flat_terms(pattern) is not None
    check_all(pg.Spec(pattern, shapes[0], shapes[1]), tiling)


@pytest.mark.parametrize("pattern", [pg.Global(5) | pg.Band(2), pg.Sink(3) & pg.Causal() | pg.Strided(2)])
def test_untabulated_key_patterns_fall_back(pattern):
    with _limits(kv_table=1):
        assert flat_terms(pattern) is None
        check_all(pg.Spec(pattern, 70, 90), pg.Tiling(8, 16))


def test_huge_congruence_falls_back():
    """Strides whose lcm exceeds the tables: key scans in chunks, counts from tiles."""
    pattern = pg.Strided(4099, 5) & pg.Strided(4097, 5) | pg.Causal() & pg.Strided(3)
    assert flat_terms(pattern) is None
    check_all(pg.Spec(pattern, 60, 80), pg.Tiling(8, 16))


# -- scale ----------------------------------------------------------------------------
def _no_tokens():
    """Make every per-token entry point of the analysis and the counter raise."""
    def boom(*_, **__):
        raise AssertionError("per-token work in a closed-form path")
    stack = ExitStack()
    stack.enter_context(mock.patch.object(TileGrid, "tokens", boom))
    for mod in (tile_eval, counting):
        stack.enter_context(mock.patch.object(mod, "visible", boom))
    stack.enter_context(mock.patch.object(counting, "count_rows", boom))
    return stack


def _band_expectation(n: int, tile: int = 64) -> tuple[int, int, int]:
    """(visited, full, visible pairs) of Band(127) & Causal() on n = multiple of 64 tokens with
    64-token tiles: q tile i >= 2 visits tiles i-2 (partial), i-1 (full) and i (partial)."""
    T = n // tile
    return 3 * T - 3, T - 1, 128 * n - 127 * 128 // 2


# patterns whose plans hold O(q tiles) pairs (a causal plan alone holds Tq^2 / 2)
SCALE_PATTERNS = [
    pg.Band(127) & pg.Causal(),
    pg.Sink(4) | pg.Band(127) & pg.Causal(),
    (pg.Sink(4) | pg.Band(127)) & pg.Causal(),
    pg.Global(16) | pg.Band(127) & pg.Causal(),
    pg.Global(100),
]


def test_plan_of_1e8_tokens_in_closed_form():
    n = 10 ** 8
    with _no_tokens():
        plan = pg.build_plan(pg.Spec(pg.Band(127) & pg.Causal(), q_shape=n), pg.Tiling(64, 64))
    visited, full, _ = _band_expectation(n)
    counts = plan.counts()
    assert (counts["visited"], counts["full"]) == (visited, full)
    tp = plan.groups[0]
    assert tp.q_ptr[-3:].diff().tolist() == [3, 3]
    last = tp.kv_tiles[-3:].tolist()
    assert last == [n // 64 - 3, n // 64 - 2, n // 64 - 1] and tp.full[-3:].tolist() == [False, True, False]


@pytest.mark.parametrize("n", [10 ** 6, 10 ** 7])
def test_simulate_band_without_tokens(n):
    with _no_tokens():
        r = pg.simulate(pg.Spec(pg.Band(127) & pg.Causal(), q_shape=n), 64, 64)
    assert (r.visited, r.full, r.visible_pairs) == _band_expectation(n)


@pytest.mark.parametrize("pattern", SCALE_PATTERNS, ids=repr)
def test_million_token_plans_do_no_per_token_work(pattern):
    """Plans and simulations of 10^6 tokens never enumerate tokens; the wall-clock bound is a
    guard against a return to per-token work (0.01-0.04 s each here; it was 0.9-6 s), not a benchmark."""
    spec = pg.Spec(pattern, q_shape=10 ** 6)
    with _no_tokens():
        t = time.perf_counter()
        plan = pg.build_plan(spec, pg.Tiling(64, 64))
        report = pg.simulate(spec, 64, 64)
        elapsed = time.perf_counter() - t
    assert (report.visited, report.full) == (plan.counts()["visited"], plan.counts()["full"])
    assert elapsed < 5.0


@pytest.mark.parametrize("pattern", SCALE_PATTERNS + [pg.Causal(), pg.Strided(7) | pg.Causal(),
                                                     (pg.Strided(64) | pg.Band(127)) & pg.Causal()], ids=repr)
def test_simulate_1e8_tokens_without_tokens(pattern):
    """The simulator's figures come from per-q-tile profiles and closed-form counts, also for
    patterns whose plans would hold billions of tile pairs."""
    spec = pg.Spec(pattern, q_shape=10 ** 8)
    with _no_tokens():
        report = pg.simulate(spec, 4096, 4096)
    assert report.tile_pairs == (10 ** 8 // 4096 + 1) ** 2
    assert 0 < report.visible_pairs <= report.dense_pairs


def test_strided_simulate_memory_is_bounded():
    """Strided(7) | Causal() at 10^6 tokens (857 MB at 3*10^5 and std::bad_alloc at 10^6
    before): peak RSS growth of a fresh process, since torch's allocations bypass tracemalloc."""
    code = (
        "import resource, torch, patterngen as pg\n"
        "torch.set_num_threads(1)\n"
        "pg.simulate(pg.Spec(pg.Strided(7) | pg.Causal(), q_shape=1000))\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = pg.simulate(pg.Spec(pg.Strided(7) | pg.Causal(), q_shape=10**6))\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((r1 - r0) * 1024, r.visible_pairs, r.visited, r.tile_pairs)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    growth, vis, visited, tile_pairs = map(int, out.stdout.split())
    n = 10 ** 6
    strided = n * -(-n // 7)
    causal = n * (n + 1) // 2
    both = sum(q // 7 + 1 for q in range(n))  # keys j <= q with j % 7 == 0
    assert vis == strided + causal - both
    assert visited == tile_pairs  # a strided key is in every kv tile
    assert growth < 200 * 2 ** 20, f"peak RSS grew by {growth / 2 ** 20:.0f} MB"
