"""Pattern primitives and their composition.

Nodes are frozen dataclasses: immutable, hashable (so a spec can key caches and
be captured by a compiled graph) and printed as the Python that builds them.
Each node checks what it can on its own at construction; what depends on the
shapes is checked by `Spec` (see `ir/spec.py`).
"""
from __future__ import annotations

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
    """kv % stride == offset on the flattened index."""

    stride: int
    offset: int = 0

    def __post_init__(self):
        _check_int("stride", self.stride, 1, "Strided")
        _check_int("offset", self.offset, 0, "Strided")
        if self.offset >= self.stride:
            raise ValueError(f"Strided: offset must be in 0..{self.stride - 1} for stride {self.stride}, "
                             f"got {self.offset}")

    def __repr__(self):
        return f"Strided({self.stride}, {self.offset})" if self.offset else f"Strided({self.stride})"


@dataclass(frozen=True, repr=False)
class Routed(Pattern):
    """Content-selected key blocks: query block qb sees key block kb iff kb is among
    the run-time indices of (batch, head, qb); `causal` adds kv <= q.

    Blocks are `block` consecutive tokens of the flattened sequence, for queries
    and keys alike; `topk` is the number of index slots per query block (-1
    marks an unused slot).
    """

    block: int
    topk: int
    causal: bool = False

    def __post_init__(self):
        _check_int("block", self.block, 1, "Routed")
        _check_int("topk", self.topk, 1, "Routed")
        if not isinstance(self.causal, bool):
            raise TypeError(f"Routed: causal must be a bool, got {self.causal!r}")

    def __repr__(self):
        extra = ", causal=True" if self.causal else ""
        return f"Routed({self.block}, {self.topk}{extra})"


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


@dataclass(frozen=True, repr=False, init=False)
class Heads(Pattern):
    """Head-wise shards: one pattern per head, or a mapping {int | range | slice: pattern}
    that must cover every head exactly once (checked against `Spec.num_heads`)."""

    entries: tuple[tuple[HeadKey, Pattern], ...]
    listed: bool = False

    def __init__(self, patterns: Sequence[Pattern] | Mapping):
        if isinstance(patterns, Mapping):
            items, listed = list(patterns.items()), False
        elif isinstance(patterns, (list, tuple)):
            items, listed = list(enumerate(patterns)), True
        else:
            raise TypeError(f"Heads: expected a list of patterns (one per head) or a dict "
                            f"{{int | range | slice: pattern}}, got {type(patterns).__name__}")
        if not items:
            raise ValueError("Heads: needs at least one head pattern")
        entries = []
        for key, pat in items:
            if isinstance(key, slice):
                key = HeadSlice(key.start, key.stop, key.step)
            elif isinstance(key, bool) or not isinstance(key, (int, range)):
                raise TypeError(f"Heads: head keys must be int, range or slice, got {key!r}")
            elif isinstance(key, int) and key < 0:
                raise ValueError(f"Heads: head index must be >= 0, got {key}")
            if not isinstance(pat, Pattern):
                raise TypeError(f"Heads: value for head {key!r} must be a pattern, got {pat!r}")
            entries.append((key, pat))
        object.__setattr__(self, "entries", tuple(entries))
        object.__setattr__(self, "listed", listed)

    def children(self):
        return tuple(p for _, p in self.entries)

    def per_head(self, num_heads: int) -> tuple[Pattern, ...]:
        """The pattern of each head; every head covered exactly once."""
        owner: dict[int, HeadKey] = {}
        out: list[Pattern | None] = [None] * num_heads
        for key, pat in self.entries:
            heads = [key] if isinstance(key, int) else (key.heads(num_heads) if isinstance(key, HeadSlice) else key)
            for h in heads:
                if not 0 <= h < num_heads:
                    raise ValueError(f"Heads: key {key!r} names head {h}, but num_heads is {num_heads} "
                                     f"(valid heads: 0..{num_heads - 1})")
                if h in owner:
                    raise ValueError(f"Heads: head {h} is covered twice, by {owner[h]!r} and {key!r}")
                owner[h] = key
                out[h] = pat
        missing = [h for h in range(num_heads) if out[h] is None]
        if missing:
            raise ValueError(f"Heads: heads {missing} are not covered by any entry "
                             f"(num_heads is {num_heads}; every head needs exactly one pattern)")
        return tuple(out)  # type: ignore[arg-type]

    def __repr__(self):
        if self.listed:
            return "Heads([" + ", ".join(repr(p) for _, p in self.entries) + "])"
        return "Heads({" + ", ".join(f"{k!r}: {p!r}" for k, p in self.entries) + "})"


def resolve_heads(pattern: Pattern, head: int, num_heads: int) -> Pattern:
    """The Heads-free pattern that `head` uses: Heads nodes anywhere in the tree
    are replaced by the entry for that head."""
    if isinstance(pattern, Heads):
        return resolve_heads(pattern.per_head(num_heads)[head], head, num_heads)
    if isinstance(pattern, _Composite):
        return type(pattern).of(*(resolve_heads(p, head, num_heads) for p in pattern.parts))
    return pattern


LEAVES = (Full, Causal, Window, Band, Sink, Global, Strided, Routed)
