"""The same pushes against the server started under every CPython 3.8-3.13 found on the machine."""

from __future__ import annotations

import gzip
from typing import Callable

import pytest

from conftest import ServerProcess, find_pythons
from simulator import expected_lines, make_batch

PYTHONS = find_pythons()
# Starts a server under each interpreter: `make test-fast` leaves it to the full suite.
pytestmark = pytest.mark.slow


def test_at_least_the_running_interpreter_is_found() -> None:
    assert PYTHONS, "no CPython 3.8-3.13 found on PATH or under pyenv"


@pytest.mark.parametrize("version", sorted(PYTHONS) or ["none"])
def test_pushes_under_each_python(start_server: Callable[..., ServerProcess], version: str) -> None:
    if version not in PYTHONS:
        pytest.skip("no interpreter found")
    server = start_server(python=PYTHONS[version])
    batches = [make_batch("py%s-plain" % version, count=300),
               make_batch("py%s-gzip" % version, count=300, fmt="structured", compress=True)]
    with server.simulator() as ds:
        assert ds.validate().status == 200
        assert ds.push(batches[0], chunked=True).status == 200
        assert ds.push(batches[1]).status == 200
        multi = gzip.compress(b"a\n") + gzip.compress(b"b")
        assert ds.request("POST", multi).status == 200
        assert ds.request("POST", b"\x1f\x8bcorrupt").status == 400
    assert server.stop() == 0
    assert server.stored_lines() == expected_lines(batches) + [b"a", b"b"]
