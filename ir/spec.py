"""`Spec`: a pattern bound to shapes (or to any length), head counts and head dim, validated together."""
from __future__ import annotations

import functools
import math
import operator
import json
from dataclasses import dataclass, field, fields

from .patterns import (JSON_VERSION, JSON_VERSION_KEY, Blocks, Clustered, HeadPatterns, Pattern, Routed, Window,
                       head_patterns, json_value)


def _shape(name: str, value) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"Spec: {name} must be an int or a tuple of ints, got {value!r}")
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise TypeError(f"Spec: {name} must be an int or a non-empty tuple of ints, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"Spec: {name}[{i}] must be an int, got {v!r}")
        v = _static(v)
        if v < 0:
            raise ValueError(f"Spec: {name}[{i}] must be >= 0, got {v}")
        out.append(v)
    return tuple(out)


def _static(v: int) -> int:
    """`v` itself; under torch.compile, a symbolic size (a dynamic tensor dim) specializes to its
    value here (operator.index does that in Dynamo; int() would not), since a Spec is static."""
    return operator.index(v)


def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Spec: {name} must be an int, got {value!r}")
    value = _static(value)
    if value < minimum:
        raise ValueError(f"Spec: {name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Spec:
    """A pattern on a query grid and a key grid (row-major flattening), with head
    counts (GQA: num_heads % num_kv_heads == 0) and head dim. Extents and head counts
    may be 0 (an empty input, as scaled_dot_product_attention takes); head_dim may not.

    Without `q_shape` the spec is length-free: a 1-D pattern for every length, each call
    reading Nq and Nkv from its tensors (queries aligned bottom-right to the keys when they
    differ), so one kernel serves every length. `bind(nq, nkv)` gives the fixed-length spec
    of one call. A grid (an n-D shape, or a `Window`, whose neighbourhoods depend on the
    extents) stays part of its spec."""

    pattern: Pattern
    q_shape: tuple[int, ...] | None = None
    kv_shape: tuple[int, ...] | None = None
    num_heads: int = 1
    num_kv_heads: int | None = None
    head_dim: int = 64
    _heads: HeadPatterns = field(default=(), init=False, repr=False, compare=False, hash=False)
    routed: Routed | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    clustered: bool = field(default=False, init=False, repr=False, compare=False, hash=False)
    """The Routed node of this spec (all share block and topk), or None."""
    _nq: int | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    _nkv: int | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    _hash: int = field(default=0, init=False, repr=False, compare=False, hash=False)

    def __hash__(self) -> int:  # kept: specs key the caches of every call, and a pattern tree hashes deep
        return self._hash

    def _fields_hash(self) -> int:
        """The hash of the fields equality compares (what the dataclass's own hash would be)."""
        return hash((self.pattern, self.q_shape, self.kv_shape, self.num_heads, self.num_kv_heads, self.head_dim))

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"Spec: pattern must be a patterngen pattern, got {self.pattern!r}")
        if self.q_shape is None:
            if self.kv_shape is not None:
                raise ValueError(f"Spec: kv_shape={self.kv_shape!r} needs a q_shape; a length-free spec (no "
                                 f"q_shape) takes both lengths from each call's tensors")
            q_shape = kv_shape = None
        else:
            q_shape = _shape("q_shape", self.q_shape)
            kv_shape = q_shape if self.kv_shape is None else _shape("kv_shape", self.kv_shape)
        num_heads = _count("num_heads", self.num_heads, 0)  # zero heads, like zero tokens: an empty result
        num_kv_heads = num_heads if self.num_kv_heads is None else _count("num_kv_heads", self.num_kv_heads, 0)
        if num_kv_heads == 0 and num_heads:
            raise ValueError(f"Spec: num_kv_heads must be >= 1 when num_heads is {num_heads}, got 0")
        if num_kv_heads and num_heads % num_kv_heads:
            raise ValueError(f"Spec: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads}) for grouped-query attention")
        head_dim = _count("head_dim", self.head_dim)
        object.__setattr__(self, "q_shape", q_shape)
        object.__setattr__(self, "kv_shape", kv_shape)
        if q_shape is not None:  # plain attributes: the semantics read them per node of a pattern
            object.__setattr__(self, "_nq", math.prod(q_shape))
            object.__setattr__(self, "_nkv", math.prod(kv_shape))
        object.__setattr__(self, "num_heads", num_heads)
        object.__setattr__(self, "num_kv_heads", num_kv_heads)
        object.__setattr__(self, "head_dim", head_dim)
        heads = head_patterns(self.pattern, num_heads)  # O(1) in num_heads without a Heads node
        object.__setattr__(self, "_heads", heads)
        routed, first_routed = set(), None
        for pat in heads.unique:
            for node in pat.walk():
                self._check_node(node)
                if isinstance(node, Routed):
                    routed.add((node.block, node.topk))
                    if first_routed is None:
                        first_routed = node
        if len(routed) > 1:
            raise ValueError(f"Spec: all Routed nodes must share (block, topk), since one index tensor "
                             f"serves them all; got {sorted(routed, key=repr)}")
        if first_routed is not None and isinstance(first_routed.block, tuple):
            self._check_box_routed(first_routed, heads)
        # plain attributes, not cached properties: torch.compile traces reads of them
        object.__setattr__(self, "routed", first_routed)
        object.__setattr__(self, "clustered", any(isinstance(n, Clustered) for p in heads.unique for n in p.walk()))
        object.__setattr__(self, "_hash", self._fields_hash())

    # -- geometry --------------------------------------------------------------
    @property
    def length_free(self) -> bool:
        """No fixed lengths: every call reads Nq and Nkv from its tensors (`bind`)."""
        return self.q_shape is None

    @property
    def ndim(self) -> int:
        return 1 if self.q_shape is None else len(self.q_shape)

    @property
    def nq(self) -> int:
        if self._nq is None:
            self._length_free_error()
        return self._nq

    @property
    def nkv(self) -> int:
        if self._nkv is None:
            self._length_free_error()
        return self._nkv

    def _length_free_error(self):
        raise ValueError(f"{self!r} is length-free: its lengths come from each call's tensors; "
                         f"spec.bind(nq, nkv) gives the spec of one call")

    def bind(self, nq: int, nkv: int | None = None) -> "Spec":
        """The fixed-length spec of a call with `nq` queries and `nkv` keys (default nq); a
        fixed-length spec returns itself when the lengths are its own (ValueError otherwise)."""
        nq = _count("nq", nq, 0)
        nkv = nq if nkv is None else _count("nkv", nkv, 0)
        if not self.length_free:
            if (nq, nkv) != (self.nq, self.nkv):
                raise ValueError(f"Spec.bind: this spec has fixed lengths nq={self.nq}, nkv={self.nkv}; got "
                                 f"nq={nq}, nkv={nkv} (a spec without q_shape takes any length)")
            return self
        return _bound(self, nq, nkv)

    def unbound(self) -> "Spec":
        """The length-free spec with this spec's pattern and heads (itself when length-free);
        ValueError for a grid, which gives the pattern its meaning."""
        if self.length_free:
            return self
        if self.ndim != 1 or any(isinstance(n, Window) for p in self._heads.unique for n in p.walk()):
            raise ValueError(f"{self!r}: a spec on a grid or with a Window keeps its shape")
        return Spec(self.pattern, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

    @property
    def head_patterns(self) -> HeadPatterns:
        """The Heads-free pattern of each query head: a sequence of num_heads patterns, equal to
        their tuple, that stores each distinct pattern once (`.unique`, in order of first appearance)."""
        return self._heads

    # -- validation against shapes ---------------------------------------------
    def _check_box_routed(self, node: Routed, heads: HeadPatterns) -> None:
        """Box blocks (BiFormer's regions): one grid for queries and keys, cut into whole boxes."""
        if self.q_shape is None or len(node.block) != self.ndim or self.q_shape != self.kv_shape:
            raise ValueError(f"Spec: {node!r} has box blocks of {len(node.block)} dimension(s): it needs one grid of "
                             f"as many dimensions for queries and keys, got q_shape={self.q_shape}, "
                             f"kv_shape={self.kv_shape}")
        bad = [k for k, (n, b) in enumerate(zip(self.q_shape, node.block)) if n % b]
        if bad:
            raise ValueError(f"Spec: {node!r} must cut the grid {self.q_shape} into whole boxes; dimension "
                             f"{bad[0]} ({self.q_shape[bad[0]]}) is not a multiple of {node.block[bad[0]]} "
                             f"(pad the grid, as BiFormer pads its feature map)")

    def _check_blocks(self, node: Blocks) -> None:
        """1-D: blocks of the flattened tokens, any lengths (queries aligned bottom-right to the
        keys); on a grid: blocks per dimension, one grid for queries and keys."""
        ndim = 1 if self.q_shape is None else self.ndim
        if node.ndim is not None and node.ndim != ndim:
            raise ValueError(f"Spec: {node!r} has {node.ndim} dimension(s) but the spec has {ndim}"
                             + ("" if self.q_shape is None else f" (q_shape={self.q_shape})")
                             + ("; a length-free spec is 1-D: give q_shape for blocks on a grid"
                                if self.q_shape is None else ""))
        if ndim > 1 and self.q_shape != self.kv_shape:
            raise ValueError(f"Spec: Blocks on a grid needs the same grid for queries and keys; got "
                             f"q_shape={self.q_shape} and kv_shape={self.kv_shape}")

    def _check_node(self, node: Pattern) -> None:
        if isinstance(node, Blocks):
            self._check_blocks(node)
            return
        if self.q_shape is None:
            if isinstance(node, Window):
                raise ValueError(f"Spec: {node!r} needs a grid: a neighbourhood depends on the grid's extents, so "
                                 f"give q_shape (for a length-free sliding window use Band(left, right))")
            return  # Routed's topk is checked against each call's key blocks (bind)
        if isinstance(node, Window):
            if self.q_shape != self.kv_shape:
                raise ValueError(f"Spec: Window needs the same grid for queries and keys; got "
                                 f"q_shape={self.q_shape} and kv_shape={self.kv_shape}")
            if node.ndim is not None and node.ndim != self.ndim:
                raise ValueError(f"Spec: {node!r} has {node.ndim} dimension(s) but q_shape={self.q_shape} "
                                 f"has {self.ndim}")
            for k, ((w, s, d, _), n) in enumerate(zip(node.dims(self.ndim), self.q_shape)):
                if n == 0:
                    raise ValueError(f"Spec: {node!r} needs a non-empty grid; dimension {k} of "
                                     f"q_shape={self.q_shape} is 0")
                if w > n:
                    raise ValueError(f"Spec: {node!r}: window size {w} in dimension {k} is larger than the "
                                     f"grid extent {n} (valid sizes: {'2..' if n > 1 else ''}{n})")
                if w < 2 and w != n:
                    raise ValueError(f"Spec: {node!r}: window size in dimension {k} must be >= 2 or equal to "
                                     f"the extent {n}, got {w}")
                if w * d > n:
                    raise ValueError(f"Spec: {node!r}: size * dilation in dimension {k} is {w} * {d} = {w * d}, "
                                     f"larger than the grid extent {n}")
        elif isinstance(node, Routed):
            nkb = -(-self.nkv // node.volume)
            if node.topk > nkb and self.nkv:  # without keys there is nothing to route
                raise ValueError(f"Spec: {node!r}: topk {node.topk} exceeds the {nkb} key blocks of "
                                 f"{node.volume} tokens (valid: 1..{nkb})")

    def __repr__(self):
        args = [repr(self.pattern)] + ([] if self.q_shape is None else [f"q_shape={self.q_shape!r}"])
        if self.kv_shape != self.q_shape:
            args.append(f"kv_shape={self.kv_shape!r}")
        args.append(f"num_heads={self.num_heads}")
        if self.num_kv_heads != self.num_heads:
            args.append(f"num_kv_heads={self.num_kv_heads}")
        args.append(f"head_dim={self.head_dim}")
        return f"Spec({', '.join(args)})"

    def to_dict(self) -> dict:
        """The versioned JSON-able dict form (read back by `from_json`, ir/serialize.py)."""
        return {JSON_VERSION_KEY: JSON_VERSION, "type": "Spec",
                **{f.name: json_value(getattr(self, f.name), f"$.{f.name}") for f in fields(self) if f.init}}

    def to_json(self, indent: int | None = None) -> str:
        """`to_dict()` as JSON text (the same Spec always gives the same text)."""
        return json.dumps(self.to_dict(), indent=indent)


@functools.lru_cache(maxsize=256)
def _bound(spec: Spec, nq: int, nkv: int) -> Spec:
    """`spec.bind(nq, nkv)` of a length-free spec; the most recent 256 (spec, lengths) are kept.
    A copy of the validated length-free spec with its lengths set (a decoding step binds a new
    length each time): only the checks that involve lengths run again."""
    bound = object.__new__(Spec)
    bound.__dict__.update(spec.__dict__)
    bound.__dict__.update(q_shape=(nq,), kv_shape=(nkv,), _nq=nq, _nkv=nkv)
    bound.__dict__["_hash"] = bound._fields_hash()
    if spec.routed is not None:
        bound._check_node(spec.routed)
    return bound
