"""Akamai's Unified Log Streamer (ULS) over HTTP: its documented request shapes (liveness probe, json-list,
single-event, gzip, its auth header, a re-send after a failed answer) pushed to the real server over TLS, and
what is stored, where, and what the ledger, the manifests and the metrics say; with the envelope rules and the
event times per product in-process.

Written from ULS's documentation and the request shapes its HTTP output sends (akamai/uls v2.0.5:
bin/modules/UlsOutput.py, bin/uls_config/global_config.py, docs/OUTPUTS.md); ULS itself is not vendored."""

from __future__ import annotations

import datetime
import gzip
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest

import dsreceiver
from conftest import ServerProcess, ledger_totals, read_until_close, scrape, value, wait_until
from simulator import SAMPLES, Response, batch_of_lines, json_lines

# One event per product, as ULS forwards them: the samples of ULS's docs/LOG_OVERVIEW.md (akamai/uls v2.0.5),
# each written as one line with json.dumps' default separators, as ULS and the CLIs it runs write them. The SIA
# (ETP) samples there are the API's page ({"pageInfo", "dataRows"}): ULS's cli-etp prints each of its dataRows
# as one event (akamai/cli-etp bin/akamai-etp, SortedPageOutput.flush), so the first row is taken. Guardicore
# NETLOG is left out: its sample there is a copy of SIA NETCON's.
FIXTURE = SAMPLES / "uls-log-overview.ndjson"
LINES = FIXTURE.read_bytes().split(b"\n")[:-1]
EVENTS = [json.loads(line) for line in LINES]
# Each line's product, and its time as its sample writes it (None: there is none, or it names no offset, so it
# is not certain when it happened).
PRODUCT_TIMES = [
    ("EAA access", "2021-07-27T18:20:14+00:00"), ("EAA admin", None), ("EAA connector health",
                                                                      "2021-07-23T18:06:35.676Z"),
    ("EAA device posture inventory", None), ("EAA directory health", "2023-10-06T22:02:00.112396+00:00"),
    ("SIA threat", "2020-05-26T06:34:53Z"), ("SIA acceptable use", "2020-05-26T06:34:53Z"),
    ("SIA DNS", "2020-05-26T06:00:00Z"), ("SIA proxy", 1590474813791), ("SIA netcon", "2023-08-23T07:59:11Z"),
    ("Guardicore incident", 1504688829035), ("Guardicore agent", 1745321952276),
    ("Guardicore audit", 1725952232281), ("Linode audit", None),
    ("Linode utilization", "2025-02-06T15:23:54.048512+00:00"), ("Control Center events", "2024-06-17T09:23:17.976Z"),
]
TOKEN = "uls-T0ken.rotated_2026~+/="
ULS_HEADERS = {"User-Agent": "Akamai Unified Log Streamer/2.0.5", "Content-Type": "application/json"}
PATH = "/uls"
FOLDER = "source=uls"


def seconds(written: Any) -> Optional[float]:
    """The Unix time of a sample's time value: milliseconds since the epoch, or ISO 8601 with an offset."""
    if written is None:
        return None
    if isinstance(written, int):
        return written / 1000
    return datetime.datetime.fromisoformat(written.replace("Z", "+00:00")).timestamp()


EXPECTED_TIMES = {line: seconds(written) for line, (_, written) in zip(LINES, PRODUCT_TIMES)}


def json_list(events: Sequence[Dict[str, Any]]) -> bytes:
    """A json-list body, as ULS builds it: its --httpformat '{"event": %s}' filled with json.dumps of the list."""
    return ('{"event": %s}' % json.dumps(list(events))).encode()


def single_event(events: Sequence[Dict[str, Any]], between: str = "") -> bytes:
    """A single-event body: the envelope filled once per event, concatenated (ULS puts nothing between them)."""
    return between.join('{"event": %s}' % json.dumps(event) for event in events).encode()


