"""StreamingLLM: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks"
(arXiv:2309.17453): keeping the KV of the first 4 tokens (the sinks) next to a
rolling window of recent tokens keeps perplexity stable at any length. Here 4
sinks and the last 1024 tokens (the query itself included), on Llama-2-7B's
attention shape (32 heads, no GQA, head_dim 128) streaming 32768 tokens.
"""
import patterngen as pg

spec = pg.Spec((pg.Sink(4) | pg.Band(1023)) & pg.Causal(), q_shape=32768, num_heads=32, head_dim=128)
