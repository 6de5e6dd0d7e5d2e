"""Pattern primitives and their composition.

Nodes are frozen dataclasses: immutable, hashable (so a spec can key caches and
be captured by a compiled graph) and printed as the Python that builds them.
Each node checks what it can on its own at construction; what depends on the
shapes is checked by `Spec` (see `ir/spec.py`).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import json
import operator
import types
from collections.abc import Sequence as _SequenceABC
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union as _U

IntOrTuple = _U[int, tuple]


def _check_int(name: str, value, minimum: int, owner: str):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def _int_or_tuple(name: str, value, minimum: int, owner: str):
    """Accept an int or a non-empty tuple/list of ints; return int or tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) == 0:
            raise ValueError(f"{owner}: {name} must be an int or a non-empty tuple, got {value!r}")
        return tuple(_check_int(f"{name}[{i}]", v, minimum, owner) for i, v in enumerate(value))
    return _check_int(name, value, minimum, owner)


def _bool_or_tuple(name: str, value, owner: str):
    if isinstance(value, (tuple, list)):
        if len(value) == 0 or not all(isinstance(v, bool) for v in value):
            raise TypeError(f"{owner}: {name} must be a bool or a tuple of bools, got {value!r}")
        return tuple(value)
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool or a tuple of bools, got {value!r}")
    return value


def per_dim(value, ndim: int, name: str, owner: str) -> tuple:
    """Broadcast an int/bool or a tuple to `ndim` entries."""
    if isinstance(value, tuple):
        if len(value) != ndim:
            raise ValueError(
                f"{owner}: {name}={value!r} has {len(value)} entries but the grid has {ndim} dimension(s)")
        return value
    return (value,) * ndim


class Pattern:
    """Base class of every pattern node: `a | b` is the union, `a & b` the intersection."""

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union.of(self, _as_pattern(other, "|"))

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection.of(self, _as_pattern(other, "&"))

    def children(self) -> tuple["Pattern", ...]:
        return ()

    def walk(self) -> Iterable["Pattern"]:
        """Every node of the tree, parents before children."""
        yield self
        for c in self.children():
            yield from c.walk()

    def to_dict(self) -> dict:
        """The versioned JSON-able dict form (described in ir/serialize.py, which reads it back:
        `from_json` restores an equal pattern)."""
        return {JSON_VERSION_KEY: JSON_VERSION, **json_node(self, "$")}

    def to_json(self, indent: int | None = None) -> str:
        """`to_dict()` as JSON text (the same object always gives the same text)."""
        return json.dumps(self.to_dict(), indent=indent)


# -- the JSON form, written here (ir/serialize.py reads it and documents it) -----------------
JSON_VERSION = 1
"""The format version written under the "patterngen" key; readers accept exactly this one."""

JSON_VERSION_KEY = "patterngen"


def json_value(value, where: str):
    """A field value as JSON: patterns as nodes, tuples as lists, scalars as they are."""
    if isinstance(value, Pattern):
        return json_node(value, where)
    if isinstance(value, (tuple, list)):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"to_dict: {where} holds {value!r} ({type(value).__name__}), which has no JSON form "
                    f"(expected a pattern, an int, a bool, None or a tuple of them)")


def _json_head_key(key, where: str):
    if isinstance(key, bool):
        raise TypeError(f"to_dict: {where} is the head key {key!r}; expected an int, range or slice")
    if isinstance(key, int):
        return key
    if isinstance(key, range):
        return {"range": [key.start, key.stop, key.step]}
    if isinstance(key, HeadSlice):
        return {"slice": [key.start, key.stop, key.step]}
    raise TypeError(f"to_dict: {where} is the head key {key!r} ({type(key).__name__}); expected an int, "
                    f"range or slice")


def json_node(node: Pattern, where: str) -> dict:
    """One pattern node as {"type": ..., <constructor fields>...}; Heads as its keyed entries."""
    cls = type(node)
    if cls.__module__ != __name__ or not dataclasses.is_dataclass(cls):
        raise TypeError(f"to_dict: {where} is a {cls.__name__}, which is not a patterngen pattern type with a "
                        f"JSON form")
    out: dict = {"type": cls.__name__}
    if isinstance(node, Heads):
        out["listed"] = node.listed
        out["entries"] = [[_json_head_key(k, f"{where}.entries[{i}][0]"), json_node(p, f"{where}.entries[{i}][1]")]
                          for i, (k, p) in enumerate(node.entries)]
        return out
    for f in dataclasses.fields(cls):
        if f.init:
            out[f.name] = json_value(getattr(node, f.name), f"{where}.{f.name}")
    return out


