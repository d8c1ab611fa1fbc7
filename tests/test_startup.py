"""Start-up: pushes are answered first; the earlier run's files are finished in the background, each by one process;
the open-file limit is raised and shared so that no load runs a process out of descriptors."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import dsreceiver
from conftest import ServerProcess, batch_of, open_storage, wait_until
from simulator import batch_of_lines, make_batch


def earlier_run(root: Path, names: List[str], lines: int = 20000) -> Dict[Path, bytes]:
    """Data files as an earlier run (SIGKILLed, with no index) left them: returns their contents."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for number, name in enumerate(names):
        data = b"".join(b'{"reqTimeSec":"17642016%02d.%03d","n":"%d-%d"}\n' % (number, line % 1000, number, line)
                        for line in range(lines))
        (root / name).write_bytes(data)
        files[root / name] = data
    return files


def held(stack: ExitStack, path: Path) -> None:
    """Holds the flock a finisher takes on a data file, as another process finishing it would."""
    handle = stack.enter_context(path.open("rb"))
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def manifest_of(path: Path) -> Dict[str, object]:
    document: Dict[str, object] = json.loads(dsreceiver.Layout.manifest_path(path).read_bytes())
    return document


def test_pushes_are_answered_while_the_earlier_runs_files_wait_to_be_finished(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    output = tmp_path / "data"
    period = dsreceiver.Layout(output).period_name(time.time())
    # This hour's files of both workers (a restart) and files of other hours and of a worker count no longer used.
    files = earlier_run(output, [period + ".w1.log", period + ".w2.log", "2025-01-01T00Z.log",
                                 "2025-01-01T00Z.w3.log"])
    with ExitStack() as stack:
        for path in files:
            held(stack, path)
        server = start_server("--workers", "2", "--compress-rotated", output_dir=output)
        batch = make_batch("after-restart", count=50)
        with server.simulator() as ds:
            assert ds.push(batch).status == 200
        # Answered while none of the earlier files could be finished: nothing waited for them, nothing touched them.
        for path, data in files.items():
            assert path.read_bytes() == data and not dsreceiver.Layout.manifest_path(path).exists()
        new = [path for path in server.data_files() if path not in files]
        assert [line for path in new for line in path.read_bytes().splitlines()] == batch.lines
    # Released: each earlier file is compressed and sealed, once, by the worker that owns it.
    for path, data in files.items():
        gzipped = dsreceiver.Layout.compressed_path(path)
        server.wait_for_log(re.escape("sealed %s: " % gzipped), timeout=60)
        assert manifest_of(gzipped)["records"] == data.count(b"\n") and not path.exists()
    log = server.log_text()
    assert log.index("listening on") < log.index("sealed")
    for path in files:
        assert log.count("sealed %s: " % dsreceiver.Layout.compressed_path(path)) == 1


def test_a_file_another_process_finishes_is_left_to_it(tmp_path: Path) -> None:
    files = earlier_run(tmp_path, ["2025-01-01T00Z.log"], lines=10)
    [path] = files
    housekeeper = dsreceiver.Housekeeper(dsreceiver.Layout(tmp_path))
    housekeeper.queue_earlier_files()
    with ExitStack() as stack:
        held(stack, path)
        housekeeper.finish_files()
        assert not dsreceiver.Layout.manifest_path(path).exists() and housekeeper.to_finish == [path]
    housekeeper.finish_files()
    sealed_at = manifest_of(path)["sealed_at"]
    again = dsreceiver.Housekeeper(dsreceiver.Layout(tmp_path), clock=lambda: time.time() + 60)
    again.to_finish.append(path)
    again.finish_files()
    assert manifest_of(path)["sealed_at"] == sealed_at and housekeeper.to_finish == [] == again.to_finish


def test_an_index_of_format_2_is_read_as_it_is_and_its_file_read_back_when_sealed(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "out")
    path = storage.store("stream=61234", batch_of(b'{"reqTimeSec":"1764201500"}', b'{"reqTimeSec":"1764201300"}')).path
    storage.close()
    assert path is not None
    index = storage.layout.index_path(path)
    entries = dsreceiver.read_index(index.read_bytes())
    index.write_bytes(dsreceiver.V2_INDEX_HEADER + b"".join(
        dsreceiver.V2_BATCH_ENTRY.pack(entry.end, entry.stamp, entry.digest, 61234, entry.records)
        for entry in entries))
    written = index.read_bytes()
    before = dsreceiver.read_ledger(tmp_path / "out")
    # A start does not rewrite it (nothing is appended to it), and a torn last entry is cut as in any format.
    index.write_bytes(written + b"torn")
    open_storage(tmp_path / "out").close()
    assert index.read_bytes() == written
    assert dsreceiver.read_ledger(tmp_path / "out") == before
    housekeeper = dsreceiver.Housekeeper(storage.layout)
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    manifest = manifest_of(path)
    assert (manifest["records"], manifest["first_event"], manifest["last_event"]) == (2, 1764201300.0, 1764201500.0)


def test_idle_files_are_suspended_and_resumed_in_place(tmp_path: Path) -> None:
    storage = open_storage(tmp_path, max_open=2)
    paths = [storage.store("stream=%d" % (70000 + number), batch_of(b"first %d" % number)).path
             for number in range(5)]
    assert len(storage.open_files) == 2 and sum(not data_file.suspended for data_file in storage.files.values()) == 2
    assert storage.store("stream=70000", batch_of(b"again 0")).path == paths[0]  # resumed, not a new file
    moved = paths[1]
    assert moved is not None
    os.rename(str(moved), str(moved) + ".rotated")  # logrotate moves it while it idles
    again = storage.store("stream=70001", batch_of(b"after the move")).path
    storage.close()
    assert again == moved and moved.read_bytes() == b"after the move\n"
    assert Path(str(moved) + ".rotated").read_bytes() == b"first 1\n"
    assert paths[0] is not None and paths[0].read_bytes() == b"first 0\nagain 0\n"
    rows = dsreceiver.read_ledger(tmp_path)
    assert sum(row.records for row in rows.values()) == 7  # the moved file's index was set aside, still counted


def test_a_retry_after_a_restart_leaves_no_empty_file(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    batch = make_batch("retried", count=20)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    assert server.stop() == 0
    server.start()
    with server.simulator() as ds:
        assert ds.push(batch).body == b"already stored 20 records\n"
    assert server.stop() == 0
    assert [path.stat().st_size > 0 for path in server.data_files()] == [True]
    assert server.stored_lines() == batch.lines


def limits_of(pid: int) -> str:
    return next(line for line in Path("/proc/%d/limits" % pid).read_text().splitlines()
                if line.startswith("Max open files"))


def test_the_open_file_limit_is_raised_to_the_hard_limit(start_server: Callable[..., ServerProcess]) -> None:
    hard = resource_hard_limit()
    server = start_server("--workers", "2", nofile=(1024, hard))
    assert server.process is not None
    assert limits_of(server.process.pid).split()[3:5] == [str(hard)] * 2
    assert "open-file limit" not in server.log_text()


def resource_hard_limit() -> int:
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < 4096:
        pytest.skip("the hard open-file limit here is %d" % hard)
    return min(hard, 1 << 20)


def test_a_low_hard_limit_lowers_the_connection_cap_with_one_line(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-connections", "4096", nofile=(256, 256))
    line = server.wait_for_log(r"open-file limit 256 .*: at most (\d+) connections and (\d+) open data files")
    connections = int(line.group(1))
    assert 16 <= connections < 256 and "Traceback" not in server.log_text()
    # More connections than fit: the extra ones are closed at once, instead of accept() running out of descriptors.
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(connections + 40)]
    try:
        for sock in idle:
            sock.settimeout(0)

        def refused() -> Optional[int]:
            closed = 0
            for sock in idle:
                try:
                    closed += sock.recv(1) == b""
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    closed += 1
            return closed if closed >= 40 else None

        wait_until(refused, 30, "the connections beyond the cap closed")
    finally:
        for sock in idle:
            sock.close()
    with server.simulator() as ds:
        assert ds.push(make_batch("after-idle", count=5)).status == 200
    assert "too many open files" not in server.log_text().lower()


@pytest.mark.slow
def test_1500_connections_under_a_1024_soft_limit_are_all_held(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--timeout", "120", "--max-client-connections", "0",
                          nofile=(1024, resource_hard_limit()))
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1500)]
    try:
        with server.simulator(source_address="127.0.0.2") as ds:  # another uploader
            assert ds.push(make_batch("beside-1500", count=5)).status == 200
        for sock in idle:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # still open: nothing to read, no end of file
        assert "too many open files" not in server.log_text().lower()
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.slow
def test_5000_streams_under_a_1024_limit_are_all_stored(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--fsync", "interval", nofile=(1024, 1024))
    assert server.process is not None
    most = 0
    with server.simulator() as ds:
        for number in range(5000):
            # Records that carry no stream ID (as security events): the URL names their stream.
            record = b'{"reqTimeSec":"1764201500","reqId":"r%d"}' % number
            response = ds.push(batch_of_lines([record]), path="/datastream?streamId=%d" % (100000 + number))
            assert response.status == 200, (number, response.body)
            if number % 500 == 0:
                most = max(most, len(os.listdir("/proc/%d/fd" % server.process.pid)))
                assert ds.request("GET", path="/healthz").status == 200
        assert ds.request("GET", path="/healthz").status == 200
    assert most < 1024
    folders = {path.parent.name for path in server.data_files()}
    assert len(folders) == 5000
    assert server.stop() == 0
    assert len(server.stored_lines()) == 5000



def test_a_file_created_while_an_earlier_versions_folder_is_walked_is_never_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(tmp_path / "out")
    earlier_run(tmp_path / "out", ["2025-01-01T00Z.log"], lines=3)  # an earlier version's: no journal
    (tmp_path / "out" / "stream=70001").mkdir()
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True)
    real_walk = os.walk

    def walk_while_a_push_arrives(top: str, topdown: bool = True) -> Iterator[Tuple[str, List[str], List[str]]]:
        for step, found in enumerate(real_walk(top, topdown)):
            if step == 0:  # the root is listed; the stream's folder, walked next, gets a file now
                storage.store("stream=70001", batch_of(b"the first push after the start"))
            yield found

    monkeypatch.setattr(os, "walk", walk_while_a_push_arrives)
    housekeeper.queue_earlier_files()
    monkeypatch.setattr(os, "walk", real_walk)
    assert [path.name for path in housekeeper.to_finish] == ["2025-01-01T00Z.log"]
    housekeeper.finish_files()
    path = storage.store("stream=70001", batch_of(b"a later push")).path
    storage.close()
    assert path is not None and path.read_bytes() == b"the first push after the start\na later push\n"
    assert storage.layout.listed_mark.exists()


