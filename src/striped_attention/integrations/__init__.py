"""Adapters that put the ring under other libraries' models.

Each adapter lives in its own module and imports its library only when imported itself, so
``import striped_attention`` never needs them:

* :mod:`striped_attention.integrations.transformers`: Hugging Face transformers causal language models
  (``pip install "striped-attention[transformers]"``).
"""
