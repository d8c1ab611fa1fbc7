"""Pushes as DataStream sends them: formats, encodings, framings, probes, answers, access log."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from conftest import ServerProcess, push_concurrently, push_held_after_continue, status_of
from simulator import count_lines, expected_lines, make_batch


def test_json_push_is_stored_byte_for_byte(server: ServerProcess) -> None:
    batch = make_batch("json", count=1000)
    with server.simulator() as ds:
        response = ds.push(batch)
    assert response.status == 200
    assert server.stored_bytes() == batch.body


def test_structured_push_is_stored_byte_for_byte(server: ServerProcess) -> None:
    batch = make_batch("structured", count=500, fmt="structured")
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    assert server.stored_bytes() == batch.body


@pytest.mark.parametrize("declared", [True, False], ids=["content-encoding", "magic-bytes"])
def test_gzip_body_is_decoded(server: ServerProcess, declared: bool) -> None:
    batch = make_batch("gz", count=2000, compress=True, declare_gzip=declared)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    assert server.stored_lines() == batch.lines


def test_multi_member_gzip_is_read_whole(server: ServerProcess) -> None:
    first, second = make_batch("m1", count=300), make_batch("m2", count=300)
    body = gzip.compress(first.body) + gzip.compress(second.body)
    with server.simulator() as ds:
        assert ds.request("POST", body, {"Content-Encoding": "gzip"}).status == 200
    assert server.stored_lines() == first.lines + second.lines


@pytest.mark.parametrize("compress", [False, True])
def test_chunked_body_is_read(server: ServerProcess, compress: bool) -> None:
    batch = make_batch("chunked", count=3000, compress=compress)
    with server.simulator() as ds:
        assert ds.push(batch, chunked=True).status == 200
    assert server.stored_lines() == batch.lines


def test_expect_100_continue_gets_interim_answer_before_body(server: ServerProcess) -> None:
    batch = make_batch("expect", count=200)
    with push_held_after_continue(server, len(batch.body)) as sock:
        sock.sendall(batch.body)
        final = sock.recv(65536)
    assert status_of(final) == 200
    assert server.stored_lines() == batch.lines


def test_crlf_blank_lines_and_missing_final_newline_are_normalized(server: ServerProcess) -> None:
    body = b"\r\n{\"a\":\"1\"}\r\n\r\n\n{\"b\":\"2\"}\n  x  \r\n{\"c\":\"3\"}"
    with server.simulator() as ds:
        response = ds.request("POST", body)
    assert response.status == 200
    assert server.stored_bytes() == b'{"a":"1"}\n{"b":"2"}\n  x  \n{"c":"3"}\n'
    assert response.body == b"stored 4 records\n"


def test_records_keep_arbitrary_bytes(server: ServerProcess) -> None:
    body = b"4 61234 caf\xc3\xa9 \xff\xfe\ttab\n{\"u\":\"\\u00e9\\n\"}\n"
    with server.simulator() as ds:
        assert ds.request("POST", body).status == 200
    assert server.stored_bytes() == body


def test_json_array_body_is_stored_one_element_per_line(server: ServerProcess) -> None:
    records = [{"version": 1, "cp": "123", "reqPath": "a b"}, {"version": 1, "cp": "456", "UA": "é"}]
    body = json.dumps(records, indent=2).encode()
    with server.simulator() as ds:
        assert ds.request("POST", body).status == 200
    stored = server.stored_lines()
    assert [json.loads(line) for line in stored] == records
    assert len(stored) == 2


@pytest.mark.parametrize("fmt", ["json", "structured"])
@pytest.mark.parametrize("compress", [False, True])
def test_validation_probe_answers_200_and_is_not_stored(server: ServerProcess, fmt: str, compress: bool) -> None:
    probe = b'{"access_validation":true}' if fmt == "json" else b"0,access_validation"
    with server.simulator() as ds:
        response = ds.request("POST", gzip.compress(probe) if compress else probe,
                              {"Content-Encoding": "gzip"} if compress else {})
        assert response.status == 200
        assert ds.push(make_batch("after-probe", count=3)).status == 200
    server.wait_for_log(r"POST /datastream 200 .*validation probe")
    assert len(server.stored_lines()) == 3
    assert b"access_validation" not in server.stored_bytes()


def test_put_is_a_push_too(server: ServerProcess) -> None:
    batch = make_batch("put", count=10)
    with server.simulator() as ds:
        assert ds.request("PUT", batch.body).status == 200
    assert server.stored_lines() == batch.lines


@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
def test_other_methods_get_405_with_allow(server: ServerProcess, method: str) -> None:
    with server.simulator() as ds:
        response = ds.request(method, path="/datastream")
    assert response.status == 405
    # OPTIONS is the liveness probe of Akamai's Unified Log Streamer (tests/test_uls.py).
    assert response.headers["allow"] == "POST, PUT, OPTIONS"
    assert server.data_files() == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_healthz(server: ServerProcess, method: str) -> None:
    with server.simulator() as ds:
        response = ds.request(method, path="/healthz")
    assert response.status == 200
    assert response.body == (b"ok\n" if method == "GET" else b"")


def test_keep_alive_serves_many_requests_on_one_connection(server: ServerProcess) -> None:
    batches = [make_batch("ka%d" % i, count=20) for i in range(5)]
    with server.simulator() as ds:
        for batch in batches:
            assert ds.push(batch).status == 200
        assert ds.connection is not None
        sock = ds.connection.sock
        assert ds.request("GET", path="/healthz").status == 200
        assert ds.connection is not None and ds.connection.sock is sock
    assert server.stored_lines() == expected_lines(batches)


def test_corrupt_gzip_is_400_and_stores_nothing(server: ServerProcess) -> None:
    compressed = bytearray(gzip.compress(make_batch("bad", count=500).body))
    compressed[len(compressed) // 2] ^= 0xFF
    with server.simulator() as ds:
        assert ds.request("POST", bytes(compressed), {"Content-Encoding": "gzip"}).status == 400
        assert ds.request("POST", bytes(compressed[:-20]), {"Content-Encoding": "gzip"}).status == 400
        assert ds.request("POST", b"not gzip at all\n", {"Content-Encoding": "gzip"}).status == 400
        refusals = json.loads(ds.request("GET", path="/status.json").body)["refusals"]
    # Each is recorded with its reason; the log shows the first (one refusal line per client a second).
    assert [(r["status"], "gzip" in r["reason"]) for r in refusals] == [(400, True)] * 3
    server.wait_for_log(r"POST /datastream 400 .*gzip")
    assert server.stored_bytes() == b""


def test_concurrent_pushers_store_every_line_once_and_whole(server: ServerProcess) -> None:
    batches = [make_batch("p%02d" % i, count=400, fmt="json" if i % 2 else "structured", compress=i % 3 == 0)
               for i in range(32)]
    assert push_concurrently(server, batches, chunked_every=4) == [200] * 32
    stored = server.stored_lines()
    assert count_lines(stored) == count_lines(expected_lines(batches))
    # One request's records stay contiguous: each batch appears as one unbroken run.
    position = {line: index for index, line in enumerate(stored)}
    for batch in batches:
        first = position[batch.lines[0]]
        assert stored[first:first + len(batch.lines)] == batch.lines


def test_access_log_line_has_the_request_facts(server: ServerProcess) -> None:
    batch = make_batch("log", count=7, compress=True)
    with server.simulator() as ds:
        assert ds.push(batch, path="/streams/one").status == 200
    line = server.wait_for_log(r".*access .*POST /streams/one.*").group(0)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO access 127\.0\.0\.1 POST /streams/one 200 "
                    r"bytes=%d records=7 ms=\d+\.\d$" % len(batch.body), line), line


def test_malformed_request_line_is_400(server: ServerProcess) -> None:
    response = server.exchange(b"POST  /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(response) == 400
    assert b"Traceback" not in response
