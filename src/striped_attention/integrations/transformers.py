"""Striped context parallelism for Hugging Face transformers causal language models, in two calls.

::

    from striped_attention import unshard
    from striped_attention.integrations.transformers import prepare, shard_inputs

    model = prepare(model, layout="striped")                # once, on every rank
    batch = shard_inputs(input_ids=ids, labels=ids)          # every step: the full batch in, this rank's share out
    out = model(**batch)                                     # out.loss: this rank's share of the loss
    out.loss.backward()
    for p in model.parameters():                             # the usual data-parallel mean over the group
        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    logits = unshard(out.logits, layout="striped", dim=1)    # only when the whole sequence is needed

:func:`prepare` registers the ring as an attention function in transformers' own registry
(``AttentionInterface``) and selects it with ``model.set_attn_implementation``: no model code is patched.
Every rank holds ``seq / world_size`` tokens of each sequence (in the layout's order); the ring attends over
the whole sequence, exactly. Everything else in a decoder (embeddings, norms, MLPs, the LM head) works token
by token, so it runs unchanged on the local tokens, and RoPE gets the tokens' true global positions from
:func:`shard_inputs`.

Loss convention: labels are shifted for next-token prediction *before* sharding (so no target is lost at a
shard edge), and ``out.loss`` on each rank is ``world_size * (sum of this rank's token losses) / (valid tokens
in the whole batch)``. The mean over ranks of ``out.loss`` is the single-process loss, and the mean over ranks
of every parameter's gradient is the single-process gradient, so an all-reduce-mean over the group (what data
parallelism does) gives exact gradients. Labels equal to -100 are ignored, as in transformers.

Packed documents: position ids that restart (transformers' convention, ``DataCollatorWithFlattening``) or
``shard_inputs(..., cu_seqlens=...)`` keep each token within its own document; ``shard_inputs`` returns the
documents' global offsets as ``cu_seq_lens_q``/``cu_seq_lens_k``, which the model passes to every layer's ring.

Padding: ``shard_inputs(..., attention_mask=mask)`` takes a tokenizer's padding mask (left or right padding)
and makes the padding documents of their own, so no token attends to it.

Sliding windows (Mistral, Gemma's and GPT-OSS's local layers): each layer's ``sliding_window`` goes to the
ring as its ``window``, so local and global layers share the layout.

What cannot be served exactly raises ValueError, on every rank: padding masks given to the model, non-causal
attention, attention dropout, attention weights as outputs, KV caches (generation), softcapping and attention
sinks.
"""

from __future__ import annotations

import inspect
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

_INSTALL = 'pip install "striped-attention[transformers]"'
try:
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface, PreTrainedModel
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"striped_attention.integrations.transformers needs transformers>=4.57: {_INSTALL}") from e
if Version(transformers.__version__) < Version("4.57"):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"striped_attention.integrations.transformers needs transformers>=4.57 (set_attn_implementation, "
        f"masks built per attention implementation); found {transformers.__version__}: {_INSTALL}"
    )

from ..layouts import (
    BALANCED, LAYOUTS, Layout, _group_rank_size, _offsets, _rows_of_offsets, for_documents, get_layout, offsets_tensor,
    positions, shard,
)
from ..ring import ring_attention

