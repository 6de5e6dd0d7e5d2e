"""The pattern language: validation with helpful messages, hashing, printing as
Python that rebuilds the node, and head-wise shards."""
from __future__ import annotations

import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import grids, patterns, routed_specs, scaled, specs

NAMESPACE: dict = {}
exec("from patterngen import *", NAMESPACE)


def raises(exc, *fragments):
    """pytest.raises that also wants every fragment (literal text) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# -- primitives ----------------------------------------------------------------------
@pytest.mark.parametrize("build, exc, fragments", [
    (lambda: pg.Window(-1), ValueError, ["size", "-1"]),
    (lambda: pg.Window(0), ValueError, ["size", "0"]),
    (lambda: pg.Window((3, -2)), ValueError, ["size[1]", "-2"]),
    (lambda: pg.Window(3, stride=0), ValueError, ["stride", "0"]),
    (lambda: pg.Window(3, dilation=0), ValueError, ["dilation", "0"]),
    (lambda: pg.Window(3, stride=4), ValueError, ["stride", "4", "size 3"]),
    (lambda: pg.Window((3, 5), stride=(1, 6)), ValueError, ["dimension 1", "stride 6"]),
    (lambda: pg.Window((3, 3), stride=(1, 1, 1)), ValueError, ["size=(3, 3)", "stride=(1, 1, 1)"]),
    (lambda: pg.Window(3, causal=(True, False), dilation=(1, 1, 2)), ValueError, ["causal", "dilation"]),
    (lambda: pg.Window(()), ValueError, ["size"]),
    (lambda: pg.Window(3.0), TypeError, ["size", "3.0"]),
    (lambda: pg.Window(True), TypeError, ["size", "True"]),
    (lambda: pg.Window(3, causal=1), TypeError, ["causal", "1"]),
    (lambda: pg.Band(-1), ValueError, ["left", "-1"]),
    (lambda: pg.Band(2, -3), ValueError, ["right", "-3"]),
    (lambda: pg.Sink(0), ValueError, ["Sink", "n", "0"]),
    (lambda: pg.Global(-4), ValueError, ["Global", "n", "-4"]),
    (lambda: pg.Strided(0), ValueError, ["stride", "0"]),
    (lambda: pg.Strided(3, 3), ValueError, ["offset", "3", "0..2"]),
    (lambda: pg.Strided(3, -1), ValueError, ["offset", "-1"]),
    (lambda: pg.Routed(0, 1), ValueError, ["block", "0"]),
    (lambda: pg.Routed(4, 0), ValueError, ["topk", "0"]),
    (lambda: pg.Routed(4, 1, causal="yes"), TypeError, ["causal", "yes"]),
])
def test_primitive_validation(build, exc, fragments):
    with raises(exc, *fragments):
        build()


@pytest.mark.parametrize("other", [3, "Causal()", None, torch.ones(2)])
def test_combining_with_a_non_pattern(other):
    with raises(TypeError, "|"):
        pg.Causal() | other
    with raises(TypeError, "&"):
        pg.Window(3) & other
    with pytest.raises(TypeError):
        other | pg.Causal()
    with pytest.raises(TypeError):
        other & pg.Causal()


def test_heads_construction_validation():
    with raises(TypeError, "Heads", "list"):
        pg.Heads(pg.Causal())
    with raises(ValueError, "Heads", "at least one"):
        pg.Heads([])
    with raises(TypeError, "head 1", "pattern"):
        pg.Heads([pg.Causal(), "causal"])
    with raises(TypeError, "head keys", "'0'"):
        pg.Heads({"0": pg.Causal()})
    with raises(ValueError, "head index", "-1"):
        pg.Heads({-1: pg.Causal()})


# -- specs -----------------------------------------------------------------------------
@pytest.mark.parametrize("build, exc, fragments", [
    (lambda: pg.Spec(pg.Causal(), -1), ValueError, ["q_shape", ">= 0", "-1"]),
    (lambda: pg.Spec(pg.Causal(), (4, -2)), ValueError, ["q_shape[1]", "-2"]),
    (lambda: pg.Spec(pg.Causal(), 4, kv_shape=(-3,)), ValueError, ["kv_shape", "-3"]),
    (lambda: pg.Spec(pg.Causal(), ()), TypeError, ["q_shape"]),
    (lambda: pg.Spec(pg.Causal(), 4.0), TypeError, ["q_shape", "4.0"]),
    (lambda: pg.Spec(pg.Causal(), True), TypeError, ["q_shape", "True"]),
    (lambda: pg.Spec("causal", 4), TypeError, ["pattern", "causal"]),
    (lambda: pg.Spec(pg.Causal(), 4, num_heads=-1), ValueError, ["num_heads", ">= 0", "-1"]),
    (lambda: pg.Spec(pg.Causal(), 4, num_heads=2, num_kv_heads=0), ValueError, ["num_kv_heads", ">= 1", "2"]),
    (lambda: pg.Spec(pg.Window(3), (4, 0)), ValueError, ["non-empty grid", "dimension 1"]),
    (lambda: pg.Spec(pg.Causal(), 4, num_heads=4, num_kv_heads=3), ValueError, ["num_heads (4)", "num_kv_heads (3)"]),
    (lambda: pg.Spec(pg.Causal(), 4, num_heads=2, num_kv_heads=4), ValueError, ["num_heads (2)", "num_kv_heads (4)"]),
    (lambda: pg.Spec(pg.Causal(), 4, head_dim=0), ValueError, ["head_dim", "0"]),
    # windows against the grid
    (lambda: pg.Spec(pg.Window(5), 4), ValueError, ["size 5", "extent 4"]),
    (lambda: pg.Spec(pg.Window((3, 9)), (5, 8)), ValueError, ["dimension 1", "size 9", "extent 8"]),
    (lambda: pg.Spec(pg.Window(3, dilation=2), 5), ValueError, ["3 * 2 = 6", "extent 5"]),
    (lambda: pg.Spec(pg.Window((2, 2), dilation=(1, 3)), (4, 5)), ValueError, ["dimension 1", "2 * 3"]),
    (lambda: pg.Spec(pg.Window(1), 4), ValueError, ["size", ">= 2", "extent 4", "got 1"]),
    (lambda: pg.Spec(pg.Window((3, 3)), (5, 5, 5)), ValueError, ["2 dimension", "(5, 5, 5)"]),
    (lambda: pg.Spec(pg.Window(3, causal=(True, False, True)), (5, 5)), ValueError, ["3 dimension", "(5, 5)"]),
    (lambda: pg.Spec(pg.Window(3), 8, kv_shape=9), ValueError, ["Window", "q_shape=(8,)", "kv_shape=(9,)"]),
    (lambda: pg.Spec(pg.Causal() | pg.Window(3), (4, 4), kv_shape=(4, 5)), ValueError, ["Window", "kv_shape=(4, 5)"]),
    # token counts
    # routed
    (lambda: pg.Spec(pg.Routed(4, 5), 16), ValueError, ["topk 5", "4 key blocks"]),
    (lambda: pg.Spec(pg.Routed(4, 3), 16, kv_shape=5), ValueError, ["topk 3", "2 key blocks"]),
    (lambda: pg.Spec(pg.Routed(4, 2) | pg.Routed(8, 2), 32), ValueError, ["Routed", "(4, 2)", "(8, 2)"]),
    (lambda: pg.Spec(pg.Heads([pg.Routed(4, 2), pg.Routed(4, 1, causal=True)]), 32, num_heads=2),
     ValueError, ["(4, 1)", "(4, 2)"]),
])
def test_spec_validation(build, exc, fragments):
    with raises(exc, *fragments):
        build()


def test_window_edge_cases_that_are_valid():
    pg.Spec(pg.Window(1), 1)                       # w == L == 1
    pg.Spec(pg.Window((1, 3)), (1, 5))
    pg.Spec(pg.Window(4, dilation=2), 8)           # w * d == L
    pg.Spec(pg.Window((6, 2), stride=(6, 2)), (6, 9))
    pg.Spec(pg.Window(3), (5, 7))                  # a scalar broadcasts to every dimension
    pg.Spec(pg.Routed(4, 4), 16)                   # topk == key blocks
    pg.Spec(pg.Routed(4, 2) | pg.Routed(4, 2, causal=True), 16)  # same (block, topk)
    pg.Spec(pg.Sink(8) | pg.Global(8), 3, kv_shape=8)


@pytest.mark.parametrize("heads, num_heads, fragments", [
    ({range(0, 3): pg.Causal(), range(2, 4): pg.Full()}, 4, ["head 2", "twice"]),
    ({0: pg.Causal(), range(0, 2): pg.Full()}, 2, ["head 0", "twice"]),
    ({range(0, 2): pg.Causal()}, 4, ["[2, 3]", "not covered", "num_heads is 4"]),
    ([pg.Causal(), pg.Full()], 3, ["[2]", "not covered"]),
    ({range(0, 4): pg.Causal(), 4: pg.Full()}, 4, ["head 4", "num_heads is 4"]),
    ([pg.Causal(), pg.Full(), pg.Band(1)], 2, ["head 2", "num_heads is 2"]),
    ({range(0, 6, 2): pg.Causal(), range(1, 5, 2): pg.Full()}, 4, ["head 4", "0..3"]),
])
def test_heads_cover_every_head_exactly_once(heads, num_heads, fragments):
    with raises(ValueError, "Heads", *fragments):
        pg.Spec(pg.Heads(heads), 8, num_heads=num_heads)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="slice objects are dict keys only from Python 3.12")
def test_heads_slice_keys():
    spec = pg.Spec(pg.Heads({slice(None, 2): pg.Causal(), slice(2, None): pg.Band(1)}), 8, num_heads=4)
    assert spec.head_patterns == (pg.Causal(), pg.Causal(), pg.Band(1), pg.Band(1))
    assert eval(repr(spec), dict(NAMESPACE)) == spec
    with raises(ValueError, "head 1", "twice"):
        pg.Spec(pg.Heads({slice(0, 2): pg.Causal(), slice(1, None, 2): pg.Full()}), 8, num_heads=4)


# -- tilings -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, tiling, exc, fragments", [
    (pg.Spec(pg.Causal(), (4, 4)), pg.Tiling((2, 2, 2), (2, 2)), ValueError, ["q_tile", "(2, 2, 2)", "3 dimension"]),
    (pg.Spec(pg.Causal(), (4, 4)), pg.Tiling((2, 2), (4,)), ValueError, ["kv_tile", "(4,)", "1 dimension"]),
    (pg.Spec(pg.Causal(), 16), pg.Tiling((2, 2), 4), ValueError, ["q_tile", "(2, 2)"]),
    (pg.Spec(pg.Causal(), 16), pg.Tiling(0, 4), ValueError, ["q_tile", "0"]),
    (pg.Spec(pg.Causal(), 16), pg.Tiling(4, -1), ValueError, ["kv_tile", "-1"]),
    (pg.Spec(pg.Causal(), (4, 4)), pg.Tiling((2, 0), (2, 2)), ValueError, ["q_tile", "(2, 0)"]),
    (pg.Spec(pg.Causal(), 16), pg.Tiling(4.0, 4), TypeError, ["q_tile", "4.0"]),
    (pg.Spec(pg.Causal(), 16), pg.Tiling(True, 4), TypeError, ["q_tile", "True"]),
    (pg.Spec(pg.Causal(), 16), pg.Tiling(4, "8"), TypeError, ["kv_tile", "'8'"]),
])
def test_bad_tilings(spec, tiling, exc, fragments):
    with raises(exc, *fragments):
        pg.build_plan(spec, tiling)


def test_mixed_flat_and_box_tiles_are_exact():
    """A flat q tiling with box kv tiles (or the reverse) takes the generic exact path."""
    for spec in (pg.Spec(pg.Causal() | pg.Band(1, 2), (4, 5)), pg.Spec(pg.Window((3, 3), stride=(2, 1)), (5, 6))):
        for tiling in (pg.Tiling(4, (2, 2)), pg.Tiling((2, 2), 8)):
            plan = pg.build_plan(spec, tiling)
            mask = pg.dense_mask(spec)[0]
            qt, kt, full = plan.head_plan(0).pairs()
            qtok, ktok = plan.q_grid.tokens(qt), plan.kv_grid.tokens(kt)
            seen = set(zip(qt.tolist(), kt.tolist()))
            for a in range(plan.q_grid.count):
                for b in range(plan.kv_grid.count):
                    qs = plan.q_grid.tokens(torch.tensor([a]))[0]
                    ks = plan.kv_grid.tokens(torch.tensor([b]))[0]
                    sub = mask[qs[qs >= 0]][:, ks[ks >= 0]]
                    assert ((a, b) in seen) == bool(sub.any())
            for i in range(len(qt)):
                sub = mask[qtok[i][qtok[i] >= 0]][:, ktok[i][ktok[i] >= 0]]
                assert bool(full[i]) == bool(sub.all())


def test_sinks_longer_than_the_sequence():
    """A sequence model's prompt may be shorter than its sink: Sink(n) then keeps every key."""
    spec = pg.Spec((pg.Sink(4) | pg.Band(7)) & pg.Causal(), 3)
    assert torch.equal(pg.dense_mask(spec)[0], torch.ones(3, 3, dtype=torch.bool).tril())
    assert pg.build_plan(spec, pg.Tiling(2, 2)).counts()["visited"] == 3


