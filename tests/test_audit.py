"""`patterngen audit`: the op's kernels compiled for sm_90/sm_80 on this CPU and read from SASS."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_triton.py: before triton is imported

import pytest
import torch

import patterngen as pg

pytest.importorskip("triton", reason="the audit compiles Triton kernels")
pytestmark = pytest.mark.interpreter

from patterngen.tools.audit import audit, format_audit  # noqa: E402
from patterngen.tools.cli import main  # noqa: E402

SPEC = pg.Spec((pg.Sink(4) | pg.Band(255)) & pg.Causal(), 1024, num_heads=4, num_kv_heads=2, head_dim=128)


@pytest.fixture(scope="module")
def rows():
    return audit(SPEC, archs=(90,))


def test_every_kernel_the_op_runs_is_read(rows):
    assert [r["name"] for r in rows] == ["attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"]
    for r in rows:
        assert r["arch"] == 90 and r["registers"] > 0 and r["instructions"] > r["loop_body"] > 0
        assert r["warpgroup_mma"] + r["mma_sync"] > 0  # every kernel multiplies on tensor cores
    fwd = rows[0]
    # the closed-form forward at 128 x 64, bf16, head dim 128: warpgroup MMA, a cp.async
    # pipelined kv loop, no spills (what the SASS of sm_90 showed when this was written)
    assert fwd["matmul"] == "wgmma" and fwd["pipelined"] and fwd["spill_ops"] == 0 and fwd["stack"] == 0
    assert fwd["fits"] and 0 < fwd["shared"] <= 232_448
    assert "HGMMA" in format_audit(rows)


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
    assert "attention_fwd" in out and "mma.sync" in out
    spills = audit(pg.Spec(pg.Causal(), 256, num_heads=2, head_dim=64), archs=(80,))
    assert rc == (1 if any(r["spill_ops"] or not r["fits"] for r in spills) else 0)  # exit 1: spills, too big
    assert main(["audit", str(path), "--dtype", "int8"]) == 2


def test_shared_memory_beyond_a_block_does_not_fit():
    """MoBA's Routed(512) at 512 x 512 tiles asked for 655,360 B of shared memory on sm_90 (audit
    of examples/moba_routed.py, 2026-11-30): such a kernel cannot launch, and the audit says so."""
    from patterngen.backends.triton.sass import KernelReport
    fields = dict(name="attention_fwd", registers=255, stack=0, instructions=1, warpgroup_mma=1, mma_sync=0,
                  async_copies=1, async_in_loop=True, spill_ops=0, loop_body=1)
    assert not KernelReport(arch=90, shared=655_360, **fields).fits
    assert KernelReport(arch=90, shared=229_376, **fields).fits
    assert not KernelReport(arch=80, shared=229_376, **fields).fits
