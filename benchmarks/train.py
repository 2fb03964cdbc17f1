"""End-to-end training throughput of striped vs contiguous vs zigzag: the paper's end-to-end table in miniature.

Full training steps (forward, backward through the ring, gradient all-reduce, AdamW) of the ``bench`` model
on local CPU ranks (1 thread each), one sequence sharded over all of them. The layouts are interleaved (each
round runs one step of every layout, in a rotating order), after warm-up rounds; the median step time of each
layout gives its tokens/s and its speedup over contiguous, printed beside the ``plan`` prediction for the
same model, sequence length and ring size (its maximum: communication hidden, every FLOP at the same rate).

Why the ``bench`` preset (d_model 256, 2 layers, 4 heads of 64, d_ff 688): at 16,384 tokens attention is 86%
of its training FLOPs, the share of the paper's 7B model at 262,144 tokens, so the layouts are compared in
the long-context regime the paper measured, at a size that one CPU core per rank trains in seconds a step.

    python benchmarks/train.py                          # 2 ranks, 16,384 tokens, 3 rounds after 1 warm-up
    python benchmarks/train.py --seq-len 2048 --repeats 1 --warmup 0     # a quick check
    python benchmarks/train.py --documents 8          # the sequence cut into 8 packed documents

With ``--documents N`` the sequence is cut at N - 1 random points (drawn with ``--seed``, as ``bench
--documents`` draws them) into packed documents, each attending only within itself; ``plan``'s prediction
is for one causal sequence, so it is left out then.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from striped_attention import train as T
from striped_attention.bench import Progress, random_documents, timed_ms
from striped_attention.launch import init_distributed, launch, under_torchrun
from striped_attention.layouts import BALANCED, LAYOUTS, for_documents, positions
from striped_attention.models import PRESETS, get_config
from striped_attention.plan import max_training_speedup


def measure(cfg: T.TrainConfig, layouts: tuple[str, ...], warmup: int, repeats: int, show_progress: bool,
            cu_seqlens: list[int] | None = None) -> dict:
    """On every rank: {layout: [step ms, ...]} over ``repeats`` interleaved rounds after ``warmup`` rounds;
    ``cu_seqlens``: packed documents, the same in every row."""
    device = torch.device(cfg.device)
    par = T.Parallel.build(cfg.dp, device)
    model, optimizer = T.build_model_and_optimizer(cfg, device)
    ids, labels = T.training_batch(T.load_corpus(cfg.data, val_percent=cfg.val_percent), 1, cfg)
    batches = {}
    rows = None if cu_seqlens is None else [list(cu_seqlens)] * ids.shape[0]  # LocalBatch's: one list per row
    for name in layouts:  # every row packs the same documents, so balanced has one order for the batch
        layout = for_documents(name, cu_seqlens, par.cp)
        pos = positions(cfg.seq_len, layout=layout, rank=par.cp_rank, world_size=par.cp).to(device)
        batches[name] = T.LocalBatch(ids[:, pos].to(device), labels[:, pos].to(device), pos, rows, name)
    lead = par.cp_rank == 0 and par.dp_rank == 0
    progress = Progress("train bench") if show_progress and lead else None
    times = {name: [] for name in layouts}
    total = (warmup + repeats) * len(layouts)
    for rnd in range(warmup + repeats):
        order = layouts[rnd % len(layouts):] + layouts[: rnd % len(layouts)]
        for i, name in enumerate(order):
            def step(name=name):
                T.train_step(model, optimizer, batches[name], par=par, lr=cfg.lr,
                             grad_clip=cfg.grad_clip, dtype=cfg.dtype)

            ms = timed_ms(step, device)
            if rnd >= warmup:
                times[name].append(ms)
            if progress:
                progress(rnd * len(layouts) + i + 1, total, f"{name} {ms / 1e3:.1f} s/step")
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench", choices=list(PRESETS), help="model preset")
    p.add_argument("--seq-len", type=int, default=16384, help="tokens per sequence (sharded over all ranks)")
    p.add_argument("--world-size", type=int, default=2, help="local ranks (processes, 1 thread each on CPU)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--dtype", default="float32", choices=T.DTYPES, help="compute dtype")
    p.add_argument("--layouts", default=",".join(("contiguous", "striped", "zigzag")),
                   help=f"comma-separated layouts to compare, from {[*sorted(LAYOUTS), BALANCED]} (balanced: with "
                        "--documents); the first is the reference")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (one step of every layout each) first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median step time is reported")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: gloo ranks; cuda: one GPU per rank")
    p.add_argument("--documents", type=int, default=1,
                   help="cut the sequence into N packed documents at random points (default 1: one sequence)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document cuts (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = p.parse_args(argv)
    layouts = tuple(args.layouts.split(","))
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if not 1 <= args.documents <= args.seq_len:
        p.error(f"--documents must be from 1 to --seq-len ({args.seq_len}), got {args.documents}")
    for name in layouts:
        if name not in (*LAYOUTS, BALANCED):
            p.error(f"unknown layout {name!r} in --layouts; choose from {[*sorted(LAYOUTS), BALANCED]}")
    if BALANCED in layouts and args.documents == 1:
        p.error(f"layout {BALANCED!r} orders packed documents: give --documents N")
    cfg = T.TrainConfig(
        model=args.model, seq_len=args.seq_len, batch=args.batch, world_size=args.world_size, dtype=args.dtype,
        device=args.device, layout=for_documents(layouts[0], None, 1), progress=False,
    )
    for name in layouts:  # every layout must fit the sequence length
        T.TrainConfig(**{**cfg.__dict__, "layout": for_documents(name, None, 1)})
    model = get_config(cfg.model)
    flops = model.training_flops_per_token(cfg.seq_len)
    share = flops["attention"] / sum(flops.values())
    cu_seqlens = random_documents(cfg.seq_len, args.documents, args.seed)
    packed = f" in {args.documents} documents {cu_seqlens}" if cu_seqlens else ""
    print(
        f"{cfg.model} model ({model.num_params() / 1e6:.1f}M parameters, attention {share:.0%} of training FLOPs), "
        f"{cfg.batch} x {cfg.seq_len} tokens{packed} per step over {cfg.world_size} {cfg.device} rank(s), "
        f"{cfg.dtype}; median of {args.repeats} interleaved rounds after {args.warmup} warm-up",
        file=sys.stderr, flush=True,
    )
    run_args = (cfg, layouts, args.warmup, args.repeats, True, cu_seqlens)
    threads = 1 if cfg.device == "cpu" else None
    if under_torchrun():
        init_distributed(cfg.device, threads=threads)
        times = measure(*run_args)
    else:
        times = launch(measure, cfg.world_size, *run_args, device=cfg.device, threads_per_rank=threads)[0]

    tokens = cfg.batch * cfg.seq_len
    median = {name: statistics.median(times[name]) for name in layouts}
    reference = layouts[0]
    rows = []
    print(f"| layout | median s/step | tokens/s | vs {reference} | plan: max vs {reference} |")
    print("|---|---:|---:|---:|---:|")
    shape = dict(d_model=model.d_model, d_ff=model.d_ff, seq_len=cfg.seq_len, sp_degree=cfg.cp)
    for name in layouts:
        predicted = None  # plan models one causal sequence
        if not cu_seqlens:
            predicted = max_training_speedup(name, **shape) / max_training_speedup(reference, **shape)
        row = {"layout": name, "median_s": median[name] / 1e3, "tokens_per_s": tokens / (median[name] / 1e3),
               "speedup": median[reference] / median[name], "plan_speedup": predicted, "times_ms": times[name]}
        rows.append(row)
        print(f"| {name} | {row['median_s']:.2f} | {row['tokens_per_s']:,.0f} | {row['speedup']:.2f}x "
              f"| {'-' if predicted is None else f'{predicted:.2f}x'} |")
    if args.json:
        with open(args.json, "w") as f:
            setting = {k: getattr(cfg, k) for k in ("model", "seq_len", "batch", "world_size", "dtype", "device")}
            json.dump({**setting, "cu_seqlens": cu_seqlens, "warmup": args.warmup, "repeats": args.repeats,
                       "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
