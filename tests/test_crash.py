"""Crash consistency: SIGKILL at random moments, and a power-loss model that drops unsynced bytes."""

from __future__ import annotations

import gzip
import http.client
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import pytest

import dsreceiver
from conftest import ServerProcess, open_storage, wait_until
from simulator import Batch, free_port, make_batch

REQ_ID = re.compile(rb'"reqId":"([^"]+)-(\d{6})"|^4 61234 \d+ (\S+)-(\d{6}) ')


def batch_id_of(line: bytes) -> Tuple[str, int]:
    """Which batch and which line of it a stored record is (the simulator puts both in reqId)."""
    match = REQ_ID.search(line)
    assert match, "a stored line that no client sent: %r" % line[:120]
    name, number = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return name.decode(), int(number)


def check_exactly_once(stored: List[bytes], sent: Dict[str, Batch], acknowledged: Set[str]) -> None:
    """Every acknowledged batch stored once and whole; any other batch whole or absent; nothing torn or foreign."""
    runs: Dict[str, List[int]] = {}
    for line in stored:
        name, number = batch_id_of(line)
        assert name in sent and sent[name].lines[number] == line, "torn or foreign line %r" % line[:120]
        runs.setdefault(name, []).append(number)
    for name, numbers in runs.items():
        assert numbers == list(range(len(sent[name].lines))), "batch %s stored partly or twice" % name
    missing = acknowledged - set(runs)
    assert not missing, "acknowledged but not stored: %s" % sorted(missing)[:5]


class Pushers:
    """Clients that push as DataStream does: each batch sent again until it is acknowledged."""

    def __init__(self, server: ServerProcess, count: int, prefix: str, batch: Callable[[random.Random, str], Batch],
                 chunked: float = 0.0) -> None:
        self.server, self.prefix, self.batch, self.chunked = server, prefix, batch, chunked
        self.sent: Dict[str, Batch] = {}
        self.acknowledged: Set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(number,)) for number in range(count)]
        for thread in self.threads:
            thread.start()

    def client(self, number: int) -> None:
        local = random.Random(number)
        for index in range(10_000):
            name = "%s%02d-b%04d" % (self.prefix, number, index)
            batch = self.batch(local, name)
            with self.lock:
                self.sent[name] = batch
            while not self.stopping.is_set():
                try:
                    with self.server.simulator(timeout=30) as ds:
                        if ds.push(batch, chunked=local.random() < self.chunked).status == 200:
                            with self.lock:
                                self.acknowledged.add(name)
                            break
                except (OSError, http.client.HTTPException):
                    pass
                self.stopping.wait(0.05)  # DataStream's pause before a retry, not a synchronisation
            if self.stopping.is_set():
                return

    def wait_for_more(self, count: int, what: str) -> None:
        """Waits until `count` more batches are acknowledged."""
        with self.lock:
            goal = len(self.acknowledged) + count

        def reached() -> bool:
            with self.lock:
                return len(self.acknowledged) >= goal
        wait_until(reached, timeout=60, what=what)

    def stop(self) -> None:
        """Stops every client once its current push is answered or fails."""
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def check(self, stored: List[bytes], least: int) -> None:
        """At least `least` batches acknowledged, and check_exactly_once of what is stored."""
        with self.lock:
            assert len(self.acknowledged) > least, "too little traffic to mean anything"
            check_exactly_once(stored, self.sent, self.acknowledged)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_doubles_nothing(start_server: Callable[..., ServerProcess]) -> None:
    rng = random.Random(20261127)
    port = free_port()
    server = start_server("--port", str(port))
    pushers = Pushers(server, 12, "c", lambda local, name: make_batch(
        name, count=local.choice([20, 200, 2000, 2000, 12000]), fmt=local.choice(["json", "structured"]),
        compress=local.random() < 0.5), chunked=0.3)
    try:
        for _ in range(6):
            pushers.wait_for_more(rng.randint(4, 8), "pushes stored between kills")
            server.send_signal(signal.SIGKILL)
            server.wait_exit()
            server.start()
        pushers.wait_for_more(8, "pushes stored after the last kill")
    finally:
        pushers.stop()
    assert server.stop() == 0
    pushers.check(server.stored_lines(), 30)


