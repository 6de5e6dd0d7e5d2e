"""Spec files: Python files that define `spec` (a `patterngen.Spec`) and/or `specs` (a list).

Every command takes its patterns this way, so that a pattern is written once, in the
language users already write models in, and the commands share one set of error messages.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from ..ir import Spec

EXAMPLES_DIR = Path("examples")


class SpecFileError(ValueError):
    """A spec file that cannot be loaded; the message says why."""


def load_specs(path) -> list[tuple[str, Spec]]:
    """Execute a spec file and collect its `spec` and `specs`, as (name, Spec) pairs.

    Names are the module-level variable names of the specs when they have one
    ("spec", "hdit"), else "specs[i]". A spec listed twice is returned once.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecFileError(f"spec file {str(path)!r} not found (expected a Python file defining `spec` or `specs`)")
    sys.path.insert(0, str(p.resolve().parent))  # as `python FILE` would: siblings are importable
    try:
        ns = runpy.run_path(str(p), run_name="__patterngen_spec__")
    except Exception as exc:  # the user's file failed: say which file, keep the cause
        raise SpecFileError(f"{p}: executing the spec file failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(p.resolve().parent))
    if "spec" not in ns and "specs" not in ns:
        raise SpecFileError(f"{p}: defines neither `spec` nor `specs` (set `spec = patterngen.Spec(...)` or "
                            f"`specs = [...]`)")
    found: list[Spec] = []
    if "spec" in ns:
        found.append(ns["spec"])
    if "specs" in ns:
        listed = ns["specs"]
        if not isinstance(listed, (list, tuple)):
            raise SpecFileError(f"{p}: `specs` must be a list of patterngen.Spec, got {type(listed).__name__}")
        found.extend(listed)
    names = {id(v): k for k, v in ns.items() if isinstance(v, Spec) and not k.startswith("_")}
    names.update({id(ns["spec"]): "spec"} if isinstance(ns.get("spec"), Spec) else {})
    out, seen = [], set()
    for i, s in enumerate(found):
        if not isinstance(s, Spec):
            where = "spec" if (i == 0 and "spec" in ns) else "an entry of specs"
            raise SpecFileError(f"{p}: {where} must be a patterngen.Spec, got {s!r} ({type(s).__name__})")
        if id(s) in seen:
            continue
        seen.add(id(s))
        listed_index = i - (1 if "spec" in ns else 0)
        out.append((names.get(id(s), f"specs[{listed_index}]"), s))
    return out


def spec_files(paths: list[str]) -> list[Path]:
    """The files to run: the given ones (directories expand to their *.py), or ./examples."""
    if not paths:
        if not EXAMPLES_DIR.is_dir():
            raise SpecFileError(f"no SPEC given and there is no ./{EXAMPLES_DIR} directory here ({Path.cwd()}); "
                                f"run from the repository root, which holds the bundled examples, or pass spec files")
        paths = [str(EXAMPLES_DIR)]
    out: list[Path] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.glob("*.py") if not f.name.startswith("_"))
            if not files:
                raise SpecFileError(f"directory {path!r} holds no spec files (*.py)")
            out.extend(files)
        else:
            out.append(p)
    return out


def select_specs(specs: list[tuple[str, Spec]], name: str | None, path) -> list[tuple[str, Spec]]:
    """The specs called `name` (all of them when `name` is None); none is an error naming the choices."""
    if name is None:
        return specs
    chosen = [(n, s) for n, s in specs if n == name]
    if not chosen:
        raise SpecFileError(f"{path}: no spec named {name!r} (available: {', '.join(n for n, _ in specs)})")
    return chosen
