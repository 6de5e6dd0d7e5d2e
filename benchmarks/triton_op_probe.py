"""Evidence for op.py's choice between `torch.library.custom_op` and `triton_op` (issue 12).

On a CUDA GPU: the length-free forward of a sinks + window spec (a closed-form kernel, no
tables) run four ways at a decode shape and a prefill shape, each timed with CUDA events:

1. eager `pg.attention` (the custom op, or its body directly when nothing is traced);
2. `torch.compile` (Inductor) of a function calling `pg.attention`: the op stays opaque;
3. the same kernel launched from a `triton_op` whose body Inductor traces with `wrap_triton`
   (Inductor then sees the kernel, and AOTInductor could embed it);
4. (2) and (3) under `mode="reduce-overhead"` (CUDA graphs).

Prints one line per (shape, way): median microseconds per call and max |difference| from (1).
Run: `python benchmarks/triton_op_probe.py` (about a minute on an H100/H200).
"""
from __future__ import annotations

import sys

import torch

import patterngen as pg
from patterngen import dispatch
from patterngen.registry import spec_key
from patterngen.backends.triton.launch import NO_SCORE_MODS


def main() -> int:
    if not torch.cuda.is_available():
        print("triton_op probe: needs a CUDA GPU")
        return 1
    import triton
    import triton.testing
    from torch.library import triton_op, wrap_triton

    spec = pg.Spec((pg.Sink(4) | pg.Band(1023)) & pg.Causal(), num_heads=32, num_kv_heads=8, head_dim=128)
    key = spec_key(spec)

    def launcher(var: str):
        kern = dispatch.kernel(key, "forward", var)
        assert kern is not None and kern.walk_name == "closed_form", (var, dispatch.reason(key, "forward", var))
        return kern

    kernels = {"decode": launcher("decode"), "prefill": launcher("prefill")}

    @triton_op("pgprobe::attention", mutates_args={})
    def probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decode: bool) -> torch.Tensor:
        kern = kernels["decode" if decode else "prefill"]
        B, H, nq, _ = q.shape
        nkv = k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(B, H, nq, device=q.device, dtype=torch.float32)
        nq_t = triton.cdiv(nq, kern.block_m)
        wrap_triton(kern.module.attention_fwd)[(nq_t * H, B)](
            q, k, v, out, lse, lse, lse, lse, 1.0 / 128 ** 0.5, 0.0, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *out.stride()[:3], H, nq_t, nq, nkv, 1, B, **kern.constexprs(q.dtype), HAS_SINKS=False,
            SPLIT_KV=False, VARLEN=False, PACK=1, **NO_SCORE_MODS,
            num_warps=kern.config.num_warps, num_stages=kern.config.num_stages)
        return out

    def eager(q, k, v):
        return pg.attention(q, k, v, spec)

    rows = []
    for name, nq, nkv in (("decode 1x8192", 1, 8192), ("prefill 4096", 4096, 4096)):
        torch.manual_seed(0)
        q = torch.randn(1, 32, nq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, nkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        want = eager(q, k, v)
        decode = nq <= dispatch.DECODE_ROWS
        ways = {"eager pg.attention": eager,
                "eager triton_op": lambda q, k, v: probe(q, k, v, decode)}
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            ways[f"compiled custom_op ({mode})"] = torch.compile(eager, mode=mode, fullgraph=True)
            ways[f"compiled triton_op ({mode})"] = torch.compile(lambda q, k, v: probe(q, k, v, decode), mode=mode,
                                                               fullgraph=True)
        for way, fn in ways.items():
            try:
                got = fn(q, k, v)
                err = (got.float() - want.float()).abs().max().item()
                us = 1e3 * triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
                rows.append((name, way, f"{us:9.1f}", f"{err:.1e}"))
            except Exception as exc:  # report and go on: this is a probe
                rows.append((name, way, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            print(" | ".join(rows[-1]), flush=True)
    print("\nshape          | way                                  | us/call   | max |diff|")
    for r in rows:
        print(f"{r[0]:14s} | {r[1]:36s} | {r[2]:9s} | {r[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
