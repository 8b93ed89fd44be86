"""Where riskbook keeps its files (a module of its own: the cache finds its folder
without importing the embedded server's machinery)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["home_mode", "make_private_dirs", "riskbook_home"]


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


def home_mode() -> int:
    """The mode of a riskbook home that riskbook creates: private to its owner, except
    that as root the embedded server's user must be able to traverse it to reach the
    server files (0711: enter, not list)."""
    return 0o711 if os.geteuid() == 0 else 0o700


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (like ``mkdir -p -m 700``).

    For copies of the history (the load cache): readable by their owner only, whatever
    the umask. Folders that exist already are left as they are. The riskbook home, if
    created here, gets :func:`home_mode` and the folders above it the default mode, as
    the embedded server creates them: where its files go must not depend on whether a
    load or ``riskbook db start`` came first.

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
    home = riskbook_home()
    for folder in reversed(missing):
        if folder in home.parents:
            mode: int | None = None  # above the home: the default, as the server makes them
        else:
            mode = home_mode() if folder == home else 0o700
        try:
            os.mkdir(folder, 0o777 if mode is None else mode)
        except FileExistsError:
            if not folder.is_dir():
                raise
        else:
            if mode is not None:
                os.chmod(folder, mode)  # the umask may have narrowed it; our own new folder
