"""An embedded MQTT 3.1.1 broker, so the demo runs where mosquitto is not installed.

Small on purpose, and honest about it: MQTT 3.1.1 only (an MQTT 5 CONNECT is refused with return
code 1, so a client knows to fall back), QoS 0 and 1 (QoS 2 is delivered as QoS 1), retained
messages, Last Will, ``+``/``#`` wildcards, keep-alive pings. No persistence, no sessions (every
connection is a clean session), no QoS 1 redelivery to subscribers, no authentication, loopback
only. For a plant, use mosquitto or another real broker.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import threading

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 10, 11, 12, 13, 14


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT wildcard match: ``+`` one level, ``#`` the rest (``$`` topics only by explicit patterns)."""
    p, t = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and not pattern.startswith("$"):
        return False
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


def _encode_len(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _encode_len(len(body)) + body


def _string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("!H", data, pos)
    return data[pos + 2 : pos + 2 + n].decode("utf-8"), pos + 2 + n


def _publish_packet(topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + (struct.pack("!H", mid) if qos else b"") + payload
    return _packet(PUBLISH, (qos << 1) | int(retain), body)


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.subs: dict[str, int] = {}
        self.will: tuple[str, bytes, int, bool] | None = None
        self.send_lock = threading.Lock()
        self.mids = itertools.cycle(range(1, 65536))

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)


class MiniBroker:
    """``MiniBroker(host, port).start()``; port 0 picks a free one (see :attr:`port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = socket.create_server((host, port))
        self.port = int(self._server.getsockname()[1])
        self._clients: set[_Client] = set()
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> MiniBroker:
        threading.Thread(target=self._accept, name="mini-broker", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            for c in list(self._clients):
                c.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(_Client(sock),), name="mini-broker-client", daemon=True).start()

    def _read_packet(self, sock: socket.socket) -> tuple[int, int, bytes]:
        head = self._recv(sock, 1)[0]
        length, shift = 0, 0
        while True:
            b = self._recv(sock, 1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 21:
                raise ConnectionError("malformed remaining length")
        return head >> 4, head & 0x0F, self._recv(sock, length)

    @staticmethod
    def _recv(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _connect(self, c: _Client) -> bool:
        """Read the CONNECT (keep-alive, will) and answer CONNACK; False when the client is refused."""
        kind, _, body = self._read_packet(c.sock)
        if kind != CONNECT:
            return False
        _, pos = _string(body, 0)
        level, flags = body[pos], body[pos + 1]
        if level != 4:  # not MQTT 3.1.1
            c.send(_packet(CONNACK, 0, bytes([0, 1])))
            return False
        (keepalive,) = struct.unpack_from("!H", body, pos + 2)
        _, pos = _string(body, pos + 4)  # client id
        if flags & 0x04:
            wt, pos = _string(body, pos)
            (n,) = struct.unpack_from("!H", body, pos)
            c.will = (wt, body[pos + 2 : pos + 2 + n], (flags >> 3) & 3, bool(flags & 0x20))
        c.sock.settimeout(keepalive * 1.5 if keepalive else None)
        with self._lock:
            self._clients.add(c)
        c.send(_packet(CONNACK, 0, bytes([0, 0])))
        return True

    def _publish(self, c: _Client, flags: int, body: bytes) -> None:
        """A client's PUBLISH: acknowledged at QoS 1 and routed to the subscribers."""
        qos, retain = (flags >> 1) & 3, bool(flags & 1)
        topic, pos = _string(body, 0)
        if qos:
            (mid,) = struct.unpack_from("!H", body, pos)
            pos += 2
            c.send(_packet(PUBACK, 0, struct.pack("!H", mid)))
        self._route(topic, body[pos:], min(qos, 1), retain)

    def _subscribe(self, c: _Client, body: bytes) -> None:
        """A SUBSCRIBE: granted at QoS 0 or 1, then the retained messages its new patterns match."""
        (mid,) = struct.unpack_from("!H", body, 0)
        pos, granted, new = 2, [], []
        while pos < len(body):
            pattern, pos = _string(body, pos)
            qos = min(body[pos], 1)
            pos += 1
            c.subs[pattern] = qos
            granted.append(qos)
            new.append(pattern)
        c.send(_packet(SUBACK, 0, struct.pack("!H", mid) + bytes(granted)))
        with self._lock:
            retained = list(self._retained.items())
        for topic, (payload, qos) in retained:
            for pattern in new:
                if topic_matches(pattern, topic):
                    q = min(qos, c.subs[pattern])
                    c.send(_publish_packet(topic, payload, q, True, next(c.mids)))
                    break

    def _unsubscribe(self, c: _Client, body: bytes) -> None:
        """An UNSUBSCRIBE: the patterns dropped, UNSUBACK sent."""
        (mid,) = struct.unpack_from("!H", body, 0)
        pos = 2
        while pos < len(body):
            pattern, pos = _string(body, pos)
            c.subs.pop(pattern, None)
        c.send(_packet(UNSUBACK, 0, struct.pack("!H", mid)))

    def _serve(self, c: _Client) -> None:
        clean_exit = False
        try:
            if not self._connect(c):
                return
            while not self._stop.is_set():
                kind, flags, body = self._read_packet(c.sock)
                if kind == PUBLISH:
                    self._publish(c, flags, body)
                elif kind == SUBSCRIBE:
                    self._subscribe(c, body)
                elif kind == UNSUBSCRIBE:
                    self._unsubscribe(c, body)
                elif kind == PINGREQ:
                    c.send(_packet(PINGRESP, 0, b""))
                elif kind == DISCONNECT:
                    clean_exit = True
                    return
                # PUBACK from subscribers: nothing to do (no redelivery)
        except (OSError, ConnectionError, struct.error, IndexError, UnicodeDecodeError):
            pass
        finally:
            with self._lock:
                self._clients.discard(c)
            c.sock.close()
            if c.will is not None and not clean_exit and not self._stop.is_set():
                self._route(*c.will)

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = (payload, qos)
                else:
                    self._retained.pop(topic, None)
            clients = list(self._clients)
        for client in clients:
            matched = [q for p, q in client.subs.items() if topic_matches(p, topic)]
            if matched:
                q = min(qos, max(matched))
                with contextlib.suppress(OSError):  # a client that went away: its reader thread cleans up
                    client.send(_publish_packet(topic, payload, q, False, next(client.mids)))
