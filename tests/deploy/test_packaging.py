"""What the wheel ships and what `import` finds: one top-level name, ``lightpd``, so
our folders never shadow, or get shadowed by, another distribution's package."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.compose_file import ROOT


def test_the_wheel_has_one_top_level_package(tmp_path):
    # Built from a copy: setuptools writes build/ beside the sources it builds.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(
        ROOT / "lightpd", source / "lightpd", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("lightpd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"lightpd"}
    # The dashboard's files travel with the package.
    assert any(n.startswith("lightpd/controlplane/dashboard/static/") for n in names)
    assert "lightpd/kernels/rmsnorm.py" in names


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_import_kernels_is_never_our_folder(tmp_path, where):
    """From the repository root (the first entry of sys.path) and from any other folder,
    ``kernels`` is Hugging Face's package when it is installed, and ``lightpd.kernels``
    is ours."""
    cwd = ROOT if where == "root" else tmp_path
    check = (
        "import importlib.util, pathlib, lightpd.kernels as ours; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(spec and spec.origin); print(pathlib.Path(ours.__file__).parent)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs, ours = result.stdout.split("\n")[:2]
    assert Path(ours) == ROOT / "lightpd" / "kernels"
    assert not (ROOT / "kernels").exists()
    if theirs != "None":  # transformers 5.25 and later install it
        assert Path(theirs).resolve().parent != (ROOT / "lightpd" / "kernels")
        assert "site-packages" in theirs
