"""Delivery: getting verdicts to the PLC and keeping them (MQTT link, messages, spool, sender, archive)."""
