"""Secrets come from files or the environment; a secret written in clear in the YAML is refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from anomalygpt_edge.runtime.secrets import (
    SecretError,
    env_var_name,
    find_clear_secrets,
    merged_environment,
    read_env_file,
    reject_clear_secrets,
    resolve_secret,
)

REPO = Path(__file__).resolve().parents[1]


def secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_password_in_clear_in_the_yaml_is_refused_naming_the_key_and_the_alternatives() -> None:
    with pytest.raises(SecretError) as err:
        resolve_secret({"host": "broker", "password": "hunter2"}, "password", "mqtt", env={})
    message = str(err.value)
    assert "mqtt.password" in message and "password_file" in message and "ANOMALYGPT_EDGE_MQTT_PASSWORD" in message
    assert "hunter2" not in message


def test_clear_secrets_anywhere_in_the_tree_are_found() -> None:
    tree = yaml.safe_load(
        """
mqtt: {host: b, username: line1, password: x, tls: {key_password: y}}
commands: {token: null}
cameras: [{name: c, url: rtsp://cam, secret: z}]
"""
    )
    assert find_clear_secrets(tree) == ["mqtt.password", "mqtt.tls.key_password", "cameras[0].secret"]
    with pytest.raises(SecretError, match="mqtt.password: use password_file"):
        reject_clear_secrets(tree, "line.yaml")
    reject_clear_secrets({"mqtt": {"password_file": "/run/secret", "token": None}})  # references are fine


def test_secret_is_read_from_the_file_named_in_the_section_relative_to_the_config(tmp_path: Path) -> None:
    secret_file(tmp_path, "s3cret\n")
    value = resolve_secret({"password_file": "secret"}, "password", "mqtt", env={}, base_dir=tmp_path)
    assert value == "s3cret"


def test_secret_comes_from_the_environment_variable_or_its_file_variant(tmp_path: Path) -> None:
    assert resolve_secret({}, "password", "mqtt", env={"ANOMALYGPT_EDGE_MQTT_PASSWORD": "fromenv"}) == "fromenv"
    path = secret_file(tmp_path, "fromfile")
    env = {"ANOMALYGPT_EDGE_MQTT_PASSWORD_FILE": str(path)}
    assert resolve_secret({}, "password", "mqtt", env=env) == "fromfile"
    assert resolve_secret({}, "password", "mqtt", env={}) is None


def test_a_missing_required_secret_says_how_to_provide_it() -> None:
    with pytest.raises(SecretError, match="ANOMALYGPT_EDGE_COMMANDS_TOKEN"):
        resolve_secret({}, "token", "commands", env={}, required=True)


@pytest.mark.parametrize("content", ["", "\n"])
def test_an_empty_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    path = secret_file(tmp_path, content)
    with pytest.raises(SecretError, match="empty"):
        resolve_secret({"password_file": str(path)}, "password", "mqtt", env={})


def test_a_missing_secret_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="nope"):
        resolve_secret({"password_file": str(tmp_path / "nope")}, "password", "mqtt", env={})


def test_a_wrongly_typed_file_reference_is_refused() -> None:
    with pytest.raises(SecretError, match="file path"):
        resolve_secret({"password_file": 42}, "password", "mqtt", env={})


def test_a_group_readable_secret_file_is_accepted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = secret_file(tmp_path, "pw", mode=0o644)
    with caplog.at_level(logging.WARNING):
        assert resolve_secret({"password_file": str(path)}, "password", "mqtt", env={}) == "pw"
    assert "chmod 600" in caplog.text


def test_env_file_parsing_handles_comments_quotes_and_export(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("# comment\n; also\n\nA=1\nexport B = 'two words'\nC=\"x=y\"\n")
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "x=y"}
    path.write_text("A=1\nthis is not an assignment\n")
    with pytest.raises(SecretError, match="line 2"):
        read_env_file(path)


def test_process_environment_overrides_the_env_file(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("ANOMALYGPT_EDGE_MQTT_PASSWORD=file\nOTHER=1\n")
    env = merged_environment([path], environ={"ANOMALYGPT_EDGE_MQTT_PASSWORD": "process"})
    assert env == {"ANOMALYGPT_EDGE_MQTT_PASSWORD": "process", "OTHER": "1"}


def test_env_var_names_follow_the_config_path() -> None:
    assert env_var_name("mqtt.tls.key_password") == "ANOMALYGPT_EDGE_MQTT_TLS_KEY_PASSWORD"


def test_the_shipped_environment_file_parses_and_holds_no_real_secret() -> None:
    env = read_env_file(REPO / "systemd" / "anomalygpt-edge.env")
    assert all(k.startswith(("ANOMALYGPT_EDGE_", "PYTHON")) for k in env)
    assert not any(k.endswith(("PASSWORD", "TOKEN")) and v for k, v in env.items())
