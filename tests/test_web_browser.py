"""The technician station in a real browser: headless Chromium drives the whole enrollment flow
against the running line daemon (video-file cameras, local MQTT broker), then checks the verdicts
that follow, as the page shows them and as a PLC subscriber receives them.

Driven with Selenium over Debian's ``chromium`` and ``chromium-driver`` (installed by the set-up
script), both named by path so Selenium Manager never runs and nothing is installed or downloaded
here. Every wait is a bounded ``WebDriverWait`` on a condition. Screenshots go to the test's tmp
dir and /tmp/station-screens.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.mouse_button import MouseButton
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.wait import WebDriverWait
from station_http import Client
from station_pki import HAVE_OPENSSL, make_pki, spki_sha256
from station_scene import BLOCK, PART_ROI, is_defective, read_video, write_video

from anomalygpt_edge.runtime.web.auth import UserStore
from anomalygpt_edge.runtime.web.server import WebConfig

SCREENS = Path("/tmp/station-screens")
VIDEO_FRAMES = 40
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: Flags for a quiet, private, disposable browser that talks to nothing but the page under test.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)

_needed = (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER), ("openssl", HAVE_OPENSSL))
_missing = [pkg for pkg, found in _needed if not found]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"browser test needs Debian package(s) {' '.join(_missing)}: apt-get install -y chromium chromium-driver",
)


class VerdictSubscriber:
    """A PLC stand-in: a separate MQTT client recording the verdict ids the daemon publishes."""

    def __init__(self, host: str, port: int, protocol: str, topic: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.ids: set[str] = set()
        self.ready = threading.Event()
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=version)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = lambda c, u, m: self.ids.add(json.loads(m.payload)["id"])
        self.client.connect(host, port, 10)
        self.client.loop_start()
        assert self.ready.wait(10), "subscriber could not subscribe"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and the station's certificate for 127.0.0.1 (the page is served over HTTPS)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def station(default_bundle_dir, tmp_path, pki):
    """The line daemon running from a config: cam1 replays good parts, cam2 a line with defective
    blocks, both bound to a recipe that does not exist yet; a local MQTT broker; the station page
    over HTTPS with the test CA's certificate."""
    from anomalygpt_edge.runtime.line.config import load_config
    from anomalygpt_edge.runtime.line.daemon import Daemon
    from anomalygpt_edge.runtime.tools.local_broker import start_local_broker
    from anomalygpt_edge.runtime.web.daemon_station import attach

    good = write_video(tmp_path / "line1-good.avi", VIDEO_FRAMES, mixed=False, seed0=0)
    mixed = write_video(tmp_path / "line2-mixed.avi", VIDEO_FRAMES, mixed=True, seed0=1000)
    broker = start_local_broker()
    protocol = broker.protocols[0]
    binding = {"recipe": "plate-a", "trigger": "free_run", "fps": 4, "deadline_ms": 3000}
    config = {
        "device": {"id": "station-test"},
        "cameras": {
            "cam1": {"type": "video_file", "source": str(good), "fps": 10, "loop": True},
            "cam2": {"type": "video_file", "source": str(mixed), "fps": 10, "loop": True},
        },
        "recipes": [{"camera": "cam1", **binding}, {"camera": "cam2", **binding}],
        "engines": {"bundle": str(default_bundle_dir), "backend": "onnxruntime"},
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": protocol, "keepalive": 10},
        "storage": {"store": str(tmp_path / "store"), "data": str(tmp_path / "state")},
        "llm": {"enabled": _llm_installed(), "threads": 1},
    }
    (tmp_path / "line.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    plc = VerdictSubscriber(broker.host, broker.port, protocol, "anomalygpt/station-test/+/verdict")
    daemon = Daemon(load_config(tmp_path / "line.yaml")).start()
    UserStore(tmp_path / "users.json").set("tina", "technician", "tina-password")
    web = WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0,
                    tls_cert=pki / "server.pem", tls_key=pki / "server.key")  # fmt: skip
    server, st = attach(daemon, web)
    yield server, st, plc
    server.stop()
    st.stop()
    daemon.stop()
    plc.close()
    broker.stop()


