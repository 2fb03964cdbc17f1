"""`striped-attention bench` on 2 real gloo ranks (one launch), and its tables, JSON and picture."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import pytest
import torch

from striped_attention import LAYOUTS, cli, kernels
from striped_attention.bench import (
    BASELINE, BenchConfig, Progress, Result, _sdpa, efficiencies, format_steps, format_table, paired_speedups,
    speedups,
)
from striped_attention.kernels import visible
from striped_attention.ring import source_rank


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `bench` command on 2 local ranks, both passes, with the baseline, the check, JSON and a picture, on a
    sequence of 5 packed documents (the check compares with SDPA on each document)."""
    pytest.importorskip("matplotlib")
    d = tmp_path_factory.mktemp("bench")
    args = ["bench", "--world-size", "2", "--seq-len", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
            "--repeats", "2", "--warmup", "1", "--pass", "both", "--baseline", "--check", "--documents", "5",
            "--json", str(d / "bench.json"), "--plot", str(d / "timeline.png")]
    assert cli.main(args) == 0
    return d, json.loads((d / "bench.json").read_text())


def test_bench_json_contract(bench_run):
    _, data = bench_run
    rows = {(r["layout"], r["pass"]): r for r in data["results"]}
    assert set(rows) == {(name, p) for name in [*LAYOUTS, BASELINE] for p in ("fwd", "fwd+bwd")}
    for (name, _), r in rows.items():
        assert r["seq_len"] == 256 and r["world_size"] == (1 if name == BASELINE else 2)
        assert 0 < r["min_ms"] <= r["time_ms"] and len(r["times_ms"]) == 2
        if name != BASELINE:
            assert r["max_error"] < 1e-5  # float32 against single-process SDPA, outputs and gradients
            assert r["scaling_efficiency"] == pytest.approx(rows[BASELINE, r["pass"]]["time_ms"] / (2 * r["time_ms"]))
            assert r["speedup_vs_contiguous"] == pytest.approx(rows["contiguous", r["pass"]]["time_ms"] / r["time_ms"])
    assert data["config"]["kv_heads"] == 1 and data["config"]["documents"] == 5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 5, 130, 599, 600, 4096])
