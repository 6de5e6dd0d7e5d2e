"""Ahead-of-time builds: `patterngen build` cross-compiles sm_90 cubins of the forward and
backward kernels on this CPU machine, `pg.load` verifies them and runs them through the op
(in the interpreter, or the reference backend) with gradients equal to float64 dense
attention, and refuses builds made for another arch, spec, version, or with a corrupted file."""
import getpass
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_triton.py: before triton is imported

import pytest
import torch

import patterngen as pg
from patterngen.tools.cli import main

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter
from patterngen import dispatch  # noqa: E402
from patterngen.aot import AOTError  # noqa: E402
from patterngen.backends.triton.aot import ENTRY  # noqa: E402
from patterngen.sim import ranked_kernel_tilings  # noqa: E402
from tests.helpers import dense_attention  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = '''
import patterngen as pg
stream = pg.Spec((pg.Sink(4) | pg.Band(63)) & pg.Causal(), q_shape=256, num_heads=4, num_kv_heads=2, head_dim=32)
window = pg.Spec(pg.Window((5, 7)), q_shape=(16, 24), num_heads=2, head_dim=32)
specs = [stream, window]
'''
GRADS = '''
import patterngen as pg
causal = pg.Spec(pg.Causal(), q_shape=100, num_heads=2, head_dim=32)
gqa_window = pg.Spec(pg.Window(9) & pg.Causal(), q_shape=80, num_heads=4, num_kv_heads=2, head_dim=16)
routed = pg.Spec(pg.Routed(16, 2, causal=True), q_shape=64, num_heads=2, head_dim=16)
specs = [causal, gqa_window, routed]
'''


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    (root / "small.py").write_text(SMALL)
    small, example = root / "small_build", root / "example_build"
    assert main(["build", str(root / "small.py"), "--out", str(small), "--arch", "sm_90"]) == 0
    assert main(["build", str(EXAMPLES / "streaming_llm.py"), "--out", str(example), "--arch", "sm_80,sm_90",
                 "--head-dim", "64"]) == 0
    return root, small, example


def close(got, want, tol=1e-4):
    fin = torch.isfinite(want)
    return torch.equal(torch.isfinite(got), fin) and float((got[fin] - want[fin]).abs().max()) < tol


def _fake_compile(kernel, names):
    from patterngen.backends.triton import CompiledKernel
    return [CompiledKernel(n, 90, b"\x7fELF-stub-" + n.encode(), f".target sm_90\n.entry {n}", 1, 4, 2)
            for n in names]


