"""--workers: several processes on one port, each with its own files, sharing dedup, metrics, signals."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Callable, List

import trustme

from conftest import (ServerProcess, install_pair, push_concurrently, push_held_after_continue,
                      scrape, serial_seen, status_of, value, wait_until)
from simulator import count_lines, expected_lines, make_batch


def worker_pids(server: ServerProcess) -> List[int]:
    match = server.wait_for_log(r"started 2 workers \(pids (\d+) (\d+)\)")
    return [int(match.group(1)), int(match.group(2))]


def test_pushes_spread_over_workers_and_every_line_is_stored_once(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    batches = [make_batch("spread-%02d" % i, count=100) for i in range(40)]
    assert push_concurrently(server, batches) == [200] * 40
    names = sorted(path.name for path in server.data_files())
    assert len(names) == 2 and re.fullmatch(r"\S+Z\.w1\.log", names[0]) and re.fullmatch(r"\S+Z\.w2\.log", names[1])
    assert count_lines(server.stored_lines()) == count_lines(expected_lines(batches))


def test_a_batch_resent_to_another_worker_is_stored_once(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    batch = make_batch("resent", count=300)
    assert push_concurrently(server, [batch] * 16) == [200] * 16
    assert server.stored_lines() == batch.lines
    server.wait_for_log(r"\(duplicate", count=15)


def test_metrics_are_summed_over_workers(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    batches = [make_batch("counted-%02d" % i, count=10) for i in range(30)]
    assert push_concurrently(server, batches) == [200] * 30
    for _ in range(4):  # whichever worker answers, the sum is the same
        samples = scrape(server)
        assert value(samples, "dsreceiver_records_stored_total") == 300
        assert value(samples, "dsreceiver_batches_stored_total") == 30


def test_sigterm_lets_workers_finish_in_flight_pushes(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    batch = make_batch("in-flight", count=1000)
    with push_held_after_continue(server, len(batch.body)) as sock:
        server.send_signal(signal.SIGTERM)
        server.wait_for_log("stopping 2 workers")
        sock.sendall(batch.body)
        assert status_of(sock.recv(4096)) == 200
    assert server.wait_exit() == 0
    assert server.stored_lines() == batch.lines
    assert server.log_text().count("stopped") >= 2


def test_sighup_reaches_every_worker(start_server: Callable[..., ServerProcess], ca: trustme.CA,
                                     tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    install_pair(ca, live)
    server = start_server("--workers", "2", "--certs-dir", str(live), "--cert-check-interval", "3600")
    renewed = install_pair(ca, live)
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"certificate reloaded \(SIGHUP\)", count=2)
    assert {serial_seen(server) for _ in range(8)} == {renewed}


def test_a_killed_worker_is_recovered_and_restarted(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    pids = worker_pids(server)
    stored = make_batch("before-kill", count=200)
    assert push_concurrently(server, [stored]) == [200]
    [data_file] = server.data_files()
    victim = pids[0] if ".w1." in data_file.name else pids[1]
    with data_file.open("ab") as handle:
        handle.write(b'{"half":"a batch that never got its 200"}\n')
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(r"worker \d \(pid %d\) exited with -9; restarting it" % victim)
    server.wait_for_log("moved 42 bytes of an unacknowledged batch")
    # The batch it stored before dying is known to every worker: resending stores nothing new.
    assert push_concurrently(server, [stored] * 6) == [200] * 6
    after = make_batch("after-kill", count=50)
    assert push_concurrently(server, [after]) == [200]
    assert count_lines(server.stored_lines()) == count_lines(stored.lines + after.lines)
    assert value(scrape(server), "dsreceiver_worker_restarts_total") == 1  # what the restart alert watches
    assert server.stop() == 0


def test_workers_stop_when_their_supervisor_dies(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    pids = worker_pids(server)
    server.send_signal(signal.SIGKILL)
    server.wait_exit()
    # The supervisor is gone on purpose, so wait on its workers' log lines directly.
    wait_until(lambda: server.log_text().count("the supervisor process is gone: stopping this worker") == 2,
               what="both workers to notice")

    def all_gone() -> bool:
        return not any(Path("/proc/%d" % pid).exists() and "Z" not in
                       Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0] for pid in pids)

    wait_until(all_gone, what="orphaned workers to exit")
