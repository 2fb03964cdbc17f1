"""Exact, load-balanced, sequence-parallel attention for causal transformers (Striped Attention)."""

from .layouts import LAYOUTS, Block, Layout, balance_documents, get_layout, positions, shard, unshard
from .ring import ring_attention

__all__ = [
    "ring_attention", "shard", "unshard", "positions", "balance_documents", "Layout", "Block", "LAYOUTS", "get_layout",
]
__version__ = "0.1.0"
