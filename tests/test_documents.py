"""Packed documents: every layout's pieces cut at the documents' boundaries, exactly and in balance.

The numeric checks on 1 to 4 ranks against float64 attention with a document mask are cases of test_ring.py.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from ranks import document_mask, error_of, full_inputs, reference, relative_error, sharded_run
from striped_attention import LAYOUTS, Block, Layout, balance_documents, positions, ring_attention
from striped_attention.layouts import Documents, DocumentsPerRow
from striped_attention.plan import document_step_pairs


def _random_documents(rng: random.Random, seq: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, seq), k=min(seq - 1, rng.randint(0, 6)))) if seq > 1 else []
    if cuts and rng.random() < 0.2:
        cuts.append(cuts[0])  # an empty document
    return [0, *sorted(cuts), seq]


def _covered(blocks, c: int) -> torch.Tensor:
    """(c, c) int: how many of the blocks compute each (query, key) pair."""
    count = torch.zeros(c, c, dtype=torch.int)
    for b in blocks:
        ones = torch.ones(b.q.stop - b.q.start, b.k.stop - b.k.start, dtype=torch.int)
        count[b.q, b.k] += ones.tril() if b.causal else ones
    return count


def test_pieces_compute_each_pair_of_a_document_once_and_nothing_else():
    rng = random.Random(0)
    for _ in range(200):
        world, name, causal = rng.randint(1, 4), rng.choice(sorted(LAYOUTS)), rng.random() < 0.7
        seq = LAYOUTS[name].divisor(world) * rng.randint(1, 12)
        cu_seqlens = _random_documents(rng, seq)
        layout, mask, c = Documents(name, cu_seqlens), document_mask(cu_seqlens, seq, causal), seq // world
        for r in range(world):
            for s in range(world):
                want = mask[layout.positions(seq, r, world)][:, layout.positions(seq, s, world)]
                got = _covered(layout.blocks(r, s, c, world, causal), c)
                assert torch.equal(got, want.int()), (name, world, cu_seqlens, r, s, causal)


def test_rows_with_their_own_documents_compute_their_own_pieces():
    """Per-row offsets: each row's pieces are its own documents' (as the 200 packings above check them), on
    that row only; rows alike share pieces."""
    rows = ((0, 3, 16), (0, 3, 16), (0, 9, 9, 16), (0, 3, 16))
    layout = Documents.of("striped", [list(r) for r in rows], batch=4)
    assert isinstance(layout, DocumentsPerRow) and Documents.of("striped", torch.tensor(rows[:2])).cu_seqlens == rows[0]
    for r, s in ((0, 0), (0, 1), (1, 0)):
        blocks = layout.blocks(r, s, 8, 2, True)
        for row_slice, offsets in ((slice(0, 2), rows[0]), (slice(2, 3), rows[2]), (slice(3, 4), rows[3])):
            mine = [b for b in blocks if b.rows == row_slice]
            assert mine and mine == [replace(b, rows=row_slice) for b in Documents(
                "striped", offsets).blocks(r, s, 8, 2, True)]
        assert len(blocks) == sum(len(Documents("striped", rows[b]).blocks(r, s, 8, 2, True)) for b in (0, 2, 3))


def test_striped_keeps_ranks_balanced_whatever_the_documents():
    """The ring's time is the sum over steps of its slowest rank: striped stays within 1% of perfect balance."""
    rng = random.Random(1)
    seq, world = 16384, 4
    cu_seqlens = [0, *sorted(rng.sample(range(1, seq), 11)), seq]
    slowdown = {}
    for name in LAYOUTS:
        steps = document_step_pairs(name, cu_seqlens, world)
        slowdown[name] = sum(max(s) for s in steps) / (sum(map(sum, steps)) / world)
    assert slowdown["striped"] < 1.01, slowdown
    assert min(slowdown["zigzag"], slowdown["contiguous"]) > 1.2, slowdown  # 1.93 and 1.34 here


