"""The sans-IO HTTP parser, in-process: request heads, framing and chunked bodies, fed bytes as a socket would."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest

import dsreceiver
from dsreceiver import ChunkedDecoder, HTTPError, body_framing, head_length, parse_request_head
from test_smuggling import SHAPES, request_for

HEAD = b"POST /ds HTTP/1.1\r\nHost: a\r\n"


def framing_of(head: bytes) -> dsreceiver.Framing:
    """Parses a complete head (ending in its empty line) the way the server does."""
    length = head_length(head)
    assert length == len(head), "the head is not complete"
    return body_framing(parse_request_head(head[:-4]))


def refusal(call: object, *args: object) -> HTTPError:
    """The HTTPError a parser call raises (failing the test when it raises none)."""
    assert callable(call)
    with pytest.raises(HTTPError) as caught:
        call(*args)
    return caught.value


def decode(data: bytes, limit: int = 1 << 20, pieces: Optional[List[int]] = None) -> Tuple[bytes, int]:
    """Feeds `data` to a ChunkedDecoder as a socket might deliver it (cut at `pieces`); returns (body, bytes used)."""
    decoder = ChunkedDecoder(limit)
    buffer = bytearray()
    used_total = 0
    cuts = [cut for cut in sorted(pieces or []) if 0 < cut < len(data)] + [len(data)]
    start = 0
    for cut in cuts:
        buffer += data[start:cut]
        start = cut
        used = decoder.feed(buffer)
        del buffer[:used]
        used_total += used
        if decoder.done:
            break
    assert decoder.done, "the body never ended"
    return bytes(decoder.body), used_total


# -- request heads -------------------------------------------------------------------


def test_head_length_waits_for_the_empty_line_and_leaves_the_body() -> None:
    head = HEAD + b"Content-Length: 2\r\n\r\n"
    assert head_length(head[:-1]) == 0
    assert head_length(head + b"ab") == len(head)


def test_a_bare_lf_in_the_head_is_refused() -> None:
    head = HEAD + b"Dummy: x\nContent-Length: 23\r\n\r\n"
    assert refusal(head_length, head).status == 400
    assert refusal(head_length, b"POST /ds HTTP/1.1\nHost: a\n\n").status == 400
    # Found as soon as it arrives, without waiting for a head end that a LF-only client never sends.
    assert refusal(head_length, b"POST /ds HTTP/1.1\nHost").status == 400


def test_a_bare_lf_is_found_across_feeds() -> None:
    first = HEAD + b"Dummy: x"
    assert head_length(first) == 0
    assert refusal(head_length, first + b"\nContent-Length: 1\r\n\r\n", len(first)).status == 400


def test_request_line_of_exactly_the_limit_is_accepted_and_one_byte_more_is_414() -> None:
    line = b"GET /" + b"a" * (dsreceiver.MAX_REQUEST_LINE - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == dsreceiver.MAX_REQUEST_LINE
    head = line + b"\r\nHost: a\r\n\r\n"
    assert head_length(head) == len(head)
    assert parse_request_head(head[:-4]).method == "GET"
    longer = line.replace(b"GET /", b"GET /a") + b"\r\nHost: a\r\n\r\n"
    assert refusal(head_length, longer).status == 414
    assert refusal(head_length, longer[:dsreceiver.MAX_REQUEST_LINE + 2]).status == 414
    assert refusal(parse_request_head, longer[:-4]).status == 414


def test_head_too_large_is_431() -> None:
    head = HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(9))
    assert refusal(head_length, head).status == 431


def test_http_1_1_needs_exactly_one_host() -> None:
    assert refusal(parse_request_head, b"POST /ds HTTP/1.1\r\nContent-Length: 0").status == 400
    assert refusal(parse_request_head, HEAD + b"Host: b").status == 400
    assert refusal(parse_request_head, b"GET / HTTP/1.0\r\nHost: a\r\nHost: b").status == 400
    assert parse_request_head(b"GET /healthz HTTP/1.0").path == "/healthz"


@pytest.mark.parametrize("byte", [0x00, 0x01, 0x08, 0x0B, 0x0C, 0x0D, 0x1C, 0x1F, 0x7F])
def test_control_characters_in_header_values_are_refused(byte: int) -> None:
    error = refusal(parse_request_head, HEAD + b"X-Note: a" + bytes([byte]) + b"b")
    assert error.status == 400 and error.close


def test_htab_and_obs_text_in_header_values_are_kept() -> None:
    request = parse_request_head(HEAD + b"X-Note: \ta\tcaf\xe9 \t")
    assert request.header("x-note") == "a\tcaf\xe9"


@pytest.mark.parametrize("padding", [b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\x85", b"\xa0"])
def test_content_length_padded_with_anything_but_sp_or_htab_is_refused(padding: bytes) -> None:
    head = HEAD + b"Content-Length: 23" + padding + b"\r\n\r\n"
    assert refusal(framing_of, head).status == 400
    head = HEAD + b"Content-Length: " + padding + b"23\r\n\r\n"
    assert refusal(framing_of, head).status == 400


def test_content_length_with_sp_and_htab_around_it_is_accepted() -> None:
    assert framing_of(HEAD + b"Content-Length: \t23 \t\r\n\r\n") == 23
    assert framing_of(HEAD + b"Content-Length: 23, 23\r\n\r\n") == 23


def test_absolute_form_target_is_reduced_to_path_and_query() -> None:
    request = parse_request_head(b"POST https://logs.example.com/ds?token=x HTTP/1.1\r\nHost: logs.example.com")
    assert (request.path, request.query) == ("/ds", "token=x")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_smuggling_shape_is_refused_in_process(shape: str) -> None:
    """The subprocess smuggling shapes, refused by the parser itself: head, framing or chunked body."""
    data = request_for(shape)
    with pytest.raises(HTTPError) as caught:
        length = head_length(data)
        framing = body_framing(parse_request_head(data[:length - 4]))
        if framing == "chunked":
            ChunkedDecoder(1 << 20).feed(bytearray(data[length:]))
    assert caught.value.status == 400 and caught.value.close


# -- chunked bodies ----------------------------------------------------------------------


def test_chunked_body_decodes_whatever_the_cuts_and_leaves_the_next_request() -> None:
    data = b"5\r\nhello\r\n7;name=value;quoted=\"a \\\" b\"\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    for cut in range(len(data) + 1):
        for second in (cut + 1, cut + 3):
            assert decode(data + b"GET /", pieces=[cut, second]) == (b"hello, world", len(data))


@pytest.mark.parametrize("line", [b"7 ", b" 7", b"7;", b"7; ", b'7;a="x', b"7;a=", b"7;=b", b"0x7", b"-7", b"7\x00",
                                  b"1 6", b"1" * 17])
def test_malformed_chunk_size_lines_are_refused(line: bytes) -> None:
    error = refusal(ChunkedDecoder(1 << 20).feed, bytearray(line + b"\r\n1234567\r\n0\r\n\r\n"))
    assert error.status == 400 and error.close


@pytest.mark.parametrize("line", [b"7", b"07", b"7;a", b"7 ;a", b"7; a = b", b'7;a="x y"', b"7;a;b=c", b"7\t;a"])
def test_well_formed_chunk_size_lines_are_accepted(line: bytes) -> None:
    assert decode(line + b"\r\n1234567\r\n0\r\n\r\n")[0] == b"1234567"


@pytest.mark.parametrize("data", [
    b"7\n1234567\r\n0\r\n\r\n",  # bare LF after the size
    b"7\r\n1234567\n0\r\n\r\n",  # bare LF after the data
    b"7\r\n1234567XX\r\n0\r\n\r\n",  # data longer than announced
    b"7\r\n1234567\r\n0\r\n\n",  # bare LF ending the trailer section
    b"7\r\n1234567\r\n0\r\nbad trailer\r\n\r\n",  # a trailer that is no field
])
def test_chunk_framing_not_ended_by_crlf_is_refused(data: bytes) -> None:
    assert refusal(decode, data).status == 400


def test_chunked_body_over_the_limit_is_413_before_its_data() -> None:
    error = refusal(ChunkedDecoder(10).feed, bytearray(b"5\r\nhello\r\n6\r\n"))
    assert error.status == 413 and error.close


def test_too_many_trailer_fields_are_431() -> None:
    trailers = b"".join(b"X-%d: v\r\n" % i for i in range(dsreceiver.MAX_HEADER_COUNT + 1))
    assert refusal(decode, b"0\r\n" + trailers + b"\r\n").status == 431


def test_overlong_chunk_line_is_refused_without_waiting_for_its_end() -> None:
    assert refusal(ChunkedDecoder(1 << 20).feed, bytearray(b"7;" + b"a" * dsreceiver.MAX_CHUNK_LINE)).status == 400


def test_announced_counts_a_chunk_before_its_data_arrives() -> None:
    decoder = ChunkedDecoder(1 << 20)
    assert decoder.feed(bytearray(b"400\r\nab")) == 7
    assert decoder.announced == 0x400 and bytes(decoder.body) == b"ab"