def children_of(pid: int) -> List[int]:
    """The live child processes of `pid` (a supervisor's workers)."""
    found: List[int] = []
    for task in Path("/proc/%d/task" % pid).iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def records_of(path: Path) -> bytes:
    """A data file's records: gunzipped when it is gzip (--store gzip, --compress-rotated)."""
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--compress-rotated"], ["--store", "gzip"]], ids=["compress-rotated", "store-gzip"])
def test_pushers_through_rotations_worker_kills_and_restarts_lose_and_double_nothing(
        start_server: Callable[..., ServerProcess], variant: List[str]) -> None:
    """Issue 34's race harness: 8 pushers retrying as DataStream does while the files are moved away as logrotate
    does (then SIGHUP), workers are SIGKILLed and the server restarts; small files, so that every push races a roll,
    a finish or a seal."""
    rng = random.Random(20261206)
    port = free_port()
    server = start_server("--port", str(port), "--workers", "2", "--max-file-size", "64K", *variant)
    pushers = Pushers(server, 8, "r", lambda local, name: make_batch(
        name, count=local.choice([5, 40, 200]), compress=local.random() < 0.5))
    events = {"rotate": 0, "kill a worker": 0, "restart": 0}
    try:
        for step in range(18):
            pushers.wait_for_more(12, "pushes stored between events")
            event = ("rotate", "kill a worker", "rotate", "restart")[step % 4] if step < 4 else \
                rng.choice(["rotate", "rotate", "kill a worker", "restart"])
            assert server.process is not None
            if event == "rotate":
                current = [path for path in server.data_files() if re.search(r"\.log(\.gz)?$", path.name)
                           and not path.with_name(path.name + ".1").exists()]
                for path in rng.sample(current, min(2, len(current))):
                    try:
                        path.rename(path.with_name(path.name + ".1"))
                    except FileNotFoundError:
                        continue  # finished and gone meanwhile
                server.send_signal(signal.SIGHUP)
            elif event == "kill a worker":
                workers = children_of(server.process.pid)
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
            else:
                assert server.stop() == 0
                server.start()
            events[event] += 1
        pushers.wait_for_more(12, "pushes stored after the last event")
    finally:
        pushers.stop()
    assert server.stop() == 0
    assert all(events.values()), events
    stored = b"".join(records_of(path) for path in server.data_files())
    assert not stored or stored.endswith(b"\n")
    pushers.check(stored.split(b"\n")[:-1], 200)


