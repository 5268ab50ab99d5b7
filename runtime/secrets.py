"""Secrets (MQTT password, TLS key password, command token) from files or the environment, never
from the YAML in clear.

A config file is copied around, pasted into tickets and committed to repositories; a password in it
leaks. So the YAML may only *point* at a secret:

* ``<key>_file: /etc/anomalygpt-edge/mqtt-password`` in the same section (a file readable by the
  service only, e.g. a systemd ``LoadCredential=`` or a root-owned 0600 file), or
* the environment: ``ANOMALYGPT_EDGE_<SECTION>_<KEY>`` (set by systemd's ``EnvironmentFile=``),
  or ``ANOMALYGPT_EDGE_<SECTION>_<KEY>_FILE`` naming a file (the Docker/systemd convention).

A secret key (``password``, ``token``, …) with a value in the YAML is refused at start with the
key's path and what to do instead.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Keys whose values are secrets wherever they appear in the config tree.
SECRET_KEYS = frozenset({"password", "token", "key_password", "command_token", "secret", "api_key"})
ENV_PREFIX = "ANOMALYGPT_EDGE_"
#: A secret file larger than this is certainly the wrong file (a key or a certificate, not a password).
MAX_SECRET_BYTES = 64 * 1024

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


class SecretError(ValueError):
    """A secret given in clear, or a secret file/variable that is missing, unreadable or empty."""


def env_var_name(where: str) -> str:
    """The environment variable for a dotted config path: ``mqtt.password`` → ``ANOMALYGPT_EDGE_MQTT_PASSWORD``."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", where).strip("_").upper()


def read_env_file(path: Path | str) -> dict[str, str]:
    """Parse a systemd ``EnvironmentFile``: ``KEY=VALUE`` lines, ``#``/``;`` comments, optional quotes.

    Only the subset the example file uses; lines that are not assignments are refused by number so
    a typo does not silently drop a secret.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"environment file {path}: {exc}") from exc
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            raise SecretError(f"environment file {path}, line {number}: expected KEY=VALUE")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def merged_environment(
    env_files: Iterable[Path | str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment secrets are read from: the files in order, then the process environment on top.

    The process environment wins because under systemd it already holds the ``EnvironmentFile``
    and an operator's explicit override should not be shadowed by a file.
    """
    env: dict[str, str] = {}
    for f in env_files:
        env.update(read_env_file(f))
    env.update(os.environ if environ is None else environ)
    return env


def read_secret_file(path: Path | str, where: str) -> str:
    """A secret's value from a file: trailing newline stripped; missing, empty or huge files refused.

    A file readable by group or others is accepted with a warning (some credential stores hand out
    0640 files), because refusing would stop a line over a permission bit.
    """
    path = Path(path)
    try:
        info = path.stat()
        if info.st_size > MAX_SECRET_BYTES:
            raise SecretError(f"{where}: secret file {path} is {info.st_size} bytes; expected a short secret")
        value = path.read_text().rstrip("\r\n")
    except SecretError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"{where}: cannot read secret file {path}: {exc}") from exc
    if not value:
        raise SecretError(f"{where}: secret file {path} is empty")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: secret file %s is readable by group/others (chmod 600 it)", where, path)
    return value


def find_clear_secrets(tree: Any, path: str = "") -> list[str]:
    """Dotted paths of secret keys that carry a value in ``tree`` (a parsed YAML document)."""
    found: list[str] = []
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and key.lower() in SECRET_KEYS and value not in (None, ""):
                found.append(where)
            else:
                found.extend(find_clear_secrets(value, where))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.extend(find_clear_secrets(value, f"{path}[{i}]"))
    return found


def reject_clear_secrets(tree: Any, source: str = "config") -> None:
    """Raise :class:`SecretError` naming every secret written in clear in ``tree``."""
    found = find_clear_secrets(tree)
    if found:
        hints = "; ".join(f"{w}: use {w.rsplit('.', 1)[-1]}_file: PATH or ${env_var_name(w)}" for w in found)
        raise SecretError(f"{source}: secrets are not accepted in clear in the YAML ({hints})")


def resolve_secret(
    section: Mapping[str, Any] | None,
    key: str,
    where: str,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    required: bool = False,
) -> str | None:
    """The value of secret ``key`` of the config section at dotted path ``where`` (e.g. ``mqtt``).

    Looked up in order: ``<key>_file`` in the section (relative paths against ``base_dir``, the
    config file's folder), ``$ANOMALYGPT_EDGE_<WHERE>_<KEY>``, then ``$…_FILE``. A value for
    ``key`` itself in the section is refused. Returns None when not configured (unless ``required``).
    """
    section = section or {}
    full = f"{where}.{key}" if where else key
    if section.get(key) not in (None, ""):
        raise SecretError(
            f"{full}: secrets are not accepted in clear in the YAML; use {key}_file: PATH "
            f"or the environment variable {env_var_name(full)} (see systemd/anomalygpt-edge.env)"
        )
    env = os.environ if env is None else env
    file_ref = section.get(f"{key}_file")
    if file_ref not in (None, ""):
        if not isinstance(file_ref, (str, os.PathLike)):
            raise SecretError(f"{full}_file: must be a file path, got {type(file_ref).__name__}")
        path = Path(file_ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return read_secret_file(path, f"{full}_file")
    var = env_var_name(full)
    if env.get(var):
        return env[var]
    if env.get(var + "_FILE"):
        return read_secret_file(env[var + "_FILE"], var + "_FILE")
    if required:
        raise SecretError(f"{full}: required secret not set; give {key}_file: PATH or set {var} (or {var}_FILE)")
    return None
