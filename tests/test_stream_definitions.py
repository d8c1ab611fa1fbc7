"""DataStream as it is today: definitions by field ID (API v3, Terraform), every saved shape, midgress lines in
both layouts, field 999 among the fields, security events named by the endpoint URL, values."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

import dsreceiver
from conftest import ServerProcess, batch_of, ledger_totals, scrape, value
from simulator import SAMPLES, batch_of_lines
from test_streams import stream_files

MIDGRESS_DEFINITION = SAMPLES / "ds2-stream-70077-v3-ids-only.json"
MIDGRESS_LINES = (SAMPLES / "ds2-structured-midgress-200.txt").read_bytes().split(b"\n")[:-1]
MIDGRESS_JSON = (SAMPLES / "ds2-json-midgress-200.ndjson").read_bytes().split(b"\n")[:-1]
SECURITY_EVENTS = (SAMPLES / "siem-events-20.ndjson").read_bytes().split(b"\n")[:-1]
# The midgress stream's field IDs in log order, as Terraform lists them (2051, isMidgress, first).
MIDGRESS_IDS = [entry["datasetFieldId"] for entry in json.loads(MIDGRESS_DEFINITION.read_text())["datasetFields"]]


def midgress_document(**changes: Any) -> Dict[str, Any]:
    """The v3 sample definition of stream 70077, with `changes`."""
    return dict(json.loads(MIDGRESS_DEFINITION.read_text()), **changes)


def converted(definition: dsreceiver.StreamDefinition, lines: List[bytes]) -> List[bytes]:
    """What the converter's hot loop makes of `lines`, checking that every one fitted."""
    out, unfit, _, _ = dsreceiver.StructuredConverter(definition).convert_lines(list(lines))
    assert unfit == 0
    return out


def with_midgress_among_fields(line: bytes) -> bytes:
    """A sample line laid out 'version streamId isMidgress ...': the value at its listed position (first)."""
    version, midgress, stream, rest = line.split(b" ", 3)
    return b" ".join([version, stream, midgress, rest])


# -- definitions, in-process ------------------------------------------------------------------------------


def test_a_v3_definition_with_field_ids_only_is_named_from_the_catalog() -> None:
    definition = dsreceiver.parse_stream_definition(midgress_document())
    assert (definition.stream_id, definition.version, definition.interval) == ("70077", "2", 60)
    assert definition.fields == ("isMidgress", "cp", "reqId", "reqTimeSec", "bytes", "cliIP", "statusCode",
                                 "reqHost", "reqPath", "UA", "cacheStatus", "country")


def test_field_2011_converts_to_cache_refresh_source() -> None:
    definition = dsreceiver.parse_stream_definition({"streamId": 70010, "dataset_fields": [1002, 2011, 2010]})
    assert (definition.fields, definition.problems) == (("reqId", "cacheRefreshSrc", "cacheStatus"), ())
    assert converted(definition, [b"3 70010 a1 1 0"]) == [
        b'{"version":"3","streamId":"70010","reqId":"a1","cacheRefreshSrc":"1","cacheStatus":"0"}']


def test_a_key_given_in_the_file_wins_over_the_catalog() -> None:
    entries = [{"datasetFieldId": 1000, "datasetFieldJsonKey": "cpCode"}, {"datasetFieldId": 1002}]
    definition = dsreceiver.parse_stream_definition({"streamId": 5, "datasetFields": entries})
    assert definition.fields == ("cpCode", "reqId")


@pytest.mark.parametrize("short", [
    {"streamId": 70077, "streamVersion": 2, "dataset_fields": MIDGRESS_IDS},
    {"streamId": 70077, "streamVersion": 2, "fields": MIDGRESS_IDS},
    {"streamId": 70077, "streamVersion": 2, "fields": ["isMidgress"] + MIDGRESS_IDS[1:6] + ["statusCode"]
     + MIDGRESS_IDS[7:]},
])
def test_terraform_ids_and_mixed_short_forms_mean_the_same_stream(short: Dict[str, Any]) -> None:
    assert dsreceiver.parse_stream_definition(short).fields == dsreceiver.parse_stream_definition(
        midgress_document()).fields


