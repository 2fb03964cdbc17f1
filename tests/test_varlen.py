"""The varlen path (a step's small pieces in one kernel call) on the CPU: its calls cover every piece's pairs
exactly once, and the ring through it, with an emulation of FlashAttention-2's varlen kernel (causal masks
aligned at the bottom right, lse (heads, tokens), gradients on the kv heads), equals float64 attention on the
whole sequence. The real kernel runs the documents cases of tests/test_cuda.py (16-bit: what it takes)."""

from __future__ import annotations

import pytest
import torch

from ranks import full_inputs, reference, relative_error, run_ranks, sharded_run
from striped_attention import LAYOUTS, positions, varlen
from striped_attention.layouts import Documents
from striped_attention.simulate import SimConfig, simulate

DOCUMENTS = (0, 7, 100, 101, 250, 384)
PER_ROW = (DOCUMENTS, (0, 200, 384))


def _sequence(call, i):
    return slice(*call.cu_q[i:i + 2].tolist()), slice(*call.cu_k[i:i + 2].tolist())


def _scores(q, k, causal, scale):
    """(heads, n, m) scores of one packed sequence, q (n, heads, d), k (m, kv_heads, d); causal bottom-right."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("nhd,mhd->hnm", q, k) * scale
    if causal:
        n, m = q.shape[0], k.shape[0]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).tril(m - n).logical_not(), float("-inf"))
    return s


def _check_inputs(*packed, call):
    """What FlashAttention-2's varlen entry demands: (tokens, heads, head_dim) tensors of one dtype whose last
    dimension is contiguous (other strides are free), int32 offsets."""
    for t in packed:
        assert t.dim() == 3 and t.stride(-1) == 1 and t.dtype == packed[0].dtype, (t.shape, t.stride(), t.dtype)
    assert call.cu_q.dtype == call.cu_k.dtype == torch.int32 and call.cu_q.is_contiguous()


def emulated_forward(q, k, v, call, scale):
    """A query that sees no key gets out 0 and lse +inf, as the kernel gives it."""
    _check_inputs(q, k, v, call=call)
    outs, lses = [], []
    for i in range(len(call.cu_q) - 1):
        qs, ks = _sequence(call, i)
        s = _scores(q[qs].double(), k[ks].double(), call.causal, scale)
        lse = s.logsumexp(-1)
        p = (s - lse.unsqueeze(-1)).exp().nan_to_num(0.0)
        vv = v[ks].double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        outs.append(torch.einsum("hnm,mhd->nhd", p, vv).to(q.dtype))
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        lses.append(lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32))  # float32 on the GPU
    return torch.cat(outs), torch.cat(lses, dim=1)


def emulated_backward(dout, q, k, v, out, lse, call, scale):
    _check_inputs(dout, q, k, v, out, call=call)
    assert lse.is_contiguous() and lse.shape == (q.shape[1], q.shape[0])
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    for i in range(len(call.cu_q) - 1):
        qs, ks = _sequence(call, i)
        qq, kk, vv, do = q[qs].double(), k[ks].double(), v[ks].double(), dout[qs].double()
        p = (_scores(qq, kk, call.causal, scale) - lse[:, qs].double().unsqueeze(-1)).exp()
        ds = p * (torch.einsum("nhd,mhd->hnm", do, vv.repeat_interleave(group, 1))
                  - (do * out[qs].double()).sum(-1).transpose(0, 1).unsqueeze(-1)) * scale
        dq[qs] += torch.einsum("hnm,mhd->nhd", ds, kk.repeat_interleave(group, 1))
        fold = lambda t: t.view(t.shape[0], k.shape[1], group, -1).sum(2)  # noqa: E731
        dk[ks] += fold(torch.einsum("hnm,nhd->mhd", ds, qq))
        dv[ks] += fold(torch.einsum("hnm,nhd->mhd", p, do))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


CALLS = {"forward": 0, "backward": 0}


def _count(fn, name):
    def counted(*args):
        CALLS[name] += 1
        return fn(*args)
    return counted


def emulate_varlen_kernel():
    """Serve CPU tensors through the varlen path, its kernel emulated (in this process)."""
    varlen._takes = lambda q, backend: backend == "auto"
    varlen._kernel_forward = _count(emulated_forward, "forward")
    varlen._kernel_backward = _count(emulated_backward, "backward")
    varlen._splits.clear()


@pytest.fixture
def emulated(monkeypatch):
    for name in ("_takes", "_kernel_forward", "_kernel_backward"):
        monkeypatch.setattr(varlen, name, getattr(varlen, name))
    emulate_varlen_kernel()
    CALLS.update(forward=0, backward=0)
    yield CALLS
    varlen._splits.clear()


def _pairs_of_pieces(pieces, batch):
    pairs = set()
    for p in pieces:
        for row in range(batch)[p.rows]:
            for i in range(p.q.start, p.q.stop):
                last = p.k.stop if not p.causal else min(p.k.stop, p.k.start + (i - p.q.start) + 1)
                pairs.update((row, i, j) for j in range(p.k.start, last))
    return pairs


def _positions(at):
    return torch.arange(at.start, at.stop) if isinstance(at, slice) else at


def _pairs_of_calls(calls):
    pairs = []
    for call in calls:
        qn, kn = _positions(call.q_at), _positions(call.k_at)
        assert len(set(qn.tolist())) == len(qn)  # a query merged once per call
        for i in range(len(call.cu_q) - 1):
            qs, ks = _sequence(call, i)
            n, m = qs.stop - qs.start, ks.stop - ks.start
            # causal: squares (both alignments agree), or a square under one query that sees no key
            assert not call.causal or n - m in (0, 1)
            assert n <= call.max_q and m <= call.max_k
            for a in range(n):
                for b in range(m if not call.causal else a + 1 - (n - m)):  # bottom-right aligned
                    pairs.append((call.row, int(qn[qs][a]), int(kn[ks][b])))
    return pairs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_calls_cover_every_pair_of_the_pieces_once(layout, causal):
    documents, gathered = Documents.of(layout, PER_ROW, batch=2), {"q": set(), "k": set()}
    for q_rank in range(3):
        for kv_rank in range(3):
            pieces = documents.blocks(q_rank, kv_rank, 128, 3, causal)
            calls = varlen._calls(pieces, 2, torch.device("cpu"))
            pairs = _pairs_of_calls(calls)
            assert len(pairs) == len(set(pairs)) and set(pairs) == _pairs_of_pieces(pieces, 2)
            for side in gathered:
                gathered[side].update(isinstance(getattr(c, f"{side}_at"), torch.Tensor) for c in calls)
    if layout == "striped" and causal:  # pieces one query apart above the diagonal join: queries are views
        assert gathered == {"q": {False}, "k": {True, False}}


@pytest.mark.parametrize("docs", [DOCUMENTS, PER_ROW], ids=["documents", "per-row"])
def test_a_world_of_one_through_the_varlen_path(emulated, docs):
    q, k, v, dout = full_inputs(0, 2, 4, 2, 384, 64)
    want = reference(q, k, v, dout, True, None, docs)
    got = sharded_run("striped", torch.float32, q, k, v, dout, cu_seqlens=docs)
    assert emulated["forward"] and emulated["backward"]
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-5


def test_virtual_ranks_through_the_varlen_path(emulated):
    """4 virtual ranks, 24 documents: every rank's output and dQ are those of the whole sequence."""
    cfg = SimConfig(world_size=4, seq_len=512, batch=1, heads=4, kv_heads=2, head_dim=32, passes=("fwd+bwd",),
                    repeats=1, warmup=0, documents=24)
    _, outputs = simulate(cfg, keep_outputs=True)
    assert emulated["forward"] and emulated["backward"]
    from striped_attention.bench import random_documents, random_inputs

    q, k, v, dout = (t.double() for t in random_inputs(cfg, torch.device("cpu")))
    out, dq, _, _ = reference(q, k, v, dout, True, None, random_documents(cfg.seq_len, cfg.documents, cfg.seed))
    for name in LAYOUTS:
        outs, dqs = outputs[(name, "fwd+bwd")]
        for rank in range(cfg.world_size):
            index = positions(cfg.seq_len, layout=name, rank=rank, world_size=cfg.world_size)
            assert relative_error(outs[rank], out[:, :, index]) <= 1e-5
            assert relative_error(dqs[rank], dq[:, :, index]) <= 1e-5


