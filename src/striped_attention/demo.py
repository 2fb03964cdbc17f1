"""`striped-attention demo`: causal attention over one long sequence on local CPU ranks, every layout,
checked against single-process attention, timed, and summarised in one table."""

from __future__ import annotations

import argparse

from .bench import BenchConfig, run
from .cli import describe
from .layouts import LAYOUTS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run every layout on local ranks, check it against one process, print a table",
        description=describe(__doc__),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--world-size", type=int, default=2, help="number of local ranks (processes, 1 thread each)")
    p.add_argument("--seq-len", type=int, default=16384, help="global sequence length in tokens")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per layout (median reported)")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = BenchConfig(
        world_size=args.world_size, seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, dtype=args.dtype, repeats=args.repeats, warmup=1, check=True,
        layouts=tuple(LAYOUTS),
    )
    print(
        f"causal attention, {cfg.seq_len} tokens over {cfg.world_size} CPU ranks (gloo, 1 thread each), "
        f"{cfg.heads} heads / {cfg.kv_heads} kv heads, head_dim {cfg.head_dim}, {cfg.dtype}; "
        f"median of {cfg.repeats} after 1 warm-up ...",
        flush=True,
    )
    results = run(cfg, progress=True)
    print(summary_table(results))
    return 0


def summary_table(results) -> str:
    """One row per layout: forward ms, forward+backward ms, speedup over contiguous, max error."""
    by = {(r.layout, r.pass_): r for r in results}
    layouts = list(dict.fromkeys(r.layout for r in results))
    base = by.get(("contiguous", "fwd+bwd"))
    rows = [("layout", "forward ms", "fwd+bwd ms", "speedup vs contiguous (fwd+bwd)", "max abs error")]
    for name in layouts:
        fwd, both = by.get((name, "fwd")), by.get((name, "fwd+bwd"))
        rows.append((
            name,
            f"{fwd.time_ms:.0f}" if fwd else "-",
            f"{both.time_ms:.0f}" if both else "-",
            f"{base.time_ms / both.time_ms:.2f}x" if base and both else "-",
            f"{both.max_error:.1e}" if both and both.max_error is not None else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)
