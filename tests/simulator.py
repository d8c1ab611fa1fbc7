"""A DataStream 2 push simulator: realistic batches, pushed over verified TLS the way DataStream does."""

from __future__ import annotations

import gzip
import http.client
import json
import random
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

STRUCTURED_FIELDS = ("cp", "reqId", "reqTimeSec", "bytes", "cliIP", "statusCode", "proto", "reqHost",
                     "reqMethod", "reqPath", "reqPort", "rspContentLen", "rspContentType", "UA")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Response:
    """What the receiver answered."""

    status: int
    headers: Dict[str, str]
    body: bytes


@dataclass
class Batch:
    """One upload: its records (without line endings) and the body as DataStream would send it."""

    lines: List[bytes]
    body: bytes
    gzip: bool = False
    headers: Dict[str, str] = field(default_factory=dict)


def ds2_record(rng: random.Random, batch_id: str, index: int) -> Dict[str, str]:
    """One DataStream 2 JSON record; reqId carries batch and line so every stored line is traceable."""
    return {
        "version": "4", "streamId": "61234", "cp": str(rng.randint(100000, 1999999)),
        "reqId": "%s-%06d" % (batch_id, index), "reqTimeSec": "%.3f" % (1764200000 + rng.random() * 60),
        "bytes": str(rng.randint(100, 2000000)), "cliIP": "%d.%d.%d.%d" % tuple(rng.randint(1, 254) for _ in range(4)),
        "statusCode": rng.choice(["200", "200", "200", "206", "304", "404", "503"]),
        "proto": rng.choice(["HTTP/1.1", "HTTP/2", "HTTP/3"]), "reqHost": "www.example.com",
        "reqMethod": rng.choice(["GET", "GET", "HEAD", "POST"]),
        "reqPath": "assets/%x.%s" % (rng.getrandbits(24), rng.choice(["js", "css", "html", "mp4"])),
        "reqPort": "443", "rspContentLen": str(rng.randint(0, 999999)), "rspContentType": "application/json",
        "UA": "Mozilla%2F5.0+%28X11%3B+Linux+x86_64%29", "tlsVersion": "TLSv1.3", "cacheStatus": str(rng.randint(0, 3)),
        "country": rng.choice(["US", "FR", "JP", "BR"]), "queryStr": rng.choice(["-", "q=%d" % rng.randint(0, 10**6)]),
        "referer": "-", "cookie": "-", "errorCode": "-", "customField": "^",
    }


def json_lines(batch_id: str, count: int, seed: int = 0) -> List[bytes]:
    """`count` JSON records as DataStream 2 writes them (compact, one object per line)."""
    rng = random.Random("%s/%d" % (batch_id, seed))
    return [json.dumps(ds2_record(rng, batch_id, i), separators=(",", ":")).encode() for i in range(count)]


def structured_lines(batch_id: str, count: int, seed: int = 0) -> List[bytes]:
    """`count` STRUCTURED records: version and stream id, then space-separated fields, '-' for empty."""
    rng = random.Random("%s/%d" % (batch_id, seed))
    lines = []
    for i in range(count):
        record = ds2_record(rng, batch_id, i)
        lines.append(" ".join(["4", "61234"] + [record[name] or "-" for name in STRUCTURED_FIELDS]).encode())
    return lines


