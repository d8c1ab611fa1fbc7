"""Retry dedup: a retry within --dedupe-window is stored once, even across restarts; a genuine batch is never dropped."""

from __future__ import annotations

import gzip
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest

import dsreceiver
from conftest import ROOT, HeldSync, ServerProcess, open_storage, push_concurrently, scrape, value, wait_until
from simulator import batch_of_lines, make_batch, sample_lines


def test_same_batch_twice_is_stored_once(server: ServerProcess) -> None:
    batch = make_batch("retry", count=50)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
        again = ds.push(batch)
        assert again.status == 200 and again.body == b"already stored 50 records\n"
    assert server.stored_lines() == batch.lines
    server.wait_for_log(r"POST /datastream 200 .*\(duplicate")


def test_gzip_and_plain_copies_of_a_batch_are_the_same_batch(server: ServerProcess) -> None:
    batch = make_batch("encodings", count=40)
    with server.simulator() as ds:
        assert ds.request("POST", gzip.compress(batch.body), {"Content-Encoding": "gzip"}).status == 200
        assert ds.request("POST", batch.body).status == 200
        assert ds.request("POST", batch.body, chunked=True).status == 200
    assert server.stored_lines() == batch.lines


def test_dedupe_survives_a_restart(start_server: Callable[..., ServerProcess]) -> None:
    batch = make_batch("restart", count=30)
    server = start_server()
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    assert server.stop() == 0
    server.start()
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    assert server.stored_lines() == batch.lines


