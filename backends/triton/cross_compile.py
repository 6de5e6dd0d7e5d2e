"""Compile a generated kernel for a GPU architecture without a GPU (cubin, PTX, resources).

Ahead-of-time builds and the sm_80/sm_90 resource tests need real machine code from a
machine that may have no GPU: triton can target any CUDA arch from the CPU. When
TRITON_INTERPRET is on, compilation runs in a child process: triton 3.9's interpreter
leaves `triton.language` patched after kernels that call other jit functions, which
breaks compilation in the same process.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .cache import interpreting, write_source
from .config import KernelConfig


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: int
    cubin: bytes
    ptx: str
    shared: int
    num_warps: int
    num_stages: int


def compile_file(path: str, kernel: str, signature: dict, constexprs: dict, aligned: list[int], arch: int,
                 num_warps: int, num_stages: int) -> CompiledKernel:
    """Compile `kernel` of the module at `path` for sm_<arch>, in this process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location(f"_pg_cross_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, kernel)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    return CompiledKernel(kernel, arch, out.asm["cubin"], out.asm["ptx"], out.metadata.shared, num_warps, num_stages)


def compile_kernel(**job) -> CompiledKernel:
    """`compile_file`, in a clean child process when the interpreter is active."""
    if not interpreting():
        return compile_file(**job)
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(job), capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    if proc.returncode:
        raise RuntimeError(f"cross-compilation for sm_{job['arch']} failed:\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return CompiledKernel(r["name"], r["arch"], base64.b64decode(r["cubin"]), r["ptx"], r["shared"],
                          r["num_warps"], r["num_stages"])


# integer tables of the templates' kernel signatures; other upper-case pointers are q, k, v,
# the output and their gradients, in the launch dtype
_INT_TABLES = ("ROWS", "COLS", "WORK", "HEAD_GROUP", "IDX", "VISIT", "ROWS_T", "COLS_T", "HIDX", "SLOTS", "PREF",
               "KV_LO", "KV_HI", "RUN_PTR", "RUNS", "RT_PTR", "RT_Q", "SEGS", "TBASE")


def compile_generated(source: str, kernel: str, arg_names: list[str], consts: dict, dtype: torch.dtype, arch: int,
                      config: KernelConfig, head_dim: int) -> CompiledKernel:
    """Compile `kernel` of a generated module for sm_<arch>, with the signature and the
    specialisations its JIT launch would get."""
    elem = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    signature = {}
    for name in arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA", "SINKS", "SLOPES"):
            signature[name] = "*fp32"
        elif name in _INT_TABLES:
            signature[name] = "*i32"
        elif name == "CLASSES":
            signature[name] = "*i8"
        elif name.isupper():
            signature[name] = f"*{elem}"
        else:
            signature[name] = "fp32" if name in ("sm_scale", "softcap") else "i32"
    # what the JIT specialises at run time: 16-byte aligned pointers, and strides of q, k, v and
    # their gradients that are multiples of 16 (contiguous tensors with head_dim % 16 == 0); the
    # strides of index tensors (si*) depend on top-k and get no such promise
    aligned = [i for i, (n, t) in enumerate(signature.items())
               if t.startswith("*") or (t == "i32" and n[0] == "s" and not n.startswith("si")
                                         and head_dim % 16 == 0)]
    return compile_kernel(path=str(write_source(source)), kernel=kernel, signature=signature, constexprs=consts,
                          aligned=aligned, arch=arch, num_warps=config.num_warps, num_stages=config.num_stages)


if __name__ == "__main__":
    c = compile_file(**json.loads(sys.stdin.read()))
    print(json.dumps({"name": c.name, "arch": c.arch, "cubin": base64.b64encode(c.cubin).decode(), "ptx": c.ptx,
                      "shared": c.shared, "num_warps": c.num_warps, "num_stages": c.num_stages}))
