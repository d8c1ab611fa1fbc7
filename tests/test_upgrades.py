"""Restarts and upgrades that refuse nothing: systemd's socket activation (the socket outlives the process), and the
in-place upgrade of SIGUSR2 (the new process inherits the sockets; the old one drains, then re-executes under its own
PID) — with DataStream-like uploaders pushing all along."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from conftest import DSRECEIVER, ServerProcess, wait_until
from simulator import Batch, count_lines, make_batch

# What systemd does for a socket-activated service (sd_listen_fds(3)): the socket as descriptor 3, LISTEN_FDS=1 and
# LISTEN_PID=the service's own PID, set between fork and exec.
LAUNCHER = """\
import os, sys
fd = int(os.environ.pop("TEST_LISTEN_FD"))
os.dup2(fd, 3)
if fd != 3:
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, %r] + sys.argv[1:])
""" % str(DSRECEIVER)


class Uploaders:
    """DataStream-like uploaders: each pushes a new batch every `interval` on a keep-alive connection, and sends it
    again until it is answered 200; counts connections refused or reset on the way."""

    def __init__(self, server: ServerProcess, count: int = 4, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acknowledged: List[Batch] = []
        self.refused = self.reset = 0
        self.errors: List[str] = []
        self.threads = [threading.Thread(target=self._run, args=(number,)) for number in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, number: int) -> None:
        with self.server.simulator(timeout=30) as ds:
            index = 0
            while not self.stop.is_set():
                batch = make_batch("uploader%d-%05d" % (number, index), count=5)
                while True:
                    try:
                        status = ds.push(batch).status
                    except ConnectionRefusedError:
                        status = 0
                        with self.lock:
                            self.refused += 1
                    except (ConnectionError, http.client.HTTPException, ssl.SSLError, socket.timeout) as exc:
                        status = 0
                        with self.lock:
                            self.reset += 1
                            where = traceback.extract_tb(exc.__traceback__)[-1].name
                            self.errors.append("%.3f %r in %s" % (time.time(), exc, where))
                    if status == 200:
                        break
                    time.sleep(self.interval)
                with self.lock:
                    self.acknowledged.append(batch)
                index += 1
                self.stop.wait(self.interval)

    def pushed(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def finish(self) -> List[Batch]:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        return self.acknowledged


def wait_for_pushes(uploaders: Uploaders, more: int) -> None:
    target = uploaders.pushed() + more
    deadline = time.monotonic() + 60
    while uploaders.pushed() < target:
        assert time.monotonic() < deadline, "the uploaders stalled"
        time.sleep(0.02)


def stored_exactly_once(server: ServerProcess, batches: List[Batch]) -> None:
    expected = count_lines([line for batch in batches for line in batch.lines])
    assert count_lines(server.stored_lines()) == expected


@pytest.fixture
def socket_unit(tmp_path: Path) -> Iterator[Dict[str, object]]:
    """A listening socket held by the test, as systemd's socket unit holds it across the service's restarts."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.set_inheritable(True)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    yield {"listener": listener, "launcher": launcher}
    listener.close()


def test_a_restart_with_the_socket_unit_refuses_nothing_and_loses_nothing(
        start_server: Callable[..., ServerProcess], socket_unit: Dict[str, object]) -> None:
    listener = socket_unit["listener"]
    assert isinstance(listener, socket.socket)
    fd, port = listener.fileno(), listener.getsockname()[1]
    options = dict(script=socket_unit["launcher"], env={"TEST_LISTEN_FD": str(fd)}, pass_fds=(fd,))
    server = start_server("--workers", "2", **options)
    assert server.port == port  # it serves on the socket it was given, not on --port 0
    uploaders = Uploaders(server)
    try:
        wait_for_pushes(uploaders, 40)
        # systemctl restart dsreceiver: the service stops, the socket stays open, a new service takes it.
        assert server.stop() == 0
        server.start()
        wait_for_pushes(uploaders, 40)
    finally:
        acknowledged = uploaders.finish()
    assert server.stop() == 0
    assert (uploaders.refused, uploaders.reset) == (0, 0), "\n".join(
        uploaders.errors + [line for line in server.log_text().splitlines() if " access " not in line])
    stored_exactly_once(server, acknowledged)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_upgrade_by_sigusr2_refuses_nothing_and_loses_nothing(start_server: Callable[..., ServerProcess],
                                                                  workers: str) -> None:
    server = start_server("--workers", workers)
    assert server.process is not None
    pid = server.process.pid
    uploaders = Uploaders(server)
    try:
        wait_for_pushes(uploaders, 40)
        server.send_signal(signal.SIGUSR2)
        server.wait_for_log(r"upgraded: the interim process \(pid \d+\) stops", timeout=60)
        wait_for_pushes(uploaders, 40)
    finally:
        acknowledged = uploaders.finish()
    assert server.process.pid == pid and server.process.poll() is None  # the same PID serves on
    log = server.log_text()
    assert log.count("listening on") == 3  # this process, the interim one, this process again
    assert "ERROR" not in log and "Traceback" not in log
    assert server.stop() == 0
    assert (uploaders.refused, uploaders.reset) == (0, 0), "\n".join(
        uploaders.errors + [line for line in server.log_text().splitlines() if " access " not in line])
    stored_exactly_once(server, acknowledged)


