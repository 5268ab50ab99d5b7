"""The command line's side of the first run: export the default bundle when a command is about to use it.

The work is :func:`anomalygpt_edge.export.first_run.ensure_default_bundle` (shared with the demo);
this only decides whether the bundle a command will open *is* the default location
(:data:`~anomalygpt_edge.runtime.defaults.DEFAULT_BUNDLE`, moved by ``ANOMALYGPT_EDGE_BUNDLE``).
Any other folder is the user's and is opened as given.
"""

from __future__ import annotations

from pathlib import Path

from anomalygpt_edge.runtime import defaults


def is_default(path: Path | str | None) -> bool:
    """Whether ``path`` (None: not given, so the default) is the default bundle location."""
    if path is None:
        return True
    return Path(path).expanduser().resolve() == Path(defaults.DEFAULT_BUNDLE).expanduser().resolve()


def ready(path: Path | str | None) -> Path:
    """The bundle folder to open for ``path`` (None: the default), exported first where it is the empty default."""
    target = Path(path) if path is not None else Path(defaults.DEFAULT_BUNDLE)
    if is_default(target):
        from anomalygpt_edge.export.first_run import ensure_default_bundle

        ensure_default_bundle(target)
    return target
