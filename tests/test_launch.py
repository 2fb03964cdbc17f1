"""The local launcher: results by rank; a failed, killed or silent rank is named within seconds; Ctrl-C and
a killed launcher stop every rank; no process is left behind; the rendezvous listens on 127.0.0.1 only.

Each failure scenario is launched once (``outcome``) and several tests read its result. Reaction times are
measured from the moment a rank fails (it writes the time to a file), not from the start of the launch.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import faulty_ranks
from ranks import intra_op_threads
from striped_attention.launch import LaunchError, launch, torch_threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inspects processes in /proc")

REACT_S = 10.0  # "within seconds": from a rank's failure to LaunchError (typically < 1 s; the machine is shared)
TIMEOUT_S = 3.0  # the collective timeout of the scenarios where a rank stops answering
FAILING = {  # scenario: (rank function, timeout_s)
    "raises": (faulty_ranks.raise_on_rank_1, 60.0),
    "sigkill": (faulty_ranks.sigkill_rank_1, 60.0),
    "sys-exit-0": (faulty_ranks.sys_exit_0_on_rank_1, 60.0),
    "stops-answering": (faulty_ranks.rank_1_stops_answering, TIMEOUT_S),
    "never-finishes": (faulty_ranks.only_rank_0_returns, TIMEOUT_S),
}
WAITING = ("stops-answering", "never-finishes")  # idle until their timeout: they run together, one thread each
LAUNCHER = ("sigint", "sigkill-launcher")  # scenarios with the launcher in a subprocess, sent this signal


@dataclass
class Outcome:
    folder: Path
    message: str = ""  # the LaunchError, or the launcher subprocess's stderr
    ended: float = 0.0  # time.time() when LaunchError was raised, or when the launcher was signalled
    returncode: int | None = None  # of the launcher subprocess
    survivors: list[int] = field(default_factory=list)  # rank pids still alive REACT_S after the end

    def pids(self) -> dict[int, int]:
        return {int(p.name): int(p.read_text()) for p in self.folder.iterdir() if p.name.isdigit()}

    def seconds_since(self, event: str) -> float:
        return self.ended - float((self.folder / event).read_text())


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def survivors(pids, within_s: float = REACT_S) -> list[int]:
    """The pids still alive after waiting up to ``within_s`` for them to end."""
    deadline = time.monotonic() + within_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def children(pid: int) -> list[str]:
    """Command lines of the live children of ``pid``, except multiprocessing's resource tracker."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if ppid == pid and alive(int(entry)) and "resource_tracker" not in cmd:
            found.append(cmd)
    return found


def failing_launch(fn, timeout_s: float, folder: Path) -> Outcome:
    out = Outcome(folder)
    try:
        launch(fn, 2, str(folder), timeout_s=timeout_s)
    except LaunchError as e:
        out.ended, out.message = time.time(), str(e)
    out.survivors = survivors(out.pids().values())
    return out