def upgraded_to(new_text: str, start_server: Callable[..., ServerProcess], tmp_path: Path,
                workers: str) -> ServerProcess:
    """A server run from a copy of dsreceiver.py, the copy then replaced by `new_text` and SIGUSR2 sent."""
    script = tmp_path / "dsreceiver.py"
    script.write_bytes(DSRECEIVER.read_bytes())
    server = start_server("--workers", workers, script=script)
    script.write_text(new_text)
    server.send_signal(signal.SIGUSR2)
    return server


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_upgrade_to_a_file_that_cannot_start_leaves_the_old_one_serving(
        start_server: Callable[..., ServerProcess], tmp_path: Path, workers: str) -> None:
    server = upgraded_to("this is no Python\n", start_server, tmp_path, workers)  # a botched copy of the new version
    assert server.process is not None
    server.wait_for_log(r"ERROR upgrade failed: the new \S+dsreceiver\.py exited with 1; still serving with the old"
                        r" one \(pid %d\)" % server.process.pid)
    with server.simulator() as ds:
        assert ds.push(make_batch("after-the-failed-upgrade", count=5)).status == 200
    assert server.process.poll() is None and "upgraded" not in server.log_text()
    assert server.stop() == 0


def test_passed_descriptors_that_are_no_listening_socket_are_refused_in_one_line(
        start_server: Callable[..., ServerProcess], socket_unit: Dict[str, object], tmp_path: Path) -> None:
    not_a_socket = (tmp_path / "plain-file").open("w")
    fd = not_a_socket.fileno()
    os.set_inheritable(fd, True)
    server = start_server(script=socket_unit["launcher"], env={"TEST_LISTEN_FD": str(fd)}, pass_fds=(fd,),
                          wait=False)
    assert server.wait_exit() == 2
    [line] = server.log_text().splitlines()
    assert re.search(r"ERROR descriptor 3, passed as a listening socket, is (none|not a listening TCP socket)", line)
    not_a_socket.close()


def test_sigusr2_to_a_worker_is_pointed_at_the_supervisor(start_server: Callable[..., ServerProcess]) -> None:
    from test_workers import worker_pids

    server = start_server("--workers", "2")
    assert server.process is not None
    os.kill(worker_pids(server)[0], signal.SIGUSR2)
    server.wait_for_log(r"WARNING SIGUSR2 upgrades the supervisor \(pid %d\), not a worker" % server.process.pid)
    with server.simulator() as ds:
        assert ds.push(make_batch("still-served", count=5)).status == 200
    assert server.stop() == 0


# A new version that takes its time to start: long enough to be stopped, or asked again, meanwhile.
SLOW_TO_START = "import time\ntime.sleep(5)\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_during_an_upgrade_stops_both_processes_and_is_never_lost(
        start_server: Callable[..., ServerProcess], tmp_path: Path, workers: str) -> None:
    server = upgraded_to(SLOW_TO_START + DSRECEIVER.read_text(), start_server, tmp_path, workers)
    interim = int(server.wait_for_log(r"started \S+ as pid (\d+); serving until it answers pushes").group(1))
    server.send_signal(signal.SIGUSR2)  # asked again meanwhile: changes nothing
    server.wait_for_log("SIGUSR2: an upgrade is under way already")
    assert server.stop(timeout=30) == 0  # SIGTERM: the new process is stopped beside this one, no re-exec
    assert "upgraded" not in server.log_text() and "re-executes" not in server.log_text()

    def interim_gone() -> bool:
        try:
            os.kill(interim, 0)
        except ProcessLookupError:
            return True
        return Path("/proc/%d/stat" % interim).read_text().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(interim_gone, what="the interim process to stop")
