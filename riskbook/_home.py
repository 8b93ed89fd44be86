"""Where riskbook keeps its files (a module of its own: the cache finds its folder
without importing the embedded server's machinery)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["make_private_dirs", "riskbook_home"]


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


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (like ``mkdir -p -m 700``).

    For copies of the history (the load cache): readable by their owner only, whatever
    the umask. Folders that exist already are left as they are.

    Raises
    ------
    OSError
        As :meth:`Path.mkdir`, e.g. FileExistsError if ``path`` is a file.
    """
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not folder.is_dir():
                raise
        else:
            os.chmod(folder, 0o700)  # the umask may have narrowed it; our own new folder
