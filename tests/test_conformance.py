"""Conformance: every published shape of a DataStream delivery, pushed over TLS to the real server, and exactly what
is stored, in which folder, and what the ledger counts (see ../shared/DATASTREAM.md and the README's streams table)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from conftest import ServerProcess, ledger_totals, scrape, value
from simulator import SAMPLE_DEFINITION, SAMPLES, Batch, batch_of_lines, sample_lines

SECURITY_DELIVERY = (SAMPLES / "siem-delivery-8-with-metadata.ndjson").read_bytes()
SECURITY_EVENTS = (SAMPLES / "siem-events-20.ndjson").read_bytes().split(b"\n")[:-1]
NO_STREAM_ID_DEFINITION = SAMPLES / "ds2-stream-70088-v3-no-streamid.json"
NO_STREAM_ID_BODY = (SAMPLES / "ds2-structured-no-streamid-50.txt").read_bytes()
MIDGRESS_DEFINITION = SAMPLES / "ds2-stream-70077-v3-ids-only.json"
MIDGRESS_LINES = (SAMPLES / "ds2-structured-midgress-200.txt").read_bytes().split(b"\n")[:-1]
MIDGRESS_JSON = (SAMPLES / "ds2-json-midgress-200.ndjson").read_bytes().split(b"\n")[:-1]
EDGEWORKERS_BODY = (SAMPLES / "ew-jslogs-70099.json").read_bytes()


def raw(body: bytes, compress: bool = False) -> Batch:
    """A push of exactly these bytes (no final newline added)."""
    headers = {"Content-Type": "application/json"}
    if compress:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    return Batch(lines=[], body=body, gzip=compress, headers=headers)


def stored(server: ServerProcess) -> Dict[str, List[bytes]]:
    """The stored records, by folder; checks every data file ends with a whole record."""
    found: Dict[str, List[bytes]] = {}
    for path in server.data_files():
        data = path.read_bytes()
        assert data.endswith(b"\n")
        found.setdefault(path.parent.relative_to(server.output_dir).as_posix(), []).extend(data.split(b"\n")[:-1])
    return found


def ledger(server: ServerProcess) -> Dict[str, Dict[str, Any]]:
    """`dsreceiver.py ledger --json` of the server's output folder, once the server has stopped."""
    assert server.stop() == 0
    return ledger_totals(server.output_dir)


def definitions(tmp_path: Path, *documents: Any) -> Path:
    """A --stream-config file holding these definitions."""
    path = tmp_path / "streams.json"
    path.write_text(json.dumps(list(documents)))
    return path


def without_midgress_field(path: Path) -> Dict[str, Any]:
    """The definition at `path` without data set field 2051 (isMidgress), as Akamai's own example lists it."""
    document: Dict[str, Any] = json.loads(path.read_text())
    document["datasetFields"] = [entry for entry in document["datasetFields"] if entry["datasetFieldId"] != 2051]
    return document


# -- security (SIEM) deliveries -------------------------------------------------------------------------------------


def test_a_security_delivery_with_its_metadata_object_sent_twice_stores_its_events_once(
        start_server: Callable[..., ServerProcess]) -> None:
    assert not SECURITY_DELIVERY.endswith(b"\n")
    events = SECURITY_DELIVERY.split(b"\n")[:-1]
    server = start_server("--log-level", "debug")
    with server.simulator(path="/datastream?streamId=80001") as ds:
        assert ds.push(raw(SECURITY_DELIVERY)).body == b"stored 8 records\n"
        assert ds.push(raw(SECURITY_DELIVERY)).body == b"already stored 8 records\n"  # DataStream's retry
        document = json.loads(ds.request("GET", path="/status.json").body)
    assert stored(server) == {"stream=80001": events}
    assert all(b'"offset"' not in path.read_bytes() for path in server.data_files())
    server.wait_for_log(r"DEBUG a security delivery's metadata object, not stored: .*\"total\":8")
    [row] = document["streams"]
    assert (row["records_total"], row["dedupe_hits"]) == (8, 1)
    assert value(scrape(server), "dsreceiver_stream_records_total", stream="80001") == 8
    totals = ledger(server)["80001"]
    assert (totals["records"], totals["batches"], totals["duplicates"]) == (8, 1, 1)