class UlsClient:
    """ULS's HTTP output, as it behaves on the wire: one keep-alive session whose every request carries its
    User-Agent, Content-Type and --httpauthheader; OPTIONS with {"event":"connection test"} as its liveness
    probe; POSTs of a body, gzip'd with --httpcompression (Content-Encoding: gzip or br)."""

    def __init__(self, server: ServerProcess, auth_header: Dict[str, str], path: str = PATH) -> None:
        self.session = server.simulator(path=path, headers=dict(ULS_HEADERS, **auth_header))

    def probe(self) -> Response:
        return self.session.request("OPTIONS", b'{"event":"connection test"}')

    def post(self, body: bytes, encoding: Optional[str] = None) -> Response:
        headers = {}
        if encoding == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        elif encoding == "br":
            headers["Content-Encoding"] = "br"  # what ULS then sends is not readable here, whatever the bytes
        return self.session.request("POST", body, headers)

    def __enter__(self) -> UlsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.session.close()


def uls_lines(server: ServerProcess, folder: str = FOLDER) -> List[bytes]:
    """Every record stored under `folder`, file by file in the order they were written."""
    root = server.output_dir / folder
    named = [(name.period, name.sequence, path) for path in root.glob("2*.log*")
             for name in [dsreceiver.Layout.parse(path.name)] if name is not None]
    return [line for _, _, path in sorted(named) for line in path.read_bytes().split(b"\n")[:-1]]


def folders(server: ServerProcess) -> List[str]:
    """The folders that hold data files."""
    return sorted({path.parent.relative_to(server.output_dir).as_posix() for path in server.data_files()})


# -- the whole way, as ULS sends -------------------------------------------------------------------------------------

