"""Real faults for tests/test_faults.py: an endpoint that goes down, Dask processes to kill, a
PostgreSQL server to restart. Nothing here imitates a service; each helper breaks a real one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import free_port, stop_processes


class TcpOutage:
    """A TCP forwarder in front of a real server, so the server can 'go down' and come back.

    `down()` closes the listening port and resets every open connection (what clients see when
    an S3 endpoint dies or the network drops); `up()` listens again on the same port. The server
    behind keeps its data, as a real object store does through an outage.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() first: a bare close() leaves a socket blocked in accept() listening on Linux.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            # Linger 0: close with a reset, like a crashed server, not a polite FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


class DaskProcesses:
    """`dask scheduler` and `dask worker` as separate OS processes on loopback.

    Workers run without a nanny, so a killed worker stays dead, as when its machine goes away.
    """

    def __init__(self, workers: int = 2, scheduler_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = Path(tempfile.mkdtemp(prefix="dask-logs-"))
        env = {**os.environ, **(scheduler_env or {})}
        self.scheduler = self._spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"], "scheduler", env
        )
        _wait_for_port(self.port, self.scheduler, "dask scheduler")
        self.workers = [
            self._spawn(
                ["worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
                f"worker{i}",
                os.environ.copy(),
            )
            for i in range(workers)
        ]

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def close(self) -> None:
        stop_processes([*self.workers, self.scheduler], grace=3)
        shutil.rmtree(self.logs, ignore_errors=True)


POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL cluster of our own on a free loopback port, so a test may stop and restart it.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` OS user.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pf-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def available(cls) -> str | None:
        """Why a private cluster cannot be made here, or None when it can."""
        if not (POSTGRES_BIN / "initdb").exists():
            return f"no PostgreSQL server binaries in {POSTGRES_BIN}"
        if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
            return "running as root without a `postgres` user to own the cluster"
        return None

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(POSTGRES_BIN / program), *args], check=True, capture_output=True, cwd=self.root
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        # Fast shutdown: open sessions are cut off, as in a server restart or failover.
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def smtp_back_up(sink) -> None:
    """Start the SMTP sink again on its port after `sink.controller.stop()` (a stopped aiosmtpd
    controller cannot be restarted: its event loop is closed)."""
    from aiosmtpd.controller import Controller

    sink.controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    sink.controller.start()
