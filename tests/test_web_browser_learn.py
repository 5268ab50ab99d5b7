"""The line learns, in a real browser (headless Chromium over the station's HTTPS): drifted good parts
reach the line and are rejected; the live and system pages say so in plain words (the drift watch
of the camera's recipe, from the daemon's real state); a technician labels the false rejects good
in the history, proposes on the Learn page, reads the before/after table, applies (the recipe's
bank version goes up, the camera inspects with it) and rolls back with one click (back down).

Reuses the browser and PKI fixtures of ``test_web_browser.py`` and the line of ``learn_fixtures.py``.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

from daemon_fixtures import broker_fixture  # noqa: F401 - fixture used by name
from learn_fixtures import DRIFTED, feed_drifted, learning_line, login, plate_store  # noqa: F401
from test_web_browser import _shot, browser, pki, pytestmark  # noqa: F401 - fixtures used by name

SLIPS = ("[object", "undefined", "NaN", "\nnull")


def _page_text(b: Any, page: str, ready: str | None = None) -> str:
    """The page's visible text once it shows (and ``ready`` is on it), checked for rendering slips."""
    b.click(f'nav a[href="#{page}"]')
    probe = f"document.querySelector({ready!r})" if ready else "true"
    text = b.wait(
        f"#{page} to render",
        lambda: b.js(f"const p = document.querySelector('#page-{page}'); return !p.hidden && {probe} && p.innerText"),
    )
    for slip in SLIPS:
        assert slip not in text, (page, slip, text)
    return str(text)


def _text(b: Any, css: str) -> str:
    return str(b.js(f"const e = document.querySelector({css!r}); return e ? e.textContent : ''"))


def _live_row(b: Any) -> int | None:
    v = b.js("const r = document.querySelector('#learn-versions tr.live'); return r ? r.dataset.version : null")
    return int(v) if v is not None else None


def test_a_technician_learns_from_labelled_false_rejects_applies_and_rolls_back_in_the_browser(
    learning_line: Any,  # noqa: F811 - the imported fixture
    browser: Any,  # noqa: F811
    pki: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    line = learning_line(tls=(pki / "server.pem", pki / "server.key"))
    server, daemon, b = line["server"], line["daemon"], browser
    v0 = int(daemon.inspectors["inbox"].recipe.bank_version)
    feed_drifted(line["inbox"])
    api = login(server.url, "olga", ssl.create_default_context(cafile=str(pki / "ca.pem")))
    b.login(server.url, "theo", "technician-pw")

    # The drift watch of plate leaves its band: the live page says so in plain words.
    b.wait("a verdict on the live page", lambda: b.js("return !!document.querySelector('#live-label-good-inbox')"), 60)
    message = b.wait("the drift message", lambda: _text(b, "#live-drift-inbox .drift-msg"), 60)
    assert message.startswith("recipe plate: ") and message == daemon.drift_states()["inbox"]["message"]
    _page_text(b, "live")
    _shot(b, tmp_path, "learn-1-live-drift.png")
    assert "recipe plate: " in _page_text(b, "system", "#sys-cams")
    assert b.wait("the system page's warnings", lambda: _text(b, "#sys-warnings")).count("camera inbox: recipe plate:")

    # History: every rejected part was a good one; the technician labels them so, one click each.
    rows = b.wait(
        "the drifted parts' verdicts in history",
        lambda: len(api.get("/api/history?camera=inbox&limit=100").json()) >= DRIFTED,
        90,
    )
    assert rows
    b.click('nav a[href="#history"]')
    b.wait(
        "history rows",
        lambda: b.js("return document.querySelectorAll('#hist-table tbody tr[data-id]').length") >= DRIFTED,
    )
    rejected = b.js(
        "return [...document.querySelectorAll('#hist-table tbody tr[data-verdict=NG]')].map((r) => r.dataset.id)"
    )
    assert len(rejected) >= DRIFTED - 1, rejected
    for vid in rejected:
        b.click(f"#hist-label-good-{vid}")
        b.wait(f"the label of {vid}", lambda vid=vid: _text(b, f"#hist-label-{vid}") == "good")
    _page_text(b, "history")

    # Learn: the counts, Propose, the before/after table.
    b.click('nav a[href="#learn"]')
    counts = b.wait("the labelled counts", lambda: (t := _text(b, "#learn-counts")) and "labelled good" in t and t)
    assert counts.startswith(f"{len(rejected)} labelled good ({len(rejected)} of them rejected by the line)"), counts
    b.wait("a live version in the versions table", lambda: _live_row(b) == v0)
    b.click("#learn-propose")
    b.wait("the proposal", lambda: b.js("return !document.querySelector('#learn-proposal-card').hidden"), 120)
    n = len(rejected)
    before, after = _text(b, "#learn-frr-before"), _text(b, "#learn-frr-after")
    assert before.startswith(f"{n} of {n} (100 %; at most"), before
    fixed = re.match(r"(\d+) of (\d+) \(", after)
    assert fixed and int(fixed.group(1)) < n and int(fixed.group(2)) == n, after
    assert _text(b, "#learn-esc-before") == "no labelled defects"
    assert float(_text(b, "#learn-thr-after")) > float(_text(b, "#learn-thr-before"))
    assert _text(b, "#learn-add").startswith(f"Golden parts to add ({n}):"), _text(b, "#learn-add")
    assert "would be false rejects today" in _text(b, "#learn-notes")
    _page_text(b, "learn")
    _shot(b, tmp_path, "learn-2-proposal.png")

    # Apply: the recipe's bank version goes up, and the camera inspects with it.
    b.type("#learn-reason", "the light changed")
    b.click("#learn-apply")
    v1 = b.wait("the applied version live", lambda: (v := _live_row(b)) is not None and v > v0 and v, 60)
    assert int(daemon.inspectors["inbox"].recipe.bank_version) == v1
    assert b.js("return document.querySelector('#learn-proposal-card').hidden"), "applied: nothing pending"
    assert "the light changed" in _text(b, "#learn-versions tr.live")

    # One click back: the previous version is live again, on the camera too.
    assert _text(b, f"#learn-rollback-{v0}") == "Roll back (previous)"
    b.click(f"#learn-rollback-{v0}")
    b.wait("the previous version live again", lambda: _live_row(b) == v0, 60)
    assert int(daemon.inspectors["inbox"].recipe.bank_version) == v0
    assert _text(b, f"#learn-rollback-{v1}") == "Roll back", "the undone version is kept too"
    _page_text(b, "learn")
    _shot(b, tmp_path, "learn-3-rolled-back.png")
