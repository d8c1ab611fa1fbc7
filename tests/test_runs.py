"""Answering at any age: a start recovers only the files processes that are gone may have been writing (their run
journals), never opens a finished file, syncs what it keeps before vouching for it, trusts no .gz it did not prove,
and never opens a FIFO; housekeeping walks nothing it does not need."""

from __future__ import annotations

import ctypes
import gzip
import http.client
import json
import os
import re
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import pytest

import dsreceiver
from bench.aged_folder import make_aged_folder
from conftest import ServerProcess, batch_of, die, open_storage
from simulator import Batch, count_lines, make_batch

IN_OPEN = 0x20
IN_Q_OVERFLOW = 0x4000
EVENT = struct.Struct("iIII")


class OpenWatch:
    """inotify on some folders: the names of the files opened in them (a stat is no open)."""

    def __init__(self, folders: List[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.folders: Dict[int, Path] = {}
        for folder in folders:
            watch = self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN)
            assert watch >= 0, os.strerror(ctypes.get_errno())
            self.folders[watch] = folder
        self.opened: Set[Path] = set()

    def read(self) -> Set[Path]:
        """Every file opened in the folders so far."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.opened
            offset = 0
            while offset < len(data):
                watch, mask, _, length = EVENT.unpack_from(data, offset)
                assert not mask & IN_Q_OVERFLOW, "inotify lost events"
                name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0").decode()
                if name:
                    self.opened.add(self.folders[watch] / name)
                offset += EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


def test_a_start_over_many_finished_files_opens_none_of_them(start_server: Callable[..., ServerProcess],
                                                               tmp_path: Path) -> None:
    output = tmp_path / "data"
    now = time.time()
    made = make_aged_folder(output, files=2000, streams=10, now=now)
    current = dsreceiver.Layout(output).period_name(now)
    finished = {path for path in output.rglob("*") if path.is_file() and "T" in path.name
                and current not in path.name and "runs" not in path.parts}
    assert len(finished) >= 3 * 2000  # files, manifests and ledger summaries
    folders = sorted({path.parent for path in finished})
    watch = OpenWatch(folders)
    try:
        server = start_server("--workers", "2", output_dir=output)
        batch = make_batch("after-a-long-life", count=20)
        with server.simulator() as ds:
            assert ds.push(batch).status == 200
        # What the killed runs left this hour is recovered, taken over and sealed, as every start does.
        server.wait_for_log(r"took over run w\d\.\S+ \(recovered\): 10 files to finish", count=2)
        server.wait_for_log(r"sealed \S+: 200 records", count=made["current"])
        assert server.stop() == 0
        assert watch.read() & finished == set()  # not one finished file, manifest or summary was opened
    finally:
        watch.close()


def test_a_file_a_crash_left_torn_is_recovered_before_any_push_is_answered(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    acknowledged = [make_batch("before-the-crash-%d" % number, count=30) for number in range(4)]
    with server.simulator() as ds:
        for batch in acknowledged:
            assert ds.push(batch).status == 200
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)  # supervisor and workers: nothing is closed or synced
    server.wait_exit()
    torn = server.data_files()[0]
    with torn.open("ab") as handle:
        handle.write(b'{"reqId":"never-acknowledged","cut":"mid-')  # a batch written, never indexed
    server.start()
    log = server.log_text()
    recovered = log.index("moved 41 bytes of an unacknowledged batch out of %s" % torn)
    assert recovered < log.index("listening on")  # before the first push could be answered
    with server.simulator() as ds:
        for batch in acknowledged:  # DataStream's retries of what was acknowledged: already stored
            assert ds.push(batch).body == b"already stored 30 records\n"
    assert server.stop() == 0
    assert count_lines(server.stored_lines()) == count_lines([line for batch in acknowledged for line in batch.lines])


@pytest.mark.parametrize("planted", ["junk", "a prefix of the file"])
def test_a_gz_beside_a_current_file_is_taken_for_its_copy_only_when_it_is(
        start_server: Callable[..., ServerProcess], planted: str) -> None:
    server = start_server("--workers", "2")
    batches = [make_batch("kept-%d" % number, count=40) for number in range(3)]
    with server.simulator() as ds:
        for batch in batches:
            assert ds.push(batch).status == 200
    [current] = server.data_files()
    fake = dsreceiver.Layout.compressed_path(current)
    # `echo junk | gzip > NAME.log.gz`, or an operator's `gzip -k` of the file while it was written.
    planted_bytes = gzip.compress(b"junk\n" if planted == "junk" else current.read_bytes()[:100])
    fake.write_bytes(planted_bytes)
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.wait_exit()
    server.start()
    server.wait_for_log(re.escape("moved %s to " % fake) + r"\S+: it is not a copy of " + re.escape(current.name))
    server.wait_for_log(re.escape("sealed %s: 120 records" % current))
    assert server.stop() == 0
    assert count_lines(server.stored_lines()) == count_lines([line for batch in batches for line in batch.lines])
    [aside] = (server.output_dir / ".dsreceiver" / "foreign").iterdir()
    assert aside.read_bytes() == planted_bytes and not fake.exists()


def test_a_compression_cut_short_after_its_rename_is_finished(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    path = storage.store("", batch_of(b'{"reqTimeSec":"1764201500"}', b'{"reqTimeSec":"1764201400"}')).path
    assert path is not None
    die(storage)
    dsreceiver.Layout.compressed_path(path).write_bytes(gzip.compress(path.read_bytes()))  # renamed, not yet removed
    dsreceiver.recover_ended_runs(storage.layout)
    housekeeper = dsreceiver.Housekeeper(storage.layout, compress=True)
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    housekeeper.stop()
    compressed = dsreceiver.Layout.compressed_path(path)
    assert not path.exists() and gzip.decompress(compressed.read_bytes()).count(b"\n") == 2
    manifest = json.loads(dsreceiver.Layout.manifest_path(compressed).read_bytes())
    assert manifest["records"] == 2 and manifest["first_received"] is not None  # its index, under the plain name


@pytest.mark.parametrize("where", ["index", "data file"])
def test_a_fifo_where_a_file_belongs_is_skipped_with_one_line_never_opened(
        start_server: Callable[..., ServerProcess], where: str) -> None:
    server = start_server("--workers", "2")
    with server.simulator() as ds:
        assert ds.push(make_batch("before", count=10)).status == 200
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.wait_exit()
    [current] = server.data_files()
    victim = dsreceiver.Layout(server.output_dir).index_path(current) if where == "index" else current
    victim.unlink()
    os.mkfifo(str(victim))  # opened for reading, it would block for ever
    server.start()
    with server.simulator() as ds:
        assert ds.push(make_batch("after", count=10)).status == 200
        assert ds.request("GET", path="/healthz").status == 200
    server.wait_for_log(re.escape(str(victim if where == "data file" else current)) + r".* is not a regular file")
    assert server.stop(timeout=30) == 0


def test_recovery_syncs_what_it_keeps_before_its_batches_are_vouched_for(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(tmp_path, dedupe_window=900)
    batch = dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(b'{"reqId":"r1"}\n')
    real = os.fdatasync
    writer_held, release = threading.Event(), threading.Event()
    synced: List[Tuple[str, str]] = []

    def fdatasync(fd: int) -> None:
        path = os.readlink("/proc/self/fd/%d" % fd)
        if threading.current_thread().name == "writer" and path.endswith(".log"):
            writer_held.set()
            release.wait(30)  # the group commit's sync: pending when the worker is killed
        elif threading.current_thread().name != "writer":
            synced.append((threading.current_thread().name, path))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    writer = threading.Thread(target=storage.store, args=("", batch), name="writer", daemon=True)
    writer.start()
    assert writer_held.wait(30)
    die(storage)  # killed with its fdatasync pending: the bytes are in the page cache only
    path = storage.layout.data_path("", storage.layout.period_name(time.time()), 0)
    recovered = dsreceiver.recover_ended_runs(storage.layout)
    synced_before = list(synced)
    learnt = [key for _, key in dsreceiver.indexed_batches(storage.layout, 900, time.time(), recovered)]
    release.set()
    writer.join(30)
    assert recovered == [path] and learnt == [dsreceiver.dedupe_key("", batch.digest or b"")]
    # Records, then their index, were made durable before the batch could be answered "already stored".
    index = str(storage.layout.index_path(path))
    assert [name for _, name in synced_before][:2] == [str(path), index]


@pytest.mark.slow  # waits out the supervisor's deadline twice
def test_a_stuck_supervisor_costs_a_503_never_a_hung_push(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    assert server.process is not None
    with server.simulator(timeout=60) as ds:
        assert ds.push(make_batch("before", count=5)).status == 200
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            refused = ds.push(make_batch("while-stuck", count=5))
            health = ds.request("GET", path="/healthz")
            waited = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert refused.status == 503 and int(refused.headers["retry-after"]) > 0
        assert health.status == 503 and b"did not answer" in health.body
        assert waited < 60  # answered: each round trip has its deadline, none hung
        assert ds.push(make_batch("after", count=5)).status == 200
        # The claim given up at the deadline was released when its grant came: its retry is stored, once.
        again = ds.push(make_batch("while-stuck", count=5))
        assert again.status == 200 and again.body == b"stored 5 records\n"
    assert server.stop() == 0
    assert len(server.stored_lines()) == 15


def test_housekeeping_in_a_listed_folder_never_walks_the_records(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "data"
    make_aged_folder(output, files=600, streams=5, now=time.time() - 40 * 86400)
    dsreceiver.prepare_output(dsreceiver.Layout(output), 360)
    real_walk, real_scandir = os.walk, os.scandir
    data_folders = {output} | {path for path in output.iterdir() if not path.name.startswith(".")}

    def walk(top: str, topdown: bool = True) -> object:
        assert Path(top) not in data_folders, "a walk of the records"
        return real_walk(top, topdown)

    def scandir(path: str = ".") -> object:
        assert Path(path) not in data_folders, "a listing of the records in %s" % path
        return real_scandir(path)

    monkeypatch.setattr(os, "walk", walk)
    monkeypatch.setattr(os, "scandir", scandir)
    housekeeper = dsreceiver.Housekeeper(dsreceiver.Layout(output), retention_days=30, dedupe_window=360)
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    housekeeper.apply_retention()
    housekeeper.prune_indexes()
    housekeeper.stop()
    monkeypatch.setattr(os, "walk", real_walk)
    monkeypatch.setattr(os, "scandir", real_scandir)
    # Every file sealed long ago expired: gone with its manifest and summary, found through the seal lists.  The
    # killed runs' files, sealed today, stay.
    assert not list(output.rglob("*.gz")) and not list(output.rglob(".*.gz.sealed.json"))
    assert not list((output / ".dsreceiver" / "ledger").rglob("*.json"))
    assert [path.name for path in output.rglob("*.list")] == [dsreceiver.utc_day(time.time()) + ".list"]
    assert len(list(output.rglob(".*.log.sealed.json"))) == 10


KILLED_BEFORE_ITS_COMMIT = """\
import os
import signal
import sys
sys.path.insert(0, {root!r})
import dsreceiver

real_settle = dsreceiver.DataFile._settle


def settle_or_die(self, claimed):
    # Worker 1's first batch: written and synced, then the worker is killed before its Commit reaches the
    # supervisor (its claim is still held when it dies).
    if claimed and self.path.name.endswith(".w1.log") and not os.path.exists({marker!r}):
        open({marker!r}, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_settle(self, claimed)


dsreceiver.DataFile._settle = settle_or_die
sys.exit(dsreceiver.main())
"""


def test_a_batch_a_worker_stored_but_never_committed_is_a_duplicate_once_its_successor_serves(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    wrapper = tmp_path / "killed_before_its_commit.py"
    wrapper.write_text(KILLED_BEFORE_ITS_COMMIT.format(root=str(Path(__file__).resolve().parents[1]),
                                                       marker=str(tmp_path / "killed")))
    server = start_server("--workers", "2", script=wrapper)
    batches: List[Batch] = []
    # New batches until worker 1 takes one: its 200 is lost with the worker, as DataStream would see it.
    while not (tmp_path / "killed").exists():
        batches.append(make_batch("pushed-%d" % len(batches), count=20))
        with server.simulator() as ds:
            try:
                ds.push(batches[-1])
            except (OSError, http.client.HTTPException):
                pass
        assert len(batches) < 50, "worker 1 never took a batch"
    server.wait_for_log(r"worker 1 \(pid \d+\) exited with -9; restarting it")
    with server.simulator() as ds:
        for _ in range(6):  # every retry, whichever worker it reaches, once the successor told what it holds
            assert ds.push(batches[-1]).body == b"already stored 20 records\n"
    assert server.stop() == 0
    assert count_lines(server.stored_lines()) == count_lines([line for batch in batches for line in batch.lines])
