"""The protocols' state tables (claims, batches, lead, runs), walked in-process: every transition each table allows
is made by the real code, and nothing else is."""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Set, Tuple

import pytest

import dsreceiver
from conftest import HeldSync, die, open_storage, wait_until
from dsreceiver import (BATCH_PROTOCOL, CLAIM_PROTOCOL, LEAD_PROTOCOL, RUN_PROTOCOL, BatchEvent, ClaimEvent, ClaimState,
                        Lead, LeadEvent, Stored)

Move = Tuple[str, Any, Any]
TABLES: Dict[str, Dict[Tuple[Any, Any], Any]] = {"claim": CLAIM_PROTOCOL, "batch": BATCH_PROTOCOL,
                                                "lead": LEAD_PROTOCOL, "run": RUN_PROTOCOL}


def record_moves(monkeypatch: pytest.MonkeyPatch) -> Set[Move]:
    """Records every move the code makes through dsreceiver.advance, by table."""
    moves: Set[Move] = set()
    real = dsreceiver.advance
    names = {id(table): name for name, table in TABLES.items()}

    def advance(table: Dict[Any, Any], state: Any, event: Any) -> Any:
        moved = real(table, state, event)
        moves.add((names[id(table)], state, event))
        return moved

    monkeypatch.setattr(dsreceiver, "advance", advance)
    return moves


def digest_batch(storage: dsreceiver.Storage, record: bytes) -> dsreceiver.RecordBatch:
    return dsreceiver.BatchBuilder(storage.layout.spool_dir, digest=True).feed_whole(record + b"\n")


class FailingSync:
    """os.fdatasync failing (EIO) for the next `count` calls: a disk error during a group commit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failures = 0
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EIO, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)


class WatchedMemory(dsreceiver.DedupeMemory):
    """A DedupeMemory that counts the pushes that began waiting for another request's outcome."""

    def __init__(self, window: float) -> None:
        super().__init__(window)
        self.waits = 0

    def wait_for_holder(self, key: str) -> ClaimState:
        with self.state:
            self.waits += 1
        return super().wait_for_holder(key)


def in_thread(target: Callable[[], Any], results: List[Any]) -> threading.Thread:
    def run() -> None:
        try:
            results.append(target())
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_every_transition_of_every_table_is_walked_by_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moves = record_moves(monkeypatch)
    failing = FailingSync(monkeypatch)
    layout = dsreceiver.Layout(tmp_path / "out")
    dsreceiver.prepare_output(layout, 0)
    memory = WatchedMemory(900)
    storage = dsreceiver.Storage(layout, dedupe=memory)

    # A new batch: claim granted, written, committed.  The same again: a retry (a duplicate), or, when its records
    # may be genuine, kept and written again.
    first = digest_batch(storage, b"first")
    assert storage.store("", first).path is not None
    assert storage.store("", digest_batch(storage, b"first")).path is None
    assert storage.store("", digest_batch(storage, b"first"), is_unique=lambda: False).kept_duplicate

    # A check that raises on what the records hold: that batch alone is refused.
    def unreadable() -> bool:
        raise RecursionError("maximum recursion depth exceeded")

    with pytest.raises(dsreceiver.BatchRefused):
        storage.store("", digest_batch(storage, b"first"), is_unique=unreadable)

    # The disk fails the group: a granted claim is released, and a kept duplicate fails as well.
    failing.failures = 1
    with pytest.raises(dsreceiver.StorageError):
        storage.store("", digest_batch(storage, b"lost to the disk"))
    failing.failures = 1
    with pytest.raises(dsreceiver.StorageError):
        storage.store("", digest_batch(storage, b"first"), is_unique=lambda: False)

    # Another request holds a key: the push waits, then learns the holder committed (a duplicate)...
    held = digest_batch(storage, b"held elsewhere")
    key = dsreceiver.dedupe_key("", held.digest or b"")
    assert memory.try_claim(key) is ClaimState.GRANTED
    results: List[Any] = []
    waiter = in_thread(lambda: storage.store("", held), results)
    wait_until(lambda: memory.waits == 1, what="the push waiting for the holder")
    memory.commit(key, time.time())
    waiter.join(30)
    assert [result.path for result in results] == [None]

    # ... or released it: one waiter is granted it, the other waits again, for that one, then finds it stored.
    released = digest_batch(storage, b"released elsewhere")
    key = dsreceiver.dedupe_key("", released.digest or b"")
    assert memory.try_claim(key) is ClaimState.GRANTED
    results = []
    waiters = [in_thread(lambda: storage.store("", digest_batch(storage, b"released elsewhere")), results)
               for _ in range(2)]
    wait_until(lambda: memory.waits == 3, what="both pushes waiting for the holder")
    memory.release(key)
    for thread in waiters:
        thread.join(30)
    assert sorted(result.path is None for result in results) == [False, True]

    # Without a dedupe window: no key.  And the lead: held in fdatasync, others queue behind the leader and get the
    # lead handed on.
    plain = open_storage(tmp_path / "plain")
    plain.store("", digest_batch(plain, b"opens the file"))
    [data_file] = plain.files.values()
    held_sync = HeldSync(monkeypatch)
    results = []
    leader = in_thread(lambda: plain.store("", digest_batch(plain, b"leader")), results)
    held_sync.wait_started()
    followers = [in_thread(functools.partial(plain.store, "", digest_batch(plain, b"follower %d" % i)), results)
                 for i in range(3)]
    wait_until(lambda: len(data_file.queue) == 3, what="three pushes queued behind the leader")
    held_sync.release()
    for thread in [leader, *followers]:
        thread.join(30)
    assert all(isinstance(result, dsreceiver.StoreResult) for result in results)
    plain.close()
    storage.close()

    # Runs: one that died is recovered once, then adopted; one that stopped cleanly is adopted as it is.
    dead = dsreceiver.Storage(layout.for_worker(".w1"))
    left = dead.store("", digest_batch(dead, b"left by a run that died")).path
    die(dead)
    assert dsreceiver.recover_ended_runs(layout) == [left]
    housekeeper = dsreceiver.Housekeeper(layout)
    housekeeper.adopt_ended_runs()
    assert len(housekeeper.to_finish) == 2 and layout.run_names() == [housekeeper.journal.name]
    housekeeper.stop()

    expected = {(name, state, event) for name, table in TABLES.items() for state, event in table}
    assert expected - moves == set(), "transitions never made"
    assert moves - expected == set(), "moves outside the tables"


def test_a_move_the_table_does_not_allow_raises() -> None:
    with pytest.raises(dsreceiver.ProtocolError):
        dsreceiver.advance(CLAIM_PROTOCOL, ClaimState.COMMITTED, ClaimEvent.BATCH_DURABLE)
    with pytest.raises(dsreceiver.ProtocolError):
        dsreceiver.advance(BATCH_PROTOCOL, Stored.WRITTEN, BatchEvent.GROUP_FAILED)
    with pytest.raises(dsreceiver.ProtocolError):
        dsreceiver.advance(LEAD_PROTOCOL, Lead.IDLE, LeadEvent.DONE)


def test_the_final_states_are_the_ones_a_push_is_woken_with() -> None:
    final: Set[Stored] = {state for (_, _), state in BATCH_PROTOCOL.items()} - {
        state for (state, _) in BATCH_PROTOCOL}
    assert final == {Stored.WRITTEN, Stored.KEPT_DUPLICATE, Stored.DUPLICATE, Stored.DEFERRED, Stored.REFUSED,
                     Stored.FAILED}
