"""Property-based tests: ring attention is exact for any shape, layout, dtype, mask and scale, stays finite
and correct on extreme inputs, and its memory per rank grows linearly with the tokens per rank.

* World of one: hypothesis ``@given``, in this process (no process group), for broad coverage of shapes.
* Worlds of 2 and 3 ranks: a fixed list of cases drawn by hypothesis (2 per layout and dtype, with fixed seeds:
  the same list on every run) plus the extreme inputs, all run in one launch per world size.

Every case is compared with float64 attention on the whole sequence, on the same inputs rounded to the case's
dtype (so input rounding is not counted). Its error must be within

    2 x (error of single-device attention in that dtype: torch's SDPA on the whole sequence)
    + ABS_ERROR[dtype]
    + 2 x float32 eps x (largest |score|)

The last term is the resolution of the float32 log-sum-exp that the kernels return and the merge works from:
negligible for ordinary scores, 2.4e-3 for scores of 1e4 (single-device attention needs no merge, so it does
not pay it). Errors are relative in norm, with the reference's root-mean-square floored at 0.05 (a gradient
can be exactly zero, e.g. dq when each query sees one key).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ranks import cached, full_inputs, reference, run_ranks, sharded_run
from striped_attention import LAYOUTS, get_layout

DTYPES = ("float32", "float64", "bfloat16", "float16")
RMS_FLOOR = 0.05
# bfloat16, float16: one eps, as the ring rounds twice (each block's kernel output, then the sum) where a single
# device rounds once, which shows on tiny tensors; float32, float64: a few dozen eps.
ABS_ERROR = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 2**-7, "float16": 2**-10}
LSE_EPS = torch.finfo(torch.float32).eps
DRAWN_PER_KIND = 2  # per layout, dtype and world size: 24 cases on 2 ranks, 24 on 3


@dataclass(frozen=True)
class Case:
    layout: str
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    dtype: str
    causal: bool
    scale: float | None
    seed: int = 0
    inputs: str = "normal"  # or one of EXTREMES

    def __str__(self):
        scale = "default" if self.scale is None else f"{self.scale:.3g}"
        return (f"{self.inputs}-{self.layout}-{self.dtype}-{'causal' if self.causal else 'full'}-b{self.batch}"
                f"-h{self.heads}-kv{self.kv_heads}-s{self.seq}-d{self.head_dim}-scale{scale}-seed{self.seed}")


def cases(world: int, layouts=tuple(sorted(LAYOUTS)), dtypes=DTYPES):
    """Hypothesis strategy: a Case whose sequence splits over ``world`` ranks in its layout."""

    @st.composite
    def draw_case(draw):
        layout = draw(st.sampled_from(layouts))
        kv_heads, groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        return Case(
            layout=layout,
            batch=draw(st.integers(1, 2)),
            heads=kv_heads * groups,
            kv_heads=kv_heads,
            seq=draw(st.integers(1, 6)) * get_layout(layout).divisor(world),
            head_dim=draw(st.sampled_from((1, 3, 8, 17, 32, 64, 80))),
            dtype=draw(st.sampled_from(dtypes)),
            causal=draw(st.sampled_from((True, False))),  # causal first: hypothesis starts from the simplest
            scale=draw(st.none() | st.floats(0.01, 2.0)),
            seed=draw(st.integers(0, 2**16)),
        )

    return draw_case()


# ----------------------------------------------------------------------------------------------------------
# Inputs and the check
# ----------------------------------------------------------------------------------------------------------

EXTREMES = ("large-scores", "identical-keys", "fp16-near-overflow")


def extreme_cases(world: int) -> list[Case]:
    """Scores around 1e4 (random and identical keys) in float32 and bfloat16; float16 inputs whose scaled
    scores (~7e4) and products overflow float16 unless accumulated wider; every layout."""
    found = []
    for layout in sorted(LAYOUTS):
        seq = 4 * get_layout(layout).divisor(world)
        for inputs, dtype in [("large-scores", "float32"), ("large-scores", "bfloat16"),
                              ("identical-keys", "float32"), ("identical-keys", "bfloat16"),
                              ("fp16-near-overflow", "float16")]:
            found.append(Case(layout, 1, 4, 2, seq, 64, dtype, True, None, seed=7, inputs=inputs))
    return found


def inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """float64 q, k, v, dout over the whole sequence, exactly representable in the case's dtype."""
    q, k, v, dout = full_inputs(case.seed, case.batch, case.heads, case.kv_heads, case.seq, case.head_dim)
    if case.inputs == "identical-keys":
        k = k[:, :, :1].expand_as(k).clone()
    if case.inputs in ("large-scores", "identical-keys"):
        q = q * (1e4 / max_score(case, q, k))
    if case.inputs == "fp16-near-overflow":
        q, k = q * 35, k * 35  # q.k up to ~6e5 > 65504: must be accumulated in float32
        v = v.clamp(-4, 4) * 1.6e4  # |v| up to 64000 < 65504, so the output is representable
        dout = dout * 1e-3  # keeps the gradients representable too
    dtype = getattr(torch, case.dtype)
    return tuple(t.to(dtype).double() for t in (q, k, v, dout))


