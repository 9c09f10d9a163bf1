"""The Dockerfile and what goes into the image, checked without a Docker engine."""

import fnmatch
import importlib.metadata
import json
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.deploy.compose_file import ROOT, check_command

# The image's platform, as pip evaluates requirement markers there.
IMAGE_MARKERS = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    lines = [
        line
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def runs() -> list[str]:
    return [arguments for keyword, arguments in instructions() if keyword == "RUN"]


def pinned(package: str) -> Version:
    """The version the image's torch install pins ``package`` to."""
    install = next(r for r in runs() if "download.pytorch.org" in r)
    (version,) = set(re.findall(rf"\b{package}==([\w.+]+)", install))
    return Version(version)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_base_image_is_cuda_13_on_ubuntu_24_04_with_a_c_compiler():
    (base,) = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(base|runtime|devel)-ubuntu24\.04", base), base
    # Triton builds its kernel launchers with a C compiler and Python's headers.
    installs = " ".join(r for r in runs() if "apt-get install" in r).split()
    assert "devel" in base or {"gcc", "build-essential", "clang"} & set(installs)
    assert "libc6-dev" in installs or "build-essential" in installs or "devel" in base
    assert "python3.12-dev" in installs
    assert any(r.startswith("python3.12 -m venv") for r in runs())


def test_torch_and_triton_are_the_line_of_our_gpu_figures():
    torch, triton = pinned("torch"), pinned("triton")
    assert torch.release[:2] == (2, 11), torch
    assert triton.release[:2] == (3, 6), triton
    install = next(r for r in runs() if "download.pytorch.org" in r)
    assert "--index-url https://download.pytorch.org/whl/cu130" in install
    # The line docs/benchmarks.md reports for the GPU runs.
    measured = (ROOT / "docs" / "benchmarks.md").read_text()
    assert f"torch {torch}+cu130" in measured
    assert f"Triton {triton.major}.{triton.minor}" in measured


def test_installing_the_project_keeps_the_pinned_torch():
    constraints = re.search(r"PIP_CONSTRAINT=(\S+)", (ROOT / "Dockerfile").read_text())
    assert constraints, "pip install . could replace torch with another build"
    written = next(r for r in runs() if constraints[1] in r)
    assert f"torch=={pinned('torch')}" in written and f"triton=={pinned('triton')}" in written
    steps = [
        next(i for i, r in enumerate(runs()) if "download.pytorch.org" in r),
        next(i for i, r in enumerate(runs()) if "-r requirements.lock" in r),
        next(i for i, r in enumerate(runs()) if re.search(r"pip install --no-deps \.( |$)", r)),
    ]
    assert steps == sorted(steps), "torch first, then the locked versions, then the project"


def test_the_image_installs_the_locked_versions_and_resolves_nothing():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [line for line in lock if line.strip() and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", line) for line in pins), pins
    names = {line.split("==")[0].lower() for line in pins}
    assert not names & {"torch", "triton", "lightpd"}, "torch comes from the PyTorch index"
    for run in runs():
        if "pip install" in run and "download.pytorch.org" not in run:
            assert "--no-deps" in run, run


@pytest.mark.parametrize("package", ["torch", "triton"])
def test_pins_satisfy_the_project_requirements(package):
    (requirement,) = [
        Requirement(line)
        for line in pyproject()["project"]["dependencies"]
        if Requirement(line).name == package
    ]
    assert pinned(package) in requirement.specifier
    assert Version(IMAGE_MARKERS["python_full_version"]) in SpecifierSet(
        pyproject()["project"]["requires-python"]
    )


def test_the_image_requirements_are_installable_distributions():
    """Every dependency is a plain name from an index (no URL or path, which the
    image cannot reach), and each that applies in the image is a real distribution:
    this checkout's environment installed it from the same list."""
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        assert requirement.url is None, line
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.name), line
        if requirement.marker is None or requirement.marker.evaluate(IMAGE_MARKERS):
            importlib.metadata.distribution(requirement.name)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's ``patterns`` keep ``path`` (or a folder above it) out:
    a pattern matches from the context's root, ``**/`` at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_environments_wheels_caches_and_secrets_out():
    patterns = dockerignore()
    for path in (".venv", ".wheels", ".cache", ".git", ".env", "lightpd/controlplane/__pycache__"):
        assert ignored(path, patterns), path


def test_the_image_copies_every_package_and_what_pyproject_reads():
    copied = set()
    for keyword, arguments in instructions():
        if keyword == "COPY":
            *sources, _destination = arguments.split()
            copied |= set(sources)
    packages = [
        p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    needed_files = ("pyproject.toml", "requirements.lock", pyproject()["project"]["readme"])
    for needed in (*needed_files, *packages):
        assert needed in copied, f"{needed} is not copied"
        assert (ROOT / needed).exists()
        assert not ignored(needed, dockerignore()), f"{needed} is excluded by .dockerignore"


def test_the_default_command_runs_the_control_plane_as_a_user():
    (cmd,) = [arguments for keyword, arguments in instructions() if keyword == "CMD"]
    check_command(json.loads(cmd))
    users = [arguments for keyword, arguments in instructions() if keyword == "USER"]
    assert users and users[-1] != "root"