def run_through_varlen():
    """On each gloo rank, the emulated varlen path: relative errors (out, dq, dk, dv) of every case."""
    emulate_varlen_kernel()
    errors = {}
    for name in sorted(LAYOUTS):
        for causal in (True, False):
            for docs in (DOCUMENTS, PER_ROW):
                q, k, v, dout = full_inputs(0, 2, 4, 2, 384, 64)
                want = reference(q, k, v, dout, causal, None, docs)
                got = sharded_run(name, torch.float32, q, k, v, dout, causal=causal, cu_seqlens=docs)
                errors[(name, causal, docs)] = [relative_error(g, w) for g, w in zip(got, want)]
    return errors, dict(CALLS)


def test_ranks_through_the_varlen_path():
    """3 gloo ranks: K/V and dK/dV travel, the small pieces of every step go through the varlen calls."""
    for errors, calls in run_ranks(run_through_varlen, 3):
        assert calls["forward"] and calls["backward"]
        for case, e in errors.items():
            assert max(e) <= 1e-5, (case, e)


def test_large_pieces_keep_their_kernels(emulated):
    q = torch.zeros(1, 1, 8192, 64)
    pieces = Documents.of("striped", (0, 4, 10, 8192)).blocks(0, 0, 8192, 1, True)
    calls, alone = varlen.split(q, pieces, "auto")
    assert len(calls) == 1 and alone == pieces[2:] and pieces[2].pairs() >= varlen.SMALL_PIECE
    assert varlen.split(q, pieces, "auto")[0] is calls  # the calls are kept for the same pieces
    assert varlen.split(q, pieces[1:], "auto") == ([], pieces[1:])  # one small piece: no call for it alone
    assert varlen.split(q, pieces, "reference") == ([], pieces)  # another backend asked for