def _as_pattern(other, op: str) -> Pattern:
    if not isinstance(other, Pattern):
        raise TypeError(f"cannot combine a pattern with {other!r} using '{op}': expected a pattern")
    return other


@dataclass(frozen=True, repr=False)
class Full(Pattern):
    """Every query sees every key."""

    def __repr__(self):
        return "Full()"


@dataclass(frozen=True, repr=False)
class Causal(Pattern):
    """kv <= q on the flattened index, bottom-right aligned when Nq != Nkv."""

    def __repr__(self):
        return "Causal()"


@dataclass(frozen=True, repr=False)
class Window(Pattern):
    """Generalized Neighborhood Attention on the grid (NATTEN's rules, per dimension).

    `size`, `stride`, `dilation` and `causal` are each one value for every
    dimension or a tuple with one entry per dimension.
    """

    size: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    causal: _U[bool, tuple] = False

    def __post_init__(self):
        size = _int_or_tuple("size", self.size, 1, "Window")
        stride = _int_or_tuple("stride", self.stride, 1, "Window")
        dilation = _int_or_tuple("dilation", self.dilation, 1, "Window")
        causal = _bool_or_tuple("causal", self.causal, "Window")
        lens = {len(v) for v in (size, stride, dilation, causal) if isinstance(v, tuple)}
        if len(lens) > 1:
            raise ValueError(f"Window: per-dimension tuples disagree in length: size={size!r}, "
                             f"stride={stride!r}, dilation={dilation!r}, causal={causal!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "causal", causal)
        n = lens.pop() if lens else 1
        for k, (w, s) in enumerate(zip(per_dim(size, n, "size", "Window"), per_dim(stride, n, "stride", "Window"))):
            if s > w:
                raise ValueError(f"Window: stride must be <= size in every dimension; dimension {k} has "
                                 f"stride {s} > size {w} (valid strides: 1..{w})")

    @property
    def ndim(self) -> int | None:
        """Number of dimensions fixed by tuple arguments, or None if all are scalars."""
        for v in (self.size, self.stride, self.dilation, self.causal):
            if isinstance(v, tuple):
                return len(v)
        return None

    def dims(self, ndim: int) -> tuple[tuple[int, int, int, bool], ...]:
        """(size, stride, dilation, causal) for each of `ndim` dimensions."""
        cols = [per_dim(v, ndim, name, "Window") for v, name in
                ((self.size, "size"), (self.stride, "stride"), (self.dilation, "dilation"), (self.causal, "causal"))]
        return tuple(zip(*cols))

    def __repr__(self):
        args = [repr(self.size)]
        if self.stride != 1:
            args.append(f"stride={self.stride!r}")
        if self.dilation != 1:
            args.append(f"dilation={self.dilation!r}")
        if self.causal is not False:
            args.append(f"causal={self.causal!r}")
        return f"Window({', '.join(args)})"


@dataclass(frozen=True, repr=False)
class Blocks(Pattern):
    """Attention within blocks of the grid: query and key see each other iff they fall in the
    same block along every dimension, the block of coordinate x being floor((x - shift) / size).

    `size` and `shift` are each one value for every dimension or a tuple with one entry per
    dimension, 0 <= shift < size. shift = 0 partitions from coordinate 0 (ViT/Swin windows);
    shift = size // 2 is Swin's shifted windows with the cyclic-shift mask (the partial blocks
    at the borders are its masked regions), without rolling the tensor.
    """

    size: IntOrTuple
    shift: IntOrTuple = 0

    def __post_init__(self):
        size = _int_or_tuple("size", self.size, 1, "Blocks")
        shift = _int_or_tuple("shift", self.shift, 0, "Blocks")
        if isinstance(size, tuple) and isinstance(shift, tuple) and len(size) != len(shift):
            raise ValueError(f"Blocks: per-dimension tuples disagree in length: size={size!r}, shift={shift!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "shift", shift)
        n = self.ndim or 1
        for k, (b, s) in enumerate(zip(per_dim(size, n, "size", "Blocks"), per_dim(shift, n, "shift", "Blocks"))):
            if s >= b:
                raise ValueError(f"Blocks: shift must be < size in every dimension; dimension {k} has shift {s} "
                                 f">= size {b} (valid shifts: 0..{b - 1})")

    @property
    def ndim(self) -> int | None:
        """Number of dimensions fixed by tuple arguments, or None if both are scalars."""
        for v in (self.size, self.shift):
            if isinstance(v, tuple):
                return len(v)
        return None

    def dims(self, ndim: int) -> tuple[tuple[int, int], ...]:
        """(size, shift) for each of `ndim` dimensions."""
        return tuple(zip(per_dim(self.size, ndim, "size", "Blocks"), per_dim(self.shift, ndim, "shift", "Blocks")))

    def __repr__(self):
        return f"Blocks({self.size!r}, shift={self.shift!r})" if self.shift != 0 else f"Blocks({self.size!r})"


@dataclass(frozen=True, repr=False)
class Band(Pattern):
    """Flattened band q - left <= kv <= q + right (FlashAttention's window_size)."""

    left: int
    right: int = 0

    def __post_init__(self):
        _check_int("left", self.left, 0, "Band")
        _check_int("right", self.right, 0, "Band")

    def __repr__(self):
        return f"Band({self.left}, {self.right})" if self.right else f"Band({self.left})"


@dataclass(frozen=True, repr=False)
class Sink(Pattern):
    """kv < n: the first n tokens are visible to every query (attention sinks)."""

    n: int

    def __post_init__(self):
        _check_int("n", self.n, 1, "Sink")

    def __repr__(self):
        return f"Sink({self.n})"


@dataclass(frozen=True, repr=False)
class Global(Pattern):
    """Global tokens: kv < n or q < n (Longformer/BigBird)."""

    n: int

    def __post_init__(self):
        _check_int("n", self.n, 1, "Global")

    def __repr__(self):
        return f"Global({self.n})"


@dataclass(frozen=True, repr=False)
class Strided(Pattern):
    """(kv // block) % stride == offset on the flattened index: every stride-th key, or with
    `block` > 1 every stride-th block of `block` keys (S2-Attention's vertical stride over
    key blocks; a block that is a multiple of the kv tile makes the plan fully block-sparse)."""

    stride: int
    offset: int = 0
    block: int = 1

    def __post_init__(self):
        _check_int("stride", self.stride, 1, "Strided")
        _check_int("offset", self.offset, 0, "Strided")
        _check_int("block", self.block, 1, "Strided")
        if self.offset >= self.stride:
            raise ValueError(f"Strided: offset must be in 0..{self.stride - 1} for stride {self.stride}, "
                             f"got {self.offset}")

    @property
    def period(self) -> int:
        """The pattern repeats every stride * block keys."""
        return self.stride * self.block

    def __repr__(self):
        args = [str(self.stride)] + ([str(self.offset)] if self.offset or self.block > 1 else [])
        return f"Strided({', '.join(args + ([f'block={self.block}'] if self.block > 1 else []))})"


@dataclass(frozen=True, repr=False)
class Clustered(Pattern):
    """Content-clustered attention (Routing Transformer): query i sees key j iff their run-time
    cluster ids are equal (and not -1, which means in no cluster). The ids come with each call
    (`pg.attention(..., q_clusters=, kv_clusters=)`; `pg.cluster` computes them by k-means)."""

    def __repr__(self):
        return "Clustered()"


@dataclass(frozen=True, repr=False)
class Routed(Pattern):
    """Content-selected key blocks: query block qb sees key block kb iff kb is among
    the run-time indices of (batch, head, qb); `causal` adds kv <= q.

    Blocks are `block` consecutive tokens of the flattened sequence, for queries
    and keys alike, or with a tuple `block` boxes of that shape on an n-D grid, numbered
    row-major over the grid of boxes (BiFormer's regions); `topk` is the number of index
    slots per query block (-1 marks an unused slot).
    """

    block: IntOrTuple
    topk: int
    causal: bool = False

    def __post_init__(self):
        object.__setattr__(self, "block", _int_or_tuple("block", self.block, 1, "Routed"))
        _check_int("topk", self.topk, 1, "Routed")
        if not isinstance(self.causal, bool):
            raise TypeError(f"Routed: causal must be a bool, got {self.causal!r}")
        if self.causal and isinstance(self.block, tuple):
            raise ValueError(f"Routed: causal=True orders the flattened tokens, which box blocks {self.block} do not "
                             f"follow; box blocks are for grids without causality (give an int block for sequences)")

    @property
    def volume(self) -> int:
        """Tokens per block."""
        return self.block if isinstance(self.block, int) else math.prod(self.block)

    def __repr__(self):
        extra = ", causal=True" if self.causal else ""
        return f"Routed({self.block!r}, {self.topk}{extra})"


class _Composite(Pattern):
    parts: tuple[Pattern, ...]
    _symbol = "?"

    @classmethod
    def of(cls, *parts: Pattern) -> Pattern:
        flat: list[Pattern] = []
        for p in parts:
            for q in (p.parts if type(p) is cls else (p,)):
                if q not in flat:
                    flat.append(q)
        return flat[0] if len(flat) == 1 else cls(tuple(flat))

    def __post_init__(self):
        if not isinstance(self.parts, tuple) or len(self.parts) < 2:
            raise ValueError(f"{type(self).__name__}: needs a tuple of at least two patterns, got {self.parts!r}")
        for p in self.parts:
            _as_pattern(p, self._symbol)

    def children(self):
        return self.parts

    def __repr__(self):
        # `of` would build another node exactly when a part is of this same type (flattened) or
        # repeats an earlier one (dropped): such a node was built by the constructor, so print that
        cls, parts = type(self), self.parts
        for i, p in enumerate(parts):
            if type(p) is cls or p in parts[:i]:
                return f"{cls.__name__}(({', '.join(repr(p) for p in parts)},))"
        return "(" + f" {self._symbol} ".join(repr(p) for p in self.parts) + ")"


@dataclass(frozen=True, repr=False)
class Union(_Composite):
    """Pairs visible in any part."""

    parts: tuple[Pattern, ...]
    _symbol = "|"


@dataclass(frozen=True, repr=False)
class Intersection(_Composite):
    """Pairs visible in every part."""

    parts: tuple[Pattern, ...]
    _symbol = "&"


@dataclass(frozen=True)
class HeadSlice:
    """A hashable stand-in for `slice`, resolved once the number of heads is known."""

    start: int | None
    stop: int | None
    step: int | None

    def heads(self, num_heads: int) -> range:
        return range(*slice(self.start, self.stop, self.step).indices(num_heads))

    def __repr__(self):
        return f"slice({self.start!r}, {self.stop!r}, {self.step!r})"


HeadKey = _U[int, range, HeadSlice]

_HEADS_FORMS = ("Heads takes a list with one pattern per head, a list of (key, pattern) pairs, or a dict "
                "{key: pattern}; keys are int, range or slice. Slices are dict keys only from Python 3.12: "
                "before that write them as pairs, Heads([(slice(0, 2), p), (slice(2, None), q)]), or use "
                "ranges, which work everywhere")


@dataclass(frozen=True, repr=False, init=False)
class Heads(Pattern):
    """Head-wise shards, covering every head exactly once (checked against `Spec.num_heads`):

        Heads([p0, p1, p2, p3])                             one pattern per head
        Heads({0: p, range(1, 4): q})                       int and range keys: any Python
        Heads([(slice(0, 2), p), (slice(2, None), q)])      (key, pattern) pairs: any key, any Python
        Heads({slice(0, 2): p, slice(2, None): q})          slice keys in a dict: Python >= 3.12 only

    A slice is resolved against the number of heads (`slice(2, None)`: head 2 to the last).
    The pair form and the dict form build equal nodes."""

    entries: tuple[tuple[HeadKey, Pattern], ...]
    listed: bool = False

    def __init__(self, patterns: Sequence[Pattern] | Sequence[tuple] | Mapping):
        if isinstance(patterns, Mapping):
            items, listed = list(patterns.items()), False
        elif isinstance(patterns, (list, tuple)):
            pairs = [isinstance(p, tuple) for p in patterns]
            if any(pairs):
                if not all(pairs):
                    raise TypeError(f"Heads: the list mixes (key, pattern) pairs with bare patterns: "
                                    f"{list(patterns)!r}. {_HEADS_FORMS}")
                for p in patterns:
                    if len(p) != 2:
                        raise TypeError(f"Heads: expected (key, pattern) pairs, got {p!r}. {_HEADS_FORMS}")
                items, listed = [tuple(p) for p in patterns], False
            else:
                items, listed = list(enumerate(patterns)), True
        else:
            raise TypeError(f"Heads: expected a list or a dict, got {type(patterns).__name__}. {_HEADS_FORMS}")
        if not items:
            raise ValueError("Heads: needs at least one head pattern")
        entries = []
        for key, pat in items:
            if isinstance(key, slice):
                for part in (key.start, key.stop, key.step):
                    if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                        raise TypeError(f"Heads: slice key {key!r}: start, stop and step must be ints or None")
                if key.step == 0:
                    raise ValueError(f"Heads: slice key {key!r}: step must not be 0")
                key = HeadSlice(key.start, key.stop, key.step)
            elif isinstance(key, bool) or not isinstance(key, (int, range)):
                raise TypeError(f"Heads: head keys must be int, range or slice, got {key!r} "
                                f"({type(key).__name__}). {_HEADS_FORMS}")
            elif isinstance(key, int) and key < 0:
                raise ValueError(f"Heads: head index must be >= 0, got {key}")
            if not isinstance(pat, Pattern):
                raise TypeError(f"Heads: value for head {key!r} must be a pattern, got {pat!r}")
            entries.append((key, pat))
        object.__setattr__(self, "entries", tuple(entries))
        object.__setattr__(self, "listed", listed)

    def children(self):
        return tuple(p for _, p in self.entries)

    def head_entries(self, num_heads: int) -> list[int]:
        """The index into `entries` of each head's entry; every head covered exactly once.
        Linear in num_heads, whatever the keys."""
        owner = [-1] * num_heads
        for e, (key, _) in enumerate(self.entries):
            heads = self.key_heads(key, num_heads)
            if not heads:
                continue
            if not (0 <= heads[0] < num_heads and 0 <= heads[-1] < num_heads):
                h = next(h for h in heads if not 0 <= h < num_heads)
                raise ValueError(f"Heads: key {key!r} names head {h}, but num_heads is {num_heads} "
                                 f"(valid heads: 0..{num_heads - 1})")
            up = heads if heads.step > 0 else heads[::-1]
            span = slice(up.start, up.stop, up.step)
            if owner[span].count(-1) != len(up):
                h = next(h for h in heads if owner[h] >= 0)
                raise ValueError(f"Heads: head {h} is covered twice, by {self.entries[owner[h]][0]!r} and {key!r}")
            owner[span] = [e] * len(up)
        if -1 in owner:
            missing = [h for h, e in enumerate(owner) if e < 0]
            shown = f"{missing[:32]}"[:-1] + ", ...]" if len(missing) > 32 else f"{missing}"
            raise ValueError(f"Heads: heads {shown} are not covered by any entry "
                             f"(num_heads is {num_heads}; every head needs exactly one pattern)")
        return owner

    @staticmethod
    def key_heads(key: HeadKey, num_heads: int) -> range:
        """The heads a key names (not checked against num_heads)."""
        if isinstance(key, int):
            return range(key, key + 1)
        return key.heads(num_heads) if isinstance(key, HeadSlice) else key

    def per_head(self, num_heads: int) -> tuple[Pattern, ...]:
        """The pattern of each head; every head covered exactly once."""
        return tuple(self.entries[e][1] for e in self.head_entries(num_heads))

    def __repr__(self):
        if self.listed:
            return "Heads([" + ", ".join(repr(p) for _, p in self.entries) + "])"
        if any(isinstance(k, HeadSlice) for k, _ in self.entries):
            # (key, pattern) pairs: a dict literal with slice keys is valid Python only from 3.12
            return "Heads([" + ", ".join(f"({k!r}, {p!r})" for k, p in self.entries) + "])"
        return "Heads({" + ", ".join(f"{k!r}: {p!r}" for k, p in self.entries) + "})"


def resolve_heads(pattern: Pattern, head: int, num_heads: int) -> Pattern:
    """The Heads-free pattern that `head` uses: Heads nodes anywhere in the tree
    are replaced by the entry for that head."""
    if isinstance(pattern, Heads):
        return resolve_heads(pattern.per_head(num_heads)[head], head, num_heads)
    if isinstance(pattern, _Composite):
        return type(pattern).of(*(resolve_heads(p, head, num_heads) for p in pattern.parts))
    return pattern


class HeadPatterns(_SequenceABC):
    """The Heads-free pattern of each head (`Spec.head_patterns`): an immutable sequence of
    length num_heads, equal to the tuple of those patterns, that stores each distinct pattern
    once (`unique`, in order of first appearance) and, where heads differ, one index per head.
    Heads that all share one pattern cost nothing per head."""

    def __init__(self, unique: tuple[Pattern, ...], index: tuple[int, ...] | None, length: int):
        self._unique, self._index, self._len = unique, index, length

    @property
    def unique(self) -> tuple[Pattern, ...]:
        """The distinct patterns in order of first appearance (what `dict.fromkeys(self)` gives)."""
        return self._unique

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[h] for h in range(*i.indices(self._len)))
        h = operator.index(i)
        if h < 0:
            h += self._len
        if not 0 <= h < self._len:
            raise IndexError(f"head index {i} out of range for {self._len} head(s)")
        return self._unique[0] if self._index is None else self._unique[self._index[h]]

    def __iter__(self):
        if self._index is None:
            return itertools.repeat(self._unique[0], self._len)
        return map(self._unique.__getitem__, self._index)

    def __contains__(self, pattern) -> bool:
        return self._len > 0 and pattern in self._unique

    def count(self, pattern) -> int:
        if pattern not in self:
            return 0
        return self._len if self._index is None else self._index.count(self._unique.index(pattern))

    def __eq__(self, other):
        if isinstance(other, HeadPatterns):  # both canonical: same unique order, same index
            return self._len == other._len and self._unique == other._unique and self._index == other._index
        if isinstance(other, tuple):
            return len(other) == self._len and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self):
        return hash(tuple(self))

    def __repr__(self):
        if self._index is None:
            return f"({self._unique[0]!r},) * {self._len}"
        return repr(tuple(self))


