"""Train a causal Llama-style decoder with context parallelism: the ``striped-attention train`` command.

The recipe, one step:

1. Data: the global batch is ``batch`` windows of ``seq_len + 1`` bytes from the corpus (the Python standard
   library's source files, byte-level tokens). Token ids are ``window[:-1]`` and next-token labels
   ``window[1:]``, both taken *before* sharding, so no label is lost at a shard edge. With ``documents``
   each file in a window is a packed document: its tokens attend only within it (``cu_seqlens`` per row).
2. Sharding, once per step: rows are split over the data-parallel (dp) ranks, and each row's tokens, labels
   and global positions are sharded along the sequence with the layout over the context-parallel (cp)
   ranks. The model never permutes again: RoPE reads the global positions and attention runs on the ring.
3. Loss and gradients (the convention): each rank's loss is the mean cross-entropy over its own tokens
   (every rank holds the same number). The ring's backward sends each K/V gradient home, so after
   ``backward`` each rank holds its share of the gradient of the *sum* of its cp group's losses. One
   all-reduce over all dp x cp ranks then *averages* the gradients (and the losses): the result is the
   gradient of the mean loss over every token of the global batch, the single-device update. The reported
   loss is that mean.

Checkpoints hold the model, the optimizer and the step; the batch of each step and the learning rate are
functions of (seed, step), so a resumed run continues the same loss curve bit for bit. They are written
atomically (write a temporary file, fsync, rename) and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .bench import Progress
from .layouts import BALANCED, LAYOUTS, for_documents, get_layout, offsets_tensor, positions
from .models.llama import PRESETS, Llama, get_config

__all__ = [
    "TrainConfig", "Parallel", "Corpus", "load_corpus", "batch_indices", "sequence_batch", "training_batch",
    "file_offsets", "LocalBatch", "local_batch",
    "learning_rate", "train_step", "evaluate", "shard_model", "save_checkpoint", "load_checkpoint",
    "training_state", "load_training_state", "resumable_state",
    "peak_memory_gib", "train_on_rank", "run",
]

DTYPES = ("float32", "bfloat16")
CHECKPOINT = "checkpoint.pt"
# the fields a resumed run must share with its checkpoint: together they fix the loss curve
CURVE_FIELDS = (
    "model", "seq_len", "batch", "steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
    "seed", "dtype", "data", "val_percent", "documents", "sliding_window", "global_every",
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch`` is the global batch in sequences, split over the ``dp`` replicas."""

    model: str = "tiny"
    seq_len: int = 16384  # tokens per sequence
    batch: int = 1  # sequences per step, over all data-parallel replicas
    world_size: int = 1  # ranks = dp x cp
    dp: int = 1  # data-parallel replicas; cp = world_size // dp ranks share each sequence
    layout: str = "striped"
    steps: int = 100
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    dtype: str = "float32"  # compute dtype; weights and optimizer state stay float32
    eval_every: int = 25  # steps between validation losses; 0: only after the last step
    eval_batches: int = 2  # batches of validation sequences per validation loss
    data: str | None = None  # directory of *.py files; None: the Python standard library
    val_percent: float = 5.0  # share of the corpus files held out for validation
    documents: bool = False  # attend within each file only: a window's files are packed documents
    sliding_window: int | None = None  # local layers' window (tokens); None: every layer sees the whole past
    global_every: int = 0  # with a window, every global_every-th layer sees the whole past; 0: none does
    log_json: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50  # steps between checkpoints (and one after the last step)
    resume: bool = False
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads of each rank; None: 1 per CPU rank of several, else torch's
    compile: str | None = None  # torch.compile the model with this backend ("inductor", ...); None: eager
    activation_checkpointing: bool = False  # recompute each layer's forward in the backward: less memory
    fsdp: bool = False  # shard parameters, gradients and optimizer state over all ranks (FSDP2)
    progress: bool = True

    def __post_init__(self):
        self.model_config()
        layout = get_layout(for_documents(self.layout, None, 1))
        for name in ("seq_len", "batch", "world_size", "dp", "steps", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.world_size % self.dp:
            raise ValueError(f"dp ({self.dp}) must divide world_size ({self.world_size})")
        if self.batch % self.dp:
            raise ValueError(f"batch ({self.batch}) must be a multiple of dp ({self.dp}): each replica takes batch/dp")
        layout.check(self.seq_len, self.cp)
        if self.layout == BALANCED and not (self.documents and self.batch == self.dp):
            raise ValueError(f"layout {BALANCED!r} reorders the files of one row per replica: it needs documents "
                             f"and batch equal to dp ({self.dp}), got documents={self.documents}, batch={self.batch}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr} and {self.min_lr_ratio}")
        if not 0 < self.val_percent < 100:
            raise ValueError(f"val_percent must be in (0, 100), got {self.val_percent}")
        if self.fsdp and self.world_size < 2:
            raise ValueError("fsdp shards the model over the ranks: it needs world_size >= 2")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir")
        if self.compile is not None and self.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"unknown torch.compile backend {self.compile!r}; choose one of "
                             f"{', '.join(torch._dynamo.list_backends())}")

    def model_config(self):
        """The model preset, with this run's sliding windows (ValueError on bad ones)."""
        return replace(get_config(self.model), sliding_window=self.sliding_window, global_every=self.global_every)

    @property
    def cp(self) -> int:
        return self.world_size // self.dp