@pytest.fixture(scope="module")
def grads_build(tmp_path_factory):
    """A build whose kernels run here; the cubins are stubs (compiling costs ~5 s a kernel
    in a child process under the interpreter, and the builds above check real ones)."""
    from patterngen.backends.triton import TritonBackward, TritonForward
    root = tmp_path_factory.mktemp("aot_grads")
    (root / "grads.py").write_text(GRADS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TritonForward, "cross_compile", lambda self, arch, dtype: _fake_compile(self, [ENTRY])[0])
        mp.setattr(TritonBackward, "cross_compile", lambda self, arch, dtype, preprocess=False: _fake_compile(
            self, ["attention_bwd_dkdv", "attention_bwd_dq"] + ["bwd_preprocess"] * preprocess))
        assert main(["build", str(root / "grads.py"), "--out", str(root / "build"), "--dtype", "fp32"]) == 0
    return root / "build"


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_build_writes_cubins_ptx_sources_and_a_manifest(builds):
    _, small, example = builds
    m = manifest(example)
    assert m["format"] == "patterngen-aot" and m["kernels_built"] == ["forward", "backward"] and not m["not_built"]
    assert {"torch", "triton", "patterngen"} <= set(m["versions"])
    spec = pg.Spec((pg.Sink(4) | pg.Band(1023)) & pg.Causal(), q_shape=32768, num_heads=32, head_dim=64)
    assert sorted(r["arch"] for r in m["kernels"]) == [80, 90]
    for r in m["kernels"]:
        assert r["spec"] == repr(spec) and r["head_dim"] == 64 and r["dtype"] == "bf16"
        assert r["kernels_built"] == ["forward", "backward"] and "not_built" not in r
        tiling = ranked_kernel_tilings(spec)[0]  # the tiling policy's choice, as the op's
        assert r["tiling"] == {"q_tile": tiling.q_tile, "kv_tile": tiling.kv_tile}
        assert r["shared_bytes"] > 0 and r["config"]["num_warps"] in (4, 8)
        cubin = (example / r["files"]["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"  # a real device binary
        ptx = (example / r["files"]["ptx"]).read_text()
        assert f".target sm_{r['arch']}" in ptx and ".entry attention_fwd" in ptx
        bwd = r["backward"]
        assert set(bwd["kernels"]) == {"attention_bwd_dkdv", "attention_bwd_dq", "bwd_preprocess"}
        assert "def attention_bwd_dkdv" in (example / bwd["files"]["source"]).read_text()
        assert set(torch.load(example / bwd["files"]["tables"])) >= {"rows", "cols", "head_group", "rows_t", "cols_t"}
        for entry, kb in bwd["kernels"].items():
            assert (example / kb["cubin"]).read_bytes()[:4] == b"\x7fELF"
            ptx = (example / kb["ptx"]).read_text()
            assert f".target sm_{r['arch']}" in ptx and f".entry {entry}" in ptx
        bfiles = [*bwd["files"].values(), *(kb[f] for kb in bwd["kernels"].values() for f in ("cubin", "ptx"))]
        assert set(r["sha256"]) == set(r["files"].values()) | set(bfiles)
    small_m = manifest(small)
    assert len(small_m["kernels"]) == 2 and {r["arch"] for r in small_m["kernels"]} == {90}
    for r, spec in zip(small_m["kernels"], pg.load(small).specs):  # the op's tiles, n-D boxes as lists
        t = ranked_kernel_tilings(spec)[0]
        assert r["tiling"] == {n: list(x) if isinstance(x, tuple) else x for n, x in (("q_tile", t.q_tile),
                                                                                      ("kv_tile", t.kv_tile))}


def test_no_machine_path_or_user_name_in_any_artifact(builds):
    root, small, example = builds
    needles = {str(root), str(Path.home()), str(Path.cwd()), "/tmp/", "/root/", "site-packages"}
    try:
        user = getpass.getuser()
        needles |= {f"/{user}/"} if len(user) > 2 else set()
    except Exception:
        pass
    for d in (small, example):
        for f in d.iterdir():
            data = f.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, f"{f.name} holds {needle!r}"
        assert not [f.name for f in d.iterdir() if f.suffix == ".tmp"]  # atomic writes leave nothing behind


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_loaded_kernels_run_on_cpu_and_equal_dense_attention(builds, interpret, monkeypatch):
    """Under the interpreter the loaded kernels run (the op says so and counts them); without
    it the reference backend does; both equal float64 dense attention."""
    if interpret == "1" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter must be on before triton is imported")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    _, small, _ = builds
    build = pg.load(small)
    assert len(build) == 2
    g = torch.Generator().manual_seed(0)
    kind = "loaded" if interpret == "1" else "reference"
    for spec in build.specs:
        kern = build[spec]
        assert build[repr(spec)] is kern
        q = torch.randn(2, spec.num_heads, spec.nq, spec.head_dim, generator=g)
        k, v = (torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g) for _ in range(2))
        explained = pg.explain(spec, q)
        assert ("loaded from build small_build" in explained) == (interpret == "1"), explained
        before = dispatch.calls["forward", kind]
        out, lse = kern(q, k, v, return_lse=True)
        assert dispatch.calls["forward", kind] == before + 1
        want, want_lse = dense_attention(q, k, v, spec)
        assert close(out, want) and close(lse, want_lse)


def test_load_refuses_another_arch_or_spec(builds):
    _, small, example = builds
    stream = pg.Spec((pg.Sink(4) | pg.Band(63)) & pg.Causal(), q_shape=256, num_heads=4, num_kv_heads=2,
                     head_dim=32)
    assert stream in pg.load(small, spec=stream, arch="sm_90")
    with pytest.raises(AOTError, match=r"no kernel for sm_80.*holds.*sm_90"):
        pg.load(small, arch="sm_80")
    with pytest.raises(AOTError, match=r"sm_80.*sm_90/bf16"):
        pg.load(small, spec=stream, arch="sm_80")
    other = pg.Spec((pg.Sink(4) | pg.Band(63)) & pg.Causal(), q_shape=256, num_heads=4, num_kv_heads=2,
                    head_dim=64)  # the same pattern, another head_dim: another kernel
    with pytest.raises(AOTError, match=r"no kernel for Spec\(.*head_dim=64\).*holds: Spec\(.*head_dim=32\)"):
        pg.load(small, spec=other)
    with pytest.raises(KeyError, match="holds"):
        pg.load(small)[other]
    with pytest.raises(ValueError, match="arch"):
        pg.load(example, arch="sm_75")
    assert len(pg.load(example, arch=90)) == 1


def test_a_loaded_build_is_callable(builds, tmp_path):
    """`pg.load(dir)(q, k, v)` runs a one-spec build; a build of several specs asks which one."""
    _, small, _ = builds
    one = tmp_path / "one"
    shutil.copytree(small, one)
    manifest = json.loads((one / "manifest.json").read_text())
    manifest["kernels"] = [r for r in manifest["kernels"] if r["spec"] == manifest["kernels"][0]["spec"]]
    (one / "manifest.json").write_text(json.dumps(manifest))
    single = pg.load(one)
    assert len(single) == 1
    spec = single.specs[0]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, spec.num_heads, spec.nq, spec.head_dim, generator=g)
    k, v = (torch.randn(1, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g) for _ in range(2))
    out, lse = single(q, k, v, return_lse=True)
    want, want_lse = dense_attention(q, k, v, spec)
    assert close(out, want) and close(lse, want_lse)
    several = pg.load(small)
    with pytest.raises(ValueError, match=r"holds 2 specs.*spec=") as err:
        several(q, k, v)
    assert "Spec(" in str(err.value)
    first = several.specs[0]
    q1 = torch.randn(1, first.num_heads, first.nq, first.head_dim, generator=g)
    k1, v1 = (torch.randn(1, first.num_kv_heads, first.nkv, first.head_dim, generator=g) for _ in range(2))
    assert close(several(q1, k1, v1, spec=first), dense_attention(q1, k1, v1, first)[0])


