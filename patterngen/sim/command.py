"""`patterngen simulate SPEC`: the simulator's command-line front end.

The CLI owns the parser and spec files; this module only adds its arguments and runs
them, with `load_specs` passed in, so the simulator never imports the CLI.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..ir import Spec
from .device import available_devices
from .plot import plot
from .report import format_table
from .sharding import available_links
from .simulator import simulate


def _parse_tile(text: str):
    try:
        parts = [int(x) for x in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise ValueError(f"--tile: {text!r} is not a tile; write an int (flat, e.g. 128) or a box such as 16x8") \
            from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `patterngen simulate`."""
    parser.add_argument("spec", metavar="SPEC", help="Python file defining `spec` (or several specs)")
    parser.add_argument("--device", default=None,
                        help=f"device model: {', '.join(available_devices())} or a JSON file (default: none, "
                             f"tile bounds only)")
    parser.add_argument("--tile", nargs=2, metavar=("Q", "KV"), default=None,
                        help="fix the tiles, e.g. --tile 128 128 or --tile 16x8 16x8 (default: search)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--explain", action="store_true", help="show the ranking of the candidate tilings")
    parser.add_argument("--active-heads", type=float, default=None, metavar="F",
                        help="token-routed heads (Mixture-of-Head): the expected fraction in (0, 1] of "
                             "(token, head) pairs that are computed (default: every head)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="predict the spec sequence-sharded over N GPUs (per-rank compute, bytes received, "
                             "transfers; --device defaults to h100)")
    parser.add_argument("--link", default=None,
                        help=f"with --world-size: the link between GPUs: {', '.join(available_links())} or a JSON file "
                             f"(default nvlink-h100)")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default=None,
                        help="with --world-size: the shard layout (default: the faster)")
    parser.add_argument("--plot", metavar="OUT.png", default=None,
                        help="draw the tile map and the bound against tile shapes (needs matplotlib)")


def run(args: argparse.Namespace, load_specs: Callable[[str], list[tuple[str, Spec]]]) -> int:
    """Run `patterngen simulate` with parsed arguments; returns the exit status.

    load_specs(path) -> [(name, Spec)]: the CLI's spec-file loader (its errors are ValueErrors).
    """
    q_tile = kv_tile = None
    try:
        if args.tile is not None:
            q_tile, kv_tile = (_parse_tile(t) for t in args.tile)
        specs = load_specs(args.spec)
        if getattr(args, "world_size", None) is not None:
            return _run_sharded(args, specs, q_tile, kv_tile)
        rows = []
        for name, spec in specs:
            rows.append((name, simulate(spec, q_tile, kv_tile, device=args.device, batch=args.batch,
                                        active_heads=getattr(args, "active_heads", None))))
    except (ValueError, TypeError) as e:
        print(f"patterngen simulate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.explain:
        for name, r in rows:
            print(f"\n== {name}")
            print(r.explain())
    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError as e:
            print(f"patterngen simulate: error: --plot needs matplotlib ({e}); install it with "
                  f"`pip install matplotlib` or `pip install patterngen[plot]`", file=sys.stderr)
            return 3
        print(f"wrote {args.plot}")
    return 0


def _run_sharded(args: argparse.Namespace, specs, q_tile, kv_tile) -> int:
    """`--world-size`: one summary and per-rank table per spec."""
    for name, spec in specs:
        r = simulate(spec, q_tile, kv_tile, device=args.device, batch=args.batch, world_size=args.world_size,
                     link=args.link, layout=args.layout)
        print(f"== {name}: {r.summary()}\n{r.table()}\n")
    return 0


__all__ = ["add_cli_arguments", "run"]