def test_a_security_delivery_without_metadata_sent_twice_is_stored_once(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with server.simulator(path="/datastream?streamId=80002") as ds:
        assert ds.push(batch_of_lines(SECURITY_EVENTS, compress=True)).body == b"stored 20 records\n"
        assert ds.push(batch_of_lines(SECURITY_EVENTS, compress=True)).body == b"already stored 20 records\n"
    assert stored(server) == {"stream=80002": SECURITY_EVENTS}
    totals = ledger(server)["80002"]
    assert (totals["records"], totals["batches"], totals["duplicates"]) == (20, 1, 1)


def test_a_delivery_of_its_metadata_object_alone_stores_nothing(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with server.simulator(path="/datastream?streamId=80001") as ds:
        answer = ds.push(raw(b'{"total": 0, "offset": "a1b2c;7QxZ", "limit": 10000}\n'))
    assert answer.status == 200 and answer.body == b"stored 0 records\n"
    assert stored(server) == {}


# -- STRUCTURED -----------------------------------------------------------------------------------------------------


def test_structured_lines_with_field_999_convert_under_their_stream(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--stream-config", str(SAMPLE_DEFINITION), "--records", "json")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(sample_lines("structured")[:300], compress=True)).body == b"stored 300 records\n"
    assert stored(server) == {"stream=61234": sample_lines("json")[:300]}
    totals = ledger(server)["61234"]
    assert (totals["records"], totals["batches"]) == (300, 1)


def test_structured_lines_without_a_stream_id_are_filed_under_the_url_stream_and_converted(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    assert not NO_STREAM_ID_BODY.endswith(b"\n") and NO_STREAM_ID_BODY.startswith(b"3 1059344 ")
    server = start_server("--stream-config", str(NO_STREAM_ID_DEFINITION), "--records", "json")
    with server.simulator(path="/datastream?streamId=70088") as ds:
        assert ds.push(raw(NO_STREAM_ID_BODY)).body == b"stored 50 records\n"
    with server.simulator() as ds:  # without the URL's name: the definition's field count tells
        assert ds.push(raw(NO_STREAM_ID_BODY, compress=True)).body == b"already stored 50 records\n"
        first_half = b"\r\n".join(NO_STREAM_ID_BODY.split(b"\n")[:25]) + b"\r\n"
        assert ds.push(raw(first_half)).body == b"stored 25 records\n"
    records = stored(server)
    assert list(records) == ["stream=70088"]
    keys = ["cp", "reqId", "reqTimeSec", "bytes", "cliIP", "statusCode", "reqHost", "reqPath", "UA", "cacheStatus"]
    expected = []
    for line in NO_STREAM_ID_BODY.split(b"\n"):
        version, *values = line.decode().split(" ")
        record = {"version": version, "streamId": "70088"}
        record.update((key, text) for key, text in zip(keys, values) if text != "-")
        expected.append(record)
    assert [json.loads(line) for line in records["stream=70088"]] == expected + expected[:25]
    assert value(scrape(server), "dsreceiver_stream_unconverted_records_total", stream="70088") == 0
    totals = ledger(server)
    assert list(totals) == ["70088"] and totals["70088"]["records"] == 75


def test_structured_lines_without_a_stream_id_and_without_a_definition_go_to_the_url_stream_as_sent(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with server.simulator(path="/datastream?streamId=70088") as ds:
        assert ds.push(raw(NO_STREAM_ID_BODY)).body == b"stored 50 records\n"
    assert stored(server) == {"stream=70088": NO_STREAM_ID_BODY.split(b"\n")}
    assert ledger(server)["70088"]["records"] == 50


def test_midgress_in_either_place_converts_with_a_definition_that_does_not_list_it(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    config = definitions(tmp_path, without_midgress_field(MIDGRESS_DEFINITION))
    server = start_server("--stream-config", str(config), "--records", "json")
    assert MIDGRESS_LINES[0].startswith(b"2 0 70077 ")  # version isMidgress streamId ...
    after_stream_id = []  # version streamId isMidgress ...
    for line in MIDGRESS_LINES:
        version, midgress, stream, rest = line.split(b" ", 3)
        after_stream_id.append(b" ".join([version, stream, midgress, rest]))
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(MIDGRESS_LINES[:100])).status == 200
        assert ds.push(batch_of_lines(after_stream_id[100:], compress=True)).status == 200
        assert ds.push(batch_of_lines(after_stream_id[:3] + MIDGRESS_LINES[3:6])).status == 200  # mixed, per line
    assert stored(server) == {"stream=70077": MIDGRESS_JSON + MIDGRESS_JSON[:6]}
    assert value(scrape(server), "dsreceiver_stream_unconverted_records_total", stream="70077") == 0
    assert ledger(server)["70077"]["records"] == 206


def test_midgress_json_records_are_stored_as_sent(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(MIDGRESS_JSON)).status == 200
    assert stored(server) == {"stream=70077": MIDGRESS_JSON}
    assert ledger(server)["70077"]["records"] == 200


# -- EdgeWorkers, JSON values, framing ------------------------------------------------------------------------------


def test_an_edgeworkers_array_is_filed_under_its_ds2id_one_record_per_element(
        start_server: Callable[..., ServerProcess]) -> None:
    elements = json.loads(EDGEWORKERS_BODY)
    server = start_server()
    with server.simulator() as ds:
        assert ds.push(raw(EDGEWORKERS_BODY)).body == b"stored %d records\n" % len(elements)
        document = json.loads(ds.request("GET", path="/status.json").body)
    records = stored(server)
    assert list(records) == ["stream=70099"]
    assert [json.loads(line) for line in records["stream=70099"]] == elements
    [row] = document["streams"]
    newest = max(int(element["time"]) for element in elements) / 1000  # milliseconds
    assert newest - 5 < document["generated"] - row["event_lag_seconds"] < newest + 5
    assert ledger(server)["70099"]["records"] == len(elements)


def test_json_records_with_dash_caret_and_empty_values_are_stored_exactly_as_sent(
        start_server: Callable[..., ServerProcess]) -> None:
    # As a real stream's record was seen: version a string, no streamId, '-', '^' and "" among the values.
    lines = [b'{"version":"4","cp":"123456","reqId":"a1","reqTimeSec":"%d.120","referer":"-","cookie":"-",'
             b'"errorCode":"-","overheadBytes":"^","accLang":"^","customField":"","reqPath":"-"}' % time.time(),
             b'{"version":1,"streamId":"61234","cp":"-","reqId":"a2","UA":"","breadcrumbs":"[[a]]"}']
    server = start_server()
    with server.simulator(path="/datastream?streamId=61234") as ds:
        assert ds.push(batch_of_lines(lines[:1])).status == 200
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(lines[1:])).status == 200
    assert stored(server) == {"stream=61234": lines}
    assert ledger(server)["61234"]["records"] == 2


def test_a_body_without_a_final_newline_loses_no_record(start_server: Callable[..., ServerProcess]) -> None:
    lines = sample_lines("json")[:5]
    server = start_server()
    with server.simulator() as ds:
        assert ds.push(raw(b"\n".join(lines))).body == b"stored 5 records\n"
        assert ds.push(raw(b"\n".join(lines), compress=True)).body == b"already stored 5 records\n"
    assert stored(server) == {"stream=61234": lines}
    totals = ledger(server)["61234"]
    assert (totals["records"], totals["duplicates"]) == (5, 1)


def test_an_edgeworkers_array_with_a_cut_emoji_or_too_deep_to_read_is_stored_never_a_500(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    # What JSON.stringify gives for a string cut inside an emoji: a lone surrogate, which UTF-8 cannot hold.
    cut = b'[{"ds2id":"70099","time":"1764201500000","msg":"cut emoji \\ud83d"},{"ds2id":"70099","msg":"ok"}]'
    deep = b"[" * 970 + b"]" * 970  # about as deep as Python's json reads or writes
    deeper = b"[" * 5000 + b"]" * 5000  # deeper than it reads
    with server.simulator() as ds:
        assert ds.push(raw(cut)).status == 200
        assert ds.push(raw(deep)).status == 200
        assert ds.push(raw(deeper)).status == 200
    assert server.stop() == 0
    records = stored(server)
    assert records["stream=70099"] == [b'{"ds2id":"70099","time":"1764201500000","msg":"cut emoji \\ud83d"}',
                                       b'{"ds2id":"70099","msg":"ok"}']  # one element a line, the escape kept
    # Each one record: its one element, or (where json cannot rewrite it) the array as sent.
    assert records["stream=unknown"] in ([deep[1:-1], deeper], [deep, deeper])
    assert "Traceback" not in server.log_text()


FAULTY_DECODER = """\
import sys
sys.path.insert(0, {root!r})
import dsreceiver


def broken_finish(self):
    raise KeyError("a bug that this body sets off")


dsreceiver.BatchBuilder.finish = broken_finish
sys.exit(dsreceiver.main())
"""


def test_a_body_that_sets_off_a_bug_is_refused_400_with_one_traceback_a_minute(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    wrapper = tmp_path / "faulty_decoder.py"
    wrapper.write_text(FAULTY_DECODER.format(root=str(Path(__file__).resolve().parents[1])))
    server = start_server(script=wrapper)
    with server.simulator() as ds:
        answers = [ds.push(batch_of_lines(sample_lines("json")[:3])) for _ in range(5)]  # DataStream's retries
    assert [answer.status for answer in answers] == [400] * 5
    assert b"unexpected KeyError" in answers[0].body and b"a bug" not in answers[0].body  # no detail leaks
    server.wait_for_log(r"(?s)ERROR unexpected KeyError in a push .*Traceback.*a bug that this body sets off")
    assert server.log_text().count("Traceback") == 1  # once per kind a minute, not per push
    assert value(scrape(server), "dsreceiver_surprises_total") == 5
    assert server.stored_bytes() == b""