# ----------------------------------------------------------------------------------------------------------
# Parallel dimensions: one (dp, cp) DeviceMesh, built once
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parallel:
    """This rank's place on the (dp, cp) mesh. ``cp_group`` is None in a single process."""

    dp: int = 1
    cp: int = 1
    dp_rank: int = 0
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None

    @classmethod
    def build(cls, dp: int, device: torch.device) -> Parallel:
        """The mesh over all ranks of the default group: ``dp`` rows, world_size / dp ranks per cp group."""
        if not dist.is_initialized():
            if dp != 1:
                raise ValueError(f"dp={dp} needs {dp} or more ranks; torch.distributed is not initialized")
            return cls()
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if world % dp:
            raise ValueError(f"dp ({dp}) must divide the number of ranks ({world})")
        mesh = init_device_mesh(device.type, (dp, world // dp), mesh_dim_names=("dp", "cp"))
        return cls(dp, world // dp, mesh.get_local_rank("dp"), mesh.get_local_rank("cp"), mesh.get_group("cp"))

    @property
    def world(self) -> int:
        return self.dp * self.cp

    def maximum(self, value: float, device: torch.device) -> float:
        """The largest ``value`` over all dp x cp ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over all dp x cp ranks, in place, with one all-reduce of one flat buffer."""
        if self.world == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)  # the mesh spans the default group, so this covers both dimensions
        flat /= self.world
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))


# ----------------------------------------------------------------------------------------------------------
# Data: the standard library's source files as bytes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Byte-level tokens (vocabulary 256). Each file ends with a 0 byte, the end-of-document token."""

    train: torch.Tensor  # (n_train,) uint8
    val: torch.Tensor  # (n_val,) uint8
    files: tuple[int, int]  # (train files, validation files)


