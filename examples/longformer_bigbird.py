"""Longformer/BigBird-style encoder attention: sliding window + global tokens (+ strided columns).

Beltagy et al., "Longformer: The Long-Document Transformer" (arXiv:2004.05150):
longformer-base-4096 uses a 512-token window (256 each side), global attention
on task tokens (e.g. [CLS] and the question), 12 heads of dim 64, 4096 tokens.
Zaheer et al. (BigBird, arXiv:2007.14062) combine window, global and random
blocks. The second spec adds Sparse-Transformer-style "summary" columns (Child
et al., arXiv:1904.10509, fixed pattern with c = 1: the last key of every
512-token block is visible to all queries) on a 16384-token LED-sized input;
the random blocks of BigBird are not a static pattern and are left out.
"""
import patterngen as pg

longformer_base = pg.Spec(pg.Band(256, 256) | pg.Global(2), q_shape=4096, num_heads=12, head_dim=64)

spec = pg.Spec(pg.Band(256, 256) | pg.Global(2) | pg.Strided(512, 511), q_shape=16384, num_heads=12, head_dim=64)

specs = [longformer_base, spec]
