"""The build format: names, the manifest's records, and the checks a directory must pass
before anything in it is imported (format, versions, every file's sha256)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ....core.tiles import Tiling
from ....ir import Spec
from ....ir.parse import parse_repr
from .. import KernelConfig
from ..config import tiling_from_json

FORMAT = "patterngen-aot"
FORMAT_VERSION = 5  # 2: lengths are kernel arguments, length-free specs (no tables saved); 3: cols_t holds
# first tokens, the forward takes SINKS; 4: the forward and backward take SLOPES and softcap (score modifications);
# 5: the forward takes PACK (GQA-packed decoding), the backward SEGS, TBASE and VARLEN (pieces in one launch)
MANIFEST = "manifest.json"
ARCHS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENTRY = "attention_fwd"
BACKWARD_ENTRIES = ("attention_bwd_dkdv", "attention_bwd_dq", "bwd_preprocess")


class AOTError(ValueError):
    """A build directory that cannot be used here; the message says what differs."""


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_sha256(spec_or_repr) -> str:
    text = spec_or_repr if isinstance(spec_or_repr, str) else repr(spec_or_repr)
    return sha256(text.encode())


def versions() -> dict:
    import triton
    from ....version import __version__
    return {"patterngen": __version__, "torch": torch.__version__.split("+")[0], "triton": triton.__version__}


@dataclass
class KernelRecord:
    """One manifest record: a spec's kernels for one arch and dtype."""

    spec: Spec
    arch: int
    dtype: str
    tiling: Tiling
    config: KernelConfig
    shared_bytes: int
    files: dict
    backward: dict | None = None  # the manifest's backward section; None where not built
    not_built: dict | None = None
    backward_tiling: Tiling | None = None  # the backward section's tiling and config, parsed
    backward_config: KernelConfig | None = None

    @property
    def label(self) -> str:
        return f"sm_{self.arch}/{self.dtype}"


def parse_spec(text: str) -> Spec:
    """Rebuild a manifest's Spec from its repr with the IR's reader (nothing is executed)."""
    try:
        spec = parse_repr(text)
    except (TypeError, ValueError) as exc:
        raise AOTError(f"manifest: cannot read the spec: {exc}") from None
    if not isinstance(spec, Spec):
        raise AOTError(f"manifest: {text[:200]!r} does not describe a patterngen Spec of this version")
    return spec


def _backward_section(record: dict) -> tuple[dict | None, Tiling | None, KernelConfig | None]:
    """The record's backward section, checked for what loading needs, with its tiling and
    config parsed ((None, None, None) where not built)."""
    bwd = record.get("backward")
    if bwd is None:
        return None, None, None
    tiling = config = None
    try:
        ok = ({"source"} <= set(bwd["files"]) <= {"source", "tables"} and set(bwd["kernels"]) <= set(BACKWARD_ENTRIES)
              and all(name in record["sha256"] for name in bwd["files"].values())
              and all(k[f] in record["sha256"] for k in bwd["kernels"].values() for f in ("cubin", "ptx"))
              and {"q_tile", "kv_tile"} <= set(bwd["tiling"]))
        if ok:
            tiling, config = tiling_from_json(bwd["tiling"]), KernelConfig(**bwd["config"])
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise AOTError(f"manifest: the backward section of the {record.get('spec', '?')[:120]} record is "
                       f"malformed; rebuild with `patterngen build`")
    return bwd, tiling, config


def read_records(manifest: dict) -> dict[str, list[KernelRecord]]:
    """The manifest's records grouped by spec repr, in manifest order."""
    grouped: dict[str, list[KernelRecord]] = {}
    specs: dict[str, Spec] = {}
    for r in manifest["kernels"]:
        if r["spec"] not in specs:
            specs[r["spec"]] = parse_spec(r["spec"])
        forward = (specs[r["spec"]], int(r["arch"]), r["dtype"], tiling_from_json(r["tiling"]),
                   KernelConfig(**r["config"]), int(r["shared_bytes"]), dict(r["files"]))
        bwd, btiling, bconfig = _backward_section(r)
        grouped.setdefault(r["spec"], []).append(KernelRecord(*forward, bwd, r.get("not_built"), btiling, bconfig))
    return grouped


def _major_minor(version: str) -> str:
    return ".".join(str(version).split("+")[0].split(".")[:2])


def check_manifest(directory: Path) -> dict:
    """The manifest of `directory`, after checking its format and the versions it was built with."""
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
    diffs = [f"{lib} {built.get(lib)!r} at build time, {here[lib]!r} here" for lib in ("torch", "triton")
             if _major_minor(built.get(lib, "?")) != _major_minor(here[lib])]
    if built.get("patterngen") != here["patterngen"]:  # the kernels' calling convention is patterngen's
        diffs.append(f"patterngen {built.get('patterngen')!r} at build time, {here['patterngen']!r} here")
    if diffs:
        raise AOTError(f"{directory.name}: built for other versions: {'; '.join(diffs)}. Rebuild with "
                       f"`patterngen build` in this environment")
    return manifest


def check_files(directory: Path, manifest: dict) -> None:
    """Every file the manifest lists is inside `directory` and has its recorded sha256."""
    for r in manifest["kernels"]:
        for name, want in r["sha256"].items():
            if Path(name).name != name or name.startswith("."):
                raise AOTError(f"{directory.name}: manifest names a file outside the directory: {name!r}")
            try:
                got = sha256((directory / name).read_bytes())
            except OSError:
                raise AOTError(f"{directory.name}: {name} is missing (listed in the manifest)") from None
            if got != want:
                raise AOTError(f"{directory.name}: {name} is corrupt: sha256 {got[:16]}... does not match the "
                               f"manifest's {want[:16]}...; rebuild the directory")
