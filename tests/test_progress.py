"""Progress of long command-line work: plain counted lines off a terminal, a tqdm bar on one, never in the daemon."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anomalygpt_edge
from anomalygpt_edge import progress
from anomalygpt_edge.progress import Progress
from anomalygpt_edge.runtime.inspection.memory_bank import greedy_coreset
from anomalygpt_edge.runtime.recipes.enrollment import Enroller

ROOT = Path(anomalygpt_edge.__file__).parent
#: Everything the line daemon (and the station it serves) is made of: none of it may show progress.
DAEMON_ROOMS = ("runtime/line", "runtime/delivery", "runtime/cameras", "runtime/inspection", "runtime/recipes",
                "runtime/web", "engines")  # fmt: skip


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.MODE_ENV, raising=False)


def test_not_a_terminal_gives_one_plain_line_per_step_with_counts() -> None:
    out = io.StringIO()
    with Progress(4, "enroll: encoding", "image", stream=out) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [
        "[enroll: encoding] 1/4 images (25%)",
        "[enroll: encoding] 2/4 images (50%)",
        "[enroll: encoding] 3/4 images (75%)",
        "[enroll: encoding] 4/4 images (100%)",
    ]
    assert all("ETA" in ln for ln in lines[:3]) and "ETA" not in lines[3]  # nothing left to estimate at the end
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no bar redraws in a journal


def test_a_long_run_is_thinned_to_about_twenty_lines_ending_at_the_total() -> None:
    out = io.StringIO()
    with Progress(1000, "evaluate", "image", stream=out) as bar:
        for _ in range(1000):
            bar.update(note="x")
    lines = out.getvalue().splitlines()
    assert len(lines) <= progress.PLAIN_LINES + 1
    assert lines[-1].startswith("[evaluate] 1000/1000 images (100%)") and lines[-1].endswith(": x")


def test_the_callback_form_moves_to_done_of_total() -> None:
    out = io.StringIO()
    bar = Progress(None, "archive export", "row", stream=out)
    bar.report(2, 3)  # the total becomes known with the first row
    bar.report(3, 3)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("[archive export] 3/3 rows (100%)")


def test_a_terminal_gets_a_tqdm_bar_with_counts() -> None:
    out = _Terminal()
    with Progress(3, "export", "step", stream=out) as bar:
        for _ in range(3):
            bar.update()
    text = out.getvalue()
    assert "export" in text and "3/3" in text and "\r" in text  # tqdm redraws its line
    assert "[export] 1/3" not in text  # not the plain lines


def test_off_in_the_environment_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.MODE_ENV, "off")
    out = _Terminal()
    with Progress(3, "export", stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_a_note_while_a_bar_is_open_goes_above_it(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _Terminal()
    with Progress(2, "export", stream=out) as bar:
        progress.note("[export] exporting encoder ...", out)
        bar.update(2)
    assert "[export] exporting encoder ...\n" in out.getvalue()
    assert not progress._open_bars  # closed bars are forgotten


class _Pipeline:
    """Stands in for VisionPipeline.encode: one feature row per prepared image, its index."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode(self, prepared: list[int]) -> dict[str, np.ndarray]:
        self.batches.append(len(prepared))
        return {"layer": np.array(prepared, np.float32)[:, None]}


def test_enrollment_reports_each_encoded_batch_and_keeps_the_features() -> None:
    enroller = Enroller.__new__(Enroller)  # only the encoding step: no store, no bundle
    enroller.pipeline = _Pipeline()  # type: ignore[assignment]
    heard: list[tuple[str, int, int]] = []

    feats = enroller._encode(list(range(20)), lambda *step: heard.append(step))  # type: ignore[arg-type]

    assert heard == [("encoding", 0, 20), ("encoding", 8, 20), ("encoding", 16, 20), ("encoding", 20, 20)]
    assert feats["layer"][:, 0].tolist() == list(range(20))
    assert enroller._encode(list(range(20)), None)["layer"].shape == (20, 1)  # no callback: one encode call


def test_the_memory_banks_coreset_reports_its_picks_and_picks_the_same() -> None:
    feats = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    heard: list[tuple[int, int]] = []

    picked = greedy_coreset(feats, 1100, on_progress=lambda done, total: heard.append((done, total)))

    assert heard == [(0, 1100), (512, 1100), (1024, 1100), (1100, 1100)]  # 0: the step starts
    assert np.array_equal(picked, greedy_coreset(feats, 1100))  # reporting changes nothing chosen


def test_units_read_as_plurals() -> None:
    out = io.StringIO()
    with Progress(2, "enroll: memory bank", "patch", stream=out) as bar:
        bar.update(2)
    assert out.getvalue().startswith("[enroll: memory bank] 2/2 patches (100%)")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_daemons_modules_never_import_progress_or_tqdm() -> None:
    files = [p for room in DAEMON_ROOMS for p in sorted((ROOT / room).rglob("*.py"))]
    assert len(files) > 30
    offenders = {
        str(p.relative_to(ROOT)): hits
        for p in files
        if (hits := {n for n in _imports(p) if n == "tqdm" or n.startswith(("tqdm.", "anomalygpt_edge.progress"))})
    }
    assert offenders == {}


def test_importing_the_daemon_loads_neither_progress_nor_tqdm() -> None:
    code = (
        "import sys\nimport anomalygpt_edge.runtime.line.daemon\nimport anomalygpt_edge.runtime.web.app\n"
        "print(sorted(m for m in sys.modules if m == 'tqdm' or m == 'anomalygpt_edge.progress'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
