"""Triton backend: generated flash-attention kernels for a plan."""
from .runtime import KernelConfig, TritonForward
