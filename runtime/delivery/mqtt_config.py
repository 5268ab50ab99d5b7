"""The MQTT link's settings (the config's ``mqtt`` section): broker, session, TLS and secrets.

Declared here, beside the link that reads them, so the delivery room owns its config model and
the line's config only joins it in (``runtime/line/config.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from anomalygpt_edge.runtime.values import Between, ExistingPath, FieldError, Flag, Text, TopicLevel, as_text

#: MQTT protocol versions the link speaks; ``protocol: 5`` in the YAML reads as the text "5".
Protocol = Annotated[Literal["5", "3.1.1"], BeforeValidator(as_text)]


class TlsConfig(BaseModel):
    """TLS to the broker: a CA, and a client certificate with its key (together, or neither)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: ExistingPath | None = None
    cert: ExistingPath | None = None
    key: ExistingPath | None = None
    check_hostname: Flag = True  # False accepts a broker certificate for another name (test rigs only)

    @model_validator(mode="after")
    def cert_with_key(self) -> TlsConfig:
        """A client certificate is useless without its private key, and the other way round."""
        if (self.cert is None) != (self.key is None):
            raise FieldError((), "cert and key go together (client certificate and its private key)")
        return self


class MqttConfig(BaseModel):
    """The broker and how the daemon talks to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Text = "localhost"
    port: Annotated[int, Between(1, 65535)] = 1883
    protocol: Protocol = "5"
    prefix: TopicLevel = "anomalygpt"
    qos: Annotated[int, Between(0, 1)] = 1
    keepalive: Annotated[int, Between(5, 3600)] = 30
    client_id: Text | None = None  # default: anomalygpt-edge-<device id>
    username: Text | None = None
    password_file: ExistingPath | None = None  # a file, never the password itself in the config
    tls: TlsConfig | None = None
    max_payload_bytes: Annotated[int, Between(256, 256 * 1024 * 1024)] = 65536  # larger commands get an error reply

    @property
    def password(self) -> str | None:
        """From ``password_file``, else ``$ANOMALYGPT_EDGE_MQTT_PASSWORD`` (or ``..._FILE``); see runtime/secrets.py."""
        from anomalygpt_edge.runtime.secrets import resolve_secret

        ref = {"password_file": str(self.password_file)} if self.password_file else {}
        secret: str | None = resolve_secret(ref, "password", "mqtt")
        return secret


__all__ = ["MqttConfig", "Protocol", "TlsConfig"]
