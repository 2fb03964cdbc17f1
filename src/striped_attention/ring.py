"""The ring engine: one autograd Function for every layout.

Queries stay put. At step i rank r holds the keys/values of rank s = (r - i) mod N; the transfer of the next
block is posted before the current one is computed, so it overlaps compute. The layout says which pieces
of the (r, s) pair to compute; the kernels fold each piece into fp32 running sums (out, lse).

Backward reuses the saved output and log-sum-exp: dQ accumulates locally, while dK/dV accumulate in fp32
in a buffer that follows its K/V block around the ring (one step behind it) and finally lands on its owner.

With head groups the ring runs once per group of kv heads (and their query heads), one group after the other:
less K/V in flight, and a group's dK/dV travel home while the next group computes.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import kernels, varlen
from .layouts import (
    BALANCED, EVERY_ROW, Documents, Layout, Packed, Windowed, _rows_of_offsets, for_documents, get_layout,
    offsets_tensor, with_window,
)

__all__ = [
    "ring_attention", "ring_forward", "ring_backward", "source_rank", "last_step", "record_steps", "StepTime",
    "Transfer",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KV_TAG, GRAD_TAG = 0, 1


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str | Layout = "striped",
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: Sequence[int] | Sequence[Sequence[int] | torch.Tensor] | torch.Tensor | None = None,
    backend: str = "auto",
    head_groups: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence split across the ranks of ``group``.

    Args:
        q: (batch, heads, local_seq, head_dim), this rank's queries in the layout's order
            (see :func:`shard` and :func:`positions`).
        k, v: (batch, kv_heads, local_seq, head_dim) with ``heads % kv_heads == 0`` (GQA, MQA). Only
            kv_heads travel around the ring.
        layout: ``"striped"`` (default), ``"contiguous"``, ``"zigzag"``, ``"balanced"`` (with ``cu_seqlens``:
            :func:`balance_documents`' order of the documents, shared by every row, found once per set of
            documents; shard with ``balance_documents(cu_seqlens, world_size)``; one document: contiguous)
            or a :class:`Layout`, such as :func:`balance_documents`' (which holds its ``cu_seqlens``).
        group: the sequence-parallel process group; None is the default group, or a world of one rank when
            torch.distributed is not initialized.
        causal: causal masking over the *global* positions; False attends to the whole sequence.
        softmax_scale: scale of the scores; defaults to 1/sqrt(head_dim).
        cu_seqlens: packed documents: the *global* offsets where documents start, then the sequence length,
            ``[0, len_0, len_0 + len_1, ..., seq_len]`` (flash-attn's convention), the same on every rank; one
            list for every row of the batch, or one per row (a list of ``batch`` lists or 1-D tensors, or a
            2-D tensor). A token attends only to its own document's tokens (causally if ``causal``). None:
            one document.
        backend: ``"auto"`` (fused kernels: this package's compiled kernel for float32 and float64 on
            CPU, and for 16-bit inputs on float32 copies unless the CPU has AMX tiles (then torch's); on
            CUDA cuDNN's (Hopper and later) or FlashAttention-2 for 16-bit inputs, the
            memory-efficient kernel for float32; the reference where none fits), ``"torch"`` (torch's fused
            kernels only), ``"reference"`` (pure PyTorch; any device and dtype), or one of torch's CUDA
            kernels by name: ``"flash"``, ``"efficient"``, ``"cudnn"``.
        head_groups: run the ring once per group of kv heads (and their query heads), one group after the
            other: 1/head_groups of the K/V and dK/dV blocks are in flight at a time, and each group's dK/dV
            travel home while the next group computes. None: on a ring of several ranks, enough groups
            that each group's K/V block is at most 16 MiB, but none with fewer (batch, kv head) pairs than
            CPU threads.
        window: sliding-window attention (causal only): the query at global position p sees the keys at
            p - window + 1 ... p, as Mistral's and Gemma's local layers do (flash-attn's ``window_size=(window -
            1, 0)``), in every layout and with ``cu_seqlens`` too. Each piece is cut to its band; ring steps
            with no piece on any rank are skipped (contiguous: one step when window <= local_seq). None, or a
            window of the whole sequence: plain causal attention.

    Returns:
        (batch, heads, local_seq, head_dim) with q's dtype: this rank's output, differentiable in q, k, v.

    Raises:
        ValueError: on inconsistent shapes, dtypes or devices, on this rank or between ranks.

    Under ``torch.compile`` a named layout (``"balanced"`` too) runs as one opaque op
    (``striped_attention::ring_forward`` and its backward), so the graph holds it without a break, even with
    ``fullgraph=True``; pass ``cu_seqlens`` as a tensor there, so new documents do not recompile. A
    :class:`Layout` instance runs eagerly (a graph break).
    """
    if torch.compiler.is_compiling():
        return _compiled_ring_attention(q, k, v, layout, group, causal, softmax_scale, cu_seqlens, backend,
                                        head_groups, window)
    _check_local(q, k, v, backend)
    lay, ring, scale, groups = _setup(q, k, layout, group, causal, softmax_scale, cu_seqlens, head_groups, window)
    return _RingAttention.apply(q, k, v, lay, ring, causal, scale, backend, groups)


