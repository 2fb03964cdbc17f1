"""What one ring step costs on this machine's kernel: each piece a layout asks for, relative to a full block.

    python benchmarks/kernels.py                  # 2,048 / 4,096 / 8,192 tokens per rank, 8 heads, head_dim 64
    python benchmarks/kernels.py --device cuda --dtype bfloat16 --tokens 8192 16384 32768 --heads 32 --head-dim 128
    python benchmarks/kernels.py --tokens 4096 --threads 1 2 --kv-heads 1   # CPU threads, one kv head (MQA)
    python benchmarks/kernels.py --tokens 4096 --kernels own --triangles 16 32 64 128 256 1024   # small pieces
    python benchmarks/kernels.py --tokens 4096 --kernels own --chunks blas registers   # dense chunks, both ways

Pieces: striped's causal triangle (s <= r) and its shifted, strictly causal one (s > r), zigzag's two dense
half blocks (s < r: all queries x first half of the keys; s > r: second half of the queries x all keys).
A perfect kernel would give 0.5 for all four. Median of repeats, pieces interleaved; on CPU one thread unless
--threads says otherwise. With --triangles: instead, the cost per (query, key) pair of causal triangles of N
tokens (the pieces short packed documents give each rank), relative to a full block's, and the time of a call
on one query and one key (what any piece costs beyond its pairs).
Kernels: on CPU "torch" is torch's flash kernel, "own" this package's compiled one (backend "auto"); on CUDA
torch's "flash" (FlashAttention-2), "cudnn" and "efficient" (memory-efficient) kernels. --chunks: how "own"
computes the chunks of keys a query tile sees whole, BLAS or its register blocks (by default the kernel's
choice for this processor); several, interleaved in each repeat, one row each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from striped_attention import kernels
from striped_attention.launch import torch_threads
from striped_attention.layouts import Block

KERNELS = {"torch": "torch", "own": "auto", "flash": "flash", "cudnn": "cudnn", "efficient": "efficient"}  # -> backend
CHUNKS = {"default": None, "blas": False, "registers": True}  # -> kernels.cpu_register_chunks
DEFAULT = {"cpu": ["torch", "own"], "cuda": ["flash", "cudnn"]}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192], help="tokens per rank (block size)")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=None,
                   help="kernels to time (default: torch and own on CPU, flash and cudnn on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="q/k/v dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="CPU threads, each count in turn (default: 1)")
    p.add_argument("--chunks", nargs="+", choices=list(CHUNKS), default=["default"],
                   help="how the own kernel computes whole chunks: its choice for this processor (default), "
                        "blas or registers (several: interleaved, a row each)")
    p.add_argument("--triangles", type=int, nargs="+", metavar="N",
                   help="time causal triangles of N tokens instead of the layouts' pieces (each N <= --tokens)")
    args = p.parse_args(argv)
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads or min(args.threads) < 1:
        p.error("--heads must be a multiple of --kv-heads, and --threads at least 1")
    if args.triangles and not 1 <= min(args.triangles) <= max(args.triangles) <= min(args.tokens):
        p.error("--triangles must be from 1 to --tokens")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = args.kernels or DEFAULT[device.type]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here")
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}")
    thread_counts = args.threads if device.type == "cpu" else [None]  # None: leave torch's setting
    if "own" in names and kernels.cpu_extension() is None:
        raise SystemExit("the compiled CPU kernel is unavailable here (see the warning above)")
    threads_column = thread_counts not in ([1], [None])
    chunks_column = args.chunks != ["default"]
    if chunks_column and names != ["own"]:
        p.error("--chunks applies to the own kernel only: add --kernels own")
    columns = ["striped s<=r", "striped s>r", "zigzag s<r", "zigzag s>r"]
    if args.triangles:
        columns = ["one-token call us", *(f"triangle {n}" for n in args.triangles)]
    extra = ' threads |' * threads_column + ' chunks |' * chunks_column
    print(f"| tokens per rank | kernel |{extra} pass | full block ms | {' | '.join(columns)} |")
    print(f"|---:|---|{'---:|' * threads_column}{'---|' * chunks_column}---|---:|{'---:|' * len(columns)}")
    runs = ((c, kernel, n) for c in args.tokens for kernel in names for n in thread_counts)
    chosen = kernels.cpu_register_chunks  # --chunks sets it for each variant; this comes back after each pass
    with torch_threads(None):  # each run sets its thread count; the caller's comes back after
        for c, kernel, threads in runs:
            backend = KERNELS[kernel]
            if threads is not None:
                torch.set_num_threads(threads)
            q, dout = (torch.randn(1, args.heads, c, args.head_dim).to(device, dtype) for _ in range(2))
            k, v = (torch.randn(1, kv_heads, c, args.head_dim).to(device, dtype) for _ in range(2))
            h, scale = c // 2, kernels.default_scale(args.head_dim)
            out, lse = kernels.attention_forward(q, k, v, causal=True, scale=scale, backend=backend)
            pieces = {  # (query rows, key rows, causal)
                "full": (slice(0, c), slice(0, c), False),
                "striped s<=r": (slice(0, c), slice(0, c), True),
                "striped s>r": (slice(1, c), slice(0, c - 1), True),
                "zigzag s<r": (slice(0, c), slice(0, h), False),
                "zigzag s>r": (slice(h, c), slice(0, c), False),
            }
            if args.triangles:
                pieces = {"full": pieces["full"], "one-token call us": (slice(0, 1), slice(0, 1), False),
                          **{f"triangle {n}": (slice(0, n), slice(0, n), True) for n in args.triangles}}
            pairs = {name: Block(*spec).pairs() for name, spec in pieces.items()}
            calls = {name: min(1000, -(-pairs["full"] // (16 * pairs[name]))) for name in pieces}  # small: many calls

            if args.triangles:  # small pieces as the ring calls them: folded into sums and gradients in place
                sums, grads = kernels.no_keys_seen(q), [torch.zeros_like(t, dtype=out.dtype) for t in (q, k, v)]

                def forward(qs, ks, causal):
                    kernels.attention_forward_(sums[0][:, :, qs], sums[1][:, :, qs], q[:, :, qs], k[:, :, ks],
                                               v[:, :, ks], causal=causal, scale=scale, backend=backend)

                def backward(qs, ks, causal):
                    kernels.attention_backward_(grads[0][:, :, qs], grads[1][:, :, ks], grads[2][:, :, ks],
                                                dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                                                lse[:, :, qs], causal=causal, scale=scale, backend=backend)
            else:
                def forward(qs, ks, causal):
                    kernels.attention_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], causal=causal, scale=scale,
                                              backend=backend)

                def backward(qs, ks, causal):
                    kernels.attention_backward(dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                                               lse[:, :, qs], causal=causal, scale=scale, backend=backend)

            for name, fn in (("fwd", forward), ("bwd", backward)):
                times = {(mode, piece): [] for mode in args.chunks for piece in pieces}
                for rep in range(args.repeats + 1):
                    for mode, piece in times:
                        kernels.cpu_register_chunks = CHUNKS[mode]
                        _sync(device)
                        start = time.perf_counter()
                        for _ in range(calls[piece]):
                            fn(*pieces[piece])
                        _sync(device)
                        if rep:
                            times[mode, piece].append((time.perf_counter() - start) / calls[piece])
                kernels.cpu_register_chunks = chosen
                for mode in args.chunks:
                    ms = {piece: statistics.median(times[mode, piece]) * 1e3 for piece in pieces}
                    if args.triangles:  # the call in microseconds, the triangles' cost per pair relative to the full block
                        per_pair = {piece: ms[piece] / pairs[piece] for piece in pieces}
                        cells = [f"{ms['one-token call us'] * 1e3:.1f}"]
                        cells += [f"{per_pair[piece] / per_pair['full']:.2f}x" for piece in list(pieces)[2:]]
                    else:
                        cells = [f"{ms[piece] / ms['full']:.3f}" for piece in list(pieces)[1:]]
                    ratios = " | ".join(cells)
                    extra = f" {threads} |" * threads_column + f" {mode} |" * chunks_column
                    print(f"| {c} | {kernel} |{extra} {name} | {ms['full']:.2f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
