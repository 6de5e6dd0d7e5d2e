"""`patterngen audit`: the op's kernels compiled for sm_90/sm_80 on this CPU and read from SASS."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_triton.py: before triton is imported

import pytest
import torch

import patterngen as pg

pytest.importorskip("triton", reason="the audit compiles Triton kernels")
pytestmark = pytest.mark.interpreter

from patterngen.tools.audit import audit, format_audit, gate_failures  # noqa: E402
from patterngen.tools.cli import main  # noqa: E402

SPEC = pg.Spec((pg.Sink(4) | pg.Band(255)) & pg.Causal(), 1024, num_heads=4, num_kv_heads=2, head_dim=128)


@pytest.fixture(scope="module")
def rows():
    return audit(SPEC, archs=(90,))


def test_every_kernel_the_op_runs_is_read(rows):
    kernels = [r for r in rows if not r["reference"]]
    assert [r["name"] for r in kernels] == ["attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"]
    for r in kernels:
        assert r["arch"] == 90 and r["registers"] > 0 and r["instructions"] > r["loop_body"] > 0
        assert r["warpgroup_mma"] + r["mma_sync"] > 0  # every kernel multiplies on tensor cores
        # a sink-and-band causal walk has full and masked tiles: the masked step is the longer
        assert 0 < r["full_tile"] < r["partial_tile"] <= r["loop_body"]
    fwd = kernels[0]
    # the closed-form forward at 128 x 64, bf16, head dim 128: warpgroup MMA, a cp.async
    # pipelined kv loop, no spills (what the SASS of sm_90 showed when this was written)
    assert fwd["matmul"] == "wgmma" and fwd["pipelined"] and fwd["spill_ops"] == 0 and fwd["stack"] == 0
    assert fwd["fits"] and 0 < fwd["shared"] <= 232_448
    assert "HGMMA" in format_audit(rows) and "full/ref" in format_audit(rows)


def test_each_kernel_is_compared_with_the_reference_at_its_tiles(rows):
    """Each kernel's row is followed by the reference FlashAttention-2 kernel doing the same work
    at the same tiles, warps, stages and head dim; the ratio is per tile area."""
    assert [r["name"] for r in rows[1::2]] == ["fa2_fwd", "fa2_bwd_dkdv", "fa2_bwd_dq"]
    for kernel, ref in zip(rows[::2], rows[1::2]):
        assert ref["reference"] and ref["tiling"] == kernel["tiling"] and ref["arch"] == kernel["arch"]
        assert 0 < ref["full_tile"] < ref["partial_tile"] and ref["spill_ops"] == 0 and ref["pipelined"]
        assert (kernel["ref_full_tile"], kernel["ref_partial_tile"]) == (ref["full_tile"], ref["partial_tile"])
        assert kernel["full_ratio"] == pytest.approx(kernel["full_tile"] / ref["full_tile"], abs=1e-3)
    assert rows[1]["matmul"] == rows[3]["matmul"] == "wgmma"  # the reference's forward and KV-major dK/dV


def test_tile_steps_are_the_innermost_loops_with_matrix_instructions():
    """Full step: the shortest loop holding MMA and no inner MMA loop; partial: the longest. An
    outer loop around a step loop, a loop without MMA and a second branch back to the same head
    (a `continue`) are no steps of their own."""
    from patterngen.backends.triton.sass import _loops, _ops, tile_steps

    def sass(lines):
        return "\n".join(f"/*{16 * i:04x}*/ {text} ;" for i, text in enumerate(lines))
    body = ["IADD3 R1, R1, 0x1", "HGMMA.64x64x16.F32 R0, gdesc[UR4], R0"]
    text = sass(["MOV R0, RZ",  # 0: outer loop head
                 *body, "@P0 BRA 0x10",  # 1-3: a 3-instruction full step (back to 1)
                 *body, "FSEL R2, R2, -INF, P1", "FSEL R3, R3, -INF, P1", "@P1 BRA 0x40",  # 4-8: 5-instruction partial
                 "@P2 BRA 0x40",  # 9: a `continue`: the partial loop spans 4-9 (6 instructions)
                 "LDL R4, [R1]", "@P3 BRA 0xa0",  # 10-11: a loop without MMA
                 "@P4 BRA 0x0",  # 12: the outer loop (0-12), around the step loops
                 "EXIT"])
    ops = _ops(text)
    assert _loops(ops) == [(0, 12), (1, 3), (4, 9), (10, 11)]
    assert tile_steps(ops, _loops(ops)) == (3, 6)
    assert tile_steps(ops[10:], _loops(ops[10:])) == (0, 0)  # no loop holds matrix instructions


@pytest.mark.parametrize("tiling", [pg.Tiling((8, 8), (8, 8)), None], ids=["8x8", "policy"])
def test_the_window_walk_is_pipelined(tiling):
    """The n-D window walk visits its full and partial kv tiles in flat loops without a branch
    around the loads (issue 13): on sm_90 asynchronous copies inside the loop and warpgroup MMA,
    on sm_80 mma.sync, pipelined too; no spills on either."""
    from patterngen import dispatch
    from patterngen.backends.triton import TritonForward
    from patterngen.backends.triton.sass import read
    spec = pg.Spec(pg.Window((7, 9)), (32, 48), num_heads=2, head_dim=128)
    fwd = TritonForward(spec, tiling or dispatch.policy_tiling(spec))
    assert fwd.walk.name == "window"
    for arch, matmul in ((90, "wgmma"), (80, "mma.sync")):
        report = read(fwd.cross_compile(arch, torch.bfloat16))
        assert report.matmul == matmul and report.pipelined and report.spill_ops == 0 and report.stack == 0


def test_cli(tmp_path, capsys):
    path = tmp_path / "s.py"
    path.write_text("import patterngen as pg\n"
                    "spec = pg.Spec(pg.Causal(), 256, num_heads=2, head_dim=64)\n")
    rc = main(["audit", str(path), "--arch", "sm_80"])
    out = capsys.readouterr().out
    assert "attention_fwd" in out and "mma.sync" in out and "fa2_fwd" in out
    rows = [r for r in audit(pg.Spec(pg.Causal(), 256, num_heads=2, head_dim=64), archs=(80,)) if not r["reference"]]
    assert rc == (1 if any(r["spill_ops"] or not r["fits"] for r in rows) else 0)  # exit 1: spills, too big
    gate = main(["audit", str(path), "--arch", "sm_80", "--gate"])
    failures = gate_failures(audit(pg.Spec(pg.Causal(), 256, num_heads=2, head_dim=64), archs=(80,)))
    assert gate == (1 if failures or rc else 0) and ("GATE FAIL" in capsys.readouterr().out) == bool(failures)
    assert main(["audit", str(path), "--dtype", "int8"]) == 2
    assert main(["audit"]) == 2  # neither a spec file nor --calibrate


def test_calibrate_writes_the_simulators_tile_costs(tmp_path, monkeypatch):
    from patterngen.sim import tile_costs
    from patterngen.tools.audit import calibrate
    monkeypatch.setattr(tile_costs, "TILE_COSTS", tmp_path / "tile_costs.json")
    try:
        data = calibrate(archs=(90,), head_dims=(128,), tiles=((128, 64),))
        assert tile_costs.load() == data and data["command"] == "patterngen audit --calibrate"
    finally:
        tile_costs.load.cache_clear()  # not to leave the temporary file's data to other tests
    (entry,) = data["entries"]
    assert entry["arch"] == 90 and entry["dtype"] == "bf16" and 0 < entry["full_tile"] < entry["partial_tile"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_reference_matches_sdpa(dtype, causal, tiles):
    """The reference FlashAttention-2 (run by the interpreter): output and all three gradients."""
    from patterngen.tools import fa2_reference as fa2
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 2, 64, 32, generator=g, dtype=dtype) for _ in range(4))
    out, lse = fa2.forward(q, k, v, causal, block_m=tiles[0], block_n=tiles[1])
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    expected.backward(dout.float())
    grads = fa2.backward(q, k, v, out, lse, dout, causal, block_m=tiles[0], block_n=tiles[1])
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.float(), leaf.grad, atol=tol, rtol=tol)


def test_reference_rejects_what_it_does_not_handle():
    from patterngen.tools import fa2_reference as fa2
    x = torch.zeros(1, 1, 48, 32)
    with pytest.raises(ValueError, match="multiple of block_m=32"):
        fa2.forward(x, x, x, block_m=32, block_n=16)
    with pytest.raises(ValueError, match="head_dim: expected a power of two"):
        fa2.forward(*(torch.zeros(1, 1, 64, 24),) * 3)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        fa2.cross_compile("fa2_fwd_typo", 90, torch.bfloat16, 64, 64, 64, 4, 2)


def test_shared_memory_beyond_a_block_does_not_fit():
    """MoBA's Routed(512) at 512 x 512 tiles asked for 655,360 B of shared memory on sm_90 (audit
    of examples/moba_routed.py, 2026-11-30): such a kernel cannot launch, and the audit says so."""
    from patterngen.backends.triton.sass import KernelReport
    fields = dict(name="attention_fwd", registers=255, stack=0, instructions=1, warpgroup_mma=1, mma_sync=0,
                  async_copies=1, step_loops=2, unpipelined_steps=0, spill_ops=0, step_spills=0, wgmma_waits=0,
                  loop_body=1)
    assert not KernelReport(arch=90, shared=655_360, **fields).fits
    assert KernelReport(arch=90, shared=229_376, **fields).fits
    assert not KernelReport(arch=80, shared=229_376, **fields).fits
