"""The MoH layer example (examples/models/moh_layer.py): trains, and equals computing every
head with dense SDPA and zeroing the unchosen ones, in outputs and gradients."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "examples" / "models" / "moh_layer.py"


@pytest.fixture(scope="module")
def moh():
    spec = importlib.util.spec_from_file_location("moh_layer", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_equals_all_heads_then_zero(moh):
    torch.manual_seed(0)
    layer, dense = moh.MoHAttention(), moh.MoHAttention(dense=True)
    dense.load_state_dict(layer.state_dict())
    x = torch.randn(3, moh.SEQ, moh.DIM)
    got, idx = layer(x)
    want, idx2 = dense(x)
    assert torch.equal(idx, idx2) and idx.shape == (3, moh.SEQ, moh.SHARED + moh.TOPK)
    assert (got - want).abs().max() < 1e-5
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, a), b in zip(layer.named_parameters(), dense.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-4, name


def test_half_the_pairs_are_computed(moh):
    _, active = moh.TinyMoHModel()(moh.batch(torch.Generator().manual_seed(0))[0])
    assert active == pytest.approx(0.5)


def test_training_lowers_the_loss(moh):
    losses = moh.train(steps=30)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1
