"""Rank functions that fail on purpose, for tests/test_launch.py (module-level, so spawned ranks import them).

Each function first writes this rank's pid to ``<folder>/<rank>``, so that the test can check that no rank
outlived the launch, and writes the time (``time.time()``) just before it fails or starts waiting to
``<folder>/failing`` or ``<folder>/waiting``, so that the test measures how long the launcher took to react.
Run as a script, it launches :func:`sleep_in_collective` on 2 ranks (the test interrupts or kills it).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

LONG_S = 60.0  # longer than any test waits: a rank still sleeping this long was not stopped


def _write(folder: str, name: str, text: str) -> None:
    path = os.path.join(folder, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # readers never see a half-written file


def note_pid(folder: str) -> int:
    """Write this rank's pid to ``folder/<rank>``; return the rank."""
    rank = dist.get_rank()
    _write(folder, str(rank), str(os.getpid()))
    return rank


def mark(folder: str, event: str) -> None:
    _write(folder, event, repr(time.time()))


def pid_and_sockets(folder: str) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """This rank's pid, and the (address, port) of every TCP socket its launcher, and itself, listen on."""
    note_pid(folder)
    dist.barrier()  # every rank has connected to every other
    return os.getpid(), listening_sockets(os.getppid()), listening_sockets(os.getpid())


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets (IPv4 and IPv6) process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, port = fields[1].split(":")
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append((_ip(address, width), int(port, 16)))
    return found


def _ip(hex_address: str, width: int) -> str:
    """/proc/net/tcp{,6} addresses are 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, width, 8))
    if width == 8:
        return ".".join(str(b) for b in raw)
    return ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))


def raise_on_rank_1(folder: str) -> None:
    if note_pid(folder) == 1:
        mark(folder, "failing")
        raise ValueError("rank 1 refuses on purpose")
    time.sleep(LONG_S)


def sigkill_rank_1(folder: str) -> None:
    if note_pid(folder) == 1:
        mark(folder, "failing")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(LONG_S)


def sys_exit_0_on_rank_1(folder: str) -> None:
    """A rank that exits with status 0 but no result: torch's agent alone would wait for it forever."""
    if note_pid(folder) == 1:
        mark(folder, "failing")
        sys.exit(0)
    time.sleep(LONG_S)


def rank_1_stops_answering(folder: str) -> None:
    """Rank 1 never joins the all_reduce: rank 0 must fail after the collective timeout."""
    if note_pid(folder) == 1:
        time.sleep(LONG_S)
    mark(folder, "waiting")
    dist.all_reduce(torch.ones(1))


def only_rank_0_returns(folder: str) -> int:
    """Rank 1 hangs outside any collective; rank 0 returns and must not wait for it forever."""
    if note_pid(folder) == 1:
        time.sleep(LONG_S)
    mark(folder, "waiting")
    return 0


def sleep_in_collective(folder: str) -> None:
    """Rank 0 blocks inside an all_reduce (in C++), rank 1 sleeps in Python: both must stop when asked."""
    if note_pid(folder) == 1:
        time.sleep(LONG_S)
    dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    import faulty_ranks  # the ranks import the functions by this name (this file's folder is on sys.path)
    from striped_attention.launch import launch

    try:
        launch(faulty_ranks.sleep_in_collective, 2, sys.argv[1], timeout_s=LONG_S)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
