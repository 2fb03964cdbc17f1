"""`striped-attention plan`: the analytic model of a causal ring, for hardware you do not have. Nothing runs.

For a model shape, a sequence length, a sequence-parallel degree N and a device (peak FLOP/s, link
bandwidth and latency) it predicts, per layout: the compute and the transfer of one ring step on the
slowest device, whether the transfer hides behind the compute (and from which block size on), the
attention critical path of one layer, the memory each device needs, and the theoretical maximum
end-to-end training speedup over the contiguous layout.

Assumptions (those of the Striped Attention paper): only matmul FLOPs count and run at the device's peak;
communication overlaps compute; per token and layer, the non-attention matmuls cost
``8*d_model**2 + 6*d_model*d_ff`` FLOPs forward, attention ``4*seq_len*d_model`` forward when unmasked;
backward costs 2x forward for ordinary matmuls and 2.5x for attention (it recomputes the scores).

With packed documents (``--documents N``: the sequence cut at N - 1 random points, as ``bench`` and
``simulate`` cut it) or a sliding window (``--window W``) the closed forms give way to exact counts: the pairs
each device computes at each ring step, from the layout's pieces cut at the documents and to the window
(:func:`exact_step_pairs`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from .bench import random_documents
from .cli import UsageError, describe
from .layouts import BALANCED, LAYOUTS, Documents, cut_at_documents, for_documents, get_layout, with_window
from .models.llama import PRESETS, LlamaConfig
from .ring import source_rank

__all__ = [
    "Hardware", "MODELS", "HARDWARE", "theoretical_max_speedup", "max_training_speedup",
    "attention_fraction", "step_pairs", "critical_pairs", "document_step_pairs", "ring_transfers", "transfer_s",
    "critical_path_s", "plan", "Plan", "StepCost", "Memory",
]

BACKWARD_FACTOR = {"fwd": 1.0, "bwd": 2.5}  # attention FLOPs relative to its forward pass
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GRAD_BYTES = 4  # dK/dV accumulate in float32 and travel the ring in float32
ADAM_BYTES_PER_PARAM = 16  # bf16 weights and grads, float32 master weights and two Adam moments


@dataclass(frozen=True)
class Hardware:
    """One device and its link to the next device of the ring."""

    name: str
    flops: float  # peak dense matmul FLOP/s in the training dtype
    bandwidth: float  # bytes/s, one direction of the link to the ring neighbour
    latency: float  # seconds added to every transfer
    attention_cost_factor: float = 1.0  # attention matmuls cost this many times their FLOPs at peak
    memory: float | None = None  # bytes of device memory


# The paper's Llama shapes (d_model, d_ff, layers, heads; kv_heads = heads): the model presets themselves.
MODELS = {name: PRESETS[name] for name in ("1b", "3b", "7b")}

# Peak bf16 dense FLOP/s and one direction of one link. Latencies are rough per-message costs.
# A100's attention matmuls ran in TF32 in the paper, at half the bf16 rate: attention_cost_factor 2.
HARDWARE = {
    "a100-nvlink": Hardware("A100 SXM 80GB, NVLink 3", 312e12, 300e9, 5e-6, 2.0, 80e9),
    "a100-ib": Hardware("A100 SXM 80GB, InfiniBand HDR 200 Gb/s per GPU", 312e12, 25e9, 10e-6, 2.0, 80e9),
    "h100-nvlink": Hardware("H100 SXM 80GB, NVLink 4", 989e12, 450e9, 5e-6, 1.0, 80e9),
    "tpu-v4": Hardware("TPU v4, one ICI link", 275e12, 45e9, 5e-6, 1.0, 32 * 2**30),
}


# ----------------------------------------------------------------------------------------------------------
# The closed forms: work per (rank, step), the critical path, the end-to-end speedup
# ----------------------------------------------------------------------------------------------------------


def _check_ring(local_len: int, world_size: int, layout: str) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if local_len < 1:
        raise ValueError(f"local_len must be >= 1, got {local_len}")
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"layout 'zigzag' needs an even local_len (two chunks per rank), got {local_len}")
    get_layout(layout)


def step_pairs(layout: str, *, rank: int, step: int, local_len: int, world_size: int) -> int:
    """Unmasked (query, key) pairs ``rank`` computes at ring ``step``, in closed form (causal).

    ``local_len`` = c tokens per rank. With s the source rank of the step: contiguous computes c*c pairs
    for s < r, the triangle c(c+1)/2 for s = r, nothing for s > r; striped the triangle c(c+1)/2 for s <= r
    and c(c-1)/2 for s > r; zigzag the triangle for s = r and c*c/2 otherwise.
    """
    _check_ring(local_len, world_size, layout)
    if not (0 <= rank < world_size and 0 <= step < world_size):
        raise ValueError(f"rank {rank} and step {step} must lie in [0, {world_size})")
    c, s = local_len, source_rank(rank, step, world_size)
    triangle = c * (c + 1) // 2
    if layout == "contiguous":
        return c * c if s < rank else triangle if s == rank else 0
    if layout == "striped":
        return triangle if s <= rank else c * (c - 1) // 2
    if layout == "zigzag":
        return triangle if s == rank else c * c // 2
    raise ValueError(f"no closed form for layout {layout!r}; known: {sorted(LAYOUTS)}")


def critical_pairs(layout: str, *, step: int, local_len: int, world_size: int) -> int:
    """Pairs of the slowest rank at ``step``: the triangle at step 0; after it c*c (contiguous),
    c(c+1)/2 (striped) or c*c/2 (zigzag)."""
    _check_ring(local_len, world_size, layout)
    c = local_len
    if step == 0 or layout == "striped":
        return c * (c + 1) // 2
    return c * c if layout == "contiguous" else c * c // 2


def document_step_pairs(layout: str, cu_seqlens, world_size: int) -> list[list[int]]:
    """[step][rank]: the (query, key) pairs each rank computes at each ring step, exactly, when a causal
    sequence packs the documents of ``cu_seqlens`` (ring_attention's offsets)."""
    return exact_step_pairs(layout, world_size, tuple(cu_seqlens)[-1], cu_seqlens=cu_seqlens)


def exact_step_pairs(layout: str, world_size: int, seq_len: int, *, cu_seqlens=None,
                     window: int | None = None) -> list[list[int]]:
    """[step][rank]: the (query, key) pairs each rank computes at each ring step of a causal sequence of
    ``seq_len`` tokens, packing the documents ``cu_seqlens`` (None: one) under a sliding ``window`` (None:
    none), counted from the layout's pieces as the ring computes them."""
    pieces = cut_at_documents(layout, None if cu_seqlens is None else tuple(cu_seqlens), world_size)
    pieces.check(seq_len, world_size)
    pieces = with_window(pieces, window, seq_len)
    c = seq_len // world_size
    return [[sum(b.pairs() for b in pieces.blocks(r, source_rank(r, step, world_size), c, world_size, True))
             for r in range(world_size)] for step in range(world_size)]


def attention_fraction(layout: str, sp_degree: int) -> float:
    """Critical-path cost of causal attention as a fraction of unmasked attention, for long sequences:
    contiguous pays 1 - 1/(2N) (a triangle, then a full block at each of the N-1 other steps),
    striped and zigzag pay 1/2."""
    if sp_degree < 1:
        raise ValueError(f"sp_degree must be >= 1, got {sp_degree}")
    get_layout(layout)
    return 1 - 1 / (2 * sp_degree) if layout == "contiguous" else 0.5


def theoretical_max_speedup(
    *, d_model: int, d_ff: int, seq_len: int, sp_degree: int, attention_cost_factor: float = 1.0
) -> float:
    """End-to-end training speedup of striped over contiguous under the paper's assumptions (float > 1).

    Communication is fully hidden and only matmul FLOPs count. Per token and layer the non-attention
    matmuls cost 8*d_model^2 + 6*d_model*d_ff forward and unmasked attention 4*seq_len*d_model forward;
    backward costs 2x (matmuls) and 2.5x (attention) the forward. ``attention_cost_factor`` multiplies
    attention's cost (2.0 for A100's TF32 attention, 1.0 for TPU). Contiguous pays 1 - 1/(2*sp_degree) of
    unmasked attention, striped 1/2.
    """
    return max_training_speedup("striped", d_model=d_model, d_ff=d_ff, seq_len=seq_len, sp_degree=sp_degree,
                                attention_cost_factor=attention_cost_factor)


def max_training_speedup(layout: str, *, d_model: int, d_ff: int, seq_len: int, sp_degree: int,
                         attention_cost_factor: float = 1.0) -> float:
    """Like :func:`theoretical_max_speedup`, for any layout over contiguous (1.0 for contiguous itself)."""
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("seq_len", seq_len), ("sp_degree", sp_degree)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if attention_cost_factor <= 0:
        raise ValueError(f"attention_cost_factor must be > 0, got {attention_cost_factor}")
    fractions = {name: attention_fraction(name, sp_degree) for name in ("contiguous", layout)}
    return _speedup(fractions, layout, d_model=d_model, d_ff=d_ff, seq_len=seq_len,
                    attention_cost_factor=attention_cost_factor)


def _speedup(fractions: dict[str, float], layout: str, *, d_model: int, d_ff: int, seq_len: int,
             attention_cost_factor: float) -> float:
    """Training cost of contiguous over ``layout``'s, each paying ``fractions[name]`` of unmasked attention on
    its critical path."""
    linear = 3 * (8 * d_model**2 + 6 * d_model * d_ff)  # per token and layer: forward + 2x backward
    attention = (1 + BACKWARD_FACTOR["bwd"]) * 4 * seq_len * d_model * attention_cost_factor  # unmasked
    return (linear + fractions["contiguous"] * attention) / (linear + fractions[layout] * attention)


def ring_transfers(pass_: str, world_size: int, kv_bytes: float, grad_bytes: float,
                   last_step: int | None = None) -> list[float]:
    """Bytes each rank sends to its neighbour per ring step, as the ring engine sends them.

    Returns N + 1 numbers: entry i (< N) overlaps the compute of step i; entry N is sent after the last step
    and overlaps nothing. Forward: the next K/V block at every step before the last. Backward (``"bwd"``):
    also the dK/dV of the previous step's block from step 1 on, and finally the last one going home.
    ``last_step``: where the ring stops (:func:`ring.last_step`; default N - 1); nothing travels after it.
    """
    if pass_ not in BACKWARD_FACTOR:
        raise ValueError(f"pass must be one of {sorted(BACKWARD_FACTOR)}, got {pass_!r}")
    last = world_size - 1 if last_step is None else last_step
    sizes = [kv_bytes * (i < last) for i in range(world_size)] + [0.0]
    if pass_ == "bwd" and last > 0:
        sizes = [b + grad_bytes * (1 <= i <= last or i == world_size) for i, b in enumerate(sizes)]
    return sizes


def transfer_s(nbytes: float, bandwidth: float, latency: float) -> float:
    """Seconds to send ``nbytes`` (bytes/s bandwidth, seconds of latency); nothing to send costs nothing."""
    return nbytes / bandwidth + latency if nbytes else 0.0


def critical_path_s(step_compute_s: list[float], transfers: list[float], bandwidth: float, latency: float) -> float:
    """Seconds of one pass: per step max(slowest rank's compute, the transfer it overlaps), then the tail.

    ``step_compute_s``: N per-step compute times of the slowest rank; ``transfers``: from :func:`ring_transfers`.
    """
    if len(transfers) != len(step_compute_s) + 1:
        raise ValueError(
            f"need {len(step_compute_s) + 1} transfers for {len(step_compute_s)} steps, got {len(transfers)}"
        )
    steps = sum(max(c, transfer_s(b, bandwidth, latency)) for c, b in zip(step_compute_s, transfers))
    return steps + transfer_s(transfers[-1], bandwidth, latency)


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """One layout and pass of one layer, on the slowest device; times in seconds."""

    layout: str
    pass_: str  # "fwd" or "bwd"
    compute_s: float  # a ring step after the first (the step repeated N-1 times)
    transfer_s: float  # the transfer that step overlaps
    min_block: int  # smallest tokens per device for which that transfer hides behind the compute
    critical_path_s: float  # the whole ring of this pass: every step, communication overlapped
    speedup: float  # theoretical maximum end-to-end training speedup over contiguous

    @property
    def hidden(self) -> bool:
        return self.compute_s >= self.transfer_s


@dataclass(frozen=True)
class Memory:
    """Bytes per device; the same for every layout (each device holds seq_len / N tokens of everything)."""

    model_state: float  # weights, gradients and Adam state, replicated (16 bytes per parameter)
    model_state_sharded: float  # the same sharded over the N devices (FSDP, train --fsdp)
    activations: float  # saved for backward by every layer, no recomputation
    activations_checkpointed: float  # each layer's input, plus one layer recomputed at a time
    logits: float  # float32 logits of this device's tokens
    ring_buffers: float  # K/V in hand and in flight, float32 accumulators, dK/dV in flight

    def total(self, checkpointed: bool = True, sharded: bool = False) -> float:
        acts = self.activations_checkpointed if checkpointed else self.activations
        state = self.model_state_sharded if sharded else self.model_state
        return state + acts + self.logits + self.ring_buffers


@dataclass(frozen=True)
class Plan:
    model: LlamaConfig
    hardware: Hardware
    seq_len: int
    sp_degree: int
    batch: int
    dtype: str
    steps: tuple[StepCost, ...]
    memory: Memory
    attention_share: dict[str, float]  # per layout: critical-path attention pairs / unmasked pairs (N c^2)
    cu_seqlens: tuple[int, ...] | None = None  # packed documents, if any
    window: int | None = None  # sliding window, if any (shorter than the sequence)

    @property
    def local_len(self) -> int:
        return self.seq_len // self.sp_degree


def _smallest_hiding_block(work_per_c2: float, bytes_per_c: float, hw: Hardware) -> int:
    """Smallest c with work_per_c2 * c^2 / flops >= bytes_per_c * c / bandwidth + latency."""
    a, b, lat = work_per_c2 / hw.flops, bytes_per_c / hw.bandwidth, hw.latency
    return math.ceil((b + math.sqrt(b * b + 4 * a * lat)) / (2 * a))


def _memory(m: LlamaConfig, c: int, n: int, batch: int, nbytes: int) -> Memory:
    tokens = batch * c
    per_layer = tokens * ((6 * m.d_model + 2 * m.kv_dim + 3 * m.d_ff) * nbytes + 4 * m.n_heads)
    kv_block = 2 * tokens * m.kv_dim
    ring = max(
        2 * kv_block * nbytes + tokens * (m.d_model + m.n_heads) * 4,  # forward: K/V in hand + arriving, out/lse
        2 * kv_block * nbytes + 2 * kv_block * GRAD_BYTES + tokens * m.d_model * 4,  # backward: + dK/dV, dQ
    )
    return Memory(
        model_state=m.num_params() * ADAM_BYTES_PER_PARAM,
        model_state_sharded=m.num_params() * ADAM_BYTES_PER_PARAM / n,
        activations=m.n_layers * per_layer,
        activations_checkpointed=m.n_layers * tokens * m.d_model * nbytes + per_layer,
        logits=tokens * m.vocab_size * 4,
        ring_buffers=ring,
    )


def plan(model: LlamaConfig, hardware: Hardware, *, seq_len: int, sp_degree: int, batch: int = 1,
         dtype: str = "bfloat16", layouts: tuple[str, ...] = tuple(LAYOUTS), cu_seqlens=None,
         window: int | None = None) -> Plan:
    """Predict every layout's ring for ``model`` on ``sp_degree`` devices of ``hardware`` (see module doc);
    ``cu_seqlens``: packed documents (ring_attention's offsets, ending at ``seq_len``), ``window``: a sliding
    window (every layer's), both counted exactly."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if batch < 1 or sp_degree < 1:
        raise ValueError(f"batch and sp_degree must be >= 1, got {batch} and {sp_degree}")
    if hardware.flops <= 0 or hardware.bandwidth <= 0 or hardware.latency < 0:
        raise ValueError(f"hardware needs flops > 0, bandwidth > 0 and latency >= 0, got {hardware}")
    for name in layouts:
        get_layout(for_documents(name, None, sp_degree)).check(seq_len, sp_degree)
    if BALANCED in layouts and cu_seqlens is None:
        raise ValueError(f"layout {BALANCED!r} orders packed documents: give cu_seqlens (--documents N)")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    nbytes, n = DTYPE_BYTES[dtype], sp_degree
    c = seq_len // n
    if cu_seqlens is not None:
        cu_seqlens = Documents("contiguous", cu_seqlens).cu_seqlens
        if cu_seqlens[-1] != seq_len:
            raise ValueError(f"cu_seqlens end at {cu_seqlens[-1]}, but the sequence has {seq_len} tokens")
    window = window if window is not None and window < seq_len else None  # a whole-sequence one is none
    exact = cu_seqlens is not None or window is not None
    critical = {  # per layout, the slowest device's pairs at each step
        name: [max(pairs) for pairs in exact_step_pairs(name, n, seq_len, cu_seqlens=cu_seqlens, window=window)]
        if exact else [critical_pairs(name, step=i, local_len=c, world_size=n) for i in range(n)]
        for name in dict.fromkeys(("contiguous", *layouts))
    }
    share = {  # of unmasked attention on the critical path: exact with documents or a window, else for long blocks
        name: sum(pairs) / (n * c * c) if exact else attention_fraction(name, n)
        for name, pairs in critical.items()
    }
    pair_flops = 4 * model.head_dim * model.n_heads * batch * hardware.attention_cost_factor  # one pair, forward
    kv_bytes_per_token = 2 * model.kv_dim * batch * nbytes
    grad_bytes_per_token = 2 * model.kv_dim * batch * GRAD_BYTES
    steps = []
    for name in layouts:
        speedup = _speedup(share, name, d_model=model.d_model, d_ff=model.d_ff, seq_len=seq_len,
                           attention_cost_factor=hardware.attention_cost_factor)
        steady = min(1, n - 1)  # a step after the first, or step 0 for one device
        balance = 1.0 if name == "contiguous" else 0.5  # steady-step pairs per c^2, for long blocks
        if exact:  # as these documents' proportions and the window give it
            balance = critical[name][steady] / (c * c)
        last = max((i for i, pairs in enumerate(critical[name]) if pairs), default=0)  # the ring stops there
        for pass_, factor in BACKWARD_FACTOR.items():
            flops = pair_flops * factor / hardware.flops
            compute = [pairs * flops for pairs in critical[name]]
            transfers = ring_transfers(pass_, n, c * kv_bytes_per_token, c * grad_bytes_per_token, last)
            per_token = kv_bytes_per_token + (grad_bytes_per_token if pass_ == "bwd" else 0)
            steps.append(StepCost(
                layout=name, pass_=pass_,
                compute_s=compute[steady],
                transfer_s=transfer_s(transfers[steady], hardware.bandwidth, hardware.latency),
                min_block=_smallest_hiding_block(max(balance, 1e-9) * pair_flops * factor, per_token, hardware),
                critical_path_s=critical_path_s(compute, transfers, hardware.bandwidth, hardware.latency),
                speedup=speedup,
            ))
    return Plan(model, hardware, seq_len, n, batch, dtype, tuple(steps), _memory(model, c, n, batch, nbytes),
                {name: share[name] for name in layouts}, cu_seqlens, window)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict ring step times, overlap, memory and speedup for a model on hardware you do not have",
        description=describe(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model (a preset, optionally overridden field by field)")
    m.add_argument("--model", choices=sorted(MODELS), default="1b",
                   help="the paper's Llama shapes: 1b = 2048/5504/22/16, 3b = 3200/8640/26/32, "
                        "7b = 4096/11008/32/32 (d_model/d_ff/layers/heads) (default: %(default)s)")
    m.add_argument("--d-model", metavar="D", type=int, help="hidden size, channels (overrides the preset)")
    m.add_argument("--d-ff", metavar="D", type=int, help="MLP hidden size, channels (overrides the preset)")
    m.add_argument("--layers", metavar="N", type=int, help="decoder layers (overrides the preset)")
    m.add_argument("--heads", metavar="N", type=int, help="query heads (overrides the preset)")
    m.add_argument("--kv-heads", metavar="N", type=int,
                   help="key/value heads, GQA when fewer than --heads (default: --heads)")
    m.add_argument("--vocab", metavar="TOKENS", type=int,
                   help="vocabulary size, tokens, for parameters and logits (default: 32000)")
    w = p.add_argument_group("workload")
    w.add_argument("--seq-len", metavar="TOKENS", type=int, default=262144,
                   help="global sequence length, tokens (default: %(default)s)")
    w.add_argument("--sp-degree", metavar="N", type=int, default=8,
                   help="sequence-parallel degree: devices in the ring (default: %(default)s)")
    w.add_argument("--batch", metavar="N", type=int, default=1,
                   help="sequences per device per step (default: %(default)s)")
    w.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                   help="activation and K/V dtype (default: %(default)s)")
    w.add_argument("--layouts", metavar="LIST", type=layout_list, default=tuple(LAYOUTS),
                   help="comma-separated layouts: contiguous, striped, zigzag, and balanced (contiguous shares of the "
                        "--documents reordered to balance the ranks: balance_documents) "
                        "(default: contiguous,striped,zigzag)")
    h = p.add_argument_group("hardware (a preset, optionally overridden field by field)")
    h.add_argument("--hardware", choices=sorted(HARDWARE), default="a100-nvlink",
                   help="; ".join(f"{k}: {v.name}, {v.flops / 1e12:g} TFLOP/s, {v.bandwidth / 1e9:g} GB/s"
                                  for k, v in HARDWARE.items()) + " (default: %(default)s)")
    h.add_argument("--flops", metavar="TFLOPS", type=float, help="peak dense matmul throughput per device, TFLOP/s")
    h.add_argument("--bandwidth", metavar="GBPS", type=float,
                   help="link bandwidth to the ring neighbour, GB/s, one direction")
    h.add_argument("--latency", metavar="US", type=float, help="per-transfer latency, microseconds")
    h.add_argument("--attention-cost-factor", metavar="X", type=float,
                   help="attention matmuls cost this many times their FLOPs at peak (A100 presets: 2.0, "
                        "TF32 attention at half rate; others: 1.0)")
    h.add_argument("--memory", metavar="GB", type=float, help="device memory, GB, to say whether the plan fits")
    w.add_argument("--documents", metavar="N", type=int, default=1,
                   help="pack N documents into the sequence, cut at N - 1 random points drawn with --seed (as bench "
                        "and simulate cut them); each device's pairs are then counted exactly (default: 1)")
    w.add_argument("--seed", type=int, default=0, help="seed of the document cuts (default: %(default)s)")
    w.add_argument("--window", metavar="TOKENS", type=int,
                   help="sliding-window attention in every layer: each token sees itself and the TOKENS - 1 before "
                        "it, counted exactly (default: every earlier token)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON to PATH")
    p.set_defaults(func=main)


def layout_list(text: str) -> tuple[str, ...]:
    """argparse type: 'striped,contiguous' -> ('striped', 'contiguous'), each a known layout or "balanced"."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    known = (*LAYOUTS, BALANCED)
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown layout(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def _override(preset, **fields):
    chosen = {k: v for k, v in fields.items() if v is not None}
    return type(preset)(**{**asdict(preset), **chosen})


def model_and_hardware(args) -> tuple[LlamaConfig, Hardware]:
    """The preset model and hardware with the command line's overrides applied (units converted to SI)."""
    preset = MODELS[args.model]
    heads = args.heads or preset.n_heads
    kv_heads = args.kv_heads or (heads if args.heads else preset.n_kv_heads)
    model = _override(preset, d_model=args.d_model, d_ff=args.d_ff, n_layers=args.layers, n_heads=heads,
                      n_kv_heads=kv_heads, vocab_size=args.vocab)
    hw = HARDWARE[args.hardware]
    overrides = (args.flops, args.bandwidth, args.latency, args.attention_cost_factor, args.memory)
    custom = any(x is not None for x in overrides)
    hardware = _override(
        hw,
        name=f"{args.hardware} with overrides" if custom else None,
        flops=None if args.flops is None else args.flops * 1e12,
        bandwidth=None if args.bandwidth is None else args.bandwidth * 1e9,
        latency=None if args.latency is None else args.latency * 1e-6,
        attention_cost_factor=args.attention_cost_factor,
        memory=None if args.memory is None else args.memory * 1e9,
    )
    return model, hardware


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def format_plan(p: Plan) -> str:
    """The human-readable report: setting, per-layout step table, memory, speedups."""
    m, hw, c = p.model, p.hardware, p.local_len
    packed = f" in {len(p.cu_seqlens) - 1} documents" if p.cu_seqlens else ""
    packed += f", sliding window {p.window:,}" if p.window else ""
    lines = [
        f"model: d_model {m.d_model}, d_ff {m.d_ff}, {m.n_layers} layers, {m.n_heads} heads / {m.n_kv_heads} kv heads "
        f"({m.num_params() / 1e9:.2f} B parameters)",
        f"sequence: {p.seq_len:,} tokens{packed} x {p.batch} over {p.sp_degree} devices ({c:,} tokens each), {p.dtype}",
        f"hardware: {hw.name}: {hw.flops / 1e12:g} TFLOP/s, {hw.bandwidth / 1e9:g} GB/s, "
        f"{hw.latency * 1e6:g} us latency, attention cost factor {hw.attention_cost_factor:g}",
        "",
        "one layer, slowest device; a step = a ring step after the first; times in ms:",
    ]
    rows = [("layout", "pass", "step compute", "step transfer", "hidden", "hides from (tokens/device)",
             "ring total", "max training speedup")]
    for s in p.steps:
        rows.append((s.layout, s.pass_, _ms(s.compute_s), _ms(s.transfer_s), "yes" if s.hidden else "NO",
                     f"{s.min_block:,}", _ms(s.critical_path_s), f"{s.speedup:.2f}x"))
    lines.append(_table(rows))
    mem = p.memory

    def fits(total: float) -> str:
        return "" if hw.memory is None else f" of {_gb(hw.memory)}: {'fits' if total <= hw.memory else 'does NOT fit'}"

    lines += [
        "",
        "memory per device (the same for every layout):",
        f"  model state (16 B/param) {_gb(mem.model_state)} replicated, {_gb(mem.model_state_sharded)} sharded over "
        f"the {p.sp_degree} devices (FSDP); logits (fp32) {_gb(mem.logits)}; ring buffers {_gb(mem.ring_buffers)}",
        f"  activations: {_gb(mem.activations)} saved by every layer, {_gb(mem.activations_checkpointed)} "
        f"with per-layer checkpointing",
        f"  total with checkpointing {_gb(mem.total())}{fits(mem.total())}",
        f"  total with checkpointing and FSDP {_gb(mem.total(sharded=True))}{fits(mem.total(sharded=True))}",
        "",
    ]
    if p.cu_seqlens or p.window:
        shares = ", ".join(f"{name} {share:.4f}" for name, share in p.attention_share.items())
        lines.append(f"attention alone, the slowest devices' pairs over the unmasked ones: {shares}")
    if p.cu_seqlens:
        lines.append(f"documents: {list(p.cu_seqlens) if len(p.cu_seqlens) <= 17 else '(offsets in the JSON)'}")
    elif not p.window:
        contiguous = attention_fraction("contiguous", p.sp_degree)
        lines.append(f"attention alone: contiguous pays {contiguous:.4f} of unmasked attention, balanced layouts 0.5: "
                     f"at most {(2 * p.sp_degree - 1) / p.sp_degree:.3f}x")
    return "\n".join(lines)


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows)


def main(args) -> int:
    try:
        model, hardware = model_and_hardware(args)
        if not 1 <= args.documents <= args.seq_len:
            raise ValueError(f"--documents must be from 1 to --seq-len ({args.seq_len}), got {args.documents}")
        result = plan(model, hardware, seq_len=args.seq_len, sp_degree=args.sp_degree, batch=args.batch,
                      dtype=args.dtype, layouts=args.layouts,
                      cu_seqlens=random_documents(args.seq_len, args.documents, args.seed), window=args.window)
    except ValueError as e:
        raise UsageError("plan", e) from None
    print(format_plan(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan_json(result), f, indent=2)
    return 0


def plan_json(p: Plan) -> dict:
    """JSON-ready dict: the setting, one row per (layout, pass), and the memory."""
    return {
        "model": asdict(p.model), "hardware": asdict(p.hardware), "seq_len": p.seq_len, "sp_degree": p.sp_degree,
        "batch": p.batch, "dtype": p.dtype, "cu_seqlens": p.cu_seqlens, "window": p.window,
        "attention_share": p.attention_share,
        "results": [
            {"layout": s.layout, "pass": s.pass_, "world_size": p.sp_degree, "seq_len": p.seq_len,
             "time_ms": s.critical_path_s * 1e3, "step_compute_ms": s.compute_s * 1e3,
             "step_transfer_ms": s.transfer_s * 1e3, "hidden": s.hidden, "min_block": s.min_block,
             "max_training_speedup": s.speedup}
            for s in p.steps
        ],
        "memory_bytes": asdict(p.memory),
    }