def _setup(q, k, layout, group, causal, softmax_scale, cu_seqlens, head_groups, window=None):
    """(layout, ring, scale, head groups) of a call, checked on this rank and, once per new signature, between
    the ranks."""
    ring = _Ring(group)
    lay = get_layout(for_documents(BALANCED, cu_seqlens, ring.size) if layout == BALANCED else layout)
    if cu_seqlens is not None:
        lay = _with_documents(lay, cu_seqlens, q.shape[0])
    lay.check(q.shape[2] * ring.size, ring.size)
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal=True")
    lay = with_window(lay, window, q.shape[2] * ring.size)
    scale = kernels.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    groups = _head_groups(head_groups, k, ring.size)
    ring.check_consistent(q, k, lay, causal, scale, groups)
    return lay, ring, scale, groups


def _with_documents(layout: Layout, cu_seqlens, batch: int) -> Packed:
    """``layout`` cut at the documents ``cu_seqlens``; a layout that holds its documents already
    (:func:`layouts.balance_documents`) must hold these."""
    if not isinstance(layout, Packed):
        return Documents.of(layout, cu_seqlens, batch=batch)
    if Documents.of(layout.inner, cu_seqlens, batch=batch).cu_seqlens != layout.cu_seqlens:
        raise ValueError(f"layout {layout.name!r} holds other documents than cu_seqlens; pass cu_seqlens=None "
                         "with a layout made for its documents")
    return layout


GROUP_BYTES = 16 * 2**20  # by default, the K/V of one head group in flight stays about this small


def _head_groups(requested: int | None, k: torch.Tensor, world_size: int) -> int:
    """``requested``, checked. By default, on a ring of several ranks: enough groups that each group's K/V
    block is at most GROUP_BYTES (blocks that small travel whole), but no group with fewer (batch, kv head)
    pairs than CPU threads (the CPU backward gives each pair a thread; fewer pairs it splits, with spare dK/dV)."""
    batch, kv_heads = k.shape[:2]
    if requested is None:
        if world_size == 1:
            return 1
        kv_block_bytes = 2 * k.numel() * k.element_size()
        threads = torch.get_num_threads() if k.device.type == "cpu" else 1
        wanted = -(-kv_block_bytes // GROUP_BYTES)
        return max(1, min(kv_heads, wanted, batch * kv_heads // threads))
    check_head_groups(requested, kv_heads)
    return requested


def check_head_groups(requested, kv_heads: int) -> None:
    """ValueError unless ``requested`` is an int from 1 to ``kv_heads`` (the command lines check it too)."""
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= kv_heads:
        raise ValueError(f"head_groups must be an int from 1 to kv_heads ({kv_heads}), got {requested!r}")


def source_rank(rank: int, step: int, world_size: int) -> int:
    """The rank whose K/V block ``rank`` holds at ring step ``step``: the schedule every tool shares."""
    return (rank - step) % world_size


# ----------------------------------------------------------------------------------------------------------
# Per-step timing (off unless someone records)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StepTime:
    """One ring step on this rank: computing its blocks, then waiting for the next transfer to land."""

    pass_: str  # "forward" or "backward"
    step: int
    source: int  # the rank whose K/V block was computed
    compute_s: float
    wait_s: float


_recording: list[StepTime] | None = None


@contextmanager
def record_steps():
    """Collect a :class:`StepTime` for every ring step run inside the block (synchronizing CUDA to time it).

    >>> with record_steps() as steps:
    ...     ring_attention(q, k, v).sum().backward()
    """
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer


class _StepClock:
    """Marks the end of compute and of waiting in each step; does nothing unless recording."""

    def __init__(self, pass_: str, device: torch.device):
        self.pass_, self.device, self.on = pass_, device, _recording is not None
        self.t = self._now()

    def _now(self) -> float:
        if not self.on:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def computed(self) -> None:
        self.t_compute = self._now()

    def waited(self, step: int, source: int) -> None:
        if self.on:
            now = self._now()
            _recording.append(StepTime(self.pass_, step, source, self.t_compute - self.t, now - self.t_compute))
            self.t = now


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_local(q, k, v, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, local_seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, _DTYPES))}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, n, d), (bk, hk, nk, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"batch mismatch: q has {b}, k/v have {bk}")
    if d != dk:
        raise ValueError(f"head_dim mismatch: q has {d}, k/v have {dk}")
    if n != nk:
        raise ValueError(f"local sequence length mismatch: q has {n}, k/v have {nk}")
    if hk == 0 or h % hk:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({hk})")
    if n == 0 or d == 0 or b == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
    if backend not in kernels.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(kernels.BACKENDS)}")


