"""A stable, versioned JSON form for patterns and specs.

Every pattern node and `Spec` becomes a plain dict of JSON values; the top level
carries the format version:

    Band(127)                    {"patterngen": 1, "type": "Band", "left": 127, "right": 0}
    Sink(4) | Causal()           {"patterngen": 1, "type": "Union",
                                  "parts": [{"type": "Sink", "n": 4}, {"type": "Causal"}]}
    Heads({0: a, range(1, 4): b})
                                 {"patterngen": 1, "type": "Heads", "listed": false,
                                  "entries": [[0, A], [{"range": [1, 4, 1]}, B]]}
    Spec(p, 64, num_heads=8)     {"patterngen": 1, "type": "Spec", "pattern": P, "q_shape": [64],
                                  "kv_shape": [64], "num_heads": 8, "num_kv_heads": 8, "head_dim": 64}

Rules of the form:

- A node is {"type": <class name>, <field>: <value>, ...} with every constructor
  field of the node; tuples are JSON lists (and lists read back as tuples), a
  nested pattern is a node without the version key.
- Union and Intersection keep their "parts" as written (no re-flattening), so a
  node reads back equal to the one written, with the same hash and repr.
- Heads keeps its entries in order, each [key, node]. Keys are written distinctly:
  an int head as a JSON int, a range as {"range": [start, stop, step]}, a slice as
  {"slice": [start, stop, step]} (null for an open end). "listed" says whether
  the node was built from a list (keys 0..n-1) or from a mapping.
- Reading is strict: an unknown version, type or key, a missing field or a value
  the constructor refuses is a ValueError naming where in the document it is.
  Fields missing from an older document take the constructor's default.

Leaf patterns are read and written from their dataclass fields, so a primitive
added to `ir/patterns.py` (a frozen dataclass with a generated constructor)
gets a JSON form without changes here.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from . import patterns as _patterns
from .patterns import JSON_VERSION, JSON_VERSION_KEY, PATTERN_TYPES, Heads, Pattern
from .spec import Spec

VERSION = JSON_VERSION
"""The format version written under the "patterngen" key; readers accept exactly this one."""

VERSION_KEY = JSON_VERSION_KEY


def to_dict(obj: Pattern | Spec) -> dict:
    """The versioned dict form of a pattern or a Spec (`obj.to_dict()`): JSON values only."""
    if not isinstance(obj, (Pattern, Spec)):
        raise TypeError(f"to_dict: obj must be a patterngen pattern or Spec, got {obj!r} ({type(obj).__name__})")
    return obj.to_dict()


def to_json(obj: Pattern | Spec, indent: int | None = None) -> str:
    """`to_dict(obj)` as a JSON string (keys in a fixed order: the same object gives the same text)."""
    return json.dumps(to_dict(obj), indent=indent)


# -- reading -------------------------------------------------------------------------------
def _init_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"from_json: at {where}: {message}")


def _describe(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_value(value, where: str):
    """A JSON field value back in IR form: nodes as patterns, lists as tuples."""
    if isinstance(value, dict):
        return _read_node(value, where)
    if isinstance(value, list):
        return tuple(_read_value(v, f"{where}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise _fail(where, f"{_describe(value)} is not a value a pattern field takes "
                       f"(expected an int, a bool, null, a list or a pattern node)")


def _construct(cls, where: str, *args, **kwargs):
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise _fail(where, str(e)) from e


def _check_keys(data: dict, allowed: set[str], where: str, what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown} for {what} (valid keys: {sorted(allowed)})")


def _read_head_key(key, where: str):
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, dict) and len(key) == 1 and next(iter(key)) in ("range", "slice"):
        kind, args = next(iter(key.items()))
        if not (isinstance(args, list) and len(args) == 3):
            raise _fail(where, f"a {kind} head key needs [start, stop, step], got {_describe(args)}")
        for a in args:
            if isinstance(a, bool) or not (isinstance(a, int) or (kind == "slice" and a is None)):
                raise _fail(where, f"a {kind} head key needs {'ints or null' if kind == 'slice' else 'ints'} "
                                   f"as [start, stop, step], got {_describe(args)}")
        if kind == "range":
            if args[2] == 0:
                raise _fail(where, f"a range head key needs a non-zero step, got {_describe(args)}")
            return range(*args)
        return slice(*args)
    raise _fail(where, f"{_describe(key)} is not a head key (expected an int, {{\"range\": [start, stop, step]}} "
                       f"or {{\"slice\": [start, stop, step]}})")


def _read_heads(data: dict, where: str) -> Heads:
    _check_keys(data, {"type", "listed", "entries"}, where, "Heads")
    listed, entries = data.get("listed", False), data.get("entries")
    if not isinstance(listed, bool):
        raise _fail(f"{where}.listed", f"expected true or false, got {_describe(listed)}")
    if not isinstance(entries, list) or not entries:
        raise _fail(f"{where}.entries", f"expected a non-empty list of [head key, pattern] pairs, "
                                        f"got {_describe(entries)}")
    pairs = []
    for i, entry in enumerate(entries):
        at = f"{where}.entries[{i}]"
        if not (isinstance(entry, list) and len(entry) == 2):
            raise _fail(at, f"expected a [head key, pattern] pair, got {_describe(entry)}")
        pairs.append((_read_head_key(entry[0], f"{at}[0]"), _read_node(entry[1], f"{at}[1]")))
    if listed:
        keys = [k for k, _ in pairs]
        if keys != list(range(len(pairs))):
            raise _fail(f"{where}.entries", f"a listed Heads node has the head keys 0..{len(pairs) - 1} in "
                                            f"order, got {keys}")
        return _construct(Heads, where, [p for _, p in pairs])
    return _construct(Heads, where, pairs)  # (key, pattern) pairs: slice keys are never hashed


def _read_node(data, where: str) -> Pattern:
    if not isinstance(data, dict):
        raise _fail(where, f"expected a pattern node (a JSON object with a \"type\"), got {_describe(data)}")
    kind = data.get("type")
    if kind == "Spec":
        raise _fail(where, "a Spec cannot stand where a pattern is expected")
    if not isinstance(kind, str) or kind not in PATTERN_TYPES:
        what = "no \"type\"" if "type" not in data else f"the unknown type {_describe(kind)}"
        raise _fail(where, f"the node has {what} (known pattern types: {', '.join(sorted(PATTERN_TYPES))})")
    cls = PATTERN_TYPES[kind]
    if cls is Heads:
        return _read_heads(data, where)
    if not cls.__dataclass_params__.init:
        raise _fail(where, f"{kind} has no JSON form")
    fields = {f.name for f in _init_fields(cls)}
    _check_keys(data, fields | {"type"}, where, kind)
    composite = issubclass(cls, _patterns._Composite)
    kwargs = {k: _read_value(v, f"{where}.{k}") for k, v in data.items()
              if k != "type" and not (composite and k == "parts")}
    if composite and "parts" in data:  # parts: patterns only
        parts = data["parts"]
        if not isinstance(parts, list):
            raise _fail(f"{where}.parts", f"expected a list of pattern nodes, got {_describe(parts)}")
        kwargs["parts"] = tuple(_read_node(p, f"{where}.parts[{i}]") for i, p in enumerate(parts))
    return _construct(cls, where, **kwargs)


def _read_spec(data: dict) -> Spec:
    fields = {f.name for f in _init_fields(Spec)}
    _check_keys(data, fields | {VERSION_KEY, "type"}, "$", "Spec")
    if "pattern" not in data:
        raise _fail("$", "a Spec needs a \"pattern\"")
    kwargs = {k: (_read_node(v, "$.pattern") if k == "pattern" else _read_value(v, f"$.{k}"))
              for k, v in data.items() if k not in (VERSION_KEY, "type")}
    return _construct(Spec, "$", **kwargs)


def from_json(data: str | bytes | Mapping) -> Pattern | Spec:
    """The pattern or Spec of a JSON text or dict written by `to_json` / `to_dict`
    (a Pattern or a Spec, by the document's "type")."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"from_json: data is not valid JSON ({e})") from e
    elif not isinstance(data, Mapping):
        raise TypeError(f"from_json: data must be a JSON string or a dict from to_dict(), got "
                        f"{type(data).__name__}")
    if not isinstance(data, dict):
        if not isinstance(data, Mapping):
            raise ValueError(f"from_json: the document must be a JSON object, got {_describe(data)}")
        data = dict(data)
    if VERSION_KEY not in data:
        raise ValueError(f"from_json: not a patterngen document: the top level has no \"{VERSION_KEY}\" version "
                         f"key (expected {{\"{VERSION_KEY}\": {VERSION}, \"type\": ...}}), got {_describe(data)}")
    version = data[VERSION_KEY]
    if isinstance(version, bool) or version != VERSION or not isinstance(version, int):
        raise ValueError(f"from_json: format version {_describe(version)} is not supported (this patterngen reads "
                         f"version {VERSION})")
    if data.get("type") == "Spec":
        return _read_spec(data)
    return _read_node({k: v for k, v in data.items() if k != VERSION_KEY}, "$")


__all__ = ["VERSION", "from_json", "to_dict", "to_json"]
