"""The backend choice: every fallback to the reference comes with its reason."""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as in tests/test_triton.py

import pytest
import torch

import patterngen as pg
from patterngen import dispatch
from patterngen.registry import spec_key
from patterngen.sim import ranked_kernel_tilings

STREAM = pg.Spec((pg.Sink(2) | pg.Band(15)) & pg.Causal(), q_shape=64, num_heads=2, head_dim=16)


def _qk(spec, dtype=torch.float32, batch=1):
    q = torch.zeros(batch, spec.num_heads, spec.nq, spec.head_dim, dtype=dtype)
    return q, torch.zeros(batch, spec.num_kv_heads, spec.nkv, spec.head_dim, dtype=dtype)


def test_reasons_for_tensors_no_kernel_takes():
    q, k = _qk(STREAM)
    assert "float16, bfloat16 or float32" in dispatch.can_run_kernel(q.double(), k.double())
    assert "empty" in dispatch.can_run_kernel(q[:0], k[:0])
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "bfloat16" in dispatch.can_run_kernel(q.bfloat16(), k.bfloat16())
        assert dispatch.can_run_kernel(q, k) is None


def test_explain_says_why_the_op_runs_the_reference_off_cuda():
    q, k = _qk(STREAM)
    forward, backward = pg.explain(STREAM, q, k).splitlines()
    assert forward.startswith("forward reference: device cpu") and backward.startswith("backward reference: device cpu")
    before = dispatch.calls["forward", "reference"]
    pg.attention(q, k, k, STREAM)
    assert dispatch.calls["forward", "reference"] == before + 1
    with pytest.raises(TypeError, match="spec"):
        pg.explain("spec", q)


def test_compiled_kernel_choices_and_refusals():
    """pg.compile's backends reach the op as options: "reference" always runs it, "triton" the
    kernels or an error saying why not, "auto" what pg.attention runs."""
    q, k = _qk(STREAM)
    key, opts = spec_key(STREAM), dispatch.compile_options

    def choose(backend, q, k, tiling=None, **kw):
        return dispatch.choose(key, q, k, options=opts(backend, tiling), **kw)
    assert choose("reference", q, k).backend == "reference"
    assert "device cpu" in choose("auto", q, k).reason
    assert "float16, bfloat16 or float32" in choose("auto", q.double(), k.double()).reason
    with pytest.raises(TypeError, match="backend='triton': dtype torch.float64"):
        choose("triton", q.double(), k.double())
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert choose("triton", q, k, pg.Tiling(16, 32)).kernel.block_n == 32
        assert choose("triton", q, k, pg.Tiling(16, 32), role="backward").backend == "triton"
        routed = pg.Spec(pg.Routed(16, 2), q_shape=64, num_heads=1, head_dim=16)
        with pytest.raises(NotImplementedError, match="backend='triton'.*head routing with Routed"):
            dispatch.choose(spec_key(routed), q, k, options=opts("triton", pg.Tiling(16, 16)), head_indices=True)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton import")
def test_choice_and_reasons_on_the_kernel_path():
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    q, k = _qk(STREAM)
    key = spec_key(STREAM)
    assert dispatch.choose(key, q, k).backend == "reference"  # off CUDA, unless asked for
    with dispatch.kernels_on_cpu():
        assert dispatch.choose(key, q, k).backend == "triton"
        assert dispatch.choose(key, q, k, role="backward").backend == "triton"
        assert dispatch.choose(key, q, k, head_indices=True).backend == "triton"
        choice = dispatch.choose(key, q, k, role="backward", lse_grad=True)
        assert choice.backend == "reference" and "lse" in choice.reason
        assert pg.explain(STREAM, q, k).splitlines()[0] == "forward triton: the generated forward kernel (TritonForward)"
    # the op's forward kernel runs the tiling policy's first tiling, as `patterngen build` does
    fwd = dispatch.kernel(key, "forward")
    assert pg.Tiling(fwd.q_grid.tile, fwd.kv_grid.tile) == ranked_kernel_tilings(STREAM)[0]
    # a routed block the kernels cannot tile: the backend's own message, kept, for every role
    odd = pg.Spec(pg.Routed(8, 2), q_shape=64, num_heads=1, head_dim=16)
    q, k = _qk(odd)
    with dispatch.kernels_on_cpu():
        for role in ("forward", "backward"):
            choice = dispatch.choose(spec_key(odd), q, k, role=role)
            assert choice.backend == "reference" and "power of two >= 16" in choice.reason
            assert "block=8" in choice.reason
        assert dispatch.kernel(spec_key(odd), "forward") is None
        # head routing over routed blocks is not generated: said so
        routed = pg.Spec(pg.Routed(16, 2), q_shape=64, num_heads=1, head_dim=16)
        q, k = _qk(routed)
        choice = dispatch.choose(spec_key(routed), q, k, head_indices=True)
        assert choice.backend == "reference" and "head routing with Routed" in choice.reason
    with pytest.raises(ValueError, match="role"):
        dispatch.kernel(spec_key(routed), "sideways")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton import")
def test_one_forward_tiling_for_the_op_compile_and_build(tmp_path):
    """pg.attention's kernel, a pg.compile kernel that has no GPU to time on, and `patterngen
    build` run the tiling policy's tiling. At head dim 128 the policy passes over the
    simulator's first choice, 128 x 128, whose accumulators spill."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from patterngen.backends.triton.config import fits_forward, tiling_json
    from patterngen.tools.cli import main
    spec = pg.Spec(pg.Causal(), 2048, num_heads=32, head_dim=128)
    ranked = ranked_kernel_tilings(spec)
    policy = dispatch.policy_tiling(spec)
    assert not fits_forward(ranked[0], 128) and policy == next(t for t in ranked if fits_forward(t, 128))
    key = spec_key(spec)
    q, k = _qk(spec)
    with dispatch.kernels_on_cpu():
        assert dispatch.choose(key, q, k).kernel.tiling == policy
        compiled = pg.compile(spec, backend="triton")
        assert dispatch.choose(key, q, k, options=compiled.options, v=k).kernel.tiling == policy
    path = tmp_path / "spec.py"
    path.write_text(f"from patterngen import Causal, Spec\nspec = {spec!r}\n")
    assert main(["build", str(path), "--out", str(tmp_path / "build"), "--arch", "sm_90"]) == 0
    record, = json.loads((tmp_path / "build" / "manifest.json").read_text())["kernels"]
    assert record["tiling"] == tiling_json(policy)