def test_one_rank_matches_float64_attention_within_documents():
    q, k, v, dout = full_inputs(0, 2, 4, 2, 40, 16)
    for causal in (True, False):
        want = reference(q, k, v, dout, causal, None, [0, 1, 13, 13, 40])
        got = sharded_run("striped", torch.float64, q, k, v, dout, causal=causal, cu_seqlens=torch.tensor([0, 1, 13, 13, 40]))
        assert max(relative_error(g, w) for g, w in zip(got, want)) < 1e-12


def test_one_document_is_plain_causal_attention():
    q, k, v = (torch.randn(1, 2, 32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert torch.equal(ring_attention(q, k, v, cu_seqlens=[0, 32]), ring_attention(q, k, v))


BAD = {
    "not from 0": ([1, 8], "must start at 0 and never decrease"),
    "decreasing": ([0, 5, 3, 8], "must start at 0 and never decrease"),
    "too short": ([8], "must start at 0 and never decrease"),
    "wrong end": ([0, 4], "cu_seqlens end at 4, but the sequence has 8 tokens"),
    "float tensor": (torch.tensor([0.0, 8.0]), "1-D integer tensor"),
    "3-D tensor": (torch.tensor([[[0, 8]]]), "1-D integer tensor"),
    "a row too many": ([[0, 8], [0, 8]], "cu_seqlens has offsets for 2 rows, but the batch has 1"),
    "a bad row": ([[0, 9, 8]], "must start at 0 and never decrease"),
    "float rows": (torch.tensor([[0.0, 8.0]]), "must be an integer tensor"),
    "floats": ([0, 8.0], "must hold ints"),
    "a string": ("0,8", "a sequence of ints"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_cu_seqlens_are_a_value_error(name):
    cu_seqlens, message = BAD[name]
    q = torch.randn(1, 2, 8, 4)
    error = error_of(lambda: ring_attention(q, q, q, cu_seqlens=cu_seqlens))
    assert error is not None and message in error


class _Reversed(Layout):
    """One rank holding the sequence backwards: its pieces are not in position order."""

    name = "reversed"

    def positions(self, seq_len, rank, world_size):
        return torch.arange(seq_len).flip(0)

    def causal_blocks(self, q_rank, kv_rank, c, n):
        return ()

    def blocks(self, q_rank, kv_rank, local_len, world_size, causal):
        return (Block(slice(0, local_len), slice(0, local_len), False),)


def test_a_layout_out_of_position_order_within_a_document_cannot_be_cut():
    error = error_of(lambda: Documents(_Reversed(), [0, 3, 8]).blocks(0, 0, 8, 1, False))
    assert error is not None and "does not keep a document's positions in order" in error


def test_layers_with_the_same_documents_share_their_cut_pieces():
    shared = Documents.of("striped", [0, 5, 16])
    assert Documents.of(LAYOUTS["striped"], torch.tensor([0, 5, 16])) is shared
    assert Documents.of("zigzag", [0, 5, 16]) is not shared and Documents.of("striped", [0, 6, 16]) is not shared
    assert shared.blocks(0, 1, 8, 2, True) is shared.blocks(0, 1, 8, 2, True)  # cut once, then reused


def test_a_document_split_within_a_piece_cannot_be_cut():
    """Documents cut a piece by runs of documents: a document in two runs of one piece is a ValueError."""

    class Interleaved(_Reversed):
        def positions(self, seq_len, rank, world_size):
            return torch.tensor([0, 3, 1, 4, 2, 5, 6, 7])  # documents [0, 3) and [3, 8) interleaved, each in order

    error = error_of(lambda: Documents(Interleaved(), [0, 3, 8]).blocks(0, 0, 8, 1, False))
    assert error is not None and "splits a document's tokens within a piece" in error


# ----------------------------------------------------------------------------------------------------------
# Balanced documents: contiguous shares of the documents in another order
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, seq, documents, seed", [(8, 16384, 64, 0), (8, 131072, 64, 1), (4, 4096, 24, 2),
                                                         (2, 8192, 16, 0), (3, 96, 7, 3)])
def test_balanced_documents_shorten_the_critical_path(world, seq, documents, seed):
    """The order keeps each document together and in order, every token once; its critical path (the sum over
    steps of the busiest rank's pairs, counted from the pieces the ring computes) is never longer than the
    documents packed as given (contiguous) and here shorter; and every rank computes the same order."""
    from striped_attention.bench import random_documents
    from striped_attention.layouts import DocumentOrder, _critical_pairs

    cu_seqlens = random_documents(seq, documents, seed)
    layout = balance_documents(cu_seqlens, world)
    assert isinstance(layout.inner, DocumentOrder) and layout.cu_seqlens == tuple(cu_seqlens)
    held = torch.cat([positions(seq, layout=layout, rank=r, world_size=world) for r in range(world)])
    assert torch.equal(held.sort().values, torch.arange(seq))
    assert held.tolist() == [t for d in layout.inner.order for t in range(cu_seqlens[d], cu_seqlens[d + 1])]
    critical = {name: sum(map(max, document_step_pairs(name, cu_seqlens, world)))
                for name in ("contiguous", "balanced")}
    lengths = [cu_seqlens[d + 1] - cu_seqlens[d] for d in layout.inner.order]
    assert critical["balanced"] == _critical_pairs(lengths, seq // world, world)  # the search's count is the ring's
    assert critical["balanced"] < critical["contiguous"], critical
    assert balance_documents(cu_seqlens, world).inner.order == layout.inner.order


def test_balanced_documents_bad_input_is_a_value_error():
    q = torch.randn(1, 2, 8, 4)
    layout = balance_documents([0, 3, 8], 1)
    cases = {
        "other documents": (lambda: ring_attention(q, q, q, layout=layout, cu_seqlens=[0, 4, 8]),
                            "holds other documents"),
        "rows": (lambda: balance_documents([[0, 3, 8], [0, 8]], 2), "one set of documents for every row"),
        "length": (lambda: balance_documents([0, 3, 7], 2), "positive multiple of 2"),
        "other sequence": (lambda: ring_attention(torch.randn(1, 2, 16, 4), *[torch.randn(1, 2, 16, 4)] * 2,
                                                  layout=layout), "orders the documents of 8 tokens, not of 16"),
    }
    for name, (fn, message) in cases.items():
        error = error_of(fn)
        assert error is not None and message in error, (name, error)
    same = ring_attention(q, q, q, layout=layout, cu_seqlens=[0, 3, 8])  # its own documents again: accepted
    assert torch.equal(ring_attention(q, q, q, layout=layout), same)


def test_the_ring_stops_after_the_last_step_with_a_piece():
    """last_step is the last ring step at which some rank has a piece (the K/V travel no further): checked
    against every rank's pieces for random packings, every layout, causal or not."""
    from striped_attention.ring import last_step

    rng = random.Random(2)
    for _ in range(150):
        world, name, causal = rng.randint(1, 5), rng.choice([*sorted(LAYOUTS), "balanced"]), rng.random() < 0.7
        seq = LAYOUTS.get(name, LAYOUTS["contiguous"]).divisor(world) * rng.randint(1, 10)
        cu_seqlens = _random_documents(rng, seq)
        layout = balance_documents(cu_seqlens, world) if name == "balanced" else Documents(name, cu_seqlens)
        c = seq // world
        want = max((s for s in range(world) for r in range(world)
                    if layout.blocks(r, (r - s) % world, c, world, causal)), default=0)
        assert last_step(layout, world, causal, c) == want, (name, world, cu_seqlens, causal)
    assert last_step(Documents("contiguous", [0, 4, 8, 12, 16]), 4, True, 4) == 0  # a document per rank: no ring
    assert last_step(LAYOUTS["contiguous"], 4, True, 4) == 3
