"""The analytic model: pair counts against brute force and the schedule, the speedup formula, the CLI."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from striped_attention import LAYOUTS, cli
from striped_attention.models.llama import LlamaConfig
from striped_attention.plan import (
    HARDWARE, MODELS, attention_fraction, critical_pairs, critical_path_s, document_step_pairs, exact_step_pairs,
    max_training_speedup, plan, ring_transfers, step_pairs, theoretical_max_speedup,
)
from striped_attention.ring import source_rank


def brute_force_pairs(name, q_rank, kv_rank, c, n) -> int:
    """Unmasked (query, key) pairs between two ranks' tokens, from their global positions alone."""
    layout = LAYOUTS[name]
    pq, pk = layout.positions(c * n, q_rank, n), layout.positions(c * n, kv_rank, n)
    return int((pq[:, None] >= pk[None, :]).sum())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pair_counts_brute_force_schedule_and_closed_form_agree(name):
    for n in range(1, 7):
        for c in (2, 4, 6, 10):
            for step in range(n):
                per_rank = []
                for rank in range(n):
                    source = source_rank(rank, step, n)
                    want = brute_force_pairs(name, rank, source, c, n)
                    scheduled = sum(b.pairs() for b in LAYOUTS[name].blocks(rank, source, c, n, True))
                    closed = step_pairs(name, rank=rank, step=step, local_len=c, world_size=n)
                    assert want == scheduled == closed, (name, n, c, rank, step)
                    per_rank.append(want)
                assert critical_pairs(name, step=step, local_len=c, world_size=n) == max(per_rank)
            total = sum(step_pairs(name, rank=r, step=i, local_len=c, world_size=n) for r in range(n) for i in range(n))
            assert total == c * n * (c * n + 1) // 2  # every causal pair of the sequence, exactly once


@pytest.mark.parametrize("n", [1, 2, 8, 32])
def test_critical_path_fraction_tends_to_the_theory(n):
    for name in LAYOUTS:
        c = 4096
        crit = Fraction(sum(critical_pairs(name, step=i, local_len=c, world_size=n) for i in range(n)), n * c * c)
        # the exact count differs from the continuum fraction by the diagonal: c/2 per step at most
        assert abs(crit - Fraction(attention_fraction(name, n)).limit_denominator(10**6)) <= Fraction(1, 2 * c)
    assert attention_fraction("contiguous", 8) == 1 - 1 / 16
    assert attention_fraction("striped", 8) == attention_fraction("zigzag", 8) == 0.5


def test_theoretical_max_speedup_by_hand():
    # d=2, d_ff=4, S=8, N=2: matmuls 3*(8*4 + 6*2*4) = 240, attention 3.5*4*8*2 = 224 per token and layer;
    # contiguous pays 3/4 of attention (408), striped 1/2 (352)
    assert theoretical_max_speedup(d_model=2, d_ff=4, seq_len=8, sp_degree=2) == pytest.approx(408 / 352)
    assert theoretical_max_speedup(d_model=2, d_ff=4, seq_len=8, sp_degree=2, attention_cost_factor=2.0) == \
        pytest.approx((240 + 0.75 * 448) / (240 + 0.5 * 448))


def test_theoretical_max_speedup_limits():
    kw = dict(d_model=2048, d_ff=5504, sp_degree=8)
    assert theoretical_max_speedup(seq_len=2**40, **kw) == pytest.approx(15 / 8, rel=1e-4)  # attention only
    assert theoretical_max_speedup(seq_len=1, **kw) == pytest.approx(1.0, abs=1e-3)  # no attention to speak of
    assert theoretical_max_speedup(d_model=2048, d_ff=5504, seq_len=4096, sp_degree=1) == 1.0
    paper = theoretical_max_speedup(seq_len=262144, attention_cost_factor=2.0, **kw)
    assert 1.8 < paper < 1.875
    assert theoretical_max_speedup(seq_len=262144, **kw) < paper  # cheaper attention, smaller share
    assert max_training_speedup("zigzag", seq_len=262144, **kw) == theoretical_max_speedup(seq_len=262144, **kw)
    assert max_training_speedup("contiguous", seq_len=262144, **kw) == 1.0
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        theoretical_max_speedup(d_model=8, d_ff=8, seq_len=0, sp_degree=2)
    with pytest.raises(ValueError, match="attention_cost_factor"):
        theoretical_max_speedup(d_model=8, d_ff=8, seq_len=8, sp_degree=2, attention_cost_factor=0)