def max_score(case: Case, q: torch.Tensor, k: torch.Tensor) -> float:
    """The largest |score| = |q.k| x scale over the whole sequence (each query head against its key head)."""
    scale = 1 / math.sqrt(case.head_dim) if case.scale is None else case.scale
    k = k.repeat_interleave(case.heads // case.kv_heads, dim=1)
    return (q @ k.transpose(-1, -2)).abs().max().item() * scale


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in norm, the reference's RMS floored at RMS_FLOOR; inf when ``got`` is not finite."""
    if not torch.isfinite(got).all():
        return math.inf
    return ((got.double() - want).norm() / max(want.norm().item(), RMS_FLOOR * want.numel() ** 0.5)).item()


def run_case(case: Case) -> tuple[list[tuple[float, float]], float]:
    """([(ring error, single-device error) for out, dq, dk, dv], largest |score|); on every rank of the group."""
    q, k, v, dout = inputs(case)
    dtype = getattr(torch, case.dtype)
    exact = reference(q, k, v, dout, case.causal, case.scale)
    single = reference(*(t.to(dtype) for t in (q, k, v, dout)), case.causal, case.scale)
    ring = sharded_run(case.layout, dtype, q, k, v, dout, causal=case.causal, softmax_scale=case.scale)
    assert all(t.dtype == dtype for t in ring)
    return [(error(r, e), error(s, e)) for r, s, e in zip(ring, single, exact)], max_score(case, q, k)


def check(case: Case, outcome: tuple[list[tuple[float, float]], float]) -> None:
    errors, max_score = outcome
    for name, (ring, single) in zip(("out", "dq", "dk", "dv"), errors):
        assert math.isfinite(single), f"{case}: single-device {name} is not finite; the test inputs are wrong"
        bound = 2 * single + ABS_ERROR[case.dtype] + 2 * LSE_EPS * max_score
        assert ring <= bound, f"{case}: {name} error {ring:.3g} > {bound:.3g} (single device {single:.3g})"


# ----------------------------------------------------------------------------------------------------------
# World of one: hypothesis in this process
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=cases(world=1))
def test_world_of_one_matches_float64(case):
    check(case, run_case(case))


@pytest.mark.parametrize("case", extreme_cases(1), ids=str)
def test_world_of_one_extreme_inputs(case):
    check(case, run_case(case))


# ----------------------------------------------------------------------------------------------------------
# Worlds of 2 and 3: a fixed hypothesis-drawn list, one launch per world size
# ----------------------------------------------------------------------------------------------------------


def drawn_cases(world: int, per_kind: int) -> list[Case]:
    """``per_kind`` hypothesis-drawn cases per layout and dtype, the same on every run (fixed seeds). The first
    of each is hypothesis' simplest case (one head, head_dim 1, one token per rank, causal)."""
    found: list[Case] = []
    for i, (layout, dtype) in enumerate(itertools.product(sorted(LAYOUTS), DTYPES)):

        @seed(1000 * world + i)
        @settings(max_examples=per_kind, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(world, (layout,), (dtype,)))
        def collect(case):
            if case not in found:
                found.append(case)

        collect()
    return found


WORLDS = (2, 3)
CASES = {world: drawn_cases(world, DRAWN_PER_KIND) + extreme_cases(world) for world in WORLDS}


def run_all(cases: list[Case]) -> list[list[tuple[float, float]]]:
    return [run_case(case) for case in cases]


@cached
def results(world: int):
    """Per case: the errors on every rank."""
    per_rank = run_ranks(run_all, world, CASES[world])
    return {case: [errors[i] for errors in per_rank] for i, case in enumerate(CASES[world])}


@pytest.mark.parametrize(
    "world, case", [(w, c) for w in WORLDS for c in CASES[w]], ids=[f"N{w}-{c}" for w in WORLDS for c in CASES[w]]
)
def test_ranks_match_float64(world, case):
    for errors in results(world)[case]:
        check(case, errors)


# ----------------------------------------------------------------------------------------------------------
# Memory per rank grows like S/N (benchmarks/memory.py measures it; see the README)
# ----------------------------------------------------------------------------------------------------------

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def ring_peaks(local_lengths: tuple[int, ...]) -> list[int]:
    """On each rank: peak bytes of ring attention forward+backward for each number of tokens per rank."""
    import torch.distributed as dist

    import memory  # benchmarks/memory.py

    n = dist.get_world_size()
    return [memory.peak_bytes(memory.MemoryConfig("ring", n, c * n, 4, 4, 64, "float32", "striped"))
            for c in local_lengths]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures memory through /proc")
def test_memory_per_rank_grows_linearly_with_tokens_per_rank(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # freed tensors leave the resident set
    tensor_bytes = 4 * 1024 * 64 * 4  # one (heads, tokens per rank, head_dim) float32 tensor at 1024 tokens
    for small, large in run_ranks(ring_peaks, 2, (1024, 4096)):
        assert small >= 8 * tensor_bytes, "q, k, v, dout, out, dq, dk, dv (8 MiB) should all be counted"
        assert 3.5 <= large / small <= 4.5, f"4x the tokens per rank took {large / small:.2f}x the memory"
