"""A real ``mlflow server`` on 127.0.0.1 for the tests, started and killed for real."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "MlflowServer":
        mlflow = Path(sys.executable).parent / "mlflow"
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=open(self.root / "server.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill() takes its workers too
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start in time")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class Proxy:
    """A TCP proxy in front of a server, for a network that is slow or drops connections:
    each request a client sends waits ``delay`` s; ``drop(n)`` closes the connections open now
    and the next ``n`` ones as soon as they are accepted (the client sees the connection
    dropped, not refused)."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.target, self.delay, self._drops = port, delay, 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self, n: int) -> None:
        with self._lock:
            self._drops = n
            for s in self._open:
                _close(s)
            self._open.clear()

    def close(self) -> None:
        self.drop(0)
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._drops:
                    self._drops -= 1
                    _close(client)
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self._open += [client, upstream]
            threading.Thread(
                target=self._pump, args=(client, upstream, self.delay), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while chunk := src.recv(1 << 20):
                if delay and chunk[:5] in (b"GET /", b"POST ", b"PATCH", b"DELET"):
                    time.sleep(delay)  # a request begins (in practice, a chunk's start)
                dst.sendall(chunk)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
