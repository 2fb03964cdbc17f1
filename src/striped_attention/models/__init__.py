"""Models whose attention runs on the ring."""

from .llama import PRESETS, Llama, LlamaConfig, get_config

__all__ = ["Llama", "LlamaConfig", "PRESETS", "get_config"]
