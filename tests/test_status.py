"""The status page: /status in a real headless Chromium, /status.json, and /healthz answering for every worker."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import dsreceiver
from conftest import ROOT, ServerProcess, read_until_close, status_of, wait_until
from simulator import batch_of_lines, restreamed, sample_lines

CREDENTIALS = {"DSRECEIVER_BASIC_AUTH": "akamai:s3cret"}
AUTH = {"Authorization": "Basic " + base64.b64encode(b"akamai:s3cret").decode()}
MARKUP_PATH = "/<script>alert(1)</script>"


def push_two_streams(server: ServerProcess) -> None:
    """Stream 61234: 300 JSON records in 3 batches from two uploaders; stream 70001: 50 STRUCTURED records."""
    lines = sample_lines("json")
    for number, address in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.3")):
        with server.simulator(source_address=address, headers=AUTH) as ds:
            assert ds.push(batch_of_lines(lines[100 * number:100 * number + 100])).status == 200
    with server.simulator(headers=AUTH) as ds:
        assert ds.push(batch_of_lines(restreamed(sample_lines("structured")[:50], "70001"), compress=True)).status == 200
    # A refusal whose path is markup: the page must show it as text.
    with server.tls_connect() as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                     % MARKUP_PATH.encode())
        assert status_of(read_until_close(sock)) == 401


class StatusDom(HTMLParser):
    """Reads the rendered page: the stream rows' fields, every text, the elements seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: Dict[str, Dict[str, str]] = {}
        self.elements: List[str] = []
        self.texts: List[str] = []
        self._row: Optional[str] = None
        self._field: Optional[str] = None

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        attributes = dict(attrs)
        self.elements.append(tag)
        if tag == "tr" and attributes.get("data-stream"):
            self._row = attributes["data-stream"]
            self.rows[self._row or ""] = {}
        if tag == "td" and self._row is not None:
            self._field = attributes.get("data-field")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._field = None

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self._row is not None and self._field is not None:
            self.rows[self._row][self._field] = data


