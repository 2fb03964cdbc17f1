"""Start local ranks through torch's own launcher, or join ranks that torchrun already started.

``launch(fn, world_size, *args)`` runs ``fn(*args)`` on ``world_size`` local processes with the process group
initialised (gloo on CPU, NCCL with one GPU per rank) and returns each rank's return value, by rank. Under
torchrun (``RANK`` and ``WORLD_SIZE`` set) call :func:`init_distributed` in the script instead.

What the launcher guarantees, and who provides it:

* torch's elastic agent (``torch.distributed.launcher``) watches the ranks every 0.1 s; when one exits
  abnormally it sends SIGTERM to the others (which ends them at once, even inside a collective, unless
  ``fn`` installed a SIGTERM handler: torch then waits 30 s before SIGKILL), and ``launch`` raises
  :class:`LaunchError` naming the rank and saying why it failed (its exception, exit code or signal).
* ``timeout_s`` bounds every collective and point-to-point transfer (``init_process_group(timeout=...)``),
  so a rank whose peer stops answering fails with an error instead of hanging; a rank that returns waits at
  most ``timeout_s`` at a final barrier for the others, so a peer stuck outside any collective fails too.
* Ctrl-C (SIGINT to the launching process) stops every rank (SIGINT, then SIGKILL after
  :data:`SHUTDOWN_GRACE_S`) and raises KeyboardInterrupt. Ranks take the
  default action on SIGINT, which is also the signal torch sends them when the launching process dies, so
  no rank outlives its launcher, even one blocked inside a collective.
* The rendezvous store is a TCPStore listening on 127.0.0.1 only (torch's own rendezvous backends bind
  every interface): see :class:`_LoopbackRendezvous`. The ranks share it; no other port is opened for it.
  gloo's connections between the ranks use the loopback interface (``GLOO_SOCKET_IFNAME``, unless set).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)

__all__ = ["launch", "init_distributed", "under_torchrun", "torch_threads", "LaunchError"]

DEFAULT_TIMEOUT_S = 300.0
SHUTDOWN_GRACE_S = 3  # seconds a rank gets to exit after the launcher is interrupted, before SIGKILL
LOOPBACK = "127.0.0.1"
_RDZV_BACKEND = "striped-loopback"
_HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # what the elastic agent installs handlers for


class LaunchError(RuntimeError):
    """A rank failed; the message names the rank and carries its error."""


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (None: left as it is), restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def under_torchrun() -> bool:
    """True when this process is a rank started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> torch.device:
    """Initialise the default process group from the environment; return this rank's device.

    gloo for CPU, NCCL for CUDA (one GPU per local rank). ``timeout_s`` (seconds) bounds every collective, so
    a rank that stops answering produces an error instead of a hang. ``threads`` sets torch's intra-op threads.
    """
    _check_options(device, timeout_s, threads)
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


def launch(
    fn: Callable,
    world_size: int,
    *args,
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads_per_rank: int | None = 1,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks; return their results, indexed by rank.

    Args:
        fn: a module-level function (ranks are spawned processes that import it); its return value and
            ``args`` must be picklable.
        world_size: number of ranks (processes).
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, rank r on GPU r).
        timeout_s: seconds any collective or transfer may wait for a peer before it fails.
        threads_per_rank: torch intra-op threads in each rank; None leaves torch's default.

    Raises:
        LaunchError: a rank failed; the message names it and says why. The other ranks have been stopped.
        KeyboardInterrupt: SIGINT reached this process; every rank has been stopped.
        ValueError: on bad arguments.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _check_launch(fn, world_size, device, timeout_s, threads_per_rank)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    rendezvous_handler_registry.register(_RDZV_BACKEND, _create_loopback_rendezvous)
    log_dir = tempfile.mkdtemp(prefix="striped-launch-")  # the agent's per-rank error files; removed below
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"striped-{uuid.uuid4().hex[:8]}",
        rdzv_backend=_RDZV_BACKEND,
        rdzv_configs={"timeout": timeout_s},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr=LOOPBACK,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
    )
    if hasattr(config, "shutdown_timeout"):  # older torch versions have no such option and wait 30 s
        config.shutdown_timeout = SHUTDOWN_GRACE_S
    failure, interrupted = None, False
    saved = _save_signal_handlers()
    try:
        results = elastic_launch(config, _rank_main)(fn, args, device, timeout_s, threads_per_rank, os.getpid())
    except ChildFailedError as e:
        failure = _failure_message(e)
    except SignalException as e:
        if e.sigval != signal.SIGINT:
            raise
        interrupted = True
    finally:
        _restore_signal_handlers(saved)
        shutil.rmtree(log_dir, ignore_errors=True)
    # Raised here, outside the except blocks, so that the agent (and its store) is not kept alive by the
    # chained exception's traceback.
    if interrupted:
        raise KeyboardInterrupt
    if failure is not None:
        raise LaunchError(failure)
    return [results[r] for r in range(world_size)]


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_options(device: str, timeout_s: float, threads: int | None) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads per rank must be a positive integer or None, got {threads!r}")


