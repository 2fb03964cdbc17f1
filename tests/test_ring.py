"""Ring attention on 1 to 4 gloo ranks against float64 attention on the whole sequence.

Each world size is launched once (its ranks run every case) and the parametrized tests read the results.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ranks import cached, error_of, full_inputs, reference, relative_error, run_ranks, sharded_run
from striped_attention import (
    LAYOUTS, Block, Layout, balance_documents, kernels, positions, ring_attention, shard, unshard,
)
from striped_attention.launch import torch_threads
from striped_attention.layouts import DocumentOrder, Documents, for_documents


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    dtype: str = "float32"
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    seq: int = 48
    head_dim: int = 24  # not a power of two
    scale: float | None = None
    backend: str = "auto"
    head_groups: int | None = None
    cu_seqlens: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None  # one list for every row, or per row

    @property
    def tol(self):
        return 1e-5 if self.dtype in ("float32", "float64") else 1e-2


DOCUMENTS = (0, 5, 17, 18, 18, 40, 48)  # lengths 5, 12, 1, 0, 22, 8: none a multiple of the ranks
DOCUMENTS_PER_ROW = (DOCUMENTS, (0, 30, 48))  # row 0 as above, row 1 two documents


def _cases(world):
    cases = [Case(name, causal) for name in sorted(LAYOUTS) for causal in (True, False)]
    cases += [Case(name, causal, cu_seqlens=DOCUMENTS) for name in sorted(LAYOUTS) for causal in (True, False)]
    cases += [Case(name, True, cu_seqlens=DOCUMENTS_PER_ROW) for name in sorted(LAYOUTS)]
    cases += [Case("balanced", causal, cu_seqlens=DOCUMENTS) for causal in (True, False)]  # documents reordered
    cases += [Case("contiguous", True, cu_seqlens=(0, 12, 24, 36, 48))]  # on 2 and 4 ranks no K/V travel at all
    if world == 2:  # different documents in each row, not causal, and with every row alike given per row
        cases += [Case(name, False, cu_seqlens=DOCUMENTS_PER_ROW) for name in sorted(LAYOUTS)]
        cases += [Case("striped", True, cu_seqlens=(DOCUMENTS, DOCUMENTS))]
        cases += [Case("zigzag", True, heads=6, kv_heads=3, head_groups=2, cu_seqlens=DOCUMENTS_PER_ROW)]
    if world == 2:  # documents in 16 bits, and on torch's kernels
        cases += [Case(name, True, dtype="bfloat16", cu_seqlens=DOCUMENTS) for name in (*sorted(LAYOUTS), "balanced")]
        cases += [Case(name, True, backend="torch", cu_seqlens=DOCUMENTS) for name in sorted(LAYOUTS)]
    if world in (2, 4):
        for name in sorted(LAYOUTS):
            for causal in (True, False):
                cases += [
                    Case(name, causal, kv_heads=1, head_dim=16),  # MQA
                    Case(name, causal, batch=1, heads=2, kv_heads=2, head_dim=32, scale=0.3),  # MHA, custom scale
                    Case(name, causal, dtype="bfloat16"),
                    Case(name, causal, dtype="float16"),
                ]
    if world == 2:
        cases += [Case(name, True, seq=1200, heads=2, kv_heads=1, head_dim=64) for name in sorted(LAYOUTS)]
        cases += [Case(name, True, backend="reference") for name in sorted(LAYOUTS)]
    if world in (2, 3):  # the ring once per group of kv heads, groups of unequal size included
        cases += [Case(name, causal, heads=6, kv_heads=3, head_groups=g)
                  for name in sorted(LAYOUTS) for causal in (True, False) for g in (1, 2, 3)]
    return cases


WORLDS = (1, 2, 3, 4)
ALL_CASES = [(world, case) for world in WORLDS for case in _cases(world)]


def run_cases(world):
    """On each rank: every case's relative errors (out, dq, dk, dv) against float64 on the whole sequence."""
    errors = {}
    for case in _cases(world):
        q, k, v, dout = full_inputs(0, case.batch, case.heads, case.kv_heads, case.seq, case.head_dim)
        want = reference(q, k, v, dout, case.causal, case.scale, case.cu_seqlens)
        got = sharded_run(
            for_documents(case.layout, case.cu_seqlens, world), getattr(torch, case.dtype), q, k, v, dout,
            causal=case.causal, softmax_scale=case.scale,
            backend=case.backend, head_groups=case.head_groups, cu_seqlens=case.cu_seqlens,
        )
        assert all(g.dtype == getattr(torch, case.dtype) for g in got)
        errors[case] = [relative_error(g, w) for g, w in zip(got, want)]
    return errors


