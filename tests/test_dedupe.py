"""Retry dedup: a batch re-sent within --dedupe-window is answered 200 and stored once, even across restarts."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable

import dsreceiver
from conftest import ROOT, ServerProcess, push_concurrently
from simulator import make_batch


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
    index = dsreceiver.DedupeIndex(900, clock=lambda: now[0])
    assert index.claim("k")
    index.commit("k", now[0])
    assert not index.claim("k")
    now[0] += 901
    assert index.claim("k")
    index.release("k")
    reloaded = dsreceiver.DedupeIndex(900, clock=lambda: now[0])
    reloaded.load([(now[0] - 901, "k"), (now[0] - 10, "recent")])
    assert reloaded.claim("k")  # expired entries are not brought back
    assert not reloaded.claim("recent")


def test_failed_store_releases_the_claim_so_the_retry_is_stored() -> None:
    index = dsreceiver.DedupeIndex(900)
    assert index.claim("batch")
    index.release("batch")  # storage failed: the retry must not be taken for a duplicate
    assert index.claim("batch")


FAIL_FIRST_APPEND = """\
import sys
sys.path.insert(0, {root!r})
import dsreceiver

real_append = dsreceiver.DataFile.append
calls = []


def append_failing_once(self, batch, stamp):
    calls.append(1)
    if len(calls) == 1:
        raise RuntimeError("unexpected failure while storing")
    return real_append(self, batch, stamp)


dsreceiver.DataFile.append = append_failing_once
sys.exit(dsreceiver.main())
"""


def test_unexpected_storage_failure_does_not_block_the_resend(start_server: Callable[..., ServerProcess],
                                                              tmp_path: Path) -> None:
    wrapper = tmp_path / "failing_once.py"
    wrapper.write_text(FAIL_FIRST_APPEND.format(root=str(ROOT)))
    server = start_server(script=wrapper)
    batch = make_batch("resent-after-500", count=20)
    with server.simulator(timeout=20) as ds:
        assert ds.push(batch).status == 500
    with server.simulator(timeout=20) as ds:
        assert ds.push(batch).status == 200  # a claim left pending would make this wait forever
    assert server.stored_lines() == batch.lines