def test_build_plan_argument_types():
    with raises(TypeError, "spec"):
        pg.build_plan(pg.Causal())
    with raises(TypeError, "tiling"):
        pg.build_plan(pg.Spec(pg.Causal(), 8), (4, 4))


def test_box_tiles_with_routed():
    spec = pg.Spec(pg.Routed(4, 2) | pg.Band(2), (4, 6))
    idx = torch.zeros(1, 6, 2, dtype=torch.long)
    with raises(ValueError, "Routed(4, 2)", "flat", "(2, 3)"):
        pg.build_plan(spec, pg.Tiling((2, 3), (2, 3)), idx)
    pg.build_plan(spec, pg.Tiling(6, 6), idx)  # flat tiles are fine


def test_missing_or_unexpected_block_indices():
    with raises(ValueError, "block_indices", "Routed(4, 2)"):
        pg.build_plan(pg.Spec(pg.Routed(4, 2), 16))
    with raises(ValueError, "block_indices", "no Routed"):
        pg.build_plan(pg.Spec(pg.Causal(), 16), block_indices=torch.zeros(1, 4, 2, dtype=torch.long))


# -- hashing, equality and printing --------------------------------------------------------
def test_equal_nodes_hash_equal():
    pairs = [
        (pg.Window(3), pg.Window(3, 1, 1, False)),
        (pg.Window([3, 5], stride=[1, 2]), pg.Window((3, 5), stride=(1, 2))),
        (pg.Band(4), pg.Band(4, 0)),
        (pg.Strided(4), pg.Strided(4, 0)),
        (pg.Causal() | pg.Sink(4), pg.Causal() | pg.Sink(4)),
        ((pg.Causal() | pg.Sink(4)) | pg.Band(2), pg.Causal() | (pg.Sink(4) | pg.Band(2))),  # flattened
        (pg.Causal() | pg.Causal(), pg.Causal()),                                            # deduplicated
        (pg.Heads([pg.Causal(), pg.Full()]), pg.Heads([pg.Causal(), pg.Full()])),
        (pg.Heads({range(0, 2): pg.Causal(), 2: pg.Full()}), pg.Heads({range(0, 2): pg.Causal(), 2: pg.Full()})),
        (pg.Spec(pg.Causal(), 8), pg.Spec(pg.Causal(), (8,), (8,), 1, 1, 64)),
    ]
    for a, b in pairs:
        assert a == b and hash(a) == hash(b), (a, b)
    assert len({a for a, _ in pairs} | {b for _, b in pairs}) == len(pairs)
    assert pg.Window(3) != pg.Window(3, causal=True)
    assert pg.Causal() | pg.Sink(4) != pg.Causal() & pg.Sink(4)
    assert pg.Spec(pg.Causal(), 8) != pg.Spec(pg.Causal(), 8, num_heads=2)


