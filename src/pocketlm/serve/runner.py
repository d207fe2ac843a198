"""Running the app under uvicorn: in the foreground (`pocketlm serve`) or on a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..errors import PocketLMError
from .app import Limits


def uvicorn_config(app, limits: Limits, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Frames larger than a valid `open` are refused by uvicorn (close 1009) before any parsing; no access log,
    no per-message compression (full-vocabulary scores do not compress, and it costs CPU per token)."""
    return uvicorn.Config(app, host=host, port=port, ws="websockets", ws_max_size=limits.max_message_bytes(),
                          ws_per_message_deflate=False, access_log=False, log_level=log_level,
                          lifespan="on", timeout_graceful_shutdown=5)


class ServerThread:
    """uvicorn on a daemon thread, on a port bound before start (0 = a free one). `url` once started."""

    def __init__(self, app, limits: Limits, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, limits, host, self.port))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="pocketlm-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PocketLMError(f"step server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self if self.server.started else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
