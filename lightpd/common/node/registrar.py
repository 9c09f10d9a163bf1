"""A node's membership: register with the control plane, then heartbeat its stats.

Runs in a thread beside the node's serving loop. A refusal (wrong cluster token,
another model) is fatal and its reason is printed; a control plane that is down,
or answers 5xx (a 503 with Retry-After while its Redis is down), is retried as
its Retry-After says, for as long as it takes; a node whose registration expired
registers again; a node removed by an admin stops.

Each registration carries a random session secret, and every heartbeat presents
it: a process that knows the cluster token still cannot take over or rewrite the
record of a live node it is not.
"""

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable

import httpx

logger = logging.getLogger(__name__)
STARTUP_RETRY_S = 30.0
# A control plane that answers 5xx (503 with Retry-After while its Redis is down)
# is waited for as long as it takes, between these bounds per wait.
DEFAULT_RETRY_S = 1.0
MIN_RETRY_S = 0.1
MAX_RETRY_S = 30.0
SESSION_HEADER = "X-Lightpd-Node-Session"


class Registrar(threading.Thread):
    def __init__(
        self,
        control_plane: str,
        cluster_token: str,
        registration: dict,
        stats: Callable[[], dict],
        stop_node: Callable[[int, str], None],
        transport: httpx.BaseTransport | None = None,  # tests: a mock control plane
    ) -> None:
        super().__init__(name="registrar", daemon=True)
        self.base = control_plane.rstrip("/")
        session = secrets.token_hex(16)
        self.registration = {**registration, "session": session}
        self.stats = stats
        self.stop_node = stop_node  # (exit code, reason)
        self.http = httpx.Client(
            timeout=5.0,
            headers={"Authorization": f"Bearer {cluster_token}", SESSION_HEADER: session},
            transport=transport,
        )
        self.heartbeat_s = 1.0
        self.registered = threading.Event()
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        try:
            if not self._register(retry_for=STARTUP_RETRY_S):
                return
            while not self._stopped.wait(self.heartbeat_s):
                self._heartbeat()
        finally:
            self.http.close()

    def _register(self, retry_for: float) -> bool:
        deadline = time.monotonic() + retry_for
        while not self._stopped.is_set():
            try:
                reply = self.http.post(f"{self.base}/internal/nodes", json=self.registration)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    self.stop_node(2, f"cannot reach the control plane at {self.base}: {exc}")
                    return False
                time.sleep(0.5)
                continue
            if reply.status_code == 201:
                self.heartbeat_s = reply.json()["heartbeat_s"]
                self.registered.set()
                logger.info("registered with %s as %s", self.base, self.registration["node_id"])
                return True
            if reply.status_code >= 500:  # its trouble, not ours (its Redis is down): wait
                wait_s = _retry_after_s(reply)
                logger.warning(
                    "the control plane cannot register nodes now (%s); retrying in %g s",
                    _reason(reply),
                    wait_s,
                )
                self._stopped.wait(wait_s)
                continue
            self.stop_node(2, f"the control plane refused this node: {_reason(reply)}")
            return False
        return False

    def _heartbeat(self) -> None:
        node_id = self.registration["node_id"]
        try:
            reply = self.http.put(
                f"{self.base}/internal/nodes/{node_id}/heartbeat", json=self.stats()
            )
        except httpx.TransportError as exc:
            logger.warning("heartbeat failed: %s", exc)
            return
        if reply.status_code == 410:
            self.stop_node(0, f"removed from the fleet: {_reason(reply)}")
            self.stop()
        elif reply.status_code == 409:
            self.stop_node(2, f"another node holds this node id: {_reason(reply)}")
            self.stop()
        elif reply.status_code == 404:
            logger.warning("registration lapsed; registering again")
            self._register(retry_for=STARTUP_RETRY_S)
        elif reply.status_code != 200:
            logger.warning("heartbeat refused: %s", _reason(reply))


def _retry_after_s(reply: httpx.Response) -> float:
    """The reply's Retry-After in seconds, within reason; 1 s if it gives none (or
    gives a date)."""
    try:
        seconds = float(reply.headers.get("Retry-After", DEFAULT_RETRY_S))
    except ValueError:
        seconds = DEFAULT_RETRY_S
    if not math.isfinite(seconds):
        seconds = DEFAULT_RETRY_S
    return min(max(seconds, MIN_RETRY_S), MAX_RETRY_S)


def _reason(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {reply.status_code}: {reply.text[:200]}"