def test_nodes_are_immutable():
    w = pg.Window(3)
    with pytest.raises(AttributeError):
        w.size = 5
    with pytest.raises(AttributeError):
        pg.Spec(w, 8).num_heads = 2


@settings(max_examples=scaled(200))
@given(specs())
def test_repr_round_trips(spec):
    ns = dict(NAMESPACE)
    assert eval(repr(spec), ns) == spec
    assert hash(eval(repr(spec), ns)) == hash(spec)
    assert eval(repr(spec.pattern), ns) == spec.pattern
    for p in spec.head_patterns:
        assert eval(repr(p), ns) == p and hash(eval(repr(p), ns)) == hash(p)


@settings(max_examples=scaled(60))
@given(routed_specs())
def test_repr_round_trips_routed(case):
    spec, _ = case
    assert eval(repr(spec), dict(NAMESPACE)) == spec


@settings(max_examples=scaled(100))
@given(st.data())
def test_patterns_hash_and_compare_structurally(data):
    q_shape, kv_shape, same = data.draw(grids())
    a = data.draw(patterns(q_shape, kv_shape, same))
    b = eval(repr(a), dict(NAMESPACE))
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1


# -- heads -------------------------------------------------------------------------------------
def test_heads_distribute_over_composition():
    a, b, c = pg.Causal(), pg.Band(3, 1), pg.Sink(2)
    spec = pg.Spec(pg.Heads([a, b]) & c, 16, num_heads=2)
    assert spec.head_patterns == (a & c, b & c)
    spec = pg.Spec(c | pg.Heads({0: a, 1: b}), 16, num_heads=2)
    assert spec.head_patterns == (c | a, c | b)
    mask = pg.dense_mask(pg.Spec(pg.Heads([a, b]) & c, 16, num_heads=2))
    assert torch.equal(mask[0], pg.dense_mask(pg.Spec(a & c, 16))[0])
    assert torch.equal(mask[1], pg.dense_mask(pg.Spec(b & c, 16))[0])


