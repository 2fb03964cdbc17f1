"""`striped-attention bench`: ring attention on real ranks, layouts interleaved, median of repeats, per-step times.

``measure(config)`` runs on every rank of an initialised process group and returns the same report on each.
``run(config)`` starts the local ranks itself (or, under torchrun, uses the launched ones) and returns it.
Every timing is synchronized: all ranks start together and the slowest one ends it. Each rank also
records, for every ring step, the time it computed and the time it then waited for the next K/V block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from .cli import UsageError
from . import kernels
from .kernels import BACKENDS, CUDA_KERNELS
from .layouts import LAYOUTS, for_documents, get_layout, shard
from .ring import check_head_groups, record_steps, ring_attention

PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class BenchConfig:
    world_size: int = 2
    seq_len: int = 8192
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = True
    layouts: tuple[str, ...] = ("contiguous", "striped", "zigzag")
    passes: tuple[str, ...] = PASSES
    repeats: int = 5
    warmup: int = 1
    baseline: bool = False  # also time one rank running torch SDPA on the whole sequence
    check: bool = False  # compare every layout with single-process attention
    device: str = "cpu"
    seed: int = 0
    head_groups: int | None = None  # ring_attention's head_groups; None is its default
    threads: int = 1  # torch intra-op threads of each rank (on CPU, the cores it may use)
    backend: str = "auto"  # ring_attention's kernel backend
    documents: int = 1  # documents packed into the sequence, of random lengths (seeded); 1: one sequence
    window: int | None = None  # sliding-window attention (ring_attention's window); None: every earlier token

    def cu_seqlens(self) -> list[int] | None:
        return random_documents(self.seq_len, self.documents, self.seed)


def random_documents(seq_len: int, documents: int, seed: int) -> list[int] | None:
    """Offsets of ``documents`` packed documents (ring_attention's cu_seqlens): documents - 1 distinct cuts
    drawn uniformly with ``seed``, the same on every rank; None for one document."""
    if documents == 1:
        return None
    cuts = torch.randperm(seq_len - 1, generator=torch.Generator().manual_seed(seed))[: documents - 1] + 1
    return [0, *sorted(cuts.tolist()), seq_len]


@dataclass
class Result:
    layout: str  # a layout name, or "sdpa (1 rank)" for the baseline
    pass_: str
    times_ms: list[float]
    steps: list[list[dict]] = field(default_factory=list)  # per rank: per step median compute_ms / wait_ms
    max_error: float | None = None
    world_size: int = 1  # ranks that ran it (1 for the baseline)

    @property
    def time_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


BASELINE = "sdpa (1 rank)"


def random_inputs(cfg: BenchConfig, device):
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    shape = lambda h: (cfg.batch, h, cfg.seq_len, cfg.head_dim)  # noqa: E731
    q, k, v, dout = (torch.randn(shape(h), generator=g) for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, dout))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def timed_ms(fn, device) -> float:
    """Synchronized wall time of fn() in ms: every rank starts together; the slowest one ends it."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _sdpa(q, k, v, causal, cu_seqlens=None, window=None):
    """torch SDPA on the whole sequence; with documents, on each document in turn; with a window shorter than
    the sequence, on query chunks of a quarter window (at least 128), each against the keys its rows reach under
    that part of the window's mask: work and memory about seq x 1.25 window, never seq x seq."""
    if cu_seqlens is not None:
        pieces = [slice(a, b) for a, b in zip(cu_seqlens, cu_seqlens[1:]) if b > a]
        return torch.cat([_sdpa(q[:, :, s], k[:, :, s], v[:, :, s], causal, window=window) for s in pieces], dim=2)
    seq, gqa = q.shape[2], q.shape[1] != k.shape[1]
    if window is None or window >= seq:
        mask = None if window is None else kernels.visible(seq, seq, causal, window, q.device)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa
        )
    chunk, outs = max(window // 4, 128), []
    for start in range(0, seq, chunk):
        stop = min(start + chunk, seq)
        first, end = max(start - window + 1, 0), stop if causal else seq  # the keys rows [start, stop) reach
        mask = kernels.visible(stop - start, end - first, causal, window, q.device, offset=start - first)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, first:end], v[:, :, first:end], attn_mask=mask, enable_gqa=gqa
        ))
    return torch.cat(outs, dim=2)


