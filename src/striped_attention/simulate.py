"""`striped-attention simulate`: one process plays N virtual ranks of the ring, to study 8 to 64 ranks on one machine.

Every virtual rank runs the ring engine's own forward (and backward) loop, with the ring's layouts, kernels,
merge and schedule; only the neighbour is virtual: at step i rank r is handed the K/V block of
``ring.source_rank(r, i, N)``, as the real ring would deliver it. Each (rank, step) compute is timed by the
engine's own step clock. The backward pass uses the final output and log-sum-exp of the simulated forward,
exactly what the ring saves: its dQ is exact, while the dK/dV that would arrive from the previous rank are
zeros (their values do not change the work).

The critical path of a pass is the sum over steps of the slowest rank's compute. With a communication model
(``--bandwidth`` GB/s, ``--latency`` us), each step costs max(slowest compute, the transfer it overlaps), with
the bytes the engine sends: the next K/V block (kv_heads only), and in backward the float32 dK/dV too
(see :func:`striped_attention.plan.ring_transfers`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass

import torch

from . import ring as ring_engine
from .bench import (
    PASSES, Progress, add_workload_arguments, format_rows, plot_path, random_documents, random_inputs, workload_fields,
)
from .cli import UsageError, describe
from .kernels import default_scale
from .launch import torch_threads
from .layouts import LAYOUTS, cut_at_documents, for_documents, get_layout, with_window
from .plan import critical_path_s, ring_transfers, transfer_s

__all__ = ["SimConfig", "SimResult", "simulate", "sweep"]


@dataclass(frozen=True)
class SimConfig:
    world_size: int = 4
    seq_len: int = 4096
    batch: int = 1
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = True
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    passes: tuple[str, ...] = ("fwd",)
    repeats: int = 3
    warmup: int = 1
    bandwidth_gbs: float | None = None  # GB/s of the link to the next rank; None: no communication model
    latency_us: float = 0.0  # microseconds per transfer
    device: str = "cpu"
    threads: int = 1  # torch threads: 1 plays ranks that have one core each, like `bench` on CPU
    seed: int = 0
    backend: str = "auto"
    documents: int = 1  # documents packed into the sequence, of random lengths (seeded); 1: one sequence
    window: int | None = None  # sliding-window attention (ring_attention's window); None: every earlier token


@dataclass
class SimResult:
    """One layout and pass over ``world_size`` virtual ranks. Times in ms."""

    layout: str
    pass_: str  # "fwd" or "fwd+bwd"
    world_size: int
    seq_len: int
    compute_ms: dict[str, list[list[float]]]  # "forward"/"backward" -> [rank][step], median over repeats
    transfer_bytes: dict[str, list[float]]  # "forward"/"backward" -> plan.ring_transfers(): N steps + the tail
    bandwidth_gbs: float | None = None
    latency_us: float = 0.0

    def _slowest_s(self, pass_: str) -> list[float]:
        """Per step, the slowest rank's compute in seconds."""
        return [max(rank[i] for rank in self.compute_ms[pass_]) / 1e3 for i in range(self.world_size)]

    def _link(self) -> tuple[float, float]:
        """(bytes/s, seconds of latency) of the model; an infinitely fast link without one."""
        if self.bandwidth_gbs is None:
            return float("inf"), 0.0
        return self.bandwidth_gbs * 1e9, self.latency_us * 1e-6

    def _critical(self, bandwidth: float, latency: float) -> float:
        return 1e3 * sum(critical_path_s(self._slowest_s(p), self.transfer_bytes[p], bandwidth, latency)
                         for p in self.compute_ms)

    @property
    def critical_path_ms(self) -> float:
        """Sum over steps of the slowest rank's compute (both passes for fwd+bwd): no communication."""
        return self._critical(float("inf"), 0.0)

    @property
    def critical_path_comm_ms(self) -> float | None:
        """The critical path with the communication model; None without one."""
        if self.bandwidth_gbs is None:
            return None
        return self._critical(*self._link())

    @property
    def time_ms(self) -> float:
        """The critical path, with the communication model when there is one."""
        comm = self.critical_path_comm_ms
        return self.critical_path_ms if comm is None else comm

    @property
    def total_compute_ms(self) -> float:
        """All ranks' compute summed: the work, independent of balance."""
        return sum(sum(map(sum, per_rank)) for per_rank in self.compute_ms.values())

    @property
    def balance(self) -> float:
        """total compute / (N * critical path): 1.0 when no rank ever waits for another."""
        return self.total_compute_ms / (self.world_size * self.critical_path_ms)

    def steps(self) -> list[list[dict]]:
        """Per rank, step records for :func:`striped_attention.plot.timeline`: compute, then waiting until
        the slowest rank (or the transfer) ends the step."""
        n, link = self.world_size, self._link()
        per_rank = [[] for _ in range(n)]
        for pass_, times in self.compute_ms.items():
            sent = self.transfer_bytes[pass_]
            for i, slowest in enumerate(self._slowest_s(pass_)):
                step_s = max(slowest, transfer_s(sent[i], *link))
                if i == n - 1:  # what is sent after the last step (backward: dK/dV going home)
                    step_s += transfer_s(sent[n], *link)
                for r, rank in enumerate(times):
                    per_rank[r].append({"pass": pass_, "step": i, "source": ring_engine.source_rank(r, i, n),
                                        "compute_ms": rank[i], "wait_ms": max(0.0, step_s * 1e3 - rank[i])})
        return per_rank


