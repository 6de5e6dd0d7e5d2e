"""The JSON form of patterns and specs (ir/serialize.py): every pattern type and
every Spec round-trips exactly (equal, same hash, same repr, same text), and
malformed documents are refused with a ValueError that says where and what."""
from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.ir import serialize
from tests.strategies import routed_specs, scaled, specs

A = (pg.Sink(4) | pg.Band(15)) & pg.Causal()
B = pg.Window((3, 5), stride=(1, 2), dilation=(2, 1), causal=(True, False))

# at least one example of every pattern type, in the shapes its fields can take
EXAMPLES = [
    pg.Full(), pg.Causal(),
    pg.Window(7), pg.Window(4, stride=2, dilation=3, causal=True), B,
    pg.Band(127), pg.Band(3, 5), pg.Sink(4), pg.Global(2),
    pg.Strided(4), pg.Strided(5, 3), pg.Strided(4, 1, block=64), pg.Strided(2, block=3),
    pg.Blocks(7), pg.Blocks(8, shift=4), pg.Blocks((2, 4), shift=(1, 0)), pg.Blocks(4, shift=(1, 2)),
    pg.Routed(64, 4), pg.Routed(16, 2, causal=True), pg.Clustered(), pg.Clustered() & pg.Causal(),
    A, pg.Causal() | pg.Strided(3, 1) | pg.Sink(1),
    pg.Union((pg.Union((pg.Sink(1), pg.Band(2))), pg.Causal())),  # built directly: nested, not flattened
    pg.Intersection((pg.Causal(), pg.Intersection((pg.Band(3), pg.Strided(2))))),
    pg.Heads([pg.Causal(), A, A, pg.Full()]),
    pg.Heads({0: pg.Causal(), range(1, 3): A, 3: pg.Full()}),
    pg.Heads({range(0, 8, 2): pg.Causal(), range(1, 8, 2): pg.Heads([A] * 8)}),
    pg.Heads([pg.Causal(), A]) | pg.Sink(2),
]


def same(a, b) -> bool:
    return a == b and hash(a) == hash(b) and repr(a) == repr(b) and type(a) is type(b)


def check_round_trip(obj):
    text = obj.to_json()
    back = pg.from_json(text)
    assert same(back, obj), (obj, back)
    assert same(pg.from_json(obj.to_dict()), obj)
    assert back.to_json() == text  # a stable text: the same object writes the same JSON
    assert json.loads(text) == obj.to_dict()
    assert obj.to_dict()["patterngen"] == serialize.VERSION


@pytest.mark.parametrize("pattern", EXAMPLES, ids=repr)
def test_examples_round_trip(pattern):
    check_round_trip(pattern)


def test_every_pattern_type_has_an_example():
    covered = {type(n).__name__ for p in EXAMPLES for n in p.walk()}
    missing = sorted(set(serialize.PATTERN_TYPES) - covered)
    assert not missing, f"add an example of {missing} to EXAMPLES (every pattern type must round-trip)"


def test_the_documented_form():
    assert pg.Band(127).to_dict() == {"patterngen": 1, "type": "Band", "left": 127, "right": 0}
    assert (pg.Sink(4) | pg.Causal()).to_dict() == {
        "patterngen": 1, "type": "Union", "parts": [{"type": "Sink", "n": 4}, {"type": "Causal"}]}
    assert pg.Heads({0: pg.Full(), range(1, 4): pg.Causal()}).to_dict() == {
        "patterngen": 1, "type": "Heads", "listed": False,
        "entries": [[0, {"type": "Full"}], [{"range": [1, 4, 1]}, {"type": "Causal"}]]}
    assert pg.Spec(pg.Causal(), 64, num_heads=8).to_dict() == {
        "patterngen": 1, "type": "Spec", "pattern": {"type": "Causal"}, "q_shape": [64], "kv_shape": [64],
        "num_heads": 8, "num_kv_heads": 8, "head_dim": 64}


def test_slice_keys_round_trip():
    """Slice keys (not writable as dict literals before Python 3.12) are their own key form."""
    doc = {"patterngen": 1, "type": "Heads", "listed": False, "entries": [
        [{"slice": [None, None, 2]}, {"type": "Causal"}],
        [{"slice": [1, None, 2]}, {"type": "Full"}],
        [{"range": [1, 2, 1]}, {"type": "Sink", "n": 3}],
    ]}
    doc["entries"][2][0] = 5  # an int key beside the slices
    doc["entries"][1][0] = {"slice": [1, 5, 2]}
    heads = pg.from_json(doc)
    assert heads.to_dict() == doc
    assert [type(k).__name__ for k, _ in heads.entries] == ["HeadSlice", "HeadSlice", "int"]
    assert [(k.start, k.stop, k.step) for k, _ in heads.entries[:2]] == [(None, None, 2), (1, 5, 2)]
    check_round_trip(heads)
    spec = pg.Spec(heads, 32, num_heads=6)
    check_round_trip(spec)
    assert spec.head_patterns == (pg.Causal(), pg.Full(), pg.Causal(), pg.Full(), pg.Causal(), pg.Sink(3))