def test_every_saved_shape_loads(tmp_path: Path) -> None:
    one = midgress_document()
    other = dict(midgress_document(streamId=70078, streamVersion=1))
    json_stream = {"streamId": 70079, "streamVersion": 3,
                   "deliveryConfiguration": {"format": "JSON", "frequency": {"intervalInSeconds": 30}}}
    shapes = {"get.json": one, "list.json": [other], "answer.json": {"streams": [json_stream]}}
    for name, document in shapes.items():
        (tmp_path / name).write_text(json.dumps(document))
    loaded = {d.stream_id: d for d in dsreceiver.load_stream_definitions(tmp_path)}
    assert sorted(loaded) == ["70077", "70078", "70079"]
    assert loaded["70079"].fields == () and loaded["70079"].interval == 30  # JSON: nothing to convert
    catalog = dsreceiver.StreamCatalog(tmp_path, to_json=True)
    assert catalog.push_interval("70079") == 30 and catalog.converter("70079", "3") is None


def test_a_structured_stream_from_a_list_without_fields_loads_with_its_problem_named(tmp_path: Path) -> None:
    listed = {"streams": [{"streamId": 70080, "streamName": "web", "streamVersion": 1}]}
    (tmp_path / "list.json").write_text(json.dumps(listed))
    catalog = dsreceiver.StreamCatalog(tmp_path, to_json=True)
    assert catalog.converter("70080", "1") is None  # its records are stored as sent
    [problem] = catalog.problems()["70080"]
    assert problem.startswith("its definition cannot be read, so its STRUCTURED records are stored as sent: "
                              "no datasetFields") and "get a stream" in problem


# -- conversion and classification, in-process ----------------------------------------------------------


def test_midgress_in_second_place_converts_to_the_json_format_record_by_record() -> None:
    definition = dsreceiver.parse_stream_definition(midgress_document())
    assert converted(definition, MIDGRESS_LINES) == MIDGRESS_JSON
    converter = dsreceiver.StructuredConverter(definition)
    assert [converter.convert(line.split(b" ")) for line in MIDGRESS_LINES] == MIDGRESS_JSON


def test_midgress_at_its_listed_place_converts_alike() -> None:
    definition = dsreceiver.parse_stream_definition(midgress_document())
    assert converted(definition, [with_midgress_among_fields(line) for line in MIDGRESS_LINES]) == MIDGRESS_JSON


def test_collect_midgress_without_field_2051_listed_still_converts() -> None:
    # Akamai's own example of a midgress stream lists its fields without isMidgress.
    document = midgress_document(datasetFields=json.loads(MIDGRESS_DEFINITION.read_text())["datasetFields"][1:])
    definition = dsreceiver.parse_stream_definition(document)
    assert "isMidgress" not in definition.fields
    assert converted(definition, MIDGRESS_LINES) == MIDGRESS_JSON


def test_field_999_among_the_fields_converts_with_the_stream_id_repeated_or_not() -> None:
    definition = dsreceiver.parse_stream_definition(midgress_document(
        datasetFields=[{"datasetFieldId": 999}] + json.loads(MIDGRESS_DEFINITION.read_text())["datasetFields"]))
    assert definition.fields[:2] == ("streamId", "isMidgress")
    repeated = [line.replace(b" 70077 ", b" 70077 70077 ", 1) for line in MIDGRESS_LINES]
    assert converted(definition, repeated) == MIDGRESS_JSON
    assert converted(definition, MIDGRESS_LINES) == MIDGRESS_JSON


def test_the_stream_id_of_a_midgress_line_is_read_from_its_place_without_a_definition() -> None:
    catalog = dsreceiver.StreamCatalog(None, to_json=False)
    for lines in (MIDGRESS_LINES, [with_midgress_among_fields(line) for line in MIDGRESS_LINES]):
        data = b"\n".join(lines) + b"\n"
        assert catalog.classify(dsreceiver.RecordBatch([data], None, len(data), len(lines))).stream == "70077"


