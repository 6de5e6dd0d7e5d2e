"""A new user's first run: empty inputs, bad arguments and broken environments get a
result or a clear error, never silently wrong numbers or a raw traceback."""
import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as in tests/test_triton.py

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import dispatch
from patterngen.registry import spec_key
from patterngen.tools.cli import main
from patterngen.core.oracle import MAX_ELEMENTS

from tests.strategies import scaled

STREAM = (pg.Sink(2) | pg.Band(5)) & pg.Causal()


def _qkv(b, h, hkv, n, nkv, d=16, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, nkv, d, generator=g).to(dtype) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


# -- zero-size batches: forward and backward, like scaled_dot_product_attention ------------
@pytest.mark.parametrize("kind", ["static", "gqa", "routed", "head_indices", "compiled"])
def test_empty_batch_forward_and_backward(kind):
    heads, kv_heads = (4, 2) if kind == "gqa" else (2, 2)
    pattern = pg.Routed(16, 1) if kind == "routed" else STREAM
    spec = pg.Spec(pattern, q_shape=32, num_heads=heads, num_kv_heads=kv_heads, head_dim=16)
    q, k, v = _qkv(0, heads, kv_heads, 32, 32)
    kwargs = {}
    if kind == "routed":
        kwargs["block_indices"] = pg.route(q, k, block=16, topk=1)
        assert kwargs["block_indices"].shape == (0, kv_heads, 2, 1)
    if kind == "head_indices":
        kwargs["head_indices"] = torch.zeros(0, 32, 1, dtype=torch.long)
    fn = pg.compile(spec) if kind == "compiled" else (lambda *a, **kw: pg.attention(*a, spec, **kw))
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape


@pytest.mark.parametrize("nq, nkv, heads, kv_heads", [(0, 0, 2, 1), (8, 0, 2, 2), (0, 8, 2, 2), (8, 8, 0, 0)],
                         ids=["no_tokens", "no_keys", "no_queries", "no_heads"])
def test_zero_tokens_or_heads_forward_and_backward(nq, nkv, heads, kv_heads):
    """Like SDPA on empty inputs; queries without keys give zeros and lse -inf, never NaN."""
    spec = pg.Spec(STREAM, q_shape=nq, kv_shape=nkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=16)
    assert pg.dense_mask(spec).shape == (heads, nq, nkv)
    assert pg.build_plan(spec).counts()["visited"] == 0
    with pytest.raises(ValueError, match="no \\(query, key\\) pair"):
        pg.simulate(spec)
    for fn in (lambda *a, **kw: pg.attention(*a, spec, **kw), pg.compile(spec)):
        q, k, v = _qkv(2, heads, kv_heads, nq, nkv)
        out, lse = fn(q, k, v, return_lse=True)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_empty_inputs_on_the_kernel_path_take_the_empty_result():
    """The op's kernel path (run on the CPU here) must not launch a kernel on B = 0."""
    spec = pg.Spec(STREAM, q_shape=32, num_heads=2, head_dim=16)
    q, k, v = _qkv(0, 2, 2, 32, 32)
    with dispatch.kernels_on_cpu():
        choice = dispatch.choose(spec_key(spec), q, k)
        assert choice.backend == "reference" and "empty" in choice.reason
        out, lse = pg.attention(q, k, v, spec, return_lse=True)
        (out.sum() + lse.sum()).backward()
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


# -- bfloat16 on the Triton interpreter is refused, not returned as garbage -------------
def _need_triton():
    return pytest.importorskip("triton", reason="the Triton backend needs triton")


def test_bf16_under_the_interpreter_is_refused():
    _need_triton()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    spec = pg.Spec(pg.Causal(), q_shape=32, num_heads=1, head_dim=16)
    q, k, v = _qkv(1, 1, 1, 32, 32, dtype=torch.bfloat16, grad=False)
    with pytest.raises(TypeError, match=r"bfloat16.*interpreter.*float16 or float32"):
        pg.compile(spec, backend="triton")(q, k, v)
    from patterngen.backends.triton import TritonHeads
    with pytest.raises(TypeError, match="bfloat16"):
        TritonHeads(spec).forward(q, k, v, torch.zeros(1, 32, 1, dtype=torch.long))
    # float16 on the same kernel is right
    q, k, v = (t.half() for t in (q, k, v))
    out = pg.compile(spec, backend="triton")(q, k, v)
    assert (out.float() - pg.attention(q.float(), k.float(), v.float(), spec)).abs().max() < 2e-3


