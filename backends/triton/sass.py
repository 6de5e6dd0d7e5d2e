"""What a compiled kernel is made of, read from its cubin with the cuobjdump bundled with triton.

The static evidence of speed where no GPU is lent: registers and stack (spills), the matrix
instructions (warpgroup `HGMMA` on sm_90, `HMMA`, i.e. mma.sync, elsewhere), asynchronous copies
(`LDGSTS` cp.async, `UTMALDG` TMA) and whether any sits inside a loop (a software-pipelined kv
loop), and the length of the longest loop body, the instructions of one kv-tile step.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .cross_compile import CompiledKernel

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
ASYNC_COPIES = ("LDGSTS", "UTMALDG")
SHARED_LIMIT = {80: 167_936, 90: 232_448}
"""Most shared memory one block may take (bytes, opt-in): A100 164 KB, H100/H200 227 KB."""


def cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _dump(compiled: CompiledKernel, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.cubin)
    try:
        return subprocess.run([cuobjdump(), *flags, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def resources(compiled: CompiledKernel) -> tuple[int, int]:
    """(registers, stack bytes): a stack means spilled registers."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", _dump(compiled, "-res-usage"))
    return int(m[1]), int(m[2])


@dataclass(frozen=True)
class KernelReport:
    """One compiled kernel, as its SASS shows it."""

    name: str
    arch: int
    registers: int
    stack: int
    shared: int
    instructions: int
    warpgroup_mma: int  # HGMMA
    mma_sync: int  # HMMA
    async_copies: int  # LDGSTS + UTMALDG
    async_in_loop: bool
    spill_ops: int  # STL + LDL
    loop_body: int  # instructions of the longest loop (a backward branch's span)

    @property
    def pipelined(self) -> bool:
        return self.async_in_loop

    @property
    def fits(self) -> bool:
        """Whether its shared memory fits one block of the arch (else it cannot launch there)."""
        return self.shared <= SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80])

    @property
    def matmul(self) -> str:
        """Which matrix instructions the kernel uses: "wgmma", "mma.sync", "mixed" or "none"."""
        if self.warpgroup_mma and self.mma_sync:
            return "mixed"
        return "wgmma" if self.warpgroup_mma else ("mma.sync" if self.mma_sync else "none")


def read(compiled: CompiledKernel) -> KernelReport:
    """The report of one compiled kernel."""
    ops = []  # (address, opcode text)
    for m in _LINE.finditer(_dump(compiled, "-sass")):
        ops.append((int(m[1], 16), m[2].strip()))
    addr = [a for a, _ in ops]
    loops = []  # (first, last) indices of the instructions a backward branch repeats
    for i, (a, text) in enumerate(ops):
        b = _BRANCH.search(text)
        if b and int(b[1], 16) < a:
            target = int(b[1], 16)
            loops.append((next(k for k, x in enumerate(addr) if x >= target), i))

    def count(*names: str, within=None) -> int:
        rng = ops if within is None else ops[within[0]:within[1] + 1]
        return sum(1 for _, t in rng if any(re.search(rf"(^|\s|\}}){n}\b", t) for n in names))
    regs, stack = resources(compiled)
    return KernelReport(
        name=compiled.name, arch=compiled.arch, registers=regs, stack=stack, shared=compiled.shared,
        instructions=len(ops), warpgroup_mma=count("HGMMA"), mma_sync=count("HMMA"),
        async_copies=count(*ASYNC_COPIES),
        async_in_loop=any(count(*ASYNC_COPIES, within=lp) for lp in loops),
        spill_ops=count("STL", "LDL"), loop_body=max((j - i + 1 for i, j in loops), default=0))