def test_a_uls_client_probes_pushes_every_shape_and_each_event_is_one_record_counted_once(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-file-size", "1K", env={"DSRECEIVER_BEARER_TOKEN": "old-token," + TOKEN})
    first, second, third = EVENTS[:8], EVENTS[8:11], EVENTS[11:]
    with UlsClient(server, {"Authorization": "Bearer " + TOKEN}) as uls:
        probe = uls.probe()
        assert (probe.status, probe.body) == (200, b"ok\n")
        server.wait_for_log(r"access 127\.0\.0\.1 OPTIONS /uls 200 bytes=27 records=0 .*\(liveness probe\)")
        assert server.data_files() == []
        assert uls.post(json_list(first)).body == b"stored 8 records\n"
        assert uls.post(single_event(second)).body == b"stored 3 records\n"
        assert uls.post(single_event(third, between="\n"), "gzip").body == b"stored 5 records\n"
        again = uls.post(json_list(first))  # its answer was lost: ULS sends the same body again
        assert (again.status, again.body) == (200, b"already stored 8 records\n")
        samples = scrape(server, {"Authorization": "Bearer " + TOKEN})
    # Each event byte for byte as ULS wrote it inside its envelope, one per line, in its own folder.
    assert uls_lines(server) == LINES
    assert folders(server) == [FOLDER]
    assert value(samples, "dsreceiver_liveness_probes_total") == 1
    assert value(samples, "dsreceiver_stream_records_total", stream="uls") == len(EVENTS)
    assert value(samples, "dsreceiver_dedupe_hits_total") == 1
    assert value(samples, "dsreceiver_batches_stored_total") == 3
    # A finished file's manifest: its events, and their range where the product's time is certain.
    server.wait_for_log(r"sealed \S+/source=uls/\S+: \d+ records", count=2)
    sealed = [path for path in (server.output_dir / FOLDER).glob("2*.log")
              if dsreceiver.Layout.manifest_path(path).exists()]
    assert len(sealed) >= 2
    for path in sealed:
        manifest = json.loads(dsreceiver.Layout.manifest_path(path).read_text())
        records = path.read_bytes().split(b"\n")[:-1]
        times = [moment for moment in map(EXPECTED_TIMES.get, records) if moment is not None]
        assert manifest["records"] == len(records) and manifest["stream"] is None
        assert (manifest["first_event"], manifest["last_event"]) == ((min(times), max(times)) if times
                                                                     else (None, None))
    assert server.stop() == 0
    totals = ledger_totals(server.output_dir)
    assert totals["uls"] == {"records": len(EVENTS), "batches": 3, "bytes": sum(len(line) + 1 for line in LINES),
                             "duplicates": 1, "refused": {}}


def test_brotli_gets_415_saying_to_use_gzip_and_stores_nothing(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BEARER_TOKEN": TOKEN})
    with UlsClient(server, {"Authorization": "Bearer " + TOKEN}) as uls:
        refused = uls.post(json_list(EVENTS[:3]), "br")
        assert refused.status == 415
        assert refused.body.decode().count("\n") == 1 and "--httpcompressiontype GZIP" in refused.body.decode()
        assert uls.probe().status == 200  # the connection was closed; ULS's next request opens another
        assert uls.post(json_list(EVENTS[:3]), "gzip").status == 200
    assert uls_lines(server) == LINES[:3]
    assert "Traceback" not in server.log_text()
    assert server.stop() == 0
    assert ledger_totals(server.output_dir)[""]["refused"] == {"415": 1}


def test_a_wrong_or_missing_token_gets_401_probe_included_and_is_braked(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BEARER_TOKEN": TOKEN})
    with UlsClient(server, {}) as anonymous:
        probe = anonymous.probe()
        assert probe.status == 401 and probe.headers["www-authenticate"] == 'Bearer realm="dsreceiver"'
        assert anonymous.post(json_list(EVENTS[:2])).status == 401
    for wrong in ("Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "bearer", "Basic " + TOKEN, TOKEN):
        with UlsClient(server, {"Authorization": wrong}) as uls:
            assert uls.probe().status == 401, wrong
    assert server.data_files() == []
    # Seven failures so far; at ten from one address, its next requests get 429 without a check, right token too.
    with UlsClient(server, {"Authorization": "Bearer wrong"}) as uls:
        statuses = [uls.post(json_list(EVENTS[:2])).status for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    with UlsClient(server, {"Authorization": "Bearer " + TOKEN}) as uls:
        braked = uls.probe()
    assert braked.status == 429 and int(braked.headers["retry-after"]) > 0
    assert TOKEN not in server.log_text()
    assert server.data_files() == []


def test_a_resend_after_an_answer_that_never_came_is_stored_once(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env={"DSRECEIVER_BEARER_TOKEN": TOKEN})
    body = gzip.compress(json_list(EVENTS[:6]))
    head = ("POST %s HTTP/1.1\r\nHost: localhost\r\nUser-Agent: %s\r\nContent-Type: application/json\r\n"
            "Authorization: Bearer %s\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
            % (PATH, ULS_HEADERS["User-Agent"], TOKEN, len(body))).encode()
    # ULS's 10 s timeout passes before the answer: it gives up on the connection, and sends the batch again.
    with server.tls_connect() as sock:
        sock.sendall(head + body)
    wait_until(lambda: uls_lines(server) == LINES[:6], what="the first copy stored")
    with UlsClient(server, {"Authorization": "Bearer " + TOKEN}) as uls:
        assert uls.post(json_list(EVENTS[:6]), "gzip").body == b"already stored 6 records\n"
        assert uls.post(single_event(EVENTS[:6])).body == b"already stored 6 records\n"  # the same events
    assert uls_lines(server) == LINES[:6]
    assert server.stop() == 0
    assert ledger_totals(server.output_dir)["uls"]["duplicates"] == 2


@pytest.mark.parametrize("auth_header, args, env", [
    # --httpauthheader '{"X-Uls-Key": "..."}', the custom header of docs/OUTPUTS.md's examples.
    ({"X-Uls-Key": TOKEN}, ["--auth-header", "X-Uls-Key"], {"DSRECEIVER_AUTH_HEADER_VALUE": TOKEN}),
    # --httpauthheader '{"Authorization": "Basic ..."}'.
    ({"Authorization": "Basic dWxzOnB3"}, [], {"DSRECEIVER_BASIC_AUTH": "uls:pw"}),
])
def test_the_auth_header_uls_is_given_passes(start_server: Callable[..., ServerProcess], auth_header: Dict[str, str],
                                             args: List[str], env: Dict[str, str]) -> None:
    server = start_server(*args, env=env)
    with UlsClient(server, auth_header) as uls:
        assert uls.probe().status == 200
        assert uls.post(json_list(EVENTS[:2])).status == 200
    with UlsClient(server, {}) as uls:
        assert uls.probe().status == 401
    assert uls_lines(server) == LINES[:2]


def test_a_route_names_the_folder_and_the_row(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--route-by-path", "--partition-by", "none")
    with UlsClient(server, {}, path="/uls/eaa") as eaa, UlsClient(server, {}, path="/uls/sia") as sia:
        assert eaa.post(json_list(EVENTS[:5])).status == 200
        assert sia.post(json_list(EVENTS[5:10])).status == 200
        document = json.loads(eaa.session.request("GET", path="/status.json").body)
    assert folders(server) == ["uls_eaa/source=uls", "uls_sia/source=uls"]
    assert uls_lines(server, "uls_eaa/source=uls") == LINES[:5]
    rows = {(row["route"], row["stream"]): row for row in document["streams"]}
    assert rows["uls_eaa", "uls"]["records_total"] == 5 and rows["uls_sia", "uls"]["records_total"] == 5
    assert rows["uls_eaa", "uls"]["label"] == "uls_eaa/uls"
    assert server.stop() == 0
    assert {row: totals["records"] for row, totals in ledger_totals(server.output_dir).items()} == {
        "uls_eaa/uls": 5, "uls_sia/uls": 5}


def test_no_datastream_push_is_ever_read_as_an_envelope(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    envelope = json_list(EVENTS[:2])
    lines = json_lines("beside-uls", 5)
    with server.simulator() as ds:
        assert ds.request("POST", envelope, {"Content-Type": "application/json"}).body == b"stored 1 records\n"
        assert ds.push(batch_of_lines(lines)).status == 200
        # OPTIONS answers DataStream's path as well, and stores nothing.
        assert ds.request("OPTIONS").status == 200
    with UlsClient(server, {}) as uls:
        assert uls.post(envelope).status == 200
    assert server.stored_lines(server.output_dir / "stream=unknown") == [envelope]
    assert server.stored_lines(server.output_dir / "stream=61234") == lines
    assert uls_lines(server) == LINES[:2]


def test_a_uls_body_that_is_not_envelopes_is_stored_as_sent_and_said_once(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    # docs/OUTPUTS.md's other example: --httpformat 'data=%s'.
    bodies = [b"data=" + json.dumps(EVENTS[:2]).encode(), b"data=" + json.dumps(EVENTS[2:3]).encode()]
    with UlsClient(server, {}) as uls:
        for body in bodies:
            assert uls.post(body).body == b"stored 1 records\n"
        samples = scrape(server)
    assert uls_lines(server) == bodies
    assert value(samples, "dsreceiver_uls_bodies_as_sent_total") == 2
    server.wait_for_log(r"WARNING a push from Akamai's Unified Log Streamer is not .* --httpformat")
    assert len(re.findall("is not .* envelopes", server.log_text())) == 1


def test_an_options_body_past_its_limit_gets_413_and_other_paths_keep_their_answers(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--path", PATH)
    with server.tls_connect() as sock:
        sock.sendall(b"OPTIONS /uls HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n")
        assert read_until_close(sock).startswith(b"HTTP/1.1 413 ")
    with server.simulator() as ds:
        assert ds.request("OPTIONS", path="/elsewhere").status == 404
        refused = ds.request("OPTIONS", path="/healthz")
        assert (refused.status, refused.headers["allow"]) == (405, "GET, HEAD")
        assert ds.request("OPTIONS", b"x" * 4096, path=PATH).status == 200
    wait_until(lambda: "OPTIONS /uls 200" in server.log_text(), what="the probe's access line")
    assert server.data_files() == []


# -- the rules, in-process ------------------------------------------------------------------------------------------

def opened(body: bytes, digest: bool = True) -> Optional[dsreceiver.RecordBatch]:
    """What the pipeline makes of a ULS body that BatchBuilder decoded."""
    batch = dsreceiver.BatchBuilder(Path("."), digest).feed_whole(body)
    return dsreceiver.open_envelopes(batch)


@pytest.mark.parametrize("body, records", [
    (b'{"event": [{"a": 1}, {"b": [2, {"c": "}]{["}]}]}', [b'{"a": 1}', b'{"b": [2, {"c": "}]{["}]}']),
    (b'{"event":{"a":"x\\"}"}}{"event":{"b":2}}', [b'{"a":"x\\"}"}', b'{"b":2}']),
    (b'{"event": {"a": 1}}\n{"event": {"b": 2}}\r\n\r\n{"event": [{"c": 3}]}\n', [b'{"a": 1}', b'{"b": 2}',
                                                                               b'{"c": 3}']),
    # An event written over several lines is compacted: one record, one line.
    (b'{"event": [\n  {"a": 1,\n   "b": "two words"}\n]}', [b'{"a":1,"b":"two words"}']),
    (b'{"event": []}', []),
])
def test_envelopes_are_opened_into_one_record_per_event(body: bytes, records: List[bytes]) -> None:
    events = opened(body)
    assert events is not None and events.contents() == b"".join(record + b"\n" for record in records)
    assert events.records == len(records) and events.events == dsreceiver.NO_EVENTS


@pytest.mark.parametrize("body", [
    b'{"event": "connection test"}',  # not an event
    b'{"event": [1, 2]}', b'{"event": [{"a": 1}, 2]}', b'{"event": [[{"a": 1}]]}',  # events are objects
    b'{"event": {"a": 1}, "host": "x"}', b'{"host": "x", "event": {"a": 1}}',  # a record with more keys
    b'{"events": [{"a": 1}]}', b'{"Event": {"a": 1}}', b'{"data": [{"a": 1}]}',  # one envelope key only
    b'{"event": [{"a": 1},]}', b'{"event": [{"a": 1} {"b": 2}]}', b'{"event": {"a": 1}',  # broken JSON
    b'{"event": {"a": 1}} trailing', b'data=[{"a": 1}]', b'{"event": {"a": 1}}[]',
    b'{"event": {"a": 1,}}', b'{"event": {"a": "\xff"}}',  # the event itself is no JSON
])
def test_anything_else_is_not_an_envelope(body: bytes) -> None:
    assert opened(body) is None


def test_a_re_sent_batch_has_the_same_digest_whatever_its_envelope() -> None:
    as_list, as_events = opened(json_list(EVENTS[:4])), opened(single_event(EVENTS[:4]))
    assert as_list is not None and as_events is not None and as_list.digest == as_events.digest is not None
    other = opened(json_list(EVENTS[:3]))
    assert other is not None and other.digest != as_list.digest
    undigested = opened(json_list(EVENTS[:4]), digest=False)  # dedup off: no digest taken
    assert undigested is not None and undigested.digest is None


@pytest.mark.parametrize("number", range(len(LINES)))
def test_each_products_event_time_is_read_where_it_is_certain(number: int) -> None:
    product, _ = PRODUCT_TIMES[number]
    assert dsreceiver.uls_event_time(EVENTS[number]) == EXPECTED_TIMES[LINES[number]], product
    events = opened(json_list([EVENTS[number]]))
    assert events is not None
    expected = EXPECTED_TIMES[LINES[number]]
    assert events.events == (dsreceiver.NO_EVENTS if expected is None else (expected, expected))


def test_a_time_is_certain_only_with_its_offset_or_as_an_epoch_number() -> None:
    access = dict(EVENTS[0])
    for written, expected in (("2021-07-27T18:20:14Z", 1627410014.0), ("2021-07-27T20:20:14+02:00", 1627410014.0),
                              ("2021-07-27T18:20:14-0130", 1627415414.0), ("2021-07-27T18:20:14", None),
                              ("2021-02-30T18:20:14Z", None), ("yesterday", None), ("1627410014", 1627410014.0),
                              (1627410014000, 1627410014.0), (True, None), (1.5, None), (None, None)):
        access["datetime"] = written
        assert dsreceiver.uls_event_time(access) == expected, written
    # An event of no product in the table says nothing, whatever keys it has.
    assert dsreceiver.uls_event_time({"time": 1627410014, "reqTimeSec": "1627410014"}) is None
