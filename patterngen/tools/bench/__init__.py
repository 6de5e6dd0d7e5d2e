"""`patterngen bench`: patterngen's forward kernel against FlexAttention and dense SDPA.

For every case of the suite, in one process on the current GPU, it times

* patterngen: the generated Triton forward (`TritonForward`) on the first tiling that
  runs of the tiling policy's list (the simulator's kernel-runnable ranking, then
  `analysis.tiling.default_tiling`), the best of a few warp/stage configurations;
* FlexAttention: `torch.compile(flex_attention)` with the block mask of the
  equivalent mask_mod (`patterngen.integrations.flex`), block sizes 128 and 64, the
  faster kept; building the block mask is timed separately;
* SDPA: dense attention without a mask (the baseline of the simulator's bound),
  with `is_causal=True` for causal cases (the FlashAttention/cuDNN floor), and
  with the dense boolean mask when it fits in memory;

checks patterngen's output against FlexAttention's, and reports speedups, the
simulator's bound and how much of it is realised. Kernel times are medians of
CUDA-event timings after warm-up, with the L2 cache flushed before each repeat.

Without a GPU nothing is timed; `--cpu-smoke` runs tiny versions of the cases
on the CPU (the Triton interpreter, eager FlexAttention) to exercise the code.

Modules, in the order a run uses them: `suite` (the cases), `timing` (timers),
`runners` (one implementation each), `measure` (one case: inputs, simulator bound,
runners, errors), `report` (table, summary, files), `command` (the CLI).
"""
