"""The tokenizer transformers builds for a checkpoint, exported once for the control plane.

transformers does not always use ``tokenizer.json`` as it is: ``AutoTokenizer`` may
pick a class by ``config.json``'s ``model_type`` (Qwen2 replaces the pre-tokenizer,
Llama and Mistral apply ``add_bos_token``/``add_eos_token`` and regex fixes), so
reading the file alone gives other token ids. The control plane must give the very
ids a user of transformers gets, without importing torch, so a child process
(``python -m lightpd.common.tokenizer_export MODEL_DIR OUT``) loads the tokenizer
with transformers and writes what it built: the backend (``to_str()``), the special
tokens and the chat template. The parent keeps the export in a cache keyed by the
checkpoint's tokenizer files and the library versions, so it runs once per model.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

EXPORT_FORMAT = 1
EXPORT_TIMEOUT_S = 300.0
# What transformers reads to build a tokenizer; a change of any of them is a new export.
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def cache_root() -> Path:
    """Where exports are kept: ``$LIGHTPD_HOME/tokenizers`` (``~/.cache/lightpd``)."""
    home = os.environ.get("LIGHTPD_HOME") or Path.home() / ".cache" / "lightpd"
    return Path(home) / "tokenizers"


def export_key(model_dir: Path) -> str:
    digest = hashlib.sha256(f"format {EXPORT_FORMAT}\n".encode())
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package} {_version(package)}\n".encode())
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name} {path.stat().st_size}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def exported_tokenizer(model_dir: str | Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The export of ``model_dir``'s tokenizer (see ``export``), from the cache or made now.
    Raises ValueError with transformers' own words when it cannot load the tokenizer."""
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} not found")
    cache = cache_dir or cache_root()
    path = cache / f"{export_key(model_dir)}.json"
    if path.is_file():
        try:
            return _check(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged file is made again
    cache.mkdir(parents=True, exist_ok=True)
    # Written beside its final name and renamed: a reader never sees half a file,
    # and two control planes starting at once both end with a whole one.
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".partial", delete=False) as partial:
        partial_path = Path(partial.name)
    try:
        command = [sys.executable, "-m", __name__, str(model_dir), str(partial_path)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise ValueError(
                f"transformers did not load the tokenizer of {model_dir}"
                f" within {EXPORT_TIMEOUT_S:.0f} s"
            ) from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            cause = lines[-1] if lines else f"exit code {done.returncode}"
            raise ValueError(f"transformers could not load the tokenizer of {model_dir}: {cause}")
        exported = _check(json.loads(partial_path.read_text(encoding="utf-8")))
        partial_path.replace(path)
        return exported
    finally:
        partial_path.unlink(missing_ok=True)


def export(model_dir: str | Path) -> dict[str, Any]:
    """What transformers builds for ``model_dir`` (imports transformers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"transformers built a {type(tokenizer).__name__}, which has no fast backend:"
            " lightpd serves fast tokenizers (the `tokenizers` library's)"
        )
    named = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    extra = [t for t in tokenizer.all_special_tokens if t not in named.values()]
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return {
        "format": EXPORT_FORMAT,
        "transformers": _version("transformers"),
        "tokenizer_class": type(tokenizer).__name__,
        "backend": backend.to_str(),
        "special_tokens": named,
        "extra_special_tokens": extra,
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        "chat_template": template if isinstance(template, str) else None,
    }


def _check(exported: Any) -> dict[str, Any]:
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        raise ValueError("not a tokenizer export of this lightpd")
    if not isinstance(exported.get("backend"), str):
        raise ValueError("the tokenizer export has no backend")
    return exported


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lightpd.common.tokenizer_export MODEL_DIR OUT", file=sys.stderr)
        return 2
    try:
        exported = export(argv[0])
    except Exception as exc:  # the parent shows this last line as the cause
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    Path(argv[1]).write_text(json.dumps(exported), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
