"""Where the runtime looks when a command is not told: the recipe store and the default engine bundle.

Environment variables move both for a whole installation (a systemd unit, a container).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = Path(os.environ.get("ANOMALYGPT_EDGE_STORE", "data/recipes"))
DEFAULT_BUNDLE = Path(os.environ.get("ANOMALYGPT_EDGE_BUNDLE", "data/bundles/default"))
