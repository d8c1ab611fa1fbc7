"""make bench: dsreceiver (defaults) against the Flask how-to and nginx, same certificate, same load.

Each (server, scenario) pair runs on a fresh server; every request body is unique, and after each run the
stored lines are counted against what was acknowledged.  Writes the table to stdout and BENCHMARKS.md.

More scenarios run only when named (--scenarios RSPGKUH), for dsreceiver and --baseline only (the
peers neither seal nor finish files), each taking minutes on a 2-core machine:

  R  restart: seconds from exec to the first 200 over --restart-mb MB of this hour's files that an
     earlier run (2 workers) left: stopped by SIGTERM, killed by SIGKILL while pushing, and stopped by
     SIGTERM with --compress-rotated; and when all those files were sealed.
  S  seal throughput, in this process: --seal-mb MB of finished plain files written by the script's
     own Storage.store (its index format), then its Housekeeper.finish_files(); MB/s, with and
     without --compress-rotated.  The files are in the page cache: this measures CPU, not the disk.
  P  p99 of pushes paced at --push-rate a second over 8 connections while the server gzips and seals
     a --seal-file-mb MB past-hour file left in its folder (--compress-rotated), against the same
     load without that file.  Latency counts from each push's scheduled time (open loop).
  G  at any age: exec to the first 200, and SIGTERM to exit, over the folder of a receiver that ran
     for a month (20,000 finished files) and for seven months (1,000,000), with 2 workers and 1.
  K  the longest push of 4 uploaders (every 20 ms) from a worker's SIGKILL on, over 20,000 files.
  U  refused, reset, lost, doubled and the longest gap between 200s of 4 uploaders across a restart,
     a restart with the socket held (systemd's socket unit), and an upgrade by SIGUSR2.
  H  p99 of paced pushes over 1,000,000 files, housekeeping passes included, against a new folder.
The aged folders (bench/aged_folder.py) are written once into --aged-dir and mounted under an overlay
for each run (copied where overlays cannot be mounted), so no run changes them.

e.g. bench/bench.py --scenarios RSP --baseline /tmp/dsreceiver-old.py --output /tmp/report.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import http.client
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import dsreceiver  # noqa: E402
from simulator import SAMPLE_DEFINITION, free_port, json_lines, sample_lines  # noqa: E402

SCENARIOS = {
    "A": ("1 MB JSON batches gzip'd, 32 keep-alive connections", "big.gz", "gzip", 32),
    "B": ("1 MB JSON batches uncompressed, 32 keep-alive connections", "big.json", "plain", 32),
    "C": ("100-byte bodies, 64 keep-alive connections", "small.json", "plain", 64),
    "D": ("2,000 idle TLS connections held open while A runs at 8 connections", "big.gz", "gzip", 8),
    "E": ("64 new TLS connections per second, one gzip'd batch each, then close", "big.gz", "gzip", 64),
    "F": ("1 MB STRUCTURED batches gzip'd (45 values a record) stored as JSON (--stream-config, --records json), "
          "32 keep-alive connections", "structured.gz", "gzip", 32),
}
# dsreceiver's options for scenario F; only dsreceiver runs it (the others cannot convert).
STRUCTURED_OPTIONS = ["--stream-config", str(SAMPLE_DEFINITION), "--records", "json"]
# The load comes from one address, DataStream's from thousands: the per-address connection limit
# (--max-client-connections, 64 by default) is lifted so that C's 64 connections all get in.
LOAD_GENERATOR_OPTIONS = ["--max-client-connections", "0"]
IDLE_CONNECTIONS = 2000
NEW_CONNECTIONS_PER_SECOND = 64
MARKER = "<!-- Everything below this line is kept when make bench rewrites the file. -->"


# -- the servers -------------------------------------------------------------------

def process_tree(pid: int) -> List[int]:
    """The pid and all its descendants."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path("/proc/%s/stat" % entry).read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def memory_mb(pid: int) -> float:
    """Memory of a process tree now: the sum of each process's PSS, which counts pages that forked
    workers share with their parent once (a sum of RSS would count them in every process), in MB."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path("/proc/%d/smaps_rollup" % member).read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class MemorySampler:
    """Samples a process tree's memory every 0.2 s and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, memory_mb(self.pid))
            if self.stop.wait(0.2):
                return

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited with %s" % process.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not open port %d" % port)


