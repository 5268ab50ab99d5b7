"""The daemon config: the documented example loads, and each mistake is reported with its line,
its key path and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalygpt_edge.cli import main as cli_main
from anomalygpt_edge.runtime.line.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "config.example.yaml"

VALID = """\
device:
  id: line1
cameras:
  cam1:
    type: video_file
    source: line.avi
recipes:
  - camera: cam1
    recipe: bracket
mqtt:
  port: 1883
"""


def test_the_commented_example_config_loads_with_every_section() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device_id == "press-line-3"
    assert set(cfg.cameras) == {"top", "replay", "inbox"}
    assert cfg.cameras["top"].type == "opencv" and cfg.cameras["top"].gstreamer is False
    assert [r.trigger for r in cfg.recipes] == ["mqtt", "free_run", "folder_watch"]
    assert cfg.recipes[0].roi == (320, 120, 640, 480) and cfg.recipes[0].deadline_ms == 300
    assert cfg.bundle_for(cfg.recipes[1]) == EXAMPLE.parent / "bundles/other"
    assert cfg.mqtt.protocol == "5" and cfg.mqtt.prefix == "anomalygpt" and cfg.mqtt.tls is None
    assert cfg.storage.spool and cfg.llm.enabled is False


def test_defaults_fill_the_optional_sections() -> None:
    cfg = parse_config(VALID, "line.yaml", Path("/plant"))
    assert cfg.cameras["cam1"].source == "/plant/line.avi"
    assert cfg.recipes[0].trigger == "free_run" and cfg.recipes[0].fps == 10.0
    assert cfg.mqtt.host == "localhost" and cfg.mqtt.qos == 1 and cfg.mqtt.max_payload_bytes == 65536


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("  port: 1883", "  port: lots"),
            "line.yaml:11: mqtt.port: must be an integer between 1 and 65535, got 'lots'",
        ),
        (("  port: 1883", "  prot: 1883"), "line.yaml:11: mqtt.prot: unknown key"),
        (
            ("    recipe: bracket", "    recipe: bracket\n    trigger: laser"),
            "line.yaml:10: recipes[0].trigger: must be one of",
        ),
        (("  - camera: cam1", "  - camera: cam9"), "line.yaml:8: recipes[0].camera: no camera 'cam9' in cameras"),
        (("    type: video_file", "    type: webcam"), "line.yaml:5: cameras.cam1.type: must be one of opencv"),
        (("  id: line1", "  id: line/1"), "line.yaml:2: device.id: 'line/1' cannot be an MQTT topic level"),
        (("    source: line.avi\n", ""), "line.yaml:5: cameras.cam1: missing required key 'source'"),
        (("mqtt:\n  port: 1883\n", "mqtt:\n  protocol: 4\n"), "line.yaml:11: mqtt.protocol: must be one of 5, 3.1.1"),
        (
            ("    recipe: bracket", "    recipe: bracket\n    fps: true"),
            "line.yaml:10: recipes[0].fps: must be a number",
        ),
        (
            ("    recipe: bracket", "    recipe: bracket\n    roi: [1, 2, 3]"),
            "line.yaml:10: recipes[0].roi: must be [x, y, w, h]",
        ),
        (
            ("    recipe: bracket", "    recipe: bracket\n    trigger: folder_watch"),
            "folder_watch needs a camera of type image_folder",
        ),
        (("recipes:", "recipez:"), "line.yaml:7: recipez: unknown key"),
        (
            ("  port: 1883", "  password: hunter2"),
            "line.yaml:11: mqtt.password: not accepted in clear; use password_file",
        ),
        (("  port: 1883", "  port: [1883"), "line.yaml:12: not valid YAML"),
    ],
)
def test_a_config_error_names_the_line_the_key_and_the_problem(edit: tuple[str, str], expected: str) -> None:
    text = VALID.replace(*edit)
    assert text != VALID
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line.yaml", Path("/plant"))
    assert expected in str(info.value), str(info.value)


def test_a_missing_section_is_named() -> None:
    with pytest.raises(ConfigError, match="missing required section 'recipes'"):
        parse_config(VALID.split("recipes:")[0], "line.yaml")


def test_run_check_validates_and_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    assert cli_main(["run", "--config", str(good), "--check"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("  port: 1883", "  port: 0"))
    assert cli_main(["run", "--config", str(bad), "--check"]) == 2
    assert "bad.yaml:11: mqtt.port: must be an integer between 1 and 65535, got 0" in capsys.readouterr().err


def test_the_mqtt_password_comes_from_its_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    cfg = parse_config(VALID.replace("  port: 1883", f"  password_file: {secret}"), "line.yaml", tmp_path)
    assert cfg.mqtt.password == "s3cret"
    monkeypatch.setenv("ANOMALYGPT_EDGE_MQTT_PASSWORD", "from-env")
    assert parse_config(VALID, "line.yaml").mqtt.password == "from-env"
    with pytest.raises(ConfigError, match="line.yaml:11: mqtt.password_file: .*does not exist"):
        parse_config(VALID.replace("  port: 1883", "  password_file: /nonexistent/pw"), "line.yaml")
