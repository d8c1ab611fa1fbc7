"""Monitoring with the operator's own tools: the alert rules under promtool, a real Prometheus scraping
/metrics over TLS with credentials, and promtool's lint of a scrape."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import pytest

from conftest import ROOT, ServerProcess, scrape, value, wait_until
from simulator import batch_of_lines, free_port, sample_lines

RULES = ROOT / "contrib" / "prometheus"
CREDENTIALS = {"DSRECEIVER_BASIC_AUTH": "akamai:s3cret"}
GOOD = {"Authorization": "Basic " + base64.b64encode(b"akamai:s3cret").decode()}
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (.ci/run installs Debian's prometheus)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus is not installed (.ci/run installs Debian's prometheus)")


@needs_promtool
def test_the_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES / "alerts.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 8 rules found" in check.stdout, check.stdout + check.stderr
    tests = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=str(RULES), capture_output=True,
                           text=True, timeout=60)
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr


@needs_promtool
def test_promtool_finds_nothing_to_lint_in_a_scrape(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2", env=CREDENTIALS)
    with server.simulator(headers=GOOD) as ds:
        assert ds.push(batch_of_lines(sample_lines("json")[:50])).status == 200
        exposition = ds.request("GET", path="/metrics").body
    lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert lint.returncode == 0 and lint.stdout + lint.stderr == b"", lint.stdout + lint.stderr


class Prometheus:
    """A real Prometheus (Debian's) scraping one target every second, and its HTTP API."""

    def __init__(self, folder: Path, target_port: int, ca_file: Path) -> None:
        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{
                "job_name": "dsreceiver", "scheme": "https",
                "tls_config": {"ca_file": str(ca_file), "server_name": "localhost"},
                "basic_auth": {"username": "akamai", "password": "s3cret"},
                "static_configs": [{"targets": ["127.0.0.1:%d" % target_port]}]}]}))
        self.log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            ["prometheus", "--config.file", str(config), "--storage.tsdb.path", str(folder / "tsdb"),
             "--web.listen-address", "127.0.0.1:%d" % self.port, "--log.level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: "Ready" in (self.get("/-/ready", raw=True) or ""), 60, "Prometheus to be ready")

    def get(self, path: str, raw: bool = False, **query: str) -> Any:
        """GETs an API path; None while Prometheus does not answer yet."""
        url = "http://127.0.0.1:%d%s?%s" % (self.port, path, urllib.parse.urlencode(query))
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                body = answer.read().decode()
        except OSError:
            if self.process.poll() is not None:
                raise AssertionError("Prometheus exited: %s" % Path(self.log.name).read_text()) from None
            return None
        return body if raw else json.loads(body)

    def sample(self, expression: str) -> Optional[float]:
        """The value of an instant query with one result, None before it has one."""
        answer = self.get("/api/v1/query", query=expression)
        results = answer["data"]["result"] if answer else []
        return float(results[0]["value"][1]) if len(results) == 1 else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path, ca_file: Path) -> Iterator[Callable[[ServerProcess], Prometheus]]:
    started = []

    def start(server: ServerProcess) -> Prometheus:
        started.append(Prometheus(tmp_path, server.port, ca_file))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


@needs_prometheus
def test_a_real_prometheus_scrapes_the_series_with_their_types_and_values(
        start_server: Callable[..., ServerProcess], prometheus_for: Callable[[ServerProcess], Prometheus]) -> None:
    server = start_server("--workers", "2", env=CREDENTIALS)
    with server.simulator(headers=GOOD) as ds:
        for start in (0, 100, 200):
            assert ds.push(batch_of_lines(sample_lines("json")[start:start + 100])).status == 200
    ours = scrape(server, GOOD)
    prometheus = prometheus_for(server)
    wait_until(lambda: prometheus.sample("dsreceiver_records_stored_total") == 300, 60, "300 records in Prometheus")
    assert prometheus.sample('dsreceiver_stream_records_total{stream="61234"}') == 300
    assert prometheus.sample('dsreceiver_stream_push_interval_seconds{stream="61234"}') == 60
    assert prometheus.sample("dsreceiver_worker_restarts_total") == 0
    assert prometheus.sample("dsreceiver_disk_free_bytes") == pytest.approx(
        value(ours, "dsreceiver_disk_free_bytes"), rel=0.05)
    assert prometheus.sample("dsreceiver_certificate_expiry_timestamp_seconds") == value(
        ours, "dsreceiver_certificate_expiry_timestamp_seconds")
    [target] = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
    assert target["health"] == "up" and target["scrapeUrl"].startswith("https://")
    metadata: Dict[str, Any] = prometheus.get("/api/v1/metadata")["data"]
    kinds = {name: entries[0]["type"] for name, entries in metadata.items()}
    assert kinds["dsreceiver_records_stored_total"] == "counter"
    assert kinds["dsreceiver_requests_total"] == "counter"
    assert kinds["dsreceiver_stream_last_push_timestamp_seconds"] == "gauge"
    assert kinds["dsreceiver_fsync_duration_seconds"] == "histogram"