# -- pg.route and routed blocks ---------------------------------------------------------
@pytest.mark.parametrize("block, topk, causal, err, match", [
    (0, 1, False, ValueError, "block must be >= 1, got 0"),
    (-4, 1, False, ValueError, "block must be >= 1, got -4"),
    (4.0, 1, False, TypeError, "block must be an int"),
    (True, 1, False, TypeError, "block must be an int"),
    (4, 0, False, ValueError, "topk must be >= 1"),
    (4, 9, False, ValueError, r"topk must be in 1\.\.8 .*32 keys"),
    (4, 1, 1, TypeError, "causal must be a bool"),
])
def test_route_rejects_bad_arguments(block, topk, causal, err, match):
    q, k, _ = _qkv(1, 2, 2, 32, 32, grad=False)
    with pytest.raises(err, match=match):
        pg.route(q, k, block=block, topk=topk, causal=causal)


def test_triton_names_the_routed_block_not_a_tile():
    _need_triton()
    spec = pg.Spec(pg.Routed(8, 2), q_shape=64, num_heads=1, head_dim=16)
    with pytest.raises(ValueError, match=r"routed block to be a power of two >= 16.*block=8") as err:
        pg.compile(spec, backend="triton")
    assert "q_tile" not in str(err.value)


# -- the dense-mask oracle refuses what it cannot hold ----------------------------------
def test_dense_mask_refuses_huge_specs_and_points_to_plans():
    spec = pg.Spec(pg.Band(127) & pg.Causal(), q_shape=1 << 20, num_heads=2)
    with pytest.raises(ValueError, match=r"2 x 1,048,576 x 1,048,576.*build_plan.*simulate"):
        pg.dense_mask(spec)
    small = pg.Spec(pg.Causal(), q_shape=40, num_heads=2)
    with pytest.raises(ValueError, match="max_elements"):
        pg.dense_mask(small, max_elements=2 * 40 * 40 - 1)
    assert pg.dense_mask(small, max_elements=2 * 40 * 40).sum() == 2 * 40 * 41 // 2
    assert MAX_ELEMENTS == 1 << 30


# -- the kernel cache: misconfigurations are named, a read-only cache falls back ----------
@pytest.fixture
def cache_module(monkeypatch):
    _need_triton()
    from patterngen.backends.triton import cache
    monkeypatch.setattr(cache, "_fallback", None)
    monkeypatch.setattr(cache, "_WRITABLE", {})
    return cache


def test_cache_pointing_at_a_file_is_named(cache_module, tmp_path, monkeypatch):
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    monkeypatch.setenv("PATTERNGEN_CACHE", str(f))
    with pytest.raises(cache_module.CacheError, match=r"PATTERNGEN_CACHE=.*is a file, not a directory"):
        cache_module.write_source("pass\n")


def test_directory_in_place_of_an_entry_is_named_and_leaves_nothing(cache_module, tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    source = "x = 1\n"
    entry = tmp_path / "kernels" / f"patterngen_kernel_{cache_module.source_key(source)}.py"
    entry.mkdir(parents=True)
    with pytest.raises(cache_module.CacheError, match="is a directory where a cache entry belongs"):
        cache_module.write_source(source)
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [entry.name]


def test_unwritable_cache_falls_back_to_a_temporary_one(cache_module, tmp_path, monkeypatch):
    """A read-only cache directory (simulated: root ignores permission bits) is not fatal."""
    locked = tmp_path / "locked"
    monkeypatch.setenv("PATTERNGEN_CACHE", str(locked))
    real_mkstemp = cache_module.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and str(dir).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(cache_module.tempfile, "mkstemp", mkstemp)
    with pytest.warns(RuntimeWarning, match=r"cannot be written.*Set PATTERNGEN_CACHE"):
        path = cache_module.write_source("y = 2\n")
    assert not str(path).startswith(str(locked)) and path.read_text() == "y = 2\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per kernel
        cache_module.write_source("z = 3\n")


# -- the command line -------------------------------------------------------------------
def test_run_counts_a_missing_file_as_a_failure(capsys, tmp_path):
    assert main(["run", str(tmp_path / "missing.py")]) == 1
    out = capsys.readouterr().out
    assert "1 of 1 spec file(s) could not be loaded" in out and "of 0 spec(s)" not in out


@pytest.mark.parametrize("command", [["build", "SPEC", "--out", "OUT"], ["bench", "--quick", "--cpu-smoke"]])
def test_commands_that_need_triton_say_so_in_one_line(command, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails, as where it is missing
    spec_file = tmp_path / "s.py"
    spec_file.write_text("import patterngen as pg\nspec = pg.Spec(pg.Causal(), q_shape=64)\n")
    argv = [str(spec_file) if a == "SPEC" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs triton" in err and "pip install triton" in err


# -- property: empty sizes never break the shapes the op promises ------------------------
@settings(max_examples=scaled(6))
@given(heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), n=st.integers(1, 40), d=st.sampled_from([8, 16]))
def test_zero_batch_any_shape(heads, n, d):
    h, hkv = heads
    spec = pg.Spec(STREAM, q_shape=n, num_heads=h, num_kv_heads=hkv, head_dim=d)
    q, k, v = _qkv(0, h, hkv, n, n, d=d)
    out = pg.attention(q, k, v, spec)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape and k.grad.shape == k.shape