def test_nested_heads():
    inner = pg.Heads({range(0, 4, 2): pg.Causal(), range(1, 4, 2): pg.Band(2)})
    spec = pg.Spec(pg.Heads({range(0, 2): inner, range(2, 4): pg.Full()}), 16, num_heads=4)
    assert spec.head_patterns == (pg.Causal(), pg.Band(2), pg.Full(), pg.Full())


@settings(max_examples=scaled(100))
@given(specs(), st.data())
def test_heads_and_pattern_distribute(spec, data):
    """(Heads & x) per head is (pattern of that head) & x, and the same for |."""
    other = pg.Sink(1) if data.draw(st.booleans()) else pg.Strided(2)
    for op in ("&", "|"):
        combined = (spec.pattern & other) if op == "&" else (spec.pattern | other)
        s2 = pg.Spec(combined, spec.q_shape, spec.kv_shape, num_heads=spec.num_heads,
                     num_kv_heads=spec.num_kv_heads)
        for h, p in enumerate(spec.head_patterns):
            assert s2.head_patterns[h] == ((p & other) if op == "&" else (p | other))


def test_spec_geometry():
    spec = pg.Spec(pg.Causal(), (3, 5), kv_shape=(2, 7), num_heads=4, num_kv_heads=2)
    assert (spec.nq, spec.nkv, spec.ndim) == (15, 14, 2)
    assert spec.q_shape == (3, 5) and spec.kv_shape == (2, 7)
    assert pg.Spec(pg.Causal(), 6).kv_shape == (6,) and pg.Spec(pg.Causal(), [2, 3]).q_shape == (2, 3)
    assert spec.routed is None
    assert pg.Spec(pg.Heads([pg.Causal(), pg.Routed(2, 1)]), 8, num_heads=2).routed == pg.Routed(2, 1)


