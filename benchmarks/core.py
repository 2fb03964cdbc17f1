"""The core benchmark: striped vs contiguous vs zigzag, and scaling efficiency against one rank.

2 local CPU ranks x 1 thread, causal attention, forward+backward (forward too), layouts and the
single-rank baseline interleaved in one run, warm-up, median of repeats:

    python benchmarks/core.py                     # 8,192 tokens, 8 heads, head_dim 64, fp32
    python benchmarks/core.py --seq-len 16384 --repeats 7

Scaling efficiency = T(one rank running torch's causal SDPA on the whole sequence) / (N x T(N ranks)).
Below the table, striped against zigzag paired within each repeat (each repeat runs one pass's variants back
to back, so the pair shares the machine's drift): the median and spread of those ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from striped_attention.bench import BASELINE, BenchConfig, paired_speedups, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="local ranks, one thread each")
    p.add_argument("--seq-len", type=int, default=8192, help="global sequence length (tokens)")
    p.add_argument("--heads", type=int, default=8, help="query heads (kv heads the same)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    args = p.parse_args(argv)
    cfg = BenchConfig(
        world_size=args.world_size, seq_len=args.seq_len, heads=args.heads, kv_heads=args.heads,
        head_dim=args.head_dim, dtype=args.dtype, repeats=args.repeats, warmup=1, baseline=True,
    )
    print(f"{cfg.world_size} ranks x 1 thread, {cfg.seq_len} tokens, {cfg.heads} heads, head_dim {cfg.head_dim}, "
          f"{cfg.dtype}, causal; median of {cfg.repeats} (1 warm-up), all variants interleaved", file=sys.stderr)
    results = run(cfg, progress=True)
    ms = {(r.layout, r.pass_): r.time_ms for r in results}
    print("| pass | layout | median ms | vs contiguous | vs zigzag | scaling efficiency |")
    print("|---|---|---:|---:|---:|---:|")
    for pass_ in cfg.passes:
        one = ms[(BASELINE, pass_)]
        print(f"| {pass_} | {BASELINE} | {one:.0f} | | | |")
        for name in cfg.layouts:
            t = ms[(name, pass_)]
            print(f"| {pass_} | {name} | {t:.0f} | {ms[('contiguous', pass_)] / t:.2f}x | "
                  f"{ms[('zigzag', pass_)] / t:.2f}x | {one / (cfg.world_size * t):.1%} |")
    paired = paired_speedups(results, "zigzag")
    for pass_ in cfg.passes:
        r = sorted(paired[("striped", pass_)])
        print(f"\nstriped vs zigzag, {pass_}, paired within each repeat: median {statistics.median(r):.3f}x, "
              f"quartiles {r[len(r) // 4]:.3f}x-{r[(3 * len(r)) // 4]:.3f}x, range {r[0]:.3f}x-{r[-1]:.3f}x "
              f"({len(r)} repeats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
