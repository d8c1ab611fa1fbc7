"""The output folder as a query engine sees it: DuckDB reads plain and gzip'd files with `stream` as a column,
JSON and converted STRUCTURED records share one schema, and the README's query examples run as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List

import duckdb
import pytest

from conftest import ROOT, ServerProcess
from simulator import SAMPLE_DEFINITION, batch_of_lines, restreamed, sample_lines

README_QUERIES = (ROOT / "README.md").read_text().split("## Query your logs", 1)[1].split("\n## ", 1)[0]
SQL_EXAMPLES = re.findall(r"```sql\n(.*?)```", README_QUERIES, re.S)
JQ_EXAMPLES = [block for block in re.findall(r"```sh\n(.*?)```", README_QUERIES, re.S) if "| jq " in block]
ALL_RECORDS = "read_json_auto('data/stream=*/2*.log*', format = 'newline_delimited', hive_partitioning = true, " \
              "union_by_name = true, filename = true)"


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory, cert_dir: Path,
           client_context: ssl.SSLContext) -> Iterator[ServerProcess]:
    """A receiver that stored stream 61234 (half JSON, half STRUCTURED as JSON), stream 70001 and records
    without a stream, into plain and gzip'd files; stopped, its folder left for the queries."""
    workdir = tmp_path_factory.mktemp("query")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DSRECEIVER_")}
    server = ServerProcess(workdir, ["--host", "127.0.0.1", "--port", "0", "--workers", "2",
                                     "--output-dir", str(workdir / "data"),
                                     "--cert", str(cert_dir / "fullchain.pem"), "--key", str(cert_dir / "privkey.pem"),
                                     "--stream-config", str(SAMPLE_DEFINITION), "--records", "json",
                                     "--compress-rotated", "--max-file-size", "128K"],
                           env, sys.executable, client_context)
    server.start()
    try:
        as_json, structured = sample_lines("json")[:500], sample_lines("structured")[500:]
        with server.simulator() as ds:
            for start in range(0, 500, 100):
                assert ds.push(batch_of_lines(as_json[start:start + 100], compress=start % 200 == 0)).status == 200
                assert ds.push(batch_of_lines(structured[start:start + 100], compress=True)).status == 200
            assert ds.push(batch_of_lines(restreamed(sample_lines("json")[:50], "70001"))).status == 200
            assert ds.push(batch_of_lines([b'{"message":"not from DataStream"}'] * 3)).status == 200
        server.wait_for_log(r"compressed .*\.log\.gz")
    finally:
        assert server.stop() == 0
    yield server


def query(server: ServerProcess, sql: str) -> List[Dict[str, Any]]:
    """Runs SQL from the folder that holds data/, as the README says; returns the rows as dicts."""
    previous = os.getcwd()
    os.chdir(server.workdir)
    try:
        relation = duckdb.sql(sql)
        assert relation is not None, "not a query"
        return [dict(zip(relation.columns, row)) for row in relation.fetchall()]
    finally:
        os.chdir(previous)


def test_duckdb_reads_every_stream_from_plain_and_gzipped_files(output: ServerProcess) -> None:
    rows = query(output, "SELECT stream, count(*) AS records FROM %s GROUP BY stream ORDER BY stream" % ALL_RECORDS)
    assert {str(row["stream"]): row["records"] for row in rows} == {"61234": 1000, "70001": 50, "unknown": 3}
    files = query(output, "SELECT DISTINCT filename FROM %s" % ALL_RECORDS)
    names = [row["filename"] for row in files]
    assert any(name.endswith(".log.gz") for name in names) and any(name.endswith(".log") for name in names)


