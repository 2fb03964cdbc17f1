import pytest
import torch

from striped_attention import LAYOUTS, get_layout, positions, shard, unshard
from striped_attention.layouts import Block


def brute_force_mask(layout, q_rank, kv_rank, c, n):
    """(c, c) bool: which (local query, local key) pairs the causal mask keeps, from positions alone."""
    pq = layout.positions(c * n, q_rank, n)
    pk = layout.positions(c * n, kv_rank, n)
    return pq[:, None] >= pk[None, :]


def covered(blocks, c):
    """(c, c) int: how many blocks compute each pair."""
    count = torch.zeros(c, c, dtype=torch.int64)
    for b in blocks:
        piece = torch.ones(b.q.stop - b.q.start, b.k.stop - b.k.start, dtype=torch.int64)
        if b.causal:
            piece = piece.tril()
        count[b.q, b.k] += piece
    return count


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_blocks_cover_the_causal_mask_exactly_once(name, n):
    layout = LAYOUTS[name]
    for c in (2, 4, 6):
        for r in range(n):
            for s in range(n):
                blocks = layout.blocks(r, s, c, n, causal=True)
                want = brute_force_mask(layout, r, s, c, n).long()
                assert torch.equal(covered(blocks, c), want), (name, n, c, r, s, blocks)
                assert sum(b.pairs() for b in blocks) == int(want.sum())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_noncausal_is_one_dense_block(name):
    assert LAYOUTS[name].blocks(0, 1, 8, 2, causal=False) == (Block(slice(0, 8), slice(0, 8), False),)


def test_striped_and_zigzag_balance_every_step_contiguous_does_not():
    n, c = 4, 8
    for name, balanced in (("striped", True), ("zigzag", True), ("contiguous", False)):
        layout = LAYOUTS[name]
        for step in range(1, n):
            work = [sum(b.pairs() for b in layout.blocks(r, (r - step) % n, c, n, True)) for r in range(n)]
            spread = max(work) - min(work)
            assert (spread <= c) == balanced, (name, step, work)


def test_striped_pairs_are_triangles():
    layout = LAYOUTS["striped"]
    assert [b.pairs() for b in layout.blocks(1, 1, 8, 4, True)] == [36]  # with the diagonal
    assert [b.pairs() for b in layout.blocks(1, 2, 8, 4, True)] == [28]  # strictly below it
    assert layout.blocks(0, 1, 1, 2, True) == ()  # one token per rank: nothing to compute


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_positions_partition_the_sequence(name, n):
    seq = 8 * n
    everything = torch.cat([positions(seq, layout=name, rank=r, world_size=n) for r in range(n)])
    assert torch.equal(everything.sort().values, torch.arange(seq))


def test_positions_values():
    assert positions(8, layout="striped", rank=1, world_size=4).tolist() == [1, 5]
    assert positions(8, layout="contiguous", rank=1, world_size=4).tolist() == [2, 3]
    assert positions(8, layout="zigzag", rank=1, world_size=2).tolist() == [2, 3, 4, 5]
    assert positions(8, layout="zigzag", rank=0, world_size=2).tolist() == [0, 1, 6, 7]


@pytest.mark.parametrize(
    "layout, seq, n, needed",
    [("striped", 7, 2, "multiple of 2"), ("contiguous", 10, 4, "multiple of 4"), ("zigzag", 6, 2, "multiple of 4")],
)
def test_indivisible_length_is_a_clear_error(layout, seq, n, needed):
    with pytest.raises(ValueError, match=needed):
        positions(seq, layout=layout, rank=0, world_size=n)


def test_unknown_layout_and_bad_rank():
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        get_layout("ring")
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        positions(8, layout="striped", rank=2, world_size=2)


def test_single_process_shard_unshard_round_trip():
    x = torch.randn(2, 3, 8, 4)
    for name in LAYOUTS:
        local = shard(x, layout=name, dim=2)
        assert torch.equal(unshard(local, layout=name, dim=2), x)