_FIELDS = (
    "batch", "heads", "kv_heads", "local_seq", "head_dim", "dtype", "layout", "causal", "softmax_scale", "head_groups",
    "cu_seqlens", "window",
)


def _signature(q, k, layout, causal, scale, head_groups) -> list[int]:
    b, h, n, d = q.shape
    dtype = _DTYPES.index(q.dtype)
    window = layout.window if isinstance(layout, Windowed) else -1  # -1: none
    layout = layout.inner if isinstance(layout, Windowed) else layout
    documents = isinstance(layout, Packed)
    name = zlib.crc32(repr(layout.inner if documents else layout).encode())  # a layout's repr holds its data
    offsets = layout.checksum if documents else -1  # -1: one document
    (scale_bits,) = struct.unpack("<q", struct.pack("<d", scale))
    return [b, h, k.shape[1], n, d, dtype, name, int(causal), scale_bits, head_groups, offsets, window]


# ----------------------------------------------------------------------------------------------------------
# Communication
# ----------------------------------------------------------------------------------------------------------


class Transfer:
    """Tensors in flight from the previous rank; ``wait()`` returns them once they have arrived.

    The engine needs only this and, from its ring, ``rank``, ``size`` and ``shift(tensors, tag, by=1) -> Transfer``:
    the simulator plays every rank in one process by handing the engine a ring of its own.
    """

    def __init__(self, requests, received, sent=(), land_on: torch.device | None = None):
        self._requests, self._received = requests, received
        self._sent = sent  # kept alive until the transfer is done
        self._land_on = land_on  # the device the tensors go to once here (None: where they were received)

    def wait(self) -> tuple[torch.Tensor, ...]:
        for request in self._requests:
            request.wait()
        self._sent = ()
        if self._land_on is None:
            return self._received
        return tuple(t.to(self._land_on) for t in self._received)


class _Ring:
    """This rank's place in the ring: rank, size, neighbours, and the non-blocking shift."""

    _validated: set = set()  # (group, signature) pairs already checked across ranks

    def __init__(self, group: dist.ProcessGroup | None):
        if group is None and not (dist.is_available() and dist.is_initialized()):
            self.group, self.rank, self.size = None, 0, 1
            return
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)
        # gloo sends host memory only: on a gloo ring, GPU blocks travel through the host (ranks that share one
        # GPU, as in tests; NCCL is the fast way)
        self.via_host = dist.get_backend(self.group) == "gloo"

    def shift(self, tensors: tuple[torch.Tensor, ...], tag: int, by: int = 1) -> Transfer:
        """Send ``tensors`` to the rank ``by`` places on (the next one by default) and receive those of the rank
        ``by`` places back, without blocking."""
        to, source = self.next, self.prev
        if by != 1:
            to, source = (dist.get_global_rank(self.group, (self.rank + d) % self.size) for d in (by, -by))
        tensors = tuple(t.contiguous() for t in tensors)
        device = tensors[0].device
        via_host = self.via_host and device.type != "cpu"
        if via_host:
            tensors = tuple(t.cpu() for t in tensors)
        received = tuple(torch.empty_like(t) for t in tensors)
        ops = [dist.P2POp(dist.isend, t, to, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, source, self.group, tag) for t in received]
        return Transfer(dist.batch_isend_irecv(ops), received, tensors, device if via_host else None)

    def check_consistent(self, q, k, layout, causal, scale, head_groups) -> None:
        """Raise the same ValueError on every rank if the ranks disagree; once per new signature."""
        if self.size == 1:
            return
        mine = _signature(q, k, layout, causal, scale, head_groups)
        key = (id(self.group), tuple(mine), q.device.type)
        if key in self._validated:
            return
        if len(self._validated) >= 4096:  # new documents in every batch: forget old signatures, not grow
            self._validated.clear()
        device = q.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        gathered = [torch.empty(len(mine), dtype=torch.int64, device=device) for _ in range(self.size)]
        dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=device), group=self.group)
        table = [t.tolist() for t in gathered]
        bad = [f for i, f in enumerate(_FIELDS) if len({row[i] for row in table}) > 1]
        if bad:
            per_rank = "; ".join(
                f"rank {r}: " + ", ".join(f"{f}={_show(f, row[_FIELDS.index(f)])}" for f in bad)
                for r, row in enumerate(table)
            )
            raise ValueError(f"ranks disagree on {', '.join(bad)} ({per_rank})")
        self._validated.add(key)


