"""Scale-out: contrib/nginx-stream.conf in front of two instances spreads uploaders, each always to the same instance."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

from conftest import ROOT, ServerProcess, wait_until
from simulator import Batch, DataStreamSimulator, count_lines, free_port, make_batch

STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@pytest.fixture
def nginx_in_front(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> Iterator[Tuple[int, List[ServerProcess]]]:
    """nginx running contrib/nginx-stream.conf (ports and paths adapted) before two dsreceiver instances."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None or not STREAM_MODULE.exists():
        pytest.skip("nginx with the stream module is not installed (.ci/run installs it)")
    instances = [start_server(workdir=tmp_path / name) for name in ("a", "b")]
    port = free_port()
    conf = (ROOT / "contrib" / "nginx-stream.conf").read_text()
    conf = conf.replace("server 127.0.0.1:8444;", "server 127.0.0.1:%d;" % instances[0].port)
    conf = conf.replace("server 127.0.0.1:8445;", "server 127.0.0.1:%d;" % instances[1].port)
    conf = re.sub(r"listen 443;", "listen 127.0.0.1:%d;" % port, conf)
    conf = "pid %s;\nerror_log %s;\n" % (tmp_path / "nginx.pid", tmp_path / "nginx-error.log") + conf
    (tmp_path / "nginx.conf").write_text(conf)
    process = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, what="nginx to listen")
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
