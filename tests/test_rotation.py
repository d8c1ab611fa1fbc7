"""Rotation, size roll, safe compression and retention, driven by an injected clock (no real waiting)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Callable, List, Optional, Set

import pytest

import dsreceiver
from conftest import ROOT, ServerProcess, batch_of, die, ledger_totals, open_storage, wait_until
from simulator import make_batch

HOUR = 3600.0
BEFORE_MIDNIGHT = 1764201599.0  # 2025-11-26T23:59:59Z


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def names(root: Path) -> List[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.is_file() and STATE not in path.parts)


STATE = dsreceiver.Layout.STATE_DIR


@pytest.mark.parametrize("rotate, first, second", [
    ("hourly", "2025-11-26T23Z.log", "2025-11-27T00Z.log"),
    ("daily", "2025-11-26.log", "2025-11-27.log"),
])
def test_rotation_at_the_period_boundary(tmp_path: Path, rotate: str, first: str, second: str) -> None:
    clock = Clock(BEFORE_MIDNIGHT)
    storage = open_storage(tmp_path, rotate=rotate, clock=clock)
    storage.store("", batch_of(b"before"))
    clock.now += 1
    storage.store("", batch_of(b"after"))
    storage.close()
    assert names(tmp_path) == [first, second]
    assert (tmp_path / first).read_bytes() == b"before\n"


def test_daily_rotation_keeps_a_day_in_one_file(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT + 1)
    storage = open_storage(tmp_path, rotate="daily", clock=clock)
    for hour in range(24):
        storage.store("", batch_of(b"hour %d" % hour))
        clock.now += HOUR
    storage.close()
    assert names(tmp_path) == ["2025-11-27.log"]
    assert len((tmp_path / "2025-11-27.log").read_bytes().splitlines()) == 24


def test_max_file_size_rolls_to_numbered_files_and_a_restart_starts_the_next(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT + 10)
    storage = open_storage(tmp_path, max_file_size=16, clock=clock)
    for index in range(5):
        storage.store("", batch_of(b"record-%d-abcdef" % index))  # 16 bytes each: every file is full at once
    storage.close()
    assert names(tmp_path) == ["2025-11-27T00Z.1.log", "2025-11-27T00Z.2.log", "2025-11-27T00Z.3.log",
                               "2025-11-27T00Z.4.log", "2025-11-27T00Z.log"]
    restarted = open_storage(tmp_path, max_file_size=40, clock=clock)
    restarted.store("", batch_of(b"after restart"))
    restarted.close()
    # The earlier run's files are never appended to (housekeeping finishes them in the background).
    assert (tmp_path / "2025-11-27T00Z.4.log").read_bytes() == b"record-4-abcdef\n"
    assert (tmp_path / "2025-11-27T00Z.5.log").read_bytes() == b"after restart\n"


def test_finished_files_are_compressed_safely_and_open_ones_never(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT)
    storage = open_storage(tmp_path, clock=clock)
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=clock)
    storage.store("", batch_of(b"old hour 1", b"old hour 2"))
    housekeeper.finish_files()
    assert names(tmp_path) == ["2025-11-26T23Z.log"]  # still being written: untouched
    clock.now += 1
    storage.retire_stale()  # the hour passed with no push: the file is finished anyway
    storage.store("", batch_of(b"new hour"))
    housekeeper.finish_files()
    sealed = [".2025-11-26T23Z.log.gz.sealed.json", "2025-11-26T23Z.log.gz", "2025-11-27T00Z.log"]
    assert names(tmp_path) == sealed
    assert gzip.decompress((tmp_path / "2025-11-26T23Z.log.gz").read_bytes()) == b"old hour 1\nold hour 2\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    storage.close()
    assert names(tmp_path) == sealed  # the current file is kept as is, and not sealed


def test_interrupted_compression_is_finished_at_start(tmp_path: Path) -> None:
    # A crash after the .gz was renamed into place but before the original was removed.
    (tmp_path / "2025-11-26T22Z.log").write_bytes(b"a\n")
    (tmp_path / "2025-11-26T22Z.log.gz").write_bytes(gzip.compress(b"a\n"))
    # A crash while the temporary file was being written.
    (tmp_path / "2025-11-26T21Z.log").write_bytes(b"b\n")
    (tmp_path / ".2025-11-26T21Z.log.gz.tmp").write_bytes(b"\x1f\x8b partial")
    storage = open_storage(tmp_path, clock=Clock(BEFORE_MIDNIGHT))
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=Clock(BEFORE_MIDNIGHT))
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    storage.close()
    assert [name for name in names(tmp_path) if not name.startswith(".")] == ["2025-11-26T21Z.log.gz",
                                                                              "2025-11-26T22Z.log.gz"]
    assert gzip.decompress((tmp_path / "2025-11-26T21Z.log.gz").read_bytes()) == b"b\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != STATE) == [
        ".2025-11-26T21Z.log.gz.sealed.json", ".2025-11-26T22Z.log.gz.sealed.json"]  # no temporary left


def test_retention_deletes_the_files_sealed_on_days_that_expired_and_never_a_current_one(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT)
    storage = open_storage(tmp_path, clock=clock)
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, retention_days=3, clock=clock)
    old = storage.store("", batch_of(b"old hour")).path
    clock.now += 2
    storage.retire_stale()
    housekeeper.finish_files()  # sealed on 2025-11-27, just after midnight
    assert old is not None and dsreceiver.Layout.manifest_path(old).exists()
    clock.now += 3 * 86400
    storage.store("", batch_of(b"current"))
    current = storage.layout.data_path("", storage.layout.period_name(clock.now), 0)
    os.utime(str(current), (clock.now - 30 * 86400,) * 2)  # even an old mtime never deletes the open file
    housekeeper.apply_retention()
    assert old.exists()  # its day of sealing ended less than 3 days ago
    clock.now += 86400
    housekeeper.apply_retention()
    storage.close()
    assert names(tmp_path) == [current.name]


def test_compression_runs_within_seconds_in_the_server(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--compress-rotated", "--max-file-size", "2K")
    batches = [make_batch("size-roll-%d" % i, count=8) for i in range(3)]  # each larger than 2K
    with server.simulator() as ds:
        for batch in batches:
            assert ds.push(batch).status == 200
    server.wait_for_log(r"compressed .*\.log\.gz", count=2)
    stored = b""
    for path in server.data_files():
        stored += gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    assert sorted(stored.splitlines()) == sorted(line for batch in batches for line in batch.lines)
    assert sum(path.name.endswith(".gz") for path in server.data_files()) == 2


README_LOGROTATE = re.search(r"```logrotate\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed (.ci/run installs it)")
def test_the_readme_logrotate_recipe_under_pushes_loses_nothing_and_doubles_nothing(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    assert README_LOGROTATE, "README has no logrotate configuration"
    output = tmp_path / "data"
    server = start_server("--rotate", "daily", "--workers", "2", output_dir=output)
    assert server.process is not None
    recipe = textwrap.dedent(README_LOGROTATE.group(1).replace("/var/lib/dsreceiver/data", str(output))
                             .replace("systemctl reload dsreceiver", "kill -HUP %d" % server.process.pid))
    config = tmp_path / "logrotate.conf"
    config.write_text(recipe)
    config.chmod(0o644)  # logrotate refuses a configuration others may write
    batches = [make_batch("rotated-%03d" % number, count=20) for number in range(120)]
    answers: List[int] = []

    def push_all() -> None:
        with server.simulator() as ds:
            answers.extend(ds.push(batch).status for batch in batches)

    pusher = threading.Thread(target=push_all)
    pusher.start()
    wait_until(lambda: len(answers) >= 30, 30, "pushes before the rotation")
    rotated = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "logrotate.state"), str(config)],
                             capture_output=True, text=True, timeout=120)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    server.wait_for_log(r"reopened [12] output files that were moved")
    pusher.join(timeout=120)
    assert answers == [200] * len(batches)
    second = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "logrotate.state"), str(config)],
                            capture_output=True, text=True, timeout=120)  # delaycompress: now the .1 files are gzip'd
    assert second.returncode == 0, second.stdout + second.stderr
    server.stop()
    names = sorted(path.name for path in output.glob("stream=*/2*.log*"))  # the README's query glob
    assert any(name.endswith(".log.1") for name in names) and any(name.endswith(".log.2.gz") for name in names)
    stored = [line for path in output.glob("stream=*/2*.log*")
              for line in (gzip.decompress(path.read_bytes()) if path.name.endswith(".gz")
                           else path.read_bytes()).split(b"\n")[:-1]]
    assert sorted(stored) == sorted(line for batch in batches for line in batch.lines)
    # The ledger counts each batch once, moved files and all.
    ledger = ledger_totals(output)["61234"]
    assert (ledger["records"], ledger["batches"]) == (len(stored), len(batches))


def test_retention_never_deletes_a_file_another_worker_still_writes(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT - 1800)
    layout = dsreceiver.Layout(tmp_path)
    dsreceiver.prepare_output(layout, 0)
    first = dsreceiver.Storage(layout.for_worker(".w1"), clock=clock)
    second = dsreceiver.Storage(layout.for_worker(".w2"), clock=clock)
    path = first.store("stream=61234", batch_of(b"worker 1, before a quiet spell")).path
    assert path is not None
    os.utime(str(path), (clock.now - 86400,) * 2)  # quiet for a day, as a stream at night
    clock.now += 1700  # still the same hour: worker 1 writes the file yet
    # Worker 2's retention (--retention-days 0.0001, far shorter than the quiet spell) passes by.
    keeper = dsreceiver.Housekeeper(layout.for_worker(".w2"), second, retention_days=0.0001, clock=clock,
                                    tags=[".w1", ".w2"])
    keeper.apply_retention()
    assert first.store("stream=61234", batch_of(b"worker 1, after it")).path == path
    first.close()
    second.close()
    assert path.read_bytes() == b"worker 1, before a quiet spell\nworker 1, after it\n"


def test_copytruncate_keeps_the_ledger_of_the_copy_and_seals_and_lists_it(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT - 1800)
    storage = open_storage(tmp_path, clock=clock)
    five = [b'{"reqId":"r%d","n":"%d"}' % (number, number) for number in range(5)]
    seven = [b'{"reqId":"s%d","n":"%d"}' % (number, number) for number in range(7)]
    path = storage.store("stream=61234", batch_of(*five), stream="61234").path
    storage.store("stream=61234", batch_of(*seven), stream="61234")
    assert path is not None
    copy = path.with_name(path.name + ".1")
    shutil.copyfile(str(path), str(copy))  # logrotate's copytruncate: copy, then truncate in place
    os.truncate(str(path), 0)
    storage.store("stream=61234", batch_of(b'{"reqId":"t0"}', b'{"reqId":"t1"}'), stream="61234")
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, clock=clock)
    housekeeper.finish_files()  # the copy, journalled, is sealed with the index set aside for it
    storage.close()
    rows = dsreceiver.read_ledger(tmp_path)
    assert sum(row.records for row in rows.values()) == 14 and sum(row.batches for row in rows.values()) == 3
    manifest = json.loads(dsreceiver.Layout.manifest_path(copy).read_bytes())
    assert manifest["records"] == 12 and manifest["first_received"] is not None
    listed = [item.relative_to(tmp_path).as_posix() for item in dsreceiver.sealed_listing(storage.layout)]
    index = ".dsreceiver/batches/stream=61234/" + manifest["index"]
    assert listed[:3] == ["stream=61234/" + copy.name, "stream=61234/." + copy.name + ".sealed.json", index]
    assert path.read_bytes() == b'{"reqId":"t0"}\n{"reqId":"t1"}\n'


def test_a_moved_file_is_sealed_and_listed_with_its_index(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT - 1800)
    storage = open_storage(tmp_path, clock=clock)
    path = storage.store("stream=61234", batch_of(*[b"moved %d" % n for n in range(5)]), stream="61234").path
    assert path is not None
    moved = path.with_name(path.name + ".1")
    path.rename(moved)  # the README's logrotate recipe, then its postrotate reload
    assert storage.reopen() == 1
    storage.store("stream=61234", batch_of(b"after the move"), stream="61234")
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, clock=clock)
    housekeeper.finish_files()
    storage.close()
    manifest = json.loads(dsreceiver.Layout.manifest_path(moved).read_bytes())
    assert manifest["records"] == 5 and ".moved-" in manifest["index"]
    listed = [item.relative_to(tmp_path).as_posix() for item in dsreceiver.sealed_listing(storage.layout)]
    assert listed[:3] == ["stream=61234/" + moved.name, "stream=61234/." + moved.name + ".sealed.json",
                          ".dsreceiver/batches/stream=61234/" + manifest["index"]]
    rows = dsreceiver.read_ledger(tmp_path)
    assert sum(row.records for row in rows.values()) == 6
    # The copy journalled before the moved name is struck off: a crash between leaves both named, never neither.
    lines = journal_lines(tmp_path)
    assert lines.index("+stream=61234/" + moved.name) < lines.index("-stream=61234/" + path.name)


def logrotate(path: Path, how: str) -> Path:
    """What logrotate does to a file: moves it to NAME.1, or copies it there and truncates it; returns NAME.1."""
    copy = path.with_name(path.name + ".1")
    if how == "move":
        path.rename(copy)
    else:
        shutil.copyfile(str(path), str(copy))
        os.truncate(str(path), 0)
    return copy


def finish_all(housekeeper: dsreceiver.Housekeeper) -> None:
    """Housekeeping passes until nothing is left to finish (a file handed to its copy takes one more)."""
    for _ in range(4):
        housekeeper.finish_files()
        if not housekeeper.to_finish:
            return
    raise AssertionError("still to finish: %s" % housekeeper.to_finish)


def closed_file(storage: dsreceiver.Storage, clock: Clock) -> Path:
    """Stores 5 records, then lets the hour end: the file is closed and waits to be finished."""
    path = storage.store("stream=61234", batch_of(*[b"kept %d" % n for n in range(5)]), stream="61234").path
    assert path is not None
    clock.now += 2
    storage.retire_stale()
    return path


def check_only_the_copy_sealed(root: Path, layout: dsreceiver.Layout, copy: Path, records: int,
                               stored: Optional[int] = None) -> None:
    """The copy logrotate made is sealed with the original's index and listed, and nothing else holds its records
    (the ledger counts `stored` records in all, `records` without another file)."""
    manifest = json.loads(dsreceiver.Layout.manifest_path(copy).read_bytes())
    assert manifest["records"] == records and ".moved-" in manifest["index"] and manifest["first_received"]
    original = copy.with_name(copy.name[:-len(".1")])
    assert not original.exists() and not dsreceiver.Layout.compressed_path(original).exists()
    listed = [item.relative_to(root).as_posix() for item in dsreceiver.sealed_listing(layout)]
    assert listed == ["stream=61234/" + copy.name, "stream=61234/." + copy.name + ".sealed.json",
                      ".dsreceiver/batches/stream=61234/" + manifest["index"]]
    assert sum(row.records for row in dsreceiver.read_ledger(root).values()) == (records if stored is None else stored)
    assert not [path for path in root.rglob("*") if path.name.endswith(".tmp")]
    if stored is None:
        assert not still_journalled(root), "finished, yet journalled as to finish"


def journal_lines(root: Path) -> List[str]:
    """The lines of every run journal (+NAME when a file is journalled, -NAME when it is struck off)."""
    return [line for journal in sorted((root / STATE / "runs").glob("*.files"))
            for line in journal.read_text().splitlines() if line[:1] in "+-" and line]


def still_journalled(root: Path) -> Set[str]:
    """The files the run journals still name as to finish (+NAME, not struck off by a later -NAME)."""
    named: Set[str] = set()
    for line in journal_lines(root):
        if line.startswith("+"):
            named.add(line[1:])
        else:
            named.discard(line[1:])
    return named


@pytest.mark.parametrize("how", ["move", "copytruncate"])
@pytest.mark.parametrize("store", ["plain", "compress-rotated", "store-gzip"])
def test_a_file_rotated_after_it_closed_and_before_it_was_finished_is_sealed_as_its_copy(
        tmp_path: Path, how: str, store: str) -> None:
    # logrotate at the hour's end (or a daily run at midnight with --rotate daily) meets the file
    # just closed: before this, the copy was never sealed, nor shipped.
    clock = Clock(BEFORE_MIDNIGHT - 1)
    storage = open_storage(tmp_path, clock=clock, store_gzip=store == "store-gzip")
    copy = logrotate(closed_file(storage, clock), how)
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=store == "compress-rotated", clock=clock)
    finish_all(housekeeper)
    storage.close()
    check_only_the_copy_sealed(tmp_path, storage.layout, copy, 5)


def listed_as_a_receiver_that_ran_before(storage: dsreceiver.Storage) -> None:
    """What the first worker of a receiver that ran before has done: its folder listed once, so that a start finds
    what to finish in the run journals alone."""
    dsreceiver.Housekeeper(storage.layout, storage).queue_earlier_files()
    assert storage.layout.listed_mark.exists()


@pytest.mark.parametrize("how", ["move", "copytruncate"])
@pytest.mark.parametrize("end", ["stop", "death", "death with the copy journalled"])
@pytest.mark.parametrize("store", ["plain", "store-gzip"])
def test_a_file_rotated_while_the_receiver_was_down_is_sealed_as_its_copy_after_the_restart(
        tmp_path: Path, how: str, end: str, store: str) -> None:
    clock = Clock(BEFORE_MIDNIGHT - 1)
    storage = open_storage(tmp_path, clock=clock, store_gzip=store == "store-gzip")
    listed_as_a_receiver_that_ran_before(storage)
    path = closed_file(storage, clock)
    copy = logrotate(path, how)
    if end == "stop":
        storage.close()  # a clean stop with the file still to finish: the next run adopts it
    else:
        if end == "death with the copy journalled":
            storage.journal.opened([copy])  # a death between journalling the copy and setting its index aside
        die(storage)
    # Start-up recovery leaves a copied file for its copy, not cut back as torn; a moved one is adopted by its index.
    restarted = open_storage(tmp_path, clock=clock, store_gzip=store == "store-gzip")
    housekeeper = dsreceiver.Housekeeper(restarted.layout, restarted, clock=clock)
    housekeeper.queue_earlier_files()
    finish_all(housekeeper)
    restarted.close()
    check_only_the_copy_sealed(tmp_path, restarted.layout, copy, 5)


def test_an_index_kept_for_a_copy_is_not_pruned_before_the_copy_is_sealed(tmp_path: Path) -> None:
    # A restart after a stop longer than the dedupe window: every index is past it by then.
    clock = Clock(BEFORE_MIDNIGHT - 1)
    storage = open_storage(tmp_path, clock=clock)
    listed_as_a_receiver_that_ran_before(storage)
    copy = logrotate(closed_file(storage, clock), "move")
    storage.close()
    for index in (tmp_path / STATE / "batches").rglob("*.idx"):
        os.utime(str(index), (0, 0))
    restarted = open_storage(tmp_path, clock=clock)
    housekeeper = dsreceiver.Housekeeper(restarted.layout, restarted, clock=clock)
    housekeeper.queue_earlier_files()
    housekeeper.prune_indexes()  # the original's index, its file gone
    housekeeper.finish_files()  # handed to the copy: the index set aside under its name
    housekeeper.prune_indexes()  # the index set aside, its copy not sealed yet
    finish_all(housekeeper)
    restarted.close()
    check_only_the_copy_sealed(tmp_path, restarted.layout, copy, 5)


@pytest.mark.parametrize("end", ["stop", "death"])
def test_a_restart_in_the_same_hour_never_takes_the_name_of_a_file_moved_away_unfinished(
        tmp_path: Path, end: str) -> None:
    clock = Clock(BEFORE_MIDNIGHT - 1800)
    storage = open_storage(tmp_path, clock=clock)
    listed_as_a_receiver_that_ran_before(storage)
    path = storage.store("stream=61234", batch_of(*[b"kept %d" % n for n in range(5)]), stream="61234").path
    assert path is not None
    if end == "stop":
        storage.close()
    else:
        die(storage)
    copy = logrotate(path, "move")
    restarted = open_storage(tmp_path, clock=clock)
    after = restarted.store("stream=61234", batch_of(b"after the restart"), stream="61234").path
    assert after is not None and after != path
    housekeeper = dsreceiver.Housekeeper(restarted.layout, restarted, clock=clock)
    housekeeper.queue_earlier_files()
    finish_all(housekeeper)
    restarted.close()
    check_only_the_copy_sealed(tmp_path, restarted.layout, copy, 5, stored=6)
    assert after.read_bytes() == b"after the restart\n"


@pytest.mark.parametrize("how", ["move", "copytruncate"])
def test_a_file_short_of_its_records_with_no_copy_to_be_found_is_never_sealed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    # logrotate's compress without delaycompress: the copy is NAME.1.gz, which is not taken for it.
    clock = Clock(BEFORE_MIDNIGHT - 1)
    storage = open_storage(tmp_path, clock=clock)
    path = closed_file(storage, clock)
    copy = logrotate(path, how)
    copy.rename(copy.with_name(copy.name + ".gz"))
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=clock)
    housekeeper.finish_files()
    storage.close()
    assert not dsreceiver.Layout.manifest_path(path).exists() and not list(dsreceiver.sealed_listing(storage.layout))
    assert not dsreceiver.Layout.compressed_path(path).exists()
    if how == "move":  # gone: said once, and done with
        assert "is gone before it was finished, and no copy of it was found: not sealed" in caplog.text
        assert not housekeeper.to_finish
    else:  # short of its records: tried again later
        assert "holds fewer bytes than its batch index counts" in caplog.text and housekeeper.to_finish == [path]
    assert sum(row.records for row in dsreceiver.read_ledger(tmp_path).values()) == 5


class RotatedWhileCompressing(threading.Event):
    """A housekeeper's stop flag that, asked while the compressed copy is being written, does what logrotate would
    meanwhile: the compression sees the file change under it."""

    def __init__(self, path: Path, how: str) -> None:
        super().__init__()
        self.path, self.how = path, how
        self.copy: Optional[Path] = None

    def is_set(self) -> bool:
        if self.copy is None and dsreceiver.Layout.compression_temp_path(self.path).exists():
            self.copy = logrotate(self.path, self.how)
        return super().is_set()


@pytest.mark.parametrize("how", ["move", "copytruncate"])
@pytest.mark.parametrize("when", ["while it is written", "just after its rename"])
def test_a_file_rotated_while_it_is_compressed_is_sealed_as_its_copy_and_never_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, when: str) -> None:
    clock = Clock(BEFORE_MIDNIGHT - 1)
    storage = open_storage(tmp_path, clock=clock)
    path = closed_file(storage, clock)
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=clock)
    rotated = RotatedWhileCompressing(path, how)
    if when == "while it is written":
        housekeeper.stopped = rotated
    else:
        real_replace = os.replace

        def replace(source: str, target: str) -> None:
            real_replace(source, target)
            if rotated.copy is None and target == str(dsreceiver.Layout.compressed_path(path)):
                rotated.copy = logrotate(path, how)  # the .gz is in place; the original not yet removed
        monkeypatch.setattr(os, "replace", replace)
    finish_all(housekeeper)
    storage.close()
    assert rotated.copy is not None, "the compression never ran"
    check_only_the_copy_sealed(tmp_path, storage.layout, rotated.copy, 5)