__all__ = ["prepare", "shard_inputs", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label value that contributes no loss (transformers' convention)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def prepare(model: PreTrainedModel, *, layout: str | Layout = "striped", group: dist.ProcessGroup | None = None):
    """Switch ``model`` to ring attention over ``group``; return the same model.

    Call it on every rank of ``group`` with the same layout. It:

    * registers a ring attention function in transformers' ``AttentionInterface`` and selects it with
      ``model.set_attn_implementation`` (so its name appears as ``model.config._attn_implementation``);
    * sets ``model.config.use_cache = False`` (a KV cache would hold only this rank's tokens);
    * sets ``model.loss_function`` to the context-parallel causal LM loss: labels come already shifted from
      :func:`shard_inputs`, and each rank's loss is its share (see the module docstring);
    * checks the inputs of every forward pass (attention mask, position ids, cache) on every rank together,
      so a bad input raises the same ValueError everywhere instead of hanging the ring.

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface`` (Llama, Qwen2,
            Mistral and most decoder-only families), e.g. ``LlamaForCausalLM``.
        layout: ``"striped"`` (default), ``"zigzag"``, ``"contiguous"``, a :class:`Layout`, or
            ``"balanced"``: each batch's packed documents in contiguous shares, in the order
            :func:`~striped_attention.balance_documents` gives them (one set of documents for every row;
            one document: contiguous); must match :func:`shard_inputs`.
        group: the context-parallel process group; None is the default group (or one process when
            torch.distributed is not initialized).

    Raises:
        ValueError: if the model is not a transformers model, does not use ``AttentionInterface``, is
            configured non-causal or to return attention weights, or the layout is unknown.
    """
    lay = _named(layout)
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
            "so the ring cannot be plugged in; Llama, Qwen2 and Mistral models can"
        )
    config = model.config
    if not getattr(config, "is_causal", True):
        raise ValueError(_UNSUPPORTED["non_causal"] + " (config.is_causal=False)")
    if getattr(config, "output_attentions", False):
        raise ValueError(_UNSUPPORTED["output_attentions"])
    setup = _setup_for(lay, group)
    model.set_attn_implementation(setup.name)
    if config._attn_implementation != setup.name:
        raise ValueError(f"{type(model).__name__} refused attention implementation {setup.name!r}")
    config.use_cache = False
    model.loss_function = setup.loss
    old = _INPUT_CHECKS.pop(model, None)
    if old is not None:
        old.remove()
    _INPUT_CHECKS[model] = model.base_model.register_forward_pre_hook(setup.check_inputs, with_kwargs=True)
    return model


def shard_inputs(
    *,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    layout: str | Layout = "striped",
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's share of a batch, ready for ``model(**batch)`` on a model from :func:`prepare`.

    Pass every rank the same full batch. Each sequence's tokens are split over the ranks of ``group`` in the
    layout's order; position ids are the tokens' true global positions (for RoPE); labels are shifted for
    next-token prediction before sharding (label of token t = ``labels[t + 1]``, -100 after the last token),
    so the model must not shift them again (the loss installed by :func:`prepare` does not).

    Packed documents: where the position ids restart (transformers' convention for packed sequences, as
    ``DataCollatorWithFlattening`` makes them) or ``cu_seqlens`` is given, each token attends only to its own
    document, no token is trained to predict the next document's first token (its label becomes -100), and
    the result carries the documents' global offsets as ``cu_seq_lens_q`` and ``cu_seq_lens_k``, which the
    model hands to the ring attention of every layer.

    Args:
        input_ids: (batch, seq) integer token ids, the whole sequence; ``seq`` must be a multiple of the
            world size (of twice the world size for ``"zigzag"``). Right-pad with any token and label -100
            to get there: under causal attention, padding at the end changes nothing before it.
        labels: (batch, seq) integer targets *unshifted*, as one would pass to ``model(labels=...)``;
            -100 marks tokens without a loss. Optional.
        position_ids: (seq,), (1, seq) or (batch, seq) global positions. Each run that counts up by one is a
            document; rows may hold different documents. Defaults to ``0 .. seq-1`` (one document), or to
            positions restarting at 0 in each document of ``cu_seqlens``.
        cu_seqlens: packed documents as offsets ``[0, len_0, len_0 + len_1, ..., seq]`` (flash-attn's
            convention): one list for every row, or one per row; position ids, if given, may restart only
            where a document starts. Optional: restarting position ids say the same.
        attention_mask: (batch, seq) padding mask as tokenizers make it: in each row one run of ones, the
            tokens, with zeros (padding) before it, after it or both. The padding becomes documents of its
            own, so no token attends to it, and its labels -100; the model gets no mask. Optional.
        layout: as given to :func:`prepare`. For ``"balanced"``, :func:`~striped_attention.balance_documents`
            of the documents is the layout the batch is sharded in (unshard with it).
        group: as given to :func:`prepare`.

    Returns:
        ``{"input_ids": (batch, local_seq), "position_ids": (batch or 1, local_seq), "labels": (batch,
        local_seq)}`` (labels only if given), ``local_seq = seq / world_size``, on ``input_ids``' device; with
        more than one document also ``"cu_seq_lens_q"`` and ``"cu_seq_lens_k"``: the global offsets, int32,
        1-D if every row holds the same documents, else (batch, most offsets), a short row padded with ``seq``.

    Raises:
        ValueError: on bad shapes or dtypes, a length the layout cannot split, position ids that restart
            inside a document of ``cu_seqlens``, a mask with zeros between tokens, or rows with different
            documents for ``"balanced"``.
    """
    named = _named(layout)
    _check_ids("input_ids", input_ids, None)
    batch, seq = input_ids.shape
    rank, size = _group_rank_size(group)
    get_layout("contiguous" if named == BALANCED else named).check(seq, size)
    position_ids, documents = _positions_and_documents(position_ids, cu_seqlens, batch, seq)
    padding = None if attention_mask is None else _padding(attention_mask, input_ids.shape)
    if padding is not None:
        documents = _cut_at_padding(documents, padding)
    lay = _layout_of_batch(named, documents, size)
    out = {
        "input_ids": shard(input_ids, layout=lay, dim=1, group=group),
        "position_ids": shard(position_ids.to(input_ids.device), layout=lay, dim=1, group=group),
    }
    if labels is not None:
        _check_ids("labels", labels, input_ids.shape)
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        for b, row in enumerate(documents):  # a document's last token has no next one
            shifted[slice(None) if len(documents) == 1 else b, [start - 1 for start in row[1:-1]]] = IGNORE_INDEX
        if padding is not None:  # nor is padding trained
            shifted[~padding.to(shifted.device)] = IGNORE_INDEX
        out["labels"] = shard(shifted.to(input_ids.device), layout=lay, dim=1, group=group)
    if any(len(row) > 2 for row in documents):
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = offsets_tensor(documents, input_ids.device)
    return out


# ----------------------------------------------------------------------------------------------------------
# One registered attention function, loss and input check per (layout, group)
# ----------------------------------------------------------------------------------------------------------

_UNSUPPORTED = {
    "output_attentions": "attention weights cannot be returned (output_attentions=True): the ring never forms them",
    "dropout": "attention dropout is not supported: set config.attention_dropout=0.0 or call model.eval()",
    "non_causal": "non-causal attention is not supported: the ring serves causal decoders only",
    "cache": (
        "KV caches and generation are not supported: each rank holds only its shard of the sequence; "
        "call the model with use_cache=False and no cache (prepare() sets config.use_cache=False)"
    ),
    "mask": (
        "attention_mask must be None or a (batch, seq) mask of ones: the ring applies the causal mask only, "
        "so padding would be attended; give the padding mask to shard_inputs(attention_mask=...), which makes "
        "the padding documents of its own"
    ),
    "no_positions": (
        "position_ids are missing, so the model would number this rank's tokens 0..local_seq-1; "
        "pass the dict from shard_inputs()"
    ),
    "balanced_rows": (
        f"layout {BALANCED!r} orders one set of documents for every row, but the rows hold different documents: "
        "pack the same documents in every row, or use a layout that does not depend on them (striped)"
    ),
    "softcap": "attention logit softcapping is not supported",
    "s_aux": "attention sinks are not supported",
    "sinks": "attention sinks are not supported",
    "position_bias": "additive position biases are not supported",
    "documents": (
        "cu_seq_lens_q and cu_seq_lens_k must be equal, the packed documents' global offsets [0, ..., seq] over "
        "the whole sequence: pass the dict from shard_inputs()"
    ),
}


@dataclass(eq=False)
class _Setup:
    """A ring attention function registered under ``name`` for one (layout, group), and its companions."""

    layout: str | Layout  # a name (BALANCED: each batch's order of its documents), or a Layout of one's own
    group: dist.ProcessGroup | None
    name: str

    def __deepcopy__(self, memo):  # copies of a prepared model share its registered setup (and group)
        return self

    # -- attention -------------------------------------------------------------------------------------

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' attention signature: query (batch, heads, local_seq, head_dim), key/value
        (batch, kv_heads, local_seq, head_dim); returns ((batch, local_seq, heads, head_dim), None)."""
        self._check_call(module, query, key, attention_mask, dropout, kwargs)
        documents = kwargs.get("cu_seq_lens_q")  # packed documents, from shard_inputs (checked by the hook)
        out = ring_attention(  # a named layout (BALANCED: the ring orders the documents) is one op when compiled
            query, key, value, layout=self.layout, group=self.group, causal=True, softmax_scale=scaling,
            cu_seqlens=documents, window=kwargs.get("sliding_window"),  # None: every earlier token
        )
        return out.transpose(1, 2).contiguous(), None

    def _check_call(self, module, query, key, attention_mask, dropout, kwargs) -> None:
        """Reject what the ring would compute wrongly. Every condition here is the same on every rank."""
        is_causal = kwargs.get("is_causal")
        if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
            raise ValueError(_UNSUPPORTED["non_causal"])
        if dropout:
            raise ValueError(_UNSUPPORTED["dropout"] + f" (got dropout={dropout})")
        config = getattr(module, "config", None)
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise ValueError(_UNSUPPORTED["output_attentions"])
        for name in ("softcap", "s_aux", "sinks", "position_bias"):
            if kwargs.get(name) is not None:
                raise ValueError(_UNSUPPORTED[name])
        if key.shape[2] != query.shape[2]:
            raise ValueError(_UNSUPPORTED["cache"] + f" (got {query.shape[2]} queries and {key.shape[2]} keys)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(_UNSUPPORTED["mask"] + f" (got a {attention_mask.dim()}-D mask)")

    # -- loss ------------------------------------------------------------------------------------------

    def loss(
        self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=IGNORE_INDEX, shift_labels=None,
        **kwargs,
    ):
        """This rank's share of the causal LM loss for labels already shifted by :func:`shard_inputs`.

        logits (batch, local_seq, vocab), labels (batch, local_seq). Returns ``world_size * sum of this rank's
        token losses / valid tokens over all ranks``; ``num_items_in_batch``, if given, replaces that count
        (the number of valid labels in the whole, unsharded batch).
        """
        if shift_labels is not None:
            raise ValueError("labels from shard_inputs() are already shifted; do not pass shift_labels")
        logits = logits.float().reshape(-1, vocab_size)
        labels = labels.reshape(-1).to(logits.device)
        if labels.numel() != logits.shape[0]:
            raise ValueError(f"labels have {labels.numel()} tokens but logits have {logits.shape[0]}")
        total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        size = _group_rank_size(self.group)[1]
        if num_items_in_batch is None:
            count = (labels != ignore_index).sum()
            if size > 1:
                count = count.to(_collective_device(self.group, logits.device))
                dist.all_reduce(count, group=self.group)
            num_items_in_batch = count
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total * size / num_items_in_batch

    # -- inputs of each forward pass -------------------------------------------------------------------

    def check_inputs(self, module, args, kwargs):
        """Forward pre-hook of the base model: validate the mask, positions, documents and cache on all ranks
        at once."""
        signature = _signature(module)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        for param in signature.parameters.values():  # flatten the forward's **kwargs into the named arguments
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(param.name, {}))
        tokens = arguments.get("input_ids")
        tokens = arguments.get("inputs_embeds") if tokens is None else tokens
        rank, size = _group_rank_size(self.group)
        code, offsets = self._local_problem(arguments, tokens, rank, size)
        if size == 1:
            if code is not None:
                raise ValueError(self._message(code))
            return None
        # Every rank learns every rank's verdict, so all raise together (and none waits in the ring).
        documents = arguments.get("cu_seq_lens_q") if code is None else None
        shape = (0, 0) if offsets is None else offsets.shape
        mine = [0 if code is None else 1 + _CODES.index(code), *shape, _crc(documents)]
        device = _collective_device(self.group, tokens.device if tokens is not None else torch.device("cpu"))
        table = [torch.empty(len(mine), dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(table, torch.tensor(mine, dtype=torch.int64, device=device), group=self.group)
        table = [row.tolist() for row in table]
        for r, (index, *_) in enumerate(table):
            if index:
                raise ValueError(f"rank {r}: {self._message(_CODES[index - 1])}")
        if len({tuple(row[1:]) for row in table}) > 1:
            raise ValueError(
                "ranks disagree on the batch size or the documents (cu_seq_lens_q): pass every rank its part of "
                f"the same batch, from shard_inputs(layout={_name(self.layout)!r})"
            )
        if offsets is not None and not _agree(offsets, self.group, device):
            raise ValueError(
                "position_ids disagree between ranks (different offsets): pass every rank its part of the "
                f"same batch, from shard_inputs(layout={_name(self.layout)!r})"
            )
        return None

    def _local_problem(self, arguments, tokens, rank, size):
        """(code of the first problem with this rank's inputs or None, position offsets or None).

        The offsets are (batch, documents): position id minus global position, which must be the same for every
        token of a document (NO_TOKEN where this rank holds none of it)."""
        if arguments.get("use_cache") or any(arguments.get(k) is not None for k in ("cache", "past_key_values")):
            return "cache", None
        mask = arguments.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or not bool(mask.bool().all())):
            return "mask", None
        documents, keys = arguments.get("cu_seq_lens_q"), arguments.get("cu_seq_lens_k")
        if (documents is None) != (keys is None) or (documents is not None and _listed(documents) != _listed(keys)):
            return "documents", None
        if tokens is None or size == 1:
            return None, None
        pos = arguments.get("position_ids")
        if pos is None:
            return "no_positions", None
        batch, seq = tokens.shape[0], tokens.shape[1] * size
        try:
            rows = _document_rows(documents, seq)
        except ValueError:
            return "documents", None
        if len(rows) not in (1, batch) or any(row[-1] != seq for row in rows):
            return "documents", None
        try:
            layout = _layout_of_batch(self.layout, rows, size)
        except ValueError:
            return "balanced_rows", None
        bounds = offsets_tensor(rows).long().expand(len(rows), -1).contiguous()  # (rows, offsets)
        want = positions(seq, layout=layout, rank=rank, world_size=size)
        doc = torch.searchsorted(bounds, want.expand(len(rows), -1).contiguous(), right=True) - 1
        want, doc = want.to(pos.device), doc.to(pos.device).expand(batch, -1)  # (batch, local): document index
        diff = pos.reshape(-1, want.numel()).expand(batch, -1) - want
        grid = (batch, bounds.shape[1] - 1)
        low = torch.full(grid, NO_TOKEN, device=pos.device).scatter_reduce(1, doc, diff, "amin")
        high = torch.full(grid, -NO_TOKEN, device=pos.device).scatter_reduce(1, doc, diff, "amax")
        if not bool((low.gather(1, doc) == high.gather(1, doc)).all()):
            return "layout", None
        return None, low

    def _message(self, code: str) -> str:
        if code == "layout":
            return (
                f"position_ids do not follow layout {_name(self.layout)!r} within each document: pass the dict "
                f"from shard_inputs(layout={_name(self.layout)!r}), the layout given to prepare() (for packed "
                "documents it also holds their offsets, cu_seq_lens_q and cu_seq_lens_k)"
            )
        return _UNSUPPORTED[code]


_CODES = (*_UNSUPPORTED, "layout")  # problem codes, numbered for the exchange between ranks
_SETUPS: list[_Setup] = []
_INPUT_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # prepared model -> its input-check hook
_SIGNATURES: dict[type, inspect.Signature] = {}


def _setup_for(layout: str | Layout, group) -> _Setup:
    """The registered setup for (layout, group), registering a new attention function on first use."""
    for setup in _SETUPS:
        if setup.layout == layout and setup.group is group:
            return setup
    setup = _Setup(layout, group, f"striped_attention_{_name(layout) or 'custom'}_{len(_SETUPS)}")
    AttentionInterface.register(setup.name, setup.attention)
    _SETUPS.append(setup)
    return setup


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _named(layout: str | Layout) -> str | Layout:
    """``layout`` checked: its name if it has one (BALANCED: a layout per batch, from its documents), else the
    Layout. ring_attention compiles a named layout into one op under torch.compile."""
    if isinstance(layout, str) and layout == BALANCED:
        return BALANCED
    try:
        lay = get_layout(layout)
    except ValueError as e:
        raise ValueError(f"{e}, or {BALANCED!r}") from None
    return lay.name if LAYOUTS.get(lay.name) is lay else lay


def _name(layout: str | Layout) -> str:
    return layout if isinstance(layout, str) else layout.name


def _document_rows(documents, seq: int) -> list[tuple[int, ...]]:
    """The offsets of cu_seq_lens_q, checked: one tuple per row, or one for every row; None: one document."""
    return [(0, seq)] if documents is None else list(_rows_of_offsets(documents) or [_offsets(documents)])


def _layout_of_batch(layout: str | Layout, rows, world_size: int) -> str | Layout:
    """The layout a batch whose rows hold the documents ``rows`` (one list of offsets, or one per row) is
    sharded in: ``layout``, or for BALANCED the balanced order of the one set of documents."""
    if layout != BALANCED:
        return layout
    return get_layout(for_documents(BALANCED, rows, world_size))  # rows that differ raise; one document: contiguous


def _collective_device(group, device: torch.device) -> torch.device:
    """Where a small tensor for a collective must live: the device for NCCL, the CPU otherwise."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _signature(module) -> inspect.Signature:
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(module.forward)
    return _SIGNATURES[cls]


NO_TOKEN = torch.iinfo(torch.int64).max  # in a table of offsets: this rank holds no token of the document


def _listed(documents):
    """Document offsets (a tensor, or lists of ints or of tensors) as nested lists of ints."""
    if isinstance(documents, torch.Tensor):
        return documents.tolist()
    if isinstance(documents, (list, tuple)):
        return [_listed(x) for x in documents]
    return documents


def _crc(documents) -> int:
    """A number that differs between ranks if their document offsets do (0 without documents)."""
    return 0 if documents is None else zlib.crc32(repr(_listed(documents)).encode())


def _agree(offsets: torch.Tensor, group, device: torch.device) -> bool:
    """Whether every rank that holds tokens of a (row, document) found the same position offset for it."""
    held = offsets != NO_TOKEN
    both = torch.stack([offsets, torch.where(held, -offsets, NO_TOKEN)]).to(device)  # min of x, min of -x
    dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
    low, high = both[0].to(offsets.device), -both[1].to(offsets.device)
    return bool((~held | ((low == offsets) & (high == offsets))).all())


def _check_ids(name: str, t, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if shape is None and t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq), got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(t.shape)}")


def _padding(mask, shape) -> torch.Tensor:
    """(batch, seq) bool on the CPU, True at tokens, from a padding mask; ValueError unless each row's ones are
    one run."""
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    tokens = mask.bool().cpu()
    runs = (tokens.int().diff(dim=1, prepend=torch.zeros(shape[0], 1, dtype=torch.int)) == 1).sum(dim=1)
    if bool((runs > 1).any()):
        row = int((runs > 1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has padding between tokens: the ring serves padding before "
                         "or after a row's tokens, not holes (pack documents with cu_seqlens instead)")
    return tokens


def _cut_at_padding(documents: list[list[int]], tokens: torch.Tensor) -> list[list[int]]:
    """Each row's documents cut also where its padding starts and ends, so padding is a document of its own."""
    rows = []
    for b, row in enumerate(tokens):
        held = row.nonzero().flatten()
        cuts = {int(held[0]), int(held[-1]) + 1} if len(held) else set()
        rows.append(sorted(set(documents[b % len(documents)]) | cuts))
    return rows if any(row != rows[0] for row in rows) else rows[:1]


def _positions_and_documents(position_ids, cu_seqlens, batch: int, seq: int):
    """(position ids (1 or batch, seq), documents: a list of offsets [0, ..., seq] for every row, or one per
    row) from what the caller gave, checked: the documents are cu_seqlens, or else the runs of position ids
    that count up by one."""
    given = None
    if cu_seqlens is not None:
        per_row = _rows_of_offsets(cu_seqlens)
        given = [list(r) for r in per_row] if per_row is not None else [list(_offsets(cu_seqlens))]
        if len(given) not in (1, batch):
            raise ValueError(f"cu_seqlens has offsets for {len(given)} rows, but the batch has {batch}")
        if any(row[-1] != seq for row in given):
            raise ValueError(f"cu_seqlens end at {[row[-1] for row in given if row[-1] != seq][0]}, but the "
                             f"sequences have {seq} tokens")
    if position_ids is None:
        if given is None:
            return torch.arange(seq).unsqueeze(0), [[0, seq]]
        starts = [torch.tensor(row[:-1]).repeat_interleave(torch.tensor(row).diff()) for row in given]
        return torch.arange(seq) - torch.stack(starts), given  # restarting at 0 in each document
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise ValueError("position_ids must be an integer torch.Tensor")
    pos = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
    if pos.dim() != 2 or pos.shape[1] != seq or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids must have shape ({seq},), (1, {seq}) or ({batch}, {seq}), got {tuple(position_ids.shape)}"
        )
    restarts = pos.diff(dim=1) != 1  # (rows, seq - 1): token t + 1 starts a document
    found = [[0, *(row.nonzero().flatten() + 1).tolist(), seq] for row in restarts]
    if given is None:
        return pos, found if any(row != found[0] for row in found) else found[:1]
    for b in range(max(len(found), len(given))):
        inside = sorted(set(found[b % len(found)]) - set(given[b % len(given)]))
        if inside:
            raise ValueError(
                f"position_ids restart at token {inside[0]} of row {b}, inside a document of cu_seqlens; they must "
                "count up by one within each document"
            )
    return pos, given

