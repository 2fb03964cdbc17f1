"""Peak memory per rank of causal attention, forward + backward: ring attention on N ranks against torch's
SDPA (flash attention for CPU) on the whole sequence in one process.

    python benchmarks/memory.py                                            # 32,768 tokens: 1 process, 2 ranks
    python benchmarks/memory.py --seq-lens 8192 16384 32768 --world-sizes 1 2 4   # how it grows with S and N

Method (CPU). Every measurement runs in fresh processes started by the launcher, one thread each, and glibc
serves every allocation of 64 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_), so a freed tensor
leaves the resident set at once and the resident set follows the live tensors. Each process
  1. warms up with a forward + backward of 512 tokens per rank (the CPU kernel's full tile), so one-time
     allocations (kernels, connections, BLAS's buffers) are not counted;
  2. reads its resident set size (VmRSS in /proc/self/status) and resets the kernel's high-water mark of it
     (writes 5 to /proc/self/clear_refs);
  3. creates its inputs (the whole sequence for the single process, its S/N tokens for a rank), runs forward
     and backward, and reads the high-water mark (VmHWM).
Peak = VmHWM - VmRSS before the inputs: inputs, output, gradients and every temporary, including the blocks
in flight around the ring, at page granularity. The table reports the largest peak over the ranks.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass

import torch

from striped_attention import LAYOUTS, ring_attention
from striped_attention.bench import Progress, format_rows
from striped_attention.launch import launch
from striped_attention.ring import check_head_groups

MIB = 2**20
TARGET = 0.6  # the per-rank peak on 2 ranks should be at most this fraction of the single process's
SINGLE = "sdpa, 1 process"


@dataclass(frozen=True)
class MemoryConfig:
    method: str  # "sdpa" (one process, whole sequence) or "ring"
    world_size: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    layout: str
    head_groups: int | None = None  # ring_attention's; None is its default


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _forward_backward(cfg: MemoryConfig, local_len: int) -> None:
    """Causal attention on fresh random inputs of ``local_len`` tokens: forward, then backward."""
    dtype = getattr(torch, cfg.dtype)
    q = torch.randn(1, cfg.heads, local_len, cfg.head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, cfg.kv_heads, local_len, cfg.head_dim, dtype=dtype, requires_grad=True) for _ in "kv")
    dout = torch.randn(1, cfg.heads, local_len, cfg.head_dim, dtype=dtype)
    if cfg.method == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=cfg.heads != cfg.kv_heads
        )
    else:
        out = ring_attention(q, k, v, layout=cfg.layout, head_groups=cfg.head_groups)
    out.backward(dout)


def peak_bytes(cfg: MemoryConfig) -> int:
    """On each rank: the peak resident memory of one forward + backward, in bytes (see the module docstring)."""
    # warm-up at the CPU kernel's full tile size (512 keys), so that BLAS's one-time buffers for it are not
    # counted either; a multiple of every layout's divisor per rank
    _forward_backward(cfg, 512 * cfg.world_size)
    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    _forward_backward(cfg, cfg.seq_len // cfg.world_size)
    return (_status_kib("VmHWM") - before) * 1024


def measure(cfg: MemoryConfig) -> int:
    """The largest per-rank peak in bytes, measured in fresh processes."""
    return max(launch(peak_bytes, cfg.world_size, cfg, timeout_s=3600))


def _check_args(p: argparse.ArgumentParser, args) -> None:
    for flag in ("seq_lens", "world_sizes", "heads", "kv_heads", "head_dim"):
        values = getattr(args, flag)
        if min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {values}")
    for s in args.seq_lens:
        for n in args.world_sizes:
            divisor = LAYOUTS[args.layout].divisor(n)
            if s % divisor:
                p.error(f"--seq-lens {s} is not a multiple of {divisor} ({args.layout} on {n} ranks)")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.head_groups is not None:
        try:
            check_head_groups(args.head_groups, args.kv_heads)
        except ValueError as e:
            p.error(f"--head-groups: {e}")
    if not sys.platform.startswith("linux"):
        p.error("the CPU method reads /proc/self/status and /proc/self/clear_refs: Linux only")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768], help="global sequence lengths (tokens)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2], help="ring sizes (ranks, 1 thread each)")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    p.add_argument("--layout", default="striped", choices=sorted(LAYOUTS), help="ring layout of the tokens")
    p.add_argument("--head-groups", type=int, default=None,
                   help="ring_attention's head_groups: groups of kv heads run one after the other (default: its own)")
    args = p.parse_args(argv)
    _check_args(p, args)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by glibc in each fresh process

    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, layout=args.layout)
    runs = [MemoryConfig("sdpa", 1, s, **shape) for s in args.seq_lens]
    runs += [MemoryConfig("ring", n, s, **shape, head_groups=args.head_groups)
             for s in args.seq_lens for n in args.world_sizes]
    print(f"causal attention forward+backward, batch 1, {args.heads} heads / {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, {args.dtype}, 1 thread per process", file=sys.stderr)
    progress, start, peaks = Progress("memory"), time.monotonic(), {}
    for i, cfg in enumerate(runs):
        elapsed = time.monotonic() - start
        progress(i, len(runs), f"{cfg.method}, {cfg.seq_len} tokens on {cfg.world_size} ({elapsed:.0f} s so far)")
        peaks[cfg] = measure(cfg)
    progress(len(runs), len(runs), f"done in {time.monotonic() - start:.0f} s")

    rows = [["tokens", "attention", "processes", "tokens per process", "peak MiB per process", "vs 1 process",
             "KiB per local token"]]
    for cfg in runs:
        single = peaks[MemoryConfig("sdpa", 1, cfg.seq_len, **shape)]
        local = cfg.seq_len // cfg.world_size
        name = SINGLE if cfg.method == "sdpa" else f"ring ({cfg.layout})"
        rows.append([str(cfg.seq_len), name, str(cfg.world_size), str(local), f"{peaks[cfg] / MIB:.0f}",
                     f"{peaks[cfg] / single:.2f}x", f"{peaks[cfg] / 1024 / local:.1f}"])
    print(format_rows(rows))
    if 32768 in args.seq_lens and 2 in args.world_sizes:
        cfg = MemoryConfig("ring", 2, 32768, **shape, head_groups=args.head_groups)
        ratio = peaks[cfg] / peaks[MemoryConfig("sdpa", 1, 32768, **shape)]
        verdict = "meets" if ratio <= TARGET else "misses"
        print(f"32,768 tokens on 2 ranks: peak per rank = {ratio:.2f}x one process ({verdict} the target <= {TARGET}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
