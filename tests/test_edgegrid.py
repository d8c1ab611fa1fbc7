"""EdgeGrid, in the standard library: the same Authorization header as Akamai's own edgegrid-python signer,
and .edgerc files read as it reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

import dsreceiver
from simulator import SAMPLES

requests = pytest.importorskip("requests")
edgegrid = pytest.importorskip("akamai.edgegrid")  # Akamai's official signer (requirements-test.txt)

EDGERC = SAMPLES / "edgerc-example"
TIMESTAMP = "20261201T23:05:00+0000"
NONCE = "0f6b9e51-7b41-4f38-9f2c-5d6b1f1c2a3e"


def reference(method: str, url: str, body: bytes = b"", max_body: int = 131072) -> str:
    """What edgegrid-python signs for this request, at TIMESTAMP with NONCE."""
    auth = edgegrid.EdgeGridAuth.from_edgerc(str(EDGERC), "default")
    auth.ah.max_body = max_body
    prepared = requests.Request(method, url, data=body or None).prepare()
    return str(auth.ah.make_auth_header(prepared, TIMESTAMP, NONCE))


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/datastream-config-api/v2/log/streams/metrics?start=2026-11-27T15%3A00%3A00Z"
            "&end=2026-11-27T16%3A00%3A00Z&streamId=61234&aggregationInterval=FIVE_MINUTE", b""),
    ("GET", "/datastream-config-api/v3/log/cdn/streams/61234", b""),
    ("POST", "/datastream-config-api/v3/log/cdn/streams", b'{"streamName": "web", "datasetFields": [1000]}'),
    ("PUT", "/datastream-config-api/v3/log/cdn/streams/61234", b'{"streamName": "put bodies are not hashed"}'),
])
def test_the_signature_is_the_official_signers(method: str, path: str, body: bytes) -> None:
    credentials = dsreceiver.read_edgerc(EDGERC)
    url = "https://%s%s" % (credentials.host, path)
    ours = dsreceiver.edgegrid_authorization(credentials, method, url, body, TIMESTAMP, NONCE)
    assert ours == reference(method, url, body)
    assert ours.startswith("EG1-HMAC-SHA256 client_token=akab-c113ntt0k3n4qtari252bfxxbsl-yvsdj;")


def test_a_post_body_is_hashed_only_up_to_max_body() -> None:
    credentials = dsreceiver.read_edgerc(EDGERC)._replace(max_body=16)
    url = "https://%s/datastream-config-api/v3/log/cdn/streams" % credentials.host
    long_body, other_tail = b"x" * 16 + b"tail one", b"x" * 16 + b"another tail"
    ours = dsreceiver.edgegrid_authorization(credentials, "POST", url, long_body, TIMESTAMP, NONCE)
    assert ours == reference("POST", url, long_body, max_body=16)
    assert ours == dsreceiver.edgegrid_authorization(credentials, "POST", url, other_tail, TIMESTAMP, NONCE)


def test_a_fresh_signature_has_its_own_time_and_nonce() -> None:
    credentials = dsreceiver.read_edgerc(EDGERC)
    url = "https://%s/datastream-config-api/v3/log/cdn/streams/61234" % credentials.host
    first, second = (dsreceiver.edgegrid_authorization(credentials, "GET", url) for _ in range(2))
    assert first != second and "nonce=" in first and "timestamp=2" in first


def test_edgerc_sections_and_their_problems(tmp_path: Path) -> None:
    assert dsreceiver.read_edgerc(EDGERC).host == "akab-h05tnam3wl42son7nktnlnnx-kbob3i3v.luna.akamaiapis.net"
    rc = tmp_path / ".edgerc"
    rc.write_text("[default]\nhost = https://akab-x.luna.akamaiapis.net/\nclient_token = a\nclient_secret = b%c\n"
                  "access_token = d\nmax_body = 2048\n[ccu]\nhost = h\n")
    credentials = dsreceiver.read_edgerc(rc)
    assert credentials == dsreceiver.EdgeGridCredentials("akab-x.luna.akamaiapis.net", "a", "b%c", "d", 2048)
    with pytest.raises(dsreceiver.ConfigError, match=r"lacks client_token, client_secret, access_token"):
        dsreceiver.read_edgerc(rc, "ccu")
    with pytest.raises(dsreceiver.ConfigError, match=r"has no \[papi\] section \(it has: default, ccu\)"):
        dsreceiver.read_edgerc(rc, "papi")
    with pytest.raises(dsreceiver.ConfigError, match=r"cannot read .*nowhere"):
        dsreceiver.read_edgerc(tmp_path / "nowhere")


def test_a_line_break_inside_a_token_is_one_line_naming_the_key_never_the_secret(tmp_path: Path) -> None:
    rc = tmp_path / ".edgerc"
    rc.write_text("[default]\nhost = akab-x.luna.akamaiapis.net\nclient_token = akab-first-half\n"
                  "  second-half-of-the-token\nclient_secret = s3cr3t-value\naccess_token = akab-access\n")
    with pytest.raises(dsreceiver.ConfigError) as refused:
        dsreceiver.read_edgerc(rc)
    message = str(refused.value)
    assert "client_token holds a space, a line break or a control character" in message and "\n" not in message
    assert not any(secret in message for secret in ("first-half", "second-half", "s3cr3t", "akab-access"))
    rc.write_text("[default]\nhost = akab-x.luna.akamaiapis.net/path?x=@evil.example\nclient_token = a\n"
                  "client_secret = b\naccess_token = c\n")
    with pytest.raises(dsreceiver.ConfigError, match="host must be a host name"):
        dsreceiver.read_edgerc(rc)


def test_an_edgerc_open_to_others_is_named_with_the_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rc = tmp_path / ".edgerc"
    rc.write_bytes(EDGERC.read_bytes())
    rc.chmod(0o644)
    dsreceiver.read_edgerc(rc)
    assert [record.getMessage() for record in caplog.records] == [
        "warning: %s holds API secrets and is open to its group or others (mode 0644): chmod 600 %s" % (rc, rc)]
    caplog.clear()
    rc.chmod(0o600)
    dsreceiver.read_edgerc(rc)
    assert caplog.records == []