class Server:
    """One server under test in its own folder; `stored_lines()` counts what it wrote."""

    def __init__(self, kind: str, workdir: Path, cert: Path, key: Path, extra: Sequence[str] = (),
                 script: Path = ROOT / "dsreceiver.py", reuse_output: bool = False, wait: bool = True,
                 port: Optional[int] = None, launch: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> None:
        """`reuse_output`: serve the output folder an earlier server (or the bench) left in `workdir`;
        `wait`: return only once the port is open (scenario R measures that itself); `port`: that one, not a free
        one; `launch`: arguments of `script` before dsreceiver's (a launcher's); `pass_fds`: descriptors it
        inherits (a socket held across restarts)."""
        self.kind = kind
        self.workdir = workdir
        self.port = port or free_port()
        self.output = workdir / "out"
        self.output.mkdir(parents=True, exist_ok=reuse_output)
        log = (workdir / "server.log").open("ab")
        if kind.startswith("dsreceiver"):
            command = [sys.executable, str(script), *launch, "--host", "127.0.0.1", "--port", str(self.port),
                       "--cert", str(cert), "--key", str(key), "--output-dir", str(self.output),
                       "--log-level", "warning", *extra]
        elif kind == "flask":
            command = [sys.executable, str(ROOT / "bench" / "flask_baseline.py"), "--port", str(self.port),
                       "--cert", str(cert), "--key", str(key), "--output", str(self.output / "Data.txt")]
        elif kind == "gunicorn":
            # The seed's handler as people deploy it: gthread workers, one per core, 16 threads each.
            command = [str(Path(sys.executable).with_name("gunicorn")), "--worker-class", "gthread",
                       "--workers", str(os.cpu_count() or 2), "--threads", "16",
                       "--bind", "127.0.0.1:%d" % self.port, "--certfile", str(cert), "--keyfile", str(key),
                       "--chdir", str(ROOT / "bench"), "--log-level", "warning", "flask_baseline:app"]
        elif kind == "uvicorn":
            command = [str(Path(sys.executable).with_name("uvicorn")), "asgi_baseline:app",
                       "--app-dir", str(ROOT / "bench"), "--workers", str(os.cpu_count() or 2),
                       "--http", "httptools", "--loop", "uvloop", "--host", "127.0.0.1", "--port", str(self.port),
                       "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--log-level", "warning",
                       "--no-access-log"]
        else:
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF % {"port": self.port, "cert": cert, "key": key, "dir": workdir})
            command = ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"]
        environment = dict(os.environ, BENCH_OUTPUT=str(self.output / "Data.txt"))
        # When the server was exec'd (scenario R measures from here).
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir),
                                        env=environment, pass_fds=tuple(pass_fds))
        log.close()
        if wait:
            wait_for_port(self.port, self.process)

    def kill(self) -> None:
        """SIGKILL to the server and every process it started, at once: a crash, or a power cut as far
        as its processes can tell."""
        for pid in process_tree(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stored(self) -> Tuple[Optional[int], int]:
        """(stored lines, bytes written to disk), or None lines for nginx, which stores nothing."""
        if self.kind == "nginx":
            return None, 0
        lines = written = 0
        for path in self.output.rglob("*"):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(self.output).parts):
                continue
            written += path.stat().st_size
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(str(path), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    lines += chunk.count(b"\n")
        return lines, written


NGINX_CONF = """
worker_processes auto;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        client_max_body_size 64m;
        keepalive_requests 1000000;
        location / { return 200 "ok\\n"; }
    }
}
"""


# -- the load ----------------------------------------------------------------------

def run_wrk(port: int, body: Path, mode: str, connections: int, seconds: float) -> Dict[str, float]:
    """Drives the server with wrk and bench/push.lua; returns wrk's summary."""
    result = subprocess.run(["wrk", "-t%d" % min(connections, os.cpu_count() or 2), "-c%d" % connections,
                             "-d%ds" % seconds, "--timeout", "10s", "-s", str(ROOT / "bench" / "push.lua"),
                             "https://127.0.0.1:%d/datastream" % port, "--", str(body), mode,
                             str(body) + ".tail"],
                            capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"WRKJSON (\{.*\})", result.stdout)
    if not match:
        raise RuntimeError("wrk failed: %s %s" % (result.stdout, result.stderr))
    summary = json.loads(match.group(1))
    errors = summary["connect"] + summary["read"] + summary["write"] + summary["timeout"]
    return {"requests": summary["requests"], "acknowledged": summary["requests"] - summary["status"],
            "errors": errors + summary["status"], "seconds": summary["duration_us"] / 1e6,
            "p50_ms": summary["p50_us"] / 1000, "p99_ms": summary["p99_us"] / 1000}


def unique_body(body: bytes, tail: bytes, mode: str, tag: str) -> bytes:
    """The body with its tail record appended, tagged: no two requests carry the same batch."""
    line = tail.replace(b"{TAG}", tag.encode())
    return body + (gzip.compress(line) if mode == "gzip" else line)


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def push_loop(port: int, cert: str, body: bytes, tail: bytes, mode: str, tag: str, stop_at: float,
              results: multiprocessing.Queue[Tuple[int, int, List[float]]]) -> None:
    """One keep-alive client of the built-in load generator (used when wrk is missing)."""
    context = client_context(Path(cert))
    acknowledged = errors = 0
    latencies: List[float] = []
    headers = {"Content-Type": "application/json"}
    if mode == "gzip":
        headers["Content-Encoding"] = "gzip"
    connection = None
    counter = 0
    while time.monotonic() < stop_at:
        counter += 1
        started = time.monotonic()
        try:
            if connection is None:
                connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
            connection.request("POST", "/datastream", unique_body(body, tail, mode, "%s-%d" % (tag, counter)), headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status == 200:
                acknowledged += 1
            else:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            connection = None
        latencies.append(time.monotonic() - started)
    results.put((acknowledged, errors, latencies))


def run_builtin(port: int, cert: Path, body: Path, mode: str, connections: int, seconds: float) -> Dict[str, float]:
    """The built-in multi-process HTTPS load generator, same shape of results as run_wrk()."""
    results: multiprocessing.Queue[Tuple[int, int, List[float]]] = multiprocessing.Queue()
    stop_at = time.monotonic() + seconds
    data, tail = body.read_bytes(), Path(str(body) + ".tail").read_bytes()
    workers = [multiprocessing.Process(target=push_loop, args=(port, str(cert), data, tail, mode, "p%d" % n, stop_at,
                                                               results)) for n in range(connections)]
    for worker in workers:
        worker.start()
    collected = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    latencies = sorted(latency for _, _, values in collected for latency in values)
    acknowledged, errors = sum(c[0] for c in collected), sum(c[1] for c in collected)
    return {"requests": acknowledged + errors, "acknowledged": acknowledged, "errors": errors, "seconds": seconds,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


def percentile(values: Sequence[float], pct: float) -> float:
    return values[min(len(values) - 1, int(len(values) * pct / 100))] if values else 0.0


def run_new_connections(port: int, cert: Path, body: Path, seconds: float) -> Dict[str, float]:
    """Scenario E: NEW_CONNECTIONS_PER_SECOND fresh TLS connections a second, one batch each, then close."""
    context = client_context(cert)
    data, tail = body.read_bytes(), Path(str(body) + ".tail").read_bytes()

    def one(index: int) -> Tuple[bool, float]:
        started = time.monotonic()
        try:
            connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
            connection.request("POST", "/datastream", unique_body(data, tail, "gzip", "e-%d" % index),
                               {"Content-Encoding": "gzip", "Connection": "close"})
            answer = connection.getresponse()
            answer.read()
            connection.close()
            return answer.status == 200, time.monotonic() - started
        except (OSError, http.client.HTTPException):
            return False, time.monotonic() - started

    total = int(seconds * NEW_CONNECTIONS_PER_SECOND)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        for index in range(total):
            # Open-loop pacing: connection i starts at i / rate seconds, however slow the server is.
            delay = started + index / NEW_CONNECTIONS_PER_SECOND - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, index))
        outcomes = [future.result() for future in futures]
    latencies = sorted(latency for _, latency in outcomes)
    acknowledged = sum(ok for ok, _ in outcomes)
    return {"requests": total, "acknowledged": acknowledged, "errors": total - acknowledged,
            "seconds": time.monotonic() - started, "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000}


def hold_idle(port: int, cert: str, count: int, ready: multiprocessing.Queue[int],
              check: multiprocessing.Queue[int]) -> None:
    """Scenario D's idle clients: each makes one request, sits idle, and must still be answered at the end."""
    context = client_context(Path(cert))
    held = []
    for index in range(count):
        # Many uploaders, a few connections each (as --max-client-connections expects): 50 source addresses.
        raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.%d" % (10 + index % 50), 0))
        sock = context.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.recv(4096)
        held.append(sock)
    ready.put(len(held))
    check.get()
    answered = 0
    for sock in held:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if sock.recv(4096).startswith(b"HTTP/1."):
                answered += 1
        except OSError:
            pass
    ready.put(answered)


# -- restart, sealing, pushes during a seal (scenarios R, S, P) --------------------------------------

# dsreceiver only (the peers neither seal nor finish files), and not in the default set: each takes
# minutes on a 2-core machine: a round against a baseline takes about 2.5 minutes for R, 1.5 for S
# and 3.5 for P (the old start-up finishes the 1 GB file before it serves).
LIFECYCLE_SCENARIOS = {
    "R": "restart over --restart-mb MB of this hour's files (2 workers): seconds from exec to the first 200, "
         "after a SIGTERM, after a SIGKILL while pushing, and after a SIGTERM with --compress-rotated "
         "(both runs); plus when the earlier run's files were all sealed",
    "S": "sealing --seal-mb MB of finished plain files in-process (the script's Storage.store writes them "
         "and their index, then Housekeeper.finish_files): MB/s of plain input, with and without "
         "--compress-rotated (files in the page cache: CPU, not disk)",
    "P": "p99 of pushes paced at --push-rate a second over 8 connections (1 MB JSON gzip'd) while the "
         "server gzips and seals a --seal-file-mb MB past-hour file left in its folder (--compress-rotated, "
         "2 workers), against the same load without that file",
    "G": "exec to the first 200, and SIGTERM to exit, over the folder of a receiver that ran for long "
         "(bench/aged_folder.py: 20,000 finished files of 14 streams, a month; 1,000,000 of 100 streams, seven "
         "months; each with this hour's files as killed runs left them), with 2 workers and with 1",
    "K": "the longest push of 4 uploaders (one record every 20 ms each, keep-alive) from the moment a worker "
         "of two is SIGKILLed over the 20,000-file folder, for --kill-seconds",
    "U": "pushes refused, reset, lost, doubled, and the longest gap between two 200s, while 4 uploaders push "
         "every 20 ms: across a restart (SIGTERM, then a new process binds the port), a restart with the socket "
         "unit (the socket outlives the process, as systemd's does) and an upgrade by SIGUSR2",
    "H": "p99 of pushes paced at --push-rate over 8 connections for --housekeeping-seconds (the housekeeping "
         "passes at start and a minute later included, --retention-days 3650) over the 1,000,000-file folder, "
         "against the same over a new folder",
}
LIFECYCLE_CONNECTIONS = 8
# Attempts at the first 200 after a restart: each gives up after this long, then tries again at once.
PROBE_TIMEOUT = 0.25
# How long finishing may take before the run is given up (the old start-up compressed at ~10 MB/s).
FINISH_DEADLINE = 900.0
LIFECYCLE_OPTIONS = ["--workers", "2"] + LOAD_GENERATOR_OPTIONS
# The probe of R and P: one small record.
PROBE_BODY = b'{"version":"4","streamId":"61234","cp":"123","reqId":"probe","statusCode":"200"}\n'


# The dsreceiver.py files imported by load_script, by path.
LOADED_SCRIPTS: Dict[Path, types.ModuleType] = {}


def load_script(path: Path) -> types.ModuleType:
    """A dsreceiver.py imported from `path` under a name of its own, so that the file under test and the
    baseline can be used side by side in this process."""
    path = path.resolve()
    if path not in LOADED_SCRIPTS:
        name = "dsreceiver_under_test_%d" % len(LOADED_SCRIPTS)
        spec = importlib.util.spec_from_file_location(name, str(path))
        if spec is None or spec.loader is None:
            raise RuntimeError("cannot import %s" % path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        LOADED_SCRIPTS[path] = module
    return LOADED_SCRIPTS[path]


def write_finished_files(module: types.ModuleType, root: Path, megabytes: float, body: bytes,
                         period_start: float) -> List[Path]:
    """Writes `megabytes` MB of `body` batches through the module's own Storage.store (so each file has
    its batch index in that version's format), named by the period of `period_start`, then closes them
    (closing fdatasyncs them); returns the data files."""
    layout = module.Layout(root)
    module.prepare_output(layout, 0)
    storage = module.Storage(layout, "never", 0, None, clock=lambda: period_start)
    storage.start()
    records = body.count(b"\n")
    for _ in range(max(1, round(megabytes * 1e6 / len(body)))):
        storage.store("", module.RecordBatch([body], None, len(body), records))
    storage.close()
    return [path for path, _ in layout.data_files(compressed=True)]


def sealed_path(path: Path) -> Optional[Path]:
    """The manifest of an earlier run's data file once it is finished (gzip'd or not), else None."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        manifest = candidate.with_name("." + candidate.name + ".sealed.json")
        if manifest.exists():
            return manifest
    return None


def wait_until_sealed(paths: Sequence[Path], process: subprocess.Popen[bytes], deadline: float) -> float:
    """Polls until every one of `paths` has its manifest (or is gone: an empty file is removed); returns
    the monotonic time it saw that."""
    while True:
        pending = [path for path in paths
                   if sealed_path(path) is None and (path.exists() or path.with_name(path.name + ".gz").exists())]
        now = time.monotonic()
        if not pending:
            return now
        if process.poll() is not None:
            raise RuntimeError("server exited with %s before sealing %s" % (process.returncode, pending))
        if now > deadline:
            raise RuntimeError("not sealed after %.0f s: %s" % (FINISH_DEADLINE, pending))
        time.sleep(0.02)


def first_200(port: int, cert: Path, process: subprocess.Popen[bytes], deadline: float) -> float:
    """Pushes the probe in a tight loop, each attempt with a short timeout, until one is answered 200;
    returns the monotonic time of that answer."""
    context = client_context(cert)
    attempt = 0
    while True:
        attempt += 1
        if process.poll() is not None:
            raise RuntimeError("server exited with %s before answering" % process.returncode)
        if time.monotonic() > deadline:
            raise RuntimeError("no 200 after %.0f s" % FINISH_DEADLINE)
        try:
            connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=PROBE_TIMEOUT)
            connection.request("POST", "/datastream", PROBE_BODY.replace(b"probe", b"probe-%d" % attempt),
                               {"Content-Type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            connection.close()
            if answer.status == 200:
                return time.monotonic()
        except (OSError, http.client.HTTPException):
            pass
        # A refused connection comes back at once: a short pause keeps the loop off the server's cores.
        time.sleep(0.005)


def fill(port: int, cert: Path, body: bytes, tail: bytes, decoded: int, target_mb: float,
         keep_pushing: bool) -> Tuple[threading.Event, List[threading.Thread], List[int]]:
    """Pushes gzip'd batches over LIFECYCLE_CONNECTIONS keep-alive connections until `target_mb` MB of
    records are acknowledged; returns then (with `keep_pushing`, the pushers go on until the returned
    event is set: they are still pushing when the server is killed) or once they stopped.  The list
    counts acknowledged batches."""
    context = client_context(cert)
    stop, enough = threading.Event(), threading.Event()
    acknowledged = [0]
    lock = threading.Lock()

    def pusher(number: int) -> None:
        connection: Optional[http.client.HTTPSConnection] = None
        counter = 0
        while not stop.is_set():
            counter += 1
            try:
                connection, status = post_gzip(connection, port, context,
                                               unique_body(body, tail, "gzip", "r%d-%d" % (number, counter)))
            except (OSError, http.client.HTTPException):
                connection = None
                if stop.is_set():
                    return
                continue
            if status == 200:
                with lock:
                    acknowledged[0] += 1
                    if acknowledged[0] * decoded >= target_mb * 1e6:
                        enough.set()
                        if not keep_pushing:
                            stop.set()

    threads = [threading.Thread(target=pusher, args=(number,)) for number in range(LIFECYCLE_CONNECTIONS)]
    for thread in threads:
        thread.start()
    if not enough.wait(FINISH_DEADLINE):
        stop.set()
        raise RuntimeError("could not push %g MB" % target_mb)
    if not keep_pushing:
        for thread in threads:
            thread.join()
    return stop, threads, acknowledged


def run_restart(kind: str, variant: str, workdir: Path, cert: Path, key: Path, bodies: Dict[str, Path],
                megabytes: float, script: Path, extra: Sequence[str]) -> Dict[str, float]:
    """Scenario R, one variant ('SIGTERM', 'SIGKILL' or 'gzip'): an earlier run fills the folder with
    `megabytes` MB of this hour's records and is stopped; a new one is exec'd on that folder."""
    folder = Path(tempfile.mkdtemp(prefix="%s-R-%s-" % (kind, variant), dir=str(workdir)))
    options = list(LIFECYCLE_OPTIONS) + list(extra) + (["--compress-rotated"] if variant == "gzip" else [])
    body, tail = bodies["big.gz"].read_bytes(), Path(str(bodies["big.gz"]) + ".tail").read_bytes()
    decoded = int(bodies["big.gz.decoded"].read_text()) + len(tail)
    per_batch = int(bodies["big.gz.lines"].read_text()) + 1
    earlier = Server(kind, folder, cert, key, options, script)
    try:
        stop, threads, acknowledged = fill(earlier.port, cert, body, tail, decoded, megabytes,
                                           keep_pushing=variant == "SIGKILL")
        if variant == "SIGKILL":
            earlier.kill()
            stop.set()
            for thread in threads:
                thread.join()
        else:
            earlier.stop()
    except BaseException:
        earlier.kill()
        raise
    left = [path for path, _ in dsreceiver.Layout(earlier.output).data_files(compressed=True)]
    left_mb = sum(path.stat().st_size for path in left) / 1e6
    restarted = Server(kind, folder, cert, key, options, script, reuse_output=True, wait=False)
    deadline = restarted.started + FINISH_DEADLINE
    try:
        answered = first_200(restarted.port, cert, restarted.process, deadline)
        sealed = wait_until_sealed(left, restarted.process, deadline)
    finally:
        restarted.stop()
    records = 0
    for path in left:
        manifest = sealed_path(path)
        records += json.loads(manifest.read_bytes())["records"] if manifest is not None else 0
    shutil.rmtree(str(folder))
    return {"value": answered - restarted.started, "sealed_s": sealed - restarted.started, "left_mb": left_mb,
            "files": len(left), "records_sealed": records, "records_acked": acknowledged[0] * per_batch,
            "per_batch": per_batch}


def run_seal(kind: str, variant: str, workdir: Path, bodies: Dict[str, Path], megabytes: float,
             script: Path) -> Dict[str, float]:
    """Scenario S, one variant ('plain' or 'gzip'): finished files of `megabytes` MB written by the
    script's own Storage, then timed through its Housekeeper.finish_files() in this process."""
    module = load_script(script)
    folder = Path(tempfile.mkdtemp(prefix="%s-S-%s-" % (kind, variant), dir=str(workdir)))
    paths = write_finished_files(module, folder / "out", megabytes, bodies["big.json"].read_bytes(),
                                 time.time() - 7200)
    size = sum(path.stat().st_size for path in paths)
    housekeeper = module.Housekeeper(module.Layout(folder / "out"), compress=variant == "gzip")
    housekeeper.to_finish = list(paths)
    started = time.monotonic()
    housekeeper.finish_files()
    elapsed = time.monotonic() - started
    manifests = [sealed_path(path) for path in paths]
    if None in manifests:
        raise RuntimeError("%s: not every file was sealed" % kind)
    records = sum(json.loads(manifest.read_bytes())["records"] for manifest in manifests if manifest)
    shutil.rmtree(str(folder))
    return {"value": size / 1e6 / elapsed, "seconds": elapsed, "mb": size / 1e6, "files": len(paths),
            "records": records, "sha256_mb_s": sha256_limit_mb_s()}


def post_gzip(connection: Optional[http.client.HTTPSConnection], port: int, context: ssl.SSLContext,
              body: bytes) -> Tuple[http.client.HTTPSConnection, int]:
    """POSTs a gzip'd JSON body on a keep-alive connection (opened when None); returns it and the status."""
    if connection is None:
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    connection.request("POST", "/datastream", body, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    answer = connection.getresponse()
    answer.read()
    return connection, answer.status


def sha256_limit_mb_s() -> float:
    """One core's SHA-256 rate on this machine (the bound of sealing a plain file), in MB/s."""
    block = os.urandom(16 << 20)
    digest, rounds, started = hashlib.sha256(), 0, time.monotonic()
    while time.monotonic() - started < 0.5:
        digest.update(block)
        rounds += 1
    return rounds * len(block) / 1e6 / (time.monotonic() - started)


def paced_pushes(port: int, cert: str, body: bytes, tail: bytes, tag: str, rate: float, started: float,
                 stop: multiprocessing.synchronize.Event,
                 results: multiprocessing.Queue[List[Tuple[float, float, bool]]]) -> None:
    """One connection of scenario P: a push every 1/rate seconds from `started` on (open loop: a late
    answer delays the next push, not its schedule), until `stop`; reports (scheduled time, latency from
    that time, answered 200) of each push."""
    context = client_context(Path(cert))
    connection: Optional[http.client.HTTPSConnection] = None
    done: List[Tuple[float, float, bool]] = []
    counter = 0
    while not stop.is_set():
        scheduled = started + counter / rate
        counter += 1
        delay = scheduled - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        ok = False
        try:
            connection, status = post_gzip(connection, port, context, unique_body(body, tail, "gzip", "%s-%d" % (tag, counter)))
            ok = status == 200
        except (OSError, http.client.HTTPException):
            connection = None
        done.append((scheduled, time.monotonic() - scheduled, ok))
    results.put(done)


def run_pushes_during_seal(kind: str, variant: str, workdir: Path, cert: Path, key: Path, bodies: Dict[str, Path],
                           file_mb: float, rate: float, seconds: float, script: Path,
                           extra: Sequence[str]) -> Dict[str, float]:
    """Scenario P, one variant ('seal': a `file_mb` MB past-hour file waits in the folder at start, or
    'idle': none): the latencies of paced pushes from the first 200 on, for `seconds` and at least until
    that file is sealed."""
    folder = Path(tempfile.mkdtemp(prefix="%s-P-%s-" % (kind, variant), dir=str(workdir)))
    left: List[Path] = []
    if variant == "seal":
        left = write_finished_files(load_script(script), folder / "out", file_mb, bodies["big.json"].read_bytes(),
                                    time.time() - 7200)
    server = Server(kind, folder, cert, key, LIFECYCLE_OPTIONS + list(extra) + ["--compress-rotated"], script,
                    reuse_output=True, wait=False)
    deadline = server.started + FINISH_DEADLINE
    body, tail = bodies["big.gz"].read_bytes(), Path(str(bodies["big.gz"]) + ".tail").read_bytes()
    results: multiprocessing.Queue[List[Tuple[float, float, bool]]] = multiprocessing.Queue()
    stop = multiprocessing.Event()
    pushers: List[multiprocessing.Process] = []
    try:
        answered = first_200(server.port, cert, server.process, deadline)
        # Finished before serving (as the old start-up did): no push can overlap it.
        finished_first = bool(left) and all(sealed_path(path) is not None for path in left)
        load_started = time.monotonic()
        pushers = [multiprocessing.Process(
            target=paced_pushes, args=(server.port, str(cert), body, tail, "p%d" % number,
                                       rate / LIFECYCLE_CONNECTIONS, load_started + number / rate, stop, results))
            for number in range(LIFECYCLE_CONNECTIONS)]
        for pusher in pushers:
            pusher.start()
        sealed = wait_until_sealed(left, server.process, deadline) if left and not finished_first else answered
        # Then until `seconds` have passed, or one more second after the seal.
        ends = max(load_started + seconds, sealed + 1)
        while time.monotonic() < ends and server.process.poll() is None:
            time.sleep(0.1)
    finally:
        stop.set()
        collected = [push for _ in pushers for push in results.get(timeout=120)]
        for pusher in pushers:
            pusher.join()
        server.stop()
    shutil.rmtree(str(folder))
    during = sorted(latency for scheduled, latency, _ in collected if scheduled < sealed)
    every = sorted(latency for _, latency, _ in collected)
    # The figure compared: during the seal when one overlapped the load, else over the whole load.
    measured = during if during else every
    return {"value": percentile(measured, 99) * 1000, "p50_ms": percentile(measured, 50) * 1000,
            "max_ms": measured[-1] * 1000 if measured else 0.0,
            "requests": len(measured), "errors": sum(not ok for _, _, ok in collected),
            "during_seal": len(during), "all_p99_ms": percentile(every, 99) * 1000,
            "first_200_s": answered - server.started,
            "sealed_s": (sealed if not finished_first else answered) - server.started if left else 0.0,
            "load_s": time.monotonic() - load_started}


LIFECYCLE_VARIANTS = {"R": ("SIGTERM", "SIGKILL", "gzip"), "S": ("plain", "gzip"), "P": ("idle", "seal"),
                      "G": ("20k-w2", "20k-w1", "1m-w2", "1m-w1"), "K": ("kill",),
                      "U": ("restart", "socket", "USR2"), "H": ("young", "aged")}
# What the baseline cannot do: take a passed socket, or upgrade in place.
BASELINE_SKIPS = {("U", "socket"), ("U", "USR2")}


def run_lifecycle(kind: str, scenario: str, variant: str, workdir: Path, cert: Path, key: Path,
                  bodies: Dict[str, Path], options: argparse.Namespace, script: Path) -> Dict[str, float]:
    extra = options.dsreceiver_args.split()
    if scenario == "R":
        return run_restart(kind, variant, workdir, cert, key, bodies, options.restart_mb, script, extra)
    if scenario == "S":
        return run_seal(kind, variant, workdir, bodies, options.seal_mb, script)
    if scenario == "G":
        return run_age(kind, variant, workdir, cert, key, options, script)
    if scenario == "K":
        return run_kill(kind, variant, workdir, cert, key, options, script)
    if scenario == "U":
        return run_upgrade(kind, variant, workdir, cert, key, options, script)
    if scenario == "H":
        return run_housekeeping(kind, variant, workdir, cert, key, bodies, options, script)
    return run_pushes_during_seal(kind, variant, workdir, cert, key, bodies, options.seal_file_mb,
                                  options.push_rate, options.seconds, script, extra)


# -- at any age: G, K, U, H ----------------------------------------------------------

# The folders of a receiver that ran for a long time (bench/aged_folder.py): finished files, streams.
AGED_SIZES = {"20k": (20000, 14), "1m": (1000000, 100)}
# A stop that takes longer than this is cut with SIGKILL and reported as such.
STOP_DEADLINE = 120.0
# The uploaders of K and U: DataStream-like, each a push every UPLOAD_INTERVAL on a keep-alive connection.
UPLOADERS = 4
UPLOAD_INTERVAL = 0.02
UPLOAD_BODY = b'{"version":"4","streamId":"61234","cp":"123","reqId":"%s","reqTimeSec":"1764201500","statusCode":"200"}\n'
# What systemd does for a socket-activated service: the socket as descriptor 3, LISTEN_FDS, LISTEN_PID.
SOCKET_LAUNCHER = """\
import os, sys
fd = int(os.environ.pop("BENCH_LISTEN_FD"))
os.dup2(fd, 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def aged_base(cache: Path, size: str) -> Path:
    """The aged folder of `size`, written once into `cache` (and kept there for the next run)."""
    files, streams = AGED_SIZES[size]
    folder, done = cache / ("aged-%s" % size), cache / ("aged-%s.done" % size)
    if not done.exists():
        shutil.rmtree(str(folder), ignore_errors=True)
        print("writing the %s aged folder (%d files, %d streams) ..." % (size, files, streams), flush=True)
        from aged_folder import make_aged_folder
        make_aged_folder(folder, files, streams)
        done.write_text("%d files, %d streams\n" % (files, streams))
    return folder


class AgedView:
    """A writable view of an aged folder for one run: an overlay mount over it (the folder itself never
    changes), or a copy where overlays cannot be mounted (not root, no overlayfs)."""

    def __init__(self, base: Path, scratch: Path) -> None:
        self.base = base
        self.scratch = scratch
        self.mounted = False

    def __enter__(self) -> Path:
        merged = self.scratch / "out"
        for name in ("upper", "work", "out"):
            (self.scratch / name).mkdir(parents=True, exist_ok=True)
        options = "lowerdir=%s,upperdir=%s,workdir=%s" % (self.base, self.scratch / "upper", self.scratch / "work")
        mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                               capture_output=True, text=True)
        self.mounted = mount.returncode == 0
        if not self.mounted:
            merged.rmdir()
            shutil.copytree(str(self.base), str(merged), symlinks=True)
        return merged

    def __exit__(self, *exc_info: object) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.scratch / "out")], check=False)
        shutil.rmtree(str(self.scratch), ignore_errors=True)


def stop_within(server: Server, deadline: float) -> float:
    """SIGTERM, then the seconds until the whole process tree exited (SIGKILL after `deadline`: inf)."""
    started = time.monotonic()
    tree = process_tree(server.process.pid)
    server.process.terminate()
    try:
        server.process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        server.kill()
        return float("inf")
    while any(Path("/proc/%d" % pid).exists() and Path("/proc/%d/stat" % pid).read_text().split(")")[-1].split()[0]
              != "Z" for pid in tree):
        if time.monotonic() - started > deadline:
            server.kill()
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - started


def run_age(kind: str, variant: str, workdir: Path, cert: Path, key: Path, options: argparse.Namespace,
            script: Path) -> Dict[str, float]:
    """Scenario G, one variant ('20k-w2', '1m-w1', ...): exec -> first 200 over an aged folder, then SIGTERM ->
    exit."""
    size, workers = variant.split("-")
    base = aged_base(options.aged_dir or workdir, size)
    scratch = Path(tempfile.mkdtemp(prefix="%s-G-%s-" % (kind, variant), dir=str(workdir)))
    with AgedView(base, scratch):
        server = Server(kind, scratch, cert, key, ["--workers", workers[1:]] + LOAD_GENERATOR_OPTIONS, script,
                        reuse_output=True, wait=False)
        try:
            answered = first_200(server.port, cert, server.process, server.started + options.first_200_deadline)
            value = answered - server.started
        except RuntimeError:
            value = float("inf")
        stop_s = stop_within(server, STOP_DEADLINE)
    return {"value": value, "stop_s": stop_s, "files": AGED_SIZES[size][0]}


class Uploaders:
    """DataStream-like uploaders: each pushes a new one-record batch every UPLOAD_INTERVAL on a keep-alive
    connection and sends it again until it is answered 200, timing each attempt; counts connections refused and
    reset, and keeps when each 200 came."""

    def __init__(self, port: Callable[[], int], cert: Path) -> None:
        self.port = port
        self.context = client_context(cert)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acknowledged: List[str] = []
        self.answers: List[Tuple[float, float]] = []  # (when answered, seconds the push took)
        self.refused = self.reset = self.other = 0
        self.threads = [threading.Thread(target=self._run, args=(number,)) for number in range(UPLOADERS)]
        for thread in self.threads:
            thread.start()

    def _run(self, number: int) -> None:
        connection: Optional[http.client.HTTPSConnection] = None
        index = 0
        while not self.stop.is_set():
            name = "up%d-%06d" % (number, index)
            started = time.monotonic()
            while not self.stop.is_set():
                try:
                    if connection is None:
                        connection = http.client.HTTPSConnection("localhost", self.port(), context=self.context,
                                                                 timeout=30)
                    connection.request("POST", "/datastream", UPLOAD_BODY % name.encode(),
                                       {"Content-Type": "application/json"})
                    answer = connection.getresponse()
                    answer.read()
                    if answer.will_close:
                        connection.close()
                        connection = None
                    if answer.status == 200:
                        with self.lock:
                            self.acknowledged.append(name)
                            self.answers.append((time.monotonic(), time.monotonic() - started))
                        break
                    with self.lock:
                        self.other += 1
                except ConnectionRefusedError:
                    connection = None
                    with self.lock:
                        self.refused += 1
                except (OSError, http.client.HTTPException):
                    connection = None
                    with self.lock:
                        self.reset += 1
                self.stop.wait(UPLOAD_INTERVAL)
            index += 1
            self.stop.wait(UPLOAD_INTERVAL)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def longest_gap(self, since: float = 0.0) -> float:
        """The longest time between two 200s (any uploader's) after `since`."""
        moments = sorted(moment for moment, _ in self.answers if moment >= since)
        return max((later - earlier for earlier, later in zip(moments, moments[1:])), default=0.0)

    def verdict(self, output: Path) -> Tuple[int, int]:
        """(acknowledged batches not stored, batches stored more than once), from the records on disk."""
        seen: Dict[str, int] = {}
        for path in output.rglob("*.log*"):
            if any(part.startswith(".") for part in path.relative_to(output).parts) or not path.is_file():
                continue
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(str(path), "rb") as handle:
                for line in handle:
                    match = re.search(rb'"reqId":"(up\d-\d+)"', line)
                    if match:
                        seen[match.group(1).decode()] = seen.get(match.group(1).decode(), 0) + 1
        return (sum(1 for name in self.acknowledged if name not in seen),
                sum(1 for count in seen.values() if count > 1))


def run_kill(kind: str, variant: str, workdir: Path, cert: Path, key: Path, options: argparse.Namespace,
             script: Path) -> Dict[str, float]:
    """Scenario K: a worker of two SIGKILLed over the 20k aged folder while the uploaders push; the longest
    push from the kill on."""
    base = aged_base(options.aged_dir or workdir, "20k")
    scratch = Path(tempfile.mkdtemp(prefix="%s-K-" % kind, dir=str(workdir)))
    with AgedView(base, scratch) as output:
        server = Server(kind, scratch, cert, key, ["--workers", "2"] + LOAD_GENERATOR_OPTIONS, script,
                        reuse_output=True)
        uploaders = Uploaders(lambda: server.port, cert)
        try:
            time.sleep(3.0)
            workers = [pid for pid in process_tree(server.process.pid) if pid != server.process.pid]
            killed = time.monotonic()
            os.kill(workers[0], signal.SIGKILL)
            time.sleep(options.kill_seconds)
        finally:
            uploaders.finish()
            stop_within(server, STOP_DEADLINE)
        lost, doubled = uploaders.verdict(output)
    after = [took for moment, took in uploaders.answers if moment >= killed]
    return {"value": max(after, default=0.0) * 1000, "p99_ms": percentile(sorted(after), 99) * 1000,
            "pushes": len(after), "reset": uploaders.reset, "refused": uploaders.refused,
            "other": uploaders.other, "lost": lost, "doubled": doubled}


def run_upgrade(kind: str, variant: str, workdir: Path, cert: Path, key: Path, options: argparse.Namespace,
                script: Path) -> Dict[str, float]:
    """Scenario U, one variant: 'restart' (SIGTERM, then a new process binds the port: what the baseline can
    do), 'socket' (systemctl restart with the socket unit: the socket outlives the process) or 'USR2' (an
    upgrade in place), while the uploaders push; refused, reset, lost, doubled and the longest gap between
    200s."""
    scratch = Path(tempfile.mkdtemp(prefix="%s-U-%s-" % (kind, variant), dir=str(workdir)))
    extra = ["--workers", "2", "--log-level", "info"] + LOAD_GENERATOR_OPTIONS
    holder: Optional[socket.socket] = None
    port = free_port()
    if variant == "socket":
        holder = socket.create_server(("127.0.0.1", 0), backlog=1024)
        holder.set_inheritable(True)
        port = holder.getsockname()[1]
        launcher = scratch / "launcher.py"
        launcher.write_text(SOCKET_LAUNCHER)
        os.environ["BENCH_LISTEN_FD"] = str(holder.fileno())

    servers = [start_on(kind, scratch, cert, key, extra, script, port, holder)]
    uploaders = Uploaders(lambda: port, cert)
    try:
        time.sleep(3.0)
        began = time.monotonic()
        if variant == "USR2":
            log_size = (scratch / "server.log").stat().st_size
            servers[0].process.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 60
            while b"upgraded: the interim process" not in (scratch / "server.log").read_bytes()[log_size:]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the upgrade did not end")
                time.sleep(0.05)
        else:
            stop_within(servers[0], STOP_DEADLINE)
            servers.append(start_on(kind, scratch, cert, key, extra, script, port, holder))
        ended = time.monotonic()
        time.sleep(3.0)
    finally:
        uploaders.finish()
        for server in servers:
            if server.process.poll() is None:
                stop_within(server, STOP_DEADLINE)
        if holder is not None:
            holder.close()
            os.environ.pop("BENCH_LISTEN_FD", None)
    lost, doubled = uploaders.verdict(scratch / "out")
    shutil.rmtree(str(scratch))
    return {"value": uploaders.longest_gap(began - 1.0), "refused": uploaders.refused, "reset": uploaders.reset,
            "other": uploaders.other, "lost": lost, "doubled": doubled, "pushes": len(uploaders.acknowledged),
            "took_s": ended - began}


def start_on(kind: str, scratch: Path, cert: Path, key: Path, extra: Sequence[str], script: Path, port: int,
             holder: Optional[socket.socket]) -> Server:
    """A server on `port`: binding it itself, or (with `holder`) taking the held socket as systemd passes it."""
    if holder is None:
        return Server(kind, scratch, cert, key, list(extra), script, reuse_output=True, port=port)
    return Server(kind, scratch, cert, key, list(extra), scratch / "launcher.py", reuse_output=True, port=port,
                  launch=[str(script)], pass_fds=(holder.fileno(),))


def run_housekeeping(kind: str, variant: str, workdir: Path, cert: Path, key: Path, bodies: Dict[str, Path],
                     options: argparse.Namespace, script: Path) -> Dict[str, float]:
    """Scenario H, one variant: 'young' (a new folder) or 'aged' (the 1m aged folder, with --retention-days 3650
    so that every pass reads what retention would): the p99 of paced pushes for --housekeeping-seconds, which
    spans the passes at start and after a minute."""
    scratch = Path(tempfile.mkdtemp(prefix="%s-H-%s-" % (kind, variant), dir=str(workdir)))
    view = AgedView(aged_base(options.aged_dir or workdir, "1m"), scratch) if variant == "aged" else None
    if view is not None:
        view.__enter__()
    try:
        server = Server(kind, scratch, cert, key, LIFECYCLE_OPTIONS + ["--retention-days", "3650"], script,
                        reuse_output=True, wait=False)
        body, tail = bodies["big.gz"].read_bytes(), Path(str(bodies["big.gz"]) + ".tail").read_bytes()
        results: multiprocessing.Queue[List[Tuple[float, float, bool]]] = multiprocessing.Queue()
        stop = multiprocessing.Event()
        pushers: List[multiprocessing.Process] = []
        try:
            answered = first_200(server.port, cert, server.process, server.started + options.first_200_deadline)
            load_started = time.monotonic()
            pushers = [multiprocessing.Process(
                target=paced_pushes, args=(server.port, str(cert), body, tail, "h%d" % number,
                                           options.push_rate / LIFECYCLE_CONNECTIONS, load_started + number /
                                           options.push_rate, stop, results))
                for number in range(LIFECYCLE_CONNECTIONS)]
            for pusher in pushers:
                pusher.start()
            while time.monotonic() < load_started + options.housekeeping_seconds and server.process.poll() is None:
                time.sleep(0.1)
        finally:
            stop.set()
            collected = [push for _ in pushers for push in results.get(timeout=120)]
            for pusher in pushers:
                pusher.join()
            stop_within(server, STOP_DEADLINE)
    finally:
        if view is not None:
            view.__exit__()
        shutil.rmtree(str(scratch), ignore_errors=True)
    latencies = sorted(latency for _, latency, _ in collected)
    return {"value": percentile(latencies, 99) * 1000, "p50_ms": percentile(latencies, 50) * 1000,
            "max_ms": latencies[-1] * 1000 if latencies else 0.0, "requests": len(latencies),
            "errors": sum(not ok for _, _, ok in collected), "first_200_s": answered - server.started}


# -- the limits --------------------------------------------------------------------

def disk_limit_mb_s(folder: Path, total_mb: int) -> float:
    """Sequential 1 MiB writes with fdatasync every 16 MiB and at the end, in MB/s."""
    block = os.urandom(1 << 20)
    path = folder / "disk-probe"
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    started = time.monotonic()
    for index in range(total_mb):
        os.write(fd, block)
        if index % 16 == 15:
            os.fdatasync(fd)
    os.fdatasync(fd)
    elapsed = time.monotonic() - started
    os.close(fd)
    path.unlink()
    return total_mb * (1 << 20) / 1e6 / elapsed


def decompression_limit_mb_s(compressed: bytes) -> float:
    """Decoded MB/s of gunzip on this machine: one core's rate times the cores."""
    rounds, started = 0, time.monotonic()
    while time.monotonic() - started < 2:
        decoded = zlib.decompress(compressed, 31)
        rounds += 1
    return rounds * len(decoded) / 1e6 / (time.monotonic() - started) * (os.cpu_count() or 1)


# -- the run -----------------------------------------------------------------------

def poll_status(port: int, cert: Path, stop: threading.Event, answers: List[int]) -> None:
    """Loads the status page once a second, as an operator's open browser tab would, until `stop`."""
    context = client_context(cert)
    while not stop.wait(1.0):
        try:
            connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
            connection.request("GET", "/status")
            answer = connection.getresponse()
            answer.read()
            connection.close()
            answers.append(answer.status)
        except (OSError, http.client.HTTPException):
            answers.append(0)


def run_one(kind: str, scenario: str, workdir: Path, cert: Path, key: Path, bodies: Dict[str, Path],
            seconds: float, use_wrk: bool, extra: Sequence[str], status_poll: bool = False,
            script: Path = ROOT / "dsreceiver.py") -> Dict[str, object]:
    _, body_name, mode, connections = SCENARIOS[scenario]
    server = Server(kind, Path(tempfile.mkdtemp(prefix="%s-%s-" % (kind, scenario), dir=str(workdir))), cert, key,
                    extra, script)
    idle: Optional[multiprocessing.Process] = None
    memory = MemorySampler(server.process.pid)
    stop_polling = threading.Event()
    status_answers: List[int] = []
    poller = threading.Thread(target=poll_status, args=(server.port, cert, stop_polling, status_answers))
    if status_poll and kind.startswith("dsreceiver"):
        poller.start()
    try:
        if scenario == "D":
            ready: multiprocessing.Queue[int] = multiprocessing.Queue()
            check: multiprocessing.Queue[int] = multiprocessing.Queue()
            idle = multiprocessing.Process(target=hold_idle, args=(server.port, str(cert), IDLE_CONNECTIONS, ready,
                                                                   check))
            idle.start()
            ready.get(timeout=300)
        if scenario == "E":
            load = run_new_connections(server.port, cert, bodies[body_name], seconds)
        elif use_wrk:
            load = run_wrk(server.port, bodies[body_name], mode, connections, seconds)
        else:
            load = run_builtin(server.port, cert, bodies[body_name], mode, connections, seconds)
        if idle is not None:
            check.put(1)
            load["idle_answered"] = ready.get(timeout=300)
            idle.join()
    finally:
        stop_polling.set()
        if poller.is_alive():
            poller.join()
        load["rss_mb"] = memory.finish()
        server.stop()
    if status_answers:
        load["status_polls"] = "%d of %d answered 200" % (status_answers.count(200), len(status_answers))
    stored, written = server.stored()
    lines_per_body = bodies[body_name + ".lines"].read_text()
    load["stored_lines"] = stored
    load["expected_lines"] = load["acknowledged"] * (int(lines_per_body) + 1)
    load["written_mb"] = written / 1e6
    load["decoded_mb"] = load["acknowledged"] * int(bodies[body_name + ".decoded"].read_text()) / 1e6
    shutil.rmtree(str(server.output))
    return load


def write_bodies(folder: Path) -> Dict[str, Path]:
    """The request bodies: a ~1 MB DataStream 2 JSON batch (plain and gzip'd), a ~100-byte one, and a ~1 MB
    STRUCTURED batch of the samples' stream (gzip'd); each with the record appended to make it unique."""
    big = b"\n".join(json_lines("bench", 2000)) + b"\n"
    small = b'{"version":"4","streamId":"61234","cp":"123","reqId":"1","statusCode":"200","reqPath":"a.js"}\n'
    json_tail = b'{"version":"4","streamId":"61234","cp":"123","reqId":"bench-{TAG}","statusCode":"200"}\n'
    records = sample_lines("structured")
    structured_lines = [records[index % len(records)] for index in range(3400)]
    structured = b"\n".join(structured_lines) + b"\n"
    # A sample record with its reqId replaced: 45 values, so it is converted like the others.
    values = records[0].split(b" ")
    values[3] = b"bench-{TAG}"
    structured_tail = b" ".join(values) + b"\n"
    paths = {}
    for name, data, decoded, lines, tail in (
            ("big.json", big, big, 2000, json_tail), ("big.gz", gzip.compress(big, 6), big, 2000, json_tail),
            ("small.json", small, small, 1, json_tail),
            ("structured.gz", gzip.compress(structured, 6), structured, len(structured_lines), structured_tail)):
        path = folder / name
        path.write_bytes(data)
        Path(str(path) + ".tail").write_bytes(tail)
        paths[name] = path
        (folder / (name + ".lines")).write_text(str(lines))
        (folder / (name + ".decoded")).write_text(str(len(decoded)))
        paths[name + ".lines"] = folder / (name + ".lines")
        paths[name + ".decoded"] = folder / (name + ".decoded")
    return paths


def machine_facts() -> Dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
                "openssl": ssl.OPENSSL_VERSION, "kernel": platform.release()}
    for tool, args in (("wrk", ["wrk", "--version"]), ("nginx", ["nginx", "-v"])):
        try:
            out = subprocess.run(args, capture_output=True, text=True)
            versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            versions[tool] = "not installed"
    import importlib.metadata
    for package in ("flask", "gunicorn", "uvicorn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15, help="length of each run (default: 15)")
    parser.add_argument("--scenarios", default="ABCDEF",
                        help="which scenarios (default: ABCDEF); R, S, P, G, K, U and H (restart, sealing, pushes "
                        "during a seal, and at any age: dsreceiver and the baseline only, minutes each) run only when "
                        "named")
    parser.add_argument("--servers", default="dsreceiver,gunicorn,uvicorn,flask,nginx,dsreceiver-gzip",
                        help="which servers (default: dsreceiver,gunicorn,uvicorn,flask,nginx,dsreceiver-gzip)")
    parser.add_argument("--dsreceiver-args", default="", help="extra options for dsreceiver, e.g. '--workers 4'")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="report file")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="FILE",
                        help="also run this other dsreceiver.py (e.g. main's, from git show) as dsreceiver-baseline, "
                        "with the same options, and print the ratios")
    parser.add_argument("--script", type=Path, default=ROOT / "dsreceiver.py", metavar="FILE",
                        help="the dsreceiver.py run as dsreceiver (default: the one beside bench/, e.g. a snapshot "
                        "from git show while it is being edited)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each server per scenario, alternating their order; the median is reported "
                        "(default: 1)")
    parser.add_argument("--restart-mb", type=float, default=600,
                        help="scenario R: MB of this hour's records the earlier run leaves (default: 600)")
    parser.add_argument("--seal-mb", type=float, default=600,
                        help="scenario S: MB of finished files to seal (default: 600)")
    parser.add_argument("--seal-file-mb", type=float, default=1024,
                        help="scenario P: MB of the past-hour file gzip'd and sealed under load (default: 1024)")
    parser.add_argument("--push-rate", type=float, default=32,
                        help="scenario P: pushes a second, over %d connections (default: 32)" % LIFECYCLE_CONNECTIONS)
    parser.add_argument("--aged-dir", type=Path, default=None, metavar="DIR",
                        help="scenarios G, K, H: where the aged folders are written once and kept (default: the "
                        "scratch folder, written again each run: 7 minutes for the 1,000,000-file one)")
    parser.add_argument("--first-200-deadline", type=float, default=180,
                        help="scenarios G, H: seconds to wait for the first 200 before reporting none (default: 180)")
    parser.add_argument("--kill-seconds", type=float, default=10,
                        help="scenario K: seconds of pushes after the kill (default: 10)")
    parser.add_argument("--housekeeping-seconds", type=float, default=75,
                        help="scenario H: seconds of paced pushes (default: 75, past the second pass)")
    parser.add_argument("--poll-status", action="store_true",
                        help="load dsreceiver's /status once a second during each run, as an open browser tab would")
    options = parser.parse_args(argv)
    use_wrk = shutil.which("wrk") is not None
    servers = [s for s in options.servers.split(",") if s != "nginx" or shutil.which("nginx")]
    if options.baseline is not None:
        servers.insert(servers.index("dsreceiver") + 1 if "dsreceiver" in servers else 0, "dsreceiver-baseline")
    workdir = Path(tempfile.mkdtemp(prefix="dsreceiver-bench-", dir=str(options.workdir) if options.workdir else None))
    cert, key = workdir / "fullchain.pem", workdir / "privkey.pem"
    dsreceiver.create_self_signed(cert, key, "localhost")
    bodies = write_bodies(workdir)
    facts = machine_facts()
    print("machine: %s" % json.dumps(facts), flush=True)
    disk = disk_limit_mb_s(workdir, 1024)
    inflate = decompression_limit_mb_s(bodies["big.gz"].read_bytes())
    print("disk limit %.0f MB/s (1 GiB, fdatasync every 16 MiB); gunzip limit %.0f MB/s decoded on %s cores"
          % (disk, inflate, facts["nproc"]), flush=True)
    results: Dict[Tuple[str, str], Dict[str, object]] = {}
    lifecycle: Dict[Tuple[str, str, str], Dict[str, object]] = {}
    for scenario in options.scenarios:
        if scenario in LIFECYCLE_SCENARIOS:
            run_lifecycle_rounds(scenario, servers, workdir, cert, key, bodies, options, lifecycle)
            continue
        # F is STRUCTURED stored as JSON: the peers, which only append, store it as it comes.
        kinds = [kind for kind in servers if not (kind == "dsreceiver-gzip" and scenario != "A"
                                                  or kind in ("flask", "nginx") and scenario == "F")]
        runs: Dict[str, List[Dict[str, object]]] = {kind: [] for kind in kinds}
        for round_number in range(options.rounds):
            # Alternating the order spreads any drift of the machine over every server alike.
            for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
                extra = (LOAD_GENERATOR_OPTIONS + options.dsreceiver_args.split()
                         + (["--store", "gzip"] if kind == "dsreceiver-gzip" else []))
                extra += STRUCTURED_OPTIONS if scenario == "F" else []
                script = options.baseline if kind == "dsreceiver-baseline" else options.script
                print("running %s %s (round %d) ..." % (kind, scenario, round_number + 1), flush=True)
                runs[kind].append(run_one(kind, scenario, workdir, cert, key, bodies, options.seconds,
                                          use_wrk, extra, options.poll_status, script))
                print("  " + json.dumps(runs[kind][-1]), flush=True)
        for kind, done in runs.items():
            results[(kind, scenario)] = median_run(done)
    report = render(results, facts, disk, inflate, options, use_wrk, bodies, lifecycle)
    print(report)
    previous = options.output.read_text() if options.output.exists() else ""
    kept = previous.split(MARKER, 1)[1] if MARKER in previous else "\n"
    options.output.write_text(report + "\n" + MARKER + kept)
    shutil.rmtree(str(workdir))
    return 0


def rate_of(result: Dict[str, object]) -> float:
    """Acknowledged requests a second."""
    return cast(int, result["acknowledged"]) / cast(float, result["seconds"])


def median_run(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """The run with the median rate (the lower middle one of an even count), with every run's rate."""
    chosen = dict(sorted(runs, key=rate_of)[(len(runs) - 1) // 2])
    chosen["rates"] = [round(rate_of(run), 1) for run in runs]
    return chosen


def run_lifecycle_rounds(scenario: str, servers: Sequence[str], workdir: Path, cert: Path, key: Path,
                         bodies: Dict[str, Path], options: argparse.Namespace,
                         lifecycle: Dict[Tuple[str, str, str], Dict[str, object]]) -> None:
    """Scenario R, S or P for dsreceiver and the baseline: each variant `--rounds` times, alternating
    the order; keeps the median of each."""
    kinds = [kind for kind in servers if kind in ("dsreceiver", "dsreceiver-baseline")]
    for variant in LIFECYCLE_VARIANTS[scenario]:
        runs: Dict[str, List[Dict[str, float]]] = {kind: [] for kind in kinds
                                                   if kind == "dsreceiver" or (scenario, variant) not in BASELINE_SKIPS}
        for round_number in range(options.rounds):
            for kind in list(runs) if round_number % 2 == 0 else list(runs)[::-1]:
                script = options.baseline if kind == "dsreceiver-baseline" else options.script
                print("running %s %s %s (round %d) ..." % (kind, scenario, variant, round_number + 1), flush=True)
                runs[kind].append(run_lifecycle(kind, scenario, variant, workdir, cert, key, bodies, options, script))
                print("  " + json.dumps(runs[kind][-1]), flush=True)
        for kind, done in runs.items():
            chosen: Dict[str, object] = dict(sorted(done, key=lambda run: run["value"])[(len(done) - 1) // 2])
            chosen["values"] = [round(run["value"], 2) for run in done]
            lifecycle[(kind, scenario, variant)] = chosen


def stored_verdict(result: Dict[str, object], connections: int) -> str:
    """Compares stored lines with acknowledged batches; wrk stops with up to one request per connection
    in flight, which the server may still have stored and answered."""
    if result["stored_lines"] is None:
        return "n/a"
    stored, expected, acknowledged = (cast(int, result[key]) for key in ("stored_lines", "expected_lines", "acknowledged"))
    per_batch = expected // max(1, acknowledged) if acknowledged else 1
    extra, remainder = divmod(stored - expected, per_batch)
    if extra == 0 and remainder == 0:
        return "exact"
    if remainder == 0 and 0 < extra <= connections:
        return "exact, +%d in flight at stop" % extra
    return "MISMATCH: %+d lines" % (result["stored_lines"] - result["expected_lines"])  # type: ignore[operator]


def render(results: Dict[Tuple[str, str], Dict[str, object]], facts: Dict[str, str], disk: float, inflate: float,
           options: argparse.Namespace, use_wrk: bool, bodies: Dict[str, Path],
           lifecycle: Optional[Dict[Tuple[str, str, str], Dict[str, object]]] = None) -> str:
    lines = ["# Benchmarks", "",
             "`make bench` (`%s bench/bench.py --seconds %g`), %s." % (Path(sys.executable).name, options.seconds,
                                                                         time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime())),
             "", "| machine | |", "| --- | --- |"]
    lines += ["| %s | %s |" % item for item in facts.items()]
    lines += ["| load generator | %s |" % ("wrk with bench/push.lua (scenario E: built-in paced client)" if use_wrk
                                           else "built-in multi-process client"),
              "| dsreceiver options | %s (one load address; DataStream pushes from thousands) |"
              % " ".join(LOAD_GENERATOR_OPTIONS + options.dsreceiver_args.split()),
              "| peers | gunicorn: the seed's Flask handler, gthread, one worker per core x 16 threads; "
              "uvicorn: an ASGI handler, one worker per core, httptools + uvloop; both gunzip and append, "
              "without fsync |",
              "| bodies | A/B/D/E: %d bytes of DataStream 2 JSON (%d records), %d bytes gzip'd; C: %d bytes; "
              "F: %s bytes of STRUCTURED records (%s), %d bytes gzip'd; each plus one unique record |"
              % (bodies["big.json"].stat().st_size, 2000, bodies["big.gz"].stat().st_size,
                 bodies["small.json"].stat().st_size, bodies["structured.gz.decoded"].read_text(),
                 bodies["structured.gz.lines"].read_text(), bodies["structured.gz"].stat().st_size),
              "| disk limit | %.0f MB/s (1 GiB of 1 MiB writes, fdatasync every 16 MiB) |" % disk,
              "| gunzip limit | %.0f MB/s decoded (one core's rate x %s cores) |" % (inflate, facts["nproc"]),
              "", "Scenarios: " + "; ".join("**%s** %s" % (name, text[0]) for name, text in SCENARIOS.items()) + ".",
              "", "| server | scenario | req/s | stored MB/s | p50 ms | p99 ms | peak memory MB (PSS) | errors "
              "| stored vs acked |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (kind, scenario), r in results.items():
        rate = r["acknowledged"] / r["seconds"]  # type: ignore[operator]
        stored = stored_verdict(r, SCENARIOS[scenario][3])
        idle = " (%d/%d idle answered)" % (r["idle_answered"], IDLE_CONNECTIONS) if "idle_answered" in r else ""
        lines.append("| %s | %s | %.0f | %s | %.1f | %.1f | %.0f | %d | %s%s |" % (
            kind, scenario, rate, "-" if kind == "nginx" else "%.0f" % (r["decoded_mb"] / r["seconds"]),  # type: ignore[operator]
            r["p50_ms"], r["p99_ms"], r["rss_mb"], r["errors"], stored, idle))
    lines += ["", "## dsreceiver against the targets", ""]
    bound = min(disk, inflate)
    for scenario in options.scenarios:
        ours = results.get(("dsreceiver", scenario))
        if not ours:
            continue
        rate = ours["acknowledged"] / ours["seconds"]  # type: ignore[operator]
        parts = ["**%s**: %.0f req/s" % (scenario, rate)]
        for peer in ("gunicorn", "uvicorn", "flask"):
            theirs = results.get((peer, scenario))
            if theirs and theirs["acknowledged"]:
                parts.append("%.2fx %s" % (rate / rate_of(theirs), peer))
        if scenario in "AB":
            mb = ours["decoded_mb"] / ours["seconds"]  # type: ignore[operator]
            parts.append("%.0f MB/s stored = %.0f%% of the %s limit (%.0f MB/s)"
                         % (mb, 100 * mb / bound, "disk" if disk <= inflate else "gunzip", bound))
        if scenario == "D":
            parts.append("%s of %d idle connections answered, peak memory %.0f MB"
                         % (ours.get("idle_answered"), IDLE_CONNECTIONS, ours["rss_mb"]))
            a = results.get(("dsreceiver", "A"))
            if a:
                parts.append("%.0f%% of A's throughput" % (100 * rate / (a["acknowledged"] / a["seconds"])))  # type: ignore[operator]
        if scenario == "E":
            parts.append("%d errors, p99 %.0f ms" % (ours["errors"], ours["p99_ms"]))
        if scenario == "F":
            records = ours["expected_lines"] / ours["seconds"]  # type: ignore[operator]
            parts.append("%.0f records/s stored as JSON (target: 150,000)" % records)
            b = results.get(("dsreceiver", "B"))
            if b:
                parts.append("%.2fx B in records/s" % (records / (b["expected_lines"] / b["seconds"])))  # type: ignore[operator]
        lines.append("- " + ", ".join(parts))
    for scenario in options.scenarios:
        ours, base = results.get(("dsreceiver", scenario)), results.get(("dsreceiver-baseline", scenario))
        if ours and base and base["acknowledged"]:
            lines.append("- **%s against the baseline** (%s): %.2fx (medians of %d rounds: %s vs %s req/s)"
                         % (scenario, options.baseline, rate_of(ours) / rate_of(base), options.rounds,
                            ours["rates"], base["rates"]))
    gz = results.get(("dsreceiver-gzip", "A"))
    flask_a = results.get(("flask", "A"))
    if gz and flask_a:
        rate = gz["acknowledged"] / gz["seconds"]  # type: ignore[operator]
        plain = results.get(("dsreceiver", "A"))
        lines.append("- **A with --store gzip**: %.0f batches/s, %.1fx Flask; %.1f MB written per 1,000 batches "
                     "(plain storage: %s)" % (
                         rate, rate / (flask_a["acknowledged"] / flask_a["seconds"]),  # type: ignore[operator]
                         1000 * gz["written_mb"] / max(1, gz["acknowledged"]),  # type: ignore[operator]
                         "%.1f MB" % (1000 * plain["written_mb"] / max(1, plain["acknowledged"])) if plain else "-"))  # type: ignore[operator]
    if lifecycle:
        lines += render_lifecycle(lifecycle, options)
    return "\n".join(lines) + "\n"


def sealed_verdict(result: Dict[str, Any]) -> str:
    """Compares the records the manifests count with the acknowledged ones; after a SIGKILL up to one
    batch a connection was stored but not answered."""
    extra, remainder = divmod(result["records_sealed"] - result["records_acked"], result["per_batch"])
    if extra == 0 and remainder == 0:
        return "exact"
    if remainder == 0 and 0 < extra <= LIFECYCLE_CONNECTIONS:
        return "exact, +%d in flight at the kill" % extra
    return "MISMATCH: %+d records" % (result["records_sealed"] - result["records_acked"])


def seconds_or_none(value: float, deadline: float) -> str:
    """A duration, or what a run cut at `deadline` means."""
    return "%.2f s" % value if value != float("inf") else "none within %.0f s" % deadline


def render_lifecycle(lifecycle: Dict[Tuple[str, str, str], Dict[str, Any]], options: argparse.Namespace) -> List[str]:
    """The section of scenarios R, S and P: a table, then each against the baseline and its target."""
    lines = ["", "## Restart, sealing, pushes during a seal, at any age", "",
             "Scenarios: " + "; ".join("**%s** %s" % (name, text) for name, text in LIFECYCLE_SCENARIOS.items()
                                       if name in options.scenarios) + ".",
             "dsreceiver: %s; dsreceiver-baseline: %s." % (options.script, options.baseline), "",
             "| server | scenario | variant | figure | details | rounds |", "| --- | --- | --- | ---: | --- | --- |"]
    for (kind, scenario, variant), r in lifecycle.items():
        if scenario == "R":
            figure = "%.2f s to the first 200" % r["value"]
            details = ("%d files, %.0f MB left; all sealed %.1f s after exec; %d records sealed, %d acknowledged: %s"
                       % (r["files"], r["left_mb"], r["sealed_s"], r["records_sealed"], r["records_acked"],
                          sealed_verdict(r)))
        elif scenario == "S":
            figure = "%.0f MB/s" % r["value"]
            details = ("%.0f MB in %d files finished in %.2f s, %d records (one core's SHA-256 here: %.0f MB/s)"
                       % (r["mb"], r["files"], r["seconds"], r["records"], r["sha256_mb_s"]))
        elif scenario == "G":
            figure = seconds_or_none(r["value"], options.first_200_deadline) + " to the first 200"
            details = "SIGTERM to exit: %s; %d finished files" % (seconds_or_none(r["stop_s"], STOP_DEADLINE),
                                                                  r["files"])
        elif scenario == "K":
            figure = "longest push %.0f ms" % r["value"]
            details = ("p99 %.0f ms over %d pushes from the kill on; %d refused, %d reset, %d other answers; "
                       "%d lost, %d doubled" % (r["p99_ms"], r["pushes"], r["refused"], r["reset"], r["other"],
                                                r["lost"], r["doubled"]))
        elif scenario == "U":
            figure = "longest gap %.2f s" % r["value"]
            details = ("%d refused, %d reset, %d other answers; %d lost, %d doubled, of %d pushes; the %s took %.1f s"
                       % (r["refused"], r["reset"], r["other"], r["lost"], r["doubled"], r["pushes"],
                          "upgrade" if variant == "USR2" else "restart", r["took_s"]))
        elif scenario == "H":
            figure = "p99 %.1f ms" % r["value"]
            details = ("p50 %.1f ms, max %.0f ms over %d pushes, %d errors; first 200 %.2f s after exec"
                       % (r["p50_ms"], r["max_ms"], r["requests"], r["errors"], r["first_200_s"]))
        else:
            figure = "p99 %.1f ms" % r["value"]
            details = ("p50 %.1f ms, max %.0f ms over %d pushes%s, %d errors; first 200 %.2f s after exec%s"
                       % (r["p50_ms"], r["max_ms"], r["requests"], " scheduled while the file was being finished"
                          if r["during_seal"] else " (whole load: %.0f s)" % r["load_s"], r["errors"],
                          r["first_200_s"], "; sealed %.1f s after exec" % r["sealed_s"] if variant == "seal" else ""))
        lines.append("| %s | %s | %s | %s | %s | %s |" % (kind, scenario, variant, figure, details, r["values"]))
    lines.append("")
    for (kind, scenario, variant), ours in lifecycle.items():
        base = lifecycle.get(("dsreceiver-baseline", scenario, variant))
        if kind != "dsreceiver" or base is None:
            continue
        if scenario == "R":
            lines.append("- **R %s against the baseline**: first 200 %.2f s vs %.2f s after exec: %.1fx sooner"
                         % (variant, ours["value"], base["value"], base["value"] / ours["value"]))
        elif scenario == "S":
            lines.append("- **S %s against the baseline**: %.0f vs %.0f MB/s: %.1fx%s"
                         % (variant, ours["value"], base["value"], ours["value"] / base["value"],
                            " (target: 1,000 MB/s)" if variant == "plain" else ""))
        elif scenario == "G":
            lines.append("- **G %s against the baseline**: first 200 %s vs %s after exec (target: within 1 s); "
                         "SIGTERM to exit %s vs %s" % (variant, seconds_or_none(ours["value"], options.first_200_deadline),
                                                       seconds_or_none(base["value"], options.first_200_deadline),
                                                       seconds_or_none(ours["stop_s"], STOP_DEADLINE),
                                                       seconds_or_none(base["stop_s"], STOP_DEADLINE)))
        elif scenario == "K":
            lines.append("- **K against the baseline**: longest push after the kill %.0f vs %.0f ms (target: within "
                         "1 s)" % (ours["value"], base["value"]))
        elif scenario == "U":
            lines.append("- **U restart against the baseline's**: %d refused and %d reset vs %d and %d; longest gap "
                         "%.2f vs %.2f s" % (ours["refused"], ours["reset"], base["refused"], base["reset"],
                                             ours["value"], base["value"]))
        elif scenario == "H":
            continue
        else:
            lines.append("- **P %s against the baseline**: p99 %.1f vs %.1f ms%s" % (
                variant, ours["value"], base["value"],
                "; the baseline finished the file before serving: first 200 %.1f s vs %.2f s after exec"
                % (base["first_200_s"], ours["first_200_s"]) if variant == "seal" and not base["during_seal"] else ""))
    for kind in ("dsreceiver", "dsreceiver-baseline"):
        aged, young = lifecycle.get((kind, "H", "aged")), lifecycle.get((kind, "H", "young"))
        if aged and young:
            lines.append("- **H %s**: p99 at 1,000,000 files %.1f ms / in a new folder %.1f ms = %.2fx (target: "
                         "within 1.5x)" % (kind, aged["value"], young["value"], aged["value"] / young["value"]))
        for variant in ("socket", "USR2"):
            upgrade = lifecycle.get((kind, "U", variant))
            if upgrade:
                lines.append("- **U %s %s**: %d refused, %d reset, %d lost, %d doubled (target: 0 each); longest gap "
                             "between 200s %.2f s" % (variant, kind, upgrade["refused"], upgrade["reset"],
                                                      upgrade["lost"], upgrade["doubled"], upgrade["value"]))
        seal, idle = lifecycle.get((kind, "P", "seal")), lifecycle.get((kind, "P", "idle"))
        if seal and idle:
            lines.append("- **P %s**: p99 with the seal %.1f ms / without %.1f ms = %.2fx (target: within 1.5x)%s"
                         % (kind, seal["value"], idle["value"], seal["value"] / idle["value"],
                            "" if seal["during_seal"] else "; no push overlapped the seal: it was done before the "
                            "first 200 (%.1f s after exec)" % seal["first_200_s"]))
    return lines


if __name__ == "__main__":
    sys.exit(main())
