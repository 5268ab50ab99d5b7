"""Line: the daemon and its parts (config, jobs, MQTT commands and their gate, health and status)."""