def test_range_keys_keep_their_form():
    """range(0, 4, 2) and range(0, 3, 2) hold the same heads (and compare equal) but print differently."""
    for key in (range(0, 4, 2), range(0, 3, 2), range(2, 3)):
        h = pg.Heads({key: pg.Causal(), 1: pg.Full()})
        assert repr(pg.from_json(h.to_json())) == repr(h)


@settings(max_examples=scaled(60))
@given(spec=specs())
def test_specs_and_their_patterns_round_trip(spec):
    check_round_trip(spec)
    check_round_trip(spec.pattern)


@settings(max_examples=scaled(60))
@given(spec=specs(), nest=st.booleans())
def test_printed_forms_read_back_exactly(spec, nest):
    """repr is the second stable form (manifests, torch.compile): `parse_repr` rebuilds an equal
    object, also for composites built by their constructors with nested or repeated parts."""
    from patterngen.ir.parse import parse_repr
    assert parse_repr(repr(spec)) == spec and repr(parse_repr(repr(spec))) == repr(spec)
    odd = pg.Union((spec.pattern, pg.Intersection((pg.Causal(), pg.Causal())))) if nest else spec.pattern
    assert parse_repr(repr(odd)) == odd


@settings(max_examples=scaled(20))
@given(case=routed_specs())
def test_routed_specs_round_trip(case):
    spec, _ = case
    check_round_trip(spec)


def test_spec_fields_survive():
    spec = pg.Spec(B, (6, 8), num_heads=6, num_kv_heads=3, head_dim=128)
    check_round_trip(spec)
    cross = pg.Spec(pg.Causal() | pg.Global(3), 10, kv_shape=(4, 5), num_heads=2, head_dim=32)
    back = pg.from_json(cross.to_json())
    assert (back.q_shape, back.kv_shape, back.num_heads, back.num_kv_heads, back.head_dim) == ((10,), (4, 5), 2, 2, 32)


def test_from_json_reads_bytes_and_indented_text():
    assert pg.from_json(A.to_json(indent=2).encode()) == A
    assert pg.from_json(A.to_json(indent=2)) == A


# -- malformed documents -------------------------------------------------------------------
def doc(**fields):
    return {"patterngen": 1, **fields}


