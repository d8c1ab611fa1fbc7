"""Rotation, size roll, safe compression and retention, driven by an injected clock (no real waiting)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Callable, List

import pytest

import dsreceiver
from conftest import ServerProcess, batch_of, open_storage
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


def test_max_file_size_rolls_to_numbered_files_and_resumes_after_restart(tmp_path: Path) -> None:
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
    assert (tmp_path / "2025-11-27T00Z.4.log").read_bytes() == b"record-4-abcdef\nafter restart\n"


def test_finished_files_are_compressed_safely_and_open_ones_never(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT)
    storage = open_storage(tmp_path, clock=clock)
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=clock)
    storage.store("", batch_of(b"old hour 1", b"old hour 2"))
    housekeeper.compress_finished()
    assert names(tmp_path) == ["2025-11-26T23Z.log"]  # still being written: untouched
    clock.now += 1
    storage.retire_stale()  # the hour passed with no push: the file is finished anyway
    storage.store("", batch_of(b"new hour"))
    housekeeper.compress_finished()
    assert names(tmp_path) == ["2025-11-26T23Z.log.gz", "2025-11-27T00Z.log"]
    assert gzip.decompress((tmp_path / "2025-11-26T23Z.log.gz").read_bytes()) == b"old hour 1\nold hour 2\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    storage.close()
    assert names(tmp_path) == ["2025-11-26T23Z.log.gz", "2025-11-27T00Z.log"]  # the current file is kept as is


def test_interrupted_compression_is_finished_at_start(tmp_path: Path) -> None:
    # A crash after the .gz was renamed into place but before the original was removed.
    (tmp_path / "2025-11-26T22Z.log").write_bytes(b"a\n")
    (tmp_path / "2025-11-26T22Z.log.gz").write_bytes(gzip.compress(b"a\n"))
    # A crash while the temporary file was being written.
    (tmp_path / "2025-11-26T21Z.log").write_bytes(b"b\n")
    (tmp_path / ".2025-11-26T21Z.log.gz.tmp").write_bytes(b"\x1f\x8b partial")
    storage = open_storage(tmp_path, clock=Clock(BEFORE_MIDNIGHT))
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=Clock(BEFORE_MIDNIGHT))
    housekeeper.queue_finished_files(own_only=False)
    housekeeper.compress_finished()
    storage.close()
    assert names(tmp_path) == ["2025-11-26T21Z.log.gz", "2025-11-26T22Z.log.gz"]
    assert gzip.decompress((tmp_path / "2025-11-26T21Z.log.gz").read_bytes()) == b"b\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != STATE] == []


def test_retention_deletes_old_finished_files_only(tmp_path: Path) -> None:
    clock = Clock(BEFORE_MIDNIGHT + 10 * 86400)
    for name, age_days in (("2025-11-20T00Z.log.gz", 7), ("2025-11-25T00Z.log", 2), ("2025-11-24T00Z.log", 3.5)):
        path = tmp_path / name
        path.write_bytes(b"x\n")
        os.utime(str(path), (clock.now - age_days * 86400,) * 2)
    storage = open_storage(tmp_path, clock=clock)
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, retention_days=3, clock=clock)
    storage.store("", batch_of(b"current"))
    current = storage.layout.data_path("", storage.layout.period_name(clock.now), 0)
    os.utime(str(current), (clock.now - 30 * 86400,) * 2)  # even an old mtime never deletes the open file
    housekeeper.apply_retention()
    storage.close()
    assert names(tmp_path) == sorted(["2025-11-25T00Z.log", current.name])


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
