"""The pattern language: primitives, composition, head-wise shards and `Spec`.

This package depends on nothing else of patterngen.
"""
from .patterns import (Band, Blocks, Causal, Clustered, Full, Global, Heads, Intersection, Pattern, Routed, Sink,
                       Strided, Union, Window, resolve_heads)
from .spec import Spec
from .serialize import from_json

__all__ = ["Band", "Blocks", "Causal", "Clustered", "Full", "Global", "Heads", "Intersection", "Pattern", "Routed",
           "Sink", "Strided", "Union", "Window", "Spec", "resolve_heads", "from_json"]
