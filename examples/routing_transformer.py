"""Routing Transformer: each query attends to the keys of its own k-means cluster.

Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers"
(arXiv:2003.05997): queries and keys are assigned to shared centroids by online k-means,
and a query sees the keys of its cluster (causally, in language modelling), about sqrt(N)
clusters for N tokens. The paper's models mix routing heads with local attention heads in a
layer. On its PG-19 setting, 8192 tokens, 8 heads of dim 128: here four local heads (a causal
window of 256 keys) and four routing heads. The cluster ids come with each call
(`pg.attention(..., q_clusters=, kv_clusters=)`; `pg.cluster` computes them): the local heads
run on the generated kernels, the routing heads sorted by cluster at their true positions
(`patterngen/runtime.py`).
"""
import patterngen as pg

spec = pg.Spec(pg.Heads({range(0, 4): pg.Band(255, 0), range(4, 8): pg.Clustered() & pg.Causal()}),
               q_shape=8192, num_heads=8, head_dim=128)
