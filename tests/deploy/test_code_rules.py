"""The rules of docs/design.md ("Layers"), so that CI fails when one is broken:
the import rules, over every module's ``import`` statements (also those inside
functions), and the size of the control plane's functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MAX_FUNCTION_LINES = 60  # in the control plane, from a function's first statement
ROOMS = ("openai", "lightctl", "api", "dashboard")  # of the control plane
# (importer prefix, imported prefix, unless the importer is under one of these): forbidden.
RULES = [
    ("lightpd.common.wire", "torch", ()),
    ("lightpd.common", "lightpd.controlplane", ()),
    *(  # kernels import nothing of ours
        ("lightpd.kernels", f"lightpd.{package}", ())
        for package in ("common", "controlplane", "prefill_node", "decode_node")
    ),
    ("lightpd.prefill_node", "lightpd.controlplane", ()),
    ("lightpd.decode_node", "lightpd.controlplane", ()),
    # The control plane's core imports none of its rooms; app.py mounts the routes.
    *(
        (
            "lightpd.controlplane",
            f"lightpd.controlplane.{room}",
            ("lightpd.controlplane.app", *(f"lightpd.controlplane.{r}" for r in ROOMS)),
        )
        for room in ROOMS
    ),
]


def imports(root: Path) -> dict[str, set[str]]:
    """Each module under ``root``/lightpd, with the modules it imports."""
    found = {}
    for path in (root / "lightpd").rglob("*.py"):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[module] = names
    return found


def broken(root: Path) -> list[str]:
    """``importer imports imported`` for every import that a rule forbids."""
    found = []
    for module, names in sorted(imports(root).items()):
        for importer, imported, allowed in RULES:
            if not _under(module, importer) or any(_under(module, a) for a in allowed):
                continue
            hits = [n for n in names if _under(n, imported)]
            # "from a.b import c" names a.b and a.b.c: the first says it.
            hits = [n for n in hits if not any(n != h and _under(n, h) for h in hits)]
            found += [f"{module} imports {n}" for n in sorted(hits)]
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_tree_keeps_the_import_rules():
    assert broken(ROOT) == []


def test_a_planted_violation_fails(tmp_path):
    wire = tmp_path / "lightpd" / "common" / "wire"
    wire.mkdir(parents=True)
    (wire / "frames.py").write_text("def pack():\n    import torch.nn\n")
    core = tmp_path / "lightpd" / "controlplane"
    (core / "openai").mkdir(parents=True)
    (core / "openai" / "routes.py").write_text("from lightpd.controlplane.store import Store\n")
    (core / "store.py").write_text("from lightpd.controlplane.openai.routes import router\n")
    (core / "app.py").write_text("from lightpd.controlplane.openai import routes\n")
    kernels = tmp_path / "lightpd" / "kernels"
    kernels.mkdir()
    (kernels / "attention.py").write_text("from lightpd.common.engine import context\n")
    assert broken(tmp_path) == [
        "lightpd.common.wire.frames imports torch.nn",
        "lightpd.controlplane.store imports lightpd.controlplane.openai.routes",
        "lightpd.kernels.attention imports lightpd.common.engine",
    ]


def long_functions(root: Path, package: str = "lightpd/controlplane") -> list[str]:
    """Functions over MAX_FUNCTION_LINES, counted from the first statement of the
    body (a typer command's options are its signature, not its length)."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines}")
    return found


def test_no_function_of_the_control_plane_is_over_60_lines():
    assert long_functions(ROOT) == []


def test_a_planted_long_function_fails(tmp_path):
    core = tmp_path / "lightpd" / "controlplane"
    core.mkdir(parents=True)
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    (core / "store.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path) == ["lightpd/controlplane/store.py:5 long: 61"]
