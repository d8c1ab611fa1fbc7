"""Soak: a minute of mixed load with a certificate reload and SIGHUPs; memory, descriptors and threads stay flat."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import trustme

from conftest import ServerProcess, install_pair
from simulator import make_batch

Sample = Tuple[float, int, int, int]  # seconds since start, RSS KiB, open fds, threads


def sample(pid: int, started: float) -> Sample:
    status = Path("/proc/%d/status" % pid).read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return (time.monotonic() - started, int(fields["VmRSS"].split()[0]), len(os.listdir("/proc/%d/fd" % pid)),
            int(fields["Threads"]))


@pytest.mark.slow
def test_mixed_load_for_a_minute(start_server: Callable[..., ServerProcess], ca: trustme.CA, tmp_path: Path) -> None:
    duration = float(os.environ.get("SOAK_SECONDS", "60"))
    live = tmp_path / "live"
    live.mkdir()
    install_pair(ca, live)
    server = start_server("--certs-dir", str(live), "--timeout", "2", "--cert-check-interval", "3600")
    assert server.process is not None
    pid = server.process.pid
    stop = threading.Event()
    failures: List[str] = []
    samples: List[Sample] = []
    pushed = [0]
    started = time.monotonic()

    def pusher(number: int) -> None:
        rng = random.Random(number)
        index = 0
        ds = server.simulator(timeout=30)
        while not stop.is_set():
            batch = make_batch("soak-%d-%06d" % (number, index), count=rng.randint(10, 400),
                               compress=rng.random() < 0.5)
            try:
                status = ds.push(batch, chunked=rng.random() < 0.2).status
            except (OSError, http.client.HTTPException) as exc:
                status, ds = -1, server.simulator(timeout=30)
                failures.append("push %s: %r" % (index, exc))
            if status != 200:
                failures.append("push %s answered %s" % (index, status))
            pushed[0] += 1
            index += 1
        ds.close()

    def prober() -> None:
        with server.simulator(timeout=30) as ds:
            while not stop.wait(0.2):
                if ds.validate().status != 200:
                    failures.append("validation probe refused")

    def idler() -> None:
        held: List[socket.socket] = []
        while not stop.wait(0.5):
            held = [sock for sock in held if sock.fileno() >= 0]
            while len(held) < 50:
                sock = server.tls_connect()
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
                sock.recv(1024)  # then it sits idle on keep-alive
                held.append(sock)
        for sock in held:
            sock.close()

    def slow_client() -> None:
        while not stop.is_set():
            try:
                with server.tls_connect() as sock:
                    for byte in b"POST /slow HTTP/1.1\r\nHost: a\r\n":
                        if stop.wait(0.5):
                            break
                        sock.sendall(bytes([byte]))
            except (OSError, ssl.SSLError):
                continue  # cut off at the 2 s deadline, as it should be

    def garbage_client() -> None:
        rng = random.Random(99)
        while not stop.wait(0.05):
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                    sock.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))))
            except OSError:
                pass

    def sampler() -> None:
        while not stop.wait(1.0):
            samples.append(sample(pid, started))

    workers = ([threading.Thread(target=pusher, args=(n,)) for n in range(4)] +
               [threading.Thread(target=target) for target in (prober, idler, slow_client, garbage_client, sampler)])
    for thread in workers:
        thread.start()
    try:
        stop.wait(duration / 2)
        install_pair(ca, live)
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"certificate reloaded \(SIGHUP\)")
        stop.wait(duration / 10)
        server.send_signal(signal.SIGHUP)
        stop.wait(duration * 0.4)
    finally:
        stop.set()
        for thread in workers:
            thread.join()
    assert failures == []
    assert pushed[0] > 100
    assert server.log_text().count("certificate reloaded") == 2
    baseline = [s for s in samples if 0.25 * duration <= s[0] <= 0.45 * duration]
    final = [s for s in samples if s[0] >= 0.8 * duration]
    assert baseline and final
    for column, name in ((1, "RSS"), (2, "open fds"), (3, "threads")):
        before, after = max(s[column] for s in baseline), max(s[column] for s in final)
        assert after <= before * 1.2, "%s grew from %d to %d: %s" % (name, before, after, samples)