def test_the_varlen_kernel_serves_cuda_only():
    q = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    assert not varlen._takes(q, "auto")
    q = torch.zeros(1, 4, 128, 64)
    pieces = Documents.of("striped", DOCUMENTS).blocks(0, 1, 128, 3, True)
    assert varlen.split(q, pieces, "auto") == ([], pieces)  # the CPU keeps its own kernel


def test_pieces_that_share_queries_go_to_separate_calls(emulated):
    """Packed layouts never give one step's pieces shared queries of one kind (causal or dense), but the calls
    must stay exact if one did: each query is merged once per call, so such pieces go to separate calls."""
    from striped_attention.kernels import no_keys_seen
    from striped_attention.layouts import Block

    pieces = (Block(slice(0, 6), slice(0, 3), False), Block(slice(0, 6), slice(3, 6), True),
              Block(slice(2, 6), slice(6, 8), False))
    calls = varlen._calls(pieces, 1, torch.device("cpu"))
    assert sum(not call.causal for call in calls) == 3  # rows 2-5 are dense in three pieces
    pairs = _pairs_of_calls(calls)
    assert len(pairs) == len(set(pairs)) and set(pairs) == _pairs_of_pieces(pieces, 1)

    q, k, v, _ = full_inputs(1, 1, 4, 2, 8, 16)
    out, lse = no_keys_seen(q)
    varlen.forward_(out, lse, q, k, v, calls, scale=0.25)
    seen = torch.zeros(8, 8, dtype=torch.bool)
    seen[[i for _, i, _ in pairs], [j for _, _, j in pairs]] = True
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~seen, float("-inf"))
    want = scores[:, :, :6].softmax(-1) @ v.repeat_interleave(2, 1)
    assert relative_error(out[:, :, :6], want) <= 1e-12
    assert relative_error(lse[:, :, :6], scores[:, :, :6].logsumexp(-1)) <= 1e-12
    assert (out[:, :, 6:] == 0).all() and (lse[:, :, 6:] == float("-inf")).all()  # rows no piece holds
