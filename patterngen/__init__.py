"""patterngen: a compiler for sparse attention patterns."""
from .ir import (Band, Causal, Full, Global, Heads, Intersection, Pattern, Routed, Sink, Spec, Strided, Union,
                 Window)
from .oracle import dense_mask
from .routing import route
