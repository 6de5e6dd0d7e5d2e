"""2-D neighborhood attention for image diffusion transformers.

`spec`: FLUX.1-dev (24 heads, head_dim 128) generating 4096 x 4096 pixels: the
8x VAE and 2x2 patches give a 256 x 256 token grid. Window 80 x 80 with stride
16 x 16 is a Generalized Neighborhood Attention configuration (Hassani et al.,
"Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the
Speed of Light", arXiv:2504.16922) whose windows align with 16 x 16 tiles, so it
is fully block-sparse; 256*256 / (80*80) = 10.24x fewer FLOPs than full
attention.

`hdit`: a 64 x 64 latent grid with a 7 x 7 neighborhood (stride 1), the local
attention of Crowson et al.'s Hourglass Diffusion Transformer (arXiv:2401.11605)
at its high-resolution levels; 4 heads of dim 64 are illustrative.
"""
import patterngen as pg

spec = pg.Spec(pg.Window((80, 80), stride=(16, 16)), q_shape=(256, 256), num_heads=24, head_dim=128)

hdit = pg.Spec(pg.Window((7, 7)), q_shape=(64, 64), num_heads=4, head_dim=64)

specs = [spec, hdit]
