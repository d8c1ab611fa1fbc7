"""Health and metrics: /healthz follows storage, /metrics speaks the Prometheus text format."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Callable

import pytest

import dsreceiver
from conftest import ServerProcess, read_until_close, scrape, value, wait_until
from simulator import make_batch

STREAM = dsreceiver.RoutedStream("", "61234")

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


# -- snapshots, in-process ------------------------------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def worker_metrics(clock: Clock, stream: str, records: int, uploader: str) -> dsreceiver.Metrics:
    metrics = dsreceiver.Metrics(clock)
    metrics.request_done(200, 1000)
    metrics.stored("/ds", records)
    metrics.stream_stored(dsreceiver.RoutedStream("", stream), records, 0, clock.now - 30, uploader, 5000)
    return metrics


def snapshot_of(metrics: dsreceiver.Metrics, started: float) -> dsreceiver.MetricsSnapshot:
    gauges = {"open_connections": 2.0, "inflight_bytes": 0.0, "start_time_seconds": started}
    return metrics.snapshot(gauges, dsreceiver.Histogram(dsreceiver.FSYNC_BUCKETS))


def test_snapshots_survive_the_wire_between_processes() -> None:
    clock = Clock(1_764_200_000.0)
    metrics = worker_metrics(clock, "61234", 40, "192.0.2.1")
    metrics.refused(503, "192.0.2.9", "/ds", "storage unavailable", STREAM)
    metrics.storage_failed("disk full")
    snapshot = snapshot_of(metrics, clock.now - 100)
    travelled = dsreceiver.MetricsSnapshot.from_wire(json.loads(json.dumps(snapshot.to_wire())))
    assert travelled == snapshot
    assert travelled.streams[STREAM].minutes == {int(clock.now // 60): [1, 40]}
    assert travelled.requests == {200: 1} and travelled.streams[STREAM].refusals == {503: 1}


def test_merge_sums_counts_and_keeps_the_latest_times() -> None:
    clock = Clock(1_764_200_000.0)
    first = worker_metrics(clock, "61234", 10, "192.0.2.1")
    first_snapshot = snapshot_of(first, clock.now - 50)
    clock.now += 5
    second = worker_metrics(clock, "61234", 15, "192.0.2.2")
    stored_at = clock.now
    clock.now += 1
    second.refused(503, "192.0.2.2", "/ds", "storage unavailable")
    merged = dsreceiver.MetricsSnapshot.merge([first_snapshot, snapshot_of(second, stored_at - 20)])
    assert merged.counters["records_stored"] == 25 and merged.requests == {200: 2}
    assert merged.gauges["open_connections"] == 4 and merged.gauges["start_time_seconds"] == stored_at - 55
    stats = merged.streams[STREAM]
    assert (stats.records, stats.batches, stats.last_push) == (25, 2, stored_at)
    assert set(stats.uploaders) == {"192.0.2.1", "192.0.2.2"}
    assert sum(records for _, records in stats.minutes.values()) == 25
    # The second worker's 503 came after both stored pushes: the streak is on.
    assert merged.streak_start == clock.now and merged.last_success == stored_at


def test_a_stored_push_on_any_worker_ends_the_503_streak() -> None:
    clock = Clock(1_764_200_000.0)
    failing = dsreceiver.Metrics(clock)
    failing.refused(503, "192.0.2.1", "/ds", "storage unavailable")
    failing.storage_failed("disk full")
    clock.now += 1
    healthy = worker_metrics(clock, "61234", 1, "192.0.2.2")
    merged = dsreceiver.MetricsSnapshot.merge([snapshot_of(failing, clock.now), snapshot_of(healthy, clock.now)])
    assert merged.streak_start == 0.0
    assert merged.storage_failure(clock.now) is None
    assert dsreceiver.MetricsSnapshot.merge([snapshot_of(failing, clock.now)]).storage_failure(clock.now) == "disk full"


def test_the_health_scope_leaves_the_streams_out() -> None:
    clock = Clock(1_764_200_000.0)
    metrics = worker_metrics(clock, "61234", 3, "192.0.2.1")
    gauges = {"open_connections": 0.0, "inflight_bytes": 0.0, "start_time_seconds": clock.now}
    health = metrics.snapshot(gauges, dsreceiver.Histogram(dsreceiver.FSYNC_BUCKETS), dsreceiver.SnapshotScope.HEALTH)
    assert health.streams == {} and health.last_success == clock.now


def test_refusals_keep_the_latest_across_workers() -> None:
    clock = Clock(1_764_200_000.0)
    snapshots = []
    for worker in range(3):
        metrics = dsreceiver.Metrics(clock)
        for _ in range(dsreceiver.MAX_REFUSALS):
            clock.now += 1
            metrics.refused(401, "192.0.2.%d" % worker, "/ds", "bad credentials")
        snapshots.append(snapshot_of(metrics, clock.now))
    merged = dsreceiver.MetricsSnapshot.merge(snapshots)
    assert len(merged.refusals) == dsreceiver.MAX_REFUSALS
    assert {refusal.client for refusal in merged.refusals} == {"192.0.2.2"}
