"""The live view as MJPEG against the real station server: multipart parts with correct boundaries,
one stream per session and camera, a frame-rate cap, and a stalled reader that neither grows the
server's memory nor slows the camera (the stream pulls the newest frame; nothing queues for it)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from station_http import Client

from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import StationServer, WebConfig
from anomalygpt_edge.runtime.web.station_protocol import Frame, StationError

SIZE = (480, 640)


class FakeCamera:
    """A station with one camera ``cam`` producing noisy frames (large JPEGs) on its own thread,
    as fast as it can: ``produced`` counts them, so a test sees whether anything slowed it down."""

    def __init__(self, fps: float = 200.0):
        self.produced = 0
        self._latest: Frame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._rng = np.random.default_rng(0)
        self._noise = [self._rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8) for _ in range(4)]
        self._period = 1.0 / fps
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            with self._cond:
                self.produced += 1
                self._latest = Frame(self._noise[self.produced % 4], self.produced, time.time())
                self._cond.notify_all()

    def latest_frame(self, camera: str) -> Frame:
        if camera != "cam":
            raise StationError(f"no camera '{camera}'")
        with self._cond:
            if not self._cond.wait_for(lambda: self._latest is not None, 5):
                raise StationError("no frame")
            assert self._latest is not None
            return self._latest

    def next_frame(self, camera: str, newer_than_seq: int) -> Frame:
        with self._cond:
            if not self._cond.wait_for(lambda: self._latest is not None and self._latest.seq > newer_than_seq, 2):
                raise StationError("no new frame")
            assert self._latest is not None
            return self._latest

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture()
def served(tmp_path) -> Iterator[tuple[StationServer, FakeCamera, Client]]:
    UserStore(tmp_path / "users.json").set("olga", "operator", "olga-password")
    cam = FakeCamera()
    server = StationServer(cam, WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0, live_max_fps=50))
    server.start()
    client = Client(server.url)
    assert client.login("olga", "olga-password").status == 200
    yield server, cam, client
    server.stop()
    cam.stop()


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class RawStream:
    """A GET of the MJPEG stream on a plain socket, read part by part (or not at all)."""

    def __init__(self, server: StationServer, cookie: str, rcvbuf: int | None = None):
        host, port = server.server_address
        self.sock = socket.socket()
        if rcvbuf is not None:  # a small receive window: a stalled reader is felt at once
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        req = f"GET /api/cameras/cam/live.mjpg HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n\r\n"
        self.sock.sendall(req.encode())
        self.buf = b""
        self.headers = self._until(b"\r\n\r\n").decode()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise EOFError("stream ended")
        head, self.buf = self.buf.split(marker, 1)
        return head

    def chunk(self) -> bytes:
        """One HTTP/1.1 chunk of the body (b"" at the end)."""
        size = int(self._until(b"\r\n").split(b";")[0], 16)
        while len(self.buf) < size + 2:
            if not self._fill():
                raise EOFError("stream ended inside a chunk")
        data, self.buf = self.buf[:size], self.buf[size + 2 :]
        return data

    def close(self) -> None:
        self.sock.close()


def parts(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body by its boundary, checking each part's framing."""
    out = []
    rest = body
    while rest:
        assert rest.startswith(b"--" + boundary + b"\r\n"), rest[:60]
        head, rest = rest[len(boundary) + 4 :].split(b"\r\n\r\n", 1)
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        n = int(headers["Content-Length"])
        data, rest = rest[:n], rest[n:]
        assert rest.startswith(b"\r\n"), "a part's data ends with CRLF before the next boundary"
        rest = rest[2:]
        out.append((headers, data))
    return out


def test_stream_yields_jpeg_frames_in_multipart_parts_with_correct_boundaries(served):
    server, _cam, client = served
    s = RawStream(server, client.cookie or "")
    try:
        assert s.headers.startswith("HTTP/1.1 200"), s.headers
        ctype = next(line for line in s.headers.split("\r\n") if line.lower().startswith("content-type:"))
        assert "multipart/x-mixed-replace" in ctype
        boundary = ctype.split("boundary=")[1].strip().encode()
        assert "Cache-Control: no-store" in s.headers and "X-Content-Type-Options: nosniff" in s.headers
        body = b"".join(s.chunk() for _ in range(3))
        found = parts(body, boundary)
        assert len(found) == 3
        for headers, data in found:
            assert headers["Content-Type"] == "image/jpeg"
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None and image.shape[:2] == SIZE
    finally:
        s.close()


def test_stream_needs_a_session_and_a_known_camera(served):
    server, _cam, client = served
    assert Client(server.url).get("/api/cameras/cam/live.mjpg").status == 401
    r = client.get("/api/cameras/nope/live.mjpg")
    assert r.status == 400 and "no camera" in r.json()["error"]


def test_second_stream_for_the_same_session_replaces_the_first(served):
    server, _cam, client = served
    first = RawStream(server, client.cookie or "")
    try:
        assert first.chunk()
        second = RawStream(server, client.cookie or "")
        try:
            assert second.chunk()
            # The first stream ends (the zero-size chunk) while the second goes on.
            wait_for("the first stream to end", lambda: first.chunk() == b"")
            assert second.chunk() and second.chunk()
            assert len(server.state.live.streams()) == 1
        finally:
            second.close()
    finally:
        first.close()


def test_stream_is_capped_at_the_configured_frame_rate(served):
    server, cam, client = served
    s = RawStream(server, client.cookie or "")
    try:
        s.chunk()
        t0, n0 = time.monotonic(), cam.produced
        for _ in range(20):
            s.chunk()
        elapsed = time.monotonic() - t0
        # 20 frames at 50 fps need 0.4 s at least, whatever the camera delivers (200 fps).
        assert elapsed >= 20 / 50 * 0.9, elapsed
        assert cam.produced - n0 > 20, "the camera ran faster than the stream"
    finally:
        s.close()


def test_stalled_reader_neither_grows_the_server_nor_slows_the_camera(served):
    server, cam, client = served
    s = RawStream(server, client.cookie or "", rcvbuf=4096)
    try:
        assert s.chunk()  # one part read, then the reader stops reading
        stream = wait_for("the stream", lambda: (server.state.live.streams() or [None])[0])

        def settled() -> bool:  # the stream stops taking frames once the socket buffers are full
            before, produced = stream.sent, cam.produced
            wait_for("the camera to move on", lambda: cam.produced >= produced + 40)
            return stream.sent == before

        wait_for("the stalled stream to stop taking frames", settled, timeout=30)
        stalled_at, produced = stream.sent, cam.produced
        wait_for("the camera to go on at full rate", lambda: cam.produced >= produced + 200, timeout=10)
        assert stream.sent == stalled_at, "nothing is taken (or queued) for a reader that does not read"
        # What the server holds for it is bounded by the socket buffers (4 MiB at most on Linux) and
        # uvicorn's write buffer (64 KiB), never by how long the reader stalls.
        assert stream.sent_bytes < 16 * 1024 * 1024
        # Other clients are served meanwhile.
        assert client.get("/api/session").status == 200
    finally:
        s.close()
    wait_for("the stream to be dropped once its reader goes", lambda: not server.state.live.streams())


def test_logging_out_ends_the_sessions_stream(served):
    server, _cam, client = served
    s = RawStream(server, client.cookie or "")
    try:
        assert s.chunk()
        assert client.post("/api/logout").status == 200
        wait_for("the stream to end", lambda: s.chunk() == b"")
        wait_for("the stream to be dropped", lambda: not server.state.live.streams())
    finally:
        s.close()
