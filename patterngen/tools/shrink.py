"""Scaled copies of specs: the same kind of pattern on few enough tokens for a CPU.

`patterngen run` checks attention against dense SDPA, which needs the full Nq x Nkv mask;
a real model's spec does not fit, so the check runs on a copy shrunk by one integer factor.
This is a heuristic of that check (which lengths scale, which counts are kept), not part of
the pattern language, so it lives with the tool that uses it rather than in `ir`.
"""
from __future__ import annotations

import math

from ..ir import Band, Global, Heads, Intersection, Pattern, Routed, Sink, Spec, Strided, Union, Window


def _odd_like(w: int, x: float) -> int:
    """round(x), with the parity of w (odd windows stay centred)."""
    r = max(1, round(x))
    return r + 1 if (r % 2) != (w % 2) else r


def shrink_pattern(p: Pattern, f: float, spec: Spec, q_shape, kv_shape, nkv: int) -> Pattern:
    """`p` of `spec` with every length along the sequence divided by `f`, for a spec of
    shape `q_shape` x `kv_shape` (`nkv` keys); sink and global counts are kept."""
    if isinstance(p, (Union, Intersection)):
        return type(p).of(*(shrink_pattern(c, f, spec, q_shape, kv_shape, nkv) for c in p.parts))
    if f == 1:
        return p
    if isinstance(p, Band):
        left = 0 if p.left == 0 else max(1, round((p.left + 1) / f) - 1)
        right = 0 if p.right == 0 else max(1, round(p.right / f))
        return Band(left, right)
    if isinstance(p, (Sink, Global)):
        return type(p)(min(p.n, nkv))
    if isinstance(p, Strided):
        if p.block > 1:  # S2's block shards: shrink the blocks, keep the stride and offset
            return Strided(p.stride, p.offset, max(1, round(p.block / f)))
        if p.stride <= 16:
            return p
        stride = max(2, round(p.stride / f))
        return Strided(stride, min(stride - 1, round(p.offset * stride / p.stride)))
    if isinstance(p, Routed):
        if isinstance(p.block, tuple):  # boxes that still cut the smaller grid into whole boxes
            box = tuple(math.gcd(n, max(1, round(b / f))) for n, b in zip(q_shape, p.block))
            return Routed(box, min(p.topk, nkv // math.prod(box)))
        block = max(1, round(p.block / f))
        return Routed(block, min(p.topk, -(-nkv // block)), p.causal)
    if isinstance(p, Window):
        sizes, strides, dils, causal = [], [], [], []
        for (w, s, d, c), L, Ln in zip(p.dims(spec.ndim), spec.q_shape, q_shape):
            fk = L / Ln
            if w == L:
                wn = Ln
            else:
                wn = min(Ln, max(2, _odd_like(w, w / fk))) if Ln >= 2 else Ln
            sn = min(wn, max(1, round(s / fk)))
            dn = d if wn * d <= Ln else max(1, Ln // wn)
            sizes.append(wn), strides.append(sn), dils.append(dn), causal.append(c)
        return Window(tuple(sizes), tuple(strides), tuple(dils) if any(d != 1 for d in dils) else 1,
                      tuple(causal) if any(causal) else False)
    return p


def shrink_spec(spec: Spec, max_tokens: int = 2048, budget: float = 2.0 ** 31) -> tuple[Spec, str]:
    """A small copy of `spec` with the same kind of pattern, and a sentence saying how it was made.

    Heads: the key/value groups that hold one head of every distinct head
    pattern. Tokens: every grid extent divided by one integer factor (so that
    heads x tokens^2 x head_dim stays within `budget`), and with it every
    length along the sequence (bands, strides over 16, routed blocks, windows
    and window strides); sink and global counts are kept.
    """
    g = spec.num_heads // spec.num_kv_heads
    first: dict[Pattern, int] = {}
    for h, p in enumerate(spec.head_patterns):
        first.setdefault(p, h)
    kv_groups = sorted({h // g for h in first.values()})
    heads = [h for kg in kv_groups for h in range(kg * g, (kg + 1) * g)]
    H = len(heads)

    def shapes(f):
        return tuple(-(-n // f) for n in spec.q_shape), tuple(-(-n // f) for n in spec.kv_shape)

    def fits(f):
        qs, ks = shapes(f)
        n = max(math.prod(qs), math.prod(ks))
        return (n <= max_tokens and H * n * n * spec.head_dim <= budget) or all(x == 1 for x in qs + ks)

    f = 1
    while not fits(f):
        f += 1
    # a factor that divides every extent keeps proportions exact (e.g. windows aligned with strides)
    extents = spec.q_shape + spec.kv_shape
    f = next((c for c in range(f, 2 * f + 1) if all(n % c == 0 for n in extents)), f)
    qs, ks = shapes(f)
    nkv = math.prod(ks)
    pats = [shrink_pattern(spec.head_patterns[h], f, spec, qs, ks, nkv) for h in heads]
    pattern = pats[0] if len(set(pats)) == 1 else Heads(pats)
    small = Spec(pattern, qs, ks, num_heads=H, num_kv_heads=len(kv_groups), head_dim=spec.head_dim)
    how = (f"tokens {spec.nq} -> {small.nq}" + (f" (kv {spec.nkv} -> {small.nkv})" if spec.nkv != spec.nq else "")
           + (f", every extent / {f}, lengths along it / {f}, sink/global counts kept" if f > 1 else "")
           + f"; heads {H} of {spec.num_heads} ({len(kv_groups)} kv group(s) covering all "
           f"{len(first)} distinct head pattern(s))")
    return small, how