@pytest.mark.parametrize("lib", ["torch", "triton", "patterngen"])
def test_load_refuses_a_build_for_other_versions(builds, tmp_path, lib):
    d = copy(builds[1], tmp_path / "b")
    m = manifest(d)
    m["versions"][lib] = "0.0.1"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AOTError, match=rf"{lib} '0.0.1' at build time.*here"):
        pg.load(d)


def test_load_accepts_another_patch_release(builds, tmp_path):
    d = copy(builds[1], tmp_path / "b")
    m = manifest(d)
    major, minor = m["versions"]["torch"].split(".")[:2]
    m["versions"]["torch"] = f"{major}.{minor}.99"
    (d / "manifest.json").write_text(json.dumps(m))
    assert len(pg.load(d)) == 2


def test_load_refuses_corrupt_or_missing_files_and_bad_manifests(builds, tmp_path):
    d = copy(builds[1], tmp_path / "b")
    rec = manifest(d)["kernels"][0]
    cubin = d / rec["files"]["cubin"]
    data = bytearray(cubin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cubin.write_bytes(bytes(data))
    with pytest.raises(AOTError, match=rf"{rec['files']['cubin']} is corrupt"):
        pg.load(d)
    cubin.unlink()
    with pytest.raises(AOTError, match="missing"):
        pg.load(d)
    m = manifest(d)
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AOTError, match="format version 99"):
        pg.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(AOTError, match="no manifest.json"):
        pg.load(d)
    with pytest.raises(AOTError, match="does not exist"):
        pg.load(tmp_path / "nowhere")


