"""Shared fixtures: a trustme CA, the real server as a subprocess over real TLS, raw TLS clients."""

from __future__ import annotations

import json
import os
import py_compile
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import pytest
import trustme
from cryptography import x509

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import dsreceiver  # noqa: E402
from simulator import Batch, DataStreamSimulator, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DSRECEIVER = ROOT / "dsreceiver.py"
LISTENING_RE = re.compile(r"listening on (https?)://(\S+):(\d+)")
T = TypeVar("T")


def wait_until(condition: Callable[[], Optional[T]], timeout: float = 15.0, what: str = "condition") -> T:
    """Polls `condition` until it returns something truthy, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.02)


def find_pythons() -> Dict[str, str]:
    """Finds CPython 3.8-3.13 interpreters on PATH and under pyenv: {"3.8": path, ...}."""
    found: Dict[str, str] = {}
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for minor in range(8, 14):
        version = "3.%d" % minor
        candidates = sorted(pyenv_root.glob("versions/%s.*/bin/python3" % version), reverse=True)
        on_path = shutil.which("python" + version)
        if on_path:
            candidates.append(Path(on_path))
        for candidate in candidates:
            try:
                out = subprocess.run([str(candidate), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0 and out.stdout.strip() == version:
                found[version] = str(candidate)
                break
    return found


def pytest_report_header(config: pytest.Config) -> str:
    pythons = find_pythons()
    listed = ", ".join("%s (%s)" % (version, pythons[version])
                       for version in sorted(pythons, key=lambda v: int(v.split(".")[1]))) or "none"
    return "CPython interpreters found for compatibility tests: " + listed


@pytest.fixture(scope="session", autouse=True)
def compiled_once() -> None:
    """Writes dsreceiver.py's bytecode cache, even where PYTHONDONTWRITEBYTECODE is set, so that servers
    started with -m load it."""
    py_compile.compile(str(DSRECEIVER), doraise=True)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """The test CA that issues every certificate."""
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_dir(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certbot-style folder (fullchain.pem, privkey.pem) with a server certificate for the loopback names."""
    folder = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
    cert.private_key_pem.write_to_path(str(folder / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "fullchain.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(folder / "fullchain.pem"), append=True)
    return folder


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA, as DataStream does with an uploaded CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


class ServerProcess:
    """The real dsreceiver running as a subprocess, its log captured to a file."""

    def __init__(self, workdir: Path, args: Sequence[str], env: Dict[str, str], python: str,
                 client_context: Optional[ssl.SSLContext], script: Path = DSRECEIVER,
                 nofile: Optional[Tuple[int, int]] = None, pass_fds: Sequence[int] = ()) -> None:
        self.workdir = workdir
        # Descriptors it inherits (a listening socket that outlives it, as systemd's does).
        self.pass_fds = tuple(pass_fds)
        # The (soft, hard) open-file limit it starts with, as a shell's `ulimit -n` would set it.
        self.nofile = nofile
        self.script = script
        self.args = list(args)
        self.env = env
        self.python = python
        self.client_context = client_context
        self.log_path = workdir / "server.log"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.scheme = "https"
        self.log_offset = 0

    @property
    def output_dir(self) -> Path:
        """The --output-dir the server was given (or its default under the workdir)."""
        if "--output-dir" in self.args:
            return Path(self.args[self.args.index("--output-dir") + 1])
        return self.workdir / "data"

    def start(self, wait: bool = True, timeout: float = 30.0) -> ServerProcess:
        """Starts the server; with `wait`, returns once it logs its listening line."""
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            # Its own process group: teardown can end workers along with their supervisor.
            self.process = subprocess.Popen(self.command() + self.args, cwd=str(self.workdir),
                                            env=self.env, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=self._limit_files if self.nofile else None,
                                            pass_fds=self.pass_fds)
        if wait:
            match = self.wait_for_log(LISTENING_RE, timeout=timeout)
            self.scheme, self.port = match.group(1), int(match.group(3))
        return self

    def _limit_files(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def command(self) -> List[str]:
        """How the server is started: `python dsreceiver.py`, or, under the tests' own interpreter, the same
        module run with -m, which loads the bytecode compiled once per session (see compiled_once) instead of
        compiling 5,000 lines for every server the suite starts."""
        if self.script == DSRECEIVER and self.python == sys.executable:
            self.env = dict(self.env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                            self.env.get("PYTHONPATH")])))
            return [self.python, "-m", "dsreceiver"]
        return [self.python, str(self.script)]

    def log_text(self) -> str:
        """Everything the current run has logged so far."""
        with self.log_path.open("rb") as handle:
            handle.seek(self.log_offset)
            return handle.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 15.0, count: int = 1) -> re.Match[str]:
        """Waits until the log matches `pattern` at least `count` times; returns the last match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def matched() -> Optional[re.Match[str]]:
            matches = list(regex.finditer(self.log_text()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError("server exited (%s) before logging %r:\n%s"
                                     % (self.process.returncode, regex.pattern, self.log_text()))
            return None

        return wait_until(matched, timeout, "log line %r" % regex.pattern)

    def send_signal(self, signum: int) -> None:
        """Sends a signal to the server process."""
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Waits for the process to exit and returns its exit code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stops the server with `signum` (SIGKILL after `timeout`) and returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def data_files(self, folder: Optional[Path] = None) -> List[Path]:
        """Every record file (non-dot, regular) under the output folder."""
        root = folder or self.output_dir
        if not root.exists():
            return []
        return sorted(path for path in root.rglob("*") if path.is_file()
                      and not any(part.startswith(".") for part in path.relative_to(root).parts))

    def stored_bytes(self, folder: Optional[Path] = None) -> bytes:
        """The concatenated content of every record file."""
        return b"".join(path.read_bytes() for path in self.data_files(folder))

    def stored_lines(self, folder: Optional[Path] = None) -> List[bytes]:
        """Every stored record line (without its LF)."""
        data = self.stored_bytes(folder)
        assert not data or data.endswith(b"\n"), "a data file does not end with a complete line"
        return data.split(b"\n")[:-1] if data else []

    def simulator(self, **kwargs: Any) -> DataStreamSimulator:
        """A DataStream simulator pointed at this server."""
        context = self.client_context if self.scheme == "https" else None
        return DataStreamSimulator("127.0.0.1", self.port, context, **kwargs)

    def tls_connect(self, context: Optional[ssl.SSLContext] = None, timeout: float = 15.0) -> socket.socket:
        """Opens a raw, verified TLS connection to the server."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.scheme == "http":
            return raw
        context = context or self.client_context
        assert context is not None, "an https server has a client context"
        return context.wrap_socket(raw, server_hostname="127.0.0.1")

    def exchange(self, data: bytes, timeout: float = 15.0) -> bytes:
        """Sends raw bytes on a new connection and returns everything received until the server closes."""
        with self.tls_connect(timeout=timeout) as sock:
            sock.sendall(data)
            return read_until_close(sock)


