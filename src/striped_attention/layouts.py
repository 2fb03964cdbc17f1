"""Sequence layouts: which global positions each rank holds, and what each ring step computes.

A layout is data. It answers two questions and nothing else:

* ``positions(seq_len, rank, world_size)``: the global token positions rank ``rank`` holds, in local order;
* ``blocks(q_rank, kv_rank, local_len, world_size, causal)``: the attention pieces a rank holding the
  queries of ``q_rank`` computes against the keys/values of ``kv_rank``. Each :class:`Block` is a query
  slice, a key slice and whether the piece is a top-left aligned causal triangle or a dense rectangle (and,
  under a sliding window, the band of it that is seen).

Everything else (sharding, the ring engine, the simulator, the counts) is derived from these two answers,
so a new layout is one new class here and nothing else. Packed documents are a layout too:
:class:`Documents` wraps any layout and cuts its pieces at the documents' boundaries; so is a sliding window:
:class:`Windowed` wraps any layout and cuts its pieces to the band each query sees.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

__all__ = [
    "Block", "Layout", "Contiguous", "Striped", "Zigzag", "Documents", "DocumentsPerRow", "DocumentOrder", "Windowed",
    "with_window", "balance_documents", "for_documents", "cut_at_documents", "offsets_tensor", "BALANCED", "LAYOUTS", "get_layout",
    "positions", "shard", "unshard",
]

EVERY_ROW = slice(None)


@dataclass(frozen=True)
class Block:
    """One attention piece: queries ``q`` attend to keys ``k`` (local slices), causal or dense, in the batch
    rows ``rows`` (every row unless packed documents differ between rows).

    ``causal=True`` means query ``q.start + i`` sees key ``k.start + j`` iff ``j <= i`` (top-left aligned, as
    torch's fused kernels define it); ``causal=False`` means every query sees every key of the slice. A
    ``window`` sees only the keys with ``i - j < window`` of those (under ``causal=False`` it may be 0 or
    less: the keys from ``i + 1 - window`` on).
    """

    q: slice
    k: slice
    causal: bool
    rows: slice = field(default_factory=lambda: EVERY_ROW)
    window: int | None = None

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        """The piece's part of a (batch, heads, local_seq, ...) tensor indexed like the queries."""
        return t[self.rows, :, self.q]

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        """The piece's part of a (batch, kv_heads, local_seq, ...) tensor indexed like the keys."""
        return t[self.rows, :, self.k]

    def pairs(self) -> int:
        """Number of (query, key) pairs this block computes."""
        nq, nk = max(self.q.stop - self.q.start, 0), max(self.k.stop - self.k.start, 0)
        if self.window is None and not self.causal:
            return nq * nk
        lowest = 0 if self.causal else -nk  # i - j >= lowest
        highest = nq if self.window is None else self.window - 1  # i - j <= highest
        return _pairs_within(nq, nk, highest) - _pairs_within(nq, nk, lowest - 1)


def _pairs_within(nq: int, nk: int, x: int) -> int:
    """The (i, j) in [0, nq) x [0, nk) with i - j <= x: all but those whose row starts past key 0 leaves."""
    if nq <= 0 or nk <= 0:
        return 0
    first, last = -x, nq - 1 - x  # u = i - x: row i misses its first min(max(u, 0), nk) keys
    a, b = max(1, first), min(nk - 1, last)
    missed = (a + b) * (b - a + 1) // 2 if b >= a else 0
    missed += nk * max(0, last - max(nk, first) + 1)
    return nq * nk - missed


def band(q: slice, k: slice, lowest: int | None, highest: int | None, rows: slice = EVERY_ROW) -> list[Block]:
    """The pairs ``(q.start + i, k.start + j)`` with ``lowest <= i - j <= highest`` (None: no bound) as
    Blocks: rows and keys that see nothing left out, the rest causal or dense with a window."""
    nq, nk = q.stop - q.start, k.stop - k.start
    lo = -(nk - 1) if lowest is None else max(lowest, -(nk - 1))
    hi = nq - 1 if highest is None else min(highest, nq - 1)
    if nq <= 0 or nk <= 0 or lo > hi:
        return []
    qa, qb, ka, kb = max(0, lo), min(nq, nk + hi), max(0, -hi), min(nk, nq - lo)  # rows and keys with pairs
    lo, hi, nq, nk = lo - qa + ka, hi - qa + ka, qb - qa, kb - ka
    q, k = slice(q.start + qa, q.start + qb), slice(k.start + ka, k.start + kb)
    window = None if hi >= nq - 1 else hi + 1
    if lo <= -(nk - 1):
        return [Block(q, k, False, rows, window)]
    if lo == 0:
        return [Block(q, k, True, rows, window)]
    # lo < 0: every row sees the first -lo keys below the band's top; from there on a triangle
    split = k.start - lo
    return [*band(q, slice(k.start, split), None, hi, rows), *band(q, slice(split, k.stop), 0, hi - lo, rows)]


class Layout:
    """Base class: subclasses set ``name`` and implement ``positions`` and ``causal_blocks``."""

    name: str = ""

    def divisor(self, world_size: int) -> int:
        """The sequence length must be a multiple of this."""
        return world_size

    def check(self, seq_len: int, world_size: int) -> None:
        """Raise ValueError if ``seq_len`` cannot be split over ``world_size`` ranks in this layout."""
        d = self.divisor(world_size)
        if seq_len <= 0 or seq_len % d:
            raise ValueError(
                f"layout {self.name!r}: sequence length {seq_len} must be a positive multiple of {d} "
                f"for {world_size} rank(s); pad the sequence to a multiple of {d}"
            )

    def positions(self, seq_len: int, rank: int, world_size: int) -> torch.Tensor:
        """LongTensor (seq_len // world_size,): global positions held by ``rank``, in local order."""
        raise NotImplementedError

    def causal_blocks(self, q_rank: int, kv_rank: int, c: int, n: int) -> tuple[Block, ...]:
        """The pieces of the causal mask between two ranks' tokens, ``c`` tokens each, ``n`` ranks."""
        raise NotImplementedError

    def last_step(self, world_size: int, causal: bool, local_len: int) -> int:
        """The last ring step at which some rank has a piece to compute (step s pairs rank r with the K/V of
        rank r - s): the K/V blocks need travel no further. World_size - 1, unless packed documents or a
        sliding window leave the later steps empty."""
        return world_size - 1

    def blocks(self, q_rank: int, kv_rank: int, local_len: int, world_size: int, causal: bool) -> tuple[Block, ...]:
        """What ``q_rank``'s queries compute against ``kv_rank``'s keys. Fully masked work is absent."""
        if not causal:
            return (Block(slice(0, local_len), slice(0, local_len), False),)
        return tuple(b for b in self.causal_blocks(q_rank, kv_rank, local_len, world_size) if b.pairs())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Contiguous(Layout):
    """Original Ring Attention: rank r holds positions r*c ... (r+1)*c - 1."""

    name = "contiguous"

    def positions(self, seq_len, rank, world_size):
        self.check(seq_len, world_size)
        c = seq_len // world_size
        return torch.arange(rank * c, (rank + 1) * c)

    def causal_blocks(self, q_rank, kv_rank, c, n):
        everything = slice(0, c)
        if kv_rank < q_rank:
            return (Block(everything, everything, False),)
        if kv_rank == q_rank:
            return (Block(everything, everything, True),)
        return ()


class Striped(Layout):
    """Striped Attention: rank r holds positions r, r+N, r+2N, ... (token t lives on rank t mod N).

    Local query i is position i*N + r and local key j is j*N + s, so for s <= r the mask is j <= i
    (causal with its diagonal) and for s > r it is j < i: query i+1 against key j, shifted by one row.
    """

    name = "striped"

    def positions(self, seq_len, rank, world_size):
        self.check(seq_len, world_size)
        return torch.arange(rank, seq_len, world_size)

    def causal_blocks(self, q_rank, kv_rank, c, n):
        if kv_rank <= q_rank:
            return (Block(slice(0, c), slice(0, c), True),)
        return (Block(slice(1, c), slice(0, c - 1), True),)


class Zigzag(Layout):
    """Zigzag (Megatron, Llama 3): the sequence is cut into 2N chunks; rank r holds chunks r and 2N-1-r."""

    name = "zigzag"

    def divisor(self, world_size):
        return 2 * world_size

    def positions(self, seq_len, rank, world_size):
        self.check(seq_len, world_size)
        h = seq_len // (2 * world_size)
        first = torch.arange(rank * h, (rank + 1) * h)
        return torch.cat([first, first + (2 * world_size - 1 - 2 * rank) * h])

    def causal_blocks(self, q_rank, kv_rank, c, n):
        h = c // 2
        if kv_rank == q_rank:  # local positions increase, so the whole block is one causal triangle
            return (Block(slice(0, c), slice(0, c), True),)
        if kv_rank < q_rank:  # both query chunks see the early key chunk only
            return (Block(slice(0, c), slice(0, h), False),)
        return (Block(slice(h, c), slice(0, c), False),)  # only the late query chunk sees anything


LAYOUTS: dict[str, Layout] = {cls.name: cls() for cls in (Contiguous, Striped, Zigzag)}


def get_layout(layout: str | Layout) -> Layout:
    """The Layout for a name (``"contiguous"``, ``"striped"``, ``"zigzag"``) or a Layout instance."""
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Packed documents
# ----------------------------------------------------------------------------------------------------------


class Packed(Layout):
    """Base of the packed-documents layouts: the tokens sit where the ``inner`` layout puts them, and
    ``cu_seqlens`` (checked offsets) say which pieces of its blocks are computed."""

    def __init__(self, layout: str | Layout, cu_seqlens: tuple):
        self.inner = get_layout(layout)
        self.name = self.inner.name
        self.cu_seqlens = cu_seqlens
        self.checksum = zlib.crc32(repr(cu_seqlens).encode())  # what the ranks compare
        self._blocks: dict[tuple, tuple[Block, ...]] = {}
        self._last_steps: dict[tuple[int, bool], int] = {}

    def divisor(self, world_size):
        return self.inner.divisor(world_size)

    def positions(self, seq_len, rank, world_size):
        return self.inner.positions(seq_len, rank, world_size)

    def last_step(self, world_size: int, causal: bool, local_len: int | None = None) -> int:
        """As :meth:`Layout.last_step`: world_size - 1 unless every document lies on few neighbouring ranks
        (short documents, contiguous shares). The documents give the length."""
        raise NotImplementedError


class Documents(Packed):
    """Documents packed into one sequence: a token attends only to tokens of its own document.

    ``cu_seqlens`` are the global offsets where the documents start, then the sequence length (flash-attn's
    convention): ``[0, len_0, len_0 + len_1, ..., seq_len]``; every row of the batch shares them. Tokens sit
    where ``layout`` puts them; each of its pieces is cut at the documents' boundaries into causal triangles
    and dense rectangles, so the kernels and the ring engine are unchanged. Striped spreads every document over
    all ranks, so its pieces stay balanced whatever the documents' lengths.
    """

    def __init__(self, layout: str | Layout, cu_seqlens: Sequence[int] | torch.Tensor):
        super().__init__(layout, _offsets(cu_seqlens))

    @staticmethod
    def of(layout: str | Layout, cu_seqlens, batch: int | None = None) -> Documents | DocumentsPerRow:
        """The layout of ``cu_seqlens``: one set of offsets for every row (a :class:`Documents`) or one per row
        of the batch (a :class:`DocumentsPerRow`, ``batch`` of them); one instance per (layout, offsets), so
        the layers of a model, each calling ring_attention with the same documents, share the pieces cut once."""
        layout, rows = get_layout(layout), _rows_of_offsets(cu_seqlens)
        if rows is None:
            return _shared_documents(layout, _offsets(cu_seqlens))
        if batch is not None and len(rows) != batch:
            raise ValueError(f"cu_seqlens has offsets for {len(rows)} rows, but the batch has {batch}; give one "
                             "list of offsets per row, or one list for every row")
        if len(set(rows)) == 1:  # every row alike: the pieces of one set, over the whole batch
            return _shared_documents(layout, rows[0])
        return _shared_rows(layout, rows)

    def check(self, seq_len, world_size):
        self.inner.check(seq_len, world_size)
        if self.cu_seqlens[-1] != seq_len:
            raise ValueError(
                f"cu_seqlens end at {self.cu_seqlens[-1]}, but the sequence has {seq_len} tokens; they must end at "
                "the whole (global) sequence length"
            )

    def blocks(self, q_rank, kv_rank, local_len, world_size, causal):
        key = (q_rank, kv_rank, local_len, world_size, causal)
        if key not in self._blocks:
            seq_len = local_len * world_size
            self.check(seq_len, world_size)
            bounds = torch.tensor(self.cu_seqlens)
            q_doc, k_doc = (self._documents_of(self.positions(seq_len, r, world_size), bounds)
                            for r in (q_rank, kv_rank))
            pieces = self.inner.blocks(q_rank, kv_rank, local_len, world_size, causal)
            self._blocks[key] = tuple(
                cut for blk in pieces for cut in self._cut(blk, q_doc, k_doc) if cut.pairs()
            )
        return self._blocks[key]

    def _cut(self, blk: Block, q_doc: torch.Tensor, k_doc: torch.Tensor):
        """``blk``'s pairs whose query and key share a document, as causal and dense blocks."""
        q_runs, k_runs = self._runs(q_doc, blk.q), self._runs(k_doc, blk.k)
        for doc in sorted(q_runs.keys() & k_runs.keys()):
            (qa, qb), (ka, kb) = q_runs[doc], k_runs[doc]
            if not blk.causal:
                yield Block(slice(qa, qb), slice(ka, kb), False)
                continue
            # In blk, query row i sees key column j iff j <= i, so query qa sees the keys before ka + shift.
            shift = (qa - blk.q.start) - (ka - blk.k.start)
            if shift > 0:  # keys every query of the document sees, then the triangle after them
                yield Block(slice(qa, qb), slice(ka, min(kb, ka + shift)), False)
                yield Block(slice(qa, qb), slice(ka + shift, kb), True)
            else:  # the first -shift queries see none of these keys
                yield Block(slice(qa - shift, qb), slice(ka, kb), True)

    def last_step(self, world_size, causal, local_len=None):
        if (world_size, causal) not in self._last_steps:
            self._last_steps[world_size, causal] = self._last_step(world_size, causal)
        return self._last_steps[world_size, causal]

    def _last_step(self, world_size: int, causal: bool) -> int:
        """Rank r computes against rank s iff they share a document and, causally, one of its keys on s is not
        after one of its queries on r: per rank and document, the first and last position held decide."""
        seq_len, bounds = self.cu_seqlens[-1], torch.tensor(self.cu_seqlens)
        first, last = [], []
        for r in range(world_size):
            pos = self.positions(seq_len, r, world_size)
            doc = torch.searchsorted(bounds, pos, right=True)
            first.append(torch.full((len(bounds) + 1,), seq_len).scatter_reduce(0, doc, pos, "amin"))
            last.append(torch.full((len(bounds) + 1,), -1).scatter_reduce(0, doc, pos, "amax"))
        for step in range(world_size - 1, 0, -1):
            for r in range(world_size):
                s = (r - step) % world_size
                shared = (first[r] <= last[r]) & (first[s] <= last[s])
                if (shared & (first[s] <= last[r]) if causal else shared).any():
                    return step
        return 0

    def _documents_of(self, pos: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        """The document of each local token at global positions ``pos``, checked: a document's tokens are in
        position order."""
        doc = torch.searchsorted(bounds, pos, right=True)
        if ((doc[1:] == doc[:-1]) & (pos[1:] <= pos[:-1])).any():
            raise ValueError(f"layout {self.name!r} does not keep a document's positions in order, so its pieces "
                             "cannot be cut at documents")
        return doc

    def _runs(self, doc: torch.Tensor, s: slice) -> dict[int, tuple[int, int]]:
        """document -> (start, stop) of its local indices within ``s``, where each document must be one run."""
        docs, counts = torch.unique_consecutive(doc[s], return_counts=True)
        if len(set(docs.tolist())) < len(docs):
            raise ValueError(f"layout {self.name!r} splits a document's tokens within a piece, so its pieces "
                             "cannot be cut at documents")
        stops = counts.cumsum(0) + s.start
        return dict(zip(docs.tolist(), zip((stops - counts).tolist(), stops.tolist())))

    def __repr__(self) -> str:
        return f"Documents({self.inner!r}, cu_seqlens={list(self.cu_seqlens)})"


class DocumentsPerRow(Packed):
    """Packed documents that differ between the rows of the batch: ``rows[b]`` are row b's offsets (as
    :class:`Documents` takes them). Each run of rows with the same offsets computes its Documents' pieces, on
    those rows only (:attr:`Block.rows`): the ring engine and the kernels are unchanged."""

    def __init__(self, layout: str | Layout, rows: Sequence[Sequence[int] | torch.Tensor]):
        super().__init__(layout, tuple(_offsets(r) for r in rows))
        starts = [b for b in range(len(self.cu_seqlens)) if b == 0 or self.cu_seqlens[b] != self.cu_seqlens[b - 1]]
        self._runs = [(slice(a, b), Documents.of(self.inner, self.cu_seqlens[a]))
                      for a, b in zip(starts, [*starts[1:], len(self.cu_seqlens)])]

    def check(self, seq_len, world_size):
        for _, documents in self._runs:
            documents.check(seq_len, world_size)

    def last_step(self, world_size, causal, local_len=None):
        return max(documents.last_step(world_size, causal) for _, documents in self._runs)

    def blocks(self, q_rank, kv_rank, local_len, world_size, causal):
        key = (q_rank, kv_rank, local_len, world_size, causal)
        if key not in self._blocks:
            self._blocks[key] = tuple(
                replace(blk, rows=rows)
                for rows, documents in self._runs for blk in documents.blocks(*key)
            )
        return self._blocks[key]

    def __repr__(self) -> str:
        return f"DocumentsPerRow({self.inner!r}, rows={[list(r) for r in self.cu_seqlens]})"


class DocumentOrder(Contiguous):
    """Contiguous over the packed documents in another order: ``order`` lists the documents of ``cu_seqlens``
    (indices), and rank r holds the r-th of N equal shares of them laid end to end. A document's tokens stay
    together and in order, so under its documents' masks (:class:`Documents`) the pieces are contiguous's.
    :func:`balance_documents` chooses the order."""

    name = "balanced"

    def __init__(self, cu_seqlens: Sequence[int], order: Sequence[int]):
        self.cu_seqlens, self.order = _offsets(cu_seqlens), tuple(order)
        if sorted(self.order) != list(range(len(self.cu_seqlens) - 1)):
            raise ValueError(f"order must list each of the {len(self.cu_seqlens) - 1} documents once")
        bounds = self.cu_seqlens
        self._positions = torch.cat([torch.arange(bounds[d], bounds[d + 1]) for d in self.order])
        self._repr = f"DocumentOrder(order={list(self.order)})"  # what the ranks compare (ring_attention)

    def check(self, seq_len, world_size):
        super().check(seq_len, world_size)
        if seq_len != self.cu_seqlens[-1]:
            raise ValueError(f"layout {self.name!r} orders the documents of {self.cu_seqlens[-1]} tokens, not of "
                             f"{seq_len}")

    def positions(self, seq_len, rank, world_size):
        self.check(seq_len, world_size)
        c = seq_len // world_size
        return self._positions[rank * c:(rank + 1) * c].clone()

    def __repr__(self) -> str:
        return self._repr


# ----------------------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------------------


class Windowed(Layout):
    """Sliding-window causal attention over any layout: the query at global position p sees the keys at
    positions p - window + 1 ... p (Mistral's, Gemma's and GPT-OSS's local layers; flash-attn's
    ``window_size=(window - 1, 0)``). Tokens sit where ``layout`` puts them (packed documents too); each of its
    pieces is cut to the band its queries see, through the global positions, which run in arithmetic steps
    in every layout here (stride 1, or N for striped). Ring steps with no piece on any rank are left out
    (:meth:`last_step`): a contiguous ring under a window of at most one share stops after one step."""

    def __init__(self, layout: str | Layout, window: int):
        if isinstance(layout, Windowed):
            raise ValueError("a layout takes one sliding window")
        _check_window(window)
        self.inner, self.window = get_layout(layout), window
        self.name = self.inner.name
        self._blocks: dict[tuple, tuple[Block, ...]] = {}
        self._last_steps: dict[tuple, int] = {}

    def divisor(self, world_size):
        return self.inner.divisor(world_size)

    def check(self, seq_len, world_size):
        self.inner.check(seq_len, world_size)

    def positions(self, seq_len, rank, world_size):
        return self.inner.positions(seq_len, rank, world_size)

    def blocks(self, q_rank, kv_rank, local_len, world_size, causal):
        if not causal:
            raise ValueError("a sliding window needs causal attention")
        key = (q_rank, kv_rank, local_len, world_size)
        if key not in self._blocks:
            seq_len = local_len * world_size
            q_pos, k_pos = (self.positions(seq_len, r, world_size) for r in (q_rank, kv_rank))
            q_runs, k_runs = _arithmetic_runs(q_pos), _arithmetic_runs(k_pos)
            pieces = self.inner.blocks(q_rank, kv_rank, local_len, world_size, True)
            self._blocks[key] = tuple(cut for blk in pieces for cut in self._cut(blk, q_pos, k_pos, q_runs, k_runs))
        return self._blocks[key]

    def _cut(self, blk: Block, q_pos, k_pos, q_runs, k_runs):
        """``blk``'s pairs within the window: per run of its queries and of its keys, the band of ``i - j``."""
        for qa, qb, q_step in _runs_within(q_runs, blk.q):
            for ka, kb, k_step in _runs_within(k_runs, blk.k):
                step = q_step if qb - qa > 1 else k_step
                if kb - ka > 1 and qb - qa > 1 and q_step != k_step:
                    raise ValueError(f"layout {self.name!r} holds queries and keys at different strides, which a "
                                     "sliding window cannot cut")
                # global distance of (qa + i, ka + j): q_pos[qa] - k_pos[ka] + step * (i - j), kept below window
                gap = int(q_pos[qa]) - int(k_pos[ka])
                highest = (self.window - 1 - gap) // step
                lowest = (ka - blk.k.start) - (qa - blk.q.start) if blk.causal else None
                yield from band(slice(qa, qb), slice(ka, kb), lowest, highest, blk.rows)

    def last_step(self, world_size: int, causal: bool, local_len: int) -> int:
        """The last ring step at which some rank has a windowed piece (found from the pieces)."""
        key = (world_size, local_len)
        if key not in self._last_steps:
            self._last_steps[key] = next(
                (step for step in range(world_size - 1, 0, -1)
                 if any(self.blocks(r, (r - step) % world_size, local_len, world_size, causal)
                        for r in range(world_size))), 0)
        return self._last_steps[key]

    def __repr__(self) -> str:
        return f"Windowed({self.inner!r}, window={self.window})"


def with_window(layout: Layout, window: int | None, seq_len: int) -> Layout:
    """``layout`` under a sliding window of ``window`` tokens; ``layout`` itself for None or a window of the
    whole sequence (``seq_len`` tokens or more)."""
    if window is None:
        return layout
    _check_window(window)
    return layout if window >= seq_len else _windowed(layout, window)


@functools.lru_cache(maxsize=64)
def _windowed(layout: Layout, window: int) -> Windowed:
    """One Windowed per (layout, window): a model's layers share the pieces cut once (layouts with documents
    are shared per set of documents, see Documents.of)."""
    return Windowed(layout, window)


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")


def _arithmetic_runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, stop, step): the local indices cut into runs whose global positions rise by one step (> 0)."""
    n, diff = len(pos), pos.diff()
    changes = (torch.nonzero(diff[1:] != diff[:-1]).flatten() + 1).tolist()
    runs, start = [], 0
    while start < n:
        if start == n - 1 or diff[start] <= 0:  # a run of one (its step is never used)
            runs.append((start, start + 1, 1))
            start += 1
            continue
        stop = next((c for c in changes if c > start), n - 1) + 1  # diff[start:stop - 1] all the same
        runs.append((start, stop, int(diff[start])))
        start = stop
    return runs


def _runs_within(runs: list[tuple[int, int, int]], s: slice):
    for a, b, step in runs:
        if max(a, s.start) < min(b, s.stop):
            yield max(a, s.start), min(b, s.stop), step


def balance_documents(cu_seqlens: Sequence[int] | torch.Tensor, world_size: int, *, seed: int = 0,
                      tries: int | None = None) -> Documents:
    """A layout for the packed documents ``cu_seqlens`` (one set for every row, as ring_attention takes them)
    on ``world_size`` ranks: contiguous shares of the documents put in an order that balances the ranks'
    (query, key) pairs at each ring step. Short documents stay whole on a rank, where striped cuts every
    document into a small piece on every rank at every step (which costs kernel calls and merges on a GPU).
    Long documents (many ranks' shares) still cost what they cost contiguous; striped balances those.

    The order shortens the critical path, the sum over steps of the busiest rank's pairs: from the largest
    documents dealt to the least loaded rank (or the given order, if better), swaps of two documents that
    shorten it are kept; ``tries`` swaps (default 50 per document, at most 400,000 / documents, at least 200),
    drawn with ``seed``, so every rank computes the same order. Pass the result as ``layout`` to
    :func:`shard`, :func:`positions` and ``ring_attention`` (no ``cu_seqlens`` needed: it holds them).
    """
    if _rows_of_offsets(cu_seqlens) is not None:
        raise ValueError("balance_documents orders one set of documents for every row of the batch; rows with "
                         "documents of their own would each need their own order")
    return _balanced_layout(_offsets(cu_seqlens), world_size, seed, tries)


@functools.lru_cache(maxsize=16)
def _balanced_layout(offsets: tuple[int, ...], world_size: int, seed: int, tries: int | None) -> Documents:
    """balance_documents' layout, searched once per set of documents (up to 0.1 s) however often a batch's
    layout is asked for: every step's, every validation batch's, every layer's."""
    Contiguous().check(offsets[-1], world_size)
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if tries is None:
        tries = max(200, min(50 * len(lengths), 400_000 // max(len(lengths), 1)))
    order = _balanced_order(lengths, offsets[-1] // world_size, world_size, random.Random(seed), tries)
    return Documents(DocumentOrder(offsets, order), offsets)


def _balanced_order(lengths: list[int], share: int, world_size: int, rng: random.Random, tries: int) -> list[int]:
    """Document indices in the order balance_documents lays them out (see there)."""
    cost = lambda order: _critical_pairs([lengths[d] for d in order], share, world_size)  # noqa: E731
    load, ranks = [0] * world_size, [[] for _ in range(world_size)]
    for d in sorted(range(len(lengths)), key=lambda d: -lengths[d]):
        r = min(range(world_size), key=lambda r: load[r])
        ranks[r].append(d)
        load[r] += lengths[d] * (lengths[d] + 1) // 2
    order = min([d for rank in ranks for d in rank], list(range(len(lengths))), key=cost)
    best = cost(order)
    for _ in range(tries):
        i, j = rng.randrange(len(order)), rng.randrange(len(order))
        if lengths[order[i]] == lengths[order[j]]:
            continue
        order[i], order[j] = order[j], order[i]
        tried = cost(order)
        if tried <= best:
            best = tried
        else:
            order[i], order[j] = order[j], order[i]
    return order


BALANCED = DocumentOrder.name


def for_documents(name: str, cu_seqlens, world_size: int) -> str | Layout:
    """The layout to shard with (and ring_attention's) for the layout named ``name`` (one of LAYOUTS or
    ``"balanced"``) and packed documents ``cu_seqlens``, in any form ring_attention takes them (None: one
    sequence). For "balanced": :func:`balance_documents`' order of the documents, which every row must share;
    one document or none is laid as contiguous lays it."""
    if name != BALANCED:
        get_layout(name)
        return name
    rows = None if cu_seqlens is None else _rows_of_offsets(cu_seqlens) or (_offsets(cu_seqlens),)
    if rows is not None and any(row != rows[0] for row in rows):
        raise ValueError(f"layout {BALANCED!r} orders one set of documents for every row, but the rows hold "
                         "different documents: pack the same documents in every row, or use striped")
    return "contiguous" if rows is None or len(rows[0]) <= 2 else balance_documents(rows[0], world_size)


def cut_at_documents(name: str, cu_seqlens: Sequence[int] | None, world_size: int) -> Layout:
    """The layout named ``name`` (as :func:`for_documents` takes it) with its pieces cut at the documents
    ``cu_seqlens`` (None: one sequence), as ring_attention computes them."""
    layout = get_layout(for_documents(name, cu_seqlens, world_size))
    return layout if cu_seqlens is None or isinstance(layout, Packed) else Documents(layout, cu_seqlens)


def _critical_pairs(lengths: list[int], share: int, world_size: int) -> int:
    """Sum over ring steps of the busiest rank's (query, key) pairs: documents of ``lengths`` laid end to end,
    ``share`` tokens per rank, causal within each document (contiguous: step s pairs rank r with r - s)."""
    steps = [[0] * world_size for _ in range(world_size)]
    start = 0
    for n in lengths:
        end = start + n
        first, last = start // share, (end - 1) // share
        if n and first == last:  # most documents: whole on one rank, its triangle at step 0
            steps[0][first] += n * (n + 1) // 2
        elif n:
            parts = [(r, min(end, (r + 1) * share) - max(start, r * share)) for r in range(first, last + 1)]
            for i, (r, part) in enumerate(parts):
                steps[0][r] += part * (part + 1) // 2
                for earlier, before in parts[:i]:
                    steps[r - earlier][r] += part * before
        start = end
    return sum(map(max, steps))


@functools.lru_cache(maxsize=16)
def _shared_documents(layout: Layout, offsets: tuple[int, ...]) -> Documents:
    return Documents(layout, offsets)


@functools.lru_cache(maxsize=16)
def _shared_rows(layout: Layout, rows: tuple[tuple[int, ...], ...]) -> DocumentsPerRow:
    return DocumentsPerRow(layout, rows)


def _rows_of_offsets(cu_seqlens) -> tuple[tuple[int, ...], ...] | None:
    """One offsets tuple per row if ``cu_seqlens`` holds one list per row (a 2-D tensor, or a sequence of
    sequences or 1-D tensors), checked; None if it is one list of offsets."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 2:
            return None
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex():
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        return tuple(_offsets(row) for row in cu_seqlens.tolist())  # one copy from the device, not one per row
    if isinstance(cu_seqlens, Sequence) and not isinstance(cu_seqlens, (str, bytes)) and len(cu_seqlens):
        if isinstance(cu_seqlens[0], (Sequence, torch.Tensor)) and not isinstance(cu_seqlens[0], (str, bytes)):
            return tuple(_offsets(row) for row in cu_seqlens)
    return None


def offsets_tensor(rows: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Packed documents' offsets as ring_attention takes them in a tensor: one list (or rows all alike) as a
    1-D int32 tensor; rows with documents of their own as (batch, most offsets), each row padded with the
    sequence length (empty documents at the end)."""
    rows = [list(row) for row in rows]
    if all(row == rows[0] for row in rows):
        return torch.tensor(rows[0], dtype=torch.int32, device=device)
    width = max(map(len, rows))
    return torch.tensor([row + row[-1:] * (width - len(row)) for row in rows], dtype=torch.int32, device=device)


def _offsets(cu_seqlens) -> tuple[int, ...]:
    """``cu_seqlens`` as a tuple of ints, checked: 0 first, never decreasing."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape "
                             f"{tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.tolist()
    if isinstance(cu_seqlens, (str, bytes)) or not isinstance(cu_seqlens, Sequence):
        raise ValueError(f"cu_seqlens must be a sequence of ints, got {type(cu_seqlens).__name__}")
    offsets = tuple(cu_seqlens)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets):
        raise ValueError("cu_seqlens must hold ints")
    if len(offsets) < 2 or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        shown = list(offsets) if len(offsets) <= 8 else [*offsets[:8], "..."]
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, e.g. [0, 300, 1024]; got {shown}")
    return offsets


# ----------------------------------------------------------------------------------------------------------
# Sharding: the full sequence <-> this rank's tokens
# ----------------------------------------------------------------------------------------------------------


def _group_rank_size(group) -> tuple[int, int]:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def positions(seq_len: int, *, layout: str | Layout, rank: int, world_size: int) -> torch.Tensor:
    """LongTensor (seq_len // world_size,): the global positions ``rank`` holds, in local order (for RoPE)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} rank(s)")
    return get_layout(layout).positions(seq_len, rank, world_size)


def shard(x: torch.Tensor, *, layout: str | Layout, dim: int, group=None) -> torch.Tensor:
    """This rank's tokens of the full-sequence tensor ``x`` along ``dim``, in the layout's local order."""
    rank, size = _group_rank_size(group)
    index = positions(x.shape[dim], layout=layout, rank=rank, world_size=size).to(x.device)
    return x.index_select(dim, index)


def unshard(x_local: torch.Tensor, *, layout: str | Layout, dim: int, group=None) -> torch.Tensor:
    """The whole sequence in original order, on every rank, from each rank's ``x_local`` along ``dim``.

    Differentiable: the gradient of ``x_local`` is the sum over ranks of the gradient of their result.
    """
    rank, size = _group_rank_size(group)
    gathered = x_local if size == 1 else _GatherSequence.apply(x_local, dim % x_local.dim(), group)
    order = torch.cat([positions(gathered.shape[dim], layout=layout, rank=r, world_size=size) for r in range(size)])
    if size == 1 and torch.equal(order, torch.arange(order.numel())):  # one rank in sequence order: as it is
        return x_local
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


class _GatherSequence(torch.autograd.Function):
    """Concatenate every rank's tensor along ``dim`` in rank order; backward sums and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.local = dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local), None, None