def test_manifest_specs_are_parsed_not_executed(builds, tmp_path):
    d = copy(builds[1], tmp_path / "b")
    m = manifest(d)
    m["kernels"][0]["spec"] = "__import__('os').system('true')"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AOTError, match="cannot read the spec"):
        pg.load(d)


def test_build_cli_errors(builds, tmp_path, capsys):
    root = builds[0]
    assert main(["build", str(root / "small.py"), "--out", str(tmp_path / "x"), "--arch", "sm_75"]) == 2
    assert "sm_75" in capsys.readouterr().err
    assert main(["build", str(root / "small.py"), "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "int8" in capsys.readouterr().err


# -- backward kernels ---------------------------------------------------------------------
def test_build_writes_backward_kernels(grads_build):
    """Every spec with a generated backward gets its kernels; a spec without one (Routed, while
    the backend has no Routed backward) keeps the forward and says why."""
    m = manifest(grads_build)
    assert m["kernels_built"] == ["forward", "backward"]
    by_name = {r["name"]: r for r in m["kernels"]}
    for name, r in by_name.items():
        assert r["dtype"] == "fp32"
        if name != "routed" or "backward" in r:
            assert r["kernels_built"] == ["forward", "backward"] and "not_built" not in r
            assert r["backward"]["files"]["source"] == r["files"]["source"].replace("_fwd.py", "_bwd.py")
            assert set(r["backward"]["kernels"]) == {"attention_bwd_dkdv", "attention_bwd_dq", "bwd_preprocess"}
            assert "def attention_bwd_dq" in (grads_build / r["backward"]["files"]["source"]).read_text()
        else:
            assert r["kernels_built"] == ["forward"] and "Routed" in r["not_built"]["backward"]
            assert "routed" in m["not_built"]["backward"]
    build = pg.load(grads_build)
    assert [build[r["spec"]].kinds for r in m["kernels"]] == [r["kernels_built"] for r in m["kernels"]]


@pytest.mark.parametrize("part", ["source", "tables", "cubin"])
def test_load_refuses_a_tampered_backward_file(grads_build, tmp_path, part):
    d = copy(grads_build, tmp_path / "b")
    bwd = manifest(d)["kernels"][0]["backward"]
    name = bwd["kernels"]["attention_bwd_dq"]["cubin"] if part == "cubin" else bwd["files"][part]
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / name).write_bytes(bytes(data))
    with pytest.raises(AOTError, match=rf"{name} is corrupt"):
        pg.load(d)


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_loaded_kernels_are_differentiable(grads_build, interpret, monkeypatch):
    """Under the interpreter the saved backward kernels give the gradients; without it the
    reference backend's autograd does; both equal float64 dense attention's gradients."""
    if interpret == "1" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter must be on before triton is imported")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    build = pg.load(grads_build)
    g = torch.Generator().manual_seed(1)
    for spec in build.specs:
        kern = build[spec]
        q = torch.randn(2, spec.num_heads, spec.nq, spec.head_dim, generator=g)
        k, v = (torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g) for _ in range(2))
        dout = torch.randn_like(q)
        idx = None
        if spec.routed is not None:
            idx = torch.randint(0, spec.nkv // spec.routed.block, (spec.num_heads, spec.nq // spec.routed.block,
                                                                    spec.routed.topk), generator=g)
        backward = "loaded" if interpret == "1" and "backward" in kern.kinds else "reference"
        before = dispatch.calls["backward", backward]
        got = _grads(lambda *x: kern(*x, block_indices=idx), q, k, v, dout)
        assert dispatch.calls["backward", backward] == before + 1
        want = _grads(lambda *x: dense_attention(*x, spec, idx)[0], q, k, v, dout.double())
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-4, f"{spec!r}: {name} differs by {(a - b).abs().max():.2e}"


