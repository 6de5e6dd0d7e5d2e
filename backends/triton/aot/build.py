"""Writing a build: render each spec's forward and backward kernels once, cross-compile them
for every arch x dtype, and write sources, plan tables, cubins, PTX and the manifest
(atomically, with no machine path in any file)."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ....core.tiles import Tiling
from ....ir import Spec
from .. import TritonBackward, TritonForward, backward_tiling
from ..cache import replace_atomic
from ..config import tiling_json
from .manifest import (DTYPES, ENTRY, FORMAT, FORMAT_VERSION, MANIFEST, parse_arch, parse_dtype, sha256, spec_sha256,
                       versions)


def with_head_dim(spec: Spec, head_dim: int | None) -> Spec:
    if head_dim is None:
        return spec
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"head_dim: must be a positive int, got {head_dim!r}")
    return Spec(spec.pattern, spec.q_shape, spec.kv_shape, spec.num_heads, spec.num_kv_heads, head_dim)


def write_atomic(directory: Path, name: str, data: bytes) -> str:
    """Write `data` to directory/name through a temporary file and os.replace; returns its sha256."""
    replace_atomic(directory / name, data, mode=0o644)  # mkstemp's 0600 would hide the build from other users
    return sha256(data)


def tables_bytes(kern: TritonForward, backward: TritonBackward | None = None) -> bytes:
    """A fixed spec's forward plan tables, and with `backward` (whose dK/dV plan `kern` is) its
    transposed tables and dQ plan too (a length-free spec saves none: the tables of each length
    are planned at its first call)."""
    tables = {"rows": kern.rows, "cols": kern.cols, "work": kern.work, "head_group": kern.head_group,
              "routed_heads": kern.routed_heads}
    if backward is not None:
        tables.update(backward.saved_tables())
    buf = io.BytesIO()
    torch.save(tables, buf)
    return buf.getvalue()


@contextlib.contextmanager
def _no_line_info():
    """Compile without debug line info: it would embed the generated file's absolute path
    (and Triton's install path) in the PTX and cubin."""
    old = os.environ.get("TRITON_DISABLE_LINE_INFO")
    os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_DISABLE_LINE_INFO", None)
        else:
            os.environ["TRITON_DISABLE_LINE_INFO"] = old


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return out or "spec"


def _kernel_files(stem: str, bstem: str, arch: int, dt: str, compiled, bcompiled) -> tuple[dict, dict]:
    """The files of one arch x dtype and the backward section's per-kernel entries."""
    files = {f"{stem}_sm{arch}_{dt}.cubin": compiled.cubin, f"{stem}_sm{arch}_{dt}.ptx": compiled.ptx.encode()}
    kernels = {}
    for c in bcompiled:
        base = f"{bstem}_sm{arch}_{dt}_{c.name}"
        files.update({f"{base}.cubin": c.cubin, f"{base}.ptx": c.ptx.encode()})
        kernels[c.name] = {"cubin": f"{base}.cubin", "ptx": f"{base}.ptx", "shared_bytes": c.shared,
                           "config": {"num_warps": c.num_warps, "num_stages": c.num_stages}}
    return files, kernels


def build(specs: list[tuple[str, Spec]], out, tiling: Callable[[Spec], Tiling], archs=("sm_90",),
          dtypes=("bf16",), head_dim: int | None = None, log=None) -> dict:
    """Render each spec's forward kernel on `tiling(spec)` (and its backward, as the op builds
    it) once and cross-compile them for every arch x dtype into `out`; returns the manifest
    (also written, last, as out/manifest.json)."""
    arch_list = list(dict.fromkeys(parse_arch(a) for a in archs))
    dtype_list = list(dict.fromkeys(parse_dtype(d) for d in dtypes))
    if not arch_list or not dtype_list:
        raise ValueError(f"archs/dtypes: need at least one of each, got archs={archs!r}, dtypes={dtypes!r}")
    if not specs:
        raise ValueError("specs: nothing to build (the spec file defined no spec)")
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    records, seen = [], set()
    for name, spec in specs:
        if not isinstance(spec, Spec):
            raise TypeError(f"specs: {name!r} is a {type(spec).__name__}, expected a patterngen.Spec")
        spec = with_head_dim(spec, head_dim)
        text = repr(spec)
        digest = spec_sha256(text)
        if digest in seen:
            continue
        seen.add(digest)
        ftiling = tiling(spec)
        kern = TritonForward(spec, ftiling)
        stem, bstem = f"{_safe(name)}_{digest[:12]}_fwd", f"{_safe(name)}_{digest[:12]}_bwd"
        saved = not spec.length_free  # a length-free build holds no tables
        files = {f"{stem}.py": kern.source.encode()}
        if saved:
            files[f"{stem}_tables.pt"] = tables_bytes(kern)
        bwd, why_not = None, None
        btiling = backward_tiling(ftiling, spec.head_dim, spec)
        try:
            bwd = TritonBackward(TritonForward(spec, btiling))
        except NotImplementedError as exc:  # recorded in the manifest's not_built
            why_not = f"{exc} (a loaded kernel's gradients come from the reference backend)"
        if bwd is not None:
            files[f"{bstem}.py"] = bwd.source.encode()
            if saved:
                files[f"{bstem}_tables.pt"] = tables_bytes(bwd.dkdv, bwd)
        hashes = {n: write_atomic(directory, n, data) for n, data in files.items()}
        for arch in arch_list:
            for dt in dtype_list:
                if log:
                    log(f"  {name}: forward{'' if bwd is None else ' + backward'}, sm_{arch}, {dt} ...")
                with _no_line_info():
                    compiled = kern.cross_compile(arch, DTYPES[dt])
                    bcompiled = [] if bwd is None else bwd.cross_compile(arch, DTYPES[dt], preprocess=True)
                kfiles, bkernels = _kernel_files(stem, bstem, arch, dt, compiled, bcompiled)
                khashes = {n: write_atomic(directory, n, data) for n, data in kfiles.items()}
                record = {
                    "kind": "attention", "name": name, "spec": text, "spec_sha256": digest,
                    "kernels_built": ["forward"] if bwd is None else ["forward", "backward"],
                    "tiling": tiling_json(ftiling),
                    "config": {"num_warps": compiled.num_warps, "num_stages": compiled.num_stages},
                    "arch": arch, "dtype": dt, "head_dim": spec.head_dim, "shared_bytes": compiled.shared,
                    "entry": ENTRY, "length_free": spec.length_free, "walk": kern.walk.name,
                    "files": {"source": f"{stem}.py", **({"tables": f"{stem}_tables.pt"} if saved else {}),
                              "cubin": f"{stem}_sm{arch}_{dt}.cubin", "ptx": f"{stem}_sm{arch}_{dt}.ptx"},
                }
                if bwd is None:
                    record["not_built"] = {"backward": why_not}
                else:
                    record["backward"] = {
                        "tiling": tiling_json(btiling),
                        "config": {"num_warps": bwd.config.num_warps, "num_stages": bwd.config.num_stages},
                        "files": {"source": f"{bstem}.py", **({"tables": f"{bstem}_tables.pt"} if saved else {})},
                        "kernels": bkernels,
                    }
                record["sha256"] = {**hashes, **khashes}
                records.append(record)
    missing = sorted({r["name"] for r in records if "backward" not in r})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
        "kernels_built": ["forward"] + (["backward"] if any("backward" in r for r in records) else []),
        "not_built": ({"backward": f"not generated for {', '.join(missing)} (see each record's not_built; "
                                   f"their gradients come from the reference backend)"}
                      if missing else {}),
        "runtime": "CUDA: the saved sources through Triton's JIT (cubins are verified, not driver-loaded); "
                   "CPU: the reference backend, or the Triton interpreter when TRITON_INTERPRET=1; "
                   "gradients: the saved backward kernels where built, else the reference backend",
        "kernels": records,
    }
    write_atomic(directory, MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
    return manifest
