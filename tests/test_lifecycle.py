"""Lifecycle: graceful shutdown on SIGTERM/SIGINT, bounded by --shutdown-timeout."""

from __future__ import annotations

import signal
import time
from typing import Callable

from conftest import ServerProcess, push_held_after_continue, read_until_close, status_of
from simulator import make_batch


def test_sigterm_mid_push_still_acknowledges_and_stores_it(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    batch = make_batch("slow", count=2000)
    half = len(batch.body) // 2
    # The interim answer proves the server is serving this request before the signal arrives.
    with push_held_after_continue(server, len(batch.body)) as sock:
        sock.sendall(batch.body[:half])
        server.send_signal(signal.SIGTERM)
        server.wait_for_log("received signal 15")
        sock.sendall(batch.body[half:])
        response = read_until_close(sock)
    assert status_of(response) == 200
    assert b"Connection: close" in response
    assert server.wait_exit() == 0
    assert server.stored_lines() == batch.lines


def test_idle_keep_alive_connections_do_not_hold_up_shutdown(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--shutdown-timeout", "120")
    with server.simulator() as ds:
        assert ds.push(make_batch("idle", count=1)).status == 200
        started = time.monotonic()
        server.send_signal(signal.SIGINT)
        assert server.wait_exit(timeout=60) == 0
        # Waiting out the idle connection would take the whole 120 s shutdown timeout.
        assert time.monotonic() - started < 60
    assert "stopped" in server.log_text()


def test_shutdown_timeout_bounds_a_stuck_request(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--shutdown-timeout", "1", "--timeout", "300")
    with push_held_after_continue(server, 100) as sock:
        sock.sendall(b"partial")
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(timeout=60) == 0
    server.wait_for_log("shutdown timeout")
    assert server.stored_bytes() == b""