def make_batch(batch_id: str, count: int = 100, fmt: str = "json", compress: bool = False,
               declare_gzip: bool = True, seed: int = 0) -> Batch:
    """Builds a DataStream 2 upload: LF-separated records with a final LF, optionally gzip'd."""
    lines = json_lines(batch_id, count, seed) if fmt == "json" else structured_lines(batch_id, count, seed)
    body = b"\n".join(lines) + b"\n"
    headers = {"Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body)
        if declare_gzip:
            headers["Content-Encoding"] = "gzip"
    return Batch(lines=lines, body=body, gzip=compress, headers=headers)


SAMPLES = Path(__file__).resolve().parent / "data"
# DataStream's stream definition of the sample records, in the API's shape (43 fields, version 4, SPACE).
SAMPLE_DEFINITION = SAMPLES / "ds2-stream-61234.json"


def sample_lines(fmt: str) -> List[bytes]:
    """The 1,000 sample records of stream 61234, as its JSON or its STRUCTURED format sends them."""
    name = "ds2-json-1000.ndjson.gz" if fmt == "json" else "ds2-structured-1000.txt.gz"
    return gzip.decompress((SAMPLES / name).read_bytes()).split(b"\n")[:-1]


def restreamed(lines: Sequence[bytes], stream_id: str, version: str = "4") -> List[bytes]:
    """The same records as if stream `stream_id` (at `version`) had sent them."""
    out = []
    for line in lines:
        if line.startswith(b"{"):
            line = line.replace(b'"streamId":"61234"', b'"streamId":"%s"' % stream_id.encode(), 1)
            line = line.replace(b'{"version":"4"', b'{"version":"%s"' % version.encode(), 1)
        else:
            line = b"%s %s " % (version.encode(), stream_id.encode()) + line.split(b" ", 2)[2]
        out.append(line)
    return out


def batch_of_lines(lines: Sequence[bytes], compress: bool = False) -> Batch:
    """A DataStream upload of these records."""
    body = b"\n".join(lines) + b"\n"
    headers = {"Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return Batch(lines=list(lines), body=body, gzip=compress, headers=headers)


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    """Splits a body into pieces for a chunked upload."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


class DataStreamSimulator:
    """Pushes batches to a receiver over verified TLS (or plain HTTP), on one keep-alive connection."""

    def __init__(self, host: str, port: int, context: Optional[ssl.SSLContext], path: str = "/datastream",
                 headers: Optional[Dict[str, str]] = None, timeout: float = 30,
                 source_address: Optional[str] = None) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.source_address = (source_address, 0) if source_address else None
        self.path = path
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.connection: Optional[http.client.HTTPConnection] = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.context is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout,
                                                             source_address=self.source_address)
            else:
                self.connection = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                              context=self.context,
                                                              source_address=self.source_address)
        return self.connection

    def request(self, method: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
                path: Optional[str] = None, chunked: bool = False, chunk_size: int = 65536) -> Response:
        """Sends one request and reads the answer; the connection is reopened after the server closes it."""
        connection = self._connect()
        all_headers = dict(self.headers)
        all_headers.update(headers or {})
        try:
            if chunked and body is not None:
                connection.request(method, path or self.path, body=chunks_of(body, chunk_size),
                                   headers=all_headers, encode_chunked=True)
            else:
                connection.request(method, path or self.path, body=body, headers=all_headers)
            answer = connection.getresponse()
            response = Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
        except Exception:
            self.close()
            raise
        if answer.will_close:
            self.close()
        return response

    def push(self, batch: Batch, chunked: bool = False, headers: Optional[Dict[str, str]] = None,
             path: Optional[str] = None) -> Response:
        """Pushes one batch as DataStream does: POST with the batch's headers."""
        all_headers = dict(batch.headers)
        all_headers.update(headers or {})
        return self.request("POST", batch.body, all_headers, path=path, chunked=chunked)

    def validate(self, fmt: str = "json") -> Response:
        """Sends DataStream's "Validate & Save" probe, exactly as it does (no trailing newline)."""
        body = b'{"access_validation":true}' if fmt == "json" else b"0,access_validation"
        return self.request("POST", body, {"Content-Type": "application/json"})

    def close(self) -> None:
        """Closes the connection."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def __enter__(self) -> DataStreamSimulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def expected_lines(batches: Iterable[Batch]) -> List[bytes]:
    """Every record line the batches should leave on disk."""
    return [line for batch in batches for line in batch.lines]


def count_lines(lines: Sequence[bytes]) -> Dict[bytes, int]:
    """How many times each line occurs."""
    counts: Dict[bytes, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return counts
