"""Helpers for multi-rank tests: run a module-level function on N gloo ranks on loopback, with a timeout."""

from __future__ import annotations

import functools

import torch

from striped_attention import shard, unshard
from striped_attention.launch import launch

RANK_TIMEOUT_S = 60  # every collective fails after this, so a deadlock fails the test instead of hanging


def run_ranks(fn, world_size: int, *args):
    """fn(*args) on world_size ranks; the list of their results."""
    return launch(fn, world_size, *args, timeout_s=RANK_TIMEOUT_S)


def intra_op_threads() -> int:
    return torch.get_num_threads()


def cached(fn):
    """Memoize a launch: many parametrized tests read the results of one multi-rank run."""
    return functools.lru_cache(maxsize=None)(fn)


def full_inputs(seed, batch, heads, kv_heads, seq, head_dim):
    """float64 q, k, v and an output gradient over the whole sequence."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def document_mask(cu_seqlens, seq: int, causal: bool) -> torch.Tensor:
    """(seq, seq) bool: query i sees key j (same document, and j <= i if causal); (batch, 1, seq, seq) for
    one list of offsets per row."""
    if isinstance(cu_seqlens[0], (tuple, list)):
        return torch.stack([document_mask(row, seq, causal) for row in cu_seqlens]).unsqueeze(1)
    doc = torch.searchsorted(torch.tensor(cu_seqlens), torch.arange(seq), right=True)
    mask = doc[:, None] == doc[None, :]
    return mask.tril() if causal else mask


def reference(q, k, v, dout, causal, scale, cu_seqlens=None):
    """float64 attention on the whole sequence (within each document, given cu_seqlens): (out, dq, dk, dv)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = None if cu_seqlens is None else document_mask(cu_seqlens, q.shape[2], causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def error_of(fn):
    """The ValueError message fn() raises, or None."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def sharded_run(layout, dtype, q, k, v, dout, device="cpu", ring_layout=None, **kwargs):
    """Shard, run ring attention forward+backward on ``device``, unshard on the CPU: (out, dq, dk, dv) over the
    whole sequence. ``ring_layout``: what ring_attention is told, if not ``layout``."""
    from striped_attention import ring_attention

    local = [shard(t, layout=layout, dim=2).to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, layout=layout if ring_layout is None else ring_layout, **kwargs)
    out.backward(shard(dout, layout=layout, dim=2).to(device, dtype))
    return tuple(unshard(t.cpu(), layout=layout, dim=2) for t in (out.detach(), *(t.grad for t in local)))
