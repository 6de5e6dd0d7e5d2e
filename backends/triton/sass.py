"""What a compiled kernel is made of, read from its cubin with the cuobjdump bundled with triton.

The static evidence of speed where no GPU is lent: registers and stack (spills), the matrix
instructions (warpgroup `HGMMA` on sm_90, `HMMA`, i.e. mma.sync, elsewhere) and whether ptxas
serialised the warpgroup ones, asynchronous copies
(`LDGSTS` cp.async, `UTMALDG` TMA) and whether every kv-tile step loop holds some (a
software-pipelined walk: a step loop without is one whose loads sit behind a branch), the
length of the longest loop body, and the instructions of one full and of one partial kv-tile
step (`tile_steps`).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from bisect import bisect_left
from dataclasses import dataclass

from .config import SHARED_LIMIT
from .cross_compile import CompiledKernel

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
ASYNC_COPIES = ("LDGSTS", "UTMALDG")
MMA = ("HGMMA", "HMMA")


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
    step_loops: int  # kv-tile step loops (`step_loops`)
    unpipelined_steps: int  # step loops without an asynchronous copy
    spill_ops: int  # STL + LDL
    step_spills: int  # STL + LDL inside kv-tile step loops (the ones that cost per tile)
    wgmma_waits: int  # WARPGROUP.DEPBAR: waits for warpgroup MMAs
    loop_body: int  # instructions of the longest loop (a backward branch's span)
    full_tile: int = 0  # instructions of one full kv-tile step (`tile_steps`; 0: no matrix loop)
    partial_tile: int = 0  # instructions of one partial kv-tile step

    @property
    def pipelined(self) -> bool:
        """Whether every kv-tile step loop prefetches its tiles with asynchronous copies."""
        return self.step_loops > 0 and self.unpipelined_steps == 0

    @property
    def serialized(self) -> bool:
        """Whether ptxas serialised the warpgroup MMAs (its info C7515): every HGMMA waits alone,
        where an asynchronous kernel waits once per matmul of K/16 instructions or less."""
        return self.warpgroup_mma > 0 and self.wgmma_waits >= self.warpgroup_mma

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


Loop = tuple[int, int]  # (first, last) index of the instructions a backward branch repeats


def _ops(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text) of every SASS instruction."""
    return [(int(m[1], 16), m[2].strip()) for m in _LINE.finditer(sass)]


def _loops(ops: list[tuple[int, str]]) -> list[Loop]:
    """Every loop, one per loop head: from a backward branch's target to the last branch back
    to it (a `continue` adds a second backward branch to the same head, not a second loop)."""
    addresses = [a for a, _ in ops]
    last = {}
    for i, (a, text) in enumerate(ops):
        b = _BRANCH.search(text)
        if b and int(b[1], 16) < a:
            last[bisect_left(addresses, int(b[1], 16))] = i
    return sorted(last.items())


def _count(ops, names: tuple[str, ...], within: Loop | None = None) -> int:
    rng = ops if within is None else ops[within[0]:within[1] + 1]
    return sum(1 for _, t in rng if any(re.search(rf"(^|\s|\}}){n}\b", t) for n in names))


def tile_steps(ops: list[tuple[int, str]], loops: list[Loop]) -> tuple[int, int]:
    """(full, partial): instructions of one full and of one partial kv-tile step.

    The kernels walk full kv tiles in one loop (no mask code) and partial ones in another
    (mask code); in SASS each is a loop holding matrix instructions (HGMMA/HMMA). The step
    loops are those that hold matrix instructions and no inner loop that does; the shortest
    body is the full-tile step, the longest the partial one. Limits: a body is the static
    span of the loop, branches inside it (predicated-off code) count; a kernel with one step
    loop (no partial walk, or full and partial tiles in one loop behind a branch) reports the
    same count twice; a walk whose longest step is not the masked one (a table walk longer
    than the closed-form mask) would swap the two. (0, 0): no loop holds matrix instructions.
    """
    sizes = [j - i + 1 for i, j in step_loops(ops, loops)]
    return (min(sizes), max(sizes)) if sizes else (0, 0)


def step_loops(ops: list[tuple[int, str]], loops: list[Loop]) -> list[Loop]:
    """The kv-tile step loops: loops holding matrix instructions and no inner loop that does."""
    mma = [lp for lp in loops if _count(ops, MMA, lp)]
    return [(i, j) for i, j in mma if not any(i <= a and b <= j and (a, b) != (i, j) for a, b in mma)]


def read(compiled: CompiledKernel) -> KernelReport:
    """The report of one compiled kernel."""
    ops = _ops(_dump(compiled, "-sass"))
    loops = _loops(ops)
    full, partial = tile_steps(ops, loops)
    steps = step_loops(ops, loops)
    regs, stack = resources(compiled)
    return KernelReport(
        name=compiled.name, arch=compiled.arch, registers=regs, stack=stack, shared=compiled.shared,
        instructions=len(ops), warpgroup_mma=_count(ops, ("HGMMA",)), mma_sync=_count(ops, ("HMMA",)),
        async_copies=_count(ops, ASYNC_COPIES),
        step_loops=len(steps), unpipelined_steps=sum(not _count(ops, ASYNC_COPIES, lp) for lp in steps),
        spill_ops=_count(ops, ("STL", "LDL")), step_spills=sum(_count(ops, ("STL", "LDL"), lp) for lp in steps),
        wgmma_waits=_count(ops, ("WARPGROUP.DEPBAR",)),
        loop_body=max((j - i + 1 for i, j in loops), default=0),
        full_tile=full, partial_tile=partial)
