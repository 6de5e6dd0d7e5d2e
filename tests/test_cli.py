"""The command line: spec loading, `show`, `run`, `simulate` dispatch, and the
checks behind `run` (scaled copies, row checks of plans) against the oracle."""
from __future__ import annotations

import argparse
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.analysis.tiling import default_box
from patterngen.tools import checks
from patterngen.tools.checks import check_attention, check_plan_rows
from patterngen.tools.cli import choose_tiling, main, parse_tile
from patterngen.tools.draw import EMPTY_CH, FULL_CH, MIXED_CH, PARTIAL_CH
from patterngen.tools.shrink import shrink_spec
from patterngen.tools.specfiles import SpecFileError, load_specs
from tests.strategies import routed_specs, scaled, specs


def write(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text("import patterngen as pg\n" + textwrap.dedent(body))
    return path


def framed(lines: list[str]) -> list[str]:
    """The rows inside a drawn box."""
    start = next(i for i, l in enumerate(lines) if l.startswith("┌"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    return [l[1:-1] for l in lines[start + 1:end]]


def pictures(out: str) -> tuple[list[str], list[str]]:
    """(mask rows, tile map rows) of `show`'s output."""
    lines = out.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("tile map"))
    return framed(lines[:i]), framed(lines[i:])


# -- load_specs -------------------------------------------------------------------------
def test_load_specs_names_and_dedup(tmp_path):
    path = write(tmp_path, "two.py", """
        small = pg.Spec(pg.Causal(), q_shape=32)
        spec = pg.Spec(pg.Band(4) & pg.Causal(), q_shape=32)
        specs = [spec, small, pg.Spec(pg.Full(), q_shape=8)]
    """)
    got = load_specs(path)
    assert [n for n, _ in got] == ["spec", "small", "specs[2]"]
    assert got[0][1] == pg.Spec(pg.Band(4) & pg.Causal(), q_shape=32)


def test_load_specs_errors(tmp_path):
    with pytest.raises(SpecFileError, match="not found"):
        load_specs(tmp_path / "missing.py")
    with pytest.raises(SpecFileError, match="neither `spec` nor `specs`"):
        load_specs(write(tmp_path, "none.py", "x = 1\n"))
    with pytest.raises(SpecFileError, match="must be a patterngen.Spec"):
        load_specs(write(tmp_path, "bad.py", "spec = pg.Causal()\n"))
    with pytest.raises(SpecFileError, match="list of patterngen.Spec"):
        load_specs(write(tmp_path, "bad2.py", "specs = pg.Spec(pg.Causal(), 4)\n"))
    with pytest.raises(SpecFileError, match="ValueError"):
        load_specs(write(tmp_path, "raises.py", "spec = pg.Spec(pg.Window(9), q_shape=4)\n"))


def test_parse_tile():
    assert parse_tile("64") == 64
    assert parse_tile("16,8") == (16, 8)
    assert parse_tile("16x8") == (16, 8)
    assert parse_tile("8,") == (8,)
    for bad in ("a", "0", "4,-1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="tile"):
            parse_tile(bad)


# -- show -------------------------------------------------------------------------------
def test_show_small_spec_draws_the_oracle_mask_and_the_plan(tmp_path, capsys):
    spec = pg.Spec((pg.Sink(2) | pg.Band(5)) & pg.Causal(), q_shape=40, num_heads=2)
    path = write(tmp_path, "s.py", "spec = pg.Spec((pg.Sink(2) | pg.Band(5)) & pg.Causal(), q_shape=40, num_heads=2)\n")
    assert main(["show", str(path), "--tile", "8", "--width", "100"]) == 0
    out = capsys.readouterr().out
    assert repr(spec) in out
    plan = pg.build_plan(spec, pg.Tiling(8, 8))
    c = plan.counts()
    assert f"{c['tile_pairs']} tile pairs, {c['visited']} visited ({c['full']} full, {c['partial']} partial)" in out
    assert "plan built in" in out
    mask_rows, tile_rows = pictures(out)
    # 40 x 40 fits: one character per (q, kv) pair, exactly the oracle's mask
    dense = pg.dense_mask(spec)[0]
    assert mask_rows == ["".join(FULL_CH if v else EMPTY_CH for v in row) for row in dense.tolist()]
    # 5 x 5 tiles: one character per tile pair, exactly the plan
    expect = [[EMPTY_CH] * 5 for _ in range(5)]
    for qt, kt, full in zip(*(x.tolist() for x in plan.head_plan(0).pairs())):
        expect[qt][kt] = FULL_CH if full else PARTIAL_CH
    assert tile_rows == ["".join(r) for r in expect]


def test_show_downsampled_pictures_agree_with_the_oracle(tmp_path, capsys):
    """A mask too big for the width: each char is a block of pairs, drawn exactly
    (empty/some/all visible); the tile map marks groups of tiles of mixed kinds."""
    spec = pg.Spec(pg.Band(30, 10) | pg.Global(3), q_shape=(20, 30))
    path = write(tmp_path, "s.py", "spec = pg.Spec(pg.Band(30, 10) | pg.Global(3), q_shape=(20, 30))\n")
    assert main(["show", str(path), "--tile", "16", "16", "--width", "42"]) == 0
    mask_rows, tile_rows = pictures(capsys.readouterr().out)
    dense = pg.dense_mask(spec)[0]
    rows, cols = len(mask_rows), len(mask_rows[0])
    tq, tk = -(-spec.nq // rows), -(-spec.nkv // cols)
    assert cols == 40 and rows == -(-spec.nq // tq)
    for r, line in enumerate(mask_rows):
        for c, ch in enumerate(line):
            block = dense[r * tq:(r + 1) * tq, c * tk:(c + 1) * tk]
            want = FULL_CH if block.all() else (PARTIAL_CH if block.any() else EMPTY_CH)
            assert ch == want, (r, c)
    assert set("".join(tile_rows)) <= {EMPTY_CH, PARTIAL_CH, FULL_CH, MIXED_CH}
    assert len(tile_rows[0]) <= 40


def test_show_box_tiles_and_several_specs(tmp_path, capsys):
    path = write(tmp_path, "grid.py", """
        spec = pg.Spec(pg.Window((3, 5)), q_shape=(12, 16), num_heads=2)
        other = pg.Spec(pg.Causal(), q_shape=64, num_heads=2)
        specs = [spec, other]
    """)
    assert main(["show", str(path), "--tile", "4,4", "4,4", "--width", "60", "--name", "spec"]) == 0
    out = capsys.readouterr().out
    assert "q tile 4x4 box" in out and "other" not in out
    assert main(["show", str(path), "--width", "60", "--head", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("plan built in") == 2 and "mask, head 1" in out


def test_show_routed_uses_route(tmp_path, capsys):
    path = write(tmp_path, "moba.py", "spec = pg.Spec(pg.Routed(16, 2, causal=True), q_shape=128, num_heads=2)\n")
    assert main(["show", str(path), "--width", "60"]) == 0
    out = capsys.readouterr().out
    assert "pg.route on random q, k" in out


def test_show_errors(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing.py")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["show", str(write(tmp_path, "empty.py", "x = 3\n"))]) == 2
    assert "neither `spec` nor `specs`" in capsys.readouterr().err
    path = write(tmp_path, "s.py", "spec = pg.Spec(pg.Causal(), q_shape=64, num_heads=2)\n")
    assert main(["show", str(path), "--head", "2"]) == 2
    assert "--head must be in 0..1" in capsys.readouterr().err
    assert main(["show", str(path), "--tile", "4,4"]) == 2  # a box on a 1-D grid
    captured = capsys.readouterr()
    assert "q_tile" in captured.err and captured.out == ""
    assert main(["show", str(path), "--name", "nope"]) == 2
    assert "no spec named 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["show", str(path), "--tile", "8", "8", "8"])
    assert exited.value.code == 2
    assert "--tile takes one or two tile shapes (Q [KV]), got 3" in capsys.readouterr().err


# -- run --------------------------------------------------------------------------------
def test_run_given_files_and_directories(tmp_path, capsys):
    d = tmp_path / "specs"
    d.mkdir()
    write(d, "a.py", "spec = pg.Spec((pg.Sink(4) | pg.Band(31)) & pg.Causal(), q_shape=256, num_heads=4, num_kv_heads=2)\n")
    write(d, "b.py", "spec = pg.Spec(pg.Window((5, 3)), q_shape=(12, 10))\n"
                     "specs = [spec, pg.Spec(pg.Routed(16, 2, causal=True), q_shape=96, num_heads=2)]\n")
    assert main(["run", str(d)]) == 0
    out = capsys.readouterr().out
    assert "all 3 spec(s) passed" in out
    assert out.count("plan check:") == 3 and out.count("attention check on a scaled copy") == 3
    assert "OK" in out and "FAILED" not in out
    assert main(["run", str(d / "a.py"), "--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "tokens 256 -> 64" in out and "all 1 spec(s) passed" in out


def test_run_without_examples_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 2
    assert "no ./examples directory" in capsys.readouterr().err


def test_run_reports_a_broken_backend(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "s.py", "spec = pg.Spec(pg.Band(8) & pg.Causal(), q_shape=128)\n")
    real = pg.attention
    monkeypatch.setattr(checks, "attention", lambda q, k, v, spec, **kw: real(q, k, v, spec, **kw) * 1.01)
    assert main(["run", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "1 of 1 spec(s) FAILED" in out


def test_run_reports_bad_files_and_goes_on(tmp_path, capsys):
    write(tmp_path, "a_bad.py", "x = 1\n")
    write(tmp_path, "b_good.py", "spec = pg.Spec(pg.Causal(), q_shape=64)\n")
    assert main(["run", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "a_bad.py: ERROR" in out and "b_good.py: spec" in out


# -- simulate dispatch ---------------------------------------------------------------------
def test_simulate_dispatches(tmp_path, capsys):
    path = write(tmp_path, "s.py", "spec = pg.Spec(pg.Band(63) & pg.Causal(), q_shape=1024)\n")
    assert main(["simulate", str(path)]) == 0
    report = pg.simulate(pg.Spec(pg.Band(63) & pg.Causal(), q_shape=1024))
    row = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("spec ")][-1]
    assert f"{report.flop_speedup:.2f}x" in row and f"{report.tile_speedup:.2f}x" in row


# -- helpers of run -------------------------------------------------------------------------
def test_plan_row_check_catches_a_wrong_plan():
    spec = pg.Spec(pg.Band(100) & pg.Causal(), q_shape=1024, num_heads=2)
    plan = pg.build_plan(spec)
    ok, msg = check_plan_rows(spec, plan)
    assert ok, msg
    tp = plan.groups[0]
    for qt in (0, 8, 15):  # corrupt one flag in every row the check may sample
        lo = int(tp.q_ptr[qt])
        tp.full[lo] = ~tp.full[lo]
    ok, msg = check_plan_rows(spec, plan)
    assert not ok and "MISMATCH" in msg


@settings(max_examples=scaled(25), deadline=None)
@given(spec=specs(), max_tokens=st.sampled_from([8, 24, 64]))
def test_scaled_copy_is_valid_small_and_checks(spec, max_tokens):
    small, how = shrink_spec(spec, max_tokens)
    assert isinstance(small, pg.Spec) and small.ndim == spec.ndim and small.head_dim == spec.head_dim
    assert max(small.nq, small.nkv) <= max_tokens or all(n == 1 for n in small.q_shape + small.kv_shape)
    distinct = len(set(spec.head_patterns))
    assert len(set(small.head_patterns)) <= distinct <= small.num_heads
    assert small.num_heads % small.num_kv_heads == 0
    assert small.num_heads // small.num_kv_heads == spec.num_heads // spec.num_kv_heads
    ok, msg = check_attention(small)
    assert ok, msg


@settings(max_examples=scaled(10), deadline=None)
@given(case=routed_specs())
def test_scaled_copy_of_routed_specs(case):
    spec, _ = case
    small, _ = shrink_spec(spec, 16)
    assert small.routed is not None and small.routed.topk <= -(-small.nkv // small.routed.block)
    ok, msg = check_attention(small)
    assert ok, msg


def test_scaled_copy_keeps_the_pattern_in_proportion():
    mistral = pg.Spec(pg.Band(4095) & pg.Causal(), q_shape=32768, num_heads=32, num_kv_heads=8, head_dim=128)
    small, _ = shrink_spec(mistral)
    assert small == pg.Spec(pg.Band(255) & pg.Causal(), q_shape=2048, num_heads=4, num_kv_heads=1, head_dim=128)
    flux = pg.Spec(pg.Window((80, 80), stride=(16, 16)), q_shape=(256, 256), num_heads=24, head_dim=128)
    small, _ = shrink_spec(flux)
    assert small == pg.Spec(pg.Window((10, 10), stride=(2, 2)), q_shape=(32, 32), head_dim=128)
    duo = pg.Spec(pg.Heads({range(0, 2): pg.Causal(), range(2, 8): (pg.Sink(4) | pg.Band(63)) & pg.Causal()}),
                  q_shape=4096, num_heads=8, num_kv_heads=4)
    small, _ = shrink_spec(duo, 1024)
    assert small.head_patterns == (pg.Causal(), pg.Causal(), (pg.Sink(4) | pg.Band(15)) & pg.Causal(),
                                   (pg.Sink(4) | pg.Band(15)) & pg.Causal())
    assert small.nq == 1024 and small.num_kv_heads == 2


def test_default_box_tiles():
    assert default_box((256, 256)) == (8, 8)
    assert default_box((30, 48, 80)) == (1, 8, 8)
    assert default_box((3, 5)) == (4, 8)  # power-of-two sides, padded past the extent
    spec = pg.Spec(pg.Window(3), q_shape=(6, 6))
    assert choose_tiling(spec, None) == pg.Tiling((8, 8), (8, 8))  # the one policy: kernel-runnable boxes
    assert choose_tiling(spec, [(2, 3)]) == pg.Tiling((2, 3), (2, 3))


def test_plan_command_times_builds(tmp_path, capsys):
    f = tmp_path / "s.py"
    f.write_text("import patterngen as pg\nspec = pg.Spec(pg.Window((5, 5)), (16, 16))\n")
    assert main(["plan", str(f), "--repeat", "2", "--tile", "4,4"]) == 0
    out = capsys.readouterr().out
    assert "plan built in" in out and "median of 2" in out and "4x4 box" in out
