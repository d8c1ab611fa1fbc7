"""Health and metrics: /healthz follows storage, /metrics speaks the Prometheus text format."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from conftest import ServerProcess, read_until_close, wait_until
from simulator import make_batch

Sample = Tuple[str, Dict[str, str], float]
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Tuple[List[Sample], Dict[str, str]]:
    """A small parser of the Prometheus text format (0.0.4): samples, and the TYPE of each family."""
    samples: List[Sample] = []
    types: Dict[str, str] = {}
    helped = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name in helped, "TYPE before HELP for " + name
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE_RE.match(line)
            assert match, "malformed sample line: %r" % line
            labels = dict(LABEL_RE.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    for name, _, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, "sample without TYPE: " + name
        assert name.startswith("dsreceiver_")
    return samples, types


def value(samples: List[Sample], name: str, **labels: str) -> float:
    for sample_name, sample_labels, number in samples:
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return number
    raise AssertionError("no sample %s %s" % (name, labels))


def scrape(server: ServerProcess, headers: Optional[Dict[str, str]] = None) -> List[Sample]:
    with server.simulator() as ds:
        response = ds.request("GET", path="/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(response.body.decode())[0]


def test_metrics_count_what_happened(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    batch = make_batch("metrics", count=25, compress=True)
    with server.simulator() as ds:
        assert ds.validate().status == 200
        assert ds.push(batch, path="/streams/web").status == 200
        assert ds.push(batch, path="/streams/web").status == 200  # dedupe hit
        assert ds.request("POST", b"\x1f\x8bbad", path="/x").status == 400
    samples = scrape(server)
    assert value(samples, "dsreceiver_requests_total", status="200") == 3
    assert value(samples, "dsreceiver_requests_total", status="400") == 1
    assert value(samples, "dsreceiver_records_stored_total") == 25
    assert value(samples, "dsreceiver_validation_probes_total") == 1
    assert value(samples, "dsreceiver_dedupe_hits_total") == 1
    assert value(samples, "dsreceiver_received_bytes_total") == 2 * len(batch.body) + 26 + 5
    assert value(samples, "dsreceiver_decoded_bytes_total") == 2 * len(b"".join(line + b"\n" for line in batch.lines))
    assert value(samples, "dsreceiver_last_push_timestamp_seconds", path="/streams/web") > 1.7e9
    assert value(samples, "dsreceiver_open_connections") >= 1
    assert value(samples, "dsreceiver_fsync_duration_seconds_count") >= 1
    assert value(samples, "dsreceiver_fsync_duration_seconds_bucket", le="+Inf") == \
        value(samples, "dsreceiver_fsync_duration_seconds_count")


def test_metrics_count_auth_and_tls_failures_and_need_credentials(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BASIC_AUTH": "u:p"})
    with server.simulator() as ds:
        assert ds.request("GET", path="/metrics").status == 401
        assert ds.push(make_batch("x", count=1)).status == 401
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP to the TLS port
        read_until_close(plain)
    samples = scrape(server, {"Authorization": "Basic dTpw"})
    assert value(samples, "dsreceiver_auth_failures_total") == 2
    wait_until(lambda: value(scrape(server, {"Authorization": "Basic dTpw"}),
                             "dsreceiver_tls_handshake_failures_total") == 1, what="handshake failure counted")


def test_metrics_public(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--metrics-public", env={"DSRECEIVER_BASIC_AUTH": "u:p"})
    assert value(scrape(server), "dsreceiver_auth_failures_total") == 0  # scraped without credentials
    with server.simulator() as ds:
        assert ds.push(make_batch("still-protected", count=1)).status == 401


@pytest.mark.slow  # waits out the 10 s a storage failure keeps /healthz failing
def test_healthz_fails_while_the_disk_is_full_and_recovers(start_server: Callable[..., ServerProcess],
                                                           small_tmpfs: Path) -> None:
    server = start_server(output_dir=small_tmpfs / "data")
    with server.simulator() as ds:
        assert ds.request("GET", path="/healthz").status == 200
        for index in range(100):
            if ds.push(make_batch("fill%03d" % index, count=60)).status == 503:
                break
        else:
            raise AssertionError("the disk never filled")
        failing = ds.request("GET", path="/healthz")
        assert failing.status == 503
        assert b"no space left on device" in failing.body
        subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
        wait_until(lambda: ds.request("GET", path="/healthz").status == 200, timeout=30,
                   what="/healthz to recover once there is space")
        assert ds.push(make_batch("after", count=5)).status == 200


def test_json_log_format(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--log-format", "json")
    with server.simulator() as ds:
        assert ds.push(make_batch("json-log", count=3)).status == 200
    server.wait_for_log('"event": "access"')
    entries = [json.loads(line) for line in server.log_text().splitlines()]
    assert any("listening on https://127.0.0.1:" in entry["message"] for entry in entries)
    access = [entry for entry in entries if entry.get("event") == "access"]
    assert access[0]["status"] == 200 and access[0]["records"] == 3 and access[0]["method"] == "POST"
    assert all({"time", "level", "message"} <= set(entry) for entry in entries)