# -- head keys and per-head patterns ---------------------------------------------------------------
HEAD_PATTERNS = (pg.Causal(), pg.Band(2), pg.Full(), pg.Sink(1) | pg.Band(1, 1), pg.Strided(2) & pg.Causal())


@st.composite
def head_pairs(draw):
    """(num_heads, [(key, pattern)], per-head patterns): keys int, range or slice (open ends,
    steps, negative steps) covering every head exactly once."""
    n = draw(st.integers(1, 9))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    pairs, per_head = [], [None] * n
    for a, b in zip([0] + cuts, cuts + [n]):
        groups = [range(a, b)]
        if b - a >= 2 and draw(st.booleans()):  # two interleaved progressions
            groups = [range(a, b, 2), range(a + 1, b, 2)]
        for g in groups:
            pat = draw(st.sampled_from(HEAD_PATTERNS))
            form = draw(st.sampled_from(["int", "range", "slice", "open", "reversed"]))
            if len(g) == 1 and form == "int":
                key = g[0]
            elif form in ("int", "range"):
                key = g
            elif form == "slice":
                key = slice(g.start, g.stop, g.step if g.step > 1 else None)
            elif form == "open":
                key = slice(None if g.start == 0 else g.start, None if g.stop >= n else g.stop,
                            g.step if g.step > 1 else None)
            else:  # the same heads, walked backwards
                key = slice(g[-1], g.start - 1 if g.start > 0 else None, -g.step)
            pairs.append((key, pat))
            for h in g:
                per_head[h] = pat
    order = draw(st.permutations(range(len(pairs))))
    return n, [pairs[i] for i in order], per_head


