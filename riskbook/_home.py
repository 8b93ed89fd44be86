"""Where riskbook keeps its files (a module of its own: the cache finds its folder
without importing the embedded server's machinery)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["riskbook_home"]


def riskbook_home() -> Path:
    """The riskbook home folder.

    Returns
    -------
    Path
        ``$RISKBOOK_HOME`` if set and not empty, else ``~/.riskbook``; user-expanded and
        resolved. The folder is not created.
    """
    raw = os.environ.get("RISKBOOK_HOME") or "~/.riskbook"
    return Path(raw).expanduser().resolve()
