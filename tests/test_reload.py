"""Live reload: certificates (SIGHUP and renewed files), credential files, output files under logrotate."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Callable

import trustme

from conftest import ServerProcess, install_pair, push_held_after_continue, serial_seen, status_of
from simulator import make_batch


def test_sighup_reloads_the_certificate_while_a_push_is_in_flight(
        start_server: Callable[..., ServerProcess], ca: trustme.CA, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    first = install_pair(ca, live)
    server = start_server("--certs-dir", str(live), "--cert-check-interval", "3600")
    assert serial_seen(server) == first
    batch = make_batch("in-flight", count=500)
    with push_held_after_continue(server, len(batch.body)) as in_flight:
        second = install_pair(ca, live)
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"certificate reloaded \(SIGHUP\)")
        assert serial_seen(server) == second
        in_flight.sendall(batch.body)
        assert status_of(in_flight.recv(4096)) == 200
    assert server.stored_lines() == batch.lines


def test_renewed_files_are_picked_up_without_a_signal(start_server: Callable[..., ServerProcess], ca: trustme.CA,
                                                      tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    install_pair(ca, live)
    server = start_server("--certs-dir", str(live), "--cert-check-interval", "0.2")
    renewed = install_pair(ca, live)
    server.wait_for_log(r"certificate reloaded \(files changed\)")
    assert serial_seen(server) == renewed


def test_broken_new_pair_keeps_the_old_certificate(start_server: Callable[..., ServerProcess], ca: trustme.CA,
                                                   tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    first = install_pair(ca, live)
    server = start_server("--certs-dir", str(live), "--cert-check-interval", "3600")
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("x.example").private_key_pem.write_to_path(str(other_key))
    os.replace(str(other_key), str(live / "privkey.pem"))
    server.send_signal(signal.SIGHUP)
    line = server.wait_for_log(r".*certificate reload \(SIGHUP\) refused.*").group(0)
    assert "do not match" in line
    assert serial_seen(server) == first
    with server.simulator() as ds:
        assert ds.push(make_batch("after-broken", count=2)).status == 200


def test_sighup_rereads_credential_files(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    credentials = tmp_path / "basic"
    credentials.write_text("akamai:old\n")
    server = start_server("--basic-auth-file", str(credentials))
    old = {"Authorization": "Basic YWthbWFpOm9sZA=="}  # akamai:old
    new = {"Authorization": "Basic YWthbWFpOm5ldw=="}  # akamai:new
    with server.simulator() as ds:
        assert ds.push(make_batch("c1", count=1), headers=old).status == 200
        credentials.write_text("akamai:new\n")
        server.send_signal(signal.SIGHUP)
        server.wait_for_log("credentials reloaded: basic")
        assert ds.push(make_batch("c2", count=1), headers=old).status == 401
        assert ds.push(make_batch("c3", count=1), headers=new).status == 200


def test_logrotate_create_mode_rename_then_sighup(server: ServerProcess) -> None:
    first, second = make_batch("before-rotate", count=3), make_batch("after-rotate", count=4)
    with server.simulator() as ds:
        assert ds.push(first).status == 200
        [current] = server.data_files()
        rotated = current.with_name(current.name + ".1")
        current.rename(rotated)
        server.send_signal(signal.SIGHUP)
        server.wait_for_log("reopened 1 output files that were moved")
        assert ds.push(second).status == 200
    assert rotated.read_bytes() == first.body
    assert current.read_bytes() == second.body


def test_logrotate_copytruncate_mode(server: ServerProcess) -> None:
    first, second = make_batch("before-copy", count=3), make_batch("after-copy", count=4)
    with server.simulator() as ds:
        assert ds.push(first).status == 200
        [current] = server.data_files()
        shutil.copyfile(str(current), str(current) + ".1")
        with current.open("r+b") as handle:
            handle.truncate(0)
        assert ds.push(second).status == 200
    assert Path(str(current) + ".1").read_bytes() == first.body
    assert current.read_bytes() == second.body  # appended at the new end: no hole, no zeros