@settings(max_examples=scaled(200))
@given(head_pairs(), st.booleans())
def test_heads_key_forms_agree(case, compose):
    """(key, pattern) pairs with int, range or slice keys, on every Python, give each head
    the pattern of the one-pattern-per-head list; the repr rebuilds an equal node."""
    n, pairs, per_head = case
    node = pg.Heads(pairs)
    spec = pg.Spec(node & pg.Sink(2) if compose else node, 12, num_heads=n)
    want = tuple((p & pg.Sink(2)) if compose else p for p in per_head)
    assert spec.head_patterns == want
    assert spec.head_patterns == pg.Spec(pg.Heads(per_head) & pg.Sink(2) if compose else pg.Heads(per_head), 12,
                                         num_heads=n).head_patterns
    rebuilt = eval(repr(node), dict(NAMESPACE))
    assert rebuilt == node and hash(rebuilt) == hash(node) and repr(rebuilt) == repr(node)
    assert eval(repr(spec), dict(NAMESPACE)) == spec
    has_slice = any(isinstance(k, slice) for k, _ in pairs)
    assert repr(node).startswith("Heads([(" if has_slice else "Heads({")
    if not has_slice or sys.version_info >= (3, 12):
        assert pg.Heads(dict(pairs)) == node


@pytest.mark.parametrize("build, exc, fragments", [
    (lambda: pg.Heads({(0, 1): pg.Causal()}), TypeError, ["(0, 1)", "tuple", "range", "pairs", "3.12"]),
    (lambda: pg.Heads({"0": pg.Causal()}), TypeError, ["'0'", "int, range or slice", "pairs"]),
    (lambda: pg.Heads([(0, pg.Causal()), pg.Full()]), TypeError, ["mixes", "pairs", "Full()"]),
    (lambda: pg.Heads([(0, pg.Causal(), 1)]), TypeError, ["(key, pattern) pairs", "(0, Causal(), 1)"]),
    (lambda: pg.Heads([(slice(0, 2), "causal")]), TypeError, ["slice(0, 2, None)", "'causal'"]),
    (lambda: pg.Heads([(slice(0, 2.5), pg.Causal())]), TypeError, ["slice(0, 2.5, None)", "ints or None"]),
    (lambda: pg.Heads([(slice(0, 4, 0), pg.Causal())]), ValueError, ["slice(0, 4, 0)", "step", "0"]),
    (lambda: pg.Heads(pg.Causal()), TypeError, ["Causal", "list", "dict", "pairs"]),
])
def test_heads_key_errors_say_which_forms_work(build, exc, fragments):
    with raises(exc, "Heads", *fragments):
        build()


def test_heads_slice_pairs_on_every_python():
    node = pg.Heads([(slice(None, 2), pg.Causal()), (slice(2, None), pg.Band(1))])
    spec = pg.Spec(node, 8, num_heads=4)
    assert spec.head_patterns == (pg.Causal(), pg.Causal(), pg.Band(1), pg.Band(1))
    assert repr(node) == "Heads([(slice(None, 2, None), Causal()), (slice(2, None, None), Band(1))])"
    assert eval(repr(spec), dict(NAMESPACE)) == spec
    assert pg.Heads([(range(0, 2), pg.Causal()), (range(2, 4), pg.Band(1))]) == pg.Heads(
        {range(0, 2): pg.Causal(), range(2, 4): pg.Band(1)})
    with raises(ValueError, "head 1", "twice"):
        pg.Spec(pg.Heads([(slice(0, 2), pg.Causal()), (slice(1, None, 2), pg.Full())]), 8, num_heads=4)