def _llm_installed() -> bool:
    """Whether the embedded SmolLM2 model ([llm] extra) is installed: ask then uses it."""
    try:
        from anomalygpt_edge.runtime.explain.explainer import default_model_path

        default_model_path()
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - no model: the station answers with the verdict's sentence
        return False
    return True


class Browser:
    """One headless Chromium session through Selenium, with the few steps the test repeats."""

    def __init__(self, driver: webdriver.Chrome):
        self.driver = driver

    def get(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 20, every: float = 0.2) -> Any:
        """Poll ``cond`` until truthy and return its value; fail naming ``what`` after ``timeout`` s.

        A WebDriver error while polling (an element the page is re-rendering, a script reading one
        not there yet) counts as "not yet", as a condition that is still false.
        """
        waiter = WebDriverWait(self.driver, timeout, poll_frequency=every, ignored_exceptions=(WebDriverException,))
        try:
            return waiter.until(lambda _driver: cond())
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({self._notice()})") from None

    def _notice(self) -> str:
        """What the page last told the technician (its toast), for a failure message."""
        try:
            SCREENS.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(SCREENS / "timed-out.png"))
            return "page notice: " + repr(self.js("return (document.querySelector('#toast') || {}).textContent"))
        except WebDriverException as exc:
            return f"page unreadable: {exc.msg}"

    def click(self, css: str) -> None:
        """Click the element ``css`` names; found again if the page re-rendered it in between."""
        waiter = WebDriverWait(self.driver, 5, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))

        def clicked(driver: webdriver.Chrome) -> bool:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return True

        waiter.until(clicked)

    def type(self, css: str, text: str) -> None:
        element = self.driver.find_element(By.CSS_SELECTOR, css)
        element.clear()
        element.send_keys(text)

    def login(self, url: str, user: str, password: str) -> None:
        """Open the live page at ``url``, log in through the form and wait for the live page."""
        self.get(url + "/#live")
        self.wait("the login form", lambda: self.js("return !document.querySelector('#page-login').hidden"))
        self.type("#login-user", user)
        self.type("#login-pass", password)
        self.click("#login-btn")
        self.wait("the live page", lambda: self.js("return !document.querySelector('#page-live').hidden"))

    def upload(self, css: str, path: Path) -> None:
        """Choose a file in an ``<input type=file>`` (chromedriver sends the local path)."""
        self.driver.find_element(By.CSS_SELECTOR, css).send_keys(str(path))

    def drag(self, x0: float, y0: float, x1: float, y1: float, steps: int = 8) -> None:
        """Press the left button at (x0, y0), move to (x1, y1) in steps, release (viewport pixels)."""
        mouse = PointerInput(interaction.POINTER_MOUSE, "mouse")
        actions = ActionBuilder(self.driver, mouse=mouse)
        mouse.create_pointer_move(duration=0, x=round(x0), y=round(y0), origin="viewport")
        mouse.create_pointer_down(button=MouseButton.LEFT)
        for i in range(1, steps + 1):
            t = i / steps
            mouse.create_pointer_move(
                duration=30, x=round(x0 + (x1 - x0) * t), y=round(y0 + (y1 - y0) * t), origin="viewport"
            )
        mouse.create_pointer_up(MouseButton.LEFT)
        actions.perform()
        actions.clear_actions()

    def screenshot(self, path: Path) -> Path:
        assert self.driver.save_screenshot(str(path)), path
        return path


def _no_selenium_manager(*args: Any, **kwargs: Any) -> dict:
    raise AssertionError("Selenium Manager must not run: the driver and browser are named by path")


