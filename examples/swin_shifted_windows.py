"""Swin Transformer: attention inside windows, the windows shifted by half between layers.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(arXiv:2103.14030). A layer attends within 7 x 7 windows of the feature map (W-MSA); the
next shifts the partition by 3 tokens (SW-MSA), which Swin computes by rolling the map and
masking the windows that the roll wrapped around. `Blocks(7, shift=3)` states the shifted
layer directly: the partial windows at the borders are exactly Swin's masked regions, with no
roll. Shapes of Swin-T's first stage at 224 x 224 input: a 56 x 56 map, 3 heads of dim 32.
"""
import patterngen as pg

regular = pg.Spec(pg.Blocks(7), q_shape=(56, 56), num_heads=3, head_dim=32)
shifted = pg.Spec(pg.Blocks(7, shift=3), q_shape=(56, 56), num_heads=3, head_dim=32)
specs = [regular, shifted]
