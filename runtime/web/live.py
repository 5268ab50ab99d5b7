"""The live view as MJPEG (``multipart/x-mixed-replace``): one JPEG part per camera frame.

Bounded per client, so a page left open (or a stalled reader) costs the line nothing:

* **Frame-rate cap**: a stream sends at most ``max_fps`` frames per second, whatever the camera does.
* **One stream per session and camera**: a second one (a reloaded page, a second tab) ends the
  first; at most :data:`MAX_STREAMS` streams in all, beyond that the request is refused (503).
* **Latest frame only**: a stream *pulls* the camera's newest frame when it is ready to send the
  next part. Nothing is queued for a client: while its socket is full, uvicorn's flow control holds
  the stream, no frame is taken or encoded for it, and the camera and inspection never wait on it
  (the camera only keeps its one latest frame, which the daemon reads anyway).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from anomalygpt_edge.runtime.web.records import jpeg
from anomalygpt_edge.runtime.web.station_protocol import StationError

BOUNDARY = "frame"
MAX_STREAMS = 16  # all sessions together: each holds a worker thread while it waits for a frame
RETRY_S = 0.5  # a camera without frames is asked again this often (the stream stays open)


@dataclass
class LiveStream:
    """One open stream: ``live`` until replaced by a newer one for the same key, ended or closed."""

    owner: LiveStreams
    key: tuple[str, str]
    number: int
    sent: int = 0  # frames sent (the tests read it)
    sent_bytes: int = 0

    @property
    def live(self) -> bool:
        """Whether this stream should go on sending."""
        return self.owner.current(self.key) is self

    def end(self) -> None:
        """Forget this stream (a newer one for the same key stays)."""
        self.owner.forget(self)


@dataclass
class LiveStreams:
    """The MJPEG streams open now, by (session token, camera)."""

    max_fps: float = 8.0
    max_streams: int = MAX_STREAMS
    _streams: dict[tuple[str, str], LiveStream] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)
    _count: int = 0

    def open(self, session: str, camera: str) -> LiveStream | None:
        """A new stream for ``session`` and ``camera``, ending the one it had; None when full or closed."""
        with self._lock:
            key = (session, camera)
            if self._closed.is_set() or (key not in self._streams and len(self._streams) >= self.max_streams):
                return None
            self._count += 1
            stream = LiveStream(self, key, self._count)
            self._streams[key] = stream  # the older stream sees it is no longer current and ends
            return stream

    def current(self, key: tuple[str, str]) -> LiveStream | None:
        """The stream now open for ``key`` (None once the server closes)."""
        with self._lock:
            return None if self._closed.is_set() else self._streams.get(key)

    def forget(self, stream: LiveStream) -> None:
        """Drop ``stream`` if it is still the current one for its key."""
        with self._lock:
            if self._streams.get(stream.key) is stream:
                del self._streams[stream.key]

    def streams(self) -> list[LiveStream]:
        """The open streams."""
        with self._lock:
            return list(self._streams.values())

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        self._closed.set()


def part(data: bytes) -> bytes:
    """One multipart part holding a JPEG."""
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    return head + data + b"\r\n"


async def mjpeg(
    station: Any, camera: str, stream: LiveStream, max_fps: float, allowed: Callable[[], bool] = lambda: True
) -> AsyncIterator[bytes]:
    """The parts of one stream: the camera's newest frame, at most ``max_fps`` a second, while live
    and while ``allowed()`` (the session still exists: a logout or a removed user ends the stream)."""
    interval = 1.0 / max_fps
    seq, next_at = -1, 0.0
    try:
        while stream.live and allowed():
            wait = next_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # look at `live` again: replaced or closed meanwhile
            try:
                frame = await run_in_threadpool(station.next_frame, camera, seq)
            except StationError:  # no new frame yet (camera reconnecting): the stream waits
                next_at = time.monotonic() + RETRY_S
                continue
            if not stream.live:
                break
            data = await run_in_threadpool(jpeg, frame.image)
            seq, next_at = frame.seq, time.monotonic() + interval
            stream.sent += 1
            stream.sent_bytes += len(data)
            yield part(data)
    finally:
        stream.end()
