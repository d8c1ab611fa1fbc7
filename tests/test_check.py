"""The check command: what DataStream's "Validate & Save" would conclude, step by step."""

from __future__ import annotations

import datetime
import io
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest
import trustme

import dsreceiver
from conftest import DSRECEIVER, ServerProcess


def run_check(url: str, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DSRECEIVER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(DSRECEIVER), "check", url, *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def outcomes(result: subprocess.CompletedProcess[str]) -> List[str]:
    return [line.split()[0] + " " + line[6:40].strip() for line in result.stdout.splitlines()
            if line[:4] in ("PASS", "FAIL", "WARN")]


def test_good_endpoint_passes_every_step(server: ServerProcess, ca_file: Path) -> None:
    result = run_check("https://localhost:%d/datastream" % server.port, "--ca", str(ca_file))
    assert result.returncode == 0, result.stdout
    assert outcomes(result) == ["PASS URL host is a DNS name", "PASS DNS resolves", "PASS TLS 1.2+ negotiates",
                                "PASS certificate chain is trusted", "PASS certificate matches localhost",
                                "PASS certificate is not expiring", "PASS JSON probe gets a 2xx",
                                "PASS JSON probe, gzip'd, gets a 2xx", "PASS STRUCTURED probe gets a 2xx",
                                "PASS STRUCTURED probe, gzip'd, gets 2xx"]
    assert result.stdout.splitlines()[-1].startswith("verdict: DataStream would accept")
    server.wait_for_log(r"access 127\.0\.0\.1 POST /datastream 200 .*\(validation probe\)", count=4)
    assert server.stored_bytes() == b""


def test_untrusted_chain_fails(server: ServerProcess) -> None:
    result = run_check("https://localhost:%d/datastream" % server.port)
    assert result.returncode == 1
    assert "FAIL certificate chain is trusted" in outcomes(result)
    assert "would NOT accept" in result.stdout


def test_wrong_name_fails(start_server: Callable[..., ServerProcess], ca: trustme.CA, ca_file: Path,
                          tmp_path: Path) -> None:
    other = ca.issue_cert("wrong.example")
    other.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    server = start_server("--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
    result = run_check("https://localhost:%d/" % server.port, "--ca", str(ca_file))
    assert result.returncode == 1
    assert outcomes(result)[-2:] == ["PASS certificate chain is trusted", "FAIL certificate matches localhost"]


def test_ip_address_url_fails(server: ServerProcess, ca_file: Path) -> None:
    result = run_check("https://127.0.0.1:%d/" % server.port, "--ca", str(ca_file))
    assert result.returncode == 1
    assert outcomes(result) == ["FAIL URL host is a DNS name"]
    assert "IP address" in result.stdout


def test_refused_credentials_fail_and_configured_ones_pass(start_server: Callable[..., ServerProcess],
                                                          ca_file: Path) -> None:
    server = start_server("--auth-header", "X-Token", env={"DSRECEIVER_BASIC_AUTH": "akamai:pw",
                                                            "DSRECEIVER_AUTH_HEADER_VALUE": "tok"})
    url = "https://localhost:%d/ds" % server.port
    refused = run_check(url, "--ca", str(ca_file))
    assert refused.returncode == 1
    assert "401 Unauthorized" in refused.stdout and "credentials refused" in refused.stdout
    accepted = run_check(url, "--ca", str(ca_file), "--auth-header", "X-Token",
                         env={"DSRECEIVER_BASIC_AUTH": "akamai:pw", "DSRECEIVER_AUTH_HEADER_VALUE": "tok"})
    assert accepted.returncode == 0, accepted.stdout


def test_a_bearer_token_is_sent_when_no_basic_credential_is_set(start_server: Callable[..., ServerProcess],
                                                                 ca_file: Path, tmp_path: Path) -> None:
    server = start_server(env={"DSRECEIVER_BEARER_TOKEN": "tok-1,tok-2", "DSRECEIVER_BASIC_AUTH": "akamai:pw"})
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-2\n")
    url = "https://localhost:%d/ds" % server.port
    assert run_check(url, "--ca", str(ca_file), "--bearer-token-file", str(tokens)).returncode == 0
    assert run_check(url, "--ca", str(ca_file), env={"DSRECEIVER_BEARER_TOKEN": "tok-3"}).returncode == 1
    # DataStream sends Basic, which check prefers.
    assert run_check(url, "--ca", str(ca_file), env={"DSRECEIVER_BEARER_TOKEN": "tok-1",
                                                    "DSRECEIVER_BASIC_AUTH": "akamai:wrong"}).returncode == 1
    assert server.stored_bytes() == b""


def test_uls_mode_sends_its_liveness_probe_with_a_bearer_token(start_server: Callable[..., ServerProcess],
                                                                ca_file: Path) -> None:
    server = start_server(env={"DSRECEIVER_BEARER_TOKEN": "tok-1", "DSRECEIVER_BASIC_AUTH": "akamai:pw"})
    url = "https://127.0.0.1:%d/uls" % server.port  # ULS takes an IP address
    # ULS sends a token as a rule: with --uls, check prefers it to Basic.
    result = run_check(url, "--uls", "--ca", str(ca_file), env={"DSRECEIVER_BEARER_TOKEN": "tok-1",
                                                               "DSRECEIVER_BASIC_AUTH": "akamai:wrong"})
    assert result.returncode == 0, result.stdout
    assert outcomes(result) == ["PASS DNS resolves", "PASS TLS 1.2+ negotiates", "PASS certificate chain is trusted",
                                "PASS certificate matches 127.0.0.1", "PASS certificate is not expiring",
                                "PASS ULS liveness probe gets 200 or 204"]
    assert result.stdout.splitlines()[-1].startswith("verdict: Akamai's Unified Log Streamer would accept")
    server.wait_for_log(r"access 127\.0\.0\.1 OPTIONS /uls 200 bytes=27 records=0 .*\(liveness probe\)")
    refused = run_check(url, "--uls", "--ca", str(ca_file), env={"DSRECEIVER_BEARER_TOKEN": "tok-3"})
    assert refused.returncode == 1 and "401 Unauthorized" in refused.stdout and "would NOT accept" in refused.stdout
    assert server.stored_bytes() == b""


def test_query_token_and_mtls(start_server: Callable[..., ServerProcess], ca: trustme.CA, ca_file: Path,
                              tmp_path: Path) -> None:
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    client = client_ca.issue_cert("datastream.example")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    server = start_server("--client-ca", str(tmp_path / "client-ca.pem"), "--auth-query-param", "token",
                          env={"DSRECEIVER_AUTH_QUERY_VALUE": "s3cret"})
    url = "https://localhost:%d/ds" % server.port
    without_cert = run_check(url, "--ca", str(ca_file), "--auth-query-param", "token",
                             env={"DSRECEIVER_AUTH_QUERY_VALUE": "s3cret"})
    assert without_cert.returncode == 1
    accepted = run_check(url, "--ca", str(ca_file), "--client-cert", str(tmp_path / "client.pem"),
                         "--client-key", str(tmp_path / "client.key"), "--auth-query-param", "token",
                         env={"DSRECEIVER_AUTH_QUERY_VALUE": "s3cret"})
    assert accepted.returncode == 0, accepted.stdout
    assert "s3cret" not in server.log_text()


@pytest.fixture
def silent_tls_server(ca: trustme.CA) -> Iterator[int]:
    """A TLS server that completes handshakes and then never answers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    held: List[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            try:
                held.append(context.wrap_socket(conn, server_side=True))
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for sock in held:
        sock.close()
    listener.close()


@pytest.mark.slow  # waits out a real deadline or grace period
def test_no_answer_in_time_fails(silent_tls_server: int, ca_file: Path) -> None:
    result = run_check("https://localhost:%d/ds" % silent_tls_server, "--ca", str(ca_file), "--timeout", "1")
    assert result.returncode == 1
    assert "FAIL JSON probe gets a 2xx" in outcomes(result)
    assert "no answer within 1s" in result.stdout


def test_certificate_expiring_soon_is_a_warning(start_server: Callable[..., ServerProcess], ca: trustme.CA,
                                                ca_file: Path, tmp_path: Path) -> None:
    soon = ca.issue_cert("localhost", not_after=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=5))
    soon.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    soon.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    server = start_server("--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
    result = run_check("https://localhost:%d/ds" % server.port, "--ca", str(ca_file))
    assert result.returncode == 0
    assert "WARN certificate is not expiring" in outcomes(result)


def test_an_endpoints_reason_phrase_is_printed_escaped() -> None:
    out = io.StringIO()
    dsreceiver.CheckReport(out).line("FAIL", "JSON probe gets a 2xx", "400 Bad\x1b]0;owned\x07\x1b[2J in 3 ms")
    assert out.getvalue().endswith("400 Bad\\x1b]0;owned\\x07\\x1b[2J in 3 ms\n") and "\x1b" not in out.getvalue()
