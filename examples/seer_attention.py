"""SeerAttention: learned block gates choose the key blocks each query block attends to.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs"
(arXiv:2410.13276) pool queries and keys per 64-token block, score the block pairs with a
learned gate (AttnGate) and keep the top blocks, at 90% block sparsity in its long-context
results. Here on Llama-3-8B's shape (32 query heads, 8 key/value heads, head dim 128) at
32768 tokens: 64-token blocks, the top 52 of 512 key blocks (about 10%) per query block,
causal. patterngen takes the chosen blocks at run time (`block_indices`): the learned gate
is the model's; `patterngen.route` (mean pooling, as MoBA) stands in for it on the command
line. HiP attention's hierarchically pruned blocks run the same way.
"""
import patterngen as pg

spec = pg.Spec(pg.Routed(64, 52, causal=True), q_shape=32768, num_heads=32, num_kv_heads=8, head_dim=128)
