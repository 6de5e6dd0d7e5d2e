"""Compile a generated kernel for a GPU architecture without a GPU (cubin, PTX, resources).

When TRITON_INTERPRET is on, compilation runs in a child process: triton 3.9's
interpreter leaves `triton.language` patched after kernels that call other
jit functions, which breaks compilation in the same process.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass


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

    spec = importlib.util.spec_from_file_location(f"_pg_aot_{abs(hash(path))}", path)
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
    import triton
    if not triton.knobs.runtime.interpret:
        return compile_file(**job)
    env_free = {"TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "patterngen.backends.triton.aot"], input=json.dumps(job),
                          capture_output=True, text=True, env={**__import__("os").environ, **env_free})
    if proc.returncode:
        raise RuntimeError(f"cross-compilation for sm_{job['arch']} failed:\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return CompiledKernel(r["name"], r["arch"], base64.b64decode(r["cubin"]), r["ptx"], r["shared"],
                          r["num_warps"], r["num_stages"])


if __name__ == "__main__":
    c = compile_file(**json.loads(sys.stdin.read()))
    print(json.dumps({"name": c.name, "arch": c.arch, "cubin": base64.b64encode(c.cubin).decode(), "ptx": c.ptx,
                      "shared": c.shared, "num_warps": c.num_warps, "num_stages": c.num_stages}))
