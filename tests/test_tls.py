"""TLS: certificates, self-signed bootstrap, handshake isolation and deadlines, protocol policy."""

from __future__ import annotations

import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import trustme

from conftest import DSRECEIVER, ServerProcess, read_until_close, wait_until
from simulator import DataStreamSimulator, make_batch


def test_idle_connection_and_plain_http_client_do_not_delay_a_push(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--timeout", "120")
    idle = socket.create_connection(("127.0.0.1", server.port))
    plain = socket.create_connection(("127.0.0.1", server.port))
    plain.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    try:
        batch = make_batch("isolated", count=50)
        started = time.monotonic()
        with server.simulator(timeout=60) as ds:
            assert ds.push(batch).status == 200
        # A receiver that handshakes in its accept loop would wait out the 120 s deadline here.
        assert time.monotonic() - started < 20
        assert server.stored_lines() == batch.lines
        plain.settimeout(20)
        assert b"HTTP/1.1 200" not in read_until_close(plain)
    finally:
        idle.close()
        plain.close()


def test_connection_that_never_handshakes_is_closed_at_the_deadline(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.settimeout(30)
        assert idle.recv(1024) == b""
    server.wait_for_log(r"tls handshake from 127\.0\.0\.1 failed: timed out")


def test_tls_1_1_client_is_refused(server: ServerProcess) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the handshake must fail before any certificate matters
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            context.wrap_socket(raw).close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_served(server: ServerProcess, ca: trustme.CA, version: ssl.TLSVersion) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.minimum_version = context.maximum_version = version
    with server.tls_connect(context) as sock:
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_until_close(sock).startswith(b"HTTP/1.1 200 OK\r\n")


def test_default_certs_dir_gets_a_self_signed_certificate_that_verifies(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    workdir = tmp_path / "fresh"
    server = start_server("--hostname", "localhost", tls=False, workdir=workdir)
    cert, key = workdir / "certs" / "fullchain.pem", workdir / "certs" / "privkey.pem"
    server.wait_for_log(r"self-signed certificate for localhost .*certs/fullchain\.pem is uploaded as the "
                        r"stream's CA certificate")
    assert stat.S_IMODE(key.stat().st_mode) & 0o077 == 0
    # What DataStream does with an uploaded CA certificate: trust exactly that file, check the name.
    context = ssl.create_default_context(cafile=str(cert))
    batch = make_batch("selfsigned", count=5)
    with DataStreamSimulator("localhost", server.port, context) as ds:
        assert ds.push(batch).status == 200
    assert server.stored_lines() == batch.lines
    server.stop()
    # A second start reuses the pair rather than replacing it.
    before = cert.read_bytes()
    again = start_server("--hostname", "localhost", tls=False, workdir=workdir)
    assert "self-signed" not in again.log_text()
    assert cert.read_bytes() == before


def test_certs_dir_in_certbot_layout(start_server: Callable[..., ServerProcess], cert_dir: Path) -> None:
    server = start_server("--certs-dir", str(cert_dir))
    with server.simulator() as ds:
        assert ds.request("GET", path="/healthz").status == 200


def run_expecting_config_error(*args: str, cwd: Path) -> str:
    """Runs dsreceiver with a bad configuration; asserts exit 2 and one line; returns that line."""
    result = subprocess.run([sys.executable, str(DSRECEIVER), "--port", "0", *args], cwd=str(cwd),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_certificate_is_a_one_line_error(tmp_path: Path) -> None:
    line = run_expecting_config_error("--certs-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert str(tmp_path / "nowhere" / "fullchain.pem") in line
    assert not (tmp_path / "nowhere").exists()


def test_missing_key_is_a_one_line_error(tmp_path: Path, cert_dir: Path) -> None:
    line = run_expecting_config_error("--cert", str(cert_dir / "fullchain.pem"), "--key", str(tmp_path / "k.pem"),
                                      cwd=tmp_path)
    assert str(tmp_path / "k.pem") in line


def test_mismatched_key_is_a_one_line_error(tmp_path: Path, cert_dir: Path, ca: trustme.CA) -> None:
    other = tmp_path / "other.pem"
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(other))
    line = run_expecting_config_error("--cert", str(cert_dir / "fullchain.pem"), "--key", str(other), cwd=tmp_path)
    assert "do not match" in line and str(other) in line


def test_garbage_certificate_is_a_one_line_error(tmp_path: Path, cert_dir: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    line = run_expecting_config_error("--cert", str(garbage), "--key", str(cert_dir / "privkey.pem"), cwd=tmp_path)
    assert str(garbage) in line


def test_default_certs_dir_with_only_a_key_is_an_error(tmp_path: Path, cert_dir: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "privkey.pem").write_bytes((cert_dir / "privkey.pem").read_bytes())
    line = run_expecting_config_error(cwd=tmp_path)
    assert "fullchain.pem" in line


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_available(), reason="IPv6 loopback not available on this machine")
def test_dual_stack_listener_accepts_ipv4_and_ipv6(start_server: Callable[..., ServerProcess],
                                                   client_context: ssl.SSLContext) -> None:
    server = start_server("--host", "::")
    server.wait_for_log(r"listening on https://\[::\]:\d+")
    for host in ("127.0.0.1", "::1"):
        with DataStreamSimulator(host, server.port, client_context) as ds:
            assert ds.request("GET", path="/healthz").status == 200
    wait_until(lambda: server.log_text().count("GET /healthz 200") == 2, what="both health checks logged")
