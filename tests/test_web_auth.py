"""Station users, password hashing, sessions, login throttling, the web-user command and the audit log."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
from pathlib import Path

import faults  # tests/faults.py: bounded polling
import pytest

from anomalygpt_edge.runtime.web import auth
from anomalygpt_edge.runtime.web.audit import AuditLog
from anomalygpt_edge.runtime.web.auth import AuthError, Sessions, User, UserStore, hash_password, verify_password


def _wait_for_a_later_mtime(path: Path) -> None:
    """Wait until a file written now gets a later mtime than ``path`` has: file systems stamp files
    from a coarse clock, and UserStore sees a change on disk by its mtime."""
    probe = path.with_name(path.name + ".clock")

    def stamped_later() -> bool:
        probe.touch()
        return probe.stat().st_mtime_ns > path.stat().st_mtime_ns

    try:
        assert faults.wait_until(stamped_later, 5), f"the file system clock did not move past {path}'s mtime"
    finally:
        probe.unlink(missing_ok=True)


def test_password_hash_is_salted_scrypt_and_verifies_only_the_right_password():
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a["algo"] == "scrypt" and a["n"] >= 2**14
    assert a["salt"] != b["salt"] and a["hash"] != b["hash"], "same password, different salt, different hash"
    assert verify_password("correct horse", a) and verify_password("correct horse", b)
    assert not verify_password("correct horsE", a)
    assert not verify_password("", a)
    assert not verify_password("correct horse", {**a, "algo": "md5"})
    assert not verify_password("correct horse", {"algo": "scrypt", "salt": "zz"})


def test_users_file_is_private_and_never_holds_the_password(tmp_path: Path):
    users = UserStore(tmp_path / "web" / "users.json")
    users.set("alice", "technician", "s3cret-password")
    text = (tmp_path / "web" / "users.json").read_text()
    assert "s3cret-password" not in text
    assert stat.S_IMODE(os.stat(tmp_path / "web" / "users.json").st_mode) == 0o600
    assert users.authenticate("alice", "s3cret-password") == User("alice", "technician")
    assert users.authenticate("alice", "wrong-password") is None
    assert users.authenticate("bob", "s3cret-password") is None
    # Another process (the web-user command) changing the file is seen without a restart.
    _wait_for_a_later_mtime(users.path)
    UserStore(users.path).set("alice", "admin", "another-password")
    assert users.authenticate("alice", "another-password") == User("alice", "admin")
    assert users.authenticate("alice", "s3cret-password") is None


@pytest.mark.parametrize(
    ("name", "role", "password", "message"),
    [
        ("", "operator", "longenough", "invalid"),
        ("a/b", "operator", "longenough", "invalid"),
        ("carol", "root", "longenough", "role"),
        ("carol", "operator", "short", "at least 8"),
    ],
)
def test_users_file_refuses_bad_names_roles_and_short_passwords(tmp_path, name, role, password, message):
    with pytest.raises(AuthError, match=message):
        UserStore(tmp_path / "u.json").set(name, role, password)
    assert not (tmp_path / "u.json").exists()


def test_roles_are_ordered_viewer_operator_technician_admin():
    assert auth.ROLES == ("viewer", "operator", "technician", "admin")
    assert auth.role_allows("admin", "technician") and auth.role_allows("technician", "operator")
    assert auth.role_allows("operator", "viewer") and auth.role_allows("viewer", "viewer")
    assert not auth.role_allows("operator", "technician") and not auth.role_allows("technician", "admin")
    assert not auth.role_allows("viewer", "operator"), "a viewer only looks: labelling and asking are an operator's"
    assert not auth.role_allows("root", "operator") and not auth.role_allows("root", "viewer")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_are_random_and_end_when_idle_or_logged_out():
    clock = FakeClock()
    sessions = Sessions(idle_timeout_s=0.2, clock=clock)
    a, b = sessions.create(User("u", "operator")), sessions.create(User("u", "operator"))
    assert a.token != b.token and a.csrf != b.csrf and len(a.token) >= 40
    assert sessions.get(a.token) is a
    assert auth.csrf_ok(a, a.csrf) and not auth.csrf_ok(a, b.csrf) and not auth.csrf_ok(a, None)
    sessions.end(a.token)
    assert sessions.get(a.token) is None
    clock.now += 0.19
    assert sessions.get(b.token) is b, "a session seen within the idle timeout stays"
    clock.now += 0.21
    assert sessions.get(b.token) is None, "idle session must expire"
    c = sessions.create(User("v", "admin"))
    assert sessions.end_user("v") == 1 and sessions.get(c.token) is None


def test_login_delay_grows_exponentially_per_address_up_to_a_cap_and_is_forgotten_later():
    clock = FakeClock()
    t = auth.LoginThrottle(clock)
    for i in range(auth.FREE_FAILURES):  # the first few mistakes cost nothing
        assert t.retry_after("10.0.0.5", f"name{i}", False) == (0.0, None)
        t.failed("10.0.0.5", f"name{i}", False)
    waits = []
    for i in range(12):
        wait, why = t.retry_after("10.0.0.5", "another", False)
        assert why == "address"
        waits.append(wait)
        clock.now += wait  # the client waits as told, then fails again
        assert t.retry_after("10.0.0.5", "another", False) == (0.0, None)
        t.failed("10.0.0.5", f"x{i}", False)
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0], "the delay doubles with every failure"
    assert max(waits) == auth.MAX_DELAY_S and waits[-1] == auth.MAX_DELAY_S, "and is capped"
    assert t.retry_after("10.0.0.6", "another", False) == (0.0, None), "other addresses are not slowed"
    clock.now += auth.FAILURE_MEMORY_S + 1
    assert t.retry_after("10.0.0.5", "another", False) == (0.0, None), "old failures are forgotten"


def test_failures_against_a_user_from_elsewhere_never_lock_out_the_user_at_their_own_station():
    clock = FakeClock()
    t = auth.LoginThrottle(clock)
    t.succeeded("10.1.1.1", "alice")  # alice's station
    for i in range(20):  # a distributed guess: one failure per address, so no address is throttled
        t.failed(f"10.9.0.{i}", "alice", True)
        clock.now += 0.01
    wait, why = t.retry_after("10.9.9.9", "alice", True)
    assert why == "user" and 0 < wait <= auth.MAX_DELAY_S, "from a new address alice's name is slowed"
    assert t.retry_after("10.1.1.1", "alice", True) == (0.0, None), "at her own station alice logs in at once"
    clock.now += auth.MAX_DELAY_S
    assert t.retry_after("10.9.9.9", "alice", True) == (0.0, None), "a delay, never a lock"


def test_the_failure_table_is_bounded_and_a_flood_of_made_up_names_evicts_only_the_flooders_own_entries():
    clock = FakeClock()
    t = auth.LoginThrottle(clock)
    t.succeeded("10.1.1.1", "alice")
    for i in range(auth.FREE_FAILURES + 1):  # the victim's name under a distributed guess
        t.failed(f"10.8.0.{i}", "alice", True)
    assert t.retry_after("10.8.9.9", "alice", True)[1] == "user"
    for i in range(3 * auth.MAX_TRACKED_NAMES):  # 12,000 made-up names from one address
        t.failed("10.66.6.6", f"made-up-{i}", False)
    assert t.retry_after("10.66.6.6", "alice", True)[1] == "address", "spraying names is throttled too"
    assert t.tracked()["addresses"] == auth.FREE_FAILURES + 2, "one address, one entry, however many names"
    for i in range(2 * auth.MAX_TRACKED_ADDRESSES):  # and from 8,000 addresses
        t.failed(f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}", f"spray-{i}", False)
    sizes = t.tracked()
    assert sizes["others"] <= auth.MAX_TRACKED_NAMES and sizes["addresses"] <= auth.MAX_TRACKED_ADDRESSES
    assert sizes["users"] == 1
    assert t.retry_after("10.8.9.9", "alice", True)[1] == "user", "the victim's throttle survived the flood"
    assert t.retry_after("10.1.1.1", "alice", True) == (0.0, None)


def test_ipv6_clients_are_throttled_per_64_prefix():
    assert auth.address_key("2001:db8:1:2:aaaa::1") == auth.address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert auth.address_key("::ffff:10.0.0.1") == "10.0.0.1" and auth.address_key("unix") == "unix"


def _web_user(argv: list[str], stdin: str, monkeypatch) -> int:
    from anomalygpt_edge.runtime.cli import station as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.run_web_user(args)


def test_web_user_command_reads_the_password_from_stdin(tmp_path, monkeypatch, capsys):
    users = tmp_path / "users.json"
    assert (
        _web_user(
            ["web-user", "add", "tom", "--role", "technician", "--users", str(users)], "pw-from-stdin\n", monkeypatch
        )
        == 0
    )
    assert UserStore(users).authenticate("tom", "pw-from-stdin") == User("tom", "technician")
    assert "pw-from-stdin" not in capsys.readouterr().out
    assert (
        _web_user(["web-user", "add", "tom", "--role", "operator", "--users", str(users)], "short\n", monkeypatch) == 2
    )
    assert "at least 8" in capsys.readouterr().err
    assert _web_user(["web-user", "list", "--users", str(users)], "", monkeypatch) == 0
    assert "tom\ttechnician" in capsys.readouterr().out
    assert _web_user(["web-user", "remove", "tom", "--users", str(users)], "", monkeypatch) == 0
    assert UserStore(users).get("tom") is None


def test_audit_log_appends_complete_json_lines_and_skips_a_torn_tail(tmp_path):
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    log.append("alice", "technician", "enroll.add", "bracket", {"ok": True, "k": 3})
    log.append("bob", "admin", "recipe.delete", "bracket", {"ok": True})
    with open(log.path, "ab") as fh:  # a power cut in the middle of a third entry
        fh.write(b'{"ts": "2026-')
    entries = log.entries()
    assert [(e["user"], e["action"], e["target"]) for e in entries] == [
        ("alice", "enroll.add", "bracket"),
        ("bob", "recipe.delete", "bracket"),
    ]
    assert entries[0]["details"] == {"ok": True, "k": 3} and entries[0]["ts"].endswith("+00:00")
    log.append("carol", "technician", "enroll.finish", "bracket")
    assert [e["user"] for e in log.entries()] == ["alice", "bob", "carol"], "an entry after a torn line is kept"
    lines = log.path.read_bytes().split(b"\n")
    assert json.loads(lines[0])["role"] == "technician"
