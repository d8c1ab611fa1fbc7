"""A fleet end to end, with the operators' own tools: two instances behind contrib/nginx-stream.conf, their sealed
files shipped by rclone (`dsreceiver.py sealed | rclone copy --files-from-raw -`) into an S3 endpoint (moto's
server), read there by ClickHouse's engine (chDB's s3()), and reconciled from a copy of the bucket as the hosts
themselves reconcile."""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import trustme

import dsreceiver
from conftest import DSRECEIVER, ROOT, ServerProcess, run_command, start_nginx, wait_until
from simulator import Batch, DataStreamSimulator, free_port, make_batch, restreamed, batch_of_lines
from test_reconcile import AkamaiStandIn, reconcile

pytestmark = pytest.mark.slow

KEY, SECRET = "fleet-test-key", "fleet-test-secret"
SOURCES = ["127.0.0.%d" % number for number in range(2, 14)]
STREAMS = ("61234", "70001")
WINDOW = 300
FLEET_README = (ROOT / "README.md").read_text().partition("### A fleet in object storage")[2].split("\n## ", 1)[0]
SHIP_SCRIPT = re.search(r"```sh\n(#!/bin/bash\n.*?)```", FLEET_README, re.S)
FLEET_SQL = re.search(r"```sql\n(.*?)\n\s*```", FLEET_README, re.S)


@pytest.fixture(scope="module")
def s3_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """moto's S3 server on 127.0.0.1 (plain HTTP), for rclone to ship into and ClickHouse to read from."""
    pytest.importorskip("moto")
    if shutil.which("rclone") is None:
        pytest.skip("rclone is not installed (.ci/run installs it)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)

    def listening() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, timeout=60, what="moto's S3 server to listen")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def rclone_env(port: int, tmp_path: Path) -> Dict[str, str]:
    """rclone configured by environment alone: the remote `s3:` is the local S3 endpoint."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RCLONE_") and key != "AWS_CA_BUNDLE"}  # rclone refuses this one here
    env.update(RCLONE_CONFIG=str(tmp_path / "rclone.conf"), RCLONE_CONFIG_S3_TYPE="s3",
               RCLONE_CONFIG_S3_PROVIDER="Other", RCLONE_CONFIG_S3_ENDPOINT="http://127.0.0.1:%d" % port,
               RCLONE_CONFIG_S3_ACCESS_KEY_ID=KEY, RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=SECRET,
               RCLONE_CONFIG_S3_REGION="us-east-1", RCLONE_CONFIG_S3_FORCE_PATH_STYLE="true",
               NO_PROXY="127.0.0.1")
    (tmp_path / "rclone.conf").write_text("")
    return env


def rclone(env: Dict[str, str], *args: str) -> str:
    """Runs rclone to its end; returns what it logged."""
    done = subprocess.run(["rclone", *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def substituted(text: str, replacements: Dict[str, str]) -> str:
    """The README's text with its example names replaced by the test's, each of which must be there."""
    for example, real in replacements.items():
        assert example in text, "the README's example no longer has %r" % example
        text = text.replace(example, real)
    return text


def ship(env: Dict[str, str], root: Path, bucket: str, receiver: str) -> List[str]:
    """The README's shipping script, run for one host; returns the files rclone copied."""
    assert SHIP_SCRIPT, "README has no shipping script (#!/bin/bash) under 'A fleet in object storage'"
    script = substituted(SHIP_SCRIPT.group(1), {
        "python3 /opt/dsreceiver/dsreceiver.py": "%s %s" % (sys.executable, DSRECEIVER),
        "/var/lib/dsreceiver/data": str(root),
        "s3:logs-bucket/datastream/receiver=$(hostname -s)": "s3:%s/receiver=%s" % (bucket, receiver),
        "--files-from-raw -": "--files-from-raw - -v"})
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.findall(r"INFO  : (\S+): Copied \((?:new|replaced existing)\)", done.stderr)


def bucket_objects(env: Dict[str, str], bucket: str) -> Dict[str, Tuple[int, str]]:
    """Every object of the bucket: key -> (size, modification time)."""
    listing = rclone(env, "lsjson", "-R", "--files-only", "s3:" + bucket)
    return {entry["Path"]: (entry["Size"], entry["ModTime"]) for entry in json.loads(listing[listing.index("["):])}


def data_files(root: Path) -> List[Path]:
    """Every data file of an output folder, as Layout names them."""
    return sorted(path for path, _ in dsreceiver.Layout(root).data_files(compressed=True))


def is_sealed(path: Path) -> bool:
    return dsreceiver.Layout.manifest_path(path).exists()


