"""Ahead-of-time builds: render and cross-compile a spec file's kernels into a directory
with a manifest, and load such a directory back as ready-to-run kernels.

Layout of a build directory (every name relative, no machine path or user name):

    manifest.json                  format, versions, one record per (spec, arch, dtype)
    <spec>_fwd.py                  the generated Triton forward module (shared by every arch/dtype)
    <spec>_fwd_tables.pt           the plan tables the kernel walks (rows, cols, work, head groups)
    <spec>_fwd_sm90_bf16.cubin     the compiled kernel for one arch and dtype, and its .ptx
    <spec>_bwd.py                  the generated backward module (dK/dV, dQ, rowsum(dO * O))
    <spec>_bwd_tables.pt           the backward's plan tables: its forward tables (the backward
                                   may walk smaller q tiles) and the transposed rows_t/cols_t
    <spec>_bwd_sm90_bf16_<kernel>.cubin   each backward kernel for one arch and dtype, and .ptx

Forward and backward kernels are built for every spec (the record's `kernels_built`,
the same backward pg.attention's CUDA path builds at run time); a spec whose backward
the Triton backend does not generate gets the forward only, the record's `not_built`
says why, and its gradients come from the reference backend.

Loading imports the saved modules (no rendering, no tuning, no plan analysis:
the tables are saved too). On CUDA the kernels are launched through those modules
and Triton's JIT, after checking that the device's architecture and the
tensors' dtype are among the built ones; the cubins are shipped, hashed and
checked but not loaded into the driver (Triton 3.9 has no stable public API to
launch a foreign cubin). On CPU the kernels run under the Triton interpreter when
TRITON_INTERPRET=1 and through the exact reference backend otherwise. A loaded
kernel is differentiable in q, k and v: the saved backward kernels give the
gradients where the forward ran as a kernel, the reference backend's autograd
otherwise (and for a gradient flowing into the returned lse).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ...ir import Spec
from ...ir.parse import parse_repr
from ...analysis.plan import build_plan
from ...core.tiles import TileGrid, Tiling
from ..inputs import check_inputs, check_scale
from ..reference import reference_attention
from .cache import import_file
from .runtime import KernelConfig, TritonBackward, TritonForward, backward_tiling

FORMAT = "patterngen-aot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENTRY = "attention_fwd"
BACKWARD_ENTRIES = ("attention_bwd_dkdv", "attention_bwd_dq", "bwd_preprocess")


class AOTError(ValueError):
    """A build directory that cannot be used here; the message says what differs."""


# -- argument parsing -----------------------------------------------------------------
def parse_arch(arch) -> int:
    """'sm_90', 'sm90', '90' or 90 -> 90 (one of ARCHS)."""
    text = str(arch).strip().lower()
    digits = text[3:] if text.startswith("sm_") else text[2:] if text.startswith("sm") else text
    if not digits.isdigit() or int(digits) not in ARCHS:
        raise ValueError(f"arch: {arch!r} is not a supported architecture (valid: "
                         f"{', '.join(f'sm_{a}' for a in ARCHS)})")
    return int(digits)


def parse_dtype(dtype) -> str:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> 'bf16'."""
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    text = aliases.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if text not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported (valid: {', '.join(DTYPES)})")
    return text


def with_head_dim(spec: Spec, head_dim: int | None) -> Spec:
    if head_dim is None:
        return spec
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"head_dim: must be a positive int, got {head_dim!r}")
    return Spec(spec.pattern, spec.q_shape, spec.kv_shape, spec.num_heads, spec.num_kv_heads, head_dim)