def test_lse_gradients_of_a_loaded_kernel_take_the_reference(grads_build):
    """The kernels do not take an lse gradient; a loss on lse still differentiates exactly."""
    spec = next(s for s in pg.load(grads_build).specs if s.num_kv_heads == 2)
    kern = pg.load(grads_build)[spec]
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, spec.num_heads, spec.nq, spec.head_dim, generator=g)
    k, v = (torch.randn(1, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g) for _ in range(2))

    def loss(fn):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fn(qg, kg, vg)
        return torch.autograd.grad(out.square().sum() + lse.sum(), (qg, kg, vg))

    before = dispatch.calls["backward", "reference"]
    got = loss(lambda *x: kern(*x, return_lse=True))
    assert dispatch.calls["backward", "reference"] == before + 1
    want = loss(lambda *x: dense_attention(*x, spec))
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-4


def test_a_length_free_build_runs_every_length(tmp_path):
    """A length-free spec builds once for every length: no tables in the build (a closed-form
    forward reads none; the others are planned per length at load), and the loaded kernels
    equal float64 dense attention at lengths the build never saw."""
    from patterngen.backends.triton import TritonBackward, TritonForward
    from patterngen.backends.triton.aot import build, open_build
    specs = [("stream", pg.Spec((pg.Sink(2) | pg.Band(20)) & pg.Causal(), num_heads=2, num_kv_heads=1, head_dim=16)),
             ("strided", pg.Spec(pg.Strided(3) & pg.Causal(), num_heads=2, head_dim=16))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TritonForward, "cross_compile", lambda self, arch, dtype: _fake_compile(self, [ENTRY])[0])
        mp.setattr(TritonBackward, "cross_compile", lambda self, arch, dtype, preprocess=False: _fake_compile(
            self, ["attention_bwd_dkdv", "attention_bwd_dq"] + ["bwd_preprocess"] * preprocess))
        m = build(specs, tmp_path / "free", lambda spec: pg.Tiling(16, 16), dtypes=("fp32",))
    assert [(r["length_free"], r["walk"]) for r in m["kernels"]] == [(True, "closed_form"), (True, "table")]
    assert all("tables" not in r["files"] and "tables" not in r["backward"]["files"] for r in m["kernels"])
    assert not list((tmp_path / "free").glob("*_tables.pt"))
    _, loaded = open_build(tmp_path / "free")
    g = torch.Generator().manual_seed(3)
    for _, spec in specs:
        held = loaded[repr(spec)]
        fwd, bwd = held.forward(held.records[0]), held.backward(held.records[0])
        for nq, nkv in ((5, 40), (40, 17)):
            q = torch.randn(1, 2, nq, 16, generator=g)
            k, v = (torch.randn(1, spec.num_kv_heads, nkv, 16, generator=g) for _ in range(2))
            out, lse = fwd(q, k, v)
            leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
            want, _ = dense_attention(*leaves, spec.bind(nq, nkv))
            dout = torch.randn(out.shape, generator=g)
            want.backward(dout.double())
            for got, ref in zip((out, *bwd(q, k, v, out, lse, dout)), (want, *(t.grad for t in leaves))):
                assert (got - ref).abs().max() < 1e-4


def test_loaded_kernels_trace_with_fullgraph(grads_build):
    """A loaded kernel is pg.attention with the build's kernels: one graph, no break."""
    from torch._dynamo.testing import CompileCounterWithBackend
    build = pg.load(grads_build)
    spec = next(s for s in build.specs if s.routed is None)
    kern = build[spec]
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda q, k, v: kern(q, k, v) * 2, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, spec.num_heads, spec.nq, spec.head_dim, generator=g, requires_grad=True)
    k, v = (torch.randn(1, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g, requires_grad=True)
            for _ in range(2))
    out = f(q, k, v)
    assert close(out, 2 * dense_attention(q, k, v, spec)[0]) and counter.frame_count == 1
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))