class PowerLossDisk:
    """Stands between dsreceiver and the OS for files under `root`, remembering how much of each fdatasync made durable.

    A power cut is modelled by copying each file's durable prefix plus a random
    part of what was written after it (the kernel may have flushed some pages
    on its own, cut anywhere), which is what a real disk may hold afterwards.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.lock = threading.RLock()
        self.paths: Dict[int, str] = {}
        self.durable: Dict[str, int] = {}
        real = {name: getattr(os, name) for name in ("open", "close", "write", "writev", "fdatasync", "fsync",
                                                     "ftruncate")}
        self.real = real

        def wrapped_open(path: str, flags: int, mode: int = 0o777, **kwargs: object) -> int:
            with self.lock:
                fd: int = real["open"](path, flags, mode, **kwargs)
                if str(path).startswith(self.root) and os.path.isfile(path):
                    self.paths[fd] = str(path)
                    self.durable.setdefault(str(path), os.path.getsize(path))
                return fd

        def wrapped_close(fd: int) -> None:
            with self.lock:
                self.paths.pop(fd, None)
                real["close"](fd)

        def locked(name: str) -> Callable[..., object]:
            def call(fd: int, *args: object) -> object:
                with self.lock:
                    return real[name](fd, *args)
            return call

        def synced(name: str) -> Callable[[int], None]:
            def call(fd: int) -> None:
                with self.lock:
                    real[name](fd)
                    if fd in self.paths:
                        self.durable[self.paths[fd]] = os.fstat(fd).st_size
            return call

        def truncated(fd: int, length: int) -> None:
            with self.lock:
                real["ftruncate"](fd, length)
                if fd in self.paths:
                    path = self.paths[fd]
                    self.durable[path] = min(self.durable.get(path, 0), length)

        for name, function in (("open", wrapped_open), ("close", wrapped_close), ("write", locked("write")),
                               ("writev", locked("writev")), ("fdatasync", synced("fdatasync")),
                               ("fsync", synced("fsync")), ("ftruncate", truncated)):
            monkeypatch.setattr(os, name, function)

    def cut_power(self, target: Path, rng: random.Random) -> None:
        """Copies what a disk could hold after a power cut right now into `target` (call with the lock held)."""
        for path in Path(self.root).rglob("*"):
            if path.is_dir():
                continue
            copy = target / path.relative_to(self.root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            durable = min(self.durable.get(str(path), len(data)), len(data))
            copy.write_bytes(data[:durable + rng.randint(0, len(data) - durable)])


@pytest.mark.slow  # eight power cuts with thousands of batches: seconds of CPU
def test_power_loss_keeps_every_acknowledged_batch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    root = tmp_path / "live"
    disk = PowerLossDisk(root, monkeypatch)
    storage = open_storage(root, dedupe_window=900)
    sent: Dict[str, Batch] = {}
    acknowledged: Set[str] = set()
    snapshots: List[Tuple[Path, Set[str]]] = []
    stop = threading.Event()

    def writer(number: int) -> None:
        local = random.Random(number)
        index = 0
        while not stop.is_set():
            name = "w%d-%05d" % (number, index)
            batch = make_batch(name, count=local.choice([1, 5, 50, 400]), fmt=local.choice(["json", "structured"]))
            builder = dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True)
            record_batch = builder.feed_whole(batch.body)
            with disk.lock:
                sent[name] = batch
            storage.store("", record_batch)
            with disk.lock:
                acknowledged.add(name)
            index += 1

    writers = [threading.Thread(target=writer, args=(number,)) for number in range(6)]
    for thread in writers:
        thread.start()
    try:
        for cut in range(8):
            stop.wait(rng.uniform(0.05, 0.3))
            with disk.lock:
                target = tmp_path / ("after-cut-%d" % cut)
                disk.cut_power(target, rng)
                snapshots.append((target, set(acknowledged)))
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    storage.close()
    monkeypatch.undo()
    for target, acknowledged_then in snapshots:
        recovered = open_storage(target, dedupe_window=900)
        data = b"".join(path.read_bytes() for path, _ in sorted(recovered.layout.data_files()))
        stored = data.split(b"\n")[:-1]
        assert not data or data.endswith(b"\n")
        check_exactly_once(stored, sent, acknowledged_then)
        # DataStream resends what it never saw acknowledged: each batch ends up stored exactly once.
        present = {batch_id_of(line)[0] for line in stored}
        for name in sorted(acknowledged_then)[:20] + sorted(set(sent) - present)[:20]:
            again = dsreceiver.BatchBuilder(recovered.layout.spool_dir, digest=True).feed_whole(sent[name].body)
            assert (recovered.store("", again).path is None) == (name in present), name
        recovered.close()
        data = b"".join(path.read_bytes() for path, _ in sorted(recovered.layout.data_files()))
        resent = {name for name in sorted(set(sent) - present)[:20]}
        check_exactly_once(data.split(b"\n")[:-1], sent, acknowledged_then | resent)
        shutil.rmtree(target)


def test_recovery_moves_an_unindexed_batch_aside(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    first = make_batch("indexed", count=5)
    with server.simulator() as ds:
        assert ds.push(first).status == 200
    server.stop()
    [data_file] = server.data_files()
    partial = make_batch("never-acknowledged", count=3).body
    with data_file.open("ab") as handle:
        handle.write(partial)  # complete lines, but no index entry: the batch never got its 200
    server.start()
    server.wait_for_log(r"moved %d bytes of an unacknowledged batch out of .*%s" % (len(partial), data_file.name))
    assert server.stored_lines() == first.lines
    [aside] = (server.output_dir / ".dsreceiver" / "partial").iterdir()
    assert aside.read_bytes() == partial


def test_set_aside_index_keeps_dedupe_after_logrotate_sighup_and_a_crash(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    batch = make_batch("rotated-then-crashed", count=40)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    [current] = server.data_files()
    current.rename(current.with_name(current.name + ".1"))  # logrotate, without copytruncate
    server.send_signal(signal.SIGHUP)
    server.wait_for_log("reopened 1 output files that were moved")
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)  # supervisor and workers at once: nothing is shut down cleanly
    server.wait_exit()
    server.start()
    later = make_batch("after-restart", count=5)
    with server.simulator() as ds:
        again = ds.push(batch)
        assert again.status == 200 and again.body == b"already stored 40 records\n"
        assert ds.push(later).status == 200
    assert sorted(server.stored_lines()) == sorted(batch.lines + later.lines)
