"""``python -m anomalygpt_edge``: same as the ``anomalygpt-edge`` console script."""

from anomalygpt_edge.cli import main

raise SystemExit(main())