def _show(field: str, value: int):
    if field == "dtype":
        return str(_DTYPES[value])
    if field == "softmax_scale":
        return struct.unpack("<d", struct.pack("<q", value))[0]
    if field == "cu_seqlens":
        return "None" if value == -1 else f"checksum {value:08x}"
    if field == "window":
        return "None" if value == -1 else value
    return value


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------


def head_slices(heads: int, kv_heads: int, groups: int) -> list[tuple[slice, slice]]:
    """Split the kv heads into ``groups`` near-equal runs: (query-head slice, kv-head slice) per group, each
    query head with the kv head it shares (GQA). The ring runs once per group, one after the other."""
    per_kv = heads // kv_heads
    bounds = [kv_heads * g // groups for g in range(groups + 1)]
    return [(slice(a * per_kv, b * per_kv), slice(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]


def ring_forward(q, k, v, layout: Layout, ring: _Ring, causal: bool, scale: float, backend: str, head_groups: int = 1):
    """The forward ring on q (b, h, c, d), k and v (b, kv_heads, c, d), once per head group.

    Returns (out, lse): out (b, h, c, d) in q's dtype, lse (b, h, c) float32 (float64 for float64 input).
    """
    groups = head_slices(q.shape[1], k.shape[1], head_groups)
    if len(groups) == 1:
        out, lse = _forward_ring(q, k, v, layout, ring, causal, scale, backend)
        return out.to(q.dtype), lse
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=kernels.acc_dtype(q.dtype), device=q.device)
    for heads, kv_heads in groups:
        out[:, heads], lse[:, heads] = _forward_ring(
            q[:, heads], k[:, kv_heads], v[:, kv_heads], layout, ring, causal, scale, backend
        )
    return out, lse


def _forward_ring(q, k, v, layout: Layout, ring: _Ring, causal: bool, scale: float, backend: str):
    """One pass around the ring: the sums (out, lse), both in the accumulation dtype."""
    out = lse = None
    every_query = slice(0, q.shape[2])
    kv, clock = (k, v), _StepClock("forward", q.device)
    last = last_step(layout, ring.size, causal, q.shape[2])
    for step in range(last + 1):
        source = source_rank(ring.rank, step, ring.size)
        incoming = ring.shift(kv, KV_TAG) if step < last else None
        together, alone = _pieces(q, layout, ring, source, causal, backend)
        at_once = bool(alone) and kernels.takes_pieces(q, alone, backend)  # the CPU kernel: all in one call
        if out is None and (together or at_once):
            out, lse = kernels.no_keys_seen(q)
        if together:
            varlen.forward_(out, lse, q, *kv, together, scale=scale)
        if at_once:
            kernels.fold_pieces_(out, lse, q, *kv, alone, scale=scale)
            alone = ()
        for blk in alone:
            piece = (blk.queries(q), blk.keys(kv[0]), blk.keys(kv[1]))
            if out is None:
                if blk.q == every_query and blk.rows == EVERY_ROW:  # a first piece over all starts the sums
                    out, lse = kernels.first_sums(*piece, causal=blk.causal, scale=scale, backend=backend,
                                                  window=blk.window)
                    continue
                out, lse = kernels.no_keys_seen(q)
            kernels.attention_forward_(
                blk.queries(out), blk.queries(lse), *piece, causal=blk.causal, scale=scale, backend=backend,
                window=blk.window,
            )
        clock.computed()
        if incoming is not None:
            kv = incoming.wait()
        clock.waited(step, source)
    return (out, lse) if out is not None else kernels.no_keys_seen(q)  # no piece at all: no key seen


def ring_backward(
    dout, q, k, v, out, lse, layout: Layout, ring: _Ring, causal: bool, scale: float, backend: str, head_groups: int = 1
):
    """The backward ring, once per head group: (dq, dk, dv) with the dtypes of q, k, v, from the output
    gradient and the forward's final out and lse. A group's dK/dV travel home while the next group computes."""
    groups = head_slices(q.shape[1], k.shape[1], head_groups)
    if len(groups) == 1:
        dq, going_home = _backward_ring(dout, q, k, v, out, lse, layout, ring, causal, scale, backend)
        dk, dv = going_home.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    landing = None
    for heads, kv_heads in groups:
        dq[:, heads], going_home = _backward_ring(
            dout[:, heads], q[:, heads], k[:, kv_heads], v[:, kv_heads], out[:, heads], lse[:, heads],
            layout, ring, causal, scale, backend,
        )
        if landing is not None:
            _land(dk, dv, *landing)
        landing = kv_heads, going_home
    _land(dk, dv, *landing)
    return dq, dk, dv


def _land(dk, dv, kv_heads: slice, going_home: Transfer) -> None:
    """Wait for one head group's dK/dV to reach this rank and store them in its heads of dk, dv."""
    dk[:, kv_heads], dv[:, kv_heads] = going_home.wait()


def last_step(layout: Layout, world_size: int, causal: bool, local_len: int) -> int:
    """The ring's last step: N - 1, or earlier where packed documents or a sliding window leave the steps after
    it without a piece on every rank; the K/V blocks travel no further (:meth:`layouts.Layout.last_step`)."""
    return 0 if world_size == 1 else layout.last_step(world_size, causal, local_len)


def _pieces(q, layout: Layout, ring: _Ring, source: int, causal: bool, backend: str):
    """(varlen calls, blocks): what this rank computes against ``source``'s keys. Packed documents' small pieces
    go to varlen calls (per batch row and round) where the kernels allow (:mod:`varlen`); the rest one block at
    a time."""
    blocks = layout.blocks(ring.rank, source, q.shape[2], ring.size, causal)
    return varlen.split(q, blocks, backend) if isinstance(layout, Packed) else ([], blocks)


def _backward_ring(dout, q, k, v, out, lse, layout: Layout, ring: _Ring, causal: bool, scale: float, backend: str):
    """One pass around the ring: dq in the accumulation dtype, and a Transfer that brings this rank's own
    dK/dV home (in flight after the last step from the rank that computed with them last; already here when
    no other rank did)."""
    acc = kernels.acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv, grads_in_flight, clock = (k, v), None, _StepClock("backward", q.device)
    last = last_step(layout, ring.size, causal, q.shape[2])
    for step in range(last + 1):
        source = source_rank(ring.rank, step, ring.size)
        incoming = ring.shift(kv, KV_TAG) if step < last else None
        together, alone = _pieces(q, layout, ring, source, causal, backend)
        dk = dv = None  # this step's gradients of the K/V block: none without a piece
        if together or alone or grads_in_flight is None:
            dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in kv)
        if together:
            varlen.backward_(dq, dk, dv, dout, q, *kv, out, lse, together, scale=scale)
        if alone and kernels.takes_pieces(q, alone, backend):  # the CPU kernel: all in one call
            kernels.fold_piece_gradients_(dq, dk, dv, dout, q, *kv, out, lse, alone, scale=scale)
            alone = ()
        for blk in alone:
            kernels.attention_backward_(
                blk.queries(dq), blk.keys(dk), blk.keys(dv), blk.queries(dout), blk.queries(q), blk.keys(kv[0]),
                blk.keys(kv[1]), blk.queries(out), blk.queries(lse), causal=blk.causal, scale=scale, backend=backend,
                window=blk.window,
            )
        clock.computed()
        if grads_in_flight is not None:  # what the ranks before us added for this same K/V block
            dk_prev, dv_prev = grads_in_flight.wait()
            dk, dv = (dk_prev, dv_prev) if dk is None else (dk_prev.add_(dk), dv_prev.add_(dv))
        if last > 0:  # on to the rank that computes this block next; after the last step, home to its owner
            grads_in_flight = ring.shift((dk, dv), GRAD_TAG, by=1 if step < last else ring.size - last)
            dk = dv = None  # the transfer holds what it sends; free the rest now
        if incoming is not None:
            kv = incoming.wait()
        clock.waited(step, source)
    return dq, grads_in_flight if grads_in_flight is not None else Transfer([], (dk, dv))


# ----------------------------------------------------------------------------------------------------------
# torch.compile: the ring as two custom ops whose arguments are tensors, names and numbers
# ----------------------------------------------------------------------------------------------------------


def _compiled_ring_attention(q, k, v, layout, group, causal, softmax_scale, cu_seqlens, backend, head_groups,
                             window):
    """ring_attention as dynamo traces it: a named layout becomes the op; a Layout instance runs eagerly."""
    if not isinstance(layout, str):
        return torch.compiler.disable(ring_attention)(
            q, k, v, layout=layout, group=group, causal=causal, softmax_scale=softmax_scale,
            cu_seqlens=cu_seqlens, backend=backend, head_groups=head_groups, window=window,
        )
    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):  # lists: new documents recompile
        cu_seqlens = offsets_tensor(_rows_of_offsets(cu_seqlens) or [cu_seqlens])
    group_name = "" if group is None else group.group_name
    out, _ = _ring_forward_op(q, k, v, cu_seqlens, layout, group_name, causal, softmax_scale, backend, head_groups,
                              window)
    return out


