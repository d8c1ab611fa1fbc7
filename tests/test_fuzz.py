"""Fuzz targets for request parsing and body decoding (hypothesis).

The suite runs each target briefly; `make fuzz` runs them with FUZZ_EXAMPLES=50000.
Inputs that ever broke a target are kept below as @example regressions.
"""

from __future__ import annotations

import gzip
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dsreceiver

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEADISH = st.lists(st.sampled_from([b"POST", b" ", b"/ds", b"HTTP/1.1", b"\r\n", b"\n", b":", b"Content-Length",
                                    b"Transfer-Encoding", b"chunked", b"0", b"5", b"\r", b"\t", b"\x00", b"a", b",",
                                    b"Expect", b"100-continue", b"\xff", b"HTTP/1.0", b"GET", b"-1", b"ff"]),
                   max_size=40).map(b"".join)


@FUZZ
@given(head=HEADISH | st.binary(max_size=300))
@example(head=b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n")
@example(head=b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0")
def test_request_head_parsing_only_ever_raises_http_errors(head: bytes) -> None:
    try:
        request = dsreceiver.parse_request_head(head)
        framing = dsreceiver.body_framing(request)
    except dsreceiver.HTTPError as exc:
        assert 400 <= exc.status < 600
        return
    assert request.path.startswith("/")
    assert framing is None or framing == "chunked" or isinstance(framing, int) and framing >= 0


@FUZZ
@given(stream=(HEADISH | st.binary(max_size=200)).flatmap(lambda head: st.tuples(
    st.just(head), st.binary(max_size=200))))
@example(stream=(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nabc"))
def test_reading_a_request_from_a_socket_only_ends_in_expected_ways(stream: Tuple[bytes, bytes]) -> None:
    head, body = stream
    left, right = socket.socketpair()
    try:
        left.sendall(head + b"\r\n\r\n" + body)
        left.shutdown(socket.SHUT_WR)
        reader = dsreceiver.ClientReader(right)
        deadline = time.monotonic() + 5
        try:
            if not reader.wait_for_request(deadline):
                return
            request = dsreceiver.parse_request_head(reader.read_head(deadline))
            framing = dsreceiver.body_framing(request)
            pace = dsreceiver.BodyPace(deadline, 4096, lambda size: None)
            if framing == "chunked":
                reader.read_chunked(4096, pace)
            elif isinstance(framing, int) and framing <= 4096:
                assert len(reader.read_exact(framing, pace)) == framing
        except (dsreceiver.HTTPError, dsreceiver.ClientGone):
            pass
    finally:
        left.close()
        right.close()


CHUNKISH = st.lists(st.sampled_from([b"0", b"5", b"a", b"F", b"10", b"\r\n", b"\n", b"\r", b";", b"=", b'"', b"x",
                                     b" ", b"\t", b"hello", b"\\", b"X-T: v", b":"]), max_size=30).map(b"".join)


@FUZZ
@given(data=CHUNKISH | st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=6))
@example(data=b"5\r\nhello\r\n0\r\n\r\n", cuts=[1, 4, 12])
def test_chunked_decoding_does_not_depend_on_how_the_bytes_arrive(data: bytes, cuts: List[int]) -> None:
    """Fed whole or in pieces, the decoder ends in the same state: the same body and leftover, or the same refusal."""
    outcomes: List[object] = []
    for pieces in ([len(data)], sorted(set(cuts)) + [len(data)]):
        decoder = dsreceiver.ChunkedDecoder(1 << 10)
        buffer = bytearray()
        start = 0
        try:
            for cut in pieces:
                buffer += data[start:cut]
                start = max(start, cut)
                del buffer[:decoder.feed(buffer)]
            outcomes.append((decoder.done, bytes(decoder.body) if decoder.done else None, bytes(buffer)))
        except dsreceiver.HTTPError as exc:
            assert exc.status in (400, 413, 431) and exc.close
            outcomes.append(("refused", exc.status))
    whole, pieced = outcomes
    assert pieced == whole


def mutated_gzip(data: st.DataObject) -> bytes:
    body = data.draw(st.binary(max_size=500))
    compressed = bytearray(gzip.compress(body) * data.draw(st.integers(1, 2)))
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(compressed) - 1))
        compressed[position] = data.draw(st.integers(0, 255))
    return bytes(compressed[:data.draw(st.integers(0, len(compressed)))])


@FUZZ
@given(data=st.data())
def test_body_decoding_only_ever_raises_body_errors(data: st.DataObject) -> None:
    decode_and_check(mutated_gzip(data))


def test_body_decoding_regressions() -> None:
    for raw in (b"\x1f\x8b\x08\x00", b"\x1f\x8b", gzip.compress(b"a\r") + b"\0\0", gzip.compress(b"") * 3):
        decode_and_check(raw)


def decode_and_check(raw: bytes) -> None:
    """Decodes like the server; only BodyError may escape, and a decoded batch keeps the record invariants."""
    builder = dsreceiver.BatchBuilder(Path(tempfile.gettempdir()), digest=True)
    try:
        for chunk in dsreceiver.Gunzip(raw, 1 << 16):
            builder.feed(chunk)
    except dsreceiver.BodyError:
        return
    batch = builder.finish()
    stored = b"".join(batch.parts)
    batch.close()
    assert batch.records == stored.count(b"\n") and (not stored or stored.endswith(b"\n"))
    assert b"\n\n" not in stored and not stored.startswith(b"\n")
