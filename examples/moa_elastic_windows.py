"""MoA: a mixture of sliding-window spans, a different span per head.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression" (arXiv:2406.14909) give every head its own causal sliding window plus the
initial tokens, with an elastic span that grows with the input: span = alpha + beta * N,
alpha and beta chosen per head by a profiling search. Here on Llama-3-8B's attention shape
(32 query heads, 8 key/value heads, head dim 128) at 8192 tokens, with 64 initial tokens
and four span rules cycling over the heads; the rules are illustrative, not a searched
configuration (which the paper derives per model and layer).
"""
import patterngen as pg

N, SINKS = 8192, 64
RULES = [(1024, 0.0), (512, 0.125), (2048, 0.25), (0, 0.5)]  # (alpha, beta): span = alpha + beta * N


def head(h: int) -> pg.Pattern:
    alpha, beta = RULES[h % len(RULES)]
    span = int(alpha + beta * N)
    return (pg.Sink(SINKS) | pg.Band(span - 1)) & pg.Causal()


spec = pg.Spec(pg.Heads([head(h) for h in range(32)]), q_shape=N, num_heads=32, num_kv_heads=8, head_dim=128)
