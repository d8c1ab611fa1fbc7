"""Authentication: Basic, Bearer, custom header, URL token, mTLS; combinations, rotation, logging, paths."""

from __future__ import annotations

import base64
import datetime
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import trustme

from conftest import ServerProcess, read_until_close, wait_until
from simulator import DataStreamSimulator, make_batch


def basic(user: str, password: str) -> Dict[str, str]:
    token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
    return {"Authorization": "Basic " + token}


def push_status(server: ServerProcess, headers: Optional[Dict[str, str]] = None, path: str = "/datastream",
                batch_id: str = "auth") -> int:
    with server.simulator() as ds:
        return ds.push(make_batch(batch_id, count=3), headers=headers, path=path).status


# -- Basic --------------------------------------------------------------------

def test_basic_auth_from_environment(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BASIC_AUTH": "akamai:s3cret"})
    server.wait_for_log("authentication required: basic")
    with server.simulator() as ds:
        refused = ds.push(make_batch("nobasic", count=3))
        assert refused.status == 401
        assert refused.headers["www-authenticate"] == 'Basic realm="dsreceiver"'
        assert ds.push(make_batch("wrong", count=3), headers=basic("akamai", "wrong")).status == 401
        assert ds.push(make_batch("wronguser", count=3), headers=basic("other", "s3cret")).status == 401
        assert ds.push(make_batch("notbasic", count=3), headers={"Authorization": "Bearer s3cret"}).status == 401
        assert ds.push(make_batch("garbled", count=3), headers={"Authorization": "Basic !!!"}).status == 401
        good = make_batch("good", count=3)
        assert ds.push(good, headers=basic("akamai", "s3cret")).status == 200
    assert server.stored_lines() == good.lines


def test_basic_auth_rotation_accepts_old_and_new_password(start_server: Callable[..., ServerProcess],
                                                          tmp_path: Path) -> None:
    credentials = tmp_path / "basic"
    credentials.write_text("# rotating: old and new\nakamai:old-password\nakamai:new-password\n")
    server = start_server("--basic-auth-file", str(credentials))
    assert push_status(server, basic("akamai", "old-password"), batch_id="old") == 200
    assert push_status(server, basic("akamai", "new-password"), batch_id="new") == 200
    assert push_status(server, basic("akamai", "older-password"), batch_id="older") == 401
    assert len(server.stored_lines()) == 6


def test_password_with_colon_and_unicode(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BASIC_AUTH": "akamai:pa:ss-wörd"})
    assert push_status(server, basic("akamai", "pa:ss-wörd")) == 200
    assert push_status(server, basic("akamai", "pa")) == 401


# -- Bearer -------------------------------------------------------------------

def bearer(token: str) -> Dict[str, str]:
    return {"Authorization": "Bearer " + token}


def test_bearer_tokens_from_environment_and_file_rotate(start_server: Callable[..., ServerProcess],
                                                        tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotating: the new one first\nnew-T0ken_2026\n")
    server = start_server("--bearer-token-file", str(tokens), env={"DSRECEIVER_BEARER_TOKEN": "old-T0ken="})
    server.wait_for_log("(?m)authentication required: bearer$")
    assert push_status(server, bearer("old-T0ken="), batch_id="old") == 200
    assert push_status(server, bearer("new-T0ken_2026"), batch_id="new") == 200
    assert push_status(server, {"Authorization": "bearer  new-T0ken_2026"}, batch_id="case") == 200
    for wrong in (bearer("new-T0ken_202"), bearer("new-T0ken_20266"), bearer(""), {"Authorization": "Bearer"},
                  {"Authorization": "new-T0ken_2026"}, basic("new", "T0ken_2026"),
                  bearer("old-T0ken=, Bearer new-T0ken_2026")):
        assert push_status(server, wrong) == 401, wrong
    with server.simulator() as ds:
        refused = ds.push(make_batch("none", count=3))
    assert refused.status == 401 and refused.headers["www-authenticate"] == 'Bearer realm="dsreceiver"'
    assert len(server.stored_lines()) == 9
    assert "T0ken" not in server.log_text()


def test_basic_and_bearer_share_the_authorization_header_and_the_other_methods_still_count(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--auth-header", "X-Token", env={"DSRECEIVER_BASIC_AUTH": "u:p",
                                                            "DSRECEIVER_BEARER_TOKEN": "tok",
                                                            "DSRECEIVER_AUTH_HEADER_VALUE": "h"})
    server.wait_for_log("(?m)authentication required: basic or bearer \\+ header$")
    header = {"X-Token": "h"}
    assert push_status(server, dict(basic("u", "p"), **header), batch_id="basic") == 200
    assert push_status(server, dict(bearer("tok"), **header), batch_id="bearer") == 200
    assert push_status(server, bearer("tok")) == 401
    assert push_status(server, dict(basic("u", "tok"), **header)) == 401
    assert push_status(server, dict(bearer("p"), **header)) == 401
    response = server.exchange(b"POST /ds HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\n\r\nx\n")
    assert response.startswith(b"HTTP/1.1 401 ") and b"bad or missing Basic or Bearer credentials" in response
    assert b'\r\nWWW-Authenticate: Basic realm="dsreceiver"\r\nWWW-Authenticate: Bearer realm="dsreceiver"\r\n' \
        in response
    assert len(server.stored_lines()) == 6


# -- custom header ----------------------------------------------------------------

def test_custom_header_auth(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    values = tmp_path / "header-values"
    values.write_text("from-file-token\n")
    server = start_server("--auth-header", "X-DataStream-Token", "--auth-header-file", str(values),
                          env={"DSRECEIVER_AUTH_HEADER_VALUE": "env-token-1,env-token-2"})
    assert push_status(server) == 401
    assert push_status(server, {"X-DataStream-Token": "wrong"}) == 401
    assert push_status(server, {"X-DataStream-Token": ""}) == 401
    assert push_status(server, {"Authorization": "env-token-1"}) == 401
    assert push_status(server, {"x-datastream-token": "env-token-2"}, batch_id="h2") == 200
    assert push_status(server, {"X-DataStream-Token": "from-file-token"}, batch_id="h3") == 200
    assert len(server.stored_lines()) == 6


def test_custom_header_given_twice_is_refused(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--auth-header", "X-Token", env={"DSRECEIVER_AUTH_HEADER_VALUE": "t"})
    body = b"x\n"
    response = server.exchange(b"POST / HTTP/1.1\r\nHost: a\r\nX-Token: t\r\nX-Token: t\r\nConnection: close\r\n"
                               b"Content-Length: 2\r\n\r\n" + body)
    assert response.startswith(b"HTTP/1.1 401")


# -- URL token --------------------------------------------------------------------

def test_query_token_auth_and_redaction(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--auth-query-param", "token", env={"DSRECEIVER_AUTH_QUERY_VALUE": "Zm9vYmFy-42"})
    assert push_status(server, path="/datastream") == 401
    assert push_status(server, path="/datastream?token=nope") == 401
    assert push_status(server, path="/datastream?token=Zm9vYmFy-42&token=Zm9vYmFy-42") == 401
    assert push_status(server, path="/datastream?stream=web&token=Zm9vYmFy-42", batch_id="tok") == 200
    assert push_status(server, path="/datastream?%74oken=Zm9vYmFy-42", batch_id="enc") == 200
    server.wait_for_log(r"POST /datastream\?stream=web&token=REDACTED 200")
    server.wait_for_log(r"POST /datastream\?%74oken=REDACTED 200")
    assert "Zm9vYmFy-42" not in server.log_text()
    assert "nope" not in server.log_text()
    assert len(server.stored_lines()) == 6


# -- mTLS -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA, client: Optional[trustme.LeafCert]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


@pytest.fixture
def mtls_server(start_server: Callable[..., ServerProcess], client_ca: trustme.CA, tmp_path: Path) -> ServerProcess:
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    return start_server("--client-ca", str(ca_file))


def test_mtls_accepts_a_certificate_from_the_client_ca(mtls_server: ServerProcess, ca: trustme.CA,
                                                       client_ca: trustme.CA) -> None:
    context = client_context(ca, client_ca.issue_cert("datastream.example.com"))
    batch = make_batch("mtls", count=4)
    with DataStreamSimulator("127.0.0.1", mtls_server.port, context) as ds:
        assert ds.push(batch).status == 200
    assert mtls_server.stored_lines() == batch.lines
    mtls_server.wait_for_log("authentication required: mtls")


def assert_refused_in_handshake(server: ServerProcess, context: ssl.SSLContext) -> None:
    """The TLS session never carries an HTTP answer (with TLS 1.3 the alert may come on first read)."""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nx\n")
                answer = read_until_close(sock)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        answer = b""
    assert answer == b""
    assert server.stored_bytes() == b""


def test_mtls_refuses_a_client_without_certificate(mtls_server: ServerProcess, ca: trustme.CA) -> None:
    assert_refused_in_handshake(mtls_server, client_context(ca, None))
    mtls_server.wait_for_log(r"tls handshake from 127\.0\.0\.1 failed")


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: ServerProcess, ca: trustme.CA) -> None:
    assert_refused_in_handshake(mtls_server, client_context(ca, trustme.CA().issue_cert("intruder.example")))


def test_mtls_refuses_an_expired_certificate(mtls_server: ServerProcess, ca: trustme.CA,
                                             client_ca: trustme.CA) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = client_ca.issue_cert("datastream.example.com", not_before=now - datetime.timedelta(days=30),
                                   not_after=now - datetime.timedelta(days=1))
    assert_refused_in_handshake(mtls_server, client_context(ca, expired))


# -- combinations, logging, paths ---------------------------------------------------

def test_all_configured_methods_must_pass(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--auth-header", "X-Token", "--auth-query-param", "key",
                          env={"DSRECEIVER_BASIC_AUTH": "u:p", "DSRECEIVER_AUTH_HEADER_VALUE": "h",
                               "DSRECEIVER_AUTH_QUERY_VALUE": "q"})
    server.wait_for_log("authentication required: basic \\+ header \\+ query-token")
    both = dict(basic("u", "p"), **{"X-Token": "h"})
    assert push_status(server, basic("u", "p"), path="/ds?key=q") == 401
    assert push_status(server, {"X-Token": "h"}, path="/ds?key=q") == 401
    assert push_status(server, both, path="/ds?key=wrong") == 401
    assert push_status(server, both, path="/ds?key=q") == 200


def test_no_authentication_logs_a_warning(server: ServerProcess) -> None:
    server.wait_for_log(r"WARNING no authentication configured: anyone who can reach this port can push")


def test_auth_failures_are_logged_at_most_once_per_client_per_second(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--auth-brake", "0", env={"DSRECEIVER_BASIC_AUTH": "u:p"})
    started = time.monotonic()
    with server.simulator() as ds:
        for _ in range(30):
            assert ds.request("POST", b"x\n", basic("u", "hunter2-wrong")).status == 401
    elapsed = time.monotonic() - started
    server.wait_for_log(r"access 127\.0\.0\.1 POST /datastream 401")
    lines = re.findall(r"POST /datastream 401", server.log_text())
    assert 1 <= len(lines) <= int(elapsed) + 2
    assert len(lines) < 30 or elapsed > 28, "30 refusals in %.1fs were all logged" % elapsed
    assert "hunter2-wrong" not in server.log_text()


def test_path_restriction(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--path", "/streams/web", "--path", "/streams/api")
    assert push_status(server, path="/streams/web", batch_id="web") == 200
    assert push_status(server, path="/streams/api?x=1", batch_id="api") == 200
    for other in ("/", "/streams", "/streams/web/", "/streams/web/../api", "/STREAMS/web"):
        assert push_status(server, path=other) == 404, other
    assert len(server.stored_lines()) == 6


def test_health_check_needs_no_credentials(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BASIC_AUTH": "u:p"})
    with server.simulator() as ds:
        assert ds.request("GET", path="/healthz").status == 200


@pytest.mark.parametrize("args, env, mentions", [
    (["--auth-header", "X-Token"], {}, "--auth-header is set but no accepted values"),
    ([], {"DSRECEIVER_AUTH_QUERY_VALUE": "q"}, "--auth-query-param is not"),
    ([], {"DSRECEIVER_BASIC_AUTH": "no-colon"}, "user:password"),
    ([], {"DSRECEIVER_BEARER_TOKEN": "two words"}, "Bearer tokens are letters, digits and -._~+/ (RFC 6750)"),
    (["--auth-header", "Authorization"], {"DSRECEIVER_AUTH_HEADER_VALUE": "Bearer t"},
     "for Authorization: Bearer TOKEN, use --bearer-token-file or $DSRECEIVER_BEARER_TOKEN"),
])
def test_inconsistent_auth_settings_are_config_errors(start_server: Callable[..., ServerProcess],
                                                      args: List[str], env: Dict[str, str], mentions: str) -> None:
    server = start_server(*args, env=env, wait=False)
    assert server.wait_exit() == 2
    assert mentions in server.log_text() and "Traceback" not in server.log_text()
    assert len(server.log_text().strip().splitlines()) == 1
    wait_until(lambda: server.process is not None and server.process.poll() == 2, what="exit 2")
