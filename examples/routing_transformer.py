"""Routing Transformer: each query attends to the keys of its own k-means cluster.

Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers"
(arXiv:2003.05997): queries and keys are assigned to shared centroids by online k-means,
and a query sees the keys of its cluster (causally, in language modelling), about sqrt(N)
clusters for N tokens. On its PG-19 setting, 8192 tokens, 8 heads of dim 128: the ids come
with each call (`pg.attention(..., q_clusters=, kv_clusters=)`, `pg.cluster` computes them);
here with the causal mask. The heads of the paper mix routing with local attention; the
local heads are the band patterns of the other examples.
"""
import patterngen as pg

spec = pg.Spec(pg.Clustered() & pg.Causal(), q_shape=8192, num_heads=8, head_dim=128)