def signalled_launcher(sig: signal.Signals, folder: Path) -> Outcome:
    """``python faulty_ranks.py`` (2 ranks, one blocked in an all_reduce); once both run, send ``sig``."""
    out = Outcome(folder)
    proc = subprocess.Popen(
        [sys.executable, faulty_ranks.__file__, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "TMPDIR": str(folder)},  # what a killed launcher cannot remove stays here
    )
    deadline = time.monotonic() + 120
    while len(out.pids()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # let rank 0 enter its all_reduce
    proc.send_signal(sig)
    out.ended = time.time()
    try:
        _, out.message = proc.communicate(timeout=REACT_S * 3)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, out.message = proc.communicate()
    out.returncode = proc.returncode
    out.survivors = survivors(out.pids().values())
    return out


@pytest.fixture(scope="module", autouse=True)
def scratch(tmp_path_factory):
    """Temporary files of the launches (ours and torch's) go to a folder of this module."""
    folder = tmp_path_factory.mktemp("launch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


def run_scenario(name: str) -> Outcome:
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    if name in FAILING:
        return failing_launch(*FAILING[name], folder)
    return signalled_launcher({"sigint": signal.SIGINT, "sigkill-launcher": signal.SIGKILL}[name], folder)


@functools.lru_cache(maxsize=None)
def waiting_outcomes() -> dict[str, Outcome]:
    with ThreadPoolExecutor(len(WAITING)) as pool:
        return dict(zip(WAITING, pool.map(run_scenario, WAITING)))


@functools.lru_cache(maxsize=None)
def outcome(name: str) -> Outcome:
    """Scenario ``name``, launched once."""
    return waiting_outcomes()[name] if name in WAITING else run_scenario(name)


def test_results_by_rank_on_loopback_only(tmp_path, monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)  # the default: gloo on the loopback interface
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    results = launch(faulty_ranks.pid_and_sockets, 2, str(tmp_path))
    assert [pid for pid, _, _ in results] == [Outcome(tmp_path).pids()[r] for r in range(2)]
    for _, launcher_sockets, rank_sockets in results:
        assert launcher_sockets, "the launcher should listen for the rendezvous"
        assert {address for address, _ in launcher_sockets} == {"127.0.0.1"}, launcher_sockets
        assert {address for address, _ in rank_sockets} <= {"127.0.0.1"}, rank_sockets
    assert survivors([pid for pid, _, _ in results], 0) == []
    assert faulty_ranks.listening_sockets(os.getpid()) == [], "the rendezvous store outlived the launch"
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "signal handlers not restored"


def test_each_rank_runs_on_the_threads_asked_for():
    assert launch(intra_op_threads, 2, threads_per_rank=3) == [3, 3]


def test_torch_threads_sets_the_count_inside_and_restores_it_after():
    before = intra_op_threads()
    with torch_threads(before + 2):
        assert intra_op_threads() == before + 2
    with pytest.raises(KeyError), torch_threads(before + 1):
        raise KeyError
    with torch_threads(None):
        assert intra_op_threads() == before
    assert intra_op_threads() == before


@pytest.mark.parametrize("name", [*FAILING, *LAUNCHER])
def test_every_rank_started_and_none_outlived_the_launch(name):
    out = outcome(name)
    assert sorted(out.pids()) == [0, 1], f"{name}: both ranks should have started: {out.message[-2000:]}"
    assert out.survivors == [], f"{name}: ranks outlived the launch"


def test_rank_that_raises_is_named_with_its_error():
    out = outcome("raises")
    assert out.message.startswith("rank 1 (pid ")
    assert "ValueError: rank 1 refuses on purpose" in out.message.splitlines()[0]
    assert "raise_on_rank_1" in out.message  # the traceback follows
    assert out.seconds_since("failing") < REACT_S


def test_killed_rank_is_named_with_its_signal():
    out = outcome("sigkill")
    assert out.message.startswith("rank 1 (pid ") and "killed by signal SIGKILL" in out.message
    assert out.seconds_since("failing") < REACT_S


def test_rank_that_exits_without_a_result_is_named():
    out = outcome("sys-exit-0")
    assert out.message.startswith("rank 1 (pid ") and "SystemExit(0)" in out.message.splitlines()[0]
    assert out.seconds_since("failing") < REACT_S


def test_exit_code_is_reported():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from striped_attention.launch import _failure_message

    failure = ProcessFailure(local_rank=1, pid=4321, exitcode=3, error_file="")
    assert _failure_message(ChildFailedError("fn", {1: failure})) == (
        "rank 1 (pid 4321) failed: exited with code 3 without a Python exception"
    )


def test_rank_that_stops_answering_fails_its_peer_after_the_timeout():
    out = outcome("stops-answering")
    assert out.message.startswith("rank 0 (pid ") and "Timed out" in out.message, out.message
    assert TIMEOUT_S - 0.5 <= out.seconds_since("waiting") < TIMEOUT_S + REACT_S


def test_rank_that_never_finishes_fails_the_launch():
    out = outcome("never-finishes")
    assert out.message.startswith("rank 0 (pid ") and "not every rank finished" in out.message, out.message
    assert "Ranks 1 failed to pass monitoredBarrier" in out.message
    assert TIMEOUT_S - 0.5 <= out.seconds_since("waiting") < TIMEOUT_S + REACT_S


def test_ctrl_c_stops_every_rank():
    out = outcome("sigint")
    assert out.returncode == 130, out.message[-2000:]
    assert "interrupted" in out.message


def test_killed_launcher_takes_its_ranks_along():
    assert outcome("sigkill-launcher").returncode == -signal.SIGKILL
    # test_every_rank_started_and_none_outlived_the_launch[sigkill-launcher] checks that its ranks ended


def test_no_process_or_log_folder_left_behind(scratch):
    for name in (*FAILING, *LAUNCHER):
        outcome(name)
    assert children(os.getpid()) == []
    assert [p.name for p in scratch.iterdir() if p.name.startswith("striped-launch-")] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=0), "world_size must be a positive integer"),
        (dict(world_size=2, timeout_s=0), "timeout_s must be a positive number of seconds"),
        (dict(world_size=2, device="tpu"), "device must be 'cpu' or 'cuda'"),
        (dict(world_size=2, threads_per_rank=0), "threads per rank must be a positive integer"),
        (dict(fn=lambda: None, world_size=2), "module-level function"),
    ],
)
def test_bad_arguments(kwargs, message):
    fn, world_size = kwargs.pop("fn", faulty_ranks.note_pid), kwargs.pop("world_size")
    with pytest.raises(ValueError, match=message):
        launch(fn, world_size, **kwargs)
