"""compose.yaml as Docker Compose reads it, and the commands its services run.

``load_compose`` interpolates the file with a given host environment as Compose
does (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``,
``${VAR?message}``, ``$$``), so a required variable that is missing fails here as
``docker compose up`` would. ``check_command`` resolves a command line of a
service (or of its health check) to what it calls in this project and parses its
arguments there, so a renamed module, console script or option fails here.
"""

import importlib
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import typer
import yaml

ROOT = Path(__file__).parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
IMAGE = "lightpd:latest"
# A host environment with every variable compose.yaml requires.
REQUIRED_ENV = {
    "LIGHTPD_ADMIN_TOKEN": "admin-from-host",
    "LIGHTPD_CLUSTER_TOKEN": "cluster-from-host",
    "LIGHTPD_API_KEYS": "sk-from-host",
    "LIGHTPD_REDIS_PASSWORD": "redis-from-host",
}
_VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>\w+)(?:(?P<colon>:?)(?P<op>[-?])(?P<arg>[^}]*))?\})"
)
_SHELL_BUILTINS = {"test", "[", "true", "echo"}


class MissingVariable(ValueError):
    """A variable the file requires (``${VAR:?message}``) is unset or empty."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["dollar"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        found = env.get(name)
        missing = found is None or (match["colon"] == ":" and found == "")
        if op is None:
            return found or ""
        if not missing:
            return found
        if op == "?":
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        return arg

    return _VARIABLE.sub(substitute, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """The file as Compose sees it with ``env`` as the host environment (by default
    just the required variables)."""
    return interpolate(
        yaml.safe_load(COMPOSE_FILE.read_text()), REQUIRED_ENV if env is None else env
    )


def our_services(compose: dict) -> dict[str, dict]:
    """The services that run our image (Redis runs its own)."""
    return {name: s for name, s in compose["services"].items() if s.get("image") == IMAGE}


def console_scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["project"]["scripts"]


def check_command(argv: list[str]) -> None:
    """Resolve ``argv`` to the module or console script of this project it runs and
    parse its arguments there; raises AssertionError (or click's UsageError) if
    either does not exist."""
    program, *args = argv
    if program == "python" and args[:1] == ["-c"]:
        compile(args[1], "<python -c>", "exec")
    elif program == "python":
        assert args[:1] == ["-m"], f"python runs a module here, not {args}"
        _check_module(args[1], args[2:])
    elif program == "sh":
        assert args[:1] == ["-c"], f"sh runs a script here, not {args}"
        _check_script(args[1])
    elif program in console_scripts():
        module, _, attr = console_scripts()[program].partition(":")
        _parse_cli(getattr(importlib.import_module(module), attr), args, program)
    else:
        raise AssertionError(f"{program} is neither python, sh nor a console script of lightpd")


def _check_module(module: str, args: list[str]) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"no module {module}"
    if spec.submodule_search_locations is not None:  # a package: `python -m` runs __main__
        assert importlib.util.find_spec(f"{module}.__main__"), f"{module} has no __main__"
        module = f"{module}.__main__"
    loaded = importlib.import_module(module)
    if isinstance(getattr(loaded, "app", None), typer.Typer):
        _parse_cli(loaded.app, args, module)
    elif hasattr(loaded, "parse_args"):
        loaded.parse_args(args)
    else:
        assert hasattr(loaded, "main"), f"{module} has no main"
        assert args == [], f"{module} takes no arguments (its settings are LIGHTPD_*), not {args}"


def _parse_cli(app: typer.Typer, args: list[str], name: str) -> None:
    command = typer.main.get_command(app)
    while isinstance(command, click.Group):
        assert args, f"{name} needs a subcommand"
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"{name} has no command {args[0]!r}"
        name, command, args = f"{name} {args[0]}", sub, args[1:]
    command.make_context(name, list(args))  # unknown or missing options raise


def _check_script(script: str) -> None:
    lexer = shlex.shlex(script, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("||", "&&", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    for words in commands:
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[0] not in _SHELL_BUILTINS:
            check_command(words)


def node_env_vars() -> set[str]:
    """The environment variables a node's command line reads."""
    from lightpd.prefill_node.__main__ import app

    command = typer.main.get_command(app)
    return {p.envvar for p in command.params if isinstance(getattr(p, "envvar", None), str)}