def measure(cfg: BenchConfig, device: torch.device | None = None, progress=None) -> list[Result]:
    """Time every (layout, pass) on this process group; the same list of Results on every rank."""
    device = device or torch.device(cfg.device)
    rank, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    q, k, v, dout = random_inputs(cfg, device)
    cu_seqlens = cfg.cu_seqlens()
    layouts = {name: for_documents(name, cu_seqlens, n) for name in cfg.layouts}
    local = {name: [shard(t, layout=layout, dim=2) for t in (q, k, v, dout)] for name, layout in layouts.items()}
    options = dict(causal=cfg.causal, cu_seqlens=cu_seqlens, head_groups=cfg.head_groups, backend=cfg.backend,
                   window=cfg.window)

    def ring(name, backward):
        ql, kl, vl, dl = local[name]
        if backward:
            ql, kl, vl = (t.detach().requires_grad_() for t in (ql, kl, vl))
            ring_attention(ql, kl, vl, layout=layouts[name], **options).backward(dl)
            return ql.grad, kl.grad, vl.grad
        with torch.no_grad():
            return ring_attention(ql, kl, vl, layout=layouts[name], **options)

    def baseline(backward):
        if rank != 0:  # the others idle at the barrier: one rank's resources, as the definition asks
            return
        if backward:
            qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
            _sdpa(qf, kf, vf, cfg.causal, cu_seqlens, cfg.window).backward(dout)
        else:
            with torch.no_grad():
                _sdpa(q, k, v, cfg.causal, cu_seqlens, cfg.window)

    runs = {(name, p): (lambda name=name, p=p: ring(name, p == "fwd+bwd")) for name in cfg.layouts for p in cfg.passes}
    if cfg.baseline:
        runs.update({(BASELINE, p): (lambda p=p: baseline(p == "fwd+bwd")) for p in cfg.passes})
    times = {key: [] for key in runs}
    steps = {key: [] for key in runs}
    # one pass's variants next to each other, so each repeat times them back to back (paired_speedups)
    order = sorted(runs, key=lambda key: cfg.passes.index(key[1]))
    total = (cfg.warmup + cfg.repeats) * len(order)
    for rep in range(cfg.warmup + cfg.repeats):
        rotated = order[rep % len(order):] + order[: rep % len(order)]  # interleaved, no fixed position
        for i, key in enumerate(rotated):
            with record_steps() as recorded:
                ms = timed_ms(runs[key], device)
            if rep >= cfg.warmup:
                times[key].append(ms)
                steps[key].append(recorded)
            if progress is not None:
                progress(rep * len(order) + i + 1, total, key)

    results = []
    for key in runs:
        per_rank = _gather_objects(_median_steps(steps[key]), n)
        results.append(Result(key[0], key[1], times[key], per_rank, world_size=1 if key[0] == BASELINE else n))
    if cfg.check:
        _check(cfg, results, layouts, cu_seqlens, q, k, v, dout, ring, n)
    return results


def _median_steps(repeats: list[list]) -> list[dict]:
    """Per (pass, step): compute and wait ms summed over the head groups of a repeat, median over repeats."""
    by_key: dict[tuple, list] = {}
    for recorded in repeats:
        sums: dict[tuple, list] = {}
        for s in recorded:
            total = sums.setdefault((s.pass_, s.step, s.source), [0.0, 0.0])
            total[0] += s.compute_s
            total[1] += s.wait_s
        for key, total in sums.items():
            by_key.setdefault(key, []).append(total)
    return [
        {"pass": p, "step": st, "source": src,
         "compute_ms": statistics.median(x[0] for x in xs) * 1e3,
         "wait_ms": statistics.median(x[1] for x in xs) * 1e3}
        for (p, st, src), xs in sorted(by_key.items(), key=lambda kv: (kv[0][0] != "forward", kv[0][1]))
    ]


