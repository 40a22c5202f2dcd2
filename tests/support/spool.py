"""Reading a spool directory in tests: its files, without the mark every spool carries."""

from __future__ import annotations

import os
import time

from serve_app.media.spool import VOLUME_MARK


def spool_entries(directory) -> list[str]:
    """The names in a spool directory besides its volume mark (serve_app.media.spool), sorted."""
    return sorted(name for name in os.listdir(directory) if name != VOLUME_MARK)


def age(*paths, seconds: float) -> None:
    """Set the paths' access and modification times `seconds` back: files left idle that long."""
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))
