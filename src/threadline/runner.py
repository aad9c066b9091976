"""The runner: starts every process of a topology on this machine, health-gated, and stops them."""

import contextlib
import errno
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO

from threadline.platform.nats_server import EmbeddedNats, EmbeddedNatsError
from threadline.platform.processes import die_with_parent
from threadline.platform.settings import Settings
from threadline.topology import GATEWAY, Topology

__all__ = [
    "DATA_FORMAT",
    "MARKER_FILE",
    "CommandFactory",
    "NatsServer",
    "ProcessSpec",
    "Runner",
    "RunnerError",
    "RunningProcess",
    "StartError",
    "StartInterrupted",
    "check_port_free",
    "free_ports",
    "plan",
    "prepare_data_dir",
    "run",
    "running",
    "serve_command",
    "service_urls",
]

DATA_FORMAT = 1
MARKER_FILE = "threadline.json"
_LOOPBACK = "127.0.0.1"
_OUTGOING_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_OUTGOING_PORTS_START = 32768
_LOWEST_CHOSEN_PORT = 10_000
_MIN_CHOICE = 1_000
_CHOICE_ATTEMPTS = 200
_LOG_TAIL_LINES = 20
_POLL_SECONDS = 0.1


class RunnerError(Exception):
    """A problem the user can act on; its message is complete and printed without a traceback."""

    exit_code = 2


class StartError(RunnerError):
    """A process (or NATS) failed to start or to become ready; everything started was stopped."""

    exit_code = 1


class StartInterrupted(RunnerError):
    """A stop was requested while starting; everything started was stopped."""

    exit_code = 130


@dataclass(frozen=True)
class ProcessSpec:
    """One OS process of a topology: its name, the components it runs and where it listens."""

    name: str
    components: tuple[str, ...]
    host: str
    port: int
    url: str


CommandFactory = Callable[[ProcessSpec], list[str]]


class NatsServer(Protocol):
    """What the runner needs of an embedded NATS server."""

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def serve_command(spec: ProcessSpec) -> list[str]:
    """The command line of one process; it names the process so `ps` and `top` show which is which."""
    return [sys.executable, "-m", "threadline", "serve", spec.name, "--port", str(spec.port)]