def stdlib_dir() -> Path:
    """The directory of this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=2)
def load_corpus(data: str | None = None, *, val_percent: float = 5.0) -> Corpus:
    """Every ``*.py`` file under ``data`` (default: the standard library, without site-packages), by sorted
    path. A file goes to validation when crc32(its relative path) % 10000 < val_percent * 100: deterministic
    and stable when files are added or removed."""
    root = Path(data) if data is not None else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"data directory {str(root)!r} does not exist")
    paths = sorted(
        p for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for p in paths:
        held_out = zlib.crc32(p.relative_to(root).as_posix().encode()) % 10000 < val_percent * 100
        parts[held_out].append(p.read_bytes() + b"\0")
    if not parts[False] or not parts[True]:
        raise ValueError(
            f"{str(root)!r} has {len(paths)} *.py file(s): {len(parts[False])} for training and "
            f"{len(parts[True])} for validation; both need at least one (adjust val_percent or the directory)"
        )
    train, val = (torch.frombuffer(bytearray(b"".join(parts[k])), dtype=torch.uint8) for k in (False, True))
    return Corpus(train, val, (len(parts[False]), len(parts[True])))


def num_sequences(data: torch.Tensor, seq_len: int) -> int:
    """How many packed windows of seq_len + 1 bytes (consecutive windows share one byte) ``data`` holds."""
    return (data.numel() - 1) // seq_len


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, *, n_sequences: int, batch: int, seed: int) -> torch.Tensor:
    """LongTensor (batch,): the training windows of 0-based ``step``, a function of (seed, step) only.

    Windows are visited in a seeded shuffle, a new one each epoch.
    """
    out = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, j = divmod(i, n_sequences)
        out.append(int(_epoch_order(seed, epoch, n_sequences)[j]))
    return torch.tensor(out)


def sequence_batch(data: torch.Tensor, indices: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), int64 (len(indices), seq_len): window i is data[i*seq_len : (i+1)*seq_len + 1];
    ids are its first seq_len bytes and labels its last seq_len (the next token of each id)."""
    windows = torch.stack([data[i * seq_len : (i + 1) * seq_len + 1] for i in indices.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def training_batch(corpus: Corpus, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), int64 (cfg.batch, cfg.seq_len): the global batch of 1-based ``step``."""
    n = num_sequences(corpus.train, cfg.seq_len)
    indices = batch_indices(step - 1, n_sequences=n, batch=cfg.batch, seed=cfg.seed)
    return sequence_batch(corpus.train, indices, cfg.seq_len)


def file_offsets(ids: torch.Tensor) -> list[list[int]]:
    """Each row's files as packed documents: offsets [0, ..., seq_len] (ring_attention's cu_seqlens), a file
    starting after each 0 byte (the end of the one before)."""
    return [[0, *((row[:-1] == 0).nonzero().flatten() + 1).tolist(), row.numel()] for row in ids.cpu()]


class LocalBatch(NamedTuple):
    """This rank's share of the global batch: ``ids`` and ``labels`` (batch/dp, seq_len/cp), ``positions``
    (seq_len/cp,) the global positions for RoPE, ``cu_seqlens`` each row's files (or None), and the name of the
    ``layout`` it was sharded with (for "balanced", ring_attention finds the order of the files again from
    ``cu_seqlens``, so a compiled model holds the ring in its graph)."""

    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: list[list[int]] | None
    layout: str


def local_batch(ids: torch.Tensor, labels: torch.Tensor, *, layout: str, par: Parallel,
                documents: bool = False) -> LocalBatch:
    """This rank's :class:`LocalBatch` from the global batch (batch, seq_len).

    Rows: this dp replica's batch/dp. Columns: the layout's positions for this cp rank. cu_seqlens: with
    ``documents``, each row's files (:func:`file_offsets`), else None. Layout ``"balanced"``: the files of the
    replica's one row reordered to balance the cp ranks (:func:`~striped_attention.balance_documents`).
    """
    rows = ids.shape[0] // par.dp
    mine = slice(par.dp_rank * rows, (par.dp_rank + 1) * rows)
    cu_seqlens = file_offsets(ids[mine]) if documents else None
    if layout == BALANCED and cu_seqlens is not None and len(cu_seqlens) != 1:
        raise ValueError(f"layout {BALANCED!r} orders one row's files; this replica has {len(cu_seqlens)} rows")
    lay = for_documents(layout, cu_seqlens, par.cp)
    pos = positions(ids.shape[1], layout=lay, rank=par.cp_rank, world_size=par.cp).to(ids.device)
    return LocalBatch(ids[mine][:, pos], labels[mine][:, pos], pos, cu_seqlens, layout)


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 1-based ``step``: linear warm-up, then cosine decay to lr * min_lr_ratio at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def local_loss(model, batch: LocalBatch, *, par: Parallel, dtype: str) -> torch.Tensor:
    """Mean cross-entropy (float32 scalar) over this rank's tokens."""
    documents = None if batch.cu_seqlens is None else offsets_tensor(batch.cu_seqlens)  # a tensor: no recompiles
    with torch.autocast(batch.ids.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(batch.ids, batch.positions, layout=batch.layout, group=par.cp_group, cu_seqlens=documents)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten())


def train_step(model, optimizer, batch: LocalBatch, *, par: Parallel, lr: float, grad_clip: float, dtype: str):
    """One update from this rank's ``batch``; returns (mean loss over all ranks' tokens, gradient norm)."""
    optimizer.zero_grad(set_to_none=True)
    loss = local_loss(model, batch, par=par, dtype=dtype)
    loss.backward()
    mean_loss = loss.detach().clone().view(1)
    grads = [p.grad for p in model.parameters()]
    sharded = isinstance(grads[0], DTensor)  # FSDP: reduce-scattered, averaged over the ranks already
    par.average_([mean_loss] if sharded else grads + [mean_loss])
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return mean_loss.item(), (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


@torch.no_grad()
def evaluate(model, corpus: Corpus, cfg: TrainConfig, par: Parallel, device: torch.device) -> float:
    """Mean loss over the first eval_batches x batch validation windows (the same ones every time)."""
    n = num_sequences(corpus.val, cfg.seq_len)
    indices = torch.arange(cfg.eval_batches * cfg.batch) % n
    losses = []
    for chunk in indices.split(cfg.batch):
        ids, labels = sequence_batch(corpus.val, chunk, cfg.seq_len)
        batch = local_batch(ids.to(device), labels.to(device), layout=cfg.layout, par=par, documents=cfg.documents)
        losses.append(local_loss(model, batch, par=par, dtype=cfg.dtype))
    mean = torch.stack(losses).mean().view(1)
    par.average_([mean])
    return mean.item()


def build_model_and_optimizer(cfg: TrainConfig, device: torch.device):
    """The model, initialised from ``cfg.seed`` (identical on every rank and world size), and AdamW
    (weight decay on matrices only). With ``cfg.fsdp`` the model is sharded first (:func:`shard_model`), so
    AdamW's state is sharded too."""
    torch.manual_seed(cfg.seed)
    model = Llama(cfg.model_config(), activation_checkpointing=cfg.activation_checkpointing).to(device)
    if cfg.fsdp:
        shard_model(model, device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    return model, optimizer


def shard_model(model: Llama, device: torch.device) -> None:
    """FSDP2 over every rank of the default group: each layer is one unit (its parameters gathered for its
    forward and backward, then freed), the embedding, final norm and head the root's. FSDP's reduce-scatter
    averages the gradients over all ranks: the mean this recipe's all-reduce takes without it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def save_checkpoint(directory: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to directory/checkpoint.pt atomically; return the path.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file is then
    renamed over checkpoint.pt: a crash at any point leaves either the old or the new checkpoint whole.
    Temporary files left by an earlier crash are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".{CHECKPOINT}.*.tmp"):
        stale.unlink(missing_ok=True)
    final, tmp = directory / CHECKPOINT, directory / f".{CHECKPOINT}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final


def load_checkpoint(directory: str | os.PathLike, *, mmap: bool = False) -> dict:
    """The state saved by :func:`save_checkpoint`, loaded on the CPU with ``weights_only=True``
    (``mmap=True`` maps the tensors instead of reading them)."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no checkpoint to resume from: {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def training_state(model, optimizer, *, fsdp: bool) -> dict:
    """The model's and AdamW's state as a checkpoint holds them, whole. With FSDP they are gathered from the
    shards (a collective: call it on every rank; rank 0 gets the tensors, on the CPU) and AdamW's state is
    keyed by parameter name, marked ``"fsdp": True``."""
    if not fsdp:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=whole),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=whole), "fsdp": True}