def read_until_close(sock: socket.socket) -> bytes:
    """Reads until the peer closes (or resets) the connection."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return received
        if not chunk:
            return received
        received += chunk


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert match, "not an HTTP response: %r" % response[:200]
    return int(match.group(1))


@pytest.fixture
def start_server(tmp_path: Path, cert_dir: Path, client_context: ssl.SSLContext
                 ) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(*args, env=, python=, tls=, wait=, workdir=, output_dir=, host=, script=, nofile=,
    pass_fds=) -> ServerProcess."""
    started: List[ServerProcess] = []

    def start(*args: str, env: Optional[Dict[str, str]] = None, python: str = sys.executable, tls: bool = True,
              wait: bool = True, workdir: Optional[Path] = None, output_dir: Optional[Path] = None,
              host: Optional[str] = "127.0.0.1", script: Path = DSRECEIVER,
              nofile: Optional[Tuple[int, int]] = None, pass_fds: Sequence[int] = ()) -> ServerProcess:
        folder = workdir or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        # One process unless a test asks for workers: file names and order stay predictable.
        base = (["--host", host] if host else []) + ["--port", "0"] + ([] if "--workers" in args else ["--workers", "1"])
        if "--output-dir" not in args:
            base += ["--output-dir", str(output_dir or folder / "data")]
        if tls and "--http" not in args and "--cert" not in args and "--certs-dir" not in args:
            base += ["--cert", str(cert_dir / "fullchain.pem"), "--key", str(cert_dir / "privkey.pem")]
        full_env = {key: value for key, value in os.environ.items() if not key.startswith("DSRECEIVER_")}
        full_env.update(env or {})
        server = ServerProcess(folder, base + list(args), full_env, python, client_context, script, nofile, pass_fds)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        if server.process is not None:
            try:
                os.killpg(server.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.process.wait()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def serial_seen(server: ServerProcess) -> int:
    """The serial number of the certificate a new connection is shown."""
    with server.tls_connect() as sock:
        assert isinstance(sock, ssl.SSLSocket)
        return int(str((sock.getpeercert() or {})["serialNumber"]), 16)


def install_pair(ca: trustme.CA, folder: Path) -> int:
    """Writes a new certificate and key the way certbot renews: new files, then the live names point at them."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    archive = folder / "archive"
    archive.mkdir(exist_ok=True)
    number = len(list(archive.glob("cert*.pem"))) + 1
    cert.cert_chain_pems[0].write_to_path(str(archive / ("cert%d.pem" % number)))
    cert.private_key_pem.write_to_path(str(archive / ("privkey%d.pem" % number)))
    for live, target in (("fullchain.pem", "cert%d.pem" % number), ("privkey.pem", "privkey%d.pem" % number)):
        temp = folder / (live + ".new")
        temp.symlink_to(archive / target)
        os.replace(str(temp), str(folder / live))
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def mounted(mount_point: Path, what: str, *mount_args: str) -> Iterator[Path]:
    """Mounts something on a fresh folder for one test (skipped with the reason without root), then unmounts it."""
    if os.geteuid() != 0:
        pytest.skip("mounting %s needs root (CI runs as root)" % what)
    mount_point.mkdir()
    result = subprocess.run(["mount", *mount_args, str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("cannot mount %s here: %s" % (what, result.stderr.strip()))
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, to fill."""
    yield from mounted(tmp_path / "small", "a small tmpfs", "-t", "tmpfs", "-o", "size=256k", "tmpfs")


@pytest.fixture
def bind_mounted_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder bind-mounted onto itself, so a test can remount it read-only and writable again."""
    folder = tmp_path / "bound"
    yield from mounted(folder, "a bind mount", "--bind", str(tmp_path / "bound"))


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A running server with default settings (no authentication)."""
    return start_server()


def batch_of(*lines: bytes) -> dsreceiver.RecordBatch:
    """A RecordBatch of these records, as the builder makes it."""
    data = b"".join(line + b"\n" for line in lines)
    return dsreceiver.RecordBatch([data], None, len(data), len(lines))


def open_storage(root: Path, rotate: str = "hourly", clock: Callable[[], float] = time.time,
                 dedupe_window: float = 0.0, store_gzip: bool = False, **options: Any) -> dsreceiver.Storage:
    """A Storage over `root` after the start-up steps main() runs: folders, crash recovery, dedupe refill."""
    layout = dsreceiver.Layout(root, rotate, store_gzip=store_gzip)
    dedupe = dsreceiver.prepare_output(layout, dedupe_window, clock)
    return dsreceiver.Storage(layout, dedupe=dedupe, clock=clock, **options)


def die(storage: dsreceiver.Storage) -> None:
    """What the kernel does for a process that dies (killed, crashed) with this storage: its run's lock is let
    go, and nothing is closed or synced, nor its run ended."""
    os.close(storage.journal.lock_fd)
    storage.journal.lock_fd = -1


def push_concurrently(server: ServerProcess, batches: Sequence[Batch], chunked_every: int = 0) -> List[int]:
    """Pushes every batch at once, each from its own thread on its own connection (every `chunked_every`-th one
    chunked); returns the statuses in order."""
    statuses: List[int] = [0] * len(batches)

    def push(index: int) -> None:
        with server.simulator() as ds:
            statuses[index] = ds.push(batches[index], chunked=bool(chunked_every) and index % chunked_every == 0).status

    threads = [threading.Thread(target=push, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@contextmanager
def push_held_after_continue(server: ServerProcess, body_size: int) -> Iterator[socket.socket]:
    """A push whose head was sent with Expect: 100-continue and answered 100 Continue: the server is serving it
    (its body size reserved) while the caller holds back the body."""
    with server.tls_connect() as sock:
        sock.sendall(b"POST /ds HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                     % body_size)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        yield sock


# -- /metrics -------------------------------------------------------------------

Sample = Tuple[str, Dict[str, str], float]
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Tuple[List[Sample], Dict[str, str]]:
    """A small parser of the Prometheus text format (0.0.4): samples, and the TYPE of each family."""
    samples: List[Sample] = []
    types: Dict[str, str] = {}
    helped = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name in helped, "TYPE before HELP for " + name
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE_RE.match(line)
            assert match, "malformed sample line: %r" % line
            labels = dict(LABEL_RE.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    for name, _, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, "sample without TYPE: " + name
        assert name.startswith("dsreceiver_")
    return samples, types


def value(samples: List[Sample], name: str, **labels: str) -> float:
    """The value of the sample `name` with these labels."""
    for sample_name, sample_labels, number in samples:
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return number
    raise AssertionError("no sample %s %s" % (name, labels))


def scrape(server: ServerProcess, headers: Optional[Dict[str, str]] = None) -> List[Sample]:
    """GETs /metrics (with these headers) and parses it, checking the answer is a valid exposition."""
    with server.simulator() as ds:
        response = ds.request("GET", path="/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(response.body.decode())[0]


def run_command(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0
                ) -> subprocess.CompletedProcess[str]:
    """Runs `python3 dsreceiver.py ARGS...` (a command such as ledger or reconcile) to its end."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "dsreceiver", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def ledger_totals(*roots: Path, since: str = "2h", until: str = "0m") -> Dict[str, Dict[str, Any]]:
    """`dsreceiver.py ledger --json` over these output folders, added up per routed stream (ROUTE/ID, or
    the ID alone without a route)."""
    folders = [arg for root in roots for arg in ("--output-dir", str(root))]
    done = run_command("ledger", "--json", "--since", since, "--until", until, *folders)
    assert done.returncode == 0, done.stderr
    totals: Dict[str, Dict[str, Any]] = {}
    for line in done.stdout.splitlines():
        row = json.loads(line)
        label = row["route"] + "/" + row["stream"] if row["route"] else row["stream"]
        total = totals.setdefault(label, {"records": 0, "batches": 0, "bytes": 0, "duplicates": 0,
                                                  "refused": {}})
        for key in ("records", "batches", "bytes", "duplicates"):
            total[key] += row[key]
        for status, number in row["refused"].items():
            total["refused"][status] = total["refused"].get(status, 0) + number
    return totals


class HeldSync:
    """os.fdatasync held shut from now until release(): a slow disk, as a group commit sees it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.released = threading.Event(), threading.Event()
        self.calls: List[int] = []
        real_fdatasync = os.fdatasync

        def fdatasync(fd: int) -> None:
            self.calls.append(fd)
            if not self.released.is_set():
                self.started.set()
                self.released.wait(30)
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def wait_started(self) -> None:
        """Returns once a push is inside fdatasync, held."""
        assert self.started.wait(30), "no fdatasync began"

    def release(self) -> None:
        """Lets every fdatasync through from now on."""
        self.released.set()


# nginx's stream module, which the scale-out recipe needs (Debian: libnginx-mod-stream).
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def start_nginx(tmp_path: Path, ports: Sequence[int]) -> Tuple[subprocess.Popen[bytes], int]:
    """nginx running contrib/nginx-stream.conf, its ports and paths adapted, in front of these instances."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None or not STREAM_MODULE.exists():
        pytest.skip("nginx with the stream module is not installed (.ci/run installs it)")
    port = free_port()
    conf = (ROOT / "contrib" / "nginx-stream.conf").read_text()
    conf = conf.replace("server 127.0.0.1:8444;", "server 127.0.0.1:%d;" % ports[0])
    conf = conf.replace("server 127.0.0.1:8445;", "server 127.0.0.1:%d;" % ports[1])
    conf = conf.replace("listen 443;", "listen 127.0.0.1:%d;" % port)
    conf = "pid %s;\nerror_log %s;\n" % (tmp_path / "nginx.pid", tmp_path / "nginx-error.log") + conf
    (tmp_path / "nginx.conf").write_text(conf)
    process = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, what="nginx to listen")
    return process, port
