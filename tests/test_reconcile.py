"""reconcile and streams pull, against a local HTTPS stand-in for Akamai's API that checks every request's EdgeGrid
signature with Akamai's own edgegrid-python and answers in the published shapes."""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import trustme

import dsreceiver
from conftest import ServerProcess, open_storage, run_command, scrape, value
from simulator import SAMPLE_DEFINITION, SAMPLES, batch_of_lines, sample_lines

requests = pytest.importorskip("requests")
edgegrid = pytest.importorskip("akamai.edgegrid")  # Akamai's official signer (requirements-test.txt)

WINDOW = 300
# A window three hours back, aligned as Akamai's aggregationTime is: the ledger's windows are made there.
BASE = int(time.time()) // WINDOW * WINDOW - 3 * 3600
SECRETS = dict(line.split(" = ", 1) for line in (SAMPLES / "edgerc-example").read_text().splitlines()[1:] if line)
V3_METRICS = "/datastream-config-api/v3/log/streams/metrics"


class AkamaiStandIn:
    """Akamai's API as reconcile and streams pull see it: HTTPS on localhost, EdgeGrid checked by the official
    library, upload metrics filtered by start, end and streamId as the API does."""

    def __init__(self, ca: trustme.CA, folder: Path) -> None:
        self.folder = folder
        # fileUploadMetrics entries, as the API answers them.
        self.metrics: List[Dict[str, Any]] = []
        # Other paths: path -> (status, JSON document).
        self.routes: Dict[str, Tuple[int, Any]] = {}
        self.forced_status: Optional[int] = None
        # Paths answered by a function of the request instead (hostile answers: raw bytes, trickles).
        self.raw: Dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.calls: List[Tuple[str, Dict[str, str]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.edgerc = self.write_edgerc(SECRETS["client_secret"])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def write_edgerc(self, secret: str, name: str = "edgerc") -> Path:
        """An .edgerc whose host is this stand-in."""
        path = self.folder / name
        path.write_text("[default]\nhost = localhost:%d\nclient_token = %s\nclient_secret = %s\naccess_token = %s\n"
                        % (self.port, SECRETS["client_token"], secret, SECRETS["access_token"]))
        path.chmod(0o600)  # as an .edgerc should be: no warning
        return path

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        url = "https://localhost:%d%s" % (self.port, request.path)
        parts = urllib.parse.urlsplit(request.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.calls.append((parts.path, query))
        header = request.headers.get("Authorization", "")
        fields = dict(part.split("=", 1) for part in header.split(" ", 1)[-1].split(";") if "=" in part)
        auth = edgegrid.EdgeGridAuth.from_edgerc(str(self.write_edgerc(SECRETS["client_secret"], "reference")))
        expected = auth.ah.make_auth_header(requests.Request("GET", url).prepare(), fields.get("timestamp", ""),
                                            fields.get("nonce", ""))
        if header != expected:
            self.send(request, 401, {"type": "https://problems.luna.akamaiapis.net/-/pep-authn/deny",
                                     "title": "Not authorized", "detail": "The signature does not match"})
        elif self.forced_status is not None:
            self.send(request, self.forced_status, {"title": "Forced", "detail": "as the test asked"})
        elif parts.path in self.raw:
            self.raw[parts.path](request)
        elif parts.path == V3_METRICS:
            start, end = dsreceiver.parse_window(query["start"]), dsreceiver.parse_window(query["end"])
            assert query["aggregationInterval"] == "FIVE_MINUTE" and end - start <= 7 * 86400
            entries = [entry for entry in self.metrics
                       if start <= dsreceiver.parse_window(entry["aggregationTime"]) < end
                       and str(entry["streamId"]) == query.get("streamId", str(entry["streamId"]))]
            self.send(request, 200, {"totalUploadCount": sum(e["successUploadsCount"] for e in entries),
                                     "fileUploadMetrics": entries})
        elif parts.path in self.routes:
            self.send(request, *self.routes[parts.path])
        else:
            self.send(request, 404, {"title": "Not Found", "detail": "no such resource"})

    @staticmethod
    def send(request: BaseHTTPRequestHandler, status: int, document: Any) -> None:
        body = json.dumps(document).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json" if status == 200 else "application/problem+json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def deliver(self, stream: str, window: int, attempted: int, failed: int = 0,
                errors: Optional[Dict[str, int]] = None) -> None:
        """Akamai's upload metrics of one window, in the published shape (aggregationTime without a zone)."""
        self.metrics.append({
            "aggregationTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(window)), "streamId": int(stream),
            "successUploadsCount": 10, "recordsAttemptedUpload": attempted, "recordsFailedUpload": failed,
            "uploadedBytes": attempted * 700,
            "failedUploadAttempts": [{"errorCode": code, "errorCount": n} for code, n in (errors or {}).items()],
            "latencyBuckets": [{"latencyInSeconds": 30, "recordsCount": attempted - failed}], "uploadBuckets": []})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def akamai(ca: trustme.CA, tmp_path: Path) -> Iterator[AkamaiStandIn]:
    stand_in = AkamaiStandIn(ca, tmp_path)
    yield stand_in
    stand_in.stop()


@pytest.fixture
def trust(ca: trustme.CA, tmp_path: Path) -> Dict[str, str]:
    """The environment under which the commands trust the stand-in's certificate (as they would a proxy's)."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return {"SSL_CERT_FILE": str(path)}


def store_at(root: Path, stream: str, window: int, records: int, offset: float = 10.0) -> None:
    """Stores `records` records of `stream` as received `offset` seconds into `window`."""
    storage = open_storage(root, clock=lambda: window + offset)
    data = b"".join(b'{"streamId":"%s","n":%d}\n' % (stream.encode(), n) for n in range(records))
    storage.store("stream=" + stream, dsreceiver.RecordBatch([data], None, len(data), records), stream=stream)
    storage.close()


def reconcile(akamai: AkamaiStandIn, trust: Dict[str, str], *args: str, since: int = BASE,
              until: int = BASE + 3 * WINDOW - 1, roots: Tuple[Path, ...] = ()) -> Any:
    folders = [arg for root in roots or (akamai.folder / "data",) for arg in ("--output-dir", str(root))]
    return run_command("reconcile", "--edgerc", str(akamai.edgerc), "--since", dsreceiver.iso_window(since),
                       "--until", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)), *folders, *args,
                       env=trust)


def test_matching_windows_are_complete_and_the_server_shows_the_result(
        akamai: AkamaiStandIn, trust: Dict[str, str], start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    output = tmp_path / "data"
    for window, records in ((BASE, 120), (BASE + WINDOW, 80), (BASE + 2 * WINDOW, 100)):
        store_at(output, "61234", window, records)
        akamai.deliver("61234", window, records)
    done = reconcile(akamai, trust)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("verdict: complete: every record Akamai delivered is stored (1 streams)")
    assert "%s        120        120       +0  ok" % dsreceiver.iso_window(BASE) in done.stdout
    reconciled = json.loads((output / ".dsreceiver" / "reconciled.json").read_text())
    assert reconciled["streams"]["61234"]["delivered"] == reconciled["streams"]["61234"]["stored"] == 300

    server = start_server(output_dir=output)
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(sample_lines("json")[:10])).status == 200
        document = json.loads(ds.request("GET", path="/status.json").body)
        page = ds.request("GET", path="/status").body
    [row] = [row for row in document["streams"] if row["stream"] == "61234"]
    assert row["reconciled"]["delivered"] == 300 and row["reconciled"]["missing"] == 0
    assert b"Akamai 300, stored 300, missing 0" in page
    samples = scrape(server)
    assert value(samples, "dsreceiver_reconcile_delivered_records", stream="61234") == 300
    assert value(samples, "dsreceiver_reconcile_missing_records", stream="61234") == 0
    assert value(samples, "dsreceiver_reconcile_timestamp_seconds", stream="61234") == reconciled["streams"]["61234"]["at"]


def test_records_datastream_gave_up_on_are_named_with_its_error_codes(
        akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1000)
    akamai.deliver("61234", BASE, 1200, failed=200, errors={"503": 3})
    done = reconcile(akamai, trust)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ok; DataStream gave up on 200 records (503 x3)" in done.stdout
    assert "verdict: INCOMPLETE: DataStream gave up on 200 records" in done.stdout


def test_a_window_akamai_delivered_more_than_was_stored_is_missing(
        akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 100)
    store_at(akamai.folder / "data", "61234", BASE + WINDOW, 90)
    akamai.deliver("61234", BASE, 100)
    akamai.deliver("61234", BASE + WINDOW, 130)
    done = reconcile(akamai, trust, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    [stream] = report["streams"]
    by_window = {window["window"]: window for window in stream["windows"]}
    assert by_window[dsreceiver.iso_window(BASE + WINDOW)]["missing"] == 40
    assert by_window[dsreceiver.iso_window(BASE)]["verdict"] == "ok"
    assert (stream["delivered"], stream["stored"], stream["missing"]) == (230, 190, 40)
    assert not report["complete"] and report["verdict"].startswith("verdict: INCOMPLETE: 40 records")


def test_a_push_counted_in_the_next_window_by_akamai_is_tolerated(
        akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 100, offset=299.9)  # received at the window's very end
    akamai.deliver("61234", BASE, 60)
    akamai.deliver("61234", BASE + WINDOW, 40)
    done = reconcile(akamai, trust)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok, a push counted in the next window" in done.stdout


def test_a_fleet_is_added_up_and_a_stream_filter_applies(akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    hosts = (akamai.folder / "host-a", akamai.folder / "host-b")
    store_at(hosts[0], "61234", BASE, 70)
    store_at(hosts[1], "61234", BASE, 30)
    store_at(hosts[1], "70077", BASE, 5)
    akamai.deliver("61234", BASE, 100)
    akamai.deliver("70077", BASE, 500)
    done = reconcile(akamai, trust, "--stream", "61234", roots=hosts)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stream 70077" not in done.stdout
    assert all(query.get("streamId") == "61234" for _, query in akamai.calls)
    assert reconcile(akamai, trust, roots=hosts).returncode == 1  # 70077: 495 missing
    assert reconcile(akamai, trust, "--stream", "70077", roots=hosts).returncode == 1
    # Each host keeps every stream's last result: 61234's from the run before, which 70077's left alone.
    for host in hosts:
        last = json.loads((host / ".dsreceiver" / "reconciled.json").read_text())["streams"]
        assert (last["61234"]["missing"], last["70077"]["missing"]) == (0, 495)


def test_streams_1_and_2_are_reconciled_as_themselves(akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    for stream, records in (("1", 40), ("2", 60)):
        store_at(akamai.folder / "data", stream, BASE, records)
        akamai.deliver(stream, BASE, records)
    done = reconcile(akamai, trust, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert {row["stream"]: (row["delivered"], row["stored"]) for row in report["streams"]} == {
        "1": (40, 40), "2": (60, 60)}


def test_seven_days_are_read_in_calls_of_one_day(akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    end = BASE // 86400 * 86400
    start = end - 7 * 86400
    for day in range(7):
        store_at(akamai.folder / "data", "61234", start + day * 86400 + 3600, 10 + day)
        akamai.deliver("61234", start + day * 86400 + 3600, 10 + day)
    done = reconcile(akamai, trust, since=start, until=end - 1)
    assert done.returncode == 0, done.stdout + done.stderr
    spans = [(dsreceiver.parse_window(q["start"]), dsreceiver.parse_window(q["end"])) for _, q in akamai.calls]
    assert all(0 < stop - begin <= 86400 for begin, stop in spans)
    assert [begin for begin, _ in spans[1:]] == [stop for _, stop in spans[:-1]]  # contiguous
    assert spans[0][0] == start - WINDOW and spans[-1][1] == end + WINDOW  # one window either side
    assert len(spans) == 8
    assert sum(10 + day for day in range(7)) == int(done.stdout.split("total")[1].split()[0])


@pytest.mark.parametrize("status, words", [
    (403, "may not read DataStream"), (429, "rate limited"), (500, "Akamai's API failed"),
])
def test_api_errors_are_one_line_and_exit_2(akamai: AkamaiStandIn, trust: Dict[str, str], status: int,
                                             words: str) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1)
    akamai.forced_status = status
    done = reconcile(akamai, trust)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "HTTP %d" % status in done.stderr and words in done.stderr and "Traceback" not in done.stderr


def test_wrong_credentials_and_an_unreachable_host_are_one_line(akamai: AkamaiStandIn,
                                                                 trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1)
    akamai.edgerc = akamai.write_edgerc("d3JvbmcgLSBzZWNyZXQ=", "wrong-edgerc")
    refused = reconcile(akamai, trust)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "HTTP 401: the credentials of [default] were refused" in refused.stderr
    assert "The signature does not match" in refused.stderr
    akamai.stop()
    gone = reconcile(akamai, trust)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1 and "cannot reach localhost:" in gone.stderr
    missing = run_command("reconcile", "--edgerc", str(akamai.folder / "none"),
                          "--output-dir", str(akamai.folder / "data"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_the_published_sample_answer_is_read() -> None:
    deliveries = dsreceiver.read_deliveries(json.loads((SAMPLES / "api-streams-metrics-61234.json").read_text()))
    second = deliveries[("61234", dsreceiver.parse_window("2026-11-27T15:05:00"))]
    assert (second.delivered, second.failed, second.errors) == (11400, 400, {"503": 3})
    assert len(deliveries) == 3


def test_streams_pull_writes_v3_definitions_then_v2_ones_that_a_server_loads_on_sighup(
        akamai: AkamaiStandIn, trust: Dict[str, str], start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    v3 = "/datastream-config-api/v3/log/cdn/streams"
    akamai.routes[v3] = (200, {"streams": [{"streamId": 70077}, {"streamId": 61234}]})
    akamai.routes[v3 + "/70077"] = (200, json.loads((SAMPLES / "ds2-stream-70077-v3-ids-only.json").read_text()))
    akamai.routes["/datastream-config-api/v2/log/streams/61234"] = (200, json.loads(SAMPLE_DEFINITION.read_text()))
    target = tmp_path / "streams.json"
    first = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target),
                        "--stream", "70077", env=trust)
    assert first.returncode == 0, first.stderr
    server = start_server("--stream-config", str(target), "--records", "json")
    pulled = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target), env=trust)
    assert pulled.returncode == 0, pulled.stderr
    assert "stream 70077 version 2: 12 fields (API v3)" in pulled.stdout
    assert "stream 61234 version 4: 43 fields (API v2)" in pulled.stdout
    assert "wrote 2 stream definitions to %s" % target in pulled.stdout
    assert target.stat().st_mode & 0o777 == 0o640
    server.send_signal(signal.SIGHUP)
    server.wait_for_log("stream definitions reloaded: 2 from")
    structured = sample_lines("structured")[:20]
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(structured)).status == 200
    stored = server.stored_lines()
    assert len(stored) == 20 and all(line.startswith(b"{") for line in stored)
    assert [json.loads(line)["reqId"] for line in stored] == [json.loads(line)["reqId"]
                                                              for line in sample_lines("json")[:20]]


def test_streams_pull_refuses_what_it_cannot_do(akamai: AkamaiStandIn, trust: Dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "streams.json"
    unknown = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target),
                          "--stream", "99999", env=trust)
    assert unknown.returncode == 2 and "HTTP 404" in unknown.stderr and not target.exists()
    wrong = run_command("streams", "push")
    assert wrong.returncode == 2 and "the one subcommand is pull" in wrong.stderr


def test_streams_pull_into_a_folder_writes_one_file_per_stream_that_the_server_loads(
        akamai: AkamaiStandIn, trust: Dict[str, str], start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    v3 = "/datastream-config-api/v3/log/cdn/streams"
    # The API lists 61234 twice; a definition naming a data set field no catalog knows yet is Akamai's truth.
    akamai.routes[v3] = (200, {"streams": [{"streamId": 61234}, {"streamId": 70077}, {"streamId": 61234}]})
    akamai.routes[v3 + "/61234"] = (200, json.loads(SAMPLE_DEFINITION.read_text()))
    midgress = json.loads((SAMPLES / "ds2-stream-70077-v3-ids-only.json").read_text())
    midgress["datasetFields"].append({"datasetFieldId": 2999, "datasetFieldName": "New\x1bfield"})
    akamai.routes[v3 + "/70077"] = (200, midgress)
    folder = tmp_path / "streams"
    folder.mkdir()
    (folder / "70077.json").write_text("[]")  # an earlier pull's file: replaced whole
    pulled = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(folder), env=trust)
    assert pulled.returncode == 0, pulled.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["61234.json", "70077.json"]  # no temporary file left
    assert all(path.stat().st_mode & 0o777 == 0o640 for path in folder.iterdir())
    assert json.loads((folder / "70077.json").read_text()) == midgress
    assert [call for call, _ in akamai.calls].count(v3 + "/61234") == 1
    assert pulled.stderr == ("dsreceiver.py streams pull: warning: stream 70077: field 13 is data set field ID 2999, "
                             "whose JSON key dsreceiver does not know: its values are stored under \"field2999\" "
                             "(give it as {\"datasetFieldId\": 2999, \"datasetFieldJsonKey\": \"KEY\"} to name it)\n")
    assert "wrote 2 stream definitions to %s (one file per stream)" % folder in pulled.stdout
    server = start_server("--stream-config", str(folder), "--records", "json")
    server.wait_for_log(r"WARNING stream definition \S+70077\.json: stream 70077: field 13 is data set field ID 2999")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(sample_lines("structured")[:5])).status == 200
        assert ds.push(batch_of_lines([b"2 0 70077 1 r1 1764200000.117 2 1.2.3.4 200 h p u 0 FR new"])).status == 200
    assert json.loads(server.stored_lines(server.output_dir / "stream=70077")[0])["field2999"] == "new"
    assert len(server.stored_lines(server.output_dir / "stream=61234")) == 5


def test_streams_pull_never_writes_what_the_server_would_refuse(
        akamai: AkamaiStandIn, trust: Dict[str, str], start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    v2 = "/datastream-config-api/v2/log/streams"
    akamai.routes[v2 + "/61234"] = (200, json.loads(SAMPLE_DEFINITION.read_text()))
    akamai.routes[v2 + "/70077"] = (200, json.loads(SAMPLE_DEFINITION.read_text()))  # the answer names 61234
    target = tmp_path / "streams.json"
    twice = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target),
                        "--stream", "61234", "--stream", "61234", env=trust)
    assert twice.returncode == 0, twice.stderr
    assert [document["streamId"] for document in json.loads(target.read_text())] == [61234]
    mismatched = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target),
                             "--stream", "70077", "--stream", "61234", env=trust)
    assert mismatched.returncode == 1
    assert mismatched.stderr == ("dsreceiver.py streams pull: stream 70077: skipped, the API answered with stream"
                                 " 61234\n")
    assert [document["streamId"] for document in json.loads(target.read_text())] == [61234]
    only_mismatched = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config",
                                  str(target), "--stream", "70077", env=trust)
    assert only_mismatched.returncode == 1 and "nothing written" in only_mismatched.stderr
    assert [document["streamId"] for document in json.loads(target.read_text())] == [61234]  # kept
    bad = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target),
                      "--stream", "61a", env=trust)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    folder = tmp_path / "streams"
    folder.mkdir()
    (folder / "hand.json").write_text(json.dumps({"streamId": 61234, "streamVersion": 4, "fields": ["cp"]}))
    clash = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(folder),
                        "--stream", "61234", env=trust)
    assert clash.returncode == 2 and clash.stderr.count("\n") == 1
    assert "hand.json defines stream 61234 version 4 already" in clash.stderr
    assert [path.name for path in folder.iterdir()] == ["hand.json"]
    server = start_server("--stream-config", str(target), "--records", "json")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(sample_lines("structured")[:5])).status == 200
    assert server.stored_lines() == sample_lines("json")[:5]


# -- hostile answers and hostile folders (issue 25) ------------------------------------------------------------------


def send_raw(body: bytes, status: int = 200) -> Callable[[BaseHTTPRequestHandler], None]:
    """A stand-in route answering `body` exactly as given (JSON the json module would never write)."""
    def answer(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
    return answer


def metrics_entry(stream: object, attempted: object, failed: object = 0, code: object = "503") -> str:
    """One fileUploadMetrics entry as raw JSON text, its values spliced in as given."""
    return ('{"aggregationTime": "%s", "streamId": %s, "successUploadsCount": 1, "recordsAttemptedUpload": %s,'
            ' "recordsFailedUpload": %s, "failedUploadAttempts": [{"errorCode": %s, "errorCount": 1}]}'
            % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(BASE)), stream, attempted, failed, code))


def assert_one_clean_line(done: Any, code: int = 2) -> None:
    """The command ended with `code`, one line on stderr, no traceback and nothing raw for a terminal."""
    assert done.returncode == code and done.stderr.count("\n") == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    for text in (done.stdout, done.stderr):
        assert not any(ord(char) < 32 and char != "\n" or 0x7f <= ord(char) < 0xa0 or 0xd800 <= ord(char) < 0xe000
                       for char in text), ascii(text)


@pytest.mark.parametrize("entry, words", [
    (metrics_entry(61234, "9" * 400), "recordsAttemptedUpload"),
    (metrics_entry(61234, "1e999"), "1e999 is not a finite number"),
    (metrics_entry(61234, "NaN"), "not JSON"),
    (metrics_entry(61234, -5), "recordsAttemptedUpload"),
    (metrics_entry(61234, 5, 9), "exceeds"),
    (metrics_entry(61234, "true"), "recordsAttemptedUpload True is not a count"),
    (metrics_entry('"\\ud800"', 5), "streamId '\\ud800' is not a stream ID"),
    (metrics_entry('"\\u001b[2J61234"', 5), "streamId '\\x1b[2J61234' is not a stream ID"),
    (metrics_entry('"000061234"', 5), "streamId '000061234' is not a stream ID"),
    (metrics_entry(61234, 5, 0, '"\\u001b]0;pwned\\u0007"') + ", " + metrics_entry(61234, 5, 0, "[1]"),
     "errorCode"),
    ("[" * 100000 + "]" * 100000, "not JSON"),
])
def test_a_hostile_metrics_answer_is_one_line_exit_2_and_saves_nothing(
        akamai: AkamaiStandIn, trust: Dict[str, str], entry: str, words: str) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 5)
    body = entry if entry.startswith("[") else '{"fileUploadMetrics": [%s]}' % entry
    akamai.raw[V3_METRICS] = send_raw(body.encode())
    done = reconcile(akamai, trust)
    assert_one_clean_line(done)
    assert words in done.stderr
    assert not (akamai.folder / "data" / ".dsreceiver" / "reconciled.json").exists()


def test_an_error_answer_is_printed_escaped(akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1)
    akamai.raw[V3_METRICS] = send_raw(json.dumps({"title": "x", "detail": "\x1b]0;owned\x07\x1b[2J\ud800 done"}).encode(),
                                      status=403)
    done = reconcile(akamai, trust)
    assert_one_clean_line(done)
    assert "(\\x1b]0;owned\\x07\\x1b[2J\\ud800 done)" in done.stderr


def test_streams_pull_never_puts_a_listed_value_that_is_not_a_stream_id_in_a_url(
        akamai: AkamaiStandIn, trust: Dict[str, str], tmp_path: Path) -> None:
    v3 = "/datastream-config-api/v3/log/cdn/streams"
    for listed in ("../../../../identity-management/v3/user-profile?x=", "061234", "61234\x1b[2J", 0, 1.5):
        akamai.calls.clear()
        akamai.routes[v3] = (200, {"streams": [{"streamId": 61234}, {"streamId": listed}]})
        done = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config",
                           str(tmp_path / "streams.json"), env=trust)
        assert_one_clean_line(done)
        assert "is not a stream ID" in done.stderr
        assert [path for path, _ in akamai.calls] == [v3]  # the list only: nothing fetched, nothing written
        assert not (tmp_path / "streams.json").exists()


def test_files_the_tools_write_never_follow_a_planted_link_nor_keep_a_planted_mode(
        akamai: AkamaiStandIn, trust: Dict[str, str], tmp_path: Path) -> None:
    output = tmp_path / "data"
    store_at(output, "61234", BASE, 5)
    akamai.deliver("61234", BASE, 5)
    state = output / ".dsreceiver"
    state.chmod(0o700)  # as --file-mode 0600 makes it
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state / "reconciled.json.tmp").symlink_to(victim)  # the name the tools used to write through
    (state / "reconciled.json").write_text("{}")
    (state / "reconciled.json").chmod(0o666)
    done = reconcile(akamai, trust)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    saved = state / "reconciled.json"
    assert not saved.is_symlink() and saved.stat().st_mode & 0o777 == 0o600
    assert json.loads(saved.read_text())["streams"]["61234"]["stored"] == 5
    saved.unlink()
    saved.symlink_to(victim)  # a link at the file itself is replaced, not written through
    state.chmod(0o750)  # --file-mode 0640
    assert reconcile(akamai, trust).returncode == 0
    assert victim.read_text() == "precious\n" and not saved.is_symlink()
    assert saved.stat().st_mode & 0o777 == 0o640
    # The state folder itself replaced by a link (to a folder root would write in): nothing written there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    saved.unlink()
    state.rename(tmp_path / "state")
    state.symlink_to(tmp_path / "state")
    linked = reconcile(akamai, trust)
    assert linked.returncode == 0 and "cannot save the verdicts" in linked.stderr
    assert not (tmp_path / "state" / "reconciled.json").exists()
    # streams pull: a planted 0666 file at the target is replaced by a 0640 one.
    akamai.routes["/datastream-config-api/v2/log/streams/61234"] = (200, json.loads(SAMPLE_DEFINITION.read_text()))
    target = tmp_path / "streams.json"
    target.write_text("[]")
    target.chmod(0o666)
    pulled = run_command("streams", "pull", "--edgerc", str(akamai.edgerc), "--stream-config", str(target),
                         "--stream", "61234", env=trust)
    assert pulled.returncode == 0, pulled.stderr
    assert target.stat().st_mode & 0o777 == 0o640 and json.loads(target.read_text())[0]["streamId"] == 61234
    assert sorted(path.name for path in tmp_path.iterdir() if ".tmp" in path.name) == []


def test_a_broken_reconciled_json_leaves_the_status_page_and_metrics_working(
        akamai: AkamaiStandIn, trust: Dict[str, str], start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    output = tmp_path / "data"
    store_at(output, "61234", BASE, 5)
    good = {"delivered": 5, "stored": 5, "missing": 0, "extra": 0, "failed": 0, "windows_missing": 0,
            "at": 1764200000.0, "since": BASE, "until": BASE + 300}
    saved = output / ".dsreceiver" / "reconciled.json"
    saved.write_text('{"format": 1, "streams": {"61234": %s, "70001": {"delivered": NaN, "stored": 1e999,'
                     ' "missing": 0, "failed": 0, "at": 1}, "70002": {"delivered": %s, "stored": 0, "missing": 0,'
                     ' "failed": 0, "at": 1}, "\\ud800": %s, "070003": %s, "70004": {"delivered": 1}}}'
                     % (json.dumps(good), "9" * 400, json.dumps(good), json.dumps(good)))
    server = start_server(output_dir=output)
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(sample_lines("json")[:10])).status == 200  # a row for 61234
        for path in ("/status", "/status.json"):
            assert ds.request("GET", path=path).status == 200
        document = json.loads(ds.request("GET", path="/status.json").body)
    samples = scrape(server)
    assert value(samples, "dsreceiver_reconcile_delivered_records", stream="61234") == 5
    assert {labels["stream"] for name, labels, _ in samples if name.startswith("dsreceiver_reconcile_")} == {"61234"}
    assert [row["reconciled"]["delivered"] for row in document["streams"] if row["stream"] == "61234"] == [5]
    server.wait_for_log(r"reconciled\.json: 5 streams whose entry is not a stream ID with counts: left out")
    scrape(server)
    assert server.log_text().count("left out of the status page") == 1  # once per version of the file
    # Truncated, or an older format: the same.
    for text in ('{"format": 1, "streams": {"61234": {"deliv', '{"streams": {"61234": %s}}' % json.dumps(good)):
        saved.write_text(text)
        with server.simulator() as ds:
            assert ds.request("GET", path="/status").status == 200
        scrape(server)
    # A reconcile over the broken file keeps what is valid and replaces the rest.
    akamai.deliver("61234", BASE, 5)
    done = reconcile(akamai, trust, roots=(output,))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert set(json.loads(saved.read_text())["streams"]) == {"61234"}


def test_an_answer_trickling_past_the_deadline_ends_the_call_in_one_line(
        akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1)
    stop = threading.Event()

    def trickle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "100000")
        request.end_headers()
        try:
            while not stop.wait(0.3):  # pacing of the hostile server, not synchronisation
                request.wfile.write(b" ")
                request.wfile.flush()
        except OSError:
            pass  # the client gave up, as it must

    akamai.raw[V3_METRICS] = trickle
    started = time.monotonic()
    done = reconcile(akamai, trust, "--timeout", "2")
    stop.set()
    assert_one_clean_line(done)
    assert "gave no complete answer within --timeout 2 s" in done.stderr
    assert time.monotonic() - started < 40  # per call, not per read: a read every 0.3 s would never time out


def test_a_huge_answer_is_refused_unread(akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1)
    body = b'{"fileUploadMetrics": [' + b" " * (17 << 20) + b"]}"
    akamai.raw[V3_METRICS] = send_raw(body)
    done = reconcile(akamai, trust)
    assert_one_clean_line(done)
    assert "more than the 16 MB read: refused" in done.stderr


def test_twenty_thousand_streams_are_reconciled_and_only_a_hundred_kept_for_the_server(
        akamai: AkamaiStandIn, trust: Dict[str, str], start_server: Callable[..., ServerProcess],
        tmp_path: Path) -> None:
    output = tmp_path / "data"
    store_at(output, "61234", BASE, 5)
    for stream in range(100000, 120000):
        akamai.deliver(str(stream), BASE, 1)
    done = reconcile(akamai, trust, "--json", until=BASE + WINDOW - 1)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(json.loads(done.stdout)["streams"]) == 20001
    saved = json.loads((output / ".dsreceiver" / "reconciled.json").read_text())["streams"]
    assert len(saved) == dsreceiver.MAX_STREAM_LABELS
    assert all(totals["missing"] == 1 for totals in saved.values())  # streams with records lost are kept first
    server = start_server(output_dir=output)
    samples = scrape(server)
    assert len([name for name, _, _ in samples
                if name == "dsreceiver_reconcile_missing_records"]) == dsreceiver.MAX_STREAM_LABELS


def test_an_edgerc_token_broken_over_two_lines_is_one_line_without_secrets(
        akamai: AkamaiStandIn, trust: Dict[str, str]) -> None:
    store_at(akamai.folder / "data", "61234", BASE, 1)
    text = akamai.edgerc.read_text().replace("client_token = ", "client_token = akab-first\n  ")
    akamai.edgerc.write_text(text)
    done = reconcile(akamai, trust)
    assert_one_clean_line(done)
    assert "client_token holds a space, a line break or a control character" in done.stderr
    assert not any(secret in done.stderr for secret in SECRETS.values()) and "akab-first" not in done.stderr
    akamai.edgerc.write_text(text.replace("akab-first\n  ", ""))
    akamai.edgerc.chmod(0o644)
    akamai.deliver("61234", BASE, 1)
    warned = reconcile(akamai, trust)
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr == "warning: %s holds API secrets and is open to its group or others (mode 0644): chmod 600 %s\n" % (
        akamai.edgerc, akamai.edgerc)
