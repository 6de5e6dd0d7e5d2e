"""S2-Attention: heads that share the context by strided shards of key blocks.

Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads"
(arXiv:2407.17678), and its kernel library DKernel: every head keeps the most recent keys
and, beyond them, every `vert_stride`-th block of 64 keys, the blocks shifted by one per
head so that the heads together cover every block. DKernel's rule for head h: key block b
is strided-visible iff (b + 1 + h) % vert_stride == 0, i.e. `Strided(vert_stride,
offset=(vert_stride - 1 - h) % vert_stride, block=64)`. Here on Llama-2-7B's attention
shape (32 heads, head dim 128) at 32768 tokens, vert_stride 8 and 16 local blocks.

The strided part is fully block-sparse at 64-key tiles (`patterngen show`: no partial tile
outside the diagonal and the band's edge). DKernel's local part is block-aligned (a query
of block i sees blocks i-15..i); here it is the token band of the same width, which holds
those blocks and, for a query early in its block, up to 63 keys before them.
"""
import patterngen as pg

VERT_STRIDE, BLOCK, LOCAL_BLOCKS = 8, 64, 16
spec = pg.Spec(pg.Heads([(pg.Band(LOCAL_BLOCKS * BLOCK - 1)
                          | pg.Strided(VERT_STRIDE, (VERT_STRIDE - 1 - h) % VERT_STRIDE, block=BLOCK)) & pg.Causal()
                         for h in range(32)]),
               q_shape=32768, num_heads=32, head_dim=128)
