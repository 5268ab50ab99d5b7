"""The daemon config: the documented example loads, and each mistake is reported with its line,
its key path and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_fixtures import ONE_CAMERA_CONFIG

from anomalygpt_edge.cli import main as cli_main
from anomalygpt_edge.runtime.line.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "config.example.yaml"

VALID = ONE_CAMERA_CONFIG + "mqtt:\n  port: 1883\n"


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


@pytest.mark.parametrize("name", ["Bracket:v2", "CON", "nul.txt", ".x", "x" * 65])
def test_a_recipe_name_the_store_refuses_is_refused_by_the_config(name: str) -> None:
    from anomalygpt_edge.runtime.recipes.store import RecipeError, check_name

    with pytest.raises(RecipeError) as refused:
        check_name(name)
    with pytest.raises(ConfigError) as info:
        parse_config(VALID.replace("recipe: bracket", f"recipe: '{name}'"), "line.yaml")
    assert f"line.yaml:9: recipes[0].recipe: {refused.value}" in str(info.value)


def test_each_camera_kind_has_its_own_keys_from_its_own_model() -> None:
    from anomalygpt_edge.runtime.cameras.opencv import OpenCVCameraConfig
    from anomalygpt_edge.runtime.cameras.video_file import VideoFileCameraConfig

    cfg = load_config(EXAMPLE)
    assert isinstance(cfg.cameras["top"], OpenCVCameraConfig) and cfg.cameras["top"].width == 1280
    assert isinstance(cfg.cameras["replay"], VideoFileCameraConfig) and cfg.cameras["replay"].loop is True
    with pytest.raises(ConfigError) as info:
        parse_config(VALID.replace("    source: line.avi", "    source: line.avi\n    width: 640"), "line.yaml")
    assert "line.yaml:7: cameras.cam1.width: unknown key; allowed here: fps, loop," in str(info.value)


def test_the_camera_kinds_and_engine_backends_come_from_their_registries() -> None:
    from anomalygpt_edge.engines import base as engines
    from anomalygpt_edge.runtime.cameras import base as cameras

    kinds = ", ".join(cameras.camera_kinds())
    with pytest.raises(ConfigError, match=f"cameras.cam1.type: must be one of {kinds}, got 'webcam'"):
        parse_config(VALID.replace("type: video_file", "type: webcam"), "line.yaml")
    names = ", ".join(["auto", *engines.backend_names()])
    with pytest.raises(ConfigError, match=f"line.yaml:13: engines.backend: must be one of {names}, got 'tpu'"):
        parse_config(VALID + "engines:\n  backend: tpu\n", "line.yaml")
    for name in engines.backend_names():
        assert parse_config(VALID + f"engines:\n  backend: {name}\n").engines.backend.type == name


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("  tls:\n    cert: {pem}\n", "line.yaml:13: mqtt.tls: cert and key go together"),
        ("  tls:\n    ca: /nonexistent/ca.pem\n", "line.yaml:13: mqtt.tls.ca: /nonexistent/ca.pem does not exist"),
        ("  tls:\n    check_hostname: maybe\n", "line.yaml:13: mqtt.tls.check_hostname: must be true or false"),
        ("  port: 1884\n", "line.yaml:12: mqtt.port: duplicate key"),
    ],
)
def test_the_mqtt_sections_own_model_checks_tls_and_keys(tmp_path: Path, extra: str, expected: str) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as info:
        parse_config(VALID + extra.format(pem=pem), "line.yaml", tmp_path)
    assert expected in str(info.value), str(info.value)


def test_cross_field_mistakes_name_the_key_that_is_wrong() -> None:
    two = VALID.replace("mqtt:", "  - camera: cam1\n    recipe: other\nmqtt:")
    with pytest.raises(ConfigError, match=r"line.yaml:10: recipes\[1\].camera: camera 'cam1' already has a recipe"):
        parse_config(two, "line.yaml")
    with pytest.raises(ConfigError, match="line.yaml:4: cameras.cam 1: name 'cam 1' is invalid"):
        parse_config(VALID.replace("  cam1:", "  cam 1:"), "line.yaml")
    with pytest.raises(ConfigError, match="line.yaml:3: cameras: at least one camera is needed"):
        parse_config("device:\n  id: d\ncameras: {}\nrecipes: []\n", "line.yaml")


def test_a_config_naming_the_removed_torch_cuda_backend_says_it_was_removed_and_what_to_use() -> None:
    with pytest.raises(ConfigError, match=r"line.yaml:13: engines.backend: .*removed.*onnxruntime-cuda"):
        parse_config(VALID + "engines:\n  backend: torch-cuda\n", "line.yaml")


def test_kept_recipe_versions_come_from_the_storage_section_and_are_bounded(tmp_path: Path) -> None:
    from anomalygpt_edge.runtime.line.daemon import Daemon

    text = VALID + "storage:\n  keep_versions: 1\n"
    config = parse_config(text, "line.yaml", tmp_path)
    assert config.storage.keep_versions == 1
    assert Daemon(config).store.keep_versions == 1
    assert parse_config(VALID, "line.yaml", tmp_path).storage.keep_versions == 3
    with pytest.raises(ConfigError) as info:
        parse_config(VALID + "storage:\n  keep_versions: -1\n", "line.yaml", tmp_path)
    assert "line.yaml:13: storage.keep_versions: must be an integer between 0 and 100" in str(info.value)
