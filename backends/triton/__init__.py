"""Triton backend: generated flash-attention kernels for a plan."""
from .runtime import KernelConfig, TritonBackward, TritonForward, backward_tiling
from .autotune import Candidate, candidates, tuned_kernel
