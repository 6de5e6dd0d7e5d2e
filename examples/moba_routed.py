"""MoBA: mixture of block attention, content-routed key blocks.

Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs"
(arXiv:2502.13189): keys are split into blocks, every query block scores them by
the mean key of each block, keeps the top-k and always its own block (causally).
The paper's scaling-law setting is 8192 tokens, block 512, top-k 3 (81.25%
sparse). Heads: Llama-3-8B's shape (32 query heads, 8 key/value heads,
head_dim 128). The blocks are chosen at run time (`patterngen.route`); the
command line routes random queries and keys to count tiles.
"""
import patterngen as pg

spec = pg.Spec(pg.Routed(512, 3, causal=True), q_shape=8192, num_heads=32, num_kv_heads=8, head_dim=128)
