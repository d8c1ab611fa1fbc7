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
    # RFC 9112 to the letter: CRLF only, SP/HTAB only as whitespace, no control characters, one Host.
    "bare-lf-in-head": b"Dummy: x\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD),
    "length-with-vertical-tab": b"Content-Length: %d\x0b\r\n\r\n%s" % (len(RECORD), RECORD),
    "length-with-nbsp": b"Content-Length: %d\xa0\r\n\r\n%s" % (len(RECORD), RECORD),
    "length-with-next-line": b"Content-Length: \x85%d\r\n\r\n%s" % (len(RECORD), RECORD),
    "control-char-in-value": b"X-A: 1\x01\r\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD),
    "second-host": b"Host: b\r\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD),
    "chunk-size-trailing-space": b"Transfer-Encoding: chunked\r\n\r\n%x \r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunk-size-leading-space": b"Transfer-Encoding: chunked\r\n\r\n %x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunk-empty-extension": b"Transfer-Encoding: chunked\r\n\r\n%x;\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunk-unbalanced-quote": b'Transfer-Encoding: chunked\r\n\r\n%x;a="b\r\n%s\r\n0\r\n\r\n' % (len(RECORD), RECORD),
    "chunk-size-bare-lf": b"Transfer-Encoding: chunked\r\n\r\n%x\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD),
    "chunked-http-1-0": b"",  # see request_for(): chunked framing is not HTTP/1.0
    "no-host": b"",  # see request_for(): an HTTP/1.1 request names its Host
}


def request_for(shape: str) -> bytes:
    """The whole request of a shape, with the hidden follower."""
    if shape == "chunked-http-1-0":
        request = (b"POST /ds HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(RECORD), RECORD))
    elif shape == "no-host":
        request = b"POST /ds HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(RECORD), RECORD)
    else:
        request = b"POST /ds HTTP/1.1\r\nHost: a\r\n" + SHAPES[shape]
    return request + FOLLOWER


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_smuggling_shape_is_400_closed_and_stores_nothing(server: ServerProcess, shape: str) -> None:
    with server.tls_connect() as sock:
        sock.sendall(request_for(shape))
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


def test_http_1_0_expect_100_continue_is_ignored(server: ServerProcess) -> None:
    # RFC 9110 10.1.1: an HTTP/1.0 client does not know 100 Continue, so it must not get one.
    request = b"POST /ds HTTP/1.0\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n%s" % (len(RECORD), RECORD)
    response = server.exchange(request)
    assert status_of(response) == 200 and b"100 Continue" not in response
    assert server.stored_bytes() == RECORD


def test_http_1_0_keep_alive_is_confirmed_and_honoured(server: ServerProcess) -> None:
    with server.tls_connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = sock.recv(4096)
        assert status_of(first) == 200 and b"\r\nConnection: keep-alive\r\n" in first
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        second = read_until_close(sock)
    assert status_of(second) == 200 and b"\r\nConnection: close\r\n" in second
