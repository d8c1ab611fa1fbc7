"""make bench: dsreceiver (defaults) against the Flask how-to and nginx, same certificate, same load.

Each (server, scenario) pair runs on a fresh server; every request body is unique, and after each run the
stored lines are counted against what was acknowledged.  Writes the table to stdout and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import http.client
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
                 script: Path = ROOT / "dsreceiver.py") -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.output = workdir / "out"
        self.output.mkdir(parents=True)
        log = (workdir / "server.log").open("wb")
        if kind.startswith("dsreceiver"):
            command = [sys.executable, str(script), "--host", "127.0.0.1", "--port", str(self.port),
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
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir),
                                        env=environment)
        wait_for_port(self.port, self.process)

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15, help="length of each run (default: 15)")
    parser.add_argument("--scenarios", default="ABCDEF", help="which scenarios (default: ABCDEF)")
    parser.add_argument("--servers", default="dsreceiver,gunicorn,uvicorn,flask,nginx,dsreceiver-gzip",
                        help="which servers (default: dsreceiver,gunicorn,uvicorn,flask,nginx,dsreceiver-gzip)")
    parser.add_argument("--dsreceiver-args", default="", help="extra options for dsreceiver, e.g. '--workers 4'")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="report file")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="FILE",
                        help="also run this other dsreceiver.py (e.g. main's, from git show) as dsreceiver-baseline, "
                        "with the same options, and print the ratios")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each server per scenario, alternating their order; the median is reported "
                        "(default: 1)")
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
    for scenario in options.scenarios:
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
                script = options.baseline if kind == "dsreceiver-baseline" else ROOT / "dsreceiver.py"
                print("running %s %s (round %d) ..." % (kind, scenario, round_number + 1), flush=True)
                runs[kind].append(run_one(kind, scenario, workdir, cert, key, bodies, options.seconds,
                                          use_wrk, extra, options.poll_status, script))
                print("  " + json.dumps(runs[kind][-1]), flush=True)
        for kind, done in runs.items():
            results[(kind, scenario)] = median_run(done)
    report = render(results, facts, disk, inflate, options, use_wrk, bodies)
    print(report)
    previous = options.output.read_text() if options.output.exists() else ""
    kept = previous.split(MARKER, 1)[1] if MARKER in previous else "\n"
    options.output.write_text(report + "\n" + MARKER + kept)
    shutil.rmtree(str(workdir))
    return 0


def rate_of(result: Dict[str, object]) -> float:
    """Acknowledged requests a second."""
    return result["acknowledged"] / result["seconds"]  # type: ignore[operator]


def median_run(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """The run with the median rate (the lower middle one of an even count), with every run's rate."""
    chosen = dict(sorted(runs, key=rate_of)[(len(runs) - 1) // 2])
    chosen["rates"] = [round(rate_of(run), 1) for run in runs]
    return chosen


def stored_verdict(result: Dict[str, object], connections: int) -> str:
    """Compares stored lines with acknowledged batches; wrk stops with up to one request per connection
    in flight, which the server may still have stored and answered."""
    if result["stored_lines"] is None:
        return "n/a"
    per_batch = result["expected_lines"] // max(1, result["acknowledged"]) if result["acknowledged"] else 1  # type: ignore[operator]
    extra, remainder = divmod(result["stored_lines"] - result["expected_lines"], per_batch)  # type: ignore[operator]
    if extra == 0 and remainder == 0:
        return "exact"
    if remainder == 0 and 0 < extra <= connections:
        return "exact, +%d in flight at stop" % extra
    return "MISMATCH: %+d lines" % (result["stored_lines"] - result["expected_lines"])  # type: ignore[operator]


def render(results: Dict[Tuple[str, str], Dict[str, object]], facts: Dict[str, str], disk: float, inflate: float,
           options: argparse.Namespace, use_wrk: bool, bodies: Dict[str, Path]) -> str:
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
