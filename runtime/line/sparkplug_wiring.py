"""Joins the optional Sparkplug B Edge Node (``runtime/delivery/sparkplug_node.py``) into the daemon.

Kept out of ``daemon.py`` so the composition root only asks for the node, passes it to the
verdict publisher and refreshes it with the heartbeat. The node reads the daemon through the
status document it already builds, and triggers through the same board as a
JSON ``cmd/trigger``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.delivery.sparkplug_node import SparkplugNode
    from anomalygpt_edge.runtime.line.config import DaemonConfig
    from anomalygpt_edge.runtime.line.status import DaemonHealth

log = logging.getLogger(__name__)


def open_sparkplug(
    config: DaemonConfig,
    status: Callable[[], dict[str, Any]],
    trigger: Callable[[str, str | None], Any],
    report: Callable[[str], None],
) -> SparkplugNode | None:
    """The Edge Node for ``config.sparkplug`` (None without that section), not connected yet."""
    spb = config.sparkplug
    if spb is None:
        return None
    from anomalygpt_edge.runtime.delivery import sparkplug_metrics as spm
    from anomalygpt_edge.runtime.delivery.sparkplug_node import SparkplugNode
    from anomalygpt_edge.runtime.delivery.spool import VerdictSpool

    cameras = list(config.cameras)

    def facts() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        doc = status()  # the status document, with the rolling health figures merged in
        return spm.node_facts(doc), {c: spm.camera_facts(doc, c) for c in cameras}

    def on_trigger(camera: str, part_id: str | None) -> None:
        try:
            trigger(camera, part_id)
        except Exception as exc:  # a refused trigger (free-run camera, unknown recipe) is reported, not raised
            report(f"sparkplug: DCMD trigger of {camera} failed: {exc!r}")

    st = config.storage
    spool = None
    if st.spool and spb.spool and spb.data_qos > 0:
        spool = VerdictSpool(
            st.data / "sparkplug" / "spool.db", max_rows=st.spool_max_rows, max_age_s=st.spool_max_age_s
        )
    node = SparkplugNode(
        spb,
        config.mqtt,
        config.device_id,
        cameras,
        facts,
        on_trigger,
        spool,
        own_spool=True,
        state_path=st.data / "sparkplug" / "bdseq.json",  # bdSeq kept across restarts, beside the spool
    )
    node.on_error = report
    return node


def watch_sparkplug(node: SparkplugNode | None, health: DaemonHealth) -> None:
    """The node in the status and heartbeat (``sparkplug``), and its threads among the watched ones."""
    if node is None:
        return
    health.add_source("sparkplug", node.status)
    health.watch_thread("sparkplug-network", lambda: node.network_thread)
    if node.sender is not None:
        sender = node.sender
        health.watch_thread("sparkplug-sender", lambda: sender.thread)
