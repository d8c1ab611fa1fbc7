"""The same batch pushed by real HTTP clients (curl, openssl s_client, urllib, Node.js fetch): 200 and stored byte-identically."""

from __future__ import annotations

import gzip
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Callable, List

import pytest

from conftest import ServerProcess, wait_until
from simulator import make_batch

BATCH = make_batch("real-client", count=300)


@pytest.fixture
def receiver(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    # Every client sends the same batch: dedup would rightly store it once, so it is off here.
    return start_server("--dedupe-window", "0")


def assert_stored_copies(server: ServerProcess, copies: int) -> None:
    wait_until(lambda: len(server.stored_lines()) >= copies * len(BATCH.lines), what="%d copies stored" % copies)
    assert server.stored_bytes() == BATCH.body * copies


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip("%s is not installed" % tool)
    return path


@pytest.mark.parametrize("variant", [["--data-binary", "@{plain}"],
                                     ["--data-binary", "@{gz}", "-H", "Content-Encoding: gzip"],
                                     ["--data-binary", "@{plain}", "-H", "Transfer-Encoding: chunked"],
                                     ["--data-binary", "@{gz}", "-H", "Transfer-Encoding: chunked"]],
                         ids=["plain", "gzip", "chunked", "gzip-chunked"])
def test_curl(receiver: ServerProcess, ca_file: Path, tmp_path: Path, variant: List[str]) -> None:
    curl = require("curl")
    (tmp_path / "batch.txt").write_bytes(BATCH.body)
    (tmp_path / "batch.gz").write_bytes(gzip.compress(BATCH.body))
    args = [part.format(plain=tmp_path / "batch.txt", gz=tmp_path / "batch.gz") for part in variant]
    result = subprocess.run([curl, "--silent", "--show-error", "--fail", "--cacert", str(ca_file), *args,
                             "https://localhost:%d/datastream" % receiver.port], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"stored 300 records\n"
    assert_stored_copies(receiver, 1)


def test_openssl_s_client_with_a_hand_written_request(receiver: ServerProcess, ca_file: Path) -> None:
    openssl = require("openssl")
    request = (b"POST /datastream HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BATCH.body)) + BATCH.body
    result = subprocess.run([openssl, "s_client", "-connect", "127.0.0.1:%d" % receiver.port, "-servername",
                             "localhost", "-verify_hostname", "localhost", "-CAfile", str(ca_file),
                             "-verify_return_error", "-quiet"], input=request, capture_output=True, timeout=60)
    assert result.stdout.startswith(b"HTTP/1.1 200 OK\r\n"), result.stdout[:200] + result.stderr[-300:]
    assert_stored_copies(receiver, 1)


def test_python_urllib(receiver: ServerProcess, ca_file: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request("https://localhost:%d/datastream" % receiver.port, data=gzip.compress(BATCH.body),
                                     headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=30) as answer:
        assert answer.status == 200
    assert_stored_copies(receiver, 1)


NODE_PUSH = """
const fs = require('fs');
fetch(process.argv[1], {method: 'POST', body: fs.readFileSync(process.argv[2]),
                        headers: {'Content-Type': 'application/json', 'Content-Encoding': 'gzip'}})
  .then(async (r) => { process.stdout.write(r.status + ' ' + await r.text()); })
  .catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_fetch(receiver: ServerProcess, ca_file: Path, tmp_path: Path) -> None:
    node = require("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.skip("Node.js %s has no fetch" % version)
    (tmp_path / "batch.gz").write_bytes(gzip.compress(BATCH.body))
    result = subprocess.run([node, "-e", NODE_PUSH, "https://localhost:%d/datastream" % receiver.port,
                             str(tmp_path / "batch.gz")], capture_output=True, text=True, timeout=60,
                            env={"NODE_EXTRA_CA_CERTS": str(ca_file), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 stored 300 records\n"
    assert_stored_copies(receiver, 1)
