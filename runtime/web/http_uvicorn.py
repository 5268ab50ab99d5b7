"""uvicorn (its h11 HTTP/1.1 implementation) serving the station on a named background thread.

Two things differ from a stock uvicorn, both so that a malformed request gets a clear answer:

* A request h11 refuses outright (a negative or non-decimal ``Content-Length``, two different
  ones, a broken request line) is answered 400 with the station's JSON error and security
  headers, and ``Connection: close``, instead of uvicorn's plain-text answer.
* A client that half-closes its side before sending the whole body still gets the answer ("body
  ended after 13 of 100 bytes"): uvicorn would otherwise close the socket on end-of-file and the
  client would see only a reset.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from anomalygpt_edge.runtime.web.http_base import SECURITY_HEADERS

log = logging.getLogger(__name__)

SERVER_NAME = "AnomalyGPT-Edge-Station"
KEEP_ALIVE_S = 30  # idle keep-alive connections close after this long
STARTUP_S = 10.0
SHUTDOWN_S = 3  # requests still running when the server stops get this long to finish


class StationH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the station's answer to malformed requests (see the module doc)."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()),
        ]
        try:
            self.transport.write(
                self.conn.send(h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]))
            )
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # an answer was already under way: nothing more can be said
            pass
        self.transport.close()

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol's own type
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None  # idle connection: close it
        # The client will send nothing more: end the body where it stopped (the app compares it
        # with Content-Length) and keep our side open for the answer, which closes the connection.
        cycle.more_body = False
        cycle.message_event.set()
        return True


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket; ``OSError`` when the address is taken (uvicorn's own
    ``bind_socket`` would exit the process instead). Listening at once: a client that connects
    before the event loop runs waits in the backlog."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """A uvicorn server bound at construction (so a busy port fails there, and port 0 resolves),
    served on thread ``station-http`` by :meth:`start`, ended by :meth:`stop`.

    With ``tls`` (certificate file, key file) it speaks HTTPS only; the certificate and key are
    loaded here, so a wrong file or a key that does not match fails at construction.
    """

    def __init__(self, app: Any, host: str, port: int, tls: tuple[Path, Path] | None = None):
        cert, key = tls if tls is not None else (None, None)
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=StationH11Protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("Server", SERVER_NAME)],
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=SHUTDOWN_S,
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
        self.config.load()  # the TLS context now: a bad certificate is an error before anything listens
        self.server = uvicorn.Server(self.config)
        self.socket = _listening_socket(host, port, self.config.backlog)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def thread(self) -> threading.Thread | None:
        """The serving thread (for liveness checks); None before :meth:`start`."""
        return self._thread

    def start(self) -> None:
        """Serve on the background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._run, name="station-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the station's HTTP server did not start")
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except Exception:  # noqa: BLE001 - logged; start() or the next health check sees the thread gone
            log.exception("station HTTP server stopped")

    def stop(self) -> None:
        """Stop accepting, let running requests finish (bounded), close the socket."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_S + 5)
        self.socket.close()
