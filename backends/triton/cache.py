"""The on-disk cache of generated kernel sources and tuning results.

Entries are keyed by a hash of their content and the versions that made them,
written atomically (a temporary file, then `os.replace`), and a damaged entry
is rewritten rather than trusted. The cache lives in $PATTERNGEN_CACHE, else
~/.cache/patterngen. A cache that cannot be written (a read-only home, a
container) is not fatal: the process falls back to a temporary directory of
its own and warns once, naming the variable that fixes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

ENV = "PATTERNGEN_CACHE"
_fallback: Path | None = None


class CacheError(OSError):
    """The kernel cache is misconfigured in a way a fallback would hide; the message says how to fix it."""


def configured_dir() -> Path:
    """$PATTERNGEN_CACHE, else ~/.cache/patterngen; a path that exists but is no directory is refused."""
    root = os.environ.get(ENV)
    path = Path(root) if root else Path(os.path.expanduser("~")) / ".cache" / "patterngen"
    if path.exists() and not path.is_dir():
        where = f"{ENV}={root!r}" if root else f"the default cache {str(path)!r}"
        raise CacheError(f"kernel cache: {where} is a file, not a directory; set {ENV} to a directory "
                         f"(it is created if missing)")
    return path


_WRITABLE: dict[Path, bool] = {}


def _writable(directory: Path) -> bool:
    """Whether files can be created in `directory` (made if missing): tried once per process with
    a probe file, since permission bits do not tell (root, read-only mounts)."""
    if directory not in _WRITABLE:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
            _WRITABLE[directory] = True
        except OSError:
            _WRITABLE[directory] = False
    return _WRITABLE[directory]


def cache_dir() -> Path:
    """The cache root this process writes to: the configured one, or a per-process temporary
    directory (with a warning) where the configured one cannot be written."""
    global _fallback
    path = configured_dir()
    if _writable(path):
        return path
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="patterngen-cache-"))
        warnings.warn(f"kernel cache: {str(path)!r} cannot be written; this process caches its kernels in "
                      f"{str(_fallback)!r} instead (lost at exit). Set {ENV} to a writable directory to keep "
                      f"them", RuntimeWarning, stacklevel=3)
    return _fallback


def subdir(name: str) -> Path:
    """A directory of the cache (`kernels`, `tuning`), created if needed."""
    directory = cache_dir() / name
    if directory.exists() and not directory.is_dir():
        raise CacheError(f"kernel cache: {str(directory)!r} should be a directory but is a file; remove it or "
                         f"set {ENV} to another directory")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def replace_atomic(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` (bytes, or text) to `path` through a temporary file in the same directory
    and os.replace, with permission bits `mode` if given (else mkstemp's 0600); nothing is left
    behind on failure. The one atomic writer of the cache and of ahead-of-time builds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: str) -> None:
    """Write the cache entry `data` to `path` atomically (`replace_atomic`), making its
    directory if needed; a directory standing where the file belongs is reported."""
    if path.is_dir():
        raise CacheError(f"kernel cache: {str(path)!r} is a directory where a cache entry belongs; remove it "
                         f"or set {ENV} to another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(path, data)


def source_key(source: str) -> str:
    import torch
    import triton
    from ...version import __version__
    h = hashlib.sha256()
    for part in (source, __version__, torch.__version__, triton.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def write_source(source: str) -> Path:
    """The cache file holding `source`, keyed by its hash and the versions; rewritten when
    its text differs (corrupt or truncated)."""
    path = subdir("kernels") / f"patterngen_kernel_{source_key(source)}.py"
    try:
        intact = path.read_text() == source
    except (OSError, UnicodeDecodeError):
        intact = False
    if not intact:
        write_atomic(path, source)
    return path


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1) rather than compiling them."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def load_source(source: str):
    """Import the cached module of `source` (interpreted or JIT, as TRITON_INTERPRET says)."""
    path = write_source(source)
    return import_file(path, path.stem)


def import_file(path: Path, module_name: str):
    """Import a generated module once per name (kernels compile per module object); under the
    interpreter the name gets the suffix `_interp`, so that an interpreted module and a JIT one
    of the same file are kept apart."""
    if interpreting():
        module_name += "_interp"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module