@cached
def results(world):
    return run_ranks(run_cases, world, world)


@pytest.mark.parametrize("world, case", ALL_CASES, ids=[f"N{w}-{c}" for w, c in ALL_CASES])
def test_matches_float64_attention(world, case):
    per_rank = results(world)
    for rank_errors in per_rank:
        out, dq, dk, dv = rank_errors[case]
        assert max(out, dq, dk, dv) <= case.tol, dict(out=out, dq=dq, dk=dk, dv=dv)


# ----------------------------------------------------------------------------------------------------------


def run_checks():
    """Round trips, determinism, extreme logits and bad input, on each of 2 ranks."""
    import torch.distributed as dist

    rank, n = dist.get_rank(), dist.get_world_size()
    report = {}
    x = torch.randn(2, 3, 16, 5, generator=torch.Generator().manual_seed(1))
    for name in LAYOUTS:
        local = shard(x, layout=name, dim=2)
        report[f"shard-{name}"] = torch.equal(local, x[:, :, positions(16, layout=name, rank=rank, world_size=n)])
        report[f"roundtrip-{name}"] = torch.equal(unshard(local, layout=name, dim=2), x)

    # determinism: two runs are bitwise equal, forward and backward
    q, k, v, dout = full_inputs(3, 1, 4, 2, 64, 32)
    runs = [sharded_run("striped", torch.bfloat16, q, k, v, dout) for _ in range(2)]
    report["deterministic"] = all(torch.equal(a, b) for a, b in zip(*runs))

    # extreme logits: scores around 1e4 give finite, correct outputs
    q, k, v, dout = full_inputs(4, 1, 2, 2, 32, 16)
    q = q * 25
    want = reference(q, k, v, dout, True, None)
    got = sharded_run("striped", torch.float32, q, k, v, dout)
    report["extreme-finite"] = all(torch.isfinite(g).all().item() for g in got)
    report["extreme-error"] = max(relative_error(g, w) for g, w in zip(got, want))

    # layout "balanced" by name: balance_documents' layout of cu_seqlens, also given per row (rows alike)
    q, k, v, dout = full_inputs(6, 2, 4, 2, 48, 16)
    balanced = balance_documents(DOCUMENTS, n)
    named = [sharded_run(balanced, torch.float32, q, k, v, dout, cu_seqlens=cu, ring_layout="balanced")
             for cu in (DOCUMENTS, torch.tensor([DOCUMENTS] * 2))]
    instance = sharded_run(balanced, torch.float32, q, k, v, dout)
    report["balanced-by-name"] = all(torch.equal(a, b) for run in named for a, b in zip(run, instance))
    one = sharded_run("contiguous", torch.float32, q, k, v, dout)
    report["balanced-one-document"] = all(
        torch.equal(a, b) for a, b in zip(sharded_run("contiguous", torch.float32, q, k, v, dout,
                                                      ring_layout="balanced"), one))

    # bad input: every rank gets the ValueError, and the ring still works afterwards
    t = lambda *shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype)  # noqa: E731
    c = 8
    bad = {
        "indivisible": lambda: shard(t(1, 2, 7, 4), layout="striped", dim=2),
        "zigzag-odd-local": lambda: ring_attention(t(1, 2, 3, 4), t(1, 2, 3, 4), t(1, 2, 3, 4), layout="zigzag"),
        "dtype": lambda: ring_attention(t(1, 2, c, 4), t(1, 2, c, 4, dtype=torch.bfloat16), t(1, 2, c, 4)),
        "device": lambda: ring_attention(t(1, 2, c, 4), torch.empty(1, 2, c, 4, device="meta"), t(1, 2, c, 4)),
        "batch": lambda: ring_attention(t(2, 2, c, 4), t(1, 2, c, 4), t(1, 2, c, 4)),
        "head_dim": lambda: ring_attention(t(1, 2, c, 4), t(1, 2, c, 8), t(1, 2, c, 8)),
        "heads": lambda: ring_attention(t(1, 3, c, 4), t(1, 2, c, 4), t(1, 2, c, 4)),
        "layout": lambda: ring_attention(t(1, 2, c, 4), t(1, 2, c, 4), t(1, 2, c, 4), layout="ring"),
        "peer-length": lambda: ring_attention(*(t(1, 2, c + 2 * rank, 4) for _ in range(3))),
        "peer-dtype": lambda: ring_attention(*(t(1, 2, c, 4, dtype=[torch.float32, torch.float64][rank]) for _ in range(3))),
        "peer-heads": lambda: ring_attention(t(1, 2 + 2 * rank, c, 4), t(1, 2, c, 4), t(1, 2, c, 4)),
        "head-groups": lambda: ring_attention(t(1, 2, c, 4), t(1, 2, c, 4), t(1, 2, c, 4), head_groups=3),
        "peer-head-groups": lambda: ring_attention(*(t(1, 2, c, 4) for _ in range(3)), head_groups=1 + rank),
        "documents-end": lambda: ring_attention(*(t(1, 2, c, 4) for _ in range(3)), cu_seqlens=[0, 3, c]),
        "peer-documents": lambda: ring_attention(*(t(1, 2, c, 4) for _ in range(3)), cu_seqlens=[0, 3 + rank, 2 * c]),
        "documents-rows": lambda: ring_attention(*(t(1, 2, c, 4) for _ in range(3)), cu_seqlens=[[0, 2 * c]] * 2),
        "peer-documents-rows": lambda: ring_attention(
            *(t(2, 2, c, 4) for _ in range(3)), cu_seqlens=[[0, 2 * c], [0, 3 + rank, 2 * c]]
        ),
        "peer-documents-none": lambda: ring_attention(
            *(t(1, 2, c, 4) for _ in range(3)), cu_seqlens=[0, 2 * c] if rank else None
        ),
        "balanced-rows": lambda: ring_attention(*(t(2, 2, c, 4) for _ in range(3)), layout="balanced",
                                                cu_seqlens=[[0, 2 * c], [0, 3, 2 * c]]),
        "peer-order": lambda: ring_attention(  # the same documents in another order on each rank
            *(t(1, 2, c, 4) for _ in range(3)),
            layout=Documents(DocumentOrder([0, 3, 9, 2 * c], [[0, 1, 2], [1, 0, 2]][rank]), [0, 3, 9, 2 * c]),
        ),
    }
    for name, fn in bad.items():
        report[f"bad-{name}"] = error_of(fn)
    q, k, v, dout = full_inputs(5, 1, 2, 1, 16, 8)
    report["works-after-errors"] = max(
        relative_error(g, w) for g, w in zip(sharded_run("zigzag", torch.float32, q, k, v, dout), reference(q, k, v, dout, True, None))
    )
    return report


