"""Storage: file layout, durability (group commit), torn-tail repair, storage failures."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

import dsreceiver
from conftest import ROOT, HeldSync, ServerProcess, batch_of, die, open_storage, wait_until
from simulator import Batch, expected_lines, make_batch


def test_records_land_in_the_file_of_the_utc_hour(server: ServerProcess) -> None:
    before = time.time()
    with server.simulator() as ds:
        assert ds.push(make_batch("hour", count=3)).status == 200
    after = time.time()
    names = [path.name for path in server.data_files()]
    allowed = {time.strftime("%Y-%m-%dT%HZ.log", time.gmtime(moment)) for moment in (before, after)}
    assert len(names) == 1 and names[0] in allowed


def test_server_keeps_its_own_files_under_the_dot_path(server: ServerProcess) -> None:
    with server.simulator() as ds:
        assert ds.push(make_batch("dot", count=3, compress=True)).status == 200
    for path in server.output_dir.rglob("*"):
        relative = path.relative_to(server.output_dir).as_posix()
        assert (relative.startswith(".") or relative == "stream=61234"
                or re.fullmatch(r"stream=61234/\d{4}-\d\d-\d\dT\d\dZ\.log", relative)), relative


def test_storage_rolls_to_a_new_file_each_hour(tmp_path: Path) -> None:
    now = [1764201599.0]  # 2025-11-26T23:59:59Z
    storage = open_storage(tmp_path, clock=lambda: now[0])
    storage.store("", batch_of(b"late"))
    now[0] += 1
    storage.store("", batch_of(b"next hour"))
    storage.store("stream-a", batch_of(b"routed"))
    storage.close()
    assert (tmp_path / "2025-11-26T23Z.log").read_bytes() == b"late\n"
    assert (tmp_path / "2025-11-27T00Z.log").read_bytes() == b"next hour\n"
    assert (tmp_path / "stream-a" / "2025-11-27T00Z.log").read_bytes() == b"routed\n"


@pytest.mark.parametrize("folder", ["..", "../x", "a/../b", ".hidden", "a/.hidden", "/abs", "a//b", "a/", "x" * 101])
def test_storage_refuses_unsafe_folder_names(tmp_path: Path, folder: str) -> None:
    storage = open_storage(tmp_path / "out")
    with pytest.raises(ValueError):
        storage.store(folder, batch_of(b"never"))
    storage.close()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not list(storage.layout.data_files())


@pytest.mark.parametrize("folder", ["", "a", "a/b"])
def test_storage_writes_the_root_and_nested_safe_folders(tmp_path: Path, folder: str) -> None:
    storage = open_storage(tmp_path / "out")
    path = storage.store(folder, batch_of(b"kept")).path
    storage.close()
    assert path is not None and path.parent == (tmp_path / "out" / folder if folder else tmp_path / "out")
    assert path.read_bytes() == b"kept\n"
    assert storage.layout.index_path(path).is_file()


def test_concurrent_appends_share_one_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_file = dsreceiver.DataFile(tmp_path / "group.log", tmp_path / "group.idx")
    held_sync = HeldSync(monkeypatch)

    def writer(index: int) -> None:
        data_file.append(dsreceiver.PendingBatch(batch_of(b"record %d" % index),
                                                dsreceiver.IndexEntry(0, time.time(), records=1)))

    leader = threading.Thread(target=writer, args=(0,))
    leader.start()
    held_sync.wait_started()
    followers = [threading.Thread(target=writer, args=(i,)) for i in range(1, 21)]
    for thread in followers:
        thread.start()
    # Every follower has queued its batch while the leader's fdatasync is still running.
    wait_until(lambda: len(data_file.queue) == 20, what="20 queued batches")
    held_sync.release()
    for thread in [leader] + followers:
        thread.join()
    assert len(held_sync.calls) == 4  # data and index: the leader's pair, then one pair for all twenty followers
    assert data_file.durable_size == data_file.size == len(b"".join(b"record %d\n" % i for i in range(21)))
    data_file.close()
    entries = dsreceiver.read_index((tmp_path / "group.idx").read_bytes())
    assert [entry.records for entry in entries] == [1] * 21
    assert [entry.end for entry in entries] == sorted(entry.end for entry in entries)


def test_failed_fdatasync_discards_unsynced_records_and_recovers(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data_file = dsreceiver.DataFile(tmp_path / "eio.log", tmp_path / "eio.idx")
    data_file.append(dsreceiver.PendingBatch(batch_of(b"kept"), dsreceiver.IndexEntry(0, time.time())))
    failing = [True]
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError):
        data_file.append(dsreceiver.PendingBatch(batch_of(b"lost"), dsreceiver.IndexEntry(0, time.time())))
    assert (tmp_path / "eio.log").read_bytes() == b"kept\n"
    failing[0] = False
    data_file.append(dsreceiver.PendingBatch(batch_of(b"after"), dsreceiver.IndexEntry(0, time.time())))
    data_file.close()
    assert (tmp_path / "eio.log").read_bytes() == b"kept\nafter\n"
    assert [entry.end for entry in dsreceiver.read_index((tmp_path / "eio.idx").read_bytes())] == [5, 11]


def test_torn_tail_is_repaired_at_start(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    torn_file = data / "2026-01-01T00Z.log"
    torn_file.write_bytes(b'{"a":"1"}\n{"b":"2"}\n{"c":"tor')
    server = start_server()
    server.wait_for_log(r"repaired torn tail of .*2026-01-01T00Z\.log: cut 9 bytes")
    assert torn_file.read_bytes() == b'{"a":"1"}\n{"b":"2"}\n'
    kept = list((data / ".dsreceiver" / "torn").iterdir())
    assert [path.read_bytes() for path in kept] == [b'{"c":"tor']
    batch = make_batch("after-repair", count=2)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    assert server.stored_lines() == [b'{"a":"1"}', b'{"b":"2"}'] + batch.lines


@pytest.mark.parametrize("mode", ["interval", "never"])
def test_relaxed_fsync_modes_still_store(start_server: Callable[..., ServerProcess], mode: str) -> None:
    server = start_server("--fsync", mode)
    batch = make_batch("fsync-" + mode, count=100)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    server.wait_for_log("fsync %s" % mode)
    assert server.stop() == 0
    assert server.stored_lines() == batch.lines


def test_disk_full_answers_503_then_recovers_without_restart(start_server: Callable[..., ServerProcess],
                                                              small_tmpfs: Path) -> None:
    server = start_server(output_dir=small_tmpfs / "data")
    acknowledged: List[Batch] = []
    refused = None
    with server.simulator() as ds:
        for index in range(100):
            batch = make_batch("full%03d" % index, count=60)
            response = ds.push(batch)
            if response.status == 200:
                acknowledged.append(batch)
                continue
            refused = response
            break
    assert refused is not None, "the 256 KiB disk never filled"
    assert refused.status == 503
    assert int(refused.headers["retry-after"]) > 0
    server.wait_for_log(r"storage failed, answering 503: .*no space left on device")
    # Nothing half-written: exactly the acknowledged batches, whole lines only.
    assert server.stored_lines() == expected_lines(acknowledged)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    late = make_batch("after-full", count=60)
    with server.simulator() as ds:
        assert ds.push(late).status == 200
    assert server.stored_lines() == expected_lines(acknowledged) + late.lines


def test_read_only_folder_answers_503_then_recovers(start_server: Callable[..., ServerProcess],
                                                    bind_mounted_dir: Path) -> None:
    server = start_server(output_dir=bind_mounted_dir / "data")
    before = make_batch("before-ro", count=10)
    with server.simulator() as ds:
        assert ds.push(before).status == 200
        # The kernel refuses a read-only remount while files are open for writing: rotate the
        # current file away as logrotate would, and SIGHUP makes the server close it; housekeeping
        # then seals the moved file in the background, writing for a moment ("mount point is busy").
        [current] = server.data_files()
        current.rename(current.with_name(current.name + ".1"))
        server.send_signal(signal.SIGHUP)
        server.wait_for_log("reopened 1 output files that were moved")
        wait_until(lambda: subprocess.run(["mount", "-o", "remount,bind,ro", str(bind_mounted_dir)],
                                          capture_output=True).returncode == 0, what="a read-only remount")
        refused = ds.push(make_batch("while-ro", count=10))
        assert refused.status == 503 and int(refused.headers["retry-after"]) > 0
        health = ds.request("GET", path="/healthz")
        assert health.status == 503 and b"read-only file system" in health.body
        subprocess.run(["mount", "-o", "remount,bind,rw", str(bind_mounted_dir)], check=True)
        after = make_batch("after-ro", count=10)
        assert ds.push(after).status == 200
    server.wait_for_log(r"storage failed, answering 503: .*read-only file system")
    assert sorted(server.stored_lines()) == sorted(before.lines + after.lines)


def test_reopen_keeps_files_in_place_and_replaces_moved_ones(tmp_path: Path) -> None:
    storage = open_storage(tmp_path, dedupe_window=900)
    first = dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(b"first\n")
    storage.store("", first)
    [current] = list(storage.files.values())
    assert storage.reopen() == 0
    assert list(storage.files.values()) == [current]  # still in place: one descriptor, one index
    current.path.rename(current.path.with_name(current.path.name + ".1"))
    assert storage.reopen() == 1
    storage.store("", dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(b"second\n"))
    storage.close()
    assert current.path.read_bytes() == b"second\n"
    assert current.path.with_name(current.path.name + ".1").read_bytes() == b"first\n"
    # The new file has an index of its own, and the moved one still tells dedup what was stored.
    entries = dsreceiver.read_index(storage.layout.index_path(current.path).read_bytes())
    assert [entry.end for entry in entries] == [7]
    restarted = open_storage(tmp_path, dedupe_window=900)
    again = dsreceiver.BatchBuilder(restarted.layout.spool_dir, digest=True).feed_whole(b"first\n")
    assert restarted.store("", again).path is None
    restarted.close()


def test_layout_parses_every_name_it_makes(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path, tag=".w2")
    path = layout.data_path("route/sub", "2026-11-27T15Z", 3)
    assert path == tmp_path / "route" / "sub" / "2026-11-27T15Z.w2.3.log"
    assert layout.parse(path.name) == dsreceiver.DataName("2026-11-27T15Z", ".w2", 3, False)
    assert layout.parse(layout.compressed_path(path).name) == dsreceiver.DataName("2026-11-27T15Z", ".w2", 3, True)
    assert layout.folder_of(path) == "route/sub"
    assert layout.index_path(path) == tmp_path / ".dsreceiver" / "batches" / "route" / "sub" / (path.name + ".idx")
    daily = dsreceiver.Layout(tmp_path, rotate="daily", store_gzip=True).data_path("", "2026-11-27", 0)
    assert daily == tmp_path / "2026-11-27.log.gz"
    for name in ("notes.log", "2026-11-27T15Z.log.x", "x2026-11-27T15Z.log", "2026-11-27T15Z.w.log", "2026-11-27T15Z"):
        assert layout.parse(name) is None, name
    # What logrotate makes of a data file (moved or copied, numbered or dated, gzip'd or not) is read as one.
    for name, rotated in (("2026-11-27T15Z.log.1", ".1"), ("2026-11-27.w2.log-20261128", "-20261128"),
                          ("2026-11-27.log.2.gz", ".2.gz")):
        parsed = layout.parse(name)
        assert parsed is not None and parsed.rotated == rotated and parsed.compressed == name.endswith(".gz"), name


def test_a_dead_workers_batches_are_learnt_from_its_journal_and_a_start_reads_set_aside_indexes(
        tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path, tag=".w1")
    dsreceiver.prepare_output(layout, 900)
    storage = dsreceiver.Storage(layout, dedupe=dsreceiver.DedupeMemory(900))
    before = dsreceiver.BatchBuilder(layout.spool_dir, digest=True).feed_whole(b"before the move\n")
    moved = storage.store("", before).path
    assert moved is not None and before.digest is not None
    moved.rename(moved.with_name(moved.name + ".1"))  # logrotate
    assert storage.reopen() == 1  # SIGHUP: the index is set aside under a new name
    after = dsreceiver.BatchBuilder(layout.spool_dir, digest=True).feed_whole(b"after the move\n")
    current = storage.store("", after).path
    assert current is not None and after.digest is not None
    die(storage)
    # What a restarted worker reads before it serves: the files its predecessor's journal lists.
    recovered = dsreceiver.recover_ended_runs(layout, ".w1")
    rotated = moved.with_name(moved.name + ".1")
    assert sorted(recovered) == [current, rotated]  # the moved file, journalled to be sealed with its index
    learnt = [key for _, key in dsreceiver.indexed_batches(layout, 900, time.time(), recovered)]
    assert sorted(learnt) == sorted(dsreceiver.dedupe_key("", batch.digest or b"") for batch in (before, after))
    # Told again to the next worker to start (its predecessor may have died before it could tell), never recovered again.
    assert sorted(dsreceiver.recover_ended_runs(layout, ".w1")) == [current, rotated]
    [journal] = layout.runs_dir.glob("*.files")
    assert journal.read_bytes().count(b"\nrecovered\n") == 1
    assert dsreceiver.recover_ended_runs(layout.for_worker(".w2"), ".w2") == []
    # A start reads every index touched within the window, the set-aside one included.
    [(index, folder, name)] = [found for found in layout.indexes() if ".moved-" in found[0].name]
    assert folder == "" and name == layout.parse(rotated.name)  # set aside under the moved file's new name
    everything = sorted(key for _, key in dsreceiver.indexed_batches(layout, 900, time.time()))
    assert everything == sorted(dsreceiver.dedupe_key("", batch.digest or b"") for batch in (before, after))


# -- private files ------------------------------------------------------------------------------------

PERMISSIVE_UMASK = """\
import os
import sys
sys.path.insert(0, {root!r})
import dsreceiver

