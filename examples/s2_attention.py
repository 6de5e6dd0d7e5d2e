"""S2-Attention: heads that share the context by strided shards.

Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads"
(arXiv:2407.17678): every head keeps a local window and, beyond it, a strided
subset of the context whose offset differs between heads, so that the heads
together cover every token. Here, on Llama-2-7B's attention shape (32 heads,
head_dim 128) at 32768 tokens: a 1024-token local band plus every 8th key,
head h taking offset h % 8. S2's own kernel strides over 64-token blocks; this
token-level stride is the finer variant, and `patterngen show` makes its cost
visible (every tile is partial).
"""
import patterngen as pg

K = 8
spec = pg.Spec(pg.Heads([(pg.Band(1023) | pg.Strided(K, offset=h % K)) & pg.Causal() for h in range(32)]),
               q_shape=32768, num_heads=32, head_dim=128)
