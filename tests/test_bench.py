"""`patterngen bench`: the suite has the real models' sizes, and the CPU smoke path runs end to end.
No timing is asserted: on this machine the numbers mean nothing."""
import json
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import given, settings

import patterngen as pg
from patterngen.analysis.tiling import default_tiling, kernel_tile_ok
from patterngen.sim import ranked_kernel_tilings
from patterngen.tools.bench.measure import device_model_name
from patterngen.tools.bench.runners import Options, dense_mask_on, fastest_kernel, tile_json, tilings_to_try
from patterngen.tools.bench.suite import moh_routing, suite
from patterngen.tools.bench.timing import SMOKE_NOTE
from patterngen.tools.cli import main
from tests.strategies import routed_specs, scaled, specs

pytest.importorskip("triton")
pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")]

NAMES = ["causal-sliding-window", "sinks-window", "neighborhood-2d", "swin-shifted", "gna-3d", "gna-3d-strided",
         "s2-shards", "routed-topk", "dense-causal", "moh-causal-50", "moh-causal-75", "moh-neighborhood-2d-50",
         "moh-neighborhood-2d-75"]


def by_name(scale):
    return {c.name: c for c in suite(scale)}


def test_full_suite_matches_issue():
    """bf16, head dim 128, batch 1, and these sizes, windows and heads."""
    cases = by_name("full")
    assert list(cases) == NAMES
    assert all(c.spec.head_dim == 128 for c in cases.values())

    swa = cases["causal-sliding-window"].spec
    assert (swa.q_shape, swa.num_heads) == ((32768,), 32)
    mask = pg.dense_mask(pg.Spec(swa.pattern, 8192))  # 4096 keys per query once the window is full
    assert int(mask[0, -1].sum()) == 4096 and not mask[0].triu(1).any()

    sinks = cases["sinks-window"].spec
    assert sinks.q_shape == (32768,)
    m = pg.dense_mask(pg.Spec(sinks.pattern, 4096))[0]
    assert int(m[-1].sum()) == 4 + 1024 and m[-1, :4].all() and not m.triu(1).any()

    na = cases["neighborhood-2d"].spec
    assert (na.q_shape, na.pattern, na.num_heads) == ((128, 128), pg.Window((31, 31)), 24)

    gna, strided = cases["gna-3d"].spec, cases["gna-3d-strided"].spec
    for s in (gna, strided):
        assert (s.q_shape, s.num_heads) == ((30, 48, 80), 24)
    assert gna.pattern == pg.Window((18, 24, 24))
    assert strided.pattern == pg.Window((18, 24, 24), stride=(16, 8, 8))
    assert cases["gna-3d-strided"].block_sparse_target

    s2 = cases["s2-shards"].spec
    assert (s2.q_shape, s2.num_heads) == ((32768,), 32) and len(set(s2.head_patterns)) > 1  # per-head shards

    routed = cases["routed-topk"].spec
    assert routed.q_shape == (32768,) and (routed.routed.block, routed.routed.topk) == (128, 16)

    dense = cases["dense-causal"].spec
    assert (dense.q_shape, dense.pattern) == ((8192,), pg.Causal())

    # MoH at 50% and 75% of 32 heads, on 32K causal and the 2-D neighbourhood
    for f in (50, 75):
        causal, na2 = cases[f"moh-causal-{f}"], cases[f"moh-neighborhood-2d-{f}"]
        assert (causal.spec.q_shape, causal.spec.pattern, causal.spec.num_heads) == ((32768,), pg.Causal(), 32)
        assert (na2.spec.q_shape, na2.spec.pattern, na2.spec.num_heads) == ((128, 128), pg.Window((31, 31)), 32)
        assert causal.active_heads == na2.active_heads == f / 100


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_moh_routing_uses_the_fraction_of_heads(fraction):
    spec = by_name("full")["moh-causal-50"].spec
    idx = moh_routing(pg.Spec(spec.pattern, 64, num_heads=32), fraction, torch.Generator().manual_seed(0))
    chosen = pg.gate_heads(idx, torch.ones(idx.shape), 32) > 0
    assert chosen.float().mean().item() == fraction
    assert chosen[:, :4].all()  # the shared heads


@pytest.mark.parametrize("scale", ["quick", "smoke"])
def test_smaller_suites_have_the_same_cases(scale):
    full, small = by_name("full"), by_name(scale)
    assert list(small) == NAMES
    for name, case in small.items():
        assert case.spec.nq < full[name].spec.nq
        assert type(case.spec.pattern) is type(full[name].spec.pattern)
        assert case.causal == full[name].causal