@settings(max_examples=scaled(150))
@given(specs())
def test_head_patterns_act_as_the_tuple_of_resolved_heads(spec):
    from patterngen.ir import resolve_heads
    want = tuple(resolve_heads(spec.pattern, h, spec.num_heads) for h in range(spec.num_heads))
    hp = spec.head_patterns
    assert hp == want and want == hp and tuple(hp) == want and list(hp) == list(want)
    assert len(hp) == len(want) and hash(hp) == hash(want) and eval(repr(hp), dict(NAMESPACE)) == want
    assert [hp[h] for h in range(-len(want), len(want))] == list(want) * 2
    assert hp[1::2] == want[1::2] and hp[::-1] == want[::-1]
    assert hp.unique == tuple(dict.fromkeys(want))
    for p in hp.unique:
        assert p in hp and hp.count(p) == want.count(p) and hp.index(p) == want.index(p)
    assert pg.Full() in hp or hp.count(pg.Full()) == 0
    with pytest.raises(IndexError):
        hp[len(want)]
    again = eval(repr(spec), dict(NAMESPACE))
    assert again.head_patterns == hp and again == spec and hash(again) == hash(spec) and repr(again) == repr(spec)


def test_spec_construction_is_independent_of_the_head_count():
    """All heads sharing one pattern: nothing per head (10^7 heads took 11 s)."""
    import time
    pattern = pg.Band(3) & pg.Causal()
    start = time.perf_counter()
    spec = pg.Spec(pattern, 64, num_heads=10**7, num_kv_heads=10**5, head_dim=16)
    assert time.perf_counter() - start < 0.5
    hp = spec.head_patterns
    assert len(hp) == 10**7 and hp[0] == hp[-1] == hp[5 * 10**6] == pattern and hp.unique == (pattern,)
    assert hp[10**7 - 2:] == (pattern, pattern) and hp.count(pattern) == 10**7 and spec.routed is None
    assert repr(hp) == "((Band(3) & Causal()),) * 10000000"
    same = pg.Spec(pattern, 64, num_heads=10**7, num_kv_heads=10**5, head_dim=16)
    assert same == spec and hash(same) == hash(spec) and same.head_patterns == hp
    assert repr(spec) == "Spec((Band(3) & Causal()), q_shape=(64,), num_heads=10000000, num_kv_heads=100000, head_dim=16)"


def test_heads_with_range_keys_resolve_in_linear_time():
    """Range keys over many heads: linear in the head count (it was quadratic: 10^4 heads took 9 s)."""
    import time
    n = 20_000
    start = time.perf_counter()
    spec = pg.Spec(pg.Heads({range(0, n, 2): pg.Causal(), range(1, n, 2): pg.Band(2)}) | pg.Sink(1), 16,
                   num_heads=n)
    assert time.perf_counter() - start < 1.0
    hp = spec.head_patterns
    assert hp.unique == (pg.Causal() | pg.Sink(1), pg.Band(2) | pg.Sink(1))
    assert hp[0] == hp[n - 2] == pg.Causal() | pg.Sink(1) and hp[1] == hp[n - 1] == pg.Band(2) | pg.Sink(1)


def test_nested_heads_and_unused_entries_resolve_as_per_head():
    from patterngen.ir import resolve_heads
    inner = pg.Heads({range(0, 4, 2): pg.Full(), range(1, 4, 2): pg.Sink(1)})
    pattern = pg.Heads({range(0, 0): pg.Heads([pg.Causal()] * 3), range(0, 2): inner, range(2, 4): pg.Band(1)})
    for p in (pattern, pattern & pg.Causal(), pg.Band(2) | (pattern & inner)):
        spec = pg.Spec(p, 8, num_heads=4)  # the entry naming no head is never resolved (its 3 heads != 4)
        assert spec.head_patterns == tuple(resolve_heads(p, h, 4) for h in range(4))
    assert pg.Spec(pattern, 8, num_heads=4).head_patterns.unique == (pg.Full(), pg.Sink(1), pg.Band(1))
