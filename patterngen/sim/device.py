"""Device models: a GPU's datasheet peaks and the cost parameters of patterngen's kernels on it.

Models are data, not code: one JSON file per GPU in `devices/` beside this module (vendor
figures cited in its `source` field; kernel parameters are priors until fitted from
`patterngen bench` measurements, see examples/calibration/, except a partial tile's cost over a
full one's, measured in SASS instructions for the device's "arch" (tile_costs.py)). A new GPU is
a new JSON file, given by path or dropped into that folder; `DeviceModel.from_dict` says what a
file lacks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..analysis.tiling import kernel_tile_ok

DEVICE_DIR = Path(__file__).with_name("devices")
BYTES_PER_ELEMENT = 2  # bf16 / fp16

KERNEL_KEYS = ("mma_efficiency", "softmax_overlap", "partial_tile_factor", "box_tile_factor", "q_tile_overhead_us",
               "tile_overhead_us", "launch_overhead_us", "kv_l2_hit_rate", "ctas_per_sm", "pipeline_stages")
DENSE_KEYS = ("q_tile", "kv_tile", "mma_efficiency", "softmax_overlap", "q_tile_overhead_us", "tile_overhead_us",
              "launch_overhead_us")
HW_KEYS = ("sm_count", "peak_bf16_dense_tflops", "memory_bandwidth_gbs", "exp_per_s", "shared_memory_per_sm_kb")


@dataclass(frozen=True, eq=False)
class DeviceModel:
    """A GPU and the cost parameters of patterngen's kernels (and of a dense baseline) on it.

    Hardware peaks come from vendor datasheets (see `source`); the kernel
    parameters are priors until fitted from `patterngen bench` measurements
    (`calibrated` says which), see examples/calibration/.
    """

    name: str
    display_name: str
    sm_count: int
    peak_bf16_dense_tflops: float
    memory_bandwidth_gbs: float
    exp_per_s: float
    shared_memory_per_sm_kb: float
    tile_volumes: tuple[tuple[int, int], ...]
    kernel: Mapping[str, float]
    dense: Mapping[str, float]
    source: Mapping[str, str] = field(default_factory=dict)
    calibrated: bool = False
    origin: str = ""
    arch: int | None = None  # CUDA compute capability x 10 (90: sm_90): which measured tile costs apply

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> "DeviceModel":
        if not isinstance(data, Mapping):
            raise TypeError(f"device: {origin} must hold a JSON object, got {type(data).__name__}")
        missing = [k for k in ("name", "tile_volumes", "kernel", "dense") + HW_KEYS if k not in data]
        if missing:
            raise ValueError(f"device: {origin} lacks {missing}; a device model needs name, display_name, "
                             f"{', '.join(HW_KEYS)}, tile_volumes, kernel {{{', '.join(KERNEL_KEYS)}}} and "
                             f"dense {{{', '.join(DENSE_KEYS)}}}")
        for part, keys in (("kernel", KERNEL_KEYS), ("dense", DENSE_KEYS)):
            if not isinstance(data[part], Mapping):
                raise TypeError(f"device: {origin}: '{part}' must be an object with {list(keys)}")
            lack = [k for k in keys if k not in data[part]]
            if lack:
                raise ValueError(f"device: {origin}: '{part}' lacks {lack} (needs {list(keys)})")
        for k in HW_KEYS:
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"device: {origin}: '{k}' must be a positive number, got {v!r}")
        vols = data["tile_volumes"]
        if not isinstance(vols, list) or not vols or not all(
                isinstance(p, (list, tuple)) and len(p) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and kernel_tile_ok(x) for x in p)
                for p in vols):
            raise ValueError(f"device: {origin}: 'tile_volumes' must be a non-empty list of [q_volume, kv_volume] "
                             f"integer pairs that the kernels run (powers of two >= 16), got {vols!r}")
        return cls(name=str(data["name"]), display_name=str(data.get("display_name", data["name"])),
                   sm_count=int(data["sm_count"]), peak_bf16_dense_tflops=float(data["peak_bf16_dense_tflops"]),
                   memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]), exp_per_s=float(data["exp_per_s"]),
                   shared_memory_per_sm_kb=float(data["shared_memory_per_sm_kb"]),
                   tile_volumes=tuple((int(a), int(b)) for a, b in vols),
                   kernel={k: float(data["kernel"][k]) for k in KERNEL_KEYS},
                   dense={k: float(data["dense"][k]) for k in DENSE_KEYS},
                   source=dict(data.get("source", {})), calibrated=bool(data.get("calibrated", False)),
                   origin=origin, arch=_arch(data.get("arch"), origin))

    def to_dict(self) -> dict:
        return {"name": self.name, "display_name": self.display_name, "source": dict(self.source),
                "calibrated": self.calibrated, "arch": self.arch, "sm_count": self.sm_count,
                "peak_bf16_dense_tflops": self.peak_bf16_dense_tflops,
                "memory_bandwidth_gbs": self.memory_bandwidth_gbs, "exp_per_s": self.exp_per_s,
                "shared_memory_per_sm_kb": self.shared_memory_per_sm_kb,
                "tile_volumes": [list(p) for p in self.tile_volumes], "kernel": dict(self.kernel),
                "dense": dict(self.dense)}

    def with_kernel(self, **params: float) -> "DeviceModel":
        """A copy with some kernel parameters replaced (what calibration produces)."""
        bad = [k for k in params if k not in KERNEL_KEYS]
        if bad:
            raise ValueError(f"with_kernel: unknown parameters {bad}; valid: {list(KERNEL_KEYS)}")
        return replace(self, kernel={**self.kernel, **{k: float(v) for k, v in params.items()}})

    def fits(self, q_volume: int, kv_volume: int, head_dim: int) -> bool:
        """Whether Q plus the pipelined K and V tiles fit in one CTA's shared memory."""
        stages = self.kernel["pipeline_stages"]
        need = (q_volume + 2 * stages * kv_volume) * head_dim * BYTES_PER_ELEMENT
        return need <= self.shared_memory_per_sm_kb * 1024 / self.kernel["ctas_per_sm"]

    def __repr__(self):
        return f"DeviceModel({self.name!r}, {self.display_name!r}, calibrated={self.calibrated})"


