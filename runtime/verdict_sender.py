"""Verdict sender: the one path from the spool to the broker, so that nothing is lost and every
duplicate is flagged.

The protocol (see also ``runtime/spool.py``):

1. :meth:`VerdictSender.submit` commits the verdict to the spool (durable) and wakes the sender
   thread; the pipeline thread never talks to the broker itself.
2. The sender thread publishes spooled verdicts **in sequence order**, one thread only, so the
   backlog after an outage and new verdicts go out in capture order. Before each publish it
   records the attempt in the spool, so a verdict that may have reached the broker is always
   resent flagged ``redelivered: true`` — also after a SIGKILL between publish and PUBACK.
3. The broker's PUBACK (paho ``on_publish`` with the mid) removes the verdict from the spool.
4. On every (re)connect paho's own queue of unacknowledged messages is dropped
   (``Client.drop_out_messages``, called from ``on_connect`` before paho would resend them) and
   the sender starts again from the oldest spooled verdict. paho would resend the *original*
   payload, unflagged, so a verdict whose first copy reached the subscriber before the broker
   died would arrive twice without a flag; with the spool as the only source of resends, every
   copy after the first carries the flag. While disconnected, verdicts are only spooled.

Locking: paho calls ``on_publish`` with its internal message lock held, and ``publish`` takes
that same lock. The sender therefore never holds its own lock while calling ``publish`` (the
deadlock that holding it causes shows up as soon as PUBACKs stream in after a reconnect). A
PUBACK that arrives before the mid is registered is caught by checking the message info's
``is_published()`` at registration and by a sweep of the in-flight table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from anomalygpt_edge.runtime.spool import SpoolError, SpoolItem, VerdictSpool, mark_redelivered


def _acked(info: Any) -> bool:
    """Whether paho has the PUBACK for ``info``; a publish that failed (rc != 0) is simply not acked.

    paho's ``is_published()`` raises for a failed publish (e.g. the connection dropped between our
    check and the call); that must never reach, let alone end, the sender thread.
    """
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return False


log = logging.getLogger(__name__)

BATCH = 100
#: How long the sender sleeps without a wake-up before looking at the spool anyway.
IDLE_POLL_S = 1.0


class VerdictSender:
    """Publishes spooled verdicts over a paho client (QoS 1), acknowledging them on PUBACK.

    Wire the paho callbacks to :meth:`on_connect`, :meth:`on_disconnect` and :meth:`on_publish`
    (each may be called from paho's network thread), then :meth:`start`.
    """

    def __init__(
        self,
        client: Any,
        spool: VerdictSpool,
        qos: int = 1,
        on_error: Callable[[str], None] | None = None,
    ):
        self.client = client
        self.spool = spool
        self.qos = max(1, int(qos))  # QoS 0 has no PUBACK: nothing could ever leave the spool
        self._on_error = on_error
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._connected = False
        self._generation = 0
        self._sent_upto = 0  # highest seq handed to paho in this connection generation
        self._inflight: dict[int, tuple[Any, int]] = {}  # mid -> (MQTTMessageInfo, seq)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"submitted": 0, "published": 0, "redelivered": 0, "acked": 0, "refused": 0, "errors": 0}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> VerdictSender:
        self._thread = threading.Thread(target=self._run, name="verdict-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- called by the daemon --------------------------------------------------------------------

    def submit(self, verdict_id: str, topic: str, payload: bytes) -> int:
        """Spool one verdict (durable when this returns) and wake the sender; returns its seq."""
        seq = self.spool.put(verdict_id, topic, payload)
        with self._wake:
            self.stats["submitted"] += 1
            self._wake.notify_all()
        return seq

    def inflight(self) -> int:
        """Verdicts handed to paho and awaiting their PUBACK."""
        with self._lock:
            return len(self._inflight)

    def idle(self) -> bool:
        """Nothing in the spool and nothing in flight (everything acknowledged)."""
        return self.inflight() == 0 and self.spool.depth() == 0

    # -- paho callbacks --------------------------------------------------------------------------

    def on_connect(self) -> None:
        """Call from paho's ``on_connect`` after a successful CONNACK (network thread)."""
        dropped = self.client.drop_out_messages()
        with self._wake:
            self._generation += 1
            self._inflight.clear()
            self._sent_upto = 0
            self._connected = True
            self._wake.notify_all()
        if dropped:
            log.info("reconnected: %d unacknowledged messages left to the spool's resend", len(dropped))

    def on_disconnect(self) -> None:
        with self._wake:
            self._connected = False

    def on_publish(self, mid: int, reason_code: Any = None) -> None:
        """Call from paho's ``on_publish``: the PUBACK for ``mid`` arrived (network thread).

        An MQTT 5 PUBACK with a failure reason (the broker refused the message, e.g. not
        authorised or over quota) leaves the verdict in the spool and is counted.
        """
        with self._lock:
            entry = self._inflight.pop(mid, None)
        if entry is None:
            return
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            with self._lock:
                self.stats["refused"] += 1
            self._error(f"broker refused verdict seq {entry[1]}: {reason_code}")
            return
        self._ack(entry[1])

    # -- the sender thread -----------------------------------------------------------------------

    def _run(self) -> None:
        # The thread must outlive any single failure: a dead sender strands every verdict in the spool.
        while True:
            try:
                if self._step():
                    return
            except Exception as exc:
                self._error(f"unexpected sender failure: {exc!r}")
                time.sleep(IDLE_POLL_S)

    def _step(self) -> bool:
        """The sender loop; returns True when the sender is stopping."""
        while True:
            with self._wake:
                if self._stop:
                    return True
                if not self._connected:
                    self._wake.wait(IDLE_POLL_S)
                    continue
                generation, after = self._generation, self._sent_upto
            try:
                items = self.spool.pending(limit=BATCH, after_seq=after)
            except SpoolError as exc:
                self._error(f"spool read failed: {exc}")
                time.sleep(IDLE_POLL_S)
                continue
            self._sweep()
            if not items:
                with self._wake:
                    if not self._stop and self._generation == generation and self._sent_upto == after:
                        self._wake.wait(IDLE_POLL_S)
                continue
            self._send(items, generation)

    def _send(self, items: list[SpoolItem], generation: int) -> None:
        try:
            # Recorded before publishing: a copy that may reach the broker is always counted.
            self.spool.mark_attempts([it.seq for it in items])
        except SpoolError as exc:
            self._error(f"spool write failed: {exc}")
            time.sleep(IDLE_POLL_S)
            return
        for item in items:
            with self._lock:
                if not self._connected or self._generation != generation or self._stop:
                    return  # the connection changed: the next generation starts from the spool again
            payload = mark_redelivered(item.payload) if item.redelivered else item.payload
            try:
                info = self.client.publish(item.topic, payload, qos=self.qos)
            except (ValueError, RuntimeError, OSError) as exc:
                self._error(f"publish of verdict {item.verdict_id} failed: {exc}")
                return
            if info.rc != 0:  # not connected or paho's queue full: the spool resends it after reconnect
                self._error(f"publish of verdict {item.verdict_id} failed: rc {info.rc}")
                with self._wake:  # no hot retry loop: wait for the reconnect (or a poll interval)
                    if self._generation == generation and not self._stop:
                        self._wake.wait(IDLE_POLL_S)
                return
            with self._lock:
                if self._generation != generation:
                    return
                self._sent_upto = item.seq
                self.stats["published"] += 1
                self.stats["redelivered"] += int(item.redelivered)
                acked_already = _acked(info)
                if not acked_already:
                    self._inflight[info.mid] = (info, item.seq)
            if acked_already:
                self._ack(item.seq)

    def _sweep(self) -> None:
        """Acknowledge in-flight verdicts whose PUBACK raced their registration."""
        with self._lock:
            done = [(mid, seq) for mid, (info, seq) in self._inflight.items() if _acked(info)]
            for mid, _ in done:
                self._inflight.pop(mid, None)
        for _, seq in done:
            self._ack(seq)

    def _ack(self, seq: int) -> None:
        try:
            self.spool.ack(seq)
        except SpoolError as exc:
            self._error(f"spool ack of seq {seq} failed: {exc}")  # resent (flagged) after the next connect
            return
        with self._lock:
            self.stats["acked"] += 1

    def _error(self, message: str) -> None:
        with self._lock:
            self.stats["errors"] += 1
        log.warning("verdict sender: %s", message)
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:  # a reporting hook must not stop delivery
                log.exception("verdict sender error hook failed")