def chromium(server: ServerProcess, tmp_path: Path, cert_dir: Path, path: str, *flags: str) -> str:
    """Opens https://akamai:s3cret@localhost:PORT/PATH in headless Chromium, trusting exactly the server's key
    (as DataStream trusts an uploaded CA), and returns what it prints (the DOM with --dump-dom)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs it from Debian's packages)")
    cert = x509.load_pem_x509_certificate((cert_dir / "fullchain.pem").read_bytes())
    key = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(key).digest()).decode()
    profile = tmp_path / ("chromium-profile-%d" % len(list(tmp_path.glob("chromium-profile-*"))))
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--user-data-dir=%s" % profile, "--ignore-certificate-errors-spki-list=%s" % pin,
                             *flags, "https://akamai:s3cret@localhost:%d%s" % (server.port, path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def busy_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    server = start_server("--workers", "2", "--stream-config", str(ROOT / "tests" / "data" / "ds2-stream-61234.json"),
                          env=CREDENTIALS)
    push_two_streams(server)
    return server


def check_stream_rows(rows: Dict[str, Dict[str, str]]) -> None:
    assert set(rows) == {"61234", "70001"}
    assert (rows["61234"]["batches"], rows["61234"]["records"], rows["61234"]["uploaders"]) == ("3", "300", "2")
    assert (rows["70001"]["batches"], rows["70001"]["records"], rows["70001"]["uploaders"]) == ("1", "50", "1")


@pytest.mark.slow
def test_status_page_in_a_real_browser(busy_server: ServerProcess, tmp_path: Path, cert_dir: Path) -> None:
    dom = StatusDom()
    dom.feed(chromium(busy_server, tmp_path, cert_dir, "/status", "--dump-dom"))
    check_stream_rows(dom.rows)
    assert MARKUP_PATH in dom.texts, "the refused path must show as text"
    assert "script" not in dom.elements and "img" not in dom.elements
    screenshot = tmp_path / "status.png"
    chromium(busy_server, tmp_path, cert_dir, "/status", "--screenshot=%s" % screenshot, "--window-size=1280,900",
             "--hide-scrollbars")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("STATUS_SCREENSHOT"):  # how docs/status.png is made
        shutil.copy(str(screenshot), os.environ["STATUS_SCREENSHOT"])


@pytest.mark.slow
def test_status_page_works_without_javascript(busy_server: ServerProcess, tmp_path: Path, cert_dir: Path) -> None:
    dom = StatusDom()
    dom.feed(chromium(busy_server, tmp_path, cert_dir, "/status", "--dump-dom",
                      "--disable-javascript"))
    check_stream_rows(dom.rows)


def test_status_json_merges_every_worker_and_needs_credentials(busy_server: ServerProcess) -> None:
    with busy_server.simulator() as ds:
        assert ds.request("GET", path="/status.json").status == 401
        assert ds.request("GET", path="/status").status == 401
    for _ in range(4):  # fresh connections, whichever worker answers: the same, merged view
        with busy_server.simulator(headers=AUTH) as ds:
            response = ds.request("GET", path="/status.json")
        assert response.status == 200 and response.headers["content-type"] == "application/json"
        document = json.loads(response.body)
        rows = {row["stream"]: row for row in document["streams"]}
        assert (rows["61234"]["records_last_hour"], rows["70001"]["batches_last_hour"]) == (300, 1)
        assert sum(rows["61234"]["records_per_minute"]) == 300 and len(rows["61234"]["records_per_minute"]) == 60
        assert rows["61234"]["push_interval_seconds"] == 30 and not rows["61234"]["late"]
        assert rows["61234"]["event_lag_seconds"] > 0
        assert document["server"]["workers"] == 2 and document["server"]["authentication"] == ["basic"]
        assert document["server"]["tls"]["not_after"] > document["generated"]
        assert any(r["status"] == 401 and r["path"] == MARKUP_PATH for r in document["refusals"])
        assert document["storage"]["output_dir"] == str(busy_server.output_dir)
        assert document["storage"]["disk_free_bytes"] > 0 and document["storage"]["streak_seconds"] == 0


def test_status_page_is_locked_down(busy_server: ServerProcess) -> None:
    with busy_server.simulator(headers=AUTH) as ds:
        response = ds.request("GET", path="/status")
    assert response.status == 200
    headers = response.headers
    assert headers["content-type"] == "text/html; charset=utf-8"
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy
    style = response.body.split(b"<style>", 1)[1].split(b"</style>", 1)[0]
    assert "'sha256-%s'" % base64.b64encode(hashlib.sha256(style).digest()).decode() in policy
    assert (headers["x-content-type-options"], headers["x-frame-options"], headers["cache-control"]) == (
        "nosniff", "DENY", "no-store")
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in response.body and b"<script" not in response.body
    # No external asset: the only link is the JSON twin, relative; nothing is loaded from anywhere.
    assert re.findall(rb'(?:src|href|action)\s*=\s*"([^"]*)"', response.body) == [b"/status.json"]
    assert b"@import" not in style and b"url(" not in style


def test_status_public_needs_no_credentials(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--status-public", env=CREDENTIALS)
    with server.simulator() as ds:
        assert ds.request("GET", path="/status").status == 200
        assert ds.request("GET", path="/metrics").status == 401  # the metrics stay protected


def test_healthz_answers_for_every_worker(start_server: Callable[..., ServerProcess], small_tmpfs: Path) -> None:
    server = start_server("--workers", "2", output_dir=small_tmpfs / "data")

    def health_everywhere() -> List[int]:
        statuses = []
        for _ in range(8):  # fresh connections land on both workers
            with server.simulator() as ds:
                statuses.append(ds.request("GET", path="/healthz").status)
        return statuses

    assert health_everywhere() == [200] * 8
    with server.simulator() as ds:
        for index in range(100):
            if ds.push(batch_of_lines(sample_lines("json")[index * 10:index * 10 + 10])).status == 503:
                break
        else:
            raise AssertionError("the 256 KiB disk never filled")
    # A failure seen by one worker fails /healthz on all, once their verdicts (shared for a second) are renewed.
    wait_until(lambda: health_everywhere() == [503] * 8, what="every worker's /healthz to fail")
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    with server.simulator() as ds:
        wait_until(lambda: ds.push(batch_of_lines(restreamed(sample_lines("json")[:5], "70001"))).status == 200,
                   what="a push to succeed once there is space")
    wait_until(lambda: health_everywhere() == [200] * 8, what="a store after it to clear it on all")


def test_a_hundred_streams_render_whole() -> None:
    now = 1795889000.0
    streams = [{"route": "", "stream": str(61000 + n), "label": str(61000 + n), "last_push": now - n,
                "seconds_since_push": float(n),
                "push_interval_seconds": 30.0, "late": n > 90, "batches_last_hour": n, "records_last_hour": 100 * n,
                "records_per_minute": [n % 7] * 60, "uploaders_last_10_minutes": 3, "event_lag_seconds": 40.0,
                "dedupe_hits": 0, "refusals": {"503": 1}, "records_total": 100 * n,
                "reconciled": None if n % 2 else {"at": now - 600, "delivered": 500, "stored": 500 - n, "missing": n,
                                                  "failed": 0}} for n in range(100)]
    document = {"generated": now, "streams": streams, "refusals": [],
                "storage": {"output_dir": "/data", "disk_free_bytes": 10 ** 9, "disk_total_bytes": 10 ** 10,
                            "written_last_hour_bytes": 10 ** 6, "write_rate_bytes_per_second": 300.0,
                            "full_in_seconds": 3e6, "fsync_p50_seconds": 0.001, "fsync_p99_seconds": 0.01,
                            "last_error": None, "failing": None, "streak_started": None, "streak_seconds": 0.0,
                            "retry_horizon_seconds": 300.0},
                "server": {"version": "x", "uptime_seconds": 60.0, "workers": 2, "listening": "https://[::]:443",
                           "plain_http": False, "tls": None, "authentication": [], "open_connections": 1,
                           "inflight_bytes": 0}}
    dom = StatusDom()
    dom.feed(dsreceiver.render_status_page(document).decode())
    assert len(dom.rows) == 100 and dom.rows["61099"]["records"] == "9900"
    assert dom.elements.count("svg") == 100
    page = dsreceiver.render_status_page(document).decode()
    assert page.count(">never</td>") == 50 and "Akamai 500, stored 490, missing 10</td>" in page