def test_same_batch_on_another_path_is_not_a_duplicate(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--route-by-path")
    batch = make_batch("two-streams", count=5)
    with server.simulator() as ds:
        assert ds.push(batch, path="/a").status == 200
        assert ds.push(batch, path="/b").status == 200
    assert server.stored_lines(server.output_dir / "a") == server.stored_lines(server.output_dir / "b") == batch.lines


def test_window_zero_turns_dedupe_off(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--dedupe-window", "0")
    batch = make_batch("no-dedupe", count=5)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
        assert ds.push(batch).status == 200
    assert server.stored_lines() == batch.lines * 2


def test_concurrent_copies_store_once(server: ServerProcess) -> None:
    batch = make_batch("racing-retries", count=2000)
    assert push_concurrently(server, [batch] * 8) == [200] * 8
    assert server.stored_lines() == batch.lines


def test_entries_expire_after_the_window() -> None:
    now = [1764201600.0]
    memory = dsreceiver.DedupeMemory(900, clock=lambda: now[0])
    assert memory.claim("k") is dsreceiver.ClaimState.GRANTED
    memory.commit("k", now[0])
    assert memory.claim("k") is dsreceiver.ClaimState.DUPLICATE
    now[0] += 901
    assert memory.claim("k") is dsreceiver.ClaimState.GRANTED
    memory.release("k")
    reloaded = dsreceiver.DedupeMemory(900, clock=lambda: now[0])
    reloaded.load([(now[0] - 901, "k"), (now[0] - 10, "recent")])
    assert reloaded.claim("k") is dsreceiver.ClaimState.GRANTED  # expired entries are not brought back
    assert reloaded.claim("recent") is dsreceiver.ClaimState.DUPLICATE


def test_failed_store_releases_the_claim_so_the_retry_is_stored() -> None:
    memory = dsreceiver.DedupeMemory(900)
    assert memory.claim("batch") is dsreceiver.ClaimState.GRANTED
    memory.release("batch")  # storage failed: the retry must not be taken for a duplicate
    assert memory.claim("batch") is dsreceiver.ClaimState.GRANTED


FAIL_FIRST_APPEND = """\
import sys
sys.path.insert(0, {root!r})
import dsreceiver

real_append = dsreceiver.DataFile.append
calls = []


def append_failing_once(self, *arguments):
    calls.append(1)
    if len(calls) == 1:
        raise RuntimeError("unexpected failure while storing")
    return real_append(self, *arguments)


dsreceiver.DataFile.append = append_failing_once
sys.exit(dsreceiver.main())
"""


def test_unexpected_storage_failure_does_not_block_the_resend(start_server: Callable[..., ServerProcess],
                                                              tmp_path: Path) -> None:
    wrapper = tmp_path / "failing_once.py"
    wrapper.write_text(FAIL_FIRST_APPEND.format(root=str(ROOT)))
    server = start_server(script=wrapper)
    batch = make_batch("resent-after-503", count=20)
    with server.simulator(timeout=20) as ds:
        assert ds.push(batch).status == 503  # an unexpected error while storing: a retry may succeed
    with server.simulator(timeout=20) as ds:
        assert ds.push(batch).status == 200  # a claim left pending would make this wait forever
    assert server.stored_lines() == batch.lines


LOW_CARDINALITY = {
    "json": b'{"version":"4","streamId":"61234","statusCode":"200","cacheStatus":"1"}',
    "structured": b"4 61234 200 1",
}


@pytest.mark.parametrize("fmt", ["json", "structured"])
def test_identical_low_cardinality_batches_from_two_uploaders_are_both_stored(
        server: ServerProcess, fmt: str) -> None:
    batch = batch_of_lines([LOW_CARDINALITY[fmt]])
    for address in ("127.0.0.2", "127.0.0.3"):
        with server.simulator(source_address=address) as ds:
            response = ds.push(batch)
            assert response.status == 200 and response.body == b"stored 1 records\n"
    assert server.stored_lines() == batch.lines * 2
    samples = scrape(server)
    # The second matched the first in the window and was stored anyway, counted: the case dedup must not drop.
    assert value(samples, "dsreceiver_dedupe_ineligible_total") == 1
    assert value(samples, "dsreceiver_dedupe_hits_total") == 0


def test_the_same_low_cardinality_batch_a_second_later_is_stored_again(server: ServerProcess) -> None:
    batch = batch_of_lines([LOW_CARDINALITY["json"]])
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
        time.sleep(1.0)  # the scenario itself: the same single record from the same uploader a second later
        assert ds.push(batch).body == b"stored 1 records\n"
    assert server.stored_lines() == batch.lines * 2


def test_records_without_millisecond_times_or_request_ids_are_not_deduplicated(server: ServerProcess) -> None:
    seconds_only = batch_of_lines([b'{"version":"4","streamId":"61234","reqTimeSec":"1764200000","cp":"1"}',
                                   b"4 61234 1764200000 1"])
    with server.simulator() as ds:
        assert ds.push(seconds_only).status == 200
        assert ds.push(seconds_only).status == 200
    assert server.stored_lines() == seconds_only.lines * 2


@pytest.mark.parametrize("fmt", ["json", "structured"])
def test_a_realistic_batch_resent_from_another_uploader_is_stored_once(server: ServerProcess, fmt: str) -> None:
    batch = batch_of_lines(sample_lines(fmt)[:200], compress=True)
    with server.simulator(source_address="127.0.0.2") as ds:
        assert ds.push(batch).status == 200
        assert ds.push(batch).body == b"already stored 200 records\n"
    with server.simulator(source_address="127.0.0.3") as ds:
        assert ds.push(batch).body == b"already stored 200 records\n"
    assert server.stored_lines() == batch.lines


@pytest.mark.parametrize("fmt", ["json", "structured"])
def test_a_realistic_batch_resent_after_a_sigkill_is_stored_once(start_server: Callable[..., ServerProcess],
                                                                fmt: str) -> None:
    server = start_server("--workers", "2")
    batch = batch_of_lines(sample_lines(fmt)[200:400])
    with server.simulator(source_address="127.0.0.2") as ds:
        assert ds.push(batch).status == 200
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.wait_exit()
    server.start()
    with server.simulator(source_address="127.0.0.3") as ds:
        assert ds.push(batch).body == b"already stored 200 records\n"
    assert server.stored_lines() == batch.lines


def test_uniqueness_rule_in_process() -> None:
    def unique(*lines: bytes) -> bool:
        builder = dsreceiver.BatchBuilder(Path("/tmp"), digest=True)
        batch = builder.feed_whole(b"\n".join(lines) + b"\n")
        return dsreceiver.StreamCatalog(None, False).classify(batch).is_unique()

    assert unique(b'{"reqId":"a1"}', b'{"x":"1","reqId":"b2"}')
    assert not unique(b'{"reqId":"a1"}', b'{"x":"1"}')  # one record without an identity spoils the batch
    assert unique(b'{"reqTimeSec":"1764200000.507"}', b'{"reqTimeSec":"1764200000.508","a":"b"}')
    assert not unique(b'{"reqTimeSec":"1764200000.5"}')
    assert unique(b"4 61234 1 1764200000.507 x", b"4 61234 2 1764200001.000")
    assert not unique(b"4 61234 1 1764200000.507 x", b"4 61234 2 1764200001")


def digest_batch(storage: dsreceiver.Storage, record: bytes) -> dsreceiver.RecordBatch:
    return dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(record + b"\n")


def test_the_same_batch_twice_in_one_group_commit_is_stored_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(tmp_path / "out", dedupe_window=900)
    storage.store("", digest_batch(storage, b"first"))
    [data_file] = storage.files.values()
    held_sync = HeldSync(monkeypatch)
    results: List[dsreceiver.StoreResult] = []
    batches = [digest_batch(storage, record) for record in (b"blocker", b"twin", b"twin")]
    threads = [threading.Thread(target=lambda batch=batch: results.append(storage.store("", batch)))
               for batch in batches]
    threads[0].start()
    held_sync.wait_started()
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(data_file.queue) == 2, what="both copies queued behind the sync")
    held_sync.release()
    for thread in threads:
        thread.join()
    storage.close()
    assert sorted(result.path is None for result in results) == [False, False, True]  # one copy: a retry
    assert data_file.path.read_bytes() == b"first\nblocker\ntwin\n"


class WatchedMemory(dsreceiver.DedupeMemory):
    """A DedupeMemory that tells when a push waits for another request's outcome (DedupeMemory.claim)."""

    def __init__(self, window: float) -> None:
        super().__init__(window)
        self.waiting = threading.Event()

    def wait_for_holder(self, key: str) -> dsreceiver.ClaimState:
        self.waiting.set()
        return super().wait_for_holder(key)


@pytest.mark.parametrize("outcome", ["stored", "failed"])
def test_a_batch_another_request_is_storing_waits_without_holding_up_its_group(tmp_path: Path, outcome: str) -> None:
    layout = dsreceiver.Layout(tmp_path / "out")
    layout.create()
    memory = WatchedMemory(900)
    storage = dsreceiver.Storage(layout, dedupe=memory)
    retry = digest_batch(storage, b"being stored elsewhere")
    key = dsreceiver.dedupe_key("", retry.digest or b"")
    assert memory.try_claim(key) is dsreceiver.ClaimState.GRANTED  # another worker holds the claim, committing
    results: List[dsreceiver.StoreResult] = []
    waiter = threading.Thread(target=lambda: results.append(storage.store("", retry)))
    waiter.start()
    memory.waiting.wait(30)
    # Meanwhile other batches of the same file are committed: nothing waits while holding claims.
    assert storage.store("", digest_batch(storage, b"unrelated")).path is not None
    if outcome == "stored":
        memory.commit(key, time.time())
    else:
        memory.release(key)
    waiter.join(30)
    storage.close()
    [data_file] = layout.data_files()
    if outcome == "stored":
        assert results == [dsreceiver.StoreResult(None)]  # a duplicate of what the other stored
        assert data_file[0].read_bytes() == b"unrelated\n"
    else:
        assert results[0].path is not None  # the other failed: this one stores it
        assert data_file[0].read_bytes() == b"unrelated\nbeing stored elsewhere\n"


def test_a_group_commits_its_other_batches_while_one_of_them_waits(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No group holds claims while it waits for another's: two workers' groups could wait on each other."""
    layout = dsreceiver.Layout(tmp_path / "out")
    layout.create()
    memory = WatchedMemory(900)
    storage = dsreceiver.Storage(layout, dedupe=memory)
    storage.store("", digest_batch(storage, b"opens the file"))
    [data_file] = storage.files.values()
    held = digest_batch(storage, b"held elsewhere")
    key = dsreceiver.dedupe_key("", held.digest or b"")
    assert memory.try_claim(key) is dsreceiver.ClaimState.GRANTED
    held_sync = HeldSync(monkeypatch)
    results: Dict[bytes, dsreceiver.StoreResult] = {}
    batches = {b"blocker": digest_batch(storage, b"blocker"), b"fresh": digest_batch(storage, b"fresh"),
               b"held": held}
    threads = {name: threading.Thread(target=lambda name=name: results.update({name: storage.store("", batches[name])}))
               for name in batches}
    threads[b"blocker"].start()
    held_sync.wait_started()
    threads[b"fresh"].start()
    threads[b"held"].start()
    wait_until(lambda: len(data_file.queue) == 2, what="fresh and held queued in one group")
    held_sync.release()
    memory.waiting.wait(30)
    wait_until(lambda: b"fresh" in results, what="the fresh batch committed while the held one waits")
    fresh_key = dsreceiver.dedupe_key("", batches[b"fresh"].digest or b"")
    assert memory.try_claim(fresh_key) is dsreceiver.ClaimState.DUPLICATE  # committed
    memory.commit(key, time.time())
    for thread in threads.values():
        thread.join(30)
    storage.close()
    assert results[b"held"] == dsreceiver.StoreResult(None)
    assert data_file.path.read_bytes() == b"opens the file\nblocker\nfresh\n"


def test_a_copy_that_waited_and_a_new_copy_in_one_group_are_stored_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layout = dsreceiver.Layout(tmp_path / "out")
    layout.create()
    memory = WatchedMemory(900)
    storage = dsreceiver.Storage(layout, dedupe=memory)
    storage.store("", digest_batch(storage, b"opens the file"))
    [data_file] = storage.files.values()
    copies = [digest_batch(storage, b"sent three times") for _ in range(2)]
    key = dsreceiver.dedupe_key("", copies[0].digest or b"")
    assert memory.try_claim(key) is dsreceiver.ClaimState.GRANTED  # a first copy, being stored by another request
    results: List[dsreceiver.StoreResult] = []
    waited = threading.Thread(target=lambda: results.append(storage.store("", copies[0])))
    waited.start()
    memory.waiting.wait(30)
    held_sync = HeldSync(monkeypatch)
    blocker = threading.Thread(target=lambda: storage.store("", digest_batch(storage, b"blocker")))
    blocker.start()
    held_sync.wait_started()
    memory.release(key)  # the first copy failed: the waiting copy now holds the claim, and queues again
    wait_until(lambda: len(data_file.queue) == 1, what="the waiting copy queued again")
    fresh = threading.Thread(target=lambda: results.append(storage.store("", copies[1])))
    fresh.start()
    wait_until(lambda: len(data_file.queue) == 2, what="a new copy queued in the same group")
    held_sync.release()
    for thread in (waited, blocker, fresh):
        thread.join(30)
    storage.close()
    assert sorted(result.path is None for result in results) == [False, True]
    assert data_file.path.read_bytes() == b"opens the file\nblocker\nsent three times\n"


def poisoned_event() -> bytes:
    """A security-shaped record naming its request, whose JSON nests 100,000 deep: json.loads cannot read it."""
    return b'{"httpMessage":{"requestId":"poison"},"nested":' + b"[" * 100000 + b"]" * 100000 + b"}"


def test_a_poisoned_batch_fails_alone_in_its_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(tmp_path / "out", dedupe_window=900)
    poison = dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(poisoned_event() + b"\n")
    assert storage.store("", poison).path is not None  # its first push is stored like any other
    [data_file] = storage.files.values()
    held_sync = HeldSync(monkeypatch)
    results: Dict[bytes, object] = {}

    def push(record: bytes, is_unique: Callable[[], bool]) -> None:
        batch = dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(record + b"\n")
        try:
            results[record[:20]] = storage.store("", batch, is_unique=is_unique)
        except Exception as exc:  # noqa: BLE001 - what each push learns is the point
            results[record[:20]] = exc

    blocker = threading.Thread(target=push, args=(b"blocker", dsreceiver.always_unique))
    blocker.start()
    held_sync.wait_started()
    retry = dsreceiver.StreamCatalog(None, False).classify(
        dsreceiver.BatchBuilder(storage.layout.spool_dir).feed_whole(poisoned_event() + b"\n")).is_unique
    honest = [b"honest %02d" % number for number in range(10)]
    threads = [threading.Thread(target=push, args=(poisoned_event(), retry))]
    threads += [threading.Thread(target=push, args=(record, dsreceiver.always_unique)) for record in honest]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(data_file.queue) == 11, what="the poisoned retry queued in one group with 10 honest pushes")
    held_sync.release()
    for thread in [blocker, *threads]:
        thread.join(30)
    poisoned = results.pop(poisoned_event()[:20])
    assert isinstance(poisoned, dsreceiver.BatchRefused) and "nests too deeply" in str(poisoned)
    assert all(isinstance(result, dsreceiver.StoreResult) and result.path == data_file.path
               for result in results.values()), results
    storage.close()
    assert data_file.path.read_bytes() == poisoned_event() + b"\nblocker\n" + b"".join(r + b"\n" for r in honest)


def test_a_poisoned_push_among_honest_ones_is_refused_alone(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    poison = batch_of_lines([poisoned_event()])
    with server.simulator(path="/datastream?streamId=80001") as ds:
        assert ds.push(poison).status == 200
    honest = [batch_of_lines([b'{"httpMessage":{"requestId":"h%d-%d","start":"1764201500"}}' % (number, line)
                              for line in range(50)]) for number in range(40)]
    statuses: List[int] = [0] * 41
    health: List[int] = []
    stop = threading.Event()

    def push(index: int) -> None:
        with server.simulator(path="/datastream?streamId=80001") as ds:
            statuses[index] = ds.push(poison if index == 40 else honest[index]).status

    def watch_health() -> None:
        with server.simulator() as ds:
            while not stop.is_set():
                health.append(ds.request("GET", path="/healthz").status)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    pushers = [threading.Thread(target=push, args=(index,)) for index in range(41)]
    for thread in pushers:
        thread.start()
    for thread in pushers:
        thread.join(60)
    stop.set()
    watcher.join(30)
    assert statuses[:40] == [200] * 40 and statuses[40] == 400
    assert health and set(health) == {200}
    with server.simulator() as ds:
        assert ds.request("GET", path="/healthz").status == 200
    stored = server.stored_lines()
    assert len(stored) == 40 * 50 + 1 and stored.count(poisoned_event()) == 1
    assert "storage failed" not in server.log_text() and "Traceback" not in server.log_text()
    assert server.log_text().count("nests too deeply") == 1  # the refusal's one line: its access line


def test_a_retry_in_the_group_of_its_failed_original_is_never_answered_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(tmp_path / "out", dedupe_window=900)
    storage.store("", digest_batch(storage, b"opens the file"))
    [data_file] = storage.files.values()
    held_sync = HeldSync(monkeypatch)
    plan: List[str] = []  # what the next fdatasync calls do, in order; then they succeed
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if plan and plan.pop(0) == "fail":
            raise OSError(5, "Input/output error")
        real(fd)

    results: Dict[str, object] = {}

    def push(name: str, record: bytes) -> None:
        try:
            results[name] = storage.store("", digest_batch(storage, record))
        except Exception as exc:  # noqa: BLE001 - what each push learns is the point
            results[name] = exc

    blocker = threading.Thread(target=push, args=("blocker", b"blocker"))
    blocker.start()
    held_sync.wait_started()
    monkeypatch.setattr(os, "fdatasync", fdatasync)  # the held call goes on through HeldSync's own
    original = threading.Thread(target=push, args=("original", b'{"reqId":"r1"}'))
    original.start()
    wait_until(lambda: len(data_file.queue) == 1, what="the original queued")
    retry = threading.Thread(target=push, args=("retry", b'{"reqId":"r1"}'))  # its resend, in the same group
    retry.start()
    wait_until(lambda: len(data_file.queue) == 2, what="the resend queued in the same group")
    plan[:] = ["ok", "fail"]  # the blocker's index sync goes through; the next group's sync fails, once
    held_sync.release()
    for thread in (blocker, original, retry):
        thread.join(30)
    storage.close()
    assert isinstance(results["original"], dsreceiver.StorageError)
    stored = results["retry"]
    assert isinstance(stored, dsreceiver.StoreResult) and stored.path == data_file.path  # stored, not "already"
    assert data_file.path.read_bytes() == b'opens the file\nblocker\n{"reqId":"r1"}\n'
