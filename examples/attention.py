"""Striped attention over one long sequence, under torchrun, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 4 examples/attention.py --seq-len 65536
    torchrun --nproc-per-node 4 examples/attention.py --documents 3000,100   # packed documents, then the rest
    torchrun --nproc-per-node 4 examples/attention.py --documents 500,900,200,1200 --balance  # short ones whole
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        examples/attention.py --device cuda --seq-len 262144 --dtype bfloat16
"""

import argparse

import torch
import torch.distributed as dist

from striped_attention import balance_documents, positions, ring_attention, shard, unshard
from striped_attention.launch import init_distributed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384, help="global sequence length (tokens)")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--documents", metavar="L1,L2,...", type=lambda s: [int(x) for x in s.split(",")],
                   help="pack documents of these lengths first, the rest of the sequence last; each token attends "
                        "within its own document only (cu_seqlens)")
    p.add_argument("--balance", action="store_true",
                   help="with --documents: keep the documents whole, reordered to balance the ranks "
                        "(balance_documents), instead of striped")
    args = p.parse_args()
    if args.balance and not args.documents:
        p.error("--balance orders packed documents: give --documents")
    cu_seqlens = None
    if args.documents:
        starts = torch.tensor([0, *args.documents]).cumsum(0).tolist()
        if min(args.documents) < 0 or starts[-1] > args.seq_len:
            p.error(f"--documents must be lengths >= 0 adding up to at most --seq-len ({args.seq_len})")
        cu_seqlens = [*starts, args.seq_len] if starts[-1] < args.seq_len else starts

    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)

    # Every rank makes the same full tensors here only to check the result; real inputs arrive sharded.
    g = torch.Generator().manual_seed(0)
    full = lambda h: torch.randn(1, h, args.seq_len, args.head_dim, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = full(args.heads), full(args.kv_heads), full(args.kv_heads)

    # Striped: this rank's tokens t, t+N, t+2N, ...; balanced: whole documents, in the order balance_documents
    # chose (the same on every rank). Their true positions, e.g. for RoPE.
    layout = balance_documents(cu_seqlens, world) if args.balance else "striped"
    q_local, k_local, v_local = (shard(t, layout=layout, dim=2).requires_grad_() for t in (q, k, v))
    pos = positions(args.seq_len, layout=layout, rank=rank, world_size=world)

    # (1, heads, seq_len / N, head_dim); cu_seqlens None: one causal sequence
    out = ring_attention(q_local, k_local, v_local, layout=layout, cu_seqlens=cu_seqlens)
    out.float().square().sum().backward()

    whole = unshard(out.detach(), layout=layout, dim=2)
    if rank == 0:  # against attention on one process, document by document
        spans = zip(cu_seqlens, cu_seqlens[1:]) if cu_seqlens else [(0, args.seq_len)]
        want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True) for a, b in spans], dim=2)
        error = (whole.float() - want.float()).abs().max().item()
        packed = f" in {len(cu_seqlens) - 1} documents" if cu_seqlens else ""
        packed += ", balanced" if args.balance else ""
        print(f"{world} ranks, {args.seq_len} tokens{packed}, local positions {pos[:3].tolist()}...: max error "
              f"{error:.2e}, dq norm {q_local.grad.float().norm():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
