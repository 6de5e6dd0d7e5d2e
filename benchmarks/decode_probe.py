"""Where a decode call's time goes on a GPU (follow-up of `bench --serving`'s decode kernels,
where patterngen's ragged decode ran at 0.59x FlexAttention's speed on an H200).

One query per entry, 8 entries, 32 q / 8 kv heads, head dim 128, bf16, a causal length-free
spec, the cache lengths of `bench --serving` (18646-27719 of 32768). Ways, each timed with CUDA
events (median, L2 flushed) and by the wall clock of a synchronised call (host work included):

1. `pg.attention(..., kv_lens=L)`: the ragged call (its piece table built on the device since
   2026-11-30, no host read; one VARLEN launch, split-KV and merge);
2. `pg.attention` on caches of one length (every entry the longest): no pieces;
3. the forward kernel object alone (`TritonForward`) on (2)'s tensors: no op, no checks; GQA
   packed (four query heads a program, the default) and unpacked (one, as before 2026-11-30);
4. FlexAttention (compiled, block mask built once) on (1)'s problem.

Then the CUDA kernels of one call of (1) and (2) by the profiler, and of one forward + backward
of `bench --serving`'s packed training (16 causal documents, 32768 tokens), where packing ran
slower than padding. Prints tables only.
Run: `python benchmarks/decode_probe.py` (under a minute on an H100/H200).
"""
from __future__ import annotations

import time

import torch

import patterngen as pg
from patterngen.tools.bench.timing import CudaTimer


def wall_us(fn, reps: int = 50) -> float:
    """Median microseconds of a synchronised call (host and device)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def kernels_of(fn) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60)


def main() -> int:
    if not torch.cuda.is_available():
        print("decode probe: needs a CUDA GPU")
        return 1
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from patterngen.backends.triton import TritonForward
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, hq, hkv, d, ctx = 8, 32, 8, 128, 32768
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(ctx // 2, ctx + 1, (B,), generator=g, dtype=torch.int32)
    q = torch.randn(B, hq, 1, d, generator=g).to(dev, dt)
    k, v = (torch.randn(B, hkv, ctx, d, generator=g).to(dev, dt) for _ in range(2))
    longest = int(lens.max())
    k1, v1 = k[:, :, :longest].contiguous(), v[:, :, :longest].contiguous()
    lens_d = lens.to(dev)
    spec = pg.Spec(pg.Causal(), num_heads=hq, num_kv_heads=hkv, head_dim=d)
    fwd = TritonForward(spec, pg.Tiling(16, 64))  # the decode variant's tiles
    unpacked = TritonForward(spec, pg.Tiling(16, 64))
    unpacked.gqa_pack = lambda nq: 1  # one query head a program, as before GQA packing

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= lens_d[b] - 1 + q_idx

    block = create_block_mask(mask_mod, B, None, 1, ctx, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    ways = {"pg ragged (kv_lens)": lambda: pg.attention(q, k, v, spec, kv_lens=lens_d),
            "pg one length": lambda: pg.attention(q, k1, v1, spec),
            "kernel alone, one length": lambda: fwd(q, k1, v1),
            "kernel alone, unpacked": lambda: unpacked(q, k1, v1),
            "flex ragged": lambda: flex(q, k, v, block_mask=block, enable_gqa=True)}
    timer = CudaTimer(dev)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lengths {lens.tolist()}")
    print(f"{'way':28s} {'events us':>10s} {'wall us':>10s}")
    for name, fn in ways.items():
        print(f"{name:28s} {timer(fn)['ms'] * 1e3:10.1f} {wall_us(fn):10.1f}", flush=True)
    for name in ("pg ragged (kv_lens)", "pg one length"):
        print(f"\n# kernels of one call: {name}\n{kernels_of(ways[name])}")
    from patterngen.tools.bench.serving import _doc_lengths
    docs = _doc_lengths(16, 32768, 0)
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    causal = pg.Spec(pg.Causal(), num_heads=4, head_dim=64)
    leaves = [torch.randn(1, 4, 32768, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3)]

    def packed():
        pg.attention(*leaves, causal, cu_seqlens_q=cu, cu_seqlens_k=cu).float().sum().backward()

    def packed_fwd():
        with torch.no_grad():
            pg.attention(*leaves, causal, cu_seqlens_q=cu, cu_seqlens_k=cu)

    print(f"\npacked 16 documents: forward {wall_us(packed_fwd, 20):.0f} us, forward + backward "
          f"{wall_us(packed, 20):.0f} us (wall, synchronised)")
    print(f"# kernels of one packed forward + backward\n{kernels_of(packed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