def _op_setup(q, k, cu_seqlens, layout, group_name, causal, softmax_scale, head_groups, window):
    group = dist.distributed_c10d._resolve_process_group(group_name) if group_name else None
    documents = None if cu_seqlens is None else cu_seqlens.tolist()
    return _setup(q, k, layout, group, causal, softmax_scale, documents, head_groups, window)


@torch.library.custom_op(
    "striped_attention::ring_forward", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, str layout, str group_name, bool causal, "
           "float? softmax_scale, str backend, int? head_groups, int? window) -> (Tensor, Tensor)",
)
def _ring_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, layout: str, group_name: str,
    causal: bool, softmax_scale: float | None, backend: str, head_groups: int | None, window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ring_attention: out with q's shape and dtype, lse (batch, heads, local_seq) in the
    accumulation dtype; both contiguous, whatever q's strides, as the fake says."""
    _check_local(q, k, v, backend)
    lay, ring, scale, groups = _op_setup(q, k, cu_seqlens, layout, group_name, causal, softmax_scale, head_groups,
                                         window)
    out, lse = ring_forward(q.contiguous(), k.contiguous(), v.contiguous(), lay, ring, causal, scale, backend, groups)
    return out.contiguous(), lse.contiguous()


@_ring_forward_op.register_fake
def _(q, k, v, cu_seqlens, layout, group_name, causal, softmax_scale, backend, head_groups, window):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=kernels.acc_dtype(q.dtype))