@pytest.fixture()
def browser(tmp_path, monkeypatch, pki):
    # Selenium Manager would look drivers up on the network; with both paths given it is skipped,
    # and these make sure it would stay offline and quiet even if it were not.
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Chromium trusts exactly the station's key (by its SPKI hash), not every certificate; the flag
    # needs a --user-data-dir of its own to take effect.
    trust = f"--ignore-certificate-errors-spki-list={spki_sha256(pki / 'server.pem')}"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", trust):
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(60)
    yield Browser(driver)
    driver.quit()


def _finish_status(b: Any) -> str | None:
    """The enrollment status once a finish has ended (LIVE, or NOT live with the reason), else None."""
    if not b.js("return document.querySelector('#enroll-busy').hidden"):
        return None
    status = b.js("return document.querySelector('#enroll-status').textContent")
    return status if ("LIVE" in status or "NOT live" in status) else None


def _flagged(b: Browser) -> list[str]:
    return b.js("return [...document.querySelectorAll('#enroll-samples .sample.flagged')].map(e => e.dataset.name)")


def _remove_flagged(b: Browser, rounds: int = 3) -> list[str]:
    """Remove flagged golden samples as a technician would, re-reading the check after each round
    (a removal re-runs it); returns every name removed. Fails when samples are still flagged
    after ``rounds`` rounds: the check would then be chasing part-to-part variation."""
    removed: list[str] = []
    for _round in range(rounds):
        flagged = _flagged(b)
        if not flagged:
            return removed
        for name in flagged:
            b.click(f'.sample[data-name="{name}"] button.remove')
            b.wait(
                f"{name} to be removed",
                lambda name=name: not b.js(f"return !!document.querySelector('.sample[data-name=\"{name}\"]')"),
            )
            b.wait("the wizard to be idle", lambda: b.js("return document.querySelector('#enroll-busy').hidden"))
        removed += flagged
    assert not _flagged(b), f"still flagged after removing {removed}: {_flagged(b)}"
    return removed


def _shot(b: Browser, tmp_path: Path, name: str) -> None:
    path = b.screenshot(tmp_path / name)
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENS / name)


def _img_loaded(b: Browser, css: str) -> bool:
    return bool(b.js(f"const i = document.querySelector({css!r}); return !!i && i.complete && i.naturalWidth > 0;"))


