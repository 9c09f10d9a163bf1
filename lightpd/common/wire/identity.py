"""A model's identity on the wire: nodes with different config.json files never
exchange KV, and the control plane refuses nodes of another model."""

import hashlib
from pathlib import Path


def model_fingerprint(model_dir: str | Path) -> str:
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]
