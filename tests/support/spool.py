"""Reading a spool directory in tests: its files, without the mark every spool carries."""

from __future__ import annotations

import os

from serve_app.media.spool import VOLUME_MARK


def spool_entries(directory) -> list[str]:
    """The names in a spool directory besides its volume mark (serve_app.media.spool), sorted."""
    return sorted(name for name in os.listdir(directory) if name != VOLUME_MARK)