def test_a_roll_never_takes_a_number_an_earlier_file_has(tmp_path: Path) -> None:
    storage = open_storage(tmp_path, max_file_size=4)  # every push fills its file
    period = storage.layout.period_name(time.time())
    for number in (0, 3):  # 1 and 2 were shipped away (rclone move) since
        (tmp_path / ("%s.%d.log" % (period, number) if number else period + ".log")).write_bytes(b"earlier\n")
    paths = [storage.store("", batch_of(b"push %d" % number)).path for number in range(3)]
    storage.close()
    assert [path.name for path in paths if path is not None] == [period + ".1.log", period + ".4.log",
                                                                period + ".5.log"]
    assert (tmp_path / ("%s.3.log" % period)).read_bytes() == b"earlier\n"


def test_a_closed_file_is_never_synced_or_cut_through_a_reused_descriptor(tmp_path: Path) -> None:
    data_file = dsreceiver.DataFile(tmp_path / "closed.log", tmp_path / "closed.idx")
    data_file.close()
    victim = os.open(str(tmp_path / "victim"), os.O_RDWR | os.O_CREAT)  # may take a number the file had
    try:
        os.write(victim, b"not the data file's")
        assert (data_file.fd, data_file.index_fd) == (-1, -1) and data_file.sync_now() is None
        assert os.fstat(victim).st_size == len(b"not the data file's")
    finally:
        os.close(victim)