def test_midgress_after_the_stream_id_converts_without_field_2051_listed() -> None:
    document = midgress_document(datasetFields=json.loads(MIDGRESS_DEFINITION.read_text())["datasetFields"][1:])
    definition = dsreceiver.parse_stream_definition(document)
    assert converted(definition, [with_midgress_among_fields(line) for line in MIDGRESS_LINES]) == MIDGRESS_JSON
    converter = dsreceiver.StructuredConverter(definition)
    mixed = [with_midgress_among_fields(MIDGRESS_LINES[0]), MIDGRESS_LINES[1]]
    assert [converter.convert(line.split(b" ")) for line in mixed] == MIDGRESS_JSON[:2]


def catalog_of(tmp_path: Path, *documents: Dict[str, Any]) -> dsreceiver.StreamCatalog:
    """A --records json catalog of these definitions."""
    (tmp_path / "streams.json").write_text(json.dumps(list(documents)))
    return dsreceiver.StreamCatalog(tmp_path / "streams.json", to_json=True)


def pushed(*lines: bytes) -> dsreceiver.RecordBatch:
    data = b"\n".join(lines) + b"\n"
    return dsreceiver.RecordBatch([data], None, len(data), len(lines))


def test_lines_without_a_stream_id_take_the_stream_that_fits_never_their_cp_code(tmp_path: Path) -> None:
    bare = [b"3 1059344 r1 1764200000.713", b"3 872111 r2 -"]
    short = {"streamId": 70088, "streamVersion": 3, "fields": ["cp", "reqId", "reqTimeSec"]}
    catalog = catalog_of(tmp_path, short)
    for named in (None, "70088"):
        records = catalog.classify(pushed(*bare), named)
        assert (records.stream, records.unconverted) == ("70088", 0)
        assert records.batch.joined() == (
            b'{"version":"3","streamId":"70088","cp":"1059344","reqId":"r1","reqTimeSec":"1764200000.713"}\n'
            b'{"version":"3","streamId":"70088","cp":"872111","reqId":"r2"}\n')
    # Another version, or a line of another length, fits no definition: nothing tells, so today's reading.
    assert catalog.classify(pushed(b"4 1059344 r1 1764200000.713")).stream == "1059344"
    assert catalog.classify(pushed(b"3 1059344 r1 1764200000.713 x")).stream == "1059344"
    # Two definitions without field 999 that fit alike: nothing tells either.
    twin = dict(short, streamId=70089)
    assert catalog_of(tmp_path, short, twin).classify(pushed(*bare)).stream == "mixed"
    # A line naming a defined stream keeps it, whatever the URL says.
    defined = catalog_of(tmp_path, short, {"streamId": 61234, "fields": ["cp"]})
    assert defined.classify(pushed(b"4 61234 1059344"), "70088").stream == "61234"
    # Without definitions, the URL's stream tells: stored as sent there.
    records = dsreceiver.StreamCatalog(None, to_json=False).classify(pushed(*bare), "70088")
    assert (records.stream, records.batch.joined()) == ("70088", b"\n".join(bare) + b"\n")


def test_a_security_deliverys_metadata_object_is_not_a_record() -> None:
    events = SECURITY_EVENTS[:3]
    catalog = dsreceiver.StreamCatalog(None, to_json=False)
    for metadata in (b'{"total":8,"offset":"a1b2c;7QxZ2mP0rTq","limit":10000}',
                     b'{"limit": 10000, "total": 10000, "offset": "71cca;3phZ"}'):
        records = catalog.classify(pushed(*events, metadata))
        assert records.batch.records == 3 and records.batch.joined() == b"\n".join(events) + b"\n"
        assert records.is_unique()  # every event names its request: a retry is stored once
    # A batch spooled to a file (a very large one) loses its metadata object alike.
    data = b"\n".join(events + [b'{"total":3,"offset":"x","limit":10}']) + b"\n"
    with tempfile.TemporaryFile() as spool:
        spool.write(data)
        records = catalog.classify(dsreceiver.RecordBatch([], spool, len(data), 4))
        assert records.batch.records == 3 and b"".join(records.batch.chunks()) == b"\n".join(events) + b"\n"
    # Not metadata: other keys, or an event.
    for line in (b'{"total":8,"offset":"x","limit":1,"more":1}', SECURITY_EVENTS[3]):
        assert catalog.classify(pushed(*events, line)).batch.records == 4