def spec_sha256(spec_or_repr) -> str:
    text = spec_or_repr if isinstance(spec_or_repr, str) else repr(spec_or_repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _pow2_volume(tile) -> bool:
    vol = math.prod(tile) if isinstance(tile, tuple) else tile
    return vol >= 16 and not vol & (vol - 1)


def forward_tiling(spec: Spec) -> Tiling:
    """The simulator's tiling when the kernel can run it (power-of-two volumes >= 16), else 64/64;
    Routed specs need tiles equal to their block."""
    if spec.routed is not None:
        return Tiling(spec.routed.block, spec.routed.block)
    from ...sim import simulate
    report = simulate(spec)
    if _pow2_volume(report.q_tile) and _pow2_volume(report.kv_tile):
        return Tiling(report.q_tile, report.kv_tile)
    return Tiling(64, 64)


# -- files ------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(directory: Path, name: str, data: bytes) -> str:
    """Write `data` to directory/name through a temporary file and os.replace; returns its sha256."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the build from other users
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return _sha256(data)


def _tables_bytes(kern: TritonForward, backward: TritonBackward | None = None) -> bytes:
    """The forward's plan tables, and with `backward` its transposed tables too."""
    tables = {"rows": kern.rows, "cols": kern.cols, "work": kern.work, "head_group": kern.head_group,
              "routed_heads": kern.routed_heads, "max_static": torch.tensor(kern.max_static)}
    if backward is not None:
        tables.update(rows_t=backward.rows_t, cols_t=backward.cols_t)
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


def versions() -> dict:
    import triton
    from ...version import __version__
    return {"patterngen": __version__, "torch": torch.__version__.split("+")[0], "triton": triton.__version__}


def _tile_json(tile):
    return list(tile) if isinstance(tile, tuple) else tile


def _tile_from_json(tile):
    return tuple(tile) if isinstance(tile, list) else tile


# -- build ------------------------------------------------------------------------------
def build(specs: list[tuple[str, Spec]], out, archs=("sm_90",), dtypes=("bf16",), head_dim: int | None = None,
          log=None) -> dict:
    """Render each spec's forward and backward kernels once and cross-compile them for every
    arch x dtype into `out`; returns the manifest (also written, last, as out/manifest.json)."""
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
        tiling = forward_tiling(spec)
        kern = TritonForward(spec, tiling)
        stem = f"{_safe(name)}_{digest[:12]}_fwd"
        files = {f"{stem}.py": kern.source.encode(), f"{stem}_tables.pt": _tables_bytes(kern)}
        # the backward exactly as pg.attention's CUDA path builds it at run time (patterngen/op.py)
        bwd, bstem, why_not = None, f"{_safe(name)}_{digest[:12]}_bwd", None
        btiling = backward_tiling(tiling, spec.head_dim, spec)
        try:
            bwd = TritonBackward(TritonForward(spec, btiling))
        except NotImplementedError as exc:
            why_not = f"{exc} (a loaded kernel's gradients come from the reference backend)"
        if bwd is not None:
            files.update({f"{bstem}.py": bwd.source.encode(), f"{bstem}_tables.pt": _tables_bytes(bwd.fwd, bwd)})
        hashes = {n: _write_atomic(directory, n, data) for n, data in files.items()}
        for arch in arch_list:
            for dt in dtype_list:
                if log:
                    log(f"  {name}: forward{'' if bwd is None else ' + backward'}, sm_{arch}, {dt} ...")
                with _no_line_info():
                    compiled = kern.cross_compile(arch, DTYPES[dt])
                    bcompiled = [] if bwd is None else bwd.cross_compile(arch, DTYPES[dt], preprocess=True)
                kfiles = {f"{stem}_sm{arch}_{dt}.cubin": compiled.cubin,
                          f"{stem}_sm{arch}_{dt}.ptx": compiled.ptx.encode()}
                bkernels = {}
                for c in bcompiled:
                    base = f"{bstem}_sm{arch}_{dt}_{c.name}"
                    kfiles.update({f"{base}.cubin": c.cubin, f"{base}.ptx": c.ptx.encode()})
                    bkernels[c.name] = {"cubin": f"{base}.cubin", "ptx": f"{base}.ptx", "shared_bytes": c.shared,
                                        "config": {"num_warps": c.num_warps, "num_stages": c.num_stages}}
                khashes = {n: _write_atomic(directory, n, data) for n, data in kfiles.items()}
                record = {
                    "kind": "attention", "name": name, "spec": text, "spec_sha256": digest,
                    "kernels_built": ["forward"] if bwd is None else ["forward", "backward"],
                    "tiling": {"q_tile": _tile_json(tiling.q_tile), "kv_tile": _tile_json(tiling.kv_tile)},
                    "config": {"num_warps": compiled.num_warps, "num_stages": compiled.num_stages},
                    "arch": arch, "dtype": dt, "head_dim": spec.head_dim, "shared_bytes": compiled.shared,
                    "entry": ENTRY,
                    "files": {"source": f"{stem}.py", "tables": f"{stem}_tables.pt",
                              "cubin": f"{stem}_sm{arch}_{dt}.cubin", "ptx": f"{stem}_sm{arch}_{dt}.ptx"},
                }
                if bwd is None:
                    record["not_built"] = {"backward": why_not}
                else:
                    record["backward"] = {
                        "tiling": {"q_tile": _tile_json(btiling.q_tile), "kv_tile": _tile_json(btiling.kv_tile)},
                        "config": {"num_warps": bwd.config.num_warps, "num_stages": bwd.config.num_stages},
                        "files": {"source": f"{bstem}.py", "tables": f"{bstem}_tables.pt"},
                        "kernels": bkernels,
                    }
                record["sha256"] = {**hashes, **khashes}
                records.append(record)
    kinds = ["forward"] + (["backward"] if any("backward" in r for r in records) else [])
    missing = sorted({r["name"] for r in records if "backward" not in r})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
        "kernels_built": kinds,
        "not_built": ({"backward": f"not generated for {', '.join(missing)} (see each record's not_built; "
                                   f"their gradients come from the reference backend)"}
                      if missing else {}),
        "runtime": "CUDA: the saved sources through Triton's JIT (cubins are verified, not driver-loaded); "
                   "CPU: the reference backend, or the Triton interpreter when TRITON_INTERPRET=1; "
                   "gradients: the saved backward kernels where built, else the reference backend",
        "kernels": records,
    }
    _write_atomic(directory, MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
    return manifest


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return out or "spec"


# -- reading specs back, without eval ---------------------------------------------------
def parse_spec(text: str) -> Spec:
    """Rebuild a manifest's Spec from its repr (a manifest is data: nothing in it is executed)."""
    try:
        spec = parse_repr(text)
    except (TypeError, ValueError) as exc:
        raise AOTError(f"manifest: cannot read the spec: {exc}") from None
    if not isinstance(spec, Spec):
        raise AOTError(f"manifest: {text[:200]!r} does not describe a patterngen Spec of this version")
    return spec


# -- load -------------------------------------------------------------------------------
def _major_minor(version: str) -> str:
    return ".".join(str(version).split("+")[0].split(".")[:2])


class LoadedForward(TritonForward):
    """A TritonForward assembled from a build directory: the saved module and tables, so
    nothing is rendered, analysed or tuned; launching is TritonForward's."""

    def __init__(self, spec: Spec, tiling: Tiling, config: KernelConfig, module, tables: dict):
        self.spec = spec
        self.q_grid = TileGrid(spec.q_shape, tiling.q_tile, "q_tile")
        self.kv_grid = TileGrid(spec.kv_shape, tiling.kv_tile, "kv_tile")
        self.block_m, self.block_n = self.q_grid.volume, self.kv_grid.volume
        self.block_d = max(16, 1 << (spec.head_dim - 1).bit_length())
        self.config = config
        self.module = module
        self.source = None  # never rendered here; the module was imported from the build
        self.rows, self.cols, self.work = tables["rows"], tables["cols"], tables["work"]
        self.head_group, self.routed_heads = tables["head_group"], tables["routed_heads"]
        self.max_static = int(tables["max_static"])
        self._device_tables = {}


@dataclass
class KernelRecord:
    spec: Spec
    arch: int
    dtype: str
    tiling: Tiling
    config: KernelConfig
    shared_bytes: int
    files: dict
    backward: dict | None = None  # the manifest's backward section; None where not built


class _LoadedAttention(torch.autograd.Function):
    """A loaded forward kernel with its saved backward kernels as the gradient (dq, dk, dv).
    A gradient flowing into lse, or a spec built without backward kernels, takes the
    reference backend's autograd instead."""

    @staticmethod
    def forward(ctx, kern, record, scale, block_indices, q, k, v):
        out, lse = kern._triton(record)(q, k, v, scale=scale, block_indices=block_indices)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, block_indices)
        ctx.kern, ctx.record, ctx.scale = kern, record, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, block_indices = ctx.saved_tensors
        kern = ctx.kern
        if dout is None and dlse is None:
            grads = (None, None, None)
        elif dlse is None and ctx.record.backward is not None and q.shape[0] > 0:
            grads = kern._triton_backward(ctx.record)(q, k, v, out, lse, dout, scale=ctx.scale,
                                                           block_indices=block_indices)
        else:
            grads = kern._reference_grads(q, k, v, dout, dlse, ctx.scale, block_indices)
        return (None, None, None, None, *grads)


