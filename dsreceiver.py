#!/usr/bin/env python3
"""dsreceiver: a durable HTTPS endpoint for Akamai DataStream log pushes.

Akamai DataStream 2 POSTs batches of CDN request logs (JSON lines or
space-delimited lines, often gzip'd) to a custom HTTPS endpoint every 30-60 s
from many uploader machines.  This file, standard library only (CPython 3.8+),
receives them and appends every record, one per line, to files named by UTC
receipt hour under --output-dir.  A push is answered 200 only once its records
are on disk (fdatasync'd); a push that cannot be stored now is answered 503
with Retry-After, which DataStream retries.

Usage:
    python3 dsreceiver.py              # https://0.0.0.0:8443, ./certs, ./data, one worker per CPU
    python3 dsreceiver.py --certs-dir /etc/letsencrypt/live/logs.example.com \\
        --output-dir /var/lib/dsreceiver --basic-auth-file /etc/dsreceiver/basic
    python3 dsreceiver.py --help

Security: the endpoint is meant for the public internet.  Configure at least
one authentication method (Basic, Bearer, custom header, URL token or mTLS); secrets
come from files or the environment, never from the command line, and are
compared in constant time.  TLS 1.2 is the minimum, every read has a deadline,
bodies have hard size limits, clients never see internal errors, and folder
names derived from URL paths are sanitised so nothing is written outside
--output-dir.

Map: the sections below, in dependency order (checked by tools/check_shape.py):
    Configuration and command line
    Shared tools
    Metrics
    Status page
    TLS
    Authentication
    Body decoding
    DataStream streams
    DataStream records
    Unified Log Streamer
    Commit protocols
    Retry dedup
    Storage: layout
    Storage: runs
    Storage: data files
    Storage: writing
    Storage: recovery
    Ledger
    Storage: sealing
    Storage: housekeeping
    Push pipeline
    HTTP parsing
    HTTP handler
    Upgrades
    Server
    Workers
    Endpoint checker
    Akamai APIs
    Reconciliation
    Shipping
    Lifecycle and signals
and main() last.  Each section uses only names defined above it (annotations aside);
tests/README.md names the test files that guard each.

One push through them:
    accept        ReceiverServer.accept_pending: a thread per connection
    handshake     ConnectionHandler.handshake: TLS, under the --timeout deadline
    head          ClientReader.read_head -> parse_request_head, body_framing
    auth          ConnectionHandler.authenticate (before any 100 Continue)
    body          ClientReader.read_exact, or read_chunked fed through ChunkedDecoder
    push          ReceiverServer.accept_push -> PushPipeline.accept: the steps below, no socket
    decode        decode_push: gunzip, line normalisation, the batch digest
    classify      StreamCatalog.classify: the stream (its stream=ID folder), STRUCTURED as JSON
                  (with the event range, read on the way); from Akamai's Unified Log Streamer
                  (its User-Agent), PushPipeline.uls_records instead: open_envelopes, one record
                  per event, in source=uls
    store         Storage.store -> DataFile.append queues the batch with its dedupe key
                  (LEAD_PROTOCOL: the first push to find nobody committing leads)
    claim         DataFile._claim: one claim call for the group's keys (CLAIM_PROTOCOL); with
                  --workers a process hop: SupervisorClient.claim_all sends them in one write,
                  Supervisor.handle answers each (GRANTED, DUPLICATE, or WAITING and later)
    commit        DataFile._commit_queue: each batch decided (BATCH_PROTOCOL; one whose check
                  fails is refused alone), the batches and their index entries (records, stream,
                  event range when known) written, one fdatasync pair, the claims committed or
                  released, each push woken once, the lead handed on
    answer        ConnectionHandler.answer_push: the Outcome as HTTP, then write_response
Every name under --output-dir comes from Layout.

Start-up, from exec to the first 200 (run_server, in this order; no step depends on how many files
the output folder keeps):
    read          the credentials, stream definitions and certificate
    listen        inherited_listeners (systemd's socket unit, a SIGUSR2 upgrade: see Handover) or
                  bind_listeners; fit_open_files; drop_privileges
    recover       prepare_output: Layout.create; recover_ended_runs (only the files of runs that
                  died, as their journals list them: see RUN_PROTOCOL), or recover_indexed in a
                  folder an earlier version kept; the dedupe window from indexed_batches
    serve         serve_until_stopped; with --workers, Supervisor forks run_worker (which, after a
                  worker's death, first recovers its predecessor's files); then each process's
                  Housekeeper finishes in the background what ended runs left unfinished
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import enum
import errno
import fcntl
import functools
import gzip
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import mmap
import os
import re
import select
import selectors
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from collections import OrderedDict
from http import HTTPStatus
from pathlib import Path
from typing import (IO, TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterable, Iterator, List,
                    MutableMapping, NamedTuple, NoReturn, Optional, Protocol, Sequence, Set, Tuple,
                    TypeVar, Union)
if TYPE_CHECKING:
    import subprocess
__version__ = "0.1.0"

log = logging.getLogger("dsreceiver")

Buffer = Union[bytes, bytearray, memoryview]
Bytes = Union[bytes, bytearray]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
T = TypeVar("T")

DEFAULT_CERTS_DIR = "certs"
CERT_FILE_NAME = "fullchain.pem"
KEY_FILE_NAME = "privkey.pem"

VALIDATION_PROBES = (b'{"access_validation":true}', b"0,access_validation")

COPY_CHUNK = 1 << 20
# --max-record-bytes: DataStream's records are a few KB (customField holds up to 1,000 bytes),
# security events tens of KB; a line beyond this is no log record.
DEFAULT_MAX_RECORD = 1 << 20
# --min-body-rate applies once a body has had this long to get going.
BODY_RATE_GRACE = 5.0
# Failed authentications from one address, within --auth-brake seconds, that brake it.
AUTH_BRAKE_FAILURES = 10
CERT_EXPIRY_WARNING_DAYS = 14
# Records hold client addresses, cookies and query strings: readable by the service's user and group
# only (folders get the search bit wherever the mode grants read: 0750).
DEFAULT_FILE_MODE = 0o640
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2}
ENV_BASIC_AUTH = "DSRECEIVER_BASIC_AUTH"
ENV_AUTH_HEADER_VALUE = "DSRECEIVER_AUTH_HEADER_VALUE"
ENV_AUTH_QUERY_VALUE = "DSRECEIVER_AUTH_QUERY_VALUE"
ENV_BEARER_TOKEN = "DSRECEIVER_BEARER_TOKEN"

TARGET_RE = re.compile(rb"[\x21-\x7e]+")
# DataStream gives up on a batch after about 5 minutes of 429/5xx answers; the status page turns red
# sooner.
RETRY_HORIZON = 300.0


# ---------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------

DEFAULT_PORT = 8443
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
# Headers that carry HTTP itself, which --auth-header cannot name.
RESERVED_HEADERS = ("authorization", "host", "content-length", "transfer-encoding")


class ConfigError(Exception):
    """Bad configuration: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def parse_size(text: str) -> int:
    """Parses a byte count: 4096, 64K, 64M, 1G (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError("invalid size %r (bytes, or with a K, M or G suffix)"
                                         % text)
    size = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be greater than 0: %r" % text)
    return size


def positive_seconds(text: str) -> float:
    """Parses a strictly positive number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid number of seconds %r" % text) from None
    if not 0 < seconds < 1e6:
        raise argparse.ArgumentTypeError("seconds must be between 0 and 1000000: %r" % text)
    return seconds


def positive_int(text: str) -> int:
    """Parses a strictly positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid number %r" % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0: %r" % text)
    return value


def parse_rate(text: str) -> float:
    """Parses a rate in bytes a second (K and M suffixes allowed); 0 turns the limit off."""
    return 0.0 if text.strip() == "0" else float(parse_size(text))


def non_negative_int(text: str) -> int:
    """Parses a whole number where 0 turns the feature off."""
    return 0 if text.strip() == "0" else positive_int(text)


def non_negative_seconds(text: str) -> float:
    """Parses a number of seconds where 0 turns the feature off."""
    return 0.0 if text.strip() in ("0", "0.0") else positive_seconds(text)


def port_number(text: str) -> int:
    """Parses a TCP port; 0 asks the kernel for a free one."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid port %r" % text) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("port out of range: %r" % text)
    return port


def file_mode(text: str) -> int:
    """Parses an octal file mode such as 0640; the owner must keep read and write."""
    if not re.fullmatch(r"0?[0-7]{3}", text.strip()):
        raise argparse.ArgumentTypeError("invalid file mode %r (octal, such as 0640)" % text)
    mode = int(text, 8)
    if mode & 0o600 != 0o600:
        raise argparse.ArgumentTypeError("the owner needs read and write: %r" % text)
    return mode


def ip_network(text: str) -> IPNetwork:
    """Parses an address or CIDR block such as 10.0.0.0/8."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid address or CIDR %r" % text) from None


def url_path(text: str) -> str:
    """Parses an exact URL path for --path."""
    if not text.startswith("/") or "?" in text or not TARGET_RE.fullmatch(text.encode("utf-8",
                                                                                      "replace")):
        raise argparse.ArgumentTypeError("a path starts with / and has no spaces or query: %r"
                                         % text)
    return text


ENVIRONMENT_HELP = """\
commands:
  python3 dsreceiver.py check URL ...   test an endpoint as DataStream's "Validate & Save" does
                                        (see: python3 dsreceiver.py check --help)
  python3 dsreceiver.py ledger ...      what was stored, per stream and 5-minute window
  python3 dsreceiver.py reconcile ...   that, next to what Akamai says DataStream delivered
  python3 dsreceiver.py streams pull    fetch stream definitions for --stream-config
  python3 dsreceiver.py sealed ...      the finished files and their ledger, for rclone

signals:
  SIGTERM, SIGINT   finish in-flight requests, sync, exit 0
  SIGHUP            reload the certificate and credential files, reopen moved output files
  SIGUSR2           upgrade in place: start the file on disk beside this process, hand it the
                    listening sockets, then re-execute under the same PID; nothing is refused

environment:
  %-29s user:password[,user:password...] accepted by Basic auth
  %-29s accepted values of --auth-header, comma-separated
  %-29s accepted values of --auth-query-param, comma-separated
  %-29s tokens accepted by Authorization: Bearer, comma-separated
  LISTEN_FDS, LISTEN_PID        systemd's socket activation (contrib/dsreceiver.socket): serve on
                                the sockets it passes; --host and --port are then not used

Secrets are never taken from the command line, where `ps` would show them.
Records land in OUTPUT_DIR/[ROUTE/]stream=ID/YYYY-MM-DDTHHZ.log (UTC hour of receipt;
YYYY-MM-DD.log with --rotate daily; .N.log when --max-file-size rolls), one per line;
ROUTE is the folder named after the URL path with --route-by-path, and stream=ID is
left out with --partition-by none.  Records that name no stream (security events) take
the stream their endpoint URL names: https://HOST/PATH?streamId=ID.  The events Akamai's
Unified Log Streamer sends land in OUTPUT_DIR/[ROUTE/]source=uls/, one per line.
""" % (ENV_BASIC_AUTH, ENV_AUTH_HEADER_VALUE, ENV_AUTH_QUERY_VALUE, ENV_BEARER_TOKEN)


def build_parser() -> ArgumentParser:
    """Returns the command-line parser; every option's help states its default."""
    parser = ArgumentParser(
        prog="dsreceiver.py",
        description="Durable HTTPS endpoint for Akamai DataStream log pushes.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="dsreceiver " + __version__)

    listen = parser.add_argument_group("listening")
    listen.add_argument("--host", help="address to listen on; '::' listens on IPv6 and IPv4 "
                        "(default: 0.0.0.0, or 127.0.0.1 with --http)")
    listen.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="TCP port; 0 picks a free one (default: %(default)s)")
    listen.add_argument("--http", action="store_true",
                        help="serve plain HTTP, for use behind a TLS-terminating proxy (default:"
                        " off)")
    listen.add_argument("--trusted-proxy", action="append", type=ip_network, default=[],
                        metavar="CIDR",
                        help="requests from this proxy name their client in X-Forwarded-For;"
                        " repeatable (default: none)")

    tls = parser.add_argument_group("TLS")
    tls.add_argument("--cert", type=Path, metavar="FILE",
                     help="certificate chain, PEM (default: CERTS_DIR/" + CERT_FILE_NAME + ")")
    tls.add_argument("--key", type=Path, metavar="FILE",
                     help="private key, PEM (default: CERTS_DIR/" + KEY_FILE_NAME + ")")
    tls.add_argument("--certs-dir", type=Path, default=Path(DEFAULT_CERTS_DIR), metavar="DIR",
                     help="folder with %s and %s, as certbot names them; when the default folder"
                     " has neither, a self-signed pair is created there (default: %%(default)s)"
                     % (CERT_FILE_NAME, KEY_FILE_NAME))
    tls.add_argument("--hostname", default=None,
                     help="DNS name put in a self-signed certificate "
                     "(default: this machine's FQDN)")
    tls.add_argument("--client-ca", type=Path, metavar="FILE",
                     help="require a client certificate signed by this CA: mTLS (default: off)")
    tls.add_argument("--cert-check-interval", type=positive_seconds, default=30.0,
                     metavar="SECONDS",
                     help="how often to look for a renewed certificate or key; SIGHUP reloads at"
                     " once (default: %(default)s)")

    auth = parser.add_argument_group("authentication (all configured methods must pass; Basic and"
                                     " Bearer: either one)")
    auth.add_argument("--basic-auth-file", type=Path, metavar="FILE",
                      help="accepted user:password lines for Basic auth; adds to $%s (default:"
                      " none)" % ENV_BASIC_AUTH)
    auth.add_argument("--bearer-token-file", type=Path, metavar="FILE",
                      help="accepted tokens for Authorization: Bearer TOKEN, one per line; adds to"
                      " $%s (default: none)" % ENV_BEARER_TOKEN)
    auth.add_argument("--auth-header", metavar="NAME",
                      help="require this request header (DataStream's custom header) to hold an "
                      "accepted value (default: off)")
    auth.add_argument("--auth-header-file", type=Path, metavar="FILE",
                      help="accepted --auth-header values, one per line; adds to $%s (default:"
                      " none)" % ENV_AUTH_HEADER_VALUE)
    auth.add_argument("--auth-query-param", metavar="NAME",
                      help="require this URL query parameter to hold an accepted token; it is "
                      "redacted in logs (default: off)")
    auth.add_argument("--auth-query-file", type=Path, metavar="FILE",
                      help="accepted --auth-query-param tokens, one per line; adds to $%s (default:"
                      " none)" % ENV_AUTH_QUERY_VALUE)
    auth.add_argument("--auth-brake", type=non_negative_seconds, default=60.0, metavar="SECONDS",
                      help="an address failing authentication %d times within SECONDS gets 429 with"
                      " Retry-After, without a credential check, until SECONDS after its last"
                      " failure; 0 turns it off (default: %%(default)s)" % AUTH_BRAKE_FAILURES)
    auth.add_argument("--path", action="append", type=url_path, default=[], dest="paths",
                      metavar="PATH",
                      help="accept pushes only on this exact URL path, others get 404; repeatable"
                      " (default: any path)")

    storage = parser.add_argument_group("storage")
    storage.add_argument("--output-dir", type=Path, default=Path("data"), metavar="DIR",
                         help="where records are stored (default: %(default)s)")
    storage.add_argument("--route-by-path", action="store_true",
                         help="store each URL path's pushes in its own subfolder (default: off)")
    storage.add_argument("--partition-by", choices=("stream", "none"), default="stream",
                         help="stream: each DataStream stream in its own stream=ID subfolder,"
                         " Hive-style ('unknown' for records without a stream ID, 'mixed' for a"
                         " push with several); none: one folder (default: %(default)s)")
    storage.add_argument("--stream-config", type=Path, metavar="PATH",
                         help="stream definitions: a JSON file, or a folder of *.json, as"
                         " DataStream's API (v2 or v3) returns them (GET .../streams/ID), or"
                         " {\"streamId\": N, \"fields\": [\"cp\", 1002, ...]} with JSON keys or"
                         " data set field IDs; re-read on SIGHUP (default: none)")
    storage.add_argument("--records", choices=("as-sent", "json"), default="as-sent",
                         help="as-sent: store records byte for byte; json: store the STRUCTURED"
                         " records of a defined stream as the JSON lines its JSON format would send"
                         " (default: %(default)s)")
    storage.add_argument("--fsync", choices=("always", "interval", "never"), default="always",
                         help="always: answer 200 only after fdatasync; interval: fdatasync every "
                         "second; never: leave it to the OS (default: %(default)s)")
    storage.add_argument("--store", choices=("plain", "gzip"), default="plain",
                         help="plain: records as text in .log files; gzip: gzip members in .log.gz"
                         " files, keeping a gzip'd push's own bytes when they hold exactly its"
                         " records; zcat gives the records (default: %(default)s)")
    storage.add_argument("--file-mode", type=file_mode, default=DEFAULT_FILE_MODE, metavar="MODE",
                         help="mode of every file created under the output folder (records,"
                         " indexes, what recovery sets aside); folders get the search bit where it"
                         " grants read, 0750 for 0640 (default: %04o: no access for other users)"
                         % DEFAULT_FILE_MODE)
    storage.add_argument("--rotate", choices=("hourly", "daily"), default="hourly",
                         help="start a new file every UTC hour or day (default: %(default)s)")
    storage.add_argument("--max-file-size", type=parse_size, default=None, metavar="SIZE",
                         help="also start a new numbered file within the period past this size "
                         "(default: no limit)")
    storage.add_argument("--compress-rotated", action="store_true",
                         help="gzip each file once it is finished (default: off)")
    storage.add_argument("--retention-days", type=positive_seconds, default=None, metavar="DAYS",
                         help="delete sealed files once the UTC day they were sealed on ended more"
                         " than DAYS ago (default: keep all)")
    storage.add_argument("--dedupe-window", type=non_negative_seconds, default=360.0,
                         metavar="SECONDS",
                         help="answer a retry of a batch stored this recently with 200 without"
                         " storing it again; only batches whose every record carries a reqId, a"
                         " millisecond reqTimeSec or an httpMessage.requestId count, so a genuine"
                         " batch is never dropped; 0"
                         " turns it off (default: %(default)s, DataStream's 5-minute retry horizon"
                         " and a minute)")

    limits = parser.add_argument_group("limits")
    limits.add_argument("--timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                        help="deadline for the TLS handshake, for a request head, and for a body "
                        "(default: %(default)s)")
    limits.add_argument("--keepalive-timeout", type=positive_seconds, default=75.0,
                        metavar="SECONDS",
                        help="how long an idle keep-alive connection may wait for its next request"
                        " (default: %(default)s)")
    limits.add_argument("--max-body-size", type=parse_size, default=64 << 20, metavar="SIZE",
                        help="largest body on the wire, else 413 (default: 64M)")
    limits.add_argument("--max-decompressed-size", type=parse_size, default=512 << 20,
                        metavar="SIZE", help="largest body after gunzip, else 413 (default: 512M)")
    limits.add_argument("--max-record-bytes", type=parse_size, default=DEFAULT_MAX_RECORD,
                        metavar="SIZE",
                        help="longest record (line), else the push gets 413: DataStream's records"
                        " are a few KB, security events tens of KB (default: 1M)")
    limits.add_argument("--max-connections", type=positive_int, default=4096, metavar="N",
                        help="connections per worker process, lowered at start to fit under the"
                        " open-file limit; beyond it they are closed at once, and from 90%% of it"
                        " the oldest connections not serving a request are closed to make room"
                        " (default: %(default)s)")
    limits.add_argument("--max-client-connections", type=non_negative_int, default=64, metavar="N",
                        help="connections one client address may hold open across all workers; more"
                        " are closed at once; 0 turns it off, and --trusted-proxy addresses are"
                        " exempt (default: %(default)s)")
    limits.add_argument("--max-inflight-bytes", type=parse_size, default=256 << 20, metavar="SIZE",
                        help="body bytes being received or stored at once, counted as they arrive;"
                        " beyond it pushes get 503 (default: 256M)")
    limits.add_argument("--min-body-rate", type=parse_rate, default=4096.0, metavar="SIZE",
                        help="a body arriving slower than this many bytes a second, after its first"
                        " %g s, is cut with 408; 0 turns it off (default: 4K)" % BODY_RATE_GRACE)

    process = parser.add_argument_group("process")
    process.add_argument("--workers", type=positive_int, default=None, metavar="N",
                         help="processes sharing the port (SO_REUSEPORT), each writing its own"
                         " files (default: the number of CPUs)")
    process.add_argument("--shutdown-timeout", type=positive_seconds, default=30.0,
                         metavar="SECONDS",
                         help="on SIGTERM/SIGINT, how long in-flight requests may take to finish"
                         " (default: %(default)s)")
    process.add_argument("--user", help="switch to this user after binding the port and reading "
                         "certificates (default: stay)")
    process.add_argument("--group",
                         help="switch to this group, with --user (default: the user's group)")
    process.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                         default="info", help="least severe log level shown (default: %(default)s)")
    process.add_argument("--log-format", choices=("text", "json"), default="text",
                         help="text lines, or one JSON object per line (default: %(default)s)")
    process.add_argument("--metrics-public", action="store_true",
                         help="serve /metrics without authentication (default: off)")
    process.add_argument("--status-public", action="store_true",
                         help="serve the status page (/status, /status.json) without authentication"
                         " (default: off)")
    return parser


class CredentialSettings(NamedTuple):
    """Where the accepted credentials come from: what the server and the check command share."""

    basic_auth_file: Optional[Path] = None
    auth_header: Optional[str] = None
    auth_header_file: Optional[Path] = None
    auth_query_param: Optional[str] = None
    auth_query_file: Optional[Path] = None
    client_ca: Optional[Path] = None
    bearer_token_file: Optional[Path] = None


class Settings(NamedTuple):
    """The server's configuration, checked and complete: built once from the command line,
    read-only."""

    host: str
    port: int
    http: bool
    trusted_proxy: Tuple[IPNetwork, ...]
    cert: Optional[Path]
    key: Optional[Path]
    certs_dir: Path
    hostname: Optional[str]
    client_ca: Optional[Path]
    cert_check_interval: float
    basic_auth_file: Optional[Path]
    auth_header: Optional[str]
    auth_header_file: Optional[Path]
    auth_query_param: Optional[str]
    auth_query_file: Optional[Path]
    bearer_token_file: Optional[Path]
    auth_brake: float
    paths: Tuple[str, ...]
    output_dir: Path
    route_by_path: bool
    partition_by_stream: bool
    stream_config: Optional[Path]
    records_as_json: bool
    fsync: str
    store_gzip: bool
    file_mode: int
    rotate: str
    max_file_size: int
    compress_rotated: bool
    retention_days: float
    dedupe_window: float
    timeout: float
    keepalive_timeout: float
    max_body_size: int
    max_decompressed_size: int
    max_record_bytes: int
    max_connections: int
    max_client_connections: int
    max_inflight_bytes: int
    min_body_rate: float
    workers: int
    shutdown_timeout: float
    user: Optional[str]
    group: Optional[str]
    log_level: str
    log_format: str
    metrics_public: bool
    status_public: bool

    @property
    def credentials(self) -> CredentialSettings:
        """The credential part, as the check command has it too."""
        return CredentialSettings(self.basic_auth_file, self.auth_header, self.auth_header_file,
                                  self.auth_query_param, self.auth_query_file, self.client_ca,
                                  self.bearer_token_file)

    @property
    def scheme(self) -> str:
        """'http' with --http, else 'https'."""
        return "http" if self.http else "https"


def parse_config(argv: Optional[Sequence[str]]) -> Settings:
    """Parses and cross-checks the command line; raises ConfigError for bad combinations."""
    options = build_parser().parse_args(argv)
    if (options.cert is None) != (options.key is None):
        raise ConfigError("--cert and --key go together")
    if options.http and (options.cert or options.key or options.client_ca):
        raise ConfigError("--http serves plain HTTP: drop --cert, --key and --client-ca")
    header = options.auth_header
    if header is not None and not HEADER_NAME_RE.fullmatch(header):
        raise ConfigError("--auth-header must be letters, digits, '-' or '_': %r" % header)
    if header is not None and header.lower() in RESERVED_HEADERS:
        raise ConfigError("--auth-header cannot be %r%s" % (header, " (for Authorization: Bearer"
                          " TOKEN, use --bearer-token-file or $%s)" % ENV_BEARER_TOKEN
                          if header.lower() == "authorization" else ""))
    if options.group and not options.user:
        raise ConfigError("--group goes with --user")
    if options.records == "json" and options.stream_config is None:
        raise ConfigError("--records json needs --stream-config: the field names of STRUCTURED"
                          " records")
    return Settings(
        host=options.host or ("127.0.0.1" if options.http else "0.0.0.0"), port=options.port,
        http=options.http, trusted_proxy=tuple(options.trusted_proxy), cert=options.cert,
        key=options.key, certs_dir=options.certs_dir, hostname=options.hostname,
        client_ca=options.client_ca, cert_check_interval=options.cert_check_interval,
        basic_auth_file=options.basic_auth_file, auth_header=header,
        auth_header_file=options.auth_header_file, auth_query_param=options.auth_query_param,
        auth_query_file=options.auth_query_file, bearer_token_file=options.bearer_token_file,
        auth_brake=options.auth_brake,
        paths=tuple(options.paths), output_dir=options.output_dir,
        route_by_path=options.route_by_path, partition_by_stream=options.partition_by == "stream",
        stream_config=options.stream_config, records_as_json=options.records == "json",
        fsync=options.fsync, store_gzip=options.store == "gzip", file_mode=options.file_mode,
        rotate=options.rotate,
        max_file_size=options.max_file_size or 0, compress_rotated=options.compress_rotated,
        retention_days=options.retention_days or 0.0, dedupe_window=options.dedupe_window,
        timeout=options.timeout, keepalive_timeout=options.keepalive_timeout,
        max_body_size=options.max_body_size, max_decompressed_size=options.max_decompressed_size,
        max_record_bytes=options.max_record_bytes,
        max_connections=options.max_connections,
        max_client_connections=options.max_client_connections,
        max_inflight_bytes=options.max_inflight_bytes, min_body_rate=options.min_body_rate,
        workers=options.workers or os.cpu_count() or 1, shutdown_timeout=options.shutdown_timeout,
        user=options.user, group=options.group, log_level=options.log_level,
        log_format=options.log_format, metrics_public=options.metrics_public,
        status_public=options.status_public)


# ---------------------------------------------------------------------------
# Shared tools
# ---------------------------------------------------------------------------

class RoutedStream(NamedTuple):
    """A stream as it arrives on one route: the pair that names its folder ([ROUTE/]stream=ID) and
    keys the metrics, the status page and the ledger.  `stream` is a stream ID (or 'unknown',
    'mixed', 'uls', 'other'), never more; `route` is the --route-by-path folder, '' without."""

    route: str
    stream: str

    def label(self) -> str:
        """How people read it: ROUTE/STREAM, or the stream alone."""
        return self.route + "/" + self.stream if self.route else self.stream

    def labels(self) -> str:
        """Its Prometheus labels: route (only with one) and stream."""
        return ('route="%s",stream="%s"' % (label_value(self.route), label_value(self.stream))
                if self.route else 'stream="%s"' % label_value(self.stream))


def label_value(text: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def describe_os_error(exc: BaseException) -> str:
    """Returns an OSError's reason without Python's '[Errno N]' noise."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or exc.__class__.__name__


class Surprises:
    """Logs the traceback of an unexpected error once per kind (its type and where it was raised)
    a minute, counting the others: a body that sets one off on every retry never floods the
    log."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        self.last: Dict[Tuple[str, str], Tuple[float, int]] = {}
        self.lock = threading.Lock()

    def report(self, what: str, exc: BaseException) -> None:
        """Logs `exc`, raised while handling `what`, unless its kind was logged within INTERVAL."""
        frame = exc.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = ("%s:%d" % (frame.tb_frame.f_code.co_name, frame.tb_lineno) if frame is not None
                 else "?")
        kind = (type(exc).__name__, where)
        now = time.monotonic()
        with self.lock:
            last, held = self.last.get(kind, (-self.INTERVAL, 0))
            if now - last < self.INTERVAL:
                self.last[kind] = (last, held + 1)
                return
            self.last[kind] = (now, 0)
        log.error("unexpected %s in %s (%d more like it since the last line)", kind[0], what,
                  held, exc_info=exc)


SURPRISES = Surprises()


# At most this many buffers go to one writev (Linux takes 1024).
WRITEV_PARTS = 512


def write_all(fd: int, parts: Sequence[Buffer]) -> None:
    """Writes every part to `fd`, in one writev when the kernel takes it whole."""
    written = os.writev(fd, parts) if len(parts) > 1 else os.write(fd, parts[0])
    total = sum(len(part) for part in parts)
    if written == total:
        return
    remainder = memoryview(b"".join(parts))[written:]
    while remainder:
        remainder = remainder[os.write(fd, remainder):]


def write_parts(fd: int, parts: Sequence[Buffer]) -> None:
    """Writes any number of parts to `fd`, WRITEV_PARTS to a writev."""
    for first in range(0, len(parts), WRITEV_PARTS):
        write_all(fd, parts[first:first + WRITEV_PARTS])


def write_atomically(target: Path, data: bytes, mode: Optional[int] = None,
                     follow_folder: bool = False) -> None:
    """Replaces `target` with `data` whole, safe whoever runs it (root under sudo included): a new
    temporary file of a random name in the folder (opened once, not through a link unless
    `follow_folder`), created exclusively and never through a link, given exactly `mode` (not a
    planted file's, not less the umask), owned as the folder is when root writes, fsync'd, renamed
    over `target` (a link there is replaced, not followed), and the folder fsync'd.  Without
    `mode`, the folder's own less execute bits and others' write: a .dsreceiver folder 0750
    (--file-mode 0640) gives 0640, 0700 gives 0600."""
    nofollow = 0 if follow_folder else os.O_NOFOLLOW
    folder = os.open(str(target.parent), os.O_RDONLY | os.O_DIRECTORY | nofollow
                     | getattr(os, "O_CLOEXEC", 0))
    try:
        facts = os.fstat(folder)
        mode = facts.st_mode & 0o664 if mode is None else mode
        temp = ".%s.%d.%s.tmp" % (target.name, os.getpid(),
                                  binascii.hexlify(os.urandom(8)).decode())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | getattr(os, "O_CLOEXEC", 0), mode & 0o600, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                if os.geteuid() == 0:
                    # Root writing into the service's folder: the service must still read it.
                    os.fchown(handle.fileno(), facts.st_uid, facts.st_gid)
                os.fchmod(handle.fileno(), mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)  # the error that brought us here is the one told
            raise
        os.fsync(folder)
    finally:
        os.close(folder)


class WakePipe:
    """A non-blocking socketpair whose reader end makes a select() loop return when another thread,
    or a signal, writes to the other end."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        for end in (self.reader, self.writer):
            end.setblocking(False)

    def wake(self) -> None:
        """Makes the select() loop return."""
        try:
            self.writer.send(b"\0")
        except OSError:
            pass  # its buffer is full: a wake-up is pending anyway

    def drain(self) -> None:
        """Empties the reader end, so the next select() waits again."""
        try:
            while self.reader.recv(512):
                pass
        except OSError:
            pass


class SignalFlags:
    """Records the signals received; handlers only set flags, and the wake pipe makes select()
    return."""

    def __init__(self) -> None:
        self.stop_signal: Optional[int] = None
        self.reload_requested = False
        self.upgrade_requested = False
        self.wake_pipe = WakePipe()

    def install(self) -> None:
        """Routes SIGTERM and SIGINT to the stop flag, SIGHUP to the reload flag and SIGUSR2 to the
        upgrade flag."""
        signal.set_wakeup_fd(self.wake_pipe.writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR2, self._on_upgrade)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def _on_upgrade(self, signum: int, frame: object) -> None:
        self.upgrade_requested = True

    def take_reload(self) -> bool:
        """Returns and clears the reload flag."""
        requested, self.reload_requested = self.reload_requested, False
        return requested

    def take_upgrade(self) -> bool:
        """Returns and clears the upgrade flag."""
        requested, self.upgrade_requested = self.upgrade_requested, False
        return requested


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

# Distinct paths (and routed streams) given their own series; more would let a client grow /metrics
# without bound: the others share OTHER_STREAMS's.
MAX_PATH_LABELS = 100
MAX_STREAM_LABELS = 100
OTHER_STREAMS = RoutedStream("", "other")
# Uploader addresses of a stream are counted over this window, remembering at most MAX_UPLOADERS of
# them.
UPLOADER_WINDOW = 600.0
MAX_UPLOADERS = 4096
# The status page's history: records per minute over the last hour, and the last refusals.
HISTORY_MINUTES = 60
MAX_REFUSALS = 20
# A push that failed this recently keeps /healthz failing even if the probe passes.
HEALTH_FAILURE_MEMORY = 10.0
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0)
GAUGES = (("open_connections", "Client connections open now."),
          ("inflight_bytes", "Body bytes being received or stored now."),
          ("start_time_seconds", "Unix time the server started."))


class Fields:
    """Plain mutable fields, equal to another of its class with equal fields (a metrics or ledger
    value; not to be confused with the log records)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % field for field in vars(self).items()))


class HistogramCounts(Fields):
    """A histogram's counts at one moment: per bucket of FSYNC_BUCKETS (cumulative), sum and
    count."""

    def __init__(self, counts: Optional[List[int]] = None, total: float = 0.0,
                 count: int = 0) -> None:
        self.counts = counts if counts is not None else [0] * len(FSYNC_BUCKETS)
        self.total = total
        self.count = count

    def add(self, other: HistogramCounts) -> None:
        """Adds another process's counts."""
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts)]
        self.total += other.total
        self.count += other.count

    def quantile(self, quantile: float) -> Optional[float]:
        """The bucket bound under which `quantile` of the observations fall (inf past the last);
        None if none."""
        if not self.count:
            return None
        for bound, number in zip(FSYNC_BUCKETS, self.counts):
            if number >= quantile * self.count:
                return bound
        return math.inf


class Histogram:
    """A cumulative histogram of durations, in the shape Prometheus exposes."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = list(buckets)
        self.counts = HistogramCounts([0] * len(self.buckets))
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Counts one observation in every bucket it fits."""
        with self.lock:
            counts = self.counts.counts
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[index] += 1
            self.counts.total += value
            self.counts.count += 1

    def snapshot(self) -> HistogramCounts:
        """The counts now, as a copy."""
        with self.lock:
            return HistogramCounts(list(self.counts.counts), self.counts.total, self.counts.count)


class Refusal(NamedTuple):
    """A 4xx or 5xx answer, as the status page lists it."""

    time: float
    status: int
    client: str
    path: str
    reason: str


class StorageFailure(NamedTuple):
    """The last time storage failed, and why."""

    time: float
    reason: str


def minute_of(moment: float) -> int:
    """The minute of `moment`, counted since the epoch: the key of per-minute history."""
    return int(moment // 60)


def drop_old_minutes(history: Dict[int, Any], now: float) -> None:
    """Forgets the minutes of a per-minute history that are more than HISTORY_MINUTES old."""
    oldest = minute_of(now) - HISTORY_MINUTES
    for minute in [minute for minute in history if minute <= oldest]:
        del history[minute]


def int_keys(data: Dict[str, T]) -> Dict[int, T]:
    """A dict that came through JSON (whose keys are strings) with its integer keys back."""
    return {int(key): value for key, value in data.items()}


class StreamStats(Fields):
    """What the metrics keep about one stream."""

    def __init__(self, records: int = 0, batches: int = 0, unconverted: int = 0,
                 dedupe_hits: int = 0, last_push: float = 0.0, newest_event: Optional[float] = None,
                 uploaders: Optional[Dict[str, float]] = None,
                 minutes: Optional[Dict[int, List[int]]] = None,
                 refusals: Optional[Dict[int, int]] = None) -> None:
        self.records = records
        self.batches = batches
        self.unconverted = unconverted
        self.dedupe_hits = dedupe_hits
        self.last_push = last_push
        # The newest reqTimeSec of the last push, when its records carry one.
        self.newest_event = newest_event
        # Uploader address -> when it last pushed.
        self.uploaders: Dict[str, float] = uploaders if uploaders is not None else {}
        # Minute (see minute_of) -> [batches, records], the last hour only.
        self.minutes: Dict[int, List[int]] = minutes if minutes is not None else {}
        # HTTP status -> refusals.
        self.refusals: Dict[int, int] = refusals if refusals is not None else {}

    def copy(self, now: float) -> StreamStats:
        """A copy that later counting does not change, with only the uploaders of the window."""
        return StreamStats(self.records, self.batches, self.unconverted, self.dedupe_hits,
                           self.last_push, self.newest_event,
                           {address: seen for address,
                            seen in self.uploaders.items() if now - seen < UPLOADER_WINDOW},
                           {minute: list(counts) for minute, counts in self.minutes.items()},
                           dict(self.refusals))

    def add(self, other: StreamStats) -> None:
        """Adds another process's stats of the same stream; the later push's times win."""
        self.records += other.records
        self.batches += other.batches
        self.unconverted += other.unconverted
        self.dedupe_hits += other.dedupe_hits
        if other.last_push >= self.last_push:
            self.last_push, self.newest_event = other.last_push, other.newest_event
        for address, seen in other.uploaders.items():
            self.uploaders[address] = max(seen, self.uploaders.get(address, 0))
        for minute, (batches, records) in other.minutes.items():
            counts = self.minutes.setdefault(minute, [0, 0])
            counts[0] += batches
            counts[1] += records
        for status, number in other.refusals.items():
            self.refusals[status] = self.refusals.get(status, 0) + number

    def to_wire(self) -> Dict[str, Any]:
        """The stats as JSON-ready data (see MetricsSnapshot.to_wire)."""
        return {"records": self.records, "batches": self.batches, "unconverted": self.unconverted,
                "dedupe_hits": self.dedupe_hits, "last_push": self.last_push,
                "newest_event": self.newest_event, "uploaders": self.uploaders,
                "minutes": self.minutes, "refusals": self.refusals}

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> StreamStats:
        """Reads to_wire()'s data after its trip through JSON."""
        return cls(data["records"], data["batches"], data["unconverted"], data["dedupe_hits"],
                   data["last_push"], data["newest_event"], data["uploaders"],
                   int_keys(data["minutes"]), int_keys(data["refusals"]))


class SnapshotScope(enum.Enum):
    """How much of the metrics a snapshot carries."""

    # Everything /metrics and the status page show.
    FULL = "full"
    # Only what /healthz needs (the storage state): the per-stream part, the bulk of it, is left
    # empty.
    HEALTH = "health"


class MetricsSnapshot(Fields):
    """Everything /metrics, /healthz and the status page show, at one moment, for one process or
    merged."""

    def __init__(self, counters: Optional[Dict[str, float]] = None,
                 requests: Optional[Dict[int, int]] = None,
                 last_push: Optional[Dict[str, float]] = None,
                 gauges: Optional[Dict[str, float]] = None,
                 streams: Optional[Dict[RoutedStream, StreamStats]] = None,
                 written: Optional[Dict[int, int]] = None, refusals: Optional[List[Refusal]] = None,
                 last_success: float = 0.0, streak_start: float = 0.0,
                 storage_error: Optional[StorageFailure] = None,
                 fsync: Optional[HistogramCounts] = None) -> None:
        self.counters: Dict[str, float] = counters if counters is not None else {}
        # HTTP status -> requests answered.
        self.requests: Dict[int, int] = requests if requests is not None else {}
        # URL path -> when a push to it was last stored.
        self.last_push: Dict[str, float] = last_push if last_push is not None else {}
        self.gauges: Dict[str, float] = gauges if gauges is not None else {}
        self.streams: Dict[RoutedStream, StreamStats] = streams if streams is not None else {}
        # Minute (see minute_of) -> bytes stored, the last hour only.
        self.written: Dict[int, int] = written if written is not None else {}
        self.refusals: List[Refusal] = refusals if refusals is not None else []
        # When a push was last stored, and when the current run of 503 answers began (0: none).
        self.last_success = last_success
        self.streak_start = streak_start
        self.storage_error = storage_error
        self.fsync = fsync if fsync is not None else HistogramCounts()

    @classmethod
    def merge(cls, snapshots: Sequence[MetricsSnapshot]) -> MetricsSnapshot:
        """Adds up the snapshots of several workers: counts are summed, the latest times win."""
        merged = cls()
        for snapshot in snapshots:
            for name, amount in snapshot.counters.items():
                merged.counters[name] = merged.counters.get(name, 0) + amount
            for status, number in snapshot.requests.items():
                merged.requests[status] = merged.requests.get(status, 0) + number
            for name, gauge in snapshot.gauges.items():
                if name == "start_time_seconds":
                    merged.gauges[name] = min(gauge, merged.gauges.get(name, gauge))
                else:
                    merged.gauges[name] = merged.gauges.get(name, 0) + gauge
            for path, stamp in snapshot.last_push.items():
                merged.last_push[path] = max(stamp, merged.last_push.get(path, 0))
            for stream, stats in snapshot.streams.items():
                merged.streams.setdefault(stream, StreamStats()).add(stats)
            for minute, written in snapshot.written.items():
                merged.written[minute] = merged.written.get(minute, 0) + written
            merged.refusals = sorted(merged.refusals + snapshot.refusals)[-MAX_REFUSALS:]
            merged.last_success = max(merged.last_success, snapshot.last_success)
            error = snapshot.storage_error
            if error is not None and (merged.storage_error is None
                                      or error.time > merged.storage_error.time):
                merged.storage_error = error
            merged.fsync.add(snapshot.fsync)
        # A streak of 503s is one no worker has ended since with a stored push.
        starts = [snapshot.streak_start for snapshot in snapshots
                  if snapshot.streak_start > merged.last_success]
        merged.streak_start = min(starts) if starts else 0.0
        return merged

    def storage_failure(self, now: float) -> Optional[str]:
        """Why storage is failing, when it failed recently and no push was stored since."""
        error = self.storage_error
        if (error is not None and error.time > self.last_success
                and now - error.time < HEALTH_FAILURE_MEMORY):
            return error.reason
        return None

    def to_wire(self) -> Dict[str, Any]:
        """The snapshot as JSON-ready data: how workers send it to the supervisor and back.

        The wire form is one JSON object with a key per field of this class;
        dicts keyed by numbers (minutes, statuses) have them as decimal
        strings, as JSON keys are; refusals, storage_error and fsync are
        arrays of their fields in order; streams are [route, stream,
        StreamStats.to_wire()] arrays.
        """
        return {"counters": self.counters, "requests": self.requests, "last_push": self.last_push,
                "gauges": self.gauges,
                "streams": [[routed.route, routed.stream, stats.to_wire()]
                            for routed, stats in self.streams.items()],
                "written": self.written, "refusals": [list(refusal) for refusal in self.refusals],
                "last_success": self.last_success, "streak_start": self.streak_start,
                "storage_error": None if self.storage_error is None else list(self.storage_error),
                "fsync": [self.fsync.counts, self.fsync.total, self.fsync.count]}

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> MetricsSnapshot:
        """Reads to_wire()'s data after its trip through JSON."""
        error = data["storage_error"]
        return cls(data["counters"], int_keys(data["requests"]), data["last_push"], data["gauges"],
                   {RoutedStream(route, stream): StreamStats.from_wire(stats)
                    for route, stream, stats in data["streams"]},
                   int_keys(data["written"]), [Refusal(*refusal) for refusal in data["refusals"]],
                   data["last_success"], data["streak_start"],
                   None if error is None else StorageFailure(*error),
                   HistogramCounts(*data["fsync"]))


class Metrics:
    """The counters of one process behind /metrics, /healthz and the status page."""

    COUNTERS = (
        ("received_bytes", "Request body bytes received on the wire."),
        ("decoded_bytes", "Record bytes after gunzip and line normalisation."),
        ("records_stored", "Records stored."),
        ("batches_stored", "Pushes whose records were stored."),
        ("validation_probes", "DataStream validation probes answered."),
        ("liveness_probes", "Liveness probes (OPTIONS, as Akamai's Unified Log Streamer sends at "
         "connect) answered."),
        ("uls_bodies_as_sent", "Pushes from Akamai's Unified Log Streamer whose body is not "
         "{\"event\": ...} envelopes: stored as sent, one record per line."),
        ("dedupe_hits", "Re-sent batches answered 200 without being stored again."),
        ("dedupe_ineligible", "Batches identical to one stored within the dedupe window, stored "
         "again: not every record carries a reqId or a millisecond reqTimeSec, so they may be "
         "genuine."),
        ("odd_stream_ids", "Pushes whose records name a stream ID with leading zeros (or 0): "
         "stored as stream 'unknown', so that one stream has one folder and one ledger row."),
        ("auth_failures", "Requests refused for missing or wrong credentials."),
        ("auth_brakes", "Requests answered 429 without a credential check: their address failed "
         "too often."),
        ("tls_handshake_failures", "TLS handshakes that failed or timed out."),
        ("connections_refused", "Connections closed at once: the worker was full, or the client "
         "address held --max-client-connections."),
        ("connections_evicted", "Connections not serving a request closed to make room near "
         "--max-connections."),
        ("storage_errors", "Pushes answered 503 because storage failed."),
        ("surprises", "Pushes answered 400 because their records set off an unexpected error (the"
         " log has its traceback)."),
        ("worker_restarts", "Worker processes restarted after they exited (--workers)."),
    )

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        # Everything but the gauges and the fsync histogram, which the server adds to snapshots.
        self.state = MetricsSnapshot(counters={name: 0 for name, _ in self.COUNTERS})

    def count(self, name: str, amount: float = 1) -> None:
        """Adds to a counter."""
        with self.lock:
            self.state.counters[name] += amount

    def request_done(self, status: int, received: int) -> None:
        """Counts a finished request by status, with the body bytes it brought."""
        with self.lock:
            requests = self.state.requests
            requests[status] = requests.get(status, 0) + 1
            self.state.counters["received_bytes"] += received

    def stored(self, path: str, records: int) -> None:
        """Counts a stored push and stamps its path's last-push time."""
        with self.lock:
            state = self.state
            state.counters["records_stored"] += records
            state.counters["batches_stored"] += 1
            if path in state.last_push or len(state.last_push) < MAX_PATH_LABELS:
                state.last_push[path] = self.clock()

    def _stream(self, routed: RoutedStream) -> StreamStats:
        """The stats of a routed stream (call with the lock); those past MAX_STREAM_LABELS share
        one, 'other' (the ledger counts each on its own)."""
        streams = self.state.streams
        if routed not in streams and len(streams) >= MAX_STREAM_LABELS:
            routed = OTHER_STREAMS
        return streams.setdefault(routed, StreamStats())

    def stream_stored(self, routed: RoutedStream, records: int, unconverted: int,
                      newest_event: Optional[float], uploader: str, stored_bytes: int) -> None:
        """Counts a stored push of a routed stream."""
        now = self.clock()
        minute = minute_of(now)
        with self.lock:
            state = self.state
            state.last_success, state.streak_start = now, 0.0
            state.written[minute] = state.written.get(minute, 0) + stored_bytes
            if len(state.written) > HISTORY_MINUTES:
                drop_old_minutes(state.written, now)
            stats = self._stream(routed)
            per_minute = stats.minutes.setdefault(minute, [0, 0])
            per_minute[0] += 1
            per_minute[1] += records
            if len(stats.minutes) > HISTORY_MINUTES:
                drop_old_minutes(stats.minutes, now)
            stats.records += records
            stats.batches += 1
            stats.unconverted += unconverted
            stats.last_push = now
            stats.newest_event = newest_event
            uploaders = stats.uploaders
            if uploader in uploaders or len(uploaders) < MAX_UPLOADERS:
                uploaders[uploader] = now
            else:
                stats.uploaders = {address: seen for address, seen in uploaders.items()
                                   if now - seen < UPLOADER_WINDOW}

    def stream_deduplicated(self, routed: RoutedStream) -> None:
        """Counts a retry of a routed stream's batch answered without storing it again."""
        with self.lock:
            self._stream(routed).dedupe_hits += 1

    def refused(self, status: int, client: str, path: str, reason: str,
                routed: Optional[RoutedStream] = None) -> None:
        """Remembers a 4xx or 5xx answer (the last MAX_REFUSALS of them); a 503 starts or extends a
        streak."""
        now = self.clock()
        with self.lock:
            state = self.state
            state.refusals.append(Refusal(now, status, client, path, reason))
            del state.refusals[:-MAX_REFUSALS]
            if status == HTTPStatus.SERVICE_UNAVAILABLE and not state.streak_start:
                state.streak_start = now
            if routed is not None:
                refusals = self._stream(routed).refusals
                refusals[status] = refusals.get(status, 0) + 1

    def storage_failed(self, reason: str) -> None:
        """Remembers a storage failure, for /healthz and the status page."""
        with self.lock:
            self.state.storage_error = StorageFailure(self.clock(), reason)

    def storage_events(self) -> Tuple[float, float]:
        """When this process's storage last failed (0: never) and last stored: a health verdict
        found before either changed is stale."""
        with self.lock:
            error = self.state.storage_error
            return (error.time if error is not None else 0.0), self.state.last_success

    def snapshot(self, gauges: Dict[str, float], fsync_seconds: Histogram,
                 scope: SnapshotScope = SnapshotScope.FULL) -> MetricsSnapshot:
        """Everything counted so far, with these gauges and fsync times, as a copy that workers can
        send."""
        now = self.clock()
        with self.lock:
            state = self.state
            streams = state.streams if scope is SnapshotScope.FULL else {}
            snapshot = MetricsSnapshot(dict(state.counters), dict(state.requests),
                                       dict(state.last_push), dict(gauges),
                                       {name: stats.copy(now) for name, stats in streams.items()},
                                       dict(state.written), list(state.refusals),
                                       state.last_success, state.streak_start, state.storage_error)
        snapshot.fsync = fsync_seconds.snapshot()
        return snapshot

    @classmethod
    def render(cls, snapshot: MetricsSnapshot, facts: ServerFacts) -> bytes:
        """The exposition text of a snapshot, with the facts of the whole server: counters, gauges,
        the fsync histogram."""
        out: List[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append("# HELP dsreceiver_%s %s" % (name, help_text))
            out.append("# TYPE dsreceiver_%s %s" % (name, kind))

        family("requests_total", "counter", "Requests answered, by HTTP status.")
        for status, number in sorted(snapshot.requests.items()):
            out.append('dsreceiver_requests_total{status="%d"} %d' % (status, number))
        for name, help_text in cls.COUNTERS:
            family(name + "_total", "counter", help_text)
            out.append("dsreceiver_%s_total %d" % (name, snapshot.counters[name]))
        family("last_push_timestamp_seconds", "gauge",
               "Unix time of the last stored push, by URL path.")
        for path, stamp in sorted(snapshot.last_push.items()):
            out.append('dsreceiver_last_push_timestamp_seconds{path="%s"} %.3f'
                       % (label_value(path), stamp))
        cls.render_streams(snapshot.streams, family, out)
        for name, help_text in GAUGES:
            family(name, "gauge", help_text)
            out.append("dsreceiver_%s %s" % (name, repr(float(snapshot.gauges[name]))))
        server_gauges = (
            ("unavailable_since_timestamp_seconds", "Unix time the current run of 503 answers "
             "began; 0 while pushes are stored.", snapshot.streak_start),
            ("disk_free_bytes", "Bytes free for the output folder.", facts.disk_free_bytes),
            ("disk_size_bytes", "Size of the output folder's filesystem.", facts.disk_size_bytes),
            ("certificate_expiry_timestamp_seconds", "Unix time the served certificate expires.",
             facts.certificate_expiry))
        for name, help_text, measured in server_gauges:
            if measured is not None:
                family(name, "gauge", help_text)
                out.append("dsreceiver_%s %s" % (name, repr(float(measured))))
        family("stream_push_interval_seconds", "gauge", "How often each uploader of the stream "
               "pushes: its definition's interval, else 60.")
        for routed in sorted(snapshot.streams):
            out.append('dsreceiver_stream_push_interval_seconds{%s} %s'
                       % (routed.labels(), repr(facts.push_interval(routed.stream))))
        family("stream_definition_problems", "gauge", "What --stream-config's definition of the "
               "stream does not let dsreceiver read (unknown data set fields, a definition loaded "
               "without fields): see the log and /status.")
        for stream, problems in sorted(facts.definition_problems.items()):
            out.append('dsreceiver_stream_definition_problems{stream="%s"} %d'
                       % (label_value(stream), len(problems)))
        family("fsync_duration_seconds", "histogram",
               "Time taken by each fdatasync of a data file and its index.")
        fsync = snapshot.fsync
        for bound, number in zip(FSYNC_BUCKETS, fsync.counts):
            out.append('dsreceiver_fsync_duration_seconds_bucket{le="%s"} %d' % (bound, number))
        out.append('dsreceiver_fsync_duration_seconds_bucket{le="+Inf"} %d' % fsync.count)
        out.append("dsreceiver_fsync_duration_seconds_sum %r" % fsync.total)
        out.append("dsreceiver_fsync_duration_seconds_count %d" % fsync.count)
        for name, key, help_text in RECONCILE_SERIES:
            if facts.reconciled:
                family(name, "gauge", help_text)
            for stream, totals in sorted(facts.reconciled.items()):
                out.append('dsreceiver_%s{stream="%s"} %s'
                           % (name, label_value(stream), repr(float(totals[key]))))
        return ("\n".join(out) + "\n").encode("utf-8")

    @staticmethod
    def render_streams(streams: Dict[RoutedStream, StreamStats],
                       family: Callable[[str, str, str], None], out: List[str]) -> None:
        """The per-stream series."""
        now = time.time()
        series: List[Tuple[str, str, str, Callable[[StreamStats], Optional[float]]]] = [
            ("stream_records_total", "counter", "Records stored, by stream ID ('unknown': records "
             "without one, 'mixed': a push with several).", lambda stats: stats.records),
            ("stream_batches_total", "counter", "Pushes stored, by stream.",
             lambda stats: stats.batches),
            ("stream_unconverted_records_total", "counter", "STRUCTURED records stored as sent "
             "under --records json (no definition fits them), by stream.",
             lambda stats: stats.unconverted),
            ("stream_last_push_timestamp_seconds", "gauge",
             "Unix time of the stream's last stored push.", lambda stats: stats.last_push),
            ("stream_event_lag_seconds", "gauge",
             "Now minus the newest reqTimeSec of the stream's last push.",
             lambda stats: None if stats.newest_event is None else now - stats.newest_event),
            ("stream_uploaders", "gauge",
             "Distinct uploader addresses in the last 10 minutes, by stream.",
             lambda stats: sum(now - seen < UPLOADER_WINDOW for seen in stats.uploaders.values())),
        ]
        for name, kind, help_text, measure in series:
            family(name, kind, help_text)
            for routed, stats in sorted(streams.items()):
                value = measure(stats)
                if value is not None:
                    out.append('dsreceiver_%s{%s} %s' % (name, routed.labels(), repr(float(value))))


# What /metrics shows of the last `dsreceiver.py reconcile`: (name, its key, help).
RECONCILE_SERIES = (
    ("reconcile_timestamp_seconds", "at", "Unix time of the last reconcile with Akamai's upload "
     "metrics, by stream."),
    ("reconcile_delivered_records", "delivered", "Records Akamai says DataStream delivered, in "
     "the last reconcile's range."),
    ("reconcile_stored_records", "stored", "Records stored, in the last reconcile's range."),
    ("reconcile_missing_records", "missing", "Records delivered and not stored, in the last "
     "reconcile's range (one window of tolerance)."),
    ("reconcile_failed_records", "failed", "Records DataStream gave up on, in the last "
     "reconcile's range."))


class ServerFacts(NamedTuple):
    """What /metrics shows of the whole server besides the counts of its workers."""

    disk_free_bytes: Optional[float]
    disk_size_bytes: Optional[float]
    certificate_expiry: Optional[float]
    # A stream ID -> its push interval in seconds.
    push_interval: Callable[[str], float]
    # The last reconcile's totals by stream ID, with "at" (see read_reconciled); empty when none.
    reconciled: Dict[str, Dict[str, float]] = {}
    # Each defined stream's definition problems (see StreamDefinition.problems).
    definition_problems: Dict[str, List[str]] = {}


# ---------------------------------------------------------------------------
# Status page
# ---------------------------------------------------------------------------
# The /status document as HTML: pure, a dict in and bytes out.

STREAK_RED_AFTER = 120.0


STATUS_CSS = """\
:root{color-scheme:light dark;--bg:#fff;--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bad:#cf222e;
--warn:#9a6700;--good:#1a7f37;--spark:#0969da}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;--line:#3d444d;
--bad:#ff7b72;--warn:#d29922;--good:#3fb950;--spark:#4493f8}}
body{margin:0;padding:1rem;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,sans-serif}
h1{font-size:1.3rem;margin:0}h2{font-size:1.05rem;margin:1.5rem 0 .5rem}
.muted{color:var(--muted)}.bad{color:var(--bad);font-weight:600}
.warn{color:var(--warn);font-weight:600}.good{color:var(--good)}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{padding:.35rem .6rem;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{font-weight:600;color:var(--muted)}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:1rem;
margin-top:1.5rem}
.card h2{margin-top:0}
.card{border:1px solid var(--line);border-radius:6px;padding:.75rem 1rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0}
dt{color:var(--muted)}dd{margin:0}
svg{vertical-align:middle}polyline{fill:none;stroke:var(--spark);stroke-width:1.5}
"""
# Only this exact stylesheet may apply: no external asset, no script, no frame around the page.
STATUS_CSS_HASH = base64.b64encode(hashlib.sha256(STATUS_CSS.encode()).digest()).decode()
STATUS_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'sha256-%s'; base-uri 'none'; "
     "form-action 'none'; frame-ancestors 'none'" % STATUS_CSS_HASH),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
STATUS_REFRESH_SECONDS = 10


def duration(seconds: Optional[float]) -> str:
    """A duration for people: 42 s, 7 min, 3 h 12 min, 5 d 4 h."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    if seconds < 172800:
        return "%d h %d min" % (seconds // 3600, seconds % 3600 // 60)
    return "%d d %d h" % (seconds // 86400, seconds % 86400 // 3600)


def byte_size(size: Optional[float]) -> str:
    """A size for people: 512 B, 3.4 MB, 1.2 TB (powers of 1000, as disks are sold)."""
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (size, unit)
        size /= 1000
    return "-"


def utc_time(moment: Optional[float]) -> str:
    """A wall-clock time: 2026-11-28 17:05:03Z."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(moment)) if moment else "-"


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> str:
    """An inline SVG line of `values` (oldest first), scaled to its largest."""
    top = max(values) or 1
    step = width / max(1, len(values) - 1)
    points = " ".join("%.1f,%.1f" % (index * step, height - 1 - (height - 2) * value / top)
                      for index, value in enumerate(values))
    return ('<svg width="%d" height="%d" viewBox="0 0 %d %d" role="img" '
            'aria-label="records per minute"><polyline points="%s"/></svg>'
            % (width, height, width, height, points))


def render_status_page(doc: Dict[str, Any]) -> bytes:
    """The /status page of a status document (see ReceiverServer.status_document); every value a
    client can influence is HTML-escaped."""
    def esc(value: object) -> str:
        return html.escape(str(value), quote=True)

    server, storage, now = doc["server"], doc["storage"], doc["generated"]
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           '<meta http-equiv="refresh" content="%d">' % STATUS_REFRESH_SECONDS,
           "<title>dsreceiver status</title><style>%s</style></head><body>" % STATUS_CSS,
           "<h1>dsreceiver status</h1><p class=\"muted\">%s, refreshed every %d s</p>"
           % (esc(utc_time(now)), STATUS_REFRESH_SECONDS)]

    out.append('<h2>Streams</h2><div class="scroll"><table id="streams"><thead><tr><th>stream</th>'
               "<th>last push</th><th>batches, last hour</th><th>records, last hour</th>"
               "<th>records per minute</th><th>uploaders, 10 min</th><th>event lag</th>"
               "<th>dedupe hits</th><th>refusals</th><th>last reconcile</th></tr></thead><tbody>")
    for row in doc["streams"]:
        late = "bad" if row["late"] else "good"
        refusals = ", ".join("%s: %d" % (status, n)
                             for status, n in sorted(row["refusals"].items())) or "-"
        reconciled = row["reconciled"]
        if reconciled is None:
            reconcile_cell = '<td class="muted" data-field="reconciled">never</td>'
        else:
            lost = reconciled["missing"] + reconciled["failed"]
            reconcile_cell = ('<td class="%s" data-field="reconciled">%s: Akamai %d, stored %d,'
                              ' missing %d</td>'
                              % ("bad" if lost else "good", esc(utc_time(reconciled["at"])),
                                 reconciled["delivered"], reconciled["stored"], lost))
        out.append('<tr data-route="%s" data-stream="%s"><td>%s</td>'
                   '<td class="%s" data-field="since">%s ago</td>'
                   '<td class="n" data-field="batches">%d</td>'
                   '<td class="n" data-field="records">%d</td><td>%s</td>'
                   '<td class="n" data-field="uploaders">%d</td><td class="n">%s</td>'
                   '<td class="n">%d</td><td>%s</td>%s</tr>'
                   % (esc(row["route"]), esc(row["stream"]), esc(row["label"]), late,
                      esc(duration(row["seconds_since_push"])), row["batches_last_hour"],
                      row["records_last_hour"], sparkline(row["records_per_minute"]),
                      row["uploaders_last_10_minutes"], esc(duration(row["event_lag_seconds"])),
                      row["dedupe_hits"], esc(refusals), reconcile_cell))
    if not doc["streams"]:
        out.append('<tr><td colspan="10" class="muted">'
                   "No push stored since the server started.</td></tr>")
    out.append("</tbody></table></div>")
    problems = doc.get("definition_problems") or []
    if problems:
        out.append('<h2>Stream definition problems</h2><ul id="definition-problems">')
        out.extend('<li class="bad" data-stream="%s">stream %s: %s</li>'
                   % (esc(item["stream"]), esc(item["stream"]), esc(item["problem"]))
                   for item in problems)
        out.append("</ul>")

    streak = storage["streak_seconds"]
    streak_class = "bad" if streak >= STREAK_RED_AFTER else "warn" if streak else "good"
    error = storage["last_error"]
    out.append('<div class="cards"><section class="card" id="storage"><h2>Storage</h2><dl>')
    full_in = storage["full_in_seconds"]
    storage_rows = [
        ("output folder", storage["output_dir"], ""),
        ("disk free", "%s of %s" % (byte_size(storage["disk_free_bytes"]),
                                    byte_size(storage["disk_total_bytes"])), ""),
        ("written, last hour",
         "%s (%s/s)" % (byte_size(storage["written_last_hour_bytes"]),
                        byte_size(storage["write_rate_bytes_per_second"])), ""),
        ("full in", duration(full_in) if full_in else "not at this rate",
         "bad" if full_in and full_in < 86400 else ""),
        ("fsync p50 / p99", "%s / %s" % (latency(storage["fsync_p50_seconds"]),
                                          latency(storage["fsync_p99_seconds"])), ""),
        ("last storage error", "%s: %s" % (utc_time(error["time"]), error["reason"]) if error
         else "none", "bad" if error else ""),
        ("503 streak", "%s (DataStream drops a batch after about %d min of them)"
         % (duration(streak), RETRY_HORIZON // 60) if streak else "none", streak_class)]
    for name, value, css in storage_rows:
        out.append('<dt>%s</dt><dd class="%s">%s</dd>' % (esc(name), css, esc(value)))
    out.append('</dl></section><section class="card" id="server"><h2>Server</h2><dl>')
    tls = server["tls"]
    plain = "none (plain HTTP)" if server["plain_http"] else "unknown"
    certificate = tls["subject"] if tls else plain
    expiring = bool(tls) and tls["not_after"] - now < CERT_EXPIRY_WARNING_DAYS * 86400
    server_rows = [
        ("version", server["version"], ""),
        ("uptime", duration(server["uptime_seconds"]), ""),
        ("workers", server["workers"], ""),
        ("listening", server["listening"], ""),
        ("certificate", certificate, ""),
        ("issuer", tls["issuer"] if tls else "-", ""),
        ("expires", "%s (in %s)" % (utc_time(tls["not_after"]), duration(tls["not_after"] - now))
         if tls else "-", "bad" if expiring else ""),
        ("authentication", " + ".join(server["authentication"]) or "none",
         "" if server["authentication"] else "bad"),
        ("open connections", server["open_connections"], ""),
        ("in-flight bytes", byte_size(server["inflight_bytes"]), "")]
    for name, value, css in server_rows:
        out.append('<dt>%s</dt><dd class="%s">%s</dd>' % (esc(name), css, esc(value)))
    out.append("</dl></section></div>")

    out.append('<h2>Recent refusals</h2><div class="scroll"><table id="refusals"><thead><tr>'
               "<th>time</th><th>status</th><th>client</th><th>path</th><th>reason</th>"
               "</tr></thead><tbody>")
    for refusal in doc["refusals"]:
        out.append("<tr><td>%s</td><td class=\"n\">%d</td><td>%s</td><td>%s</td><td>%s</td></tr>"
                   % (esc(utc_time(refusal["time"])), refusal["status"], esc(refusal["client"]),
                      esc(refusal["path"]), esc(refusal["reason"])))
    if not doc["refusals"]:
        out.append('<tr><td colspan="5" class="muted">None since the server started.</td></tr>')
    out.append('</tbody></table></div><p class="muted">The same data for scripts: '
               '<a href="/status.json">/status.json</a>.</p></body></html>\n')
    return "".join(out).encode("utf-8")


def latency(seconds: Optional[float]) -> str:
    """An fsync latency bound: at most 2.5 ms, over 10 s."""
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "over %g s" % FSYNC_BUCKETS[-1]
    return "at most %g ms" % (seconds * 1000) if seconds < 1 else "at most %g s" % seconds


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------

# Forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are fixed by OpenSSL.
TLS12_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
                 ":!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES")


def read_pem(path: Path, marker: str, what: str) -> None:
    """Checks that a PEM file is readable and holds `marker`, naming the file if not."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError("cannot read %s %s: %s" % (what, path, describe_os_error(exc))) from None
    if marker.encode() not in text:
        raise ConfigError("%s %s holds no PEM %s" % (what, path, marker.strip("-").lower()))


def make_server_context(cert: Path, key: Path, client_ca: Optional[Path]) -> ssl.SSLContext:
    """Builds the server TLS context: TLS 1.2+, forward-secret ciphers, optional client
    certificates."""
    read_pem(cert, "-----BEGIN CERTIFICATE-----", "certificate")
    read_pem(key, "PRIVATE KEY-----", "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError("certificate %s and private key %s do not match"
                              % (cert, key)) from None
        raise ConfigError("cannot load certificate %s with key %s: %s"
                          % (cert, key, exc.reason or exc)) from None
    except OSError as exc:
        raise ConfigError("cannot load certificate %s with key %s: %s"
                          % (cert, key, describe_os_error(exc))) from None
    if client_ca is not None:
        read_pem(client_ca, "-----BEGIN CERTIFICATE-----", "client CA")
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("cannot load client CA %s: %s"
                              % (client_ca, describe_os_error(exc))) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class CertificateSource:
    """Holds the server TLS context and reloads it when the certificate files change or on
    request."""

    def __init__(self, cert: Path, key: Path, client_ca: Optional[Path]) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.context = make_server_context(cert, key, client_ca)
        self.signature = self._signature()
        self._facts: Optional[Dict[str, Any]] = None

    @property
    def facts(self) -> Dict[str, Any]:
        """Subject, issuer and expiry of the certificate served (see certificate_facts), read when
        first asked for: they cost a run of the openssl command."""
        if self._facts is None:
            self._facts = certificate_facts(self.cert)
        return self._facts

    def _signature(self) -> Tuple[Optional[Tuple[int, int, int, int]], ...]:
        """Identifies the current files; os.stat follows certbot's symlinks to the real files."""
        signature = []
        for path in (self.cert, self.key, self.client_ca):
            try:
                info = os.stat(str(path)) if path is not None else None
            except OSError:
                info = None
            signature.append((info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size) if info
                             else None)
        return tuple(signature)

    def reload(self, reason: str) -> bool:
        """Loads the files again; a broken pair is refused with one error line and the current one
        stays."""
        self.signature = self._signature()
        try:
            context = make_server_context(self.cert, self.key, self.client_ca)
        except ConfigError as exc:
            log.error("certificate reload (%s) refused, still serving the previous certificate: %s",
                      reason, exc)
            return False
        self.context = context  # new connections take it; established ones keep theirs
        self._facts = None
        log.info("certificate reloaded (%s) from %s", reason, self.cert)
        return True

    def reload_if_changed(self) -> None:
        """Reloads when the files differ from the last ones looked at."""
        if self._signature() != self.signature:
            self.reload("files changed")


def certificate_facts(cert: Path) -> Dict[str, Any]:
    """Subject, issuer and expiry of the first certificate in `cert`, for the status page, as the
    openssl command reads them (the ssl module decodes only a peer's certificate); empty when it
    cannot."""
    import subprocess  # here, as in create_self_signed: the server starts faster without it

    try:
        result = subprocess.run(["openssl", "x509", "-noout", "-subject", "-issuer", "-enddate",
                                 "-nameopt", "RFC2253", "-in", str(cert)], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    try:
        not_after = ssl.cert_time_to_seconds(fields["notAfter"])
    except (KeyError, ValueError):
        return {}
    return {"subject": fields.get("subject", ""), "issuer": fields.get("issuer", ""),
            "not_after": not_after}


def create_self_signed(cert: Path, key: Path, hostname: str) -> None:
    """Creates a self-signed certificate and key for `hostname` with the openssl command."""
    import subprocess

    try:
        is_ip = bool(ipaddress.ip_address(hostname))
    except ValueError:
        is_ip = False
    alt_name = ("IP:" if is_ip else "DNS:") + hostname
    cert.parent.mkdir(parents=True, exist_ok=True)
    temp_cert, temp_key = cert.with_name(".new-" + cert.name), key.with_name(".new-" + key.name)
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes", "-days",
               "825", "-subj", "/CN=" + hostname[:64], "-addext", "subjectAltName=" + alt_name,
               "-keyout", str(temp_key), "-out", str(temp_cert)]
    old_umask = os.umask(0o077)
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=60)
    except FileNotFoundError:
        raise ConfigError("no certificate in %s and no openssl command to create one: "
                          "install openssl or pass --cert/--key" % cert.parent) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("cannot run openssl to create a certificate: %s"
                          % describe_os_error(exc)) from None
    finally:
        os.umask(old_umask)
    if result.returncode != 0:
        last_line = (result.stdout.decode("utf-8", "replace").strip().splitlines()
                     or ["failed"])[-1]
        raise ConfigError("openssl could not create a certificate in %s: %s"
                          % (cert.parent, last_line))
    os.replace(temp_key, key)
    os.replace(temp_cert, cert)


def resolve_certificate(settings: Settings) -> Tuple[Path, Path]:
    """Returns the (certificate, key) paths, creating a self-signed pair in the default folder when
    it is empty."""
    if settings.cert is not None and settings.key is not None:
        return settings.cert, settings.key
    cert, key = settings.certs_dir / CERT_FILE_NAME, settings.certs_dir / KEY_FILE_NAME
    is_default_dir = settings.certs_dir == Path(DEFAULT_CERTS_DIR)
    if is_default_dir and not cert.exists() and not key.exists():
        hostname = settings.hostname or socket.getfqdn()
        create_self_signed(cert, key, hostname)
        log.warning("created a self-signed certificate for %s in %s: DataStream accepts it only"
                    " when %s is uploaded as the stream's CA certificate (or use a certificate from"
                    " a public CA)", hostname, settings.certs_dir, cert)
    return cert, key


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------

def read_secret_file(path: Path) -> List[str]:
    """Returns the non-blank, non-comment lines of a secrets file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read %s: %s" % (path, describe_os_error(exc))) from None
    return [line.strip() for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def split_secret_list(value: Optional[str]) -> List[str]:
    """Splits a comma-separated secret list from the environment."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


# RFC 6750 2.1: a Bearer token is a b64token.
BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def matches_any(supplied: bytes, accepted: Sequence[bytes]) -> bool:
    """Compares against every accepted secret in constant time, without stopping at a match."""
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(supplied, candidate)
    return found


class Authenticator:
    """Checks the credentials of a request; every configured method must pass, Basic and Bearer
    being one: the Authorization header carries either, so either passes when both are set."""

    def __init__(self, basic: Sequence[bytes] = (), header_name: Optional[str] = None,
                 header_values: Sequence[bytes] = (), query_param: Optional[str] = None,
                 query_values: Sequence[bytes] = (), client_certificates: bool = False,
                 bearer: Sequence[bytes] = ()) -> None:
        self.basic = list(basic)
        self.header_name = header_name
        self.header_values = list(header_values)
        self.query_param = query_param
        self.query_values = list(query_values)
        self.client_certificates = client_certificates
        self.bearer = list(bearer)

    @classmethod
    def from_settings(cls, settings: CredentialSettings, environ: Dict[str, str]) -> Authenticator:
        """Loads the accepted secrets from the environment and the configured files."""
        basic = split_secret_list(environ.get(ENV_BASIC_AUTH))
        if settings.basic_auth_file:
            basic += read_secret_file(settings.basic_auth_file)
        for credential in basic:
            if ":" not in credential or credential.startswith(":"):
                raise ConfigError("Basic credentials must be user:password (check $%s and"
                                  " --basic-auth-file)" % ENV_BASIC_AUTH)
        header_values = cls._values(settings.auth_header, "--auth-header",
                                    environ.get(ENV_AUTH_HEADER_VALUE), settings.auth_header_file)
        query_values = cls._values(settings.auth_query_param, "--auth-query-param",
                                   environ.get(ENV_AUTH_QUERY_VALUE), settings.auth_query_file)
        bearer = split_secret_list(environ.get(ENV_BEARER_TOKEN))
        if settings.bearer_token_file:
            bearer += read_secret_file(settings.bearer_token_file)
        if not all(BEARER_TOKEN_RE.fullmatch(token) for token in bearer):
            raise ConfigError("Bearer tokens are letters, digits and -._~+/ (RFC 6750), then"
                              " optional '=' (check $%s and --bearer-token-file)"
                              % ENV_BEARER_TOKEN)
        return cls(basic=[item.encode("utf-8") for item in basic],
                   header_name=settings.auth_header, header_values=header_values,
                   query_param=settings.auth_query_param, query_values=query_values,
                   client_certificates=settings.client_ca is not None,
                   bearer=[token.encode("ascii") for token in bearer])

    @staticmethod
    def _values(name: Optional[str], option: str, env_value: Optional[str],
                path: Optional[Path]) -> List[bytes]:
        """Loads the accepted values of a header or query secret and checks they go with their
        option."""
        values = split_secret_list(env_value) + (read_secret_file(path) if path else [])
        if name is None and values:
            raise ConfigError("accepted values are set but %s is not" % option)
        if name is not None and not values:
            raise ConfigError("%s is set but no accepted values are (environment or %s-file)"
                              % (option, option))
        return [value.encode("utf-8") for value in values]

    def methods(self) -> List[str]:
        """Names the configured methods, for the start-up log line."""
        authorization = " or ".join(name for name, active in (("basic", self.basic),
                                                              ("bearer", self.bearer)) if active)
        return [name for name, active in ((authorization, authorization),
                                          ("header", self.header_name),
                                          ("query-token", self.query_param),
                                          ("mtls", self.client_certificates)) if active]

    def check(self, authorization: Optional[str], header_value: Optional[str],
              query: str) -> Optional[str]:
        """Returns why the request is refused, or None when every configured method passes."""
        if (self.basic or self.bearer) and not (self.basic and self._basic_ok(authorization)
                                                or self.bearer and self._bearer_ok(authorization)):
            return "bad or missing %s credentials" % " or ".join(
                name for name, active in (("Basic", self.basic), ("Bearer", self.bearer)) if active)
        if self.header_name and not matches_any((header_value or "").encode("latin-1"),
                                                self.header_values):
            return "bad or missing %s header" % self.header_name
        if self.query_param:
            tokens = [value for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True)
                      if name == self.query_param]
            if len(tokens) != 1 or not matches_any(tokens[0].encode("utf-8"), self.query_values):
                return "bad or missing %s query token" % self.query_param
        return None

    def _basic_ok(self, authorization: Optional[str]) -> bool:
        """Checks an Authorization: Basic header against the accepted credentials."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            supplied = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return matches_any(supplied, self.basic)

    def _bearer_ok(self, authorization: Optional[str]) -> bool:
        """Checks an Authorization: Bearer header against the accepted tokens."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return matches_any(token.strip().encode("latin-1"), self.bearer)

    def redact(self, query: str) -> str:
        """Returns the query string with the token parameter's value hidden, for logs."""
        if not self.query_param or not query:
            return query
        items = []
        for item in query.split("&"):
            name = urllib.parse.unquote_plus(item.partition("=")[0])
            items.append(item.partition("=")[0] + "=REDACTED" if name == self.query_param else item)
        return "&".join(items)


# ---------------------------------------------------------------------------
# Body decoding
# ---------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
INFLATE_INPUT_CHUNK = 65536
INFLATE_OUTPUT_CHUNK = 1 << 20
# Decoded bodies larger than this go to an unlinked temporary file, so memory
# per request stays bounded whatever --max-decompressed-size allows.
SPOOL_THRESHOLD = 8 << 20
# How much of a batch is read, at first, to find its first or last record (records are rarely
# longer).
LINE_WINDOW = 4096
# zlib level for pushes compressed here with --store gzip: fast, still about 8x smaller for log
# lines.
STORE_GZIP_LEVEL = 1
# Faster than `b"\n\n" in data`, whose byte-at-a-time search LF-heavy data defeats.
BLANK_LINE_RE = re.compile(rb"\n\n")



class BodyError(Exception):
    """The body cannot be decoded: sending the same bytes again cannot help."""


class BodyTooLarge(BodyError):
    """The decompressed body, or one of its records, exceeds its limit."""


def line_over(data: Bytes, start: int, end: int, limit: int, lead: int = 0) -> bool:
    """Whether data[start:end], whose first line began `lead` bytes before `start`, holds a line
    longer than `limit` (its LF left out; a last line without one counts as far as it goes).  It
    looks for an LF every limit // 2 bytes and measures a line only where a stretch has none, so
    it costs a few searches a megabyte."""
    if lead + end - start <= limit:
        return False
    step = max(1, limit // 2)
    position = start
    while position < end:
        stop = min(end, position + step)
        if data.find(b"\n", position, stop) < 0:
            first = data.rfind(b"\n", start, position) + 1
            last = data.find(b"\n", stop, end)
            length = (last if last >= 0 else end) - first + (lead if first == start else 0)
            if length > limit:
                return True
        position = stop
    return False


class Gunzip:
    """Iterates over the decompressed bytes of every gzip member in `data`; never more than `limit`
    in all.

    `exact` ends False when zero padding followed the last member, so the
    bytes are not a plain concatenation of members.
    """

    def __init__(self, data: Buffer, limit: int) -> None:
        self.data = data
        self.limit = limit
        self.exact = True

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.data)
        offset = produced = 0
        while True:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            pending: Buffer = b""
            stalled = False
            while not inflater.eof:
                if not pending:
                    if offset < len(view):
                        # Small input slices keep unconsumed_tail (a copy) small.
                        pending = view[offset:offset + INFLATE_INPUT_CHUNK]
                        offset += len(pending)
                    elif stalled:
                        raise BodyError("truncated gzip body")
                try:
                    chunk = inflater.decompress(pending, INFLATE_OUTPUT_CHUNK)
                except zlib.error as exc:
                    raise BodyError("corrupt gzip body (%s)" % exc) from None
                pending = inflater.unconsumed_tail
                stalled = not chunk
                produced += len(chunk)
                if produced > self.limit:
                    raise BodyTooLarge("decompressed body exceeds %d bytes" % self.limit)
                if chunk:
                    yield chunk
            offset -= len(inflater.unused_data)
            rest = view[offset:]
            if rest[:2] == GZIP_MAGIC:
                continue
            if rest.tobytes().strip(b"\0"):
                raise BodyError("unexpected bytes after gzip data")
            self.exact = not rest
            return


def normalize_lines(data: Bytes) -> Tuple[Bytes, bool]:
    """Turns CRLF into LF and drops blank lines in `data` (whole lines, each ending in LF); tells
    whether anything changed."""
    changed = False
    if b"\r" in data:
        replaced = data.replace(b"\r\n", b"\n")
        changed, data = len(replaced) != len(data), replaced
    if BLANK_LINE_RE.search(data) or data[:1] == b"\n":
        lines = [line for line in data.split(b"\n") if line]
        data, changed = (b"\n".join(lines) + b"\n" if lines else b""), True
    return data, changed


def is_clean_range(data: bytes, start: int, end: int) -> bool:
    """Tells whether normalize_lines() would keep data[start:end] as it is (the usual case), without
    copying it."""
    return (data.find(b"\r", start, end) < 0 and data[start:start + 1] != b"\n"
            and not BLANK_LINE_RE.search(data, start, end))


def is_validation_probe(data: bytes) -> bool:
    """Tells DataStream's "Validate & Save" probe body from log data."""
    body = data.strip()
    if body in VALIDATION_PROBES:
        return True
    if body[:1] != b"{" or len(body) > 64:
        return False
    try:
        return bool(json.loads(body) == {"access_validation": True})
    except ValueError:
        return False


class RecordBatch:
    """The records of one push, one per line each ending in LF: in memory, or spooled to a temporary
    file."""

    def __init__(self, parts: List[Buffer], spool: Optional[IO[bytes]], size: int, records: int,
                 digest: Optional[bytes] = None) -> None:
        self.parts = parts
        self.spool = spool
        self.size = size
        self.records = records
        self.digest = digest
        # With --store gzip: what is written instead of the records, as gzip members.
        self.gzip_members: Optional[Buffer] = None
        # The earliest and latest event times of the records, when the push path learnt them on the
        # way (converted STRUCTURED records); None: the records are read back when sealed.
        self.events: Optional[Tuple[float, float]] = None
        # first_line(), once read: the pipeline and storage both look at it.
        self.first: Optional[bytes] = None

    @property
    def stored_size(self) -> int:
        """How many bytes write_to() writes."""
        return self.size if self.gzip_members is None else len(self.gzip_members)

    def chunks(self) -> Iterator[Buffer]:
        """The records, in pieces."""
        spool = self.spool
        if spool is None:
            yield from self.parts
            return
        spool.seek(0)
        yield from iter(lambda: spool.read(COPY_CHUNK), b"")

    def compress(self, pushed_gzip: Optional[Buffer]) -> None:
        """Switches the batch to gzip members: the pushed gzip bytes themselves, which the caller
        vouches decode to exactly these records, or else the records compressed here."""
        if pushed_gzip is not None:
            self.gzip_members = pushed_gzip
            return
        compressor = zlib.compressobj(STORE_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self.gzip_members = b"".join([compressor.compress(chunk) for chunk in self.chunks()]
                                     + [compressor.flush()])

    def write_to(self, fd: int) -> None:
        """Writes the batch to `fd`: one writev for an in-memory batch."""
        if self.gzip_members is not None:
            write_all(fd, [self.gzip_members])
        elif self.spool is None:
            write_all(fd, self.parts)
        else:
            for chunk in self.chunks():
                write_all(fd, [chunk])

    def memory_parts(self) -> Optional[Sequence[Buffer]]:
        """What write_to() writes, when it is all in memory; None for a spooled batch."""
        if self.gzip_members is not None:
            return [self.gzip_members]
        return self.parts if self.spool is None else None

    def joined(self) -> Optional[bytes]:
        """The records as one bytes object (kept as the batch's only part), or None when they are
        spooled."""
        if self.spool is not None:
            return None
        if len(self.parts) != 1 or not isinstance(self.parts[0], bytes):
            self.parts = [b"".join(self.parts)]
        joined = self.parts[0]
        assert isinstance(joined, bytes)
        return joined

    def contents(self) -> bytes:
        """The records as one bytes object, read whole from the spool file when they are spooled."""
        joined = self.joined()
        return joined if joined is not None else self._bytes_at(0, self.size)

    def count(self, token: bytes) -> int:
        """How many times `token` occurs in the records."""
        total, tail = 0, b""
        for chunk in self.chunks():
            piece = chunk.tobytes() if isinstance(chunk, memoryview) else chunk
            # An occurrence across the cut lies within the last and first len(token) - 1 bytes.
            total += piece.count(token) + (tail + piece[:len(token) - 1]).count(token)
            tail = bytes(piece[max(0, len(piece) - len(token) + 1):])
        return total

    def first_line(self) -> bytes:
        """The first record, without its LF; reads only as much of the batch as the record takes."""
        window = LINE_WINDOW
        while self.first is None:
            head = self._bytes_at(0, window)
            end = head.find(b"\n")
            if end >= 0 or len(head) >= self.size:
                self.first = head if end < 0 else head[:end]
            window *= 4
        return self.first

    def last_line(self) -> bytes:
        """The last record, without its LF; reads only as much of the batch as the record takes."""
        if self.records == 1:
            return self.first_line()  # the same object: its checks can tell and skip a second look
        window = LINE_WINDOW
        while True:
            tail = self._bytes_at(max(0, self.size - window), window)
            body = tail[:-1] if tail.endswith(b"\n") else tail
            start = body.rfind(b"\n")
            if start >= 0 or len(tail) >= self.size:
                return body[start + 1:]
            window *= 4

    def _bytes_at(self, offset: int, size: int) -> bytes:
        """`size` bytes of the records from `offset` (fewer at the end)."""
        if self.spool is not None:
            self.spool.seek(offset)
            return self.spool.read(size)
        pieces: List[bytes] = []
        position = 0
        for part in self.parts:
            if position + len(part) > offset and offset + size > position:
                pieces.append(bytes(part[max(0, offset - position):offset + size - position]))
            position += len(part)
        return b"".join(pieces)

    def is_validation_probe(self) -> bool:
        """Tells whether this batch is only DataStream's validation probe."""
        return self.spool is None and self.size <= 128 and is_validation_probe(b"".join(self.parts))

    def close(self) -> None:
        """Releases the spool file, if any."""
        if self.spool is not None:
            self.spool.close()


class BatchBuilder:
    """Collects decoded body chunks into a RecordBatch, normalising lines and spooling big
    bodies."""

    def __init__(self, spool_dir: Path, digest: bool = False,
                 max_record: int = DEFAULT_MAX_RECORD) -> None:
        self.spool_dir = spool_dir
        # A longer record refuses the body (BodyTooLarge), before it takes more memory or disk.
        self.max_record = max_record
        # The digest identifies a re-sent batch; it is taken only when retry dedup is on.
        self.hasher = hashlib.sha256() if digest else None
        self.parts: List[Buffer] = []
        self.spool: Optional[IO[bytes]] = None
        self.carry = b""
        # True once part of a very long line has been emitted ahead of its end, and how much.
        self.mid_line = False
        self.line_emitted = 0
        # True once the records differ from the decoded body (CRs, blank lines, a final LF, an
        # array).
        self.altered = False
        self.size = 0
        self.records = 0

    def feed(self, chunk: bytes) -> None:
        """Adds decoded bytes; a line cut by the chunk boundary waits for the next chunk.  Raises
        BodyTooLarge at a record longer than max_record."""
        start = 0
        if self.carry or self.mid_line:
            newline = chunk.find(b"\n")
            held = self.line_emitted + len(self.carry)
            if held + (newline if newline >= 0 else len(chunk)) > self.max_record:
                raise self.record_too_long()
            if newline < 0:
                self.carry += chunk
                if self.mid_line or len(self.carry) > COPY_CHUNK:
                    # A line longer than a chunk goes out in pieces, so memory stays bounded.
                    carry, self.carry = self.carry, b""
                    self._emit_line_piece(carry)
                return
            line = self.carry + chunk[:newline + 1]
            self.carry, start = b"", newline + 1
            if self.mid_line:
                self.altered |= line.endswith(b"\r\n")
                self._emit(line[:-2] if line.endswith(b"\r\n") else line[:-1], 0)
                self._emit(b"\n", 1)
                self.mid_line, self.line_emitted = False, 0
            else:
                self._emit_normalized(line)
        if line_over(chunk, start, len(chunk), self.max_record):
            raise self.record_too_long()
        cut = chunk.rfind(b"\n", start) + 1
        if cut > start:
            if is_clean_range(chunk, start, cut):
                self._emit(memoryview(chunk)[start:cut], chunk.count(b"\n", start, cut))
            else:
                self._emit_normalized(chunk[start:cut])
        self.carry = chunk[max(cut, start):]
        if len(self.carry) > COPY_CHUNK:
            carry, self.carry = self.carry, b""
            self._emit_line_piece(carry)

    def _emit_normalized(self, lines: Bytes) -> None:
        normalized, changed = normalize_lines(lines)
        self.altered |= changed
        self._emit(normalized, normalized.count(b"\n"))

    def _emit_line_piece(self, piece: bytes) -> None:
        """Emits part of a line whose end has not arrived; a final CR waits, it may precede LF."""
        if piece.endswith(b"\r"):
            self.carry, piece = b"\r", piece[:-1]
        self._emit(piece, 0)
        self.mid_line = True
        self.line_emitted += len(piece)

    def record_too_long(self) -> BodyTooLarge:
        """The refusal of a body with a record longer than max_record."""
        return BodyTooLarge("a record is longer than %d bytes (--max-record-bytes)"
                            % self.max_record)

    def finish(self) -> RecordBatch:
        """Ends the body: a last line without LF gets one; a body that is one JSON array becomes one
        record per element."""
        last = self.carry[:-1] if self.carry.endswith(b"\r") else self.carry
        # Anything left over gains a final LF or loses a lone CR: the records differ from the body.
        self.altered |= bool(self.carry) or self.mid_line
        if last or self.mid_line:
            self._emit(last, 0)
            self._emit(b"\n", 1)
        if self.spool is None and self.parts and bytes(self.parts[0][:64]).lstrip()[:1] == b"[":
            self._expand_json_array()
        digest = self.hasher.digest() if self.hasher is not None else None
        return RecordBatch(self.parts, self.spool, self.size, self.records, digest)

    def feed_whole(self, body: Bytes) -> RecordBatch:
        """Builds the batch from a complete undecoded body without copying it when it is already
        clean."""
        if body.endswith(b"\n"):
            if line_over(body, 0, len(body), self.max_record):
                raise self.record_too_long()
            self._emit_normalized(body)
        else:
            self.feed(bytes(body))
        return self.finish()

    def _emit(self, data: Buffer, records: int) -> None:
        """Appends normalised lines, `records` of them (the LFs in `data`)."""
        if not len(data):
            return
        if self.spool is None and self.size + len(data) > SPOOL_THRESHOLD:
            import tempfile  # here: only bodies this large need it, and the server starts faster
            self.spool = tempfile.TemporaryFile(dir=str(self.spool_dir))
            for part in self.parts:
                self.spool.write(part)
            self.parts = []
        if self.spool is not None:
            self.spool.write(data)
        else:
            self.parts.append(data)
        self.size += len(data)
        self.records += records
        if self.hasher is not None:
            self.hasher.update(data)

    def _expand_json_array(self) -> None:
        """DataStream 1 may send one JSON array: store one element per line (see
        json_array_lines); one it cannot split is stored as sent."""
        lines = json_array_lines(b"".join(self.parts))
        if lines is None:
            return
        self.parts, self.size, self.records = [], 0, 0
        self.altered = True
        if self.hasher is not None:
            self.hasher = hashlib.sha256()
        if lines:
            self._emit(b"\n".join(lines) + b"\n", len(lines))


def json_array_lines(data: bytes) -> Optional[List[bytes]]:
    """The elements of a body that is one JSON array, one line each, compact; an element with a
    lone surrogate (a string JavaScript cut inside an emoji), which UTF-8 cannot hold, keeps it as
    JSON's \\u escape.  None when the body is no JSON array, or one too deep to read: it is stored
    as sent."""
    try:
        elements = json.loads(data)
        if not isinstance(elements, list):
            return None
        lines = []
        for item in elements:
            try:
                lines.append(json.dumps(item, ensure_ascii=False,
                                        separators=(",", ":")).encode("utf-8"))
            except UnicodeEncodeError:
                lines.append(json.dumps(item, separators=(",", ":")).encode("ascii"))
        return lines
    except (ValueError, RecursionError):
        return None


class DecodedPush(NamedTuple):
    """A push body decoded: its records, and the pushed bytes when they are exactly gzip members of
    those records (what --store gzip may keep as they are)."""

    batch: RecordBatch
    pushed_gzip: Optional[Buffer]


def decode_push(body: bytearray, declared_gzip: bool, limit: int, spool_dir: Path, digest: bool,
                on_growth: Callable[[int], None],
                max_record: int = DEFAULT_MAX_RECORD) -> DecodedPush:
    """Decodes a push body into records: gunzip when the header says so or the magic bytes do, then
    lines.

    on_growth(size) sees the decoded bytes held in memory grow (spooled ones
    are not); raises BodyError, or BodyTooLarge past `limit` decoded bytes or
    at a record longer than `max_record`.
    """
    builder = BatchBuilder(spool_dir, digest, max_record)
    if not declared_gzip and body[:2] != GZIP_MAGIC:
        return DecodedPush(builder.feed_whole(body), None)
    gunzip = Gunzip(body, limit)
    for chunk in gunzip:
        builder.feed(chunk)
        on_growth(min(builder.size, SPOOL_THRESHOLD))
    batch = builder.finish()
    return DecodedPush(batch, body if gunzip.exact and not builder.altered else None)


# ---------------------------------------------------------------------------
# DataStream streams
# ---------------------------------------------------------------------------
# Which stream a push carries, stream definitions, STRUCTURED records as JSON.

# DataStream records (see ../shared/DATASTREAM.md): a JSON record names "version" and "streamId"; a
# STRUCTURED record starts with version and stream ID; a millisecond reqTimeSec looks like
# 1764200000.507.
UNKNOWN_STREAM = "unknown"
# DataStream pushes every 30 or 60 seconds per uploader; a stream is late after LATE_AFTER_INTERVALS
# of them.
DEFAULT_PUSH_INTERVAL = 60.0
MIXED_STREAM = "mixed"
FIELD_DELIMITERS = {"SPACE": b" ", "TAB": b"\t"}
DASH = b"-"
# A stream ID as the receiver names it everywhere (folders, ledger, metrics, reconcile): decimal,
# without leading zeros, so that one stream has one name.
STREAM_ID_RE = re.compile(r"[1-9][0-9]{0,11}")
STREAM_VERSION_RE = re.compile(r"[0-9]{1,6}")
JSON_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
# A --stream-config file larger than this is refused unread: a stream's definition is a few KB.
MAX_DEFINITIONS_FILE = 16 << 20
JSON_STREAM_ID_RE = re.compile(rb'"(?:streamId|ds2id)"\s*:\s*"?([0-9]{1,12})"?\s*[,}]')
JSON_VERSION_RE = re.compile(rb'"version"\s*:\s*"?([0-9]{1,6})"?\s*[,}]')
JSON_MS_TIME_LINE_RE = re.compile(rb'(?m)^[^\n]*?"reqTimeSec"\s*:\s*"?[0-9]{9,11}\.[0-9]{3}"')
# version, delimiter, isMidgress (0, 1 or 2) when in second place, stream ID (never 0, 1 or 2).
STRUCTURED_HEAD_RE = re.compile(rb"([0-9]{1,6})([ \t])(?:([012])\2)?([0-9]{1,12})\2")
MIDGRESS_VALUES = (b"0", b"1", b"2")
# Where a record says when its event happened, first found first: a CDN record's reqTimeSec, a
# security event's httpMessage.start, an EdgeWorkers log's time (see event_time_seconds for units).
EVENT_TIME_KEYS = ("reqTimeSec", "httpMessage.start", "time")
# Each key's pattern; a long key's starts at its third letter: the scan of a whole file (see
# read_back) runs 1.7x faster from a rare letter than from '"'.  Still a key: a value cannot hold
# the '"' that must follow it, JSON escapes it.
RECORD_TIME_RES = tuple(re.compile(rb'%s"\s*:\s*"?([0-9]{9,19}(?:\.[0-9]{1,9})?)"?'
                                  % (b'"' + name if len(name) < 8 else name[2:]))
                       for name in [key.rsplit(".", 1)[-1].encode("ascii")
                                    for key in EVENT_TIME_KEYS])
# A security delivery ends with this object, which is not an event: {"total":..,"offset":..,..}.
DELIVERY_METADATA_KEYS = frozenset(("total", "offset", "limit"))
DELIVERY_METADATA_RE = re.compile(rb'\{\s*"(?:total|offset|limit)"\s*:')
DELIVERY_METADATA_MAX = 1024
# The event range of records that name no event time, and of records whose times are not known
# until they are read back (see read_back).
NO_EVENTS = (0.0, 0.0)
UNKNOWN_EVENTS = (math.nan, math.nan)
MS_TIME_LINE_RE = re.compile(rb"(?m)^(?:[^ \t\n]*[ \t])*?[0-9]{9,11}\.[0-9]{3}(?=[ \t\n]|$)")
# Bytes a JSON string cannot hold as they are (LF never occurs inside a record).
JSON_UNSAFE_RE = re.compile(rb'[\x00-\x09\x0b-\x1f"\\\x7f-\xff]')


# Data set field ID -> the JSON key of its values, for definitions that name fields by ID only (a
# STRUCTURED stream's saved definition, Terraform's dataset_fields).  From Akamai's published data
# set list (see ../shared/DATASTREAM.md); a definition's own datasetFieldJsonKey wins, as Akamai
# adds fields.
DATASET_FIELDS = {
    999: "streamId", 1000: "cp", 1002: "reqId", 1100: "reqTimeSec", 1005: "bytes", 1006: "cliIP",
    1008: "statusCode", 1009: "proto", 1011: "reqHost", 1012: "reqMethod", 1013: "reqPath",
    1014: "reqPort", 1015: "rspContentLen", 1016: "rspContentType", 1017: "UA", 1019: "accLang",
    1023: "cookie", 1031: "range", 1032: "referer", 1037: "xForwardedFor", 1033: "reqEndTimeMSec",
    1066: "edgeIP", 1068: "errorCode", 1082: "customField", 1102: "turnAroundTimeMSec",
    1103: "transferTimeMSec", 2001: "tlsOverheadTimeMSec", 2002: "tlsVersion", 2003: "objSize",
    2004: "uncompressedSize", 2005: "maxAgeSec", 2006: "overheadBytes", 2007: "dnsLookupTimeMSec",
    2008: "totalBytes", 2009: "queryStr", 2010: "cacheStatus", 2011: "cacheRefreshSrc",
    2012: "country", 2013: "state",
    2014: "city", 2019: "cacheable", 2020: "breadcrumbs", 2021: "lastByte", 2022: "asn",
    2023: "fileSizeBucket", 2024: "edgeAttempts", 2025: "timeToFirstByte", 2026: "startupError",
    2027: "downloadTime", 2028: "throughput", 2084: "prefetchMidgressHits", 2050: "securityRules",
    2051: "isMidgress", 2052: "serverCountry", 2053: "billingRegion", 2060: "brotliStatus",
    2061: "originContentLen", 2080: "cmcd", 3000: "ewUsageInfo", 3001: "ewExecutionInfo",
    3011: "contentProtection",
}


class StreamDefinition(NamedTuple):
    """What a STRUCTURED line of one stream holds: version, stream ID, then values for these JSON
    keys in order (see LineLayout for where isMidgress and a repeated streamId go)."""

    stream_id: str
    # The stream version it describes; None (the short form without streamVersion) for any version.
    version: Optional[str]
    # Empty for a JSON stream saved without its fields: it needs no conversion.
    fields: Tuple[str, ...]
    delimiter: bytes
    # deliveryConfiguration.frequency.intervalInSeconds: how often each uploader pushes, when given.
    interval: Optional[int] = None
    # What dsreceiver could not read in it, each a line (control characters escaped): a field kept
    # under a placeholder key, or a definition loaded without its fields (records stored as sent).
    problems: Tuple[str, ...] = ()


def placeholder_key(field_id: int) -> str:
    """The JSON key under which the values of a data set field unknown to dsreceiver are stored."""
    return "field%d" % field_id


def field_key(entry: object, position: int, problems: List[str]) -> str:
    """The JSON key of one entry of a definition's field list: a key, a data set field ID, or an API
    datasetFields object (whose own datasetFieldJsonKey wins over the catalog); an ID the catalog
    does not know gets placeholder_key(), said in `problems`."""
    if isinstance(entry, dict):
        key = entry.get("datasetFieldJsonKey")
        if key is not None:
            return str(key)
        if "datasetFieldId" not in entry:
            raise ValueError("datasetFields entry %d has neither datasetFieldJsonKey nor "
                             "datasetFieldId" % position)
        entry = entry["datasetFieldId"]
    if isinstance(entry, str) and not entry.isdigit():
        return entry
    if isinstance(entry, bool) or not isinstance(entry, (int, str)):
        raise ValueError("field %d must be a JSON key or a data set field ID, not %r"
                         % (position, entry))
    field_id = int(entry)
    key = DATASET_FIELDS.get(field_id)
    if key is None:
        # Akamai adds data set fields over time: a new one must not stop the stream, or the server.
        key = placeholder_key(field_id)
        problems.append("field %d is data set field ID %d, whose JSON key dsreceiver does not "
                        "know: its values are stored under \"%s\" (give it as {\"datasetFieldId\": "
                        "%d, \"datasetFieldJsonKey\": \"KEY\"} to name it)"
                        % (position, field_id, key, field_id))
    return key


def parse_stream_definition(document: object) -> StreamDefinition:
    """Reads one stream definition: the JSON that DataStream's API (v2 or v3) returns for "get a
    stream", or the short form {"streamId": 61234, "fields": ["cp", 1002, ...]} whose fields are
    JSON keys or data set field IDs (Terraform's dataset_fields).  Raises ValueError saying what is
    wrong, naming the stream once its ID is known."""
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    stream_id = document.get("streamId")
    if isinstance(stream_id, bool) or not STREAM_ID_RE.fullmatch(str(stream_id)):
        raise ValueError("streamId must be a decimal number, not %r" % (stream_id,))
    try:
        return parse_stream_fields(str(stream_id), document)
    except ValueError as exc:
        raise ValueError("stream %s: %s" % (stream_id, exc)) from None


def parse_stream_fields(stream_id: str, document: Dict[str, Any]) -> StreamDefinition:
    """The rest of parse_stream_definition, once the stream's ID is known."""
    version = document.get("streamVersion")
    if version is not None and (isinstance(version, bool)
                                or not STREAM_VERSION_RE.fullmatch(str(version))):
        raise ValueError("streamVersion must be a number, not %r" % (version,))
    delivery = document.get("deliveryConfiguration", {})
    if not isinstance(delivery, dict):
        raise ValueError("deliveryConfiguration must be an object")
    delimiter = document.get("fieldDelimiter", delivery.get("fieldDelimiter", "SPACE"))
    if not isinstance(delimiter, str) or delimiter not in FIELD_DELIMITERS:
        raise ValueError("fieldDelimiter must be SPACE or TAB, not %r" % (delimiter,))
    listed = next((document[name] for name in ("datasetFields", "fields", "dataset_fields")
                   if name in document), None)
    if listed is None and delivery.get("format") == "JSON":
        listed = []  # a JSON stream's records carry their keys: nothing to convert
    elif listed is None:
        raise ValueError("no datasetFields (the API's form) or fields (the short form): save the "
                         "answer of \"get a stream\" for it, which lists its fields")
    if not isinstance(listed, list):
        raise ValueError("datasetFields must be a list of objects, fields a list of keys or IDs")
    problems: List[str] = []
    fields = [field_key(entry, position, problems) for position, entry in enumerate(listed, 1)]
    for key in fields:
        if not JSON_KEY_RE.fullmatch(key) or key == "version":
            raise ValueError("%r is not a usable JSON key (letters, digits, '_')" % (key,))
    if len(set(fields)) != len(fields) or not fields and delivery.get("format") != "JSON":
        raise ValueError("the field list is empty or names a key twice")
    frequency = delivery.get("frequency", {})
    interval = frequency.get("intervalInSeconds") if isinstance(frequency, dict) else None
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int)
                                 or interval <= 0):
        raise ValueError("frequency.intervalInSeconds must be a positive number of seconds, not %r"
                         % (interval,))
    return StreamDefinition(stream_id, None if version is None else str(version), tuple(fields),
                            FIELD_DELIMITERS[delimiter], interval, tuple(problems))


def unreadable_definition(document: object, problem: ValueError) -> Optional[StreamDefinition]:
    """A definition whose stream ID is readable but not the rest (parse_stream_definition raised
    `problem`): it loads without fields, so its STRUCTURED records are stored as sent; None when
    not even its stream ID can be read."""
    if not isinstance(document, dict):
        return None
    stream_id, version = document.get("streamId"), document.get("streamVersion")
    if isinstance(stream_id, bool) or not STREAM_ID_RE.fullmatch(str(stream_id)):
        return None
    readable = not isinstance(version, bool) and STREAM_VERSION_RE.fullmatch(str(version))
    reason = str(problem)
    prefix = "stream %s: " % stream_id
    return StreamDefinition(str(stream_id), str(version) if readable else None, (), b" ",
                            problems=("its definition cannot be read, so its STRUCTURED records "
                                      "are stored as sent: %s" % reason[len(prefix):]
                                      if reason.startswith(prefix) else reason,))


def definitions_in(document: object) -> List[object]:
    """The stream definitions a saved JSON document holds: one ("get a stream", or the short form),
    a list of them, or the API's list-streams answer ({"streams": [...]})."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and "streamId" not in document:
        listed = document.get("streams")
        if isinstance(listed, list):
            return listed
    return [document]


def load_stream_definitions(path: Path) -> List[StreamDefinition]:
    """Reads --stream-config: a JSON file, or every *.json file of a folder, each holding
    definitions (see definitions_in).  Raises ConfigError naming the file and the problem."""
    try:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            if file.stat().st_size > MAX_DEFINITIONS_FILE:
                raise ConfigError("stream definition %s: larger than %d MB, which no stream"
                                  " definition is" % (file, MAX_DEFINITIONS_FILE >> 20))
        texts = [(file, file.read_text(encoding="utf-8")) for file in files]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read stream definitions %s: %s"
                          % (path, describe_os_error(exc))) from None
    definitions: List[StreamDefinition] = []
    seen: Dict[Tuple[str, Optional[str]], str] = {}
    for file, text in texts:
        try:
            try:
                document = json.loads(text)
            except RecursionError:
                raise ValueError("JSON nested too deeply to read") from None
            for item in definitions_in(document):
                try:
                    definition = parse_stream_definition(item)
                except ValueError as exc:
                    # Akamai's truth, however odd, never stops the receiver: only this stream's
                    # records are affected (stored as sent).
                    fallback = unreadable_definition(item, exc)
                    if fallback is None:
                        raise
                    definition = fallback
                for problem in definition.problems:
                    log.warning("stream definition %s: stream %s: %s", file, definition.stream_id,
                                problem)
                key = (definition.stream_id, definition.version)
                if key in seen:
                    raise ValueError("stream %s version %s is defined in %s already"
                                     % (key[0], key[1] or "(any)", seen[key]))
                seen[key] = str(file)
                definitions.append(definition)
        except ValueError as exc:
            raise ConfigError("stream definition %s: %s" % (file, exc)) from None
    return definitions


# ---------------------------------------------------------------------------
# DataStream records
# ---------------------------------------------------------------------------
# STRUCTURED lines as JSON records, and what a push's records say: stream, event time, identity.


class LineLayout:
    """Where the values of one shape of STRUCTURED line go in its JSON record.

    A line reads "version streamId values..." or, with collectMidgress,
    "version isMidgress streamId values..." (a stream ID is never 0, 1 or 2,
    so the second value tells which) or "version streamId isMidgress ...".
    The converter first swaps a midgress head into "version streamId
    isMidgress", then the values after the stream ID follow `keys`: None
    marks a value left out of the record (the stream ID again, when the
    definition lists field 999).  A stream without field 999 may send lines
    without a stream ID ("version values..."): their layouts carry the
    stream ID, known from elsewhere, as `stream`.
    """

    def __init__(self, keys: Sequence[Optional[str]], midgress_head: bool,
                 stream: Optional[str] = None) -> None:
        self.keys = tuple(keys)
        self.midgress_head = midgress_head
        # Values before the first of `keys`: version and stream ID, or version alone.
        self.values_before = 2 if stream is None else 1
        self.swap = midgress_head and stream is None
        self.width = self.values_before + len(self.keys)
        self.head = (b'{"version":"%s","streamId":"%s"' if stream is None
                     else b'{"version":"%s","streamId":"' + stream.encode("ascii") + b'"')
        self.slots = [b"%.0s" if key is None else b',"' + key.encode("ascii") + b'":"%s"'
                      for key in self.keys]
        # Where a line holds its reqId, if the stream has one: a record whose value there is not '-'
        # is unique.
        self.request_id = (self.values_before + self.keys.index("reqId") if "reqId" in self.keys
                           else None)
        # Where a line holds its event time (the first of EVENT_TIME_KEYS the stream lists), as
        # sent: read there only, so that no value a visitor controls is taken for it.
        timed = next((key for key in EVENT_TIME_KEYS if key in self.keys), None)
        position = None if timed is None else self.values_before + self.keys.index(timed)
        self.event_time = (3 - position if self.swap and position in (1, 2) else position)
        self.templates: Dict[Tuple[bool, ...], bytes] = {}


LayoutKey = Tuple[bool, int]


def line_layouts(fields: Sequence[str], stream: Optional[str] = None
                 ) -> Dict[LayoutKey, LineLayout]:
    """Every line shape a definition's fields allow, by (isMidgress in second place, value count):
    isMidgress in second place, at its listed position, or (not listed) after the stream ID; a
    listed streamId repeated or not.  With `stream`: the shapes of lines without a stream ID."""
    layouts: Dict[LayoutKey, LineLayout] = {}
    listed = "isMidgress" in fields
    placements = [(False, False), (True, True)] + ([] if listed or stream else [(False, True)])
    for midgress_head, leading_midgress in placements:
        body = [key for key in fields if not (leading_midgress and key == "isMidgress")]
        head = ["isMidgress"] if leading_midgress else []
        for repeats_stream_id in ((True,) if stream is not None else (True, False)):
            keys = head + [None if key == "streamId" else key for key in body
                           if repeats_stream_id or key != "streamId"]
            layout = LineLayout(keys, midgress_head, stream)
            layouts.setdefault((midgress_head, layout.width), layout)
    return layouts


class StructuredConverter:
    """Turns the STRUCTURED lines of one stream definition into the JSON lines the stream's JSON
    format would have carried: version, streamId, then every field's key with its value as a string,
    '-' values left out ('^' is a value, kept as the JSON format keeps it).

    The output of a line is one %-format of its values with a template made
    for its layout and pattern of '-' values (a '-' slot is '%.0s', which
    prints nothing), so a line costs one split and one format, all in C.
    `bare` (in the methods) says the lines carry no stream ID.
    """

    MAX_TEMPLATES = 4096

    def __init__(self, definition: StreamDefinition) -> None:
        self.definition = definition
        self.layouts = line_layouts(definition.fields)
        # Only a stream that does not list field 999 sends lines without its ID.
        self.bare_layouts = ({} if "streamId" in definition.fields
                             else line_layouts(definition.fields, definition.stream_id))
        # Control characters that need escaping in JSON: all but LF (never inside a record) and the
        # delimiter.
        self.controls = bytes(byte for byte in range(0x20)
                              if byte not in (0x0A, definition.delimiter[0]))

    def layout(self, values: List[bytes], bare: bool = False) -> Optional[LineLayout]:
        """The layout of a line split into `values`; None when no layout has as many values."""
        midgress_head = len(values) > 2 and values[1] in MIDGRESS_VALUES
        return (self.bare_layouts if bare else self.layouts).get((midgress_head, len(values)))

    @staticmethod
    def template(layout: LineLayout, dashes: Tuple[bool, ...]) -> bytes:
        """The format of a line of `layout` whose values are '-' where `dashes` says so."""
        template = layout.templates.get(dashes)
        if template is None:
            template = layout.head + b"".join(
                b"%.0s" if dash else slot
                for dash, slot in zip(dashes[layout.values_before:], layout.slots)) + b"}"
            if len(layout.templates) < StructuredConverter.MAX_TEMPLATES:
                layout.templates[dashes] = template
        return template

    def event_time(self, line: bytes, bare: bool = False) -> Optional[float]:
        """The event time a STRUCTURED line holds where its definition puts it; None when the line
        fits no layout of the definition, or the definition names no time field."""
        values = line.split(self.definition.delimiter)
        layout = self.layout(values, bare)
        if layout is None or layout.event_time is None:
            return None
        return event_time_seconds(values[layout.event_time])

    def convert(self, values: List[bytes], bare: bool = False) -> Optional[bytes]:
        """The JSON line of a STRUCTURED line split into `values`, which need no JSON escaping; None
        when the number of values fits no layout of the definition."""
        layout = self.layout(values, bare)
        if layout is None:
            return None
        if layout.swap:
            values[1], values[2] = values[2], values[1]
        return self.template(layout, tuple(map(DASH.__eq__, values))) % tuple(values)

    def needs_escaping(self, data: bytes) -> bool:
        """Tells whether any value in `data` needs JSON escaping (or is not ASCII), so
        convert_lines() cannot take it; checked in C over the whole batch."""
        return (not data.isascii() or b'"' in data or b"\\" in data
                or len(data.translate(None, self.controls)) != len(data))

    def convert_lines(self, lines: List[bytes], bare: bool = False
                      ) -> Tuple[List[bytes], int, bool, Optional[Tuple[float, float]]]:
        """Converts lines that need no JSON escaping, of the layout of the first: (the lines, those
        that do not fit kept as they are; how many did not fit; whether every converted one has a
        reqId; their event range, None when not every line had the first's layout).  The hot loop
        of --records json."""
        delimiter = self.definition.delimiter
        layout = self.layout(lines[0].split(delimiter), bare) if lines else None
        if layout is None:
            return list(lines), len(lines), False, None
        width, request_id, swap = layout.width, layout.request_id, layout.swap
        cached, template, is_dash = layout.templates.get, self.template, DASH.__eq__
        out: List[bytes] = []
        append = out.append
        unfit = without_id = others = 0
        # The event time as sent, from its place in each line: one list append a line, where
        # finding it in the JSON records afterwards would be a pass over all of them.
        timed = layout.event_time
        times: List[bytes] = []
        note_time = times.append
        for line in lines:
            values = line.split(delimiter)
            if len(values) == width:
                if timed is not None:
                    note_time(values[timed])
                if swap:
                    values[1], values[2] = values[2], values[1]
                dashes = tuple(map(is_dash, values))
                append((cached(dashes) or template(layout, dashes)) % tuple(values))
                if request_id is not None:
                    without_id += dashes[request_id]
            else:
                converted = self.convert(values, bare)
                unfit += converted is None
                without_id += 1
                others += 1
                append(line if converted is None else converted)
        events = None if others else collected_range(times)
        return out, unfit, request_id is not None and not without_id, events

    def convert_escaping(self, values: List[bytes], bare: bool = False) -> Optional[bytes]:
        """Like convert(), for values that may hold quotes, backslashes or control characters; None
        also when a value is not UTF-8, which JSON text cannot carry."""
        layout = self.layout(values, bare)
        if layout is None:
            return None
        if layout.swap:
            values[1], values[2] = values[2], values[1]
        escaped = []
        for value in values:
            if JSON_UNSAFE_RE.search(value):
                try:
                    value = json.dumps(value.decode("utf-8"),
                                       ensure_ascii=False)[1:-1].encode("utf-8")
                except UnicodeDecodeError:
                    return None
            escaped.append(value)
        return self.template(layout, tuple(map(DASH.__eq__, values))) % tuple(escaped)


class StreamRecords(NamedTuple):
    """A push's records as they will be stored, and what they say about their stream."""

    stream: str
    version: str
    batch: RecordBatch
    # STRUCTURED records kept as sent although --records json asked for JSON (no matching
    # definition).
    unconverted: int
    # The newer of the first and last records' reqTimeSec, when they have one.
    newest_event: Optional[float]
    # Whether every record carries a per-request identity, so that an identical batch can only be a
    # retry; a scan of the whole batch, so it is asked only of a batch that matches one already
    # stored.
    is_unique: Callable[[], bool]
    # The records name a stream ID that is not one (leading zeros, 0): filed as 'unknown', counted.
    odd_stream_id: bool = False


class StreamCatalog:
    """The stream definitions of --stream-config (replaced whole on reload) and what they make of a
    push."""

    def __init__(self, path: Optional[Path], to_json: bool) -> None:
        self.path = path
        self.to_json = to_json
        self.definitions: List[StreamDefinition] = []
        self.converters: Dict[Tuple[str, Optional[str]], StructuredConverter] = {}
        # The streams that have a definition; (version or None, midgress head, value count) -> the
        # streams whose lines without a stream ID have that shape.
        self.defined: Set[str] = set()
        self.bare_shapes: Dict[Tuple[Optional[str], bool, int], List[str]] = {}
        self.warned: Set[Tuple[str, str]] = set()
        self.lock = threading.Lock()
        if path is not None:
            self._install(load_stream_definitions(path))

    def _install(self, definitions: Sequence[StreamDefinition]) -> None:
        converters = {(d.stream_id, d.version): StructuredConverter(d) for d in definitions
                      if d.fields}
        bare_shapes: Dict[Tuple[Optional[str], bool, int], List[str]] = {}
        for (stream, version), converter in converters.items():
            for midgress_head, width in converter.bare_layouts:
                bare_shapes.setdefault((version, midgress_head, width), []).append(stream)
        self.definitions = list(definitions)
        self.converters, self.bare_shapes = converters, bare_shapes
        self.defined = {definition.stream_id for definition in definitions}
        with self.lock:
            self.warned.clear()

    def reload(self) -> None:
        """SIGHUP: reads the definitions again; broken ones are refused and the previous ones
        kept."""
        if self.path is None:
            return
        try:
            definitions = load_stream_definitions(self.path)
        except ConfigError as exc:
            log.error("stream definitions reload refused, keeping the previous ones: %s", exc)
            return
        self._install(definitions)
        log.info("stream definitions reloaded: %d from %s", len(definitions), self.path)

    def converter(self, stream: str, version: str) -> Optional[StructuredConverter]:
        """The definition of this stream version, else the stream's definition for any version."""
        converters = self.converters
        return converters.get((stream, version)) or converters.get((stream, None))

    def problems(self) -> Dict[str, List[str]]:
        """What could not be read in each defined stream's definitions (an empty list: nothing)."""
        found: Dict[str, List[str]] = {}
        for definition in self.definitions:
            found.setdefault(definition.stream_id, []).extend(definition.problems)
        return found

    def push_interval(self, stream: str) -> float:
        """How often each uploader of a stream pushes: its definition's interval, else DataStream's
        longest (60 s)."""
        intervals = [definition.interval for definition in self.definitions
                     if definition.stream_id == stream and definition.interval]
        return float(max(intervals)) if intervals else DEFAULT_PUSH_INTERVAL

    def warn_once(self, stream: str, message: str, *args: object) -> None:
        """Logs a warning about a stream once (per process, until the next reload)."""
        with self.lock:
            if (stream, message) in self.warned or len(self.warned) > MAX_STREAM_LABELS * 4:
                return
            self.warned.add((stream, message))
        log.warning(message, *args)

    def classify(self, batch: RecordBatch, named: Optional[str] = None) -> StreamRecords:
        """Reads a push's stream from its records and, with --records json, turns STRUCTURED records
        of a defined stream into JSON; `named` is the stream the endpoint URL names, if any.

        DataStream sends one stream per push, so the stream is read from the
        first and the last record (reading every record would cost a pass over
        the batch): when they disagree, or only one names a stream, the push
        is 'mixed'; when neither does, 'unknown'.  A security delivery's
        metadata object is dropped: it is not an event.
        """
        first, last = batch.first_line(), batch.last_line()
        if first[:1] == b"{":
            if DELIVERY_METADATA_RE.match(last) and is_delivery_metadata(last):
                log.debug("a security delivery's metadata object, not stored: %s",
                          ascii(last[:DELIVERY_METADATA_MAX]))
                batch = without_last_record(batch, len(last) + 1)
                if not batch.records:
                    return StreamRecords(named or UNKNOWN_STREAM, "", batch, 0, None,
                                         lambda: False)
                first, last = batch.first_line(), batch.last_line()
            found = JSON_STREAM_ID_RE.search(first)
            found_last = found if last is first else JSON_STREAM_ID_RE.search(last)
            named_ids = (found.group(1) if found else None,
                         found_last.group(1) if found_last else None)
            found_version = JSON_VERSION_RE.search(first)
            records = batch
            return StreamRecords(stream_of(*named_ids),
                                 found_version.group(1).decode("ascii") if found_version else "",
                                 records, 0, json_event_time(first, last),
                                 lambda: json_records_are_unique(records),
                                 not_stream_ids(*named_ids))
        head, head_last = STRUCTURED_HEAD_RE.match(first), STRUCTURED_HEAD_RE.match(last)
        bare = self.bare_stream(first, head, named) if head is not None else None
        named_ids = (None, None) if bare else (head.group(4) if head else None,
                                               head_last.group(4) if head_last else None)
        stream = bare or stream_of(*named_ids)
        version = head.group(1).decode("ascii") if head else ""
        convertible = head is not None and self.to_json and stream != MIXED_STREAM
        data = batch.joined() if convertible else None
        if head is None or data is None:
            # Stored as sent: not converted, or a batch too large to hold twice (DataStream's are
            # far smaller).
            kept_as_sent = batch.records if self.to_json and head else 0
            return StreamRecords(stream, version, batch, kept_as_sent,
                                 self.structured_event_time(stream, version, first, last,
                                                            bare is not None),
                                 lambda: count_lines(MS_TIME_LINE_RE, batch) == batch.records,
                                 not_stream_ids(*named_ids))
        return self._convert(batch, data, head, stream, version, bare is not None)._replace(
            odd_stream_id=not_stream_ids(*named_ids))

    def structured_event_time(self, stream: str, version: str, first: bytes, last: bytes,
                              bare: bool) -> Optional[float]:
        """The newer event time of two STRUCTURED records of `stream`, read where its definition
        puts the time field; None without a definition (any value could be a visitor's)."""
        converter = self.converter(stream, version)
        if converter is None:
            return None
        times = [seconds for line in (first, last)
                 for seconds in [converter.event_time(line, bare)] if seconds is not None]
        return max(times) if times else None

    def bare_stream(self, first: bytes, head: re.Match[bytes], named: Optional[str]
                    ) -> Optional[str]:
        """The stream of STRUCTURED lines that carry no stream ID ("version cp reqId ..."), when
        something tells: the first line fits no definition of the stream its second value would
        name, but fits the URL's stream (whose definition fits it, or which has none), or the
        lines without stream ID of exactly one definition.  None: the second value is the stream
        ID (or nothing tells otherwise)."""
        candidate = head.group(4).decode("ascii")
        if named == candidate or not (named or self.bare_shapes):
            return None
        version, midgress_head = head.group(1).decode("ascii"), head.group(3) is not None
        width = first.count(head.group(2)) + 1
        converter = self.converter(candidate, version)
        if converter is not None and (midgress_head, width) in converter.layouts:
            return None
        if named is not None:
            own = self.converter(named, version)
            if own is not None:
                return named if (midgress_head, width) in own.bare_layouts else None
            return None if candidate in self.defined else named
        if candidate in self.defined:
            return None
        streams = (self.bare_shapes.get((version, midgress_head, width), [])
                   + self.bare_shapes.get((None, midgress_head, width), []))
        return streams[0] if len(set(streams)) == 1 else None

    def _convert(self, batch: RecordBatch, data: bytes, head: re.Match[bytes], stream: str,
                 version: str, bare: bool) -> StreamRecords:
        """--records json: the batch with its STRUCTURED records of defined streams turned into
        JSON; `bare`: lines without a stream ID, of `stream`."""
        lines = data.split(b"\n")
        lines.pop()
        # Usually every line starts as the first does (one stream, one version): the fast path.
        uniform = (data.count(b"\n" + head.group(1) + head.group(2)) + 1 if bare
                   else lines_headed_alike(data, head)) == batch.records
        converter = self.converter(stream, version)
        out: Optional[List[bytes]] = None
        unconverted, identified = len(lines), False
        events: Optional[Tuple[float, float]] = None
        if uniform and (converter is None or converter.definition.delimiter != head.group(2)):
            self.warn_once(stream,
                           "stream %s version %s has no definition for its STRUCTURED records: they"
                           " are stored as sent (add it to --stream-config and send SIGHUP)",
                           stream, version)
        elif uniform and converter is not None and not converter.needs_escaping(data):
            out, unconverted, identified, events = converter.convert_lines(lines, bare)
        else:
            out, unconverted = self._convert_each(lines, converter if bare else None)
        if unconverted:
            self.warn_once(stream,
                           "stream %s: %d of %d STRUCTURED records do not fit its definition (field"
                           " count, version or encoding): they are stored as sent", stream,
                           unconverted, len(lines))
        if out is None or unconverted == len(lines):
            return StreamRecords(stream, version, batch, unconverted,
                                 self.structured_event_time(stream, version, lines[0], lines[-1],
                                                            bare),
                                 lambda: count_lines(MS_TIME_LINE_RE, batch) == batch.records)
        out.append(b"")
        converted = b"\n".join(out)
        json_batch = RecordBatch([converted], None, len(converted), batch.records, batch.digest)
        json_batch.events = events
        return StreamRecords(stream, version, json_batch, unconverted,
                             json_event_time(json_batch.first_line(), json_batch.last_line()),
                             lambda: not unconverted
                             and (identified or json_records_are_unique(json_batch)))

    def _convert_each(self, lines: List[bytes], bare: Optional[StructuredConverter] = None
                      ) -> Tuple[List[bytes], int]:
        """Converts line by line, each with the definition of its own stream and version (`bare`'s,
        for lines without a stream ID), escaping where needed; returns (the lines, those that do
        not fit kept as they are; how many did not fit)."""
        out: List[bytes] = []
        unconverted = 0
        for line in lines:
            head = STRUCTURED_HEAD_RE.match(line)
            converter = bare or (self.converter(head.group(4).decode("ascii"),
                                                head.group(1).decode("ascii")) if head else None)
            json_line = None
            if (converter is not None and head is not None
                    and head.group(2) == converter.definition.delimiter):
                values = line.split(head.group(2))
                json_line = (converter.convert_escaping(values, bare is not None)
                             if JSON_UNSAFE_RE.search(line)
                             else converter.convert(values, bare is not None))
            if json_line is None:
                unconverted += 1
                json_line = line
            out.append(json_line)
        return out, unconverted


class BatchRefused(Exception):
    """Checking a batch failed because of what it holds (for example, records nested deeper than
    can be read): that push alone is answered 400."""


def stream_of(first: Optional[bytes], last: Optional[bytes]) -> str:
    """The stream of a push whose first and last records name these stream IDs (None: no ID; else
    what a stream ID pattern matched, 1 to 12 digits); an ID that is not one as the receiver
    writes it (000061234, 0) counts as no ID, so that no stream gets a second folder under another
    name."""
    if first is not None and first[:1] == b"0":
        first = None
    if last is not None and last[:1] == b"0":
        last = None
    if first is None and last is None:
        return UNKNOWN_STREAM
    return first.decode("ascii") if first == last and first is not None else MIXED_STREAM


def not_stream_ids(*found: Optional[bytes]) -> bool:
    """Whether any of the stream IDs records name is not one (leading zeros, 0).  The values are
    what a stream ID pattern matched (1 to 12 digits): only a leading 0 makes one odd."""
    for value in found:
        if value is not None and value[:1] == b"0":
            return True
    return False


def lines_headed_alike(data: bytes, head: re.Match[bytes]) -> int:
    """How many lines of `data` start with the version and stream ID of `head` (the first line's),
    laid out the same way (isMidgress in second place or not, whatever its value)."""
    if head.group(3) is None:
        return data.count(b"\n" + head.group(0)) + 1
    version, delimiter, stream = head.group(1, 2, 4)
    pattern = rb"(?m)^%s%s[012]%s%s%s" % (version, delimiter, delimiter, stream, delimiter)
    return len(re.findall(pattern, data))


def count_lines(pattern: re.Pattern[bytes], batch: RecordBatch) -> int:
    """How many records match `pattern` (a multi-line pattern matching once per record at most)."""
    data = batch.joined()
    return len(pattern.findall(data)) if data is not None else -1


def json_records_are_unique(batch: RecordBatch) -> bool:
    """Whether every JSON record carries a reqId, or else a reqTimeSec with milliseconds, or (a
    security event) an httpMessage.requestId."""
    if batch.count(b'"reqId":"') == batch.records:
        return True
    if batch.count(b'"requestId":') == batch.records and all_events_identified(batch):
        return True
    return count_lines(JSON_MS_TIME_LINE_RE, batch) == batch.records


def all_events_identified(batch: RecordBatch) -> bool:
    """Whether every record is a security event naming its request: httpMessage.requestId."""
    data = batch.joined()
    if data is None:
        return False  # spooled: far larger than DataStream sends; never taken for a retry
    for line in data.split(b"\n")[:-1]:
        try:
            message = json.loads(line).get("httpMessage")
        except (ValueError, AttributeError):
            return False
        except RecursionError:
            raise BatchRefused("a record nests too deeply to be read") from None
        if not isinstance(message, dict) or not message.get("requestId"):
            return False
    return True


def event_time_seconds(value: Union[str, bytes]) -> Optional[float]:
    """A Unix time in seconds from a record's time value: seconds (1764255600 or
    1764255600.507), or an EdgeWorkers log's milliseconds, microseconds or nanoseconds (told by
    their digit count); None when it is not a time."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    whole, dot, fraction = text.partition(".")
    if (not whole.isdigit() or not 9 <= len(whole) <= 19
            or dot and not (fraction.isdigit() and len(fraction) <= 9)):
        return None
    if len(whole) <= 11:  # seconds, until the year 5138
        return float(text)
    # 12-14 digits are milliseconds, 15-17 microseconds, 18-19 nanoseconds; int / int rounds once.
    scale = int(10 ** ((len(whole) - 9) // 3 * 3))
    return int(whole) / scale + (int(fraction) / 10 ** len(fraction) / scale if fraction else 0.0)


def matched_seconds(value: bytes) -> Optional[float]:
    """event_time_seconds() of a value RECORD_TIME_RES matched (digits, perhaps a fraction): seconds
    without a second look, on every push."""
    dot = value.find(b".")
    whole = len(value) if dot < 0 else dot
    return float(value) if whole <= 11 else event_time_seconds(value)


def json_event_time(first: bytes, last: bytes) -> Optional[float]:
    """The newer event time of two JSON records: the first of EVENT_TIME_KEYS each holds."""
    newest: Optional[float] = None
    for record in (first, last) if first is not last else (first,):
        for pattern in RECORD_TIME_RES:
            found = pattern.search(record)
            if found:
                seconds = matched_seconds(found.group(1))
                if seconds is not None and (newest is None or seconds > newest):
                    newest = seconds
                break
    return newest


def is_delivery_metadata(line: bytes) -> bool:
    """Tells a security delivery's metadata object ({"total", "offset", "limit"}) from an event."""
    if len(line) > DELIVERY_METADATA_MAX:
        return False
    try:
        document = json.loads(line)
    except ValueError:
        return False
    return isinstance(document, dict) and set(document) == DELIVERY_METADATA_KEYS


def without_last_record(batch: RecordBatch, size: int) -> RecordBatch:
    """The batch without its last record, `size` bytes with its LF (a new batch: the pushed gzip
    bytes no longer decode to it)."""
    kept = max(0, batch.size - size)
    data = batch.joined()
    if data is None and batch.spool is not None:
        batch.spool.truncate(kept)
        return RecordBatch([], batch.spool, kept, batch.records - 1, batch.digest)
    return RecordBatch([data[:kept]] if data else [], None, kept, batch.records - 1,
                       batch.digest)


def times_range(found: Sequence[bytes]) -> Tuple[float, float]:
    """The earliest and latest of time values of one log type (one unit), in seconds."""
    if not found:
        return NO_EVENTS
    # Times written with as many whole digits (one unit, as Akamai writes them) sort as bytes in
    # their numeric order: 5x cheaper than float() on each.
    earliest, latest = min(found), max(found)
    if len(earliest.split(b".")[0]) != len(latest.split(b".")[0]):
        earliest, latest = min(found, key=float), max(found, key=float)
    first, last = matched_seconds(earliest), matched_seconds(latest)
    return (first, last) if first is not None and last is not None else NO_EVENTS


def collected_range(values: Sequence[bytes]) -> Optional[Tuple[float, float]]:
    """The earliest and latest of time values each read at its known place in a record (converted
    STRUCTURED lines, one unit), as read_back() would find them in the JSON records made of them;
    None when the edges alone cannot tell (a '-' or broken value, units mixed): those records are
    read back when their file is sealed."""
    if not values:
        return NO_EVENTS
    earliest, latest = min(values), max(values)
    first, last = event_time_seconds(earliest), event_time_seconds(latest)
    if first is None or last is None or len(earliest.split(b".")[0]) != len(latest.split(b".")[0]):
        return None
    return first, last


# ---------------------------------------------------------------------------
# Unified Log Streamer
# ---------------------------------------------------------------------------
# A push from Akamai's Unified Log Streamer (ULS: the forwarder of EAA, SIA/ETP, Guardicore, Linode
# and Control Center logs, github.com/akamai/uls), whose HTTP output wraps its events in envelopes:
# each event becomes one record, as sent, with its time where its product's is certain.

# Every ULS request says so (its global_config.py: "Akamai Unified Log Streamer/<version>");
# DataStream never does, so no DataStream push is ever read as an envelope.
ULS_USER_AGENT = "Akamai Unified Log Streamer/"
# The stream of ULS records: their row in the ledger, metrics and status page; their folder is
# [ROUTE/]source=uls (see Layout.folder).
ULS_STREAM = "uls"
ULS_FOLDER = "source=" + ULS_STREAM
# The body of ULS's liveness probe, OPTIONS at connect and after any network error.
ULS_PROBE = b'{"event":"connection test"}'
# A larger body, decoded, is stored as sent: ULS sends at most 500 events a push.
ULS_MAX_BODY = 64 << 20
# The one envelope read: ULS's default --httpformat '{"event": %s}' (Splunk HEC's event envelope
# too), holding an array of events (json-list: group 1 is '' or, for an empty one, ']') or one
# event (single-event: group 1 is None, the event starts at the end of the match).
ULS_ENVELOPE_RE = re.compile(r'[ \t\r\n]*\{[ \t\r\n]*"event"[ \t\r\n]*:[ \t\r\n]*'
                             r'(?:\[[ \t\r\n]*(\]?)|(?=\{))')
ULS_ENVELOPE_END_RE = re.compile(r"[ \t\r\n]*\}[ \t\r\n]*")
JSON_SEPARATOR_RE = re.compile(r"[ \t\r\n]*([,\]])[ \t\r\n]*")
# Reads one JSON value where it starts and says where it ends: the span of an event as written.
JSON_DECODER = json.JSONDecoder()
# An ISO 8601 time that names its offset: 2021-07-27T18:20:14+00:00, 2020-05-26T06:34:53.676Z.
ZONED_TIME_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                           r"(\.[0-9]{1,9})?(?:Z|([+-])([0-9]{2}):?([0-9]{2}))")
# Each product's events, told by keys that only they carry together, and where their time is (a
# dotted path), from ULS's docs/LOG_OVERVIEW.md.  A time counts only when it is certain: an epoch
# number, or an ISO 8601 time that names its offset (EAA admin and Linode audit samples name none).
ULS_EVENT_TIMES: Tuple[Tuple[FrozenSet[str], str], ...] = (
    (frozenset(("apphost", "url_path", "http_method")), "datetime"),  # EAA access
    (frozenset(("resource_type", "resource", "event_type")), "datetime"),  # EAA admin
    (frozenset(("connector_uuid", "dialout_total")), "datetime"),  # EAA connector health
    (frozenset(("dir_id", "directory_status")), "datetime"),  # EAA directory health
    (frozenset(("configId", "query")), "query.time"),  # SIA threat, AUP, DNS
    (frozenset(("isEvent", "request")), "request.startTime"),  # SIA proxy
    (frozenset(("connectionId", "connStartTime")), "connStartTime"),  # SIA netcon
    (frozenset(("incident_type", "start_time")), "start_time"),  # Guardicore incident
    (frozenset(("report_time", "aggregated")), "report_time"),  # Guardicore agent
    (frozenset(("doc_version", "remote_addr", "time")), "time"),  # Guardicore audit
    (frozenset(("action", "entity", "created")), "created"),  # Linode audit
    (frozenset(("account", "linode", "time")), "time"),  # Linode utilization
    (frozenset(("eventId", "eventType", "eventTime")), "eventTime"),  # Control Center events
)


def read_event(text: str, position: int, events: List[Tuple[str, Any]]) -> int:
    """Adds the JSON object at text[position] to `events`, as it is written and as it reads;
    returns where it ends, -1 when no JSON object starts there."""
    if text[position:position + 1] != "{":
        return -1
    try:
        event, end = JSON_DECODER.raw_decode(text, position)
    except (ValueError, RecursionError):
        return -1
    events.append((text[position:end], event))
    return int(end)


def read_events(text: str, position: int, events: List[Tuple[str, Any]]) -> int:
    """Adds each JSON object of a JSON array to `events`, the first starting at text[position];
    returns where the array ends, -1 when it is not an array of objects."""
    while True:
        end = read_event(text, position, events)
        separator = JSON_SEPARATOR_RE.match(text, end) if end >= 0 else None
        if separator is None:
            return -1
        if separator.group(1) == "]":
            return separator.end(1)
        position = separator.end()


def envelope_events(text: str) -> Optional[List[Tuple[str, Any]]]:
    """The events of a body of envelopes, each as it is written and as it reads: one or more
    {"event": [...]} or {"event": {...}}, whitespace or nothing between them, every event a JSON
    object; None when the body is anything else (so a record that merely has a key "event" among
    others is never one)."""
    events: List[Tuple[str, Any]] = []
    position = 0
    while position < len(text):
        head = ULS_ENVELOPE_RE.match(text, position)
        if head is None:
            return None
        if head.group(1) is None:
            end = read_event(text, head.end(), events)
        else:
            end = head.end() if head.group(1) else read_events(text, head.end(), events)
        tail = ULS_ENVELOPE_END_RE.match(text, end) if end >= 0 else None
        if tail is None:
            return None
        position = tail.end()
    return events


def zoned_time(text: str) -> Optional[float]:
    """The Unix time of an ISO 8601 time that names its offset; None for any other text."""
    found = ZONED_TIME_RE.fullmatch(text)
    if found is None:
        return None
    year, month, day, hour, minute, second = (int(value) for value in found.group(1, 2, 3, 4, 5, 6))
    try:
        moment = datetime.datetime(year, month, day, hour, minute, second,
                                   tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None
    sign, hours, minutes = found.group(8, 9, 10)
    offset = (int(hours) * 3600 + int(minutes) * 60) * (-1 if sign == "-" else 1) if sign else 0
    return moment - offset + float("0" + (found.group(7) or ""))


def uls_event_time(event: Dict[str, Any]) -> Optional[float]:
    """When a ULS event happened, read where its product puts it (see ULS_EVENT_TIMES); None when
    its product or its time is not certain."""
    for keys, path in ULS_EVENT_TIMES:
        if keys.issubset(event):
            value: Any = event
            for name in path.split("."):
                value = value.get(name) if isinstance(value, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return event_time_seconds(str(value))
            if isinstance(value, str):
                return zoned_time(value) if "-" in value else event_time_seconds(value)
            return None
    return None


def compact_json(value: object) -> bytes:
    """`value` as one line of compact JSON in UTF-8 (all escaped if a lone surrogate, which UTF-8
    cannot hold, is in it)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def open_envelopes(batch: RecordBatch) -> Optional[RecordBatch]:
    """The records of a ULS push whose body is envelopes (see envelope_events): one per event, each
    event's JSON as sent (compacted only when it spans lines), with their event range (NO_EVENTS
    when no time is certain) and, when the push has one, a digest of their own; None when the body
    is anything else, or larger than ULS_MAX_BODY."""
    if batch.size > ULS_MAX_BODY:
        return None
    try:
        # Decoded and encoded again, UTF-8 gives back the bytes as sent.
        found = envelope_events(batch.contents().decode("utf-8"))
    except UnicodeDecodeError:
        return None
    if found is None:
        return None
    lines: List[bytes] = []
    times: List[float] = []
    for written, event in found:
        lines.append(compact_json(event) if "\n" in written else written.encode("utf-8"))
        seconds = uls_event_time(event)
        if seconds is not None:
            times.append(seconds)
    records = b"".join(line + b"\n" for line in lines)
    events = RecordBatch([records], None, len(records), len(lines),
                         hashlib.sha256(records).digest() if batch.digest is not None else None)
    events.events = (min(times), max(times)) if times else NO_EVENTS
    return events


# ---------------------------------------------------------------------------
# Commit protocols
# ---------------------------------------------------------------------------
# The three protocols a push's batch follows from the queue to the disk, as state tables: the code
# that follows them (DedupeMemory, Supervisor, SupervisorClient, DataFile) makes every move through
# advance(), so a move the table does not allow raises instead of corrupting anything.  A walk of
# one batch: its push queues it in its DataFile (LEAD), the leader claims the group's dedupe keys
# in one call (CLAIM: in a worker, a round trip to the supervisor, which holds every worker's
# claims), decides each batch from its claim (BATCH), writes and fdatasyncs the batches that are to
# be written, commits or releases their claims, wakes each push once, and hands the lead on.

class ProtocolError(Exception):
    """A move that a protocol's table does not allow: a bug, never a client's doing."""


class ProtocolEnum(enum.Enum):
    """The states or events of a protocol: hashed by identity (members are singletons), since the
    tables are looked up several times a push and Enum's own hash runs Python code."""

    __hash__ = object.__hash__


S = TypeVar("S", bound=ProtocolEnum)
E = TypeVar("E", bound=ProtocolEnum)


def advance(table: Dict[Tuple[Optional[S], E], S], state: Optional[S], event: E) -> S:
    """The state `event` moves `state` to (None: before the first move), by the table."""
    try:
        return table[(state, event)]
    except KeyError:
        raise ProtocolError("%s does not follow %s" % (event, state)) from None


class ClaimState(ProtocolEnum):
    """Where one request's claim of a batch's dedupe key stands."""

    # The request stores the batch; nobody else does until it commits or releases the claim.
    GRANTED = "granted"
    # The batch is durable already (stored within the window): answered 200, nothing written.
    DUPLICATE = "duplicate"
    # Another request stores it now: this one holds nothing and waits for that one's outcome.
    WAITING = "waiting"
    # The batch is durable: any later claim of the key is DUPLICATE, for the dedupe window.
    COMMITTED = "committed"
    # Storing failed: the next waiter, or DataStream's retry, is GRANTED.
    RELEASED = "released"


class ClaimEvent(ProtocolEnum):
    """What moves a claim."""

    KEY_FREE = "claimed, the key neither held nor stored"
    KEY_STORED = "claimed, the key stored within the window"
    KEY_HELD = "claimed, the key held by another request"
    HOLDER_COMMITTED = "the holder's batch is durable"
    HOLDER_RELEASED = "the holder gave its claim up"
    BATCH_DURABLE = "this batch is durable"
    BATCH_FAILED = "this batch could not be stored"


CLAIM_PROTOCOL: Dict[Tuple[Optional[ClaimState], ClaimEvent], ClaimState] = {
    (None, ClaimEvent.KEY_FREE): ClaimState.GRANTED,
    (None, ClaimEvent.KEY_STORED): ClaimState.DUPLICATE,
    (None, ClaimEvent.KEY_HELD): ClaimState.WAITING,
    (ClaimState.WAITING, ClaimEvent.HOLDER_COMMITTED): ClaimState.DUPLICATE,
    # One waiter is granted the claim; the others keep waiting, now for that one.
    (ClaimState.WAITING, ClaimEvent.HOLDER_RELEASED): ClaimState.GRANTED,
    (ClaimState.WAITING, ClaimEvent.KEY_HELD): ClaimState.WAITING,
    (ClaimState.GRANTED, ClaimEvent.BATCH_DURABLE): ClaimState.COMMITTED,
    (ClaimState.GRANTED, ClaimEvent.BATCH_FAILED): ClaimState.RELEASED,
}


class Stored(ProtocolEnum):
    """What a group commit does with one queued batch."""

    QUEUED = "queued"
    # To be written: with its digest (its claim is granted, or it has no key), or without one
    # (KEPT: it matched a stored batch but may be genuine, see Storage.store).
    WRITING = "writing"
    WRITING_KEPT = "writing a kept duplicate"
    # Final states: the push is woken with one of these.
    WRITTEN = "written"
    KEPT_DUPLICATE = "kept duplicate"
    # A retry of a batch stored within the dedupe window: not written again.
    DUPLICATE = "duplicate"
    # Another request stores the same batch now: not written; the push waits on its claim, then
    # queues the batch again with the outcome.
    DEFERRED = "deferred"
    # Deciding it failed because of what it holds (see BatchRefused): refused alone, nothing of
    # it written, its group unharmed.
    REFUSED = "refused"
    # Writing or syncing the group failed: nothing of it is left behind; the claims are released.
    FAILED = "failed"


class BatchEvent(ProtocolEnum):
    """What moves a queued batch."""

    NO_KEY = "it is not deduplicated"
    CLAIM_GRANTED = "its claim is granted"
    CLAIM_DUPLICATE_RETRY = "its claim says stored, and every record names its request"
    CLAIM_DUPLICATE_MAYBE = "its claim says stored, but it may be genuine"
    CLAIM_WAITING = "its claim waits, or a copy's in the same group does"
    CHECK_FAILED = "checking it raised"
    GROUP_DURABLE = "the group is written and synced"
    GROUP_FAILED = "writing or syncing the group failed"


BATCH_PROTOCOL: Dict[Tuple[Optional[Stored], BatchEvent], Stored] = {
    (Stored.QUEUED, BatchEvent.NO_KEY): Stored.WRITING,
    (Stored.QUEUED, BatchEvent.CLAIM_GRANTED): Stored.WRITING,
    (Stored.QUEUED, BatchEvent.CLAIM_DUPLICATE_RETRY): Stored.DUPLICATE,
    (Stored.QUEUED, BatchEvent.CLAIM_DUPLICATE_MAYBE): Stored.WRITING_KEPT,
    (Stored.QUEUED, BatchEvent.CLAIM_WAITING): Stored.DEFERRED,
    (Stored.QUEUED, BatchEvent.CHECK_FAILED): Stored.REFUSED,
    (Stored.WRITING, BatchEvent.GROUP_DURABLE): Stored.WRITTEN,
    (Stored.WRITING_KEPT, BatchEvent.GROUP_DURABLE): Stored.KEPT_DUPLICATE,
    (Stored.WRITING, BatchEvent.GROUP_FAILED): Stored.FAILED,
    (Stored.WRITING_KEPT, BatchEvent.GROUP_FAILED): Stored.FAILED,
}


class Lead(ProtocolEnum):
    """Whether a DataFile has a push committing its queue (the leader)."""

    IDLE = "idle"
    LEADING = "leading"


class LeadEvent(ProtocolEnum):
    """What moves a DataFile's lead."""

    # The push that queued finds nobody committing: it leads; else it waits to be woken.
    QUEUED = "a push queued its batch"
    # The leader woke its group: it hands the lead to the first push queued meanwhile, if any.
    HANDED_ON = "the group was woken, and pushes queued meanwhile"
    DONE = "the group was woken, and nobody queued meanwhile"


LEAD_PROTOCOL: Dict[Tuple[Optional[Lead], LeadEvent], Lead] = {
    (Lead.IDLE, LeadEvent.QUEUED): Lead.LEADING,
    (Lead.LEADING, LeadEvent.QUEUED): Lead.LEADING,
    (Lead.LEADING, LeadEvent.HANDED_ON): Lead.LEADING,
    (Lead.LEADING, LeadEvent.DONE): Lead.IDLE,
}


# ---------------------------------------------------------------------------
# Retry dedup
# ---------------------------------------------------------------------------

def dedupe_key(folder: str, digest: bytes) -> str:
    """Identifies a batch for retry dedup: its folder ('' for the root) and the SHA-256 of its
    records."""
    return (folder or "-") + "/" + digest.hex()


class SupervisorGone(Exception):
    """The supervisor process, which keeps the workers' shared dedupe window and metrics, cannot be
    reached."""


class ClaimTicket:
    """One request's claim of a batch's dedupe key, GRANTED, DUPLICATE or WAITING (see
    CLAIM_PROTOCOL); a WAITING one learns the holder's outcome from outcome()."""

    __slots__ = ("state", "wait")

    def __init__(self, state: ClaimState, wait: Callable[[], ClaimState]) -> None:
        self.state = state
        self.wait = wait

    def outcome(self) -> ClaimState:
        """GRANTED or DUPLICATE: the state, or, while WAITING, the one the holder's outcome moves
        it to (waiting for that)."""
        return self.wait() if self.state is ClaimState.WAITING else self.state


class DedupeClaims(Protocol):
    """The retry dedup window as the writers see it: claims of the batches being stored, and the
    batches stored recently, so a batch re-sent within the window is stored once.  Kept in memory
    (DedupeMemory), by one process or by the supervisor for every worker (SupervisorClient); what
    refills it at start are the batch indexes, files (see IndexEntry).

    A commit claims its batches' keys before writing them, then commits
    them once stored or releases them when storing failed (CLAIM_PROTOCOL).
    A claim of a key that another request holds is answered at once,
    WAITING, with a ticket to wait on, so that nothing waits while holding
    claims of its own.
    """

    def claim_all(self, keys: Sequence[str]) -> List[ClaimTicket]:
        """Claims distinct keys; may raise SupervisorGone."""

    def commit_all(self, stored: Sequence[Tuple[str, float]]) -> None:
        """Records that the claimed batches are stored: (key, time stored)."""

    def release_all(self, keys: Sequence[str]) -> None:
        """Gives up claims whose batches could not be stored, letting a retry store them."""


# What a waiting request's claim finds once woken, as the event it is for that claim.
WAITER_EVENTS = {ClaimEvent.KEY_STORED: ClaimEvent.HOLDER_COMMITTED,
                 ClaimEvent.KEY_FREE: ClaimEvent.HOLDER_RELEASED,
                 ClaimEvent.KEY_HELD: ClaimEvent.KEY_HELD}


class DedupeMemory:
    """The DedupeClaims kept in one process's memory: digests of the batches stored within the
    window, and the claims held now.

    It lives in memory; at start it is filled again from the batch indexes,
    which are synced with the records they describe, so a batch counts as
    stored exactly when its records survived.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.pending: Set[str] = set()
        self.state = threading.Condition()

    def load(self, entries: Iterable[Tuple[float, str]]) -> None:
        """Remembers (time stored, key) entries that are still inside the window, oldest first."""
        cutoff = self.clock() - self.window
        with self.state:
            for stored_at, key in sorted(entries):
                if stored_at >= cutoff:
                    self.seen[key] = stored_at
                    self.seen.move_to_end(key)

    def claim_event(self, key: str) -> ClaimEvent:
        """What a claim of `key` finds now (call with the lock); a free key becomes held."""
        if key in self.pending:
            return ClaimEvent.KEY_HELD
        cutoff = self.clock() - self.window
        while self.seen and next(iter(self.seen.values())) < cutoff:
            self.seen.popitem(last=False)
        if key in self.seen:
            return ClaimEvent.KEY_STORED
        self.pending.add(key)
        return ClaimEvent.KEY_FREE

    def try_claim(self, key: str) -> ClaimState:
        """Claims `key` at once: GRANTED, DUPLICATE, or WAITING while another request holds it."""
        return advance(CLAIM_PROTOCOL, None, self.claim_event(key))

    def claim_again(self, key: str) -> ClaimState:
        """Claims `key` for a WAITING request, now that its holder committed or released it: the
        claim's next state (WAITING when another waiter was granted it first)."""
        event = WAITER_EVENTS[self.claim_event(key)]
        return advance(CLAIM_PROTOCOL, ClaimState.WAITING, event)

    def claim(self, key: str) -> ClaimState:
        """Claims `key`, waiting while another request holds it: GRANTED or DUPLICATE."""
        with self.state:
            state = self.try_claim(key)
        return self.wait_for_holder(key) if state is ClaimState.WAITING else state

    def claim_all(self, keys: Sequence[str]) -> List[ClaimTicket]:
        """DedupeClaims.claim_all(): a key being stored by another request gets a ticket that
        waits (see claim)."""
        with self.state:
            states = [self.try_claim(key) for key in keys]
        return [ClaimTicket(state, functools.partial(self.wait_for_holder, key))
                for key, state in zip(keys, states)]

    def wait_for_holder(self, key: str) -> ClaimState:
        """The outcome of a WAITING claim: GRANTED or DUPLICATE, once the holder (or the waiter
        granted it before this one) has committed or released the key."""
        with self.state:
            state = self.claim_again(key)
            while state is ClaimState.WAITING:
                self.state.wait()
                state = self.claim_again(key)
            return state

    def commit_all(self, stored: Sequence[Tuple[str, float]]) -> None:
        """DedupeClaims.commit_all()."""
        for key, stored_at in stored:
            self.commit(key, stored_at)

    def release_all(self, keys: Sequence[str]) -> None:
        """DedupeClaims.release_all()."""
        for key in keys:
            self.release(key)

    def commit(self, key: str, stored_at: float) -> None:
        """Records that the claimed batch is stored."""
        with self.state:
            self.pending.discard(key)
            self.seen[key] = stored_at
            self.seen.move_to_end(key)
            self.state.notify_all()

    def release(self, key: str) -> None:
        """Gives up a claim whose batch could not be stored, letting a retry store it."""
        with self.state:
            self.pending.discard(key)
            self.state.notify_all()


# ---------------------------------------------------------------------------
# Storage: layout
# ---------------------------------------------------------------------------
# Every name under the output folder.

MAX_FOLDER_NAME = 100
SAFE_FOLDER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,%d}" % (MAX_FOLDER_NAME - 1))


class StorageError(Exception):
    """Records could not be stored now; nothing of them is left behind, and a retry may succeed."""


def glob_escape(name: str) -> str:
    """`name` with glob's special characters matched as themselves."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def fsync_directory(path: Path) -> None:
    """Makes changes to the entries of directory `path` durable."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file (see open_regular)."""
    with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:
        return handle.read()


class NotRegularFile(OSError):
    """A FIFO, device, folder or symbolic link stands where a data file or index belongs."""


def open_regular(path: Path, flags: int, mode: int = DEFAULT_FILE_MODE) -> int:
    """Opens `path` only if it is a regular file (created with `mode` when `flags` say so),
    following no symbolic link; a FIFO or device is never opened, so nothing can block on it or
    set off what opening a device does.  Raises NotRegularFile, or the OSError of the open."""
    try:
        facts = os.lstat(str(path))
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(facts.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    try:
        # O_NONBLOCK: should a FIFO take the file's place between the two looks, the open
        # returns at once (it changes nothing for a regular file).
        fd = os.open(str(path), flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def folder_for_path(url_path: str) -> str:
    """Maps any URL path to one safe folder name (SAFE_FOLDER_RE): %-decoded, its letters, digits,
    '.', '_' and '-' kept, every run of other characters (a '/' inside included) made one '_', a
    '_' put before a leading '.' or '-', '_root' for '/', and past 100 characters cut, with 16 hex
    digits of its SHA-256."""
    decoded = urllib.parse.unquote(url_path, errors="replace")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", decoded.strip("/")) or "_root"
    if name[:1] in (".", "-"):
        name = "_" + name
    if len(name) > MAX_FOLDER_NAME:
        digest = hashlib.sha256(decoded.encode("utf-8", "replace")).hexdigest()
        name = name[:MAX_FOLDER_NAME - 17] + "-" + digest[:16]
    return name


# A batch index is INDEX_HEADER, then one BATCH_ENTRY per stored batch (see IndexEntry).  Older
# indexes are read as they are: format 3 (V3_INDEX_HEADER: the same entries, streams coded as
# V3_STREAM_NAMES), format 2 (V2_INDEX_HEADER, V2_BATCH_ENTRY: no event times either), and
# dsreceiver 0.1's (no header, V1_BATCH_ENTRY: no records or stream either), which is rewritten at
# start with its batches' records counted (upgrade_index).  Nothing is appended to an index a
# process did not create (see Storage), so no index ever mixes formats.
INDEX_HEADER = b"dsreceiver batch index 4\n".ljust(64, b"\0")
BATCH_ENTRY = struct.Struct("<Qd32sQQdd")
V3_INDEX_HEADER = b"dsreceiver batch index 3\n".ljust(64, b"\0")
V2_INDEX_HEADER = b"dsreceiver batch index 2\n".ljust(64, b"\0")
V2_BATCH_ENTRY = struct.Struct("<Qd32sQQ")
V1_BATCH_ENTRY = struct.Struct("<Qd32s")
NO_DIGEST = bytes(32)
# The records of an entry that vouches for bytes it did not count (an index started afresh).
UNCOUNTED = (1 << 64) - 1
# An entry's stream: the stream ID, or the code of a stream that is none, far above any stream ID
# (at most 12 digits), so that no stream ID, 1 and 2 included, is ever read as another stream.
STREAM_CODES = {UNKNOWN_STREAM: (1 << 64) - 1, MIXED_STREAM: (1 << 64) - 2,
                ULS_STREAM: (1 << 64) - 3}
STREAM_NAMES = {code: name for name, code in STREAM_CODES.items()}
# Formats 2 and 3 coded 'unknown' as 0 and 'mixed' as 1, which stream 1's entries read as too (see
# fold_index, which tells them apart by their folder).
V3_STREAM_NAMES = {0: UNKNOWN_STREAM, 1: MIXED_STREAM}
# Each format with a header: (header, entry, stream names).
INDEX_FORMATS = ((INDEX_HEADER, BATCH_ENTRY, STREAM_NAMES),
                 (V3_INDEX_HEADER, BATCH_ENTRY, V3_STREAM_NAMES),
                 (V2_INDEX_HEADER, V2_BATCH_ENTRY, V3_STREAM_NAMES))


class IndexEntry(NamedTuple):
    """One batch in a batch index: what the ledger counts and recovery and dedup trust."""

    # Where the batch ends in its data file.
    end: int
    # When it was stored (Unix seconds).
    stamp: float
    # SHA-256 of its records, NO_DIGEST when it vouches for no other batch.
    digest: bytes = NO_DIGEST
    stream: str = UNKNOWN_STREAM
    records: int = UNCOUNTED
    # The earliest and latest event times of its records (Unix seconds; see read_back), so that
    # sealing reads them here instead of in the records; NaN when not known (learnt only when
    # STRUCTURED records are converted, or an older format).
    first_event: float = math.nan
    last_event: float = math.nan

    def pack(self, end: Optional[int] = None) -> bytes:
        """The entry as BATCH_ENTRY bytes (its batch ending at `end` when given)."""
        code = STREAM_CODES.get(self.stream)
        return BATCH_ENTRY.pack(self.end if end is None else end, self.stamp, self.digest,
                                int(self.stream) if code is None else code, self.records,
                                self.first_event, self.last_event)


def index_format(raw: bytes) -> Tuple[int, int]:
    """The header length and entry size of a batch index's bytes, in any format."""
    for header, entry, _ in INDEX_FORMATS:
        if raw.startswith(header):
            return len(header), entry.size
    return 0, V1_BATCH_ENTRY.size


def read_index(raw: bytes) -> List[IndexEntry]:
    """The complete entries of a batch index's bytes, in any format (a torn last entry is
    left out)."""
    for header, entry, names in INDEX_FORMATS:
        if raw.startswith(header):
            body = raw[len(header):]
            return [IndexEntry(fields[0], fields[1], fields[2],
                               names.get(fields[3], str(fields[3])), *fields[4:])
                    for fields in entry.iter_unpack(body[:len(body) - len(body) % entry.size])]
    whole = len(raw) - len(raw) % V1_BATCH_ENTRY.size
    return [IndexEntry(end, stamp, digest) for end, stamp, digest
            in V1_BATCH_ENTRY.iter_unpack(raw[:whole])]


def index_bytes(entries: Sequence[IndexEntry]) -> bytes:
    """A whole batch index holding `entries`."""
    return INDEX_HEADER + b"".join(entry.pack() for entry in entries)


def upgrade_index(index: Path, data_path: Path) -> None:
    """Rewrites a 0.1 batch index in the current format, atomically, counting its batches' records
    in the data file when it is there to count (the ledger counts only counted batches)."""
    try:
        raw = read_regular(index)
    except FileNotFoundError:
        return
    if not raw or index_format(raw)[0]:
        return
    entries = read_index(raw)
    if data_path.exists() and not data_path.name.endswith(".gz"):
        with data_path.open("rb") as data:
            start = 0
            for position, entry in enumerate(entries):
                if entry.end < start:
                    continue
                data.seek(start)
                entries[position] = entry._replace(records=data.read(entry.end - start).count(
                    b"\n"))
                start = entry.end
    temp = index.with_name(index.name + ".tmp")
    try:
        temp.unlink()  # a crash's
    except FileNotFoundError:
        pass
    fd = os.open(str(temp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 index.stat().st_mode & 0o777)
    try:
        write_all(fd, [index_bytes(entries)])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(str(temp), str(index))
    fsync_directory(index.parent)
    log.info("upgraded batch index %s to format 4 (%d batches)", index, len(entries))


class DataName(NamedTuple):
    """What a data file's name says, e.g. 2026-11-27T15Z.w1.2.log.gz, or 2026-11-27.log.1 for a
    file logrotate moved or copied (its suffix in `rotated`)."""

    period: str
    tag: str
    sequence: int
    compressed: bool
    rotated: str = ""


class Layout:
    """Every name under --output-dir, and the one parser of them.

    OUTPUT_DIR/[FOLDER/]PERIOD[TAG][.N].log[.gz]   records: PERIOD is the UTC hour
                                                   (2026-11-27T15Z) or day, TAG a worker's (.w1),
                                                   N the file number within the period
    .dsreceiver/batches/FOLDER/NAME.idx            the batch index of data file NAME
                                                   ('-' for no FOLDER)
    .dsreceiver/batches/FOLDER/NAME.moved-T.idx    an index SIGHUP set aside when logrotate moved
                                                   NAME
    .dsreceiver/partial/, .dsreceiver/torn/        bytes that recovery cut from data files
    .dsreceiver/foreign/                           a .gz beside a data file that was not its copy
    .dsreceiver/spool/                             large decoded bodies (unlinked temporary files)
    .dsreceiver/runs/RUN.lock, RUN.files           a process's lock, held while it lives, and its
                                                   journal: the data files it may write or has yet
                                                   to finish (see RunJournal)
    .dsreceiver/sealed/DAY[TAG].list               the files a process sealed on a UTC day, one
                                                   relative path a line: for retention and shipping
    .dsreceiver/listed                             says every unfinished file is in a journal and
                                                   every sealed one in a list (an earlier version's
                                                   folder gets it once walked: see Housekeeper)
    .dsreceiver/ledger/FOLDER/NAME.json            the ledger rows of a pruned batch index
    .dsreceiver/answers/DAY[TAG].jsonl             a process's ledger counts of answers that stored
                                                   nothing (retries, refusals), by UTC day
    .dsreceiver/reconciled.json                    the last reconcile's verdicts (status page)
    OUTPUT_DIR/[FOLDER/].NAME.gz.tmp               a compression under way
    OUTPUT_DIR/[FOLDER/].NAME.sealed.json          the manifest of finished data file NAME (.tmp:
                                                   being written)

    FOLDER is empty, or safe folder names: a --route-by-path folder, then stream=ID
    (--partition-by stream; ID is the stream's number, 'unknown' or 'mixed'), or source=uls for
    the records of Akamai's Unified Log Streamer, whatever --partition-by says.
    RUN is TAG.PID.STAMP: the worker's tag without its dot ('main' for a single
    process), its process ID and start time.
    Everything besides records is under the dot-path, so a consumer that reads
    every non-dot file sees only records.
    """

    STATE_DIR = ".dsreceiver"
    ROOT_FOLDER = "-"
    DATA_NAME_RE = re.compile(r"(\d{4}-\d\d-\d\d(?:T\d\dZ)?)((?:\.w\d+)?)(?:\.(\d+))?\.log(\.gz)?"
                              r"((?:\.[0-9]{1,4}|-[0-9]{8,10})(\.gz)?)?")
    INDEX_NAME_RE = re.compile(r"(.+?)(?:\.moved-\d+)?\.idx")
    ANSWERS_NAME_RE = re.compile(r"(\d{4}-\d\d-\d\d)(?:\.w\d+)?\.jsonl")
    RUN_NAME_RE = re.compile(r"(main|w\d+)\.\d+\.[0-9a-f]+")
    SEAL_LIST_RE = re.compile(r"(\d{4}-\d\d-\d\d)((?:\.w\d+)?)\.list")

    def __init__(self, root: Path, rotate: str = "hourly", tag: str = "", store_gzip: bool = False,
                 file_mode: int = DEFAULT_FILE_MODE) -> None:
        self.root = root
        self.rotate = rotate
        # The last period named: (its first second, the next period's, its name).
        self.period: Tuple[float, float, str] = (0.0, 0.0, "")
        self.tag = tag
        self.store_gzip = store_gzip
        self.file_mode = file_mode
        self.folder_mode = file_mode | (file_mode & 0o444) >> 2
        self.state_dir = root / self.STATE_DIR
        self.index_dir = self.state_dir / "batches"
        self.spool_dir = self.state_dir / "spool"
        self.ledger_dir = self.state_dir / "ledger"
        self.answers_dir = self.state_dir / "answers"
        self.runs_dir = self.state_dir / "runs"
        self.seal_lists_dir = self.state_dir / "sealed"
        self.listed_mark = self.state_dir / "listed"

    def for_worker(self, tag: str) -> Layout:
        """The same layout, naming its new files with a worker's tag."""
        return Layout(self.root, self.rotate, tag, self.store_gzip, self.file_mode)

    def create(self) -> None:
        """Creates the output folder and the server's own folders."""
        for folder in (self.root, self.state_dir, self.spool_dir, self.index_dir):
            self.make_folder(folder)

    # -- making files and folders ------------------------------------------------

    def make_folder(self, folder: Path) -> bool:
        """Creates `folder` and its missing parents with folder_mode (less what the umask takes
        away); returns whether it had to.  A folder under the output folder that is a symbolic
        link (dsreceiver makes none) is refused with OSError: nothing is written through one."""
        if folder != self.root and self.root in folder.parents:
            try:
                facts = os.lstat(str(folder))
            except FileNotFoundError:
                facts = None
            if facts is not None and stat.S_ISLNK(facts.st_mode):
                raise OSError(errno.ELOOP, "%s is a symbolic link: dsreceiver writes nothing"
                              " through one" % folder.relative_to(self.root))
            if facts is not None:
                self.make_folder(folder.parent)  # its parents are checked too
                return False
        elif folder.is_dir():
            return False
        self.make_folder(folder.parent)
        try:
            folder.mkdir(self.folder_mode)
        except FileExistsError:
            return False
        return True

    def create_file(self, path: Path, append: bool = False) -> IO[bytes]:
        """Creates (or, with `append`, opens for appending) `path` with file_mode, for writing; a
        symbolic link there is refused (ELOOP), never followed."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(str(path), flags | os.O_CLOEXEC | os.O_NOFOLLOW, self.file_mode)
        return os.fdopen(fd, "ab" if append else "wb")

    def create_new(self, path: Path) -> bool:
        """Creates the empty file `path`; False when something has that name already (another
        process took it first)."""
        try:
            os.close(os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, self.file_mode))
        except FileExistsError:
            return False
        return True

    # -- names ------------------------------------------------------------------

    def period_name(self, now: float) -> str:
        """Names the period of `now`: 2026-11-27T15Z (hourly) or 2026-11-27 (daily), in UTC."""
        first, after, name = self.period
        if first <= now < after:
            return name  # every push asks: strftime only when the period changes
        length = 3600 if self.rotate == "hourly" else 86400
        first = now - now % length  # Unix time has no leap seconds: UTC hours are whole 3600s
        name = time.strftime("%Y-%m-%dT%HZ" if self.rotate == "hourly" else "%Y-%m-%d",
                             time.gmtime(first))
        self.period = (first, first + length, name)
        return name

    def data_path(self, folder: str, period: str, sequence: int) -> Path:
        """Where this layout writes file number `sequence` of `period` in `folder` ('' for the
        root)."""
        self.check_folder(folder)
        number = ".%d" % sequence if sequence else ""
        name = period + self.tag + number + (".log.gz" if self.store_gzip else ".log")
        return self.root / folder / name if folder else self.root / name

    @classmethod
    def parse(cls, name: str) -> Optional[DataName]:
        """Reads a data file's name; None when it is not one."""
        match = cls.DATA_NAME_RE.fullmatch(name)
        if match is None:
            return None
        return DataName(match.group(1), match.group(2), int(match.group(3) or 0),
                        bool(match.group(4) or match.group(6)), match.group(5) or "")

    @staticmethod
    def folder(route: str, stream: Optional[str]) -> str:
        """The folder of a push: its --route-by-path folder, then its stream's (stream=ID,
        Hive-style; source=uls for ULS_STREAM), as used."""
        partition = ("" if stream is None else ULS_FOLDER if stream == ULS_STREAM
                     else "stream=" + stream)
        return "/".join(part for part in (route, partition) if part)

    @staticmethod
    def split_folder(folder: str) -> Tuple[str, Optional[str]]:
        """A folder's --route-by-path part, and the stream its last part names (None: none)."""
        route, _, last = folder.rpartition("/")
        if last == ULS_FOLDER:
            return route, ULS_STREAM
        if last.startswith("stream="):
            return route, last[len("stream="):]
        return folder, None

    @staticmethod
    def check_folder(folder: str) -> None:
        """Refuses a folder that is not made of safe names, so nothing lands outside the output
        folder."""
        if folder and not all(SAFE_FOLDER_RE.fullmatch(part) for part in folder.split("/")):
            raise ValueError("unsafe folder name %r" % folder)

    def folder_of(self, data_path: Path) -> str:
        """The folder of a data file, relative to the output folder ('' for the root)."""
        return data_path.parent.relative_to(self.root).as_posix().strip(".")

    def index_path(self, data_path: Path) -> Path:
        """Where the batch index of a data file lives."""
        folder = self.folder_of(data_path) or self.ROOT_FOLDER
        return self.index_dir / folder / (data_path.name + ".idx")

    def set_aside_index_path(self, data_path: Path) -> Path:
        """A new name for the index of a data file that logrotate moved, still read by dedup and
        recovery (see aside_index_name)."""
        return self.index_path(data_path).with_name(self.aside_index_name(data_path))

    @staticmethod
    def aside_index_name(data_path: Path) -> str:
        """A name, never taken before, for an index set aside for `data_path`: a file logrotate
        made of one of ours (NAME.log.1: logrotate gives that name to a newer file at its next
        run), or one of ours that it moved or deleted."""
        return "%s.moved-%d.idx" % (data_path.name, time.time_ns())

    def index_of(self, data_path: Path) -> Path:
        """The batch index of a data file, or of a file logrotate made of one (see
        rotated_index)."""
        name = self.parse(data_path.name)
        if name is not None and name.rotated:
            return self.rotated_index(data_path)
        return self.index_path(data_path)

    def rotated_index(self, data_path: Path) -> Path:
        """The index of a file logrotate made of one of ours: the newest set aside for its name
        (those of older files of that name are older); the usual name when there is none."""
        index = self.index_path(data_path)
        aside = sorted(index.parent.glob(glob_escape(data_path.name) + ".moved-*.idx"),
                       key=lambda path: int(path.name.rsplit(".moved-", 1)[1][:-len(".idx")]))
        return aside[-1] if aside else index

    @classmethod
    def rotated_copy(cls, data_path: Path, inode: Optional[int] = None,
                     size: Optional[int] = None) -> Optional[Path]:
        """The file logrotate made of a data file in its folder (NAME.1, NAME-20261127): the one
        that is the moved file itself (`inode`), or the newest copy of `size` bytes; None when
        there is none (deleted, or another name).  Reads the folder once."""
        found: List[Tuple[float, Path]] = []
        with os.scandir(str(data_path.parent)) as entries:
            for entry in entries:
                name = cls.parse(entry.name)
                if (name is None or not name.rotated or name.rotated.endswith(".gz")
                        or not entry.name.startswith(data_path.name)
                        or not entry.is_file(follow_symlinks=False)):
                    continue
                if inode is not None and entry.inode() == inode:
                    return Path(entry.path)
                if size is not None and entry.stat(follow_symlinks=False).st_size == size:
                    found.append((entry.stat(follow_symlinks=False).st_mtime, Path(entry.path)))
        return max(found)[1] if found else None

    @staticmethod
    def compressed_path(data_path: Path) -> Path:
        """The gzip'd copy of a finished data file."""
        return data_path.with_name(data_path.name + ".gz")

    @staticmethod
    def compression_temp_path(data_path: Path) -> Path:
        """Where the gzip'd copy is written before it is complete."""
        return data_path.with_name("." + data_path.name + ".gz.tmp")

    @staticmethod
    def manifest_path(data_path: Path) -> Path:
        """The manifest of a finished (sealed) data file, beside it under a dot-name."""
        return data_path.with_name("." + data_path.name + ".sealed.json")

    def summary_path(self, index: Path) -> Path:
        """Where the ledger keeps what a pruned batch index counted:
        .dsreceiver/ledger/FOLDER/NAME.json."""
        relative = index.relative_to(self.index_dir)
        return self.ledger_dir / relative.parent / (relative.name[:-len(".idx")] + ".json")

    def answers_path(self, day: str) -> Path:
        """This process's file of ledger answer counts of a UTC day:
        .dsreceiver/answers/DAY[TAG].jsonl."""
        return self.answers_dir / (day + self.tag + ".jsonl")

    def aside_path(self, kind: str, data_path: Path, stamp: float) -> Path:
        """Where recovery keeps bytes cut from a data file: .dsreceiver/KIND/FOLDER__NAME.STAMP."""
        flat = "__".join(data_path.relative_to(self.root).parts)
        return self.state_dir / kind / ("%s.%d" % (flat, int(stamp)))

    def relative(self, data_path: Path) -> str:
        """A data file's path relative to the output folder, as journals and seal lists write it."""
        return data_path.relative_to(self.root).as_posix()

    def from_relative(self, text: str) -> Optional[Path]:
        """The data file a journal or seal list names; None unless it is a data file's name in a
        folder of safe names (what those files hold is never trusted further)."""
        *folder, name = text.split("/")
        try:
            self.check_folder("/".join(folder))
        except ValueError:
            return None
        return self.root.joinpath(*folder, name) if self.parse(name) is not None else None

    def new_run_name(self) -> str:
        """A name for this process's run: TAG.PID.STAMP (see RunJournal)."""
        return "%s.%d.%x" % (self.tag[1:] or "main", os.getpid(), time.time_ns())

    @classmethod
    def tag_of_run(cls, run: str) -> str:
        """The tag of the files a run wrote: '.w1', or '' for a single process ('main')."""
        kind = run.split(".", 1)[0]
        return "" if kind == "main" else "." + kind

    def run_lock_path(self, run: str) -> Path:
        """The file a run holds an exclusive flock on while it lives."""
        return self.runs_dir / (run + ".lock")

    def run_journal_path(self, run: str) -> Path:
        """The journal of a run's data files."""
        return self.runs_dir / (run + ".files")

    def run_names(self) -> List[str]:
        """The runs that have a journal, alive or not (their lock tells)."""
        try:
            names = os.listdir(str(self.runs_dir))
        except FileNotFoundError:
            return []
        return sorted(name[:-len(".files")] for name in names if name.endswith(".files")
                      and self.RUN_NAME_RE.fullmatch(name[:-len(".files")]))

    def seal_list_path(self, day: str) -> Path:
        """This process's list of the files it sealed on UTC day DAY (2026-11-27)."""
        return self.seal_lists_dir / (day + self.tag + ".list")

    def seal_lists(self) -> List[Tuple[str, Path]]:
        """Every process's seal lists, oldest day first: (day, path)."""
        try:
            names = os.listdir(str(self.seal_lists_dir))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = self.SEAL_LIST_RE.fullmatch(name)
            if match:
                found.append((match.group(1), self.seal_lists_dir / name))
        return sorted(found)

    # -- listings ---------------------------------------------------------------

    def data_files(self, compressed: bool = False) -> Iterator[Tuple[Path, DataName]]:
        """Every data file this layout appends to (with `compressed`, every gzip'd one and every
        one logrotate moved or copied as well), in no dot-folder: a walk of the whole tree, for
        tools and an earlier version's folder (the server finds its files in journals and seal
        lists)."""
        for folder, subfolders, names in os.walk(str(self.root)):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for file_name in sorted(names):
                name = self.parse(file_name)
                if name is None or not (compressed or name.compressed == self.store_gzip
                                        and not name.rotated):
                    continue
                path = Path(folder, file_name)
                if path.is_file() and not path.is_symlink():
                    yield path, name

    def data_file_of_index(self, index: Path, folder: str) -> Optional[Path]:
        """The data file a batch index is named after; None for an index logrotate's move set
        aside (its file has another name now)."""
        name = index.name[:-len(".idx")]
        if self.parse(name) is None:
            return None
        return self.root / folder / name if folder else self.root / name

    def counted_file(self, index: Path, folder: str) -> Path:
        """The data file whose batches a batch index counts: the one it is named after, or, for
        an index set aside, the file logrotate made (or the one it was set aside for)."""
        match = self.INDEX_NAME_RE.fullmatch(index.name)
        name = match.group(1) if match else index.name
        return self.root / folder / name if folder else self.root / name

    def indexes(self) -> Iterator[Tuple[Path, str, DataName]]:
        """Every batch index, set-aside ones included: (index path, folder, name of its data
        file)."""
        for index in self.index_dir.rglob("*.idx"):
            match = self.INDEX_NAME_RE.fullmatch(index.name)
            name = self.parse(match.group(1)) if match else None
            if name is None:
                continue
            folder = index.parent.relative_to(self.index_dir).as_posix()
            yield index, "" if folder == self.ROOT_FOLDER else folder, name

    @property
    def reconciled_path(self) -> Path:
        """Where `dsreceiver.py reconcile` leaves its last verdicts for the server to show."""
        return self.state_dir / "reconciled.json"

    def summaries(self) -> Iterator[Path]:
        """Every ledger summary of a pruned batch index."""
        return self.ledger_dir.rglob("*.json")

    def answer_files(self) -> Iterator[Path]:
        """Every process's files of ledger answer counts."""
        return self.answers_dir.glob("*.jsonl")

    def compressed_or_plain(self, data_path: Path) -> Path:
        """The file that holds a data file's records now: its --compress-rotated .gz once that
        has replaced it, else the file itself."""
        if data_path.name.endswith(".gz") or data_path.exists():
            return data_path
        compressed = self.compressed_path(data_path)
        return compressed if compressed.exists() else data_path

    def is_sealed(self, data_path: Path) -> bool:
        """Whether a data file, or the .gz that replaced it, has its manifest."""
        return (self.manifest_path(data_path).exists() or not data_path.name.endswith(".gz")
                and self.manifest_path(self.compressed_path(data_path)).exists())

    def ledger_files_of(self, data_path: Path, index_name: Optional[str] = None) -> List[Path]:
        """The ledger files of a finished data file that exist: its batch index, and the summary
        that replaces it once pruned; the index its manifest names (`index_name`), else the one
        under the name the file was written as (a --compress-rotated .gz: the plain file's)."""
        if index_name is not None and self.INDEX_NAME_RE.fullmatch(index_name):
            indexes = [self.index_path(data_path).with_name(index_name)]
        else:
            written = [data_path]
            plain = data_path.with_name(data_path.name[:-len(".gz")])
            if data_path.name.endswith(".gz") and not plain.exists():
                written.append(plain)
            indexes = [self.index_path(name) for name in written]
        return [path for index in indexes for path in (index, self.summary_path(index))
                if path.is_file()]

    def answers_files_named(self) -> List[Path]:
        """The answers files whose names this layout gives (answers_path), sorted."""
        return sorted(path for path in self.answer_files()
                      if self.ANSWERS_NAME_RE.fullmatch(path.name) and path.is_file())

    @classmethod
    def leftover_of(cls, path: Path) -> Optional[Path]:
        """The data file that a compression (.NAME.gz.tmp) or manifest (.NAME.sealed.json.tmp)
        left in its folder was for; None for any other name."""
        for suffix in (".gz.tmp", ".sealed.json.tmp"):
            if path.name.startswith(".") and path.name.endswith(suffix):
                name = path.name[1:-len(suffix)]
                if cls.parse(name) is not None:
                    return path.with_name(name)
        return None

    def remove_empty_index_folders(self) -> None:
        """Removes the index folders that hold nothing (a stream's, once its indexes are pruned),
        so that what walks the index folder meets only folders in use.  A push that opens a file
        in one meanwhile makes it again (see Storage._open_file)."""
        for folder, _, names in os.walk(str(self.index_dir), topdown=False):
            if not names and folder != str(self.index_dir):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


# ---------------------------------------------------------------------------
# Storage: runs
# ---------------------------------------------------------------------------
# Which process may write which data file, kept durably, so that a start recovers only the files a
# process that is gone may have been writing, and finishing takes only files no live process
# writes: the cost of both follows what is open or unfinished, never what is kept.
#
# A run is one process's life as a writer.  It holds an exclusive flock on RUN.lock from its first
# data file to its end, so the kernel itself says when it is gone (any way it went), and RUN.files
# lists the files it created or adopted and has not finished.  Another process that takes the lock
# of a run that is gone is the only one acting on it until it lets go.  RUN_PROTOCOL: what a run
# goes through, as its journal and lock show it to other processes.

class RunState(ProtocolEnum):
    """Where a run is, as other processes see it."""

    # Its lock is held: its files are its own (not recovered, not finished by anyone else).
    LIVE = "live"
    # It stopped with every file closed and synced ('clean' in its journal): nothing to recover.
    ENDED = "ended"
    # Its lock is free and it did not say 'clean': a crash, a kill, a power cut.  Its files may
    # end in bytes never acknowledged, or bytes not yet durable.
    DIED = "died"
    # Another process cut its files back to what their indexes vouch for and synced them.
    RECOVERED = "recovered"
    # Another process took its unfinished files into its own journal and removed this one.
    ADOPTED = "adopted"


class RunEvent(ProtocolEnum):
    """What moves a run."""

    STARTED = "it created its lock and journal, before its first data file"
    STOPPED = "it closed and synced every file, and wrote 'clean'"
    VANISHED = "its lock is free, and its journal does not say 'clean'"
    FILES_RECOVERED = "its files were recovered, and its journal says 'recovered'"
    ADOPTED = "its unfinished files were journalled by another run, and its journal removed"


RUN_PROTOCOL: Dict[Tuple[Optional[RunState], RunEvent], RunState] = {
    (None, RunEvent.STARTED): RunState.LIVE,
    (RunState.LIVE, RunEvent.STOPPED): RunState.ENDED,
    (RunState.LIVE, RunEvent.VANISHED): RunState.DIED,
    # Only a run that died is recovered: one that ended closed and synced everything.
    (RunState.DIED, RunEvent.FILES_RECOVERED): RunState.RECOVERED,
    # Never before it is recovered: an unfinished file is finished only once it holds exactly its
    # acknowledged batches, durably.
    (RunState.ENDED, RunEvent.ADOPTED): RunState.ADOPTED,
    (RunState.RECOVERED, RunEvent.ADOPTED): RunState.ADOPTED,
}
# Journal lines that are no file: how the run ended, or that its files were recovered.
CLEAN_MARK = b"clean"
RECOVERED_MARK = b"recovered"
# A journal is rewritten with its unfinished files alone once it holds this many finished ones
# (and more than those unfinished).
JOURNAL_COMPACT_AT = 256
# How often the lock of a run whose process is gone is tried while another process holds it.
RUN_LOCK_POLL = 0.02


class RunRecord(NamedTuple):
    """What a run's journal says: its files not yet finished, and its state (LIVE when it neither
    stopped cleanly nor was recovered: the lock tells whether it lives)."""

    files: List[Path]
    state: RunState


def read_journal(layout: Layout, run: str) -> RunRecord:
    """Reads a run's journal: +PATH and -PATH lines in order, then the marks.  A torn last line (a
    crash while appending) names a file whose first byte was never written; a line that names no
    data file of this folder is ignored.  Raises FileNotFoundError once the run is adopted."""
    with open(str(layout.run_journal_path(run)), "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")[:-1]
    files: Dict[str, None] = {}
    for line in lines:
        text = line[1:].decode("utf-8", "replace")
        if line[:1] == b"+":
            files[text] = None
        elif line[:1] == b"-":
            files.pop(text, None)
    state = (RunState.RECOVERED if RECOVERED_MARK in lines
             else RunState.ENDED if CLEAN_MARK in lines else RunState.LIVE)
    paths = [path for path in map(layout.from_relative, files) if path is not None]
    return RunRecord(paths, state)


class RunJournal:
    """This process's run (see RUN_PROTOCOL): its lock and its journal, both created with its first
    data file.

    A file is journalled (and the journal synced) before its first byte, so
    that whatever stops the process, the next start finds every file it may
    have left torn; it is struck off once finished (sealed, removed empty, or
    moved away by logrotate, once the copy is journalled in its place),
    without a sync: a line lost in a crash only has a finished file looked
    at again.  The lock is held through a
    read-only descriptor, private to the process (O_CLOEXEC: an upgrade's
    new process does not inherit it), and the journal is opened for each
    append: nothing stays open for writing, so an idle folder can be
    remounted read-only.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.name = layout.new_run_name()
        self.state: Optional[RunState] = None
        self.lock = threading.Lock()
        self.lock_fd = -1
        # The files journalled and not finished, and the finished lines since the last rewrite.
        self.files: Dict[str, None] = {}
        self.struck = 0

    def _start(self) -> None:
        """Takes the run's lock, then creates its journal (call with the lock)."""
        if self.state is RunState.LIVE:
            return
        if self.state is not None:
            raise OSError("run %s has ended: it opens no file" % self.name)
        self.layout.make_folder(self.layout.runs_dir)
        flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        lock_path = self.layout.run_lock_path(self.name)
        # Locked under a temporary name, then renamed: nobody ever finds the lock free while the
        # run lives (flock belongs to the file, whatever its name).
        temp = lock_path.with_name(lock_path.name + ".tmp")
        lock_fd = os.open(str(temp), os.O_RDONLY | flags, self.layout.file_mode)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(str(temp), str(lock_path))
            os.close(os.open(str(self.layout.run_journal_path(self.name)), os.O_WRONLY | flags,
                             self.layout.file_mode))
        except OSError:
            os.close(lock_fd)
            raise
        self.lock_fd = lock_fd
        fsync_directory(self.layout.runs_dir)
        self.state = advance(RUN_PROTOCOL, None, RunEvent.STARTED)

    def _append(self, lines: Sequence[bytes], sync: bool) -> None:
        fd = os.open(str(self.layout.run_journal_path(self.name)),
                     os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # From a fresh line: a line a crash tore never swallows the next one.
            write_all(fd, [b"\n" + b"".join(line + b"\n" for line in lines)])
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def opened(self, paths: Sequence[Path]) -> None:
        """Journals data files before their first byte (a new file, or an earlier run's adopted
        one), durably."""
        texts = [self.layout.relative(path) for path in paths]
        with self.lock:
            self._start()
            self._append([b"+" + text.encode("utf-8") for text in texts], sync=True)
            self.files.update(dict.fromkeys(texts))

    def retract(self, path: Path) -> None:
        """Strikes off a file journalled that this process did not create after all (another
        took its name first), durably: nobody may ever recover it as this run's."""
        self._strike(path, sync=True)

    def finished(self, path: Path) -> None:
        """Strikes off a data file that no process will write again and that is finished; never
        raises (a strike lost only has a finished file looked at again)."""
        try:
            self._strike(path, sync=False)
        except OSError as exc:
            log.error("cannot strike %s off the journal of run %s (it is looked at again): %s",
                      path, self.name, describe_os_error(exc))

    def _strike(self, path: Path, sync: bool) -> None:
        text = self.layout.relative(path)
        with self.lock:
            if self.state is not RunState.LIVE or text not in self.files:
                return
            del self.files[text]
            self._append([b"-" + text.encode("utf-8")], sync)
            self.struck += 1
            if self.struck >= max(JOURNAL_COMPACT_AT, len(self.files)):
                self._rewrite()

    def _rewrite(self) -> None:
        """Replaces the journal with one that lists only the unfinished files (call with the
        lock)."""
        journal = self.layout.run_journal_path(self.name)
        temp = journal.with_name(journal.name + ".tmp")
        with self.layout.create_file(temp) as handle:
            handle.write(b"".join(b"+" + text.encode("utf-8") + b"\n" for text in self.files))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(str(temp), str(journal))
        fsync_directory(journal.parent)
        self.struck = 0

    def close(self, clean: bool) -> None:
        """Ends the run: says 'clean' (every file closed and synced) when it is, then lets go of
        the lock, so that another process recovers (unless clean) and finishes what is left."""
        with self.lock:
            if self.state is not RunState.LIVE:
                return
            try:
                if clean:
                    self._append([CLEAN_MARK], sync=True)
                    self.state = advance(RUN_PROTOCOL, self.state, RunEvent.STOPPED)
            except OSError as exc:
                log.error("cannot end the journal of run %s: %s", self.name,
                          describe_os_error(exc))
            finally:
                os.close(self.lock_fd)
                self.lock_fd = -1
                if self.state is RunState.LIVE:
                    self.state = advance(RUN_PROTOCOL, self.state, RunEvent.VANISHED)


def run_process_gone(run: str) -> bool:
    """Whether the process a run's name gives (TAG.PID.STAMP) no longer exists."""
    try:
        os.kill(int(run.split(".")[1]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, IndexError):
        return False
    return False


@contextlib.contextmanager
def run_that_ended(layout: Layout, run: str, wait: float = 0.0) -> Iterator[Optional[RunRecord]]:
    """Holds the lock of a run that is gone while the caller recovers or adopts it, yielding its
    record (state DIED, ENDED or RECOVERED); None while it lives, once it is adopted, or while
    another process holds it.  With `wait`, a lock that another process holds for a moment (it
    looks or adopts) is waited for that long when the run's own process is gone."""
    try:
        fd = os.open(str(layout.run_lock_path(run)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                record = read_journal(layout, run)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline or not run_process_gone(run):
                    yield None
                    return
                time.sleep(RUN_LOCK_POLL)
            except FileNotFoundError:
                yield None
                return
        if record.state is RunState.LIVE:
            record = record._replace(state=advance(RUN_PROTOCOL, RunState.LIVE,
                                                   RunEvent.VANISHED))
        yield record
    finally:
        os.close(fd)


def mark_recovered(layout: Layout, run: str, record: RunRecord) -> RunRecord:
    """Says in a dead run's journal, durably, that its files hold exactly their acknowledged
    batches now (call holding its lock, after recovering them)."""
    state = advance(RUN_PROTOCOL, record.state, RunEvent.FILES_RECOVERED)
    fd = os.open(str(layout.run_journal_path(run)), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
                 | os.O_CLOEXEC)
    try:
        write_all(fd, [RECOVERED_MARK + b"\n"])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return record._replace(state=state)


def remove_run(layout: Layout, run: str, record: RunRecord) -> None:
    """Removes the journal, then the lock, of a run whose files another run has journalled (call
    holding its lock)."""
    advance(RUN_PROTOCOL, record.state, RunEvent.ADOPTED)
    for path in (layout.run_journal_path(run), layout.run_lock_path(run)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def live_runs_files(layout: Layout, holding: str = "") -> Set[Path]:
    """The files journalled by runs that live now (their lock is held), this process's own
    included, but for `holding`, the ended run whose lock the caller holds."""
    busy: Set[Path] = set()
    for run in layout.run_names():
        if run == holding:
            continue
        with run_that_ended(layout, run) as ended:
            if ended is not None:
                continue
        try:
            busy.update(read_journal(layout, run).files)
        except FileNotFoundError:
            continue
    return busy


# ---------------------------------------------------------------------------
# Storage: data files
# ---------------------------------------------------------------------------
# One output file and its batch index, appended to by group commit.

class FileState(enum.Enum):
    """Where a DataFile is in its life; Storage makes every transition, under its lock.

    CURRENT -> FINISHED | MOVED | STOPPING, once it stops taking new pushes;
    then -> CLOSED when the last push writing it is done.
    """

    CURRENT = "current"
    # Its period is over or it is full: once closed, housekeeping may compress it.
    FINISHED = "finished"
    # logrotate moved or deleted it: once closed, its batch index is set aside for a new file of
    # that name.
    MOVED = "moved"
    # The server is stopping.
    STOPPING = "stopping"
    CLOSED = "closed"


def always_unique() -> bool:
    """The eligibility of a batch whose caller vouches that a matching digest can only mean a
    retry."""
    return True


def never_unique() -> bool:
    """The eligibility of a batch nothing is known of: a match may be genuine, so it is stored
    again."""
    return False


class PendingBatch:
    """A push's batch queued in its DataFile, and how the push learns what became of it."""

    __slots__ = ("batch", "entry", "key", "is_unique", "ticket", "stored", "error", "leads",
                 "woken")

    def __init__(self, batch: RecordBatch, entry: IndexEntry, key: Optional[str] = None,
                 is_unique: Callable[[], bool] = always_unique,
                 ticket: Optional[ClaimTicket] = None) -> None:
        self.batch = batch
        # Its index entry, but for the end offset (and the digest, when its claim is granted),
        # which the committing push fills in.
        self.entry = entry
        # Its dedupe key (None: not deduplicated), and whether a match can only mean a retry.
        self.key = key
        self.is_unique = is_unique
        # Its claim, when decided before it was queued (it waited for another request's outcome).
        self.ticket = ticket
        # Where it is in BATCH_PROTOCOL, and why it was not stored, if it was not.
        self.stored = Stored.QUEUED
        self.error: Optional[Exception] = None
        # Set when the push is to commit the queue rather than wait for it.
        self.leads = False
        # Released exactly once: the batch is committed (or failed), or the push leads.
        self.woken = threading.Lock()
        self.woken.acquire()


class DataFile:
    """One append-only output file and its batch index, with group commit.

    A push queues its batch; the first push to find nobody committing takes
    the whole queue (LEAD_PROTOCOL), claims its batches' dedupe keys in one
    call (see _claim, CLAIM_PROTOCOL), decides each batch from its claim
    (BATCH_PROTOCOL: a batch whose check fails is refused alone), writes the
    batches to store and then their index entries (one writev each),
    fdatasyncs both files once (--fsync always), commits or releases the
    claims, wakes each push of the group once, with its outcome, then hands
    the queue that grew meanwhile to the first push waiting in it.  Nobody
    waits on a shared condition, so a sync wakes only the pushes it made
    durable.
    At restart, bytes past the last indexed batch belong to a batch that was
    never acknowledged and are moved aside (see recover_file).
    """

    def __init__(self, path: Path, index_path: Path, period: str = "", sequence: int = 0,
                 fsync_seconds: Optional[Histogram] = None, mode: int = DEFAULT_FILE_MODE,
                 sync: bool = True, dedupe: Optional[DedupeClaims] = None,
                 on_copy: Callable[[Path], None] = lambda copy: None) -> None:
        self.path = path
        self.dedupe = dedupe
        # Told of the copy logrotate's copytruncate made of the file, to be sealed and shipped.
        self.on_copy = on_copy
        self.index_path = index_path
        self.period = period
        self.sequence = sequence
        self.fsync_seconds = fsync_seconds
        self.sync = sync
        self.mode = mode
        self.fd = self.index_fd = -1
        self.size = self.index_size = 0
        # Set by Storage (under its lock) when it will suspend this idle file; a push that resumes
        # the file first clears it, and suspend() then leaves the file open.
        self.closing = False
        self._open_files(os.O_CREAT)
        # The data file's (st_dev, st_ino): moved() compares the path against it, even while the
        # descriptors are closed (see suspend).
        on_disk = os.fstat(self.fd)
        self.identity = (on_disk.st_dev, on_disk.st_ino)
        if not self.index_size:
            # Records from before this index (or a lost one) are marked as complete.
            try:
                self._reset_index(self.size)
            except OSError:
                os.close(self.fd)
                os.close(self.index_fd)
                raise
        # Where a failed fdatasync cuts the files back to: their sizes when the last good one began.
        self.durable_size = self.size
        self.durable_index_size = self.index_size
        # Its life (see FileState) and the pushes writing it now: Storage's, under Storage.lock.
        self.life = FileState.CURRENT
        self.users = 0
        self.queue: List[PendingBatch] = []
        self.lead = Lead.IDLE
        self.queue_lock = threading.Lock()
        # Held while the files are written or synced: by the committing push, the once-a-second
        # sync of --fsync interval, close().
        self.write_lock = threading.Lock()

    def _open_files(self, create: int) -> None:
        """Opens the data file and its index for appending (`create`: os.O_CREAT, or 0 when both
        must exist) and reads their sizes."""
        flags = os.O_WRONLY | os.O_APPEND | create
        fd = open_regular(self.path, flags, self.mode)
        try:
            self.index_fd = open_regular(self.index_path, flags, self.mode)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.size = os.fstat(self.fd).st_size
        self.index_size = os.fstat(self.index_fd).st_size

    @property
    def suspended(self) -> bool:
        """Whether its descriptors are closed while it idles (see suspend)."""
        return self.fd < 0

    def suspend(self) -> None:
        """Makes an idle file durable and closes its descriptors, so that any number of streams fit
        under the open-file limit; the next push resumes it.  Storage marks the file `closing`
        under its lock, then calls this outside it; a resume meanwhile cancels it."""
        with self.write_lock:
            if self.closing and self.fd >= 0:
                self._close_files()
            self.closing = False

    def resume(self) -> None:
        """Reopens a suspended file by name (or cancels its suspension); raises OSError when it is
        gone (see moved)."""
        with self.write_lock:
            self.closing = False
            if self.fd >= 0:
                return
            # The sizes it knew: a file truncated meanwhile (copytruncate) is then seen by _write.
            size, index_size = self.size, self.index_size
            self._open_files(0)
            on_disk = os.fstat(self.fd)
            if (on_disk.st_dev, on_disk.st_ino) != self.identity:
                self._close_files()
                raise FileNotFoundError("%s was replaced" % self.path)
            self.size, self.index_size = size, index_size
            self.durable_size, self.durable_index_size = size, index_size

    def _reset_index(self, offset: int) -> None:
        """Starts the index afresh, with one entry saying the file is complete up to `offset`."""
        os.ftruncate(self.index_fd, 0)
        entries = [IndexEntry(offset, time.time())] if offset else []
        write_all(self.index_fd, [index_bytes(entries)])
        self.index_size = len(INDEX_HEADER) + BATCH_ENTRY.size * len(entries)

    def _set_index_aside(self, offset: int) -> None:
        """After the file was truncated behind this process's back (logrotate's copytruncate):
        sets its index aside, under its copy's name when the copy is there (the batches it counts
        are the copy's now: counted, and sealed and shipped with it), and starts a fresh one,
        saying the file is complete up to `offset` (call with write_lock)."""
        copy = Layout.rotated_copy(self.path, size=self.size)
        aside = self.index_path.with_name(Layout.aside_index_name(copy or self.path))
        fresh = self.index_path.with_name(self.index_path.name + ".new")
        # The fresh index is ready before anything is renamed: a failure leaves the old in place.
        fd = open_regular(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, self.mode)
        try:
            entries = [IndexEntry(offset, time.time())] if offset else []
            write_all(fd, [index_bytes(entries)])
            os.rename(str(self.index_path), str(aside))
            os.rename(str(fresh), str(self.index_path))
        except OSError:
            os.close(fd)
            raise
        os.close(self.index_fd)
        self.index_fd = fd
        self.index_size = len(INDEX_HEADER) + BATCH_ENTRY.size * len(entries)
        fsync_directory(self.index_path.parent)
        if copy is not None:
            log.info("%s was truncated (copytruncate): its batches are counted with its copy %s,"
                     " which is sealed", self.path, copy.name)
            self.on_copy(copy)
        else:
            log.warning("%s was truncated with no copy of its %d bytes beside it: its batches are"
                        " still counted, under %s", self.path, self.size, aside.name)

    def is_full(self, max_size: int) -> bool:
        """Tells whether the file has reached `max_size` bytes (0: no limit)."""
        return bool(max_size) and self.size >= max_size

    def append(self, pending: PendingBatch) -> Stored:
        """Stores a batch and its index entry, claiming its dedupe key first; returns once both are
        written (and durable, with sync), or what else became of it.  Raises OSError (or
        SupervisorGone), with nothing of the batch left behind, when it cannot be stored now, and
        BatchRefused when checking it failed."""
        with self.queue_lock:
            self.queue.append(pending)
            leads = self.lead is Lead.IDLE
            self.lead = advance(LEAD_PROTOCOL, self.lead, LeadEvent.QUEUED)
        if not leads:
            pending.woken.acquire()
            leads = pending.leads
        if leads:
            self._commit_queue()
        if pending.error is not None:
            raise pending.error
        return pending.stored

    def _commit_queue(self) -> None:
        """Commits every queued batch as one group, wakes its pushes, and passes the lead on."""
        with self.queue_lock:
            group, self.queue = self.queue, []
        # What the group learns if an unforeseen error stops this short: every push is woken.
        error: Optional[Exception] = OSError("the commit of %s stopped short" % self.path)
        claimed: List[PendingBatch] = []
        try:
            claimed = self._claim(group)
            self._decide(group)
            writing = [pending for pending in group
                       if pending.stored in (Stored.WRITING, Stored.WRITING_KEPT)]
            with self.write_lock:
                error = self._write(writing) if writing else None
                if error is None and writing and self.sync:
                    error = self._sync()
            event = BatchEvent.GROUP_DURABLE if error is None else BatchEvent.GROUP_FAILED
            for pending in writing:
                pending.stored = advance(BATCH_PROTOCOL, pending.stored, event)
                pending.error = error
        except SupervisorGone as exc:
            error = exc
        finally:
            try:
                # Whatever went wrong, a resend of these batches must not wait for their claims.
                self._settle(claimed)
            finally:
                self._wake(group, error)

    def _wake(self, group: Sequence[PendingBatch], error: Optional[Exception]) -> None:
        """Passes the lead to the first push queued meanwhile, and wakes the group's pushes: each
        with its own outcome, or `error` when the commit stopped before deciding it."""
        successor: Optional[PendingBatch] = None
        with self.queue_lock:
            if self.queue:
                successor = self.queue[0]
                successor.leads = True
            self.lead = advance(LEAD_PROTOCOL, self.lead, LeadEvent.HANDED_ON if self.queue
                                else LeadEvent.DONE)
        for pending in group:
            if pending.stored in (Stored.QUEUED, Stored.WRITING, Stored.WRITING_KEPT):
                pending.error = error or OSError("the commit of %s stopped short" % self.path)
            pending.woken.release()
        # The next commit starts after the group's pushes are on their way: woken first, it made
        # the bench's scenario C 17% slower (BENCHMARKS.md).
        if successor is not None:
            successor.woken.release()

    def _claim(self, group: Sequence[PendingBatch]) -> List[PendingBatch]:
        """Claims, in one call, the keys of the group's batches not yet decided (each key once);
        returns the batches whose claim is granted, which _settle() commits or releases."""
        firsts: Dict[str, PendingBatch] = {}
        for pending in group:
            if pending.key is not None and pending.ticket is None:
                firsts.setdefault(pending.key, pending)
        if self.dedupe is not None and firsts:
            for pending, ticket in zip(firsts.values(), self.dedupe.claim_all(list(firsts))):
                pending.ticket = ticket
        return [pending for pending in group
                if pending.ticket is not None and pending.ticket.state is ClaimState.GRANTED]

    def _decide(self, group: Sequence[PendingBatch]) -> None:
        """Moves each batch of the group by what its claim says (BATCH_PROTOCOL); a batch whose
        check raises is refused alone."""
        # The claim of each key in the group (its first copy's, or the one a copy that waited for
        # another request brought along).
        claims = {pending.key: pending.ticket.state for pending in group
                  if pending.key is not None and pending.ticket is not None}
        for pending in group:
            try:
                event = self._batch_event(pending, claims)
            except Exception as exc:  # anything its records make a check raise: it alone fails
                event = BatchEvent.CHECK_FAILED
                pending.error = (exc if isinstance(exc, BatchRefused)
                                 else BatchRefused("its records cannot be checked: %s"
                                                   % type(exc).__name__))
            pending.stored = advance(BATCH_PROTOCOL, pending.stored, event)
            if event is BatchEvent.CLAIM_GRANTED:
                pending.entry = pending.entry._replace(digest=pending.batch.digest or NO_DIGEST)

    @staticmethod
    def _batch_event(pending: PendingBatch, claims: Dict[str, ClaimState]) -> BatchEvent:
        """What a batch's claim (or its lack of one) means for it."""
        if pending.key is None:
            return BatchEvent.NO_KEY
        if pending.ticket is None:
            # Another copy of the same batch in this group holds its claim: a retry of a batch
            # stored before is a duplicate; otherwise it waits for this group's outcome (a
            # failed write must not answer it "already stored") and claims again.
            state = (ClaimState.DUPLICATE if claims.get(pending.key) is ClaimState.DUPLICATE
                     else ClaimState.WAITING)
        else:
            state = pending.ticket.state
        if state is ClaimState.WAITING:
            return BatchEvent.CLAIM_WAITING
        if state is ClaimState.GRANTED:
            return BatchEvent.CLAIM_GRANTED
        return (BatchEvent.CLAIM_DUPLICATE_RETRY if pending.is_unique()
                else BatchEvent.CLAIM_DUPLICATE_MAYBE)

    def _settle(self, claimed: Sequence[PendingBatch]) -> None:
        """Commits the granted claims of the batches now durable, and releases the others."""
        if self.dedupe is None or not claimed:
            return
        durable: List[PendingBatch] = []
        failed: List[PendingBatch] = []
        for pending in claimed:
            assert pending.ticket is not None
            event = (ClaimEvent.BATCH_DURABLE if pending.stored is Stored.WRITTEN
                     else ClaimEvent.BATCH_FAILED)
            pending.ticket.state = advance(CLAIM_PROTOCOL, pending.ticket.state, event)
            (durable if event is ClaimEvent.BATCH_DURABLE else failed).append(pending)
        if durable:
            self.dedupe.commit_all([(pending.key or "", pending.entry.stamp)
                                    for pending in durable])
        if failed:
            self.dedupe.release_all([pending.key or "" for pending in failed])

    def _write(self, group: Sequence[PendingBatch]) -> Optional[OSError]:
        """Appends the group's batches, then their index entries; cuts both files back when that
        fails."""
        start = os.fstat(self.fd).st_size
        end = start
        entries: List[Buffer] = []
        for pending in group:
            end += pending.batch.stored_size
            entries.append(pending.entry.pack(end))
        try:
            if start < self.size:
                self._set_index_aside(start)  # truncated behind our back (copytruncate)
                self.durable_size, self.durable_index_size = start, self.index_size
            index_start = self.index_size
            parts: List[Buffer] = []
            for pending in group:
                in_memory = pending.batch.memory_parts()
                if in_memory is None:
                    write_parts(self.fd, parts)
                    parts = []
                    pending.batch.write_to(self.fd)
                else:
                    parts.extend(in_memory)
            write_parts(self.fd, parts)
            write_parts(self.index_fd, entries)
        except OSError as exc:
            self._cut_back(start, self.index_size)
            return exc
        self.size = end
        self.index_size = index_start + BATCH_ENTRY.size * len(entries)
        return None

    def _sync(self) -> Optional[OSError]:
        """fdatasyncs the records, then the index; on failure cuts back to the last durable
        sizes."""
        started = time.monotonic()
        try:
            # Data first: an index entry must never be durable before its batch.
            os.fdatasync(self.fd)
            os.fdatasync(self.index_fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: cut everything not
            # yet durable.
            self._cut_back(self.durable_size, self.durable_index_size)
            return exc
        finally:
            if self.fsync_seconds is not None:
                self.fsync_seconds.observe(time.monotonic() - started)
        self.durable_size, self.durable_index_size = self.size, self.index_size
        return None

    def sync_now(self) -> Optional[OSError]:
        """Makes everything written so far durable (--fsync interval); returns the error, if
        any."""
        with self.write_lock:
            return None if self.fd < 0 else self._sync()

    def _cut_back(self, offset: int, index_offset: int) -> None:
        try:
            offset = min(offset, os.fstat(self.fd).st_size)
            os.ftruncate(self.fd, offset)
            os.ftruncate(self.index_fd, index_offset)
        except OSError as exc:
            # The restart recovery moves whatever is left past the index aside.
            log.error("cannot cut %s back to %d bytes after a failed write: %s", self.path, offset,
                      describe_os_error(exc))
            return
        self.size, self.index_size = offset, index_offset

    def moved(self) -> bool:
        """Tells whether the file at our path is no longer the one we write (renamed or deleted)."""
        try:
            on_disk = os.stat(str(self.path))
        except FileNotFoundError:
            return True
        return (on_disk.st_dev, on_disk.st_ino) != self.identity

    def is_empty(self) -> bool:
        """Whether no batch was ever written to it (a retry answered from the dedupe window opens
        a file and writes nothing)."""
        return self.size == 0 and self.index_size <= len(INDEX_HEADER)

    def close(self) -> None:
        """Makes everything durable and closes the files."""
        with self.write_lock:
            if self.fd >= 0:
                self._close_files()

    def _close_files(self) -> None:
        """Syncs and closes both descriptors (call with write_lock), so that nothing (the
        once-a-second sync) ever uses their numbers again."""
        for fd, path in ((self.fd, self.path), (self.index_fd, self.index_path)):
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("fdatasync of %s failed at close: %s", path, describe_os_error(exc))
            os.close(fd)
        self.fd = self.index_fd = -1


# ---------------------------------------------------------------------------
# Storage: writing
# ---------------------------------------------------------------------------
# The current file of each folder, from opening to finishing.

# /healthz writes this much (then discards it) to prove the disk takes data.
HEALTH_PROBE_SIZE = 65536


class StoreResult(NamedTuple):
    """What Storage.store() did with a batch."""

    # The data file it went to; None when it was a retry of a stored batch and was not stored again.
    path: Optional[Path]
    # It matched a stored batch, but not every record carries a request identity, so it was stored
    # again.
    kept_duplicate: bool = False


class Storage:
    """Appends record batches to the current data file of each folder: the only code that writes
    records.

    Files are named by the UTC period of receipt (hour or day) and numbered
    within a period when --max-file-size rolls them.  A file stays current
    until its period is over (see Housekeeper) or it is full; then it is closed
    as soon as no request writes it, and listed in `finished`.  A process never
    appends to a file it did not create: every file is created exclusively and
    journalled first (see RunJournal), the files of an earlier run are finished
    by housekeeping, and a restart starts the next file number.  At most
    `max_open` current files keep their descriptors; the least recently used
    idle ones are suspended (DataFile.suspend) and resumed on demand.
    """

    def __init__(self, layout: Layout, fsync_mode: str = "always", max_file_size: int = 0,
                 dedupe: Optional[DedupeClaims] = None,
                 clock: Callable[[], float] = time.time, max_open: int = 1024,
                 journal: Optional[RunJournal] = None) -> None:
        self.layout = layout
        # This process's run: the files it creates are journalled before their first byte.
        self.journal = journal or RunJournal(layout)
        self.fsync_mode = fsync_mode
        self.max_file_size = max_file_size
        self.dedupe = dedupe
        self.clock = clock
        self.max_open = max(1, max_open)
        self.fsync_seconds = Histogram(FSYNC_BUCKETS)
        # The current file of each folder, least recently used first.
        self.files: OrderedDict[str, DataFile] = OrderedDict()
        # The files whose descriptors are open, least recently used first (see _suspend_idle).
        self.open_files: OrderedDict[DataFile, None] = OrderedDict()
        # Called (from any thread) when a file is added to `finished`.
        self.on_finished: Callable[[], None] = lambda: None
        # Files logrotate moved that pushes still write, by folder: a new file of that name waits
        # for them.
        self.moving: Dict[str, DataFile] = {}
        # Files closed for good since housekeeping last looked (see take_finished).
        self.finished: List[Path] = []
        # The files logrotate moved or copied ours to, to seal (see rotated); a lock of their own:
        # a copy is found while a DataFile's write_lock is held.
        self.rotated_files: List[Path] = []
        self.rotated_lock = threading.Lock()
        self.lock = threading.Lock()
        self.moved_closed = threading.Condition(self.lock)
        self.stopped = threading.Event()
        self.interval_sync: Optional[threading.Thread] = None

    @property
    def dedupes(self) -> bool:
        """Whether batches are checked against the dedupe window (so a push's digest is worth
        taking)."""
        return self.dedupe is not None

    def start(self) -> None:
        """Starts the once-a-second fdatasync thread of --fsync interval."""
        if self.fsync_mode == "interval":
            self.interval_sync = threading.Thread(target=self._sync_every_second,
                                                  name="fsync-interval", daemon=True)
            self.interval_sync.start()

    def close(self) -> None:
        """Makes every open file durable and closes those no request is still writing; ends the
        run, clean when no request was still writing."""
        self.stopped.set()
        if self.interval_sync is not None:
            self.interval_sync.join()
        with self.lock:
            current = list(self.files.values())
            self.files.clear()
            idle = [data_file for data_file in current
                    if self._retire(data_file, FileState.STOPPING)]
        for data_file in idle:
            self._close(data_file)
        with self.lock:
            clean = not self.open_files and not self.moving
        self.journal.close(clean)

    # -- storing ----------------------------------------------------------------

    def store(self, folder: str, batch: RecordBatch, pushed_gzip: Optional[Buffer] = None,
              is_unique: Callable[[], bool] = always_unique,
              stream: str = UNKNOWN_STREAM) -> StoreResult:
        """Appends the batch to the current file of `folder` ('' for the root), unless it is a
        retry.

        A batch whose digest matches one stored within the dedupe window is a
        retry only when is_unique() says every record carries a request
        identity; otherwise it may be genuine, and is stored again (without a
        digest, so it never vouches for another).  `pushed_gzip`, the body as
        pushed when it decodes to exactly these records, is what --store gzip
        keeps; `stream`, the records' stream, goes to the index entry, for the
        ledger, with their event range when the push path learnt it (see
        RecordBatch.events), for the manifest.
        Durable on return when fsync is 'always'.  Raises StorageError,
        with nothing of the batch left behind, when it cannot be stored now.
        """
        self.layout.check_folder(folder)
        key = (dedupe_key(folder, batch.digest) if self.dedupe is not None and batch.digest
               else None)
        events = batch.events if batch.events is not None else UNKNOWN_EVENTS
        if self.layout.store_gzip:
            batch.compress(pushed_gzip)
        ticket: Optional[ClaimTicket] = None
        while True:
            pending = PendingBatch(batch, IndexEntry(0, self.clock(), NO_DIGEST, stream,
                                                     batch.records, *events), key, is_unique,
                                   ticket)
            try:
                data_file = self._acquire(folder)
            except OSError as exc:
                if (self.dedupe is not None and key is not None and ticket is not None
                        and ticket.state is ClaimState.GRANTED):
                    self.dedupe.release_all([key])  # the claim it waited for, given up
                raise StorageError("cannot open a data file in %s: %s"
                                   % (self.layout.root / folder, describe_os_error(exc))) from exc
            try:
                stored = data_file.append(pending)
            except OSError as exc:
                raise StorageError("cannot write %s: %s"
                                   % (data_file.path, describe_os_error(exc))) from exc
            finally:
                self._release(data_file)
            if stored is not Stored.DEFERRED:
                break
            # Another request stores the same batch now: wait for its outcome, holding no claim,
            # then queue this one again with the claim that outcome leaves it.
            ticket = pending.ticket
            if ticket is not None:
                ticket = ClaimTicket(ticket.outcome(), ticket.wait)
        if stored is Stored.DUPLICATE:
            return StoreResult(None)
        return StoreResult(data_file.path, kept_duplicate=stored is Stored.KEPT_DUPLICATE)

    def _acquire(self, folder: str) -> DataFile:
        """The current file of `folder`, opening the next one when the period or size says so;
        counts the caller as one of its users until _release()."""
        period = self.layout.period_name(self.clock())
        idle: List[DataFile] = []
        with self.lock:
            while True:
                current = self._resumed(folder, idle)
                if (current is not None and current.period == period
                        and not current.is_full(self.max_file_size)):
                    break
                if folder in self.moving:
                    # A moved file of this folder is still written: a new file of the same name
                    # would take its index name.  Wait, then look again.
                    if idle:
                        self._close_unlocked(idle)
                    else:
                        self.moved_closed.wait()
                    continue
                sequence = self._next_sequence(folder, period, current.sequence + 1
                                               if current is not None and current.period == period
                                               else 0)
                opened = self._open_file(folder, period, sequence)
                if current is not None:
                    del self.files[folder]
                    if self._retire(current, FileState.FINISHED):
                        idle.append(current)
                self.files[folder] = current = opened
                break
            self.files.move_to_end(folder)
            self.open_files[current] = None
            self.open_files.move_to_end(current)
            current.users += 1
            suspending = self._suspend_idle()
        for data_file in idle:
            self._close(data_file)
        for data_file in suspending:
            data_file.suspend()
        return current

    def _resumed(self, folder: str, idle: List[DataFile]) -> Optional[DataFile]:
        """The current file of `folder`, its descriptors reopened if it was suspended; None when
        there is none, or logrotate moved it while it idled (then retired, and in `idle` when
        nobody writes it).  Call with the lock."""
        current = self.files.get(folder)
        if current is None or not (current.suspended or current.closing):
            return current
        try:
            current.resume()
        except FileNotFoundError:
            # Its index is set aside as on SIGHUP, once closed.
            del self.files[folder]
            if self._retire(current, FileState.MOVED):
                idle.append(current)
            return None
        return current

    def _close_unlocked(self, idle: List[DataFile]) -> None:
        """Closes the `idle` files, releasing the lock meanwhile (call with it)."""
        closing = list(idle)
        idle.clear()
        self.lock.release()
        try:
            for data_file in closing:
                self._close(data_file)
        finally:
            self.lock.acquire()

    def _suspend_idle(self) -> List[DataFile]:
        """Marks the least recently used idle files `closing` while more than max_open are open
        (call with the lock); the caller suspends them after releasing it (a sync each)."""
        marked: List[DataFile] = []
        if len(self.open_files) <= self.max_open:
            return marked
        for data_file in list(self.open_files):
            if len(self.open_files) <= self.max_open:
                break
            if data_file.users == 0 and data_file.life is FileState.CURRENT:
                data_file.closing = True
                del self.open_files[data_file]
                marked.append(data_file)
        return marked

    def _release(self, data_file: DataFile) -> None:
        with self.lock:
            data_file.users -= 1
            idle = data_file.life is not FileState.CURRENT and data_file.users == 0
        if idle:
            self._close(data_file)

    def _open_file(self, folder: str, period: str, sequence: int) -> DataFile:
        """Creates the next data file of `folder`, from file number `sequence` on, and its index:
        journalled, then created exclusively, so that no two processes (an upgrade's old and new)
        ever write one file."""
        while True:
            path = self.layout.data_path(folder, period, sequence)
            if self.layout.make_folder(path.parent):
                fsync_directory(path.parent.parent)
            self.journal.opened([path])
            if self.layout.create_new(path):
                break
            self.journal.retract(path)
            sequence = self._next_sequence(folder, period, sequence + 1)
        index_path = self.layout.index_path(path)
        for attempt in range(3):
            try:
                if self.layout.make_folder(index_path.parent):
                    fsync_directory(index_path.parent.parent)
                if index_path.exists():
                    # The index of a file that was moved away before it could be set aside (a
                    # crash meanwhile).
                    os.replace(str(index_path), str(self.layout.set_aside_index_path(path)))
                data_file = DataFile(path, index_path, period, sequence, self.fsync_seconds,
                                     self.layout.file_mode, self.fsync_mode == "always",
                                     self.dedupe, self.rotated)
                break
            except FileNotFoundError:
                # Housekeeping removed an index folder, or its parent, empty, while it was made.
                if attempt == 2:
                    raise
        fsync_directory(path.parent)
        fsync_directory(index_path.parent)
        return data_file

    def _next_sequence(self, folder: str, period: str, first: int) -> int:
        """Picks the first file number from `first` on that no file takes (plain or gzip'd), nor
        the number after it (so a gap never takes files out of order): files of an earlier run
        are never appended to, since housekeeping finishes them."""

        def taken(sequence: int) -> bool:
            # An index without its file: the file was moved away unfinished, and its copy is to
            # take that index when it is finished (see Housekeeper._handed_to_copy).
            plain = self.layout.data_path(folder, period, sequence)
            return (plain.exists() or self.layout.compressed_path(plain).exists()
                    or self.layout.index_path(plain).exists())

        sequence = first
        while taken(sequence) or taken(sequence + 1):
            sequence += 1
        return sequence

    def _retire(self, data_file: DataFile, life: FileState) -> bool:
        """Ends a file's time as current (call with the lock); True when no push writes it, so that
        the caller closes it now (after releasing the lock), else the last push to finish does."""
        assert data_file.life is FileState.CURRENT and life not in (FileState.CURRENT,
                                                                    FileState.CLOSED)
        data_file.life = life
        if life is FileState.MOVED:
            self.moving[self.layout.folder_of(data_file.path)] = data_file
        return data_file.users == 0

    def _close(self, data_file: DataFile) -> None:
        """Closes a retired file that no push writes any more, and does what its kind of end asks
        for."""
        data_file.close()
        # A retry answered from the dedupe window opens a file and writes nothing: leave no empty
        # file behind (a moved file's name may be another file's by now).
        empty = (data_file.life is not FileState.MOVED and data_file.is_empty()
                 and not data_file.moved() and self._remove_empty(data_file))
        if empty:
            # Nothing left to finish under this name (the next file may take it).
            self.journal.finished(data_file.path)
        with self.lock:
            life, data_file.life = data_file.life, FileState.CLOSED
            self.open_files.pop(data_file, None)
            if life is FileState.FINISHED and not empty:
                self.finished.append(data_file.path)
                self.on_finished()
            elif life is FileState.MOVED:
                # Nobody holds the index now: give its name to the new file, keeping it for dedup
                # and recovery, under the moved file's new name when it is logrotate's (so that
                # the moved file is sealed and shipped with it).  Whatever happens, the folder's
                # pushes must not wait for ever.
                moved_to: Optional[Path] = None
                try:
                    moved_to = Layout.rotated_copy(data_file.path, inode=data_file.identity[1])
                    os.replace(str(data_file.index_path),
                               str(self.layout.set_aside_index_path(moved_to or data_file.path)))
                except OSError as exc:
                    moved_to = None
                    log.error("cannot set aside the batch index of moved file %s: %s",
                              data_file.path, describe_os_error(exc))
                finally:
                    del self.moving[self.layout.folder_of(data_file.path)]
                    self.moved_closed.notify_all()
                if moved_to is not None:
                    self.rotated(moved_to)
                # Struck off once its copy is journalled (a crash between leaves both named),
                # and before the lock lets a new file of that name be journalled.
                self.journal.finished(data_file.path)

    def _remove_empty(self, data_file: DataFile) -> bool:
        """Removes a closed file that holds no batch, and its index; True when it is gone."""
        try:
            os.unlink(str(data_file.path))
            os.unlink(str(data_file.index_path))
            fsync_directory(data_file.path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the empty file %s: %s", data_file.path,
                        describe_os_error(exc))
            return False
        return True

    def _sync_every_second(self) -> None:
        while not self.stopped.wait(1.0):
            with self.lock:
                open_files = list(self.files.values())
            for data_file in open_files:
                error = data_file.sync_now()
                if error is not None:
                    log.error("interval fdatasync of %s failed: %s", data_file.path,
                              describe_os_error(error))

    # -- for housekeeping and SIGHUP ------------------------------------------------

    def retire_stale(self) -> None:
        """Closes the files of a period that has passed, even when no push has arrived since."""
        period = self.layout.period_name(self.clock())
        with self.lock:
            stale = [(folder, data_file) for folder,
                     data_file in self.files.items() if data_file.period != period]
            idle = []
            for folder, data_file in stale:
                del self.files[folder]
                if self._retire(data_file, FileState.FINISHED):
                    idle.append(data_file)
        for data_file in idle:
            self._close(data_file)

    def take_finished(self) -> List[Path]:
        """Returns and forgets the files closed for good, and those logrotate made of ours, since
        the last call."""
        with self.lock:
            finished, self.finished = self.finished, []
        with self.rotated_lock:
            rotated, self.rotated_files = self.rotated_files, []
        return finished + rotated

    def rotated(self, copy: Path) -> None:
        """A file logrotate moved or copied one of ours to: journalled as this run's (no record is
        appended to it, but it is to be finished, whatever stops the process), then sealed by
        housekeeping, so that it is shipped with the index that counts its batches."""
        try:
            self.journal.opened([copy])
        except OSError as exc:
            log.error("cannot journal %s (sealed all the same, unless this process stops first):"
                      " %s", copy, describe_os_error(exc))
        with self.rotated_lock:
            self.rotated_files.append(copy)
        self.on_finished()

    def reopen(self) -> int:
        """After logrotate moved or deleted an output file, makes the next push open a new one by
        name.

        A file still in place is kept: two descriptors appending to one file
        and one index could interleave their batches and index entries.
        """
        with self.lock:
            moved = [(folder, data_file) for folder,
                     data_file in self.files.items() if data_file.moved()]
            idle = []
            for folder, data_file in moved:
                del self.files[folder]
                if self._retire(data_file, FileState.MOVED):
                    idle.append(data_file)
        for data_file in idle:
            self._close(data_file)
        return len(moved)

    def probe(self) -> Optional[str]:
        """Writes and syncs HEALTH_PROBE_SIZE bytes beside the records; returns why that failed, or
        None."""
        try:
            import tempfile
            with tempfile.TemporaryFile(dir=str(self.layout.state_dir)) as probe:
                probe.write(b"\0" * HEALTH_PROBE_SIZE)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            return "cannot write to %s: %s" % (self.layout.root, describe_os_error(exc))
        return None


# ---------------------------------------------------------------------------
# Storage: recovery
# ---------------------------------------------------------------------------
# After a crash: every data file a process that is gone may have been writing keeps exactly its
# acknowledged batches, durably, before any retry of them is answered "already stored".  Indexes
# are read from their end, a data file's records never.

# Index entries read at a time from an index's end.
INDEX_BLOCK_ENTRIES = 4096
# The fields every index format starts its entries with: end, time stored, digest.
ENTRY_PREFIX = struct.Struct("<Qd32s")


def vouched_length(index_fd: int, data_size: int) -> Tuple[int, int]:
    """(where the last batch an index vouches for ends, the index's length up to that entry), for
    a data file of `data_size` bytes: the last entry whose batch is all in the file.  Reads the
    index from its end: one entry, unless unsynced writes were lost."""
    head = os.pread(index_fd, len(INDEX_HEADER), 0)
    if len(head) < len(INDEX_HEADER) and any(header.startswith(head)
                                             for header, _, _ in INDEX_FORMATS):
        return 0, 0  # a header never synced: no batch of the file was ever acknowledged
    header, entry_size = index_format(head)
    count = max(0, os.fstat(index_fd).st_size - header) // entry_size
    while count:
        first = max(0, count - INDEX_BLOCK_ENTRIES)
        block = os.pread(index_fd, (count - first) * entry_size, header + first * entry_size)
        for number in range(count - first - 1, -1, -1):
            end = int.from_bytes(block[number * entry_size:number * entry_size + 8], "little")
            if end <= data_size:
                return end, header + (first + number + 1) * entry_size
        count = first
    return 0, header


def rotated_copy_of(layout: Layout, path: Path) -> Tuple[Optional[Path], bool]:
    """Whether a closed data file no longer holds what its batch index counts (logrotate moved it
    away, or copied then truncated it; not a --compress-rotated .gz that replaced it), and then
    the copy logrotate made of it, found by the size its index says (None: deleted, or not to be
    found).  An index that is missing, empty or not a regular file says nothing."""
    try:
        index_fd = open_regular(layout.index_path(path), os.O_RDONLY)
    except (FileNotFoundError, NotRegularFile):
        return None, False
    try:
        end = vouched_length(index_fd, sys.maxsize)[0]  # the last entry's end: one entry read
    finally:
        os.close(index_fd)
    if not end:
        return None, False  # nothing counted: a file removed empty, its index not yet
    try:
        if os.stat(str(path), follow_symlinks=False).st_size >= end:
            return None, False
    except FileNotFoundError:
        if not path.name.endswith(".gz") and layout.compressed_path(path).exists():
            return None, False
    return Layout.rotated_copy(path, size=end), True


def recover_file(layout: Layout, path: Path) -> None:
    """Keeps exactly the batches the index vouches for, moves the rest aside, and syncs what it
    keeps.

    Index entries whose batch is not all in the file (lost with unsynced
    writes) are dropped; bytes after the last indexed batch belong to a
    batch that was never acknowledged, so DataStream will send it again.  A
    file without an index is only cut back to its last complete line.  What
    is kept is synced, the records first, since the process that wrote it
    may have died before its fdatasync.  A FIFO, device or link where the
    file or its index belongs is skipped with one line, never opened.
    """
    try:
        data_fd = open_regular(path, os.O_RDWR)
    except FileNotFoundError:
        return  # compressed or moved away since: durable then
    except NotRegularFile:
        log.warning("%s is not a regular file: left as it is", path)
        return
    index_fd = -1
    try:
        size = os.fstat(data_fd).st_size
        try:
            index_fd = open_regular(layout.index_of(path), os.O_RDWR)
        except FileNotFoundError:
            name = layout.parse(path.name)  # NAME.log.gz.1 too: cut at a newline, gzip breaks
            if not path.name.endswith(".gz") and not (name and name.compressed):
                _repair_torn_tail(layout, data_fd, path, size)
        except NotRegularFile:
            log.warning("the batch index of %s is not a regular file: %s left as it is",
                        path, path)
            return
        if index_fd >= 0:
            keep, length = vouched_length(index_fd, size)
            if os.fstat(index_fd).st_size > length and rotated_copy_of(layout, path)[0]:
                # Copied then truncated by logrotate, not torn: the copy takes the index when
                # the file is finished (see Housekeeper._handed_to_copy).
                log.info("%s was rotated before it was finished: left for its copy", path)
                return
            if os.fstat(index_fd).st_size > length:
                os.ftruncate(index_fd, length)
            if size > keep:
                kept_as = _set_aside(layout, data_fd, path, keep, "partial")
                log.warning("moved %d bytes of an unacknowledged batch out of %s into %s"
                            " (DataStream resends it)", size - keep, path, kept_as)
        # Records before their index: an entry is never durable before its batch.
        os.fdatasync(data_fd)
        if index_fd >= 0:
            os.fdatasync(index_fd)
    finally:
        os.close(data_fd)
        if index_fd >= 0:
            os.close(index_fd)


def _repair_torn_tail(layout: Layout, data_fd: int, path: Path, size: int) -> None:
    if size == 0 or os.pread(data_fd, 1, size - 1) == b"\n":
        return
    keep = _last_newline_end(data_fd, size)
    kept_as = _set_aside(layout, data_fd, path, keep, "torn")
    log.warning("repaired torn tail of %s: cut %d bytes after the last complete line, kept in %s",
                path, size - keep, kept_as)


def _set_aside(layout: Layout, data_fd: int, path: Path, keep: int, kind: str) -> Path:
    """Moves the bytes of data file `path` after offset `keep` to a file under
    .dsreceiver/KIND/."""
    kept_as = layout.aside_path(kind, path, time.time())
    layout.make_folder(kept_as.parent)
    with layout.create_file(kept_as, append=True) as aside:
        offset = keep
        while True:
            chunk = os.pread(data_fd, COPY_CHUNK, offset)
            if not chunk:
                break
            aside.write(chunk)
            offset += len(chunk)
        aside.flush()
        os.fsync(aside.fileno())
    os.ftruncate(data_fd, keep)
    os.fsync(data_fd)
    return kept_as


def _last_newline_end(data_fd: int, size: int) -> int:
    """Returns the offset just past the last LF of the file, 0 when it has none."""
    position = size
    while position > 0:
        start = max(0, position - COPY_CHUNK)
        block = os.pread(data_fd, position - start, start)
        index = block.rfind(b"\n")
        if index >= 0:
            return start + index + 1
        position = start
    return 0


def sync_records(path: Path) -> None:
    """fdatasyncs a data file, which may be another process's still (or was a dead one's)."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # compressed since: its .gz was synced before the original went
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def batch_keys(index: Path, folder: str, since: float,
               records: Optional[Path] = None) -> List[Tuple[float, str]]:
    """(time stored, dedupe key) of the batches an index holds that were stored since `since`,
    read from its end, and only once they are durable: with `records` (a data file that may be
    written still, or was left unsynced), that file and then the index are synced first, and only
    the entries the index held before are read."""
    fd = open_regular(index, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size
        if records is not None:
            sync_records(records)
            os.fdatasync(fd)
        header, entry_size = index_format(os.pread(fd, len(INDEX_HEADER), 0))
        count = max(0, length - header) // entry_size
        keys: List[Tuple[float, str]] = []
        while count:
            first = max(0, count - INDEX_BLOCK_ENTRIES)
            block = os.pread(fd, (count - first) * entry_size, header + first * entry_size)
            for number in range(count - first):
                _, stamp, digest = ENTRY_PREFIX.unpack_from(block, number * entry_size)
                if stamp >= since and digest != NO_DIGEST:
                    keys.append((stamp, dedupe_key(folder, digest)))
            if ENTRY_PREFIX.unpack_from(block, 0)[1] < since:
                break
            count = first
        return keys
    finally:
        os.close(fd)


def indexed_batches(layout: Layout, window: float, now: float,
                    files: Optional[Iterable[Path]] = None) -> Iterator[Tuple[float, str]]:
    """Yields (time stored, dedupe key) for the batches stored within the window, from every batch
    index touched within it, set-aside ones included (or from the indexes of `files` alone): what
    refills a DedupeMemory.  An index is read once it is durable (see batch_keys); one that is not a
    regular file is skipped with one line."""
    since = now - window
    if files is None:
        found = [(index, folder, layout.data_file_of_index(index, folder))
                 for index, folder, _ in layout.indexes()]
    else:
        found = [(layout.index_of(path), layout.folder_of(path), path) for path in files]
    for index, folder, data_path in found:
        try:
            if index.stat().st_mtime < since:
                continue
            unsealed = data_path is not None and not layout.is_sealed(data_path)
            yield from batch_keys(index, folder, since, data_path if unsealed else None)
        except FileNotFoundError:
            continue
        except NotRegularFile:
            log.warning("%s is not a regular file: its batches are not learnt", index)


def recover_ended_runs(layout: Layout, tag: Optional[str] = None, wait: float = 0.0) -> List[Path]:
    """Recovers the files of every run that died (of `tag`'s runs alone, with a tag, waiting up to
    `wait` for a lock another process holds a moment) and says so in their journals, so that each
    is recovered once; returns the files of every run that died, recovered now or before and not
    yet taken over (what a restarted worker tells the supervisor)."""
    recovered: List[Path] = []
    for run in layout.run_names():
        if tag is not None and Layout.tag_of_run(run) != tag:
            continue
        with run_that_ended(layout, run, wait) as record:
            if record is None or record.state not in (RunState.DIED, RunState.RECOVERED):
                continue
            files = untaken_files(layout, run, record)
            if record.state is RunState.DIED:
                for path in files:
                    recover_file(layout, path)
                mark_recovered(layout, run, record)
            recovered += files
    return recovered


def untaken_files(layout: Layout, run: str, record: RunRecord) -> List[Path]:
    """The files of an ended run (whose lock the caller holds) that are still its own: those that
    exist, less those a live run journals now (a name deleted or moved since, then reused).  The
    live journals are read after the files were found: a live run journals a file before it
    creates it."""
    # A file gone with its index kept was moved away unfinished: its copy is finished instead.
    found = [path for path in record.files if path.exists() or layout.index_path(path).exists()
             or not path.name.endswith(".gz") and layout.compressed_path(path).exists()]
    busy = live_runs_files(layout, holding=run) if found else set()
    return [path for path in found if path not in busy]


def recover_indexed(layout: Layout) -> None:
    """In a folder an earlier version kept (no listed mark: no journals), recovers every unsealed
    data file with a batch index, which covers every file that version may have left torn: it
    pruned the indexes of files it finished."""
    for index, folder, _ in list(layout.indexes()):
        data_path = layout.data_file_of_index(index, folder)
        if data_path is not None and not layout.is_sealed(data_path):
            upgrade_index(index, data_path)
            recover_file(layout, data_path)


# ---------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------
# What was stored, per routed stream and LEDGER_WINDOW of receipt: records, batches and bytes, read
# from the batch indexes (so a batch counted is a batch stored, whatever crashed), and the answers
# that stored nothing (retries already stored, refusals by status).  Every worker writes its own
# files; read_ledger adds them up, and a fleet's are added up the same way (fleet_ledger).
#
# What the ledger reads and writes, and who calls it, when (each name from Layout):
#   .dsreceiver/batches/FOLDER/NAME.idx      the batch indexes, written by Storage with each batch;
#                                            folded here (fold_index) into rows
#   .dsreceiver/ledger/FOLDER/NAME.json      a pruned index's rows (LEDGER_FORMAT): write_summary,
#                                            by housekeeping's prune_indexes, before it deletes
#                                            the index
#   .dsreceiver/answers/DAY[TAG].jsonl       a process's answers that stored nothing
#                                            (LEDGER_FORMAT): counted by LedgerAnswers as pushes are
#                                            answered, appended by housekeeping's save_answers every
#                                            minute and at stop
#   .dsreceiver/reconciled.json              the last reconcile's totals by stream ID
#                                            (RECONCILED_FORMAT): save_reconciled, by reconcile;
#                                            read_reconciled, by the status page and /metrics
# Retention deletes the first three with the data they count (Housekeeper.apply_retention); the
# shipping listing names the index or summary of each sealed file (Layout.ledger_files_of).

# The ledger counts by windows of receipt this long (UTC-aligned, as Akamai's upload metrics).
LEDGER_WINDOW = 300
# Ledger files, version 2: a row's route and stream apart (version 1's "stream" held ROUTE/ID).
LEDGER_FORMAT = 2
RECONCILED_FORMAT = 1
# (routed stream, start of the window in Unix seconds).
LedgerKey = Tuple[RoutedStream, int]
# The routed stream of an answer whose stream is not known (a push refused before it was read).
NO_STREAM = RoutedStream("", "")


class LedgerRow(Fields):
    """The ledger's counts of one routed stream in one window."""

    def __init__(self, records: int = 0, batches: int = 0, stored_bytes: int = 0,
                 duplicates: int = 0, refused: Optional[Dict[str, int]] = None) -> None:
        self.records = records
        self.batches = batches
        self.stored_bytes = stored_bytes
        # Retries answered 200 as already stored.
        self.duplicates = duplicates
        # HTTP status -> pushes refused.
        self.refused: Dict[str, int] = refused if refused is not None else {}

    def add(self, other: LedgerRow) -> None:
        """Adds another row of the same stream and window (another worker's, file's or host's)."""
        self.records += other.records
        self.batches += other.batches
        self.stored_bytes += other.stored_bytes
        self.duplicates += other.duplicates
        for status, number in other.refused.items():
            self.refused[status] = self.refused.get(status, 0) + number

    def to_wire(self, key: LedgerKey) -> Dict[str, Any]:
        """The row as one JSON object of the ledger's format (see README, "Did we get
        everything?")."""
        return {"window": iso_window(key[1]), "route": key[0].route, "stream": key[0].stream,
                "records": self.records, "batches": self.batches, "bytes": self.stored_bytes,
                "duplicates": self.duplicates, "refused": self.refused}

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> Tuple[LedgerKey, LedgerRow]:
        """Reads to_wire()'s object (any count may be left out), or version 1's, whose "stream"
        held ROUTE/ID."""
        if "route" in data:
            routed = RoutedStream(str(data["route"]), str(data["stream"]))
        else:
            route, _, stream = str(data["stream"]).rpartition("/")
            routed = RoutedStream(route, stream)
        return ((routed, parse_window(data["window"])),
                cls(int(data.get("records", 0)), int(data.get("batches", 0)),
                    int(data.get("bytes", 0)), int(data.get("duplicates", 0)),
                    {str(status): int(number)
                     for status, number in data.get("refused", {}).items()}))


def iso_window(window: int) -> str:
    """A window's start as Akamai's aggregationTime reads, in UTC: 2026-11-27T15:05:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(window))


def parse_window(text: str) -> int:
    """The Unix time of a UTC time written 2026-11-27T15:05[:00][Z] (Akamai's aggregationTime)."""
    import calendar

    text = text.strip().rstrip("Z")
    for pattern in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(text, pattern))
        except ValueError:
            continue
    raise ValueError("not a UTC time such as 2026-11-27T15:05:00Z: %r" % text)


def add_rows(into: Dict[LedgerKey, LedgerRow], rows: Dict[LedgerKey, LedgerRow]) -> None:
    """Adds rows into a ledger."""
    for key, row in rows.items():
        into.setdefault(key, LedgerRow()).add(row)


def fold_index(entries: Sequence[IndexEntry], folder: str) -> Dict[LedgerKey, LedgerRow]:
    """The ledger rows of one data file's index entries; `folder` is the data file's."""
    route, partition = Layout.split_folder(folder)
    rows: Dict[LedgerKey, LedgerRow] = {}
    previous_end = 0
    for entry in entries:
        if entry.end < previous_end:
            previous_end = 0  # the index was started afresh (copytruncate)
        stored_bytes, previous_end = entry.end - previous_end, entry.end
        if entry.records == UNCOUNTED:
            continue
        stream = entry.stream
        if stream in (UNKNOWN_STREAM, MIXED_STREAM) and partition is not None:
            # A format-1 entry names no stream, and stream 1's read as 'mixed' in formats 2 and 3:
            # the folder tells (a push of either kind has a folder of that name).
            stream = partition
        key = (RoutedStream(route, stream), int(entry.stamp // LEDGER_WINDOW * LEDGER_WINDOW))
        row = rows.setdefault(key, LedgerRow())
        row.records += entry.records
        row.batches += 1
        row.stored_bytes += stored_bytes
    return rows


def write_summary(layout: Layout, index: Path, folder: str) -> None:
    """Writes the ledger rows of an index about to be pruned, atomically, where read_ledger finds
    them: the ledger outlives the indexes, as long as the data it describes."""
    rows = fold_index(read_index(index.read_bytes()), folder)
    summary = layout.summary_path(index)
    layout.make_folder(summary.parent)
    document = {"format": LEDGER_FORMAT, "index": index.name, "folder": folder,
                "rows": [row.to_wire(key) for key, row in sorted(rows.items())]}
    temp = summary.with_name(summary.name + ".tmp")
    with layout.create_file(temp) as handle:
        handle.write(json.dumps(document).encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(str(temp), str(summary))
    fsync_directory(summary.parent)


class LedgerAnswers:
    """The ledger's counts of the answers that store nothing (a retry answered as already stored,
    a refusal by status), by routed stream and LEDGER_WINDOW, every one of them (the metrics' cap
    on streams is theirs alone), until housekeeping saves them (see append_answers)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.counts: Dict[LedgerKey, Dict[str, int]] = {}
        self.lock = threading.Lock()

    def count(self, routed: Optional[RoutedStream], answer: str) -> None:
        """Counts an answer: 'duplicates', or the HTTP status of a refusal (NO_STREAM when the
        push's stream is not known)."""
        key = (routed or NO_STREAM, int(self.clock() // LEDGER_WINDOW * LEDGER_WINDOW))
        with self.lock:
            counts = self.counts.setdefault(key, {})
            counts[answer] = counts.get(answer, 0) + 1

    def take(self) -> Dict[LedgerKey, Dict[str, int]]:
        """Returns and forgets the counts since the last call."""
        with self.lock:
            counts, self.counts = self.counts, {}
        return counts


def append_answers(layout: Layout, answers: Dict[LedgerKey, Dict[str, int]]) -> None:
    """Appends answer counts (see LedgerAnswers.take) to this process's answers file of their UTC
    day, and syncs it."""
    by_day: Dict[str, List[bytes]] = {}
    for (routed, window), counts in sorted(answers.items()):
        refused = {status: number for status, number in counts.items() if status != "duplicates"}
        line = {"window": iso_window(window), "route": routed.route, "stream": routed.stream,
                "duplicates": counts.get("duplicates", 0), "refused": refused}
        day = time.strftime("%Y-%m-%d", time.gmtime(window))
        by_day.setdefault(day, []).append(json.dumps(line).encode("utf-8") + b"\n")
    for day, lines in by_day.items():
        path = layout.answers_path(day)
        layout.make_folder(path.parent)
        with layout.create_file(path, append=True) as handle:
            handle.write(b"".join(lines))
            handle.flush()
            os.fsync(handle.fileno())


# What a reconciled.json holds per stream (see save_reconciled); larger numbers are no count or
# time (2**53: exact as a float).  Its last reading, by path: (inode, size, mtime), the streams.
RECONCILED_KEYS = ("delivered", "stored", "missing", "extra", "failed", "windows_missing", "at",
                   "since", "until")
RECONCILED_NEEDED = ("at", "delivered", "stored", "missing", "failed")
RECONCILED_MAX = float(1 << 53)
RECONCILED_READ: Dict[str, Tuple[Tuple[int, int, int], Dict[str, Dict[str, float]]]] = {}


def read_reconciled(layout: Layout) -> Dict[str, Dict[str, float]]:
    """Each stream's last reconcile totals by stream ID, with when it ran ("at") and its range
    ("since", "until"); empty when there was none.  What a hand edit, a truncation, an older format
    or a hostile answer left there (NaN, 1e999, huge numbers, odd stream IDs) is left out, said in
    one log line per version of the file: the status page and /metrics do without it."""
    path = layout.reconciled_path
    try:
        facts = os.stat(str(path))
        version = (facts.st_ino, facts.st_size, facts.st_mtime_ns)
        cached = RECONCILED_READ.get(str(path))
        if cached is not None and cached[0] == version:
            return dict(cached[1])
        streams, problem = reconciled_streams(path.read_bytes())
    except OSError:
        return {}
    if problem:
        log.warning("%s: %s: left out of the status page and /metrics (the next reconcile"
                    " rewrites it)", path, problem)
    RECONCILED_READ[str(path)] = (version, streams)
    return dict(streams)


def reconciled_streams(data: bytes) -> Tuple[Dict[str, Dict[str, float]], str]:
    """The valid streams of a reconciled.json, at most MAX_STREAM_LABELS (the newest), and what
    was wrong with the rest ('' when nothing)."""
    try:
        document = json.loads(data, parse_constant=lambda name: math.nan)
        listed = document["streams"] if document.get("format") == RECONCILED_FORMAT else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}, "not a reconcile result"
    if not isinstance(listed, dict):
        return {}, "not a reconcile result of this version"
    streams: Dict[str, Dict[str, float]] = {}
    refused = 0
    for stream, totals in listed.items():
        numbers = ({key: totals[key] for key in RECONCILED_KEYS if key in totals}
                   if isinstance(totals, dict) else {})
        # NaN fails the comparison; bool is not a count.
        if (STREAM_ID_RE.fullmatch(stream) and all(key in numbers for key in RECONCILED_NEEDED)
                and all(type(number) in (int, float) and 0 <= number <= RECONCILED_MAX
                        for number in numbers.values())):
            streams[stream] = {key: float(number) for key, number in numbers.items()}
        else:
            refused += 1
    newest = sorted(streams, key=lambda stream: streams[stream]["at"], reverse=True)
    dropped = len(newest) - MAX_STREAM_LABELS
    kept = {stream: streams[stream] for stream in newest[:MAX_STREAM_LABELS]}
    words = (["%d streams whose entry is not a stream ID with counts" % refused] if refused
             else []) + (["%d streams beyond %d" % (dropped, MAX_STREAM_LABELS)] if dropped > 0
                         else [])
    return kept, "; ".join(words)


def read_ledger(root: Path, since: float = 0, until: float = float("inf")) -> Dict[LedgerKey,
                                                                                      LedgerRow]:
    """The ledger of one output folder, every worker's files added up, for the windows that start
    in [since, until)."""
    layout = Layout(root)
    ledger: Dict[LedgerKey, LedgerRow] = {}
    for index, folder, _ in list(layout.indexes()):
        if layout.summary_path(index).exists():
            continue  # pruned but for the unlink: the summary counts it
        try:
            add_rows(ledger, fold_index(read_index(index.read_bytes()), folder))
        except FileNotFoundError:
            continue
    for summary in layout.summaries():
        try:
            document = json.loads(summary.read_bytes())
            rows = dict(LedgerRow.from_wire(row) for row in document["rows"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError("cannot read the ledger file %s: %s %s"
                              % (summary, type(exc).__name__, exc)) from None
        add_rows(ledger, rows)
    for answers in layout.answer_files():
        for number, line in enumerate(answers.read_bytes().splitlines(), 1):
            try:
                key, row = LedgerRow.from_wire(json.loads(line))
            except (ValueError, KeyError) as exc:
                # A line torn by a crash: the counts of one minute's answers, not of records.
                log.warning("%s line %d is not a ledger row, skipped: %s", answers, number, exc)
                continue
            add_rows(ledger, {key: row})
    return {key: row for key, row in ledger.items() if since <= key[1] < until}


def fleet_ledger(roots: Sequence[Path], since: float = 0,
                 until: float = float("inf")) -> Dict[LedgerKey, LedgerRow]:
    """The ledgers of output folders (one host's, or a fleet's), added up."""
    ledger: Dict[LedgerKey, LedgerRow] = {}
    for root in roots:
        add_rows(ledger, read_ledger(root, since, until))
    return ledger


def save_reconciled(roots: Sequence[Path], totals: Dict[str, Dict[str, int]], at: float,
                    since: float, until: float) -> None:
    """Leaves each stream's reconcile totals (RECONCILED_KEYS), with when (at) and over what range,
    in each output folder, where the status page and /metrics read them (read_reconciled); other
    streams keep their last result.  At most MAX_STREAM_LABELS streams are kept, those with
    records lost first, then the newest."""
    found = {stream: dict(counts, at=at, since=since, until=until)
             for stream, counts in totals.items()}
    for root in roots:
        save_reconciled_in(Layout(root), found)


def save_reconciled_in(layout: Layout, found: Dict[str, Dict[str, float]]) -> None:
    """save_reconciled's work in one output folder."""
    target = layout.reconciled_path
    try:
        kept = dict(read_reconciled(layout), **found)
        ranked = sorted(kept, key=lambda stream: (kept[stream]["missing"] + kept[stream]["failed"]
                                                  > 0, kept[stream]["at"]), reverse=True)
        document = {"format": RECONCILED_FORMAT,
                    "streams": {stream: kept[stream] for stream in
                                sorted(ranked[:MAX_STREAM_LABELS], key=lambda s: (len(s), s))}}
        write_atomically(target, json.dumps(document).encode("utf-8") + b"\n")
    except OSError as exc:
        log.warning("cannot save the verdicts for the status page in %s: %s", target,
                    describe_os_error(exc))


# ---------------------------------------------------------------------------
# Storage: sealing
# ---------------------------------------------------------------------------
# What a finished file's manifest says, read from its index and, where that does not tell, from
# the file itself, in pieces.

# The version of the manifests' format, its first key.
MANIFEST_FORMAT = 1


# What a read back reads at a time: holding the GIL a quarter of a millisecond each, its scan lets
# the digest beside it (and the serving threads) run most (see digest_and_read_back).
READ_BACK_CHUNK = 256 << 10
# What the digest reads at a time: fewer turns for the GIL beside a read back (1.33 against 1.28
# GB/s together here).
DIGEST_CHUNK = 4 << 20


def stop_point(stopped: Optional[threading.Event]) -> None:
    """Raises InterruptedError once `stopped` is set: a stop never waits for a large file (the
    next start finishes it again)."""
    if stopped is not None and stopped.is_set():
        raise InterruptedError("stopping")


def file_digest(path: Path, stopped: Optional[threading.Event] = None) -> Tuple[str, int]:
    """The SHA-256 (hex) and size of a file's bytes as they are on disk, in one pass (hashlib lets
    other threads run meanwhile)."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(DIGEST_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        for length in iter(lambda: handle.readinto(buffer), 0):
            stop_point(stopped)
            digest.update(view[:length])
            size += length
    return digest.hexdigest(), size


# A byte range of a data file: [start, end).
Span = Tuple[int, int]


class SealPlan(NamedTuple):
    """What a data file's batch index tells its manifest, and what sealing must read back."""

    # The records the index counts; None when it does not count them all (format 1, no index).
    records: Optional[int]
    # The event times of the batches whose range the index keeps.
    events: List[float]
    # The batches whose event times must be read, as byte ranges of the records; None: the whole
    # file, as one batch (no index).
    spans: Optional[List[Span]]


def seal_plan(entries: Optional[List[IndexEntry]]) -> SealPlan:
    """The SealPlan of a batch index's entries (None when there is no index)."""
    if entries is None:
        return SealPlan(None, [], None)
    counted = all(entry.records != UNCOUNTED for entry in entries)
    events: List[float] = []
    spans: List[Span] = []
    start = 0
    for entry in entries:
        if math.isnan(entry.first_event):
            spans.append((start, entry.end))
        else:
            events += [moment for moment in (entry.first_event, entry.last_event)
                       if moment != NO_EVENTS[0]]
        start = entry.end
    return SealPlan(sum(entry.records for entry in entries) if counted else None, events, spans)


class RecordScan:
    """Finds the event times in a data file's records and counts them (unless `count` is False:
    the index counted them), fed the file's bytes piece by piece, each read where it lies.  Times
    are read in `spans` (the batches the index does not tell; None: the whole file as one batch),
    each batch's by the time key of EVENT_TIME_KEYS its first record has, as a push's would be:
    none when that record is no JSON object (STRUCTURED records as sent say nothing a visitor
    could not have written)."""

    def __init__(self, count: bool = True, spans: Optional[Sequence[Span]] = None) -> None:
        self.count = count
        self.spans = list(spans) if spans is not None else [(0, sys.maxsize)]
        # The first span not yet read to its end, and its batch's time key.
        self.span = 0
        self.pattern: Optional[re.Pattern[bytes]] = None
        self.records = 0
        self.events: List[float] = []
        # The start of a record the pieces cut, in pieces (a long record is joined once).
        self.carry: List[bytes] = []
        self.carried = 0
        # The file offset of the next byte fed.
        self.fed = 0

    def feed(self, chunk: bytes) -> None:
        """Reads the records that `chunk` ends, in place (only a record the pieces cut is copied
        whole); the rest waits for the next piece."""
        base, self.fed = self.fed, self.fed + len(chunk)
        start = 0
        if self.carried:
            start = chunk.find(b"\n") + 1
            if not start:
                self.carry.append(chunk)
                self.carried += len(chunk)
                return
            record = b"".join(self.carry) + chunk[:start]
            self._scan(record, 0, len(record), base - self.carried)
            self.carry, self.carried = [], 0
        cut = chunk.rfind(b"\n", start) + 1
        if cut > start:
            self._scan(chunk, start, cut, base)
        if len(chunk) > max(cut, start):
            self.carry.append(chunk[max(cut, start):])
            self.carried += len(chunk) - max(cut, start)

    def finish(self) -> Tuple[int, List[float]]:
        """The records counted (0 unless `count`) and the event times found (a torn last record,
        without its LF, is not counted; its time is read)."""
        if self.carried:
            record = b"".join(self.carry)
            self._scan(record, 0, len(record), self.fed - self.carried)
            self.carry, self.carried = [], 0
        return self.records, self.events

    def _scan(self, data: bytes, start: int, end: int, base: int) -> None:
        """Reads data[start:end], whole records at file offset base + start."""
        if self.count:
            self.records += data.count(b"\n", start, end)
        here, stop = base + start, base + end
        while self.span < len(self.spans):
            first, last = self.spans[self.span]
            if first >= stop:
                return
            low, high = max(first, here) - base, min(last, stop) - base
            if low < high:
                if first >= here:
                    self.pattern = record_time_pattern(data, low, high)
                if self.pattern is not None:
                    self.events += [moment for moment in times_range(
                        self.pattern.findall(data, low, high)) if moment != NO_EVENTS[0]]
            if last > stop:
                return
            self.span += 1


def record_time_pattern(data: bytes, start: int, end: int) -> Optional[re.Pattern[bytes]]:
    """The RECORD_TIME_RES pattern of the time key the record at data[start:] has; None when it is
    no JSON object or has none."""
    if data[start:start + 1] != b"{":
        return None
    newline = data.find(b"\n", start, end)
    first = data[start:newline if newline >= 0 else end]
    return next((pattern for pattern in RECORD_TIME_RES if pattern.search(first)), None)


def read_back(path: Path, count: bool = True, spans: Optional[Sequence[Span]] = None,
              stopped: Optional[threading.Event] = None) -> Tuple[int, List[float]]:
    """The records of a data file (gunzip'd when it ends in .gz; 0 unless `count`) and the event
    times found in `spans` of them, by reading them (see RecordScan).  A damaged .gz raises
    OSError, as an unreadable file does."""
    scan = RecordScan(count, spans)
    with (gzip.open(str(path), "rb") if path.name.endswith(".gz") else path.open("rb")) as handle:
        try:
            for chunk in iter(lambda: handle.read(READ_BACK_CHUNK), b""):
                stop_point(stopped)
                scan.feed(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise OSError("damaged gzip data (%s)" % exc) from None
    return scan.finish()


def digest_and_read_back(path: Path, count: bool, spans: Optional[Sequence[Span]],
                         stopped: Optional[threading.Event] = None
                         ) -> Tuple[str, int, Tuple[int, List[float]]]:
    """file_digest() and read_back() of one file at once, the digest in a thread of its own
    (hashlib lets go of the GIL): it takes about as long as the slower of the two."""
    from concurrent.futures import ThreadPoolExecutor  # here: only a read back needs it

    with ThreadPoolExecutor(1, thread_name_prefix="digest") as pool:
        digest = pool.submit(file_digest, path, stopped)
        read = read_back(path, count, spans, stopped)
        sha256, size = digest.result()
    return sha256, size, read


def seal_facts(path: Path, index: Path, now: float,
               scanned: Optional[Tuple[int, List[float]]] = None,
               stopped: Optional[threading.Event] = None) -> Dict[str, Any]:
    """What the manifest of a finished data file says: its records, its size and the SHA-256 of its
    bytes as they are on disk, when its first and last batches were received (from its batch index,
    None once that is pruned), and its earliest and latest event times (each record's own time key:
    see RecordScan), all times in Unix seconds.  When the index tells records and event times, or
    `scanned` tells the rest (a RecordScan of the records as they were compressed, by the same
    index's SealPlan), sealing reads the file once, for its digest; else it reads the records back
    beside it (the whole file as one batch when it is a .gz of --store gzip: its index counts
    compressed bytes).  A stop interrupts it (InterruptedError)."""
    try:
        raw = read_regular(index)
    except FileNotFoundError:
        raw = b""
    entries = read_index(raw) if raw else None
    plan = seal_plan(entries)
    if scanned is not None or (plan.records is not None and plan.spans == []):
        sha256, size = file_digest(path, stopped)
        read = scanned or (0, [])
    else:
        sha256, size, read = digest_and_read_back(
            path, plan.records is None, None if path.name.endswith(".gz") else plan.spans,
            stopped)
    records = plan.records if plan.records is not None else read[0]
    events = plan.events + read[1]
    received = [entry.stamp for entry in entries or []]
    stream = Layout.split_folder(path.parent.name)[1]
    return {"format": MANIFEST_FORMAT, "file": path.name,
            "stream": None if stream == ULS_STREAM else stream, "records": records,
            "bytes": size, "sha256": sha256,
            "first_received": min(received, default=None),
            "last_received": max(received, default=None),
            "first_event": min(events, default=None), "last_event": max(events, default=None),
            "sealed_at": now, "index": index.name if raw else None}


# ---------------------------------------------------------------------------
# Storage: housekeeping
# ---------------------------------------------------------------------------
HOUSEKEEPING_INTERVAL = 1.0
RETENTION_INTERVAL = 60.0
# How often housekeeping looks for runs that ended since (a worker's, an upgrade's old process).
RUNS_INTERVAL = 5.0
# A file that could not be finished is tried again after this long, twice as long each time up to
# FINISH_RETRY_MAX.
FINISH_RETRY = 10.0
FINISH_RETRY_MAX = 600.0
LISTED_MARK = b"dsreceiver listed 1\n"
# zlib level of --compress-rotated: 4x faster than gzip's 9 (70 against 18 MB/s a core on log
# lines), 6% larger.
ROTATED_GZIP_LEVEL = 6


@contextlib.contextmanager
def finishing_lock(path: Path) -> Iterator[bool]:
    """Holds an exclusive flock on a data file while it is finished, so that no two processes (an
    earlier run's housekeeping still going, another instance) ever finish it at once; yields False
    when another holds it."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def same_inode_and_size(path: Path, inode: int, size: int) -> bool:
    """Whether `path` still names the file `inode`, `size` bytes long (not moved, nor truncated)."""
    try:
        status = os.stat(str(path), follow_symlinks=False)
    except FileNotFoundError:
        return False
    return status.st_ino == inode and status.st_size == size


def same_records(plain: Path, compressed: Path) -> bool:
    """Whether a .gz holds exactly a plain file's bytes, read side by side (a damaged .gz does
    not, nor anything that is no regular file: never opened)."""
    try:
        with os.fdopen(open_regular(plain, os.O_RDONLY), "rb") as original, \
                os.fdopen(open_regular(compressed, os.O_RDONLY), "rb") as packed, \
                gzip.GzipFile(fileobj=packed, mode="rb") as copy:
            while True:
                chunk = original.read(READ_BACK_CHUNK)
                if copy.read(len(chunk) or 1) != chunk:
                    return False
                if not chunk:
                    return True
    except (OSError, EOFError, zlib.error):
        return False


def day_start(day: str) -> float:
    """The Unix time a UTC day (2026-11-27) starts."""
    import calendar

    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


def utc_day(moment: float) -> str:
    """The UTC day of a Unix time: 2026-11-27."""
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


def listed_paths(layout: Layout, seal_list: Path) -> List[Path]:
    """The data files a seal list names, each once (a line torn by a crash, or one that names no
    data file of this folder, is left out)."""
    try:
        data = read_regular(seal_list)
    except FileNotFoundError:
        return []
    texts = dict.fromkeys(line.decode("utf-8", "replace") for line in data.split(b"\n")[:-1])
    return [path for path in map(layout.from_relative, texts) if path is not None]


class Housekeeper:
    """Upkeep in a background thread: closes files whose period passed, finishes the files no push
    will write again (gzips them with --compress-rotated, then seals them: see seal), deletes
    expired ones and their ledger files (--retention-days), prunes old batch indexes and saves the
    ledger's answer counts every minute.

    Nothing here touches a file that a live process writes, and every file
    has one finisher: the files this process closes are its own; the files
    of a run that is gone are adopted (see adopt_ended_runs) by the process
    of its tag, or by the first worker (or the only process) when no worker
    has that tag now; that process also walks an earlier version's folder,
    once.  Each pass costs what is due, never what is kept: finishing takes
    a queue, retention reads the seal lists of the days that expire,
    pruning walks the index folder (the dedupe window's files and the
    unfinished ones), and looking for runs that ended lists the runs.
    Pushes are answered meanwhile: none of this runs before serving, gzip
    and SHA-256 let the serving threads run, and reading event times back
    (see RecordScan) holds the GIL for about a quarter of a millisecond a
    piece.  (A lower priority for this thread would stall them: preempted
    while it holds the GIL, it holds them all.)
    """

    def __init__(self, layout: Layout, storage: Optional[Storage] = None, compress: bool = False,
                 retention_days: float = 0, dedupe_window: float = 0,
                 clock: Callable[[], float] = time.time,
                 take_answers: Optional[Callable[[], Dict[LedgerKey, Dict[str, int]]]] = None,
                 tags: Sequence[str] = ("",),
                 learn: Optional[Callable[[List[Tuple[float, str]]], None]] = None) -> None:
        self.layout = layout
        # The tags of every worker now (see owns).
        self.tags = tags
        # Where the ledger's answer counts come from (LedgerAnswers.take).
        self.take_answers = take_answers
        # Where the batches of an adopted run go: the dedupe window.
        self.learn = learn
        self.storage = storage
        # The run whose journal takes the files adopted here: the one storage writes.
        self.journal = storage.journal if storage is not None else RunJournal(layout)
        # --store gzip files are gzip'd as they are written.
        self.compress = compress and not layout.store_gzip
        self.retention_days = retention_days
        self.dedupe_window = dedupe_window
        self.clock = clock
        # Data files no push writes any more, still to compress or seal, by the name they were
        # created (and journalled) with.
        self.to_finish: List[Path] = []
        # Files that could not be finished: when to try again, and the delay before that.
        self.retry_at: Dict[Path, Tuple[float, float]] = {}
        self.stopped = threading.Event()
        # Set to run upkeep now: a file was finished, or the thread is to stop.
        self.wake = threading.Event()
        self.thread: Optional[threading.Thread] = None
        if storage is not None:
            storage.on_finished = self.wake.set

    @property
    def first(self) -> bool:
        """Whether this is the first worker, or the only process: the one that looks after what
        every process shares (tags no worker has, retention, pruning, an earlier version's
        folder)."""
        return self.layout.tag == self.tags[0]

    def start(self) -> None:
        """Starts the upkeep thread: it takes over what ended runs left, then runs every second,
        and at once when a file is finished."""
        self.thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stops the upkeep thread and saves the last answer counts (and ends its own run when it
        has one)."""
        self.stopped.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join()
        try:
            self.save_answers()
        except OSError as exc:
            log.error("cannot save the ledger's answer counts: %s", describe_os_error(exc))
        if self.storage is None:
            self.journal.close(clean=True)

    def _run(self) -> None:
        next_runs = next_retention = 0.0
        while not self.stopped.is_set():
            try:
                if time.monotonic() >= next_runs:
                    self.queue_earlier_files()
                    next_runs = time.monotonic() + RUNS_INTERVAL
                if self.storage is not None:
                    self.storage.retire_stale()
                self.finish_files()
                if time.monotonic() >= next_retention:
                    if self.first:
                        if self.retention_days:
                            self.apply_retention()
                        self.prune_indexes()
                    self.save_answers()
                    next_retention = time.monotonic() + RETENTION_INTERVAL
            except Exception:
                log.exception("housekeeping failed; will try again")
            self.wake.wait(HOUSEKEEPING_INTERVAL)
            self.wake.clear()

    def owns(self, tag: str) -> bool:
        """Whether this process takes over the runs of `tag`: its own, or (the first worker, or
        the only process) a tag no worker has now."""
        return tag == self.layout.tag or (self.first and tag not in self.tags)

    def queue_earlier_files(self) -> None:
        """Queues what processes that are gone left unfinished: the runs this process adopts, and
        (the first process) an earlier version's folder, walked once."""
        self.adopt_ended_runs()
        if self.first and not self.layout.listed_mark.exists():
            self.list_unlisted_files()

    def _queue(self, paths: Iterable[Path]) -> None:
        queued = set(self.to_finish)
        self.to_finish += [path for path in paths if path not in queued]

    def adopt_ended_runs(self) -> None:
        """Takes over the runs that are gone and that this process owns: their unfinished files
        are recovered (a run that died first says so; one that ended cleanly is checked all the
        same, which costs an index entry and a sync a file: nothing is finished that is not
        exactly its acknowledged batches), journalled here, their recent batches learnt by the
        dedupe window, and the run's journal removed; then its files are finished here."""
        for run in self.layout.run_names():
            if run == self.journal.name or not self.owns(Layout.tag_of_run(run)):
                continue
            with run_that_ended(self.layout, run) as record:
                if record is None:
                    continue
                unfinished = [path for path in untaken_files(self.layout, run, record)
                              if not self.layout.is_sealed(path)]
                for path in unfinished:
                    recover_file(self.layout, path)
                if record.state is RunState.DIED:
                    record = mark_recovered(self.layout, run, record)
                if unfinished:
                    self.journal.opened(unfinished)
                if self.learn is not None and self.dedupe_window:
                    self.learn(list(indexed_batches(self.layout, self.dedupe_window, self.clock(),
                                                    unfinished)))
                remove_run(self.layout, run, record)
            self._queue(unfinished)
            log.info("took over run %s (%s): %d files to finish", run, record.state.value,
                     len(unfinished))

    def journalled_name(self, path: Path) -> Path:
        """The name a data file was created (and journalled) with: a --compress-rotated .gz's plain
        name, whose index it kept."""
        plain = path.with_name(path.name[:-len(".gz")])
        if path.name.endswith(".gz") and not self.layout.index_path(path).exists() and (
                self.layout.index_path(plain).exists() or plain.exists()):
            return plain
        return path

    def list_unlisted_files(self) -> None:
        """Once, in a folder an earlier version kept (no listed mark): journals its unfinished data
        files, recovered first (that version may have left them torn), lists its sealed ones for
        retention and shipping, removes what interrupted compressions and seals left beside sealed
        files, and writes the mark.  A stop cuts it short; the next start walks again."""
        unfinished: List[Path] = []
        sealed: Dict[str, List[Path]] = {}
        temps: List[Tuple[Path, Path]] = []
        for folder, subfolders, names in os.walk(str(self.layout.root)):
            if self.stopped.is_set():
                return
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for file_name in sorted(names):
                path = Path(folder, file_name)
                leftover = Layout.leftover_of(path)
                if leftover is not None:
                    temps.append((path, leftover))
                elif self.layout.parse(file_name) is None or not path.is_file() \
                        or path.is_symlink():
                    continue
                elif self.layout.manifest_path(path).exists():
                    manifest_time = self.layout.manifest_path(path).stat().st_mtime
                    sealed.setdefault(utc_day(manifest_time), []).append(path)
                else:
                    unfinished.append(self.journalled_name(path))
        # Read after the walk: a file a live process created during it is in its journal by then.
        busy = live_runs_files(self.layout)
        unfinished = [path for path in dict.fromkeys(unfinished) if path not in busy]
        for path in unfinished:
            if self.stopped.is_set():
                return
            recover_file(self.layout, path)
        if unfinished:
            self.journal.opened(unfinished)
        for day, paths in sorted(sealed.items()):
            self.list_sealed(day, paths)
        for temp, data_path in temps:
            if self.layout.is_sealed(data_path):
                temp.unlink()
        with self.layout.create_file(self.layout.listed_mark) as handle:
            handle.write(LISTED_MARK)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_directory(self.layout.state_dir)
        self._queue(unfinished)
        if unfinished or sealed:
            log.info("listed the files an earlier version kept: %d to finish, %d sealed",
                     len(unfinished), sum(len(paths) for paths in sealed.values()))

    def finish_files(self) -> None:
        """Gzips (with --compress-rotated) and seals every file no push writes any more; removes an
        empty one (a crash's, or one a retry opened).  A file that cannot be finished now is tried
        again later, less and less often."""
        if self.storage is not None:
            self._queue(self.storage.take_finished())
        queue, self.to_finish = self.to_finish, []
        now = time.monotonic()
        for path in queue:
            if self.stopped.is_set() or self.retry_at.get(path, (0.0, 0.0))[0] > now:
                self.to_finish.append(path)
                continue
            try:
                done = self._finish(path)
            except InterruptedError:
                done = False
            except NotRegularFile:
                log.error("%s is not a regular file: not finished, never opened", path)
                self.journal.finished(path)
                done = True
            except OSError as exc:
                done = self._failed(path, describe_os_error(exc))
            except Exception as exc:  # one file's surprise never keeps the others unsealed
                done = self._failed(path, "unexpected %s" % type(exc).__name__, exc)
            if done:
                self.retry_at.pop(path, None)
            else:
                self.to_finish.append(path)

    def _failed(self, path: Path, reason: str, surprise: Optional[Exception] = None) -> bool:
        """Leaves nothing half-written of a file that could not be finished, and says when it is
        tried again, in one line (with the traceback of a surprise); returns False (not done)."""
        delay = min(FINISH_RETRY_MAX, 2 * self.retry_at.get(path, (0.0, FINISH_RETRY / 2))[1])
        self.retry_at[path] = (time.monotonic() + delay, delay)
        for data_path in (path, self.layout.compressed_path(path)):
            manifest = self.layout.manifest_path(data_path)
            with contextlib.suppress(OSError):
                manifest.with_name(manifest.name + ".tmp").unlink()
        log.error("cannot finish %s (trying again in %d s): %s", path, delay, reason,
                  exc_info=surprise)
        return False

    def _finish(self, path: Path) -> bool:
        """Finishes one file that no push writes any more: True once it is done (sealed, removed
        empty, gone, or handed to the copy logrotate made of it), False while another process
        finishes it, or when logrotate took it while it was compressed (its copy, next turn)."""
        if not self.layout.is_sealed(path) and self._handed_to_copy(path):
            self.journal.finished(path)
            return True
        current = self.layout.compressed_or_plain(path)
        if current.exists():
            with finishing_lock(current) as locked:
                if not locked:
                    return False  # look again next turn: sealed by then, or its finisher gone
                if not self.layout.is_sealed(path) and not self._finish_locked(path, current):
                    self.wake.set()
                    return False
        self.journal.finished(path)
        return True

    def _handed_to_copy(self, path: Path) -> bool:
        """When logrotate moved a file, or copied then truncated it, after it was closed and
        before it was finished: journals and queues the copy, and sets the index aside under the
        copy's name, so that the copy is finished in the file's place.  True when `path` is done
        with so, or is gone with no copy to be found (deleted: a warning).  A file shorter than
        its index says, with no copy, is an OSError: tried again later, never sealed with
        records it lacks."""
        copy, short = rotated_copy_of(self.layout, path)
        if copy is None:
            if not short:
                return False
            if path.exists():
                raise OSError("it holds fewer bytes than its batch index counts, and no copy of it"
                              " was found (logrotate's compress without delaycompress, or damage)")
            log.warning("%s is gone before it was finished, and no copy of it was found: not"
                        " sealed", path)
            return True
        # Journalled and queued first: whatever fails or crashes after, the copy is finished (with
        # the index when it was set aside; another finisher may have done that already).
        self.journal.opened([copy])
        self._queue([copy])
        self.wake.set()
        index = self.layout.index_path(path)
        os.replace(str(index), str(self.layout.set_aside_index_path(copy)))
        fsync_directory(index.parent)
        log.info("%s was rotated to %s before it was finished: that copy is sealed instead", path,
                 copy.name)
        if path.exists():
            self._removed_if_empty(path, path)  # copytruncate's original: no push writes it now
        return True

    def _finish_locked(self, path: Path, current: Path) -> bool:
        """Removes an empty file, or gzips (with --compress-rotated) and seals one; `path` is the
        name the file was created with, `current` the file that holds its records now.  False
        when logrotate moved or truncated it meanwhile: nothing done, its copy is to be finished."""
        if current == path and not path.name.endswith(".gz") \
                and self.layout.compressed_path(path).exists():
            current = self._settle_copy(path)
        if self._removed_if_empty(current, path):
            return True
        if (self.layout.parse(current.name) or DataName("", "", 0, False)).rotated:
            if not self.layout.manifest_path(current).exists():
                self.seal(current, self.layout.rotated_index(current))  # logrotate compresses those
            return True
        if not self.compress or current.name.endswith(".gz"):
            self.seal(current, self.layout.index_path(path))
            return True
        done = self._compress(current)
        if done is None:
            return False
        compressed, scanned = done
        with finishing_lock(compressed) as locked:
            if locked and not self.layout.manifest_path(compressed).exists():
                self.seal(compressed, self.layout.index_path(path), scanned=scanned)
        return True

    def _settle_copy(self, plain: Path) -> Path:
        """A .gz beside an unfinished data file is its copy only when it holds exactly its bytes
        (a compression cut short after its rename): then the original goes, as the compression
        would have done.  Anything else (junk, someone's gzip -k of a current file) is moved
        aside, never taken for the records.  Returns the file that holds the records."""
        compressed = self.layout.compressed_path(plain)
        if same_records(plain, compressed):
            plain.unlink()
            fsync_directory(plain.parent)
            log.info("removed %s: %s holds exactly its records (a compression cut short)", plain,
                     compressed.name)
            return compressed
        aside = self.layout.aside_path("foreign", compressed, time.time())
        self.layout.make_folder(aside.parent)
        os.replace(str(compressed), str(aside))
        fsync_directory(plain.parent)
        log.warning("moved %s to %s: it is not a copy of %s", compressed, aside, plain.name)
        return plain

    def _removed_if_empty(self, current: Path, path: Path) -> bool:
        """Removes an empty data file and its index; True when it did."""
        if current.stat().st_size:
            return False
        index = self.layout.index_path(path)
        if index.exists() and any(entry.records for entry in read_index(read_regular(index))):
            return False
        current.unlink()
        if index.exists():
            index.unlink()
        fsync_directory(current.parent)
        log.info("removed %s: it holds no record", current)
        return True

    def _compress(self, path: Path) -> Optional[Tuple[Path, Tuple[int, List[float]]]]:
        """Gzips a finished file: temporary file, fsync, rename, then remove the original; returns
        the .gz, and what sealing would read back of it, read on the way (see seal_facts); None,
        leaving no .gz, when logrotate moved or truncated the file meanwhile (its copy counts)."""
        target = self.layout.compressed_path(path)
        temp = self.layout.compression_temp_path(path)
        try:
            index = read_regular(self.layout.index_path(path))
        except FileNotFoundError:
            index = b""
        plan = seal_plan(read_index(index) if index else None)
        scan = RecordScan(plan.records is None, plan.spans)
        read = 0
        try:
            with path.open("rb") as source, self.layout.create_file(temp) as raw:
                inode = os.fstat(source.fileno()).st_ino
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                   compresslevel=ROTATED_GZIP_LEVEL) as compressed:
                    # Pieces of a read back's size: its scan holds the GIL as briefly.
                    for chunk in iter(lambda: source.read(READ_BACK_CHUNK), b""):
                        if self.stopped.is_set():
                            # A stop does not wait for a large file: the next start does it again.
                            raise InterruptedError("stopping")
                        compressed.write(chunk)
                        scan.feed(chunk)
                        read += len(chunk)
                raw.flush()
                os.fsync(raw.fileno())
            if not same_inode_and_size(path, inode, read):
                temp.unlink()
                return None
            os.replace(str(temp), str(target))
        except OSError:
            if temp.exists():
                temp.unlink()
            raise
        fsync_directory(path.parent)
        # The .gz is complete and durable: from here on it is the copy that counts, unless
        # logrotate took the file in the instant since the look above (then its copy does).  A
        # move between this look and the unlink below still leaves its copy unsealed beside the
        # sealed .gz (the unlink fails, and the next turn seals the .gz): records kept, not
        # doubled in what is shipped.
        if not same_inode_and_size(path, inode, read):
            target.unlink()
            fsync_directory(path.parent)
            return None
        path.unlink()
        fsync_directory(path.parent)
        log.info("compressed %s", target)
        return target, scan.finish()

    def seal(self, path: Path, index: Path,
             scanned: Optional[Tuple[int, List[float]]] = None) -> None:
        """Writes the manifest of a finished data file beside it, atomically: what a loader checks
        before it takes the file (see seal_facts); `index` is its batch index, `scanned` its
        records and event times when they were read already.  The file is put on this day's seal
        list first, so that no sealed file is ever missing from one."""
        manifest = self.layout.manifest_path(path)
        temp = manifest.with_name(manifest.name + ".tmp")
        facts = seal_facts(path, index, self.clock(), scanned, self.stopped)
        self.list_sealed(utc_day(self.clock()), [path])
        with self.layout.create_file(temp) as handle:
            handle.write(json.dumps(facts, indent=1).encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(str(temp), str(manifest))
        fsync_directory(manifest.parent)
        log.info("sealed %s: %d records", path, facts["records"])

    def list_sealed(self, day: str, paths: Sequence[Path]) -> None:
        """Appends data files to this process's seal list of a UTC day, durably."""
        seal_list = self.layout.seal_list_path(day)
        self.layout.make_folder(seal_list.parent)
        with self.layout.create_file(seal_list, append=True) as handle:
            # From a fresh line: a line a crash tore never swallows the next one.
            handle.write(b"\n" + b"".join(self.layout.relative(path).encode("utf-8") + b"\n"
                                           for path in paths))
            handle.flush()
            os.fdatasync(handle.fileno())

    def apply_retention(self) -> None:
        """Deletes the files sealed on a UTC day that ended more than --retention-days ago, with
        their manifests and ledger files, then that day's answers files.  Only sealed files are
        ever listed, so a file any process may still write is never deleted; and only the lists
        that are due are read."""
        cutoff = self.clock() - self.retention_days * 86400
        for day, seal_list in self.layout.seal_lists():
            if day_start(day) + 86400 > cutoff:
                continue
            for path in listed_paths(self.layout, seal_list):
                if self.layout.manifest_path(path).exists():
                    self._delete(path)
            seal_list.unlink()
        for answers in self.layout.answers_files_named():
            match = Layout.ANSWERS_NAME_RE.fullmatch(answers.name)
            if match and day_start(match.group(1)) + 86400 <= cutoff:
                answers.unlink()

    def _delete(self, path: Path) -> None:
        """Deletes an expired sealed file, its manifest and its ledger files."""
        doomed = [path, self.layout.manifest_path(path)] + self.layout.ledger_files_of(path)
        for victim in doomed:
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()
        log.info("deleted %s: sealed more than %g days ago", path, self.retention_days)

    def save_answers(self) -> None:
        """Appends the ledger's answer counts since the last call to this process's answers
        file."""
        if self.take_answers is not None:
            answers = self.take_answers()
            if answers:
                append_answers(self.layout, answers)

    def prune_indexes(self) -> None:
        """Replaces the batch indexes of finished files of past periods, once older than the dedupe
        window, by their ledger summaries, and removes the index folders left empty.  The index
        folder holds the window's files and the unfinished ones, so this walk is bounded by what
        is recent, not by what is kept."""
        cutoff = self.clock() - self.dedupe_window - RETENTION_INTERVAL
        current = self.layout.period_name(self.clock())
        for index, folder, name in list(self.layout.indexes()):
            counted = self.layout.counted_file(index, folder)
            try:
                if name.period == current or index.stat().st_mtime >= cutoff:
                    continue
                if not self.layout.is_sealed(counted) and (
                        self.layout.compressed_or_plain(counted).exists()
                        or rotated_copy_of(self.layout, counted)[0] is not None):
                    # Its manifest will want the times its batches were received, or its
                    # copy's will, when logrotate moved it away unfinished.
                    continue
                write_summary(self.layout, index, folder)
                index.unlink()
            except FileNotFoundError:
                continue
        self.layout.remove_empty_index_folders()


# ---------------------------------------------------------------------------
# Push pipeline
# ---------------------------------------------------------------------------
# A push's body in, an outcome out: no socket, no HTTP.

# The query parameter of an endpoint URL that names the stream of records carrying no stream ID
# (security events): https://logs.example.com/datastream?streamId=80001
STREAM_QUERY_PARAMETER = "streamId"


class PushFacts(NamedTuple):
    """What the pipeline is told about a push besides its body."""

    # The URL path it was sent to (its --route-by-path folder) and the client (its uploader).
    path: str
    client: str
    # Whether Content-Encoding said gzip (the magic bytes are looked at as well).
    declared_gzip: bool
    # The stream the endpoint URL names (?streamId=ID), for records that carry no stream ID.
    named_stream: Optional[str] = None
    # Whether Akamai's Unified Log Streamer sent it (its User-Agent says so): its body is envelopes.
    uls: bool = False


class PushResult(enum.Enum):
    """How a push ended."""

    STORED = "stored"
    # A retry of a batch stored within the dedupe window: not stored again.
    DUPLICATE = "duplicate"
    # DataStream's "Validate & Save" probe: nothing to store.
    PROBE = "probe"
    # The body cannot be decoded, or decodes to more than --max-decompressed-size: sending it again
    # cannot help.
    UNDECODABLE = "undecodable"
    TOO_LARGE = "too large"
    # The endpoint URL names something that is not a stream ID.
    BAD_STREAM = "bad stream"
    # Checking its records failed because of what they hold (see BatchRefused).
    REFUSED = "refused"
    # Storage failed: nothing of the push was kept, and a retry may succeed.
    STORAGE_FAILED = "storage failed"


class Outcome(NamedTuple):
    """What became of a push."""

    result: PushResult
    records: int = 0
    # The push's route and stream, once its records named it: its row on the status page, in
    # the metrics and in the ledger.
    routed: Optional[RoutedStream] = None
    # Why, in a few words, for the access log and the client.
    reason: str = ""


class GrowthWatch:
    """A push's on_growth (see PushPipeline.accept), remembering whether it raised: the handler
    abandoning the push is never taken for a surprise."""

    def __init__(self, on_growth: Callable[[int], None]) -> None:
        self.on_growth = on_growth
        self.raised = False

    def __call__(self, held: int) -> None:
        try:
            self.on_growth(held)
        except Exception:
            self.raised = True
            raise


class PushPipeline:
    """Takes a push body to its Outcome: decode, tell a probe, classify the stream, pick the folder,
    store (dedupe included), count.  Socket-free and HTTP-free, so it is tested in-process."""

    def __init__(self, settings: Settings, storage: Storage, streams: StreamCatalog,
                 metrics: Metrics, answers: Optional[LedgerAnswers] = None) -> None:
        self.settings = settings
        self.storage = storage
        self.streams = streams
        self.metrics = metrics
        # The ledger's count of retries answered as already stored.
        self.answers = answers if answers is not None else LedgerAnswers()

    def accept(self, facts: PushFacts, body: bytearray,
               on_growth: Callable[[int], None] = lambda held: None) -> Outcome:
        """Decodes and stores a push; on_growth(held) sees the decoded bytes held in memory grow,
        and may raise to abandon the push before it is stored."""
        named = facts.named_stream
        if named is not None and (not STREAM_ID_RE.fullmatch(named) or named in ("0", "1", "2")):
            return Outcome(PushResult.BAD_STREAM, reason="the URL's %s= names no stream ID: %r"
                           % (STREAM_QUERY_PARAMETER, named[:40]))
        growth = GrowthWatch(on_growth)
        try:
            push = decode_push(body, facts.declared_gzip, self.settings.max_decompressed_size,
                               self.storage.layout.spool_dir, self.storage.dedupes, growth,
                               self.settings.max_record_bytes)
        except BodyTooLarge as exc:
            return Outcome(PushResult.TOO_LARGE, reason=str(exc))
        except BodyError as exc:
            return Outcome(PushResult.UNDECODABLE, reason=str(exc))
        except Exception as exc:  # a bug that one body sets off: that body alone is refused
            if growth.raised:
                raise
            return self.refused_by_surprise(exc)
        try:
            return self.store(facts, push, growth)
        finally:
            push.batch.close()

    def refused_by_surprise(self, exc: Exception) -> Outcome:
        """The answer to a push whose body sets off an unexpected error while it is decoded: 400
        (the same bytes would set it off again on every retry DataStream makes of a 5xx), with the
        traceback logged once per kind a minute."""
        self.metrics.count("surprises")
        SURPRISES.report("a push", exc)
        return Outcome(PushResult.REFUSED, reason="its records set off an unexpected %s (logged);"
                       " they cannot be stored as sent" % type(exc).__name__)

    def store(self, facts: PushFacts, push: DecodedPush,
              growth: Optional[GrowthWatch] = None) -> Outcome:
        """Stores a decoded push's records in its stream's folder (a ULS push's in source=uls).  An
        unexpected error while telling their stream keeps them as sent, under 'unknown'; one while
        storing them is a storage failure (503: a retry may succeed)."""
        batch, metrics = push.batch, self.metrics
        if not facts.uls and batch.is_validation_probe():
            metrics.count("validation_probes")
            return Outcome(PushResult.PROBE, reason="validation probe")
        metrics.count("decoded_bytes", batch.size)
        if not batch.records:
            metrics.stored(facts.path, 0)
            return Outcome(PushResult.STORED)
        growth = growth or GrowthWatch(lambda held: None)
        try:
            if facts.uls:
                records = self.uls_records(batch, growth)
            else:
                records = self.streams.classify(batch, facts.named_stream)
        except Exception as exc:  # a bug its records set off: kept as sent, never lost
            if growth.raised:
                raise
            metrics.count("surprises")
            SURPRISES.report("telling the stream of a push (its records are kept as sent)", exc)
            batch.events = UNKNOWN_EVENTS
            records = StreamRecords(UNKNOWN_STREAM, "", batch, 0, None, never_unique)
        if records.odd_stream_id:
            # Filed as 'unknown' (never under the URL's stream): what they name is not that stream.
            metrics.count("odd_stream_ids")
        elif records.stream == UNKNOWN_STREAM and facts.named_stream is not None:
            records = records._replace(stream=facts.named_stream)
        # What is stored and counted: a security delivery's metadata object is not a record.
        count = records.batch.records
        if not count:
            metrics.stored(facts.path, 0)
            return Outcome(PushResult.STORED)
        route = folder_for_path(facts.path) if self.settings.route_by_path else ""
        folder = Layout.folder(route, records.stream if self.settings.partition_by_stream
                               or records.stream == ULS_STREAM else None)
        # Its row in the metrics, the status page and the ledger: per route too, with
        # --route-by-path.
        routed = RoutedStream(route, records.stream)
        pushed_gzip = push.pushed_gzip if records.batch is batch else None
        try:
            result = self.storage.store(folder, records.batch, pushed_gzip, records.is_unique,
                                        records.stream)
        except BatchRefused as exc:
            # Logged as any 400 is: by its access line, with this reason.
            return Outcome(PushResult.REFUSED, routed=routed, reason=str(exc))
        except (StorageError, SupervisorGone) as exc:
            metrics.count("storage_errors")
            metrics.storage_failed(str(exc))
            return Outcome(PushResult.STORAGE_FAILED, routed=routed, reason=str(exc))
        except Exception as exc:  # a bug in storing: nothing acknowledged, DataStream retries
            metrics.count("storage_errors")
            SURPRISES.report("storing a push", exc)
            reason = "unexpected %s while storing (logged)" % type(exc).__name__
            metrics.storage_failed(reason)
            return Outcome(PushResult.STORAGE_FAILED, routed=routed, reason=reason)
        if result.path is None:
            metrics.count("dedupe_hits")
            metrics.stream_deduplicated(routed)
            self.answers.count(routed, "duplicates")
            return Outcome(PushResult.DUPLICATE, count, routed,
                           "duplicate of a batch stored within the dedupe window")
        if result.kept_duplicate:
            metrics.count("dedupe_ineligible")
        metrics.stored(facts.path, count)
        metrics.stream_stored(routed, count, records.unconverted, records.newest_event,
                              facts.client, records.batch.stored_size)
        return Outcome(PushResult.STORED, count, routed)

    def uls_records(self, batch: RecordBatch, on_growth: Callable[[int], None]) -> StreamRecords:
        """A ULS push's records: one per event of its envelopes, else its body as sent (another
        --httpformat), logged once.  A copy of a batch ULS re-sends is a retry whatever its events
        hold: ULS batches are runs of events that carry their own times and IDs (see README)."""
        on_growth(2 * batch.size)  # the body and its events, in memory at once
        events = open_envelopes(batch)
        if events is None:
            self.metrics.count("uls_bodies_as_sent")
            self.streams.warn_once(ULS_STREAM, "a push from Akamai's Unified Log Streamer is not"
                                   " {\"event\": ...} envelopes, or over %d MiB decoded: stored as"
                                   " sent (give ULS its default --httpformat '{\"event\": %%s}')",
                                   ULS_MAX_BODY >> 20)
            # Its event times are not certain: they are not read back when its file is sealed.
            batch.events = NO_EVENTS
            return StreamRecords(ULS_STREAM, "", batch, 0, None, always_unique)
        newest = events.events[1] if events.events and events.events != NO_EVENTS else None
        return StreamRecords(ULS_STREAM, "", events, 0, newest, always_unique)


# ---------------------------------------------------------------------------
# HTTP parsing
# ---------------------------------------------------------------------------
# Sans-IO: functions over bytes; the socket code only feeds them.

MAX_REQUEST_LINE = 8190
MAX_HEADER_LINE = 8190
MAX_HEADER_COUNT = 100
MAX_HEAD_SIZE = 65536
MAX_CHUNK_LINE = 4096
TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)")
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")
# RFC 9110 5.5: field values are visible characters, SP, HTAB and obs-text; no other control
# character.
FIELD_VALUE_CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 2.2: the head is CRLF-delimited; a LF not preceded by CR is refused, never guessed at.
BARE_LF_RE = re.compile(rb"(?<!\r)\n")
# RFC 9112 7.1.1: chunk-size [ *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ) ].
_EXT_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*"
                           % (_EXT_TOKEN, _EXT_TOKEN, _QUOTED_STRING))


class HTTPError(Exception):
    """An error answer: status, a short reason for client and log, extra headers, whether to
    close."""

    def __init__(self, status: HTTPStatus, reason: str, headers: Sequence[Tuple[str, str]] = (),
                 close: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers
        self.close = close


def framing_error(reason: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> HTTPError:
    """An error in the message framing: after it the connection cannot be trusted, so it closes."""
    return HTTPError(status, reason, close=True)


class Request:
    """A parsed request head."""

    def __init__(self, method: str, path: str, query: str, version: Tuple[int, int],
                 headers: Dict[str, List[str]]) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers

    def header(self, name: str) -> Optional[str]:
        """Returns the single value of a header, or None; several values are joined with commas."""
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None

    def wants_close(self) -> bool:
        """Tells whether the client asked not to keep the connection alive."""
        tokens = {token.strip().lower() for token in (self.header("connection") or "").split(",")}
        if self.version >= (1, 1):
            return "close" in tokens
        return "keep-alive" not in tokens


# How a request's body is delimited: None (no body), its Content-Length, or "chunked".
Framing = Union[None, int, str]


def head_length(buffer: Bytes, scanned: int = 0) -> int:
    """Returns the length of the request head at the start of `buffer` through its empty line, or 0
    while it is incomplete; the first `scanned` bytes were looked at before.  Refuses a head past
    the size limits or with a line not ended by CRLF (RFC 9112 2.2)."""
    end = buffer.find(b"\r\n\r\n", max(0, scanned - 3))
    checked_end = len(buffer) if end < 0 else end + 4
    if BARE_LF_RE.search(buffer, max(0, scanned - 1), checked_end):
        raise framing_error("request head line not ended by CRLF")
    request_line_end = buffer.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
    if request_line_end < 0 and (end >= 0 or len(buffer) >= MAX_REQUEST_LINE + 2):
        raise framing_error("request line too long", HTTPStatus.REQUEST_URI_TOO_LONG)
    if end > MAX_HEAD_SIZE or end < 0 and len(buffer) > MAX_HEAD_SIZE:
        raise framing_error("request head too large", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    return 0 if end < 0 else end + 4


def parse_request_head(head: bytes) -> Request:
    """Parses a request line and header fields (the head without its final empty line) strictly;
    anything ambiguous is refused."""
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise framing_error("request line too long", HTTPStatus.REQUEST_URI_TOO_LONG)
    parts = request_line.split(b" ")
    if len(parts) != 3 or not TOKEN_RE.fullmatch(parts[0]) or not TARGET_RE.fullmatch(parts[1]):
        raise framing_error("malformed request line")
    version = VERSION_RE.fullmatch(parts[2])
    if not version:
        raise framing_error("malformed HTTP version")
    if version.group(1) != b"1":
        raise framing_error("only HTTP/1.x is served", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    target = parts[1].decode("ascii")
    if target.startswith(("http://", "https://")):
        absolute = urllib.parse.urlsplit(target)
        target = (absolute.path or "/") + ("?" + absolute.query if absolute.query else "")
    elif not target.startswith("/"):
        raise framing_error("request target must be a path")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise framing_error("too many header fields", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    headers: Dict[str, List[str]] = {}
    for line in lines[1:]:
        name, value = parse_field_line(line)
        headers.setdefault(name, []).append(value)
    http_version = (1, int(version.group(2)))
    # RFC 9112 3.2: an HTTP/1.1 request names exactly one Host, and no request names two.
    hosts = len(headers.get("host", ()))
    if hosts > 1 or hosts == 0 and http_version >= (1, 1):
        raise framing_error("missing or repeated Host header")
    path, _, query = target.partition("?")
    return Request(parts[0].decode("ascii"), path, query, http_version, headers)


def parse_field_line(line: bytes) -> Tuple[str, str]:
    """Parses one header (or trailer) field line: (lower-case name, value without surrounding
    SP/HTAB)."""
    if len(line) > MAX_HEADER_LINE:
        raise framing_error("header field too long", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    name, colon, value = line.partition(b":")
    if not colon or not TOKEN_RE.fullmatch(name):
        # Covers obsolete line folding and whitespace before the colon (RFC 9112, 5.1-5.2).
        raise framing_error("malformed header field")
    if FIELD_VALUE_CONTROL_RE.search(value):
        raise framing_error("control character in header field")
    return name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")


def body_framing(request: Request) -> Framing:
    """Returns the body's framing: None (no body), its Content-Length, or 'chunked'; smuggling
    shapes are 400."""
    transfer_encoding = request.headers.get("transfer-encoding")
    content_length = request.headers.get("content-length")
    if transfer_encoding is not None:
        if content_length is not None:
            raise framing_error("both Content-Length and Transfer-Encoding")
        chunked = len(transfer_encoding) == 1 and transfer_encoding[0].lower() == "chunked"
        if not chunked or request.version < (1, 1):
            raise framing_error("unsupported Transfer-Encoding")
        return "chunked"
    if content_length is None:
        return None
    # Only SP and HTAB are optional whitespace (RFC 9110 5.6.3); str.strip() would take far more.
    values = {item.strip(" \t") for value in content_length for item in value.split(",")}
    if len(values) != 1:
        raise framing_error("conflicting Content-Length values")
    length = values.pop()
    if not CONTENT_LENGTH_RE.fullmatch(length):
        raise framing_error("invalid Content-Length")
    return int(length)


class ChunkedDecoder:
    """Decodes a chunked body (RFC 9112 7.1) from bytes fed as they arrive, refusing more than
    `limit`.

    feed() takes the bytes received so far and returns how many it used; an
    incomplete framing line is left for the caller to feed again with more.
    The body collects in `body`; once `done`, the bytes that follow belong to
    the next request.
    """

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = bytearray()
        self.state = self.SIZE
        # Data bytes of the current chunk still to come.
        self.remaining = 0
        self.trailers = 0

    @property
    def done(self) -> bool:
        """Tells whether the whole body, trailer section included, has been decoded."""
        return self.state == self.DONE

    @property
    def announced(self) -> int:
        """Body bytes received or announced by a chunk size so far."""
        return len(self.body) + self.remaining

    def feed(self, data: Bytes) -> int:
        """Decodes what it can of `data`; returns the number of bytes used."""
        position = 0
        while position < len(data) and self.state != self.DONE:
            if self.state == self.DATA:
                taken = min(self.remaining, len(data) - position)
                self.body += data[position:position + taken]
                position += taken
                self.remaining -= taken
                if not self.remaining:
                    self.state = self.DATA_END
            elif self.state == self.DATA_END:
                ending = data[position:position + 2]
                if not b"\r\n".startswith(ending):
                    raise framing_error("chunk data not followed by CRLF")
                if len(ending) < 2:
                    break
                position += 2
                self.state = self.SIZE
            else:
                line_end = data.find(b"\n", position)
                limit = MAX_CHUNK_LINE if self.state == self.SIZE else MAX_HEADER_LINE
                if line_end < 0 and len(data) - position > limit or line_end - position > limit + 1:
                    raise framing_error("chunk framing line too long")
                if line_end < 0:
                    break
                if line_end == position or data[line_end - 1] != 0x0D:
                    raise framing_error("chunk framing line not ended by CRLF")
                self._line(bytes(data[position:line_end - 1]))
                position = line_end + 1
        return position

    def _line(self, line: bytes) -> None:
        if self.state == self.SIZE:
            match = CHUNK_LINE_RE.fullmatch(line)
            if match is None:
                raise framing_error("malformed chunk size line")
            size = int(match.group(1), 16)
            if not size:
                self.state = self.TRAILER
            elif len(self.body) + size > self.limit:
                raise framing_error("body exceeds %d bytes" % self.limit,
                                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            else:
                self.remaining, self.state = size, self.DATA
        elif not line:
            self.state = self.DONE
        else:
            self.trailers += 1
            if self.trailers > MAX_HEADER_COUNT:
                raise framing_error("too many trailer fields",
                                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            parse_field_line(line)


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

HEALTH_PATH = "/healthz"
# What monitors poll: their successful answers are logged a line a second per client at most.
PROBE_PATHS = (HEALTH_PATH, "/metrics")
METRICS_PATH = "/metrics"
STATUS_PATH = "/status"
STATUS_JSON_PATH = "/status.json"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The methods of a push path: OPTIONS is the liveness probe of Akamai's Unified Log Streamer.
PUSH_METHODS = ("POST", "PUT", "OPTIONS")
# The largest body an OPTIONS request may carry (ULS's is {"event":"connection test"}).
OPTIONS_MAX_BODY = 4096
RETRY_AFTER_SECONDS = 10
RECV_SIZE = 262144
# A body buffer starts at most this large and doubles as bytes arrive, so a large Content-Length
# alone holds no memory (DataStream's bodies, up to about 4 MB, take at most two doublings).
BODY_FIRST_ALLOCATION = 1 << 20
# A connection waiting this long for its next request gives up its thread (see ParkedConnections).
IDLE_PARK_AFTER = 1.0
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1 << 20


class DeadlineExceeded(Exception):
    """The client did not complete a handshake, head or body before its deadline."""


class ClientGone(Exception):
    """The client closed the connection."""


_date_cache: Tuple[int, str] = (0, "")


def http_date() -> str:
    """Returns the Date header value, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        # RFC 9110 5.6.7's IMF-fixdate: strftime's names are English, as LC_TIME stays "C".
        _date_cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)))
    return _date_cache[1]


class SlowBody(Exception):
    """The body arrives slower than --min-body-rate."""


class BodyPace:
    """The limits on one body while it arrives: the --timeout deadline, --min-body-rate after a
    grace period, and a reservation of --max-inflight-bytes that grows with the bytes (on_growth may
    refuse with 503)."""

    def __init__(self, deadline: float, min_rate: float, on_growth: Callable[[int], None]) -> None:
        self.started = time.monotonic()
        self.deadline = deadline
        self.min_rate = min_rate
        self.on_growth = on_growth

    def arriving(self, total: int) -> None:
        """Reserves for the body's first `total` bytes, which are about to be read."""
        self.on_growth(total)

    def next_check(self) -> float:
        """When to stop waiting for bytes and check the pace again: the deadline, or a second from
        now."""
        return min(self.deadline, time.monotonic() + 1.0) if self.min_rate else self.deadline

    def check(self, received: int) -> None:
        """Refuses a body past its deadline, or below the minimum rate once the grace period is
        over."""
        now = time.monotonic()
        if now >= self.deadline:
            raise DeadlineExceeded
        elapsed = now - self.started
        if self.min_rate and elapsed > BODY_RATE_GRACE and received < self.min_rate * elapsed:
            raise SlowBody("body arriving at %.0f bytes/s, below --min-body-rate"
                           % (received / elapsed))


class ClientReader:
    """Reads from a client socket into a buffer, every read bounded by an absolute deadline; the
    parsers above decide what the bytes mean."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _arm(self, deadline: float) -> None:
        """Makes the next socket call give up at `deadline`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded
        self.sock.settimeout(remaining)

    def recv(self, deadline: float) -> bytes:
        """Returns the next bytes the client sends."""
        self._arm(deadline)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            raise DeadlineExceeded from None
        if not data:
            raise ClientGone
        return data

    def wait_for_request(self, deadline: float) -> bool:
        """Waits until the next request starts arriving; False when the client closes first."""
        while True:
            # RFC 9112 2.2: ignore empty lines before a request line.
            if self.buffer[:1] in (b"\r", b"\n"):
                del self.buffer[:len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))]
            if self.buffer:
                return True
            try:
                self.buffer += self.recv(deadline)
            except ClientGone:
                return False

    def read_head(self, deadline: float) -> bytes:
        """Returns the request head, without its closing empty line, once it is complete."""
        scanned = 0
        while True:
            length = head_length(self.buffer, scanned)
            if length:
                head = bytes(self.buffer[:length - 4])
                del self.buffer[:length]
                return head
            scanned = len(self.buffer)
            self.buffer += self.recv(deadline)

    def read_exact(self, size: int, pace: BodyPace) -> bytearray:
        """Reads exactly `size` body bytes into one buffer, which grows (with the pace's
        reservation) only as the bytes arrive: a large Content-Length alone holds no memory."""
        body = bytearray(min(size, BODY_FIRST_ALLOCATION))
        have = min(len(self.buffer), size)
        body[:have] = self.buffer[:have]
        del self.buffer[:have]
        pace.arriving(have)
        while have < size:
            want = min(size - have, RECV_SIZE)
            if have + want > len(body):
                body.extend(bytes(min(size, max(2 * len(body), have + want)) - len(body)))
            pace.arriving(have + want)
            self._arm(pace.next_check())
            try:
                with memoryview(body) as view:
                    received = self.sock.recv_into(view[have:have + want], want)
            except socket.timeout:
                pace.check(have)
                continue
            if not received:
                raise ClientGone
            have += received
            pace.check(have)
        return body

    def read_chunked(self, limit: int, pace: BodyPace) -> bytearray:
        """Reads a chunked body of at most `limit` bytes, reserving as the bytes arrive."""
        decoder = ChunkedDecoder(limit)
        received = 0
        while True:
            used = decoder.feed(self.buffer)
            del self.buffer[:used]
            if decoder.done:
                return decoder.body
            pace.arriving(len(decoder.body) + len(self.buffer) + RECV_SIZE)
            self._arm(pace.next_check())
            try:
                data = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                pace.check(received)
                continue
            if not data:
                raise ClientGone
            received += len(data)
            self.buffer += data
            pace.check(received)

    def discard(self, deadline: float, most: int) -> None:
        """Reads and drops what the client sends until it closes, `deadline` passes or `most` bytes
        came."""
        self.buffer.clear()
        dropped = 0
        try:
            while dropped < most:
                dropped += len(self.recv(deadline))
        except (DeadlineExceeded, ClientGone, OSError):
            pass


Headers = Sequence[Tuple[str, str]]


class Response(NamedTuple):
    """A complete answer: status, body, extra headers."""

    status: HTTPStatus
    body: bytes
    headers: Headers = ()


class Exchange:
    """One request on a connection, from its first byte to its access-log line."""

    def __init__(self, client: str) -> None:
        self.started = time.monotonic()
        self.client = client
        self.request: Optional[Request] = None
        self.framing: Framing = None
        self.body_read = False
        # Its share of --max-inflight-bytes, returned when the request ends.
        self.reserved = 0
        self.bytes_in = 0
        self.records = 0
        # The push's route and stream (status page, metrics, ledger) once its records named it.
        self.routed: Optional[RoutedStream] = None
        # Why it ended as it did, for the access log.
        self.note = ""

    def body_pending(self) -> bool:
        """Tells whether the request has body bytes we have not read, so the connection cannot be
        reused."""
        return self.framing not in (None, 0) and not self.body_read

    def wants_close(self) -> bool:
        """Tells whether the connection must close after the answer (always for a request not
        understood)."""
        return self.request is None or self.request.wants_close()


class ConnectionHandler:
    """Serves one client connection in its own thread: TLS handshake, then HTTP/1.1 requests.

    Override do_<METHOD>(request, exchange) -> Response to serve another
    method.  The handler only speaks HTTP: what a push's body becomes is the
    server's accept_push() (see PushPipeline), and it uses nothing of the
    server beyond the interface ReceiverServer's docstring lists.
    """

    def __init__(self, server: ReceiverServer, sock: socket.socket,
                 address: Tuple[str, int]) -> None:
        self.server = server
        self.settings = server.settings
        self.sock = sock
        self.peer = address[0]
        # True while no request is being served: in the handshake, the head, or between requests.
        self.waiting = True
        self.waiting_since = time.monotonic()
        # Requests answered: a connection that has none yet is about to send one.
        self.answered = 0
        # Whether it counts against --max-client-connections.
        self.counted = False
        self.reader = ClientReader(sock)

    # -- connection -----------------------------------------------------------

    def run(self) -> None:
        """Serves a new connection: TLS handshake, then requests; never raises."""
        context = self.server.tls_context()
        if context is not None and not self.handshake(context):
            self.close()
            return
        self.reader.sock = self.sock
        self.serve(time.monotonic() + self.settings.timeout)

    def serve(self, deadline: float) -> None:
        """Serves requests until the connection closes, or parks it once it waits idle for a while;
        never raises.

        `deadline` bounds the wait for the next request: --timeout for the
        first one, --keepalive-timeout after that.
        """
        parked = False
        try:
            while True:
                park_at = min(deadline, time.monotonic() + IDLE_PARK_AFTER)
                try:
                    if not self.reader.wait_for_request(park_at):
                        return
                except DeadlineExceeded:
                    if park_at < deadline:
                        parked = self.server.park(self, deadline)
                    return
                if not self.handle_one_request():
                    return
                deadline = time.monotonic() + self.settings.keepalive_timeout
        except OSError:
            return  # reset or TLS error while waiting: the client is gone
        except Exception:
            log.exception("unexpected error on connection from %s", self.peer)
        finally:
            if not parked:
                self.close()

    def close(self) -> None:
        """Closes the connection and forgets it."""
        self.server.connection_finished(self)
        try:
            self.sock.close()
        except OSError:
            pass

    def handshake(self, context: ssl.SSLContext) -> bool:
        """Runs the TLS handshake in this thread under the --timeout deadline."""
        # CPython applies the socket timeout to the whole do_handshake() call,
        # so a client trickling bytes cannot stretch it.
        self.sock.settimeout(self.settings.timeout)
        try:
            tls_sock = context.wrap_socket(self.sock, server_side=True,
                                           do_handshake_on_connect=False)
            self.sock = tls_sock
            tls_sock.do_handshake()
            return True
        except (ssl.SSLError, socket.timeout, OSError) as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else getattr(exc, "reason",
                                                                                 None) or str(exc)
            self.server.metrics.count("tls_handshake_failures")
            if self.server.noisy_log.allow(self.peer):
                log.info("tls handshake from %s failed: %s", self.peer, reason)
            return False

    def interrupt_if_waiting(self) -> None:
        """Wakes the thread of a connection waiting for a request so it closes (shutdown,
        eviction)."""
        if self.waiting:
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass

    # -- one request ----------------------------------------------------------

    def handle_one_request(self) -> bool:
        """Reads, answers and logs the request whose first bytes arrived; returns whether to keep
        the connection open."""
        exchange = Exchange(self.peer)
        close = True
        try:
            head = self.reader.read_head(exchange.started + self.settings.timeout)
            exchange.request = request = parse_request_head(head)
            self.server.set_waiting(self, False)
            exchange.client = self.server.client_address(self.peer, request)
            exchange.framing = body_framing(request)
            method: Optional[Callable[[Request, Exchange], Response]] = getattr(self,
                                                                                "do_"
                                                                                + request.method,
                                                                                None)
            if method is None:
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed",
                                headers=[("Allow", ", ".join(PUSH_METHODS))])
            response = method(request, exchange)
            status = response.status
            close = request.wants_close() or self.server.is_stopping() or exchange.body_pending()
            self.write_response(exchange, response, close)
        except HTTPError as exc:
            status = exc.status
            close = exc.close or exchange.body_pending() or exchange.wants_close()
            exchange.note = exc.reason
            self.write_error(exchange, exc, close)
        except DeadlineExceeded:
            status = HTTPStatus.REQUEST_TIMEOUT
            exchange.note = "deadline passed"
            self.write_error(exchange, HTTPError(status, "request not received in time"),
                             close=True)
        except ClientGone:
            status = HTTPStatus.BAD_REQUEST
            exchange.note = "client closed the connection mid-request"
        except (ssl.SSLError, OSError) as exc:
            status = HTTPStatus.BAD_REQUEST
            exchange.note = "connection error: %s" % describe_os_error(exc)
        except Exception:
            log.exception("unexpected error serving %s", exchange.client)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            self.write_error(exchange, HTTPError(status, "internal error"), close=True)
        finally:
            self.server.inflight.release(exchange.reserved)
        self.log_request(exchange, status)
        self.answered += 1
        self.server.set_waiting(self, True)
        # What the answer said, and nothing else: closing a connection answered keep-alive (a stop
        # that began meanwhile) would reset the client's next request (see shutdown).
        if close:
            if exchange.body_pending():
                self.linger()
            return False
        return True

    def reserve_inflight(self, exchange: Exchange, total: int) -> None:
        """Grows the request's share of --max-inflight-bytes to `total`, or refuses the push with
        503."""
        extra = total - exchange.reserved
        if extra > 0:
            if not self.server.inflight.reserve(extra):
                raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE,
                                "too much data in flight, retry later",
                                headers=[("Retry-After", str(RETRY_AFTER_SECONDS))])
            exchange.reserved = total

    def authenticate(self, request: Request, exchange: Exchange) -> None:
        """Refuses the request with 401 unless every configured credential check passes, or with 429
        while its client is braked for failing too often."""
        authenticator = self.server.authenticator
        brake = self.server.auth_brake
        wait = brake.retry_after(exchange.client)
        if wait is not None:
            self.server.metrics.count("auth_brakes")
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS,
                            "too many failed authentications from this address",
                            headers=[("Retry-After", str(math.ceil(wait)))])
        refusal = authenticator.check(request.header("authorization"),
                                      request.header(authenticator.header_name or ""),
                                      request.query)
        if refusal is not None:
            brake.failed(exchange.client)
            challenge = [("WWW-Authenticate", '%s realm="dsreceiver"' % scheme)
                         for scheme, active in (("Basic", authenticator.basic),
                                                ("Bearer", authenticator.bearer)) if active]
            raise HTTPError(HTTPStatus.UNAUTHORIZED, refusal, headers=challenge)

    def do_GET(self, request: Request, exchange: Exchange) -> Response:
        """Answers the health check and the metrics; GET is not a push."""
        if request.path == HEALTH_PATH:
            failure = self.server.health()
            if failure is not None:
                exchange.note = failure
                return Response(HTTPStatus.SERVICE_UNAVAILABLE,
                                ("storage failing: %s\n" % failure).encode(),
                                [("Retry-After", str(RETRY_AFTER_SECONDS))])
            return Response(HTTPStatus.OK, b"ok\n")
        if request.path == METRICS_PATH:
            if not self.settings.metrics_public:
                self.authenticate(request, exchange)
            try:
                exposition = self.server.render_metrics()
            except SupervisorGone as exc:
                # Figures of this worker alone would make every counter seem to drop.
                raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc),
                                headers=[("Retry-After", str(RETRY_AFTER_SECONDS))]) from None
            return Response(HTTPStatus.OK, exposition, [("Content-Type", METRICS_CONTENT_TYPE)])
        if request.path in (STATUS_PATH, STATUS_JSON_PATH):
            if not self.settings.status_public:
                self.authenticate(request, exchange)
            document = self.server.status_document()
            if request.path == STATUS_JSON_PATH:
                return Response(HTTPStatus.OK, json.dumps(document, indent=1).encode("utf-8"),
                                [("Content-Type", "application/json"),
                                 ("Cache-Control", "no-store"),
                                 ("X-Content-Type-Options", "nosniff")])
            return Response(HTTPStatus.OK, render_status_page(document), STATUS_HEADERS)
        raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "pushes use POST or PUT",
                        headers=[("Allow", ", ".join(PUSH_METHODS))])

    do_HEAD = do_GET

    def do_POST(self, request: Request, exchange: Exchange) -> Response:
        """Receives a push: checks, reads and decodes the body, stores the records."""
        settings = self.settings
        if request.path in (HEALTH_PATH, METRICS_PATH, STATUS_PATH, STATUS_JSON_PATH):
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "use GET or HEAD",
                            headers=[("Allow", "GET, HEAD")])
        if settings.paths and request.path not in settings.paths:
            raise HTTPError(HTTPStatus.NOT_FOUND, "unknown push path")
        self.authenticate(request, exchange)
        if exchange.framing is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length or chunked body required")
        is_gzip = self.content_is_gzip(request)
        query = (urllib.parse.parse_qsl(request.query, keep_blank_values=True)
                 if STREAM_QUERY_PARAMETER in request.query else [])
        named = [value for name, value in query if name == STREAM_QUERY_PARAMETER]
        if len(named) > 1:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the URL names its stream more than once")
        named_stream = named[0] if named else None
        if isinstance(exchange.framing, int) and exchange.framing > settings.max_body_size:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            "body exceeds %d bytes" % settings.max_body_size)
        expect = request.header("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise HTTPError(HTTPStatus.EXPECTATION_FAILED, "unsupported Expect")
        # RFC 9110 10.1.1: an HTTP/1.0 client does not know 100 Continue, so its expectation is
        # ignored.
        if expect is not None and request.version >= (1, 1):
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.read_body(exchange)
        uls = (request.header("user-agent") or "").startswith(ULS_USER_AGENT)
        facts = PushFacts(request.path, exchange.client, is_gzip, named_stream, uls)
        # Decoded bytes held in memory count against the in-flight budget too.
        outcome = self.server.accept_push(facts, body,
                                          lambda held: self.reserve_inflight(exchange,
                                                                             len(body) + held))
        return self.answer_push(exchange, outcome)

    do_PUT = do_POST

    def do_OPTIONS(self, request: Request, exchange: Exchange) -> Response:
        """Answers a liveness probe (Akamai's Unified Log Streamer sends one at connect, with a
        small body) once it authenticates: 200, nothing stored, not counted as a push."""
        if request.path in (HEALTH_PATH, METRICS_PATH, STATUS_PATH, STATUS_JSON_PATH):
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "use GET or HEAD",
                            headers=[("Allow", "GET, HEAD")])
        if self.settings.paths and request.path not in self.settings.paths:
            raise HTTPError(HTTPStatus.NOT_FOUND, "unknown push path")
        self.authenticate(request, exchange)
        if isinstance(exchange.framing, int) and exchange.framing > OPTIONS_MAX_BODY:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            "an OPTIONS body exceeds %d bytes" % OPTIONS_MAX_BODY)
        if exchange.framing is not None:
            self.read_body(exchange, OPTIONS_MAX_BODY)
        self.server.metrics.count("liveness_probes")
        exchange.note = "liveness probe"
        return Response(HTTPStatus.OK, b"ok\n", [("Allow", ", ".join(PUSH_METHODS))])

    def content_is_gzip(self, request: Request) -> bool:
        """Tells whether Content-Encoding declares gzip; other encodings are 415."""
        encoding = (request.header("content-encoding") or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            return True
        if encoding in ("identity", ""):
            return False
        if encoding == "br":
            # The standard library has no brotli decoder; ULS (--httpcompressiontype) has gzip too.
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            "Content-Encoding br is not supported: send gzip (Akamai's Unified Log"
                            " Streamer: --httpcompressiontype GZIP)")
        raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        "unsupported Content-Encoding %r" % encoding[:40])

    def read_body(self, exchange: Exchange, limit: Optional[int] = None) -> bytearray:
        """Reads the whole body under the --timeout deadline and --min-body-rate; a chunked one of
        at most `limit` bytes (default: --max-body-size)."""
        pace = BodyPace(time.monotonic() + self.settings.timeout, self.settings.min_body_rate,
                        lambda size: self.reserve_inflight(exchange, size))
        try:
            if isinstance(exchange.framing, int):
                body = self.reader.read_exact(exchange.framing, pace)
            else:
                body = self.reader.read_chunked(limit or self.settings.max_body_size, pace)
        except SlowBody as exc:
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, str(exc), close=True) from None
        exchange.body_read = True
        exchange.bytes_in = len(body)
        return body

    def answer_push(self, exchange: Exchange, outcome: Outcome) -> Response:
        """Maps what the pipeline made of a push to its HTTP answer."""
        exchange.routed = outcome.routed
        exchange.note = outcome.reason
        result = outcome.result
        if result is PushResult.STORED:
            exchange.records = outcome.records
            return Response(HTTPStatus.OK, b"stored %d records\n" % outcome.records)
        if result is PushResult.DUPLICATE:
            return Response(HTTPStatus.OK, b"already stored %d records\n" % outcome.records)
        if result is PushResult.PROBE:
            return Response(HTTPStatus.OK, b"validation ok\n")
        if result is PushResult.TOO_LARGE:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, outcome.reason)
        if result in (PushResult.UNDECODABLE, PushResult.BAD_STREAM, PushResult.REFUSED):
            raise HTTPError(HTTPStatus.BAD_REQUEST, outcome.reason)
        log.error("storage failed, answering 503: %s", outcome.reason)
        raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "storage unavailable, retry later",
                        headers=[("Retry-After", str(RETRY_AFTER_SECONDS))])

    # -- answers --------------------------------------------------------------

    def write_response(self, exchange: Exchange, response: Response, close: bool) -> None:
        """Sends a complete response, head and body, in one write (no Nagle stall between them).

        Unlike http.server's send_response(), which only starts a response.
        """
        lines = ["HTTP/1.1 %d %s" % (response.status.value, response.status.phrase),
                 "Date: " + http_date(), "Server: dsreceiver",
                 "Content-Length: %d" % len(response.body)]
        if not any(name == "Content-Type" for name, _ in response.headers):
            lines.append("Content-Type: text/plain; charset=utf-8")
        lines.extend("%s: %s" % header for header in response.headers)
        request = exchange.request
        if close:
            lines.append("Connection: close")
        elif request is not None and request.version < (1, 1):
            # HTTP/1.0 closes by default: confirm that this connection stays open.
            lines.append("Connection: keep-alive")
        is_head = request is not None and request.method == "HEAD"
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if is_head
                                                                      else response.body)
        self.sock.settimeout(self.settings.timeout)
        self.sock.sendall(data)

    def write_error(self, exchange: Exchange, error: HTTPError, close: bool) -> None:
        """Sends an error answer; a client that is gone is ignored."""
        try:
            self.write_response(exchange,
                                Response(error.status,
                                         ("%s\n" % error.reason).encode("utf-8", "replace"),
                                         error.headers), close)
        except (OSError, ValueError):
            pass

    def linger(self) -> None:
        """Reads and drops what the client still sends, briefly, so it sees our answer instead of a
        reset."""
        try:
            # Half-close first: the client sees our answer and EOF at once.
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            return
        self.reader.discard(time.monotonic() + LINGER_SECONDS, LINGER_MAX_BYTES)

    def log_request(self, exchange: Exchange, status: HTTPStatus) -> None:
        """Counts the request and writes its access log line; refusals are rate-limited per
        client."""
        metrics = self.server.metrics
        metrics.request_done(status.value, exchange.bytes_in)
        request = exchange.request
        shown = "-"
        if request is not None:
            shown = request.path + ("?" + self.server.authenticator.redact(request.query)
                                    if request.query else "")
        if status == HTTPStatus.UNAUTHORIZED:
            metrics.count("auth_failures")
        if status >= 400:
            metrics.refused(status.value, exchange.client, shown, exchange.note or status.phrase,
                            exchange.routed)
            self.server.answers.count(exchange.routed, str(status.value))
            # Every refusal is counted, but a client gets one log line a second at most.
            if not self.server.noisy_log.allow(exchange.client):
                return
        elif (request is not None and request.method in ("GET", "HEAD")
              and request.path in PROBE_PATHS
              and not self.server.quiet_log.allow(exchange.client)):
            return  # a monitor's probes: counted, and a line a second per client at most
        if not log.isEnabledFor(logging.INFO):
            return
        method = request.method if request is not None else "-"
        seconds = time.monotonic() - exchange.started
        fields = {"event": "access", "client": exchange.client, "method": method, "path": shown,
                  "status": status.value, "bytes": exchange.bytes_in, "records": exchange.records,
                  "ms": round(seconds * 1000, 1)}
        if exchange.note:
            fields["note"] = exchange.note
        log.info("access %s %s %s %d bytes=%d records=%d ms=%.1f%s", exchange.client, method, shown,
                 status.value, exchange.bytes_in, exchange.records, seconds * 1000,
                 " (%s)" % exchange.note if exchange.note else "", extra={"fields": fields})


# ---------------------------------------------------------------------------
# Upgrades
# ---------------------------------------------------------------------------
# Listening sockets that outlive the process: systemd's socket activation (LISTEN_FDS), and the
# in-place upgrade of SIGUSR2 (Handover), so that a restart or an upgrade queues connections in the
# kernel's backlog instead of refusing them.

# systemd's socket activation (sd_listen_fds(3)): the sockets are descriptors 3 and on.
SD_LISTEN_FDS_START = 3
# An upgrade's sockets, ready pipe and interim process, passed in the environment (see Handover).
ENV_LISTEN_FDS = "DSRECEIVER_LISTEN_FDS"
ENV_LISTEN_PID = "DSRECEIVER_LISTEN_PID"
ENV_LISTEN_PARENT = "DSRECEIVER_LISTEN_PARENT"
ENV_READY_FD = "DSRECEIVER_READY_FD"
ENV_RETIRE_PID = "DSRECEIVER_RETIRE_PID"
HANDOVER_ENVIRONMENT = (ENV_LISTEN_FDS, ENV_LISTEN_PID, ENV_LISTEN_PARENT, ENV_READY_FD,
                        ENV_RETIRE_PID)
# How long a new process may take to answer pushes before the upgrade is given up, and how often
# the serving loops look at it meanwhile.
UPGRADE_DEADLINE = 60.0
HANDOVER_POLL = 0.2


def inherited_listeners(environ: MutableMapping[str, str]) -> List[socket.socket]:
    """The listening sockets this process was given, taking them out of `environ`: systemd's
    (LISTEN_FDS, for LISTEN_PID), or an upgrade's (for this PID, or for a child of the process
    that upgrades); empty when none.  Anything else than listening TCP sockets is a ConfigError."""
    systemd = environ.pop("LISTEN_PID", None) == str(os.getpid())
    count = environ.pop("LISTEN_FDS", "0")
    environ.pop("LISTEN_FDNAMES", None)
    listed = environ.get(ENV_LISTEN_FDS, "")
    ours = listed and (environ.get(ENV_LISTEN_PID) == str(os.getpid())
                       or environ.get(ENV_LISTEN_PARENT) == str(os.getppid()))
    for name in (ENV_LISTEN_FDS, ENV_LISTEN_PID, ENV_LISTEN_PARENT):
        environ.pop(name, None)
    try:
        if systemd:
            fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
        elif ours:
            fds = [int(fd) for fd in listed.split(",")]
        else:
            return []
    except ValueError:
        raise ConfigError("the listening sockets passed in the environment are not numbers: %r"
                          % (count if systemd else listed)) from None
    sockets = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            raise ConfigError("descriptor %d, passed as a listening socket, is none" % fd) from None
        if (sock.type != socket.SOCK_STREAM or not listening
                or sock.family not in (socket.AF_INET, socket.AF_INET6)):
            raise ConfigError("descriptor %d, passed as a listening socket, is not a listening TCP"
                              " socket" % fd)
        sock.set_inheritable(False)
        sockets.append(sock)
    if not sockets:
        raise ConfigError("LISTEN_FDS passes no socket")
    return sockets


def announce_serving(environ: MutableMapping[str, str], reap: bool) -> None:
    """Once this process answers pushes: tells the process that upgrades it (its ready pipe), or
    stops the interim process an upgrade left serving beside it (see Handover), and with `reap`
    (a single process: a supervisor's loop reaps its children) waits for it in a thread."""
    ready = environ.pop(ENV_READY_FD, None)
    if ready is not None:
        try:
            fd = int(ready)
            os.write(fd, b"ready\n")
            os.close(fd)
        except (ValueError, OSError) as exc:
            log.warning("cannot tell the process that upgrades this one that it serves: %s", exc)
    retire = environ.pop(ENV_RETIRE_PID, None)
    if retire is not None and retire.isdigit():
        pid = int(retire)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            log.info("upgraded: the interim process (pid %d) stops", pid)
        if reap:
            threading.Thread(target=reap_quietly, args=(pid,), name="reap-interim",
                             daemon=True).start()


def reap_quietly(pid: int) -> None:
    """Waits for a child to exit, so that it leaves no zombie (another waiter may take it)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class HandoverState(ProtocolEnum):
    """Where an in-place upgrade of this process stands."""

    SERVING = "serving"
    # The file on disk runs as a new process beside this one, not answering pushes yet.
    STARTING = "starting"
    # The new process answers pushes: this one stops accepting, drains, then re-executes.
    HANDING_OVER = "handing over"


class HandoverEvent(ProtocolEnum):
    """What moves an upgrade."""

    REQUESTED = "SIGUSR2"
    SUCCESSOR_READY = "the new process answers pushes"
    SUCCESSOR_FAILED = "the new process exited, or did not answer pushes within the deadline"


HANDOVER_PROTOCOL: Dict[Tuple[Optional[HandoverState], HandoverEvent], HandoverState] = {
    (HandoverState.SERVING, HandoverEvent.REQUESTED): HandoverState.STARTING,
    # A second SIGUSR2 while one upgrade is under way changes nothing.
    (HandoverState.STARTING, HandoverEvent.REQUESTED): HandoverState.STARTING,
    (HandoverState.HANDING_OVER, HandoverEvent.REQUESTED): HandoverState.HANDING_OVER,
    (HandoverState.STARTING, HandoverEvent.SUCCESSOR_READY): HandoverState.HANDING_OVER,
    # The old file keeps serving, with one ERROR line.
    (HandoverState.STARTING, HandoverEvent.SUCCESSOR_FAILED): HandoverState.SERVING,
}


class Handover:
    """The in-place upgrade of this process (the only one, or the supervisor of --workers), on
    SIGUSR2, without refusing a connection:

    1. the file on disk starts as a new process (the interim one), inheriting
       the listening sockets; both accept while it starts;
    2. once it answers pushes it says so on a pipe: this process stops
       accepting, finishes its in-flight requests, closes its files (as on
       SIGTERM), then re-executes the file under its own PID, so that
       systemd, Docker or any supervisor that watches the PID sees it stay,
       taking the sockets again;
    3. that one, once it answers pushes, stops the interim process.
    A new file that cannot start (exits, or does not answer within
    UPGRADE_DEADLINE) is stopped, and this process keeps serving, with one
    ERROR line.  The serving loops call poll() on each turn.
    """

    def __init__(self, sockets: Sequence[socket.socket], argv: Sequence[str]) -> None:
        self.sockets = list(sockets)
        # The command that starts the file on disk as this process was started.
        self.command = [sys.executable, os.path.abspath(argv[0]), *argv[1:]]
        self.state = HandoverState.SERVING
        self.successor: Optional[subprocess.Popen[bytes]] = None
        self.ready: Optional[socket.socket] = None
        self.deadline = 0.0

    @property
    def active(self) -> bool:
        """Whether a new process is starting (the loops then poll every POLL_INTERVAL)."""
        return self.state is HandoverState.STARTING

    def request(self) -> None:
        """SIGUSR2: starts the file on disk as the interim process, with the sockets."""
        state = advance(HANDOVER_PROTOCOL, self.state, HandoverEvent.REQUESTED)
        if self.state is not HandoverState.SERVING:
            log.warning("SIGUSR2: an upgrade is under way already")
            return
        import subprocess

        ours, theirs = socket.socketpair()
        fds = [sock.fileno() for sock in self.sockets]
        env = dict(os.environ, **{ENV_LISTEN_FDS: ",".join(map(str, fds)),
                                  ENV_LISTEN_PARENT: str(os.getpid()),
                                  ENV_READY_FD: str(theirs.fileno())})
        try:
            self.successor = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL,
                                              pass_fds=fds + [theirs.fileno()])
        except OSError as exc:
            ours.close()
            log.error("upgrade failed: cannot start %s: %s; still serving",
                      self.command[1], describe_os_error(exc))
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.ready, self.state = ours, state
        self.deadline = time.monotonic() + UPGRADE_DEADLINE
        log.info("SIGUSR2: upgrading: started %s as pid %d; serving until it answers pushes",
                 self.command[1], self.successor.pid)

    def poll(self) -> bool:
        """While a new process starts: True once it answers pushes (this process is then to stop
        serving and hand over); False meanwhile, or once it failed."""
        if self.state is not HandoverState.STARTING or self.ready is None \
                or self.successor is None:
            return False
        try:
            said = self.ready.recv(64)
        except BlockingIOError:
            said = None
        if said:
            self.state = advance(HANDOVER_PROTOCOL, self.state, HandoverEvent.SUCCESSOR_READY)
            self.ready.close()
            log.info("upgrade: pid %d answers pushes: this process (pid %d) stops accepting,"
                     " finishes its requests and re-executes", self.successor.pid, os.getpid())
            return True
        exited = self.successor.poll()
        if said == b"" or exited is not None or time.monotonic() > self.deadline:
            self.abandon("exited with %s" % exited if exited is not None
                         else "did not answer pushes within %g s" % UPGRADE_DEADLINE)
        return False

    def cancel(self) -> None:
        """Asks a new process that is starting, or serving beside this one, to stop, without
        waiting (this one is stopping too: both drain at once; see abandon)."""
        if self.successor is not None and self.successor.poll() is None:
            self.successor.terminate()

    def reaped(self, pid: int, code: int) -> None:
        """A supervisor's loop reaped a child that is no worker: the new process's exit code."""
        if self.successor is not None and self.successor.pid == pid:
            self.successor.returncode = code

    def abandon(self, why: str) -> None:
        """Stops a new process that failed, or that this one outlives (a stop signal during the
        upgrade); this process keeps serving, or stops alone."""
        if self.successor is None or self.ready is None:
            return
        import subprocess

        if self.successor.poll() is None:
            self.successor.terminate()
            try:
                self.successor.wait(UPGRADE_DEADLINE)
            except subprocess.TimeoutExpired:
                self.successor.kill()
                self.successor.wait()
        self.ready.close()
        if self.state is HandoverState.STARTING:
            self.state = advance(HANDOVER_PROTOCOL, self.state, HandoverEvent.SUCCESSOR_FAILED)
            log.error("upgrade failed: the new %s %s; still serving with the old one (pid %d)",
                      self.command[1], why, os.getpid())

    def exec_self(self) -> int:
        """Once this process has stopped serving: re-executes the file on disk under this PID,
        with the sockets, telling it which interim process to stop.  Returns (1) only when that
        cannot be done: the interim process serves on."""
        assert self.successor is not None
        env = dict(os.environ, **{ENV_LISTEN_FDS: ",".join(str(sock.fileno())
                                                            for sock in self.sockets),
                                  ENV_LISTEN_PID: str(os.getpid()),
                                  ENV_RETIRE_PID: str(self.successor.pid)})
        for sock in self.sockets:
            sock.set_inheritable(True)
        for handler in log.handlers:
            handler.flush()
        # Held over the exec until the new image has its handlers (SignalFlags.install): a
        # SIGHUP or SIGTERM meanwhile waits instead of killing the process at its default.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            os.execve(sys.executable, self.command, env)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            log.error("cannot re-execute %s: %s; pid %d serves on", self.command[1],
                      describe_os_error(exc), self.successor.pid)
        return 1


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

# How often the lines that the per-client log limit held back are summed up, one line per client.
LOG_SUMMARY_INTERVAL = 60.0
# How long keep-alive connections may take, once stopping, to send the request they may be sending.
DRAIN_GRACE = 1.0
# How long a health verdict is shared (see ReceiverServer.health).
HEALTH_CACHE = 1.0
# Near --max-connections (this share of it), connections not serving a request make room for new
# ones.
EVICT_AT = 0.9
LATE_AFTER_INTERVALS = 3


class InflightBudget:
    """Counts the body bytes being received or stored, refusing reservations beyond the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        """Takes `size` bytes of the budget; False when that would exceed it (one body alone always
        fits)."""
        with self.lock:
            if self.used and self.used + size > self.limit:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        """Returns `size` bytes to the budget."""
        with self.lock:
            self.used -= size


class RateLimitedLog:
    """Allows at most one log line per key (a client address) per interval, so no client can flood
    the log; counts the lines it holds back, for a summary line a minute."""

    MAX_KEYS = 10000

    def __init__(self, interval: float = 1.0, noun: str = "refusals") -> None:
        self.interval = interval
        # What its lines are, for the summary.
        self.noun = noun
        self.last: Dict[str, float] = {}
        self.suppressed: Dict[str, int] = {}
        self.lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Tells whether a line about `key` may be logged now."""
        now = time.monotonic()
        with self.lock:
            if len(self.last) > self.MAX_KEYS:
                self.last = {k: t for k, t in self.last.items() if now - t < self.interval}
            last = self.last.get(key)
            if last is not None and now - last < self.interval:
                if key in self.suppressed or len(self.suppressed) < self.MAX_KEYS:
                    self.suppressed[key] = self.suppressed.get(key, 0) + 1
                return False
            self.last[key] = now
            return True

    def log_summary(self, period: str) -> None:
        """Logs one line per key whose lines were held back since the last summary (`period` says
        when)."""
        with self.lock:
            suppressed, self.suppressed = self.suppressed, {}
        for key, count in sorted(suppressed.items(), key=lambda item: -item[1]):
            log.warning("suppressed %d %s from %s %s", count, self.noun, key, period)

class ClientConnections:
    """Open connections per client address, across every worker: counters in memory mapped before
    the workers fork, a row per worker so that each writes only its own (no lock between processes);
    a count sums the rows.

    Addresses share a counter when their hash collides (one in 65,536).
    """

    SLOTS = 1 << 16
    COUNTER = struct.Struct("<i")

    def __init__(self, workers: int) -> None:
        self.memory = mmap.mmap(-1, workers * self.SLOTS * self.COUNTER.size)
        self.workers = workers
        # This process's row: set in each worker after the fork.
        self.row = 0
        self.lock = threading.Lock()

    def take_row(self, row: int) -> None:
        """Makes this process worker `row`, starting from zero: a restarted worker's connections
        died with it."""
        self.row = row
        size = self.SLOTS * self.COUNTER.size
        self.memory[row * size:(row + 1) * size] = bytes(size)

    def _offset(self, row: int, address: str) -> int:
        return (row * self.SLOTS
                + (zlib.crc32(address.encode()) & (self.SLOTS - 1))) * self.COUNTER.size

    def count(self, address: str) -> int:
        """Connections `address` holds open on every worker."""
        return sum(self.COUNTER.unpack_from(self.memory, self._offset(row, address))[0]
                   for row in range(self.workers))

    def add(self, address: str, delta: int) -> None:
        """Counts connections of `address` opened (+1) or closed (-1) by this worker."""
        offset = self._offset(self.row, address)
        with self.lock:
            self.COUNTER.pack_into(self.memory, offset,
                                   self.COUNTER.unpack_from(self.memory, offset)[0] + delta)


class AuthBrake:
    """Slows password guessing: a client address that fails authentication AUTH_BRAKE_FAILURES times
    within `seconds` gets 429 with Retry-After, without a credential check, until `seconds` after
    its last failure.

    Kept per worker process, so with N workers a client can fail up to N times as often before it is
    braked.
    """

    MAX_CLIENTS = 10000

    def __init__(self, seconds: float, failures: int = AUTH_BRAKE_FAILURES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.failures = failures
        self.clock = clock
        self.recent: Dict[str, List[float]] = {}
        self.braked_until: Dict[str, float] = {}
        self.lock = threading.Lock()

    def retry_after(self, client: str) -> Optional[float]:
        """Seconds until `client` may try credentials again; None when it is not braked."""
        with self.lock:
            until = self.braked_until.get(client)
            if until is None:
                return None
            remaining = until - self.clock()
            if remaining <= 0:
                del self.braked_until[client]
                return None
            return remaining

    def failed(self, client: str) -> None:
        """Counts a failed authentication of `client`, braking it at the limit."""
        if not self.seconds:
            return
        now = self.clock()
        with self.lock:
            if len(self.recent) > self.MAX_CLIENTS:
                self.recent = {key: times for key,
                               times in self.recent.items() if now - times[-1] < self.seconds}
            times = [moment for moment in self.recent.get(client, [])
                     if now - moment < self.seconds] + [now]
            if len(times) >= self.failures:
                self.recent.pop(client, None)
                if len(self.braked_until) > self.MAX_CLIENTS:
                    self.braked_until = {key: until for key,
                                         until in self.braked_until.items() if until > now}
                self.braked_until[client] = now + self.seconds
                log.warning("authentication brake on %s: %d failures within %gs; 429 for the next"
                            " %gs", client, len(times), self.seconds, self.seconds)
            else:
                self.recent[client] = times


class ParkedConnections:
    """Keep-alive connections waiting for their next request, watched by one thread instead of a
    thread each.

    A connection idle for IDLE_PARK_AFTER is parked here; when data arrives a
    new thread resumes it, and when its deadline passes it is closed.
    """

    def __init__(self, server: ReceiverServer) -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.arrivals: List[Tuple[ConnectionHandler, float]] = []
        self.lock = threading.Lock()
        self.wake_pipe = WakePipe()
        self.selector.register(self.wake_pipe.reader, selectors.EVENT_READ)
        threading.Thread(target=self._watch, name="idle-connections", daemon=True).start()

    def park(self, handler: ConnectionHandler, deadline: float) -> bool:
        """Takes over an idle connection; False once the server is stopping (the caller closes
        it)."""
        with self.lock:
            if self.server.is_stopping():
                return False
            self.arrivals.append((handler, deadline))
        self.wake()
        return True

    def wake(self) -> None:
        """Makes the watching thread look at new arrivals, and whether idle connections are to be
        closed (see ReceiverServer.shutdown)."""
        self.wake_pipe.wake()

    def _watch(self) -> None:
        deadlines: Dict[ConnectionHandler, float] = {}
        while True:
            with self.lock:
                arrivals, self.arrivals = self.arrivals, []
                stopping = self.server.closing_idle.is_set()
            for handler, deadline in arrivals:
                self.selector.register(handler.sock, selectors.EVENT_READ, handler)
                deadlines[handler] = deadline
            now = time.monotonic()
            for handler in [h for h, deadline in deadlines.items() if stopping or deadline <= now]:
                self.selector.unregister(handler.sock)
                del deadlines[handler]
                handler.close()
            if stopping:
                return
            timeout = max(0.0, min(deadlines.values()) - now) if deadlines else None
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.wake_pipe.reader:
                    self.wake_pipe.drain()
                    continue
                handler = key.data
                self.selector.unregister(handler.sock)
                deadline = deadlines.pop(handler)
                self.server.start_thread(handler, functools.partial(handler.serve, deadline))


class ReceiverServer:
    """Owns the listening socket and the shared state; runs a thread per connection with a request
    under way.

    What a ConnectionHandler may use, and nothing else:
        settings, metrics, authenticator, auth_brake, inflight, noisy_log, quiet_log
        tls_context()                        the context new connections take; None for plain HTTP
        client_address(peer, request)        whom a request speaks for (X-Forwarded-For of a proxy)
        accept_push(facts, body, on_growth)  a push's body to its Outcome (the PushPipeline)
        health(), render_metrics(), status_document()   what the GET paths show
        set_waiting(handler, waiting)        a connection stops or starts waiting for a request
        park(handler, deadline)              hands an idle keep-alive connection to one thread
        is_stopping(), connection_finished(handler)
    """

    handler_class = ConnectionHandler

    def __init__(self, settings: Settings, listeners: Sequence[socket.socket],
                 certificates: Optional[CertificateSource], authenticator: Authenticator,
                 storage: Storage, streams: StreamCatalog,
                 merged_metrics: Optional[Callable[[SnapshotScope], MetricsSnapshot]] = None,
                 client_connections: Optional[ClientConnections] = None) -> None:
        self.settings = settings
        # With workers: the metrics of all of them, summed (may raise SupervisorGone).
        self.merged_metrics = merged_metrics
        # The listening sockets this process accepts from: usually one.
        self.listeners = list(listeners)
        self.certificates = certificates
        self.authenticator = authenticator
        self.storage = storage
        self.streams = streams
        self.inflight = InflightBudget(settings.max_inflight_bytes)
        self.metrics = Metrics()
        # The ledger's counts of answers that store nothing, until housekeeping saves them.
        self.answers = LedgerAnswers()
        self.pipeline = PushPipeline(settings, storage, streams, self.metrics, self.answers)
        self.started = time.time()
        self.noisy_log = RateLimitedLog()
        self.auth_brake = AuthBrake(settings.auth_brake)
        self.client_connections = client_connections or ClientConnections(1)
        self.connections: Set[ConnectionHandler] = set()
        self.lock = threading.Lock()
        self.all_closed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        # The last health verdict and when it was found (see health).
        self.health_lock = threading.Lock()
        # (when, this process's storage events then: see Metrics.storage_events, the verdict)
        self.health_checked: Tuple[float, Tuple[float, float], Optional[str]] = (
            -HEALTH_CACHE, (0.0, 0.0), None)
        # Successful probes (GET /healthz and the like) log a line a second per client at most.
        self.quiet_log = RateLimitedLog(noun="access lines of probes")
        # Set once stopping, after DRAIN_GRACE: the connections still idle are closed.
        self.closing_idle = threading.Event()
        self.parked = ParkedConnections(self)

    # -- for the handler ------------------------------------------------------------

    def tls_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context a new connection takes (renewed certificates included); None for plain
        HTTP."""
        return self.certificates.context if self.certificates is not None else None

    def accept_push(self, facts: PushFacts, body: bytearray,
                    on_growth: Callable[[int], None]) -> Outcome:
        """Stores a push: see PushPipeline.accept."""
        return self.pipeline.accept(facts, body, on_growth)

    def set_waiting(self, handler: ConnectionHandler, waiting: bool) -> None:
        """Records that a connection waits for a request (it may be evicted) or serves one."""
        with self.lock:
            handler.waiting = waiting
            if waiting:
                handler.waiting_since = time.monotonic()

    def park(self, handler: ConnectionHandler, deadline: float) -> bool:
        """Takes over an idle keep-alive connection until `deadline`; False once stopping (the
        caller closes it)."""
        return self.parked.park(handler, deadline)

    def is_stopping(self) -> bool:
        """Whether the server is shutting down (connections close after their answer)."""
        return self.stopping.is_set()

    def merged_snapshot(self, scope: SnapshotScope = SnapshotScope.FULL) -> MetricsSnapshot:
        """The metrics of every worker (of this process alone without workers), merged; raises
        SupervisorGone when the workers' figures cannot be had."""
        if self.merged_metrics is not None:
            return self.merged_metrics(scope)
        return MetricsSnapshot.merge([self.metrics_snapshot(scope)])

    def status_document(self) -> Dict[str, Any]:
        """What /status and /status.json show: every worker's view merged, and this server's facts;
        this worker's alone (saying so under "partial") when the supervisor cannot be reached."""
        now = time.time()
        partial: Optional[str] = None
        try:
            snapshot = self.merged_snapshot()
        except SupervisorGone as exc:
            snapshot, partial = self.metrics_snapshot(), "%s: this worker's figures only" % exc
        current = minute_of(now)
        hour = range(current - HISTORY_MINUTES + 1, current + 1)
        reconciled = read_reconciled(self.storage.layout)
        streams = []
        for routed, stats in sorted(snapshot.streams.items()):
            per_minute = [stats.minutes.get(minute, [0, 0]) for minute in hour]
            since = now - stats.last_push if stats.last_push else None
            interval = self.streams.push_interval(routed.stream)
            streams.append({"route": routed.route, "stream": routed.stream,
                            "label": routed.label(), "last_push": stats.last_push or None,
                            "seconds_since_push": since, "push_interval_seconds": interval,
                            "late": since is not None and since > LATE_AFTER_INTERVALS * interval,
                            "batches_last_hour": sum(batches for batches, _ in per_minute),
                            "records_last_hour": sum(records for _, records in per_minute),
                            "records_per_minute": [records for _, records in per_minute],
                            "uploaders_last_10_minutes": sum(now - seen < UPLOADER_WINDOW
                                                             for seen in stats.uploaders.values()),
                            "event_lag_seconds": now - stats.newest_event if stats.newest_event
                            else None, "dedupe_hits": stats.dedupe_hits,
                            "refusals": {str(status): number for status,
                                         number in stats.refusals.items()},
                            "records_total": stats.records,
                            "reconciled": reconciled.get(routed.stream)})
        gauges = snapshot.gauges
        uptime = now - gauges["start_time_seconds"]
        written = sum(snapshot.written.get(minute, 0) for minute in hour)
        rate = written / max(60.0, min(uptime, HISTORY_MINUTES * 60.0))
        free, total = self.disk_usage()
        error = snapshot.storage_error
        address = (self.listeners[0].getsockname() if self.listeners[0].fileno() >= 0
                   else (self.settings.host, self.settings.port))
        host = "[%s]" % address[0] if ":" in address[0] else address[0]
        return {"generated": now, "partial": partial, "streams": streams,
                "storage": {"output_dir": str(self.storage.layout.root), "disk_free_bytes": free,
                            "disk_total_bytes": total, "written_last_hour_bytes": written,
                            "write_rate_bytes_per_second": rate,
                            "full_in_seconds": free / rate if free is not None
                            and rate > 0 else None,
                            "fsync_p50_seconds": snapshot.fsync.quantile(0.5),
                            "fsync_p99_seconds": snapshot.fsync.quantile(0.99),
                            "last_error": {"time": error.time, "reason": error.reason} if error
                            else None, "failing": snapshot.storage_failure(now),
                            "streak_started": snapshot.streak_start or None,
                            "streak_seconds": now - snapshot.streak_start if snapshot.streak_start
                            else 0.0, "retry_horizon_seconds": RETRY_HORIZON},
                "server": {"version": __version__, "uptime_seconds": uptime,
                           "workers": self.settings.workers,
                           "listening": "%s://%s:%d" % (self.settings.scheme, host, address[1]),
                           "plain_http": self.settings.http, "tls": self.certificates.facts
                           or None if self.certificates is not None else None,
                           "authentication": self.authenticator.methods(),
                           "open_connections": gauges["open_connections"],
                           "inflight_bytes": gauges["inflight_bytes"]},
                "refusals": [refusal._asdict() for refusal in reversed(snapshot.refusals)],
                "definition_problems": [{"stream": stream, "problem": problem} for stream, problems
                                        in sorted(self.streams.problems().items())
                                        for problem in problems],
                "requests": {str(status): number for status, number in snapshot.requests.items()},}

    def health(self) -> Optional[str]:
        """Why storage fails: a worker's store failed recently and none succeeded since, or the
        probe fails.  Found at most once per HEALTH_CACHE (the others wait for it, then share it),
        and again at once when this process fails to store, or stores after a failure: a flood of
        /healthz costs neither a disk write nor a supervisor round trip each."""
        with self.health_lock:
            checked, (failed, stored), verdict = self.health_checked
            events = self.metrics.storage_events()
            # A failure since makes a verdict stale, and a store since a failing one.
            if (time.monotonic() - checked < HEALTH_CACHE and events[0] == failed
                    and (verdict is None or events[1] == stored)):
                return verdict
            try:
                snapshot = self.merged_snapshot(SnapshotScope.HEALTH)
                verdict = snapshot.storage_failure(time.time()) or self.storage.probe()
            except SupervisorGone as exc:
                verdict = str(exc)
            self.health_checked = (time.monotonic(), events, verdict)
            return verdict

    def metrics_snapshot(self, scope: SnapshotScope = SnapshotScope.FULL) -> MetricsSnapshot:
        """This process's metrics."""
        with self.lock:
            open_connections = len(self.connections)
        gauges = {"open_connections": float(open_connections),
                  "inflight_bytes": float(self.inflight.used), "start_time_seconds": self.started}
        return self.metrics.snapshot(gauges, self.storage.fsync_seconds, scope)

    def render_metrics(self) -> bytes:
        """The /metrics document: summed over every worker when there are several (may raise
        SupervisorGone)."""
        free, size = self.disk_usage()
        tls = self.certificates.facts if self.certificates is not None else {}
        facts = ServerFacts(free, size, tls.get("not_after"),
                            self.streams.push_interval,
                            read_reconciled(self.storage.layout), self.streams.problems())
        return Metrics.render(self.merged_snapshot(), facts)

    def disk_usage(self) -> Tuple[Optional[int], Optional[int]]:
        """(bytes free, bytes in all) of the output folder's filesystem; Nones when unknown."""
        try:
            disk = os.statvfs(str(self.storage.layout.root))
        except OSError:
            return None, None
        return disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize

    # -- the accept loop and the rest -----------------------------------------------

    def reload(self) -> None:
        """SIGHUP: reloads the certificate, credential and stream definition files; reopens moved
        output files."""
        if self.certificates is not None:
            self.certificates.reload("SIGHUP")
        try:
            self.authenticator = Authenticator.from_settings(self.settings.credentials,
                                                             dict(os.environ))
            log.info("credentials reloaded: %s", " + ".join(self.authenticator.methods())
                     or "none configured")
        except ConfigError as exc:
            log.error("credential reload refused, keeping the previous credentials: %s", exc)
        self.streams.reload()
        log.info("reopened %d output files that were moved or deleted", self.storage.reopen())

    def client_address(self, peer: str, request: Request) -> str:
        """Names the client for logs: X-Forwarded-For's last hop when the peer is a trusted
        proxy."""
        forwarded = request.header("x-forwarded-for")
        if not forwarded or not self.is_trusted_proxy(peer):
            return peer
        try:
            return str(ipaddress.ip_address(forwarded.split(",")[-1].strip()))
        except ValueError:
            return peer

    def serve(self, signals: SignalFlags, handover: Optional[Handover] = None) -> None:
        """Accepts connections until a stop signal, or until an upgrade's new process answers
        pushes (see Handover); acts on SIGHUP, SIGUSR2 and on renewed certificate files."""
        next_check = time.monotonic() + self.settings.cert_check_interval
        next_summary = time.monotonic() + LOG_SUMMARY_INTERVAL
        listening = {listener.fileno(): listener for listener in self.listeners}
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                listener.setblocking(False)
                selector.register(listener, selectors.EVENT_READ)
            selector.register(signals.wake_pipe.reader, selectors.EVENT_READ)
            while signals.stop_signal is None:
                wait = min(next_check, next_summary) - time.monotonic()
                if handover is not None and handover.active:
                    wait = min(wait, HANDOVER_POLL)
                for key, _ in selector.select(max(0.0, wait)):
                    if key.fileobj is signals.wake_pipe.reader:
                        signals.wake_pipe.drain()
                    else:
                        self.accept_pending(listening[key.fd])
                if signals.take_reload():
                    self.reload()
                if signals.take_upgrade():
                    if handover is None:
                        log.warning("SIGUSR2 upgrades the supervisor (pid %d), not a worker",
                                    os.getppid())
                    else:
                        handover.request()
                if handover is not None and handover.poll():
                    return
                if self.certificates is not None and time.monotonic() >= next_check:
                    self.certificates.reload_if_changed()
                    next_check = time.monotonic() + self.settings.cert_check_interval
                if time.monotonic() >= next_summary:
                    self.noisy_log.log_summary("in the last minute")
                    self.quiet_log.log_summary("in the last minute")
                    next_summary = time.monotonic() + LOG_SUMMARY_INTERVAL
        if handover is not None:
            handover.cancel()  # stopping: a new process being started stops beside this one

    def accept_pending(self, listener: socket.socket) -> None:
        """Accepts every pending connection, closing those beyond --max-connections."""
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have.
                log.warning("accept failed: %s", describe_os_error(exc))
                return
            peer = address[0]
            limited = bool(self.settings.max_client_connections) and not self.is_trusted_proxy(peer)
            with self.lock:
                full = len(self.connections) >= self.settings.max_connections
                crowded = limited and not full and (self.client_connections.count(peer)
                                                    >= self.settings.max_client_connections)
                if not full and not crowded:
                    handler = self.handler_class(self, sock, address)
                    handler.counted = limited
                    self.connections.add(handler)
                    if limited:
                        self.client_connections.add(peer, 1)
                    # Near the cap, room for a new uploader comes from connections that are not
                    # serving a request.
                    if len(self.connections) >= EVICT_AT * self.settings.max_connections:
                        room = int(EVICT_AT * self.settings.max_connections)
                        self.evict_waiting(len(self.connections) - room + 1, handler)
            if full or crowded:
                sock.close()
                self.metrics.count("connections_refused")
                if self.noisy_log.allow(peer):
                    log.warning("closed a connection from %s: %s", peer,
                                "the server is full" if full
                                else "it holds --max-client-connections already")
                continue
            sock.setblocking(True)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.start_thread(handler, handler.run)

    def start_thread(self, handler: ConnectionHandler, target: Callable[[], None]) -> None:
        """Runs `target` for a connection in a new thread, closing the connection if none can
        start."""
        try:
            threading.Thread(target=target, name="conn-%s" % handler.peer, daemon=True).start()
        except RuntimeError:
            log.warning("cannot start a thread for a connection from %s; closing it", handler.peer)
            handler.close()

    def evict_waiting(self, count: int, newcomer: ConnectionHandler) -> None:
        """Closes the `count` oldest connections, other than the newcomer they make room for, that
        are not serving a request: still in their handshake or head, or idle between requests (call
        with the lock)."""
        waiting = sorted((handler for handler in self.connections if handler.waiting
                          and handler is not newcomer), key=lambda h: h.waiting_since)
        for handler in waiting[:count]:
            handler.interrupt_if_waiting()
        if waiting[:count]:
            self.metrics.count("connections_evicted", len(waiting[:count]))

    def is_trusted_proxy(self, peer: str) -> bool:
        """Tells whether `peer` is a --trusted-proxy, whose connections carry many clients."""
        try:
            peer_ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(peer_ip in network for network in self.settings.trusted_proxy)

    def connection_finished(self, handler: ConnectionHandler) -> None:
        """Forgets a closed connection."""
        with self.lock:
            if handler in self.connections and handler.counted:
                self.client_connections.add(handler.peer, -1)
            self.connections.discard(handler)
            if not self.connections:
                self.all_closed.notify_all()

    def shutdown(self, timeout: float, keep_listening: bool = False) -> bool:
        """Stops accepting, closes idle connections, waits for in-flight requests; False if some
        remain.  With `keep_listening` (an upgrade hands them over) the sockets stay open.

        Keep-alive connections get DRAIN_GRACE to send their next request,
        answered with Connection: close: a connection closed as its client
        sends would be a reset it has to retry.  Those still idle then are
        closed; a new connection, whose client is about to send its first
        request, is closed only at the deadline.  The sockets stay open
        wherever another process holds them (systemd's socket, an upgrade's
        new process), so nothing is refused.
        """
        self.stopping.set()
        if not keep_listening:
            for listener in self.listeners:
                listener.close()
        started = time.monotonic()
        deadline, grace = started + timeout, started + min(DRAIN_GRACE, timeout)
        with self.lock:
            while self.connections and time.monotonic() < grace:
                self.all_closed.wait(grace - time.monotonic())
        self.closing_idle.set()
        self.parked.wake()
        with self.lock:
            while self.connections:
                for handler in list(self.connections):
                    if handler.answered:
                        handler.interrupt_if_waiting()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.all_closed.wait(min(remaining, 0.5))
        return True


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------
# Several processes sharing the port, and their supervisor.

# A worker restarted more often than this within the window is in a crash loop: stop instead.
CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_WINDOW = 60.0
# How long a worker waits for any answer of the supervisor: a stuck supervisor costs a push a 503,
# never a hung request.
SUPERVISOR_DEADLINE = 10.0


class Claim(NamedTuple):
    """Worker to supervisor: may I store the batch with this dedupe key?  Answered by
    ClaimAnswer."""

    id: int
    key: str


class ClaimAnswer(NamedTuple):
    """Supervisor to worker: the claim's ClaimState (its value); while WAITING, a second answer
    follows, once the worker that holds the key has committed or released it."""

    id: int
    state: str


class Commit(NamedTuple):
    """Worker to supervisor: the claimed batch is stored."""

    key: str
    stored_at: float


class Release(NamedTuple):
    """Worker to supervisor: the claimed batch could not be stored."""

    key: str


class Ready(NamedTuple):
    """Worker to supervisor: I answer pushes now."""

    pid: int


class Recovered(NamedTuple):
    """Worker to supervisor: the batches stored within the dedupe window in the files of runs that
    died, which I recovered ([time stored, key] pairs): at a restarted worker's start (its
    predecessor's claims are settled by it), and when housekeeping adopts a run."""

    batches: List[Tuple[float, str]]


class MetricsRequest(NamedTuple):
    """Worker to supervisor: the metrics of every worker, please.  Answered by MetricsAnswer."""

    id: int
    scope: SnapshotScope


class MetricsAnswer(NamedTuple):
    """Supervisor to worker: the merged metrics."""

    id: int
    snapshot: MetricsSnapshot


class SnapshotRequest(NamedTuple):
    """Supervisor to worker: your metrics, for gathering `id`.  Answered by SnapshotAnswer."""

    id: int
    scope: SnapshotScope


class SnapshotAnswer(NamedTuple):
    """Worker to supervisor: my metrics, for gathering `id`."""

    id: int
    snapshot: MetricsSnapshot


Message = Union[Claim, ClaimAnswer, Commit, Release, Ready, Recovered, MetricsRequest,
                MetricsAnswer, SnapshotRequest, SnapshotAnswer]
MESSAGE_TYPES: Dict[str,
                    Callable[..., Message]] = {kind.__name__: kind
                                               for kind in (Claim, ClaimAnswer, Commit, Release,
                                                            Ready, Recovered, MetricsRequest,
                                                            MetricsAnswer, SnapshotRequest,
                                                            SnapshotAnswer)}


def wire_value(value: object) -> object:
    """A message field as JSON can carry it: snapshots in their wire form, scopes by value."""
    if isinstance(value, MetricsSnapshot):
        return value.to_wire()
    if isinstance(value, SnapshotScope):
        return value.value
    return value


def message_from_wire(kind: str, fields: List[Any]) -> Message:
    """The message that ControlChannel.send() turned into [kind, *fields]."""
    if kind in ("MetricsAnswer", "SnapshotAnswer"):
        fields[1] = MetricsSnapshot.from_wire(fields[1])
    elif kind in ("MetricsRequest", "SnapshotRequest"):
        fields[1] = SnapshotScope(fields[1])
    elif kind == "Recovered":
        fields[0] = [(float(stamp), str(key)) for stamp, key in fields[0]]
    return MESSAGE_TYPES[kind](*fields)


class ControlChannel:
    """Messages between the supervisor and one worker over a socketpair: one JSON array per line,
    the message's type name then its fields (see wire_value)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.send_lock = threading.Lock()

    def send(self, message: Message) -> None:
        """Sends one message."""
        self.send_all([message])

    def send_all(self, messages: Sequence[Message]) -> None:
        """Sends messages in one write."""
        data = b"".join(json.dumps([type(message).__name__, *map(wire_value, message)],
                                   separators=(",", ":")).encode("utf-8") + b"\n"
                        for message in messages)
        with self.send_lock:
            self.sock.sendall(data)

    def feed(self, data: bytes) -> List[Message]:
        """Takes received bytes; returns the messages they complete."""
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        messages = []
        for line in lines:
            kind, *fields = json.loads(line)
            messages.append(message_from_wire(kind, fields))
        return messages


class PendingCall:
    """A worker's request to the supervisor, waiting for its answer."""

    __slots__ = ("request_id", "answer", "done", "follow_up", "key")

    def __init__(self, request_id: int, key: Optional[str] = None) -> None:
        self.request_id = request_id
        self.answer: Optional[Message] = None
        # Released once: the answer is in, or the supervisor is gone.
        self.done = threading.Lock()
        self.done.acquire()
        # After an interim answer (a claim another worker holds): the call the final one goes to.
        self.follow_up: Optional[PendingCall] = None
        # The key a claim is for: a claim granted after its caller gave up waiting is released.
        self.key = key


class SupervisorClient:
    """A worker's line to the supervisor: the DedupeClaims all workers share, so a batch re-sent to
    another worker is still stored once, and the metrics summed over every worker."""

    def __init__(self, sock: socket.socket, deadline: float = SUPERVISOR_DEADLINE) -> None:
        self.channel = ControlChannel(sock)
        self.deadline = deadline
        # The calls waiting for their answer, by request ID: each is woken alone, by its own.
        self.waiting: Dict[int, PendingCall] = {}
        # Claims whose caller stopped waiting (see _answer): released if they are granted.
        self.abandoned: Dict[int, str] = {}
        self.lock = threading.Lock()
        self.last_id = 0
        self.gone = False

    def start(self, snapshot: Callable[[SnapshotScope], MetricsSnapshot]) -> None:
        """Starts reading the supervisor's messages, answering its requests for metrics with
        `snapshot()`."""
        threading.Thread(target=self._read, args=(snapshot,), name="supervisor-link",
                         daemon=True).start()

    def _read(self, snapshot: Callable[[SnapshotScope], MetricsSnapshot]) -> None:
        while True:
            try:
                data = self.channel.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            for message in self.channel.feed(data):
                if isinstance(message, SnapshotRequest):
                    self.channel.send(SnapshotAnswer(message.id, snapshot(message.scope)))
                elif isinstance(message, (ClaimAnswer, MetricsAnswer)):
                    self._take_answer(message)
        with self.lock:
            self.gone = True
            calls, self.waiting = list(self.waiting.values()), {}
        for call in calls:
            call.done.release()
        # The supervisor died without stopping us: finish in-flight requests and exit, never serve
        # orphaned.
        log.error("the supervisor process is gone: stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    def _take_answer(self, message: Union[ClaimAnswer, MetricsAnswer]) -> None:
        """Hands an answer to the call that waits for it.  A grant that no call waits for any more
        (its caller gave up: see _abandon) is released at once, so that a retry of its batch is
        never kept waiting for a commit that will not come."""
        release: Optional[str] = None
        waiting = (isinstance(message, ClaimAnswer)
                   and message.state == ClaimState.WAITING.value)
        with self.lock:
            call = self.waiting.pop(message.id, None)
            if call is not None:
                if waiting:
                    call.follow_up = self.waiting[message.id] = PendingCall(message.id, call.key)
                call.answer = message
            elif isinstance(message, ClaimAnswer) and message.id in self.abandoned:
                key = self.abandoned.pop(message.id)
                if waiting:
                    self.abandoned[message.id] = key
                elif message.state == ClaimState.GRANTED.value:
                    release = key
        if call is not None:
            call.done.release()
        if release is not None:
            self._release_quietly([release])

    def _abandon(self, calls: Sequence[PendingCall]) -> List[str]:
        """Gives up on calls (call with the lock): an unanswered one, or the second answer of one
        that waits, goes to `abandoned`, its grant then released when it comes; returns the keys
        of those already granted, for the caller to release."""
        granted: List[str] = []
        for call in calls:
            pending = call.follow_up or call
            if pending.answer is None:
                if self.waiting.pop(pending.request_id, None) is not None and call.key is not None:
                    self.abandoned[pending.request_id] = call.key
            elif (isinstance(pending.answer, ClaimAnswer) and call.key is not None
                  and pending.answer.state == ClaimState.GRANTED.value):
                granted.append(call.key)
        return granted

    def _release_quietly(self, keys: Sequence[str]) -> None:
        try:
            self.release_all(keys)
        except OSError:
            pass  # gone: nothing is held there any more

    def _send_calls(self, make: Sequence[Callable[[int], Message]],
                    keys: Optional[Sequence[str]] = None) -> List[PendingCall]:
        """Sends the requests make(id), in one write; returns the calls their answers go to."""
        with self.lock:
            if self.gone:
                raise SupervisorGone("the supervisor process is gone")
            first = self.last_id + 1
            self.last_id += len(make)
            calls = [PendingCall(first + number, keys[number] if keys is not None else None)
                     for number in range(len(make))]
            self.waiting.update((call.request_id, call) for call in calls)
        try:
            self.channel.send_all([build(first + number) for number, build in enumerate(make)])
        except OSError as exc:
            with self.lock:
                for request_id in range(first, first + len(calls)):
                    self.waiting.pop(request_id, None)
            raise SupervisorGone("the supervisor process is gone: %s"
                                 % describe_os_error(exc)) from exc
        return calls

    def _answer(self, call: PendingCall) -> Message:
        """Waits for a call's answer, up to the deadline; raises SupervisorGone when none will
        come, or none came in time (a claim granted later is then released: see
        _take_answer)."""
        if not call.done.acquire(timeout=self.deadline):
            with self.lock:
                if call.answer is None:  # else it came as the deadline passed: taken
                    self._abandon([call])
                    raise SupervisorGone("the supervisor did not answer within %g s"
                                         % self.deadline)
        if call.answer is None:
            raise SupervisorGone("the supervisor process is gone")
        return call.answer

    @staticmethod
    def _no_follow_up() -> ClaimState:
        raise ProtocolError("a claim that is not WAITING has no second answer")

    def _final_claim(self, call: PendingCall) -> ClaimState:
        """The final answer of a claim that another worker held: GRANTED or DUPLICATE."""
        answer = self._answer(call)
        assert isinstance(answer, ClaimAnswer)
        return ClaimState(answer.state)

    def claim_all(self, keys: Sequence[str]) -> List[ClaimTicket]:
        """DedupeClaims.claim_all(), decided by the supervisor for every worker."""
        calls = self._send_calls([functools.partial(Claim, key=key) for key in keys], keys)
        tickets = []
        try:
            for call in calls:
                answer = self._answer(call)
                assert isinstance(answer, ClaimAnswer)
                follow_up = call.follow_up
                tickets.append(ClaimTicket(ClaimState(answer.state),
                                           functools.partial(self._final_claim, follow_up)
                                           if follow_up is not None else self._no_follow_up))
        except SupervisorGone:
            # The whole group fails: nothing of it may stay held, granted or to be granted.
            with self.lock:
                granted = self._abandon(calls)
            self._release_quietly(granted)
            raise
        return tickets

    def commit_all(self, stored: Sequence[Tuple[str, float]]) -> None:
        """DedupeClaims.commit_all()."""
        self.channel.send_all([Commit(key, stored_at) for key, stored_at in stored])

    def release_all(self, keys: Sequence[str]) -> None:
        """DedupeClaims.release_all()."""
        self.channel.send_all([Release(key) for key in keys])

    def recovered(self, batches: List[Tuple[float, str]]) -> None:
        """Tells the supervisor the batches found in the files of runs that died (see
        Recovered)."""
        self.channel.send(Recovered(batches))

    def ready(self) -> None:
        """Tells the supervisor this worker answers pushes now."""
        try:
            self.channel.send(Ready(os.getpid()))
        except OSError:
            pass  # gone: the worker learns it at its first claim

    def metrics(self, scope: SnapshotScope) -> MetricsSnapshot:
        """The metrics of every worker, summed; raises SupervisorGone."""
        [call] = self._send_calls([functools.partial(MetricsRequest, scope=scope)])
        answer = self._answer(call)
        assert isinstance(answer, MetricsAnswer)
        return answer.snapshot


def worker_tag(index: int) -> str:
    """The file-name tag of worker `index`: '.w1', '.w2', ..."""
    return ".w%d" % (index + 1)


class WorkerSlot:
    """One of the --workers places: its number, the tag its files carry, its process while one runs
    (with the supervisor's end of its control channel) and when it was last restarted."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.tag = worker_tag(index)
        self.pid = 0
        self.channel: Optional[ControlChannel] = None
        self.restarts: List[float] = []
        # The claims a worker of this slot held when it died: whether their batches were stored
        # is known once the next worker has recovered its files (see Supervisor.after_exit).
        self.doubtful: Set[str] = set()

    def started(self, pid: int, channel: ControlChannel) -> None:
        """A process now runs in the slot."""
        self.pid, self.channel = pid, channel

    def ended(self) -> None:
        """Its process is gone: nothing more can come from it."""
        if self.channel is not None:
            self.channel.sock.close()
        self.pid, self.channel = 0, None

    def crash_looping(self, now: float) -> bool:
        """Counts a restart at `now`; True when there were too many within CRASH_LOOP_WINDOW."""
        self.restarts = [moment for moment in self.restarts
                         if now - moment < CRASH_LOOP_WINDOW] + [now]
        return len(self.restarts) > CRASH_LOOP_RESTARTS


class MetricsGathering:
    """A MetricsRequest being answered: the snapshots in so far, and the workers still to send
    theirs."""

    def __init__(self, worker: int, request_id: int, expected: Iterable[int]) -> None:
        self.worker = worker
        self.request_id = request_id
        self.expected = set(expected)
        self.snapshots: List[MetricsSnapshot] = []


class Supervisor:
    """The parent of --workers processes: starts and restarts them, relays signals, keeps their
    shared dedupe window and sums their metrics.  It runs no threads, so forking a worker is
    safe."""

    def __init__(self, listeners: Sequence[Sequence[socket.socket]], layout: Layout,
                 dedupe: DedupeMemory,
                 worker_main: Callable[[int, Sequence[socket.socket], socket.socket], int],
                 on_serving: Callable[[], None] = lambda: None) -> None:
        # Each worker's listening sockets (see share_listeners).
        self.listeners = listeners
        # Called once, when every worker has said Ready the first time.
        self.on_serving: Optional[Callable[[], None]] = on_serving
        self.ready: Set[int] = set()
        self.layout = layout
        self.dedupe = dedupe
        self.worker_main = worker_main
        self.slots = [WorkerSlot(index) for index in range(len(listeners))]
        # The worker storing each claimed batch, and the claims of other workers waiting for its
        # outcome.
        self.owners: Dict[str, int] = {}
        self.waiting: Dict[str, List[Tuple[int, int]]] = {}
        self.gatherings: Dict[int, MetricsGathering] = {}
        self.last_gathering = 0
        # Messages for each worker, sent at the end of the loop's turn (see send).
        self.outbox: Dict[int, List[Message]] = {}
        self.stopping = False
        self.failed = False
        # Workers restarted after they exited: the one count workers cannot keep themselves.
        self.restarted = 0

    def running(self) -> List[WorkerSlot]:
        """The slots a worker process runs in now."""
        return [slot for slot in self.slots if slot.channel is not None]

    def spawn(self, slot: WorkerSlot) -> None:
        """Forks the worker of `slot` with its listener and a control socket."""
        ours, theirs = socket.socketpair()
        # Held until the worker has its own handlers (SignalFlags.install), so none is lost
        # meanwhile.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            raise
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        else:
            code = 1
            try:
                ours.close()
                for other in self.running():
                    other.ended()
                own = self.listeners[slot.index]
                for unused in {sock for socks in self.listeners for sock in socks} - set(own):
                    unused.close()
                code = self.worker_main(slot.index, own, theirs)
            except BaseException:
                log.exception("worker %d failed", slot.index + 1)
            finally:
                os._exit(code)  # never return into the supervisor's loop
        theirs.close()
        slot.started(pid, ControlChannel(ours))

    def run(self, signals: SignalFlags, handover: Optional[Handover] = None) -> int:
        """Runs the workers until a stop signal (or an upgrade's new process answers pushes: see
        Handover) and all of them have finished; returns the exit code."""
        for slot in self.slots:
            self.spawn(slot)
        log.info("started %d workers (pids %s)", len(self.slots),
                 " ".join(str(slot.pid) for slot in self.slots))
        while self.running():
            channels = {slot.channel.sock: slot for slot in self.running()
                        if slot.channel is not None}
            wait = HANDOVER_POLL if handover is not None and handover.active else 1.0
            readable, _, _ = select.select([signals.wake_pipe.reader, *channels], [], [], wait)
            for sock in readable:
                if sock is signals.wake_pipe.reader:
                    signals.wake_pipe.drain()
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                slot = channels[sock]
                for message in slot.channel.feed(data) if data and slot.channel is not None else []:
                    self.handle(slot.index, message)
            if signals.stop_signal is not None and not self.stopping:
                self.stop("received signal %d" % signals.stop_signal)
                if handover is not None:
                    handover.cancel()
            if signals.take_reload():
                self.signal_all(signal.SIGHUP)
            if handover is not None and not self.stopping:
                if signals.take_upgrade():
                    handover.request()
                if handover.poll():
                    self.stop("upgrading")
            self.reap(handover)
            self.flush_outbox()
        return 1 if self.failed else 0

    def stop(self, reason: str) -> None:
        """Asks every worker to finish its in-flight requests and exit."""
        log.info("%s: stopping %d workers", reason, len(self.running()))
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def signal_all(self, signum: int) -> None:
        """Relays a signal to every worker."""
        for slot in self.running():
            try:
                os.kill(slot.pid, signum)
            except ProcessLookupError:
                pass

    def reap(self, handover: Optional[Handover] = None) -> None:
        """Handles the workers that exited since the last look (and an upgrade's interim process,
        which this loop reaps too)."""
        while self.running():
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            slot = next((slot for slot in self.running() if slot.pid == pid), None)
            if slot is None and handover is not None:
                handover.reaped(pid, os.waitstatus_to_exitcode(status)
                                if hasattr(os, "waitstatus_to_exitcode") else status)
            if slot is not None:
                self.after_exit(slot, os.waitstatus_to_exitcode(status)
                                if hasattr(os, "waitstatus_to_exitcode") else status)

    def after_exit(self, slot: WorkerSlot, code: int) -> None:
        """Everything that follows a worker's exit, in the one safe order, with no file I/O (the
        loop answers the live workers' claims meanwhile):

        1. its slot forgets the process, so nothing more is read from it, and the
           messages queued for it and its waiting claims are dropped;
        2. its claims stay held, in doubt: a retry of one of those batches waits;
        3. gatherings stop waiting for its snapshot;
        4. it is restarted, unless the supervisor is stopping or it keeps exiting;
        5. the restarted worker recovers its predecessor's files before it serves and
           says which batches they hold (Recovered): only then are the claims in
           doubt settled, those batches as stored, so that a retry waiting for one
           is answered as a duplicate, never stored twice; the others released.
        When the supervisor is stopping, nobody recovers them: they stay held, and a
        retry waiting on one gets a 503 at its deadline (the next start learns what was
        stored), never a grant that could store it twice.
        """
        pid = slot.pid
        slot.ended()
        # What was queued for it, and its claims waiting for another's outcome, answer its
        # requests; a restarted worker's requests are new.
        self.outbox.pop(slot.index, None)
        for key, waiters in list(self.waiting.items()):
            self.waiting[key] = [waiter for waiter in waiters if waiter[0] != slot.index]
            if not self.waiting[key]:
                del self.waiting[key]
        slot.doubtful |= {key for key, owner in self.owners.items() if owner == slot.index}
        for number, gathering in list(self.gatherings.items()):
            gathering.expected.discard(slot.index)
            self.finish_gathering(number)
        looping = slot.crash_looping(time.monotonic())
        if self.stopping:
            log.info("worker %d (pid %d) stopped", slot.index + 1, pid)
        elif code == 2 or looping:
            log.error("worker %d (pid %d) exited with %s%s; stopping", slot.index + 1, pid, code,
                      "" if code == 2 else " again and again")
            self.failed = True
            self.stop("a worker cannot run")
        else:
            log.error("worker %d (pid %d) exited with %s; restarting it", slot.index + 1, pid, code)
            self.restarted += 1
            self.spawn(slot)

    def send(self, index: int, message: Message) -> None:
        """Queues a message to worker `index`: flush_outbox() sends what one turn of the loop
        queued, one write per worker."""
        self.outbox.setdefault(index, []).append(message)

    def flush_outbox(self) -> None:
        """Sends the queued messages to the workers, which may have gone meanwhile."""
        outbox, self.outbox = self.outbox, {}
        for index, messages in outbox.items():
            channel = self.slots[index].channel
            if channel is not None:
                try:
                    channel.send_all(messages)
                except OSError:
                    pass

    def handle(self, index: int, message: Message) -> None:
        """Acts on one message from worker `index`."""
        if isinstance(message, Claim):
            state = self.dedupe.try_claim(message.key)
            # WAITING is answered at once too, so that the worker's other claims go ahead; the
            # outcome follows.
            self.send(index, ClaimAnswer(message.id, state.value))
            if state is ClaimState.WAITING:
                self.waiting.setdefault(message.key, []).append((index, message.id))
            elif state is ClaimState.GRANTED:
                self.owners[message.key] = index
        elif isinstance(message, Commit):
            self.commit(message.key, message.stored_at)
        elif isinstance(message, Release):
            self.release(message.key)
        elif isinstance(message, Recovered):
            self.settle_doubtful(self.slots[index], message.batches)
        elif isinstance(message, Ready):
            self.ready.add(index)
            if self.on_serving is not None and len(self.ready) == len(self.slots):
                self.on_serving()
                self.on_serving = None
        elif isinstance(message, MetricsRequest):
            self.last_gathering += 1
            running = [slot.index for slot in self.running()]
            self.gatherings[self.last_gathering] = MetricsGathering(index, message.id, running)
            for worker in running:
                self.send(worker, SnapshotRequest(self.last_gathering, message.scope))
        elif isinstance(message, SnapshotAnswer):
            gathering = self.gatherings.get(message.id)
            if gathering is not None:
                gathering.snapshots.append(message.snapshot)
                gathering.expected.discard(index)
                self.finish_gathering(message.id)

    def settle_doubtful(self, slot: WorkerSlot, batches: List[Tuple[float, str]]) -> None:
        """Learns batches that a dead worker's recovered files hold, then settles the claims its
        slot held in doubt: a batch among them as committed (its waiters get DUPLICATE), any other
        released."""
        stored = {key: stamp for stamp, key in batches}
        self.dedupe.load((stamp, key) for key, stamp in stored.items()
                         if key not in self.dedupe.pending)
        doubtful, slot.doubtful = slot.doubtful, set()
        for key in doubtful:
            if key in stored:
                self.commit(key, stored[key])
            else:
                self.release(key)

    def commit(self, key: str, stored_at: float) -> None:
        """A claimed batch is stored: the workers waiting for it learn it is a duplicate."""
        self.dedupe.commit(key, stored_at)
        self.owners.pop(key, None)
        committed = advance(CLAIM_PROTOCOL, ClaimState.WAITING, ClaimEvent.HOLDER_COMMITTED)
        for waiter, request_id in self.waiting.pop(key, []):
            self.send(waiter, ClaimAnswer(request_id, committed.value))

    def release(self, key: str) -> None:
        """A claim was given up: the next worker waiting for the same batch may store it."""
        self.dedupe.release(key)
        self.owners.pop(key, None)
        waiters = self.waiting.pop(key, [])
        while waiters:
            waiter, request_id = waiters.pop(0)
            state = self.dedupe.claim_again(key)
            self.send(waiter, ClaimAnswer(request_id, state.value))
            if state is ClaimState.GRANTED:
                self.owners[key] = waiter
                if waiters:
                    self.waiting[key] = waiters
                return

    def finish_gathering(self, number: int) -> None:
        """Answers a MetricsRequest once every worker sent its snapshot."""
        gathering = self.gatherings[number]
        if not gathering.expected:
            del self.gatherings[number]
            merged = MetricsSnapshot.merge(gathering.snapshots)
            merged.counters["worker_restarts"] = self.restarted
            self.send(gathering.worker, MetricsAnswer(gathering.request_id, merged))


# ---------------------------------------------------------------------------
# Endpoint checker
# ---------------------------------------------------------------------------
# `dsreceiver.py check URL`: what DataStream's "Validate & Save" would make of an endpoint.

X509_V_ERR_HOSTNAME_MISMATCH = 62
# Text from elsewhere (an endpoint's reason phrase, an API's error title) is cut to this many
# characters when printed; a check's detail may say more.
PRINTABLE_LIMIT = 200
CHECK_DETAIL_LIMIT = 1000


def build_check_parser() -> ArgumentParser:
    """Returns the parser of the check command."""
    parser = ArgumentParser(prog="dsreceiver.py check",
                            description="Test an endpoint the way DataStream's \"Validate & Save\""
                            " does, explaining every failure: name, TLS, certificate, then both"
                            " validation probes (JSON and STRUCTURED streams), plain and gzip'd;"
                            " with --uls, as Akamai's Unified Log Streamer connects instead."
                            " Credentials come from the same settings as the server's: $%s (first"
                            " entry), $%s (first token), --auth-header with $%s, --auth-query-param"
                            " with $%s, or their files."
                            % (ENV_BASIC_AUTH, ENV_BEARER_TOKEN, ENV_AUTH_HEADER_VALUE,
                               ENV_AUTH_QUERY_VALUE))
    parser.add_argument("url",
                        help="the stream's endpoint URL, e.g. https://logs.example.com/datastream")
    parser.add_argument("--ca", type=Path, metavar="FILE",
                        help="CA certificate to trust, as uploaded to the stream (default: the"
                        " system store)")
    parser.add_argument("--client-cert", type=Path, metavar="FILE",
                        help="client certificate for mTLS (default: none)")
    parser.add_argument("--client-key", type=Path, metavar="FILE",
                        help="its private key (default: none)")
    parser.add_argument("--uls", action="store_true",
                        help="check the endpoint for Akamai's Unified Log Streamer (ULS): an IP"
                        " address will do, and its liveness probe (OPTIONS) must get 200 or 204,"
                        " instead of DataStream's probes (default: off)")
    parser.add_argument("--basic-auth-file", type=Path, metavar="FILE",
                        help="use the first user:password line (default: $%s)" % ENV_BASIC_AUTH)
    parser.add_argument("--bearer-token-file", type=Path, metavar="FILE",
                        help="send Authorization: Bearer with the first token; Basic goes first for"
                        " DataStream (which sends no token), Bearer with --uls (default: $%s)"
                        % ENV_BEARER_TOKEN)
    parser.add_argument("--auth-header", metavar="NAME",
                        help="send this custom header (default: none)")
    parser.add_argument("--auth-header-file", type=Path, metavar="FILE",
                        help="its value, first line (default: $%s)" % ENV_AUTH_HEADER_VALUE)
    parser.add_argument("--auth-query-param", metavar="NAME",
                        help="add this URL token parameter (default: none)")
    parser.add_argument("--auth-query-file", type=Path, metavar="FILE",
                        help="its value, first line (default: $%s)" % ENV_AUTH_QUERY_VALUE)
    parser.add_argument("--timeout", type=positive_seconds, default=5.0, metavar="SECONDS",
                        help="how long to wait for the answer (default: %(default)s)")
    return parser


class CheckSettings(NamedTuple):
    """What the check command was asked to do."""

    url: str
    ca: Optional[Path]
    client_cert: Optional[Path]
    client_key: Optional[Path]
    timeout: float
    credentials: CredentialSettings
    # Check as Akamai's Unified Log Streamer connects, not as DataStream validates.
    uls: bool = False


def parse_check_options(argv: Sequence[str]) -> CheckSettings:
    """Parses the check command's command line."""
    options = build_check_parser().parse_args(argv)
    return CheckSettings(options.url, options.ca, options.client_cert, options.client_key,
                         options.timeout,
                         CredentialSettings(options.basic_auth_file, options.auth_header,
                                            options.auth_header_file, options.auth_query_param,
                                            options.auth_query_file,
                                            bearer_token_file=options.bearer_token_file),
                         options.uls)


def printable(text: str, limit: int = PRINTABLE_LIMIT) -> str:
    """`text` safe to print on a terminal: control and other unprintable characters (escape
    sequences, lone surrogates) written as \\xNN or \\uNNNN, cut to `limit` characters."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


class CheckReport:
    """Prints one PASS/FAIL/WARN/SKIP line per step and remembers whether any failed."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.failed = False

    def line(self, outcome: str, step: str, detail: str) -> None:
        """Prints a step's outcome."""
        if outcome == "FAIL":
            self.failed = True
        # A detail may quote the endpoint (its reason phrase): never a raw escape on a terminal.
        self.out.write("%-4s  %-34s %s\n" % (outcome, step, printable(detail, CHECK_DETAIL_LIMIT)))
        self.out.flush()


def check_endpoint(options: CheckSettings, credentials: Authenticator, report: CheckReport) -> None:
    """Runs every step DataStream's validation depends on, reporting each."""
    url = urllib.parse.urlsplit(options.url)
    host, port = url.hostname or "", url.port or 443
    if url.scheme != "https" or not host:
        report.line("FAIL", "URL is https://NAME/...",
                    "DataStream pushes only to https:// URLs with a host")
        return
    try:
        ipaddress.ip_address(host)
        if not options.uls:
            report.line("FAIL", "URL host is a DNS name",
                        "%s is an IP address; DataStream refuses those" % host)
            return
    except ValueError:
        report.line("PASS", "URL host is a DNS name", host)
    try:
        addresses = sorted({info[4][0]
                            for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        report.line("PASS", "DNS resolves", ", ".join(addresses))
    except OSError as exc:
        report.line("FAIL", "DNS resolves", "%s: %s" % (host, describe_os_error(exc)))
        return
    negotiation = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    negotiation.check_hostname = False
    # This step tests only the protocol; trust is the next step.
    negotiation.verify_mode = ssl.CERT_NONE
    negotiation.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, port), timeout=options.timeout) as raw:
            with negotiation.wrap_socket(raw, server_hostname=host) as tls:
                report.line("PASS", "TLS 1.2+ negotiates",
                            "%s, %s" % (tls.version(), (tls.cipher() or ("?",))[0]))
    except (OSError, ssl.SSLError) as exc:
        report.line("FAIL", "TLS 1.2+ negotiates",
                    "%s port %d: %s" % (host, port, describe_os_error(exc)))
        return
    context = ssl.create_default_context(cafile=str(options.ca) if options.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.client_cert:
        try:
            context.load_cert_chain(str(options.client_cert),
                                    str(options.client_key or options.client_cert))
        except (OSError, ssl.SSLError) as exc:
            report.line("FAIL", "client certificate loads", describe_os_error(exc))
            return
    try:
        with socket.create_connection((host, port), timeout=options.timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                certificate = tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            report.line("PASS", "certificate chain is trusted",
                        "by " + (str(options.ca) if options.ca else "the system store"))
            report.line("FAIL", "certificate matches " + host, exc.verify_message)
        else:
            report.line("FAIL", "certificate chain is trusted",
                        "%s (upload the issuing CA to the stream and pass it with --ca)"
                        % exc.verify_message)
        return
    except (OSError, ssl.SSLError) as exc:
        report.line("FAIL", "certificate chain is trusted", describe_os_error(exc))
        return
    report.line("PASS", "certificate chain is trusted",
                "by " + (str(options.ca) if options.ca else "the system store"))
    report.line("PASS", "certificate matches " + host, "")
    assert certificate is not None  # a verified peer always presents one
    days_left = (ssl.cert_time_to_seconds(str(certificate["notAfter"])) - time.time()) / 86400
    report.line("WARN" if days_left < CERT_EXPIRY_WARNING_DAYS else "PASS",
                "certificate is not expiring",
                "%.0f days left (until %s)" % (days_left, certificate["notAfter"]))
    if options.uls:
        post_probe(options, credentials, context, url, report, "ULS liveness probe gets 200 or 204",
                   ULS_PROBE, False, "OPTIONS")
        return
    for step, body, compressed in (("JSON probe gets a 2xx", VALIDATION_PROBES[0], False),
                                   ("JSON probe, gzip'd, gets a 2xx", VALIDATION_PROBES[0], True),
                                   ("STRUCTURED probe gets a 2xx", VALIDATION_PROBES[1], False),
                                   ("STRUCTURED probe, gzip'd, gets 2xx", VALIDATION_PROBES[1],
                                    True)):
        post_probe(options, credentials, context, url, report, step, body, compressed)


def post_probe(options: CheckSettings, credentials: Authenticator, context: ssl.SSLContext,
               url: urllib.parse.SplitResult, report: CheckReport, step: str, body: bytes,
               compressed: bool, method: str = "POST") -> None:
    """POSTs a validation probe, as a JSON or a STRUCTURED stream sends it (gzip'd with
    compressLogs), with the configured credentials, and checks for a 2xx in time; or (OPTIONS)
    ULS's liveness probe, which passes on 200 or 204 only."""
    import http.client  # here: only the check command needs an HTTP client

    query = url.query
    if credentials.query_param:
        query = (query + "&" if query else "") + urllib.parse.urlencode(
            {credentials.query_param: credentials.query_values[0].decode("utf-8")})
    target = (url.path or "/") + ("?" + query if query else "")
    agent = ULS_USER_AGENT + "check" if options.uls else "dsreceiver-check/" + __version__
    headers = {"Content-Type": "application/json", "User-Agent": agent}
    # DataStream sends Basic; ULS sends whatever --httpauthheader holds, a token as a rule.
    if credentials.bearer and (options.uls or not credentials.basic):
        headers["Authorization"] = "Bearer " + credentials.bearer[0].decode("ascii")
    elif credentials.basic:
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.basic[0]).decode("ascii")
    if credentials.header_name:
        headers[credentials.header_name] = credentials.header_values[0].decode("latin-1")
    if compressed:
        body = gzip.compress(body, mtime=0)
        headers["Content-Encoding"] = "gzip"
    connection = http.client.HTTPSConnection(url.hostname or "", url.port or 443,
                                             timeout=options.timeout, context=context)
    try:
        started = time.monotonic()
        connection.request(method, target, body=body, headers=headers)
        answer = connection.getresponse()
        answer.read()
        elapsed = time.monotonic() - started
    except socket.timeout:
        report.line("FAIL", step, "no answer within %gs" % options.timeout)
        return
    except (OSError, http.client.HTTPException) as exc:
        report.line("FAIL", step, describe_os_error(exc))
        return
    finally:
        connection.close()
    detail = "%d %s in %.0f ms" % (answer.status, answer.reason, elapsed * 1000)
    passed = answer.status in (200, 204) if method == "OPTIONS" else 200 <= answer.status < 300
    if passed:
        report.line("PASS", step, detail)
    elif answer.status == 401:
        report.line("FAIL", step, detail + ": credentials refused (check the credential settings)")
    else:
        report.line("FAIL", step, detail)


def run_check(argv: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """The check command: 0 when DataStream (with --uls, ULS) would accept the endpoint, 1 when
    not, 2 for bad usage."""
    options = parse_check_options(argv)
    try:
        credentials = Authenticator.from_settings(options.credentials, dict(os.environ))
    except ConfigError as exc:
        sys.stderr.write("dsreceiver.py check: error: %s\n" % exc)
        return 2
    report = CheckReport(out)
    check_endpoint(options, credentials, report)
    sender = "Akamai's Unified Log Streamer" if options.uls else "DataStream"
    if report.failed:
        out.write("verdict: %s would NOT accept %s\n" % (sender, options.url))
        return 1
    out.write("verdict: %s would accept %s\n" % (sender, options.url))
    return 0


# ---------------------------------------------------------------------------
# Akamai APIs
# ---------------------------------------------------------------------------
# EdgeGrid, the signature every Akamai API call carries (EG1-HMAC-SHA256), with the credentials of
# an .edgerc file: what the commands that talk to Akamai build on.

EDGEGRID_MAX_BODY = 131072
EDGERC_KEYS = ("host", "client_token", "client_secret", "access_token")
# Tokens and secrets are printable ASCII without spaces; a host is a DNS name or address, a port.
EDGERC_VALUE_RE = re.compile(r"[\x21-\x7e]{1,1024}")
EDGERC_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?")
# An .edgerc open to these bits lets other accounts use the API client.
EDGERC_OPEN_BITS = 0o077
# What an API answer may hold: bigger answers are refused rather than read (and parsed) whole; an
# error answer needs no more than its title.
API_MAX_ANSWER = 16 << 20
API_MAX_ERROR_ANSWER = 64 << 10
API_READ_SIZE = 65536
# A socket past its call's deadline waits this long for a byte: no longer.
EXPIRED_TIMEOUT = 0.001
# Counts Akamai reports (records, uploads) are below this; more is not a count.
API_MAX_COUNT = 10 ** 15


class EdgeGridCredentials(NamedTuple):
    """One section of an .edgerc file: an API client's host and secrets."""

    host: str
    client_token: str
    client_secret: str
    access_token: str
    # How much of a POST body the signature covers.
    max_body: int = EDGEGRID_MAX_BODY


def read_edgerc(path: Path, section: str = "default") -> EdgeGridCredentials:
    """Reads `section` of the .edgerc file at `path`; raises ConfigError naming what is missing or
    malformed (never a secret), and warns when others than its owner may read it."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)  # secrets may hold '%'
    try:
        if not parser.read(str(path), encoding="utf-8"):
            raise ConfigError("cannot read %s: no such file" % path)
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read %s: %s" % (path, printable(str(exc).splitlines()[0])
                                                  )) from None
    if not parser.has_section(section):
        raise ConfigError("%s has no [%s] section (it has: %s)"
                          % (path, printable(section),
                             printable(", ".join(parser.sections())) or "none"))
    values = parser[section]
    missing = [key for key in EDGERC_KEYS if not values.get(key, "").strip()]
    if missing:
        raise ConfigError("[%s] of %s lacks %s" % (section, path, ", ".join(missing)))
    for key in EDGERC_KEYS:
        # An indented line continues the value above it: a line break inside a token, which would
        # otherwise reach the Authorization header.
        if not EDGERC_VALUE_RE.fullmatch(values[key].strip()):
            raise ConfigError("[%s] of %s: %s holds a space, a line break or a control character"
                              " (an indented line continues the line above it): write it on one"
                              " line" % (section, path, key))
    try:
        max_body = int(values.get("max_body", str(EDGEGRID_MAX_BODY)))
    except ValueError:
        raise ConfigError("[%s] of %s: max_body must be a number of bytes"
                          % (section, path)) from None
    host = values["host"].strip().split("://", 1)[-1].rstrip("/")
    if not EDGERC_HOST_RE.fullmatch(host):
        raise ConfigError("[%s] of %s: host must be a host name such as"
                          " akab-xxxx.luna.akamaiapis.net" % (section, path))
    warn_if_open(path)
    return EdgeGridCredentials(host, values["client_token"].strip(),
                               values["client_secret"].strip(), values["access_token"].strip(),
                               max_body)


def warn_if_open(path: Path) -> None:
    """Warns, naming the fix, when an .edgerc may be read by others than its owner."""
    try:
        mode = os.stat(str(path)).st_mode
    except OSError:
        return  # it was just read: a race with its removal changes nothing here
    if mode & EDGERC_OPEN_BITS:
        log.warning("warning: %s holds API secrets and is open to its group or others (mode"
                    " %04o): chmod 600 %s", path, mode & 0o777, path)


def edgegrid_timestamp(moment: float) -> str:
    """EdgeGrid's timestamp of `moment`: 20261201T23:05:00+0000."""
    return time.strftime("%Y%m%dT%H:%M:%S+0000", time.gmtime(moment))


def base64_hmac_sha256(data: str, key: str) -> str:
    """base64(HMAC-SHA256(key, data)), as EdgeGrid uses it."""
    digest = hmac.new(key.encode("utf-8"), data.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def edgegrid_authorization(credentials: EdgeGridCredentials, method: str, url: str,
                           body: bytes = b"", timestamp: str = "", nonce: str = "") -> str:
    """The Authorization header of one request to an Akamai API (EG1-HMAC-SHA256): a signature of
    the method, scheme, host, path and query, and (for POST) the SHA-256 of the body's first
    max_body bytes, keyed by an HMAC of the timestamp.  `timestamp` and `nonce` default to now and
    a random UUID; tests give their own."""
    import uuid

    timestamp = timestamp or edgegrid_timestamp(time.time())
    nonce = nonce or str(uuid.uuid4())
    parts = urllib.parse.urlsplit(url)
    header = ("EG1-HMAC-SHA256 client_token=%s;access_token=%s;timestamp=%s;nonce=%s;"
              % (credentials.client_token, credentials.access_token, timestamp, nonce))
    content_hash = ""
    if method.upper() == "POST" and body:
        body_hash = hashlib.sha256(body[:credentials.max_body]).digest()
        content_hash = base64.b64encode(body_hash).decode("ascii")
    data_to_sign = "\t".join([method.upper(), parts.scheme, parts.netloc.lower(),
                              parts.path + ("?" + parts.query if parts.query else ""),
                              "", content_hash, header])
    signing_key = base64_hmac_sha256(timestamp, credentials.client_secret)
    return header + "signature=" + base64_hmac_sha256(data_to_sign, signing_key)


def api_stream_id(value: object) -> str:
    """A stream ID from an API answer, as the receiver names it (decimal, no leading zero); raises
    ValueError for anything else."""
    text = value if isinstance(value, str) else str(value) if type(value) is int else ""
    if not STREAM_ID_RE.fullmatch(text):
        raise ValueError("streamId %s is not a stream ID" % printable(repr(value), 40))
    return text


def api_count(value: object, name: str) -> int:
    """A count from an API answer (a number, or a decimal string); raises ValueError for anything
    else: negative, fractional, not finite or beyond any real count."""
    if type(value) is int:
        number = value
    elif isinstance(value, str) and value.isdigit() and len(value) <= 16 and value.isascii():
        number = int(value)
    else:
        raise ValueError("%s %s is not a count" % (name, printable(repr(value), 40)))
    if not 0 <= number < API_MAX_COUNT:
        raise ValueError("%s %s is not a count" % (name, printable(repr(value), 40)))
    return number


def refuse_constant(name: str) -> float:
    """json.loads' parse_constant: NaN and Infinity are not numbers an API answers with."""
    raise ValueError("%s is not a number" % name)


def finite_float(text: str) -> float:
    """json.loads' parse_float: a number such as 1e999, which reads as infinity, is refused."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("%s is not a finite number" % text[:40])
    return number


def parse_api_json(body: bytes) -> Any:
    """An API answer's JSON; raises ValueError for anything else (NaN, 1e999, nesting too deep to
    read, text that is not UTF-8)."""
    try:
        return json.loads(body, parse_constant=refuse_constant, parse_float=finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class AkamaiError(Exception):
    """An Akamai API call failed; the message is one line saying how."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def api_error_line(status: int, body: bytes, url: str, section: str) -> str:
    """One line about an API's refusal: what the status means here, and Akamai's own title (its
    control characters escaped)."""
    try:
        problem = parse_api_json(body)
        detail = printable(str(problem.get("detail") or problem.get("title") or ""))
    except (ValueError, AttributeError):
        detail = ""
    meaning = {401: "the credentials of [%s] were refused (check the .edgerc section)" % section,
               403: "the API client of [%s] may not read DataStream (grant it DataStream,"
                    " READ-ONLY)" % section,
               404: "not found",
               429: "rate limited by Akamai: try again in a minute"}.get(
        status, "Akamai's API failed (try again later)" if status >= 500 else "refused")
    return "%s answered HTTP %d: %s%s" % (url.split("?", 1)[0], status, meaning,
                                          " (%s)" % detail if detail else "")


class AkamaiClient:
    """Signed GETs to the host of one .edgerc section, each answer read as JSON within one deadline
    per call (connection, handshake and every byte), and at most API_MAX_ANSWER bytes."""

    def __init__(self, credentials: EdgeGridCredentials, section: str = "default",
                 timeout: float = 30.0) -> None:
        self.credentials = credentials
        self.section = section
        self.timeout = timeout
        # The system's CAs (and SSL_CERT_FILE when set), host name checked.
        self.context = ssl.create_default_context()

    def get_json(self, path: str, query: Optional[Dict[str, str]] = None) -> Any:
        """GETs `path` with `query`; raises AkamaiError with one line for any failure."""
        import http.client

        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        url = "https://%s%s" % (self.credentials.host, target)
        headers = {"Authorization": edgegrid_authorization(self.credentials, "GET", url),
                   "Accept": "application/json", "User-Agent": "dsreceiver/" + __version__}
        connection = http.client.HTTPSConnection(self.credentials.host, timeout=self.timeout,
                                                 context=self.context)
        expired = threading.Event()

        def expire() -> None:
            # A read timeout bounds each read only: an answer trickling a byte at a time would
            # never end.  The socket's shutdown ends a read that waits, and a timeout too short to
            # wait for any byte ends the next (the TLS layer is left whole: SSLSocket.shutdown
            # would have the next read take TLS records for the answer).
            expired.set()
            sock = connection.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(EXPIRED_TIMEOUT)
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

        ends = time.monotonic() + self.timeout
        alarm = threading.Timer(self.timeout, expire)
        alarm.daemon = True
        alarm.start()
        try:
            connection.connect()
            if expired.is_set():
                raise OSError("timed out")
            connection.request("GET", target, headers=headers)
            answer = connection.getresponse()
            limit = API_MAX_ANSWER if answer.status == HTTPStatus.OK else API_MAX_ERROR_ANSWER
            body = self.read_answer(answer, limit, url, ends)
            if expired.is_set():
                raise OSError("timed out")  # the body ended because the deadline cut it
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if expired.is_set():
                raise AkamaiError("%s gave no complete answer within --timeout %g s"
                                  % (self.credentials.host, self.timeout)) from None
            # Not str(exc) of a ValueError: http.client's would quote the request's headers.
            reason = (describe_os_error(exc) if isinstance(exc, OSError)
                      else exc.__class__.__name__)
            raise AkamaiError("cannot reach %s: %s" % (self.credentials.host,
                                                       printable(reason))) from None
        finally:
            alarm.cancel()
            connection.close()
        if answer.status != HTTPStatus.OK:
            raise AkamaiError(api_error_line(answer.status, body, url, self.section),
                              answer.status)
        try:
            return parse_api_json(body)
        except ValueError as exc:
            raise AkamaiError("%s answered something that is not JSON (%s)"
                              % (url.split("?", 1)[0], printable(str(exc), 80))) from None

    @staticmethod
    def read_answer(answer: Any, limit: int, url: str, deadline: float) -> bytes:
        """An answer's body, refused (AkamaiError) as soon as it exceeds `limit` bytes."""
        declared = answer.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > limit and answer.status == HTTPStatus.OK:
            raise AkamaiError("%s answered %s bytes, more than the %d MB read: refused"
                              % (url.split("?", 1)[0], declared, limit >> 20))
        parts: List[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise OSError("timed out")
            part = answer.read1(API_READ_SIZE)
            if not part:
                return b"".join(parts)
            size += len(part)
            if size > limit:
                if answer.status != HTTPStatus.OK:
                    return b"".join(parts)  # enough of an error answer to name it
                raise AkamaiError("%s answered more than the %d MB read: refused"
                                  % (url.split("?", 1)[0], limit >> 20))
            parts.append(part)

    def get_first(self, paths: Sequence[str], query: Optional[Dict[str, str]] = None
                  ) -> Tuple[str, Any]:
        """GETs the first of `paths` that exists (a newer API version first): (path, answer)."""
        for path in paths[:-1]:
            try:
                return path, self.get_json(path, query)
            except AkamaiError as exc:
                if exc.status != HTTPStatus.NOT_FOUND:
                    raise
        return paths[-1], self.get_json(paths[-1], query)


# ---------------------------------------------------------------------------
# Reconciliation
# ---------------------------------------------------------------------------
# The commands that answer "did we get everything?": ledger (what was stored, per route, stream
# and window), reconcile (that, next to what Akamai says it delivered) and streams pull (the stream
# definitions --stream-config reads, from Akamai's API).

METRICS_PATHS = ("/datastream-config-api/v3/log/streams/metrics",
                 "/datastream-config-api/v2/log/streams/metrics")
# One metrics call covers at most this much (the API takes 7 days; a day of 5-minute windows keeps
# each answer small and a failed call cheap to repeat).
RECONCILE_CALL_SPAN = 86400
RECONCILE_MAX_SPAN = 7 * 86400
# The default end of a reconcile: windows older than this are complete (DataStream stops retrying
# a batch after about 5 minutes).
RECONCILE_SETTLE = 900
DURATION_RE = re.compile(r"(\d+)([mhd])")
DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400}
# DataStream's error codes of one window: more are not a list it would send; a code is short.
MAX_ERROR_CODES = 100
MAX_ERROR_CODE = 40


def parse_moment(text: str, now: float) -> int:
    """Reads --since/--until: a UTC time (2026-11-27T15:05Z) or a time ago (90m, 6h, 7d)."""
    match = DURATION_RE.fullmatch(text.strip())
    if match:
        return int(now - int(match.group(1)) * DURATION_UNITS[match.group(2)])
    return parse_window(text)


def add_ledger_options(parser: ArgumentParser, until: str) -> None:
    """The options of the commands that read ledgers; `until` is --until's default."""
    parser.add_argument("--output-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="a server's --output-dir; repeat it for a fleet, whose ledgers are"
                        " added up (default: ./data)")
    parser.add_argument("--since", default="24h", metavar="TIME",
                        help="first window: UTC time (2026-11-27T15:00Z) or time ago (90m, 6h, 7d)"
                        " (default: %(default)s)")
    parser.add_argument("--until", default=until, metavar="TIME",
                        help="through the window holding this time, as --since; recent windows"
                        " may still get DataStream's retries (default: %(default)s)")
    parser.add_argument("--stream", action="append", default=[], metavar="ID",
                        help="only this stream; repeatable (default: every stream)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of a table (default: off)")


def add_api_options(parser: ArgumentParser) -> None:
    """The options of the commands that call Akamai's API."""
    parser.add_argument("--edgerc", type=Path, default=Path("~/.edgerc"), metavar="FILE",
                        help="EdgeGrid credentials (default: %(default)s)")
    parser.add_argument("--section", default="default",
                        help="the .edgerc section to use (default: %(default)s)")
    parser.add_argument("--timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
                        help="how long each API call may take, its whole answer included"
                        " (default: %(default)s)")


def build_reconcile_parser(command: str) -> ArgumentParser:
    """Returns the parser of the ledger or the reconcile command."""
    if command == "ledger":
        parser = ArgumentParser(prog="dsreceiver.py ledger", description="Print what was stored"
                                " per route, stream and 5-minute window of receipt: records,"
                                " batches, bytes, retries answered as already stored, refusals"
                                " by status.")
    else:
        parser = ArgumentParser(prog="dsreceiver.py reconcile", description="Compare, per stream"
                                " (its routes added up) and 5-minute window, the records Akamai"
                                " says DataStream delivered (its upload metrics) with the records"
                                " stored here.  Exit 0: everything delivered is stored; 1: records"
                                " are missing or DataStream gave up on some; 2: usage, credential"
                                " or API problem.")
        add_api_options(parser)
    add_ledger_options(parser, "0m" if command == "ledger" else "%dm" % (RECONCILE_SETTLE // 60))
    return parser


class LedgerQuery(NamedTuple):
    """What the ledger and reconcile commands read: output folders, windows and streams."""

    roots: List[Path]
    since: int
    until: int
    streams: List[str]
    as_json: bool


def parse_ledger_query(options: argparse.Namespace, now: float) -> LedgerQuery:
    """Checks the ledger options; raises ConfigError naming a bad one."""
    try:
        since, until = parse_moment(options.since, now), parse_moment(options.until, now)
    except ValueError as exc:
        raise ConfigError("--since/--until: %s" % exc) from None
    since -= since % LEDGER_WINDOW
    until += -until % LEDGER_WINDOW  # through the window holding --until
    if until <= since:
        raise ConfigError("--until must be at least one 5-minute window after --since")
    for stream in options.stream:
        if not STREAM_ID_RE.fullmatch(stream):
            raise ConfigError("--stream %r is not a stream ID" % stream)
    # Each folder once, however it is spelled (D and D/, a link to it): counted twice, the ledger
    # would hide a loss.
    roots = list({os.path.realpath(str(root)): root
                  for root in options.output_dir or [Path("data")]}.values())
    for root in roots:
        if not (root / Layout.STATE_DIR).is_dir():
            raise ConfigError("%s is not a dsreceiver output folder (no %s in it)"
                              % (root, Layout.STATE_DIR))
    return LedgerQuery(roots, since, until, options.stream, options.json)


def run_ledger(argv: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """The ledger command: 0, or 2 for bad usage."""
    options = build_reconcile_parser("ledger").parse_args(argv)
    try:
        query = parse_ledger_query(options, time.time())
        ledger = fleet_ledger(query.roots, query.since, query.until)
    except ConfigError as exc:
        sys.stderr.write("dsreceiver.py ledger: error: %s\n" % exc)
        return 2
    rows = sorted((key for key in ledger
                   if not query.streams or key[0].stream in query.streams),
                  key=lambda key: (key[1], key[0]))
    if query.as_json:
        for key in rows:
            out.write(json.dumps(ledger[key].to_wire(key)) + "\n")
        return 0
    out.write("%-20s  %-12s %-10s %10s %8s %12s %10s  %s\n"
              % ("window", "route", "stream", "records", "batches", "bytes", "duplicates",
                 "refused"))
    for key in rows:
        row = ledger[key]
        refused = " ".join("%sx%d" % item for item in sorted(row.refused.items()))
        routed = key[0]
        out.write("%-20s  %-12s %-10s %10d %8d %12d %10d  %s\n"
                  % (iso_window(key[1]), routed.route or "-", routed.stream or "-", row.records,
                     row.batches, row.stored_bytes, row.duplicates, refused or "-"))
    return 0


class Delivery(NamedTuple):
    """What Akamai's upload metrics say of one stream's window."""

    attempted: int
    failed: int
    # DataStream's failed upload attempts: error code -> count.
    errors: Dict[str, int]

    @property
    def delivered(self) -> int:
        """The records DataStream delivered."""
        return self.attempted - self.failed


def read_deliveries(answer: object) -> Dict[Tuple[str, int], Delivery]:
    """The windows of an upload-metrics answer, by (stream ID, window start); raises ValueError
    naming the first value that is not what the API documents (every value is checked before it
    is used: stream IDs, counts, times, error codes)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("fileUploadMetrics"), list):
        raise ValueError("the answer has no fileUploadMetrics list")
    deliveries: Dict[Tuple[str, int], Delivery] = {}
    for entry in answer["fileUploadMetrics"]:
        if not isinstance(entry, dict):
            raise ValueError("a fileUploadMetrics entry is not an object")
        key = (api_stream_id(entry.get("streamId")), api_window(entry.get("aggregationTime")))
        found = Delivery(api_count(entry.get("recordsAttemptedUpload") or 0,
                                   "recordsAttemptedUpload"),
                         api_count(entry.get("recordsFailedUpload") or 0, "recordsFailedUpload"),
                         api_errors(entry.get("failedUploadAttempts") or []))
        if found.failed > found.attempted:
            raise ValueError("recordsFailedUpload %d exceeds recordsAttemptedUpload %d"
                             % (found.failed, found.attempted))
        previous = deliveries.get(key)
        if previous is not None:
            found = Delivery(previous.attempted + found.attempted, previous.failed + found.failed,
                             {**previous.errors, **found.errors})
        deliveries[key] = found
    return deliveries


def api_window(value: object) -> int:
    """An aggregationTime from an API answer, as the start of its 5-minute window."""
    if not isinstance(value, str) or len(value) > 32:
        raise ValueError("aggregationTime %s is not a time" % printable(repr(value), 40))
    try:
        moment = parse_window(value)
    except ValueError:
        raise ValueError("aggregationTime %s is not a time" % printable(repr(value), 40)) from None
    return moment - moment % LEDGER_WINDOW


def api_errors(attempts: object) -> Dict[str, int]:
    """failedUploadAttempts as error code -> count, the codes made printable and short."""
    if not isinstance(attempts, list) or len(attempts) > MAX_ERROR_CODES:
        raise ValueError("failedUploadAttempts is not a short list")
    errors: Dict[str, int] = {}
    for attempt in attempts:
        if not isinstance(attempt, dict) or not isinstance(attempt.get("errorCode"), (str, int)):
            raise ValueError("a failedUploadAttempts entry has no errorCode")
        code = printable(str(attempt["errorCode"]), MAX_ERROR_CODE)
        errors[code] = errors.get(code, 0) + api_count(attempt.get("errorCount"), "errorCount")
    return errors


def fetch_deliveries(client: AkamaiClient, since: int, until: int,
                     streams: Sequence[str]) -> Dict[Tuple[str, int], Delivery]:
    """Akamai's upload metrics of [since, until) in FIVE_MINUTE windows, one call per stream (or
    one for the account) per RECONCILE_CALL_SPAN."""
    deliveries: Dict[Tuple[str, int], Delivery] = {}
    for stream in streams or [""]:
        for start in range(since, until, RECONCILE_CALL_SPAN):
            query = {"start": iso_window(start),
                     "end": iso_window(min(until, start + RECONCILE_CALL_SPAN)),
                     "aggregationInterval": "FIVE_MINUTE"}
            if stream:
                query["streamId"] = stream
            path, answer = client.get_first(METRICS_PATHS, query)
            try:
                found = read_deliveries(answer)
            except (ValueError, KeyError, TypeError) as exc:
                raise AkamaiError("%s answered in an unknown shape: %s"
                                  % (path, printable(str(exc)))) from None
            deliveries.update(found)
    return deliveries


class WindowVerdict(NamedTuple):
    """One stream's window, compared."""

    window: int
    delivered: int
    stored: int
    # Records delivered and not stored, after the one-window tolerance.
    missing: int
    # Records stored beyond those delivered, after the tolerance.
    extra: int
    # Part of the difference is a push counted in the next or the previous window.
    shifted: bool
    failed: int
    errors: Dict[str, int]

    def verdict(self) -> str:
        """The window's verdict, as the report prints it."""
        words = []
        if self.missing:
            words.append("MISSING %d" % self.missing)
        if self.extra:
            words.append("extra %d (stored more than Akamai delivered)" % self.extra)
        if not words:
            words.append("ok, a push counted in the next window" if self.shifted else "ok")
        if self.failed:
            errors = ", ".join("%s x%d" % item for item in sorted(self.errors.items()))
            words.append("DataStream gave up on %d records" % self.failed
                         + (" (%s)" % errors if errors else ""))
        return "; ".join(words)

    def to_wire(self) -> Dict[str, Any]:
        """The window as JSON-ready data."""
        return {"window": iso_window(self.window), "delivered": self.delivered,
                "stored": self.stored, "difference": self.stored - self.delivered,
                "missing": self.missing, "extra": self.extra, "shifted": self.shifted,
                "failed": self.failed, "errors": self.errors, "verdict": self.verdict()}


def compare_windows(windows: Sequence[int], delivered: Dict[int, Delivery],
                    stored: Dict[int, int]) -> List[WindowVerdict]:
    """Compares one stream's windows, in order.  Akamai counts a push when it uploads it, the
    ledger when it is stored, so one near a window's edge may land on either side: a shortage in
    one window and a surplus in the next (or the previous) cancel out, one window apart at most."""
    none = Delivery(0, 0, {})
    residual = [stored.get(window, 0) - delivered.get(window, none).delivered
                for window in windows]
    difference = list(residual)
    for position in range(len(windows) - 1):
        here, after = residual[position], residual[position + 1]
        if here * after < 0:
            moved = min(abs(here), abs(after))
            residual[position] -= moved if here > 0 else -moved
            residual[position + 1] -= moved if after > 0 else -moved
    verdicts = []
    for position, window in enumerate(windows):
        delivery = delivered.get(window, none)
        verdicts.append(WindowVerdict(window, delivery.delivered, stored.get(window, 0),
                                      max(0, -residual[position]), max(0, residual[position]),
                                      residual[position] != difference[position], delivery.failed,
                                      delivery.errors))
    return verdicts


def reconcile(query: LedgerQuery, deliveries: Dict[Tuple[str, int], Delivery],
              ledger: Dict[LedgerKey, LedgerRow]) -> Dict[str, List[WindowVerdict]]:
    """Every stream's windows of the query, compared; a window either side of the range is read
    too, for the tolerance, and left out of the report."""
    stored: Dict[str, Dict[int, int]] = {}
    for (routed, window), counts in ledger.items():
        per_window = stored.setdefault(routed.stream, {})
        per_window[window] = per_window.get(window, 0) + counts.records
    # Grouped once by stream, so that the comparison is linear in windows x streams.
    by_stream: Dict[str, Dict[int, Delivery]] = {}
    for (name, window), delivery in deliveries.items():
        by_stream.setdefault(name, {})[window] = delivery
    streams = set(query.streams) if query.streams else (
        set(by_stream) | {stream for stream in stored if STREAM_ID_RE.fullmatch(stream)})
    windows = list(range(query.since - LEDGER_WINDOW, query.until + LEDGER_WINDOW,
                         LEDGER_WINDOW))
    report = {}
    for stream in sorted(streams, key=lambda name: (len(name), name)):
        delivered = by_stream.get(stream, {})
        compared = compare_windows(windows, delivered, stored.get(stream, {}))
        report[stream] = [verdict for verdict in compared
                          if query.since <= verdict.window < query.until]
    return report


def stream_totals(verdicts: Sequence[WindowVerdict]) -> Dict[str, int]:
    """A stream's totals over the compared windows."""
    return {"delivered": sum(v.delivered for v in verdicts),
            "stored": sum(v.stored for v in verdicts),
            "missing": sum(v.missing for v in verdicts),
            "extra": sum(v.extra for v in verdicts),
            "failed": sum(v.failed for v in verdicts),
            "windows_missing": sum(1 for v in verdicts if v.missing)}


def print_report(report: Dict[str, List[WindowVerdict]], query: LedgerQuery, out: IO[str]) -> None:
    """The reconcile report as a table per stream, then the verdict lines."""
    out.write("windows of 5 minutes from %s to %s; a push near a window's edge may be counted in"
              " the next window by one side: such pairs are tolerated, one window apart\n"
              % (iso_window(query.since), iso_window(query.until)))
    for stream, verdicts in report.items():
        out.write("\nstream %s\n  %-20s %10s %10s %8s  %s\n"
                  % (stream, "window", "Akamai", "stored", "diff", "verdict"))
        for verdict in verdicts:
            if verdict.delivered or verdict.stored or verdict.failed:
                out.write("  %-20s %10d %10d %+8d  %s\n"
                          % (iso_window(verdict.window), verdict.delivered, verdict.stored,
                             verdict.stored - verdict.delivered, verdict.verdict()))
        totals = stream_totals(verdicts)
        out.write("  %-20s %10d %10d %+8d\n" % ("total", totals["delivered"], totals["stored"],
                                                 totals["stored"] - totals["delivered"]))


def report_verdict(report: Dict[str, List[WindowVerdict]]) -> Tuple[bool, str]:
    """(whether everything delivered is stored and DataStream gave up on nothing, the verdict
    line)."""
    totals = [stream_totals(verdicts) for verdicts in report.values()]
    missing = sum(total["missing"] for total in totals)
    failed = sum(total["failed"] for total in totals)
    windows = sum(total["windows_missing"] for total in totals)
    if not report:
        return True, "verdict: nothing to compare (no stream stored or delivered in that range)"
    if not missing and not failed:
        return True, ("verdict: complete: every record Akamai delivered is stored (%d streams)"
                      % len(report))
    words = []
    if missing:
        words.append("%d records Akamai delivered are not stored (%d windows)" % (missing,
                                                                                  windows))
    if failed:
        words.append("DataStream gave up on %d records, which it keeps no copy of" % failed)
    return False, "verdict: INCOMPLETE: " + "; ".join(words)


def run_reconcile(argv: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """The reconcile command: 0 complete, 1 records missing, 2 usage, credential or API
    problem."""
    options = build_reconcile_parser("reconcile").parse_args(argv)
    now = time.time()
    try:
        query = parse_ledger_query(options, now)
        if query.until - query.since > RECONCILE_MAX_SPAN:
            raise ConfigError("at most 7 days at a time (Akamai keeps no more): narrow --since")
        client = AkamaiClient(read_edgerc(options.edgerc.expanduser(), options.section),
                              options.section, options.timeout)
        deliveries = fetch_deliveries(client, query.since - LEDGER_WINDOW,
                                      query.until + LEDGER_WINDOW, query.streams)
        ledger = fleet_ledger(query.roots, query.since - LEDGER_WINDOW,
                              query.until + LEDGER_WINDOW)
    except (ConfigError, AkamaiError) as exc:
        sys.stderr.write("dsreceiver.py reconcile: error: %s\n" % exc)
        return 2
    report = reconcile(query, deliveries, ledger)
    complete, line = report_verdict(report)
    save_reconciled(query.roots, {stream: stream_totals(verdicts)
                                  for stream, verdicts in report.items()},
                    now, query.since, query.until)
    if query.as_json:
        out.write(json.dumps({"since": iso_window(query.since), "until": iso_window(query.until),
                              "tolerance_windows": 1, "complete": complete, "verdict": line,
                              "streams": [dict(stream_totals(verdicts), stream=stream,
                                               windows=[v.to_wire() for v in verdicts])
                                          for stream, verdicts in report.items()]},
                             indent=1) + "\n")
    else:
        print_report(report, query, out)
        out.write("\n" + line + "\n")
    return 0 if complete else 1


STREAM_PATHS = ("/datastream-config-api/v3/log/%s/streams", "/datastream-config-api/v2/log/streams")
# A definition's problem is a sentence about one field: longer is an answer's own text, cut here.
PROBLEM_LIMIT = 600
LOG_TYPES = ("cdn", "appsec", "edgeworkers", "edns", "gtm")


def build_pull_parser() -> ArgumentParser:
    """Returns the parser of the streams pull command."""
    parser = ArgumentParser(prog="dsreceiver.py streams pull", description="Fetch stream"
                            " definitions from Akamai's DataStream API (v3, else v2) and write"
                            " them where --stream-config reads them; then SIGHUP the server to"
                            " load them.")
    add_api_options(parser)
    parser.add_argument("--stream-config", type=Path, required=True, metavar="PATH",
                        help="the server's --stream-config: a file to write, or a folder to write"
                        " one file per stream into (ID.json)")
    parser.add_argument("--stream", action="append", default=[], metavar="ID",
                        help="only this stream; repeatable (default: every stream of the account)")
    parser.add_argument("--log-type", choices=LOG_TYPES, default="cdn",
                        help="the v3 API's log type of the streams (default: %(default)s)")
    return parser


def stream_ids_in(answer: object) -> List[str]:
    """The stream IDs of a list-streams answer (a list, or {"streams": [...]}), each checked
    before it is put in a URL; raises ValueError naming the first that is not a stream ID."""
    return [api_stream_id(stream.get("streamId")) for stream in definitions_in(answer)
            if isinstance(stream, dict)]


def pulled_definition(stream: str, document: object, path: str, out: IO[str]
                      ) -> Optional[StreamDefinition]:
    """What the server will make of Akamai's answer for `stream`, said in one line (its problems
    on stderr); None, said on stderr, when the answer is not that stream's definition."""
    try:
        definition = parse_stream_definition(document)
    except ValueError as exc:
        fallback = unreadable_definition(document, exc)
        if fallback is None:
            sys.stderr.write("dsreceiver.py streams pull: stream %s: skipped, the API's answer"
                             " is not a stream definition: %s\n" % (stream, printable(str(exc))))
            return None
        definition = fallback
    if definition.stream_id != stream:
        sys.stderr.write("dsreceiver.py streams pull: stream %s: skipped, the API answered with"
                         " stream %s\n" % (stream, definition.stream_id))
        return None
    for problem in definition.problems:
        sys.stderr.write("dsreceiver.py streams pull: warning: stream %s: %s\n"
                         % (stream, printable(problem, PROBLEM_LIMIT)))
    out.write("stream %s version %s: %d fields (API %s)\n"
              % (stream, definition.version or "any", len(definition.fields),
                 "v3" if "/v3/" in path else "v2"))
    return definition


def newest_definitions(fetched: Sequence[Tuple[StreamDefinition, object]]
                       ) -> Dict[str, Tuple[StreamDefinition, object]]:
    """The definitions to write, by stream ID: one per stream, its newest version (the server
    refuses a stream version defined twice)."""
    newest: Dict[str, Tuple[StreamDefinition, object]] = {}
    for definition, document in fetched:
        known = newest.get(definition.stream_id)
        if known is None or int(definition.version or -1) >= int(known[0].version or -1):
            newest[definition.stream_id] = (definition, document)
    return newest


def folder_clash(folder: Path, pulled: Dict[str, Tuple[StreamDefinition, object]]
                 ) -> Optional[str]:
    """Why the server would refuse `folder` once the pulled definitions are written into it (a file
    pull does not replace defines one of their stream versions already); None when it would not."""
    ours = {(definition.stream_id, definition.version): stream
            for stream, (definition, _) in pulled.items()}
    for path in sorted(folder.glob("*.json")):
        if path.stem in pulled:
            continue
        try:
            found = definitions_in(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # the server's own problem, whatever pull writes: it names the file
        for item in found:
            if isinstance(item, dict):
                version = item.get("streamVersion")
                key = (str(item.get("streamId")), None if version is None else str(version))
                if key in ours:
                    return ("%s defines stream %s version %s already: remove it (pull writes"
                            " %s.json)" % (path, key[0], key[1] or "(any)", ours[key]))
    return None


def list_streams(client: AkamaiClient, lists: Sequence[str]) -> List[str]:
    """The stream IDs the API lists; raises AkamaiError when one is not a stream ID."""
    path, answer = client.get_first(lists)
    try:
        return stream_ids_in(answer)
    except ValueError as exc:
        raise AkamaiError("%s answered in an unknown shape: %s" % (path, exc)) from None


def run_streams(argv: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """The streams pull command: 0 written, 1 written but some streams skipped, 2 usage, credential
    or API problem."""
    if argv[:1] != ["pull"]:
        sys.stderr.write("dsreceiver.py streams: error: the one subcommand is pull (see"
                         " python3 dsreceiver.py streams pull --help)\n")
        return 2
    options = build_pull_parser().parse_args(argv[1:])
    target = options.stream_config
    try:
        for stream in options.stream:
            if not STREAM_ID_RE.fullmatch(stream):
                raise ConfigError("--stream %r is not a stream ID" % stream)
        client = AkamaiClient(read_edgerc(options.edgerc.expanduser(), options.section),
                              options.section, options.timeout)
        lists = (STREAM_PATHS[0] % options.log_type, STREAM_PATHS[1])
        listed = options.stream or list_streams(client, lists)
        # A stream named twice (on the command line, or by the API) is fetched and written once.
        streams = list(OrderedDict.fromkeys(listed))
        fetched: List[Tuple[StreamDefinition, object]] = []
        for stream in streams:
            path, document = client.get_first([base + "/" + stream for base in lists])
            definition = pulled_definition(stream, document, path, out)
            if definition is not None:
                fetched.append((definition, document))
        documents = newest_definitions(fetched)
        if streams and not documents:
            sys.stderr.write("dsreceiver.py streams pull: nothing written: no answer was a"
                             " definition of the stream asked for\n")
            return 1
        if target.is_dir():
            clash = folder_clash(target, documents)
            if clash is not None:
                raise ConfigError("nothing written: the server would refuse the folder: " + clash)
            for stream, (_, document) in documents.items():
                write_atomically(target / ("%s.json" % stream),
                                 json.dumps(document, indent=1).encode("utf-8") + b"\n",
                                 DEFAULT_FILE_MODE, follow_folder=True)
        else:
            write_atomically(target, json.dumps([document for _, document in documents.values()],
                                                indent=1).encode("utf-8") + b"\n",
                             DEFAULT_FILE_MODE, follow_folder=True)
    except (ConfigError, AkamaiError) as exc:
        sys.stderr.write("dsreceiver.py streams pull: error: %s\n" % exc)
        return 2
    except OSError as exc:
        sys.stderr.write("dsreceiver.py streams pull: error: cannot write %s: %s\n"
                         % (target, describe_os_error(exc)))
        return 2
    out.write("wrote %d stream definitions to %s%s; send SIGHUP to the server to load them\n"
              % (len(documents), target, " (one file per stream)" if target.is_dir() else ""))
    return 0 if len(documents) == len(streams) else 1


# ---------------------------------------------------------------------------
# Shipping
# ---------------------------------------------------------------------------
# The sealed command: the files a host ships to object storage, for `rclone copy --files-from`.
# Only finished files travel (sealed, their manifest agreeing with them), with the ledger files
# that count them, so that reconcile over a copy of the bucket vouches for exactly what was
# shipped; a file still being written, and its index, wait for the next run.

SEALED_HELP = """\
Prints, one per line and relative to DIR, the paths that a shipping run copies:
each sealed data file whose manifest agrees with it (its "file" and "bytes"), then
its manifest, its batch index and/or the ledger summary of it; then the ledger's
answers files.  A file still being written is never listed.  The files come from
the server's seal lists, so --days 2 reads two days' worth whatever the folder
keeps.  Every few minutes, from cron or a systemd timer:

  python3 dsreceiver.py sealed --output-dir /var/lib/dsreceiver/data |
      rclone copy /var/lib/dsreceiver/data s3:BUCKET/datastream/receiver=$(hostname -s) \\
      --files-from-raw -

(add --days 2 there once a full run has shipped everything: a run then lists
the files sealed on the last two UTC days, which any run within two days of the
previous one needs).

Then `reconcile --output-dir COPY/receiver=A --output-dir COPY/receiver=B` over a
copy of the bucket counts exactly what was shipped.  Exit 0, or 2 for bad usage.
"""


def build_sealed_parser() -> ArgumentParser:
    """Returns the parser of the sealed command."""
    parser = ArgumentParser(prog="dsreceiver.py sealed", description="List the finished files"
                            " of an output folder, and their ledger files, for shipping.",
                            epilog=SEALED_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("data"), metavar="DIR",
                        help="the server's --output-dir; paths are printed relative to it"
                        " (default: %(default)s)")
    parser.add_argument("--days", type=non_negative_int, default=0, metavar="N",
                        help="only files sealed on the last N UTC days, today included; 0 lists"
                        " every sealed file (default: %(default)s)")
    return parser


def agreeing_manifest(layout: Layout, path: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a sealed data file when it describes the file as it is (name and size);
    None when the file is not sealed, or its manifest disagrees (reported on stderr)."""
    manifest = layout.manifest_path(path)
    try:
        facts = json.loads(manifest.read_bytes())
        size = path.stat().st_size
    except FileNotFoundError:
        return None  # not sealed yet
    except (OSError, ValueError) as exc:
        sys.stderr.write("dsreceiver.py sealed: %s left out: cannot read %s: %s\n"
                         % (path, manifest.name, exc))
        return None
    if isinstance(facts, dict) and facts.get("file") == path.name and facts.get("bytes") == size:
        return facts
    sys.stderr.write("dsreceiver.py sealed: %s left out: its manifest does not describe it (%d"
                     " bytes)\n" % (path, size))
    return None


def sealed_files(layout: Layout, days: int = 0, now: Optional[float] = None) -> List[Path]:
    """The files sealed on the last `days` UTC days (0: ever), from the seal lists; in an earlier
    version's folder that no server of this version has walked yet, from a walk of it."""
    if not layout.listed_mark.exists():
        found = [path for path, _ in layout.data_files(compressed=True)]
    else:
        first = utc_day((time.time() if now is None else now) - (days - 1) * 86400)
        found = [path for day, seal_list in layout.seal_lists() if not days or day >= first
                 for path in listed_paths(layout, seal_list)]
    return sorted(set(found))


def sealed_listing(layout: Layout, days: int = 0) -> Iterator[Path]:
    """What a shipping run copies: every sealed data file (of the last `days` UTC days of sealing,
    0: all) in a folder of safe names, with its manifest and ledger files, then the answers files
    (of those days)."""
    for path in sealed_files(layout, days):
        try:
            layout.check_folder(layout.folder_of(path))
        except ValueError:
            continue  # not a folder dsreceiver made: its name may not be safe to print
        facts = None if path.is_symlink() else agreeing_manifest(layout, path)
        if facts is not None:
            index = facts.get("index")
            yield path
            yield layout.manifest_path(path)
            yield from layout.ledger_files_of(path, index if isinstance(index, str) else None)
    first = utc_day(time.time() - (days - 1) * 86400)
    for answers in layout.answers_files_named():
        if not days or answers.name[:10] >= first:
            yield answers


def run_sealed(argv: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """The sealed command: 0, or 2 for bad usage or an unreadable folder."""
    options = build_sealed_parser().parse_args(argv)
    root = options.output_dir
    try:
        if not (root / Layout.STATE_DIR).is_dir():
            raise ConfigError("%s is not a dsreceiver output folder (no %s in it)"
                              % (root, Layout.STATE_DIR))
        listed = [path.relative_to(root).as_posix()
                  for path in sealed_listing(Layout(root), options.days)]
    except ConfigError as exc:
        sys.stderr.write("dsreceiver.py sealed: error: %s\n" % exc)
        return 2
    except OSError as exc:
        sys.stderr.write("dsreceiver.py sealed: error: %s\n" % describe_os_error(exc))
        return 2
    out.write("".join(line + "\n" for line in listed))
    return 0


# ---------------------------------------------------------------------------
# Lifecycle and signals
# ---------------------------------------------------------------------------

# Threads mostly wait in recv(); a small stack keeps thousands of idle
# keep-alive connections cheap.
THREAD_STACK_SIZE = 512 * 1024
# glibc mallopt(): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX.
MALLOC_SETTINGS = ((-1, 32 << 20), (-3, 16 << 20), (-8, 2))
LISTEN_BACKLOG = 1024
# The open-file budget (see fit_open_files): the highest soft limit asked for, descriptors kept for
# everything but connections and data files, and bounds of the shares.
FD_LIMIT_CAP = 1 << 20
FD_RESERVE = 64
MIN_OPEN_DATA_FILES = 8
MAX_OPEN_DATA_FILES = 4096
MIN_CONNECTIONS = 16


def bind_listeners(host: str, port: int, count: int) -> List[socket.socket]:
    """Binds one listening socket per worker with SO_REUSEPORT, so the kernel spreads connections
    over them; without SO_REUSEPORT, one for all.  '::' accepts IPv4 too where the OS allows."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    dualstack = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
    reuse_port = count > 1 and hasattr(socket, "SO_REUSEPORT")
    listeners: List[socket.socket] = []
    try:
        while len(listeners) < (count if reuse_port else 1):
            # The first bind may pick the port (--port 0); the others join it.
            bound_port = listeners[0].getsockname()[1] if listeners else port
            listeners.append(socket.create_server((host, bound_port), family=family,
                                                  backlog=LISTEN_BACKLOG, reuse_port=reuse_port,
                                                  dualstack_ipv6=dualstack))
    except OSError as exc:
        for listener in listeners:
            listener.close()
        raise ConfigError("cannot listen on %s port %d: %s"
                          % (host, port, describe_os_error(exc))) from None
    return listeners


def share_listeners(sockets: Sequence[socket.socket],
                    workers: int) -> List[List[socket.socket]]:
    """Each worker's listening sockets: as many sockets as workers, one each; fewer (systemd's
    one), shared; more (an upgrade from more workers), every socket still served by one."""
    if len(sockets) <= workers:
        return [[sockets[index % len(sockets)]] for index in range(workers)]
    return [list(sockets[index::workers]) for index in range(workers)]


def drop_privileges(user: str, group: Optional[str]) -> None:
    """Switches to `user` (and `group`) for good, after the port is bound and certificates are
    read."""
    import grp
    import pwd
    try:
        account = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else account.pw_gid
    except KeyError as exc:
        raise ConfigError("no such user or group: %s"
                          % exc.args[0].split(":")[-1].strip()) from None
    if (os.getuid(), os.getgid()) == (account.pw_uid, gid):
        return  # already: an upgrade's new process, started by the switched one
    try:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(account.pw_uid)
    except PermissionError:
        raise ConfigError("cannot switch to user %s: only root can" % user) from None


class TextLogFormatter(logging.Formatter):
    """One line per record: UTC time, level, message."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and an access line's fields."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, object] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ"),
                                    "level": record.levelname, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Sends one-line, UTC-stamped log records to stderr, as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


def tune_allocator() -> None:
    """Keeps freed request buffers (about 1 MB each) in the heap instead of returning them to the
    kernel after every request, which costs about 15% of throughput; bounded, so memory stays
    bounded (glibc only)."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, ImportError):
        return
    for option, value in MALLOC_SETTINGS:
        mallopt(option, value)


class FileBudget(NamedTuple):
    """How a process's open-file limit is shared: connections, and current data files (two
    descriptors each) kept open (see Storage)."""

    limit: int
    connections: int
    data_files: int


def fit_open_files(settings: Settings) -> FileBudget:
    """Raises the soft open-file limit to the hard one and shares it out, so that no load runs a
    process out of descriptors: --max-connections is lowered to fit, with one line saying so."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else FD_LIMIT_CAP, FD_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    limit = FD_LIMIT_CAP if soft == resource.RLIM_INFINITY else soft
    # Listeners, log and control sockets, wake pipes, certificates and indexes being read, and one
    # spool file per SPOOL_THRESHOLD of --max-inflight-bytes.
    room = max(0, limit - FD_RESERVE - settings.max_inflight_bytes // SPOOL_THRESHOLD)
    data_files = max(MIN_OPEN_DATA_FILES, min(MAX_OPEN_DATA_FILES, room // 8))
    connections = min(settings.max_connections, max(MIN_CONNECTIONS, room - 2 * data_files))
    if connections < settings.max_connections:
        log.warning("open-file limit %d (raise LimitNOFILE or ulimit -n): at most %d connections"
                    " and %d open data files per process instead of --max-connections %d", limit,
                    connections, data_files, settings.max_connections)
    return FileBudget(limit, connections, data_files)


def prepare_output(layout: Layout, dedupe_window: float,
                   clock: Callable[[], float] = time.time) -> Optional[DedupeMemory]:
    """Start-up's step 3 (see run_server), in the only process or the supervisor of --workers
    before it starts them: the output folder's work before the first push, each step bounded by
    what may need it, never by what the folder keeps.  Returns the dedupe window (None when it is
    off); a folder that cannot be used is a ConfigError.

    1. The output folders are made, or found usable.
    2. The files of every run that died (see RUN_PROTOCOL) are recovered: cut back to the
       batches their indexes vouch for, and synced (recover_ended_runs).  In a folder an
       earlier version kept, which has no journals: every unfinished file with an index
       (recover_indexed).  A run that ended cleanly needs nothing.
    3. The dedupe window is refilled from the indexes touched within it, each read once it is
       durable (indexed_batches), so that a retry of a batch stored before is stored once.
    Then the listener accepts.  Housekeeping takes over what the ended runs left unfinished, in
    the background (Housekeeper.queue_earlier_files); a restarted worker recovers its dead
    predecessor's files itself before it serves (run_worker).
    """
    dedupe = DedupeMemory(dedupe_window, clock) if dedupe_window else None
    try:
        layout.create()
        recover_ended_runs(layout)
        if not layout.listed_mark.exists():
            recover_indexed(layout)
        if dedupe is not None:
            dedupe.load(indexed_batches(layout, dedupe_window, clock()))
    except OSError as exc:
        raise ConfigError("cannot use output folder %s: %s"
                          % (layout.root, describe_os_error(exc))) from None
    return dedupe


def serve_until_stopped(settings: Settings, layout: Layout, listeners: Sequence[socket.socket],
                        certificates: Optional[CertificateSource], authenticator: Authenticator,
                        streams: StreamCatalog, signals: SignalFlags,
                        dedupe: Optional[DedupeClaims], budget: FileBudget,
                        supervisor: Optional[SupervisorClient] = None,
                        client_connections: Optional[ClientConnections] = None,
                        on_serving: Callable[[], None] = lambda: None,
                        handover: Optional[Handover] = None) -> int:
    """Serves until SIGTERM/SIGINT (or an upgrade's new process answers pushes), then finishes
    in-flight requests, syncs and closes; returns 0.  Housekeeping, the earlier runs' files
    included, starts once pushes are answered."""
    storage = Storage(layout, settings.fsync, settings.max_file_size, dedupe,
                      max_open=budget.data_files)
    server = ReceiverServer(settings._replace(max_connections=budget.connections), listeners,
                            certificates, authenticator, storage, streams,
                            supervisor.metrics if supervisor is not None else None,
                            client_connections)
    tags = [worker_tag(index) for index in range(settings.workers)] if layout.tag else [""]
    learn: Optional[Callable[[List[Tuple[float, str]]], None]] = None
    if supervisor is not None:
        learn = supervisor.recovered
    elif isinstance(dedupe, DedupeMemory):
        learn = dedupe.load
    housekeeper = Housekeeper(layout, storage, settings.compress_rotated, settings.retention_days,
                              settings.dedupe_window, take_answers=server.answers.take,
                              tags=tags, learn=learn)
    if supervisor is not None:
        supervisor.start(server.metrics_snapshot)
        on_serving = supervisor.ready
    storage.start()
    on_serving()
    housekeeper.start()
    server.serve(signals, handover)
    log.info("%s: finishing in-flight requests (up to %gs)", "received signal %d"
             % signals.stop_signal if signals.stop_signal is not None else "handing over",
             settings.shutdown_timeout)
    finished = server.shutdown(settings.shutdown_timeout, handover is not None
                               and handover.state is HandoverState.HANDING_OVER)
    server.noisy_log.log_summary("since the last summary (stopping)")
    server.quiet_log.log_summary("since the last summary (stopping)")
    housekeeper.stop()
    storage.close()
    if not finished:
        log.warning("shutdown timeout: closed with requests still in flight (they were not"
                    " acknowledged)")
    log.info("stopped")
    return 0


def run_worker(settings: Settings, index: int, listeners: Sequence[socket.socket],
               control: socket.socket,
               layout: Layout, certificates: Optional[CertificateSource],
               authenticator: Authenticator, streams: StreamCatalog,
               client_connections: ClientConnections, budget: FileBudget) -> int:
    """The body of worker process `index`: its own files, the supervisor's dedupe window."""
    signals = SignalFlags()
    signals.install()
    supervisor = SupervisorClient(control)
    client_connections.take_row(index)
    own = layout.for_worker(worker_tag(index))
    # A restarted worker: its predecessor died, and the supervisor holds its claims until it
    # learns which of their batches the files hold.  Those files only: bounded by what was open.
    try:
        recovered = recover_ended_runs(own, own.tag, wait=SUPERVISOR_DEADLINE / 2)
        supervisor.recovered(list(indexed_batches(own, settings.dedupe_window, time.time(),
                                                  recovered)) if settings.dedupe_window else [])
    except OSError as exc:
        log.error("worker %d cannot recover its predecessor's files: %s", index + 1,
                  describe_os_error(exc))
        return 1
    return serve_until_stopped(settings, own, listeners, certificates, authenticator, streams,
                               signals, supervisor if settings.dedupe_window else None, budget,
                               supervisor, client_connections)


def run_server(settings: Settings) -> int:
    """Start-up, from exec to the first 200, then serving until stopped; returns the exit code (2:
    a start-up problem, said in one line).  Each step before serving is bounded by what the
    settings name or what the last run left open, never by what the output folder keeps:

    1. Credentials, stream definitions and the certificate are read (small files): every push is
       authenticated, decoded and handshaken with them, so a bad one stops the start, not a push.
    2. The listening sockets are inherited (systemd's socket unit, an upgrade's older process:
       inherited_listeners) or bound, the open-file limit shared out (fit_open_files), and
       privileges dropped: the port may need root, the records must not be root's.
    3. The output folder (prepare_output): made or found usable; the files of every run that died
       recovered, only those its journal lists (in a folder an earlier version kept, without
       journals: its unfinished indexed files, recover_indexed); the dedupe window refilled from
       the indexes touched within it (milliseconds, whatever the folder's age).
    4. Serving (serve_until_stopped): signal handlers installed, then, alone, this process opens
       its storage, says `listening on` (to systemd as well: announce_serving) and accepts;
       connections that came meanwhile waited in the listen backlog.  With --workers, the
       supervisor forks them (run_worker: each first recovers what a dead predecessor of its tag
       left, nothing on a first start) and says it once every one of them answers.  Each process
       starts its housekeeping only once it answers pushes: what the dead runs left unfinished
       is finished in the background (Housekeeper.queue_earlier_files).

    After a worker's death, its replacement (run_worker) recovers its predecessor's files, the
    only ones that journal lists, and tells the supervisor which batches they hold, which frees
    the dead worker's dedupe claims; the other workers serve on meanwhile.
    """
    try:
        # 1. What every push is checked with.
        authenticator = Authenticator.from_settings(settings.credentials, dict(os.environ))
        streams = StreamCatalog(settings.stream_config, settings.records_as_json)
        certificates = None
        if not settings.http:
            cert, key = resolve_certificate(settings)
            certificates = CertificateSource(cert, key, settings.client_ca)
        # 2. The port, the descriptors, then no more root.
        listeners = (inherited_listeners(os.environ)
                     or bind_listeners(settings.host, settings.port, settings.workers))
        budget = fit_open_files(settings)
        if settings.user:
            drop_privileges(settings.user, settings.group)
        # 3. The output folder.
        layout = Layout(settings.output_dir, settings.rotate, store_gzip=settings.store_gzip,
                        file_mode=settings.file_mode)
        dedupe = prepare_output(layout, settings.dedupe_window)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    # 4. Serving.
    threading.stack_size(THREAD_STACK_SIZE)
    signals = SignalFlags()
    signals.install()
    methods = authenticator.methods()
    if methods:
        log.info("authentication required: %s", " + ".join(methods))
    else:
        log.warning("no authentication configured: anyone who can reach this port can push data")
    host, port = listeners[0].getsockname()[:2]
    shown_host = "[%s]" % host if ":" in host else host
    handover = Handover(listeners, sys.argv)

    def serving() -> None:
        log.info("listening on %s://%s:%d, storing in %s (fsync %s, %d worker%s)",
                 settings.scheme, shown_host, port, settings.output_dir, settings.fsync,
                 settings.workers, "" if settings.workers == 1 else "s")
        announce_serving(os.environ, reap=settings.workers == 1)

    if settings.workers == 1:
        code = serve_until_stopped(settings, layout, listeners, certificates, authenticator,
                                   streams, signals, dedupe, budget, on_serving=serving,
                                   handover=handover)
    else:
        client_connections = ClientConnections(settings.workers)
        supervisor = Supervisor(share_listeners(listeners, settings.workers), layout,
                                dedupe or DedupeMemory(0),
                                lambda index, own, control: run_worker(
                                    settings, index, own, control, layout, certificates,
                                    authenticator, streams, client_connections, budget), serving)
        code = supervisor.run(signals, handover)
    if signals.stop_signal is not None:
        handover.abandon("was stopped by signal %d with this process" % signals.stop_signal)
        return code
    if handover.state is HandoverState.HANDING_OVER:
        return handover.exec_self()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs a command (check, ledger, reconcile, sealed, streams), or the receiver until SIGTERM
    or SIGINT (run_server); returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    commands = {"check": run_check, "ledger": run_ledger, "reconcile": run_reconcile,
                "sealed": run_sealed, "streams": run_streams}
    if arguments[:1] and arguments[0] in commands:
        return commands[arguments[0]](arguments[1:])
    try:
        settings = parse_config(arguments)
    except ConfigError as exc:
        sys.stderr.write("dsreceiver.py: error: %s\n" % exc)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    tune_allocator()
    return run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
