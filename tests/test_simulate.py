"""The one-process simulator: it runs the ring's own blocks (exact results), times each (rank, step), and
models communication; the command line with its JSON contract and pictures."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ranks import reference
from striped_attention import LAYOUTS, cli, positions
from striped_attention.bench import random_documents, random_inputs
from striped_attention.plan import ring_transfers
from striped_attention.simulate import SimConfig, SimResult, simulate, sweep


@pytest.mark.parametrize("n, documents", [(1, 1), (3, 1), (4, 1), (4, 5)])
def test_virtual_ranks_compute_exactly_what_the_ring_computes(n, documents):
    cfg = SimConfig(world_size=n, seq_len=8 * n, batch=2, heads=4, kv_heads=2, head_dim=8, dtype="float64",
                    passes=("fwd+bwd",), repeats=1, warmup=0, documents=documents)
    results, outputs = simulate(cfg, keep_outputs=True)
    q, k, v, dout = random_inputs(cfg, torch.device("cpu"))
    out, dq, _, _ = reference(q, k, v, dout, True, None, random_documents(cfg.seq_len, documents, cfg.seed))
    for name in LAYOUTS:
        outs, dqs = outputs[(name, "fwd+bwd")]
        for rank in range(n):
            index = positions(cfg.seq_len, layout=name, rank=rank, world_size=n)
            torch.testing.assert_close(outs[rank], out[:, :, index], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(dqs[rank], dq[:, :, index], rtol=1e-10, atol=1e-10)
    for r in results:  # every rank timed every step of both passes
        assert set(r.compute_ms) == {"forward", "backward"}
        for per_rank in r.compute_ms.values():
            assert len(per_rank) == n and all(len(steps) == n for steps in per_rank)


@pytest.fixture(scope="module")
def timed():
    """4 virtual ranks, 512 tokens each, forward: the blocks are big enough to time."""
    cfg = SimConfig(world_size=4, seq_len=2048, heads=2, kv_heads=2, head_dim=64, repeats=3, warmup=1)
    return cfg, {r.layout: r for r in simulate(cfg)}


def test_contiguous_ranks_idle_where_the_mask_is_empty(timed):
    _, by = timed
    times = by["contiguous"].compute_ms["forward"]
    for step in range(1, 4):
        for rank in range(4):  # at step i, ranks r < i hold a later block: nothing to compute
            if rank < step:
                assert times[rank][step] < 0.3 * times[step][step], (rank, step, times)
    # so the ring waits on the busy ranks; striped keeps every rank busy at every step
    assert by["contiguous"].balance < 0.8
    assert by["striped"].balance > by["contiguous"].balance
    assert by["zigzag"].balance > by["contiguous"].balance


def test_critical_path_is_the_sum_of_the_slowest_ranks(timed):
    _, by = timed
    for r in by.values():
        times = r.compute_ms["forward"]
        want = sum(max(times[rank][i] for rank in range(4)) for i in range(4))
        assert r.critical_path_ms == pytest.approx(want)
        assert r.critical_path_comm_ms is None and r.time_ms == r.critical_path_ms
        for rank, steps in enumerate(r.steps()):  # the timeline: every rank ends every step together
            assert sum(s["compute_ms"] + s["wait_ms"] for s in steps) == pytest.approx(want)
            assert all(s["wait_ms"] >= -1e-9 for s in steps)


def test_communication_model(timed):
    cfg, by = timed
    kv_bytes = 2 * 2 * 512 * 64 * 4  # K and V, 2 kv heads, 512 tokens, head_dim 64, float32
    slow = replace(by["striped"], bandwidth_gbs=1e-3, latency_us=100.0)  # 1 MB/s: transfers dominate
    transfer_ms = kv_bytes / 1e6 * 1e3 + 0.1
    last = max(rank[3] for rank in slow.compute_ms["forward"])
    assert slow.critical_path_comm_ms == pytest.approx(3 * transfer_ms + last)
    assert slow.time_ms == slow.critical_path_comm_ms
    fast = replace(by["striped"], bandwidth_gbs=1e6, latency_us=0.0)  # hidden behind compute
    assert fast.critical_path_comm_ms == pytest.approx(fast.critical_path_ms, rel=1e-3)
    assert by["striped"].transfer_bytes["forward"] == ring_transfers("fwd", 4, kv_bytes, kv_bytes)


def test_backward_sends_gradients_home():
    r = SimResult("striped", "fwd+bwd", 2, 8, {"forward": [[1.0, 1.0]] * 2, "backward": [[2.0, 2.0]] * 2},
                  {"forward": [100, 0, 0], "backward": [100, 150, 50]}, bandwidth_gbs=1e-6, latency_us=0.0)
    # 100 bytes at 1 kB/s = 100 ms per forward step 0; backward 100, 150, then 50 ms for dK/dV going home
    assert r.critical_path_ms == pytest.approx(6.0)
    assert r.critical_path_comm_ms == pytest.approx((100 + 1) + (100 + 150 + 50))
    assert sum(s["compute_ms"] + s["wait_ms"] for s in r.steps()[0]) == pytest.approx(r.critical_path_comm_ms)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="must be a positive multiple of 8"):
        simulate(SimConfig(world_size=4, seq_len=100))  # zigzag needs 2N
    with pytest.raises(ValueError, match=r"heads \(2\) must be a multiple of kv_heads \(4\)"):
        simulate(SimConfig(heads=2, kv_heads=4))
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        simulate(SimConfig(bandwidth_gbs=0))
    with pytest.raises(ValueError, match="must be a positive multiple of 6"):
        sweep(SimConfig(seq_len=32, layouts=("zigzag",)), [2, 3])
    with pytest.raises(ValueError, match=r"documents must be from 1 to seq_len \(16\), got 17"):
        simulate(SimConfig(seq_len=16, documents=17))


def test_simulate_command_single_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert cli.main(["simulate", "--world-size", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "16",
                     "--repeats", "1", "--pass", "fwd+bwd", "--bandwidth", "10", "--latency", "5",
                     "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "with comm ms" in text and "striped" in text and "ideal" in text
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(r["layout"], r["pass"], r["world_size"], r["seq_len"]) for r in rows} == \
        {(name, "fwd+bwd", 2, 64) for name in LAYOUTS}
    for r in rows:
        assert r["time_ms"] == r["critical_path_comm_ms"] >= r["critical_path_ms"] > 0
    assert png.stat().st_size > 10_000


def test_simulate_command_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert cli.main(["simulate", "--world-sizes", "1,2,4", "--tokens-per-rank", "16", "--heads", "1",
                     "--head-dim", "16", "--repeats", "1", "--warmup", "0", "--layouts", "contiguous,striped",
                     "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["world_size"], r["seq_len"], r["layout"]) for r in rows) == \
        [(n, 16 * n, name) for n in (1, 2, 4) for name in ("contiguous", "striped")]
    assert all(r["speedup_vs_contiguous"] > 0 for r in rows)
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--world-sizes", "2,x"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="multiple of 3"):
        cli.main(["simulate", "--world-sizes", "2,3", "--seq-len", "64", "--layouts", "striped"])


@pytest.mark.parametrize("documents", [1, 5])
def test_virtual_ranks_under_a_sliding_window(documents):
    """--window: the virtual ranks compute the windowed ring exactly (against float64 under the window's mask)."""
    from test_windows import windowed_reference

    cfg = SimConfig(world_size=4, seq_len=32, batch=2, heads=4, kv_heads=2, head_dim=8, dtype="float64",
                    passes=("fwd+bwd",), repeats=1, warmup=0, documents=documents, window=5)
    _, outputs = simulate(cfg, keep_outputs=True)
    q, k, v, dout = random_inputs(cfg, torch.device("cpu"))
    out, dq, _, _ = windowed_reference(q, k, v, dout, 5, random_documents(cfg.seq_len, documents, cfg.seed))
    for name in LAYOUTS:
        outs, dqs = outputs[(name, "fwd+bwd")]
        for rank in range(4):
            index = positions(cfg.seq_len, layout=name, rank=rank, world_size=4)
            torch.testing.assert_close(outs[rank], out[:, :, index], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(dqs[rank], dq[:, :, index], rtol=1e-10, atol=1e-10)


def test_simulate_command_with_a_window(capsys):
    assert cli.main(["simulate", "--world-size", "4", "--seq-len", "64", "--heads", "1", "--head-dim", "8",
                     "--repeats", "1", "--warmup", "0", "--window", "9"]) == 0
    text = capsys.readouterr().out
    assert "64 tokens, window 9" in text and "ideal" not in text  # the causal bound is not a window's
    with pytest.raises(SystemExit, match="--window must be >= 1, got 0"):
        cli.main(["simulate", "--seq-len", "64", "--window", "0"])


def test_simulate_command_with_documents(capsys):
    assert cli.main(["simulate", "--world-size", "4", "--seq-len", "64", "--heads", "1", "--head-dim", "8",
                     "--repeats", "1", "--warmup", "0", "--documents", "3"]) == 0
    text = capsys.readouterr().out
    assert "64 tokens in 3 documents" in text and "balance" in text
    assert "ideal" not in text  # perfect balance on one causal sequence is not the bound for documents


def test_documents_are_checked_against_each_swept_length(capsys):
    """With --tokens-per-rank the sequence is N x tokens, not --seq-len: 12 documents fit 2 x 8 tokens."""
    sweep = ["simulate", "--world-sizes", "2,4", "--tokens-per-rank", "8", "--seq-len", "8", "--heads", "1",
             "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--layouts", "striped,contiguous"]
    assert cli.main([*sweep, "--documents", "12"]) == 0
    assert "8 tokens per rank in 12 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"documents must be from 1 to seq_len \(16\), got 17"):
        cli.main([*sweep, "--documents", "17"])