def test_json_and_converted_structured_records_share_one_schema(output: ServerProcess) -> None:
    expected = [json.loads(line) for line in sample_lines("json")]
    one_stream = ALL_RECORDS.replace("stream=*", "stream=61234")
    columns = {row["column_name"] for row in query(output, "DESCRIBE SELECT * FROM %s" % one_stream)}
    assert {key for record in expected for key in record} | {"stream", "filename"} == columns
    # A field some records leave out ('-'): STRUCTURED and JSON records must leave out the same ones.
    sometimes = next(key for key in sorted(columns) if 0 < sum(key in record for record in expected) < 1000)
    [totals] = query(output, "SELECT count(DISTINCT reqId) AS ids, sum(CAST(bytes AS BIGINT)) AS bytes, "
                     "count(%s) AS present FROM %s" % (sometimes, one_stream))
    assert totals == {"ids": 1000, "bytes": sum(int(record["bytes"]) for record in expected),
                      "present": sum(sometimes in record for record in expected)}


@pytest.mark.parametrize("number", range(len(SQL_EXAMPLES)))
def test_readme_duckdb_examples_run(output: ServerProcess, number: int) -> None:
    rows = query(output, SQL_EXAMPLES[number])
    assert rows, "README query %d returned nothing" % (number + 1)
    if "statusCode" in SQL_EXAMPLES[number] and "sum(CAST(bytes" in SQL_EXAMPLES[number]:
        assert sum(row["records"] for row in rows if str(row["stream"]) == "61234") == 1000


def without_sigpipe() -> None:
    """In the child, before it runs the command: SIGPIPE ignored and blocked, as some runners leave it."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})


def test_readme_jq_example_counts_right(output: ServerProcess) -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (.ci/run installs it)")
    assert JQ_EXAMPLES, "README has no jq example"
    # In a terminal, `head` ending early ends `sort` by SIGPIPE, quietly. A runner may ignore or block SIGPIPE, and
    # bash cannot undo an ignored one, so sort would see EPIPE and complain: here `head` reads its input to the end
    # after printing, so nothing upstream ever writes to a closed pipe. Run as the worst runner would: SIGPIPE
    # ignored and blocked.
    drained_head = "head() { command head \"$@\"; status=$?; cat > /dev/null; return $status; }\n"
    result = subprocess.run(["bash", "-c", drained_head + JQ_EXAMPLES[0]], cwd=str(output.workdir),
                            capture_output=True, text=True, timeout=60, preexec_fn=without_sigpipe)
    assert result.returncode == 0 and not result.stderr, result.stderr
    records = [json.loads(line) for line in sample_lines("json")]
    failing: Counter[str] = Counter("%s\t%s" % (r["reqHost"], r["reqPath"]) for r in records if r["statusCode"] >= "500")
    lines = result.stdout.splitlines()
    assert len(lines) == min(10, len(failing))
    for line in lines:
        count, pair = line.strip().split(" ", 1)
        assert failing[pair] == int(count), line


CLICKHOUSE_EXAMPLES = [re.search(r'clickhouse local --query "(.*?)"', block, re.S)
                       for block in re.findall(r"```sh\n(.*?)```", README_QUERIES, re.S) if "clickhouse local" in block]


def test_readme_clickhouse_example_runs_in_clickhouse_and_agrees_with_duckdb(output: ServerProcess) -> None:
    chdb = pytest.importorskip("chdb")  # ClickHouse's engine in-process (requirements-test.txt)
    [example] = CLICKHOUSE_EXAMPLES
    assert example is not None, "README's ClickHouse example is not a clickhouse local --query"
    previous = os.getcwd()
    os.chdir(output.workdir)  # file() paths are relative to where clickhouse local runs
    try:
        answer = json.loads(chdb.query(example.group(1), "JSONCompact").bytes())
    finally:
        os.chdir(previous)
    clickhouse = sorted((bool(row[0]), row[1] or "", int(row[2])) for row in answer["data"])
    duck = query(output, "SELECT filename LIKE '%%stream=61234%%' AS one, statusCode, count(*) AS n FROM %s "
                 "GROUP BY ALL" % ALL_RECORDS)
    assert clickhouse == sorted((row["one"], row["statusCode"] or "", row["n"]) for row in duck)
    assert sum(n for one, _, n in clickhouse if one) == 1000  # every record of stream 61234, plain or gzip'd