def load_training_state(model, optimizer, state: dict) -> None:
    """Load :func:`training_state`'s ``state`` into the model and AdamW (FSDP: each rank keeps its shards)."""
    if not state.get("fsdp"):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=whole)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=whole)


def _curve(cfg: TrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in CURVE_FIELDS}


def resumable_state(cfg: TrainConfig, *, mmap: bool = False) -> dict:
    """The checkpoint ``cfg`` resumes from; ValueError if it is missing or was saved by a different run."""
    state = load_checkpoint(cfg.checkpoint_dir, mmap=mmap)
    # a field newer than the checkpoint (documents) had its default value then
    saved = {k: state["run"].get(k, TrainConfig.__dataclass_fields__[k].default) for k in CURVE_FIELDS}
    differ = {k: (v, saved[k]) for k, v in _curve(cfg).items() if saved[k] != v}
    if differ:
        detail = ", ".join(f"{k}={now!r} (checkpoint: {then!r})" for k, (now, then) in differ.items())
        raise ValueError(f"cannot resume: this run differs from its checkpoint in {detail}")
    if state.get("fsdp", False) != cfg.fsdp:
        saved_with = "without --fsdp" if cfg.fsdp else "with --fsdp"
        raise ValueError(f"cannot resume: the checkpoint was saved {saved_with}; resume {saved_with} too")
    return state


