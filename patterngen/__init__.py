"""patterngen: a compiler for sparse attention patterns."""
from .version import __version__

from .ir import (Band, Causal, Full, Global, Heads, Intersection, Pattern, Routed, Sink, Spec, Strided, Union,
                 Window)
from .ir import from_json
from .oracle import dense_mask
from .plan import Plan, TilePlan, build_plan
from .routing import route
from .head_routing import gate_heads, route_heads
from .tiles import TileGrid, Tiling
from .api import attention, compile
from .dispatch import explain
from .sim import simulate
from .aot import load
