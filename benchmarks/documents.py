"""Packed documents: how far each layout's ring is from perfect balance, counted exactly (no timing).

    python benchmarks/documents.py                          # 65,536 tokens, 2 to 16 ranks, 1 to 64 documents
    python benchmarks/documents.py --ranks 8 --documents 16 --packings 50
    python benchmarks/documents.py --layouts contiguous striped balanced

Layouts: contiguous, striped, zigzag, and balanced (contiguous shares of the documents in the order
balance_documents chooses for each packing).

Each token attends causally within its document, as ring_attention(..., cu_seqlens=...) computes it; the
documents' lengths are random (cuts drawn uniformly, --packings packings per cell, the median reported).
Perfect balance is every rank computing 1/N of the (query, key) pairs. Two slowdowns against it bound the
ring's attention time, with compute time proportional to pairs:

* steps: the sum over ring steps of the busiest rank's pairs, as if every step ended together (the model
  of `simulate` and `plan --documents`, and of the Striped Attention paper);
* ranks: the busiest rank's pairs over all steps. No schedule beats it; the ring comes near it where ranks
  can run ahead of their neighbours, as in a forward pass on 2 ranks, whose one transfer leaves at once.
"""

from __future__ import annotations

import argparse
import statistics

from striped_attention.bench import random_documents
from striped_attention.layouts import BALANCED, LAYOUTS
from striped_attention.plan import document_step_pairs


def slowdowns(layout: str, cu_seqlens: list[int], world: int) -> tuple[float, float]:
    """(steps, ranks): the sum over steps of the busiest rank's pairs, and the busiest rank's total, each over
    the pairs of perfect balance (all pairs / world)."""
    steps = document_step_pairs(layout, cu_seqlens, world)
    balanced = sum(map(sum, steps)) / world
    return sum(map(max, steps)) / balanced, max(map(sum, zip(*steps))) / balanced


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=65536, help="global sequence length (default: %(default)s)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16], help="ring sizes (default: 2 4 8 16)")
    p.add_argument("--documents", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="documents per sequence (default: 1 4 16 64)")
    p.add_argument("--packings", type=int, default=20, help="random packings per cell (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", nargs="+", choices=[*LAYOUTS, BALANCED], default=list(LAYOUTS),
                   help="layouts, a column each (default: %(default)s)")
    args = p.parse_args(argv)
    print(f"{args.seq_len} tokens, causal within each document; slowdown against perfect balance, steps / ranks "
          f"(see --help), median over {args.packings} random packings")
    print("| ranks | documents | " + " | ".join(args.layouts) + " |")
    print("|---:|---:|" + "---:|" * len(args.layouts))
    for world in args.ranks:
        for documents in args.documents:
            packings = [random_documents(args.seq_len, documents, args.seed + i) or [0, args.seq_len]
                        for i in range(args.packings)]
            cells = []
            for name in args.layouts:
                steps, ranks = zip(*(slowdowns(name, cu, world) for cu in packings))
                cells.append(f"{statistics.median(steps):.2f}x / {statistics.median(ranks):.2f}x")
            print(f"| {world} | {documents} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