def test_edgeworkers_logs_name_their_stream_in_ds2id_and_their_time_in_ms_or_ns() -> None:
    elements = json.loads((SAMPLES / "ew-jslogs-70099.json").read_bytes())
    lines = [json.dumps(element, separators=(",", ":")).encode() for element in elements]
    records = dsreceiver.StreamCatalog(None, to_json=False).classify(pushed(*lines))
    assert records.stream == "70099"
    assert records.newest_event == max(int(element["time"]) for element in elements) / 1000
    assert dsreceiver.event_time_seconds("1764255600250000000") == 1764255600.25
    assert dsreceiver.event_time_seconds(b"1764255600250") == 1764255600.25
    assert dsreceiver.event_time_seconds("1764200000.507") == 1764200000.507
    assert dsreceiver.event_time_seconds("-") is None and dsreceiver.event_time_seconds("12") is None
    assert dsreceiver.EVENT_TIME_KEYS == ("reqTimeSec", "httpMessage.start", "time")


def test_caret_is_a_value_and_dash_is_left_out() -> None:
    definition = dsreceiver.StreamDefinition("70090", None, ("accLang", "cookie", "overheadBytes"), b" ")
    [record] = converted(definition, [b"3 70090 ^ - ^"])
    assert json.loads(record) == {"version": "3", "streamId": "70090", "accLang": "^", "overheadBytes": "^"}


def test_the_converter_tells_the_event_range_only_when_every_time_is_one() -> None:
    definition = dsreceiver.StreamDefinition("70092", None, ("cp", "reqTimeSec"), b" ")
    converter = dsreceiver.StructuredConverter(definition)
    times = [b"3 70092 1 1764200000.507", b"3 70092 1 1764199990.000", b"3 70092 1 1764200010.250"]
    assert converter.convert_lines(times)[3] == (1764199990.0, 1764200010.25)
    # A value that is no time within the range is no event time, as when the JSON records are read back.
    assert converter.convert_lines(times + [b"3 70092 1 17642"])[3] == (1764199990.0, 1764200010.25)
    # A time left out ('-') or not one at an edge, or another layout among the lines: read back when sealed.
    for odd in (b"3 70092 1 -", b"3 70092 1 9", b"3 70092 1 1764200000.1 extra"):
        assert converter.convert_lines(times + [odd])[3] is None
    assert dsreceiver.StructuredConverter(
        dsreceiver.StreamDefinition("70093", None, ("cp",), b" ")).convert_lines([b"3 70093 1"])[3] == (0.0, 0.0)


def test_a_tab_stream_splits_on_tab_only() -> None:
    definition = dsreceiver.StreamDefinition("70091", None, ("UA", "reqPath"), b"\t")
    [record] = converted(definition, [b"3\t70091\tcurl 8.5 (raw space)\tindex.html"])
    assert json.loads(record)["UA"] == "curl 8.5 (raw space)"


# -- the server, over TLS -----------------------------------------------------------------------------------


