"""A DiT-style block with 2-D neighborhood attention (examples/models/dit_neighborhood_train.py)
trains, and its gradients equal those of dense SDPA with the oracle's mask."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import patterngen as pg

PATH = Path(__file__).resolve().parent.parent / "examples" / "models" / "dit_neighborhood_train.py"


@pytest.fixture(scope="module")
def dit():
    spec = importlib.util.spec_from_file_location("dit_neighborhood_train", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mask_is_a_neighborhood(dit):
    mask = pg.dense_mask(dit.SPEC)
    assert mask.shape == (2, 64, 64)
    assert (mask.sum(-1) == 25).all()  # every query sees exactly 5 x 5 keys, borders included
    assert 0 < mask.float().mean() < 0.5


def test_gradients_equal_dense_reference(dit):
    ours, ref = dit.make_pair(seed=3)
    x, t, target = dit.make_batch(seed=3)
    outs = []
    for block in (ours, ref):
        out = block(x, t)
        F.mse_loss(out, target).backward()
        outs.append(out.detach())
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert (p.grad - ref_grads[name].grad).abs().max() < 1e-5, name


def test_training_lowers_the_loss_like_the_reference(dit):
    batch = dit.make_batch(seed=0)
    ours, ref = dit.make_pair(seed=0)
    losses = dit.train(ours, batch, steps=20)
    ref_losses = dit.train(ref, batch, steps=20)
    assert losses[-1] < 0.9 * losses[0]
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-4  # same trajectory as dense
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name
