"""Package faces: a subpackage is used by the rest of ovstore only through its ``__init__``.

Every module is parsed (not imported) so that lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ovstore

ROOT = Path(ovstore.__file__).resolve().parent
SUBPACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _package_of(path: Path) -> list[str]:
    """``ovstore``-relative package parts of a module file (``[]`` for a top-level module)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]


def _absolute(path: Path, node: ast.ImportFrom) -> list[str]:
    """The imported module as ``ovstore``-relative parts, or ``[]`` when outside ovstore."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        return parts[1:] if parts[0] == "ovstore" else []
    base = _package_of(path)
    if node.level - 1 > len(base):
        return []
    base = base[: len(base) - (node.level - 1)]
    return base + ((node.module or "").split(".") if node.module else [])


def internal_imports(path: Path) -> list[str]:
    """Imports in ``path`` that reach into another subpackage past its ``__init__``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = _package_of(path)[:1]
    bad = []
    for node in ast.walk(tree):
        targets: list[list[str]] = []
        if isinstance(node, ast.ImportFrom):
            target = _absolute(path, node)
            if not target and node.level == 0:
                continue
            targets.append(target)
            # `from ..store import format` names a submodule, not the package's face
            if len(target) == 1 and target[0] in SUBPACKAGES:
                for alias in node.names:
                    if (ROOT / target[0] / f"{alias.name}.py").is_file() or (ROOT / target[0] / alias.name).is_dir():
                        targets.append(target + [alias.name])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ovstore":
                    targets.append(parts[1:])
        for target in targets:
            if len(target) >= 2 and target[0] in SUBPACKAGES and target[:1] != own:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports ovstore.{'.'.join(target)}")
    return bad


def test_subpackages_found():
    # the check below is vacuous if the walk finds nothing
    assert {"analyze", "capture", "families", "ground", "label", "optimize", "store"} <= set(SUBPACKAGES)
    assert len(_modules()) > 30


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_of_another_subpackages_internals(path):
    assert internal_imports(path) == []


def test_checker_catches_internal_imports(tmp_path, monkeypatch):
    # the checker itself must flag each spelling of a reach past a package face
    fake = ROOT / "label" / "_probe_faces.py"
    source = (
        "from ..store.reader import Store\n"
        "from ..store import format as fmt\n"
        "def f():\n    from ovstore.analyze.text import TextEncoder\n"
        "import ovstore.capture.runner\n"
        "from ..store import open_store\n"
        "from .config import LabelConfig\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    found = internal_imports(fake)
    assert sorted(f.split(" imports ")[1] for f in found) == [
        "ovstore.analyze.text", "ovstore.capture.runner", "ovstore.store.format", "ovstore.store.reader",
    ]


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_face_declares_all(package):
    import importlib

    module = importlib.import_module(f"ovstore.{package}")
    names = getattr(module, "__all__", None)
    assert names, f"ovstore.{package} has no __all__"
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == []
