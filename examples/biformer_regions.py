"""BiFormer: bi-level routing attention, query regions routed to their top-k key regions.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention"
(arXiv:2303.08125): the feature map is cut into S x S regions; each query region scores
every key region by the product of their mean query and mean key, keeps the top k, and its
tokens attend to the tokens of those regions. On BiFormer-T's first stage at 224 x 224 input:
a 56 x 56 map in 7 x 7 regions of 8 x 8 tokens (S = 7), top-4 regions, 2 heads of dim 32
(BiFormer pads maps to a multiple of the region size; 56 is one). `Routed((8, 8), 4)` takes
the regions on the image layout itself; `pg.route(q, k, (8, 8), 4)` on grid-shaped q and k
[B, H, 56, 56, D] picks them as BiFormer does, keeping each region's own.
"""
import patterngen as pg

spec = pg.Spec(pg.Routed((8, 8), 4), q_shape=(56, 56), num_heads=2, head_dim=32)
