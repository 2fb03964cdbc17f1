"""Measure ring attention on real ranks: layouts interleaved, warm-up, median of repeats, per-step times.

``measure(config)`` runs on every rank of an initialised process group and returns the same report on each.
``run(config)`` starts the local ranks itself (or, under torchrun, uses the launched ones) and returns it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from .layouts import LAYOUTS, shard
from .ring import record_steps, ring_attention

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


@dataclass
class Result:
    layout: str  # a layout name, or "sdpa (1 rank)" for the baseline
    pass_: str
    times_ms: list[float]
    steps: list[list[dict]] = field(default_factory=list)  # per rank: per step median compute_ms / wait_ms
    max_error: float | None = None

    @property
    def time_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


BASELINE = "sdpa (1 rank)"


def _inputs(cfg: BenchConfig, device):
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


def _step_once(fn, device) -> float:
    """Synchronized wall time of fn() in ms: every rank starts together; the slowest one ends it."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def measure(cfg: BenchConfig, device: torch.device | None = None, progress=None) -> list[Result]:
    """Time every (layout, pass) on this process group; the same list of Results on every rank."""
    device = device or torch.device(cfg.device)
    rank, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    q, k, v, dout = _inputs(cfg, device)
    local = {name: [shard(t, layout=name, dim=2) for t in (q, k, v, dout)] for name in cfg.layouts}

    def ring(name, backward):
        ql, kl, vl, dl = local[name]
        if backward:
            ql, kl, vl = (t.detach().requires_grad_() for t in (ql, kl, vl))
            ring_attention(ql, kl, vl, layout=name, causal=cfg.causal).backward(dl)
            return ql.grad, kl.grad, vl.grad
        with torch.no_grad():
            return ring_attention(ql, kl, vl, layout=name, causal=cfg.causal)

    def baseline(backward):
        if rank != 0:  # the others idle at the barrier: one rank's resources, as the definition asks
            return
        if backward:
            qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
            _sdpa(qf, kf, vf, cfg.causal).backward(dout)
        else:
            with torch.no_grad():
                _sdpa(q, k, v, cfg.causal)

    runs = {(name, p): (lambda name=name, p=p: ring(name, p == "fwd+bwd")) for name in cfg.layouts for p in cfg.passes}
    if cfg.baseline:
        runs.update({(BASELINE, p): (lambda p=p: baseline(p == "fwd+bwd")) for p in cfg.passes})
    times = {key: [] for key in runs}
    steps = {key: [] for key in runs}
    order = list(runs)
    total = (cfg.warmup + cfg.repeats) * len(order)
    for rep in range(cfg.warmup + cfg.repeats):
        rotated = order[rep % len(order):] + order[: rep % len(order)]  # interleaved, no fixed position
        for i, key in enumerate(rotated):
            with record_steps() as recorded:
                ms = _step_once(runs[key], device)
            if rep >= cfg.warmup:
                times[key].append(ms)
                steps[key].append(recorded)
            if progress is not None:
                progress(rep * len(order) + i + 1, total, key)

    results = []
    for key in order:
        per_rank = _gather_objects(_median_steps(steps[key]), n)
        results.append(Result(key[0], key[1], times[key], per_rank))
    if cfg.check:
        _check(cfg, results, local, q, k, v, dout, ring, rank, n)
    return results


def _median_steps(repeats: list[list]) -> list[dict]:
    """Per (pass, step): median compute and wait ms over the repeats."""
    by_key: dict[tuple, list] = {}
    for recorded in repeats:
        for s in recorded:
            by_key.setdefault((s.pass_, s.step, s.source), []).append(s)
    return [
        {"pass": p, "step": st, "source": src,
         "compute_ms": statistics.median(x.compute_s for x in xs) * 1e3,
         "wait_ms": statistics.median(x.wait_s for x in xs) * 1e3}
        for (p, st, src), xs in sorted(by_key.items(), key=lambda kv: (kv[0][0] != "forward", kv[0][1]))
    ]


def _gather_objects(obj, n):
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj)
    return out


def _check(cfg, results, local, q, k, v, dout, ring, rank, n):
    """Max abs error of each layout's output and gradients against single-process SDPA (the whole sequence)."""
    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
    want_out = _sdpa(qf, kf, vf, cfg.causal)
    want_out.backward(dout)
    want = [want_out.detach(), qf.grad, kf.grad, vf.grad]
    for name in cfg.layouts:
        got = [ring(name, False), *ring(name, True)]
        err = max((g.float() - shard(w, layout=name, dim=2).float()).abs().max().item() for g, w in zip(got, want))
        worst = max(_gather_objects(err, n))
        for r in results:
            if r.layout == name:
                r.max_error = worst


def _measure_on_rank(cfg: BenchConfig):
    return [asdict(r) for r in measure(cfg, progress=None)]


def run(cfg: BenchConfig) -> list[Result]:
    """Start ``cfg.world_size`` local ranks (or use torchrun's), measure, and return the Results."""
    from .launch import init_distributed, launch, under_torchrun

    if under_torchrun():
        device = init_distributed(cfg.device, threads=1 if cfg.device == "cpu" else None)
        return measure(cfg, device)
    per_rank = launch(_measure_on_rank, cfg.world_size, cfg, device=cfg.device)
    return [Result(**r) for r in per_rank[0]]


def format_table(results: list[Result], reference: str = "contiguous") -> str:
    """layout, pass, median ms, min ms, speedup over ``reference``, and max error where checked."""
    base = {r.pass_: r.time_ms for r in results if r.layout == reference}
    rows = [("layout", "pass", "median ms", "min ms", f"vs {reference}", "max error")]
    for r in results:
        speedup = f"{base[r.pass_] / r.time_ms:.2f}x" if r.pass_ in base else "-"
        error = "-" if r.max_error is None else f"{r.max_error:.1e}"
        rows.append((r.layout, r.pass_, f"{r.time_ms:.1f}", f"{r.min_ms:.1f}", speedup, error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
