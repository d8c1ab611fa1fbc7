"""Sealed files: a finished data file gets a manifest beside it (records, bytes, SHA-256, receipt and event
times), written atomically, that a loader checks before it takes the file."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

import dsreceiver
from conftest import ServerProcess, batch_of, die, open_storage
from simulator import SAMPLE_DEFINITION, batch_of_lines, sample_lines


def manifest_of(path: Path) -> Dict[str, Any]:
    return dict(json.loads(dsreceiver.Layout.manifest_path(path).read_text()))


def records_of(path: Path) -> List[bytes]:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return data.split(b"\n")[:-1]


def test_finished_files_are_sealed_with_facts_a_loader_can_check(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--compress-rotated", "--max-file-size", "64K", "--workers", "2")
    started = time.time()
    lines = sample_lines("json")
    with server.simulator() as ds:
        for start in range(0, 1000, 100):
            assert ds.push(batch_of_lines(lines[start:start + 100], compress=True)).status == 200
    server.wait_for_log(r"sealed \S+\.log\.gz: \d+ records")
    server.stop()
    folder = server.output_dir / "stream=61234"
    sealed = sorted(path for path in folder.glob("2*.log*") if dsreceiver.Layout.manifest_path(path).exists())
    assert sealed and all(path.name.endswith(".log.gz") for path in sealed)
    for path in sealed:
        manifest, records = manifest_of(path), records_of(path)
        assert manifest["file"] == path.name and manifest["stream"] == "61234" and manifest["format"] == 1
        assert manifest["records"] == len(records) and manifest["bytes"] == path.stat().st_size
        assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        times = [float(json.loads(record)["reqTimeSec"]) for record in records]
        assert (manifest["first_event"], manifest["last_event"]) == (min(times), max(times))
        assert started <= manifest["first_received"] <= manifest["last_received"] <= manifest["sealed_at"]
    # Manifests are dot-files: the README's query globs, and every rule for data files, pass them by.
    assert all(not path.name.endswith(".json") for path in folder.glob("2*.log*"))
    assert sum(len(records_of(path)) for path in folder.glob("2*.log*")) == 1000


def test_without_compression_the_plain_file_is_sealed_and_a_current_file_never(tmp_path: Path) -> None:
    now = [1764201599.0]  # a second before the hour ends
    storage = open_storage(tmp_path, clock=lambda: now[0])
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, clock=lambda: now[0])
    path = storage.store("", batch_of(b'{"reqTimeSec":"1764201500.250"}', b'{"reqTimeSec":"1764201400"}')).path
    assert path is not None
    housekeeper.finish_files()
    assert not dsreceiver.Layout.manifest_path(path).exists()  # still current
    now[0] += 2
    storage.retire_stale()
    housekeeper.finish_files()
    manifest = manifest_of(path)
    assert (manifest["records"], manifest["first_event"], manifest["last_event"]) == (2, 1764201400.0, 1764201500.25)
    assert manifest["stream"] is None and manifest["first_received"] == 1764201599.0
    storage.close()


def test_store_gzip_files_are_counted_through_their_members(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path, store_gzip=True)
    dsreceiver.prepare_output(layout, 0)
    storage = dsreceiver.Storage(layout)
    for number in range(3):
        storage.store("stream=70077", batch_of(*[b"2 0 70077 line-%d-%d" % (number, i) for i in range(4)]))
    storage.close()
    [path] = [path for path, _ in layout.data_files()]
    housekeeper = dsreceiver.Housekeeper(layout, clock=lambda: time.time() + 7200)  # two hours on
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    assert manifest_of(path)["records"] == 12 and manifest_of(path)["stream"] == "70077"


def test_retention_deletes_a_manifest_with_its_file_and_no_torn_manifest_is_left(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path)
    dsreceiver.prepare_output(layout, 0)
    old = tmp_path / "2025-01-01T00Z.log"  # an earlier version's, whose seal was cut short
    old.write_bytes(b"old\n")
    torn = dsreceiver.Layout.manifest_path(old)
    torn = torn.with_name(torn.name + ".tmp")
    torn.write_bytes(b'{"format": 1, "rec')
    now = [time.time()]
    housekeeper = dsreceiver.Housekeeper(layout, retention_days=30, clock=lambda: now[0])
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    assert manifest_of(old)["records"] == 1 and not torn.exists()
    now[0] += 30 * 86400  # sealed today, and today is not 30 days gone yet
    housekeeper.apply_retention()
    assert old.exists()
    now[0] += 86400
    housekeeper.apply_retention()
    assert not old.exists() and not dsreceiver.Layout.manifest_path(old).exists()
    housekeeper.stop()


def test_an_earlier_runs_file_is_never_appended_to_and_is_sealed_by_its_owner(tmp_path: Path) -> None:
    # A restarted worker starts a new number at once and seals its earlier file in the background:
    # nothing is finished before pushes are answered, and no file is written and sealed at once.
    layout = dsreceiver.Layout(tmp_path)
    dsreceiver.prepare_output(layout, 0)
    worker = dsreceiver.Storage(layout.for_worker(".w1"))
    first = worker.store("", batch_of(b"before the restart")).path
    worker.close()
    restarted = dsreceiver.Storage(layout.for_worker(".w1"))
    second = restarted.store("", batch_of(b"after the restart")).path
    assert first is not None and second is not None and second.name.endswith(".w1.1.log")
    other = dsreceiver.Housekeeper(layout.for_worker(".w2"), tags=[".w1", ".w2"])
    other.queue_earlier_files()
    assert other.to_finish == []  # .w1's files are worker 1's to finish
    owner = dsreceiver.Housekeeper(layout.for_worker(".w1"), restarted, tags=[".w1", ".w2"])
    owner.queue_earlier_files()
    assert owner.to_finish == [first]  # not the file it writes now
    owner.finish_files()
    assert first.read_bytes() == b"before the restart\n" and manifest_of(first)["records"] == 1
    assert not dsreceiver.Layout.manifest_path(second).exists()
    restarted.close()
    assert second.read_bytes() == b"after the restart\n"


def test_runs_of_tags_no_worker_has_are_the_first_workers(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path)
    dsreceiver.prepare_output(layout, 0)
    # A single process's run, then runs of workers 1 and 3, each leaving an unfinished file.
    for tag in ("", ".w1", ".w3"):
        storage = dsreceiver.Storage(layout.for_worker(tag))
        storage.store("", batch_of(b"x"))
        storage.close()
    queued = {}
    keepers = []
    for tag in (".w1", ".w2"):
        housekeeper = dsreceiver.Housekeeper(layout.for_worker(tag), tags=[".w1", ".w2"])
        housekeeper.queue_earlier_files()
        queued[tag] = sorted(path.name.split(".", 1)[1] for path in housekeeper.to_finish)
        keepers.append(housekeeper)
    assert queued == {".w1": ["log", "w1.log", "w3.log"], ".w2": []}
    for housekeeper in keepers:
        housekeeper.stop()  # before finishing them: the files pass on with worker 1's run
    single = dsreceiver.Housekeeper(layout)
    single.queue_earlier_files()
    left = list(single.to_finish)
    assert len(left) == 3
    single.finish_files()
    assert all(manifest_of(path)["records"] == 1 for path in left) and single.to_finish == []
    single.stop()


def test_json_records_as_sent_are_read_back_beside_the_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1764201599.0]
    storage = open_storage(tmp_path, clock=lambda: now[0])
    # A visitor's query string that looks like a time is no event time: only each record's own time key is.
    path = storage.store("", batch_of(b'{"reqTimeSec":"1764201500.250","queryStr":"t=9999999999.999"}',
                                      b'{"reqTimeSec":"1764201400"}')).path
    storage.store("", batch_of(b'{"reqTimeSec":"1764201450"}'))
    storage.store("", batch_of(b"1 61234 a-line-without-a-definition 0000000001.000"))
    now[0] += 2
    storage.retire_stale()
    # The digest and the read back meet halfway: were one run after the other, the first would wait in vain.
    both_running = threading.Barrier(2, timeout=30)
    digest, read_back = dsreceiver.file_digest, dsreceiver.read_back

    def meeting_digest(path: Path, stopped: Optional[threading.Event] = None) -> Tuple[str, int]:
        both_running.wait()
        return digest(path, stopped)

    def meeting_read_back(path: Path, count: bool = True, spans: Optional[Sequence[Tuple[int, int]]] = None,
                          stopped: Optional[threading.Event] = None) -> Tuple[int, List[float]]:
        both_running.wait()
        return read_back(path, count, spans, stopped)

    monkeypatch.setattr(dsreceiver, "file_digest", meeting_digest)
    monkeypatch.setattr(dsreceiver, "read_back", meeting_read_back)
    dsreceiver.Housekeeper(storage.layout, storage, clock=lambda: now[0]).finish_files()
    assert path is not None
    manifest = manifest_of(path)
    assert (manifest["records"], manifest["first_event"], manifest["last_event"]) == (4, 1764201400.0, 1764201500.25)
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    storage.close()


def test_converted_structured_records_are_sealed_from_the_index_alone(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1764201599.0]
    settings = dsreceiver.parse_config(["--output-dir", str(tmp_path), "--stream-config", str(SAMPLE_DEFINITION),
                                        "--records", "json"])
    storage = open_storage(tmp_path, clock=lambda: now[0])
    pipeline = dsreceiver.PushPipeline(settings, storage, dsreceiver.StreamCatalog(settings.stream_config, True),
                                       dsreceiver.Metrics())
    lines = sample_lines("structured")
    for start in range(0, len(lines), 250):
        body = gzip.compress(b"".join(line + b"\n" for line in lines[start:start + 250]))
        outcome = pipeline.accept(dsreceiver.PushFacts("/ds", "192.0.2.7", True), bytearray(body))
        assert outcome.result is dsreceiver.PushResult.STORED
    now[0] += 2
    storage.retire_stale()

    def read_back(path: Path) -> None:
        raise AssertionError("the records were read back")

    monkeypatch.setattr(dsreceiver, "read_back", read_back)
    dsreceiver.Housekeeper(storage.layout, storage, clock=lambda: now[0]).finish_files()
    [path] = [path for path, _ in storage.layout.data_files()]
    manifest, records = manifest_of(path), records_of(path)
    times = [float(json.loads(record)["reqTimeSec"]) for record in records]
    assert (manifest["records"], manifest["first_event"], manifest["last_event"]) == (len(lines), min(times), max(times))
    storage.close()


def test_a_compressed_file_is_sealed_from_what_its_compression_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1764201599.0]
    storage = open_storage(tmp_path, clock=lambda: now[0])
    # Records cut across the pieces compression reads: each is counted once, and its time read whole.
    lines = [b'{"reqTimeSec":"17642014%02d.%03d","pad":"%s"}' % (n % 100, n % 1000, b"x" * (n % 700)) for n in range(6000)]
    path = storage.store("", batch_of(*lines)).path
    assert path is not None and path.stat().st_size > 2 * dsreceiver.COPY_CHUNK
    now[0] += 2
    storage.retire_stale()

    def read_back(path: Path) -> None:
        raise AssertionError("the .gz was gunzip'd again")

    monkeypatch.setattr(dsreceiver, "read_back", read_back)
    dsreceiver.Housekeeper(storage.layout, storage, compress=True, clock=lambda: now[0]).finish_files()
    compressed = dsreceiver.Layout.compressed_path(path)
    manifest = manifest_of(compressed)
    assert (manifest["records"], manifest["first_event"], manifest["last_event"]) == (6000, 1764201400.0, 1764201499.999)
    assert records_of(compressed) == lines
    storage.close()


def test_a_scan_fed_in_any_pieces_finds_what_one_piece_shows() -> None:
    # Records of many lengths, and a torn last one (no LF): its time is read, it is not counted.
    data = b"".join(b'{"reqTimeSec":"17642014%02d.%03d","pad":"%s"}\n' % (n % 100, n % 1000, b"x" * (n * 37 % 300))
                    for n in range(500)) + b'{"reqTimeSec":"1764201300"'
    for size in (len(data), 4096, 100, 7, 1):
        scan = dsreceiver.RecordScan()
        for start in range(0, len(data), size):
            scan.feed(data[start:start + size])
        records, events = scan.finish()
        assert (records, min(events), max(events)) == (500, 1764201300.0, 1764201499.499), size
    uncounted = dsreceiver.RecordScan(count=False)
    uncounted.feed(data)
    assert uncounted.finish()[0] == 0


def test_each_batch_is_read_by_its_own_first_records_time_key_however_the_file_is_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1764201599.0]
    storage = open_storage(tmp_path, clock=lambda: now[0])
    # An EdgeWorkers log (its first record's key is the batch's: a later record's other key is not read, as
    # when the push was stored), a security event, and STRUCTURED records as sent whose visitor wrote JSON in
    # a URL: the last say nothing (only a definition tells which value is their time).
    path = storage.store("", batch_of(b'{"time":"1764201400000","message":"a"}', b'{"time":"1764201410000"}',
                                      b'{"reqTimeSec":"1999999999"}')).path
    storage.store("", batch_of(b'{"httpMessage":{"start":"1764201300"},"time":"1999999999000"}'))
    storage.store("", batch_of(b'4 61234 1764201450.507 /x?q={"time":"1999999999"} 200',
                               b'4 61234 1764201451.507 /y?q={"reqTimeSec":"1000000000"} 200'))
    now[0] += 2
    storage.retire_stale()
    assert path is not None
    facts = []
    for piece in (1 << 20, 64, 7, 1):
        monkeypatch.setattr(dsreceiver, "READ_BACK_CHUNK", piece)
        facts.append(dsreceiver.seal_facts(path, storage.layout.index_path(path), now[0]))
    assert all((fact["records"], fact["first_event"], fact["last_event"]) == (6, 1764201300.0, 1764201410.0)
               for fact in facts)
    storage.close()


def test_a_damaged_gz_is_left_unsealed_with_one_line_and_the_others_are_sealed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [1764201599.0]
    layout = dsreceiver.Layout(tmp_path, store_gzip=True)
    storage = dsreceiver.Storage(layout, dedupe=dsreceiver.prepare_output(layout, 0.0), clock=lambda: now[0])
    damaged = storage.store("stream=1111", batch_of(b'{"reqTimeSec":"1764201400"}')).path
    whole = storage.store("stream=2222", batch_of(b'{"reqTimeSec":"1764201500"}')).path
    now[0] += 2
    storage.retire_stale()
    assert damaged is not None and whole is not None
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-8] + bytes(4) + data[-4:])  # its gzip trailer's CRC wrong (one cut short: test_rotation)
    dsreceiver.Housekeeper(layout, storage, clock=lambda: now[0]).finish_files()
    assert not dsreceiver.Layout.manifest_path(damaged).exists()
    assert manifest_of(whole)["last_event"] == 1764201500.0
    [line] = [record.getMessage() for record in caplog.records if str(damaged) in record.getMessage()]
    assert "damaged gzip data" in line
    storage.close()


def test_a_surprise_while_finishing_one_file_never_keeps_the_others_unsealed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = [1764201599.0]
    storage = open_storage(tmp_path, clock=lambda: now[0])
    first = storage.store("stream=1111", batch_of(b'{"reqTimeSec":"1764201400"}')).path
    second = storage.store("stream=2222", batch_of(b'{"reqTimeSec":"1764201500"}')).path
    now[0] += 2
    storage.retire_stale()
    seal_facts = dsreceiver.seal_facts

    def failing_for_the_first(path: Path, *rest: Any) -> Dict[str, Any]:
        if path == first:
            raise ValueError("a surprise")
        return seal_facts(path, *rest)

    monkeypatch.setattr(dsreceiver, "seal_facts", failing_for_the_first)
    dsreceiver.Housekeeper(storage.layout, storage, clock=lambda: now[0]).finish_files()
    assert first is not None and second is not None and not dsreceiver.Layout.manifest_path(first).exists()
    assert manifest_of(second)["last_event"] == 1764201500.0
    assert [record.levelname for record in caplog.records if str(first) in record.getMessage()] == ["ERROR"]
    storage.close()


def test_a_manifest_that_cannot_be_written_is_written_on_a_later_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1764201599.0]
    storage = open_storage(tmp_path, clock=lambda: now[0])
    path = storage.store("", batch_of(b'{"reqTimeSec":"1764201500"}')).path
    assert path is not None
    now[0] += 2
    storage.retire_stale()
    real_fsync = os.fsync
    full = [True]

    def fsync(fd: int) -> None:
        if full[0] and os.readlink("/proc/self/fd/%d" % fd).endswith(".sealed.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")  # the disk nearly full at the seal
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(dsreceiver, "FINISH_RETRY", 0.0)  # try again at the next pass
    housekeeper = dsreceiver.Housekeeper(storage.layout, storage, clock=lambda: now[0])
    housekeeper.finish_files()
    manifest = dsreceiver.Layout.manifest_path(path)
    assert not manifest.exists() and housekeeper.to_finish == [path]
    assert not manifest.with_name(manifest.name + ".tmp").exists()  # nothing half-written left behind
    full[0] = False  # space freed
    housekeeper.finish_files()
    assert manifest_of(path)["records"] == 1 and housekeeper.to_finish == []
    assert [item.name for item in dsreceiver.sealed_listing(storage.layout)][:2] == [path.name, manifest.name]
    storage.close()


def test_a_gz_compressed_before_a_crash_is_sealed_with_its_receipt_times(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    path = storage.store("", batch_of(b'{"reqTimeSec":"1764201500"}', b'{"reqTimeSec":"1764201400"}')).path
    assert path is not None
    die(storage)
    compressed = dsreceiver.Layout.compressed_path(path)
    compressed.write_bytes(gzip.compress(path.read_bytes()))  # compressed, the original removed: then the crash
    path.unlink()
    dsreceiver.recover_ended_runs(storage.layout)
    housekeeper = dsreceiver.Housekeeper(storage.layout, compress=True)
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    housekeeper.stop()
    manifest = manifest_of(compressed)
    assert manifest["records"] == 2 and manifest["first_received"] is not None  # its index, under the plain name