def _gather_objects(obj, n):
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj)
    return out


def _check(cfg, results, layouts, cu_seqlens, q, k, v, dout, ring, n):
    """Max abs error of each layout's output and gradients against single-process SDPA (the whole sequence)."""
    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
    want_out = _sdpa(qf, kf, vf, cfg.causal, cu_seqlens, cfg.window)
    want_out.backward(dout)
    want = [want_out.detach(), qf.grad, kf.grad, vf.grad]
    for name in cfg.layouts:
        got = [ring(name, False), *ring(name, True)]
        err = max((g.float() - shard(w, layout=layouts[name], dim=2).float()).abs().max().item()
                  for g, w in zip(got, want))
        worst = max(_gather_objects(err, n))
        for r in results:
            if r.layout == name:
                r.max_error = worst


class Progress:
    """Progress on stderr, ``label: done/total what``: on a terminal one line redrawn at most 10 times a
    second; into a file or pipe (a log) a line of its own at most every LOG_INTERVAL_S seconds, and the last."""

    LOG_INTERVAL_S = 10.0

    def __init__(self, label: str, stream=None):
        self.label, self.stream, self.last = label, stream or sys.stderr, -float("inf")
        self.redraw = getattr(self.stream, "isatty", lambda: False)()

    def __call__(self, done: int, total: int, what="") -> None:
        now = time.monotonic()
        if done < total and now - self.last < (0.1 if self.redraw else self.LOG_INTERVAL_S):
            return
        self.last = now
        what = " ".join(what) if isinstance(what, tuple) else str(what)
        line = f"{self.label}: {done}/{total} {what}"
        if self.redraw:
            self.stream.write(f"\r{line}".ljust(72) + ("\n" if done >= total else ""))
        else:
            self.stream.write(line.rstrip() + "\n")
        self.stream.flush()


