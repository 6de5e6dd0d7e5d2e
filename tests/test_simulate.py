"""The simulator, its exact counts, the device models, the tiling optimizer and the stride advisor.

Counts are checked against an independent brute force over the dense oracle
(`pg.dense_mask`): visible pairs, and tile pairs by mapping every token to its
tile and reducing the mask per tile pair.
"""
from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import patterngen as pg
from patterngen import sim
from patterngen.sim import atoms, counting, profiles
from patterngen.sim.advisor import advise_strides
from tests.strategies import routed_specs, scaled, specs, specs_and_tilings, windows

ROOT = Path(__file__).resolve().parents[1]


# -- brute force ----------------------------------------------------------------------
def tile_of_token(shape, tile) -> torch.Tensor:
    """Tile id of every flattened token, row-major over the tile grid (written independently)."""
    n = math.prod(shape)
    idx = torch.arange(n)
    if isinstance(tile, int) or len(shape) == 1:
        t = tile if isinstance(tile, int) else tile[0]
        return idx // t
    coords, rest = [], idx
    for L in reversed(shape):
        coords.append(rest % L)
        rest = rest // L
    coords = coords[::-1]
    counts = [-(-L // t) for L, t in zip(shape, tile)]
    out = torch.zeros_like(idx)
    for c, t, m in zip(coords, tile, counts):
        out = out * m + c // t
    return out


def brute_tile_counts(mask: torch.Tensor, spec, q_tile, kv_tile):
    """Per head (visited, full, all) tile pairs of a dense mask [H, Nq, Nkv]."""
    qt, kt = tile_of_token(spec.q_shape, q_tile), tile_of_token(spec.kv_shape, kv_tile)
    Tq, Tk = int(qt.max()) + 1, int(kt.max()) + 1
    pair = (qt[:, None] * Tk + kt[None, :]).flatten()
    out = []
    for m in mask:
        any_ = torch.zeros(Tq * Tk, dtype=torch.long).scatter_reduce(0, pair, m.flatten().long(), "amax",
                                                                      include_self=False)
        all_ = torch.ones(Tq * Tk, dtype=torch.long).scatter_reduce(0, pair, m.flatten().long(), "amin",
                                                                    include_self=False)
        out.append((int(any_.sum()), int((any_ & all_).sum()), Tq * Tk))
    return out


def assert_report_matches_oracle(r, spec, mask):
    counts = brute_tile_counts(mask, spec, r.q_tile, r.kv_tile)
    assert r.visible_pairs == int(mask.sum())
    assert r.dense_pairs == mask.numel()
    assert r.visited == sum(v for v, _, _ in counts)
    assert r.full == sum(f for _, f, _ in counts)
    assert r.tile_pairs == sum(t for _, _, t in counts)
    assert r.fully_block_sparse == (r.partial == 0)
    for h, hf in enumerate(r.heads):
        assert (hf.visited, hf.full, hf.tile_pairs) == counts[h]
        assert hf.visible_pairs == int(mask[h].sum())
    if r.visible_pairs:
        assert r.flop_speedup == pytest.approx(mask.numel() / int(mask.sum()))


# -- exact counts against the oracle ------------------------------------------------------
@settings(max_examples=scaled(150), deadline=None)
@given(specs())
def test_visible_pairs_match_dense_mask(spec):
    assert counting.visible_pairs(spec).tolist() == pg.dense_mask(spec).sum((1, 2)).tolist()


@settings(max_examples=scaled(60), deadline=None)
@given(routed_specs())
def test_visible_pairs_routed_match_dense_mask(case):
    spec, idx = case
    mask = pg.dense_mask(spec, idx)
    expected = mask.sum((-1, -2))
    assert counting.visible_pairs(spec, idx).tolist() == (expected if expected.dim() == 2 else expected[None]).tolist()


@settings(max_examples=scaled(120), deadline=None)
@given(specs_and_tilings())
def test_simulate_counts_match_brute_force(case):
    spec, tiling = case
    r = pg.simulate(spec, tiling.q_tile, tiling.kv_tile)
    assert_report_matches_oracle(r, spec, pg.dense_mask(spec))
    assert r.plan.counts() == {k: v for k, v in r.counts().items() if k in r.plan.counts()}


@settings(max_examples=scaled(40), deadline=None)
@given(routed_specs())
def test_simulate_routed_counts_match_brute_force(case):
    spec, idx = case
    r = pg.simulate(spec, 8, 8, block_indices=idx)
    mask = pg.dense_mask(spec, idx)
    mask = mask if mask.dim() == 4 else mask[None]
    assert r.visible_pairs == int(mask.sum())
    per_batch = [brute_tile_counts(m, spec, 8, 8) for m in mask]
    assert r.visited == sum(v for b in per_batch for v, _, _ in b)
    assert r.full == sum(f for b in per_batch for _, f, _ in b)
    assert r.routing == "given"


@settings(max_examples=scaled(60), deadline=None)
@given(specs_and_tilings(), st.sampled_from(["h100", "a100"]))
def test_closed_form_profiles_equal_plan_per_q_tile(case, device):
    """The per-q-tile counts that drive the time model equal the plan's, q tile by q tile."""
    spec, tiling = case
    qg = pg.TileGrid(spec.q_shape, tiling.q_tile)
    kg = pg.TileGrid(spec.kv_shape, tiling.kv_tile)
    for p in dict.fromkeys(spec.head_patterns):
        prof = sim.closed_form_profile(p, spec, qg, kg)
        if prof is None:
            continue
        plan = pg.build_plan(pg.Spec(p, spec.q_shape, spec.kv_shape), tiling)
        visited, full = sim.plan_profiles(plan)[0]
        assert prof[0].tolist() == visited.tolist()
        assert prof[1].tolist() == full.tolist()
    r = pg.simulate(spec, tiling.q_tile, tiling.kv_tile, device=device)
    assert r.predicted_time_s > 0 and r.dense_time_s > 0


@settings(max_examples=scaled(80), deadline=None)
@given(st.integers(2, 90), st.data())
def test_window_dim_tiles_mask_and_interval_paths_agree(L, data):
    d = data.draw(st.integers(1, max(1, L // 2)))
    w = data.draw(st.integers(2, max(2, L // d))) if L // d >= 2 else L
    s = data.draw(st.integers(1, w))
    c = data.draw(st.booleans())
    tq, tk = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    raw = profiles.window_dim_tiles.__wrapped__
    a = raw(L, w, s, d, c, tq, tk)
    with mock.patch.object(profiles, "MASK_EXTENT", 0):
        b = raw(L, w, s, d, c, tq, tk)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


def test_heads_report_per_head_and_groups():
    spec = pg.Spec(pg.Heads({range(0, 2): pg.Window(16), 2: pg.Band(8) | pg.Sink(4), 3: pg.Full()}), 256,
                   num_heads=4)
    r = pg.simulate(spec, 32, 32)
    mask = pg.dense_mask(spec)
    assert_report_matches_oracle(r, spec, mask)
    assert [g.heads for g in r.groups] == [(0, 1), (2,), (3,)]
    assert r.groups[2].flop_speedup == 1.0 and r.groups[2].fully_block_sparse
    assert sum(g.visited for g in r.groups) == r.visited


# -- the published GNA cases -------------------------------------------------------------------
def test_gna_1d_strided_is_fully_block_sparse():
    r = pg.simulate(pg.Spec(pg.Window(2048, stride=256), 32768), 128, 128)
    assert r.tile_speedup == pytest.approx(16.0)
    assert r.flop_speedup == pytest.approx(16.0)
    assert r.fully_block_sparse


def test_gna_2d_strided_is_fully_block_sparse():
    r = pg.simulate(pg.Spec(pg.Window((80, 80), stride=(16, 16)), (256, 256)), (16, 8), (16, 8))
    assert r.tile_speedup == pytest.approx(10.24)
    assert r.flop_speedup == pytest.approx(10.24)
    assert r.fully_block_sparse
    assert (r.q_tile, r.kv_tile) == ((16, 8), (16, 8))


def test_gna_2d_stride_one_is_not_fully_block_sparse():
    r = pg.simulate(pg.Spec(pg.Window((80, 80)), (256, 256)), (16, 8), (16, 8))
    assert r.flop_speedup == pytest.approx(10.24)
    assert not r.fully_block_sparse
    assert r.tile_speedup < 10.24


@pytest.mark.parametrize("device", [None, "h100", "b200"])
def test_optimizer_picks_fully_block_sparse_tiles_for_strided_2d(device):
    r = pg.simulate(pg.Spec(pg.Window((80, 80), stride=(16, 16)), (256, 256), head_dim=128), device=device)
    assert r.fully_block_sparse
    assert r.tile_speedup == pytest.approx(10.24)
    assert r.searched and len(r.candidates) > 1
    assert_report_matches_oracle_counts_by_plan(r)


def assert_report_matches_oracle_counts_by_plan(r):
    c = r.plan.counts()
    assert (c["visited"], c["full"], c["tile_pairs"]) == (r.visited, r.full, r.tile_pairs)


# -- the optimizer --------------------------------------------------------------------------------
SMALL_DEVICE = {**json.loads((ROOT / "patterngen" / "sim" / "devices" / "h100.json").read_text()),
                "name": "small", "tile_volumes": [[16, 16], [32, 16], [16, 32]]}


@settings(max_examples=scaled(10), deadline=None)
@given(st.data())
def test_branch_and_bound_finds_the_exhaustive_optimum(data):
    shape = data.draw(st.sampled_from([(12, 20), (16, 16), (6, 8, 10), (40,)]))
    win = data.draw(windows(shape))
    heads = data.draw(st.integers(1, 2))
    spec = pg.Spec(win, shape, num_heads=heads, head_dim=data.draw(st.sampled_from([32, 64])))
    dev = sim.load_device(SMALL_DEVICE)
    r = pg.simulate(spec, device=dev)
    exhaustive = {}
    for c in r.candidates:
        e = pg.simulate(spec, c.q_tile, c.kv_tile, device=dev)
        exhaustive[(c.q_tile, c.kv_tile)] = e.predicted_time_s
        if c.status == "exact":  # the fast per-dimension path equals a real plan
            assert (c.visited, c.full) == (e.plan.counts()["visited"], e.plan.counts()["full"])
            assert c.predicted_time_s == pytest.approx(e.predicted_time_s)
        else:
            assert c.status == "pruned" and c.lower_bound_s <= e.predicted_time_s * (1 + 1e-9)
    assert r.predicted_time_s == pytest.approx(min(exhaustive.values()))


def test_search_one_fixed_tile_searches_the_other():
    spec = pg.Spec(pg.Window((80, 80), stride=(16, 16)), (256, 256))
    r = pg.simulate(spec, q_tile=(16, 8))
    assert r.q_tile == (16, 8) and isinstance(r.kv_tile, tuple)
    assert all(c.q_tile == (16, 8) for c in r.candidates)
    assert r.fully_block_sparse
    flat = pg.simulate(spec, q_tile=256, device="h100")  # a flat q tile: flat kv tiles of the device's volumes
    assert flat.q_tile == 256 and all(isinstance(c.kv_tile, int) for c in flat.candidates)
    assert (flat.visited, flat.full) == (flat.plan.counts()["visited"], flat.plan.counts()["full"])


def test_search_flattened_patterns_use_flat_tiles():
    spec = pg.Spec(pg.Band(1000) | pg.Sink(4), (32, 64), num_heads=2)
    r = pg.simulate(spec, device="h100")
    assert all(isinstance(c.q_tile, int) for c in r.candidates)
    assert_report_matches_oracle(pg.simulate(spec, r.q_tile, r.kv_tile), spec, pg.dense_mask(spec))


def test_search_composition_with_window_plans_a_short_list():
    spec = pg.Spec(pg.Window((9, 9)) | pg.Global(3), (64, 64))
    r = pg.simulate(spec, device="h100", max_plans=3)
    assert sum(c.status == "exact" for c in r.candidates) == 3
    assert {c.status for c in r.candidates} <= {"exact", "estimated"}
    assert_report_matches_oracle(r, spec, pg.dense_mask(spec))


def test_routed_without_indices_uses_a_representative_routing():
    spec = pg.Spec(pg.Routed(64, 4, causal=True), 4096, num_heads=2)
    r = pg.simulate(spec, device="h100")
    assert r.routing == "synthetic" and any("routing" in n for n in r.notes)
    idx = r.block_indices
    assert idx.shape == (2, 64, 4) and int(idx.max()) < 64
    assert r.visible_pairs == int(pg.dense_mask(spec, idx).sum())


def test_million_token_3d_search_is_fast_and_exact():
    spec = pg.Spec(pg.Window((16, 16, 16)), (64, 128, 128))
    r = pg.simulate(spec, device="h100")
    assert r.elapsed_s < 20  # ~0.5 s on an idle 2-core machine; loose here against a loaded CI box
    assert r.flop_speedup == pytest.approx(256.0)
    assert_report_matches_oracle_counts_by_plan(r)
    video = pg.Spec(pg.Window((18, 24, 24), stride=(16, 8, 8)), (30, 48, 80), num_heads=24, head_dim=128)
    rv = pg.simulate(video, device="h100")
    assert rv.fully_block_sparse and rv.tile_speedup == pytest.approx(rv.flop_speedup)


def test_flat_as_box_and_box_shapes():
    assert sim.flat_as_box(128, (64, 128, 128)) == (1, 1, 128)
    assert sim.flat_as_box(256, (64, 128, 128)) == (1, 2, 128)
    assert sim.flat_as_box(96, (64, 128, 128)) is None
    assert sim.flat_as_box(128, (30, 48, 80)) is None
    shapes = sim.box_shapes(128, (256, 256))
    assert (16, 8) in shapes and (8, 16) in shapes and all(a * b == 128 for a, b in shapes)
    assert (2, 8, 8) in sim.box_shapes(128, (30, 48, 80))


# -- the device models and the time model ------------------------------------------------------
@pytest.mark.parametrize("name", ["h100", "h200", "b200", "a100"])
def test_shipped_device_models(name):
    dev = sim.load_device(name)
    assert dev.name == name and dev.sm_count > 50
    for key in ("peak_bf16_dense_tflops", "memory_bandwidth_gbs", "sm_count"):
        assert dev.source.get(key), f"{name}: no source for {key}"
    assert dev.fits(128, 128, 128) or name == "a100"
    assert sim.load_device(name.upper()).name == name
    assert name in sim.available_devices()


def test_device_from_path_and_bad_devices(tmp_path):
    data = json.loads((ROOT / "patterngen" / "sim" / "devices" / "h100.json").read_text())
    data["name"] = "mygpu"
    p = tmp_path / "mygpu.json"
    p.write_text(json.dumps(data))
    r = pg.simulate(pg.Spec(pg.Window(256), 4096), 128, 128, device=str(p))
    assert r.device.name == "mygpu" and r.predicted_speedup > 1
    with pytest.raises(ValueError, match="unknown device 'v100'"):
        sim.load_device("v100")
    del data["kernel"]["mma_efficiency"]
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mma_efficiency"):
        sim.load_device(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sim.load_device(p)
    with pytest.raises(TypeError, match="device must be"):
        sim.load_device(3)


def test_wave_quantisation():
    costs = torch.ones(133, dtype=torch.float64)
    assert float(sim.wave_time(costs, 132)) == 2.0  # one straggler CTA costs a whole wave
    assert float(sim.wave_time(torch.ones(132, dtype=torch.float64), 132)) == 1.0
    c = torch.tensor([1.0, 5.0, 1.0, 1.0], dtype=torch.float64)
    assert float(sim.wave_time(c, 2)) == 6.0


def test_time_model_scales_with_batch_heads_and_head_dim():
    dev = sim.load_device("h100")
    base = pg.Spec(pg.Window(1024), 65536, num_heads=8, head_dim=64)
    t1 = pg.simulate(base, 128, 128, device=dev).predicted_time_s
    t_batch = pg.simulate(base, 128, 128, device=dev, batch=4).predicted_time_s
    t_hd = pg.simulate(pg.Spec(pg.Window(1024), 65536, num_heads=8, head_dim=128), 128, 128,
                       device=dev).predicted_time_s
    assert 3.5 * t1 < t_batch < 4.5 * t1
    assert t_hd > 1.4 * t1
    full = pg.simulate(pg.Spec(pg.Full(), 16384, num_heads=16, head_dim=128), 128, 128, device=dev)
    assert 0.3 < full.predicted_speedup <= 1.0  # our kernel on a dense pattern: never faster than dense


def test_partial_tiles_cost_more_than_full_tiles():
    dev = sim.load_device("h100")
    strided = pg.simulate(pg.Spec(pg.Window((80, 80), stride=(16, 16)), (256, 256)), (16, 8), (16, 8), device=dev)
    plain = pg.simulate(pg.Spec(pg.Window((80, 80)), (256, 256)), (16, 8), (16, 8), device=dev)
    assert strided.predicted_time_s < plain.predicted_time_s
    assert strided.predicted_speedup > plain.predicted_speedup


# -- measured tile costs (patterngen audit --calibrate) ---------------------------------------------------
def test_tile_costs_match_a_fresh_audit():
    """The committed instruction counts are what today's kernels compile to: a kernel change
    that moves them fails here until `patterngen audit --calibrate` is run again."""
    pytest.importorskip("triton", reason="the audit compiles Triton kernels")
    from patterngen.sim import tile_costs
    from patterngen.tools.audit import tile_cost_entry
    data = tile_costs.load()
    assert data["command"] == "patterngen audit --calibrate" and data["date"]
    assert {e["arch"] for e in data["entries"]} == {80, 90}
    stored = tile_costs.nearest(90, 128, 128, 64)
    assert (stored["head_dim"], stored["q_tile"], stored["kv_tile"]) == (128, 128, 64)
    assert tile_cost_entry(90, 128, 128, 64) == stored, "stale tile_costs.json: run `patterngen audit --calibrate`"


def test_partial_tile_cost_is_the_measured_instruction_ratio(monkeypatch):
    from patterngen.sim import tile_costs
    from patterngen.sim.time_model import kernel_params, tile_times
    dev = sim.load_device("h100")
    entry = tile_costs.nearest(dev.arch, 128, 128, 64)
    measured = entry["partial_tile"] / entry["full_tile"]
    assert measured != dev.kernel["partial_tile_factor"]  # the prior is not what is used
    t_full, t_partial, _ = tile_times(dev, kernel_params(dev, 128, 64, 128), 128, 64, 128, False)
    assert float(t_partial / t_full) == pytest.approx(measured)
    # nearest head dim and tile: 96 is nearer 128 than 64 in octaves; a 128 x 48 tile is nearest 128 x 64
    assert tile_costs.nearest(90, 96, 128, 48) == entry
    # a device fitted from GPU timings keeps its factor; an arch without counts keeps the prior
    fitted = sim.DeviceModel.from_dict({**dev.to_dict(), "calibrated": True})
    assert kernel_params(fitted, 128, 64, 128)["partial_tile_factor"] == dev.kernel["partial_tile_factor"]
    b200 = sim.load_device("b200")
    assert kernel_params(b200, 128, 64, 128)["partial_tile_factor"] == b200.kernel["partial_tile_factor"]
    # and the prediction follows the data: partial tiles twice a full one cost more time
    wl = sim.workload(pg.Spec(pg.Causal(), 8192, num_heads=8, head_dim=128), 128, 64, 1)
    before = float(sim.predict_time(dev, wl))
    monkeypatch.setattr(tile_costs, "load", lambda: {"entries": [{**entry, "partial_tile": 4 * entry["full_tile"]}]})
    assert float(sim.predict_time(dev, wl)) > before
    with pytest.raises(ValueError, match="'arch'"):
        sim.DeviceModel.from_dict({**dev.to_dict(), "arch": "sm_90"})


# -- the stride advisor ------------------------------------------------------------------------------
def test_advisor_reproduces_gna_1d():
    adv = advise_strides(pg.Window(2048), 32768, 128, 128)
    assert adv[0].stride == (256,) and adv[0].tile_speedup == pytest.approx(16.0)
    assert all(a.stride[0] % 256 == 0 for a in adv)  # 128 would be misaligned with the kv tiles
    assert adv[0].window == pg.Window(2048, stride=256)


def test_advisor_reproduces_gna_2d():
    adv = advise_strides(pg.Window((80, 80)), (256, 256), (16, 8), (16, 8))
    assert adv[0].stride == (16, 16)
    assert adv[0].tile_speedup == pytest.approx(10.24) and adv[0].flop_speedup == pytest.approx(10.24)
    assert (8, 8) not in [a.stride for a in adv] and (1, 1) not in [a.stride for a in adv]


def test_advisor_video_and_tolerance():
    adv = advise_strides((18, 24, 24), (30, 48, 80), (2, 8, 8), (2, 8, 8))
    strides = [a.stride for a in adv]
    assert (16, 8, 8) in strides  # the stride HunyuanVideo's GNA setting uses
    assert (1, 8, 8) not in strides
    tweaked = advise_strides(pg.Window((79, 80)), (256, 256), (16, 8), (16, 8), tolerance=1)
    assert tweaked and tweaked[0].size == (80, 80) and tweaked[0].tweak == (1, 0)
    assert advise_strides(pg.Window((79, 80)), (256, 256), (16, 8), (16, 8)) == []


@settings(max_examples=scaled(40), deadline=None)
@given(st.data())
def test_advisor_is_exact_against_plans(data):
    shape = data.draw(st.sampled_from([(24, 32), (40,), (8, 12, 16)]))
    win = data.draw(windows(shape))
    qt = tuple(data.draw(st.sampled_from([1, 2, 4, 8])) for _ in shape)
    kt = tuple(data.draw(st.sampled_from([1, 2, 4, 8])) for _ in shape)
    adv = advise_strides(win, shape, qt if len(shape) > 1 else qt[0], kt if len(shape) > 1 else kt[0])
    listed = {a.stride for a in adv}
    dims = win.dims(len(shape))
    # every stride vector along one dimension, the others fixed to 1..w: exhaustive on small windows
    for stride in {tuple(data.draw(st.integers(1, w)) for (w, _, _, _) in dims) for _ in range(6)} | listed:
        spec = pg.Spec(pg.Window(tuple(w for w, _, _, _ in dims), stride=stride,
                                 dilation=tuple(d for _, _, d, _ in dims), causal=tuple(c for *_, c in dims)), shape)
        r = pg.simulate(spec, qt if len(shape) > 1 else qt[0], kt if len(shape) > 1 else kt[0])
        assert r.fully_block_sparse == (stride in listed)
        if stride in listed:
            a = next(a for a in adv if a.stride == stride)
            assert a.tile_speedup == pytest.approx(r.tile_speedup)
            assert a.flop_speedup == pytest.approx(r.flop_speedup)


def test_advisor_bad_input():
    with pytest.raises(ValueError, match="flat tile"):
        advise_strides(pg.Window((8, 8)), (32, 32), 64, 64)
    with pytest.raises(ValueError, match="grid"):
        advise_strides(pg.Window((8, 8)), (32, 32, 4), (4, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="tolerance"):
        advise_strides(8, 32, 4, 4, tolerance=-1)


# -- errors --------------------------------------------------------------------------------------
def test_simulate_bad_input():
    spec = pg.Spec(pg.Window((8, 8)), (32, 32))
    with pytest.raises(TypeError, match="spec"):
        pg.simulate("spec")
    with pytest.raises(ValueError, match="q_tile"):
        pg.simulate(spec, (0, 4), (4, 4))
    with pytest.raises(ValueError, match="both be flat"):
        pg.simulate(spec, 16, (4, 4))
    with pytest.raises(ValueError, match="batch"):
        pg.simulate(spec, batch=0)
    with pytest.raises(ValueError, match="block_indices"):
        pg.simulate(spec, block_indices=torch.zeros(1, 1, 1, dtype=torch.long))


# -- command line and calibration ------------------------------------------------------------------
def _cli(argv, capsys):
    from patterngen.tools.cli import main
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_simulate_table_and_explain(tmp_path, capsys):
    f = tmp_path / "spec.py"
    f.write_text("import patterngen as pg\n"
                 "spec = pg.Spec(pg.Window((80, 80), stride=(16, 16)), (256, 256), num_heads=4, head_dim=128)\n"
                 "mixed = pg.Spec(pg.Heads({0: pg.Band(64), 1: pg.Full()}), 4096, num_heads=2)\n"
                 "specs = [mixed]\n")
    code, out, _ = _cli(["simulate", str(f), "--device", "h100", "--explain"], capsys)
    assert code == 0
    assert "10.24x" in out and "yes" in out and "heads 0" in out
    assert "why: lowest predicted time" in out
    code, _, err = _cli(["simulate", str(f), "--tile", "16x8", "16,8"], capsys)
    assert code == 2 and "q_tile" in err  # a 2-D box does not fit the 1-D spec in the same file
    g = tmp_path / "one.py"
    g.write_text("import patterngen as pg\nspec = pg.Spec(pg.Window((80, 80), stride=(16, 16)), (256, 256))\n")
    code, out, _ = _cli(["simulate", str(g), "--tile", "16x8", "16,8"], capsys)
    assert code == 0 and "16x8" in out and "10.24x" in out
    code, _, err = _cli(["simulate", str(f), "--device", "nope"], capsys)
    assert code != 0 and "unknown device" in err


def test_cli_plot(tmp_path, capsys, monkeypatch):
    f = tmp_path / "spec.py"
    f.write_text("import patterngen as pg\nspec = pg.Spec(pg.Window((16, 16), stride=(4, 4)), (64, 64))\n")
    out_png = tmp_path / "out.png"
    if importlib.util.find_spec("matplotlib") is None:
        code, _, err = _cli(["simulate", str(f), "--plot", str(out_png)], capsys)
        assert code == 3 and "matplotlib" in err
    else:
        code, out, _ = _cli(["simulate", str(f), "--plot", str(out_png)], capsys)
        assert code == 0 and out_png.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = _cli(["simulate", str(f), "--plot", str(out_png)], capsys)
    assert code == 3 and "pip install matplotlib" in err


def test_tile_map_shows_statuses():
    r = pg.simulate(pg.Spec(pg.Window(64), 4096), 64, 64)
    img = sim.tile_map(r, max_side=16)
    assert img.shape == (16, 16) and set(img.unique().tolist()) <= {0, 1, 2}
    assert int((img > 0).sum()) > 0


def test_calibration_recovers_synthetic_parameters(tmp_path, capsys):
    mod = runpy.run_path(str(ROOT / "examples" / "calibration" / "calibrate.py"), run_name="calibration")
    dev = sim.load_device("h100")
    records, truth = mod["synthetic_records"](dev, 8)
    path = tmp_path / "m.json"
    path.write_text("\n".join(json.dumps(r) for r in records))
    out_dev = tmp_path / "h100_fit.json"
    assert mod["main"]([str(path), "--device", "h100", "--steps", "300", "--out", str(out_dev)]) == 0
    fitted = sim.load_device(out_dev)
    assert fitted.calibrated
    cases = mod["workloads"](fitted, records)
    for name, kind, wl, measured in cases:
        assert float(sim.predict_time(fitted, wl)) == pytest.approx(measured, rel=0.05), name


@settings(max_examples=scaled(50), deadline=None)
@given(specs())
def test_counting_fallbacks_match_dense_mask(spec):
    """The slower exact paths (tile analysis + element-wise, whole-pattern tiles, and the
    congruence fallback) give the oracle's counts too."""
    expected = pg.dense_mask(spec).sum((1, 2)).tolist()
    for module, name in ((counting, "QUERY_ROWS"), (atoms, "MAX_TERMS"), (counting, "MAX_MODULUS")):
        with mock.patch.object(module, name, 0):
            assert counting.visible_pairs(spec).tolist() == expected, name


@settings(max_examples=scaled(30), deadline=None)
@given(routed_specs())
def test_counting_routed_fallbacks_match_dense_mask(case):
    spec, idx = case
    expected = pg.dense_mask(spec, idx).sum((-1, -2))
    expected = expected if expected.dim() == 2 else expected[None]
    for module, name in ((counting, "QUERY_ROWS"), (atoms, "MAX_TERMS")):
        with mock.patch.object(module, name, 0):
            assert counting.visible_pairs(spec, idx).tolist() == expected.tolist(), name


@settings(max_examples=scaled(30), deadline=None)
@given(specs(refine=False), st.booleans())
def test_search_on_random_specs_reports_oracle_counts(spec, with_device):
    """Whatever the optimizer picks, the report's counts are the oracle's for that tiling."""
    r = pg.simulate(spec, device=sim.load_device(SMALL_DEVICE) if with_device else None)
    assert_report_matches_oracle(r, spec, pg.dense_mask(spec))
    assert r.candidates[0].q_tile == r.q_tile and r.candidates[0].status == "exact"
    if with_device:
        exact = [c.predicted_time_s for c in r.candidates if c.status == "exact"]
        assert r.predicted_time_s == min(exact)


# -- token-routed heads (Mixture-of-Head) ------------------------------------------------------------
@st.composite
def head_routings(draw, spec, batch: int | None = None):
    """Head indices [B, Nq, K] with -1 slots and repeats, and the routings the edge cases need:
    every head for every token, one shared head only, a head that no token uses."""
    H = spec.num_heads
    B = draw(st.integers(1, 2)) if batch is None else batch
    K = draw(st.integers(1, H + 1))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "random", "all", "shared", "skip_last"]))
    if kind == "all":
        return torch.arange(H).expand(B, spec.nq, H).clone()
    if kind == "shared":
        return torch.zeros(B, spec.nq, 1, dtype=torch.long)
    hi = H - 1 if kind == "skip_last" and H > 1 else H
    idx = torch.randint(0, hi, (B, spec.nq, K), generator=gen)
    return torch.where(torch.rand(B, spec.nq, K, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.8])), -1, idx)


def brute_selection(idx, H):
    """Bool [B, H, Nq] by a plain loop (independent of the model's scatter)."""
    B, Nq, K = idx.shape
    sel = torch.zeros(B, H, Nq, dtype=torch.bool)
    for b in range(B):
        for q in range(Nq):
            for h in idx[b, q].tolist():
                if h >= 0:
                    sel[b, h, q] = True
    return sel


def brute_compacted(mask, sel, spec, q_tile, kv_tile):
    """(visited, full) kv tiles of the compacted tiles of one (batch, head) from a dense mask
    [Nq, Nkv]: selected tokens in q-tile order, V per compacted tile; a kv tile is visited if a
    spanned original q tile meets it, full if every spanned original q tile is full on it."""
    qt, kt = tile_of_token(spec.q_shape, q_tile), tile_of_token(spec.kv_shape, kv_tile)
    Tq, Tk = int(qt.max()) + 1, int(kt.max()) + 1
    pair = (qt[:, None] * Tk + kt[None, :]).flatten()
    m = mask.flatten().long()
    any_ = torch.zeros(Tq * Tk, dtype=torch.long).scatter_reduce(0, pair, m, "amax", include_self=False)
    all_ = torch.ones(Tq * Tk, dtype=torch.long).scatter_reduce(0, pair, m, "amin", include_self=False)
    any_, all_ = any_.view(Tq, Tk).bool(), all_.view(Tq, Tk).bool()
    V = q_tile if isinstance(q_tile, int) else math.prod(q_tile)
    order = sorted(range(spec.nq), key=lambda q: (int(qt[q]), q))  # q-tile order, ascending inside a tile
    chosen = [q for q in order if sel[q]]
    visited = full = 0
    for j in range(0, len(chosen), V):
        spanned = sorted({int(qt[q]) for q in chosen[j:j + V]})
        a, f = any_[spanned].any(0), (any_[spanned] & all_[spanned]).all(0)
        visited += int(a.sum())
        full += int((a & f).sum())
    return visited, full


@pytest.mark.parametrize("spec", [pg.Spec(pg.Causal(), 1000, num_heads=3),
                                  pg.Spec(pg.Window((5, 7)), (20, 24), num_heads=2),
                                  pg.Spec(pg.Heads({0: pg.Band(40), 1: pg.Full()}), 700, num_heads=2)])
def test_active_heads_one_equals_default(spec):
    for device in (None, "h100"):
        a, b = pg.simulate(spec, device=device), pg.simulate(spec, device=device, active_heads=1.0)
        assert a.counts() == b.counts() and (a.q_tile, a.kv_tile) == (b.q_tile, b.kv_tile)
        assert a.heads == b.heads and a.groups == b.groups
        assert a.predicted_time_s == b.predicted_time_s and a.dense_time_s == b.dense_time_s
        assert a.active_fraction is None and b.active_fraction == 1.0
        assert "heads active" in b.summary() and "heads active" not in a.summary()


@pytest.mark.parametrize("spec", [pg.Spec(pg.Causal(), 32768, num_heads=32, head_dim=128),
                                  pg.Spec(pg.Window(1024), 32768, num_heads=32, head_dim=128)])
def test_half_the_heads_halves_the_bound_and_cuts_the_time(spec):
    full = pg.simulate(spec, device="h100")
    half = pg.simulate(spec, device="h100", active_heads=0.5)
    assert (half.q_tile, half.kv_tile) == (full.q_tile, full.kv_tile)
    assert abs(half.visible_pairs - full.visible_pairs / 2) <= 1
    assert half.flop_speedup == pytest.approx(2 * full.flop_speedup, rel=1e-6)
    assert half.dense_pairs == full.dense_pairs and half.tile_pairs == full.tile_pairs
    assert half.visited <= 0.6 * full.visited  # compacted tiles span ~2 original ones
    assert half.ctas == spec.num_heads * -(-spec.nq // 2 // _vol(half.q_tile))
    assert half.all_heads_time_s == full.predicted_time_s
    assert half.predicted_time_s < 0.7 * full.predicted_time_s
    assert half.routing_speedup == pytest.approx(full.predicted_time_s / half.predicted_time_s)
    assert half.dense_time_s == full.dense_time_s
    quarter = pg.simulate(spec, device="h100", active_heads=0.25)
    assert quarter.predicted_time_s < half.predicted_time_s
    assert "heads active 50.0% (fraction)" in half.summary() and "head routing:" in half.explain()


def _vol(t):
    return t if isinstance(t, int) else math.prod(t)


@settings(max_examples=scaled(40), deadline=None)
@given(st.data())
def test_measured_head_routing_matches_dense_mask(data):
    spec, tiling = data.draw(specs_and_tilings())
    idx = data.draw(head_routings(spec))
    r = pg.simulate(spec, tiling.q_tile, tiling.kv_tile, active_heads=idx)
    mask = pg.dense_mask(spec)  # [H, Nq, Nkv]
    sel = brute_selection(idx, spec.num_heads)
    rows = mask.sum(2)  # visible keys per (head, query)
    B = idx.shape[0]
    assert r.batch == B and r.head_routing == "measured"
    assert r.visible_pairs == int((sel * rows[None]).sum())
    for h, hf in enumerate(r.heads):
        assert hf.visible_pairs == int((sel[:, h] * rows[h][None]).sum())
    assert r.dense_pairs == B * mask.numel()
    assert r.active_fraction == pytest.approx(float(sel.float().mean()))
    vf = [brute_compacted(mask[h], sel[b, h], spec, tiling.q_tile, tiling.kv_tile)
          for b in range(B) for h in range(spec.num_heads)]
    assert r.visited == sum(v for v, _ in vf) and r.full == sum(f for _, f in vf)
    if isinstance(tiling.q_tile, int) and bool(sel.all()):  # everything selected on flat tiles: the plain plan
        d = pg.simulate(spec, tiling.q_tile, tiling.kv_tile, batch=B)
        assert (r.visited, r.full) == (B * d.visited, B * d.full)


@settings(max_examples=scaled(25), deadline=None)
@given(st.data())
def test_measured_head_routing_on_routed_specs(data):
    spec, bidx = data.draw(routed_specs())
    batch = bidx.shape[0] if bidx.dim() == 4 else data.draw(st.integers(1, 2))
    idx = data.draw(head_routings(spec, batch))
    r = pg.simulate(spec, 8, 8, block_indices=bidx, active_heads=idx)
    mask = pg.dense_mask(spec, bidx)
    mask = mask if mask.dim() == 4 else mask[None].expand(batch, -1, -1, -1)
    sel = brute_selection(idx, spec.num_heads)
    assert r.visible_pairs == int((sel * mask.sum(3)).sum())
    vf = [brute_compacted(mask[b, h], sel[b, h], spec, 8, 8) for b in range(batch) for h in range(spec.num_heads)]
    assert r.visited == sum(v for v, _ in vf) and r.full == sum(f for _, f in vf)


def test_measured_routing_time_and_batch():
    spec = pg.Spec(pg.Causal(), 4096, num_heads=8, head_dim=64)
    g = torch.Generator().manual_seed(1)
    idx = torch.rand(2, 4096, 8, generator=g).argsort(-1)[..., :4]  # 4 of 8 heads per token
    r = pg.simulate(spec, 128, 128, device="h100", active_heads=idx)
    full = pg.simulate(spec, 128, 128, device="h100", batch=2)
    assert r.batch == 2 and r.active_fraction == 0.5
    assert r.predicted_time_s < full.predicted_time_s == r.all_heads_time_s
    assert r.ctas == sum(-(-int(n) // 128) for n in brute_selection(idx, 8).sum(2).flatten())
    with pytest.raises(ValueError, match="active_heads"):
        pg.simulate(spec, 128, 128, batch=3, active_heads=idx)


def test_active_heads_bad_input():
    spec = pg.Spec(pg.Causal(), 64, num_heads=4)
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"active_heads.*\(0, 1\]"):
            pg.simulate(spec, active_heads=bad)
    for bad in ("half", True, [0.5]):
        with pytest.raises(TypeError, match="active_heads"):
            pg.simulate(spec, active_heads=bad)
    for bad in (torch.zeros(1, 64, 2),                        # float
                torch.zeros(64, 2, dtype=torch.long),          # no batch
                torch.zeros(1, 63, 2, dtype=torch.long),       # wrong Nq
                torch.zeros(1, 64, 0, dtype=torch.long),       # no slot
                torch.full((1, 64, 2), 4),                     # head out of range
                torch.full((1, 64, 2), -2)):
        with pytest.raises(ValueError, match="active_heads"):
            pg.simulate(spec, active_heads=bad)


def test_cli_simulate_active_heads(tmp_path, capsys):
    f = tmp_path / "spec.py"
    f.write_text("import patterngen as pg\nspec = pg.Spec(pg.Causal(), 8192, num_heads=8)\n")
    code, plain, _ = _cli(["simulate", str(f), "--device", "h100"], capsys)
    assert code == 0 and "heads on" not in plain
    code, out, _ = _cli(["simulate", str(f), "--device", "h100", "--active-heads", "0.5", "--explain"], capsys)
    assert code == 0 and "heads on" in out and "50%" in out and "head routing:" in out
    code, _, err = _cli(["simulate", str(f), "--active-heads", "2"], capsys)
    assert code == 2 and "active_heads" in err
