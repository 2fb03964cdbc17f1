"""A small Llama-style decoder whose attention runs on the ring.

RMSNorm, rotary position embeddings (RoPE) computed from each token's *global* position, a SwiGLU MLP and
grouped-query attention (GQA), in one file. The model sees only this rank's tokens: ``tokens`` and
``positions`` come already sharded by a layout (see :mod:`striped_attention.train`), every layer but
attention is position-wise, and attention is :func:`striped_attention.ring_attention` over the
context-parallel group. So the permutation happens once, at the input, and never again per layer.

Shapes: tokens (batch, local_seq) int64, positions (local_seq,) or (batch, local_seq) int64,
logits (batch, local_seq, vocab_size).

>>> model = Llama(PRESETS["tiny"])
>>> logits = model(tokens, positions, layout="striped", group=cp_group)

With ``activation_checkpointing`` each layer keeps only its input for the backward pass and runs its forward
again there (ring included: every rank recomputes the same layers in the same order, so the transfers pair
up): activations of one layer at a time instead of all, for about one more forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layouts import Layout
from ..ring import ring_attention

__all__ = ["LlamaConfig", "Llama", "PRESETS", "get_config", "rope_angles", "apply_rope"]


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of the decoder. ``head_dim = d_model // n_heads``; ``n_heads % n_kv_heads == 0`` (GQA)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int  # hidden width of the SwiGLU MLP
    vocab_size: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # local layers (Mistral, Gemma, GPT-OSS): each token sees the last sliding_window tokens; None: every layer
    # sees the whole past. With a window, every global_every-th layer (the last of each group) is global
    # (Gemma 2 and GPT-OSS: 2; Gemma 3: 6); 0: no layer is.
    sliding_window: int | None = None
    global_every: int = 0

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if not isinstance(self.global_every, int) or self.global_every < 0:
            raise ValueError(f"global_every must be an integer >= 0, got {self.global_every!r}")
        if self.global_every and self.sliding_window is None:
            raise ValueError("global_every chooses the global layers among windowed ones: it needs a sliding_window")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def window_of(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: it attends to the whole past)."""
        if self.sliding_window is None or (self.global_every and (layer + 1) % self.global_every == 0):
            return None
        return self.sliding_window

    @property
    def kv_dim(self) -> int:
        """Channels of K (or of V) per token: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Number of parameters (embedding and output head untied)."""
        d, kv = self.d_model, self.kv_dim
        layer = 2 * d * d + 2 * d * kv + 3 * d * self.d_ff + 2 * d  # attention, MLP, two norms
        return self.n_layers * layer + 2 * self.vocab_size * d + d

    def training_flops_per_token(self, seq_len: int, *, causal: bool = True) -> dict[str, float]:
        """FLOPs of forward + backward per token at ``seq_len``: {"dense": ..., "attention": ...}.

        dense: 6 x the parameters used in matmuls (forward 2, backward 4). attention: the score and value
        matmuls, 4 * seq_len * d_model per layer forward (half when causal), backward 2.5x forward.
        """
        d, kv = self.d_model, self.kv_dim
        matmul_params = self.n_layers * (2 * d * d + 2 * d * kv + 3 * d * self.d_ff) + d * self.vocab_size
        attention_forward = self.n_layers * 4 * seq_len * d * (0.5 if causal else 1.0)
        return {"dense": 6.0 * matmul_params, "attention": 3.5 * attention_forward}


PRESETS: dict[str, LlamaConfig] = {
    # 8 steps at 2,048 tokens take seconds on one CPU core
    "tiny": LlamaConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352),
    # the end-to-end benchmark's model: at 16,384 tokens attention is 86% of its training FLOPs, the same
    # share as the paper's 7B model at 262,144 tokens (the long-context regime where layouts matter)
    "bench": LlamaConfig(d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=688),
    "small": LlamaConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1376),
    # the paper's shapes (d_model / d_ff / layers / heads), with a Llama-sized vocabulary; build them on the
    # meta device to plan: ``with torch.device("meta"): Llama(PRESETS["7b"])``
    "1b": LlamaConfig(d_model=2048, n_layers=22, n_heads=16, n_kv_heads=16, d_ff=5504, vocab_size=32000),
    "3b": LlamaConfig(d_model=3200, n_layers=26, n_heads=32, n_kv_heads=32, d_ff=8640, vocab_size=32000),
    "7b": LlamaConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=32000),
}


def get_config(name: str) -> LlamaConfig:
    """The preset called ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Rotary position embeddings from global positions
# ----------------------------------------------------------------------------------------------------------


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the rotation angles, float32, shape positions.shape + (head_dim // 2,).

    Computed in float64 so that large positions (hundreds of thousands) keep their precision.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (batch, heads, seq, head_dim) by the angles.

    cos, sin: (seq, head_dim/2) or (batch, seq, head_dim/2). Returns x's shape and dtype.
    """
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


# ----------------------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Causal GQA self-attention over the whole (sharded) sequence, or the last ``window`` tokens: only K/V's
    n_kv_heads ride the ring."""

    def __init__(self, cfg: LlamaConfig, window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, window
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, layout, group, cu_seqlens=None):
        """x (batch, local_seq, d_model) -> (batch, local_seq, d_model)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = ring_attention(q, k, v, layout=layout, group=group, causal=True, cu_seqlens=cu_seqlens, window=self.window)
        return self.wo(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, window: int | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, window)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layout, group, cu_seqlens=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, layout, group, cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The decoder: embedding, ``n_layers`` blocks, a final RMSNorm and an (untied) output head.

    Parameters are initialised from torch's global RNG (normal, std 0.02; the projections into the
    residual stream scaled by 1/sqrt(2 * n_layers)), so ``torch.manual_seed(s)`` before construction gives
    the same weights on every rank and in every run.
    """

    def __init__(self, config: LlamaConfig, *, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing  # recompute each layer in the backward
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, config.window_of(i)) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        *,
        layout: str | Layout = "striped",
        group: dist.ProcessGroup | None = None,
        cu_seqlens=None,
    ) -> torch.Tensor:
        """Logits (batch, local_seq, vocab_size) for this rank's tokens.

        Args:
            tokens: (batch, local_seq) int64, this rank's token ids in the layout's order.
            positions: (local_seq,) or (batch, local_seq) int64, their global positions (for RoPE).
            layout: the layout the sequence was sharded with.
            group: the context-parallel group (None: the default group, or one process when
                torch.distributed is not initialized).
            cu_seqlens: packed documents, as :func:`striped_attention.ring_attention` takes them (global
                offsets, one list for every row or one per row); None: each row is one sequence.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, local_seq), got shape {tuple(tokens.shape)}")
        if positions.shape not in (tokens.shape[1:], tokens.shape):
            raise ValueError(
                f"positions must have shape {tuple(tokens.shape[1:])} or {tuple(tokens.shape)} to match tokens, "
                f"got {tuple(positions.shape)}"
            )
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_base)
        x = self.embed(tokens)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, layout, group, cu_seqlens, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, group, cu_seqlens)
        return self.head(self.norm(x))
