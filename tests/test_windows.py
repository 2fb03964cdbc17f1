"""Sliding-window attention: the pieces each layout cuts, the kernels' bands, and the ring on 2 and 3 gloo ranks
against float64 attention on the whole sequence under the window's mask."""

from __future__ import annotations

import pytest
import torch

from ranks import cached, document_mask, error_of, full_inputs, relative_error, run_ranks, sharded_run
from striped_attention import LAYOUTS, balance_documents, kernels, ring_attention
from striped_attention.layouts import Documents, Windowed, for_documents
from striped_attention.ring import last_step

DOCUMENTS = (0, 5, 17, 18, 40, 48)
DOCUMENTS_PER_ROW = (DOCUMENTS, (0, 30, 48))


def window_mask(seq: int, window: int, cu_seqlens=None) -> torch.Tensor:
    """(seq, seq) bool, (batch, 1, seq, seq) for offsets per row: query i sees key j iff 0 <= i - j < window
    (and both are in one document)."""
    distance = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]
    causal = distance >= 0 if cu_seqlens is None else document_mask(cu_seqlens, seq, causal=True)
    return causal & (distance < window)


def windowed_reference(q, k, v, dout, window, cu_seqlens=None):
    """float64 attention on the whole sequence under the window (and documents: one set, or one per row):
    (out, dq, dk, dv)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = window_mask(q.shape[2], window, cu_seqlens)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def error(got: torch.Tensor, want: torch.Tensor, dout: torch.Tensor) -> float:
    """Relative error; where the exact value is 0 (dq under a window of 1: each query sees itself alone), the
    size of what was computed, relative to the output gradient's."""
    if want.norm() > 1e-10 * dout.norm():
        return relative_error(got, want)
    return (got.double().norm() / dout.double().norm()).item()


# ----------------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------------


def _seen(blk, i: int, j: int) -> bool:
    di, dj = i - blk.q.start, j - blk.k.start
    return (not blk.causal or dj <= di) and (blk.window is None or di - dj < blk.window)


def _layout(name: str, cu_seqlens, world: int):
    if name == "balanced":
        return balance_documents(cu_seqlens, world)
    return Documents(name, cu_seqlens) if cu_seqlens else LAYOUTS[name]