class AOTKernel:
    """The built kernels of one spec: call like pg.compile's kernel,
    `kern(q, k, v, scale=None, block_indices=None, return_lse=False)`; differentiable in q, k, v."""

    def __init__(self, build: "AOTBuild", spec: Spec, records: list[KernelRecord]):
        self._build, self.spec, self.records = build, spec, records
        self._forward: dict[bool, LoadedForward] = {}
        self._backward: dict[bool, TritonBackward] = {}
        self._plan = None

    @property
    def kinds(self) -> list[str]:
        """The kernels built for this spec: ['forward'] or ['forward', 'backward']."""
        return ["forward"] + (["backward"] if all(r.backward is not None for r in self.records) else [])

    @property
    def archs(self) -> list[int]:
        return sorted({r.arch for r in self.records})

    @property
    def dtypes(self) -> list[str]:
        return sorted({r.dtype for r in self.records})

    def record_for(self, arch: int, dtype: str | None = None) -> KernelRecord:
        for r in self.records:
            if r.arch == arch and (dtype is None or r.dtype == dtype):
                return r
        held = ", ".join(f"sm_{r.arch}/{r.dtype}" for r in self.records)
        want = f"sm_{arch}" + (f"/{dtype}" if dtype else "")
        raise AOTError(f"{self._build.name}: no kernel for {want} for {self.spec!r}; this build holds {held}. "
                       f"Rebuild with `patterngen build SPEC --arch sm_{arch}" + (f" --dtype {dtype}`" if dtype
                                                                                  else "`"))

    def _triton(self, record: KernelRecord) -> LoadedForward:
        import triton
        interp = bool(triton.knobs.runtime.interpret)
        if interp not in self._forward:
            module = self._build.import_source(record.files["source"], interp)
            tables = self._build.read_tables(record.files["tables"])
            self._forward[interp] = LoadedForward(self.spec, record.tiling, record.config, module, tables)
        return self._forward[interp]

    def _triton_backward(self, record: KernelRecord) -> TritonBackward:
        """The saved backward launcher: its module and tables as built (nothing rendered)."""
        import triton
        interp = bool(triton.knobs.runtime.interpret)
        if interp not in self._backward:
            bwd = record.backward
            module = self._build.import_source(bwd["files"]["source"], interp)
            tables = self._build.read_tables(bwd["files"]["tables"])
            tiling = Tiling(_tile_from_json(bwd["tiling"]["q_tile"]), _tile_from_json(bwd["tiling"]["kv_tile"]))
            config = KernelConfig(**bwd["config"])
            fwd = LoadedForward(self.spec, tiling, config, None, tables)  # the backward's plan tables
            self._backward[interp] = TritonBackward.from_saved(fwd, module, tables["rows_t"], tables["cols_t"],
                                                               config)
        return self._backward[interp]

    def _reference(self, q, k, v, scale, block_indices):
        if self.spec.routed is None and self._plan is None:
            self._plan = build_plan(self.spec)  # the plan pg.attention follows: same numbers
        return reference_attention(q, k, v, self.spec, plan=self._plan, scale=scale, block_indices=block_indices)

    def _reference_grads(self, q, k, v, dout, dlse, scale, block_indices):
        """(dq, dk, dv) by differentiating the reference forward (dout or dlse may be None)."""
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            out, lse = self._reference(qg, kg, vg, scale, block_indices)
            pairs = [(o, g) for o, g in ((out, dout), (lse, dlse)) if g is not None]
            grads = torch.autograd.grad([o for o, _ in pairs], (qg, kg, vg), [g for _, g in pairs],
                                        allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))

    def __call__(self, q, k, v, scale: float | None = None, block_indices: torch.Tensor | None = None,
                 return_lse: bool = False):
        check_inputs(q, k, v, self.spec)
        scale = check_scale(scale, self.spec.head_dim)
        if q.is_cuda:
            major, minor = torch.cuda.get_device_capability(q.device)
            record = self.record_for(major * 10 + minor, parse_dtype(q.dtype) if q.dtype in DTYPES.values()
                                     else str(q.dtype))
        elif os.environ.get("TRITON_INTERPRET") == "1" and q.dtype != torch.float64:
            record = self.records[0]
        else:  # the reference backend is differentiable as it stands
            out, lse = self._reference(q, k, v, scale, block_indices)
            return (out, lse) if return_lse else out
        out, lse = _LoadedAttention.apply(self, record, scale, block_indices, q, k, v)
        return (out, lse) if return_lse else out

    def __repr__(self):
        return (f"AOTKernel({self.spec!r}, archs={['sm_%d' % a for a in self.archs]}, dtypes={self.dtypes}, "
                f"kinds={self.kinds})")


