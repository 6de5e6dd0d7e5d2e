"""Ahead-of-time builds: `pg.load(DIR)` returns the kernels `patterngen build` wrote to DIR.

The Triton backend writes and reads builds (backends/triton/aot/); this is the public
face: `build` picks each spec's tiling with the tiling policy, as the op does, and a
loaded build hands its kernels to the op (`patterngen.dispatch.register_loaded`), so that
a loaded kernel runs through `pg.attention`'s custom op: the same gradients, the same
`torch.compile` behaviour, and `pg.explain` says when a loaded kernel runs.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

from . import dispatch
from .api import attention
from .backends.triton.aot import AOTError, open_build, parse_arch
from .backends.triton.aot import build as write_build
from .backends.inputs import check_inputs
from .ir import Spec
from .registry import spec_key


def build(specs: list[tuple[str, Spec]], out, archs=("sm_90",), dtypes=("bf16",), head_dim: int | None = None,
          log=None) -> dict:
    """Render each (name, spec)'s forward and backward kernels once on the tiling policy's first
    tiling and cross-compile them for every arch x dtype into `out`; returns the manifest."""
    return write_build(specs, out, dispatch.policy_tiling, archs, dtypes, head_dim, log)


class AOTKernel:
    """The built kernels of one spec: call like pg.compile's kernel,
    `kern(q, k, v, scale=None, block_indices=None, return_lse=False)`; differentiable in q, k, v.
    Runs `pg.attention` with this build's kernels: on CUDA for the device's arch and q's dtype,
    on the CPU in the Triton interpreter under TRITON_INTERPRET=1 (float16, float32), else the
    reference backend."""

    def __init__(self, build: "AOTBuild", loaded):
        self._build, self._loaded = build, loaded
        self.spec, self.records = loaded.spec, loaded.records

    @property
    def kinds(self) -> list[str]:
        """The kernels built for this spec: ['forward'] or ['forward', 'backward']."""
        return self._loaded.kinds

    @property
    def archs(self) -> list[int]:
        return self._loaded.archs

    @property
    def dtypes(self) -> list[str]:
        return self._loaded.dtypes

    def record_for(self, arch: int, dtype: str | None = None):
        return self._loaded.record_for(arch, dtype)

    def __call__(self, q, k, v, scale: float | None = None, block_indices: torch.Tensor | None = None,
                 return_lse: bool = False):
        check_inputs(q, k, v, self.spec)
        if q.is_cuda and q.dtype in dispatch.KERNEL_DTYPES:
            self._loaded.record_of(q)  # AOTError when the build lacks this arch or dtype
        # `load` registered this build already; again here, so that of two loaded builds of one spec the
        # one called is the one that runs (eagerly: under torch.compile the registration stands)
        if not torch.compiler.is_compiling():
            dispatch.register_loaded(spec_key(self.spec), self._loaded)
        return attention(q, k, v, self.spec, scale, block_indices, return_lse)

    def __repr__(self):
        return (f"AOTKernel({self.spec!r}, archs={['sm_%d' % a for a in self.archs]}, dtypes={self.dtypes}, "
                f"kinds={self.kinds})")


class AOTBuild(Mapping):
    """A verified build directory: maps spec reprs to AOTKernel; `build[spec]` also takes a Spec."""

    def __init__(self, files, loaded: dict):
        self.directory, self.name, self.manifest = files.directory, files.name, files.manifest
        self.kernels_built = list(self.manifest["kernels_built"])
        self._kernels = {text: AOTKernel(self, spec) for text, spec in loaded.items()}

    def _key(self, spec) -> str:
        if isinstance(spec, Spec):
            return repr(spec)
        if isinstance(spec, str):
            return spec
        raise TypeError(f"spec: expected a patterngen.Spec or its repr, got {type(spec).__name__}")

    def __getitem__(self, spec) -> AOTKernel:
        key = self._key(spec)
        if key not in self._kernels:
            raise KeyError(f"{self.name}: no kernel for {key}; this build holds: {self.describe()}")
        return self._kernels[key]

    def __contains__(self, spec) -> bool:
        return isinstance(spec, (Spec, str)) and self._key(spec) in self._kernels

    def __call__(self, q, k, v, scale: float | None = None, block_indices: torch.Tensor | None = None,
                 return_lse: bool = False, *, spec: Spec | str | None = None):
        """Run the build's kernel: `build(q, k, v)` when it holds one spec, else
        `build(q, k, v, spec=spec)` (the same as `build[spec](q, k, v)`)."""
        if spec is None:
            if len(self._kernels) != 1:
                raise ValueError(f"spec: {self.name} holds {len(self._kernels)} specs, so say which one to run: "
                                 f"build(q, k, v, spec=...) or build[spec](q, k, v); it holds: {self.describe()}")
            kern = next(iter(self._kernels.values()))
        else:
            kern = self[spec]
        return kern(q, k, v, scale=scale, block_indices=block_indices, return_lse=return_lse)

    def __iter__(self) -> Iterator[str]:
        return iter(self._kernels)

    def __len__(self) -> int:
        return len(self._kernels)

    @property
    def specs(self) -> list[Spec]:
        return [k.spec for k in self._kernels.values()]

    @property
    def archs(self) -> list[int]:
        return sorted({a for k in self._kernels.values() for a in k.archs})

    def describe(self) -> str:
        return "; ".join(f"{text} [{', '.join(r.label for r in k.records)}]"
                         for text, k in self._kernels.items()) or "nothing"

    def __repr__(self):
        return f"AOTBuild({self.name!r}, {len(self)} spec(s), archs={['sm_%d' % a for a in self.archs]})"


def load(directory, spec: Spec | str | None = None, arch=None) -> AOTBuild:
    """Verify a build directory (format, torch/triton/patterngen versions, every file's sha256
    and, when given, that a kernel exists for exactly `spec` and/or `arch`) and return its
    kernels, registered with the op for their specs."""
    files, loaded = open_build(directory)
    build_ = AOTBuild(files, loaded)
    want_arch = None if arch is None else parse_arch(arch)
    if spec is not None:
        if build_._key(spec) not in build_:
            raise AOTError(f"{build_.name}: no kernel for {build_._key(spec)}; this build holds: "
                           f"{build_.describe()}")
        if want_arch is not None:
            build_[spec].record_for(want_arch)
    elif want_arch is not None and want_arch not in build_.archs:
        raise AOTError(f"{build_.name}: no kernel for sm_{want_arch}; this build holds: {build_.describe()}")
    for kern in build_.values():
        dispatch.register_loaded(spec_key(kern.spec), kern._loaded)
    return build_


__all__ = ["AOTBuild", "AOTError", "AOTKernel", "build", "load"]
