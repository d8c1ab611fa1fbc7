"""--store gzip: records kept as gzip members; a gzip'd push's own bytes are kept when they hold exactly its records."""

from __future__ import annotations

import gzip
import signal
from typing import Callable

from conftest import ServerProcess
from simulator import make_batch


def unzipped(server: ServerProcess) -> bytes:
    return b"".join(gzip.decompress(path.read_bytes()) for path in server.data_files())


def test_gzip_push_is_kept_byte_for_byte_and_plain_push_is_compressed(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--store", "gzip")
    zipped, plain = make_batch("zipped", count=500, compress=True), make_batch("plain", count=500)
    with server.simulator() as ds:
        assert ds.push(zipped).status == 200
        assert ds.push(plain).status == 200
    [data_file] = server.data_files()
    assert data_file.name.endswith(".log.gz")
    stored = data_file.read_bytes()
    assert stored.startswith(zipped.body)  # the pushed member itself, not recompressed
    assert len(stored) < len(plain.body) // 3
    assert gzip.decompress(stored) == b"".join(line + b"\n" for line in zipped.lines + plain.lines)


def test_gzip_body_that_needs_normalising_is_recompressed(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--store", "gzip")
    with server.simulator() as ds:
        assert ds.request("POST", gzip.compress(b"a\r\n\r\nb")).status == 200  # CRLF, a blank line, no final LF
        assert ds.request("POST", gzip.compress(b"c\n") + b"\0\0\0\0").status == 200  # zero padding after it
        assert ds.request("POST", gzip.compress(b"d\n\r")).status == 200  # a lone CR at the very end
    assert unzipped(server) == b"a\nb\nc\nd\n"


def test_retry_dedup_and_probes_with_gzip_storage(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--store", "gzip")
    batch = make_batch("twice", count=50, compress=True)
    with server.simulator() as ds:
        assert ds.validate().status == 200
        assert ds.push(batch).status == 200
        assert ds.request("POST", gzip.decompress(batch.body)).status == 200  # the same records, plain this time
    assert unzipped(server) == gzip.decompress(batch.body)


def test_unacknowledged_partial_member_is_moved_aside_at_restart(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--store", "gzip")
    batch = make_batch("kept", count=30, compress=True)
    with server.simulator() as ds:
        assert ds.push(batch).status == 200
    server.stop(signal.SIGKILL)
    [data_file] = server.data_files()
    with data_file.open("ab") as handle:
        handle.write(make_batch("cut", count=30, compress=True).body[:200])  # a crash mid-write
    server.start()
    server.wait_for_log("moved 200 bytes of an unacknowledged batch")
    assert gzip.decompress(data_file.read_bytes()) == gzip.decompress(batch.body)