def test_a_definition_with_ids_only_starts_the_server_and_converts_midgress(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--stream-config", str(MIDGRESS_DEFINITION), "--records", "json")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(MIDGRESS_LINES[:120], compress=True)).status == 200
        assert ds.push(batch_of_lines([with_midgress_among_fields(line) for line in MIDGRESS_LINES[120:]])).status == 200
    assert stream_files(server) == {"stream=70077": MIDGRESS_JSON}
    assert value(scrape(server), "dsreceiver_stream_unconverted_records_total", stream="70077") == 0


def test_midgress_lines_without_a_definition_go_to_their_stream(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(MIDGRESS_LINES)).status == 200
    assert stream_files(server) == {"stream=70077": MIDGRESS_LINES}


def test_an_unknown_field_id_never_stops_the_server_and_its_values_are_kept(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    path = tmp_path / "streams.json"
    path.write_text(json.dumps([{"streamId": 70077, "dataset_fields": [1000, 4242]},
                                {"streamId": 61234, "fields": ["cp", "reqId"]}]))
    server = start_server("--stream-config", str(path), "--records", "json")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines([b"2 70077 1059344 %41b", b"2 70077 872111 -"])).status == 200
        assert ds.push(batch_of_lines([b"4 61234 99321 a1"])).status == 200
        document = json.loads(ds.request("GET", path="/status.json").body)
        page = ds.request("GET", path="/status").body.decode()
    assert stream_files(server) == {
        "stream=70077": [b'{"version":"2","streamId":"70077","cp":"1059344","field4242":"%41b"}',
                         b'{"version":"2","streamId":"70077","cp":"872111"}'],
        "stream=61234": [b'{"version":"4","streamId":"61234","cp":"99321","reqId":"a1"}']}
    problem = ('field 2 is data set field ID 4242, whose JSON key dsreceiver does not know: its values are stored '
               'under "field4242"')
    [warning] = [line for line in server.log_text().splitlines() if "4242" in line]
    assert " WARNING " in warning and "stream 70077: " + problem in warning
    assert [(item["stream"], item["problem"][:len(problem)]) for item in document["definition_problems"]] == [
        ("70077", problem)]
    assert 'data-stream="70077">stream 70077: field 2 is data set field ID 4242' in page
    samples = scrape(server)
    assert value(samples, "dsreceiver_stream_definition_problems", stream="70077") == 1
    assert value(samples, "dsreceiver_stream_definition_problems", stream="61234") == 0


def test_security_events_go_to_the_stream_their_url_names_and_a_retry_is_stored_once(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    events = batch_of_lines(SECURITY_EVENTS, compress=True)
    with server.simulator(path="/datastream?streamId=80001") as ds:
        assert ds.push(events).body == b"stored 20 records\n"
        assert ds.push(events).body == b"already stored 20 records\n"  # DataStream's retry
    with server.simulator() as ds:  # the same endpoint without the stream's name
        assert ds.push(batch_of_lines(SECURITY_EVENTS[:5])).status == 200
        document = json.loads(ds.request("GET", path="/status.json").body)
    assert stream_files(server) == {"stream=80001": SECURITY_EVENTS, "stream=unknown": SECURITY_EVENTS[:5]}
    rows = {row["stream"]: row for row in document["streams"]}
    assert rows["80001"]["records_total"] == 20 and rows["80001"]["dedupe_hits"] == 1
    assert rows["80001"]["event_lag_seconds"] is not None  # from httpMessage.start
    samples = scrape(server)
    assert value(samples, "dsreceiver_stream_records_total", stream="80001") == 20


def test_a_security_batch_with_an_event_lacking_its_request_id_is_never_dropped(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    anonymous = json.loads(SECURITY_EVENTS[3])
    del anonymous["httpMessage"]["requestId"]
    lines = SECURITY_EVENTS[:3] + [json.dumps(anonymous, separators=(",", ":")).encode()]
    with server.simulator(path="/datastream?streamId=80001") as ds:
        assert ds.push(batch_of_lines(lines)).status == 200
        assert ds.push(batch_of_lines(lines)).body == b"stored 4 records\n"  # may be genuine: stored again
    assert stream_files(server) == {"stream=80001": lines * 2}


@pytest.mark.parametrize("query", ["streamId=abc", "streamId=1", "streamId=", "streamId=80001&streamId=80002",
                                   "streamId=0061234", "streamId=00"])
def test_a_url_naming_no_valid_stream_is_refused_and_stores_nothing(
        start_server: Callable[..., ServerProcess], query: str) -> None:
    server = start_server()
    with server.simulator(path="/datastream?" + query) as ds:
        answer = ds.push(batch_of_lines(SECURITY_EVENTS[:2]))
    assert answer.status == 400 and b"stream" in answer.body
    assert server.data_files() == []


# -- hostile definitions, forged times, one name per stream (issue 25) ----------------------------------------------

DEEP = "[" * 100000 + "]" * 100000


def test_a_deeply_nested_stream_config_is_one_line_at_start_and_refused_on_sighup(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    path = tmp_path / "streams.json"
    path.write_text(DEEP)
    refused = start_server("--stream-config", str(path), "--records", "json", wait=False)
    assert refused.wait_exit() == 2
    [line] = [line for line in refused.log_text().splitlines() if line.strip()]
    assert "ERROR stream definition %s: JSON nested too deeply to read" % path in line
    path.write_text(json.dumps({"streamId": 61234, "fields": ["cp", "reqTimeSec"]}))
    server = start_server("--stream-config", str(path), "--records", "json", "--workers", "2")
    path.write_text(DEEP)
    server.send_signal(signal.SIGHUP)
    server.wait_for_log("stream definitions reload refused, keeping the previous ones: stream definition %s: JSON "
                        "nested too deeply to read" % path, count=2)
    with server.simulator() as ds:
        for _ in range(4):  # a connection each, so that both workers are likely asked
            assert ds.push(batch_of_lines([b"4 61234 99321 1764200000.123"])).status == 200
    assert set(stream_files(server)["stream=61234"]) == {
        b'{"version":"4","streamId":"61234","cp":"99321","reqTimeSec":"1764200000.123"}'}
    assert value(scrape(server), "dsreceiver_worker_restarts_total") == 0
    assert "Traceback" not in server.log_text()


def test_a_visitors_time_token_never_moves_the_lag_of_a_structured_stream(tmp_path: Path) -> None:
    path = tmp_path / "streams.json"
    path.write_text(json.dumps({"streamId": 61234, "fields": ["queryStr", "reqTimeSec", "reqId"]}))
    forged = [b"4 61234 a=9999999999.999 1764200000.123 r1", b"4 61234 9999999999.999 1764200001.456 r2"]
    for to_json in (True, False):
        catalog = dsreceiver.StreamCatalog(path, to_json)
        assert catalog.classify(batch_of(*forged)).newest_event == 1764200001.456
        # A line that does not fit the definition, and a stream without one: no lag rather than a forged one.
        assert catalog.classify(batch_of(b"4 61234 9999999999.999 1764200000.123")).newest_event is None
        assert catalog.classify(batch_of(b"4 70001 9999999999.999 1764200000.123 r1")).newest_event is None


def test_a_stream_id_with_leading_zeros_is_filed_as_unknown_and_counted(
        start_server: Callable[..., ServerProcess]) -> None:
    catalog = dsreceiver.StreamCatalog(None, False)
    for lines in ([b'{"streamId":"000061234","n":1}'], [b"4 000061234 99321 r1"], [b'{"streamId":"0","n":1}']):
        records = catalog.classify(batch_of(*lines))
        assert (records.stream, records.odd_stream_id) == ("unknown", True)
    assert catalog.classify(batch_of(b'{"streamId":"61234","n":1}')).odd_stream_id is False
    server = start_server()
    odd = [b'{"streamId":"000061234","n":%d}' % n for n in range(3)]
    with server.simulator() as ds:
        assert ds.push(batch_of_lines([b'{"streamId":"61234","n":9}'])).status == 200
        assert ds.push(batch_of_lines(odd)).status == 200
    with server.simulator(path="/datastream?streamId=80001") as ds:  # never filed under the URL's stream either
        assert ds.push(batch_of_lines(odd[:1])).status == 200
    assert stream_files(server) == {"stream=61234": [b'{"streamId":"61234","n":9}'], "stream=unknown": odd + odd[:1]}
    assert value(scrape(server), "dsreceiver_odd_stream_ids_total") == 2
    assert server.stop() == 0
    totals = ledger_totals(server.output_dir)
    assert totals["61234"]["records"] == 1 and totals["unknown"]["records"] == 4
