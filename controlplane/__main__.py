"""``python -m controlplane``: serve the control plane with uvicorn (settings from LIGHTPD_*)."""

import sys

import uvicorn
from pydantic import ValidationError

from controlplane.app import create_app
from controlplane.settings import Settings


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: bad control plane settings (LIGHTPD_*):\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