def test_ring_transfers_follow_the_engine():
    assert ring_transfers("fwd", 4, 10, 3) == [10, 10, 10, 0, 0]
    assert ring_transfers("bwd", 4, 10, 3) == [10, 13, 13, 3, 3]  # dK/dV one step behind, then home
    assert ring_transfers("bwd", 1, 10, 3) == [0, 0]
    assert ring_transfers("bwd", 4, 10, 3, last_step=1) == [10, 3, 0, 0, 3]  # the ring stops after step 1
    assert ring_transfers("bwd", 4, 10, 3, last_step=0) == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="pass must be"):
        ring_transfers("both", 2, 1, 1)


def test_critical_path_takes_the_slower_of_compute_and_transfer():
    transfers = ring_transfers("bwd", 3, 100, 50)  # [100, 150, 50, 50]
    assert critical_path_s([1.0, 1.0, 1.0], transfers, bandwidth=1e9, latency=0.0) == pytest.approx(3.0 + 50e-9)
    assert critical_path_s([0.0, 0.0, 0.0], transfers, bandwidth=100, latency=0.5) == pytest.approx(
        (1 + 0.5) + (1.5 + 0.5) + (0.5 + 0.5) + (0.5 + 0.5))
    with pytest.raises(ValueError, match="need 3 transfers"):
        critical_path_s([1.0, 1.0], [0.0], 1.0, 0.0)


def test_plan_for_the_papers_a100_setting():
    p = plan(MODELS["1b"], HARDWARE["a100-nvlink"], seq_len=262144, sp_degree=8)
    step = {(s.layout, s.pass_): s for s in p.steps}
    assert set(step) == {(name, ps) for name in LAYOUTS for ps in ("fwd", "bwd")}
    c = 262144 // 8
    ratio = step["contiguous", "fwd"].compute_s / step["striped", "fwd"].compute_s
    assert ratio == pytest.approx(c * c / (c * (c + 1) / 2))
    assert step["striped", "bwd"].compute_s == pytest.approx(2.5 * step["striped", "fwd"].compute_s)
    assert step["striped", "bwd"].transfer_s > step["striped", "fwd"].transfer_s  # dK/dV travel too
    assert all(s.hidden for s in p.steps)  # 32k tokens per device hide NVLink easily
    assert all(s.min_block < c for s in p.steps)
    assert step["contiguous", "fwd"].min_block < step["striped", "fwd"].min_block  # full blocks hide more
    assert step["striped", "fwd"].speedup == pytest.approx(theoretical_max_speedup(
        d_model=2048, d_ff=5504, seq_len=262144, sp_degree=8, attention_cost_factor=2.0))
    assert step["contiguous", "fwd"].critical_path_s > 1.8 * step["striped", "fwd"].critical_path_s
    assert 0.9e9 < MODELS["1b"].num_params() < 1.4e9
    assert p.memory.total() < p.memory.total(checkpointed=False)
    assert p.memory.model_state_sharded == pytest.approx(p.memory.model_state / 8)  # FSDP over the 8 devices
    assert p.memory.total(sharded=True) == pytest.approx(p.memory.total() - 7 / 8 * p.memory.model_state)


