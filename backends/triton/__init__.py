"""Triton backend: generated flash-attention kernels for a plan."""
from .runtime import KernelConfig, TritonForward
from .autotune import Candidate, candidates, tuned_kernel
