"""Request smuggling and malformed framing: 400, connection closed, nothing stored."""

from __future__ import annotations

import pytest

from conftest import ServerProcess, read_until_close, status_of

RECORD = b'{"smuggled":"record"}\n'
# A second request hidden behind the first: if it were ever parsed, it would store a record.
FOLLOWER = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD)

SHAPES = {
    "content-length-and-chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunked-and-content-length": b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n"
                                  b"%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "differing-content-lengths": b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n%s" % (len(RECORD), RECORD),
    "differing-in-one-field": b"Content-Length: %d, 3\r\n\r\n%s" % (len(RECORD), RECORD),
    "negative-length": b"Content-Length: -%d\r\n\r\n%s" % (len(RECORD), RECORD),
    "plus-sign-length": b"Content-Length: +%d\r\n\r\n%s" % (len(RECORD), RECORD),
    "hex-length": b"Content-Length: 0x%x\r\n\r\n%s" % (len(RECORD), RECORD),
    "non-numeric-length": b"Content-Length: abc\r\n\r\n%s" % RECORD,
    "empty-length": b"Content-Length: \r\n\r\n%s" % RECORD,
    "huge-length": b"Content-Length: 99999999999999999999999\r\n\r\n%s" % RECORD,
    "gzip-then-chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunked-twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunked-list": b"Transfer-Encoding: chunked, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "xchunked": b"Transfer-Encoding: xchunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "space-before-colon": b"Transfer-Encoding : chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "obs-fold": b"X-A: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD),
    "bare-cr-in-header": b"X-A: 1\rTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD),
    "chunk-size-not-hex": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n%s\r\n0\r\n\r\n" % RECORD,
    "chunk-size-negative": b"Transfer-Encoding: chunked\r\n\r\n-%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunk-size-0x": b"Transfer-Encoding: chunked\r\n\r\n0x%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunk-size-spaces": b"Transfer-Encoding: chunked\r\n\r\n1 6\r\n%s\r\n0\r\n\r\n" % RECORD,
    "chunk-size-too-long": b"Transfer-Encoding: chunked\r\n\r\n%s\r\n%s\r\n0\r\n\r\n" % (b"0" * 17, RECORD),
    "chunk-data-too-long": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%sXX\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunked-http-1-0": None,  # built below: chunked framing is not HTTP/1.0
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_smuggling_shape_is_400_closed_and_stores_nothing(server: ServerProcess, shape: str) -> None:
    if shape == "chunked-http-1-0":
        request = (b"POST /ds HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD))
    else:
        request = b"POST /ds HTTP/1.1\r\nHost: a\r\n" + SHAPES[shape]
    with server.tls_connect() as sock:
        sock.sendall(request + FOLLOWER)
        response = read_until_close(sock)
    assert status_of(response) == 400
    assert response.count(b"HTTP/1.1 ") == 1, "a second answer means the hidden request was served"
    assert b"Connection: close" in response
    assert server.stored_bytes() == b""
    server.wait_for_log(r"POST /ds 400|- - 400")


def test_identical_repeated_content_length_is_accepted(server: ServerProcess) -> None:
    request = b"POST /ds HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" \
              % (len(RECORD), len(RECORD), RECORD)
    assert status_of(server.exchange(request)) == 200
    assert server.stored_bytes() == RECORD


def test_pipelined_requests_are_answered_in_order(server: ServerProcess) -> None:
    first = b"POST /ds HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n1\n"
    second = b"POST /ds HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n2\n\r\n0\r\n\r\n"
    third = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    response = server.exchange(first + second + third)
    assert response.count(b"HTTP/1.1 200 OK") == 3
    assert server.stored_bytes() == b"1\n2\n"
