"""ring_attention under torch.compile: a named layout is one op in the graph (fullgraph=True holds it), with the
same results as eager, bit for bit; new documents given as a tensor do not recompile; a Layout instance runs
eagerly behind a graph break. The "aot_eager" backend traces forward and backward as inductor would, without
generating code (seconds, not a C++ build)."""

from __future__ import annotations

import pytest
import torch

from ranks import cached, error_of, run_ranks

SEQ = 64


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, heads, SEQ // 2, 16, generator=g) for heads in (4, 2, 2)]  # GQA


def _compiled_against_eager(fn, *, fullgraph: bool = True, calls=None):
    """Largest difference between eager and compiled fn(q, k, v) (output and gradients), and the frames compiled,
    over ``calls`` (a list of keyword arguments for fn, default one call without)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # each case compiles afresh: the cases' functions share code, and with it a recompile limit
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=fullgraph, backend=counter)
    worst = 0.0
    for kwargs in calls or [{}]:
        results = []
        for run in (compiled, fn):
            q, k, v = (t.requires_grad_() for t in _inputs())
            out = run(q, k, v, **kwargs)
            out.square().sum().backward()
            results.append([out.detach(), q.grad, k.grad, v.grad])
        worst = max(worst, *((a - b).abs().max().item() for a, b in zip(*results)))
    return worst, counter.frame_count


def _run_all():
    import torch.distributed as dist

    from striped_attention import balance_documents, ring_attention

    def attention(layout, **options):  # with an op before the ring, as in a model
        return lambda q, k, v, **kwargs: ring_attention(q * 0.5, k, v, layout=layout, **options, **kwargs)

    report = {name: _compiled_against_eager(attention(name)) for name in ("striped", "zigzag", "contiguous")}
    report["group"] = _compiled_against_eager(attention("striped", group=dist.group.WORLD, causal=False))

    def as_in_a_model(q, k, v):  # q a transposed view of (batch, seq, heads, dim); heads folded back after
        b, h, n, d = q.shape
        q = (q * 0.5).transpose(1, 2).contiguous().transpose(1, 2)
        return ring_attention(q, k, v).transpose(1, 2).contiguous().view(b, n, h * d)

    report["strided"] = _compiled_against_eager(as_in_a_model)
    documents = [{"cu_seqlens": torch.tensor(cu)} for cu in ([0, 10, 40, 64], [0, 3, 33, 64], [0, 50, 60, 64])]
    report["documents"] = _compiled_against_eager(attention("zigzag"), calls=documents)
    rows = {"cu_seqlens": [[0, 10, 40, 64], [0, 64]]}  # lists, one per row, of different lengths
    report["documents-per-row"] = _compiled_against_eager(attention("striped", causal=False), calls=[rows])
    report["balanced"] = _compiled_against_eager(attention(balance_documents([0, 10, 40, 64], 2)), fullgraph=False)
    report["balanced-by-name"] = _compiled_against_eager(attention("balanced"), calls=documents)
    report["window"] = _compiled_against_eager(attention("striped", window=9), calls=documents)
    torch._dynamo.reset()
    bad = torch.compile(attention("striped"), fullgraph=True, backend="aot_eager")
    q, k, v = _inputs()
    report["bad"] = error_of(lambda: bad(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1)))
    return report


@cached
def reports():
    return run_ranks(_run_all, 2)


@pytest.mark.parametrize("case", ["striped", "zigzag", "contiguous", "group", "strided", "window"])
def test_named_layout_is_one_op_in_a_full_graph_and_equals_eager(case):
    """The "window" case: a sliding window, with three sets of documents as a tensor (one compiled frame)."""
    for report in reports():
        worst, frames = report[case]
        assert worst == 0.0 and frames == 1, (case, worst, frames)


def test_new_documents_as_a_tensor_do_not_recompile():
    for report in reports():
        worst, frames = report["documents"]  # three sets of three documents, one compiled frame
        assert worst == 0.0 and frames == 1, (worst, frames)


def test_documents_per_row_as_lists():
    for report in reports():
        worst, frames = report["documents-per-row"]
        assert worst == 0.0 and frames == 1, (worst, frames)


def test_layout_instance_runs_eagerly_behind_a_graph_break():
    for report in reports():
        worst, frames = report["balanced"]  # the graph before the break is compiled, the ring runs eagerly
        assert worst == 0.0 and frames == 1, (worst, frames)


def test_balanced_by_name_is_one_op_and_new_documents_do_not_recompile():
    for report in reports():
        worst, frames = report["balanced-by-name"]  # its order found inside the op, for each set of documents
        assert worst == 0.0 and frames == 1, (worst, frames)


def test_bad_input_raises_the_eager_error_from_the_compiled_graph():
    for report in reports():
        assert report["bad"] is not None and "heads (4) must be a multiple of kv_heads (3)" in report["bad"]


def test_world_of_one_without_a_process_group():
    from striped_attention import ring_attention

    worst, frames = _compiled_against_eager(lambda q, k, v: ring_attention(q, k, v, layout="zigzag"))
    assert worst == 0.0 and frames == 1, (worst, frames)
