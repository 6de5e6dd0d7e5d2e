"""Triton backend: generated flash-attention kernels for a plan."""
from .runtime import KernelConfig, TritonBackward, TritonForward, backward_tiling, default_kernel_tiling
from .heads import TritonHeads
from .autotune import Candidate, candidates, tuned_kernel
