"""A Mixture-of-Head attention layer whose unchosen heads are never computed.

MoH (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention",
arXiv:2410.11842) treats heads as experts: per token, a few shared heads are always
on, a router picks the top-k of the others, and the layer's output is the
gate-weighted sum of only those heads. Here the selection goes to `pg.attention`
as `head_indices`, so (on CUDA) only the chosen (token, head) pairs are computed;
the gates come from `pg.route_heads` and weigh the heads before the output
projection. The router learns through the gates (the top-k choice itself is not
differentiable, as in MoH). The attention is causal with 2 sink tokens and a
sliding window, and a small two-layer model learns a next-token task on CPU.

    python examples/models/moh_layer.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import patterngen as pg

SEQ, DIM, HEADS, KV_HEADS = 64, 64, 8, 4
SHARED, TOPK = 2, 2  # 4 of 8 heads per token: 50% of the attention work
VOCAB = 32
SPEC = pg.Spec((pg.Sink(2) | pg.Band(15)) & pg.Causal(), q_shape=SEQ, num_heads=HEADS, num_kv_heads=KV_HEADS,
               head_dim=DIM // HEADS)


class MoHAttention(nn.Module):
    """Pre-norm attention with MoH head routing and GQA. `dense=True` computes every head with
    SDPA and the dense mask, then zeroes the unchosen ones: the same function, for checking."""

    def __init__(self, dense: bool = False):
        super().__init__()
        self.dense = dense
        d = SPEC.head_dim
        self.norm = nn.LayerNorm(DIM)
        self.q = nn.Linear(DIM, HEADS * d, bias=False)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * d, bias=False)
        self.router = nn.Linear(DIM, HEADS, bias=False)
        self.balance = nn.Linear(DIM, 2, bias=False)  # MoH's weighing of shared against routed heads
        self.out = nn.Linear(HEADS * d, DIM, bias=False)
        self.register_buffer("mask", pg.dense_mask(SPEC), persistent=False)

    def heads(self, q, k, v, head_indices):
        if not self.dense:
            return pg.attention(q, k, v, SPEC, head_indices=head_indices)
        g = HEADS // KV_HEADS
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                             attn_mask=self.mask)
        chosen = pg.gate_heads(head_indices, torch.ones(head_indices.shape), HEADS) > 0
        return out * chosen[..., None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + attention, head_indices) for x [B, SEQ, DIM]."""
        B = x.shape[0]
        h = self.norm(x)
        q = self.q(h).view(B, SEQ, HEADS, -1).transpose(1, 2)
        k, v = self.kv(h).view(B, SEQ, 2, KV_HEADS, -1).permute(2, 0, 3, 1, 4)
        idx, gates = pg.route_heads(self.router(h), TOPK, shared=SHARED, balance=self.balance(h))
        o = self.heads(q, k, v, idx) * pg.gate_heads(idx, gates, HEADS)[..., None]  # [B, H, SEQ, d]
        return x + self.out(o.transpose(1, 2).reshape(B, SEQ, -1)), idx


class TinyMoHModel(nn.Module):
    def __init__(self, layers: int = 2, dense: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attn = nn.ModuleList(MoHAttention(dense) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(),
                                               nn.Linear(2 * DIM, DIM)) for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(logits [B, SEQ, VOCAB], fraction of (token, head) pairs computed)."""
        x, active = self.embed(tokens), []
        for attn, mlp in zip(self.attn, self.mlp):
            x, idx = attn(x)
            x = x + mlp(x)
            active.append((pg.gate_heads(idx, torch.ones(idx.shape), HEADS) > 0).float().mean())
        return self.head(x), float(torch.stack(active).mean())


def batch(gen: torch.Generator, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that repeat a random 8-token motif: the next token is predictable from 8 back."""
    motif = torch.randint(0, VOCAB, (size, 8), generator=gen)
    seq = motif.repeat(1, SEQ // 8 + 1)[:, :SEQ + 1]
    return seq[:, :-1], seq[:, 1:]


def train(steps: int = 40, seed: int = 0, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyMoHModel()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, y = batch(gen)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    t0 = time.perf_counter()
    losses = train()
    _, active = TinyMoHModel()(batch(torch.Generator().manual_seed(1))[0])
    print(f"MoH, {SHARED} shared + top-{TOPK} routed of {HEADS} heads: {active:.0%} of (token, head) pairs computed")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