class _VirtualRing:
    """Stands in for the ring engine's process-group ring: virtual rank ``rank`` of ``size``.

    ``shift`` of K/V hands over the block the real ring would deliver next: that of
    ``source_rank(rank, step + 1, size)``. Gradients from the previous rank arrive as zeros.
    """

    def __init__(self, rank: int, size: int, kv_by_rank: list[tuple[torch.Tensor, torch.Tensor]]):
        self.rank, self.size, self.kv_by_rank, self.step = rank, size, kv_by_rank, 0

    def shift(self, tensors, tag, by=1):
        if tag == ring_engine.KV_TAG:
            self.step += 1
            received = self.kv_by_rank[ring_engine.source_rank(self.rank, self.step, self.size)]
        else:
            received = tuple(torch.zeros_like(t) for t in tensors)
        return ring_engine.Transfer([], received)


def _play(cfg: SimConfig, layout, shards, scale, backward: bool):
    """Run every virtual rank once through the engine's loop: per rank, its recorded StepTimes, its output
    (batch, heads, c, head_dim) and its dQ (same shape; None without ``backward``)."""
    n = cfg.world_size
    kv_by_rank = [(k, v) for _, k, v, _ in shards]
    seconds, outs, dqs = [], [], []
    for rank, (q, k, v, dout) in enumerate(shards):
        with ring_engine.record_steps() as recorded:
            out, lse = ring_engine.ring_forward(q, k, v, layout, _VirtualRing(rank, n, kv_by_rank), cfg.causal,
                                                 scale, cfg.backend)
            dq = None
            if backward:
                dq, _, _ = ring_engine.ring_backward(dout, q, k, v, out, lse, layout,
                                                      _VirtualRing(rank, n, kv_by_rank), cfg.causal, scale, cfg.backend)
        seconds.append(recorded)
        outs.append(out)
        dqs.append(dq)
    return seconds, outs, dqs


def simulate(cfg: SimConfig, progress=None, *, keep_outputs: bool = False):
    """Replay every layout and pass of ``cfg`` on ``cfg.world_size`` virtual ranks; a list of :class:`SimResult`.

    ``progress(done, total, what)`` is called after each replay. With ``keep_outputs`` also returns a dict
    (layout, pass) -> (per-rank outputs (batch, heads, seq_len / N, head_dim), per-rank dQ of the same shape
    or None for "fwd") of the last replay, for checking. Runs with ``cfg.threads`` torch threads.
    """
    _check(cfg)
    with torch_threads(cfg.threads):
        return _simulate(cfg, progress, keep_outputs)


