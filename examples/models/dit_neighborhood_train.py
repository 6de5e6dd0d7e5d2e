"""Training a small DiT-style block with 2-D neighborhood attention.

A Diffusion Transformer block (Peebles & Xie, "Scalable Diffusion Models with
Transformers", arXiv:2212.09748: patch embedding, adaLN-Zero modulation by the
timestep, attention, MLP) whose attention is 5 x 5 neighborhood attention on the
8 x 8 token grid (Hassani et al., "Neighborhood Attention Transformer",
arXiv:2204.07143), run by `pg.attention`. It trains for a few steps on a random
regression target on CPU, and its gradients are checked against the same block
running dense `scaled_dot_product_attention` with the pattern's dense mask.

    python examples/models/dit_neighborhood_train.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import patterngen as pg

IMAGE, PATCH, CHANNELS = 32, 4, 3
GRID = (IMAGE // PATCH, IMAGE // PATCH)  # 8 x 8 tokens
DIM, HEADS = 32, 2
SPEC = pg.Spec(pg.Window((5, 5)), q_shape=GRID, num_heads=HEADS, head_dim=DIM // HEADS)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps t [B] -> [B, dim]."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class NeighborhoodDiTBlock(nn.Module):
    """Patch embed -> adaLN-modulated attention on the token grid -> adaLN-modulated MLP -> per-patch output.

    `dense=True` runs the same weights through dense SDPA with `pg.dense_mask(SPEC)`: the reference."""

    def __init__(self, dense: bool = False):
        super().__init__()
        self.dense = dense
        self.embed = nn.Conv2d(CHANNELS, DIM, PATCH, stride=PATCH)
        self.pos = nn.Parameter(0.02 * torch.randn(1, SPEC.nq, DIM))
        self.time = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, 6 * DIM))
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(approximate="tanh"), nn.Linear(4 * DIM, DIM))
        self.out = nn.Linear(DIM, PATCH * PATCH * CHANNELS)
        self.register_buffer("mask", pg.dense_mask(SPEC), persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return pg.attention(q, k, v, SPEC)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] image, t [B] timesteps -> [B, N, PATCH*PATCH*C] per-patch prediction."""
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # [B, N, DIM], row-major grid order
        shift1, scale1, gate1, shift2, scale2, gate2 = self.time(timestep_embedding(t, DIM))[:, None].chunk(6, -1)
        y = self.norm1(h) * (1 + scale1) + shift1
        b, n, _ = y.shape
        q, k, v = self.qkv(y).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        a = self.attend(q, k, v).transpose(1, 2).reshape(b, n, DIM)
        h = h + gate1 * self.proj(a)
        h = h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)
        return self.out(h)


def make_batch(batch: int = 4, seed: int = 0):
    """A fixed random batch: images, timesteps and a random regression target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, SPEC.nq, PATCH * PATCH * CHANNELS, generator=g)
    return x, t, target


def make_pair(seed: int = 0) -> tuple[NeighborhoodDiTBlock, NeighborhoodDiTBlock]:
    """The patterngen block and a dense-reference block with identical weights."""
    torch.manual_seed(seed)
    ours = NeighborhoodDiTBlock()
    ref = NeighborhoodDiTBlock(dense=True)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def train(block: nn.Module, batch, steps: int = 20, lr: float = 3e-3) -> list[float]:
    """`steps` Adam steps on the batch's MSE; returns the loss before each step and after the last."""
    x, t, target = batch
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(block(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.mse_loss(block(x, t), target).item())
    return losses


def main() -> None:
    batch = make_batch()
    ours, ref = make_pair()
    x, t, target = batch
    for block in (ours, ref):
        F.mse_loss(block(x, t), target).backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    err = max((p.grad - grads[n]).abs().max().item() for n, p in ours.named_parameters())
    print(f"{SPEC}\nmax |grad(patterngen) - grad(dense SDPA + dense_mask)| = {err:.2e}")
    ours.zero_grad()
    losses = train(ours, batch)
    print("loss: " + " ".join(f"{v:.4f}" for v in losses[::5]))


if __name__ == "__main__":
    main()
