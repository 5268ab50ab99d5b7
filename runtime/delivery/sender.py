"""Verdict sender: the one path from the spool to the broker, so that nothing is lost, every
duplicate is flagged, and no reply waits for an fsync of its own.

The protocol (see also ``runtime/delivery/spool.py``):

1. :meth:`VerdictSender.submit` only queues the verdict in memory and wakes the sender thread:
   the inspection worker, the deadline watchdog and paho's network thread never touch the disk.
2. The sender thread takes **everything** queued since its last pass and commits it to the spool
   in one transaction (group commit: one fsync for a burst of 300 verdicts instead of 300), with
   the PUBACKs gathered meanwhile. Only then does it run each verdict's ``on_durable`` callback
   (the daemon's reply to the PLC's trigger) and publish the verdicts **in sequence order**, one
   thread only, so the backlog after an outage and new verdicts go out in capture order.
3. A verdict committed while connected is stored with ``attempts = 1`` (it is published right
   after), so a resend after a crash is flagged ``redelivered: true`` without a second fsync; a
   resend from the spool records its attempt before publishing, as before.
4. The broker's PUBACK (paho ``on_publish`` with the mid) queues the row's deletion for the next
   group commit.
5. On every (re)connect paho's own queue of unacknowledged messages is dropped
   (``Client.drop_out_messages``, called from ``on_connect`` before paho would resend them) and
   the sender starts again from the oldest spooled verdict. paho would resend the *original*
   payload, unflagged, so a verdict whose first copy reached the subscriber before the broker
   died would arrive twice without a flag; with the spool as the only source of resends, every
   copy after the first carries the flag. While disconnected, verdicts are only spooled.

When the spool cannot commit (disk full even after its reserve was released, I/O error), the
verdicts still go out: they are kept in memory (bounded, oldest dropped and counted), published
and resent after reconnects like spooled ones, moved into the spool as soon as it commits again
if they were not published yet, and the reply to the PLC goes out as usual, so the line keeps its
answers. :attr:`VerdictSender.problem` says why it is degraded (the status shows it) and clears
itself on the next successful commit.

Locking: paho calls ``on_publish`` with its internal message lock held, and ``publish`` takes
that same lock. The sender therefore never holds its own lock while calling ``publish`` (the
deadlock that holding it causes shows up as soon as PUBACKs stream in after a reconnect). A
PUBACK that arrives before the mid is registered is caught by checking the message info's
``is_published()`` at registration and by a sweep of the in-flight table.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from anomalygpt_edge.runtime.delivery.spool import SpoolError, SpoolItem, VerdictSpool, mark_redelivered

log = logging.getLogger(__name__)

BATCH = 100
#: How long the sender sleeps without a wake-up before looking at the spool anyway.
IDLE_POLL_S = 1.0
#: Spool upkeep (state file, WAL truncation, reserve) at most this often.
MAINTAIN_S = 1.0
#: Verdicts kept in memory while the spool cannot commit; beyond it the oldest are dropped (counted).
MAX_MEMORY = 10_000
#: After a failed commit, acknowledgements alone are retried no sooner than this (new verdicts
#: are always tried at once: their answers must not wait).
RETRY_S = 0.2


def _acked(info: Any) -> bool:
    """Whether paho has the PUBACK for ``info``; a publish that failed (rc != 0) is simply not acked.

    paho's ``is_published()`` raises for a failed publish (e.g. the connection dropped between our
    check and the call); that must never reach, let alone end, the sender thread.
    """
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return False


@dataclass
class _Outgoing:
    """A verdict handed to the sender: queued, then spooled (``seq``) or kept in memory."""

    verdict_id: str
    topic: str
    payload: bytes
    on_durable: Callable[[bool], None] | None
    seq: int | None = None
    attempts: int = 0
    sent_generation: int = -1  # the connection it was last published on (memory items)


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
        self._inflight: dict[int, tuple[Any, int | _Outgoing]] = {}  # mid -> (MQTTMessageInfo, seq or memory item)
        self._intake: list[_Outgoing] = []  # submitted, not yet committed
        self._acks: list[int] = []  # PUBACKed seqs, deleted at the next commit
        self._fresh: set[int] = set()  # committed with attempts=1 but not yet published: first send unflagged
        self._memory: collections.OrderedDict[str, _Outgoing] = collections.OrderedDict()  # spool could not commit
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_maintain = 0.0
        self._retry_at = 0.0  # monotonic time before which a failed spool is not retried for acks alone
        self._backlog = False  # the last pass found a full batch in the spool: more to send at once
        #: Why delivery is degraded (the spool cannot commit …), None when all is well.
        self.problem: str | None = None
        self.stats = {
            "submitted": 0,
            "published": 0,
            "redelivered": 0,
            "acked": 0,
            "refused": 0,
            "errors": 0,
            "commits": 0,
            "unspooled": 0,
            "dropped_memory": 0,
            "callback_errors": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> VerdictSender:
        """Start the sender thread; returns self."""
        self._thread = threading.Thread(target=self._run, name="verdict-sender", daemon=True)
        self._thread.start()
        return self

    @property
    def thread(self) -> threading.Thread | None:
        """The sender thread (for liveness checks)."""
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after committing what was submitted and acknowledged (bounded by ``timeout``)."""
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- called by the daemon --------------------------------------------------------------------

    def submit(
        self, verdict_id: str, topic: str, payload: bytes, on_durable: Callable[[bool], None] | None = None
    ) -> None:
        """Queue one verdict; the sender thread makes it durable (group commit) and publishes it.

        ``on_durable(durable)`` runs on the sender thread right after the commit that includes the
        verdict (``durable`` False when the spool could not commit and the verdict is only in
        memory); the daemon sends the PLC's reply from it. It must not block.
        """
        item = _Outgoing(str(verdict_id), str(topic), bytes(payload), on_durable)
        with self._wake:
            self._intake.append(item)
            self.stats["submitted"] += 1
            self._wake.notify_all()

    def inflight(self) -> int:
        """Verdicts handed to paho and awaiting their PUBACK."""
        with self._lock:
            return len(self._inflight)

    def idle(self) -> bool:
        """Nothing queued, in memory, in the spool or in flight (everything acknowledged)."""
        with self._lock:
            busy = bool(self._inflight or self._intake or self._acks or self._memory)
        try:
            return not busy and self.spool.depth() == 0
        except SpoolError:  # an unreadable spool is never "drained"
            return False

    def memory_depth(self) -> int:
        """Verdicts held only in memory because the spool could not commit them."""
        with self._lock:
            return len(self._memory)

    # -- paho callbacks --------------------------------------------------------------------------

    def on_connect(self) -> None:
        """Call from paho's ``on_connect`` after a successful CONNACK (network thread)."""
        dropped = self.client.drop_out_messages()
        with self._wake:
            self._generation += 1
            self._inflight.clear()
            self._fresh.clear()  # they may have reached the broker before the link dropped
            self._sent_upto = 0
            self._connected = True
            self._wake.notify_all()
        if dropped:
            log.info("reconnected: %d unacknowledged messages left to the spool's resend", len(dropped))

    def on_disconnect(self) -> None:
        """Call from paho's ``on_disconnect``: only spool from now until the next connect."""
        with self._wake:
            self._connected = False

    def on_publish(self, mid: int, reason_code: Any = None) -> None:
        """Call from paho's ``on_publish``: the PUBACK for ``mid`` arrived (network thread).

        Never touches the disk (the deletion waits for the next group commit). An MQTT 5 PUBACK
        with a failure reason (the broker refused the message, e.g. not authorised or over
        quota) leaves the verdict in the spool and is counted.
        """
        with self._lock:
            entry = self._inflight.pop(mid, None)
        if entry is None:
            return
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            with self._lock:
                self.stats["refused"] += 1
            self._error(f"broker refused verdict {_name(entry[1])}: {reason_code}")
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
                log.exception("verdict sender: unexpected failure")
                self._error(f"unexpected sender failure: {exc!r}")
                with self._wake:
                    if self._stop:
                        return
                    self._wake.wait(0.2)

    def _step(self) -> bool:
        """The sender loop; returns True when the sender is stopping."""
        while True:
            with self._wake:
                if not self._has_work():
                    if self._stop:
                        return True
                    wait = IDLE_POLL_S
                    if self._retry_at > time.monotonic():
                        wait = min(wait, self._retry_at - time.monotonic())
                    self._wake.wait(max(0.01, wait))
                intake, self._intake = self._intake, []
                acks, self._acks = self._acks, []
                connected, stopping = self._connected, self._stop
            self._commit(intake, acks, connected)
            self._answer(intake)
            if connected and not stopping:
                self._publish_memory()
                self._publish_spooled()
            self._maintain()
            if stopping:
                with self._lock:
                    if not self._intake and not self._acks:
                        return True

    def _has_work(self) -> bool:
        """Lock held: whether a pass would do anything now (a failing spool is not retried in a hot loop)."""
        if self._intake:
            return True
        if time.monotonic() < self._retry_at:
            return False
        if self._acks or (self._backlog and self._connected):
            return True
        return self._connected and not self._stop and any(o.attempts == 0 for o in self._memory.values())

    def _commit(self, intake: list[_Outgoing], acks: list[int], connected: bool) -> None:
        """Group commit: new verdicts (and memory ones never published) plus acknowledgements."""
        with self._lock:
            retry = [o for o in self._memory.values() if o.attempts == 0 and o.seq is None]
        rows = retry + intake
        if not rows and not acks:
            return
        # Committed while connected means published right after: record the attempt in the same
        # commit (a resend after a crash is then flagged) instead of an extra fsync per batch.
        attempts = 1 if connected else 0
        try:
            seqs = self.spool.put_many([(o.verdict_id, o.topic, o.payload, attempts) for o in rows], acks)
        except SpoolError as exc:
            with self._lock:
                self._acks[:0] = acks[-BATCH * 100 :]  # deleted at the next commit that works
                for o in intake:
                    self._memory[o.verdict_id] = o
                    self.stats["unspooled"] += 1
                while len(self._memory) > MAX_MEMORY:
                    self._memory.popitem(last=False)
                    self.stats["dropped_memory"] += 1
                self._retry_at = time.monotonic() + RETRY_S
            self._set_problem(f"spool cannot commit, verdicts kept in memory: {exc}")
            return
        with self._lock:
            for o, seq in zip(rows, seqs, strict=True):
                o.seq = seq
                self._memory.pop(o.verdict_id, None)
                if attempts:
                    self._fresh.add(seq)
            self.stats["commits"] += 1
            self.stats["acked"] += len(acks)
        if self.problem is not None:
            log.warning("verdict sender: the spool commits again (%s cleared)", self.problem)
            self.problem = None

    def _answer(self, intake: list[_Outgoing]) -> None:
        for o in intake:
            if o.on_durable is None:
                continue
            try:
                o.on_durable(o.seq is not None)
            except Exception as exc:  # a reply that fails must not cost the verdicts behind it
                with self._lock:
                    self.stats["callback_errors"] += 1
                self._error(f"answer callback for verdict {o.verdict_id} failed: {exc!r}")

    def _publish_memory(self) -> None:
        """Publish verdicts the spool could not take: once per connection, flagged when resent."""
        with self._lock:
            generation = self._generation
            todo = [o for o in self._memory.values() if o.seq is None and o.sent_generation != generation]
        for o in todo:
            payload = mark_redelivered(o.payload) if o.attempts > 0 else o.payload
            if not self._publish(o.topic, payload, o, generation, o.attempts > 0):
                return
            o.attempts += 1

    def _publish_spooled(self) -> None:
        with self._lock:
            generation, after = self._generation, self._sent_upto
        try:
            items = self.spool.pending(limit=BATCH, after_seq=after)
        except SpoolError as exc:
            self._error(f"spool read failed: {exc}")
            return
        self._sweep()
        self._backlog = len(items) >= BATCH
        if items:
            self._send(items, generation)

    def _send(self, items: list[SpoolItem], generation: int) -> None:
        with self._lock:
            first = {it.seq for it in items if it.seq in self._fresh}
        resend = [it.seq for it in items if it.seq not in first]
        marked = True
        try:
            # Recorded before publishing: a copy that may reach the broker is always counted.
            self.spool.mark_attempts(resend)
        except SpoolError as exc:
            # A full disk must not stop delivery: send them flagged, as a resend may be a duplicate.
            self._error(f"spool write failed, resending flagged: {exc}")
            marked = False
        for item in items:
            is_first = item.seq in first
            flagged = not is_first and (item.redelivered or not marked)
            payload = mark_redelivered(item.payload) if flagged else item.payload
            if not self._publish(item.topic, payload, item.seq, generation, flagged, item.verdict_id):
                return
            with self._lock:
                self._fresh.discard(item.seq)

    def _publish(
        self, topic: str, payload: bytes, ref: int | _Outgoing, generation: int, flagged: bool, vid: str = ""
    ) -> bool:
        """Hand one verdict to paho; False when the connection changed or the publish failed."""
        with self._lock:
            if not self._connected or self._generation != generation or self._stop:
                return False  # the connection changed: the next generation starts from the spool again
        vid = vid or _name(ref)
        try:
            info = self.client.publish(topic, payload, qos=self.qos)
        except (ValueError, RuntimeError, OSError, TypeError) as exc:
            self._error(f"publish of verdict {vid} failed: {exc}")
            with self._wake:  # no hot retry loop either
                if not self._stop:
                    self._wake.wait(0.1)
            return False
        if info.rc != 0:  # not connected or paho's queue full: the spool resends it after reconnect
            self._error(f"publish of verdict {vid} failed: rc {info.rc}")
            with self._wake:  # no hot retry loop: wait for the reconnect (or a poll interval)
                if self._generation == generation and not self._stop:
                    self._wake.wait(IDLE_POLL_S)
            return False
        with self._lock:
            if self._generation != generation:
                return False
            if isinstance(ref, int):
                self._sent_upto = ref
            else:
                ref.sent_generation = generation
            self.stats["published"] += 1
            self.stats["redelivered"] += int(flagged)
            acked_already = _acked(info)
            if not acked_already:
                self._inflight[info.mid] = (info, ref)
        if acked_already:
            self._ack(ref)
        return True

    def _sweep(self) -> None:
        """Acknowledge in-flight verdicts whose PUBACK raced their registration."""
        with self._lock:
            done = [(mid, ref) for mid, (info, ref) in self._inflight.items() if _acked(info)]
            for mid, _ in done:
                self._inflight.pop(mid, None)
        for _, ref in done:
            self._ack(ref)

    def _ack(self, ref: int | _Outgoing) -> None:
        with self._wake:
            if isinstance(ref, _Outgoing):
                if ref.seq is None:  # only in memory: delivered, nothing on disk to delete
                    self._memory.pop(ref.verdict_id, None)
                    self.stats["acked"] += 1
                    return
                ref = ref.seq
            self._acks.append(ref)
            self._wake.notify_all()

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_maintain < MAINTAIN_S:
            return
        self._last_maintain = now
        try:
            self.spool.maintain()
        except Exception as exc:  # upkeep is best effort
            log.warning("spool upkeep failed: %s", exc)
        if self.problem is not None:
            # No traffic must not leave the status degraded after the disk recovered: probe it.
            try:
                self.spool.probe()
            except SpoolError:
                return
            log.warning("verdict sender: the spool commits again (%s cleared)", self.problem)
            self.problem = None
            with self._wake:
                self._wake.notify_all()  # memory verdicts not yet published move into the spool now

    def _set_problem(self, message: str) -> None:
        if self.problem is None:
            log.error("verdict sender: %s", message)
        self.problem = message
        self._error(message, log_it=False)

    def _error(self, message: str, log_it: bool = True) -> None:
        with self._lock:
            self.stats["errors"] += 1
        if log_it:
            log.warning("verdict sender: %s", message)
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:  # a reporting hook must not stop delivery
                log.exception("verdict sender error hook failed")


def _name(ref: int | _Outgoing) -> str:
    return f"seq {ref}" if isinstance(ref, int) else ref.verdict_id
