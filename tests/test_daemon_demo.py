"""The README's main command, ``demo``, on a short line: it sets itself up, runs the daemon and
checks what a subscriber that is not our code (``mosquitto_sub``) received; with mosquitto and
with the embedded broker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anomalygpt_edge.cli import main as cli_main


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_the_demo_runs_the_line_and_mosquitto_sub_receives_schema_complete_verdicts(
    broker: str, default_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if broker == "mosquitto" and shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto not installed")
    args = ["demo", "--workdir", str(tmp_path), "--parts", "6", "--bundle", str(default_bundle_dir)]
    rc = cli_main(args + (["--embedded-broker"] if broker == "embedded" else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "defective parts caught: 2 of 2; good parts rejected: 0 of 4" in out
    assert "PLC triggers answered: 1 of 1" in out
    assert "mosquitto_sub -h 127.0.0.1 -p" in out
    if shutil.which("mosquitto_sub"):
        received = [json.loads(line) for line in (tmp_path / "mosquitto_sub.txt").read_text().splitlines() if line]
        assert len(received) >= 30  # 6 parts x 5 frames, plus the triggered part
        assert all(v["schema"] == "anomalygpt-edge/verdict/1" and v["id"] and "latency_ms" in v for v in received)
