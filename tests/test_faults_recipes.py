"""Issue 12 rows 2, 11 and 4 end to end: the real daemon, a real mosquitto, real recipe files.

* rows 2 and 11: a recipe whose bank is full of NaN (with a matching ``recipe.json`` record), has
  the wrong feature width, differs from its recorded sha256, or whose ``bank_file`` is
  ``../../../etc/passwd``, met at start-up or switched to over MQTT: the daemon refuses it with
  one error naming the file, says ``degraded`` with that reason, answers every triggered part
  ``ERROR`` with it within the deadline (never OK), keeps running, and serves again once a good
  recipe is put back;
* row 4: one recipe enrolled from the technician station and over MQTT at the same moment, round
  after round: every file the committed recipe names exists, the recipe can be rebuilt, no
  acknowledged frame is lost, and each reply's ``k`` is the recipe as that writer committed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faults  # tests/faults.py
import pytest
from daemon_fixtures import broker_fixture, line_fixture  # noqa: F401 - fixtures are used by name

from anomalygpt_edge.runtime.tools import fault_bench


def _rig(broker: Any, line: dict) -> fault_bench.Rig:
    return fault_bench.Rig(broker.host, broker.port, line["store"], line["bundle"], line["video"])


@pytest.mark.parametrize("when", ["start", "switch"])
def test_a_damaged_recipe_is_refused_naming_the_file_and_every_part_is_an_error_never_ok(
    tmp_path: Path, broker: Any, line: dict, when: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = fault_bench.recipe_faults(_rig(broker, line), tmp_path, when)
    faults.report(capsys, *(f"{r['fault']}: {r}" for r in rows))
    assert [r["fault"] for r in rows] == [f"recipe_{k}_{when}" for k in fault_bench.RECIPE_KINDS]
    for r in rows:
        why = r["fault"]
        assert r["ok_answers"] == 0, f"{why}: a part was answered OK by a refused recipe"
        assert r["answered"] == r["sent"] == r["in_time"] == 5, (why, r["latency_ms"])
        assert r["errors"] == r["errors_with_reason"] == 5, f"{why}: ERROR naming the file and the reason: {r}"
        assert r["refusal_names_file"], f"{why}: the refusal must name the file: {r['refusal']}"
        assert r["status_says"] and r["state"] == "degraded", f"{why}: the status says why"
        assert r["lost"] == 0 and r["duplicates"] == 0, why
        assert r["switch_back_ok"] and r["recovery_s"] is not None and r["recovery_s"] <= 5.0, why
        assert r["daemon_alive"], f"{why}: a damaged recipe killed a thread"
        assert r["online_at_end"], "with good recipes back the status clears by itself"


def test_the_station_and_mqtt_enrolling_one_recipe_at_once_lose_nothing_and_reply_what_they_committed(
    tmp_path: Path, broker: Any, line: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    r = fault_bench.racing_enroll(_rig(broker, line), tmp_path, rounds=3)
    faults.report(capsys, f"racing enrollment: {r}")
    assert r["problems"] == [], r["problems"]
    assert r["answered"] == r["sent"], "every MQTT enroll command was answered"
    assert r["acknowledged_frames"] == 3 * 3 and r["lost"] == 0
    assert r["rebuilt"] == r["rounds"] == 3, "the recipe stays editable"
    for round_k in r["k"]:
        assert round_k["final"] == max(round_k["mqtt"], round_k["station"]), round_k