def being_written(root: Path) -> List[Path]:
    """The newest file of each folder, worker and period: the one pushes append to."""
    newest: Dict[Tuple[Path, str, str], Tuple[int, Path]] = {}
    for path in data_files(root):
        name = dsreceiver.Layout.parse(path.name)
        assert name is not None
        key = (path.parent, name.period, name.tag)
        if key not in newest or newest[key][0] < name.sequence:
            newest[key] = (name.sequence, path)
    return sorted(path for _, path in newest.values())


def only_the_newest_unsealed(root: Path) -> bool:
    """Whether some files rolled and every file but the newest of each folder, worker and period is sealed."""
    files = data_files(root)
    return any(map(is_sealed, files)) and {path for path in files if not is_sealed(path)} <= set(being_written(root))


def all_sealed(root: Path) -> bool:
    return all(is_sealed(path) for path in data_files(root))


def records_of(path: Path) -> List[bytes]:
    """A data file's records; those of its compressed copy when housekeeping gzip'd it since it was listed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path = dsreceiver.Layout.compressed_path(path)
        data = path.read_bytes()
    return (gzip.decompress(data) if path.name.endswith(".gz") else data).split(b"\n")[:-1]


def relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


class Uploads:
    """What the uploaders pushed through nginx and got a 200 for, per stream and 5-minute window."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.acknowledged: Counter[Tuple[str, int]] = Counter()
        self.records: Counter[str] = Counter()
        self.first: Dict[str, Batch] = {}
        # When the last 200 came.
        self.last = 0.0

    def push(self, source: str, batch: Batch, stream: str, retry: bool = False) -> None:
        # A new connection each time, as many uploaders do.
        with DataStreamSimulator("127.0.0.1", self.port, self.context, source_address=source) as ds:
            response = ds.push(batch)
        assert response.status == 200, response.body
        assert response.body.startswith(b"already stored") == retry, response.body
        if not retry:
            self.acknowledged[(stream, int(time.time()) // WINDOW * WINDOW)] += len(batch.lines)
            self.records[stream] += len(batch.lines)
            self.first.setdefault(source, batch)
        self.last = time.time()

    def batch(self, name: str, number: int) -> Tuple[Batch, str]:
        """A batch of 30 records of one of the two streams (every other one gzip'd)."""
        stream = STREAMS[number % 2]
        lines = make_batch(name, count=30).lines
        return batch_of_lines(restreamed(lines, stream) if stream != "61234" else lines,
                              compress=number % 3 == 0), stream


@pytest.mark.parametrize("storage", [["--store", "gzip"], ["--compress-rotated"], []],
                         ids=["store-gzip", "compress-rotated", "plain"])
def test_a_fleet_ships_sealed_files_that_clickhouse_reads_and_reconcile_counts_from_the_bucket(
        storage: List[str], s3_port: int, tmp_path: Path, start_server: Callable[..., ServerProcess],
        client_context: ssl.SSLContext, ca: trustme.CA) -> None:
    started = time.time()
    bucket = "fleet-" + (storage[-1].strip("-") if storage else "plain")
    env = rclone_env(s3_port, tmp_path)
    rclone(env, "mkdir", "s3:" + bucket)  # the shipping script leaves that to the operator (--s3-no-check-bucket)
    instances = [start_server("--workers", "2", "--max-file-size", "4K", *storage, workdir=tmp_path / name)
                 for name in ("a", "b")]
    roots = {name: server.output_dir for name, server in zip("ab", instances)}
    nginx, port = start_nginx(tmp_path, [server.port for server in instances])
    try:
        uploads = Uploads(port, client_context)
        for source in SOURCES:
            for number in range(3):
                uploads.push(source, *uploads.batch("%s-%d" % (source, number), number))
            batch, stream = uploads.batch("%s-0" % source, 0)
            uploads.push(source, batch, stream, retry=True)  # DataStream's resend reaches the same instance
        holders = {name: {source for source, batch in uploads.first.items()
                          if batch.lines[0] in {line for path in data_files(root) for line in records_of(path)}}
                   for name, root in roots.items()}
        assert holders["a"] and holders["b"], "nginx sent every uploader to one instance: %s" % holders

        # Rolled files are sealed within a second or so; the newest of each folder and worker is being written.
        for root in roots.values():
            wait_until(functools.partial(only_the_newest_unsealed, root), what="rolled files to be sealed")
        unsealed = {name: [path for path in being_written(root) if not is_sealed(path)] for name, root in roots.items()}
        assert unsealed["a"] and unsealed["b"]
        for name, root in roots.items():
            assert ship(env, root, bucket, name)
        shipped = bucket_objects(env, bucket)
        for name, root in roots.items():
            layout = dsreceiver.Layout(root)
            in_bucket = {key.split("/", 1)[1] for key in shipped if key.startswith("receiver=%s/" % name)}
            assert {relative(root, path) for path in data_files(root) if is_sealed(path)} == \
                {key for key in in_bucket if dsreceiver.Layout.parse(key.rsplit("/", 1)[-1])}
            for path in unsealed[name]:  # neither the file being written nor its index travels
                assert relative(root, path) not in in_bucket
                assert relative(root, layout.index_path(path)) not in in_bucket
            assert all(relative(root, dsreceiver.Layout.manifest_path(path)) in in_bucket
                       for path in data_files(root) if is_sealed(path))

        # Akamai's stand-in says what the uploaders were answered 200 for.
        akamai = AkamaiStandIn(ca, tmp_path)
        (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
        trust = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}  # the commands trust the stand-in as a proxy's CA
        copy = tmp_path / "copy"
        try:

            def fleet_reconcile(*folders: Path) -> Tuple[int, Dict[str, Any]]:
                """reconcile --json over these output folders, from the test's start until now."""
                akamai.metrics = []
                for (stream, window), records in uploads.acknowledged.items():
                    akamai.deliver(stream, window, records)
                done = reconcile(akamai, trust, "--json", since=int(started), until=int(uploads.last), roots=folders)
                assert done.returncode in (0, 1), done.stderr
                return done.returncode, json.loads(done.stdout)

            def bucket_copy() -> Tuple[Path, Path]:
                """The bucket copied back to a local folder, as an operator would: each host's output folder."""
                rclone(env, "copy", "s3:" + bucket, str(copy))
                return copy / "receiver=a", copy / "receiver=b"

            # The hosts hold everything; the bucket only what is sealed, and reconcile over it says so.
            assert fleet_reconcile(*roots.values())[0] == 0
            code, report = fleet_reconcile(*bucket_copy())
            assert code == 1, report
            held = Counter({stream: 0 for stream in STREAMS})
            for path in unsealed["a"] + unsealed["b"]:
                held[path.parent.name[len("stream="):]] += len(records_of(path))
            assert {row["stream"]: (row["missing"], row["extra"]) for row in report["streams"]} == \
                {stream: (held[stream], 0) for stream in STREAMS}

            # Instance b goes down: nginx moves its uploaders to a, which stores their pushes.
            assert instances[1].stop() == 0
            down = {source: uploads.batch("%s-down" % source, 1) for source in SOURCES}
            for source, (batch, stream) in down.items():
                uploads.push(source, batch, stream)
            on_a = {line for path in data_files(roots["a"]) for line in records_of(path)}
            assert all(down[source][0].lines[0] in on_a for source in holders["b"])

            # Restarts finish every file of the previous runs; the next shipping run takes them.
            assert instances[0].stop() == 0
            for server in instances:
                server.start()
            for root in roots.values():
                wait_until(functools.partial(all_sealed, root), what="every file to be sealed after the restart")
            copied = [path for name, root in roots.items() for path in ship(env, root, bucket, name)]
            assert any(dsreceiver.Layout.parse(path.rsplit("/", 1)[-1]) for path in copied)
            before = bucket_objects(env, bucket)
            # What was sealed when first shipped was not shipped again (answers files grow, and go again).
            assert all(before[key] == shipped[key] for key in shipped if "/.dsreceiver/answers/" not in key)
            assert [path for name, root in roots.items() for path in ship(env, root, bucket, name)] == []
            assert bucket_objects(env, bucket) == before

            # ClickHouse's engine reads the bucket: every acknowledged record, per stream, exactly once.
            chdb = pytest.importorskip("chdb")
            source_sql = ("s3('http://127.0.0.1:%d/%s/receiver=*/stream=*/2*.log*', '%s', '%s', 'JSONEachRow',"
                          " 'reqId String, streamId String')" % (s3_port, bucket, KEY, SECRET))
            assert FLEET_SQL, "README has no ClickHouse query under 'A fleet in object storage'"
            readme_query = substituted(FLEET_SQL.group(1), {
                "https://logs-bucket.s3.amazonaws.com/datastream/": "http://127.0.0.1:%d/%s/" % (s3_port, bucket),
                "'KEY_ID', 'SECRET'": "'%s', '%s'" % (KEY, SECRET)})
            answer = json.loads(chdb.query(readme_query, "JSON").bytes())["data"]
            per_stream: Counter[str] = Counter()
            for row in answer:
                per_stream[row["stream"]] += int(row["records"])
                assert int(row["requests"]) == int(row["records"])
                local = sum(len(records_of(path)) for path in data_files(roots[row["receiver"]])
                            if path.parent.name == "stream=" + row["stream"])
                assert int(row["records"]) == local
            [total] = json.loads(chdb.query(
                "SELECT count() AS n, uniqExact(reqId) AS u, countIf(_path NOT LIKE concat('%%/stream=', streamId, '/%%'))"
                " AS misfiled FROM %s" % source_sql, "JSON").bytes())["data"]
            assert int(total["misfiled"]) == 0
            assert int(total["n"]) == int(total["u"]) == sum(uploads.records.values())
            assert dict(per_stream) == dict(uploads.records)
            assert {row["receiver"] for row in answer} == {"a", "b"}

            # The fleet reconciled from a copy of the bucket: the verdicts the hosts' own folders give.
            shutil.rmtree(str(copy))
            from_bucket = fleet_reconcile(*bucket_copy())
            from_hosts = fleet_reconcile(*roots.values())
            assert from_bucket == from_hosts and from_bucket[0] == 0, from_bucket
            assert all(row["missing"] == row["extra"] == 0 for row in from_bucket[1]["streams"])
            assert [row["stored"] for row in from_bucket[1]["streams"]] == [uploads.records[s] for s in STREAMS]
            folders = [arg for root in roots.values() for arg in ("--output-dir", str(root))]
            ledgers = [run_command("ledger", "--json", "--since", "2h", *args)
                       for args in (folders, ["--output-dir", str(copy / "receiver=a"),
                                              "--output-dir", str(copy / "receiver=b")])]
            assert ledgers[0].returncode == ledgers[1].returncode == 0
            assert ledgers[0].stdout == ledgers[1].stdout and ledgers[0].stdout
            # One instance's shipment held back: its records are MISSING.
            code, report = fleet_reconcile(copy / "receiver=a")
            assert code == 1 and report["verdict"].startswith("verdict: INCOMPLETE: "), report
            assert sum(row["missing"] for row in report["streams"]) == sum(
                len(records_of(path)) for path in data_files(roots["b"])), report
        finally:
            akamai.stop()
    finally:
        nginx.send_signal(signal.SIGTERM)
        nginx.wait(timeout=30)


def test_sealed_lists_only_finished_files_with_their_ledger_and_refuses_bad_usage(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path / "data")
    dsreceiver.prepare_output(layout, 0)
    storage = dsreceiver.Storage(layout, max_file_size=1)
    for number in range(4):  # each file is full after one batch: three roll, the fourth is being written
        data = b'{"reqId":"%d"}\n' % number
        storage.store("stream=61234", dsreceiver.RecordBatch([data], None, len(data), 1), stream="61234")
    finished = sorted(storage.take_finished())
    assert len(finished) == 3
    housekeeper = dsreceiver.Housekeeper(layout, compress=True)
    housekeeper.to_finish = list(finished)
    housekeeper.finish_files()
    # The first file's index pruned into a summary; the third file changed after its manifest was written.
    first_index = layout.index_path(finished[0])
    dsreceiver.write_summary(layout, first_index, "stream=61234")
    first_index.unlink()
    with layout.compressed_path(finished[2]).open("ab") as changed:
        changed.write(b"\n")
    dsreceiver.append_answers(layout, {(dsreceiver.RoutedStream("", "61234"), 1764201600): {"duplicates": 1}})
    # A folder dsreceiver never made, whose name could mislead a reader of the list.
    odd = layout.root / "odd\nname"
    odd.mkdir()
    (odd / "2026-01-01T00Z.log").write_bytes(b"x\n")
    (odd / ".2026-01-01T00Z.log.sealed.json").write_text(json.dumps({"file": "2026-01-01T00Z.log", "bytes": 2}))

    done = run_command("sealed", "--output-dir", str(layout.root))
    storage.close()
    assert done.returncode == 0, done.stderr
    first, second = (path.name for path in finished[:2])
    assert done.stdout.splitlines() == [
        "stream=61234/%s.gz" % first, "stream=61234/.%s.gz.sealed.json" % first,
        ".dsreceiver/ledger/stream=61234/%s.json" % first,
        "stream=61234/%s.gz" % second, "stream=61234/.%s.gz.sealed.json" % second,
        ".dsreceiver/batches/stream=61234/%s.idx" % second,
        ".dsreceiver/answers/2025-11-27.jsonl"]
    assert "%s.gz left out: its manifest does not describe it" % finished[2] in done.stderr

    for bad in (["--bogus"], ["--output-dir", str(tmp_path / "none")]):
        refused = run_command("sealed", *bad)
        assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith("dsreceiver.py sealed: error: ") and "Traceback" not in refused.stderr
