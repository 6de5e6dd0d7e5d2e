"""Ahead-of-time builds: a spec file's kernels rendered and cross-compiled into a directory
with a manifest (`build`), and such a directory verified and loaded back (`open_build`).

Layout of a build directory (every name relative, no machine path or user name):

    manifest.json                  format, versions, one record per (spec, arch, dtype)
    <spec>_fwd.py                  the generated Triton forward module (shared by every arch/dtype)
    <spec>_fwd_tables.pt           the plan tables the kernel walks (rows, cols, work, head groups)
    <spec>_fwd_sm90_bf16.cubin     the compiled kernel for one arch and dtype, and its .ptx
    <spec>_bwd.py                  the generated backward module (dK/dV, dQ, rowsum(dO * O))
    <spec>_bwd_tables.pt           the backward's plan tables: the dK/dV tiling's forward tables,
                                   its transposed rows_t/cols_t, and the rows/cols of the dQ
                                   kernel's (transposed) tiling as dq_rows/dq_cols
    <spec>_bwd_sm90_bf16_<kernel>.cubin   each backward kernel for one arch and dtype, and .ptx

A length-free spec (no q_shape) is built once for every length: its records say
"length_free": true and hold no tables files (the lengths are kernel arguments; the tables
a walk reads are planned per length at load, a closed-form forward reads none).

A spec whose backward the Triton backend does not generate gets the forward only; the
record's `not_built` says why. Loading imports the saved modules: nothing is rendered,
tuned or analysed. The cubins are shipped, hashed and checked but not loaded into the
driver (Triton 3.9 has no stable public API to launch a foreign cubin): on CUDA the saved
sources run through Triton's JIT, on the CPU through the Triton interpreter.
"""
from .build import build
from .load import BuildFiles, LoadedSpec, open_build
from .manifest import ARCHS, DTYPES, ENTRY, AOTError, KernelRecord, parse_arch, parse_dtype

__all__ = ["ARCHS", "AOTError", "BuildFiles", "DTYPES", "ENTRY", "KernelRecord", "LoadedSpec",
           "build", "open_build", "parse_arch", "parse_dtype"]
