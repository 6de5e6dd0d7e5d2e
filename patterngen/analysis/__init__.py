"""Tile analysis: classify (q tile, kv tile) pairs as empty, partial or full.

Nothing here materialises the Nq x Nkv mask. Each primitive classifies tile
pairs exactly in closed form on the representation that suits it:

* `Window` factors over dimensions, so a box pair is visible somewhere iff it
  is in every dimension; per dimension the visible key range of a query is an
  interval [lo(x), hi(x)] (in dilation-group coordinates) with lo and hi
  non-decreasing in x, which makes interval-pair questions exact with a
  binary search.
* `Band`/`Causal` act on the flattened index: the key-minus-query differences
  of two runs of consecutive tokens form an interval.
* `Sink`/`Strided`/`Full` depend on the key alone: one scan over the keys.
* `Global` is a threshold on query or key: tile minima and maxima decide.
* `Routed` counts selected blocks under a tile pair with 2-D prefix sums.

Compositions: a union or an intersection of exact children is exact except
where two children are partial on the same tile (a union may then be full,
an intersection empty); only those tiles are refined by evaluating the
element-wise semantics on the tile's tokens. Intersections evaluate their most
selective child first and ask the others only about its tiles.

Flattened-index patterns (Full, Causal, Band, Sink, Global, Strided under any
unions and intersections) on tiles of consecutive tokens skip all of that:
`FlatForm` writes them as a union of terms (a delta interval, a query prefix, a
key-only pattern) and classifies every tile pair in closed form, per q tile and
per run of kv tiles, so a plan costs time in the tile count, never in tokens
(see the section "flattened-index patterns in closed form").

Modules: `windows` (one dimension of a Window on intervals), `key_only` (counts of
key-only patterns), `flat_index` (flattened-index patterns in closed form), `classify`
(the tile classifier over the pattern tree), `plan` (per-head plans built from it) and
`tiling` (the one default tiling policy).
"""
from .classify import TileAnalysis, has_routed
from .flat_index import FlatForm, flat_form, flat_terms
from .key_only import KvCount, kv_count_ok, kv_tile_status
from .windows import window_hull, window_interval_status

__all__ = ["FlatForm", "KvCount", "TileAnalysis", "flat_form", "flat_terms", "has_routed", "kv_count_ok",
           "kv_tile_status", "window_hull", "window_interval_status"]