def test_baseline_sdpa_under_a_window_by_query_chunks_equals_the_whole_mask(window, causal, monkeypatch):
    """The baseline (and --check) runs SDPA on query chunks against the keys the window reaches: the same output
    and gradients as SDPA under the whole (seq, seq) mask, in float64, with GQA; no mask of seq x seq."""
    masks = []
    monkeypatch.setattr(kernels, "visible", lambda *a, **kw: masks.append(visible(*a, **kw)) or masks[-1])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 600, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 600, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    got = _sdpa(q, k, v, causal, window=window)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    if window < 600:  # query chunks against at most chunk - 1 + window keys (and every later one, if not causal)
        chunk = max(window // 4, 128)
        assert max(m.numel() for m in masks) <= chunk * (chunk + window - 1 if causal else 600)
    mask = visible(600, 600, causal, window, q.device)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, (q, k, v), dout))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bench_under_a_sliding_window_checks_against_sdpa_with_its_mask(tmp_path):
    assert cli.main(["bench", "--world-size", "2", "--seq-len", "128", "--heads", "2", "--head-dim", "16",
                     "--repeats", "1", "--warmup", "0", "--pass", "fwd+bwd", "--check", "--window", "40",
                     "--json", str(tmp_path / "bench.json")]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["config"]["window"] == 40
    assert all(r["max_error"] < 1e-5 for r in data["results"])  # float32 against SDPA under the window


def test_bench_documents_are_random_cuts_shared_by_every_rank():
    cfg = BenchConfig(seq_len=100, documents=7, seed=3)
    cu = cfg.cu_seqlens()
    assert cu == cfg.cu_seqlens() and cu != BenchConfig(seq_len=100, documents=7, seed=4).cu_seqlens()
    assert cu[0] == 0 and cu[-1] == 100 and len(cu) == 8 and all(a < b for a, b in zip(cu, cu[1:]))
    assert BenchConfig(seq_len=100).cu_seqlens() is None
    assert BenchConfig(seq_len=3, documents=3).cu_seqlens() == [0, 1, 2, 3]


def test_bench_records_every_rank_and_step(bench_run):
    _, data = bench_run
    for r in data["results"]:
        if r["layout"] == BASELINE:
            continue
        assert len(r["steps"]) == 2  # one list per rank
        for rank, steps in enumerate(r["steps"]):
            passes = ["forward"] + ["backward"] * (r["pass"] == "fwd+bwd")
            assert [(s["pass"], s["step"]) for s in steps] == [(p, i) for p in passes for i in range(2)]
            assert all(s["source"] == source_rank(rank, s["step"], 2) for s in steps)
            assert all(s["compute_ms"] > 0 and s["wait_ms"] >= 0 for s in steps)


def test_bench_draws_one_timeline_per_pass(bench_run):
    d, _ = bench_run
    for name in ("timeline-fwd.png", "timeline-fwdbwd.png"):
        assert (d / name).stat().st_size > 10_000


def _result(layout, pass_, ms, world_size=2):
    steps = [[{"pass": "forward", "step": 0, "source": 0, "compute_ms": 1.0, "wait_ms": 0.5}]] * world_size
    return Result(layout, pass_, [ms, ms + 2, ms - 1], steps, world_size=world_size)


def test_tables_speedup_and_efficiency():
    results = [_result("contiguous", "fwd", 30.0), _result("striped", "fwd", 20.0), _result(BASELINE, "fwd", 32.0, 1)]
    assert speedups(results) == {("contiguous", "fwd"): 1.0, ("striped", "fwd"): 1.5}
    assert efficiencies(results) == {("contiguous", "fwd"): 32 / 60, ("striped", "fwd"): 0.8}
    table = format_table(results).splitlines()
    assert table[0].split() == ["layout", "pass", "median", "ms", "min", "ms", "vs", "contiguous", "scaling",
                                "efficiency"]
    assert table[2].split() == ["striped", "fwd", "20.0", "19.0", "1.50x", "80%"]
    assert "rank 1: f0 1.0+0.5" in format_steps(results)
    assert "efficiency" not in format_table(results[:2])  # no baseline, no column
    drifting = [Result("zigzag", "fwd", [10.0, 20.0]), Result("striped", "fwd", [9.0, 25.0]), results[2]]
    assert paired_speedups(drifting) == {("striped", "fwd"): [10 / 9, 20 / 25]}


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, want", [
    (Terminal(), "\rjob: 1/100 first".ljust(72) + "\rjob: 100/100 last".ljust(72) + "\n"),
    (io.StringIO(), "job: 1/100 first\njob: 100/100 last\n"),  # a log: whole lines
], ids=["terminal", "log"])
def test_progress_redraws_on_a_terminal_and_writes_lines_into_a_log(stream, want):
    progress = Progress("job", stream)
    for done in range(1, 101):  # in a burst: the first and the last are shown
        progress(done, 100, "first" if done == 1 else "last")
    assert stream.getvalue() == want


def test_progress_into_a_log_writes_a_line_every_interval(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 19.0, 21.0])
    monkeypatch.setattr("striped_attention.bench.time.monotonic", lambda: next(clock))
    log = io.StringIO()
    progress = Progress("job", log)
    for done in range(1, 6):
        progress(done, 9, ("step", str(done)))
    assert log.getvalue().splitlines() == ["job: 1/9 step 1", "job: 3/9 step 3", "job: 5/9 step 5"]


def test_results_round_trip_through_the_launcher_format():
    r = _result("zigzag", "fwd+bwd", 10.0)
    assert Result(**asdict(r)) == r and r.time_ms == 10.0 and r.min_ms == 9.0
    assert BenchConfig().passes == ("fwd", "fwd+bwd")  # demo relies on both passes by default


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "255"], "must be a positive multiple of 2"),
    (["--heads", "3", "--kv-heads", "2"], r"--heads \(3\) must be a positive multiple of --kv-heads \(2\)"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--documents", "0"], "--documents must be >= 1"),
    (["--seq-len", "8", "--documents", "9"], r"--documents \(9\) cannot exceed --seq-len \(8\)"),
])
def test_bench_rejects_bad_arguments_before_launching(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", *argv])