def test_causal_flag_is_true_exactly_for_causal_patterns():
    """SDPA is_causal=True is only a fair floor when the pattern never looks ahead."""
    for case in suite("smoke"):
        spec = case.spec
        idx = None
        if spec.routed is not None:
            q = torch.randn(1, spec.num_heads, spec.nq, 8)
            idx = pg.route(q, q, spec.routed.block, spec.routed.topk, causal=True)
        mask = pg.dense_mask(spec, idx)
        mask = mask[0] if mask.dim() == 4 else mask
        assert case.causal == (not mask.triu(1).any()), case.name


@settings(max_examples=scaled(15))
@given(specs())
def test_chunked_dense_mask_is_the_oracle(spec):
    got = dense_mask_on(spec, torch.device("cpu"), max_chunk=50)
    want = pg.dense_mask(spec)
    assert torch.equal(got.expand_as(want), want)


@settings(max_examples=scaled(8))
@given(routed_specs())
def test_chunked_dense_mask_is_the_oracle_routed(spec_and_indices):
    spec, idx = spec_and_indices
    want = pg.dense_mask(spec, idx)
    want = want[0] if want.dim() == 4 else want
    assert torch.equal(dense_mask_on(spec, torch.device("cpu"), idx, max_chunk=50), want)


def test_bench_tries_the_tiling_policy():
    """The simulator's kernel-runnable ranking, then the policy's default; only the default with --tiles default."""
    for case in suite("smoke"):
        spec = case.spec
        ranked = ranked_kernel_tilings(spec, device=None)
        tried = tilings_to_try(spec, Options(torch.device("cpu"), torch.float32, None, tiles="sim"), ranked)
        assert tried[:len(ranked)] == ranked and tried[-1] == default_tiling(spec), case.name
        assert all(kernel_tile_ok(t.q_tile) and kernel_tile_ok(t.kv_tile) for t in tried), case.name
        only = tilings_to_try(spec, Options(torch.device("cpu"), torch.float32, None, tiles="default"), ranked)
        assert only == [default_tiling(spec)], case.name


def test_bench_times_each_launch_config_once():
    """On the first tiling that builds: the backend's default launch configuration, then the
    sweep's others, none built twice; the fastest is kept."""
    from patterngen.backends.triton import KernelConfig
    built = []

    class Kernel:
        def __init__(self, tiling, config):
            if tiling.q_tile == 128:
                raise ValueError("not this tiling")
            self.config = config or KernelConfig(8, 2)
            built.append(self.config)

    times = iter([3.0, 1.0, 2.0, 4.0])
    opts = Options(torch.device("cpu"), torch.float32, lambda fn: {"ms": next(times)})
    spec = pg.Spec(pg.Causal(), 256)
    best, kern = fastest_kernel(spec, opts, [pg.Tiling(128, 128)], Kernel, lambda k: None)
    assert built == [KernelConfig(8, 2), KernelConfig(4, 2), KernelConfig(4, 3), KernelConfig(8, 3)]
    assert kern.config == KernelConfig(4, 2) and best["ms"] == 1.0 and best["tiling_from"] == "default"
    assert best["q_tile"] == default_tiling(spec).q_tile and "128/128" in best["failures"][0]


def test_device_model_names():
    assert device_model_name("NVIDIA H100 80GB HBM3") == "h100"
    assert device_model_name("NVIDIA H200") == "h200"
    assert device_model_name("Tesla T4") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_gpu_says_so(capsys):
    assert main(["bench"]) == 1
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "no timing" in out