@cached
def checks():
    return run_ranks(run_checks, 2)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_shard_unshard_round_trip(name):
    for report in checks():
        assert report[f"shard-{name}"] and report[f"roundtrip-{name}"]


def test_deterministic():
    assert all(report["deterministic"] for report in checks())


def test_extreme_logits():
    for report in checks():
        assert report["extreme-finite"]
        assert report["extreme-error"] <= 1e-5


BAD = {
    "indivisible": "multiple of 2",
    "zigzag-odd-local": "multiple of 4",
    "dtype": "share a dtype",
    "device": "one device",
    "batch": "batch mismatch",
    "head_dim": "head_dim mismatch",
    "heads": "multiple of kv_heads",
    "layout": "unknown layout",
    "peer-length": "ranks disagree on local_seq",
    "peer-dtype": "ranks disagree on dtype",
    "peer-heads": "ranks disagree on heads",
    "head-groups": "head_groups must be an int from 1 to kv_heads (2), got 3",
    "peer-head-groups": "ranks disagree on head_groups",
    "documents-end": "cu_seqlens end at 8, but the sequence has 16 tokens",
    "peer-documents": "ranks disagree on cu_seqlens",
    "documents-rows": "cu_seqlens has offsets for 2 rows, but the batch has 1",
    "peer-documents-rows": "ranks disagree on cu_seqlens",
    "peer-documents-none": "ranks disagree on cu_seqlens (rank 0: cu_seqlens=None; rank 1: cu_seqlens=checksum",
    "peer-order": "ranks disagree on layout",
    "balanced-rows": "layout 'balanced' orders one set of documents for every row, but the rows hold different",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_a_value_error_on_every_rank(name):
    for report in checks():
        assert report[f"bad-{name}"] is not None, f"no ValueError for {name}"
        assert BAD[name] in report[f"bad-{name}"]


def test_balanced_by_name_is_balance_documents_layout():
    """layout="balanced" with cu_seqlens (one list, or rows alike) computes what balance_documents' layout does,
    bit for bit; without documents, what contiguous does."""
    for report in checks():
        assert report["balanced-by-name"] and report["balanced-one-document"]


def test_ring_still_works_after_errors():
    assert all(report["works-after-errors"] <= 1e-5 for report in checks())


def test_world_of_one_without_process_group():
    q, k, v, dout = full_inputs(0, 1, 4, 2, 32, 16)
    want = reference(q, k, v, dout, True, None)
    got = sharded_run("striped", torch.float64, q, k, v, dout)
    assert max(relative_error(g, w) for g, w in zip(got, want)) < 1e-12


def test_only_the_inputs_that_need_gradients_get_them_and_a_second_derivative_is_refused():
    q, k, v, _ = full_inputs(0, 1, 4, 2, 32, 16)
    q.requires_grad_()
    out = ring_attention(q, k, v)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.shape == q.shape and k.grad is None and v.grad is None
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


class _SplitTriangle(Layout):
    """A test layout: one rank, its causal block cut into a rectangle first, then two half triangles, so the
    first block does not span every query (the engine must start the sums from zeros, not from it)."""

    name = "split-triangle"

    def positions(self, seq_len, rank, world_size):
        self.check(seq_len, world_size)
        return torch.arange(seq_len)

    def causal_blocks(self, q_rank, kv_rank, c, n):
        h = c // 2
        return (Block(slice(h, c), slice(0, h), False), Block(slice(0, h), slice(0, h), True),
                Block(slice(h, c), slice(h, c), True))


def test_a_new_layout_needs_no_change_to_the_engine():
    q, k, v, dout = full_inputs(2, 2, 4, 2, 32, 16)
    want = reference(q, k, v, dout, True, None)
    got = sharded_run(_SplitTriangle(), torch.float64, q, k, v, dout)
    assert max(relative_error(g, w) for g, w in zip(got, want)) < 1e-12


def test_head_groups_keep_each_query_head_with_its_kv_head():
    from striped_attention.ring import head_slices

    assert head_slices(6, 3, 2) == [(slice(0, 2), slice(0, 1)), (slice(2, 6), slice(1, 3))]
    assert head_slices(8, 8, 4) == [(slice(2 * g, 2 * g + 2), slice(2 * g, 2 * g + 2)) for g in range(4)]
    assert head_slices(4, 1, 1) == [(slice(0, 4), slice(0, 1))]


def test_default_head_groups_bound_the_block_in_flight_and_leave_no_cpu_thread_idle():
    from striped_attention.ring import GROUP_BYTES, _head_groups

    tokens = GROUP_BYTES // (2 * 8 * 64 * 4)  # 8 kv heads x 64 x float32: K/V of exactly GROUP_BYTES
    with torch_threads(1):
        assert _head_groups(None, torch.empty(1, 8, tokens, 64), world_size=2) == 1
        assert _head_groups(None, torch.empty(1, 8, tokens + 1, 64), world_size=2) == 2
        assert _head_groups(None, torch.empty(1, 8, 4 * tokens, 64), world_size=2) == 4
        assert _head_groups(None, torch.empty(1, 8, 9 * tokens, 64), world_size=2) == 8  # at most kv_heads
        assert _head_groups(None, torch.empty(1, 8, 4 * tokens, 64), world_size=1) == 1
    with torch_threads(4):
        assert _head_groups(None, torch.empty(1, 8, 4 * tokens, 64), world_size=2) == 2  # 4 pairs per group
        assert _head_groups(3, torch.empty(1, 8, 4, 64), world_size=2) == 3


def test_first_piece_over_every_query_starts_the_sums_without_a_merge(monkeypatch):
    """A kernel that returns its block's output (torch's, here in bf16) is not merged into zeros at step 0."""
    merges = []
    merge = kernels.merge_
    monkeypatch.setattr(kernels, "merge_", lambda *args: (merges.append(1), merge(*args)))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g).bfloat16() for _ in range(3))
    out = ring_attention(q, k, v, backend="torch")
    assert merges == [] and out.is_contiguous()
    assert torch.equal(out, kernels.attention_forward(q, k, v, causal=True, scale=0.25, backend="torch")[0])
    ring_attention(q, k, v, layout=_SplitTriangle(), backend="torch")  # its first piece has half the queries
    assert len(merges) == 3  # each of its three pieces merged, the first into zeros