def _backward_section(record: dict) -> dict | None:
    """The record's backward section, checked for what loading needs (None where not built)."""
    bwd = record.get("backward")
    if bwd is None:
        return None
    try:
        ok = (set(bwd["files"]) == {"source", "tables"} and set(bwd["kernels"]) <= set(BACKWARD_ENTRIES)
              and all(name in record["sha256"] for name in bwd["files"].values())
              and all(k[f] in record["sha256"] for k in bwd["kernels"].values() for f in ("cubin", "ptx"))
              and {"q_tile", "kv_tile"} <= set(bwd["tiling"]) and KernelConfig(**bwd["config"]) is not None)
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise AOTError(f"manifest: the backward section of the {record.get('spec', '?')[:120]} record is "
                       f"malformed; rebuild with `patterngen build`")
    return bwd


class AOTBuild(Mapping):
    """A verified build directory: maps spec reprs to AOTKernel; `build[spec]` also takes a Spec."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.name = directory.name or str(directory)
        self.manifest = manifest
        self.kernels_built = list(manifest["kernels_built"])
        grouped: dict[str, list[KernelRecord]] = {}
        specs: dict[str, Spec] = {}
        for r in manifest["kernels"]:
            if r["spec"] not in specs:
                specs[r["spec"]] = parse_spec(r["spec"])
            tiling = Tiling(_tile_from_json(r["tiling"]["q_tile"]), _tile_from_json(r["tiling"]["kv_tile"]))
            grouped.setdefault(r["spec"], []).append(KernelRecord(
                specs[r["spec"]], int(r["arch"]), r["dtype"], tiling, KernelConfig(**r["config"]),
                int(r["shared_bytes"]), dict(r["files"]), _backward_section(r)))
        self._kernels = {text: AOTKernel(self, specs[text], recs) for text, recs in grouped.items()}

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
        return "; ".join(f"{text} [{', '.join(f'sm_{r.arch}/{r.dtype}' for r in k.records)}]"
                         for text, k in self._kernels.items()) or "nothing"

    def import_source(self, name: str, interp: bool):
        """Import a saved module (checked against its hash again: it may have changed since load)."""
        path = self.directory / name
        data = path.read_bytes()
        if _sha256(data) != self._hash_of(name):
            raise AOTError(f"{self.name}: {name} changed since the build was loaded (sha256 mismatch)")
        return import_file(path, f"patterngen_aot_{_sha256(data)[:24]}" + ("_interp" if interp else ""))

    def read_tables(self, name: str) -> dict:
        data = (self.directory / name).read_bytes()
        if _sha256(data) != self._hash_of(name):
            raise AOTError(f"{self.name}: {name} changed since the build was loaded (sha256 mismatch)")
        return torch.load(io.BytesIO(data), weights_only=True)

    def _hash_of(self, name: str) -> str:
        for r in self.manifest["kernels"]:
            if name in r["sha256"]:
                return r["sha256"][name]
        raise AOTError(f"{self.name}: {name} is not listed in the manifest")

    def __repr__(self):
        return f"AOTBuild({self.name!r}, {len(self)} spec(s), archs={['sm_%d' % a for a in self.archs]})"


def _check_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise AOTError(f"directory {str(directory)!r} does not exist (expected the --out of `patterngen build`)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise AOTError(f"{directory.name}: no {MANIFEST}; not a `patterngen build` directory") from None
    except (OSError, ValueError) as exc:
        raise AOTError(f"{directory.name}: {MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AOTError(f"{directory.name}: {MANIFEST} is not a patterngen build manifest "
                       f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AOTError(f"{directory.name}: manifest format version {manifest.get('format_version')!r}, this "
                       f"patterngen reads version {FORMAT_VERSION}; rebuild with this patterngen")
    for key in ("versions", "kernels", "kernels_built"):
        if key not in manifest:
            raise AOTError(f"{directory.name}: {MANIFEST} lacks {key!r}")
    built, here = manifest["versions"], versions()
    diffs = []
    for lib in ("torch", "triton"):
        if _major_minor(built.get(lib, "?")) != _major_minor(here[lib]):
            diffs.append(f"{lib} {built.get(lib)!r} at build time, {here[lib]!r} here")
    if built.get("patterngen") != here["patterngen"]:  # the kernels' calling convention is patterngen's
        diffs.append(f"patterngen {built.get('patterngen')!r} at build time, {here['patterngen']!r} here")
    if diffs:
        raise AOTError(f"{directory.name}: built for other versions: {'; '.join(diffs)}. Rebuild with "
                       f"`patterngen build` in this environment")
    return manifest


def _check_files(directory: Path, manifest: dict) -> None:
    for r in manifest["kernels"]:
        for name, want in r["sha256"].items():
            if Path(name).name != name or name.startswith("."):
                raise AOTError(f"{directory.name}: manifest names a file outside the directory: {name!r}")
            try:
                got = _sha256((directory / name).read_bytes())
            except OSError:
                raise AOTError(f"{directory.name}: {name} is missing (listed in the manifest)") from None
            if got != want:
                raise AOTError(f"{directory.name}: {name} is corrupt: sha256 {got[:16]}... does not match the "
                               f"manifest's {want[:16]}...; rebuild the directory")


def load(directory, spec: Spec | str | None = None, arch=None) -> AOTBuild:
    """Verify a build directory (format, torch/triton/patterngen versions, every file's sha256
    and, when given, that a kernel exists for exactly `spec` and/or `arch`) and return its kernels."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    directory = Path(directory)
    manifest = _check_manifest(directory)
    _check_files(directory, manifest)
    build_ = AOTBuild(directory, manifest)
    want_arch = None if arch is None else parse_arch(arch)
    if spec is not None:
        kern = build_[spec] if build_._key(spec) in build_ else None
        if kern is None:
            raise AOTError(f"{directory.name}: no kernel for {build_._key(spec)}; this build holds: "
                           f"{build_.describe()}")
        if want_arch is not None:
            kern.record_for(want_arch)
    elif want_arch is not None and want_arch not in build_.archs:
        raise AOTError(f"{directory.name}: no kernel for sm_{want_arch}; this build holds: {build_.describe()}")
    return build_