def test_plan_over_infiniband_does_not_hide_small_blocks():
    p = plan(MODELS["7b"], HARDWARE["a100-ib"], seq_len=8 * 512, sp_degree=8)
    fwd = {s.layout: s for s in p.steps if s.pass_ == "fwd"}
    assert not fwd["striped"].hidden and fwd["striped"].min_block > 512
    # at the smallest hiding block, the balanced step's compute covers its transfer; one token less does not
    m, hw, b = MODELS["7b"], HARDWARE["a100-ib"], fwd["striped"].min_block
    work = lambda c: 0.5 * c * c * 4 * m.d_model * hw.attention_cost_factor / hw.flops  # noqa: E731
    send = lambda c: 2 * c * m.kv_dim * 2 / hw.bandwidth + hw.latency  # noqa: E731
    assert work(b) >= send(b) and work(b - 1) < send(b - 1)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 16"):
        plan(MODELS["1b"], HARDWARE["tpu-v4"], seq_len=1000, sp_degree=8)  # zigzag needs 2N
    with pytest.raises(ValueError, match="dtype"):
        plan(MODELS["1b"], HARDWARE["tpu-v4"], seq_len=1024, sp_degree=8, dtype="int8")
    with pytest.raises(ValueError, match=r"n_heads \(32\) must be a multiple of n_kv_heads \(5\)"):
        LlamaConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=5, d_ff=11008)
    with pytest.raises(ValueError, match="unknown layout .diagonal."):
        step_pairs("diagonal", rank=0, step=0, local_len=4, world_size=2)


def test_plan_command(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "7b", "--hardware", "tpu-v4", "--seq-len", "65536", "--sp-degree", "16",
                     "--kv-heads", "8", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "TPU v4" in out and "8 kv heads" in out and "hides from" in out
    data = json.loads(path.read_text())
    assert {(r["layout"], r["pass"]) for r in data["results"]} == {(n, p) for n in LAYOUTS for p in ("fwd", "bwd")}
    assert all(r["world_size"] == 16 and r["seq_len"] == 65536 and r["time_ms"] > 0 for r in data["results"])
    assert data["model"]["n_kv_heads"] == 8


def test_plan_command_overrides_and_errors(capsys):
    assert cli.main(["plan", "--d-model", "1024", "--d-ff", "4096", "--layers", "2", "--heads", "8",
                     "--flops", "100", "--bandwidth", "10", "--latency", "3", "--layouts", "striped"]) == 0
    out = capsys.readouterr().out
    assert "100 TFLOP/s, 10 GB/s, 3 us" in out and "8 heads / 8 kv heads" in out and "contiguous  fwd" not in out
    with pytest.raises(SystemExit, match="must be a positive multiple of 8"):
        cli.main(["plan", "--seq-len", "1001", "--sp-degree", "8", "--layouts", "striped"])
    with pytest.raises(SystemExit):
        cli.main(["plan", "--layouts", "diagonal"])
    assert "unknown layout" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Packed documents: exact counts in place of the closed forms
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_document_counts_cover_the_document_mask_and_one_document_is_the_closed_form(name):
    for n, c in ((1, 6), (2, 4), (3, 10), (4, 6)):
        one = document_step_pairs(name, [0, n * c], n)
        assert one == [[step_pairs(name, rank=r, step=i, local_len=c, world_size=n) for r in range(n)]
                       for i in range(n)]
        cu = [0, 1, c // 2 + 1, c // 2 + 1, n * c - 2, n * c]  # an empty document among them
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        assert sum(map(sum, document_step_pairs(name, cu, n))) == sum(x * (x + 1) // 2 for x in lengths)


def test_plan_with_documents():
    one_document = plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=8192, sp_degree=4, cu_seqlens=[0, 8192])
    closed_form = plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=8192, sp_degree=4)
    for got, want in zip(one_document.steps, closed_form.steps, strict=True):  # exact counts, not long-block limits
        assert (got.compute_s, got.critical_path_s) == (want.compute_s, want.critical_path_s)
        assert got.speedup == pytest.approx(want.speedup, rel=1e-3) and abs(got.min_block / want.min_block - 1) < 1e-3
    cu, seq = [0, 4800, 32000, 33600, 96000, 131072], 131072
    p = plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=seq, sp_degree=4, cu_seqlens=cu)
    fwd = {s.layout: s for s in p.steps if s.pass_ == "fwd"}
    counts = {name: document_step_pairs(name, cu, 4) for name in LAYOUTS}
    c = seq // 4
    for name in LAYOUTS:  # the slowest device's pairs at each step, over the unmasked N c^2
        assert p.attention_share[name] == pytest.approx(sum(map(max, counts[name])) / (4 * c * c))
    assert p.attention_share["striped"] < 1.01 * sum(map(sum, counts["striped"])) / 4 / (4 * c * c)  # balanced
    m = MODELS["1b"]
    linear, attention = 3 * (8 * m.d_model**2 + 6 * m.d_model * m.d_ff), 3.5 * 4 * seq * m.d_model  # factor 1
    cost = {name: linear + p.attention_share[name] * attention for name in LAYOUTS}
    for name in LAYOUTS:
        assert fwd[name].speedup == pytest.approx(cost["contiguous"] / cost[name])
    assert fwd["striped"].speedup > 1.5 and fwd["zigzag"].speedup < 1.0  # documents unbalance zigzag here
    assert all(s.hidden for s in p.steps)
    assert fwd["striped"].critical_path_s < 0.5 * fwd["contiguous"].critical_path_s
    with pytest.raises(ValueError, match="cu_seqlens end at 8000"):
        plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=8192, sp_degree=4, cu_seqlens=[0, 8000])