def _rank_progress(show: bool):
    """A Progress for rank 0 only, or None."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Progress("bench") if show and rank == 0 else None


def _measure_on_rank(cfg: BenchConfig, progress: bool = False):
    return [asdict(r) for r in measure(cfg, progress=_rank_progress(progress))]


def run(cfg: BenchConfig, *, progress: bool = False) -> list[Result]:
    """Start ``cfg.world_size`` local ranks (or use torchrun's), measure, and return the Results.

    ``progress`` shows rank 0's progress on stderr. Under torchrun every rank returns the Results.
    """
    from .launch import init_distributed, launch, under_torchrun

    if under_torchrun():
        device = init_distributed(cfg.device, threads=cfg.threads if cfg.device == "cpu" else None)
        return measure(cfg, device, progress=_rank_progress(progress))
    per_rank = launch(_measure_on_rank, cfg.world_size, cfg, progress, device=cfg.device,
                      threads_per_rank=cfg.threads)
    return [Result(**r) for r in per_rank[0]]


def speedups(results: list[Result], reference: str = "contiguous") -> dict[tuple[str, str], float]:
    """(layout, pass) -> time of ``reference`` / time of the layout, for the passes ``reference`` ran."""
    base = {r.pass_: r.time_ms for r in results if r.layout == reference}
    return {(r.layout, r.pass_): base[r.pass_] / r.time_ms for r in results if r.pass_ in base and r.layout != BASELINE}


def paired_speedups(results: list[Result], reference: str = "zigzag") -> dict[tuple[str, str], list[float]]:
    """(layout, pass) -> per repeat, time of ``reference`` / time of the layout, both from the same repeat of
    the interleaved run: on a shared machine whose speed drifts, the pair shares the drift, which a ratio of
    medians does not cancel."""
    base = {r.pass_: r.times_ms for r in results if r.layout == reference}
    return {
        (r.layout, r.pass_): [b / t for b, t in zip(base[r.pass_], r.times_ms)]
        for r in results if r.pass_ in base and r.layout not in (BASELINE, reference)
    }


def efficiencies(results: list[Result]) -> dict[tuple[str, str], float]:
    """(layout, pass) -> scaling efficiency T(one rank, whole sequence, SDPA) / (N * T(N ranks)).

    Empty without the baseline."""
    one = {r.pass_: r.time_ms for r in results if r.layout == BASELINE}
    return {
        (r.layout, r.pass_): one[r.pass_] / (r.world_size * r.time_ms)
        for r in results if r.layout != BASELINE and r.pass_ in one
    }


def format_table(results: list[Result], reference: str = "contiguous") -> str:
    """layout, pass, median ms, min ms, speedup over ``reference``, scaling efficiency (with the baseline)
    and max error (where checked)."""
    fast, eff = speedups(results, reference), efficiencies(results)
    header = ["layout", "pass", "median ms", "min ms", f"vs {reference}"]
    header += ["scaling efficiency"] * bool(eff) + ["max error"] * any(r.max_error is not None for r in results)
    rows = [header]
    for r in results:
        key = (r.layout, r.pass_)
        row = [r.layout, r.pass_, f"{r.time_ms:.1f}", f"{r.min_ms:.1f}", f"{fast[key]:.2f}x" if key in fast else "-"]
        if eff:
            row.append(f"{eff[key]:.0%}" if key in eff else "-")
        if len(header) > len(row):
            row.append("-" if r.max_error is None else f"{r.max_error:.1e}")
        rows.append(row)
    return format_rows(rows)


def format_rows(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def format_steps(results: list[Result]) -> str:
    """Per layout and pass, one line per rank: each ring step's compute + wait in ms (median over repeats)."""
    lines = []
    for r in results:
        if not any(r.steps):
            continue
        lines.append(f"{r.layout} {r.pass_}: per ring step, compute + waiting for the next block (ms)")
        for rank, steps in enumerate(r.steps):
            cells = [f"{s['pass'][0]}{s['step']} {s['compute_ms']:.1f}+{s['wait_ms']:.1f}" for s in steps]
            lines.append(f"  rank {rank}: " + "  ".join(cells))
    return "\n".join(lines)


def results_json(results: list[Result], cfg: BenchConfig) -> dict:
    """``{"config": ..., "results": [{"layout", "world_size", "seq_len", "pass", "time_ms", ...}, ...]}``."""
    fast, eff = speedups(results), efficiencies(results)
    shape = {k: getattr(cfg, k) for k in ("batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "device")}
    rows = []
    for r in results:
        key = (r.layout, r.pass_)
        rows.append({
            "layout": r.layout, "world_size": r.world_size, "seq_len": cfg.seq_len, "pass": r.pass_,
            "time_ms": r.time_ms, "min_ms": r.min_ms, "times_ms": r.times_ms,
            "speedup_vs_contiguous": fast.get(key), "scaling_efficiency": eff.get(key), "max_error": r.max_error,
            **shape, "steps": r.steps,
        })
    return {"config": asdict(cfg), "results": rows}


# ----------------------------------------------------------------------------------------------------------
# Command line (the workload options are shared with `simulate`)
# ----------------------------------------------------------------------------------------------------------

CLI_DESCRIPTION = """\
Time causal ring attention on real ranks: every layout (and, with --baseline, one rank running torch SDPA on
the whole sequence), interleaved, after warm-up. Reports the median and minimum synchronized wall time (all
ranks start together, the slowest ends it), the speedup over contiguous, the scaling efficiency
T(1 rank) / (N x T(N ranks)), and for each rank and ring step the time it computed and the time it then
waited for the next K/V block.

Local ranks: gloo on CPU with one thread each (--threads), or NCCL with one GPU each (--device cuda). Under
torchrun it uses the launched ranks, across machines too, and ignores --world-size; only rank 0 prints and
writes files.
"""

PASS_CHOICES = {"fwd": ("fwd",), "fwd+bwd": ("fwd+bwd",), "both": PASSES}


def add_workload_arguments(p: argparse.ArgumentParser, defaults) -> None:
    """The attention shape, layouts, passes, timing, seed and outputs; defaults read from a config object."""
    from .plan import layout_list

    p.add_argument("--seq-len", metavar="TOKENS", type=int, default=defaults.seq_len,
                   help="global sequence length, tokens (default: %(default)s)")
    p.add_argument("--batch", metavar="N", type=int, default=defaults.batch, help="sequences (default: %(default)s)")
    p.add_argument("--heads", metavar="N", type=int, default=defaults.heads, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", metavar="N", type=int,
                   help="key/value heads, GQA when fewer than --heads (default: --heads)")
    p.add_argument("--head-dim", metavar="D", type=int, default=defaults.head_dim,
                   help="channels per head (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=defaults.dtype,
                   help="q/k/v dtype (default: %(default)s)")
    p.add_argument("--layouts", metavar="LIST", type=layout_list, default=tuple(LAYOUTS),
                   help="comma-separated layouts: contiguous, striped, zigzag, and balanced (contiguous shares of the "
                        "--documents reordered to balance the ranks: balance_documents) "
                        "(default: contiguous,striped,zigzag)")
    p.add_argument("--pass", dest="pass_", choices=list(PASS_CHOICES), default=_pass_name(defaults.passes),
                   help="forward only, forward+backward, or both, each timed separately (default: %(default)s)")
    p.add_argument("--repeats", metavar="N", type=int, default=defaults.repeats,
                   help="timed repeats; the median over them is reported (default: %(default)s)")
    p.add_argument("--warmup", metavar="N", type=int, default=defaults.warmup,
                   help="untimed repeats before timing (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device, help="device (default: %(default)s)")
    p.add_argument("--seed", metavar="N", type=int, default=defaults.seed,
                   help="seed of the random inputs and documents (default: %(default)s)")
    p.add_argument("--documents", metavar="N", type=int, default=defaults.documents,
                   help="pack N documents of random lengths (cut at random with --seed) into the sequence: each "
                        "token attends within its own document, as ring_attention's cu_seqlens (default: "
                        "%(default)s, one sequence)")
    p.add_argument("--window", metavar="TOKENS", type=int,
                   help="sliding-window attention: each token sees itself and the TOKENS - 1 before it (ring_attention's "
                        "window; Mistral's and Gemma's local layers) (default: every earlier token)")
    p.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                   help="block kernels: auto (the fastest that fits), torch (torch's only), reference (pure "
                        "PyTorch), or one of torch's CUDA kernels: flash, efficient, cudnn (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH.png", help="draw the per-rank timeline to PATH.png (needs matplotlib)")


def _pass_name(passes) -> str:
    return next(name for name, value in PASS_CHOICES.items() if value == tuple(passes))


def workload_fields(args) -> dict:
    """The config fields the shared options set, checked: BenchConfig/SimConfig keyword arguments."""
    for name in ("seq_len", "batch", "heads", "head_dim", "repeats", "documents"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.documents > args.seq_len and getattr(args, "tokens_per_rank", None) is None:  # else per swept length
        raise ValueError(f"--documents ({args.documents}) cannot exceed --seq-len ({args.seq_len})")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    if args.backend in CUDA_KERNELS and args.device != "cuda":
        raise ValueError(f"--backend {args.backend} is a CUDA kernel: add --device cuda")
    kv_heads = args.kv_heads or args.heads
    if kv_heads < 1 or args.heads % kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a positive multiple of --kv-heads ({kv_heads})")
    return dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, kv_heads=kv_heads,
                head_dim=args.head_dim, dtype=args.dtype, layouts=args.layouts, passes=PASS_CHOICES[args.pass_],
                repeats=args.repeats, warmup=args.warmup, device=args.device, seed=args.seed, backend=args.backend,
                documents=args.documents, window=args.window)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time every layout on real ranks: wall time, per-step compute and waiting, speedup, efficiency",
        description=CLI_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = BenchConfig()
    p.add_argument("--world-size", metavar="N", type=int, default=defaults.world_size,
                   help="local ranks (processes): gloo on CPU with --threads threads each, or NCCL with one GPU "
                        "each for --device cuda (default: %(default)s)")
    p.add_argument("--threads", metavar="N", type=int, default=defaults.threads,
                   help="torch intra-op threads of each rank: on CPU the cores each rank computes on (default: "
                        "%(default)s, the README's figures; the ranks of one machine should not share cores)")
    add_workload_arguments(p, defaults)
    p.add_argument("--head-groups", metavar="N", type=int,
                   help="split the kv heads into N groups and run the ring once per group, one after the other: "
                        "1/N of the K/V in flight, and each group's dK/dV travel home while the next computes "
                        "(default: ring_attention's: enough groups for K/V blocks of at most 16 MiB)")
    p.add_argument("--baseline", action="store_true",
                   help="also time one rank running torch SDPA on the whole sequence, and report scaling "
                        "efficiency = T(1 rank) / (N x T(N ranks))")
    p.add_argument("--check", action="store_true",
                   help="also compare every layout's output and gradients with single-process attention "
                        "(max abs error column)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .launch import under_torchrun

    try:
        for flag, value in (("--world-size", args.world_size), ("--threads", args.threads)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        cfg = BenchConfig(world_size=args.world_size, baseline=args.baseline, check=args.check,
                          head_groups=args.head_groups, threads=args.threads, **workload_fields(args))
        if cfg.head_groups is not None:
            check_head_groups(cfg.head_groups, cfg.kv_heads)
        for name in cfg.layouts * (not under_torchrun()):  # under torchrun the ranks check their own world
            get_layout(for_documents(name, None, cfg.world_size)).check(cfg.seq_len, cfg.world_size)
    except ValueError as e:
        raise UsageError("bench", e) from None
    lead = not under_torchrun() or int(os.environ["RANK"]) == 0
    if lead:
        ranks = "torchrun's ranks" if under_torchrun() else f"{cfg.world_size} local {cfg.device} rank(s)"
        ranks += f" x {cfg.threads} thread(s)" if cfg.device == "cpu" else ""
        packed = f" in {cfg.documents} documents" if cfg.documents > 1 else ""
        packed += f", window {cfg.window}" if cfg.window else ""
        print(f"{'causal ' if cfg.causal else ''}attention, {cfg.seq_len} tokens{packed} x {cfg.batch} over {ranks}, "
              f"{cfg.heads} heads / {cfg.kv_heads} kv heads, head_dim {cfg.head_dim}, {cfg.dtype}; "
              f"median of {cfg.repeats} after {cfg.warmup} warm-up, variants interleaved", flush=True)
    results = run(cfg, progress=True)
    try:
        if lead:
            _report(args, cfg, results)
    finally:
        if under_torchrun():  # leave together: a rank that exits early breaks its peers' connections
            dist.barrier()
            dist.destroy_process_group()
    return 0


def _report(args, cfg: BenchConfig, results: list[Result]) -> None:
    """Print the tables; write the JSON and the timeline pictures that were asked for."""
    print(format_table(results))
    print()
    print(format_steps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_json(results, cfg), f, indent=2)
    if args.plot:
        from .plot import timeline

        for pass_ in cfg.passes:
            panels = {r.layout: r.steps for r in results if r.pass_ == pass_ and r.layout != BASELINE}
            path = plot_path(args.plot, pass_, len(cfg.passes))
            timeline(panels, path, title=f"{results[0].world_size} ranks, {cfg.seq_len} tokens, {pass_} "
                                         f"(median per step over {cfg.repeats} repeats)")
            print(f"timeline: {path}")


def plot_path(path: str, pass_: str, passes: int) -> str:
    """PATH.png, or PATH-fwd.png / PATH-fwd+bwd.png when both passes were timed."""
    if passes == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{pass_.replace('+', '')}{ext or '.png'}"