BAD = [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ("3", ["JSON object"]),
    ({"type": "Causal"}, ["no \"patterngen\" version key"]),
    (doc(type="Causal") | {"patterngen": 2}, ["version 2", "version 1"]),
    (doc(type="Causal") | {"patterngen": "1"}, ["version \"1\""]),
    (doc(type="Causal") | {"patterngen": True}, ["version true"]),
    (doc(), ["no \"type\""]),
    (doc(type="Banana"), ["unknown type \"Banana\"", "Band"]),
    (doc(type="HeadSlice", start=0, stop=1, step=1), ["unknown type"]),
    (doc(type=3), ["unknown type 3"]),
    (doc(type="Band", left=3, width=2), ["unknown key(s) ['width']", "Band"]),
    (doc(type="Band", left=-1), ["at $", "left must be >= 0, got -1"]),
    (doc(type="Band", left="3"), ["left must be an int"]),
    (doc(type="Band", left=3.0), ["3.0", "expected an int"]),
    (doc(type="Band", left=True), ["left must be an int"]),
    (doc(type="Band"), ["at $", "left"]),
    (doc(type="Sink", n={"x": 1}), ["at $.n", "no \"type\""]),
    (doc(type="Window", size=[]), ["size"]),
    (doc(type="Window", size=[3, 3], stride=[1, 1, 1]), ["disagree"]),
    (doc(type="Union", parts=[{"type": "Causal"}]), ["at least two"]),
    (doc(type="Union", parts={"type": "Causal"}), ["at $.parts", "list of pattern nodes"]),
    (doc(type="Union", parts=[{"type": "Causal"}, 3]), ["at $.parts[1]", "expected a pattern node"]),
    (doc(type="Union", parts=[{"type": "Causal"}, {"type": "Sink", "n": 0}]), ["at $.parts[1]", "Sink", "n"]),
    (doc(type="Union", parts=[{"type": "Causal"}, {"patterngen": 1, "type": "Full"}]),
     ["at $.parts[1]", "unknown key(s) ['patterngen']"]),
    (doc(type="Union", parts=[{"type": "Causal"}, {"type": "Spec"}]), ["at $.parts[1]", "Spec cannot stand"]),
    (doc(type="Heads", listed=False, entries=[]), ["$.entries", "non-empty list"]),
    (doc(type="Heads", listed="no", entries=[[0, {"type": "Full"}]]), ["$.listed", "true or false"]),
    (doc(type="Heads", entries=[[0, {"type": "Full"}]], extra=1), ["unknown key(s) ['extra']", "Heads"]),
    (doc(type="Heads", entries=[[{"range": [0, 2]}, {"type": "Full"}]]), ["$.entries[0][0]", "[start, stop, step]"]),
    (doc(type="Heads", entries=[[{"range": [0, 2, 0]}, {"type": "Full"}]]), ["non-zero step"]),
    (doc(type="Heads", entries=[[{"range": [0, None, 1]}, {"type": "Full"}]]), ["range head key needs ints"]),
    (doc(type="Heads", entries=[[{"slice": [0, 2.5, 1]}, {"type": "Full"}]]), ["ints or null"]),
    (doc(type="Heads", entries=[[{"set": [0]}, {"type": "Full"}]]), ["not a head key"]),
    (doc(type="Heads", entries=[["0", {"type": "Full"}]]), ["not a head key"]),
    (doc(type="Heads", entries=[[True, {"type": "Full"}]]), ["not a head key"]),
    (doc(type="Heads", entries=[[-1, {"type": "Full"}]]), ["head index must be >= 0"]),
    (doc(type="Heads", entries=[[0, {"type": "Full"}, 1]]), ["$.entries[0]", "[head key, pattern] pair"]),
    (doc(type="Heads", listed=True, entries=[[1, {"type": "Full"}]]), ["listed", "0..0", "[1]"]),
    (doc(type="Spec", q_shape=[8]), ["Spec needs a \"pattern\""]),
    (doc(type="Spec", pattern={"type": "Causal"}, q_shape=[8], dtype="bf16"), ["unknown key(s) ['dtype']"]),
    (doc(type="Spec", pattern={"type": "Causal"}, q_shape=[8], num_heads=4, num_kv_heads=3), ["multiple"]),
    (doc(type="Spec", pattern={"type": "Window", "size": 9}, q_shape=[8]), ["larger than the grid"]),
    (doc(type="Spec", pattern={"patterngen": 1, "type": "Causal"}, q_shape=[8]), ["$.pattern", "unknown key"]),
]


@pytest.mark.parametrize("data, fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_documents_are_refused(data, fragments):
    with pytest.raises(ValueError, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)):
        pg.from_json(data)


@pytest.mark.parametrize("data", [None, 3, [A.to_dict()], A])
def test_from_json_argument_type(data):
    with pytest.raises(TypeError, match="from_json: data must be a JSON string or a dict"):
        pg.from_json(data)


def test_non_patterns_have_no_json_form():
    class Mine(pg.Pattern):
        pass

    with pytest.raises(TypeError, match="Mine.*not a patterngen pattern type"):
        (pg.Causal() | Mine()).to_dict()
    with pytest.raises(TypeError, match="obj must be a patterngen pattern or Spec"):
        serialize.to_dict("Causal()")


# -- corrupted documents: a ValueError or a valid object, never another error ---------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=6)
    | st.sampled_from(["Band", "Heads", "Spec", "Union", "range", "slice", "type", "patterngen"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


@settings(max_examples=scaled(150))
@given(original=st.sampled_from(EXAMPLES + [pg.Spec(A, 32, num_heads=4, num_kv_heads=2)]), data=st.data())
def test_corrupted_documents(original, data):
    document = original.to_dict()
    paths = list(_paths(document))
    path = data.draw(st.sampled_from(paths))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    document = copy.deepcopy(document)
    if not path:
        action = "add"
    parent = document
    for k in path[:-1]:
        parent = parent[k]
    if action == "replace":
        parent[path[-1]] = data.draw(JSON_VALUES)
    elif action == "delete":
        del parent[path[-1]]
    else:
        node = document
        for k in path:
            node = node[k]
        if isinstance(node, dict):
            node[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
        elif isinstance(node, list):
            node.append(data.draw(JSON_VALUES))
        else:
            return
    try:
        back = pg.from_json(document)
    except ValueError:
        return
    assert isinstance(back, (pg.Pattern, pg.Spec))
    assert same(pg.from_json(back.to_json()), back)