def _truncate_log(path: str, done: int) -> None:
    """Drop the log records of steps after ``done`` (written after the checkpoint, before a crash)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash: nothing valid follows
                break
            if record["step"] <= done:
                keep.append(line)
    with open(path, "w") as f:
        f.writelines(keep)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: on a GPU what torch's allocator has held at most, on the CPU the
    resident set's high-water mark (the whole process: torch, the corpus, the model and its activations)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _status(record: dict, total: int, seconds_left: float) -> str:
    """The progress line's text after a step: a bar, loss, validation loss, tokens/s, time left."""
    done = 20 * record["step"] // total
    val = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
    return (f"[{'#' * done}{'.' * (20 - done)}]  loss {record['loss']:.4f}{val}  "
            f"{record['tokens_per_s']:,.0f} tok/s  {seconds_left:.0f} s left")


def train_on_rank(cfg: TrainConfig, par: Parallel | None = None) -> list[dict]:
    """Run the training loop on this rank; return one record per step done in this run (same on every rank).

    Records: step, loss, lr, grad_norm, step_s, tokens_per_s, peak_memory_gib (the largest
    :func:`peak_memory_gib` over the ranks so far), and val_loss on validation steps. Call it on
    every rank of an initialised process group with dp x cp ranks (or in one process when world_size is 1).
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    par = par or Parallel.build(cfg.dp, device)
    if par.world != cfg.world_size:
        raise ValueError(f"world_size is {cfg.world_size} but {par.world} ranks are running")
    lead = dist.get_rank() == 0 if dist.is_initialized() else True
    corpus = load_corpus(cfg.data, val_percent=cfg.val_percent)
    if num_sequences(corpus.train, cfg.seq_len) < 1 or num_sequences(corpus.val, cfg.seq_len) < 1:
        raise ValueError(
            f"the corpus ({corpus.train.numel()} training and {corpus.val.numel()} validation bytes) is too "
            f"small for seq_len {cfg.seq_len}"
        )
    model, optimizer = build_model_and_optimizer(cfg, device)
    forward = torch.compile(model, backend=cfg.compile) if cfg.compile else model  # shares model's parameters
    done = 0
    if cfg.resume:
        state = resumable_state(cfg)
        load_training_state(model, optimizer, state)
        done = state["step"]
    log = None
    if cfg.log_json and lead:
        Path(cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            _truncate_log(cfg.log_json, done)
        log = open(cfg.log_json, "a" if cfg.resume else "w")
    progress = Progress("train") if cfg.progress and lead else None
    records, started = [], time.perf_counter()
    try:
        for step in range(done + 1, cfg.steps + 1):
            start = time.perf_counter()
            ids, labels = training_batch(corpus, step, cfg)
            batch = local_batch(ids.to(device), labels.to(device), layout=cfg.layout, par=par, documents=cfg.documents)
            lr = learning_rate(step, cfg)
            loss, norm = train_step(forward, optimizer, batch, par=par, lr=lr, grad_clip=cfg.grad_clip, dtype=cfg.dtype)
            elapsed = time.perf_counter() - start
            record = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": norm, "step_s": elapsed,
                "tokens_per_s": cfg.batch * cfg.seq_len / elapsed,
                "peak_memory_gib": par.maximum(peak_memory_gib(device), device),
            }
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                record["val_loss"] = evaluate(forward, corpus, cfg, par, device)
            records.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if cfg.checkpoint_dir and (step == cfg.steps or step % cfg.checkpoint_every == 0):
                state = training_state(model, optimizer, fsdp=cfg.fsdp)  # with FSDP, gathered from every rank
                if lead:
                    save_checkpoint(cfg.checkpoint_dir, {"step": step, **state, "run": _curve(cfg)})
            if progress:
                left = (time.perf_counter() - started) / (step - done) * (cfg.steps - step)
                progress(step, cfg.steps, _status(record, cfg.steps, left))
    finally:
        if log:
            log.close()
    if cfg.checkpoint_dir and dist.is_initialized():
        dist.barrier()  # nobody returns (and possibly resumes) before the last checkpoint is on disk
    return records


def run(cfg: TrainConfig) -> list[dict]:
    """Train on ``cfg.world_size`` local ranks (started here, or torchrun's); return rank 0's records."""
    from .launch import init_distributed, launch, torch_threads, under_torchrun

    threads = cfg.threads  # of each rank; by default one per CPU rank, so that local ranks do not share cores
    if threads is None and cfg.device == "cpu":
        threads = 1
    if cfg.resume:
        resumable_state(cfg, mmap=True)  # fail here, before starting ranks, if it cannot resume
    if under_torchrun():
        init_distributed(cfg.device, threads=threads)
        try:
            records = train_on_rank(replace(cfg, world_size=dist.get_world_size()))
            dist.barrier()  # leave together: a rank that exits early breaks its peers' connections
            return records
        finally:
            dist.destroy_process_group()
    if cfg.world_size == 1:
        with torch_threads(cfg.threads):
            return train_on_rank(cfg)
    return launch(train_on_rank, cfg.world_size, cfg, device=cfg.device, threads_per_rank=threads)[0]


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a Llama-style decoder on byte-level Python source with context parallelism",
        description=(
            "Train a causal Llama-style decoder on the Python standard library's source (bytes) with the "
            "sequence sharded over local ranks (1 thread each on CPU unless --threads). Each sequence is sharded "
            "once per step with --layout; attention runs on the ring; losses and updates equal single-device "
            "training. "
            "Under torchrun the launched ranks are used instead of --world-size."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--model", default=d.model, choices=list(PRESETS), help="model preset (see the README's Models table)")
    add("--seq-len", type=int, default=d.seq_len, help="tokens (bytes) per sequence")
    add("--batch", type=int, default=d.batch, help="sequences per step, over all data-parallel replicas")
    add("--world-size", type=int, default=d.world_size, help="number of local ranks (processes) = dp x cp")
    add("--dp", type=int, default=d.dp, help="data-parallel replicas; world-size/dp ranks share each sequence")
    add("--layout", default=d.layout, choices=[*sorted(LAYOUTS), BALANCED],
        help="how a sequence is split over the cp ranks; balanced: each row's files whole, reordered to balance "
             "the ranks (balance_documents; needs --documents and --batch equal to --dp)")
    add("--steps", type=int, default=d.steps, help="optimizer steps in total (a resumed run stops here too)")
    add("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    add("--min-lr-ratio", type=float, default=d.min_lr_ratio,
        help="final learning rate as a fraction of --lr (cosine decay)")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on weight matrices")
    add("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm (0: no clipping)")
    add("--seed", type=int, default=d.seed, help="seed of the weights and of the data order")
    add("--dtype", default=d.dtype, choices=DTYPES, help="compute dtype (weights and optimizer stay float32)")
    add("--eval-every", type=int, default=d.eval_every, help="steps between validation losses (0: only at the end)")
    add("--eval-batches", type=int, default=d.eval_batches, help="batches of validation sequences per validation loss")
    add("--data", metavar="DIR", help="directory whose *.py files form the corpus (default: the standard library)")
    add("--val-percent", type=float, default=d.val_percent, help="percent of the corpus files held out for validation")
    add("--documents", action="store_true",
        help="attend within each file only: the files in a sequence are packed documents (ring_attention's "
             "cu_seqlens, one list per row); every token keeps its next-byte target")
    add("--sliding-window", type=int, metavar="TOKENS", default=argparse.SUPPRESS,
        help="local layers: each token sees itself and the TOKENS - 1 before it (ring_attention's window; "
             "default: every layer sees the whole past)")
    add("--global-every", type=int, metavar="K", default=argparse.SUPPRESS,
        help="with --sliding-window, every K-th layer sees the whole past (Gemma 2, GPT-OSS: 2; Gemma 3: 6; "
             "default 0: no layer)")
    add("--log-json", metavar="PATH", help="write one JSON object per step (step, loss, tokens_per_s, ...) to PATH")
    add("--checkpoint-dir", metavar="DIR", help="save DIR/checkpoint.pt every --checkpoint-every steps and at the end")
    add("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    add("--resume", action="store_true", help="continue from DIR/checkpoint.pt (same curve, bit for bit)")
    add("--device", default=d.device, choices=["cpu", "cuda"], help="cpu: gloo ranks; cuda: one GPU per rank, NCCL")
    add("--threads", type=int, metavar="N",
        help="torch intra-op threads of each rank (default: 1 per rank on CPU when there are several ranks, "
             "torch's own default in a single process)")
    add("--compile", nargs="?", const="inductor", metavar="BACKEND", default=argparse.SUPPRESS,
        help="torch.compile the model with BACKEND (inductor if none is named; default: eager); the ring stays "
             "one op in its graphs")
    add("--activation-checkpointing", action="store_true", default=argparse.SUPPRESS,
        help="keep only each layer's input for the backward and recompute its forward there (the ring "
             "included): less activation memory for about one more forward pass")
    add("--fsdp", action="store_true", default=argparse.SUPPRESS,
        help="shard parameters, gradients and AdamW's state over all ranks (FSDP2, one unit per layer): the "
             "model's memory divided by the ranks, the same updates; needs 2 or more ranks")
    add("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
        help="no progress on stderr (shown by default)")
    p.set_defaults(func=main)


def _windows(cfg: TrainConfig) -> str:
    if cfg.sliding_window is None:
        return ""
    every = f", one layer in {cfg.global_every} global" if cfg.global_every else ""
    return f", sliding window {cfg.sliding_window}{every}"


def main(args) -> int:
    from .launch import under_torchrun

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if under_torchrun():
        values["world_size"] = int(os.environ["WORLD_SIZE"])
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only rank 0 reports
    try:
        cfg = TrainConfig(**values)
        if lead:
            print(
                f"training {cfg.model} ({cfg.model_config().num_params() / 1e6:.1f}M parameters) on {cfg.batch} x "
                f"{cfg.seq_len} tokens per step, {cfg.world_size} rank(s) = dp {cfg.dp} x cp {cfg.cp}, layout "
                f"{cfg.layout}, {cfg.dtype}, steps {cfg.steps}{', files as packed documents' if cfg.documents else ''}"
                f"{_windows(cfg)}",
                flush=True,
            )
        records = run(cfg)
    except ValueError as e:
        print(f"striped-attention train: error: {e}", file=sys.stderr)
        return 2
    if not lead:
        return 0
    if not records:
        print(f"nothing to do: the checkpoint has done all {cfg.steps} steps")
        return 0
    last = records[-1]
    speed = statistics.median(r["tokens_per_s"] for r in records[1:] or records)
    val = f", validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
    memory = "GPU memory allocated" if cfg.device == "cuda" else "resident memory"
    print(f"step {last['step']}: loss {last['loss']:.4f}{val}; median {speed:,.0f} tokens/s; peak {memory} "
          f"{last['peak_memory_gib']:.2f} GiB (the largest rank)")
    return 0
