"""A throw-away PostgreSQL server for tests: its own cluster in a temporary directory, on 127.0.0.1.

:func:`start_server` finds ``initdb`` and ``pg_ctl`` (``PATH``, then Debian's
``/usr/lib/postgresql/<version>/bin``), creates a cluster (``initdb -A trust -U postgres``), starts
it on a free 127.0.0.1 port with its socket in the same directory, waits until it accepts
connections and returns a :class:`Server`; :meth:`Server.stop` stops it by PID (``pg_ctl stop -m
fast``, SIGKILL to the postmaster if that fails) and removes the directory.

PostgreSQL refuses to run as root. Run as root (CI is), the server runs as an unprivileged user
(``postgres``, which Debian's package creates, else ``nobody``) through ``runuser``, and the
cluster directory is made under the system temporary directory (not pytest's, which is private to
root) and given to that user.

With no PostgreSQL on the machine (or no psycopg2), :func:`require` fails under CI (``CI`` set to
true: ``.ci/run`` installs it) and skips elsewhere, saying what to install.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from autocompress.search.optuna_backend import pid_alive

SUPERUSER = "postgres"  # the cluster's superuser (initdb -U), whatever OS user runs the server
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"  # Debian's packages put the server binaries here, not on PATH
INSTALL_HINT = "install PostgreSQL (Debian: apt-get install postgresql) and psycopg2 (pip install psycopg2-binary)"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_binaries() -> tuple[str, str] | None:
    """``(initdb, pg_ctl)``: on PATH, else the newest of ``/usr/lib/postgresql/*/bin``; None if absent."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for bindir in sorted(glob.glob(DEBIAN_BINDIRS), key=version, reverse=True):
        initdb, pg_ctl = os.path.join(bindir, "initdb"), os.path.join(bindir, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def require() -> tuple[str, str]:
    """The binaries, or fail (CI) / skip (elsewhere) with what is missing."""
    missing = []
    binaries = find_binaries()
    if binaries is None:
        missing.append("initdb/pg_ctl not on PATH nor in /usr/lib/postgresql/*/bin")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing.append("psycopg2 not importable")
    if missing:
        message = f"PostgreSQL tests need a server and a driver: {'; '.join(missing)}; {INSTALL_HINT}"
        if in_ci():
            pytest.fail(f"{message} (CI: .ci/run should have installed it)", pytrace=False)
        pytest.skip(message)
    assert binaries is not None
    return binaries


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_user() -> str | None:
    """The OS user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


@dataclass
class Server:
    """A running throw-away cluster: ``url(db)`` for SQLAlchemy/Optuna, ``stop()`` to end it."""

    root: Path
    port: int
    pid: int
    pg_ctl: str
    user: str | None
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database, connect_timeout=5)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        self.databases.append(name)
        return self.url(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; SIGKILL to the postmaster if it is still there; remove the cluster."""
        try:
            _run(self.user, [self.pg_ctl, "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30"], self.root)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        if self.pid > 0 and pid_alive(self.pid):  # never 0: os.kill(0, ...) signals our own process group
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while self.pid > 0 and pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(user: str | None, cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=timeout)


def start_server(binaries: tuple[str, str], timeout: float = 60) -> Server:
    """Create and start a cluster on a free 127.0.0.1 port; stopped (and removed) if it does not come up."""
    initdb, pg_ctl = binaries
    user = _server_user()
    # Not under pytest's basetemp: as root that is private to root, and the server runs as `user`.
    root = Path(tempfile.mkdtemp(prefix="autocompress-pg-"))
    if user is not None:
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
    data, log = root / "data", root / "server.log"
    try:
        _run(user, [initdb, "-D", str(data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--no-sync"], root)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({err.returncode}): {err.stderr[-2000:]}") from None
    port = _free_port()
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
    server = Server(root, port, 0, pg_ctl, user)
    try:
        start = [pg_ctl, "start", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", str(int(timeout))]
        _run(user, start, root)
        server.pid = int((data / "postmaster.pid").read_text().split()[0])
        _wait_until_accepting(server, timeout)
    except BaseException as err:
        detail = err.stderr[-2000:] if isinstance(err, subprocess.CalledProcessError) else str(err)
        log_text = server.log()
        if not server.pid and (data / "postmaster.pid").exists():
            server.pid = int((data / "postmaster.pid").read_text().split()[0])
        server.stop()
        if isinstance(err, Exception):
            raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{port}: {detail}\n{log_text}") from None
        raise
    return server


def _wait_until_accepting(server: Server, timeout: float) -> None:
    import psycopg2

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            server.connect().close()
            return
        except psycopg2.OperationalError as err:
            last = err
            time.sleep(0.2)
    raise RuntimeError(f"no connection within {timeout}s: {last}")