def _url_host(host: str) -> str:
    """The host to reach a listener bound to `host`, as written in a URL."""
    if host in ("", "0.0.0.0"):
        return _LOOPBACK
    if host == "::":
        return "[::1]"
    if ":" in host:
        return f"[{host}]"
    return host


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` now, below the range the OS gives outgoing connections.

    A port from that range (which binding port 0 picks from) can be taken by a connection any
    process opens before the server that was given it binds it: a test run once lost a
    gateway's port that way. A port below it can only be taken by another listener.
    """
    if count < 1:
        return []
    low = _outgoing_ports_start()
    if low - _LOWEST_CHOSEN_PORT < _MIN_CHOICE:
        return _ports_from_the_os(host, count)
    chooser = random.Random()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(_CHOICE_ATTEMPTS):
            candidate = chooser.randrange(_LOWEST_CHOSEN_PORT, low)
            if candidate in ports:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, candidate))
            except OSError:
                sock.close()
                continue
            stack.enter_context(sock)
            ports.append(candidate)
            if len(ports) == count:
                return ports
    raise RunnerError(f"found no {count} free ports on {host} below {low}; pass --port, or free some")


def _ports_from_the_os(host: str, count: int) -> list[int]:
    """`count` distinct ports the OS picks as free on `host` (the sockets are held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _outgoing_ports_start() -> int:
    """The lowest port the OS gives outgoing connections (Linux's default where it cannot tell)."""
    try:
        return int(_OUTGOING_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _LINUX_OUTGOING_PORTS_START


def plan(topology: Topology, settings: Settings) -> list[ProcessSpec]:
    """One spec per process: gateway on settings.host:port (0: any free), others on free loopback ports."""
    others = [group for group in topology.processes if GATEWAY not in group]
    free = iter(free_ports(_LOOPBACK, len(others) + (settings.port == 0)))
    specs = []
    for group in topology.processes:
        if GATEWAY in group:
            host = settings.host
            port = settings.port or next(free)
        else:
            host, port = _LOOPBACK, next(free)
        url = f"http://{_url_host(host)}:{port}"
        specs.append(ProcessSpec(Topology.process_name(group), group, host, port, url))
    return specs


def service_urls(specs: list[ProcessSpec]) -> dict[str, str]:
    """Component name (every service, and the gateway) -> base URL of the process that runs it."""
    return {component: spec.url for spec in specs for component in spec.components}


def check_port_free(host: str, port: int) -> None:
    """Raise RunnerError unless something could listen on `host:port` now."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RunnerError(f"cannot resolve host {host!r}: {e.strerror} — pass another --host") from e
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # The same option uvicorn sets, so a port left in TIME_WAIT by a previous run is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RunnerError(
                    f"port {port} on {host} is in use — stop what uses it or pass --port"
                ) from e
            raise RunnerError(
                f"cannot listen on port {port} on {host}: {e.strerror} — pass another --host or --port"
            ) from e


def prepare_data_dir(path: Path) -> Path:
    """Create the data directory and its marker when missing; raise RunnerError if it is unusable.

    Returns the absolute path, so every process sees the same directory whatever its working one.
    """
    path = path.expanduser().absolute()
    hint = "move it away or pass another --data-dir"
    if path.exists() and not path.is_dir():
        raise RunnerError(f"data directory {path} exists but is not a directory — {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunnerError(
            f"cannot create data directory {path}: {e.strerror} — "
            "create it yourself or pass another --data-dir"
        ) from e
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RunnerError(
            f"data directory {path} is not writable: {e.strerror} — "
            "fix its permissions or pass another --data-dir"
        ) from e
    marker = path / MARKER_FILE
    if marker.exists() or marker.is_symlink():
        problem = _marker_problem(marker)
        if problem:
            raise RunnerError(f"data directory {path} looks corrupt: {marker} {problem} — {hint}")
    else:
        tmp = marker.with_name(f".{MARKER_FILE}.tmp")
        tmp.write_text(json.dumps({"format": DATA_FORMAT}) + "\n", encoding="utf-8")
        tmp.replace(marker)
    (path / "logs").mkdir(exist_ok=True)
    return path


def _marker_problem(marker: Path) -> str | None:
    """What is wrong with an existing marker file, or None."""
    try:
        content: Any = json.loads(marker.read_text(encoding="utf-8"))
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "is not valid JSON"
    if not isinstance(content, dict) or "format" not in content:
        return "has no data format"
    if content["format"] != DATA_FORMAT:
        return (
            f"has data format {content['format']!r}, which this version (format {DATA_FORMAT}) does not know"
        )
    return None


def _check_nats_reachable(nats_url: str) -> None:
    """Raise RunnerError unless some server of a (comma-separated) NATS URL accepts connections."""
    for server in nats_url.split(","):
        parsed = urllib.parse.urlsplit(server.strip() if "://" in server else f"nats://{server}")
        with contextlib.suppress(OSError, ValueError):
            socket.create_connection((parsed.hostname or _LOOPBACK, parsed.port or 4222), 2).close()
            return
    raise RunnerError(
        f"NATS at {nats_url} does not accept connections — start it, or leave out --nats-url "
        "to use an embedded one"
    )


def _tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines written to a log file after `offset`."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _say(out: TextIO, text: str) -> None:
    """Print a line, degrading symbols a terminal's encoding cannot show rather than failing."""
    try:
        out.write(text + "\n")
    except UnicodeEncodeError:
        encoding = getattr(out, "encoding", None) or "ascii"
        out.write(text.encode(encoding, "replace").decode(encoding) + "\n")
    out.flush()


@dataclass
class RunningProcess:
    """A spawned process of the topology and what the runner knows about it."""

    spec: ProcessSpec
    popen: "subprocess.Popen[bytes]"
    log_path: Path
    log_offset: int
    started_at: float
    state: str = "starting"
    ready_after: float | None = field(default=None)

    @property
    def pid(self) -> int:
        """The OS process id."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.popen.poll() is None


class Runner:
    """Starts a topology's processes (and NATS when they need one) and stops them all.

    Use `start()`/`stop()`, the `running(...)` context manager, or `run(...)` for the CLI's
    blocking, signal-handling loop.
    """

    def __init__(
        self,
        topology: Topology,
        settings: Settings,
        *,
        command: CommandFactory = serve_command,
        nats_factory: Callable[[Path], NatsServer] = EmbeddedNats,
        out: TextIO | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.topology = topology
        self.settings = settings
        self._command = command
        self._nats_factory = nats_factory
        self._out = out if out is not None else sys.stdout
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self.data_dir = settings.data_dir.expanduser().absolute()
        self.specs: list[ProcessSpec] = []
        self.processes: list[RunningProcess] = []
        self.nats: NatsServer | None = None
        self.nats_url: str | None = None
        self._stop_requested = False
        self._stopping = False
        self._force = False

    @property
    def logs_dir(self) -> Path:
        """Where each process's log file is."""
        return self.data_dir / "logs"

    @property
    def gateway_url(self) -> str:
        """The base URL of the gateway (known once started)."""
        return next(s.url for s in self.specs if GATEWAY in s.components)

    def request_stop(self) -> None:
        """Ask a start or `watch()` in progress to stop; a second request kills without waiting.

        Only sets flags, so it is safe to call from a signal handler.
        """
        if self._stop_requested:
            self._force = True
        self._stop_requested = True

    def start(self) -> None:
        """Check the ground, start NATS if needed, spawn every process and wait until all are ready.

        Raises RunnerError (nothing started), StartError or StartInterrupted (all stopped again).
        """
        self.data_dir = prepare_data_dir(self.settings.data_dir)
        self.specs = plan(self.topology, self.settings)
        gateway = next(s for s in self.specs if GATEWAY in s.components)
        if self.settings.port:
            check_port_free(gateway.host, gateway.port)
        multi_process = not self.topology.single_process
        if multi_process and self.settings.nats_url:
            _check_nats_reachable(self.settings.nats_url)
        self.say(f"Starting topology {self.topology.name}: {len(self.specs)} process(es)")
        try:
            if multi_process:
                self._start_nats()
            for spec in self.specs:
                self._spawn(spec)
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _start_nats(self) -> None:
        if self.settings.nats_url:
            self.nats_url = self.settings.nats_url
            self.say(f"  using NATS at {self.nats_url}")
            return
        nats = self._nats_factory(self.data_dir / "nats")
        self.say("  starting NATS …")
        began = time.monotonic()
        try:
            nats.start()
        except (EmbeddedNatsError, OSError) as e:
            raise StartError(f"the embedded NATS server did not start: {e}") from e
        self.nats, self.nats_url = nats, nats.url
        self.say(f"  ✓ NATS ready (pid {nats.pid}, {nats.url}) {time.monotonic() - began:.1f}s")

    def _child_env(self, spec: ProcessSpec) -> dict[str, str]:
        child = self.settings.model_copy(
            update={
                "data_dir": self.data_dir,
                "topology": self.topology.name,
                "service_urls": service_urls(self.specs),
                "host": spec.host,
                "port": spec.port,
                "nats_url": self.nats_url,
            }
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
        env.update(child.as_environment(), PYTHONUNBUFFERED="1")
        return env

    def _spawn(self, spec: ProcessSpec) -> None:
        log_path = self.logs_dir / f"{spec.name}.log"
        with log_path.open("ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                self._command(spec),
                env=self._child_env(spec),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self.processes.append(RunningProcess(spec, popen, log_path, offset, started_at=time.monotonic()))
        self.say(f"  … {spec.name} starting (pid {popen.pid}, {spec.url})")

    def _wait_until_ready(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self._ready_timeout
        pending = list(self.processes)
        while pending:
            if self._stop_requested:
                raise StartInterrupted("interrupted while starting; everything started was stopped")
            for proc in list(pending):
                if not proc.alive:
                    proc.state = f"exited ({proc.popen.returncode})"
                    raise StartError(
                        f"{proc.spec.name} exited with code {proc.popen.returncode} before it was "
                        f"ready; last lines of {proc.log_path}:\n"
                        f"{_tail(proc.log_path, proc.log_offset)}"
                    )
                if _is_ready(opener, proc.spec.url):
                    proc.state = "ready"
                    proc.ready_after = time.monotonic() - proc.started_at
                    pending.remove(proc)
                    self.say(
                        f"  ✓ {proc.spec.name} ready (pid {proc.pid}, {proc.spec.url}) "
                        f"{proc.ready_after:.1f}s"
                    )
            if pending and time.monotonic() > deadline:
                proc = pending[0]
                raise StartError(
                    f"{proc.spec.name} was not ready after {self._ready_timeout:g}s "
                    f"({proc.spec.url}/readyz); if its log shows it migrating a large database, "
                    f"give it longer with `threadline up --ready-timeout`; last lines of {proc.log_path}:\n"
                    f"{_tail(proc.log_path, proc.log_offset)}"
                )
            if pending:
                time.sleep(_POLL_SECONDS)

    def check(self) -> list[RunningProcess]:
        """Report processes that exited since the last check (the others keep running)."""
        died = []
        for proc in self.processes:
            if proc.state in ("ready", "starting") and not proc.alive:
                proc.state = f"exited ({proc.popen.returncode})"
                died.append(proc)
                self.say(
                    f"  ! {proc.spec.name} (pid {proc.pid}) exited with code "
                    f"{proc.popen.returncode}; the others keep running — see {proc.log_path}"
                )
        return died

    def watch(self, poll_seconds: float = 0.5) -> bool:
        """Block until a stop is requested (True) or every process has exited (False)."""
        while not self._stop_requested:
            self.check()
            if self.processes and not any(p.alive for p in self.processes):
                self.say("  every process has exited; stopping")
                return False
            time.sleep(poll_seconds)
        return True

    def stop(self) -> None:
        """SIGTERM every process, SIGKILL those still alive after the stop timeout, then stop NATS."""
        if self._stopping:
            return
        self._stopping = True
        alive = [p for p in self.processes if p.alive]
        if alive or self.nats:
            self.say("Stopping … (press Ctrl-C again to kill at once)")
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        for proc in alive:
            while proc.alive and time.monotonic() < deadline and not self._force:
                time.sleep(_POLL_SECONDS)
            if proc.alive:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
                proc.state = "killed"
                self.say(f"  ■ {proc.spec.name} killed (pid {proc.pid}, did not stop in time)")
            else:
                proc.state = "stopped"
                code = proc.popen.returncode
                # uvicorn re-raises the SIGTERM it handled, so -SIGTERM is a clean stop too.
                unusual = "" if code in (0, -signal.SIGTERM) else f", exit code {code}"
                self.say(f"  ■ {proc.spec.name} stopped (pid {proc.pid}{unusual})")
        for proc in self.processes:
            proc.popen.poll()
        if self.nats is not None:
            nats, self.nats = self.nats, None
            pid = nats.pid
            nats.stop()
            self.say(f"  ■ NATS stopped (pid {pid})")

    def status_table(self) -> str:
        """The table of processes (name, pid, URL, state) and where NATS, data and logs are."""
        rows = [("PROCESS", "PID", "URL", "STATE")]
        rows += [(p.spec.name, str(p.pid), p.spec.url, p.state) for p in self.processes]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
            for row in rows
        ]
        if self.nats is not None:
            nats = f"{self.nats.url} (embedded, pid {self.nats.pid}, log {self.nats.log_path})"
        elif self.nats_url:
            nats = f"{self.nats_url} (external)"
        else:
            nats = "none — in-process events"
        lines += [
            "",
            f"  NATS:  {nats}",
            f"  Data:  {self.data_dir}",
            f"  Logs:  {self.logs_dir}",
            "",
            f"Gateway: {self.gateway_url} — press Ctrl-C to stop",
        ]
        return "\n".join(lines)

    def say(self, text: str) -> None:
        """Print one line of progress to the runner's output."""
        _say(self._out, text)


def _is_ready(opener: urllib.request.OpenerDirector, url: str) -> bool:
    try:
        with opener.open(f"{url}/readyz", timeout=1.0) as response:
            return int(response.status) == 200
    except (OSError, ValueError, http.client.HTTPException):
        return False


@contextlib.contextmanager
def running(topology: Topology, settings: Settings, **options: Any) -> Iterator[Runner]:
    """Start a topology for the duration of a `with` block (options as for `Runner`)."""
    runner = Runner(topology, settings, **options)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run(runner: Runner) -> int:
    """Start, show the status table, run until SIGINT/SIGTERM/SIGHUP, stop; the exit code.

    RunnerError propagates (after everything started is stopped) for the caller to print.
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:
        runner.request_stop()

    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        runner.start()
        runner.say("")
        runner.say(runner.status_table())
        stopped_on_request = runner.watch()
        runner.stop()
        return 0 if stopped_on_request else 1
    finally:
        runner.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