def _simulate(cfg: SimConfig, progress, keep_outputs: bool):
    device = torch.device(cfg.device)
    q, k, v, dout = random_inputs(cfg, device)
    scale = default_scale(cfg.head_dim)
    cu_seqlens = random_documents(cfg.seq_len, cfg.documents, cfg.seed)
    layouts = {name: with_window(cut_at_documents(name, cu_seqlens, cfg.world_size), cfg.window, cfg.seq_len)
               for name in cfg.layouts}
    shards = {
        name: [
            tuple(t.index_select(2, layout.positions(cfg.seq_len, r, cfg.world_size).to(device)).contiguous()
                  for t in (q, k, v, dout))
            for r in range(cfg.world_size)
        ]
        for name, layout in layouts.items()
    }
    itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    c = cfg.seq_len // cfg.world_size
    kv_bytes = 2 * cfg.batch * cfg.kv_heads * c * cfg.head_dim * itemsize
    grad_bytes = 2 * cfg.batch * cfg.kv_heads * c * cfg.head_dim * 4  # dK/dV travel in float32

    runs = [(name, p) for name in cfg.layouts for p in cfg.passes]
    samples = {key: [] for key in runs}
    outputs = {}
    total = (cfg.warmup + cfg.repeats) * len(runs)
    for rep in range(cfg.warmup + cfg.repeats):
        rotated = runs[rep % len(runs):] + runs[: rep % len(runs)]  # interleaved, no fixed position
        for i, (name, p) in enumerate(rotated):
            recorded, outs, dqs = _play(cfg, layouts[name], shards[name], scale, backward=p == "fwd+bwd")
            if rep >= cfg.warmup:
                samples[(name, p)].append(recorded)
            if keep_outputs:
                outputs[(name, p)] = (outs, dqs)
            if progress is not None:
                progress(rep * len(runs) + i + 1, total, f"N={cfg.world_size} {name} {p}")

    results, n = [], cfg.world_size
    for (name, p), reps in samples.items():
        compute = {}
        for pass_ in ("forward", "backward")[: 1 + (p == "fwd+bwd")]:
            compute[pass_] = [
                [statistics.median(_step_seconds(rec[r], pass_, n)[i] for rec in reps) * 1e3 for i in range(n)]
                for r in range(n)
            ]
        last = ring_engine.last_step(layouts[name], n, cfg.causal, cfg.seq_len // n)
        sent = {pass_: ring_transfers("bwd" if pass_ == "backward" else "fwd", n, kv_bytes, grad_bytes, last)
                for pass_ in compute}
        results.append(SimResult(name, p, cfg.world_size, cfg.seq_len, compute, bandwidth_gbs=cfg.bandwidth_gbs,
                                 latency_us=cfg.latency_us, transfer_bytes=sent))
    return (results, outputs) if keep_outputs else results


def _step_seconds(recorded, pass_: str, world_size: int) -> list[float]:
    """Compute seconds of each of the N steps; none after the ring's last."""
    times = [s.compute_s for s in recorded if s.pass_ == pass_]
    return times + [0.0] * (world_size - len(times))


def _check(cfg: SimConfig) -> None:
    for name in ("world_size", "seq_len", "batch", "heads", "kv_heads", "head_dim", "repeats"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.heads % cfg.kv_heads:
        raise ValueError(f"heads ({cfg.heads}) must be a multiple of kv_heads ({cfg.kv_heads})")
    if cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")
    if cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.bandwidth_gbs is not None and cfg.bandwidth_gbs <= 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {cfg.bandwidth_gbs}")
    if cfg.latency_us < 0:
        raise ValueError(f"latency must be >= 0 us, got {cfg.latency_us}")
    if not 1 <= cfg.documents <= cfg.seq_len:
        raise ValueError(f"documents must be from 1 to seq_len ({cfg.seq_len}), got {cfg.documents}")
    bad = [p for p in cfg.passes if p not in PASSES]
    if bad:
        raise ValueError(f"unknown pass(es) {bad}; choose from {PASSES}")
    for name in cfg.layouts:
        get_layout(for_documents(name, None, cfg.world_size)).check(cfg.seq_len, cfg.world_size)


def sweep(cfg: SimConfig, world_sizes: list[int], progress=None, *, tokens_per_rank: int | None = None
          ) -> list[SimResult]:
    """:func:`simulate` at each world size. The sequence stays ``cfg.seq_len`` (the blocks shrink as N grows),
    or with ``tokens_per_rank`` it grows as N * tokens_per_rank (the blocks stay the same)."""
    return [r for c in sweep_configs(cfg, world_sizes, tokens_per_rank) for r in simulate(c, progress)]


def sweep_configs(cfg: SimConfig, world_sizes: list[int], tokens_per_rank: int | None = None) -> list[SimConfig]:
    """One checked SimConfig per world size (see :func:`sweep`); raises ValueError before anything runs."""
    if tokens_per_rank is not None and tokens_per_rank < 1:
        raise ValueError(f"tokens per rank must be >= 1, got {tokens_per_rank}")
    configs = []
    for n in world_sizes:
        seq_len = cfg.seq_len if tokens_per_rank is None else n * tokens_per_rank
        configs.append(SimConfig(**{**asdict(cfg), "world_size": n, "seq_len": seq_len}))
        _check(configs[-1])
    return configs


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def _speedups(results: list[SimResult], attr: str) -> dict[tuple, float]:
    """(layout, pass, N) -> contiguous / layout, for the critical path named by ``attr``."""
    base = {(r.pass_, r.world_size): getattr(r, attr) for r in results if r.layout == "contiguous"}
    return {
        (r.layout, r.pass_, r.world_size): base[(r.pass_, r.world_size)] / getattr(r, attr)
        for r in results if (r.pass_, r.world_size) in base and getattr(r, attr)
    }


def format_table(results: list[SimResult], *, ideal: bool = True) -> str:
    """N, layout, pass, critical path (and with communication), speedups, balance, and with ``ideal`` the
    speedup of perfect balance on one causal sequence (not the bound for packed documents)."""
    comm = any(r.bandwidth_gbs is not None for r in results)
    fast = _speedups(results, "critical_path_ms")
    fast_comm = _speedups(results, "critical_path_comm_ms") if comm else {}
    header = ["N", "tokens", "layout", "pass", "critical path ms", "vs contiguous"]
    header += ["with comm ms", "vs contiguous (comm)"] * comm + ["ideal"] * ideal + ["balance"]
    rows = [header]
    for r in results:
        key = (r.layout, r.pass_, r.world_size)
        row = [str(r.world_size), str(r.seq_len), r.layout, r.pass_, f"{r.critical_path_ms:.1f}", _x(fast.get(key))]
        if comm:
            row += [f"{r.critical_path_comm_ms:.1f}", _x(fast_comm.get(key))]
        if ideal:
            row.append(f"{1.0 if r.layout == 'contiguous' else (2 * r.world_size - 1) / r.world_size:.3f}x")
        rows.append(row + [f"{r.balance:.0%}"])
    return format_rows(rows)


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def results_json(results: list[SimResult], cfg: SimConfig) -> dict:
    """``{"config": ..., "results": [{"layout", "world_size", "seq_len", "pass", "time_ms", ...}]}``;
    time_ms is the critical path (with the communication model when given)."""
    fast = _speedups(results, "time_ms")
    rows = [
        {"layout": r.layout, "world_size": r.world_size, "seq_len": r.seq_len, "pass": r.pass_, "time_ms": r.time_ms,
         "critical_path_ms": r.critical_path_ms, "critical_path_comm_ms": r.critical_path_comm_ms,
         "speedup_vs_contiguous": fast.get((r.layout, r.pass_, r.world_size)), "total_compute_ms": r.total_compute_ms,
         "balance": r.balance, "compute_ms": r.compute_ms, "transfer_bytes": r.transfer_bytes}
        for r in results
    ]
    config = {k: v for k, v in asdict(cfg).items() if k not in ("world_size", "seq_len")}  # per result
    return {"config": config, "results": rows}


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="play N virtual ranks in one process: per-step times, critical path, speedup, for 8 to 64 ranks",
        description=describe(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = SimConfig()
    p.add_argument("--world-size", metavar="N", type=int, default=defaults.world_size,
                   help="virtual ranks (default: %(default)s)")
    p.add_argument("--world-sizes", type=_int_list, metavar="N,N,...",
                   help="sweep: simulate each of these ranks counts (e.g. 2,4,8,16,32) and report the speedup per N; "
                        "overrides --world-size; --plot then draws speedup against N")
    add_workload_arguments(p, defaults)
    p.add_argument("--tokens-per-rank", metavar="TOKENS", type=int,
                   help="instead of --seq-len: each rank holds this many tokens, so the sequence grows with N "
                        "(weak scaling: the same block size at every N)")
    p.add_argument("--bandwidth", metavar="GBPS", type=float,
                   help="communication model: link bandwidth to the next rank, GB/s "
                                                   "(default: no model, compute only)")
    p.add_argument("--latency", metavar="US", type=float, default=0.0,
                   help="communication model: latency per transfer, "
                                                              "microseconds (default: %(default)s)")
    p.add_argument("--threads", metavar="N", type=int, default=defaults.threads,
                   help="torch threads of the one process, i.e. of each virtual rank (default: %(default)s)")
    p.set_defaults(func=main)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected ranks counts >= 1, got {text!r}")
    return values


def main(args) -> int:
    try:
        cfg = SimConfig(world_size=args.world_size, bandwidth_gbs=args.bandwidth, latency_us=args.latency,
                        threads=args.threads, **workload_fields(args))
        sizes = args.world_sizes or [cfg.world_size]
        configs = sweep_configs(cfg, sizes, args.tokens_per_rank)
    except ValueError as e:
        raise UsageError("simulate", e) from None
    comm = "no communication model" if cfg.bandwidth_gbs is None else \
        f"links of {cfg.bandwidth_gbs:g} GB/s + {cfg.latency_us:g} us"
    tokens = f"{args.tokens_per_rank} tokens per rank" if args.tokens_per_rank else f"{cfg.seq_len} tokens"
    tokens += f" in {cfg.documents} documents" if cfg.documents > 1 else ""
    tokens += f", window {cfg.window}" if cfg.window else ""
    print(f"{'causal ' if cfg.causal else ''}attention, {tokens} x {cfg.batch}, {cfg.heads} heads / "
          f"{cfg.kv_heads} kv heads, head_dim {cfg.head_dim}, {cfg.dtype}, on {', '.join(map(str, sizes))} virtual "
          f"ranks ({cfg.device}, {cfg.threads} thread(s)); {comm}; median of {cfg.repeats} after {cfg.warmup} "
          f"warm-up", flush=True)
    progress = Progress("simulate")
    results = [r for c in configs for r in simulate(c, progress)]
    print(format_table(results, ideal=cfg.documents == 1 and cfg.window is None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_json(results, cfg), f, indent=2)
    if args.plot:
        from . import plot

        if len(sizes) > 1:
            series = {}
            for (name, p, n), x in _speedups(results, "time_ms").items():
                if name != "contiguous":
                    series.setdefault(f"{name} ({p})", {})[n] = x
            plot.speedup(series, args.plot, title=f"simulated, {tokens}, {cfg.heads} head(s) of "
                                                  f"{cfg.head_dim}, {cfg.device}")
            print(f"speedup against N: {args.plot}")
        else:
            for pass_ in cfg.passes:
                panels = {r.layout: r.steps() for r in results if r.pass_ == pass_}
                path = plot_path(args.plot, pass_, len(cfg.passes))
                plot.timeline(panels, path, title=f"simulated: {sizes[0]} virtual ranks, {configs[0].seq_len} tokens, "
                                                  f"{pass_}, {comm}")
                print(f"timeline: {path}")
    return 0
