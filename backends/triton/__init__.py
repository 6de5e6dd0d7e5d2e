"""Triton backend: generated flash-attention kernels for a plan.

The steps, bottom up: `config` (launch parameters) and `checks` (what the kernels accept);
`masks` and `render` (pattern -> kernel text through the Jinja templates); `ranges`
(closed-form kv walks); `tables` (plan -> int32 device tables); `cache` (generated modules
on disk); `cross_compile` (machine code for sm_80/sm_90 without a GPU); `launch`
(TritonForward, TritonBackward); `heads` (head-routed kernels); `autotune` (timing
candidate launches); `aot` (builds made ahead of time, loaded without rendering).
"""
from .autotune import LaunchCandidate, candidates, tuned_kernel
from .checks import check_launch_dtype, check_routed_block
from .config import KernelConfig, backward_tiling, default_config
from .cross_compile import CompiledKernel
from .heads import TritonHeads
from .launch import TritonBackward, TritonForward

__all__ = ["CompiledKernel", "KernelConfig", "LaunchCandidate", "TritonBackward", "TritonForward", "TritonHeads",
           "backward_tiling", "candidates", "check_launch_dtype", "check_routed_block", "default_config",
           "tuned_kernel"]