def test_enrollment_in_the_browser_then_the_line_reports_verdicts(station, browser, tmp_path, pki):
    server, st, plc = station
    b = browser
    assert server.url.startswith("https://")
    b.login(server.url, "tina", "tina-password")
    b.wait(
        "live frames of both cameras",
        lambda: _img_loaded(b, "#cam-cam1 img.live-frame") and _img_loaded(b, "#cam-cam2 img.live-frame"),
    )
    assert b.js("return location.protocol") == "https:"
    # The live view is one MJPEG stream per camera, not polled JPEGs.
    assert "/api/cameras/cam1/live.mjpg" in b.js("return document.querySelector('#cam-cam1 img.live-frame').src")
    b.wait("both cameras' MJPEG streams", lambda: len(server.state.live.streams()) == 2)

    # Enrollment wizard: new recipe on cam1, ROI dragged on the live image.
    b.click('nav a[href="#enroll"]')
    b.wait("the enrollment page", lambda: b.js("return !document.querySelector('#page-enroll').hidden"))
    # Leaving the live view closes its streams: no frames are encoded for a page nobody looks at.
    b.wait("the live streams to close", lambda: not server.state.live.streams())
    b.type("#enroll-recipe-new", "plate-a")
    b.wait(
        "a camera frame on the ROI canvas",
        lambda: b.js("return document.querySelector('#enroll-canvas').width === 320"),
    )
    rect = b.js(
        "const c = document.querySelector('#enroll-canvas'); c.scrollIntoView({block: 'center'});"
        "const r = c.getBoundingClientRect(); return [r.left, r.top, r.width / c.width, r.height / c.height];"
    )
    left, top, sx, sy = rect
    x, y, w, h = PART_ROI
    b.drag(left + x * sx, top + y * sy, left + (x + w) * sx, top + (y + h) * sy)
    roi = b.js("return S.roi")
    assert roi and all(abs(a - e) <= 2 for a, e in zip(roi, PART_ROI)), roi
    b.click("#enroll-start")
    b.wait(
        "the recipe to be created",
        lambda: "recipe plate-a" in b.js("return document.querySelector('#enroll-current').textContent"),
    )

    # Capture golden parts one by one from the camera, until 12 are enrolled. The good line is a
    # 4 s looping video: on a busy machine a capture can land on a frame already enrolled, which the
    # station skips (same image, same sha256) with a notice; that click simply does not add a sample.
    wanted, captures = 12, 0
    cam1 = st.daemon.cameras["cam1"]

    def enrolled() -> int:
        return b.js("return document.querySelectorAll('#enroll-samples .sample').length")

    while enrolled() < wanted:
        assert captures < 3 * wanted, f"only {enrolled()} samples after {captures} captures"
        before = enrolled()
        b.js("document.querySelector('#toast').textContent = ''; return true")  # no stale notice
        b.click("#enroll-capture")
        captures += 1
        b.wait(
            f"capture {captures} to finish",
            lambda before=before: (
                b.js("return !document.querySelector('#enroll-capture').disabled")
                and (
                    enrolled() > before
                    or "already enrolled" in b.js("return document.querySelector('#toast').textContent")
                )
            ),
        )
        # The next capture must see another frame of the 10 fps line: wait until one has come.
        seen = cam1.frames
        b.wait("a new frame of cam1", lambda seen=seen: cam1.frames >= seen + 2, timeout=10, every=0.05)
    assert enrolled() == wanted

    # Upload a defective part by mistake: the quality check must flag it, the technician removes it.
    bad_frame = read_video(tmp_path / "line2-mixed.avi")[BLOCK]
    assert is_defective(BLOCK, mixed=True)
    bad_png = tmp_path / "defective-part.png"
    assert cv2.imwrite(str(bad_png), bad_frame)
    b.upload("#enroll-upload", bad_png)
    b.wait(
        "the uploaded sample",
        lambda: b.js("return !!document.querySelector('.sample[data-name=\"defective-part.png\"]')"),
    )
    b.wait("the wizard to be idle", lambda: b.js("return document.querySelector('#enroll-busy').hidden"))
    flagged = b.js("return [...document.querySelectorAll('.sample.flagged')].map(e => e.dataset.name)")
    assert "defective-part.png" in flagged, flagged
    assert "FAILED" in b.js("return document.querySelector('#enroll-quality').textContent")
    _shot(b, tmp_path, "2-enrollment-flagged.png")
    # A technician removes what is flagged until nothing is: with the defective part gone the
    # check is re-run on a tighter set, which can flag a golden that was masked by it before.
    removed = _remove_flagged(b)
    assert "defective-part.png" in removed, removed
    assert enrolled() >= wanted - 3, f"the check removed {removed} of {wanted} goldens"

    # Finish: bank and automatic threshold, explained in plain words; cam1 goes live.
    b.click("#enroll-finish")
    status = b.wait(
        "the enrollment result",
        lambda: b.js("const e = document.querySelector('#enroll-status'); return e && e.textContent"),
    )
    assert "is LIVE on camera cam1" in status, status
    explained = b.js("return document.querySelector('#enroll-threshold').textContent")
    assert explained.startswith("Threshold ") and "golden-sample scores" in explained and "%" in explained
    recipe = st.recipe("plate-a")
    assert recipe["live"] and recipe["k"] >= 5 and recipe["roi"] == roi
    _shot(b, tmp_path, "3-enrollment.png")

    # Put the recipe on the second line camera from the live view.
    b.click('nav a[href="#live"]')
    b.wait(
        "the recipe picker of cam2",
        lambda: b.js("return [...document.querySelectorAll('#assign-cam2 option')].some(o => o.value === 'plate-a')"),
    )
    b.js("document.querySelector('#assign-cam2').value = 'plate-a'")
    b.click("#assign-btn-cam2")
    b.wait(
        "cam2 to inspect with plate-a",
        lambda: any(c["name"] == "cam2" and c["recipe"] == "plate-a" and c["live"] for c in st.cameras()),
    )

    # The verdicts that follow: every defective part NG, good parts (nearly all) OK.
    api = Client(server.url, ssl.create_default_context(cafile=str(pki / "ca.pem")))
    api.login("tina", "tina-password")

    def enough() -> list[dict] | None:
        # Judge on a fair sample: at least 20 good and 10 defective parts seen by cam2.
        rows = api.get("/api/history?camera=cam2&limit=1000").json()
        bad = sum(is_defective((r["frame_seq"] - 1) % VIDEO_FRAMES, mixed=True) for r in rows)
        return rows if bad >= 10 and len(rows) - bad >= 20 else None

    rows = b.wait("verdicts from cam2", enough, timeout=40, every=0.5)
    truth = [is_defective((r["frame_seq"] - 1) % VIDEO_FRAMES, mixed=True) for r in rows]
    escapes = [r["frame_seq"] for r, t in zip(rows, truth) if t and r["verdict"] != "NG"]
    false_rejects = [r["frame_seq"] for r, t in zip(rows, truth) if not t and r["verdict"] == "NG"]
    assert not escapes, f"defective parts passed: frames {escapes}"
    # The page shows what the PLC got: every verdict in the history was published over MQTT.
    b.wait("the PLC to have every verdict the page shows", lambda: {r["id"] for r in rows} <= plc.ids, timeout=10)
    # Few-shot threshold (the page says so): a good part may now and then read NG, but only just
    # above the threshold, while every defect scores far above it.
    ratios = sorted(round(r["score"] / r["threshold"], 2) for r, t in zip(rows, truth) if not t)
    assert len(false_rejects) <= 0.3 * truth.count(False), (
        f"false rejects {false_rejects} of {truth.count(False)}: {ratios}, {st.recipe('plate-a')['quality']}"
    )
    for r, t in zip(rows, truth):
        if t:
            assert r["score"] > 1.6 * r["threshold"], ("defect too close to the threshold", r["frame_seq"], r["score"])
        else:
            assert r["score"] < 1.6 * r["threshold"], ("good part far above the threshold", r["frame_seq"], r["score"])
    cam1 = api.get("/api/history?camera=cam1&limit=1000").json()
    assert cam1, "cam1 inspects with the recipe it was enrolled on"
    assert sum(r["verdict"] == "NG" for r in cam1) <= 0.3 * len(cam1)
    b.wait(
        "the live view to show an NG verdict with its heatmap",
        lambda: (
            b.js("return document.querySelector('#cam-cam2 .badge').textContent !== '–'")
            and _img_loaded(b, "#cam-cam2 img.live-heatmap")
        ),
        timeout=20,
    )
    b.wait(
        "an NG on the live view",
        lambda: b.js("return document.querySelector('#cam-cam2 .badge').textContent === 'NG'"),
        timeout=20,
        every=0.1,
    )
    _shot(b, tmp_path, "1-live.png")

    # History: filter NG on cam2, open one, see image, heatmap, regions and sentence.
    b.click('nav a[href="#history"]')
    b.wait(
        "the history filters",
        lambda: b.js("return [...document.querySelectorAll('#hist-camera option')].some(o => o.value === 'cam2')"),
    )
    b.js("document.querySelector('#hist-camera').value = 'cam2'; document.querySelector('#hist-ng').checked = true;")
    b.click("#hist-refresh")
    b.wait(
        "NG rows",
        lambda: b.js(
            "const r = [...document.querySelectorAll('#hist-table tbody tr[data-verdict]')];"
            "return r.length > 0 && r.every(x => x.dataset.verdict === 'NG')"
        ),
    )
    assert b.js("return document.querySelector('#hist-csv').getAttribute('href')").endswith("limit=100")
    assert "ng=1" in b.js("return document.querySelector('#hist-csv').getAttribute('href')")
    row = "#hist-table tbody tr[data-verdict]"
    if st.daemon.explainer is not None:
        # The daemon's LLM explains NG verdicts after they are published: open one that has its words.
        def explained() -> str | None:
            done = [r for r in api.get("/api/history?camera=cam2&ng=1&limit=200").json() if r.get("explanation")]
            return done[0]["id"] if done else None

        vid = b.wait("an LLM explanation of an NG verdict", explained, timeout=45, every=0.5)
        b.click("#hist-refresh")
        row = f'#hist-table tbody tr[data-id="{vid}"]'
        b.wait("the explained verdict in the table", lambda: b.js(f"return !!document.querySelector('{row}')"))
    b.click(row)
    b.wait(
        "the verdict's image and heatmap",
        lambda: _img_loaded(b, "#hist-detail img.hist-image") and _img_loaded(b, "#hist-detail img.hist-heatmap"),
    )
    sentence = b.js("return document.querySelector('#hist-detail .sentence').textContent")
    assert sentence.startswith("Yes, there"), sentence
    if st.daemon.explainer is not None:
        assert b.js("return document.querySelector('#hist-detail .explanation').textContent") not in ("", "–")
    _shot(b, tmp_path, "4-history.png")

    # Ask about it: the answer streams into the chat.
    b.click("#hist-ask")
    b.wait("the ask page", lambda: b.js("return !document.querySelector('#page-ask').hidden"))
    b.type("#ask-question", "Where is the defect?")
    b.click("#ask-send")
    answer = b.wait(
        "an answer",
        lambda: b.js(
            "if (document.querySelector('#ask-send').disabled) return '';"
            "return (document.querySelector('.msg.bot .answer') || {}).textContent"
        ),
        timeout=60,
    )
    assert answer.strip()
    # A follow-up continues the same conversation (the model keeps its context).
    b.type("#ask-question", "Is the part good?")
    b.click("#ask-send")
    b.wait(
        "the follow-up answer",
        lambda: b.js(
            "const m = document.querySelectorAll('.msg.bot');"
            "if (document.querySelector('#ask-send').disabled) return '';"
            "return m.length === 2 && m[1].querySelector('.answer').textContent"
        ),
        timeout=60,
    )
    turns = b.js("return [...document.querySelectorAll('.msg.bot')].map(m => m.dataset.turn)")
    if st.daemon.explainer is not None:
        # The explanation worker may use the shared model between the two questions; then the
        # station starts the conversation again rather than continue someone else's context.
        assert turns[0] == "first" and turns[1] in ("follow-up", "first"), turns
    _shot(b, tmp_path, "5-ask.png")

    b.click('nav a[href="#system"]')
    b.wait("the system page", lambda: b.js("return !!document.querySelector('#sys-cams tbody tr')"))
    assert "cam2" in b.js("return document.querySelector('#sys-cams').textContent")
    system_text = b.js("return document.querySelector('#sys-body').textContent")
    assert (
        next(iter(st.daemon.bundles.values())).sha256 in system_text
        and "onnxruntime" in system_text
        and "spool depth" in system_text
    )
    b.driver.set_window_size(1400, 1500)  # the whole system page in one shot
    _shot(b, tmp_path, "6-system.png")
    b.driver.set_window_size(1400, 1000)
    # Mark one captured frame defective, paint its region with the brush, and finish again: the
    # defect is listed beside the goldens and the finish step says what to expect in plain words.
    # (The frame shows a good part: this checks the page's path to Enroller.add_defects, not what
    # the head learns, which the HTTP and MQTT defect tests check on real defects.)
    b.click('nav a[href="#enroll"]')
    b.wait("the enrollment page", lambda: b.js("return !document.querySelector('#page-enroll').hidden"))
    golden_before = b.js("return document.querySelectorAll('#enroll-samples .sample').length")
    marked = b.js("return document.querySelector('#enroll-samples .sample').dataset.name")
    b.type("#defect-type", "scratch")
    b.click(f'#enroll-samples .sample[data-name="{marked}"] button.mark')
    b.wait(
        "the brush on the sample",
        lambda: b.js(
            "const c = document.querySelector('#defect-canvas');"
            "return !document.querySelector('#defect-paint').hidden && c.width === S.roi[2] && c.height === S.roi[3]"
        ),
    )
    left, top, width, height = b.js(
        "const c = document.querySelector('#defect-canvas'); c.scrollIntoView({block: 'center'});"
        "const r = c.getBoundingClientRect(); return [r.left, r.top, r.width, r.height];"
    )
    b.drag(left + 0.3 * width, top + 0.3 * height, left + 0.6 * width, top + 0.5 * height)
    assert b.js("return P.painted") is True
    b.click("#defect-save")
    b.wait(
        "the marked sample among the defects",
        lambda: b.js(f"return !!document.querySelector('#defect-list .sample[data-name=\"{marked}\"]')"),
        timeout=120,  # retrains the defect head beside the live line: tens of seconds on 2 shared cores
    )
    b.wait("the wizard to be idle", lambda: b.js("return document.querySelector('#enroll-busy').hidden"))
    assert "painted region" in b.js(
        f"return document.querySelector('#defect-list .sample[data-name=\"{marked}\"]').textContent"
    )
    assert b.js("return document.querySelectorAll('#enroll-samples .sample').length") == golden_before - 1
    defects = st.recipe("plate-a")["defects"]
    assert [(d["name"], d["defect_type"], d["has_mask"]) for d in defects] == [(marked, "scratch", True)]
    goldens = golden_before - 1
    for _attempt in range(3):
        # The first finish's status is still on the page: blank it so only this finish's answer counts.
        b.js("document.querySelector('#enroll-status').textContent = ''")
        b.click("#enroll-finish")
        status = b.wait(
            "the second finish",
            lambda: _finish_status(b),
            timeout=120,  # rebuilds the bank and retrains the head with the labelled defect
        )
        if "NOT live" not in status:
            break
        # The marked part was a good one labelled defective, so the retrained head can flag another
        # golden that looks like it: the technician removes flagged samples, as at the first finish.
        removed = _remove_flagged(b)
        assert removed, status
        goldens -= len(removed)
    assert f"{goldens} golden samples" in status, status
    expect = b.js("return document.querySelector('#enroll-expect').textContent")
    assert "labelled defects" in expect and "false rejects" in expect, expect
    _shot(b, tmp_path, "7-enrollment-defect.png")

    # No page shows a rendering slip to the technician.
    for page in ("#live", "#enroll", "#history", "#ask", "#system"):
        b.click(f'nav a[href="{page}"]')
        text = b.wait(
            f"{page} to render",
            lambda page=page: b.js(
                f"const p = document.querySelector('#page-{page[1:]}'); return !p.hidden && p.innerText"
            ),
        )
        for slip in ("[object", "undefined", "NaN", "\nnull"):
            assert slip not in text, (page, slip)

    audit = [line for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sum('"enroll.capture"' in a for a in audit) == captures
    assert any('"enroll.remove"' in a and "defective-part.png" in a for a in audit)
    assert any('"recipe.assign"' in a and '"cam2"' in a for a in audit)
    assert any('"enroll.defect.add"' in a and f'"from_sample":"{marked}"' in a and '"ok":true' in a for a in audit)
    for name in ("1-live.png", "3-enrollment.png", "4-history.png"):
        assert (tmp_path / name).stat().st_size > 10_000
