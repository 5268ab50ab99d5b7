"""The systemd units pass `systemd-analyze verify` without a single warning, and carry the settings
the daemon relies on (notify + watchdog, restart, hardening with the data directory writable)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = ("anomalygpt-edge.service", "anomalygpt-edge-engines.service")
INSTALLED_EXE = "/opt/anomalygpt-edge/.venv/bin/anomalygpt-edge"
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian package: systemd)"
)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]  # systemd keys are case-sensitive
    parser.read(REPO / "systemd" / name)
    return parser


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt package systemd)"
)
def test_units_pass_systemd_analyze_verify_with_no_warnings(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists, so point it at this checkout's entry point.
    exe = Path(sys.executable).with_name("anomalygpt-edge")
    assert exe.is_file(), f"{exe} missing: install the package (pip install -e .)"
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        assert INSTALLED_EXE in text
        (tmp_path / name).write_text(text.replace(INSTALLED_EXE, str(exe)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *UNITS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and unparsable values; those are failures for us.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "anomalygpt-edge" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt package systemd)"
)
def test_verify_does_catch_a_misspelt_key(tmp_path: Path) -> None:
    # Guards the test above: a typo in a hardening key must show up in verify's output.
    exe = Path(sys.executable).with_name("anomalygpt-edge")
    text = (REPO / "systemd" / UNITS[0]).read_text().replace(INSTALLED_EXE, str(exe))
    (tmp_path / UNITS[0]).write_text(text.replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", UNITS[0]], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "ProtectSystm" in result.stdout + result.stderr


def test_daemon_unit_is_notify_with_watchdog_restart_and_hardening() -> None:
    s = unit(UNITS[0])["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and s["WatchdogSec"] == "30s"
    assert s["Restart"] == "on-failure"
    assert s["ProtectSystem"] == "strict" and s["ReadWritePaths"] == "/var/lib/anomalygpt-edge"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == "yes", key
    assert s["BindPaths"] == "-/tmp/argus_socket"  # Jetson CSI cameras despite PrivateTmp
    assert "video" in s["SupplementaryGroups"].split()
    # Options that would cut the daemon off its cameras or GPU.
    for key in ("PrivateDevices", "ProtectClock", "DevicePolicy", "MemoryDenyWriteExecute"):
        assert key not in s, f"{key} blocks cameras/GPU (see systemd/README.md)"
    assert s["EnvironmentFile"] == "-/etc/anomalygpt-edge/anomalygpt-edge.env"
    assert s["ExecStart"].startswith(INSTALLED_EXE + " run --config ")


def test_engines_oneshot_runs_export_engines_before_the_daemon() -> None:
    u = unit(UNITS[1])
    assert u["Service"]["Type"] == "oneshot"
    assert u["Service"]["ExecStart"] == f"{INSTALLED_EXE} export engines --bundle /var/lib/anomalygpt-edge/bundle"
    assert u["Unit"]["Before"] == "anomalygpt-edge.service"
    daemon = unit(UNITS[0])["Unit"]
    assert "anomalygpt-edge-engines.service" in daemon["After"] and "anomalygpt-edge-engines.service" in daemon["Wants"]


def test_export_engines_command_in_the_oneshot_exists() -> None:
    from anomalygpt_edge.cli import build_parser

    args = build_parser().parse_args(["export", "engines", "--bundle", "/var/lib/anomalygpt-edge/bundle"])
    assert args.handler == "anomalygpt_edge.export.tensorrt_build:run"
