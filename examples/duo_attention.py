"""DuoAttention: retrieval heads with full attention, streaming heads with sinks + window.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads" (arXiv:2410.10819) keep full causal attention only on the
heads identified as retrieval heads (about 25% of heads for MHA models) and give
the others attention sinks plus a recent window. On Llama-2-7B's attention shape
(32 heads, head_dim 128) at 32768 tokens: the first 8 heads retrieve, the other
24 stream with 4 sinks and 1024 recent tokens. The real head choice is learned
per layer; contiguous ranges keep the example readable.
"""
import patterngen as pg

streaming = (pg.Sink(4) | pg.Band(1023)) & pg.Causal()
spec = pg.Spec(pg.Heads({range(0, 8): pg.Causal(), range(8, 32): streaming}),
               q_shape=32768, num_heads=32, head_dim=128)
