"""Scale-out: contrib/nginx-stream.conf in front of two instances spreads uploaders, each always to the same instance."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

from conftest import ServerProcess, start_nginx
from simulator import Batch, DataStreamSimulator, count_lines, make_batch


@pytest.fixture
def nginx_in_front(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> Iterator[Tuple[int, List[ServerProcess]]]:
    """nginx running contrib/nginx-stream.conf (ports and paths adapted) before two dsreceiver instances."""
    instances = [start_server(workdir=tmp_path / name) for name in ("a", "b")]
    process, port = start_nginx(tmp_path, [server.port for server in instances])
    try:
        yield port, instances
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_uploaders_spread_over_instances_and_stick_to_one(nginx_in_front: Tuple[int, List[ServerProcess]],
                                                          client_context: ssl.SSLContext) -> None:
    port, instances = nginx_in_front
    sent: Dict[str, List[Batch]] = {}
    for number in range(2, 14):
        source = "127.0.0.%d" % number
        sent[source] = [make_batch("from-%s-%d" % (source, i), count=50) for i in range(3)]
        for batch in sent[source]:  # a new connection each time, as many uploaders do
            with DataStreamSimulator("127.0.0.1", port, client_context, source_address=source) as ds:
                assert ds.push(batch).status == 200
        # A resend of the first batch reaches the same instance, whose dedup recognises it.
        with DataStreamSimulator("127.0.0.1", port, client_context, source_address=source) as ds:
            assert ds.push(sent[source][0]).body.startswith(b"already stored")
    per_instance = [server.stored_lines() for server in instances]
    assert all(per_instance), "one instance got nothing: %s" % [len(lines) for lines in per_instance]
    every_line = [line for batches in sent.values() for batch in batches for line in batch.lines]
    assert count_lines(per_instance[0] + per_instance[1]) == count_lines(every_line)
    for source, batches in sent.items():
        holders = {i for i, lines in enumerate(per_instance) if batches[0].lines[0] in lines}
        for batch in batches[1:]:
            assert {i for i, lines in enumerate(per_instance) if batch.lines[0] in lines} == holders, source
