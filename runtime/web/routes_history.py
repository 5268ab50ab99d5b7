"""History routes (recent verdicts, their images, a CSV export, labels on them) and ask (a streamed answer).

Labels (issue 14): ``POST /api/verdicts/<id>/label`` stores a ``good``/``defect`` label in the
daemon's archive with the logged-in user as author (``source: station``, audited as
``verdict.label``); ``GET /api/verdicts/<id>/labels`` is its history; history rows carry ``label``
(the current one, or null).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from starlette.responses import Response, StreamingResponse

from anomalygpt_edge.runtime.delivery.archive import csv_cell
from anomalygpt_edge.runtime.delivery.archive_format import VERDICT_CSV_COLUMNS, ArchiveError, parse_time
from anomalygpt_edge.runtime.delivery.archive_labels import LabelWriteError
from anomalygpt_edge.runtime.web.http_base import (
    SECURITY_HEADERS,
    Context,
    HttpError,
    answer,
    json_answer,
    json_default,
)
from anomalygpt_edge.runtime.web.http_bodies import AskBody, LabelBody
from anomalygpt_edge.runtime.web.station import HistoryQuery

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    *VERDICT_CSV_COLUMNS,
    "normalized_score",
    "location",
    "regions",
    "sentence",
    "explanation",
    "frame_seq",
    "latency_ms",
    "reason",
    "label",
    "defect_type",
)


def _when(query: dict[str, str], key: str) -> float | None:
    """A query time: epoch seconds or ISO 8601 (UTC when it names no zone)."""
    v = query.get(key)
    if not v:
        return None
    try:
        return float(v)
    except ValueError:
        pass
    try:
        return parse_time(v)
    except ArchiveError:
        raise HttpError(400, f"{key}: not a time (ISO-8601 or epoch seconds): {v!r}") from None


def query_limit(query: dict[str, str], default: int) -> int:
    """``?limit=``, clamped to [1, 5000]."""
    try:
        return max(1, min(int(query.get("limit") or default), 5000))
    except ValueError:
        raise HttpError(400, "limit must be a number") from None


def history_query(ctx: Context) -> HistoryQuery:
    """The history filter from the query string."""
    q = ctx.query
    return HistoryQuery(
        camera=q.get("camera") or None,
        recipe=q.get("recipe") or None,
        ng_only=q.get("ng") in ("1", "true", "yes"),
        since=_when(q, "since"),
        until=_when(q, "until"),
        limit=query_limit(q, 100),
    )


def get_history(ctx: Context) -> Response:
    return json_answer(with_labels(ctx.station, ctx.station.history(history_query(ctx))))


def with_labels(station: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, each with its current ``label`` (None: unlabelled or no archive)."""
    current = station.current_labels([r["id"] for r in rows]) if rows else {}
    return [{**r, "label": current.get(r["id"])} for r in rows]


def post_label(ctx: Context, vid: str) -> Response:
    """Label one archived verdict as the logged-in user (audited as ``verdict.label``)."""
    body: LabelBody = ctx.body
    user, _role = ctx.user()

    def store() -> Any:
        try:
            return ctx.station.label_verdict(vid, body.label, user, body.defect_type, body.note)
        except LabelWriteError as exc:  # disk full, row still in memory: try again later
            raise HttpError(503, str(exc)) from None

    return json_answer(ctx.audited(vid, store, label=body.label, defect_type=body.defect_type))


def get_labels(ctx: Context, vid: str) -> Response:
    """Every label of one verdict, oldest first."""
    return json_answer(ctx.station.verdict_labels(vid))


def get_history_csv(ctx: Context) -> Response:
    """The filtered history as a CSV download (cells a spreadsheet would run as formulas are quoted)."""
    rows = with_labels(ctx.station, ctx.station.history(history_query(ctx)))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        values = {**r, "regions": len(r.get("regions") or []), "latency_ms": (r.get("latency_ms") or {}).get("total")}
        values |= {k: (r["label"] or {}).get(k) for k in ("label", "defect_type")}  # the current label
        w.writerow([csv_cell(values.get(c)) for c in CSV_COLUMNS])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    disposition = {"Content-Disposition": f'attachment; filename="verdicts-{stamp}.csv"'}
    return answer(200, buf.getvalue().encode(), "text/csv; charset=utf-8", disposition)


def get_history_item(ctx: Context, vid: str) -> Response:
    return json_answer(with_labels(ctx.station, [ctx.station.history_item(vid)])[0])


def get_history_image(ctx: Context, vid: str, kind: str) -> Response:
    return answer(200, ctx.station.history_image(vid, kind), "image/jpeg")


def post_ask(ctx: Context) -> Response:
    """The model's answer about one verdict, streamed as NDJSON lines: ``{"t": piece}`` as the text
    comes, then ``{"done": {...}}`` or ``{"error": ...}``."""
    body: AskBody = ctx.body
    assert ctx.session is not None
    # The conversation belongs to this login: another session cannot continue it.
    key = f"{ctx.session.token[:16]}:{body.conversation or 'default'}"
    ctx.station.history_item(body.verdict_id)  # 404 before any streaming starts
    lines = _ask_lines(ctx.station, key, body.verdict_id, body.question)
    headers = {"Cache-Control": "no-store", **SECURITY_HEADERS}
    return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)


def _ask_lines(station: Any, key: str, vid: str, question: str) -> Iterator[bytes]:
    """Run the (blocking) ask on its own thread and yield its pieces as they come."""
    pieces: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def work() -> None:
        try:
            result = station.ask(key, vid, question, lambda piece: pieces.put({"t": piece}))
            pieces.put({"done": result})
        except Exception as exc:  # noqa: BLE001 - the answer has started: report in-band
            log.warning("ask failed: %s", exc)
            pieces.put({"error": str(exc)})
        finally:
            pieces.put(None)

    threading.Thread(target=work, name="station-ask", daemon=True).start()
    while (item := pieces.get()) is not None:
        yield (json.dumps(item, default=json_default) + "\n").encode()
