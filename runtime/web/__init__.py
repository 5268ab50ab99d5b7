"""The technician station: a small web page served next to the line daemon (see server.py)."""