os.umask(0)  # whatever umask the service gets, its files must stay private
sys.exit(dsreceiver.main())
"""


def modes_under(root: Path) -> Dict[str, int]:
    """The permission bits of every file and folder under `root`, the root itself included."""
    return {path.relative_to(root).as_posix(): path.stat().st_mode & 0o777
            for path in [root, *root.rglob("*")]}


@pytest.mark.parametrize("arguments, file_mode, folder_mode", [((), 0o640, 0o750),
                                                                (("--file-mode", "0600"), 0o600, 0o700)])
def test_no_file_or_folder_it_creates_is_open_to_other_users(
        start_server: Callable[..., ServerProcess], tmp_path: Path, arguments: Tuple[str, ...], file_mode: int,
        folder_mode: int) -> None:
    wrapper = tmp_path / "permissive_umask.py"
    wrapper.write_text(PERMISSIVE_UMASK.format(root=str(ROOT)))
    output = tmp_path / "out"
    os.makedirs(str(output / "stream=61234"), mode=0o700)
    old = output / "stream=61234" / "2020-01-01T00Z.log"  # a finished file from a past hour: compressed
    old.write_bytes(b"kept\n")
    torn = output / "stream=61234" / "2020-01-01T01Z.log"  # cut mid-line by a crash: the tail is set aside
    torn.write_bytes(b"whole\nhal")
    server = start_server("--compress-rotated", "--route-by-path", *arguments, output_dir=output, script=wrapper)
    with server.simulator() as ds:
        for batch in (make_batch("private", count=5), make_batch("again", count=3)):
            assert ds.push(batch, path="/edge/logs").status == 200
    server.wait_for_log(r"compressed \S+2020-01-01T00Z\.log\.gz")
    server.stop()
    modes = modes_under(output)
    created = {name: mode for name, mode in modes.items()
               if not name.startswith("stream=61234/2020-01-01T01Z.log") and name not in (".", "stream=61234")}
    assert "edge_logs/stream=61234" in created and "stream=61234/2020-01-01T00Z.log.gz" in created
    assert any(name.startswith(".dsreceiver/torn/") for name in created)
    assert any(name.startswith(".dsreceiver/batches/edge_logs/stream=61234/") for name in created)
    for name, mode in created.items():
        expected = folder_mode if (output / name).is_dir() else file_mode
        assert mode == expected, "%s is %04o, not %04o" % (name, mode, expected)


def test_a_file_mode_without_owner_write_is_refused(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--file-mode", "0440", wait=False)
    assert server.wait_exit() == 2
    server.wait_for_log(r"--file-mode: the owner needs read and write")


def test_nothing_is_written_through_a_planted_link(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    output, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    output.mkdir()
    elsewhere.mkdir()
    (output / "stream=61234").symlink_to(elsewhere)  # planted in a group-writable output folder
    server = start_server(output_dir=output)
    with server.simulator() as ds:
        refused = ds.push(make_batch("through-a-link", count=5))
        assert refused.status == 503
    server.wait_for_log(r"stream=61234 is a symbolic link: dsreceiver writes nothing through one")
    assert list(elsewhere.iterdir()) == []
    assert server.stop() == 0


def test_a_push_makes_again_the_index_folders_housekeeping_removes_while_it_makes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(tmp_path)
    index_dir = storage.layout.index_dir
    real_mkdir = os.mkdir
    removed: List[Path] = []

    def mkdir(path: Any, mode: int = 0o777, *rest: Any, **named: Any) -> None:
        folder = Path(path)
        if not removed and index_dir in folder.parent.parents and not any(folder.parent.iterdir()):
            # Housekeeping's remove_empty_index_folders, between the parent's mkdir and this one.
            os.rmdir(str(folder.parent))
            removed.append(folder.parent)
        real_mkdir(path, mode, *rest, **named)
    monkeypatch.setattr(os, "mkdir", mkdir)
    path = storage.store("edge_logs/stream=61234", batch_of(b'{"n":"1"}'), stream="61234").path
    storage.close()
    assert removed == [index_dir / "edge_logs"], "the race was not played"
    assert path is not None and path.read_bytes() == b'{"n":"1"}\n'
