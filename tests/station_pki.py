"""A throw-away test CA and a server certificate for 127.0.0.1/localhost, made with ``openssl``,
and the base64 SHA-256 of the server key's SPKI (what Chromium's
``--ignore-certificate-errors-spki-list`` trusts: exactly that key, no blanket ignore)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

HAVE_OPENSSL = shutil.which("openssl") is not None


def _run(*args: str, cwd: Path, data: bytes | None = None) -> bytes:
    return subprocess.run(args, cwd=cwd, input=data, check=True, capture_output=True, timeout=60).stdout


def make_pki(d: Path) -> Path:
    """``ca.pem`` and ``server.pem``/``server.key`` (signed by the CA, SAN 127.0.0.1 and localhost) in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=anomalygpt-station-test-ca", cwd=d)  # fmt: skip
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=localhost", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)  # fmt: skip
    return d


def spki_sha256(cert: Path) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo (DER)."""
    pub = _run("openssl", "x509", "-in", str(cert), "-pubkey", "-noout", cwd=cert.parent)
    der = _run("openssl", "pkey", "-pubin", "-outform", "der", cwd=cert.parent, data=pub)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
