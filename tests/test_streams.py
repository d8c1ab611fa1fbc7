"""DataStream streams: per-stream folders, stream definitions, STRUCTURED records stored as JSON, per-stream metrics."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Callable, Dict, List

import pytest

import dsreceiver
from conftest import ServerProcess, scrape, value
from simulator import SAMPLE_DEFINITION, batch_of_lines, restreamed, sample_lines

FIELDS = [entry["datasetFieldJsonKey"] for entry in json.loads(SAMPLE_DEFINITION.read_text())["datasetFields"]]


def short_definition(folder: Path, stream_id: int, fields: List[str], **extra: object) -> Path:
    """Writes a hand-written definition (the short form) into `folder`."""
    folder.mkdir(exist_ok=True)
    path = folder / ("%d-%s.json" % (stream_id, extra.get("streamVersion", "any")))
    path.write_text(json.dumps(dict({"streamId": stream_id, "fields": fields}, **extra)))
    return path


def stream_files(server: ServerProcess) -> Dict[str, List[bytes]]:
    """The stored records, by folder relative to the output folder."""
    found: Dict[str, List[bytes]] = {}
    for path in server.data_files():
        folder = path.parent.relative_to(server.output_dir).as_posix()
        found.setdefault(folder, []).extend(path.read_bytes().split(b"\n")[:-1])
    return found


# -- definitions and conversion, in-process --------------------------------------------


def test_the_api_definition_is_read_in_log_order() -> None:
    definition = dsreceiver.parse_stream_definition(json.loads(SAMPLE_DEFINITION.read_text()))
    assert (definition.stream_id, definition.version, definition.delimiter) == ("61234", "4", b" ")
    assert definition.fields[:3] == ("cp", "reqId", "reqTimeSec") and len(definition.fields) == 43


@pytest.mark.parametrize("document, problem", [
    ([], "expected a JSON object"),
    ({"fields": ["cp"]}, "streamId must be a decimal number"),
    ({"streamId": "61a", "fields": ["cp"]}, "streamId must be a decimal number"),
    ({"streamId": 1, "streamVersion": "x", "fields": ["cp"]}, "streamVersion must be a number"),
    ({"streamId": 1}, "no datasetFields"),
    ({"streamId": 1, "fields": []}, "empty"),
    ({"streamId": 1, "fields": ["cp", "cp"]}, "names a key twice"),
    ({"streamId": 1, "fields": ["c p"]}, "not a usable JSON key"),
    ({"streamId": 1, "fields": ["version"]}, "not a usable JSON key"),
    ({"streamId": 1, "datasetFields": [{"datasetFieldName": "CP code"}]}, "neither datasetFieldJsonKey nor"),
    ({"streamId": 1, "datasetFields": "cp"}, "datasetFields must be a list of objects"),
    ({"streamId": 1, "fields": ["cp"], "fieldDelimiter": "COMMA"}, "fieldDelimiter must be SPACE or TAB"),
    ({"streamId": 1, "fields": ["cp"], "fieldDelimiter": ["TAB"]}, "fieldDelimiter must be SPACE or TAB"),
    ({"streamId": 1, "fields": ["cp"], "deliveryConfiguration": []}, "deliveryConfiguration must be an object"),
])
def test_broken_definitions_say_what_is_wrong(document: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        dsreceiver.parse_stream_definition(document)


def test_an_unknown_field_id_is_kept_under_a_placeholder_key_and_named_as_a_problem() -> None:
    definition = dsreceiver.parse_stream_definition(
        {"streamId": 1, "datasetFields": [{"datasetFieldJsonKey": "cp"}, {"datasetFieldId": 9999}]})
    assert definition.fields == ("cp", "field9999")
    assert definition.problems == ('field 2 is data set field ID 9999, whose JSON key dsreceiver does not know: its '
                                   'values are stored under "field9999" (give it as {"datasetFieldId": 9999, '
                                   '"datasetFieldJsonKey": "KEY"} to name it)',)
    assert dsreceiver.parse_stream_definition(json.loads(SAMPLE_DEFINITION.read_text())).problems == ()


def test_sample_structured_records_become_exactly_the_sample_json_records() -> None:
    definition = dsreceiver.parse_stream_definition(json.loads(SAMPLE_DEFINITION.read_text()))
    converter = dsreceiver.StructuredConverter(definition)
    converted = [converter.convert(line.split(b" ")) for line in sample_lines("structured")]
    assert converted == sample_lines("json")


def test_conversion_escapes_every_byte_json_needs_escaped() -> None:
    converter = dsreceiver.StructuredConverter(dsreceiver.StreamDefinition("7", None, ("a", "b", "c"), b"\t"))
    line = b'4\t7\tsay "hi"\\there\tcaf\xc3\xa9 \x01\x1f\x7f\t-'
    converted = converter.convert_escaping(line.split(b"\t"))
    assert converted is not None
    assert json.loads(converted) == {"version": "4", "streamId": "7", "a": 'say "hi"\\there', "b": "caf\u00e9 \x01\x1f\x7f"}
    assert converter.convert_escaping(b"4\t7\t\xff\t-\t-".split(b"\t")) is None  # not UTF-8: JSON cannot carry it
    assert converter.convert(b"4\t7\tonly-one".split(b"\t")) is None  # field count does not fit


def test_a_definition_that_cannot_be_read_loads_without_fields_and_is_named(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    folder = tmp_path / "streams"
    short_definition(folder, 10, ["cp"])
    (folder / "20.json").write_text('{"streamId": 20, "fields": ["cp", "cp"]}')
    server = start_server("--stream-config", str(folder), "--records", "json")
    server.wait_for_log(r"WARNING stream definition .*20\.json: stream 20: its definition cannot be read, so its "
                        r"STRUCTURED records are stored as sent: the field list is empty or names a key twice")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines([b"4 10 c1", b"4 10 c2"])).status == 200
        assert ds.push(batch_of_lines([b"4 20 c1 c2"])).status == 200
    assert stream_files(server) == {"stream=10": [b'{"version":"4","streamId":"10","cp":"c1"}',
                                                 b'{"version":"4","streamId":"10","cp":"c2"}'],
                                    "stream=20": [b"4 20 c1 c2"]}
    assert value(scrape(server), "dsreceiver_stream_definition_problems", stream="20") == 1
    assert value(scrape(server), "dsreceiver_stream_definition_problems", stream="10") == 0
    assert "Traceback" not in server.log_text()


def test_a_definition_file_that_is_not_json_is_named_at_start(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    folder = tmp_path / "streams"
    short_definition(folder, 1, ["cp"])
    (folder / "2.json").write_text('{"streamId": 2, "fields": ')
    server = start_server("--stream-config", str(folder), "--records", "json", wait=False)
    assert server.wait_exit() == 2
    server.wait_for_log(r"ERROR stream definition .*2\.json: ")
    assert "Traceback" not in server.log_text()


def test_records_json_needs_stream_config(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--records", "json", wait=False)
    assert server.wait_exit() == 2


# -- the server ----------------------------------------------------------------------------


def test_each_stream_gets_its_own_folder(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    first = batch_of_lines(sample_lines("json")[:300])
    second = batch_of_lines(restreamed(sample_lines("structured")[300:500], "70001"), compress=True)
    unnamed = batch_of_lines([b'{"message":"no stream here"}', b"plain text"])
    mixed = batch_of_lines(sample_lines("json")[500:502] + restreamed(sample_lines("json")[502:504], "70001"))
    with server.simulator() as ds:
        for batch in (first, second, unnamed, mixed):
            assert ds.push(batch).status == 200
    stored = stream_files(server)
    assert sorted(stored) == ["stream=61234", "stream=70001", "stream=mixed", "stream=unknown"]
    assert stored["stream=61234"] == first.lines and stored["stream=70001"] == second.lines
    assert stored["stream=unknown"] == unnamed.lines and stored["stream=mixed"] == mixed.lines


def test_partition_by_none_and_route_folders(start_server: Callable[..., ServerProcess]) -> None:
    flat = start_server("--partition-by", "none")
    batch = batch_of_lines(sample_lines("json")[:10])
    with flat.simulator() as ds:
        assert ds.push(batch).status == 200
    assert list(stream_files(flat)) == ["."]
    flat.stop()
    routed = start_server("--route-by-path", output_dir=flat.workdir / "routed")
    with routed.simulator() as ds:
        assert ds.push(batch, path="/akamai/web").status == 200
    assert list(stream_files(routed)) == ["akamai_web/stream=61234"]


def test_structured_records_are_stored_as_json_with_one_schema(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--stream-config", str(SAMPLE_DEFINITION), "--records", "json")
    structured = batch_of_lines(sample_lines("structured")[:400], compress=True)
    as_json = batch_of_lines(sample_lines("json")[400:800])
    with server.simulator() as ds:
        assert ds.push(structured).status == 200
        assert ds.push(as_json).status == 200
    # A stream switched from STRUCTURED to JSON keeps one schema on disk: what its JSON format sends.
    assert stream_files(server) == {"stream=61234": sample_lines("json")[:800]}


def test_records_that_do_not_fit_a_definition_are_stored_as_sent_and_counted(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    folder = tmp_path / "streams"
    short_definition(folder, 61234, FIELDS, streamVersion=4)
    server = start_server("--stream-config", str(folder), "--records", "json")
    good = sample_lines("structured")[:3]
    short = [b"4 61234 1 2 3"]  # too few fields for version 4
    other_version = restreamed(sample_lines("structured")[3:9], "61234", version="5")
    unconfigured = restreamed(sample_lines("structured")[9:11], "70001")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(good + short + other_version[:2])).status == 200
        assert ds.push(batch_of_lines(other_version[2:4])).status == 200
        assert ds.push(batch_of_lines(other_version[4:])).status == 200
        assert ds.push(batch_of_lines(unconfigured)).status == 200
        samples = scrape(server)
    stored = stream_files(server)
    # Nothing is dropped: version 4 records become JSON, the rest stays byte for byte as sent.
    assert stored["stream=61234"] == sample_lines("json")[:3] + short + other_version
    assert stored["stream=70001"] == unconfigured
    assert value(samples, "dsreceiver_stream_unconverted_records_total", stream="61234") == 7
    assert value(samples, "dsreceiver_stream_unconverted_records_total", stream="70001") == 2
    log = server.log_text()
    assert log.count("stream 61234 version 5 has no definition") == 1  # warned once, not per push
    assert log.count("stream 70001 version 4 has no definition") == 1
    assert "stream 61234: 3 of 6 STRUCTURED records do not fit its definition" in log


def test_a_version_change_mid_batch_converts_each_version_with_its_definition(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    folder = tmp_path / "streams"
    short_definition(folder, 61234, FIELDS, streamVersion=4)
    short_definition(folder, 61234, ["cp", "reqId"], streamVersion=5)
    server = start_server("--stream-config", str(folder), "--records", "json")
    lines = sample_lines("structured")[:2] + [b"5 61234 1234 abcdef", b"5 61234 - ghijkl"]
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(lines)).status == 200
    assert stream_files(server)["stream=61234"] == sample_lines("json")[:2] + [
        b'{"version":"5","streamId":"61234","cp":"1234","reqId":"abcdef"}',
        b'{"version":"5","streamId":"61234","reqId":"ghijkl"}']


def test_sighup_rereads_definitions_and_keeps_the_old_ones_when_broken(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    folder = tmp_path / "streams"
    path = short_definition(folder, 70001, ["cp", "reqId"])
    server = start_server("--stream-config", str(folder), "--records", "json")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines([b"4 70001 1 a"])).status == 200
        path.write_text("{not json")
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"stream definitions reload refused, keeping the previous ones: stream definition .*70001")
        assert ds.push(batch_of_lines([b"4 70001 2 b"])).status == 200
        path.write_text(json.dumps({"streamId": 70001, "fields": ["bytes", "reqId"]}))
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"stream definitions reloaded: 1 from")
        assert ds.push(batch_of_lines([b"4 70001 3 c"])).status == 200
    assert stream_files(server)["stream=70001"] == [
        b'{"version":"4","streamId":"70001","cp":"1","reqId":"a"}',
        b'{"version":"4","streamId":"70001","cp":"2","reqId":"b"}',
        b'{"version":"4","streamId":"70001","bytes":"3","reqId":"c"}']


def test_per_stream_metrics(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--workers", "2")
    lines = sample_lines("json")
    for number, address in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.3")):
        with server.simulator(source_address=address) as ds:
            assert ds.push(batch_of_lines(lines[100 * number:100 * number + 100])).status == 200
    # The lag is measured from the newer of the last push's first and last records.
    newest = max(float(json.loads(line)["reqTimeSec"]) for line in (lines[300], lines[399]))
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(lines[300:400])).status == 200
        assert ds.push(batch_of_lines(restreamed(lines[500:505], "70001"))).status == 200
        samples = scrape(server)
    assert value(samples, "dsreceiver_stream_records_total", stream="61234") == 400
    assert value(samples, "dsreceiver_stream_batches_total", stream="61234") == 4
    assert value(samples, "dsreceiver_stream_uploaders", stream="61234") == 3  # .2, .3 and 127.0.0.1
    assert value(samples, "dsreceiver_stream_records_total", stream="70001") == 5
    assert value(samples, "dsreceiver_stream_uploaders", stream="70001") == 1
    lag = value(samples, "dsreceiver_stream_event_lag_seconds", stream="61234")
    assert lag > 0 and abs(value(samples, "dsreceiver_stream_last_push_timestamp_seconds", stream="61234")
                            - (newest + lag)) < 60
