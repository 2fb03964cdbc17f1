"""A ring step's small pieces in one kernel call: FlashAttention-2's variable-length entry, on CUDA.

A kernel call on a GPU costs 90-160 us whatever its size (launches and set-up around a one-token call on an
H200, README), so packed short documents, whose pieces are many and small, spent their steps calling. The
varlen kernel computes many sequences of packed (token, heads, head_dim) tensors in one launch: each small
piece of a step becomes one of its sequences, taken from the local tensors of its batch row (a view where
the sequences' tokens are one run, else a gather), and its results are merged back where the piece lies.
The kernel aligns a causal mask at the bottom right and the pieces are top-left aligned, so a causal piece
that is not square goes as a causal square and a dense rectangle: per batch row one call for the causal
sequences and one for the dense. Where causal squares are one query apart, that query joins the next square
and sees no key, so the queries are one run (a view). A query merged twice in one call would lose one of its
results, so sequences that share queries go to separate calls ("rounds"; the packed layouts never need a
second one).

Shapes as in :mod:`kernels`: q (batch, heads, len, d); k, v (batch, kv_heads, len, d); the running sums
out (like q, float32) and lse (batch, heads, len); pieces are :class:`layouts.Block`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels

__all__ = ["SMALL_PIECE", "Call", "split", "forward_", "backward_"]

aten = torch.ops.aten

# A piece with fewer (query, key) pairs than this joins its step's varlen call; a larger one is computed on
# its own by the fastest kernel (on Hopper cuDNN, ~1.9x FlashAttention-2 per pair). Set on an H200: at 4M,
# 8 documents in 131,072 tokens on 8 ranks (pieces of ~2M pairs) ran 1.4x slower through the varlen call
# than on cuDNN; at 1M about as fast, and 64 documents (pieces of ~30K pairs) 2.7x faster (README).
SMALL_PIECE = 1024 * 1024


def _takes(q: torch.Tensor, backend: str) -> bool:
    """Whether the varlen kernel serves q under ``backend``."""
    return q.is_cuda and backend in ("auto", "flash") and kernels.cuda_kernel_fits("flash", q)


@dataclass
class Call:
    """One varlen call in one batch row: the local positions of its sequences' queries (``q_at``, each at most
    once) and keys (``k_at``), a slice where they are one run, their offsets ``cu_q``/``cu_k`` (int32), the
    longest lengths, causal or not."""

    causal: bool
    row: int
    q_at: torch.Tensor | slice
    k_at: torch.Tensor | slice
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


_splits: dict[tuple, tuple[tuple, list[Call], tuple]] = {}


def split(q: torch.Tensor, pieces: tuple, backend: str) -> tuple[list[Call], tuple]:
    """(the varlen calls that compute the small pieces, the pieces to compute one by one): the small ones go
    together where there are at least two and the varlen kernel takes q. Cached for the pieces object (a
    packed layout keeps each step's pieces, so every layer and the backward reuse the calls)."""
    if not _takes(q, backend):
        return [], pieces
    key = (id(pieces), q.shape[0], q.device)
    cached = _splits.get(key)
    if cached is None or cached[0] is not pieces:
        if len(_splits) >= 256:  # new documents in every batch: forget old splits, not grow
            _splits.clear()
        small = tuple(p for p in pieces if p.pairs() < SMALL_PIECE)
        if len(small) < 2:
            cached = pieces, [], pieces
        else:
            cached = pieces, _calls(small, q.shape[0], q.device), tuple(p for p in pieces if p.pairs() >= SMALL_PIECE)
        _splits[key] = cached
    return cached[1], cached[2]


def _sequences(pieces: tuple, batch: int):
    """(causal, row, q start, q stop, k start, k stop) of every sequence: each piece in each of its rows, a
    causal piece with more queries than keys cut into its square and the dense rows below it."""
    for p in pieces:
        (qa, qb), (ka, kb) = (p.q.start, p.q.stop), (p.k.start, p.k.stop)
        for row in range(batch)[p.rows]:
            if not p.causal:
                yield False, row, qa, qb, ka, kb
                continue
            side = min(qb - qa, kb - ka)  # top-left causal: keys past the last query are never seen
            yield True, row, qa, qa + side, ka, ka + side
            if qb - qa > side:
                yield False, row, qa + side, qb, ka, kb


def _calls(pieces: tuple, batch: int, device: torch.device) -> list[Call]:
    rounds: dict[tuple[bool, int, int], list] = {}  # (causal, row, round) -> sequences whose queries are distinct
    ends: dict[tuple[bool, int, int], int] = {}  # (causal, row, round) -> last query stop in that round
    for seq in sorted(_sequences(pieces, batch), key=lambda s: (s[1], s[2])):
        causal, row, qa = seq[:3]
        r = 0
        while ends.get((causal, row, r), 0) > qa:  # greedy colouring of intervals: fewest rounds
            r += 1
        ends[(causal, row, r)] = seq[3]
        rounds.setdefault((causal, row, r), []).append(seq)
    return [_call(causal, row, _joined(seqs) if causal else seqs, device)
            for (causal, row, _), seqs in sorted(rounds.items())]


def _joined(seqs: list) -> list:
    """Causal squares one query apart (striped's pieces above the diagonal, j < i, one per document) start a
    query earlier: the kernel aligns the mask bottom-right, so that query sees no key (out 0, lse +inf, merged
    as nothing), and the queries become one run, a view instead of a gather and a scatter."""
    joined = seqs[:1]
    for before, seq in zip(seqs, seqs[1:]):
        joined.append(seq[:2] + (seq[2] - 1,) + seq[3:] if seq[2] == before[3] + 1 else seq)
    return joined


def _call(causal: bool, row: int, seqs: list, device: torch.device) -> Call:
    at, offsets, longest = {}, {}, {}
    for side, (start, stop) in (("q", (2, 3)), ("k", (4, 5))):
        starts, lengths = torch.tensor([s[start] for s in seqs]), torch.tensor([s[stop] - s[start] for s in seqs])
        offsets[side] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        longest[side] = int(lengths.max())
        if all(a[stop] == b[start] for a, b in zip(seqs, seqs[1:])):  # one run: a view, no gather
            at[side] = slice(seqs[0][start], seqs[-1][stop])
        else:
            at[side] = starts.repeat_interleave(lengths) + torch.arange(int(offsets[side][-1])) \
                - offsets[side][:-1].repeat_interleave(lengths)
    parts = [t for t in (at["q"], at["k"], offsets["q"], offsets["k"]) if isinstance(t, torch.Tensor)]
    moved = iter(torch.cat(parts).to(device).split([len(t) for t in parts]))  # one copy to the device
    q_at, k_at = (a if isinstance(a, slice) else next(moved) for a in (at["q"], at["k"]))
    cu_q, cu_k = next(moved).int(), next(moved).int()
    return Call(causal, row, q_at, k_at, cu_q, cu_k, longest["q"], longest["k"])


def _take(t: torch.Tensor, row: int, at: torch.Tensor | slice) -> torch.Tensor:
    """(heads, tokens, ...) of row ``row`` of a (batch, heads, len, ...) tensor at local positions ``at``: a view
    for a slice, a gather of whole rows of head_dim (coalesced) for an index."""
    return t[row, :, at] if isinstance(at, slice) else t[row].index_select(1, at)


def _packed(t: torch.Tensor, row: int, at) -> torch.Tensor:
    """(tokens, heads, d) for the kernel, which needs only head_dim contiguous: a strided view for a slice (no
    copy), one gather for an index."""
    tokens_first = t[row].transpose(0, 1)
    return tokens_first[at] if isinstance(at, slice) else tokens_first.index_select(0, at)


def forward_(out, lse, q, k, v, calls: list[Call], *, scale: float) -> None:
    """Fold the calls' pieces into the running sums ``out``, ``lse`` in place."""
    for c in calls:
        out_b, lse_b = _kernel_forward(_packed(q, c.row, c.q_at), _packed(k, c.row, c.k_at),
                                       _packed(v, c.row, c.k_at), c, scale)
        lse_b.masked_fill_(lse_b == float("inf"), float("-inf"))  # the kernel's mark of a query that saw no key
        sums, sums_lse = _take(out, c.row, c.q_at), _take(lse, c.row, c.q_at)
        kernels.merge_(sums, sums_lse, out_b.transpose(0, 1), lse_b)
        if not isinstance(c.q_at, slice):  # merged into a gathered copy: put it back
            out[c.row].index_copy_(1, c.q_at, sums)
            lse[c.row].index_copy_(1, c.q_at, sums_lse)


def backward_(dq, dk, dv, dout, q, k, v, out, lse, calls: list[Call], *, scale: float) -> None:
    """Add the calls' pieces' gradients into ``dq`` (like q) and ``dk``, ``dv`` (like k), in place; ``out``
    and ``lse`` are the final ones of the whole ring."""
    for c in calls:
        grads = _kernel_backward(
            _packed(dout, c.row, c.q_at), _packed(q, c.row, c.q_at), _packed(k, c.row, c.k_at),
            _packed(v, c.row, c.k_at), _packed(out, c.row, c.q_at), _take(lse, c.row, c.q_at).contiguous(), c, scale,
        )
        for total, part, at in zip((dq, dk, dv), grads, (c.q_at, c.k_at, c.k_at)):
            part = part.transpose(0, 1)
            if isinstance(at, slice):
                total[c.row, :, at] += part  # promoted to the fp32 sums as it is added
            else:
                total[c.row].index_add_(1, at, part.to(total.dtype))


def _flash_forward(q, k, v, call: Call, scale: float):
    """FlashAttention-2 on packed sequences: out (tokens, heads, d), lse (heads, tokens) float32."""
    out, lse, *_ = aten._flash_attention_forward(
        q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal, False, scale=scale
    )
    return out, lse


def _flash_backward(dout, q, k, v, out, lse, call: Call, scale: float):
    """(dq, dk, dv) of packed sequences; dk, dv with the kv heads (the kernel sums each group's heads)."""
    seed, offset = kernels._cuda_rng_placeholders(q.device)
    return aten._flash_attention_backward(
        dout, q, k, v, out, lse, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal, seed, offset,
        scale=scale,
    )


_kernel_forward, _kernel_backward = _flash_forward, _flash_backward