def head_patterns(pattern: Pattern, num_heads: int) -> HeadPatterns:
    """`resolve_heads(pattern, h, num_heads)` for every head h, as a HeadPatterns: in time
    independent of num_heads when the tree holds no Heads node, and linear in it otherwise."""
    res = _resolve_all(pattern, num_heads)
    if isinstance(res, Pattern):
        return HeadPatterns((res,), None, num_heads)
    pats, index = res
    new: list[int | None] = [None] * len(pats)  # canonical: distinct by equality, first appearance first
    distinct: dict[Pattern, int] = {}
    todo = len(pats)
    for i in index:
        if new[i] is None:
            new[i] = distinct.setdefault(pats[i], len(distinct))
            todo -= 1
            if not todo:
                break
    unique = tuple(distinct)
    if len(unique) == 1:
        return HeadPatterns(unique, None, num_heads)
    return HeadPatterns(unique, tuple(map(new.__getitem__, index)), num_heads)


def _resolve_all(pattern: Pattern, num_heads: int):
    """The pattern of every head: one Pattern when all heads share it, else (patterns, index)
    with index[h] the position in patterns of head h's pattern (patterns may repeat)."""
    if isinstance(pattern, Heads):
        owner = pattern.head_entries(num_heads)
        # entries that name no head (an empty range) are never resolved, as resolve_heads does
        subs = [_resolve_all(p, num_heads) if Heads.key_heads(k, num_heads) else None for k, p in pattern.entries]
        if all(s is None or isinstance(s, Pattern) for s in subs):
            return subs, owner
        pats, index, seen = [], [], {}  # nested Heads: resolve each entry for the head it serves
        for h, e in enumerate(owner):
            s = subs[e]
            key = (e, 0 if isinstance(s, Pattern) else s[1][h])
            if key not in seen:
                seen[key] = len(pats)
                pats.append(s if isinstance(s, Pattern) else s[0][key[1]])
            index.append(seen[key])
        return pats, index
    if isinstance(pattern, _Composite):
        subs = [_resolve_all(p, num_heads) for p in pattern.parts]
        if all(isinstance(s, Pattern) for s in subs):
            return type(pattern).of(*subs)
        varying = [s for s in subs if not isinstance(s, Pattern)]
        pats, index, seen = [], [], {}
        for key in zip(*(s[1] for s in varying)):
            i = seen.get(key)
            if i is None:
                it = iter(key)
                parts = [s if isinstance(s, Pattern) else s[0][next(it)] for s in subs]
                i = seen[key] = len(pats)
                pats.append(type(pattern).of(*parts))
            index.append(i)
        return pats, index
    return pattern


PATTERN_TYPES: Mapping[str, type] = types.MappingProxyType({
    c.__name__: c for c in list(globals().values())
    if isinstance(c, type) and issubclass(c, Pattern) and dataclasses.is_dataclass(c) and c.__module__ == __name__})
"""Every pattern type by class name: each dataclass pattern defined in this module, found here
rather than listed by hand, so a new one is read back by ir/serialize.py and ir/parse.py as is."""