@torch.library.custom_op(
    "striped_attention::ring_backward", mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens, str layout, "
           "str group_name, bool causal, float? softmax_scale, str backend, int? head_groups, int? window) "
           "-> (Tensor, Tensor, Tensor)",
)
def _ring_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None, layout: str, group_name: str, causal: bool, softmax_scale: float | None,
    backend: str, head_groups: int | None, window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with the shapes and dtypes of q, k, v, contiguous."""
    lay, ring, scale, groups = _op_setup(q, k, cu_seqlens, layout, group_name, causal, softmax_scale, head_groups,
                                         window)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grads = ring_backward(dout.contiguous(), q, k, v, out, lse, lay, ring, causal, scale, backend, groups)
    return tuple(g.contiguous() for g in grads)


@_ring_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, layout, group_name, causal, softmax_scale, backend, head_groups, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_ring_backward(ctx, inputs, output):
    q, k, v, cu_seqlens, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output, *([] if cu_seqlens is None else [cu_seqlens]))


def _ring_backward_of_op(ctx, dout, _dlse):
    q, k, v, out, lse, *documents = ctx.saved_tensors
    dq, dk, dv = _ring_backward_op(dout, q, k, v, out, lse, *(documents or [None]), *ctx.args)
    return dq, dk, dv, *([None] * (1 + len(ctx.args)))


_ring_forward_op.register_autograd(_ring_backward_of_op, setup_context=_save_for_ring_backward)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, ring, causal, scale, backend, head_groups):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = ring_forward(q, k, v, layout, ring, causal, scale, backend, head_groups)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, ring, causal, scale, backend, head_groups)
        return out

    @staticmethod
    @once_differentiable  # no second derivative: asking for one raises a clear error
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None
