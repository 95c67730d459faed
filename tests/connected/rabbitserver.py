"""A private RabbitMQ node on its own ports and temp dir, for tests that stop or restart the broker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RabbitServer:
    """`rabbitmq-server` as node `pipeline-test-<id>@localhost`; `stop_app`/`start_app` take it down and up."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.node = f"pipeline-test-{uuid.uuid4().hex[:8]}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="rabbit-test-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
        }

    def start(self, timeout: float = 90) -> None:
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("rabbitmq-server is not installed")
        (self.dir / "plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        if _user_exists("rabbitmq"):  # the server drops root and runs as `rabbitmq`
            for path in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait(up=True, timeout=timeout)

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args], env=self._env(), check=True, capture_output=True, timeout=60
        )

    def _wait(self, *, up: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _answers(self.port) != up:
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} not {'up' if up else 'down'} within {timeout}s")
            time.sleep(0.2)

    def stop_app(self) -> None:
        """Stop the broker (connections drop, the port closes); the node and its data stay."""
        self._ctl("stop_app")
        self._wait(up=False, timeout=30)

    def start_app(self) -> None:
        """Start the broker again on the same port with the same durable state."""
        self._ctl("start_app")
        self._wait(up=True, timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._ctl("stop")
            except (subprocess.SubprocessError, OSError):
                self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
