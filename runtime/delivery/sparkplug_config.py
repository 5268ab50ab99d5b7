"""The Sparkplug B output's settings (the config's optional ``sparkplug`` section).

Declared beside the edge node that reads them (``runtime/delivery/sparkplug_node.py``); the line's
config only joins it in. Without the section no Sparkplug client exists and the plain JSON topics
are all there is; with it, the Edge Node runs beside them on its own MQTT connection to the same
broker (its own connection because the NDEATH must be that connection's Last Will, and the JSON
link's Will is already its ``offline`` status).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from anomalygpt_edge.runtime.values import Flag, Text, TopicLevel


class SparkplugConfig(BaseModel):
    """Edge Node identity and delivery of the Sparkplug B 3.0 output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group: TopicLevel = "AnomalyGPT"  # spBv1.0/<group>/...
    node: TopicLevel | None = None  # the Edge Node id; default: the device id
    client_id: Text | None = None  # default: anomalygpt-edge-<device id>-spb
    # 1: DDATA carrying a verdict is QoS 1 and goes through the spool (removed on PUBACK), so no
    # verdict is lost across an outage. The spec asks QoS 0 for DATA; 0 gives exactly that, without
    # the spool (a verdict published while the link is down is then gone for the SCADA).
    data_qos: Literal[0, 1] = 1
    spool: Flag = True  # with data_qos 1: a spool of its own under storage.data/sparkplug/
    # The Primary Host Application's id (Ignition: its MQTT Engine's "Primary Host ID"): the node
    # then births only while spBv1.0/STATE/<id> says online and starts a new session when it goes
    # offline (Sparkplug 3.0). None: births on every connect, whatever the hosts do.
    primary_host: TopicLevel | None = None


__all__ = ["SparkplugConfig"]
