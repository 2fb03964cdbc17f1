"""Start local ranks through torch's own launcher, or join ranks that torchrun already started.

``launch(fn, world_size, *args)`` runs ``fn(*args)`` on ``world_size`` local processes with the process group
initialised (gloo on CPU, NCCL with one GPU per rank) and returns each rank's return value, by rank. It
uses ``torch.distributed.launcher``: the elastic agent watches the ranks and stops the whole group when one
fails, and the rendezvous listens on 127.0.0.1. Under torchrun (``RANK`` and ``WORLD_SIZE`` set) call
:func:`init_distributed` in the script instead.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["launch", "init_distributed", "under_torchrun", "LaunchError"]

DEFAULT_TIMEOUT_S = 300.0


class LaunchError(RuntimeError):
    """A rank failed; the message names the rank and carries its error."""


def under_torchrun() -> bool:
    """True when this process is a rank started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> torch.device:
    """Initialise the default process group from the environment; return this rank's device.

    gloo for CPU, NCCL for CUDA (one GPU per local rank). ``timeout_s`` bounds every collective, so a rank
    that stops answering produces an error instead of a hang. ``threads`` sets torch's intra-op threads.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return dev


def _rank_main(fn: Callable, args: tuple, device: str, timeout_s: float, threads: int | None) -> Any:
    init_distributed(device, timeout_s, threads)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(failure) -> str:
    """The failed rank's error: its traceback when it raised, else how it died."""
    message = failure.message
    if isinstance(message, dict):
        return message.get("extraInfo", {}).get("py_callstack") or message.get("message", str(message))
    return message or f"exit code {failure.exitcode}"


def launch(
    fn: Callable,
    world_size: int,
    *args,
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads_per_rank: int | None = 1,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks; return their results, indexed by rank.

    ``fn`` must be importable (a module-level function): ranks are spawned processes. ``device="cuda"``
    gives rank r the GPU r and NCCL; otherwise gloo on CPU. ``timeout_s`` bounds each collective.
    Raises LaunchError naming the failed rank if any rank fails; the other ranks are stopped.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"striped-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        rdzv_configs={"timeout": int(timeout_s)},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    try:
        results = elastic_launch(config, _rank_main)(fn, args, device, timeout_s, threads_per_rank)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise LaunchError(f"rank {rank} failed (exit code {failure.exitcode}): {_describe(failure)}") from None
    return [results[r] for r in range(world_size)]
