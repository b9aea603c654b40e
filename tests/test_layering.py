"""The data flows one way: no stage package imports a later one (DESIGN.md, "Layout").

Every ``import`` / ``from ... import`` in ``qcnode/`` is read with ``ast`` (module level and inside
functions alike, so a lazy import counts too) and checked against the order of the stages.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qcnode"

# the flow, earliest first: a package may import its own and earlier ones. http (its own process:
# DICOMweb in through ingest's store, health, and the pages reading the results) comes after the
# stages it serves; only service and cli start it.
STAGES = ("dicom", "db", "net", "ingest", "tracking", "model", "scoring", "report", "delivery", "audit", "alerts",
          "dashboard", "http", "service", "cli")
# shared ground any package may import (the top-level modules: config, log, __init__)
GROUND = {"", "config", "config_checks", "log"}
# side packages (building the model offline): what each may import besides the ground
SIDE = {"training": {"dicom", "model", "simulation", "training"},
        "simulation": {"dicom", "model", "simulation"}}
# packages that may use the side packages (the commands that train, simulate and validate)
SIDE_USERS = {"cli"}
# single modules a side package may use: the real-patient validation checks the node's own verdict rules
SIDE_MODULES = {"training": {"qcnode.scoring.summary"}}


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every qcnode import in ``path`` (a file under ``root``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = path.relative_to(root.parent).parts[:-1]  # the package the module is in
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[:len(here) - node.level + 1]
                name = ".".join(base + ((node.module,) if node.module else ()))
            else:
                name = node.module or ""
            # ``from qcnode import report`` imports the package qcnode.report (``__version__``: the ground)
            out += [(node.lineno, f"{name}.{a.name}" if name == "qcnode" and _is_module(root, a.name) else name)
                    for a in node.names]
    return sorted({(line, name) for line, name in out if name == "qcnode" or name.startswith("qcnode.")})


def _is_module(root: Path, name: str) -> bool:
    return (root / name / "__init__.py").exists() or (root / f"{name}.py").exists()


def _package(module: str) -> str:
    """The top-level package of a qcnode module ("" for the qcnode package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _top(path: Path, root: Path) -> str:
    """The top-level package a file belongs to ("config" etc. for the top-level modules)."""
    rel = path.relative_to(root).parts
    return rel[0] if len(rel) > 1 else path.stem if path.stem != "__init__" else ""


def layering_violations(root: Path = PACKAGE) -> list[str]:
    """``file:line imports module`` for every import against the flow."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        owner = _top(path, root)
        for line, module in _imports(path, root):
            target = _package(module)
            if target in GROUND or target == owner:
                continue
            if owner in GROUND:
                ok = False  # the ground depends on nothing
            elif owner in SIDE:
                ok = target in SIDE[owner] or any(module == m or module.startswith(m + ".")
                                                  for m in SIDE_MODULES.get(owner, ()))
            elif target in SIDE:
                ok = owner in SIDE_USERS
            elif owner in STAGES and target in STAGES:
                ok = STAGES.index(target) < STAGES.index(owner)
            else:
                ok = False  # an unknown package
            if not ok:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return bad


def test_every_package_is_placed():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(STAGES) | set(SIDE), sorted(packages - set(STAGES) - set(SIDE))


def test_no_stage_imports_a_later_one():
    assert layering_violations() == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    root = tmp_path / "qcnode"
    for pkg in ("scoring", "report"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "scoring" / "worker.py").write_text(
        "def f():\n    from qcnode.report import sr\n    from ..report.kos import x\n    import qcnode.config\n")
    (root / "report" / "sr.py").write_text("from qcnode.scoring.worker import f\nfrom . import kos\n")
    assert layering_violations(root) == ["qcnode/scoring/worker.py:2 imports qcnode.report",
                                         "qcnode/scoring/worker.py:3 imports qcnode.report.kos"]


@pytest.mark.parametrize("module, package", [("qcnode", ""), ("qcnode.config", "config"),
                                             ("qcnode.db.models", "db")])
def test_package_of_a_module(module, package):
    assert _package(module) == package
