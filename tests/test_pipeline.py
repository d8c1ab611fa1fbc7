"""The push pipeline in-process: a body in, an Outcome out, with real storage under a temporary folder."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest

import dsreceiver
from dsreceiver import Outcome, PushFacts, PushResult, RoutedStream
from simulator import SAMPLE_DEFINITION, json_lines, sample_lines

STREAM = RoutedStream("", "61234")

FACTS = PushFacts("/ds", "192.0.2.7", False)


class Receiver:
    """A PushPipeline as the server builds it from a command line, over a fresh output folder."""

    def __init__(self, root: Path, *arguments: str, dedupe: dsreceiver.DedupeClaims | None = None) -> None:
        self.settings = dsreceiver.parse_config(["--output-dir", str(root), *arguments])
        self.layout = dsreceiver.Layout(root, store_gzip=self.settings.store_gzip)
        prepared = dsreceiver.prepare_output(self.layout, self.settings.dedupe_window)
        self.storage = dsreceiver.Storage(self.layout, dedupe=dedupe or prepared)
        self.streams = dsreceiver.StreamCatalog(self.settings.stream_config, self.settings.records_as_json)
        self.metrics = dsreceiver.Metrics()
        self.pipeline = dsreceiver.PushPipeline(self.settings, self.storage, self.streams, self.metrics)

    def push(self, body: bytes, facts: PushFacts = FACTS) -> Outcome:
        return self.pipeline.accept(facts, bytearray(body))

    def stored(self, folder: str = "") -> List[bytes]:
        """Every record stored under `folder` of the output folder."""
        root = self.layout.root / folder
        return [line for path, _ in sorted(self.layout.data_files()) if root in path.parents
                for line in path.read_bytes().splitlines()]

    def counter(self, name: str) -> float:
        return self.metrics.state.counters[name]


def body_of(lines: Sequence[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return Receiver(tmp_path / "out")


def test_a_push_is_stored_in_its_stream_folder_and_counted(receiver: Receiver) -> None:
    lines = json_lines("stored", 20)
    outcome = receiver.push(body_of(lines))
    assert outcome == Outcome(PushResult.STORED, 20, STREAM)
    assert receiver.stored("stream=61234") == lines
    assert receiver.counter("records_stored") == 20 and receiver.counter("batches_stored") == 1
    stats = receiver.metrics.state.streams[STREAM]
    assert (stats.records, stats.batches, set(stats.uploaders)) == (20, 1, {"192.0.2.7"})


def test_gzip_is_found_by_the_header_or_by_the_magic_bytes(receiver: Receiver) -> None:
    lines = json_lines("zipped", 5)
    assert receiver.push(gzip.compress(body_of(lines)), PushFacts("/ds", "a", True)).result is PushResult.STORED
    assert receiver.push(gzip.compress(body_of(lines[:2]))).result is PushResult.STORED
    assert receiver.stored() == lines + lines[:2]


def test_a_validation_probe_is_answered_and_not_stored(receiver: Receiver) -> None:
    assert receiver.push(b'{"access_validation":true}').result is PushResult.PROBE
    assert receiver.push(gzip.compress(b"0,access_validation")).result is PushResult.PROBE
    assert receiver.stored() == [] and receiver.counter("validation_probes") == 2


def test_an_undecodable_or_oversized_body_changes_nothing(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "out", "--max-decompressed-size", "1K")
    corrupt = receiver.push(gzip.compress(b"x" * 100)[:-6], PushFacts("/ds", "a", True))
    assert corrupt.result is PushResult.UNDECODABLE and "gzip" in corrupt.reason
    assert receiver.push(gzip.compress(b"y\n" * 2048)).result is PushResult.TOO_LARGE
    assert receiver.stored() == [] and receiver.counter("batches_stored") == 0


def test_a_retry_of_a_batch_with_request_ids_is_a_duplicate(receiver: Receiver) -> None:
    body = body_of(json_lines("retried", 30))
    assert receiver.push(body).result is PushResult.STORED
    again = receiver.push(body)
    assert again == Outcome(PushResult.DUPLICATE, 30, STREAM, "duplicate of a batch stored within the dedupe window")
    assert len(receiver.stored()) == 30
    assert receiver.counter("dedupe_hits") == 1 and receiver.metrics.state.streams[STREAM].dedupe_hits == 1


def test_an_identical_batch_without_request_ids_is_stored_again_and_vouches_for_nothing(receiver: Receiver) -> None:
    body = b"plain line one\nplain line two\n"
    assert receiver.push(body).result is PushResult.STORED
    assert receiver.push(body).result is PushResult.STORED  # may be genuine: never dropped
    assert receiver.push(body).result is PushResult.STORED
    assert receiver.stored("stream=unknown") == [b"plain line one", b"plain line two"] * 3
    assert receiver.counter("dedupe_ineligible") == 2
    # Only the first copy's index entry carries the digest: the others vouch for no later batch.
    [(index, _, _)] = list(receiver.layout.indexes())
    raw = index.read_bytes()
    digests = [entry.digest for entry in dsreceiver.read_index(raw)]
    assert digests[0] != dsreceiver.NO_DIGEST and digests[1:] == [dsreceiver.NO_DIGEST] * 2


def test_storage_failure_is_retry_later_with_nothing_left_behind(receiver: Receiver) -> None:
    period = receiver.layout.period_name(receiver.storage.clock())
    blocked = receiver.layout.data_path("stream=61234", period, 0).parent
    blocked.write_bytes(b"")  # a file where the stream's folder must go: opening a data file fails
    outcome = receiver.push(body_of(json_lines("blocked", 3)))
    assert outcome.result is PushResult.STORAGE_FAILED and "cannot open a data file" in outcome.reason
    assert outcome.routed == STREAM
    assert receiver.counter("storage_errors") == 1 and receiver.metrics.state.storage_error is not None
    blocked.unlink()
    assert receiver.push(body_of(json_lines("blocked", 3))).result is PushResult.STORED  # the claim was released


class GoneSupervisor:
    """A DedupeClaims whose supervisor process cannot be reached."""

    def claim_all(self, keys: Sequence[str]) -> List[dsreceiver.ClaimTicket]:
        raise dsreceiver.SupervisorGone("the supervisor process is gone")

    def commit_all(self, stored: Sequence[Tuple[str, float]]) -> None:
        raise AssertionError("nothing was claimed")

    def release_all(self, keys: Sequence[str]) -> None:
        raise AssertionError("nothing was claimed")


def test_an_unreachable_supervisor_is_retry_later(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "out", dedupe=GoneSupervisor())
    outcome = receiver.push(body_of(json_lines("orphaned", 3)))
    assert outcome.result is PushResult.STORAGE_FAILED and "supervisor" in outcome.reason
    assert receiver.stored() == []


def test_folders_follow_route_by_path_and_partition_by(tmp_path: Path) -> None:
    routed = Receiver(tmp_path / "routed", "--route-by-path")
    outcome = routed.push(body_of(json_lines("routed", 2)), PushFacts("/edge/logs", "a", False))
    assert outcome.routed == RoutedStream("edge_logs", "61234")
    assert len(routed.stored("edge_logs/stream=61234")) == 2
    flat = Receiver(tmp_path / "flat", "--partition-by", "none")
    flat.push(body_of(json_lines("flat", 2)))
    assert [path.parent for path, _ in flat.layout.data_files()] == [tmp_path / "flat"]


def test_structured_records_are_stored_as_json_with_a_definition(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "out", "--stream-config", str(SAMPLE_DEFINITION), "--records", "json")
    structured, as_json = sample_lines("structured")[:50], sample_lines("json")[:50]
    assert receiver.push(body_of(structured)) == Outcome(PushResult.STORED, 50, STREAM)
    assert receiver.stored("stream=61234") == as_json


def test_a_reservation_refused_mid_decode_stores_nothing(receiver: Receiver) -> None:
    class Refused(Exception):
        pass

    def refuse(held: int) -> None:
        raise Refused

    with pytest.raises(Refused):
        receiver.pipeline.accept(PushFacts("/ds", "a", True), bytearray(gzip.compress(body_of(json_lines("x", 9)))),
                                 refuse)
    assert receiver.stored() == []
