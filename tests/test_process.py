"""Process and deployment options: privilege drop, plain HTTP behind a proxy, trusted X-Forwarded-For, no tracebacks."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DSRECEIVER, ServerProcess
from simulator import DataStreamSimulator, make_batch


@pytest.fixture
def world_writable_dir() -> Iterator[Path]:
    """An output folder an unprivileged account can write (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="dsreceiver-user-"))
    folder.chmod(0o777)
    yield folder
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


def test_privileges_are_dropped_after_binding(start_server: Callable[..., ServerProcess],
                                              world_writable_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root (CI runs as root)")
    nobody = pwd.getpwnam("nobody")
    server = start_server("--user", "nobody", output_dir=world_writable_dir / "data")
    with server.simulator() as ds:
        assert ds.push(make_batch("as-nobody", count=3)).status == 200
    assert server.process is not None
    status = Path("/proc/%d/status" % server.process.pid).read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(nobody.pw_uid)}
    for path in server.data_files():
        assert path.stat().st_uid == nobody.pw_uid


def test_plain_http_mode_listens_on_loopback_by_default(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--http", host=None)
    server.wait_for_log(r"listening on http://127\.0\.0\.1:\d+")
    batch = make_batch("behind-proxy", count=4, compress=True)
    with DataStreamSimulator("127.0.0.1", server.port, None) as ds:
        assert ds.push(batch).status == 200
    assert server.stored_lines() == batch.lines


def test_forwarded_for_is_trusted_only_from_the_proxy(start_server: Callable[..., ServerProcess]) -> None:
    trusting = start_server("--http", "--trusted-proxy", "127.0.0.0/8")
    with DataStreamSimulator("127.0.0.1", trusting.port, None) as ds:
        assert ds.request("GET", path="/healthz", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}).status == 200
    trusting.wait_for_log(r"access 203\.0\.113\.9 GET /healthz 200")
    trusting.stop()
    distrusting = start_server("--http", "--trusted-proxy", "10.0.0.0/8")
    with DataStreamSimulator("127.0.0.1", distrusting.port, None) as ds:
        assert ds.request("GET", path="/healthz", headers={"X-Forwarded-For": "203.0.113.9"}).status == 200
    distrusting.wait_for_log(r"access 127\.0\.0\.1 GET /healthz 200")


FAULTY_WRAPPER = """\
import sys
sys.path.insert(0, {root!r})
import dsreceiver


def broken_answer(self, exchange, outcome):
    raise RuntimeError("internal detail: /etc/dsreceiver/secret")


dsreceiver.ConnectionHandler.answer_push = broken_answer
sys.exit(dsreceiver.main())
"""


def test_unexpected_errors_are_500_without_detail(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    wrapper = tmp_path / "faulty_dsreceiver.py"
    wrapper.write_text(FAULTY_WRAPPER.format(root=str(DSRECEIVER.parent)))
    server = start_server(script=wrapper)
    with server.simulator() as ds:
        response = ds.push(make_batch("boom", count=3))
        assert response.status == 500
        assert response.body == b"internal error\n"
        assert ds.request("GET", path="/healthz").status == 200  # still serving
    server.wait_for_log(r"(?s)ERROR unexpected error serving 127\.0\.0\.1.*Traceback.*RuntimeError: internal detail")
