"""patterngen: a compiler for sparse attention patterns."""
from .version import __version__

from .ir import (Band, Blocks, Causal, Clustered, Full, Global, Heads, Intersection, Pattern, Routed, Sink, Spec,
                 Strided, Union, Window)
from .ir import from_json
from .core.oracle import dense_mask
from .analysis.plan import Plan, TilePlan, build_plan
from .analysis.keep import kv_keep
from .routing.blocks import route
from .routing.heads import gate_heads, route_heads
from .core.tiles import TileGrid, Tiling
from .api import attention, compile
from .clusters import cluster
from .dispatch import explain
from .sim import simulate
from .aot import load
from . import distributed
