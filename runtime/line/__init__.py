"""Line: the daemon and its parts (config, jobs, MQTT commands and their gate, health and status).

Reading path from ``anomalygpt-edge run --config line.yaml`` to a verdict the PLC receives, in
the order the data flows (every step in this room or in ``delivery/``; ``web/`` is only joined in
when the config has a ``station:`` section):

1. ``runtime/cli/line_run.py``: parses the arguments, :func:`config.load_config` validates the YAML
   into one typed :class:`config.DaemonConfig` (errors name the key and its line), then
   ``Daemon(config).start()``.
2. ``daemon.py``: the composition root; builds the parts below, opens the recipes
   (``recipe_slots.py``: bundles with the backend's options, one inspector per camera), warms the
   engines up, connects the link (``delivery/mqtt_link.py``) and starts the named threads.
3. ``trigger_board.py`` and ``jobs.py``: a camera frame (``runtime/cameras/``), an MQTT trigger or a
   watched file (``folder_watch.py``) becomes a :class:`jobs.Job` with its deadline on a bounded work
   queue (``batching.py``); ``deadline.py`` answers ERROR the moment a deadline passes.
4. ``inspection_worker.py``: takes jobs off the queue, runs the camera's inspector (preprocess ->
   engines -> :class:`~anomalygpt_edge.runtime.inspection.verdict.Verdict`).
5. ``verdict_publisher.py``: the one answer for each part, to the link, the archive and observers.
6. ``delivery/sender.py`` + ``delivery/spool.py``: the verdict is committed to the spool and
   published QoS 1 on ``<prefix>/<device>/<camera>/verdict`` (``delivery/messages.py`` is its
   schema), removed from the spool on PUBACK; the Sparkplug B node (``sparkplug_wiring.py``,
   ``delivery/sparkplug_node.py``) publishes the same verdict as DDATA when configured.

Beside the flow: ``commands.py`` (``cmd/*``, gated by ``command_gate.py``, bodies in
``command_bodies.py``), ``status_report.py`` / ``health.py`` (status, heartbeat, ``/metrics``),
``supervisor.py`` (every loop restarted by a last-resort handler), ``drift_watch.py``,
``recipe_watch.py`` and ``proposals.py`` (the line learning from labels).
"""
