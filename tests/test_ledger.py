"""The ledger: per stream and 5-minute window, exactly the batches stored, whatever stopped, crashed, restarted
or moved the files; and the answers that stored nothing (retries, refusals)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Callable, Dict, List

import dsreceiver
from conftest import ServerProcess, ledger_totals, open_storage, run_command
from simulator import batch_of_lines, restreamed, sample_lines

STREAMS = ("61234", "70077")


def stream_batch(stream: str, name: str, count: int = 25) -> List[bytes]:
    """`count` distinct sample records of `stream`, tagged by `name` so that every batch is unique."""
    lines = restreamed(sample_lines("json")[:count], stream)
    return [line.replace(b'"reqId":"', b'"reqId":"%s-' % name.encode(), 1) for line in lines]


def stored_per_stream(output: Path) -> Dict[str, int]:
    """Records in the data files, by the stream=ID folder they are in."""
    counts: Dict[str, int] = {}
    for path in output.glob("stream=*/2*.log*"):
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        stream = path.parent.name[len("stream="):]
        counts[stream] = counts.get(stream, 0) + data.count(b"\n")
    return counts


def test_the_ledger_counts_what_was_stored_across_stops_kills_and_worker_restarts(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    output = tmp_path / "data"
    server = start_server("--workers", "2", output_dir=output)
    pushed = {stream: 0 for stream in STREAMS}

    def push_round(name: str, server: ServerProcess) -> None:
        with server.simulator() as ds:
            for stream in STREAMS:
                for number in range(3):
                    lines = stream_batch(stream, "%s-%d" % (name, number))
                    assert ds.push(batch_of_lines(lines, compress=True)).status == 200
                    pushed[stream] += len(lines)

    push_round("first", server)
    with server.simulator() as ds:
        again = batch_of_lines(stream_batch("61234", "first-0"), compress=True)
        assert ds.push(again).status == 200  # a retry: answered as already stored
        broken = ds.request("POST", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"})
        assert broken.status == 400
    assert server.stop() == 0
    server.start()
    push_round("after-restart", server)
    match = server.wait_for_log(r"started 2 workers \(pids (\d+) (\d+)\)")
    os.kill(int(match.group(1)), signal.SIGKILL)
    server.wait_for_log(r"worker \d \(pid %s\) exited with -9; restarting it" % match.group(1))
    push_round("after-worker-restart", server)
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)  # every process at once
    server.process.wait()
    server.start()
    push_round("after-kill", server)
    assert server.stop() == 0

    totals = ledger_totals(output)
    assert stored_per_stream(output) == pushed
    assert {stream: totals[stream]["records"] for stream in STREAMS} == pushed
    assert {stream: totals[stream]["batches"] for stream in STREAMS} == {stream: 12 for stream in STREAMS}
    assert totals["61234"]["duplicates"] == 1
    assert totals[""]["refused"] == {"400": 1}  # no stream is known of a body that does not decode
    on_disk = sum(path.stat().st_size for path in output.glob("stream=*/2*.log"))
    assert sum(totals[stream]["bytes"] for stream in STREAMS) == on_disk


def test_a_moved_file_and_a_pruned_index_are_each_counted_once(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    output = tmp_path / "data"
    server = start_server("--dedupe-window", "60", output_dir=output)
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(stream_batch("61234", "before-move"))).status == 200
    [moved] = server.data_files()
    moved.rename(moved.with_name(moved.name + ".1"))  # what logrotate does
    server.send_signal(signal.SIGHUP)
    server.wait_for_log("reopened 1 output files that were moved")
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(stream_batch("61234", "after-move", count=7))).status == 200
    assert server.stop() == 0
    assert ledger_totals(output)["61234"]["records"] == 32
    assert len(list((output / ".dsreceiver" / "batches").rglob("*.moved-*.idx"))) == 1

    # Housekeeping, an hour later: the stopped server's file is finished, then both indexes are pruned, their rows
    # kept in summaries.
    layout = dsreceiver.Layout(output)
    later = time.time() + 7200
    housekeeper = dsreceiver.Housekeeper(layout, dedupe_window=60, clock=lambda: later)
    housekeeper.queue_earlier_files()
    housekeeper.finish_files()
    housekeeper.prune_indexes()
    housekeeper.stop()
    assert not list(layout.indexes())
    assert len(list(layout.summaries())) == 2
    assert ledger_totals(output)["61234"]["records"] == 32


def test_a_summary_written_just_before_a_crash_counts_its_index_once(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "out")
    storage.store("stream=61234", dsreceiver.RecordBatch([b"x\ny\nz\n"], None, 6, 3), stream="61234")
    storage.close()
    [(index, folder, _)] = list(storage.layout.indexes())
    dsreceiver.write_summary(storage.layout, index, folder)  # then the crash: the index is still there
    assert index.exists()
    [row] = dsreceiver.read_ledger(storage.layout.root).values()
    assert (row.records, row.batches) == (3, 1)


def test_format_1_indexes_are_upgraded_with_their_records_counted(tmp_path: Path) -> None:
    output = tmp_path / "out"
    storage = open_storage(output)
    path = storage.store("stream=61234", dsreceiver.RecordBatch([b"a\nb\n"], None, 4, 2)).path
    storage.close()
    assert path is not None
    index = storage.layout.index_path(path)
    stamp = time.time()
    # The index as dsreceiver 0.1 wrote it: no header, (end offset, time, digest) per batch.
    index.write_bytes(struct.pack("<Qd32s", 4, stamp, bytes(32)))
    with path.open("ab") as handle:
        handle.write(b"c\n")
    index.write_bytes(index.read_bytes() + struct.pack("<Qd32s", 6, stamp, bytes(32)))
    assert dsreceiver.read_ledger(output) == {}  # format-1 entries say nothing of their records
    reopened = open_storage(output)  # start-up recovery upgrades it
    assert index.read_bytes().startswith(dsreceiver.INDEX_HEADER)
    assert [entry.records for entry in dsreceiver.read_index(index.read_bytes())] == [2, 1]
    later = reopened.store("stream=61234", dsreceiver.RecordBatch([b"d\n"], None, 2, 1)).path
    reopened.close()
    [row] = dsreceiver.read_ledger(output).values()
    assert (row.records, row.batches, row.stored_bytes) == (4, 3, 8)
    assert path.read_bytes() == b"a\nb\nc\n" and later is not None and later.read_bytes() == b"d\n"


def test_streams_1_and_2_are_counted_as_themselves_and_format_3_indexes_still_read(tmp_path: Path) -> None:
    output = tmp_path / "out"
    storage = open_storage(output)
    names = ("1", "2", "unknown", "mixed", "uls", "61234")
    for number, stream in enumerate(names, 1):
        data = b"".join(b"%s %d\n" % (stream.encode(), n) for n in range(number))
        storage.store(dsreceiver.Layout.folder("", stream), dsreceiver.RecordBatch([data], None, len(data), number),
                      stream=stream)
    storage.close()
    counted = {routed.stream: ledger.records for (routed, _), ledger in dsreceiver.read_ledger(output).items()}
    assert counted == {stream: number for number, stream in enumerate(names, 1)}
    assert sorted(folder for _, folder, _ in storage.layout.indexes()) == [
        "source=uls", "stream=1", "stream=2", "stream=61234", "stream=mixed", "stream=unknown"]
    # The same entries as format 3 wrote them (it had no ULS), 'unknown' as 0 and 'mixed' as 1, which stream 1's
    # entries read as too: their folder tells them apart.
    format_3_codes = {"unknown": 0, "mixed": 1}
    for index, folder, _ in list(storage.layout.indexes()):
        entries = dsreceiver.read_index(index.read_bytes())
        assert index.read_bytes().startswith(b"dsreceiver batch index 4\n")
        if folder == "source=uls":
            index.unlink()
            continue
        index.write_bytes(dsreceiver.V3_INDEX_HEADER + b"".join(
            dsreceiver.BATCH_ENTRY.pack(entry.end, entry.stamp, entry.digest,
                                        format_3_codes[entry.stream] if entry.stream in format_3_codes
                                        else int(entry.stream), entry.records, entry.first_event, entry.last_event)
            for entry in entries))
    counted = {routed.stream: ledger.records for (routed, _), ledger in dsreceiver.read_ledger(output).items()}
    assert counted == {"1": 1, "2": 2, "unknown": 3, "mixed": 4, "61234": 6}
    assert ledger_totals(output)["1"]["records"] == 1


def test_streams_1_and_2_pushed_to_a_server_get_their_own_rows(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server()
    with server.simulator() as ds:
        for stream, count in (("1", 3), ("2", 5)):
            assert ds.push(batch_of_lines(restreamed(sample_lines("json")[:count], stream))).status == 200
    assert server.stop() == 0
    assert stored_per_stream(server.output_dir) == {"1": 3, "2": 5}
    totals = ledger_totals(server.output_dir)
    assert {stream: totals[stream]["records"] for stream in totals} == {"1": 3, "2": 5}


def test_the_ledger_command_reads_a_fleet_and_refuses_what_is_not_an_output_folder(tmp_path: Path) -> None:
    roots = [tmp_path / "host-a", tmp_path / "host-b"]
    for number, root in enumerate(roots, 1):
        storage = open_storage(root)
        for _ in range(number):
            storage.store("stream=61234", dsreceiver.RecordBatch([b"x\ny\n"], None, 4, 2), stream="61234")
        storage.close()
    assert ledger_totals(*roots)["61234"]["records"] == 6
    assert ledger_totals(*roots)["61234"]["batches"] == 3
    table = run_command("ledger", "--output-dir", str(roots[0]), "--until", "0m")
    assert table.returncode == 0 and "61234" in table.stdout and table.stdout.splitlines()[0].startswith("window")
    wrong = run_command("ledger", "--output-dir", str(tmp_path))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "not a dsreceiver output folder" in wrong.stderr
    bad_time = run_command("ledger", "--output-dir", str(roots[0]), "--since", "yesterday")
    assert bad_time.returncode == 2 and "--since/--until" in bad_time.stderr and "Traceback" not in bad_time.stderr


def test_version_1_ledger_files_with_route_and_stream_in_one_read_apart(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path / "out")
    layout.create()
    summary = layout.ledger_dir / "edge" / "stream=61234" / "2025-11-27T15Z.log.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"format": 1, "index": "2025-11-27T15Z.log.idx", "folder": "edge/stream=61234",
                                   "rows": [{"window": "2025-11-27T15:05:00Z", "stream": "edge/61234", "records": 7}]}))
    answers = layout.answers_path("2025-11-27")
    answers.parent.mkdir(parents=True)
    answers.write_text(json.dumps({"window": "2025-11-27T15:05:00Z", "stream": "61234", "duplicates": 2}) + "\n")
    ledger = dsreceiver.read_ledger(layout.root)
    assert ledger == {(dsreceiver.RoutedStream("edge", "61234"), 1764255900): dsreceiver.LedgerRow(records=7),
                      (dsreceiver.RoutedStream("", "61234"), 1764255900): dsreceiver.LedgerRow(duplicates=2)}


def test_answer_counts_are_saved_every_minute_and_at_stop(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path / "out", tag=".w2")
    layout.create()
    now = [1764255900.0]  # 2025-11-27T15:05:00Z
    answers = dsreceiver.LedgerAnswers(clock=lambda: now[0])
    stream, routed = dsreceiver.RoutedStream("", "61234"), dsreceiver.RoutedStream("edge", "61234")
    answers.count(stream, "duplicates")
    answers.count(stream, "503")
    answers.count(routed, "duplicates")
    answers.count(None, "401")
    housekeeper = dsreceiver.Housekeeper(layout, take_answers=answers.take)
    housekeeper.save_answers()
    now[0] += 300
    answers.count(stream, "duplicates")
    housekeeper.stop()
    assert [path.name for path in layout.answer_files()] == ["2025-11-27.w2.jsonl"]
    ledger = dsreceiver.read_ledger(layout.root)
    assert ledger[(stream, 1764255900)] == dsreceiver.LedgerRow(duplicates=1, refused={"503": 1})
    assert ledger[(routed, 1764255900)] == dsreceiver.LedgerRow(duplicates=1)
    assert ledger[(dsreceiver.NO_STREAM, 1764255900)] == dsreceiver.LedgerRow(refused={"401": 1})
    assert ledger[(stream, 1764256200)] == dsreceiver.LedgerRow(duplicates=1)
    assert answers.take() == {}


def test_a_folder_named_twice_is_counted_once(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    output = tmp_path / "data"
    server = start_server(output_dir=output)
    with server.simulator() as ds:
        assert ds.push(batch_of_lines(stream_batch("61234", "once", count=9))).status == 200
    assert server.stop() == 0
    (tmp_path / "alias").symlink_to(output)
    once = ledger_totals(output)["61234"]["records"]
    assert once == 9
    # D, D/ and a link to D are one folder: counted twice, the ledger would hide a loss.
    done = run_command("ledger", "--json", "--since", "2h", "--output-dir", str(output), "--output-dir",
                       str(output) + "/", "--output-dir", str(tmp_path / "alias"))
    assert done.returncode == 0, done.stderr
    assert sum(json.loads(line)["records"] for line in done.stdout.splitlines()) == once


def test_a_damaged_ledger_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    layout = dsreceiver.Layout(tmp_path / "out")
    layout.create()
    summary = layout.ledger_dir / "stream=61234" / "2025-11-27T15Z.log.json"
    summary.parent.mkdir(parents=True)
    for damaged in ('{"format": 2}', '{"format": 2, "rows": [{"window": 5}]}', '{"format": 2, "rows": 7}'):
        summary.write_text(damaged)
        done = run_command("ledger", "--output-dir", str(layout.root))
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "cannot read the ledger file" in done.stderr and "Traceback" not in done.stderr
