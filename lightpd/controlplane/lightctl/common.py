"""What the lightctl commands share: where the fleets are, their tokens, the admin client.

Each `lightctl up` keeps its state in a folder of its own, ``$LIGHTPD_HOME/fleets/PORT``
(``LIGHTPD_HOME`` defaults to ``~/.cache/lightpd``): ``fleet.json`` (URL and tokens,
while it runs), ``logs/`` (this run's; the run before's in ``logs.previous/``),
``redis/`` (the embedded Redis's data) and ``lock``, held while it runs. The other
commands talk to the fleet named by ``--control-plane`` (a URL, or a fleet's name:
its port), else ``LIGHTPD_CONTROL_PLANE``, else the only fleet running here.
"""

import fcntl
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import typer

DEFAULT_URL = "http://127.0.0.1:8000"


def home() -> Path:
    return Path(os.environ.get("LIGHTPD_HOME", Path.home() / ".cache" / "lightpd"))


def default_model() -> Path:
    return home() / "models" / "tiny-llama"


def ensure_default_model() -> Path:
    model = default_model()
    if not (model / "config.json").is_file():
        from transformers.utils import logging as transformers_logging

        from lightpd.common.tiny import write_tiny_checkpoint

        transformers_logging.disable_progress_bar()  # a bar for one shard, mid-line
        shutil.rmtree(model, ignore_errors=True)  # left half-written by an older lightctl
        # Written aside, then renamed: a second `lightctl up` starting at the same
        # time never reads a half-written checkpoint.
        partial = model.with_name(f".{model.name}-{os.getpid()}")
        write_tiny_checkpoint(partial, "llama")
        try:
            partial.rename(model)
        except OSError:  # the other one was first; its copy is the same
            shutil.rmtree(partial, ignore_errors=True)
    return model


@dataclass(frozen=True)
class FleetHome:
    """The folder of the `lightctl up` serving on one port."""

    path: Path

    @classmethod
    def for_port(cls, port: int) -> "FleetHome":
        return cls(home() / "fleets" / str(port))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state_file(self) -> Path:
        return self.path / "fleet.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def redis_data(self) -> Path:
        return self.path / "redis"

    def saved(self) -> dict:
        """What its `lightctl up` wrote: url, admin_token, cluster_token, pid."""
        try:
            return {"name": self.name, **json.loads(self.state_file.read_text())}
        except (OSError, ValueError):
            return {}

    def lock(self) -> int | None:
        """Hold the fleet's lock until the returned descriptor is closed (or this
        process ends); None while another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return None
        return lock

    def is_running(self) -> bool:
        """Whether a `lightctl up` holds the folder now."""
        try:
            lock = os.open(self.path / "lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(lock)
        return False


def running_fleets() -> list[dict]:
    """What each fleet `lightctl up` runs on this machine saved, by name."""
    folders = sorted((home() / "fleets").glob("*"), key=lambda p: p.name)
    fleets = [FleetHome(path) for path in folders if path.is_dir()]
    return [saved for fleet in fleets if fleet.is_running() and (saved := fleet.saved())]


_chosen: dict | None = None  # the fleet control_plane_url picked, for token()


def chosen_fleet(given: str | None) -> dict:
    """The fleet a command talks to: its url and, when `lightctl up` runs it here,
    its tokens. ``given`` is --control-plane: a URL or a running fleet's name."""
    given = given or os.environ.get("LIGHTPD_CONTROL_PLANE")
    running = running_fleets()
    if given and "://" not in given:
        named = [fleet for fleet in running if fleet["name"] == given]
        if not named:
            names = ", ".join(fleet["name"] for fleet in running) or "none"
            raise fail(
                f"no fleet named {given!r} runs here (running: {names}); "
                "or give a URL: http://HOST:PORT"
            )
        return named[0]
    if given:
        url = given.rstrip("/")
        return next((fleet for fleet in running if fleet["url"] == url), {"url": url})
    if len(running) > 1:
        names = ", ".join(fleet["name"] for fleet in running)
        raise fail(
            f"{len(running)} fleets run here ({names}): pick one with --control-plane "
            "NAME or URL, or set LIGHTPD_CONTROL_PLANE"
        )
    return running[0] if running else {"url": DEFAULT_URL}


def control_plane_url(given: str | None) -> str:
    global _chosen
    _chosen = chosen_fleet(given)
    return _chosen["url"]


def token(given: str | None, name: str) -> str | None:
    """--admin-token or --cluster-token, else its LIGHTPD_ variable, else what the
    fleet picked by the last control_plane_url() saved."""
    if given or os.environ.get(f"LIGHTPD_{name.upper()}"):
        return given or os.environ[f"LIGHTPD_{name.upper()}"]
    fleet = _chosen if _chosen is not None else chosen_fleet(None)
    return fleet.get(name)


def say(message: str = "", *, nl: bool = True, err: bool = False, **style: object) -> None:
    """Print and flush. A closed stdout or stderr (a pipe whose reader left) is
    replaced by /dev/null, so what runs next, such as stopping a fleet, still runs."""
    stream = sys.stderr if err else sys.stdout
    try:
        typer.secho(message, nl=nl, err=err, **style)
        stream.flush()
    except OSError:  # BrokenPipeError, mostly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def fail(message: str, code: int = 2) -> typer.Exit:
    say(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def admin_request(method: str, url: str, path: str, admin_token: str | None) -> object:
    """Call the admin API; clear messages for the usual mistakes."""
    if not admin_token:
        raise fail("no admin token: pass --admin-token or set LIGHTPD_ADMIN_TOKEN")
    try:
        reply = httpx.request(
            method, f"{url}{path}", timeout=10.0, headers={"Authorization": f"Bearer {admin_token}"}
        )
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the control plane at {url}: {exc}") from exc
    if reply.status_code == 401:
        raise fail(f"the control plane at {url} refused the admin token")
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:200]
        raise fail(f"{method} {path}: HTTP {reply.status_code}: {message}")
    return reply.json()
