"""Mistral 7B: causal sliding-window attention.

Numbers from Jiang et al., "Mistral 7B" (arXiv:2310.06825), Table 1: 32 query
heads, 8 key/value heads (GQA), head_dim 128, window_size 4096; 32768 tokens
is the model's max_position_embeddings in its released configuration.

Window convention: the reference implementation (a bottom-right local causal
mask of window 4096 in xformers/FlashAttention, window_size=(4095, 0)) lets a
query see itself and the 4095 keys before it, i.e. 4096 keys. The paper's prose
("positions between i - W and i") would be one key more, Band(4096).
"""
import patterngen as pg

spec = pg.Spec(pg.Band(4095) & pg.Causal(), q_shape=32768, num_heads=32, num_kv_heads=8, head_dim=128)