def test_cpu_smoke_runs(tmp_path, capsys):
    """Two small cases end to end: a table with finite numbers, patterngen matching FlexAttention."""
    out = tmp_path / "smoke"
    rc = main(["bench", "--quick", "--cpu-smoke", "--case", "sinks-window", "--case", "gna-3d-strided",
                     "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert SMOKE_NOTE in text
    assert "sinks-window" in text and "gna-3d-strided" in text
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").read_text().count(SMOKE_NOTE) >= 1
    assert doc["note"] == SMOKE_NOTE and doc["environment"]["torch"] == torch.__version__
    assert [c["case"] for c in doc["cases"]] == ["sinks-window", "gna-3d-strided"]
    specs_by_name = {c.name: c.spec for c in suite("smoke")}
    for c in doc["cases"]:
        assert c["status"] == "ok"
        best = ranked_kernel_tilings(specs_by_name[c["case"]], device=None)[0]  # the policy's first choice ran
        assert (c["patterngen"]["q_tile"], c["patterngen"]["kv_tile"]) == (tile_json(best.q_tile), tile_json(best.kv_tile))
        assert c["patterngen"]["tiling_from"] == "simulator"
        for key in ("patterngen_ms", "flex_ms", "sdpa_ms", "speedup_vs_flex", "speedup_vs_sdpa"):
            assert c[key] is not None and math.isfinite(c[key]) and c[key] > 0, (c["case"], key)
        assert c["err_vs_flex"] < 2e-6 and c["err_vs_sdpa_mask"] < 2e-6  # about 5e-7 is seen in fp32
        assert c["flex"]["block_mask_s"] >= 0
        if c["simulator"] is not None:
            assert c["simulator"]["tile_speedup"] >= 1
    # the records calibrate.py reads: patterngen kernels and the dense baselines
    kinds = [r.get("kind") for r in doc["results"]]
    assert kinds.count("dense") == 2 and len(kinds) == 4
    assert all(r["time_ms"] > 0 for r in doc["results"])


def test_lengths_mask_is_the_pattern():
    """The hand-written mask_mod that FlexAttention and SDPA get in `bench --lengths` is the
    spec's own mask, queries aligned bottom-right to the keys, at any lengths in any order."""
    from patterngen.tools.bench.lengths import FlexMask, pattern
    flex_mask = FlexMask(6, torch.device("cpu"))
    spec = pg.Spec(pattern(6), num_heads=2, num_kv_heads=1, head_dim=8)
    for nq, nkv in [(20, 20), (3, 20), (1, 17), (5, 5), (9, 30)]:
        assert torch.equal(flex_mask.dense(nq, nkv), pg.dense_mask(spec.bind(nq, nkv))[0]), (nq, nkv)


def test_lengths_smoke(tmp_path, capsys):
    """`bench --lengths` end to end at a tiny size: both tables, the counts of generated sources
    and the cache entries against their sizes, patterngen agreeing with eager FlexAttention and
    masked SDPA; the private kernel cache is undone afterwards. No timing is asserted."""
    cache_before = os.environ.get("PATTERNGEN_CACHE")
    rc = main(["bench", "--lengths", "--quick", "--tokens", "8", "--out", str(tmp_path / "lengths")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert os.environ.get("PATTERNGEN_CACHE") == cache_before
    assert "ms/token" in text and "pg 1st ms" in text and "kernel sources generated" in text and "caches:" in text
    doc = json.loads((tmp_path / "lengths.json").read_text())
    assert "# patterngen bench --lengths" in (tmp_path / "lengths.md").read_text()
    assert doc["environment"]["torch"] == torch.__version__ and doc["note"]

    dec = doc["decode"]
    for impl in ("patterngen", "sdpa"):
        r = dec["impl"][impl]
        assert r["steps"] == 8 and math.isfinite(r["ms_per_token"]) and r["ms_per_token"] > 0
    assert dec["ratio"] > 0 and isinstance(dec["sources_generated"], int) and dec["sources_generated"] >= 0
    for caches in (dec["caches"], doc["lengths"]["caches"]):
        assert {"kernels", "specs", "bound_specs", "plans"} <= set(caches)
        for c in caches.values():
            assert isinstance(c["entries"], int) and (c["limit"] is None or 0 <= c["entries"] <= c["limit"])

    lens = doc["lengths"]
    assert [(r["nq"], r["nkv"]) for r in lens["rows"]] == [tuple(x) for x in doc["setup"]["lengths"]]
    assert isinstance(lens["sources_generated"], int) and isinstance(lens["sources_at_later_lengths"], int)
    for r in lens["rows"]:
        assert not any(k.endswith("_error") for k in r), r
        assert r["variant"] == ("decode" if r["nq"] <= pg.dispatch.DECODE_ROWS else "prefill")
        assert isinstance(r["sources_generated"], int)
        for key in ("pg_first_ms", "pg_ms", "flex_mask_ms", "flex_ms", "sdpa_mask_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert r["err_vs_flex"] < 2e-6 and r["err_vs_sdpa_mask"] < 2e-6


def test_serving_bench_sections_run_small():
    """`patterngen bench --serving`'s two sections at toy sizes: the document lengths sum to
    the tokens, every row is timed, and the bounded cache holds fewer keys and decodes the
    unbounded cache's tokens."""
    pytest.importorskip("transformers")
    from patterngen.tools.bench.serving import _doc_lengths, bench_decode, bench_packed, markdown
    lengths = _doc_lengths(5, 100, 0)
    assert sum(lengths) == 100 and len(lengths) == 5 and min(lengths) > 0
    cpu = torch.device("cpu")
    packed = bench_packed(cpu, torch.float32, 96, 4, 2, 16, 1, 0)
    assert [r["impl"] for r in packed["rows"]] == ["patterngen packed (cu_seqlens)", "patterngen padded to the longest",
                                                   "SDPA causal, padded"]
    assert all(r["seconds"] > 0 for r in packed["rows"]) and packed["pairs_padded"] >= packed["pairs_packed"]
    decode = bench_decode(cpu, torch.float32, 48, 3, 8, 0)
    unbounded, bounded = decode["caches"].values()
    assert decode["same_tokens"] and bounded["kv_bytes"] < unbounded["kv_bytes"]
    assert "Packed training" in markdown({"environment": {}, "packed": packed, "decode": decode})