def test_a_file_truncated_while_suspended_gets_a_fresh_index(tmp_path: Path) -> None:
    storage = open_storage(tmp_path, max_open=1)
    first = storage.store("stream=70001", batch_of(b"copied away 1", b"copied away 2")).path
    storage.store("stream=70002", batch_of(b"suspends the first"))
    assert first is not None and storage.files["stream=70001"].suspended
    os.truncate(str(first), 0)  # logrotate's copytruncate
    storage.store("stream=70001", batch_of(b"after the truncation"))
    storage.close()
    assert first.read_bytes() == b"after the truncation\n"
    entries = dsreceiver.read_index(storage.layout.index_path(first).read_bytes())
    assert [(entry.end, entry.records) for entry in entries] == [(len(b"after the truncation\n"), 1)]


def test_a_moved_file_whose_index_cannot_be_set_aside_never_holds_up_its_folder(tmp_path: Path) -> None:
    storage = open_storage(tmp_path, max_open=1)
    first = storage.store("stream=70001", batch_of(b"before the move")).path
    storage.store("stream=70002", batch_of(b"suspends the first"))
    assert first is not None
    os.rename(str(first), str(first) + ".1")
    storage.layout.index_path(first).unlink()  # an operator removed it: setting it aside fails
    results: List[object] = []
    pusher = threading.Thread(target=lambda: results.append(storage.store("stream=70001", batch_of(b"after"))))
    pusher.start()
    pusher.join(30)
    assert not pusher.is_alive() and len(results) == 1
    storage.close()
    assert first.read_bytes() == b"after\n"