@pytest.mark.parametrize("name", [*sorted(LAYOUTS), "balanced"])
@pytest.mark.parametrize("documents", [None, (0, 5, 6, 17, 24)], ids=["one-document", "documents"])
def test_pieces_hold_each_pair_in_the_window_once_and_nothing_else(name, documents):
    """Every rank pair, 1 to 4 ranks, windows from 1 token to the whole sequence: the windowed pieces hold
    exactly the (query, key) pairs within the window (and a document), each once; every query of a piece sees
    one of its keys (the kernels' precondition); Block.pairs counts them."""
    seq = 24
    if name == "balanced" and documents is None:
        return
    for world in (1, 2, 3, 4):
        for window in (1, 2, 3, 5, 7, 8, 13, 24):
            layout = Windowed(_layout(name, documents, world), window)
            want = window_mask(seq, window, documents)
            for r in range(world):
                q_pos = layout.positions(seq, r, world)
                for s in range(world):
                    k_pos = layout.positions(seq, s, world)
                    seen = torch.zeros(seq // world, seq // world, dtype=torch.int64)
                    for blk in layout.blocks(r, s, seq // world, world, True):
                        pairs = torch.tensor([[_seen(blk, i, j) for j in range(blk.k.start, blk.k.stop)]
                                              for i in range(blk.q.start, blk.q.stop)])
                        assert pairs.any(1).all(), (blk, "a query that sees none of the piece's keys")
                        assert int(pairs.sum()) == blk.pairs(), blk
                        seen[blk.q, blk.k] += pairs.long()
                    assert torch.equal(seen, want[q_pos][:, k_pos].long()), (name, world, window, r, s)


def test_the_ring_stops_where_the_window_ends():
    """last_step: the last step at which some rank has a windowed piece (checked against every rank's pieces);
    contiguous shares under a window of at most one share need one step, striped needs every step."""
    for name in sorted(LAYOUTS):
        for world in (2, 3, 4, 8):
            c = 2 * 16
            for window in (1, 5, 16, 32, 33, 64, 65, 200):
                layout = Windowed(name, window)
                want = max((step for step in range(world) for r in range(world)
                            if layout.blocks(r, (r - step) % world, c, world, True)), default=0)
                assert last_step(layout, world, True, c) == want, (name, world, window)
    assert last_step(Windowed("contiguous", 32), 8, True, 32) == 1
    assert last_step(Windowed("contiguous", 33), 8, True, 32) == 1  # the first query reaches the share before
    assert last_step(Windowed("contiguous", 34), 8, True, 32) == 2
    assert last_step(Windowed("striped", 8), 8, True, 32) == 7
    assert last_step(Windowed("striped", 1), 8, True, 32) == 0  # each token sees only itself


def test_a_layout_takes_one_window_and_needs_causal_attention():
    with pytest.raises(ValueError, match="one sliding window"):
        Windowed(Windowed("striped", 4), 4)
    with pytest.raises(ValueError, match="positive number of tokens"):
        Windowed("striped", 0)
    with pytest.raises(ValueError, match="needs causal attention"):
        Windowed("striped", 4).blocks(0, 0, 8, 2, False)


# ----------------------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------------------


# (q_len, k_len, causal, window): windows narrower than a 256-query tile, cutting into its diagonal square,
# wider than a tile; without causal, bands above the diagonal (window <= 0) and below it
BANDS = [(600, 600, True, 1), (600, 600, True, 100), (600, 600, True, 255), (600, 600, True, 256),
         (600, 600, True, 257), (1100, 1100, True, 700), (1100, 900, True, 300), (700, 700, False, 1),
         (700, 900, False, 300), (700, 1500, False, -600), (300, 800, False, 5), (40, 1200, False, -1000)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("band", BANDS, ids=[f"{q}x{k}-{'causal' if c else 'dense'}-w{w}" for q, k, c, w in BANDS])
@pytest.mark.usefixtures("dense_chunks")
def test_cpu_kernel_bands_match_the_reference(band, dtype, tol):
    q_len, k_len, causal, window = band
    g = torch.Generator().manual_seed(q_len + window)
    q = torch.randn(1, 4, q_len, 24, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, k_len, 24, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    assert kernels._select(q, "auto", window)[0] is kernels._own_cpu_forward
    want = kernels.reference_forward(q, k, v, causal=causal, scale=0.3, window=window)
    want_grads = kernels.reference_backward(dout, q, k, v, *want, causal=causal, scale=0.3, window=window)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=0.3, window=window)
    assert relative_error(out, want[0]) < tol and (lse.double() - want[1]).abs().max() < 10 * tol
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=0.3, window=window)
    for got, w in zip(grads, want_grads):
        assert error(got, w, dout) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("band", [(1100, 900, True, 300), (700, 900, False, 300)], ids=["causal", "dense"])
def test_16_bit_windows_run_the_cpu_kernel_on_float32_copies(band, dtype):
    """torch's CPU flash (16-bit inputs) has no window: the package's kernel takes the block on float32 copies,
    so its running sums and gradient accumulators hold float32 attention of the 16-bit values."""
    q_len, k_len, causal, window = band
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(1, 4, q_len, 24, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, k_len, 24, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    assert kernels._select(q, "auto", window) == (kernels._widened_cpu_forward, kernels._widened_cpu_backward)
    exact = [t.double() for t in (q, k, v, dout)]  # the same 16-bit values, in float64
    want = kernels.reference_forward(*exact[:3], causal=causal, scale=0.3, window=window)
    want_grads = kernels.reference_backward(exact[3], *exact[:3], *want, causal=causal, scale=0.3, window=window)
    out, lse = kernels.attention_forward(q, k, v, causal=causal, scale=0.3, window=window)
    assert out.dtype == dtype and relative_error(out, want[0]) < 1e-2
    sums = kernels.no_keys_seen(q)  # the ring's float32 sums: folded in place, in float32
    kernels.attention_forward_(*sums, q, k, v, causal=causal, scale=0.3, window=window)
    assert relative_error(sums[0], want[0]) < 1e-5 and (sums[1].double() - want[1]).abs().max() < 1e-4
    grads = kernels.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=0.3, window=window)
    assert [t.dtype for t in grads] == [dtype] * 3
    accumulators = [torch.zeros(t.shape) for t in (q, k, v)]
    kernels.attention_backward_(*accumulators, dout, q, k, v, *(t.float() for t in want), causal=causal,
                                scale=0.3, window=window)  # the exact output: float32 work gives float32 error
    for got, acc, w in zip(grads, accumulators, want_grads):
        assert error(got, w, exact[3]) < 1e-2 and error(acc, w, exact[3]) < 1e-5


def test_windows_on_backends_without_one():
    """torch's CPU kernel (16-bit inputs) has no window: backend "torch" runs the reference for those pieces
    ("auto" the package's kernel, above); the CUDA kernels other than FlashAttention-2 refuse one by name."""
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    assert kernels._select(q, "torch", 3) == (kernels._reference_forward, kernels._reference_backward)
    assert "takes no window" in error_of(lambda: kernels._select(q, "cudnn", 3))
    assert "CUDA kernel for other inputs" in error_of(lambda: kernels._select(q, "flash", 3))


# ----------------------------------------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------------------------------------


def _cases(world):
    share = 48 // world
    cases = [(name, window, None, "float32", {}) for name in (*sorted(LAYOUTS), "balanced")
             for window in (1, 5, share, share + 1, 47)]
    cases = [c for c in cases if c[0] != "balanced"]  # balanced needs documents
    cases += [(name, window, DOCUMENTS, "float32", {}) for name in (*sorted(LAYOUTS), "balanced")
              for window in (3, share + 1)]
    cases += [(name, 13, DOCUMENTS_PER_ROW, "float32", {}) for name in sorted(LAYOUTS)]  # each row its own
    cases += [("striped", 7, None, "bfloat16", {}), ("zigzag", 7, None, "float64", {"backend": "reference"}),
              ("contiguous", 9, None, "float32", {"head_groups": 2})]
    return cases


def run_windows(world):
    """On each rank: each case's relative errors (out, dq, dk, dv) against float64 under the window, then the
    errors windows raise."""
    import torch.distributed as dist

    q, k, v, dout = full_inputs(0, 2, 4, 2, 48, 24)
    errors = {}
    for name, window, documents, dtype, kwargs in _cases(world):
        want = windowed_reference(q, k, v, dout, window, documents)
        got = sharded_run(for_documents(name, documents, world), getattr(torch, dtype), q, k, v, dout,
                          window=window, cu_seqlens=documents, **kwargs)
        errors[name, window, documents, dtype] = [error(g, w, dout) for g, w in zip(got, want)]
    local = [t[:, :, : 48 // world].float() for t in (q, k, v)]
    # windows no case above used (a signature seen before is not compared again)
    errors["window per rank"] = error_of(lambda: ring_attention(*local, window=30 + dist.get_rank()))
    errors["whole sequence"] = torch.equal(ring_attention(*local, window=48), ring_attention(*local))
    return errors


@cached
def window_results(world):
    return run_ranks(run_windows, world, world)


WINDOW_CASES = [(world, case) for world in (2, 3) for case in _cases(world)]


def _documents_id(cu_seqlens) -> str:
    return "one" if cu_seqlens is None else "per-row" if isinstance(cu_seqlens[0], tuple) else "documents"


@pytest.mark.parametrize("world, case", WINDOW_CASES,
                         ids=[f"N{w}-{c[0]}-w{c[1]}-{_documents_id(c[2])}-{c[3]}-{''.join(c[4])}"
                              for w, c in WINDOW_CASES])
def test_ring_matches_float64_attention_under_the_window(world, case):
    name, window, documents, dtype, _ = case
    tol = 1e-2 if dtype == "bfloat16" else 1e-5
    for errors in window_results(world):
        assert max(errors[name, window, documents, dtype]) <= tol, errors[name, window, documents, dtype]


def test_ranks_that_disagree_on_the_window_raise_on_every_rank_and_a_whole_window_is_no_window():
    for errors in window_results(2):
        assert "ranks disagree on window (rank 0: window=30; rank 1: window=31)" in errors["window per rank"]
        assert errors["whole sequence"]


@pytest.mark.parametrize("window, message", [(0, "positive number of tokens"), (-3, "positive number of tokens"),
                                             (2.5, "positive number of tokens"), (True, "positive number of tokens")])
def test_bad_windows_are_a_value_error(window, message):
    q = torch.randn(1, 2, 8, 16)
    assert message in error_of(lambda: ring_attention(q, q, q, window=window))


def test_a_window_needs_causal_attention():
    q = torch.randn(1, 2, 8, 16)
    assert "needs causal=True" in error_of(lambda: ring_attention(q, q, q, window=3, causal=False))
