"""``python -m lightpd.controlplane.lightctl.bench``: `lightctl bench` where lightctl is not
installed (the device machines' scripts)."""

import typer

from lightpd.controlplane.lightctl.bench.command import bench

typer.run(bench)