def _arch(value, origin: str) -> int | None:
    """A device file's optional "arch" (e.g. 90 for sm_90)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 10:
        raise ValueError(f"device: {origin}: 'arch' must be a CUDA compute capability times ten (80, 90, 100), "
                         f"got {value!r}")
    return value


def available_devices() -> list[str]:
    """Names of the device models shipped with patterngen."""
    return shipped(DEVICE_DIR)


def shipped(folder: Path) -> list[str]:
    """Names of the JSON models in a folder of shipped models."""
    return sorted(p.stem for p in folder.glob("*.json"))


def load_model(value, cls, what: str, folder: Path):
    """A model of type `cls` (a dataclass with `from_dict(data, origin)`) from an instance, a
    dict, a shipped name (a JSON file of `folder`) or a JSON file's path; `what` names the
    argument in errors ("device", "link")."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    names = ", ".join(shipped(folder))
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a name ({names}), a path to a JSON file or a {cls.__name__}, got {value!r}")
    text = os.fspath(value)
    path = Path(text)
    if not (text.endswith(".json") or path.is_file()):
        path = folder / f"{text.lower()}.json"
        if not path.is_file():
            raise ValueError(f"{what}: unknown {what} {text!r}; shipped models: {names} (or give the path of a JSON "
                             f"{what} model)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file {text!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {text!r} is not valid JSON: {e}") from None
    return cls.from_dict(data, origin=path.name)


def load_device(device: "str | os.PathLike | DeviceModel | Mapping") -> DeviceModel:
    """A device model from a shipped name ('h100', 'h200', 'b200', 'a100'), a path to a
    JSON file with the same fields (the way to add a GPU), a dict, or a DeviceModel."""
    return load_model(device, DeviceModel, "device", DEVICE_DIR)


__all__ = ["DeviceModel", "load_device", "available_devices", "DEVICE_DIR", "BYTES_PER_ELEMENT", "KERNEL_KEYS",
           "DENSE_KEYS", "HW_KEYS"]
