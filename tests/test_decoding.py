"""Body decoding in-process: however a body is split into chunks, the stored records are the same."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsreceiver


def reference_records(body: bytes) -> bytes:
    """The storage rule, stated plainly: split at LF, drop one CR before each LF and at the end, drop empty lines."""
    lines = body.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return b"".join(line + b"\n" for line in lines if line)


def build(chunks: List[bytes], spool_dir: Path) -> bytes:
    builder = dsreceiver.BatchBuilder(spool_dir)
    for chunk in chunks:
        builder.feed(chunk)
    batch = builder.finish()
    try:
        if batch.spool is not None:
            batch.spool.seek(0)
            data = batch.spool.read()
        else:
            data = b"".join(batch.parts)
        assert batch.records == data.count(b"\n") and batch.size == len(data)
        return data
    finally:
        batch.close()


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=60).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01\x02\x03", b"\n\r\n "))),
       cuts=st.lists(st.integers(0, 60), max_size=8), long_line_chunk=st.sampled_from([3, 7, 1 << 20]))
def test_chunking_never_changes_the_records(tmp_path_factory: pytest.TempPathFactory, body: bytes,
                                            cuts: List[int], long_line_chunk: int) -> None:
    positions = sorted({min(cut, len(body)) for cut in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in zip(positions, positions[1:])]
    original = dsreceiver.COPY_CHUNK
    dsreceiver.COPY_CHUNK = long_line_chunk  # small values force the long-line path
    try:
        assert build(chunks, tmp_path_factory.getbasetemp()) == reference_records(body)
    finally:
        dsreceiver.COPY_CHUNK = original


def test_big_bodies_are_spooled_to_an_unlinked_file(tmp_path: Path) -> None:
    line = b"x" * 1023 + b"\n"
    builder = dsreceiver.BatchBuilder(tmp_path)
    for _ in range(10):
        builder.feed(line * 1024)
    batch = builder.finish()
    assert batch.spool is not None and batch.size == 10 << 20 and batch.records == 10 * 1024
    assert list(tmp_path.iterdir()) == []  # nothing named is left behind
    batch.close()


def test_gunzip_reads_every_member_and_enforces_the_limit() -> None:
    body = gzip.compress(b"a\n" * 1000) + gzip.compress(b"b\n") + b"\0\0\0"
    assert b"".join(dsreceiver.Gunzip(body, 1 << 20)) == b"a\n" * 1000 + b"b\n"
    with pytest.raises(dsreceiver.BodyTooLarge):
        list(dsreceiver.Gunzip(body, 1000))
    with pytest.raises(dsreceiver.BodyError):
        list(dsreceiver.Gunzip(body[:-12], 1 << 20))
    with pytest.raises(dsreceiver.BodyError):
        list(dsreceiver.Gunzip(gzip.compress(b"x") + b"garbage", 1 << 20))


@pytest.mark.parametrize("probe, expected", [
    (b'{"access_validation":true}', True), (b"0,access_validation", True),
    (b'{ "access_validation" : true }\n', True), (b'{"access_validation":false}', False),
    (b'{"access_validation":true,"x":1}', False), (b'0,access_validation,1', False),
])
def test_validation_probe_detection(probe: bytes, expected: bool) -> None:
    assert dsreceiver.is_validation_probe(probe) is expected
