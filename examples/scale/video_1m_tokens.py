"""A one-million-token video latent: 64 frames of 128 x 128 tokens (1,048,576 tokens).

Used by `patterngen plan examples/scale/video_1m_tokens.py` to show that the tile
analysis plans a grid of this size in well under a second with box tiles. The
neighbourhoods follow GNA's video setups (Hassani et al., 2025): a dense 3-D
window and a strided, fully block-sparse one.
"""
import patterngen as pg

GRID = (64, 128, 128)

spec = pg.Spec(pg.Window((16, 16, 16)), GRID, num_heads=24, head_dim=128)
strided = pg.Spec(pg.Window((32, 32, 32), stride=(8, 8, 8)), GRID, num_heads=24, head_dim=128)
specs = [spec, strided]
