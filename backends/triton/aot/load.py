"""Loading a verified build: the saved modules and plan tables as launchers, nothing
rendered or tuned, and for a fixed-length spec nothing analysed (a length-free build plans
the tables its walks read at each new length's first call, as TritonForward does).
`LoadedSpec.select` hands the op the kernel for a call's arch and dtype
(patterngen.dispatch.register_loaded)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ....ir import Spec
from .. import TritonBackward, TritonForward
from ..cache import import_file, interpreting
from .manifest import AOTError, KernelRecord, check_files, check_manifest, parse_dtype, read_records, sha256


class BuildFiles:
    """The files of a verified build directory, read back only if their sha256 still matches."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.name = directory.name or str(directory)
        self._hashes = {n: h for r in manifest["kernels"] for n, h in r["sha256"].items()}

    def _read(self, name: str) -> bytes:
        if name not in self._hashes:
            raise AOTError(f"{self.name}: {name} is not listed in the manifest")
        data = (self.directory / name).read_bytes()
        if sha256(data) != self._hashes[name]:
            raise AOTError(f"{self.name}: {name} changed since the build was loaded (sha256 mismatch)")
        return data

    def import_source(self, name: str):
        self._read(name)  # verified against the manifest's sha256, which then names the module
        return import_file(self.directory / name, f"patterngen_aot_{self._hashes[name][:24]}")

    def read_tables(self, name: str | None) -> dict | None:
        """The saved tables `name` (None: a length-free build, which plans each length at load)."""
        return None if name is None else torch.load(io.BytesIO(self._read(name)), weights_only=True)


class LoadedSpec:
    """The built kernels of one spec, one record per (arch, dtype); launchers made on first use."""

    def __init__(self, files: BuildFiles, spec: Spec, records: list[KernelRecord]):
        self.files, self.spec, self.records = files, spec, records
        self._forward: dict[bool, TritonForward] = {}
        self._backward: dict[bool, TritonBackward] = {}

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

    def find(self, arch: int, dtype: str | None = None) -> KernelRecord | None:
        return next((r for r in self.records if r.arch == arch and dtype in (None, r.dtype)), None)

    def record_for(self, arch: int, dtype: str | None = None) -> KernelRecord:
        """The record for sm_<arch> (and `dtype`); AOTError naming what the build holds otherwise."""
        record = self.find(arch, dtype)
        if record is None:
            held = ", ".join(r.label for r in self.records)
            want = f"sm_{arch}" + (f"/{dtype}" if dtype else "")
            rebuild = f"--arch sm_{arch}" + (f" --dtype {dtype}" if dtype else "")
            raise AOTError(f"{self.files.name}: no kernel for {want} for {self.spec!r}; this build holds {held}. "
                           f"Rebuild with `patterngen build SPEC {rebuild}`")
        return record

    def record_of(self, q: torch.Tensor) -> KernelRecord:
        """The record q's device and dtype run: by arch and dtype on CUDA, any under the interpreter
        (it runs the saved source, the same for every record)."""
        if not q.is_cuda:
            return self.records[0]
        major, minor = torch.cuda.get_device_capability(q.device)
        return self.record_for(major * 10 + minor, parse_dtype(q.dtype))

    def select(self, role: str, q: torch.Tensor) -> tuple[object | None, str]:
        """(the loaded kernel for `role` and q, what it is), or (None, why none)."""
        if role.startswith("heads_"):
            return None, f"build {self.files.name} holds no head-routed kernels"
        try:
            record = self.record_of(q)
        except AOTError as exc:
            return None, str(exc)
        where = record.label if q.is_cuda else "in the Triton interpreter"
        if role == "forward":
            return self.forward(record), f"the forward kernel loaded from build {self.files.name} ({where})"
        if record.backward is None:
            return None, f"build {self.files.name} holds no backward kernel: {(record.not_built or {}).get('backward')}"
        return self.backward(record), f"the backward kernels loaded from build {self.files.name} ({where})"

    def forward(self, record: KernelRecord) -> TritonForward:
        interp = interpreting()
        if interp not in self._forward:
            module = self.files.import_source(record.files["source"])
            tables = self.files.read_tables(record.files.get("tables"))
            self._forward[interp] = TritonForward.from_saved(self.spec, record.tiling, record.config, module, tables)
        return self._forward[interp]

    def backward(self, record: KernelRecord) -> TritonBackward:
        interp = interpreting()
        if interp not in self._backward:
            bwd, config = record.backward, record.backward_config
            module = self.files.import_source(bwd["files"]["source"])
            tables = self.files.read_tables(bwd["files"].get("tables"))
            fwd = TritonForward.from_saved(self.spec, record.backward_tiling, config, None, tables)
            self._backward[interp] = TritonBackward.from_saved(fwd, module, config, tables)
        return self._backward[interp]


def open_build(directory) -> tuple[BuildFiles, dict[str, LoadedSpec]]:
    """Verify a build directory (format, versions, every file's sha256) and read its records:
    (its files, LoadedSpec by spec repr)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    directory = Path(directory)
    manifest = check_manifest(directory)
    check_files(directory, manifest)
    files = BuildFiles(directory, manifest)
    return files, {text: LoadedSpec(files, records[0].spec, records)
                   for text, records in read_records(manifest).items()}
