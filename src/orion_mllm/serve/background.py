"""Run an app with uvicorn in a background thread on a free loopback port (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """``BackgroundServer(app)`` serves at ``.url`` until ``.stop()``."""

    def __init__(
        self, app, *, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 30
    ) -> None:
        self.port = port or free_port(host)
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"server on {host}:{self.port} did not start")
            time.sleep(0.05)
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
