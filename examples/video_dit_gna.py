"""3-D strided neighborhood attention (GNA) for a video diffusion transformer.

HunyuanVideo (Kong et al., arXiv:2412.03603; 24 heads, head_dim 128) at
768 x 1280 pixels and 117 frames: the causal 3-D VAE (4x in time, 8x in space)
and 1x2x2 patches give 30 x 48 x 80 = 115200 tokens. The window 18 x 24 x 24
with stride 16 x 8 x 8 is a strided Generalized Neighborhood Attention setting
(Hassani et al., arXiv:2504.16922): queries in a 16 x 8 x 8 group share one
window, which lets tiles of that shape be fully visible or fully skipped.
"""
import patterngen as pg

spec = pg.Spec(pg.Window((18, 24, 24), stride=(16, 8, 8)), q_shape=(30, 48, 80), num_heads=24, head_dim=128)
