"""Limits: body sizes, gzip bombs, header sizes, deadlines for slow clients, connection and memory caps, TLS policy."""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, List

import pytest
import trustme

from conftest import ServerProcess, push_held_after_continue, read_until_close, scrape, status_of, value, wait_until
from simulator import make_batch


def peak_rss_mb(server: ServerProcess) -> float:
    """The server's peak resident memory so far (VmHWM), in MiB."""
    assert server.process is not None
    for line in open("/proc/%d/status" % server.process.pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def gzip_of_repeated(line: bytes, total: int) -> bytes:
    """A gzip body that inflates to `total` bytes of `line` repeated, built without holding it inflated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = line * ((1 << 20) // len(line))
    pieces = []
    produced = 0
    while produced < total:
        piece = block[:total - produced]
        pieces.append(compressor.compress(piece))
        produced += len(piece)
    pieces.append(compressor.flush())
    return b"".join(pieces)


def test_oversized_content_length_is_refused_before_the_body_is_read(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-body-size", "1K")
    with server.tls_connect() as sock:
        sock.sendall(b"POST /ds HTTP/1.1\r\nHost: a\r\nContent-Length: 1025\r\n\r\n")
        response = read_until_close(sock)  # answered and closed without a single body byte sent
    assert status_of(response) == 413
    with server.simulator() as ds:
        assert ds.request("POST", b"x" * 1023 + b"\n").status == 200


def test_oversized_chunked_body_is_refused_while_reading(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-body-size", "64K")
    batch = make_batch("big-chunked", count=500)
    assert len(batch.body) > 65536
    with server.simulator() as ds:
        response = ds.push(batch, chunked=True, headers={"Expect": "100-continue"})
    assert response.status == 413
    assert server.stored_bytes() == b""


def test_decompressed_size_limit(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-decompressed-size", "1M")
    with server.simulator() as ds:
        response = ds.request("POST", gzip_of_repeated(b'{"a":"b"}\n', 2 << 20), {"Content-Encoding": "gzip"})
        assert response.status == 413
        small = make_batch("under-limit", count=100, compress=True)
        assert ds.push(small).status == 200
    assert server.stored_lines() == small.lines


@pytest.mark.slow
def test_gzip_bombs_never_inflate_in_memory(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()  # default limits: 64M on the wire, 512M decompressed
    bomb = gzip_of_repeated(b"\0" * 1000, 1 << 30)  # 1 GiB of zeros without a newline, ~1 MB on the wire
    legit = gzip_of_repeated(b"a" * 1023 + b"\n", 200 << 20)  # 200 MiB of lines: allowed by the default limit
    with server.simulator(timeout=120) as ds:
        assert ds.request("POST", bomb, {"Content-Encoding": "gzip"}).status == 413
        assert server.stored_bytes() == b""
        assert ds.request("POST", legit).status == 200
    assert peak_rss_mb(server) < 200
    files = server.data_files()
    assert sum(path.stat().st_size for path in files) == 200 << 20
    with files[0].open("rb") as handle:
        assert handle.read(1024) == b"a" * 1023 + b"\n"


def test_unsupported_content_encoding_is_415(server: ServerProcess) -> None:
    with server.simulator() as ds:
        for encoding in ("br", "zstd", "deflate", "gzip, gzip"):
            assert ds.request("POST", b"x\n", {"Content-Encoding": encoding}).status == 415
    assert server.stored_bytes() == b""


def test_push_without_length_is_411(server: ServerProcess) -> None:
    response = server.exchange(b"POST /ds HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 411


@pytest.mark.parametrize("head, status", [
    (b"POST /ds HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"POST /ds HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 9000 + b"\r\n\r\n", 431),
    (b"POST /ds HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(9)) + b"\r\n", 431),
    (b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"POST /" + b"a" * 20000, 414),
    # Exactly the longest request line allowed, ending in CRLF: parsed (then 405: GET is not a push).
    (b"GET /" + b"a" * 8176 + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 405),
    (b"GET /" + b"a" * 8177 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
])
def test_oversized_heads(server: ServerProcess, head: bytes, status: int) -> None:
    assert status_of(server.exchange(head)) == status


def trickle(sock: socket.socket, data: bytes, interval: float, stop: threading.Event) -> None:
    """Sends `data` one byte per `interval` until the server closes the connection or `stop` is set."""
    for byte in data:
        if stop.wait(interval):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


@pytest.mark.slow  # waits out a real deadline or grace period
@pytest.mark.parametrize("phase", ["head", "body"])
def test_trickling_client_is_cut_off_at_the_deadline(start_server: Callable[..., ServerProcess], phase: str) -> None:
    server = start_server("--timeout", "2")
    body = b"x" * 200 + b"\n"
    head = b"POST /ds HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    stop = threading.Event()
    trickled = head + body if phase == "head" else body
    with server.tls_connect(timeout=60) as sock:
        if phase == "body":
            sock.sendall(head)
        slow = threading.Thread(target=trickle, args=(sock, trickled, 0.2, stop))
        started = time.monotonic()
        slow.start()
        try:
            response = read_until_close(sock)
        finally:
            stop.set()
            slow.join()
        # Each byte would reset an idle timer; only a deadline (2 s) ends it long before the trickle would.
        assert time.monotonic() - started < len(trickled) * 0.2 / 2
    assert status_of(response) == 408
    assert server.stored_bytes() == b""


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.slow  # waits out a real deadline or grace period
def test_trickled_handshake_is_cut_off_at_the_deadline(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--timeout", "2")
    stop = threading.Event()
    hello = client_hello()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        slow = threading.Thread(target=trickle, args=(sock, hello, 0.1, stop))
        started = time.monotonic()
        slow.start()
        try:
            read_until_close(sock)
        finally:
            stop.set()
            slow.join()
        assert time.monotonic() - started < len(hello) * 0.1 / 2  # the 2 s deadline, not the trickle, ended it
    server.wait_for_log(r"tls handshake from 127\.0\.0\.1 failed: timed out")


@pytest.mark.slow
def test_crowd_of_slow_clients_does_not_delay_a_push(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--timeout", "60", "--max-client-connections", "0")  # one address, 500 connections

    def push_seconds(batch_id: str) -> float:
        batch = make_batch(batch_id, count=200)
        started = time.monotonic()
        with server.simulator() as ds:
            assert ds.push(batch).status == 200
        return time.monotonic() - started

    crowd: List[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(500):
            sock = server.tls_connect(timeout=60)
            sock.sendall(b"POST /ds HTTP/1.1\r\n")
            crowd.append(sock)

        def keep_trickling() -> None:
            while not stop.wait(0.5):
                for sock in crowd:
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        pass

        trickler = threading.Thread(target=keep_trickling)
        trickler.start()
        try:
            during = max(push_seconds("crowd-%d" % i) for i in range(3))
        finally:
            stop.set()
            trickler.join()
    finally:
        for sock in crowd:
            sock.close()
    # Served beside the crowd, not after it: a crowd that held the server would delay it to their 60 s deadline.
    assert during < 30, "a push took %.1fs with 500 slow clients" % during


def kept_alive(server: ServerProcess, count: int) -> List[socket.socket]:
    """Opens `count` connections that each made one request and stay open."""
    held = []
    for _ in range(count):
        sock = server.tls_connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        held.append(sock)
    return held


def test_connections_beyond_the_limit_are_closed_at_once(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-connections", "4")
    with contextlib.ExitStack() as stack:
        # Four pushes under way (heads answered 100 Continue, bodies held back): busy, so none is evicted.
        busy = [stack.enter_context(push_held_after_continue(server, 2)) for _ in range(4)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as extra:
            assert read_until_close(extra) == b""
        busy[0].sendall(b"a\n")
        assert status_of(busy[0].recv(4096)) == 200
        busy[0].close()

        def served() -> bool:
            try:
                response = server.exchange(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            except (ssl.SSLError, OSError):
                return False
            return response.startswith(b"HTTP/1.1 200")

        wait_until(served, what="a slot to free up")

def test_bytes_in_flight_beyond_the_limit_get_503(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-inflight-bytes", "1M")
    first = b"a" * (900 << 10) + b"\n"
    with push_held_after_continue(server, len(first)) as holder:
        holder.sendall(first[:-1])  # 900K arrived and are held: they count against the budget
        wait_until(lambda: value(scrape(server), "dsreceiver_inflight_bytes") >= 900 << 10,
                   what="the server to hold the first push's 900K")
        wait_until(lambda: status_of(server.exchange(b"POST /ds HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
                                                     b"\r\n%s" % (len(first), first))) == 503,
                   what="a second 900K push to be refused while the first is held")
        holder.sendall(first[-1:])
        assert status_of(holder.recv(4096)) == 200
    second = b"b" * (900 << 10) + b"\n"
    with server.simulator() as ds:
        assert ds.request("POST", second).status == 200
    assert server.stored_lines() == [first[:-1], second[:-1]]


def test_weak_ciphers_are_refused(server: ServerProcess) -> None:
    offered = []
    for ciphers in ("aNULL", "eNULL", "RC4", "EXPORT", "DES", "3DES", "PSK", "SRP", "MD5", "CAMELLIA:!ECDHE:!DHE"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the cipher choice must fail before any certificate matters
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.set_ciphers(ciphers + ":@SECLEVEL=0")
        except ssl.SSLError:
            continue  # this OpenSSL cannot even offer them
        offered.append(ciphers)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                context.wrap_socket(raw).close()
    assert "aNULL" in offered and "eNULL" in offered


def test_negotiated_tls_1_2_cipher_is_forward_secret_aead(server: ServerProcess, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ALL:@SECLEVEL=0")
    with server.tls_connect(context) as sock:
        assert isinstance(sock, ssl.SSLSocket)
        name = (sock.cipher() or ("",))[0]
    assert name.startswith(("ECDHE-", "DHE-")) and ("GCM" in name or "CHACHA20" in name), name


def test_gzip_chunk_boundaries_keep_long_lines_whole(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-record-bytes", "4M")
    long_line = b"L" * (3 << 20)
    body = b"first\n" + long_line + b"\r\nlast"
    with server.simulator() as ds:
        assert ds.request("POST", gzip.compress(body)).status == 200
    assert server.stored_lines() == [b"first", long_line, b"last"]


def threads_of(server: ServerProcess) -> int:
    assert server.process is not None
    status = open("/proc/%d/status" % server.process.pid).read()
    return int(status.split("Threads:")[1].split()[0])


def test_idle_keep_alive_connections_give_up_their_threads_and_still_answer(server: ServerProcess) -> None:
    baseline = threads_of(server)
    held = kept_alive(server, 50)
    try:
        # Parked after a second idle: 50 connections, no thread each.
        wait_until(lambda: threads_of(server) <= baseline + 2, what="idle connections to be parked")
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


@pytest.mark.slow  # waits out a real deadline or grace period
@pytest.mark.parametrize("requests_first", [0, 1])
def test_idle_deadlines_close_connections_quietly(start_server: Callable[..., ServerProcess],
                                                  requests_first: int) -> None:
    server = start_server("--timeout", "2", "--keepalive-timeout", "2")
    with server.tls_connect(timeout=30) as sock:
        for _ in range(requests_first):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert read_until_close(sock) == b""  # closed by the server at the deadline
        assert time.monotonic() - started < 25  # the 2 s deadline, with room for a loaded machine
    with server.simulator() as ds:
        assert ds.request("GET", path="/healthz").status == 200
    assert "Traceback" not in server.log_text() and "unexpected error" not in server.log_text()


def peak_rss_kb(pid: int) -> int:
    """The most memory the process ever held (VmHWM), in KB."""
    status = Path("/proc/%d/status" % pid).read_text()
    return int(status.split("VmHWM:")[1].split()[0])


@pytest.mark.slow  # gzips 450 MB in the test
def test_one_giant_line_is_refused_within_the_memory_budget(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-inflight-bytes", "64M")
    assert server.process is not None
    body = gzip.compress(b"a" * (450 << 20), compresslevel=1)  # 450 MB in one line: about 450 KB on the wire
    assert len(body) < 4 << 20
    before = peak_rss_kb(server.process.pid)
    with server.simulator(timeout=120) as ds:
        refused = ds.request("POST", body, {"Content-Encoding": "gzip"})
        assert refused.status == 413 and b"--max-record-bytes" in refused.body
        assert ds.push(make_batch("after-the-giant", count=3)).status == 200
    # Bounded by the budget and a fixed margin, never by the line: it is refused once it passes 1 MiB.
    assert peak_rss_kb(server.process.pid) - before < (64 << 10)
    assert server.stored_lines() == make_batch("after-the-giant", count=3).lines