def test_plan_command_with_documents(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert cli.main(["plan", "--seq-len", "16384", "--sp-degree", "8", "--documents", "6", "--seed", "3",
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16,384 tokens in 6 documents" in out and "attention alone, the slowest devices' pairs" in out
    data = json.loads(path.read_text())
    assert len(data["cu_seqlens"]) == 7 and set(data["attention_share"]) == set(LAYOUTS)
    with pytest.raises(SystemExit, match="--documents must be from 1"):
        cli.main(["plan", "--documents", "0"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_window_counts_cover_the_window_and_contiguous_stops_early(name):
    """exact_step_pairs under a window: every in-window pair of the sequence once (with documents too), and a
    window of at most one share leaves contiguous's steps after the first empty."""
    for n, c in ((2, 8), (3, 10), (4, 6)):
        for window in (1, 4, c, c + 3, 2 * c + 1):
            counts = exact_step_pairs(name, n, n * c, window=window)
            assert sum(map(sum, counts)) == sum(min(p + 1, window) for p in range(n * c))
            if name == "contiguous":  # a share's first query reaches back window - 1 tokens: this many shares
                last = -(-(window - 1) // c)
                assert all(map(sum, counts[: min(last, n - 1) + 1])) and not any(map(sum, counts[last + 1:]))
        cu = [0, 5, 5, n * c - 3, n * c]
        counts = exact_step_pairs(name, n, n * c, cu_seqlens=cu, window=4)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        assert sum(map(sum, counts)) == sum(min(p + 1, 4) for length in lengths for p in range(length))


def test_plan_with_a_window(tmp_path, capsys):
    p = plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=32768, sp_degree=4, window=2048)
    c = 32768 // 4
    for name in LAYOUTS:  # exact counts: the slowest device's pairs at each step over the unmasked N c^2
        counts = exact_step_pairs(name, 4, 32768, window=2048)
        assert p.attention_share[name] == pytest.approx(sum(map(max, counts)) / (4 * c * c))
    fwd = {s.layout: s for s in p.steps if s.pass_ == "fwd"}
    assert p.window == 2048 and fwd["contiguous"].critical_path_s < fwd["zigzag"].critical_path_s
    whole = plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=32768, sp_degree=4, window=32768)
    assert whole.window is None and whole.steps == plan(MODELS["1b"], HARDWARE["h100-nvlink"], seq_len=32768,
                                                        sp_degree=4).steps
    path = tmp_path / "plan.json"
    assert cli.main(["plan", "--seq-len", "16384", "--sp-degree", "8", "--window", "1024", "--json", str(path)]) == 0
    assert "16,384 tokens, sliding window 1,024" in capsys.readouterr().out
    assert json.loads(path.read_text())["window"] == 1024
    with pytest.raises(SystemExit, match="window must be >= 1"):
        cli.main(["plan", "--window", "0"])
