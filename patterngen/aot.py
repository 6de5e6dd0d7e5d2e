"""Ahead-of-time builds: `pg.load(DIR)` returns the kernels `patterngen build` wrote to DIR.

The work lives in the Triton backend (backends/triton/aot_build.py); this is the
public face: `load`, and `build` for scripts that do not go through the CLI.
"""
from __future__ import annotations

from .backends.triton.aot_build import AOTBuild, AOTError, AOTKernel, build, load

__all__ = ["AOTBuild", "AOTError", "AOTKernel", "build", "load"]
