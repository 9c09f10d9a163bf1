"""What the lightctl commands share: where the fleet is, its tokens, the admin client."""

import json
import os
from pathlib import Path

import httpx
import typer


def home() -> Path:
    return Path(os.environ.get("LIGHTPD_HOME", Path.home() / ".cache" / "lightpd"))


def default_model() -> Path:
    return home() / "models" / "tiny-llama"


def ensure_default_model() -> Path:
    model = default_model()
    if not (model / "config.json").is_file():
        from common.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(model, "llama")
    return model


def fleet_file() -> Path:
    return home() / "fleet.json"


def saved_fleet() -> dict:
    """What the last `lightctl up` on this machine wrote (URL and tokens), if any."""
    try:
        return json.loads(fleet_file().read_text())
    except (OSError, ValueError):
        return {}


def control_plane_url(given: str | None) -> str:
    return (
        given
        or os.environ.get("LIGHTPD_CONTROL_PLANE")
        or saved_fleet().get("url")
        or "http://127.0.0.1:8000"
    ).rstrip("/")


def token(given: str | None, name: str) -> str | None:
    return given or os.environ.get(f"LIGHTPD_{name.upper()}") or saved_fleet().get(name)


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


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