def _check_launch(fn, world_size, device, timeout_s, threads_per_rank) -> None:
    if not callable(fn):
        raise ValueError(f"fn must be a function, got {type(fn).__name__}")
    qualname = getattr(fn, "__qualname__", "")
    if "<" in qualname:  # <lambda>, <locals>: a spawned process cannot import these
        raise ValueError(f"fn must be a module-level function that ranks can import, got {qualname!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    _check_options(device, timeout_s, threads_per_rank)
    if device == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"world_size {world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}")


# ----------------------------------------------------------------------------------------------------------
# In each rank
# ----------------------------------------------------------------------------------------------------------


def _rank_main(fn: Callable, args: tuple, device: str, timeout_s: float, threads: int | None, launcher: int) -> Any:
    # Default action on SIGINT: Ctrl-C in a terminal (sent to every process of the group) ends the rank at
    # once, quietly, and the launcher reports it; torch's spawn also makes SIGINT the signal a rank receives
    # when its launcher dies (prctl PR_SET_PDEATHSIG), and the default action works even while the rank is
    # blocked in C++ code. If the launcher died before that was armed, nobody will ever read our result.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() != launcher:
        os._exit(1)
    # Every rank is local: gloo's connections between them stay on the loopback interface too (by default
    # gloo binds the address the host name resolves to, which may face the network).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    init_distributed(device, timeout_s, threads)
    try:
        try:
            result = fn(*args)
        except (SystemExit, KeyboardInterrupt) as e:  # torch's agent would wait forever for the result
            raise RuntimeError(f"fn raised {e!r} instead of returning a result or raising an Exception") from None
        _finish_together(timeout_s)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _finish_together(timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for every rank to finish; raise, naming the missing ranks where gloo can."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as e:
        raise RuntimeError(
            f"rank {dist.get_rank()} finished, but not every rank finished within timeout_s={timeout_s:g} s: {e}"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# In the launching process
# ----------------------------------------------------------------------------------------------------------


class _LoopbackRendezvous(RendezvousHandler):
    """A one-node rendezvous around a TCPStore that listens on 127.0.0.1 only.

    torch's c10d and static rendezvous backends create their TCPStore with a host name, but the store binds
    every interface (0.0.0.0 and ::), reachable from the network. Here the listening socket is bound to the
    loopback address first and handed to the store (``master_listen_fd``), which then owns and closes it.
    ``use_agent_store`` tells the ranks to connect to this store (MASTER_ADDR/MASTER_PORT) rather than start
    their own, so the launch opens no other port for the rendezvous.
    """

    def __init__(self, run_id: str, timeout_s: float):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((LOOPBACK, 0))
        listener.listen()
        self.port = listener.getsockname()[1]
        self.run_id = run_id
        self.store = dist.TCPStore(
            LOOPBACK, self.port, is_master=True, master_listen_fd=listener.detach(),
            wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
        )

    def get_backend(self) -> str:
        return _RDZV_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        store = dist.PrefixStore(self.run_id, self.store)
        return RendezvousInfo(store, 0, 1, RendezvousStoreInfo(LOOPBACK, self.port))

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def _create_loopback_rendezvous(params: RendezvousParameters) -> _LoopbackRendezvous:
    return _LoopbackRendezvous(params.run_id, float(params.get("timeout", DEFAULT_TIMEOUT_S)))


def _save_signal_handlers() -> dict:
    """The handlers the elastic agent is about to replace (it never restores them); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    sigs = [getattr(signal, name) for name in _HANDLED_SIGNALS if hasattr(signal, name)]
    return {sig: signal.getsignal(sig) for sig in sigs}


def _restore_signal_handlers(saved: dict) -> None:
    for sig, handler in saved.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _failure_message(error) -> str:
    """'rank R (pid P) failed: <why>', then the failed rank's traceback when it raised."""
    rank, failure = error.get_first_failure()
    traceback = ""
    if isinstance(failure.message, dict):  # the rank raised: its error file holds the traceback
        traceback = failure.message.get("extraInfo", {}).get("py_callstack", "").strip()
    if traceback:
        why = traceback.splitlines()[-1]
    elif failure.exitcode < 0:
        why = f"killed by signal {failure.signal_name()}"
    else:
        why = f"exited with code {failure.exitcode} without a Python exception"
    head = f"rank {rank} (pid {failure.pid}) failed: {why}"
    return f"{head}\n{traceback}" if traceback else head
